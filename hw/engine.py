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

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2
from marca.golden import nonlinear as golden_nonlinear

from marca import isa
from marca.config import MarcaConfig
from marca.isa import Buffer, NonlinearFunction
from marca.ops import ArrayMode, Broadcast, ElementwiseOp

from .buffers import ReadPortSignature, WritePortSignature

__all__ = ["ComputeEngine", "ScoreboardEntry", "GranuleAlign", "compute_command_layout", "nonlinear_schedule",
           "check_accelerator_config",
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
                NonlinearFunction.SOFTPLUS: golden_nonlinear.softplus_program(config),
                NonlinearFunction.RSQRT: golden_nonlinear.rsqrt_program(config)}
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
    """An address generator ``base + i0·s0 + i1·s1 + i2·s2`` stepped by the engine's three loops.

    It keeps only the low ``bits`` of the address: every address the engine generates lies inside its
    buffer (the controller checks BUFFER_RANGE before dispatch), and the low bits of a sum depend only on
    the low bits of its terms, so the narrow generator yields the same line and position as a 24-bit one.
    """

    def __init__(self, name, bits):
        self.bits = bits
        self.level0 = Signal(bits, name=f"{name}_level0")
        self.level1 = Signal(bits, name=f"{name}_level1")
        self.current = Signal(bits, name=f"{name}_current")

    def load(self, operand):
        address = operand.address[:self.bits]
        return [self.level0.eq(address), self.level1.eq(address), self.current.eq(address)]

    def step(self, operand, level):
        """Statements for advancing loop ``level`` (2 inner, 1 middle, 0 outer)."""
        bits = self.bits
        stride = operand.strides[level][:bits]
        if level == 2:
            return [self.current.eq((self.current + stride)[:bits])]
        if level == 1:
            following = (self.level1 + stride)[:bits]
            return [self.level1.eq(following), self.current.eq(following)]
        following = (self.level0 + stride)[:bits]
        return [self.level0.eq(following), self.level1.eq(following), self.current.eq(following)]


def _beat_layout(*, line_width, position_bits, width, function_bits, scratch_ports):
    """A fully formed beat as the beat generator hands it to the issue stage."""
    operand = data.StructLayout({
        "source": SOURCE_BITS,
        "scratch_port": range(scratch_ports),   # which scratch read port carries it (if from scratch)
        "line": line_width, "position": position_bits, "broadcast": Broadcast, "constant": width,
        "checked": 1,                    # the scoreboard checks it (not a constant)
        "row_read": 1,                   # an R-element group (ROW broadcast)
    })
    return data.StructLayout({
        "kind": 2, "op": ElementwiseOp, "function": max(1, function_bits), "mode": ArrayMode,
        "nonlinear_line": 1,             # the last pass of a NONLINEAR line (the counter's event)
        "a": operand, "b": operand, "c": operand,
        "scratch_lines": data.ArrayLayout(line_width, scratch_ports),   # scratch read port addresses
        "dst_source": SOURCE_BITS, "dst_line": line_width, "dst_position": position_bits,
        "dst_partial": 1,                # LINEAR: write R elements at the position, not the whole line
    })


_ADDRESS_NONE, _ADDRESS_INPUT, _ADDRESS_SCRATCH = 0, 1, 2


def _schedule_table(schedule, *, width, slot_bits, function_bits, scratch_ports):
    """The passes of :func:`nonlinear_schedule` as a table of constants, one entry per (function, pass).

    Returns ``(layout, entries, function_index_bits, pass_bits)``: entry ``function << pass_bits | pass``
    describes that pass (``valid`` set) with the values the beat generator gives the beat: per operand its
    source (``from_command``: the instruction's ``a`` source), broadcast, constant, where its address comes
    from (none, the ``a`` generator, or scratch ``slot`` on read port ``port``), and where the result goes
    (``dst_final``: the instruction's destination, else scratch ``dst_slot``). Fields a pass leaves alone
    are zero, the beat's default.
    """
    operand = data.StructLayout({"source": SOURCE_BITS, "from_command": 1, "broadcast": 2, "constant": width,
                                 "address": 2, "slot": slot_bits, "port": range(scratch_ports)})
    layout = data.StructLayout({"valid": 1, "op": ElementwiseOp, "function": max(1, function_bits),
                                "a": operand, "b": operand, "c": operand, "dst_final": 1, "dst_slot": slot_bits})
    pass_bits = max(len(passes) for passes in schedule.values()).bit_length()
    function_index_bits = max(1, max(int(function) for function in schedule).bit_length())
    entries = [0] * (1 << (pass_bits + function_index_bits))
    for function, passes in schedule.items():
        for number, step in enumerate(passes):
            fields = {"valid": 1, "op": step["op"], "function": step["function"]}
            scratch_port = 0
            for name in "abc":
                described = step[name]
                if described is None:
                    fields[name] = {"source": CONSTANT_SOURCE}
                    continue
                what, value = described
                if what == "input":
                    fields[name] = {"from_command": 1, "address": _ADDRESS_INPUT, "broadcast": Broadcast.LANE}
                elif what == "constant":
                    fields[name] = {"source": CONSTANT_SOURCE, "constant": value, "broadcast": Broadcast.SCALAR}
                else:
                    fields[name] = {"source": SCRATCH_SOURCE, "address": _ADDRESS_SCRATCH, "slot": value,
                                    "broadcast": Broadcast.LANE, "port": scratch_port}
                    scratch_port += 1
            if step["slot"] is None:
                fields["dst_final"] = 1
            else:
                fields["dst_slot"] = step["slot"]
            entries[int(function) << pass_bits | number] = layout.const(fields).as_value().value
    return layout, [Const(entry, layout.size) for entry in entries], function_index_bits, pass_bits


def _checked_operand_layout(line_width, position_bits):
    """What the scoreboard needs of one operand of the issue stage's beat."""
    return data.StructLayout({"checked": 1, "source": SOURCE_BITS, "line": line_width, "position": position_bits,
                              "row_read": 1})


def _destination_layout(line_width, position_bits):
    return data.StructLayout({"source": SOURCE_BITS, "line": line_width, "position": position_bits, "partial": 1})


class ScoreboardEntry(wiring.Component):
    """One entry of :class:`ComputeEngine`'s scoreboard: the destination of one beat in flight, and whether
    one of the issue stage's operands reads it.

    The engine has ``in_flight_depth`` of these, one module (marca/verilog.py emits it once). Ports are
    packed bits (the layouts of :func:`_destination_layout` and three of :func:`_checked_operand_layout`).

    Ports
    -----
    set : In(1)
        A beat issues into this entry: store ``destination``, mark the entry valid (over ``clear``).
    clear : In(1)
        This entry's beat is written back: mark the entry free.
    destination : In(destination layout)
        The issuing beat's destination.
    operands : In(3 × operand layout)
        The issue stage's operands ``a``, ``b``, ``c``.
    hazard : Out(1)
        The entry is valid and a checked operand reads its line (see ComputeEngine's scoreboard).
    """

    def __init__(self, *, line_width: int, position_bits: int):
        self._destination = _destination_layout(line_width, position_bits)
        self._operand = _checked_operand_layout(line_width, position_bits)
        super().__init__({"set": In(1), "clear": In(1), "destination": In(self._destination.size),
                          "operands": In(3 * self._operand.size), "hazard": Out(1)})

    def elaborate(self, platform):
        m = Module()
        valid = Signal()
        stored = Signal(self._destination.size, name="stored")
        target = self._destination(stored)
        with m.If(self.set):
            m.d.sync += [valid.eq(1), stored.eq(self.destination)]
        with m.Elif(self.clear):
            m.d.sync += valid.eq(0)
        hazards = []
        for number in range(3):
            operand = self._operand(self.operands[number * self._operand.size:(number + 1) * self._operand.size])
            # A read waits for an in-flight write to its line, except where both are R-element groups (ROW
            # reads, LINEAR result writes) at different positions.
            overlaps = ~target.partial | ~operand.row_read | (target.position == operand.position)
            hazards.append(valid & operand.checked & (operand.source == target.source) &
                           (operand.line == target.line) & overlaps)
        m.d.comb += self.hazard.eq(Cat(*hazards).any())
        return m


class GranuleAlign(wiring.Component):
    """Moves an operand's granule to element 0 of the array's operand field (one per operand, one module).

    A line of ``lanes`` elements holds granules of 1, ``R``, ``C`` or ``R·C`` elements; the one an operand
    reads starts at ``position`` (a multiple of its size) and the array reads it from element 0. Element
    ``e`` is read by the broadcasts whose granule exceeds ``e``, so it comes from a position that is a
    multiple of the smallest such granule; elements past the granule are not read by the array and are
    left as they fall. Combinational.

    Ports
    -----
    line : In(lanes · width)
        The operand's line.
    position : In(max(1, log2(lanes)))
        The granule's first element in the line.
    field : Out(lanes · width)
        The array's operand field.
    """

    def __init__(self, *, lanes: int, width: int, granules):
        self._lanes, self._width, self._granules = lanes, width, sorted(granules)
        super().__init__({"line": In(lanes * width), "position": In(max(1, exact_log2(lanes))),
                          "field": Out(lanes * width)})

    def elaborate(self, platform):
        m = Module()
        lanes, width = self._lanes, self._width
        elements = [self.line[e * width:(e + 1) * width] for e in range(lanes)]
        field_elements = []
        for e in range(lanes):
            granule = min(g for g in self._granules if g > e)
            if granule == lanes:          # LANE only, which starts at element 0
                field_elements.append(elements[e])
                continue
            block = self.position[exact_log2(granule):exact_log2(lanes)]
            candidates = [elements[start + e] for start in range(0, lanes, granule)]
            element = Signal(width, name=f"field{e}")
            with m.Switch(block):
                for number, candidate in enumerate(candidates):
                    with m.Case(number):
                        m.d.comb += element.eq(candidate)
            field_elements.append(element)
        m.d.comb += self.field.eq(Cat(*field_elements))
        return m


class ComputeEngine(wiring.Component):
    """Runs compute instructions on the PE array (see the module docstring).

    Ports
    -----
    command : In(stream.Signature(compute_command_layout()))
        Accepted when the beat generator has generated all beats of the previous instruction.
    reads[buffer][operand] : Out(ReadPortSignature)
        Read ports ``a``, ``b``, ``c`` (index 0, 1, 2) of the four buffers. Addresses and enables come
        straight from flip-flops (the issue stage's head beat); the data is used the cycle after a beat
        issues.
    writes[buffer] : Out(WritePortSignature)
        Result writes (buffer 0, WEIGHT, is never written).
    array_in : Out(stream.Signature(operands)) / array_out : In(stream.Signature(results))
        To and from the PE array; ``array_in`` is driven from flip-flops (a registered-output queue).
    idle : Out(1)
        No instruction generating, no beat waiting to issue and no beat in flight.
    abort : In(1)
        Stop generating and issuing beats (the ones issued complete).
    _fault : str or None
        ``"no_scoreboard"``: a deliberately broken variant (beats never wait for their operands), for the
        test that proves the program tests catch it.
    events : Out(...)
        One bit per cycle for the counters (see docs/shell.md); registered, so they count one cycle
        after the event.

    Pipeline: beat generator (loops, address generators, beat description) -> 2-entry skid buffer
    whose head is the issue stage (scoreboard check from flip-flops, buffer reads) -> fetch (read data
    selected, granule moved to element 0) -> operand queue (registered output) -> PE array -> in-order
    write-back. A beat issues at most one per cycle, and one per cycle in steady state.
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
        # Scratch read ports: as many as the most scratch operands one pass reads (2 for the golden
        # programs), each pass's scratch operands taking ports 0, 1, ... in order.
        self.scratch_ports = max([1] + [sum(1 for name in "abc" if step[name] and step[name][0] == "slot")
                                        for passes in self.schedule.values() for step in passes])
        # Beats in flight (issued, not yet written back) in steady state: issue, fetch, staging, two
        # queue cycles, the array's latency; with the margin the table never stops a steady stream.
        self.in_flight_depth = array_latency + 10
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
        rows, cols = config.array_rows, config.array_cols
        lane_shift = exact_log2(lanes)
        line_bits = lanes * width
        scratch_depth = max(2, self.scratch_lines)
        scratch_width = max(1, (scratch_depth - 1).bit_length())
        # Every line the engine touches fits the widest buffer (or scratch) line address.
        line_width = max(scratch_width, *self.line_widths.values())
        address_bits = line_width + lane_shift
        position_bits = max(1, lane_shift)
        scratch_ports = self.scratch_ports
        slot_bits = max(1, (self.slots - 1).bit_length())
        layout = _beat_layout(line_width=line_width, position_bits=position_bits, width=width,
                              function_bits=self.function_bits, scratch_ports=scratch_ports)

        def line_of(address):
            return address[lane_shift:]

        def position_of(address):
            return address[:lane_shift] if lane_shift else Const(0, 1)

        # ==== stage 1: beat generator ==================================================================
        command = _view(compute_command_layout(), "command")
        active = Signal()           # beats of `command` are left to generate
        m.d.comb += [self.command.ready.eq(~active), self.active.eq(active)]
        accept = self.command.valid & ~active
        payload_in = self.command.payload
        # Loop indices with registered "at the last index" flags: the flag for the next position is
        # computed beside the index update (index == count - 2, or count == 1 after a wrap), so the
        # choice of which loop advances starts from flip-flops.
        index = [Signal(24, name=f"loop{level}") for level in range(3)]
        first_outer = Signal()            # index[0] == 0 (LINEAR's first chunk)
        last_outer, last_middle, last_inner = Signal(), Signal(), Signal()
        before_last = [Signal(24, name=f"loop{level}_before_last") for level in range(3)]   # count - 2
        before_last_inner = Signal(24)    # the same for the inner loop of the last outer step
        single = [Signal(name=f"loop{level}_single") for level in range(3)]                # count == 1
        single_last_inner = Signal()
        names = ("a", "b", "c", "bias", "dst")
        generators = {name: _Affine(f"address_{name}", address_bits) for name in names}
        with m.If(accept):
            counts_in = payload_in.counts
            m.d.sync += [command.eq(payload_in), active.eq(1)]
            m.d.sync += [i.eq(0) for i in index] + [first_outer.eq(1)]
            m.d.sync += [before_last[level].eq(counts_in[level] - 2) for level in range(3)]
            m.d.sync += [single[level].eq(counts_in[level] == 1) for level in range(3)]
            m.d.sync += [before_last_inner.eq(payload_in.last_inner - 2),
                         single_last_inner.eq(payload_in.last_inner == 1),
                         last_outer.eq(counts_in[0] == 1), last_middle.eq(counts_in[1] == 1),
                         last_inner.eq(Mux(counts_in[0] == 1, payload_in.last_inner == 1, counts_in[2] == 1))]
            for name in names:
                m.d.sync += generators[name].load(getattr(payload_in, name))

        kind = command.kind

        # The beat at the loop position (combinational; registered into the skid buffer below).
        beat_op = Signal(ElementwiseOp)
        beat_function = Signal(max(1, self.function_bits))
        beat_mode = Signal(ArrayMode)
        sources = {name: Signal(SOURCE_BITS, name=f"{name}_source") for name in "abc"}
        addresses = {name: Signal(address_bits, name=f"{name}_element") for name in "abc"}
        broadcasts = {name: Signal(Broadcast, name=f"{name}_broadcast") for name in "abc"}
        constants = {name: Signal(width, name=f"{name}_constant") for name in "abc"}
        dst_source = Signal(SOURCE_BITS)
        dst_address = Signal(address_bits)
        dst_partial = Signal()      # LINEAR: write R elements at the address, not the whole line
        scratch_port_of = {name: Signal(range(scratch_ports), name=f"{name}_scratch_port") for name in "abc"}
        scratch_lines = [Signal(line_width, name=f"scratch_line{port}") for port in range(scratch_ports)]

        def scratch_address(slot, batch_line):
            return ((slot * NONLINEAR_BATCH + batch_line) << lane_shift)[:address_bits]

        with m.Switch(kind):
            with m.Case(KIND_ELEMENTWISE):
                m.d.comb += [beat_op.eq(command.op), beat_mode.eq(ArrayMode.ELEMENTWISE),
                             dst_source.eq(command.dst.source), dst_address.eq(generators["dst"].current)]
                for position, name in enumerate("abc"):
                    operand = getattr(command, name)
                    m.d.comb += [sources[name].eq(Mux(command.uses[position], operand.source, CONSTANT_SOURCE)),
                                 addresses[name].eq(generators[name].current),
                                 broadcasts[name].eq(operand.broadcast)]
            with m.Case(KIND_LINEAR):
                m.d.comb += [beat_op.eq(ElementwiseOp.MUL), beat_mode.eq(ArrayMode.LINEAR),
                             dst_source.eq(command.dst.source), dst_address.eq(generators["dst"].current),
                             dst_partial.eq(1)]
                for name in "ab":
                    operand = getattr(command, name)
                    m.d.comb += [sources[name].eq(operand.source), addresses[name].eq(generators[name].current),
                                 broadcasts[name].eq(operand.broadcast)]
                # Chunk 0 starts from the bias (or +0); later chunks from the partial sum in the output.
                first_chunk = first_outer
                m.d.comb += [
                    sources["c"].eq(Mux(first_chunk, command.bias.source, command.dst.source)),
                    addresses["c"].eq(Mux(first_chunk, generators["bias"].current, generators["dst"].current)),
                    broadcasts["c"].eq(Mux(first_chunk & (command.bias.source == CONSTANT_SOURCE),
                                           Broadcast.SCALAR, Broadcast.ROW)),
                    constants["c"].eq(0),
                ]
            with m.Case(KIND_NONLINEAR):
                m.d.comb += beat_mode.eq(ArrayMode.ELEMENTWISE)
                batch_line = index[2][:exact_log2(NONLINEAR_BATCH)]
                # The pass at the loop position, looked up in a table of every function's passes
                # (_schedule_table; a NONLINEAR's middle loop counts its passes, so only the low bits of
                # the index matter). A function or pass number that has no pass leaves the beat as
                # the other kinds' defaults (all zero), as an unmatched case would.
                entry_layout, table, function_bits, pass_bits = _schedule_table(
                    self.schedule, width=width, slot_bits=slot_bits, function_bits=self.function_bits,
                    scratch_ports=scratch_ports)
                function = Value.cast(command.function)
                entry = entry_layout(Signal(entry_layout.size, name="pass_entry"))
                m.d.comb += entry.as_value().eq(Array(table)[Cat(index[1][:pass_bits], function[:function_bits])])
                with m.If(entry.valid & (function[function_bits:] == 0)):
                    m.d.comb += [beat_op.eq(entry.op), beat_function.eq(entry.function)]
                    for name in "abc":
                        described = entry[name]
                        address = Signal(address_bits, name=f"{name}_pass_address")
                        with m.Switch(described.address):
                            with m.Case(_ADDRESS_INPUT):
                                m.d.comb += address.eq(generators["a"].current)
                            with m.Case(_ADDRESS_SCRATCH):
                                m.d.comb += [address.eq(scratch_address(described.slot, batch_line)),
                                             Array(scratch_lines)[described.port].eq(line_of(address))]
                        m.d.comb += [sources[name].eq(Mux(described.from_command, command.a.source,
                                                          described.source)),
                                     addresses[name].eq(address), broadcasts[name].eq(described.broadcast),
                                     constants[name].eq(described.constant),
                                     scratch_port_of[name].eq(described.port)]
                    m.d.comb += [dst_source.eq(Mux(entry.dst_final, command.dst.source, SCRATCH_SOURCE)),
                                 dst_address.eq(Mux(entry.dst_final, generators["dst"].current,
                                                    scratch_address(entry.dst_slot, batch_line)))]
            with m.Default():
                m.d.comb += [sources[name].eq(CONSTANT_SOURCE) for name in "abc"]

        generated = _view(layout, "generated")
        m.d.comb += [generated.kind.eq(kind), generated.op.eq(beat_op), generated.function.eq(beat_function),
                     generated.mode.eq(beat_mode),
                     generated.nonlinear_line.eq((kind == KIND_NONLINEAR) & last_middle),
                     generated.dst_source.eq(dst_source), generated.dst_line.eq(line_of(dst_address)),
                     generated.dst_position.eq(position_of(dst_address)), generated.dst_partial.eq(dst_partial)]
        m.d.comb += [generated.scratch_lines[port].eq(scratch_lines[port]) for port in range(scratch_ports)]
        for name in "abc":
            described = generated[name]
            m.d.comb += [described.source.eq(sources[name]), described.scratch_port.eq(scratch_port_of[name]),
                         described.line.eq(line_of(addresses[name])),
                         described.position.eq(position_of(addresses[name])),
                         described.broadcast.eq(broadcasts[name]), described.constant.eq(constants[name]),
                         described.checked.eq(sources[name] != CONSTANT_SOURCE),
                         described.row_read.eq(broadcasts[name] == Broadcast.ROW)]

        # ==== skid buffer: `head` is the beat the issue stage looks at, `skid` the one behind it ========
        # The generator only looks at `skid_valid` (a flip-flop), so the scoreboard check never reaches
        # the loops; a beat that could not move to `head` waits in `skid` and the generator pauses.
        head = _view(layout, "head")
        head_valid = Signal()
        skid = _view(layout, "skid")
        skid_valid = Signal()
        push = Signal()
        issue = Signal()
        m.d.comb += push.eq(active & ~skid_valid & ~self.abort)
        with m.If(issue | ~head_valid):
            with m.If(skid_valid):
                m.d.sync += [head.eq(skid), head_valid.eq(1), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += [head.eq(generated), head_valid.eq(push)]
        with m.Elif(push):
            m.d.sync += [skid.eq(generated), skid_valid.eq(1)]

        with m.If(push):
            with m.If(~last_inner):
                m.d.sync += [index[2].eq(index[2] + 1),
                             last_inner.eq(Mux(last_outer, index[2] == before_last_inner,
                                               index[2] == before_last[2]))]
                for name in names:
                    m.d.sync += generators[name].step(getattr(command, name), 2)
            with m.Elif(~last_middle):
                m.d.sync += [index[2].eq(0), index[1].eq(index[1] + 1),
                             last_inner.eq(Mux(last_outer, single_last_inner, single[2])),
                             last_middle.eq(index[1] == before_last[1])]
                for name in names:
                    m.d.sync += generators[name].step(getattr(command, name), 1)
            with m.Elif(~last_outer):
                next_is_last_outer = index[0] == before_last[0]
                m.d.sync += [index[2].eq(0), index[1].eq(0), index[0].eq(index[0] + 1), first_outer.eq(0),
                             last_outer.eq(next_is_last_outer), last_middle.eq(single[1]),
                             last_inner.eq(Mux(next_is_last_outer, single_last_inner, single[2]))]
                for name in names:
                    m.d.sync += generators[name].step(getattr(command, name), 0)
            with m.Else():
                m.d.sync += active.eq(0)
        with m.If(self.abort):
            m.d.sync += [active.eq(0), head_valid.eq(0), skid_valid.eq(0)]

        # ==== stage 2: issue (scoreboard check of the registered head beat) ==========================
        depth = self.in_flight_depth
        head_entry = Signal(range(depth))       # oldest beat in flight (the next write-back)
        tail = Signal(range(depth))
        count = Signal(range(depth + 1))
        hazard = Signal()                       # the scoreboard's answer (ScoreboardEntry, below)

        queue_depth = 6
        m.submodules.operand_queue = queue = SyncFIFOBuffered(width=self.array_layouts.operands.size,
                                                              depth=queue_depth)
        fetch_valid = Signal()
        staged_valid = Signal()
        room = Signal()
        m.d.comb += [room.eq((queue.level + fetch_valid + staged_valid < queue_depth) & (count < depth - 1)),
                     issue.eq(head_valid & ~self.abort & room & ~hazard)]
        m.d.sync += [
            self.hazard_stall.eq(head_valid & room & hazard),
            self.array_stall.eq(head_valid & ~room),
            self.linear_beat.eq(issue & (head.kind == KIND_LINEAR)),
            self.elementwise_beat.eq(issue & (head.kind == KIND_ELEMENTWISE)),
            self.nonlinear_beat.eq(issue & (head.kind == KIND_NONLINEAR)),
            self.nonlinear_line.eq(issue & head.nonlinear_line),
        ]

        # Read the operand lines of the head beat every cycle (reads have no side effects); the data is
        # used the cycle after the beat issues, when it belongs to that beat.
        buffer_reads = {buffer: getattr(self, f"reads_{buffer.name.lower()}") for buffer in Buffer}
        from amaranth.lib.memory import Memory
        # Block RAM: the scratch is read with one cycle of latency like the buffers, and LUT-RAM copies
        # per read port cost ~200 LUT-RAM cells each at 256 bits.
        m.submodules.scratch = scratch = Memory(shape=line_bits, depth=scratch_depth, init=[],
                                                attrs={"ram_style": "block"})
        scratch_reads = [scratch.read_port() for _ in range(scratch_ports)]
        scratch_write = scratch.write_port()
        for position, name in enumerate("abc"):
            operand = head[name]
            for buffer in Buffer:
                port = buffer_reads[buffer][position]
                m.d.comb += [port.addr.eq(operand.line[:self.line_widths[buffer]]),
                             port.en.eq(operand.source == int(buffer))]
        for port in range(scratch_ports):
            m.d.comb += [scratch_reads[port].addr.eq(head.scratch_lines[port][:scratch_width]),
                         scratch_reads[port].en.eq(1)]

        # ==== stage 3: fetch (read data arrives and is selected by source) ===========================
        fetched = _view(layout, "fetched")
        m.d.sync += fetch_valid.eq(issue)
        with m.If(issue):
            m.d.sync += fetched.eq(head)
        # Stage 4: the selected lines are registered, so a block-RAM read ends at a flip-flop; the
        # granule move below then feeds the operand queue from flip-flops.
        staged = _view(layout, "staged")
        staged_lines = {name: Signal(line_bits, name=f"{name}_staged_line") for name in "abc"}
        m.d.sync += [staged_valid.eq(fetch_valid), staged.eq(fetched)]
        for position, name in enumerate("abc"):
            described = fetched[name]
            choices = [(described.source == int(buffer), buffer_reads[buffer][position].data) for buffer in Buffer]
            choices += [((described.source == SCRATCH_SOURCE) & (described.scratch_port == number), port.data)
                        for number, port in enumerate(scratch_reads)]
            choices += [(described.source == CONSTANT_SOURCE, described.constant)]
            m.d.sync += staged_lines[name].eq(_or_all(Mux(selected, choice, 0) for selected, choice in choices))

        payload = _view(self.array_layouts.operands, "payload")
        m.d.comb += [payload.mode.eq(staged.mode), payload.op.eq(staged.op),
                     payload.first.eq(1), payload.last.eq(1)]
        if self.function_bits:
            m.d.comb += payload.function.eq(staged.function)
        granules = sorted({1, rows, cols, lanes})
        for name in "abc":
            described = staged[name]
            # The granule starts at `position` (a multiple of the granule) in its line: moved to element 0.
            align = m.submodules[f"{name}_align"] = GranuleAlign(lanes=lanes, width=width, granules=granules)
            m.d.comb += [align.line.eq(staged_lines[name]), align.position.eq(described.position),
                         getattr(payload, name).as_value().eq(align.field),
                         getattr(payload, f"broadcast_{name}").eq(described.broadcast)]
        m.d.comb += [queue.w_en.eq(staged_valid), queue.w_data.eq(payload.as_value())]
        m.d.comb += [self.array_in.valid.eq(queue.r_rdy), self.array_in.payload.eq(queue.r_data),
                     queue.r_en.eq(self.array_in.ready)]

        # ==== scoreboard push (at issue) and write-back (in order) ====================================
        # The scoreboard table answers "is this line being written?"; the write-back takes its target
        # from a queue of the same destinations with a registered output, so no 1-of-N table read sits
        # between the array's result and the buffer write ports.
        destination = _destination_layout(line_width, position_bits)
        m.submodules.destination_queue = destinations = SyncFIFOBuffered(width=destination.size, depth=depth)
        pop = Signal()
        issued_destination = _view(destination, "issued_destination")
        m.d.comb += [issued_destination.source.eq(head.dst_source), issued_destination.line.eq(head.dst_line),
                     issued_destination.position.eq(head.dst_position),
                     issued_destination.partial.eq(head.dst_partial),
                     destinations.w_en.eq(issue), destinations.w_data.eq(issued_destination.as_value()),
                     destinations.r_en.eq(pop)]
        with m.If(issue):
            m.d.sync += tail.eq(Mux(tail == depth - 1, 0, tail + 1))
        # The table: one ScoreboardEntry per beat in flight, written at `tail` when a beat issues, freed
        # at `head_entry` when its result is written back.
        operands = Cat(*(Cat(head[name].checked, head[name].source, head[name].line, head[name].position,
                             head[name].row_read) for name in "abc"))     # _checked_operand_layout's order
        entry_hazards = []
        for entry in range(depth):
            scoreboard_entry = m.submodules[f"scoreboard_{entry}"] = ScoreboardEntry(
                line_width=line_width, position_bits=position_bits)
            m.d.comb += [scoreboard_entry.set.eq(issue & (tail == entry)),
                         scoreboard_entry.clear.eq(pop & (head_entry == entry)),
                         scoreboard_entry.destination.eq(issued_destination.as_value()),
                         scoreboard_entry.operands.eq(operands)]
            entry_hazards.append(scoreboard_entry.hazard)
        if self._fault != "no_scoreboard":       # the deliberately broken variant ignores dependencies
            m.d.comb += hazard.eq(Cat(*entry_hazards).any())
        with m.If(pop):
            m.d.sync += head_entry.eq(Mux(head_entry == depth - 1, 0, head_entry + 1))
        # Both outcomes of `issue` (the latest signal here) are ready before it arrives.
        m.d.sync += count.eq(Mux(issue, count + 1 - pop, count - pop))

        # Results land in a queue as deep as the scoreboard, so the array never waits for a write port:
        # every beat in the queue is also in flight (count <= depth - 1 at issue), so it cannot overflow.
        # Its `o.ready` is then constant and the array's pipeline has no enable net spanning thousands of
        # flip-flops (which is what limited the clock on the FPGA).
        out = self.array_out
        m.submodules.result_queue = results = SyncFIFOBuffered(width=len(out.payload.result.as_value()),
                                                               depth=depth)
        m.d.comb += [out.ready.eq(1), results.w_en.eq(out.valid),
                     results.w_data.eq(out.payload.result.as_value())]
        result = results.r_data
        result_valid = results.r_rdy
        target = destination(destinations.r_data)
        write_data = Signal(line_bits)
        write_enable = Signal(lanes)
        with m.If(target.partial):
            # R elements at `position`: every R-element group of the line carries them and the enables
            # pick the one at the position (no shifter).
            m.d.comb += [write_data.eq(Cat(*[result[:rows * width]] * (lanes // rows))),
                         write_enable.eq(Const((1 << rows) - 1, lanes) << target.position)]
        with m.Else():
            m.d.comb += [write_data.eq(result), write_enable.eq(Const((1 << lanes) - 1, lanes))]
        ready = Signal()
        with m.Switch(target.source):
            for buffer in Buffer:
                if buffer == Buffer.WEIGHT:
                    continue
                port = getattr(self, f"writes_{buffer.name.lower()}")
                with m.Case(int(buffer)):
                    m.d.comb += [port.data.eq(write_data), port.en.eq(Mux(result_valid, write_enable, 0)),
                                 ready.eq(port.ready)]
                m.d.comb += port.addr.eq(target.line[:self.line_widths[buffer]])
            with m.Case(SCRATCH_SOURCE):
                m.d.comb += [scratch_write.data.eq(write_data), scratch_write.en.eq(result_valid), ready.eq(1)]
            with m.Default():
                m.d.comb += ready.eq(1)
        m.d.comb += scratch_write.addr.eq(target.line[:scratch_width])
        # A result never arrives before its destination left the queue's two-cycle path (the array's
        # latency is longer); the r_rdy term only makes that explicit.
        m.d.comb += [pop.eq(result_valid & ready & destinations.r_rdy), results.r_en.eq(pop),
                     self.write_stall.eq(result_valid & ~(ready & destinations.r_rdy))]
        m.d.comb += self.idle.eq(~active & ~head_valid & ~skid_valid & (count == 0) & ~fetch_valid & ~staged_valid)
        return m


def _or_all(values):
    values = list(values)
    result = values[0]
    for value in values[1:]:
        result = result | value
    return result


def _view(layout, name):
    """A register or net of ``layout`` as a view of a plain signal: the beat descriptions are copied from
    stage to stage, and a ``Signal(layout)`` would put a named wire per field, per copy, in the Verilog."""
    return layout(Signal(layout.size, name=name))
