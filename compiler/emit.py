"""Instruction emission and buffer allocation: the helpers every lowering pass writes its program with.

:class:`Emitter` collects instructions (checking each one encodes), splits DMA transfers whose counts
overflow a field, implements the inter-operation switch (a round trip through memory after every
element-wise and nonlinear result when it is off) and records named sections for the printer.
:class:`Allocator` hands out line regions of the on-chip buffers, first fit, and raises
:class:`CompileError` naming the buffer, the need and what the configuration has.
"""

import copy

from marca import isa
from marca.config import MarcaConfig
from marca.isa import Broadcast, Buffer, MemoryFormat

from .options import CompileError

__all__ = ["Emitter", "Allocator", "Operand", "field_layouts", "encode_fast"]

_COUNT_MAX = 0xFFFF

_LAYOUTS: dict = {}


def field_layouts(kind) -> tuple:
    """``isa.field_layout`` of an instruction class, computed once (the compiler checks and encodes tens of
    thousands of instructions per model)."""
    if kind not in _LAYOUTS:
        _LAYOUTS[kind] = isa.field_layout(kind.OPCODE)
    return _LAYOUTS[kind]


_LIMITS: dict = {}


def _field_limits(kind) -> tuple:
    """``(field name, 2^width)`` of each encoded field of an instruction class, computed once."""
    if kind not in _LIMITS:
        _LIMITS[kind] = tuple((layout.name, 1 << layout.width) for layout in field_layouts(kind))
    return _LIMITS[kind]


def encode_fast(instructions) -> bytes:
    """``isa.encode_program`` for instructions the emitter has range-checked (tests/test_model.py checks
    that both give the same bytes). Each distinct instruction object is encoded once (the emitter hands out
    one object per distinct instruction: a long program repeats a few thousand of them)."""
    words = {}
    parts = []
    for instruction in instructions:
        word = words.get(id(instruction))
        if word is None:
            value = int(instruction.OPCODE)
            for layout in field_layouts(type(instruction)):
                value |= int(getattr(instruction, layout.name)) << layout.lsb
            word = words[id(instruction)] = value.to_bytes(isa.INSTRUCTION_BYTES, "little")
        parts.append(word)
    return b"".join(parts)


#: An element-wise operand: (buffer, address, outer stride, inner stride[, broadcast]).
Operand = tuple


class Allocator:
    """First-fit line regions in the buffers; :meth:`copy` for trial allocations."""

    def __init__(self, config: MarcaConfig, reserved: dict | None = None):
        self.config = config
        self.size = {b: isa.buffer_lines(config, b) for b in Buffer}
        self.next = {b: (reserved or {}).get(b, 0) for b in Buffer}

    def free(self, buffer: Buffer) -> int:
        return self.size[buffer] - self.next[buffer]

    def take(self, name: str, lines: int, buffers) -> tuple[Buffer, int]:
        """``lines`` lines in the first of ``buffers`` that has room: (buffer, element address)."""
        lines = max(1, lines)
        for buffer in buffers:
            if self.free(buffer) >= lines:
                address = self.next[buffer] * self.config.lanes
                self.next[buffer] += lines
                return buffer, address
        have = ", ".join(f"{b.name.lower()} {self.free(b)} of {self.size[b]}" for b in buffers)
        raise CompileError(f"{name} needs {lines} lines of {self.config.lanes} elements; the "
                           f"configuration {self.config.name!r} has {have} lines free in the "
                           f"{'/'.join(b.name.lower() for b in buffers)} buffer(s)")

    def copy(self) -> "Allocator":
        return copy.deepcopy(self)


class Emitter:
    """A program under construction (sequential semantics; barriers come later)."""

    def __init__(self, config: MarcaConfig, *, inter_operation: bool = True, spill_address: int | None = None):
        self.config = config
        self.lanes = config.lanes
        self.inter_operation = inter_operation
        self.spill_address = spill_address
        self.program: list[isa.Instruction] = []
        self.sections: list[tuple[int, str]] = []
        # One object per distinct instruction (instructions are frozen): a long program (a small preset's
        # prefill repeats its token block's few thousand instructions for every token) holds a reference
        # per instruction, not a copy, and later passes work once per object (schedule.insert_barriers,
        # encode_fast).
        self._distinct: dict = {}

    def section(self, label: str) -> None:
        """Start a named section (shown by the printer before its first instruction)."""
        self.sections.append((len(self.program), label))

    def emit(self, instruction) -> None:
        key = (type(instruction), *instruction.__dict__.values())    # field values, in field order
        known = self._distinct.get(key)
        if known is None:
            values = instruction.__dict__
            for name, limit in _field_limits(type(instruction)):
                if not 0 <= values[name] < limit:
                    raise CompileError(f"{type(instruction).__name__}.{name} = {values[name]} overflows its "
                                       f"{limit.bit_length() - 1} bits")
            known = self._distinct[key] = instruction
        self.program.append(known)

    # DMA ---------------------------------------------------------------------------------------------

    def dma(self, kind, *, memory_address: int, rows: int, row_elements: int, memory_row_stride: int,
            buffer: Buffer, address: int, buffer_row_stride: int, compute: bool) -> None:
        """A 2-D LOAD or STORE, split where ``rows`` or ``row_elements`` overflow their fields. Rows that
        follow one another both in memory and in the buffer become one long row (the DMA sets up each row
        on its own and bursts within a row: one line per row would take a row set-up per line)."""
        size = self.config.compute_bytes if compute else self.config.storage_bytes
        fmt = MemoryFormat.COMPUTE if compute else MemoryFormat.STORAGE
        total = rows * row_elements
        longest = min(total, _COUNT_MAX // self.lanes * self.lanes)    # whole lines: addresses stay aligned
        if rows > 1 and memory_row_stride == row_elements * size and buffer_row_stride == row_elements \
                and row_elements < longest:
            row_elements = longest
            rows, rest = divmod(total, row_elements)
            self.dma(kind, memory_address=memory_address, rows=rows, row_elements=row_elements,
                     memory_row_stride=row_elements * size, buffer=buffer, address=address,
                     buffer_row_stride=row_elements, compute=compute)
            if rest:
                self.dma(kind, memory_address=memory_address + rows * row_elements * size, rows=1,
                         row_elements=rest, memory_row_stride=rest * size, buffer=buffer,
                         address=address + rows * row_elements, buffer_row_stride=rest, compute=compute)
            return
        for e0 in range(0, row_elements, _COUNT_MAX):
            elements = min(_COUNT_MAX, row_elements - e0)
            for r0 in range(0, rows, _COUNT_MAX):
                count = min(_COUNT_MAX, rows - r0)
                self.emit(kind(memory_address=memory_address + r0 * memory_row_stride + e0 * size,
                               row_count=count, row_elements=elements, memory_row_stride=memory_row_stride,
                               buffer=buffer, buffer_address=address + r0 * buffer_row_stride + e0,
                               buffer_row_stride=buffer_row_stride, memory_format=fmt))

    def load_lines(self, memory_address, lines, buffer, address, *, compute=False) -> None:
        """``lines`` contiguous lines from memory into contiguous buffer lines."""
        size = self.config.compute_bytes if compute else self.config.storage_bytes
        P = self.lanes
        self.dma(isa.Load, memory_address=memory_address, rows=lines, row_elements=P,
                 memory_row_stride=P * size, buffer=buffer, address=address, buffer_row_stride=P,
                 compute=compute)

    def store_lines(self, memory_address, lines, buffer, address, *, compute=True) -> None:
        size = self.config.compute_bytes if compute else self.config.storage_bytes
        P = self.lanes
        self.dma(isa.Store, memory_address=memory_address, rows=lines, row_elements=P,
                 memory_row_stride=P * size, buffer=buffer, address=address, buffer_row_stride=P,
                 compute=compute)

    def spill(self, buffer, address, lines) -> None:
        """Inter-operation management off: the result goes to memory and comes back before its next use."""
        if self.inter_operation:
            return
        self.store_lines(self.spill_address, lines, buffer, address, compute=True)
        self.load_lines(self.spill_address, lines, buffer, address, compute=True)

    # Compute -----------------------------------------------------------------------------------------

    def elementwise(self, op, outer, inner, dst, a, b=None, c=None, *, spill=True) -> None:
        """dst/a/b/c: (buffer, address, outer_stride, inner_stride[, broadcast])."""
        fields = dict(op=op, outer_count=outer, inner_count=inner, dst_buffer=dst[0], dst_address=dst[1],
                      dst_outer_stride=dst[2], dst_inner_stride=dst[3])
        for name, operand in (("a", a), ("b", b), ("c", c)):
            if operand is None:
                continue
            broadcast = operand[4] if len(operand) > 4 else Broadcast.LANE
            fields.update({f"{name}_buffer": operand[0], f"{name}_address": operand[1],
                           f"{name}_outer_stride": operand[2], f"{name}_inner_stride": operand[3],
                           f"{name}_broadcast": broadcast})
        self.emit(isa.Elementwise(**fields))
        if spill:
            self.spill(dst[0], dst[1], outer * inner if dst[2] == inner and dst[3] == 1 else
                       (outer - 1) * dst[2] + (inner - 1) * dst[3] + 1)

    def nonlinear(self, function, buffer, address, lines) -> None:
        for first in range(0, lines, _COUNT_MAX):
            count = min(_COUNT_MAX, lines - first)
            start = address + first * self.lanes
            self.emit(isa.Nonlinear(function=function, line_count=count, src_buffer=buffer, src_address=start,
                                    dst_buffer=buffer, dst_address=start))
        self.spill(buffer, address, lines)

    def zero_fill(self, buffer, address, lines, zero) -> None:
        """``lines`` lines set to +0 from the zero element ``zero`` = (buffer, address)."""
        for first in range(0, lines, _COUNT_MAX):
            count = min(_COUNT_MAX, lines - first)
            self.elementwise(isa.ElementwiseOp.PASS, count, 1, (buffer, address + first * self.lanes, 1, 0),
                             (zero[0], zero[1], 0, 0, Broadcast.SCALAR), spill=False)
