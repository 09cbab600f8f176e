"""The instruction set: the one definition of opcodes, fields, encoding, error codes and legality rules.

Everything that deals with instructions imports this module: the RTL decoder (``marca.hw``; it reads
:func:`field_layout` to slice the instruction word), the assembler and disassembler (:func:`assemble`,
:func:`disassemble`), the golden instruction-set simulator (``marca.golden.iss``), the constrained-random
program generator and the compiler (``marca.compiler``). docs/isa.md renders its tables from here
(:func:`render_markdown`) and a test keeps the page up to date.

Machine model (the full text is docs/isa.md):

* Instructions are :data:`INSTRUCTION_BITS`-bit words stored little-endian in memory, fetched one after
  another from the program address; bits 7..0 are the opcode, then each format's fields are packed upward
  from bit 8 in the order listed; every bit above a format's last field is reserved and must be zero.
* Four on-chip buffers (:class:`Buffer`) hold **compute-format** elements, organised in lines of
  ``array_rows · array_cols`` elements. All buffer addresses are element addresses; strides count in the
  operand's *granule* (:func:`granule`).
* DMA instructions execute one at a time, in order; compute instructions (linear, element-wise,
  nonlinear) execute in order with sequential semantics. The two streams overlap; only ``BARRIER`` (and
  ``HALT``) orders one against the other.

Field widths are fixed (not derived from a configuration), so one decoder serves every configuration and
an encoded program means the same thing everywhere; :func:`check_config` rejects a configuration whose
buffers or bus exceed what the fields can address, and :func:`check_instruction` applies the
configuration-dependent rules (alignment, buffer range, memory range) in the order the hardware reports
them.
"""

import dataclasses
import re
from dataclasses import dataclass
from typing import NamedTuple

from amaranth.lib import enum

from .config import MarcaConfig
from .ops import Broadcast, ElementwiseOp

__all__ = [
    "INSTRUCTION_BITS", "INSTRUCTION_BYTES", "OPCODE_BITS",
    "Opcode", "Buffer", "NonlinearFunction", "LinearInit", "MemoryFormat", "ErrorCode",
    "Instruction", "Load", "Store", "Gather", "Linear", "Elementwise", "Nonlinear", "Barrier", "Halt",
    "INSTRUCTION_TYPES", "FieldLayout", "field_layout", "struct_layout", "IllegalInstruction",
    "encode", "decode", "encode_program", "decode_program",
    "assemble", "disassemble", "format_instruction", "parse_instruction",
    "check_config", "check_instruction", "memory_element_bytes", "granule", "operands_used",
    "buffer_lines", "buffer_elements",
    "BufferAccess", "buffer_accesses", "memory_access", "index_access", "INDEX_BYTES",
    "render_markdown", "updated_doc",
]

INSTRUCTION_BITS = 256
INSTRUCTION_BYTES = INSTRUCTION_BITS // 8
OPCODE_BITS = 8


class Opcode(enum.IntEnum, shape=OPCODE_BITS):
    """Bits 7..0 of every instruction. 0 is illegal, so that executing zeroed memory stops at once."""

    LOAD = 0x01
    """DMA memory -> buffer (storage -> compute format, round to nearest even, flush)."""
    STORE = 0x02
    """DMA buffer -> memory (compute -> storage format, round to nearest even, flush)."""
    LINEAR = 0x03
    """Matrix tiles times vector chunks on the PE array, reduction on (GEMV; GEMM over tokens)."""
    ELEMENTWISE = 0x04
    """One :class:`~marca.ops.ElementwiseOp` on every lane, reduction off, over a 2-D grid of beats."""
    NONLINEAR = 0x05
    """exp, SiLU or softplus of every element of a run of lines (a fixed sequence of PE passes)."""
    BARRIER = 0x06
    """Wait until every earlier DMA and compute instruction has finished."""
    HALT = 0x07
    """Wait like BARRIER, then stop: status ``done``, error code ``NONE``."""
    GATHER = 0x08
    """DMA memory -> buffer like LOAD, but row ``r`` is table row ``id[r]``, the ids read from memory
    (embedding lookup)."""


class Buffer(enum.IntEnum, shape=2):
    """The on-chip buffers (sizes from ``MarcaConfig.*_buffer_kib``). All hold compute-format elements.

    ``WEIGHT`` is written only by ``LOAD``; the other three are written by ``LOAD`` and by every compute
    instruction. Any buffer may feed any operand; two operands of one instruction in the same buffer may
    cost the hardware extra cycles, never a different result.
    """

    WEIGHT = 0
    ACTIVATION = 1
    STATE = 2
    SCRATCH = 3


class NonlinearFunction(enum.IntEnum, shape=4):
    """The functions of ``NONLINEAR``; each is the golden model in ``marca.golden.nonlinear``."""

    EXP = 0
    SILU = 1
    SOFTPLUS = 2
    RSQRT = 3
    """``1/sqrt(x)`` (RMSNorm): +Inf for +0, NaN for negative x and NaN, +0 for +Inf."""


class MemoryFormat(enum.IntEnum, shape=1):
    """The element format of a DMA transfer's memory side.

    ``STORAGE``: ``config.storage_format`` in ``storage_bytes`` per element, converted to / from the
    compute format (the normal case: weights, activations). ``COMPUTE``: ``config.compute_format`` in
    ``compute_bytes`` per element, copied without rounding (only the contract's reading: subnormals become
    zeros, NaNs the canonical NaN), so that states and spilled intermediates survive a round trip through
    memory exactly.
    """

    STORAGE = 0
    COMPUTE = 1


class LinearInit(enum.IntEnum, shape=1):
    """Where a ``LINEAR`` row accumulator starts: +0, or the bias operand (a bias or a partial sum)."""

    ZERO = 0
    BIAS = 1


class ErrorCode(enum.IntEnum, shape=4):
    """The ``ERROR_CODE`` register after a run; the RTL reports exactly these, with the same priority.

    A faulting instruction has no effect (every check happens before it starts), except ``BUS_ERROR``:
    the memory and buffer elements of the faulting transfer are then undefined. The machine halts with
    ``ERROR_PC`` = the byte address of the faulting instruction.
    """

    NONE = 0
    """Ran to ``HALT``."""
    ILLEGAL_OPCODE = 1
    """Bits 7..0 name no opcode."""
    ILLEGAL_FIELD = 2
    """A field holds a value its format forbids: an undefined enum value, a nonzero reserved bit, a zero
    count, a compute destination in the weight buffer, ``ElementwiseOp.FUNCTION``."""
    MISALIGNED = 3
    """An address or stride breaks its alignment rule (:func:`granule`; memory: element size; program
    address: instruction size)."""
    BUFFER_RANGE = 4
    """An access reaches past the end of its buffer."""
    MEMORY_RANGE = 5
    """A DMA transfer reaches past ``2**axi_addr_width``."""
    BUS_ERROR = 6
    """The AXI4 bus answered SLVERR/DECERR (instruction fetch or DMA); the golden ISS raises it for
    accesses beyond its memory image."""
    INDEX_RANGE = 7
    """A ``GATHER`` read an id ``>= table_rows``. Like ``BUS_ERROR`` it is found while the instruction runs:
    the buffer elements of that ``GATHER`` are then undefined (memory is untouched)."""


# Fields -------------------------------------------------------------------------------------------------

_ADDRESS = 24        # element address in a buffer
_COUNT = 16          # loop counts
_LINE_STRIDE = 12    # element-wise strides, in granules
_INDEX_ADDRESS = 48  # GATHER's id array: a LOAD's fields plus these two fill the 256-bit word exactly
_TABLE_ROWS = 21     # 2**21 - 1 rows: any vocabulary (50,280 for Mamba) with room to spare

INDEX_BYTES = 4
"""Bytes per ``GATHER`` id in memory (a little-endian uint32)."""


def _field(width: int, kind=None, doc: str = "", default=0):
    return dataclasses.field(default=default, metadata={"width": width, "kind": kind, "doc": doc})


@dataclass(frozen=True, kw_only=True)
class Instruction:
    """Base class: one subclass per opcode; its dataclass fields, in order, are the encoded fields."""

    OPCODE = None

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)


@dataclass(frozen=True, kw_only=True)
class _Dma(Instruction):
    memory_address: int = _field(64, doc="byte address of element 0 of row 0; a multiple of the memory "
                                         "element size")
    row_count: int = _field(_COUNT, doc="rows (>= 1)")
    row_elements: int = _field(_COUNT, doc="elements per row (>= 1), contiguous in memory and in the buffer")
    memory_row_stride: int = _field(32, doc="bytes from one row to the next in memory; a multiple of the "
                                           "memory element size")
    buffer: Buffer = _field(2, Buffer, "buffer", default=Buffer.WEIGHT)
    buffer_address: int = _field(_ADDRESS, doc="element address of element 0 of row 0 in the buffer")
    buffer_row_stride: int = _field(_ADDRESS, doc="elements from one row to the next in the buffer")
    memory_format: MemoryFormat = _field(1, MemoryFormat, "element format in memory",
                                         default=MemoryFormat.STORAGE)


@dataclass(frozen=True, kw_only=True)
class Load(_Dma):
    """``buffer[buffer_address + r·buffer_row_stride + e] = convert(memory[memory_address +
    r·memory_row_stride + e·element_bytes], memory_format -> compute)`` for every row ``r`` and element
    ``e`` (``element_bytes``: :func:`memory_element_bytes`)."""

    OPCODE = Opcode.LOAD


@dataclass(frozen=True, kw_only=True)
class Store(_Dma):
    """``memory[...] = convert(buffer[...], compute -> storage)``, the same addressing as :class:`Load`.
    ``buffer`` may be any buffer, the weight buffer included."""

    OPCODE = Opcode.STORE


@dataclass(frozen=True, kw_only=True)
class Gather(_Dma):
    """For ``r`` = 0 .. row_count-1 in order: ``id = u32 memory[index_address + 4r]``; if ``id >=
    table_rows`` the machine halts with ``INDEX_RANGE``; else ``buffer[buffer_address +
    r·buffer_row_stride + e] = convert(memory[memory_address + id·memory_row_stride + e·element_bytes],
    memory_format -> compute)`` as :class:`Load` converts. The table is rows 0 .. table_rows-1 from
    ``memory_address``; the static checks (MEMORY_RANGE) cover the whole table and the id array."""

    OPCODE = Opcode.GATHER

    index_address: int = _field(_INDEX_ADDRESS, doc="byte address of the row_count little-endian uint32 "
                                                    "ids; a multiple of 4")
    table_rows: int = _field(_TABLE_ROWS, doc="rows in the table (>= 1); an id must be below it")


@dataclass(frozen=True, kw_only=True)
class Linear(Instruction):
    """Row-tile ``j`` of token ``t``: ``out[t, j·R + r] = acc`` where ``acc`` starts at +0 (``ZERO``) or at
    ``bias[t, j·R + r]`` (``BIAS``) and, for chunk ``k`` = 0 .. K-1 in order,
    ``acc = add(acc, tree_c(mul(M[j, k][r, c], v[t, k·C + c])))`` (the row's balanced pairwise tree).

    Addresses (elements): matrix line ``(j, k)`` at ``matrix_address + (j·K + k)·R·C``, lane ``r·C + c``;
    vector chunk ``(t, k)`` at ``vector_address + t·vector_token_stride·C + k·C`` (``C`` elements);
    output ``(t, j)`` at ``output_address + t·output_token_stride·R + j·R`` (``R`` elements); bias
    ``(t, j)`` at ``bias_address + t·bias_token_stride·R + j·R`` (``R`` elements).
    """

    OPCODE = Opcode.LINEAR

    matrix_buffer: Buffer = _field(2, Buffer, "buffer of the matrix tiles", default=Buffer.WEIGHT)
    matrix_address: int = _field(_ADDRESS, doc="element address of line (0, 0); a multiple of R·C")
    chunk_count: int = _field(_COUNT, doc="K: input chunks of C elements per output row tile (>= 1)")
    row_tile_count: int = _field(_COUNT, doc="J: output row tiles of R rows (>= 1)")
    token_count: int = _field(_COUNT, doc="T: tokens (vectors) that reuse every matrix line (>= 1)")
    vector_buffer: Buffer = _field(2, Buffer, "buffer of the input vectors", default=Buffer.ACTIVATION)
    vector_address: int = _field(_ADDRESS, doc="element address of token 0, chunk 0; a multiple of C")
    vector_token_stride: int = _field(_COUNT, doc="from one token's vector to the next, in units of C")
    output_buffer: Buffer = _field(2, Buffer, "buffer of the results (not WEIGHT)", default=Buffer.ACTIVATION)
    output_address: int = _field(_ADDRESS, doc="element address of token 0, row tile 0; a multiple of R")
    output_token_stride: int = _field(_COUNT, doc="from one token's results to the next, in units of R")
    init: LinearInit = _field(1, LinearInit, "accumulator start", default=LinearInit.ZERO)
    bias_buffer: Buffer = _field(2, Buffer, "buffer of the bias (ignored for ZERO)", default=Buffer.WEIGHT)
    bias_address: int = _field(_ADDRESS, doc="element address of token 0, row tile 0; a multiple of R")
    bias_token_stride: int = _field(_COUNT, doc="in units of R; 0 shares one bias among all tokens")


def _operand_fields(prefix: str, broadcast: bool):
    fields = [(f"{prefix}_buffer", Buffer, _field(2, Buffer, "buffer", default=Buffer.WEIGHT
                                                   if prefix != "dst" else Buffer.ACTIVATION))]
    if broadcast:
        fields.append((f"{prefix}_broadcast", Broadcast,
                       _field(2, Broadcast, "how the operand feeds the lanes", default=Broadcast.LANE)))
    fields += [
        (f"{prefix}_address", int, _field(_ADDRESS, doc="element address at beat (0, 0); a multiple of "
                                                        "the granule")),
        (f"{prefix}_outer_stride", int, _field(_LINE_STRIDE, doc="advance per outer step, in granules")),
        (f"{prefix}_inner_stride", int, _field(_LINE_STRIDE, doc="advance per inner step, in granules")),
    ]
    return fields


Elementwise = dataclasses.make_dataclass(
    "Elementwise",
    [("op", ElementwiseOp, _field(4, ElementwiseOp, "lane operation", default=ElementwiseOp.PASS)),
     ("outer_count", int, _field(_COUNT, doc="outer steps (>= 1)")),
     ("inner_count", int, _field(_COUNT, doc="inner steps per outer step (>= 1)"))]
    + _operand_fields("dst", False) + _operand_fields("a", True)
    + _operand_fields("b", True) + _operand_fields("c", True),
    bases=(Instruction,), frozen=True, kw_only=True, namespace={"OPCODE": Opcode.ELEMENTWISE})
Elementwise.__module__ = __name__
Elementwise.__doc__ = """\
Beat ``(o, i)`` for ``o < outer_count``, ``i < inner_count`` (outer-major order): every lane ``(r, c)``
computes ``op(a, b, c)`` and writes the line ``dst``. Operand ``X`` at beat ``(o, i)`` starts at element
``X_address + (o·X_outer_stride + i·X_inner_stride)·granule(X)`` and feeds lane ``(r, c)`` with its element
``r·C + c`` (LANE), ``r`` (ROW), ``c`` (COLUMN) or ``0`` (SCALAR). ``dst`` is always a full line (LANE).
Operands the op does not use (:func:`operands_used`) are neither read nor checked.

A beat may not read an element that an earlier beat of the same instruction wrote (undefined; the ISS
reports it); reading and writing the same element in the same beat (in place) is fine.
"""


@dataclass(frozen=True, kw_only=True)
class Nonlinear(Instruction):
    """``dst line l = function(src line l)`` for ``l < line_count``, element by element, as
    ``marca.golden.nonlinear`` computes it. Lines are contiguous; the same in-place rule as element-wise."""

    OPCODE = Opcode.NONLINEAR

    function: NonlinearFunction = _field(4, NonlinearFunction, "function", default=NonlinearFunction.EXP)
    line_count: int = _field(_ADDRESS, doc="lines (>= 1)")
    src_buffer: Buffer = _field(2, Buffer, "source buffer", default=Buffer.ACTIVATION)
    src_address: int = _field(_ADDRESS, doc="element address; a multiple of R·C")
    dst_buffer: Buffer = _field(2, Buffer, "destination buffer (not WEIGHT)", default=Buffer.ACTIVATION)
    dst_address: int = _field(_ADDRESS, doc="element address; a multiple of R·C")


@dataclass(frozen=True, kw_only=True)
class Barrier(Instruction):
    """Every earlier instruction finishes before any later one starts."""

    OPCODE = Opcode.BARRIER


@dataclass(frozen=True, kw_only=True)
class Halt(Instruction):
    """Finish everything, then stop with error code ``NONE``."""

    OPCODE = Opcode.HALT


INSTRUCTION_TYPES: dict[Opcode, type] = {
    cls.OPCODE: cls for cls in (Load, Store, Linear, Elementwise, Nonlinear, Barrier, Halt, Gather)}


def _dict_init(cls) -> None:
    """Give the frozen dataclass ``cls`` an ``__init__`` that fills the instance's dict in one go, with the
    same keyword-only signature and defaults: the generated one calls ``object.__setattr__`` per field
    (~0.5 µs each), and a compiler builds ~10^6 instructions for one layer of a real model."""
    fields = dataclasses.fields(cls)
    if any(field.default is dataclasses.MISSING for field in fields):
        raise TypeError(f"{cls.__name__}: every field needs a default")
    namespace = {f"_default_{field.name}": field.default for field in fields}
    parameters = "".join(f", {field.name}=_default_{field.name}" for field in fields)
    values = ", ".join(f"{field.name!r}: {field.name}" for field in fields)
    source = (f"def __init__(self{', *' if fields else ''}{parameters}):\n"
              f"    self.__dict__.update({{{values}}})\n")
    exec(source, namespace)
    namespace["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = namespace["__init__"]


for _cls in INSTRUCTION_TYPES.values():
    _dict_init(_cls)


# Layout -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldLayout:
    """One field's place in the instruction word: bits ``lsb`` .. ``lsb + width - 1``."""

    name: str
    lsb: int
    width: int
    kind: type | None
    doc: str

    @property
    def msb(self) -> int:
        return self.lsb + self.width - 1


def field_layout(opcode) -> tuple[FieldLayout, ...]:
    """The fields of ``opcode``'s format with their bit positions (opcode itself excluded, bits 7..0).
    The RTL decoder slices the instruction word with exactly these."""
    cls = INSTRUCTION_TYPES[Opcode(opcode)]
    out, lsb = [], OPCODE_BITS
    for f in cls.fields():
        width = f.metadata["width"]
        out.append(FieldLayout(f.name, lsb, width, f.metadata["kind"], f.metadata["doc"]))
        lsb += width
    if lsb > INSTRUCTION_BITS:
        raise AssertionError(f"{cls.__name__} needs {lsb} bits")
    return tuple(out)


def struct_layout(opcode) -> "data.StructLayout":
    """An Amaranth ``data.StructLayout`` of the whole :data:`INSTRUCTION_BITS`-bit word for ``opcode``:
    ``opcode`` (bits 7..0), then the fields of :func:`field_layout` (enum fields with their enum shape),
    then ``reserved``. ``view = data.View(isa.struct_layout(Opcode.LINEAR), word)`` gives the decoder named
    fields; ``struct_layout(op).const({...}).as_value()`` builds words in testbenches."""
    from amaranth.hdl import unsigned
    from amaranth.lib import data

    members = {"opcode": Opcode}
    end = OPCODE_BITS
    for layout in field_layout(opcode):
        members[layout.name] = layout.kind if layout.kind is not None else unsigned(layout.width)
        end = layout.lsb + layout.width
    if end < INSTRUCTION_BITS:
        members["reserved"] = unsigned(INSTRUCTION_BITS - end)
    return data.StructLayout(members)


class IllegalInstruction(ValueError):
    """Raised by :func:`decode` (and by :func:`encode` for values that do not fit); ``code`` is the
    :class:`ErrorCode` the hardware reports."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code


_COUNT_FIELDS = {
    Opcode.LOAD: ("row_count", "row_elements"), Opcode.STORE: ("row_count", "row_elements"),
    Opcode.GATHER: ("row_count", "row_elements", "table_rows"),
    Opcode.LINEAR: ("chunk_count", "row_tile_count", "token_count"),
    Opcode.ELEMENTWISE: ("outer_count", "inner_count"), Opcode.NONLINEAR: ("line_count",),
}
_DESTINATION_FIELDS = {Opcode.LINEAR: "output_buffer", Opcode.ELEMENTWISE: "dst_buffer",
                       Opcode.NONLINEAR: "dst_buffer"}


def _field_errors(instruction: Instruction) -> None:
    """The configuration-independent rules (ILLEGAL_FIELD), applied by both encode and decode."""
    opcode = instruction.OPCODE
    for name in _COUNT_FIELDS.get(opcode, ()):
        if getattr(instruction, name) == 0:
            raise IllegalInstruction(ErrorCode.ILLEGAL_FIELD, f"{name} must be at least 1")
    destination = _DESTINATION_FIELDS.get(opcode)
    if destination is not None and getattr(instruction, destination) == Buffer.WEIGHT:
        raise IllegalInstruction(ErrorCode.ILLEGAL_FIELD, f"{destination} may not be WEIGHT")
    if opcode == Opcode.ELEMENTWISE and instruction.op == ElementwiseOp.FUNCTION:
        raise IllegalInstruction(ErrorCode.ILLEGAL_FIELD, "op FUNCTION is internal to NONLINEAR")


def encode(instruction: Instruction) -> int:
    """The instruction word as an integer (bit 0 = bit 0 of the first byte in memory)."""
    if not isinstance(instruction, Instruction) or instruction.OPCODE is None:
        raise ValueError(f"instruction must be an Instruction, not {instruction!r}")
    word = int(instruction.OPCODE)
    for layout in field_layout(instruction.OPCODE):
        value = getattr(instruction, layout.name)
        if layout.kind is not None:
            try:
                value = layout.kind(value)
            except ValueError:
                raise ValueError(f"{layout.name} must be a {layout.kind.__name__}, not {value!r}") from None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= int(value) < 1 << layout.width:
            raise ValueError(f"{layout.name} must be an integer in [0, 2**{layout.width}), not {value!r}")
        word |= int(value) << layout.lsb
    _field_errors(instruction)
    return word


def decode(word: int) -> Instruction:
    """The instruction in ``word``; raises :class:`IllegalInstruction` with ILLEGAL_OPCODE or
    ILLEGAL_FIELD exactly where the hardware decoder reports them (opcode first)."""
    if not isinstance(word, int) or not 0 <= word < 1 << INSTRUCTION_BITS:
        raise ValueError(f"word must be an integer in [0, 2**{INSTRUCTION_BITS}), not {word!r}")
    try:
        opcode = Opcode(word & ((1 << OPCODE_BITS) - 1))
    except ValueError:
        raise IllegalInstruction(ErrorCode.ILLEGAL_OPCODE,
                                 f"opcode {word & 0xFF:#04x} is not defined") from None
    values, end = {}, OPCODE_BITS
    for layout in field_layout(opcode):
        value = (word >> layout.lsb) & ((1 << layout.width) - 1)
        if layout.kind is not None:
            try:
                value = layout.kind(value)
            except ValueError:
                raise IllegalInstruction(ErrorCode.ILLEGAL_FIELD,
                                         f"{layout.name} = {value} is not a {layout.kind.__name__}") from None
        values[layout.name] = value
        end = layout.lsb + layout.width
    if word >> end:
        raise IllegalInstruction(ErrorCode.ILLEGAL_FIELD, f"reserved bits above bit {end - 1} are not zero")
    instruction = INSTRUCTION_TYPES[opcode](**values)
    _field_errors(instruction)
    return instruction


def encode_program(instructions) -> bytes:
    """Instructions as the bytes the machine fetches (each word little-endian)."""
    return b"".join(encode(i).to_bytes(INSTRUCTION_BYTES, "little") for i in instructions)


def decode_program(data: bytes) -> list[Instruction]:
    """Inverse of :func:`encode_program`; raises :class:`IllegalInstruction` at the first bad word."""
    if len(data) % INSTRUCTION_BYTES:
        raise ValueError(f"program length must be a multiple of {INSTRUCTION_BYTES} bytes, not {len(data)}")
    return [decode(int.from_bytes(data[k:k + INSTRUCTION_BYTES], "little"))
            for k in range(0, len(data), INSTRUCTION_BYTES)]


# Assembly text ------------------------------------------------------------------------------------------
#
# One instruction per line: the opcode name, then ``field=value`` pairs (enum values by name, numbers in
# decimal or 0x hex); fields left out take their dataclass default. ``#`` starts a comment.

def format_instruction(instruction: Instruction) -> str:
    """One assembly line: every field that differs from its default."""
    parts = [instruction.OPCODE.name]
    for f in instruction.fields():
        value = getattr(instruction, f.name)
        if value == f.default:
            continue
        kind = f.metadata["kind"]
        if kind is not None:
            parts.append(f"{f.name}={kind(value).name}")
        elif f.name in ("memory_address", "index_address"):
            parts.append(f"{f.name}={value:#x}")
        else:
            parts.append(f"{f.name}={value}")
    return " ".join(parts)


def parse_instruction(text: str) -> Instruction:
    """Inverse of :func:`format_instruction`."""
    words = text.split()
    if not words:
        raise ValueError("empty instruction")
    try:
        cls = INSTRUCTION_TYPES[Opcode[words[0].upper()]]
    except KeyError:
        raise ValueError(f"unknown opcode {words[0]!r}") from None
    fields = {f.name: f for f in cls.fields()}
    values = {}
    for word in words[1:]:
        match = re.fullmatch(r"(\w+)=(\S+)", word)
        if not match or match[1] not in fields:
            raise ValueError(f"{cls.OPCODE.name}: bad field {word!r}; fields: {', '.join(fields)}")
        name, value = match[1], match[2]
        kind = fields[name].metadata["kind"]
        if kind is not None and not re.fullmatch(r"\d+|0x[0-9a-fA-F]+", value):
            try:
                values[name] = kind[value.upper()]
            except KeyError:
                raise ValueError(f"{name}: {value!r} is not a {kind.__name__}") from None
        else:
            values[name] = int(value, 0)
            if kind is not None:
                values[name] = kind(values[name])
    return cls(**values)


def assemble(text: str) -> list[Instruction]:
    """Instructions from assembly text (see :func:`format_instruction`)."""
    program = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                program.append(parse_instruction(line))
            except ValueError as error:
                raise ValueError(f"line {number}: {error}") from None
    return program


def disassemble(program) -> str:
    """Assembly text of instructions, or of encoded program bytes."""
    if isinstance(program, (bytes, bytearray)):
        program = decode_program(bytes(program))
    return "".join(format_instruction(i) + "\n" for i in program)


# Configuration-dependent rules --------------------------------------------------------------------------

def check_config(config: MarcaConfig) -> None:
    """Raise ValueError if ``config`` exceeds what the instruction fields can address."""
    for buffer in Buffer:
        if buffer_elements(config, buffer) > 1 << _ADDRESS:
            raise ValueError(f"{buffer.name.lower()}_buffer_kib holds more than 2**{_ADDRESS} elements, "
                             f"which the instruction fields cannot address")
        if buffer_lines(config, buffer) < 1:
            raise ValueError(f"{buffer.name.lower()}_buffer_kib holds less than one line of "
                             f"{config.lanes} compute-format elements")
    if config.axi_addr_width > 64:
        raise ValueError("axi_addr_width may not exceed the 64-bit memory_address field")


_KIB_FIELDS = {Buffer.WEIGHT: "weight_buffer_kib", Buffer.ACTIVATION: "activation_buffer_kib",
               Buffer.STATE: "state_buffer_kib", Buffer.SCRATCH: "scratch_buffer_kib"}


def buffer_lines(config: MarcaConfig, buffer: Buffer) -> int:
    """Lines of ``R·C`` compute-format elements in ``buffer``."""
    return getattr(config, _KIB_FIELDS[Buffer(buffer)]) * 1024 // (config.lanes * config.compute_bytes)


def buffer_elements(config: MarcaConfig, buffer: Buffer) -> int:
    """Addressable elements of ``buffer``: whole lines only."""
    return buffer_lines(config, buffer) * config.lanes


def granule(config: MarcaConfig, broadcast: Broadcast) -> int:
    """Elements an operand reads per beat, which is also its address alignment and its stride unit:
    LANE ``R·C``, ROW ``R``, COLUMN ``C``, SCALAR 1."""
    if broadcast == Broadcast.LANE:
        return config.array_rows * config.array_cols
    if broadcast == Broadcast.ROW:
        return config.array_rows
    if broadcast == Broadcast.COLUMN:
        return config.array_cols
    return {Broadcast.SCALAR: 1}[Broadcast(broadcast)]      # ValueError for a value that is no Broadcast


_ELEMENTWISE_OPERANDS = {
    ElementwiseOp.PASS: ("a",),
    ElementwiseOp.MUL: ("a", "b"), ElementwiseOp.ADD: ("a", "b"), ElementwiseOp.SUB: ("a", "b"),
    ElementwiseOp.MIN: ("a", "b"), ElementwiseOp.MAX: ("a", "b"),
    ElementwiseOp.MULADD: ("a", "b", "c"), ElementwiseOp.CMP_SELECT: ("a", "b", "c"),
}


def operands_used(op: ElementwiseOp) -> tuple[str, ...]:
    """The source operands an element-wise op reads."""
    return _ELEMENTWISE_OPERANDS[ElementwiseOp(op)]


class BufferAccess(NamedTuple):
    """An affine set of buffer elements an instruction touches:
    ``address + Σ_k index_k·stride_k + e`` for ``0 <= index_k < count_k`` and ``0 <= e < extent``.
    ``name`` is the field prefix (for messages); ``alignment`` the rule its address and strides obey.
    (A named tuple: the compiler's barrier pass builds ~10^6 of them per model layer.)"""

    name: str
    buffer: Buffer
    write: bool
    address: int
    extent: int
    loops: tuple[tuple[int, int], ...]   # (count, stride in elements)
    alignment: int

    @property
    def last(self) -> int:
        """The last element touched (the access's extent within the buffer)."""
        return self.address + sum((count - 1) * stride for count, stride in self.loops) + self.extent - 1


_OPERAND_ATTRIBUTES = {name: tuple(f"{name}_{field}" for field in ("broadcast", "buffer", "address", "outer_stride",
                                                                   "inner_stride")) for name in ("a", "b", "c")}


def buffer_accesses(instruction: Instruction, config: MarcaConfig) -> list[BufferAccess]:
    """Every buffer region ``instruction`` reads or writes, in the order the alignment and range checks
    visit them."""
    R, C, lanes = config.array_rows, config.array_cols, config.lanes
    i = instruction
    if isinstance(i, (Load, Store, Gather)):
        return [BufferAccess("buffer", i.buffer, not isinstance(i, Store), i.buffer_address, i.row_elements,
                             ((i.row_count, i.buffer_row_stride),), 1)]
    if isinstance(i, Linear):
        out = [BufferAccess("matrix", i.matrix_buffer, False, i.matrix_address, lanes,
                            ((i.row_tile_count * i.chunk_count, lanes),), lanes),
               BufferAccess("vector", i.vector_buffer, False, i.vector_address, C,
                            ((i.token_count, i.vector_token_stride * C), (i.chunk_count, C)), C)]
        if i.init == LinearInit.BIAS:
            out.append(BufferAccess("bias", i.bias_buffer, False, i.bias_address, R,
                                    ((i.token_count, i.bias_token_stride * R), (i.row_tile_count, R)), R))
        out.append(BufferAccess("output", i.output_buffer, True, i.output_address, R,
                                ((i.token_count, i.output_token_stride * R), (i.row_tile_count, R)), R))
        return out
    if isinstance(i, Elementwise):
        out = []
        for name in operands_used(i.op):
            broadcast, buffer, address, outer_stride, inner_stride = _OPERAND_ATTRIBUTES[name]
            g = granule(config, getattr(i, broadcast))
            out.append(BufferAccess(name, getattr(i, buffer), False, getattr(i, address),
                                    g, ((i.outer_count, getattr(i, outer_stride) * g),
                                        (i.inner_count, getattr(i, inner_stride) * g)), g))
        out.append(BufferAccess("dst", i.dst_buffer, True, i.dst_address, lanes,
                                ((i.outer_count, i.dst_outer_stride * lanes),
                                 (i.inner_count, i.dst_inner_stride * lanes)), lanes))
        return out
    if isinstance(i, Nonlinear):
        lines = ((i.line_count, lanes),)
        return [BufferAccess("src", i.src_buffer, False, i.src_address, lanes, lines, lanes),
                BufferAccess("dst", i.dst_buffer, True, i.dst_address, lanes, lines, lanes)]
    return []


def memory_element_bytes(instruction: Instruction, config: MarcaConfig) -> int:
    """Bytes per element on the memory side of a DMA instruction (its alignment too)."""
    return config.compute_bytes if instruction.memory_format == MemoryFormat.COMPUTE else config.storage_bytes


def memory_access(instruction: Instruction, config: MarcaConfig) -> tuple[int, int] | None:
    """``(first byte, last byte)`` of a DMA instruction's memory range (of a ``GATHER``: its whole table,
    rows 0 .. table_rows-1), else None."""
    if not isinstance(instruction, (Load, Store, Gather)):
        return None
    rows = instruction.table_rows if isinstance(instruction, Gather) else instruction.row_count
    last = instruction.memory_address + (rows - 1) * instruction.memory_row_stride \
        + instruction.row_elements * memory_element_bytes(instruction, config) - 1
    return instruction.memory_address, last


def index_access(instruction: Instruction) -> tuple[int, int] | None:
    """``(first byte, last byte)`` of a ``GATHER``'s id array, else None."""
    if not isinstance(instruction, Gather):
        return None
    return instruction.index_address, instruction.index_address + INDEX_BYTES * instruction.row_count - 1


def check_instruction(instruction: Instruction, config: MarcaConfig) -> ErrorCode:
    """The configuration-dependent verdict on a decoded instruction, with the hardware's priority:
    MISALIGNED (memory address and stride first, a ``GATHER``'s index address next, then each buffer
    access in :func:`buffer_accesses` order), then BUFFER_RANGE (same order), then MEMORY_RANGE (a
    ``GATHER``: its table or its id array)."""
    accesses = buffer_accesses(instruction, config)
    memory = memory_access(instruction, config)
    index = index_access(instruction)
    if memory is not None:
        size = memory_element_bytes(instruction, config)
        if instruction.memory_address % size or instruction.memory_row_stride % size:
            return ErrorCode.MISALIGNED
    if index is not None and index[0] % INDEX_BYTES:
        return ErrorCode.MISALIGNED
    for access in accesses:
        if access.address % access.alignment:
            return ErrorCode.MISALIGNED
    for access in accesses:
        if access.last >= buffer_elements(config, access.buffer):
            return ErrorCode.BUFFER_RANGE
    if memory is not None and memory[1] >= 1 << config.axi_addr_width:
        return ErrorCode.MEMORY_RANGE
    if index is not None and index[1] >= 1 << config.axi_addr_width:
        return ErrorCode.MEMORY_RANGE
    return ErrorCode.NONE


# Documentation ------------------------------------------------------------------------------------------

def render_markdown() -> str:
    """The encoding tables of docs/isa.md (between its GENERATED markers)."""
    lines = [f"Instruction word: {INSTRUCTION_BITS} bits ({INSTRUCTION_BYTES} bytes, little-endian). "
             f"Bits {OPCODE_BITS - 1}..0: opcode. Bits above a format's last field are reserved (zero).", "",
             "| opcode | value | meaning |", "|---|---|---|"]
    for opcode in Opcode:
        doc = INSTRUCTION_DOCS[opcode]
        lines.append(f"| `{opcode.name}` | `{int(opcode):#04x}` | {doc} |")
    for opcode in Opcode:
        layout = field_layout(opcode)
        lines += ["", f"### {opcode.name}", ""]
        if not layout:
            lines.append("No fields: bits 255..8 are reserved (zero).")
            continue
        lines += ["| bits | field | type | meaning |", "|---|---|---|---|"]
        for f in layout:
            kind = f.kind.__name__ if f.kind is not None else f"u{f.width}"
            lines.append(f"| {f.msb}..{f.lsb} | `{f.name}` | {kind} | {f.doc} |")
        lines.append(f"| {INSTRUCTION_BITS - 1}..{layout[-1].msb + 1} | reserved | | zero |")
    for enum_type in (Buffer, MemoryFormat, Broadcast, ElementwiseOp, NonlinearFunction, LinearInit,
                      ErrorCode):
        lines += ["", f"### {enum_type.__name__}", "", "| value | name |", "|---|---|"]
        lines += [f"| {int(member)} | `{member.name}` |" for member in enum_type]
    return "\n".join(lines) + "\n"


INSTRUCTION_DOCS = {
    Opcode.LOAD: "2-D strided DMA memory -> buffer; storage -> compute format (round to nearest even, flush)",
    Opcode.STORE: "2-D strided DMA buffer -> memory; compute -> storage format (round to nearest even, "
                  "flush)",
    Opcode.LINEAR: "matrix tiles times vector chunks, reduction on (GEMV; GEMM over tokens reusing each "
                   "tile)",
    Opcode.ELEMENTWISE: "one ElementwiseOp on every lane over a 2-D grid of beats, reduction off",
    Opcode.NONLINEAR: "exp, SiLU, softplus or rsqrt of every element of contiguous lines",
    Opcode.BARRIER: "wait until every earlier instruction (DMA and compute) has finished",
    Opcode.HALT: "finish everything, then stop with error code NONE",
    Opcode.GATHER: "DMA memory -> buffer of the table rows named by uint32 ids in memory (embedding lookup); "
                   "an id outside the table halts with INDEX_RANGE",
}


DOC_BEGIN = "<!-- GENERATED BY marca.isa.render_markdown: BEGIN -->"
DOC_END = "<!-- GENERATED BY marca.isa.render_markdown: END -->"


def updated_doc(text: str) -> str:
    """``text`` (docs/isa.md) with the generated tables between its markers replaced by the current ones."""
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    return f"{head}{DOC_BEGIN}\n{render_markdown()}{DOC_END}{tail}"


if __name__ == "__main__":   # python -m marca.isa docs/isa.md: regenerate the page's tables in place
    import sys
    from pathlib import Path
    for name in sys.argv[1:]:
        Path(name).write_text(updated_doc(Path(name).read_text()))
