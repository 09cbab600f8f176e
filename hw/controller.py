"""The controller: instruction fetch, decode and checks, dispatch to the DMA and the compute engine.

* :class:`InstructionFetch` reads 256-bit instruction words over the AXI4 read channels (its own ARID) a
  few instructions ahead of decode; a word whose read answered SLVERR/DECERR is tagged and faults only if
  decode reaches it.
* :class:`Controller` decodes with the bit positions of :func:`marca.isa.field_layout`, checks in the
  ISA's order (illegal opcode, illegal field, misaligned, buffer range, memory range), dispatches DMA
  instructions to the DMA and compute instructions to :class:`marca.hw.engine.ComputeEngine` so that both run at once, and
  makes BARRIER and HALT wait for both. Errors halt cleanly: nothing more is dispatched, everything in
  flight finishes (every AXI burst completes), then ``done`` with the error code and the faulting PC.
  For timing, the head of the fetch queue is first copied into a register and checked over
  :attr:`Controller.check_cycles` cycles of free-running pipeline registers; dispatch copies commands
  staged from the held word (one instruction per ``check_cycles + 1`` cycles at most).

Design notes, the overlap rules and the measured numbers are in docs/shell.md.
"""

from amaranth.hdl import Cat, Const, Module, Mux, ResetInserter, Signal, Value
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from marca import isa
from marca.config import MarcaConfig
from marca.isa import Buffer, ErrorCode, LinearInit, Opcode
from marca.ops import Broadcast, ElementwiseOp

from .axi import AXI4Signature, AXIBurst, AXIResponse
from .engine import (CONSTANT_SOURCE, KIND_ELEMENTWISE, KIND_LINEAR, KIND_NONLINEAR, NONLINEAR_BATCH,
                     check_accelerator_config, compute_command_layout, nonlinear_schedule)

__all__ = ["InstructionFetch", "Controller"]



# ------------------------------------------------------------------------------------------------------
# Instruction fetch
# ------------------------------------------------------------------------------------------------------

class InstructionFetch(wiring.Component):
    """Reads instruction words ahead of decode over an AXI4 read channel pair.

    Ports
    -----
    start : In(1)
        Begin fetching at ``address`` (a multiple of 32).
    stop : In(1)
        Stop issuing reads (the in-flight ones still complete); ``idle`` once they have.
    address : In(addr_width)
    ar/r : the AXI4 read channels (``axi`` with only AR and R used)
    instruction : Out(stream.Signature(257))
        Bits 255..0: the word; bit 256: its read answered an error.
    idle : Out(1)
        No read in flight.
    """

    def __init__(self, *, addr_width: int, data_width: int, axi_id: int = 1, queue_depth: int = 4):
        self.addr_width = addr_width
        self.data_width = data_width
        self.axi_id = axi_id
        self.queue_depth = queue_depth
        super().__init__({
            "start": In(1), "stop": In(1), "address": In(addr_width),
            "axi": Out(AXI4Signature(addr_width=addr_width, data_width=data_width)),
            "instruction": Out(stream.Signature(isa.INSTRUCTION_BITS + 1)),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        axi = self.axi
        beat_bytes = self.data_width // 8
        word_bits = isa.INSTRUCTION_BITS
        beats = max(1, word_bits // self.data_width)
        # A start empties the queue of words prefetched for the previous program.
        queue = SyncFIFO(width=word_bits + 1, depth=self.queue_depth)
        m.submodules.queue = ResetInserter(self.start)(queue)

        fetching = Signal()
        next_address = Signal(self.addr_width)
        in_flight = Signal(range(self.queue_depth + 1))       # instructions requested, not yet queued
        with m.If(self.start):
            m.d.sync += [fetching.eq(1), next_address.eq(self.address)]
        with m.If(self.stop):
            m.d.sync += fetching.eq(0)

        issue = Signal()
        pending = Signal()          # ARVALID stays high until accepted, even if a stop comes meanwhile
        m.d.comb += [
            axi.arid.eq(self.axi_id), axi.arsize.eq(exact_log2(beat_bytes)), axi.arburst.eq(AXIBurst.INCR),
            axi.arlen.eq(beats - 1),
            axi.araddr.eq(next_address & ~(beat_bytes - 1) if beat_bytes > 32 else next_address),
            axi.arvalid.eq(pending | (fetching & ~self.stop & (in_flight + queue.level < self.queue_depth))),
            issue.eq(axi.arvalid & axi.arready),
        ]
        m.d.sync += pending.eq(axi.arvalid & ~axi.arready)
        # Which half/quarter of a wide beat holds the word: the low address bits of each request, in order.
        offsets = None
        if beat_bytes > 32:
            offsets = SyncFIFO(width=exact_log2(beat_bytes // 32), depth=self.queue_depth)
            m.submodules.offsets = ResetInserter(self.start)(offsets)
            m.d.comb += [offsets.w_en.eq(issue), offsets.w_data.eq(next_address[5:exact_log2(beat_bytes)])]
        with m.If(issue):
            m.d.sync += next_address.eq(next_address + isa.INSTRUCTION_BYTES)

        # Assemble words from beats.
        assembled = Signal(word_bits)
        failed = Signal()
        beat_index = Signal(range(beats + 1))
        m.d.comb += axi.rready.eq(1)     # the queue always has room: requests are credit-limited
        take = axi.rvalid & (axi.rid == self.axi_id)
        word = Signal(word_bits)
        if beats > 1:
            m.d.comb += word.eq(Cat(assembled[self.data_width:], axi.rdata))
        elif offsets is not None:
            m.d.comb += word.eq(axi.rdata.word_select(offsets.r_data, word_bits))
        else:
            m.d.comb += word.eq(axi.rdata[:word_bits])
        error_now = axi.rresp != AXIResponse.OKAY
        complete = Signal()
        m.d.comb += complete.eq(take & (beat_index == beats - 1))
        with m.If(take):
            m.d.sync += [assembled.eq(word), beat_index.eq(Mux(complete, 0, beat_index + 1)),
                         failed.eq(Mux(complete, 0, failed | error_now))]
        m.d.comb += [queue.w_en.eq(complete), queue.w_data.eq(Cat(word, failed | error_now))]
        if offsets is not None:
            m.d.comb += offsets.r_en.eq(complete)
        m.d.sync += in_flight.eq(in_flight + issue - complete)

        m.d.comb += [self.instruction.valid.eq(queue.r_rdy & ~self.start), self.instruction.payload.eq(queue.r_data),
                     queue.r_en.eq(self.instruction.ready)]
        m.d.comb += self.idle.eq((in_flight == 0) & ~axi.arvalid)
        return m


# ------------------------------------------------------------------------------------------------------
# Controller: fetch, decode, checks, dispatch
# ------------------------------------------------------------------------------------------------------

COUNTERS = {
    # name: increment width. The first group are the ISS's deterministic counters (docs/isa.md).
    "instructions": 1, "load_instructions": 1, "store_instructions": 1, "linear_instructions": 1,
    "elementwise_instructions": 1, "nonlinear_instructions": 1, "barrier_instructions": 1,
    "fetch_bytes": 6, "dma_bytes_read": 8, "dma_bytes_written": 8,
    "linear_beats": 1, "elementwise_beats": 1, "nonlinear_lines": 1, "nonlinear_beats": 1,
    # The hardware's own.
    "cycles": 1, "compute_busy_cycles": 1, "dma_read_busy_cycles": 1, "dma_write_busy_cycles": 1,
    "array_linear_cycles": 1, "array_elementwise_cycles": 1,
    "stall_fetch_cycles": 1, "stall_dispatch_cycles": 1, "stall_hazard_cycles": 1,
    "stall_array_cycles": 1, "stall_write_cycles": 1,
}
"""Counters in CSR order (:mod:`marca.hw.csr`), with the width of their per-cycle increments."""
__all__.append("COUNTERS")


class _Fields:
    """The fields of one opcode's format, sliced from the instruction word by :func:`isa.field_layout`."""

    def __init__(self, word, opcode):
        self.layout = isa.field_layout(opcode)
        for field in self.layout:
            setattr(self, field.name, word[field.lsb:field.lsb + field.width])
        self.end = self.layout[-1].lsb + self.layout[-1].width if self.layout else isa.OPCODE_BITS


def _any(terms):
    terms = list(terms)
    return Cat(*terms).any() if terms else Const(0, 1)


class _Staged:
    """A value and the number of register stages between the held instruction word and it."""

    def __init__(self, value, depth=0):
        self.value = value
        self.depth = depth


class _CheckPipeline:
    """Free-running pipeline registers for the checks of the held instruction word.

    The held word does not change until it is consumed, so every register here settles ``depth`` cycles
    after the word is loaded; the controller waits :attr:`depth` cycles (a counter) before it trusts the
    verdict. No valid bits travel with the data.
    """

    def __init__(self, m, prefix):
        self.m = m
        self.prefix = prefix
        self.count = 0

    def reg(self, value, depth, name):
        value = Value.cast(value)
        register = Signal(len(value), name=f"{self.prefix}_{name}_{self.count}")
        self.count += 1
        self.m.d.sync += register.eq(value)
        return _Staged(register, depth + 1)

    def unsigned(self, value, width, depth, name):
        """Register ``value`` truncated to ``width`` unsigned bits."""
        register = Signal(width, name=f"{self.prefix}_{name}_{self.count}")
        self.count += 1
        self.m.d.sync += register.eq(value)
        return _Staged(register, depth + 1)

    def product(self, minus_one, stride, name):
        """``minus_one * stride`` (``minus_one`` a _Staged ``count - 1``), registered after the multiply;
        ``stride`` a _Staged value or a Python int (a power of two is a shift, no register)."""
        if isinstance(stride, int):
            if stride & (stride - 1) == 0:
                return _Staged(minus_one.value << exact_log2(stride), minus_one.depth)
            return self.reg(minus_one.value * stride, minus_one.depth, f"{name}_product")
        return self.reg(minus_one.value * stride.value, max(minus_one.depth, stride.depth), f"{name}_product")

    def sum(self, terms, name):
        """Sum of _Staged terms: up to three terms per registered stage (two carry chains in series),
        the earliest-ready terms first."""
        terms = sorted(terms, key=lambda t: t.depth)
        while len(terms) > 1:
            group, terms = terms[:3], terms[3:]
            total = group[0].value
            for term in group[1:]:
                total = total + term.value
            added = self.reg(total, max(t.depth for t in group), name)
            terms = sorted(terms + [added], key=lambda t: t.depth)
        return terms[0]


class Controller(wiring.Component):
    """Decode, checks and dispatch (see the module docstring).

    Ports
    -----
    start, soft_reset : In(1)
        From the CSRs.
    program_address : In(addr_width)
    busy, done : Out(1)
    error_code : Out(4)
    error_pc : Out(addr_width)
    instruction : In(stream.Signature(257))
        From :class:`InstructionFetch`.
    fetch_start, fetch_stop : Out(1)
    fetch_idle : In(1)
    dma_command : Out(stream.Signature(dma_command_layout))
    dma_busy, dma_done, dma_error, dma_index_error : In(1)
    dma_abort : Out(1)
    compute_command : Out(stream.Signature(compute_command_layout()))
    compute_idle : In(1)
    compute_abort : Out(1)
    counter events : Out(1) each (see :data:`COUNTERS`)

    Timing: an instruction word taken from ``instruction`` is checked for :attr:`check_cycles` cycles
    (4 for the presets) before it can be dispatched or fault; ``instruction.ready`` rises when nothing is
    held or the held word is consumed, so back-to-back dispatches are ``check_cycles + 1`` cycles apart.
    ``dma_done``/``dma_error`` are registered; ``dma_done`` must be high in the DMA's last ``dma_busy``
    cycle (the DMA's contract), so the registered pulse extends "DMA busy" by one cycle.
    """

    def __init__(self, *, config: MarcaConfig, dma_layout):
        check_accelerator_config(config)
        self.config = config
        self.addr_width = config.axi_addr_width
        self.dma_layout = dma_layout
        super().__init__({
            "start": In(1), "soft_reset": In(1), "program_address": In(self.addr_width),
            "busy": Out(1), "done": Out(1), "error_code": Out(ErrorCode), "error_pc": Out(self.addr_width),
            "instruction": In(stream.Signature(isa.INSTRUCTION_BITS + 1)),
            "fetch_start": Out(1), "fetch_stop": Out(1), "fetch_idle": In(1),
            "dma_command": Out(stream.Signature(dma_layout)),
            "dma_busy": In(1), "dma_done": In(1), "dma_error": In(1), "dma_index_error": In(1),
            "dma_abort": Out(1),
            "compute_command": Out(stream.Signature(compute_command_layout())),
            "compute_idle": In(1), "compute_abort": Out(1),
            "retired": Out(isa.OPCODE_BITS), "retire": Out(1), "fetched": Out(1),
            "stall_fetch": Out(1), "stall_dispatch": Out(1), "running": Out(1),
        })

    # -- checks, generated from marca.isa --------------------------------------------------------------

    def _illegal_field(self, m, word, opcode):
        """ILLEGAL_FIELD for ``opcode`` (enum values, reserved bits, zero counts, WEIGHT destinations,
        FUNCTION)."""
        fields = _Fields(word, opcode)
        terms = []
        for field in fields.layout:
            if field.kind is not None:
                legal = {int(member) for member in field.kind}
                if len(legal) < 1 << field.width:
                    value = getattr(fields, field.name)
                    terms.append(~_any(value == v for v in sorted(legal)))
        if fields.end < isa.INSTRUCTION_BITS:
            terms.append(word[fields.end:].any())
        for name in isa._COUNT_FIELDS.get(opcode, ()):
            terms.append(getattr(fields, name) == 0)
        destination = isa._DESTINATION_FIELDS.get(opcode)
        if destination is not None:
            terms.append(getattr(fields, destination) == int(Buffer.WEIGHT))
        if opcode == Opcode.ELEMENTWISE:
            terms.append(fields.op == int(ElementwiseOp.FUNCTION))
        return _any(terms)

    def _accesses(self, m, p, f, opcode, minus_one):
        """Hardware mirror of :func:`marca.isa.buffer_accesses`: (buffer, address, last, alignment,
        enabled) per access; ``last`` is a :class:`_Staged` value of the check pipeline ``p``, alignment
        a power-of-two granule (an int or a Value). ``minus_one`` maps count fields to registered
        ``count - 1`` (a zero count is ILLEGAL_FIELD, which outranks what these compute)."""
        config = self.config
        R, C, lanes = config.array_rows, config.array_cols, config.lanes
        S = _Staged

        def last(address, loops, extent, name):
            terms = [p.unsigned(address + extent - 1, len(address) + 17, 0, f"{name}_base")]
            for level, (count, stride) in enumerate(loops):
                stride = stride if isinstance(stride, int) else S(stride)
                terms.append(p.product(S(minus_one[count], 0), stride, f"{name}_loop{level}"))
            return p.sum(terms, f"{name}_last")

        out = []
        if opcode in (Opcode.LOAD, Opcode.STORE, Opcode.GATHER):
            out.append((f.buffer, f.buffer_address,
                        last(f.buffer_address, [("row_count", f.buffer_row_stride)], f.row_elements, "rows"),
                        1, Const(1, 1)))
        elif opcode == Opcode.LINEAR:
            # The matrix walks jk = row tiles x chunks lines: last = address + (jk - 1) * lanes + lanes - 1.
            jk = p.reg(f.row_tile_count * f.chunk_count, 0, "linear_jk")
            matrix_last = p.reg(f.matrix_address + (jk.value << exact_log2(lanes)) - 1, jk.depth, "matrix_last")
            out.append((f.matrix_buffer, f.matrix_address, matrix_last, lanes, Const(1, 1)))
            out.append((f.vector_buffer, f.vector_address,
                        last(f.vector_address, [("token_count", f.vector_token_stride * C), ("chunk_count", C)],
                             C, "vector"), C, Const(1, 1)))
            out.append((f.bias_buffer, f.bias_address,
                        last(f.bias_address, [("token_count", f.bias_token_stride * R), ("row_tile_count", R)],
                             R, "bias"), R, f.init == int(LinearInit.BIAS)))
            out.append((f.output_buffer, f.output_address,
                        last(f.output_address, [("token_count", f.output_token_stride * R),
                                                ("row_tile_count", R)], R, "output"), R, Const(1, 1)))
        elif opcode == Opcode.ELEMENTWISE:
            for name in "abc":
                users = [int(op) for op in ElementwiseOp if op != ElementwiseOp.FUNCTION
                         and name in isa.operands_used(op)]
                enabled = _any(f.op == op for op in users)
                broadcast = getattr(f, f"{name}_broadcast")
                granule = Signal(range(lanes + 1), name=f"check_{name}_granule")
                shift = Signal(range(exact_log2(lanes) + 1), name=f"check_{name}_shift")
                with m.Switch(broadcast):
                    for value in Broadcast:
                        g = isa.granule(config, value)
                        with m.Case(value):
                            m.d.comb += [granule.eq(g), shift.eq(exact_log2(g))]
                address = getattr(f, f"{name}_address")
                base = p.unsigned(address + granule - 1, len(address) + 1, 0, f"{name}_base")
                shift_staged = p.reg(shift, 0, f"{name}_shift")
                outer = p.product(S(minus_one["outer_count"]), S(getattr(f, f"{name}_outer_stride")), f"{name}_outer")
                inner = p.product(S(minus_one["inner_count"]), S(getattr(f, f"{name}_inner_stride")), f"{name}_inner")
                total = p.reg(base.value + ((outer.value + inner.value) << shift_staged.value),
                              max(base.depth, outer.depth, inner.depth, shift_staged.depth), f"{name}_last")
                out.append((getattr(f, f"{name}_buffer"), address, total, granule, enabled))
            out.append((f.dst_buffer, f.dst_address,
                        last(f.dst_address, [("outer_count", f.dst_outer_stride * lanes),
                                             ("inner_count", f.dst_inner_stride * lanes)], lanes, "dst"),
                        lanes, Const(1, 1)))
        elif opcode == Opcode.NONLINEAR:
            out.append((f.src_buffer, f.src_address, last(f.src_address, [("line_count", lanes)], lanes, "src"),
                        lanes, Const(1, 1)))
            out.append((f.dst_buffer, f.dst_address, last(f.dst_address, [("line_count", lanes)], lanes, "dst"),
                        lanes, Const(1, 1)))
        return out

    def _gather_check(self, m, p, word, minus_one, load_flags):
        """GATHER's flags. Its first fields are LOAD's, at the same bits, so LOAD's alignment and buffer
        range flags serve it too; added: the index address's alignment, and MEMORY_RANGE over the whole
        table (rows 0 .. table_rows-1) and over the id array."""
        config = self.config
        f = _Fields(word, Opcode.GATHER)
        _, load_misaligned, load_buffer_range, _ = load_flags
        index_misaligned = p.reg(f.index_address[:exact_log2(isa.INDEX_BYTES)] != 0, 0, "index_misaligned")
        compute = f.memory_format == int(isa.MemoryFormat.COMPUTE)
        row_bytes = Mux(compute, f.row_elements * config.compute_bytes, f.row_elements * config.storage_bytes)
        extent = p.unsigned(row_bytes - 1, len(row_bytes), 0, "table_row_bytes")
        rows = p.product(_Staged(minus_one["table_rows"]), _Staged(f.memory_row_stride), "table_rows")
        table_last = p.sum([_Staged(f.memory_address), rows, extent], "table_last_byte")
        index_last = p.reg(f.index_address + (minus_one["row_count"] << exact_log2(isa.INDEX_BYTES))
                           + isa.INDEX_BYTES - 1, 0, "index_last_byte")
        beyond = table_last.value[self.addr_width:].any() | index_last.value[self.addr_width:].any()
        memory_range = p.reg(beyond, max(table_last.depth, index_last.depth), "gather_memory_range")
        misaligned = _Staged(load_misaligned.value | index_misaligned.value,
                             max(load_misaligned.depth, index_misaligned.depth))
        return (p.reg(self._illegal_field(m, word, Opcode.GATHER), 0, "illegal"), misaligned,
                load_buffer_range, memory_range)

    def _check(self, m, p, word, opcode, minus_one):
        """(illegal_field, misaligned, buffer_range, memory_range) for ``opcode``, each a registered
        :class:`_Staged` bit of the check pipeline ``p``."""
        config = self.config
        f = _Fields(word, opcode)
        misaligned, out_of_range, memory_range = [], [], []
        if opcode in (Opcode.LOAD, Opcode.STORE):
            compute = f.memory_format == int(isa.MemoryFormat.COMPUTE)
            mask = Mux(compute, config.compute_bytes - 1, config.storage_bytes - 1)
            misaligned.append(_Staged(((f.memory_address & mask) != 0) | ((f.memory_row_stride & mask) != 0)))
            row_bytes = Mux(compute, f.row_elements * config.compute_bytes, f.row_elements * config.storage_bytes)
            extent = p.unsigned(row_bytes - 1, len(row_bytes), 0, "row_bytes")
            rows = p.product(_Staged(minus_one["row_count"]), _Staged(f.memory_row_stride), "memory_rows")
            last_byte = p.sum([_Staged(f.memory_address), rows, extent], "last_byte")
            memory_range.append(_Staged(last_byte.value[self.addr_width:].any(), last_byte.depth))
        limits = {int(b): isa.buffer_elements(config, b) for b in Buffer}
        for buffer, address, last, alignment, enabled in self._accesses(m, p, f, opcode, minus_one):
            misaligned.append(_Staged(enabled & ((address & (alignment - 1)) != 0)))
            limit = Signal(range(max(limits.values()) + 1), name="check_limit")
            with m.Switch(buffer):
                for value, elements in limits.items():
                    with m.Case(value):
                        m.d.comb += limit.eq(elements)
            limit = p.reg(limit, 0, "limit")
            enabled = p.reg(enabled, 0, "enabled")
            out_of_range.append(_Staged(enabled.value & (last.value >= limit.value),
                                        max(last.depth, limit.depth, enabled.depth)))

        def flag(terms, name):
            if not terms:
                return _Staged(Const(0, 1))
            return p.reg(_any(t.value for t in terms), max(t.depth for t in terms), name)

        return (p.reg(self._illegal_field(m, word, opcode), 0, "illegal"), flag(misaligned, "misaligned"),
                flag(out_of_range, "buffer_range"), flag(memory_range, "memory_range"))

    # -- elaborate -------------------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        config = self.config
        lanes, R, C = config.lanes, config.array_rows, config.array_cols
        lane_shift = exact_log2(lanes)

        running = Signal()          # between start and done
        stopping = Signal()         # no more dispatch: wait for the units, then done
        error_code = Signal(ErrorCode)
        error_pc = Signal(self.addr_width)
        done = Signal()
        pc = Signal(self.addr_width)
        dma_pc = Signal(self.addr_width)
        m.d.comb += [self.busy.eq(running), self.done.eq(done), self.error_code.eq(error_code),
                     self.error_pc.eq(error_pc), self.running.eq(running)]

        def fail(code, at):
            m.d.sync += [error_code.eq(code), error_pc.eq(at), stopping.eq(1)]

        with m.If(self.start & ~running):
            m.d.sync += [running.eq(1), stopping.eq(0), done.eq(0), error_code.eq(ErrorCode.NONE),
                         error_pc.eq(0), pc.eq(self.program_address)]
            with m.If(self.program_address[:5] != 0):
                fail(ErrorCode.MISALIGNED, self.program_address)
            with m.Else():
                m.d.comb += self.fetch_start.eq(1)

        # Decode stage. The word at the head of the fetch queue (an asynchronous LUT-RAM read) is first
        # copied into ``held_word`` (with ``count - 1`` of every count field, computed on the way in);
        # the checks then run over ``check_cycles`` cycles of free-running pipeline registers (the held
        # word is stable until consumed), and dispatch reads registered copies only.
        held_word = Signal(isa.INSTRUCTION_BITS)
        held_failed = Signal()
        held_valid = Signal()
        dispatch_ready = Signal()
        consume = Signal()
        incoming = self.instruction.payload
        load = Signal()
        m.d.comb += [self.instruction.ready.eq(running & ~stopping & (~held_valid | consume)),
                     load.eq(self.instruction.valid & self.instruction.ready)]
        word = held_word
        opcode = word[:isa.OPCODE_BITS]
        minus_one = {}
        shared = {}
        for op in Opcode:
            minus_one[op] = {}
            for field in isa.field_layout(op):
                if field.name not in isa._COUNT_FIELDS.get(op, ()):
                    continue
                key = (field.lsb, field.width)
                if key not in shared:
                    shared[key] = Signal(field.width, name=f"held_{field.name}_minus_one")
                    with m.If(load):
                        m.d.sync += shared[key].eq(incoming[field.lsb:field.lsb + field.width] - 1)
                minus_one[op][field.name] = shared[key]

        pipeline = _CheckPipeline(m, "check")
        flags = {op: self._check(m, pipeline, word, op, minus_one[op]) for op in Opcode
                 if op != Opcode.GATHER}
        flags[Opcode.GATHER] = self._gather_check(m, pipeline, word, minus_one[Opcode.GATHER],
                                                  flags[Opcode.LOAD])
        legal_opcode = pipeline.reg(_any(opcode == int(op) for op in Opcode), 0, "legal_opcode")
        flag_depth = max([legal_opcode.depth] + [flag.depth for group in flags.values() for flag in group])
        check_cycles = flag_depth + 1        # the verdict register follows the last flag
        self.check_cycles = check_cycles
        verdict_now = Signal(ErrorCode)
        with m.If(held_failed):
            m.d.comb += verdict_now.eq(ErrorCode.BUS_ERROR)
        with m.Elif(~legal_opcode.value):
            m.d.comb += verdict_now.eq(ErrorCode.ILLEGAL_OPCODE)
        with m.Else():
            with m.Switch(opcode):
                for op in Opcode:
                    illegal, misaligned, buffer_range, memory_range = flags[op]
                    with m.Case(int(op)):
                        with m.If(illegal.value):
                            m.d.comb += verdict_now.eq(ErrorCode.ILLEGAL_FIELD)
                        with m.Elif(misaligned.value):
                            m.d.comb += verdict_now.eq(ErrorCode.MISALIGNED)
                        with m.Elif(buffer_range.value):
                            m.d.comb += verdict_now.eq(ErrorCode.BUFFER_RANGE)
                        with m.Elif(memory_range.value):
                            m.d.comb += verdict_now.eq(ErrorCode.MEMORY_RANGE)
        verdict = Signal(ErrorCode)
        verdict_ok = Signal()
        m.d.sync += [verdict.eq(verdict_now), verdict_ok.eq(verdict_now == ErrorCode.NONE)]
        # Registered decode for dispatch (settled long before ``checked``).
        is_dma = Signal()
        is_compute = Signal()
        is_halt = Signal()
        m.d.sync += [is_dma.eq(_any(opcode == int(op) for op in (Opcode.LOAD, Opcode.STORE, Opcode.GATHER))),
                     is_compute.eq(_any(opcode == int(op)
                                        for op in (Opcode.LINEAR, Opcode.ELEMENTWISE, Opcode.NONLINEAR))),
                     is_halt.eq(opcode == int(Opcode.HALT))]

        age = Signal(range(check_cycles))     # cycles since the held word was loaded (saturating)
        checked = Signal()                    # the verdict and the staged commands are for the held word
        with m.If(age != check_cycles - 1):
            m.d.sync += age.eq(age + 1)
        with m.Elif(held_valid):
            m.d.sync += checked.eq(1)
        with m.If(consume | ~running):
            m.d.sync += [held_valid.eq(0), checked.eq(0)]
        with m.If(load):
            m.d.sync += [held_word.eq(incoming[:isa.INSTRUCTION_BITS]),
                         held_failed.eq(incoming[isa.INSTRUCTION_BITS]),
                         held_valid.eq(1), age.eq(0), checked.eq(0)]
        have = running & ~stopping & held_valid

        # The DMA's done/error come from deep logic: take them one cycle late. ``done`` is high in the
        # DMA's last busy cycle, so counting the registered pulse as busy keeps the DMA "not idle" until
        # its error (if any) has been recorded, exactly as before, one cycle later.
        dma_done = Signal()
        dma_error = Signal()
        dma_index_error = Signal()
        m.d.sync += [dma_done.eq(self.dma_done), dma_error.eq(self.dma_error),
                     dma_index_error.eq(self.dma_index_error)]

        # Dispatch.
        dma_idle = ~self.dma_busy & ~self.dma_command.valid & ~dma_done
        compute_free = self.compute_command.ready
        all_idle = dma_idle & self.compute_idle & ~self.compute_command.valid
        with m.If(is_dma):
            m.d.comb += dispatch_ready.eq(dma_idle)
        with m.Elif(is_compute):
            m.d.comb += dispatch_ready.eq(compute_free & ~self.compute_command.valid)
        with m.Else():
            m.d.comb += dispatch_ready.eq(all_idle)

        m.d.comb += [self.fetched.eq(consume),
                     self.stall_fetch.eq(running & ~stopping & ~held_valid & ~self.instruction.valid),
                     self.stall_dispatch.eq(have & checked & verdict_ok & ~dispatch_ready)]
        go = have & checked
        with m.If(go):
            with m.If(~verdict_ok):
                # An earlier DMA may still fault (BUS_ERROR); it came first, so wait for it.
                with m.If(dma_idle):
                    m.d.comb += consume.eq(1)
                    fail(verdict, pc)
            with m.Elif(dispatch_ready):
                m.d.comb += [consume.eq(1), self.retire.eq(1), self.retired.eq(opcode)]
                m.d.sync += pc.eq(pc + isa.INSTRUCTION_BYTES)
                with m.If(is_halt):
                    m.d.sync += stopping.eq(1)
                with m.If(is_dma):
                    m.d.sync += dma_pc.eq(pc)

        # DMA command from LOAD / STORE / GATHER fields (GATHER's first fields are LOAD's).
        dma_valid = Signal()
        dma_payload = Signal(self.dma_layout)
        transfer = _Fields(word, Opcode.LOAD)
        gather = _Fields(word, Opcode.GATHER)
        dma_next = Signal(self.dma_layout)      # staged from the held word every cycle
        with m.If(go & verdict_ok & dispatch_ready & is_dma):
            m.d.sync += [dma_valid.eq(1), dma_payload.eq(dma_next)]
        m.d.sync += [
            dma_next.store.eq(opcode == int(Opcode.STORE)),
            dma_next.gather.eq(opcode == int(Opcode.GATHER)),
            dma_next.index_address.eq(gather.index_address[:self.addr_width]),
            dma_next.table_rows.eq(gather.table_rows),
            dma_next.memory_format.eq(transfer.memory_format),
            dma_next.buffer.eq(transfer.buffer),
            dma_next.address.eq(transfer.memory_address[:self.addr_width]),
            dma_next.row_stride.eq(transfer.memory_row_stride),
            dma_next.rows.eq(transfer.row_count),
            dma_next.row_elements.eq(transfer.row_elements),
            dma_next.line.eq(transfer.buffer_address[lane_shift:]),
            dma_next.row_step_lines.eq(transfer.buffer_row_stride[lane_shift:]),
        ]
        if lane_shift:
            m.d.sync += [dma_next.position.eq(transfer.buffer_address[:lane_shift]),
                         dma_next.row_step_position.eq(transfer.buffer_row_stride[:lane_shift])]
        with m.If(self.dma_command.valid & self.dma_command.ready):
            m.d.sync += dma_valid.eq(0)
        m.d.comb += [self.dma_command.valid.eq(dma_valid), self.dma_command.payload.eq(dma_payload)]
        with m.If(dma_done & dma_error & (error_code == ErrorCode.NONE)):
            fail(ErrorCode.BUS_ERROR, dma_pc)
        with m.Elif(dma_done & dma_index_error & (error_code == ErrorCode.NONE)):
            fail(ErrorCode.INDEX_RANGE, dma_pc)

        # Compute command from LINEAR / ELEMENTWISE / NONLINEAR fields.
        compute_valid = Signal()
        command = Signal(compute_command_layout())
        linear = _Fields(word, Opcode.LINEAR)
        elementwise = _Fields(word, Opcode.ELEMENTWISE)
        nonlinear = _Fields(word, Opcode.NONLINEAR)

        def operand(target, source, address, strides, broadcast=Broadcast.LANE):
            stmts = [target.source.eq(source), target.address.eq(address), target.broadcast.eq(broadcast)]
            for level, stride in enumerate(strides):
                stmts.append(target.strides[level].eq(stride))
            return stmts

        compute_next = Signal(compute_command_layout())      # staged from the held word every cycle
        with m.If(go & verdict_ok & dispatch_ready & is_compute):
            m.d.sync += [compute_valid.eq(1), command.eq(compute_next)]
        with m.Switch(opcode):
            with m.Case(int(Opcode.LINEAR)):
                f = linear
                m.d.sync += [compute_next.kind.eq(KIND_LINEAR), compute_next.counts[0].eq(f.chunk_count),
                             compute_next.counts[1].eq(f.token_count), compute_next.counts[2].eq(f.row_tile_count),
                             compute_next.last_inner.eq(f.row_tile_count)]
                # Loops: chunk k (outer), token t, row tile j (inner).
                m.d.sync += operand(compute_next.a, f.matrix_buffer, f.matrix_address,
                                    [lanes, 0, (f.chunk_count << lane_shift)])
                m.d.sync += operand(compute_next.b, f.vector_buffer, f.vector_address,
                                    [C, f.vector_token_stride * C, 0], Broadcast.COLUMN)
                m.d.sync += operand(compute_next.dst, f.output_buffer, f.output_address,
                                    [0, f.output_token_stride * R, R], Broadcast.ROW)
                m.d.sync += operand(compute_next.bias, Mux(f.init == int(LinearInit.BIAS), f.bias_buffer,
                                                      CONSTANT_SOURCE),
                                    f.bias_address, [0, f.bias_token_stride * R, R], Broadcast.ROW)
            with m.Case(int(Opcode.ELEMENTWISE)):
                f = elementwise
                uses = []
                for name in "abc":
                    users = [int(op) for op in ElementwiseOp if op != ElementwiseOp.FUNCTION
                             and name in isa.operands_used(op)]
                    uses.append(_any(f.op == op for op in users))
                m.d.sync += [compute_next.kind.eq(KIND_ELEMENTWISE), compute_next.op.eq(f.op),
                             compute_next.counts[0].eq(1), compute_next.counts[1].eq(f.outer_count),
                             compute_next.counts[2].eq(f.inner_count), compute_next.last_inner.eq(f.inner_count),
                             compute_next.uses.eq(Cat(*uses))]
                for name in "abc":
                    broadcast = getattr(f, f"{name}_broadcast")
                    shift = Signal(range(lane_shift + 1), name=f"dispatch_{name}_shift")
                    with m.Switch(broadcast):
                        for value in Broadcast:
                            with m.Case(value):
                                m.d.comb += shift.eq(exact_log2(isa.granule(config, value)))
                    m.d.sync += operand(getattr(compute_next, name), getattr(f, f"{name}_buffer"),
                                        getattr(f, f"{name}_address"),
                                        [0, getattr(f, f"{name}_outer_stride") << shift,
                                         getattr(f, f"{name}_inner_stride") << shift], broadcast)
                m.d.sync += operand(compute_next.dst, f.dst_buffer, f.dst_address,
                                    [0, f.dst_outer_stride << lane_shift, f.dst_inner_stride << lane_shift])
            with m.Case(int(Opcode.NONLINEAR)):
                f = nonlinear
                batches = (f.line_count + NONLINEAR_BATCH - 1) >> exact_log2(NONLINEAR_BATCH)
                remainder = f.line_count[:exact_log2(NONLINEAR_BATCH)]
                passes = Signal(16)
                with m.Switch(f.function):
                    for function, schedule in nonlinear_schedule(config)[1].items():
                        with m.Case(function):
                            m.d.comb += passes.eq(len(schedule))
                m.d.sync += [compute_next.kind.eq(KIND_NONLINEAR), compute_next.function.eq(f.function),
                             compute_next.counts[0].eq(batches), compute_next.counts[1].eq(passes),
                             compute_next.counts[2].eq(NONLINEAR_BATCH),
                             compute_next.last_inner.eq(Mux(remainder == 0, NONLINEAR_BATCH, remainder))]
                strides = [NONLINEAR_BATCH * lanes, 0, lanes]
                m.d.sync += operand(compute_next.a, f.src_buffer, f.src_address, strides)
                m.d.sync += operand(compute_next.dst, f.dst_buffer, f.dst_address, strides)
        with m.If(self.compute_command.valid & self.compute_command.ready):
            m.d.sync += compute_valid.eq(0)
        m.d.comb += [self.compute_command.valid.eq(compute_valid), self.compute_command.payload.eq(command)]

        # Stop: once stopping, wait for every unit (and fetch) to go idle, then done.
        m.d.comb += self.fetch_stop.eq(stopping | self.soft_reset)
        units_idle = all_idle & self.fetch_idle & ~dma_valid & ~compute_valid
        with m.If(running & stopping & units_idle):
            m.d.sync += [running.eq(0), done.eq(1), stopping.eq(0)]

        # Soft reset: abort the units, then idle with no error.
        aborting = Signal()
        with m.If(self.soft_reset):
            m.d.sync += [aborting.eq(1), stopping.eq(1), dma_valid.eq(0), compute_valid.eq(0)]
        m.d.comb += [self.dma_abort.eq(aborting), self.compute_abort.eq(aborting)]
        with m.If(aborting & all_idle & self.fetch_idle):
            m.d.sync += [aborting.eq(0), running.eq(0), stopping.eq(0), done.eq(0),
                         error_code.eq(ErrorCode.NONE), error_pc.eq(0)]
        return m
