"""Constrained-random programs for RTL-versus-ISS testing (verification level 3, docs/isa.md).

:func:`random_program` draws a legal instruction sequence and a memory image for a configuration: every
instruction passes :func:`marca.isa.check_instruction`, reads only buffer elements written before it, and
has the barriers the overlap rules need (the generator runs each candidate on a shadow
:class:`marca.golden.iss.Machine`; a missing barrier makes it insert a ``BARRIER`` first, an in-instruction
overlap makes it draw again). Operands are random bit patterns including zeros, subnormals, infinities and
NaNs. Optionally the program ends with an instruction that faults with a chosen error code instead of
``HALT``, to test error reporting.

Memory layout of the image (all addresses multiples of 64): the program at 0, then a data region of random
storage-format elements, then an id region of ``GATHER`` ids (little-endian uint32, each below
:data:`GATHER_IDS`), then an output region (zeros) that stores write to; loads and gathers read the data
and output regions (a gather's table: ``table_rows`` rows from its ``memory_address``, at least one more
than the largest id it reads).
"""

import random
from dataclasses import dataclass

import torch

from marca import isa
from marca.config import MarcaConfig
from marca.isa import Buffer, ErrorCode
from marca.ops import Broadcast, ElementwiseOp

from . import fp
from .iss import Machine, ProgramError

__all__ = ["RandomProgram", "random_program", "GATHER_IDS"]

GATHER_IDS = 8
"""Ids in the id region are drawn from 0 .. GATHER_IDS-1."""
_ID_COUNT = 64          # ids in the id region


@dataclass
class RandomProgram:
    """A generated program: instructions, the memory image that holds it (at ``program_address``) and its
    data, and where the regions are."""

    instructions: list
    memory: bytes
    program_address: int
    data_address: int
    data_bytes: int
    output_address: int
    output_bytes: int
    expected_error: ErrorCode
    index_address: int = 0
    index_bytes: int = 0


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


class _Drawer:
    def __init__(self, config: MarcaConfig, rng: random.Random, used_lines: dict, data_address: int,
                 data_bytes: int, output_address: int, output_bytes: int, index_address: int, ids: list):
        self.config, self.rng, self.used_lines = config, rng, used_lines
        self.data_address, self.data_bytes = data_address, data_bytes
        self.output_address, self.output_bytes = output_address, output_bytes
        self.index_address, self.ids = index_address, ids

    def used(self, buffer) -> int:
        return self.used_lines[Buffer(buffer)] * self.config.lanes

    def fits(self, instruction) -> bool:
        if isa.check_instruction(instruction, self.config) != ErrorCode.NONE:
            return False
        return all(access.last < self.used(access.buffer)
                   for access in isa.buffer_accesses(instruction, self.config))

    def aligned_address(self, buffer, granule: int) -> int:
        return self.rng.randrange(0, self.used(buffer), granule)

    def dma(self, store: bool):
        rng, lanes = self.rng, self.config.lanes
        memory_format = rng.choice([isa.MemoryFormat.STORAGE] * 2 + [isa.MemoryFormat.COMPUTE])
        size = self.config.compute_bytes if memory_format == isa.MemoryFormat.COMPUTE \
            else self.config.storage_bytes
        rows = rng.randint(1, 4)
        elements = rng.choice([1, rng.randint(1, lanes), lanes, rng.randint(1, 2 * lanes)])
        buffer = rng.choice(list(Buffer))
        buffer_stride = rng.choice([elements, elements + rng.randint(0, lanes), rng.randint(0, lanes)])
        memory_stride = size * rng.choice([elements, elements + rng.randint(0, 8), rng.randint(0, elements)])
        if store or rng.random() < 0.3:
            base, span = self.output_address, self.output_bytes
        else:
            base, span = self.data_address, self.data_bytes
        extent = (rows - 1) * memory_stride + elements * size
        if extent > span:
            return None
        address = base + size * rng.randrange(0, (span - extent) // size + 1)
        cls = isa.Store if store else isa.Load
        return cls(memory_address=address, row_count=rows, row_elements=elements,
                   memory_row_stride=memory_stride,
                   buffer=buffer, buffer_address=rng.randrange(0, self.used(buffer)),
                   buffer_row_stride=buffer_stride, memory_format=memory_format)

    def gather(self):
        rng, lanes = self.rng, self.config.lanes
        memory_format = rng.choice([isa.MemoryFormat.STORAGE] * 2 + [isa.MemoryFormat.COMPUTE])
        size = self.config.compute_bytes if memory_format == isa.MemoryFormat.COMPUTE \
            else self.config.storage_bytes
        rows = rng.randint(1, 4)
        first = rng.randrange(0, len(self.ids) - rows + 1)
        table_rows = max(self.ids[first:first + rows]) + 1 + rng.choice([0, 0, rng.randint(1, 8)])
        elements = rng.choice([1, rng.randint(1, lanes), lanes, rng.randint(1, 2 * lanes)])
        buffer = rng.choice(list(Buffer))
        buffer_stride = rng.choice([elements, elements + rng.randint(0, lanes), rng.randint(0, lanes)])
        memory_stride = size * rng.choice([elements, elements + rng.randint(0, 8), rng.randint(0, elements)])
        base, span = (self.output_address, self.output_bytes) if rng.random() < 0.3 \
            else (self.data_address, self.data_bytes)
        extent = (table_rows - 1) * memory_stride + elements * size
        if extent > span:
            return None
        return isa.Gather(memory_address=base + size * rng.randrange(0, (span - extent) // size + 1),
                          row_count=rows, row_elements=elements, memory_row_stride=memory_stride,
                          buffer=buffer, buffer_address=rng.randrange(0, self.used(buffer)),
                          buffer_row_stride=buffer_stride, memory_format=memory_format,
                          index_address=self.index_address + isa.INDEX_BYTES * first, table_rows=table_rows)

    def writable(self):
        return self.rng.choice([Buffer.ACTIVATION, Buffer.STATE, Buffer.SCRATCH])

    def linear(self):
        rng, R, C = self.rng, self.config.array_rows, self.config.array_cols
        matrix_buffer, vector_buffer, output_buffer = rng.choice(list(Buffer)), rng.choice(list(Buffer)), \
            self.writable()
        init = rng.choice(list(isa.LinearInit))
        bias_buffer = rng.choice(list(Buffer))
        fields = dict(
            matrix_buffer=matrix_buffer, matrix_address=self.aligned_address(matrix_buffer, R * C),
            chunk_count=rng.randint(1, 3), row_tile_count=rng.randint(1, 2), token_count=rng.randint(1, 3),
            vector_buffer=vector_buffer, vector_address=self.aligned_address(vector_buffer, C),
            vector_token_stride=rng.randint(0, 4),
            output_buffer=output_buffer, output_address=self.aligned_address(output_buffer, R),
            output_token_stride=rng.randint(2, 4), init=init)
        if init == isa.LinearInit.BIAS:
            if rng.random() < 0.3:      # accumulate in place: the bias is the output
                fields.update(bias_buffer=output_buffer, bias_address=fields["output_address"],
                              bias_token_stride=fields["output_token_stride"])
            else:
                fields.update(bias_buffer=bias_buffer, bias_address=self.aligned_address(bias_buffer, R),
                              bias_token_stride=rng.randint(0, 3))
        return isa.Linear(**fields)

    def elementwise(self):
        rng = self.rng
        op = rng.choice([op for op in ElementwiseOp if op != ElementwiseOp.FUNCTION])
        dst = self.writable()
        fields = dict(op=op, outer_count=rng.randint(1, 3), inner_count=rng.randint(1, 3), dst_buffer=dst,
                      dst_address=self.aligned_address(dst, self.config.lanes),
                      dst_outer_stride=rng.randint(0, 3), dst_inner_stride=rng.randint(0, 2))
        for name in isa.operands_used(op):
            if rng.random() < 0.25:          # in place: the destination itself
                fields.update({f"{name}_buffer": dst, f"{name}_broadcast": Broadcast.LANE,
                               f"{name}_address": fields["dst_address"],
                               f"{name}_outer_stride": fields["dst_outer_stride"],
                               f"{name}_inner_stride": fields["dst_inner_stride"]})
                continue
            buffer, broadcast = rng.choice(list(Buffer)), rng.choice(list(Broadcast))
            fields.update({f"{name}_buffer": buffer, f"{name}_broadcast": broadcast,
                           f"{name}_address": self.aligned_address(buffer,
                                                                    isa.granule(self.config, broadcast)),
                           f"{name}_outer_stride": rng.randint(0, 3),
                           f"{name}_inner_stride": rng.randint(0, 2)})
        return isa.Elementwise(**fields)

    def nonlinear(self):
        rng, lanes = self.rng, self.config.lanes
        src, dst = rng.choice(list(Buffer)), self.writable()
        fields = dict(function=rng.choice(list(isa.NonlinearFunction)), line_count=rng.randint(1, 3),
                      src_buffer=src, src_address=self.aligned_address(src, lanes), dst_buffer=dst,
                      dst_address=self.aligned_address(dst, lanes))
        if rng.random() < 0.3 and src != Buffer.WEIGHT:
            fields.update(dst_buffer=src, dst_address=fields["src_address"])
        return isa.Nonlinear(**fields)

    def faulting(self, code: ErrorCode) -> isa.Instruction:
        """An instruction that raises ``code`` (ILLEGAL_* are produced by the word, see random_program)."""
        lanes, config = self.config.lanes, self.config
        if code == ErrorCode.MISALIGNED:
            return isa.Elementwise(op=ElementwiseOp.PASS, outer_count=1, inner_count=1,
                                   dst_buffer=Buffer.SCRATCH, dst_address=0, a_buffer=Buffer.ACTIVATION,
                                   a_address=lanes + 1 if lanes > 1 else 0, a_broadcast=Broadcast.LANE) \
                if lanes > 1 else isa.Load(memory_address=1, row_count=1, row_elements=1, buffer=Buffer.STATE)
        if code == ErrorCode.BUFFER_RANGE:
            return isa.Nonlinear(function=isa.NonlinearFunction.EXP, line_count=2, src_buffer=Buffer.STATE,
                                 src_address=isa.buffer_elements(config, Buffer.STATE) - lanes,
                                 dst_buffer=Buffer.SCRATCH, dst_address=0)
        if code == ErrorCode.MEMORY_RANGE:
            return isa.Load(memory_address=(1 << config.axi_addr_width) - config.storage_bytes, row_count=1,
                            row_elements=2, buffer=Buffer.STATE)
        if code == ErrorCode.BUS_ERROR:
            return isa.Store(memory_address=self.output_address + self.output_bytes, row_count=1,
                             row_elements=1, buffer=Buffer.STATE)
        if code == ErrorCode.INDEX_RANGE:
            # The largest of the first four ids (at least 1, see random_program) is one past the table.
            return isa.Gather(memory_address=self.data_address, row_count=4, row_elements=lanes,
                              memory_row_stride=lanes * config.storage_bytes, buffer=Buffer.STATE,
                              index_address=self.index_address, table_rows=max(self.ids[:4]))
        raise ValueError(f"no faulting instruction for {code!r}")


_ILLEGAL_WORDS = {
    ErrorCode.ILLEGAL_OPCODE: lambda rng: rng.choice([0, 0x09, 0xFF]) | (rng.getrandbits(200) << 8),
    # BARRIER with a reserved bit set; ELEMENTWISE with op FUNCTION (op field bits 11..8).
    ErrorCode.ILLEGAL_FIELD: lambda rng: rng.choice([int(isa.Opcode.BARRIER) | (1 << rng.randrange(8, 256)),
                                                    isa.encode(isa.Elementwise(
                                                        op=ElementwiseOp.PASS, outer_count=1, inner_count=1,
                                                        dst_buffer=Buffer.SCRATCH)) | (8 << 8)]),
}


def random_program(config: MarcaConfig, *, seed: int, length: int = 40, used_lines: int = 6,
                   data_bytes: int = 4096, output_bytes: int = 2048,
                   weights: dict | None = None, final_error: ErrorCode = ErrorCode.NONE) -> RandomProgram:
    """A legal random program of about ``length`` instructions (plus initial loads and barriers).

    ``used_lines``: lines at the start of each buffer that the program uses (all loaded first, so every
    read is of defined data). ``weights``: relative frequency per class name (``load``, ``gather``,
    ``store``, ``linear``, ``elementwise``, ``nonlinear``, ``barrier``). ``final_error``: end with an
    instruction that faults with this code instead of HALT.
    """
    if not isinstance(config, MarcaConfig):
        raise ValueError(f"config must be a MarcaConfig, not {config!r}")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative integer, not {length!r}")
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    size, lanes = config.storage_bytes, config.lanes
    lines = {b: min(used_lines, isa.buffer_lines(config, b)) for b in Buffer}
    init_bytes = sum(lines.values()) * lanes * size
    data_bytes = max(data_bytes, init_bytes)
    program_bytes = _align((3 * length + 16) * isa.INSTRUCTION_BYTES, 64)
    data_address = program_bytes
    index_address = _align(data_address + data_bytes, 64)
    index_bytes = _ID_COUNT * isa.INDEX_BYTES
    output_address = _align(index_address + index_bytes, 64)
    memory = bytearray(output_address + output_bytes)
    data = fp.random_bits(data_bytes // size, config.storage_format, generator)
    for k, value in enumerate(data.tolist()):
        memory[data_address + k * size: data_address + (k + 1) * size] = int(value).to_bytes(size, "little")
    ids = [rng.randrange(GATHER_IDS) for _ in range(_ID_COUNT)]
    ids[2] = rng.randrange(1, GATHER_IDS)        # so that the INDEX_RANGE tail has a table of >= 1 row
    memory[index_address:index_address + index_bytes] = b"".join(
        id_.to_bytes(isa.INDEX_BYTES, "little") for id_ in ids)

    drawer = _Drawer(config, rng, lines, data_address, data_bytes, output_address, output_bytes,
                     index_address, ids)
    shadow = Machine(config, memory)
    program = []

    def emit(instruction):
        code = shadow.execute(instruction)
        assert code == ErrorCode.NONE, (instruction, code)
        program.append(instruction)

    # Fill every used line of every buffer from the data region.
    offset = data_address
    for buffer in Buffer:
        emit(isa.Load(memory_address=offset, row_count=lines[buffer], row_elements=lanes,
                      memory_row_stride=lanes * size, buffer=buffer, buffer_address=0,
                      buffer_row_stride=lanes))
        offset += lines[buffer] * lanes * size
    emit(isa.Barrier())

    weights = {"load": 3, "gather": 1, "store": 2, "linear": 3, "elementwise": 5, "nonlinear": 2,
               "barrier": 1,
               **(weights or {})}
    classes, frequencies = zip(*weights.items())
    while len(program) < length + len(Buffer) + 1:
        kind = rng.choices(classes, frequencies)[0]
        for _attempt in range(50):
            if kind == "barrier":
                candidate = isa.Barrier()
            elif kind in ("load", "store"):
                candidate = drawer.dma(store=kind == "store")
            else:
                candidate = getattr(drawer, kind)()
            if candidate is None or not drawer.fits(candidate):
                continue
            try:
                emit(candidate)
            except ProgramError as error:
                if error.kind != "barrier":
                    continue
                emit(isa.Barrier())
                emit(candidate)
            break

    if final_error == ErrorCode.NONE:
        program.append(isa.Halt())
        words = [isa.encode(i) for i in program]
    elif final_error in _ILLEGAL_WORDS:
        words = [isa.encode(i) for i in program] + [_ILLEGAL_WORDS[final_error](rng)]
    else:
        faulting = drawer.faulting(final_error)
        # BUS_ERROR and INDEX_RANGE are found while the instruction runs, not by the static checks.
        assert isa.check_instruction(faulting, config) == final_error \
            or final_error in (ErrorCode.BUS_ERROR, ErrorCode.INDEX_RANGE)
        words = [isa.encode(i) for i in program + [faulting]]
        program.append(faulting)
    if len(words) * isa.INSTRUCTION_BYTES > program_bytes:
        raise AssertionError("program region too small")
    for k, word in enumerate(words):
        start = k * isa.INSTRUCTION_BYTES
        memory[start:start + isa.INSTRUCTION_BYTES] = word.to_bytes(isa.INSTRUCTION_BYTES, "little")
    return RandomProgram(program, bytes(memory), 0, data_address, data_bytes, output_address, output_bytes,
                         final_error, index_address, index_bytes)

