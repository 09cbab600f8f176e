"""The compute engine: runs LINEAR, ELEMENTWISE and NONLINEAR instructions on the PE array.

:class:`ComputeEngine` turns one compute command (from :class:`marca.hw.controller.Controller`) into a
stream of PE-array beats: a three-level loop walks the beats, each operand is read from its buffer (one
read port per operand per buffer), cut down to its granule, and sent to
:class:`marca.hw.pe_array.PEArray`; results are written back in order. A table of the destinations of
beats in flight is the scoreboard: a beat whose operand line is still being computed waits, so
instructions follow each other with no drain in between. NONLINEAR instructions run the golden model's
pass programs (:func:`nonlinear_schedule`) through the engine's private scratch memory.

Design notes and the measured numbers are in docs/shell.md.
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2
from marca.golden import nonlinear as golden_nonlinear

from marca import isa
from marca.config import MarcaConfig
from marca.isa import Buffer, NonlinearFunction
from marca.ops import ArrayMode, Broadcast, ElementwiseOp

from .buffers import ReadPortSignature, WritePortSignature

__all__ = ["ComputeEngine", "compute_command_layout", "nonlinear_schedule", "check_accelerator_config",
           "ADDRESS_BITS", "SCRATCH_SOURCE", "CONSTANT_SOURCE", "NONLINEAR_BATCH", "SOURCE_BITS",
           "KIND_LINEAR", "KIND_ELEMENTWISE", "KIND_NONLINEAR"]


ADDRESS_BITS = 24                  # buffer element addresses (marca.isa)
SCRATCH_SOURCE = 4                 # operand source: the compute engine's private nonlinear scratch
CONSTANT_SOURCE = 5                # operand source: a constant (element 0 of the operand field)
NONLINEAR_BATCH = 16               # lines per NONLINEAR batch (each pass runs over a batch: no RAW stalls)
SOURCE_BITS = 3
KIND_LINEAR, KIND_ELEMENTWISE, KIND_NONLINEAR = 0, 1, 2


def check_accelerator_config(config: MarcaConfig):
    if not isinstance(config, MarcaConfig):
        raise ValueError(f"config must be a MarcaConfig, not {config!r}")
    isa.check_config(config)
    if config.array_rows & (config.array_rows - 1):
        raise ValueError(f"array_rows must be a power of two for the accelerator (buffer lines are addressed "
                         f"by bit slicing), not {config.array_rows!r}")


def _describe_operand(operand, slot_of):
    if operand is None:
        return None
    if operand.kind == "input":
        return ("input", 0)
    if operand.kind == "constant":
        return ("constant", operand.bits)
    return ("slot", slot_of[operand.index])


def nonlinear_schedule(config: MarcaConfig):
    """Per function: the passes of its golden program with scratch slots assigned.

    Returns ``(slots, {function: [pass, ...]})``; each pass is a dict with ``op``, ``function`` and, for
    ``a``/``b``/``c``, ``(kind, value)`` where kind is ``"input"``, ``"slot"`` (value: scratch slot) or
    ``"constant"`` (value: bit pattern), or None; ``slot`` is where the pass writes (None for the last pass,
    which writes the destination). Slots are reused once a result is dead.
    """
    schedules, most = {}, 1
    programs = {NonlinearFunction.EXP: golden_nonlinear.exp_program(config),
                NonlinearFunction.SILU: golden_nonlinear.silu_program(config),
                NonlinearFunction.SOFTPLUS: golden_nonlinear.softplus_program(config)}
    for function, program in programs.items():
        passes = program.passes
        last_use = {}
        for number, step in enumerate(passes):
            for operand in step.operands():
                if operand.kind == "result":
                    last_use[operand.index] = number
        slot_of, free, used = {}, [], 0
        out = []
        for number, step in enumerate(passes):
            entry = {"op": step.op, "function": int(step.function) if step.function is not None else 0,
                     **{name: _describe_operand(getattr(step, name), slot_of) for name in "abc"}}
            # Results whose last reader is this pass free their slot after it reads them.
            for operand in step.operands():
                if operand.kind == "result" and last_use.get(operand.index) == number:
                    free.append(slot_of[operand.index])
            if number == len(passes) - 1:
                entry["slot"] = None
            else:
                if free:
                    slot = free.pop(0)
                else:
                    slot, used = used, used + 1
                slot_of[number] = slot
                entry["slot"] = slot
                if number not in last_use:        # never read: free at once
                    free.append(slot)
            out.append(entry)
        schedules[function] = out
        most = max(most, used)
    return most, schedules


def _operand_layout():
    return data.StructLayout({
        "source": SOURCE_BITS, "broadcast": Broadcast, "address": ADDRESS_BITS,
        "strides": data.ArrayLayout(ADDRESS_BITS, 3),
    })


def compute_command_layout(function_bits: int = 4) -> data.StructLayout:
    """A compute instruction as the controller hands it to :class:`ComputeEngine` (loops and addresses
    already scaled to elements)."""
    return data.StructLayout({
        "kind": 2,
        "op": ElementwiseOp,
        "function": NonlinearFunction,
        "counts": data.ArrayLayout(24, 3),        # outer, middle, inner loop counts
        "last_inner": 24,                         # inner count of the last outer step (NONLINEAR's last batch)
        "a": _operand_layout(), "b": _operand_layout(), "c": _operand_layout(),
        "bias": _operand_layout(),                # LINEAR: c of chunk 0 (or the constant +0)
        "dst": _operand_layout(),
        "uses": 3,                                # ELEMENTWISE: operands a, b, c read
    })


class _Affine:
    """An address generator ``base + i0·s0 + i1·s1 + i2·s2`` stepped by the engine's three loops."""

    def __init__(self, m, name):
        self.level0 = Signal(ADDRESS_BITS, name=f"{name}_level0")
        self.level1 = Signal(ADDRESS_BITS, name=f"{name}_level1")
        self.current = Signal(ADDRESS_BITS, name=f"{name}_current")
        self.m = m

    def load(self, operand):
        return [self.level0.eq(operand.address), self.level1.eq(operand.address),
                self.current.eq(operand.address)]

    def step(self, operand, level):
        """Statements for advancing loop ``level`` (2 inner, 1 middle, 0 outer)."""
        strides = operand.strides
        if level == 2:
            return [self.current.eq(self.current + strides[2])]
        if level == 1:
            return [self.level1.eq(self.level1 + strides[1]), self.current.eq(self.level1 + strides[1])]
        return [self.level0.eq(self.level0 + strides[0]), self.level1.eq(self.level0 + strides[0]),
                self.current.eq(self.level0 + strides[0])]


class ComputeEngine(wiring.Component):
    """Runs compute instructions on the PE array (see the module docstring).

    Ports
    -----
    command : In(stream.Signature(compute_command_layout()))
        Accepted when the previous instruction has issued all its beats.
    reads[buffer][operand] : Out(ReadPortSignature)
        Read ports ``a``, ``b``, ``c`` (index 0, 1, 2) of the four buffers.
    writes[buffer] : Out(WritePortSignature)
        Result writes (buffer 0, WEIGHT, is never written).
    array_in : Out(stream.Signature(operands)) / array_out : In(stream.Signature(results))
        To and from the PE array.
    idle : Out(1)
        No instruction issuing and no beat in flight.
    abort : In(1)
        Stop issuing beats (the ones in flight complete).
    _fault : str or None
        ``"no_scoreboard"``: a deliberately broken variant (beats never wait for their operands), for the
        test that proves the program tests catch it.
    events : Out(...)
        One bit per cycle for the counters (see docs/shell.md).
    """

    def __init__(self, *, config: MarcaConfig, array_layouts, function_bits: int, array_latency: int,
                 line_widths: dict, _fault: str | None = None):
        check_accelerator_config(config)
        if _fault not in (None, "no_scoreboard"):
            raise ValueError(f"_fault must be None or 'no_scoreboard', not {_fault!r}")
        self._fault = _fault
        self.config = config
        self.lanes = config.lanes
        self.width = config.compute_format.width
        self.function_bits = function_bits
        self.array_layouts = array_layouts
        self.line_widths = line_widths          # {Buffer: line address bits}
        self.slots, self.schedule = nonlinear_schedule(config)
        self.scratch_lines = self.slots * NONLINEAR_BATCH
        self.in_flight_depth = max(16, 1 << (array_latency + 8).bit_length())
        line_bits = self.lanes * self.width
        reads = {}
        for buffer in Buffer:
            reads[f"reads_{buffer.name.lower()}"] = Out(ReadPortSignature(
                addr_width=line_widths[buffer], data_width=line_bits)).array(3)
        writes = {f"writes_{buffer.name.lower()}": Out(WritePortSignature(
            addr_width=line_widths[buffer], data_width=line_bits, elements=self.lanes))
            for buffer in Buffer if buffer != Buffer.WEIGHT}
        super().__init__({
            "command": In(stream.Signature(compute_command_layout())),
            **reads, **writes,
            "array_in": Out(stream.Signature(array_layouts.operands)),
            "array_out": In(stream.Signature(array_layouts.results)),
            "idle": Out(1), "abort": In(1),
            "linear_beat": Out(1), "elementwise_beat": Out(1), "nonlinear_beat": Out(1),
            "nonlinear_line": Out(1), "hazard_stall": Out(1), "array_stall": Out(1),
            "write_stall": Out(1), "active": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        config = self.config
        lanes, width = self.lanes, self.width
        rows = config.array_rows
        lane_shift = exact_log2(lanes)
        line_bits = lanes * width
        max_line_width = ADDRESS_BITS - lane_shift

        command = Signal(compute_command_layout())
        active = Signal()
        m.d.comb += [self.command.ready.eq(~active), self.active.eq(active)]
        accept = self.command.valid & ~active
        with m.If(accept):
            m.d.sync += [command.eq(self.command.payload), active.eq(1)]

        index = [Signal(24, name=f"loop{level}") for level in range(3)]
        names = ("a", "b", "c", "bias", "dst")
        generators = {name: _Affine(m, f"address_{name}") for name in names}
        with m.If(accept):
            m.d.sync += [i.eq(0) for i in index]
            for name in names:
                m.d.sync += generators[name].load(getattr(self.command.payload, name))

        kind = command.kind
        counts = command.counts
        last_outer = index[0] == counts[0] - 1
        inner_count = Mux(last_outer, command.last_inner, counts[2])
        last_middle = index[1] == counts[1] - 1
        last_inner = index[2] == inner_count - 1

        # ---- the beat at the loop position ------------------------------------------------------------
        beat_op = Signal(ElementwiseOp)
        beat_function = Signal(max(1, self.function_bits))
        beat_mode = Signal(ArrayMode)
        sources = {name: Signal(SOURCE_BITS, name=f"{name}_source") for name in "abc"}
        addresses = {name: Signal(ADDRESS_BITS, name=f"{name}_element") for name in "abc"}
        broadcasts = {name: Signal(Broadcast, name=f"{name}_broadcast") for name in "abc"}
        constants = {name: Signal(width, name=f"{name}_constant") for name in "abc"}
        used = {name: Signal(name=f"{name}_used") for name in "abc"}
        dst_source = Signal(SOURCE_BITS)
        dst_address = Signal(ADDRESS_BITS)
        dst_partial = Signal()      # LINEAR: write R elements at the address, not the whole line

        with m.Switch(kind):
            with m.Case(KIND_ELEMENTWISE):
                m.d.comb += [beat_op.eq(command.op), beat_mode.eq(ArrayMode.ELEMENTWISE),
                             dst_source.eq(command.dst.source), dst_address.eq(generators["dst"].current)]
                for position, name in enumerate("abc"):
                    operand = getattr(command, name)
                    m.d.comb += [sources[name].eq(operand.source), addresses[name].eq(generators[name].current),
                                 broadcasts[name].eq(operand.broadcast), used[name].eq(command.uses[position])]
            with m.Case(KIND_LINEAR):
                m.d.comb += [beat_op.eq(ElementwiseOp.MUL), beat_mode.eq(ArrayMode.LINEAR),
                             dst_source.eq(command.dst.source), dst_address.eq(generators["dst"].current),
                             dst_partial.eq(1)]
                for name in "ab":
                    operand = getattr(command, name)
                    m.d.comb += [sources[name].eq(operand.source), addresses[name].eq(generators[name].current),
                                 broadcasts[name].eq(operand.broadcast), used[name].eq(1)]
                # Chunk 0 starts from the bias (or +0); later chunks from the partial sum in the output.
                first_chunk = index[0] == 0
                m.d.comb += [
                    sources["c"].eq(Mux(first_chunk, command.bias.source, command.dst.source)),
                    addresses["c"].eq(Mux(first_chunk, generators["bias"].current, generators["dst"].current)),
                    broadcasts["c"].eq(Mux(first_chunk & (command.bias.source == CONSTANT_SOURCE),
                                           Broadcast.SCALAR, Broadcast.ROW)),
                    constants["c"].eq(0), used["c"].eq(1),
                ]
            with m.Case(KIND_NONLINEAR):
                m.d.comb += beat_mode.eq(ArrayMode.ELEMENTWISE)
                batch_line = index[2]
                with m.Switch(command.function):
                    for function, passes in self.schedule.items():
                        with m.Case(function):
                            with m.Switch(index[1]):
                                for number, step in enumerate(passes):
                                    with m.Case(number):
                                        m.d.comb += [beat_op.eq(step["op"]), beat_function.eq(step["function"])]
                                        for name in "abc":
                                            described = step[name]
                                            if described is None:
                                                continue
                                            what, value = described
                                            m.d.comb += used[name].eq(1)
                                            if what == "input":
                                                m.d.comb += [sources[name].eq(command.a.source),
                                                             addresses[name].eq(generators["a"].current),
                                                             broadcasts[name].eq(Broadcast.LANE)]
                                            elif what == "constant":
                                                m.d.comb += [sources[name].eq(CONSTANT_SOURCE),
                                                             constants[name].eq(value),
                                                             broadcasts[name].eq(Broadcast.SCALAR)]
                                            else:
                                                m.d.comb += [sources[name].eq(SCRATCH_SOURCE),
                                                             addresses[name].eq(
                                                                 ((value * NONLINEAR_BATCH + batch_line)
                                                                  << lane_shift)[:ADDRESS_BITS]),
                                                             broadcasts[name].eq(Broadcast.LANE)]
                                        if step["slot"] is None:
                                            m.d.comb += [dst_source.eq(command.dst.source),
                                                         dst_address.eq(generators["dst"].current)]
                                        else:
                                            m.d.comb += [dst_source.eq(SCRATCH_SOURCE),
                                                         dst_address.eq(((step["slot"] * NONLINEAR_BATCH
                                                                          + batch_line) << lane_shift)
                                                                        [:ADDRESS_BITS])]
        for name in "abc":
            with m.If(~used[name]):
                m.d.comb += sources[name].eq(CONSTANT_SOURCE)

        # ---- scoreboard: destinations of beats in flight -----------------------------------------------
        depth = self.in_flight_depth
        flight_valid = Signal(depth)
        flight_source = Array(Signal(SOURCE_BITS, name=f"flight_source{i}") for i in range(depth))
        flight_line = Array(Signal(max_line_width, name=f"flight_line{i}") for i in range(depth))
        flight_position = Array(Signal(lane_shift + 1, name=f"flight_position{i}") for i in range(depth))
        flight_partial = Signal(depth)
        head = Signal(range(depth))
        tail = Signal(range(depth))
        count = Signal(range(depth + 1))

        # A read waits for an in-flight write to its line, except where both are R-element groups (ROW
        # reads, LINEAR result writes) at different positions: LINEAR's partial sums of neighbouring row
        # tiles share a line and must not wait for each other.
        hazard = Signal()
        hazard_terms = []
        for name in "abc":
            line = addresses[name][lane_shift:]
            position = addresses[name][:lane_shift] if lane_shift else Const(0, 1)
            row_read = broadcasts[name] == Broadcast.ROW
            for entry in range(depth):
                overlaps = ~flight_partial[entry] | ~row_read | (flight_position[entry] == position)
                hazard_terms.append(flight_valid[entry] & (sources[name] == flight_source[entry]) &
                                    (line == flight_line[entry]) & (sources[name] != CONSTANT_SOURCE) &
                                    overlaps)
        if self._fault != "no_scoreboard":       # the deliberately broken variant ignores dependencies
            m.d.comb += hazard.eq(Cat(*hazard_terms).any())

        # ---- issue -------------------------------------------------------------------------------------
        queue_depth = 4
        m.submodules.operand_queue = queue = SyncFIFO(width=self.array_layouts.operands.size,
                                                      depth=queue_depth)
        fetch_valid = Signal()
        issue = Signal()
        room = (queue.level + fetch_valid < queue_depth) & (count < depth - 1)
        m.d.comb += issue.eq(active & ~self.abort & room & ~hazard)
        m.d.comb += [self.hazard_stall.eq(active & room & hazard),
                     self.array_stall.eq(active & ~room)]

        with m.If(issue):
            with m.If(~last_inner):
                m.d.sync += index[2].eq(index[2] + 1)
                for name in names:
                    m.d.sync += generators[name].step(getattr(command, name), 2)
            with m.Elif(~last_middle):
                m.d.sync += [index[2].eq(0), index[1].eq(index[1] + 1)]
                for name in names:
                    m.d.sync += generators[name].step(getattr(command, name), 1)
            with m.Elif(~last_outer):
                m.d.sync += [index[2].eq(0), index[1].eq(0), index[0].eq(index[0] + 1)]
                for name in names:
                    m.d.sync += generators[name].step(getattr(command, name), 0)
            with m.Else():
                m.d.sync += active.eq(0)
        with m.If(active & self.abort):
            m.d.sync += active.eq(0)
        m.d.comb += [
            self.linear_beat.eq(issue & (kind == KIND_LINEAR)),
            self.elementwise_beat.eq(issue & (kind == KIND_ELEMENTWISE)),
            self.nonlinear_beat.eq(issue & (kind == KIND_NONLINEAR)),
            self.nonlinear_line.eq(issue & (kind == KIND_NONLINEAR) & last_middle),
        ]

        # Read the operand lines.
        buffer_reads = {buffer: getattr(self, f"reads_{buffer.name.lower()}") for buffer in Buffer}
        scratch = None
        from amaranth.lib.memory import Memory
        m.submodules.scratch = scratch = Memory(shape=line_bits, depth=max(2, self.scratch_lines), init=[])
        scratch_reads = [scratch.read_port() for _ in range(3)]
        scratch_write = scratch.write_port()
        scratch_width = max(1, (max(2, self.scratch_lines) - 1).bit_length())
        for position, name in enumerate("abc"):
            line = addresses[name][lane_shift:]
            for buffer in Buffer:
                port = buffer_reads[buffer][position]
                m.d.comb += [port.addr.eq(line[:self.line_widths[buffer]]),
                             port.en.eq(issue & (sources[name] == int(buffer)))]
            m.d.comb += [scratch_reads[position].addr.eq(line[:scratch_width]),
                         scratch_reads[position].en.eq(issue & (sources[name] == SCRATCH_SOURCE))]

        # Fetch stage: registered beat description, read data arrives.
        fetched = {name: {"source": Signal(SOURCE_BITS, name=f"fetched_{name}_source"),
                          "position": Signal(lane_shift + 1, name=f"fetched_{name}_position"),
                          "broadcast": Signal(Broadcast, name=f"fetched_{name}_broadcast"),
                          "constant": Signal(width, name=f"fetched_{name}_constant")} for name in "abc"}
        fetched_op = Signal(ElementwiseOp)
        fetched_function = Signal(max(1, self.function_bits))
        fetched_mode = Signal(ArrayMode)
        m.d.sync += fetch_valid.eq(issue)
        with m.If(issue):
            m.d.sync += [fetched_op.eq(beat_op), fetched_function.eq(beat_function), fetched_mode.eq(beat_mode)]
            for name in "abc":
                f = fetched[name]
                m.d.sync += [f["source"].eq(sources[name]), f["broadcast"].eq(broadcasts[name]),
                             f["constant"].eq(constants[name]),
                             f["position"].eq(addresses[name][:lane_shift] if lane_shift else 0)]

        payload = Signal(self.array_layouts.operands)
        m.d.comb += [payload.mode.eq(fetched_mode), payload.op.eq(fetched_op),
                     payload.first.eq(1), payload.last.eq(1)]
        if self.function_bits:
            m.d.comb += payload.function.eq(fetched_function)
        for position, name in enumerate("abc"):
            f = fetched[name]
            line = Signal(line_bits, name=f"{name}_line_data")
            with m.Switch(f["source"]):
                for buffer in Buffer:
                    with m.Case(int(buffer)):
                        m.d.comb += line.eq(buffer_reads[buffer][position].data)
                with m.Case(SCRATCH_SOURCE):
                    m.d.comb += line.eq(scratch_reads[position].data)
                with m.Case(CONSTANT_SOURCE):
                    m.d.comb += line.eq(f["constant"])
            field = getattr(payload, name)
            # The granule starts at `position` in its line: shift it down to element 0.
            shifted = Signal(line_bits, name=f"{name}_field")
            m.d.comb += shifted.eq(line >> (f["position"] * width))
            m.d.comb += [field.as_value().eq(shifted), getattr(payload, f"broadcast_{name}").eq(f["broadcast"])]
        m.d.comb += [queue.w_en.eq(fetch_valid), queue.w_data.eq(payload.as_value())]
        m.d.comb += [self.array_in.valid.eq(queue.r_rdy), self.array_in.payload.eq(queue.r_data),
                     queue.r_en.eq(self.array_in.ready)]

        # ---- scoreboard push (at issue) and writeback (in order) ---------------------------------------
        pop = Signal()
        with m.If(issue):
            m.d.sync += [flight_source[tail].eq(dst_source), flight_line[tail].eq(dst_address[lane_shift:]),
                         flight_position[tail].eq(dst_address[:lane_shift] if lane_shift else 0),
                         flight_partial.bit_select(tail, 1).eq(dst_partial),
                         tail.eq(Mux(tail == depth - 1, 0, tail + 1))]
        for entry in range(depth):
            set_entry = issue & (tail == entry)
            clear_entry = pop & (head == entry)
            with m.If(set_entry):
                m.d.sync += flight_valid[entry].eq(1)
            with m.Elif(clear_entry):
                m.d.sync += flight_valid[entry].eq(0)
        with m.If(pop):
            m.d.sync += head.eq(Mux(head == depth - 1, 0, head + 1))
        m.d.sync += count.eq(count + issue - pop)

        out = self.array_out
        result = out.payload.result.as_value()
        target = flight_source[head]
        target_line = flight_line[head]
        target_position = flight_position[head]
        partial = flight_partial.bit_select(head, 1)
        write_data = Signal(line_bits)
        write_enable = Signal(lanes)
        with m.If(partial):
            m.d.comb += [write_data.eq(result << (target_position * width)),
                         write_enable.eq(Const((1 << rows) - 1, lanes) << target_position)]
        with m.Else():
            m.d.comb += [write_data.eq(result), write_enable.eq(Const((1 << lanes) - 1, lanes))]
        ready = Signal()
        with m.Switch(target):
            for buffer in Buffer:
                if buffer == Buffer.WEIGHT:
                    continue
                port = getattr(self, f"writes_{buffer.name.lower()}")
                with m.Case(int(buffer)):
                    m.d.comb += [port.addr.eq(target_line[:self.line_widths[buffer]]), port.data.eq(write_data),
                                 port.en.eq(Mux(out.valid, write_enable, 0)), ready.eq(port.ready)]
                m.d.comb += port.addr.eq(target_line[:self.line_widths[buffer]])
            with m.Case(SCRATCH_SOURCE):
                m.d.comb += [scratch_write.addr.eq(target_line[:scratch_width]), scratch_write.data.eq(write_data),
                             scratch_write.en.eq(out.valid), ready.eq(1)]
            with m.Default():
                m.d.comb += ready.eq(1)
        m.d.comb += [out.ready.eq(ready), pop.eq(out.valid & ready),
                     self.write_stall.eq(out.valid & ~ready)]
        m.d.comb += self.idle.eq(~active & (count == 0) & ~fetch_valid)
        return m
