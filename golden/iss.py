"""Golden instruction-set simulator: runs a program on a memory image bit-exactly (docs/isa.md).

The machine model, the encoding and the legality rules come from :mod:`marca.isa`; the arithmetic from the
golden unit models: :mod:`marca.golden.fp` (DMA format conversion), :mod:`marca.golden.pe_array`
(element-wise ops, row trees and accumulators) and :mod:`marca.golden.nonlinear` (exp, SiLU, softplus).
Each instruction is executed whole and vectorized (one PyTorch gather, compute and scatter per operand),
which is exact because a legal program cannot observe the order of beats inside an instruction.

Two machines implement the same semantics: :class:`Machine`, the fast one (float32 values, cached
per-instruction plans, CPU or CUDA; what :func:`run_program` uses), and :class:`ReferenceMachine`, the
slow oracle on bit patterns through the unit golden models, kept to test the fast one against bit for bit
(docs/iss.md).

Beyond the hardware's own errors (:class:`marca.isa.ErrorCode`, reported like the hardware: the machine
halts and :class:`RunResult` says where), the simulator raises :class:`ProgramError` for programs whose
result the architecture leaves undefined, so that a program that runs here means one thing on any legal
hardware schedule:

* a DMA and a compute instruction touching the same buffer element (one of them writing) with no
  ``BARRIER`` between them (``check_hazards``);
* a beat reading an element that an earlier beat of the same instruction wrote; a ``LINEAR`` whose output
  overlaps what it reads (except its bias in place); a ``NONLINEAR`` whose source and destination overlap
  without being equal;
* a read of a buffer element that nothing wrote since the start (``check_undefined``);
* running past ``max_instructions`` without ``HALT``.

Usage::

    machine = Machine(config, memory_image)
    result = machine.run(program_address)
    result.error, result.counters, machine.memory_bytes()
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch

from marca import isa
from marca.config import MarcaConfig
from marca.formats import FloatFormat
from marca.isa import Buffer, ErrorCode, IllegalInstruction, LinearInit, NonlinearFunction
from marca.ops import Broadcast, ElementwiseOp

from . import fp, nonlinear, pe_array

__all__ = ["ProgramError", "RunResult", "Machine", "ReferenceMachine", "COUNTER_NAMES", "run_program",
           "memory_to_tensor", "pack_elements", "unpack_elements", "access_indices", "elementwise_op",
           "elementwise_values", "linear_values", "nonlinear_values"]

COUNTER_NAMES = (
    "instructions", "load_instructions", "store_instructions", "linear_instructions",
    "elementwise_instructions", "nonlinear_instructions", "barrier_instructions",
    "fetch_bytes", "dma_bytes_read", "dma_bytes_written",
    "linear_beats", "elementwise_beats", "nonlinear_lines", "nonlinear_beats",
)
"""The deterministic counters, as the hardware counts them (docs/isa.md, Counters)."""

_CLASS_COUNTER = {
    # A GATHER is a load whose rows are named by ids: it counts as one (docs/isa.md, Counters).
    isa.Opcode.LOAD: "load_instructions", isa.Opcode.GATHER: "load_instructions",
    isa.Opcode.STORE: "store_instructions",
    isa.Opcode.LINEAR: "linear_instructions", isa.Opcode.ELEMENTWISE: "elementwise_instructions",
    isa.Opcode.NONLINEAR: "nonlinear_instructions", isa.Opcode.BARRIER: "barrier_instructions",
}
_NONLINEAR_GOLDEN = {NonlinearFunction.EXP: nonlinear.exp, NonlinearFunction.SILU: nonlinear.silu,
                     NonlinearFunction.SOFTPLUS: nonlinear.softplus, NonlinearFunction.RSQRT: nonlinear.rsqrt}
_NONLINEAR_PROGRAM = {NonlinearFunction.EXP: nonlinear.exp_program,
                      NonlinearFunction.SILU: nonlinear.silu_program,
                      NonlinearFunction.SOFTPLUS: nonlinear.softplus_program,
                      NonlinearFunction.RSQRT: nonlinear.rsqrt_program}


class ProgramError(RuntimeError):
    """The program does something whose result the architecture leaves undefined (see module doc).
    ``kind`` is ``"barrier"``, ``"overlap"``, ``"undefined"`` or ``"runaway"``; ``pc`` the instruction."""

    def __init__(self, kind: str, message: str, pc: int | None = None):
        where = f" at pc {pc:#x}" if pc is not None else ""
        super().__init__(f"{kind}{where}: {message}")
        self.kind = kind
        self.pc = pc


@dataclass
class RunResult:
    """How a run ended: ``error`` (``NONE`` after HALT), ``error_pc`` (the faulting instruction's byte
    address, None without error), ``pc`` (address after the last instruction executed), the counters."""

    error: ErrorCode
    error_pc: int | None
    pc: int
    counters: dict[str, int]
    message: str = ""


def memory_to_tensor(memory) -> torch.Tensor:
    """A uint8 tensor copy of a memory image given as bytes, bytearray, numpy array or uint8 tensor."""
    if isinstance(memory, torch.Tensor):
        if memory.dtype != torch.uint8 or memory.dim() != 1:
            raise ValueError(f"memory must be a 1-D uint8 tensor, not {memory.dtype} {tuple(memory.shape)}")
        return memory.clone()
    if isinstance(memory, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(memory), dtype=torch.uint8) if len(memory) \
            else torch.zeros(0, dtype=torch.uint8)
    raise ValueError(f"memory must be bytes, bytearray or a uint8 tensor, not {type(memory).__name__}")


def pack_elements(bits, element_bytes: int) -> bytes:
    """Bit patterns (any shape, row-major) as little-endian ``element_bytes``-byte memory elements."""
    bits = torch.as_tensor(bits, dtype=torch.int64).flatten()
    shifts = 8 * torch.arange(element_bytes, dtype=torch.int64)
    return bytes(((bits[:, None] >> shifts) & 0xFF).to(torch.uint8).flatten().numpy().tobytes())


def unpack_elements(data, element_bytes: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_elements`: ``width``-bit patterns from little-endian elements."""
    raw = memory_to_tensor(bytes(data) if not isinstance(data, torch.Tensor) else data).to(torch.int64)
    raw = raw.reshape(-1, element_bytes) << (8 * torch.arange(element_bytes, dtype=torch.int64))
    return raw.sum(-1) & ((1 << width) - 1)


def access_indices(access: isa.BufferAccess) -> torch.Tensor:
    """Element addresses of ``access``, shaped ``[count_0, count_1, ..., extent]``."""
    index = torch.tensor(access.address, dtype=torch.int64)
    for count, stride in access.loops:
        index = index[..., None] + torch.arange(count, dtype=torch.int64) * stride
    return index[..., None] + torch.arange(access.extent, dtype=torch.int64)


PROGRESS_INTERVAL = 1 << 16
"""Instructions between two calls of a run's ``progress`` callback."""


class _Machine:
    """What both simulators share: the configuration and memory checks, the fetch-execute loop (each
    subclass fetches and executes in its own way: :meth:`_fetch`, :meth:`_step`) and the messages of the
    undefined-behaviour errors, which the two must raise identically."""

    def _checked_image(self, config: MarcaConfig, memory) -> torch.Tensor:
        if not isinstance(config, MarcaConfig):
            raise ValueError(f"config must be a MarcaConfig, not {config!r}")
        isa.check_config(config)
        image = memory_to_tensor(memory)
        if len(image) > 1 << config.axi_addr_width:
            raise ValueError(f"memory of {len(image)} bytes exceeds the {config.axi_addr_width}-bit "
                             f"address space")
        self.config = config
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.pc = None
        return image

    def run(self, program_address: int = 0, *, max_instructions: int = 1_000_000,
            progress=None) -> RunResult:
        """Fetch, check and execute from ``program_address`` until HALT or an error. ``progress``, if given,
        is called with the number of instructions executed so far every :data:`PROGRESS_INTERVAL`."""
        self.pc = program_address
        if program_address % isa.INSTRUCTION_BYTES:
            return RunResult(ErrorCode.MISALIGNED, program_address, program_address, dict(self.counters),
                             "program address is not a multiple of the instruction size")
        for count in range(max_instructions):
            if progress is not None and count and not count % PROGRESS_INTERVAL:
                progress(count)
            pc = self.pc
            if pc + isa.INSTRUCTION_BYTES > self.memory_size:
                return RunResult(ErrorCode.BUS_ERROR, pc, pc, dict(self.counters), "fetch beyond memory")
            instruction, fetched = self._fetch(pc)
            self.counters["fetch_bytes"] += isa.INSTRUCTION_BYTES
            if instruction is None:
                return RunResult(fetched.code, pc, pc, dict(self.counters), str(fetched))
            code = self._step(fetched, pc)
            if code != ErrorCode.NONE:
                return RunResult(code, pc, pc, dict(self.counters), f"{instruction.OPCODE.name}: {code.name}")
            self.pc = pc + isa.INSTRUCTION_BYTES
            if isinstance(instruction, isa.Halt):
                return RunResult(ErrorCode.NONE, None, self.pc, dict(self.counters))
        raise ProgramError("runaway", f"no HALT within {max_instructions} instructions", self.pc)

    def _fetch(self, pc: int) -> tuple:
        """``(instruction, what _step executes)``, or ``(None, IllegalInstruction)``."""
        raise NotImplementedError

    def _step(self, fetched, pc: int) -> ErrorCode:
        raise NotImplementedError

    def _word(self, pc: int) -> int:
        return int.from_bytes(self.memory[pc:pc + isa.INSTRUCTION_BYTES].cpu().numpy().tobytes(), "little")

    def read_elements(self, address: int, count: int, *, storage: bool = True) -> torch.Tensor:
        """``count`` contiguous elements at byte ``address`` (storage format by default) as bit patterns."""
        size = self.config.storage_bytes if storage else self.config.compute_bytes
        width = (self.config.storage_format if storage else self.config.compute_format).width
        return unpack_elements(self.memory_bytes()[address:address + count * size], size, width)

    @staticmethod
    def _barrier_error(stream, kind, buffer, other, other_kind, first, pc) -> ProgramError:
        return ProgramError("barrier", f"{stream} {kind} of {buffer.name} elements that an earlier {other} "
                            f"instruction {other_kind}s (first {first}) with no BARRIER between them", pc)

    @staticmethod
    def _undefined_error(name, buffer, first, pc) -> ProgramError:
        return ProgramError("undefined", f"{name} reads {buffer.name} element {first}, which nothing has "
                            "written", pc)


class ReferenceMachine(_Machine):
    """The architectural state (memory image, four buffers, counters) and the instruction semantics, on
    bit patterns through the golden unit models: the slow, obviously correct oracle that :class:`Machine`
    (the fast simulator everything else uses) is tested against bit for bit.

    Parameters
    ----------
    config : MarcaConfig
    memory : bytes, bytearray or 1-D uint8 tensor
        The memory image (copied); byte ``k`` is AXI address ``k``; accesses beyond it are BUS_ERROR.
    buffer_fill : int or None
        Bit pattern every buffer element holds at start (default: the compute format's canonical NaN);
        the hardware's buffers start undefined.
    check_hazards, check_undefined : bool
        Raise :class:`ProgramError` for missing barriers / reads of never-written buffer elements.
    """

    def __init__(self, config: MarcaConfig, memory, *, buffer_fill: int | None = None,
                 check_hazards: bool = True, check_undefined: bool = True):
        self.memory = self._checked_image(config, memory)
        fill = config.compute_format.canonical_nan if buffer_fill is None else buffer_fill
        self.buffers = {b: torch.full((isa.buffer_elements(config, b),), fill, dtype=torch.int64)
                        for b in Buffer}
        self.written = {b: torch.zeros(len(self.buffers[b]), dtype=torch.bool) for b in Buffer}
        self.check_hazards = check_hazards
        self.check_undefined = check_undefined
        self._clear_pending()

    @property
    def memory_size(self) -> int:
        return len(self.memory)

    # Memory helpers ------------------------------------------------------------------------------------

    def memory_bytes(self) -> bytes:
        return bytes(self.memory.numpy().tobytes())

    def _gather_memory(self, byte_addresses: torch.Tensor, size: int, width: int) -> torch.Tensor:
        index = byte_addresses[..., None] + torch.arange(size, dtype=torch.int64)
        data = self.memory[index].to(torch.int64)
        bits = (data << (8 * torch.arange(size, dtype=torch.int64))).sum(-1)
        return bits & ((1 << width) - 1)

    def _scatter_memory(self, byte_addresses: torch.Tensor, bits: torch.Tensor, size: int) -> None:
        index = byte_addresses[..., None] + torch.arange(size, dtype=torch.int64)
        data = (bits[..., None] >> (8 * torch.arange(size, dtype=torch.int64))) & 0xFF
        self.memory[index.flatten()] = data.flatten().to(torch.uint8)

    # Hazard bookkeeping ---------------------------------------------------------------------------------

    def _clear_pending(self):
        # Elements touched since the last barrier, per stream: {(stream, "read"|"write"): {buffer: mask}}.
        self._pending = {(stream, kind): {} for stream in ("dma", "compute") for kind in ("read", "write")}

    def _mask(self, buffer: Buffer, indices: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(len(self.buffers[buffer]), dtype=torch.bool)
        mask[indices.flatten()] = True
        return mask

    def _check_streams(self, stream: str, reads, writes, pc) -> None:
        """``reads``/``writes``: lists of (buffer, mask). Conflicts with the other stream since the last
        barrier raise ProgramError."""
        other = "compute" if stream == "dma" else "dma"
        if self.check_hazards:
            for kind, accesses in (("read", reads), ("write", writes)):
                against = ("write",) if kind == "read" else ("read", "write")
                for buffer, mask in accesses:
                    for other_kind in against:
                        pending = self._pending[(other, other_kind)].get(buffer)
                        if pending is not None and bool((pending & mask).any()):
                            first = int(torch.nonzero(pending & mask)[0])
                            raise self._barrier_error(stream, kind, buffer, other, other_kind, first, pc)
        for kind, accesses in (("read", reads), ("write", writes)):
            for buffer, mask in accesses:
                table = self._pending[(stream, kind)]
                table[buffer] = table[buffer] | mask if buffer in table else mask

    def _check_defined(self, buffer: Buffer, indices: torch.Tensor, name: str, pc) -> None:
        if self.check_undefined:
            defined = self.written[buffer][indices.flatten()]
            if not bool(defined.all()):
                first = int(indices.flatten()[~defined][0])
                raise self._undefined_error(name, buffer, first, pc)

    @staticmethod
    def _check_raw(reads, writes_flat: torch.Tensor, write_beats: torch.Tensor, buffer_of_write: Buffer,
                   size: int, pc) -> None:
        """Reads ``[(name, buffer, indices, beats)]``: none may read an element written by an earlier beat."""
        first_write = torch.full((size,), torch.iinfo(torch.int64).max, dtype=torch.int64)
        first_write.scatter_reduce_(0, writes_flat, write_beats, reduce="amin")
        for name, buffer, indices, beats in reads:
            if buffer != buffer_of_write:
                continue
            if bool((first_write[indices] < beats).any()):
                raise ProgramError("overlap", f"operand {name} reads {buffer.name} elements that an earlier "
                                   "beat of the same instruction wrote", pc)

    # Execution ---------------------------------------------------------------------------------------------

    def _fetch(self, pc: int) -> tuple:
        try:
            instruction = isa.decode(self._word(pc))
        except IllegalInstruction as error:
            return None, error
        return instruction, instruction

    def _step(self, instruction, pc: int) -> ErrorCode:
        return self.execute(instruction, pc=pc)

    def execute(self, instruction: isa.Instruction, *, pc: int | None = None) -> ErrorCode:
        """Check and execute one decoded instruction. Returns its error code (the state is unchanged
        unless NONE); raises ProgramError (state unchanged) for undefined behaviour."""
        code = isa.check_instruction(instruction, self.config)
        if code != ErrorCode.NONE:
            return code
        handler = {
            isa.Load: self._load, isa.Gather: self._gather, isa.Store: self._store, isa.Linear: self._linear,
            isa.Elementwise: self._elementwise, isa.Nonlinear: self._nonlinear,
            isa.Barrier: self._barrier, isa.Halt: self._barrier,
        }[type(instruction)]
        code = handler(instruction, pc)
        if code != ErrorCode.NONE:
            return code
        self.counters["instructions"] += 1
        counter = _CLASS_COUNTER.get(instruction.OPCODE)
        if counter:
            self.counters[counter] += 1
        return ErrorCode.NONE

    def _barrier(self, instruction, pc) -> ErrorCode:
        self._clear_pending()
        return ErrorCode.NONE

    def _dma_addresses(self, instruction) -> tuple[torch.Tensor, torch.Tensor]:
        i = instruction
        rows = torch.arange(i.row_count, dtype=torch.int64)[:, None]
        elements = torch.arange(i.row_elements, dtype=torch.int64)[None, :]
        element_bytes = isa.memory_element_bytes(i, self.config)
        memory = i.memory_address + rows * i.memory_row_stride + elements * element_bytes
        buffer = i.buffer_address + rows * i.buffer_row_stride + elements
        return memory, buffer

    def _load(self, i: isa.Load, pc) -> ErrorCode:
        first, last = isa.memory_access(i, self.config)
        if last >= len(self.memory):
            return ErrorCode.BUS_ERROR
        memory, buffer = self._dma_addresses(i)
        self._check_streams("dma", [], [(i.buffer, self._mask(i.buffer, buffer))], pc)
        size, fmt = self._memory_side(i)
        bits = self._gather_memory(memory, size, fmt.width)
        # Rows may overlap in the buffer (stride < row_elements): later rows win, as the DMA writes in order.
        values = fp.convert(bits, fmt, self.config.compute_format)
        _write_last_wins(self.buffers[i.buffer], buffer.flatten(), values.flatten())
        self.written[i.buffer][buffer.flatten()] = True
        self.counters["dma_bytes_read"] += i.row_count * i.row_elements * size
        return ErrorCode.NONE

    def _gather(self, i: isa.Gather, pc) -> ErrorCode:
        # The DMA takes rows in order: id r, its range check, then table row id[r]. The first row that
        # fails decides the error (id beyond memory: BUS_ERROR; id >= table_rows: INDEX_RANGE; table row
        # beyond memory: BUS_ERROR). On error the buffer is left as it was (the architecture: undefined).
        size, fmt = self._memory_side(i)
        rows = torch.arange(i.row_count, dtype=torch.int64)
        id_addresses = i.index_address + isa.INDEX_BYTES * rows
        id_readable = id_addresses + isa.INDEX_BYTES <= len(self.memory)
        ids = torch.zeros(i.row_count, dtype=torch.int64)
        if bool(id_readable.any()):
            ids[id_readable] = self._gather_memory(id_addresses[id_readable], isa.INDEX_BYTES,
                                                   8 * isa.INDEX_BYTES)
        in_table = id_readable & (ids < i.table_rows)
        ids = torch.where(in_table, ids, 0)           # (keeps id * stride far from int64 overflow)
        row_readable = i.memory_address + ids * i.memory_row_stride + i.row_elements * size <= len(self.memory)
        failure = torch.where(~id_readable, int(ErrorCode.BUS_ERROR),
                              torch.where(~in_table, int(ErrorCode.INDEX_RANGE),
                                          torch.where(~row_readable, int(ErrorCode.BUS_ERROR), 0)))
        failing = torch.nonzero(failure)
        if len(failing):
            return ErrorCode(int(failure[failing[0, 0]]))
        elements = torch.arange(i.row_elements, dtype=torch.int64)[None, :]
        memory = i.memory_address + ids[:, None] * i.memory_row_stride + elements * size
        buffer = i.buffer_address + rows[:, None] * i.buffer_row_stride + elements
        self._check_streams("dma", [], [(i.buffer, self._mask(i.buffer, buffer))], pc)
        values = fp.convert(self._gather_memory(memory, size, fmt.width), fmt, self.config.compute_format)
        _write_last_wins(self.buffers[i.buffer], buffer.flatten(), values.flatten())
        self.written[i.buffer][buffer.flatten()] = True
        self.counters["dma_bytes_read"] += i.row_count * (isa.INDEX_BYTES + i.row_elements * size)
        return ErrorCode.NONE

    def _memory_side(self, i) -> tuple[int, FloatFormat]:
        if i.memory_format == isa.MemoryFormat.COMPUTE:
            return self.config.compute_bytes, self.config.compute_format
        return self.config.storage_bytes, self.config.storage_format

    def _store(self, i: isa.Store, pc) -> ErrorCode:
        first, last = isa.memory_access(i, self.config)
        if last >= len(self.memory):
            return ErrorCode.BUS_ERROR
        memory, buffer = self._dma_addresses(i)
        self._check_defined(i.buffer, buffer, "STORE", pc)
        self._check_streams("dma", [(i.buffer, self._mask(i.buffer, buffer))], [], pc)
        size, fmt = self._memory_side(i)
        values = fp.convert(self.buffers[i.buffer][buffer], self.config.compute_format, fmt)
        # Later rows win where memory rows overlap: write row by row only in that (rare) case.
        flat_memory = memory.flatten()
        if len(torch.unique(flat_memory)) != len(flat_memory):
            for row in range(i.row_count):
                self._scatter_memory(memory[row], values[row], size)
        else:
            self._scatter_memory(flat_memory, values.flatten(), size)
        self.counters["dma_bytes_written"] += i.row_count * i.row_elements * size
        return ErrorCode.NONE

    def _linear(self, i: isa.Linear, pc) -> ErrorCode:
        R, C = self.config.array_rows, self.config.array_cols
        K, J, T = i.chunk_count, i.row_tile_count, i.token_count
        accesses = {a.name: a for a in isa.buffer_accesses(i, self.config)}
        matrix_index = access_indices(accesses["matrix"]).reshape(J, K, R, C)
        vector_index = access_indices(accesses["vector"])               # [T, K, C]
        output_index = access_indices(accesses["output"])               # [T, J, R]
        bias_index = access_indices(accesses["bias"]) if i.init == LinearInit.BIAS else None
        reads = [("matrix", i.matrix_buffer, matrix_index), ("vector", i.vector_buffer, vector_index)]
        if bias_index is not None:
            reads.append(("bias", i.bias_buffer, bias_index))
        for name, buffer, index in reads:
            self._check_defined(buffer, index, name, pc)
        # The output may overlap nothing it reads, except the bias element of the same (t, j, r) in place.
        out_flat = output_index.flatten()
        if len(torch.unique(out_flat)) != len(out_flat):
            raise ProgramError("overlap", "LINEAR writes an output element twice", pc)
        out_mask = self._mask(i.output_buffer, out_flat)
        for name, buffer, index in reads:
            if buffer != i.output_buffer:
                continue
            hit = out_mask[index]
            if name == "bias":
                hit = hit & (index != output_index)
            if bool(hit.any()):
                raise ProgramError("overlap", f"LINEAR output overlaps its {name} operand", pc)
        self._check_streams("compute", [(b, self._mask(b, x)) for _, b, x in reads],
                            [(i.output_buffer, out_mask)], pc)

        matrix = self.buffers[i.matrix_buffer][matrix_index]              # [J, K, R, C]
        vector = self.buffers[i.vector_buffer][vector_index]              # [T, K, C]
        fmt = self.config.compute_format
        products = fp.mul(matrix[None], vector[:, None, :, None, :], fmt)  # [T, J, K, R, C]
        sums = fp.tree_sum(products, fmt)                                  # [T, J, K, R]
        if bias_index is not None:
            acc = self.buffers[i.bias_buffer][bias_index].clone()         # [T, J, R]
        else:
            acc = torch.zeros((T, J, R), dtype=torch.int64)
        for chunk in range(K):
            acc = fp.add(acc, sums[:, :, chunk], fmt)
        self.buffers[i.output_buffer][out_flat] = acc.flatten()
        self.written[i.output_buffer][out_flat] = True
        self.counters["linear_beats"] += T * J * K
        return ErrorCode.NONE

    def _elementwise(self, i: isa.Elementwise, pc) -> ErrorCode:
        R, C = self.config.array_rows, self.config.array_cols
        lanes = R * C
        O, I = i.outer_count, i.inner_count
        beats = torch.arange(O * I, dtype=torch.int64).reshape(O, I, 1)
        accesses = {a.name: a for a in isa.buffer_accesses(i, self.config)}
        lane = torch.arange(lanes, dtype=torch.int64)
        lane_offset = {isa.Broadcast.LANE: lane, isa.Broadcast.ROW: lane // C,
                       isa.Broadcast.COLUMN: lane % C, isa.Broadcast.SCALAR: torch.zeros_like(lane)}
        reads, operands = [], {}
        for name in isa.operands_used(i.op):
            access = accesses[name]
            start = access_indices(access._replace(extent=1))   # [O, I, 1]
            index = start + lane_offset[getattr(i, f"{name}_broadcast")]      # [O, I, lanes]
            buffer = getattr(i, f"{name}_buffer")
            self._check_defined(buffer, index, name, pc)
            reads.append((name, buffer, index, beats.expand(O, I, lanes)))
            operands[name] = index
        dst_index = access_indices(accesses["dst"])                          # [O, I, lanes]
        size = len(self.buffers[i.dst_buffer])
        self._check_raw([(n, b, x.flatten(), t.flatten()) for n, b, x, t in reads], dst_index.flatten(),
                        beats.expand(O, I, lanes).flatten(), i.dst_buffer, size, pc)
        self._check_streams("compute", [(b, self._mask(b, x)) for _, b, x, _ in reads],
                            [(i.dst_buffer, self._mask(i.dst_buffer, dst_index))], pc)

        values = {name: self.buffers[getattr(i, f"{name}_buffer")][index] for name, index in operands.items()}
        result = elementwise_op(i.op, values, self.config.compute_format)
        _write_last_wins(self.buffers[i.dst_buffer], dst_index.flatten(), result.flatten())
        self.written[i.dst_buffer][dst_index.flatten()] = True
        self.counters["elementwise_beats"] += O * I
        return ErrorCode.NONE

    def _nonlinear(self, i: isa.Nonlinear, pc) -> ErrorCode:
        accesses = {a.name: a for a in isa.buffer_accesses(i, self.config)}
        src_index = access_indices(accesses["src"]).flatten()
        dst_index = access_indices(accesses["dst"]).flatten()
        if i.src_buffer == i.dst_buffer and i.src_address != i.dst_address:
            if bool(self._mask(i.dst_buffer, dst_index)[src_index].any()):
                raise ProgramError("overlap", "NONLINEAR source and destination overlap without being equal",
                                   pc)
        self._check_defined(i.src_buffer, src_index, "src", pc)
        self._check_streams("compute", [(i.src_buffer, self._mask(i.src_buffer, src_index))],
                            [(i.dst_buffer, self._mask(i.dst_buffer, dst_index))], pc)
        result = _NONLINEAR_GOLDEN[i.function](self.buffers[i.src_buffer][src_index], self.config)
        self.buffers[i.dst_buffer][dst_index] = result
        self.written[i.dst_buffer][dst_index] = True
        self.counters["nonlinear_lines"] += i.line_count
        self.counters["nonlinear_beats"] += i.line_count * len(_NONLINEAR_PROGRAM[i.function](self.config))
        return ErrorCode.NONE


# The fast machine ------------------------------------------------------------------------------------------
#
# Same semantics as ReferenceMachine (tests/test_iss_fast.py holds the two equal bit for bit on random and
# Mamba programs); what makes it fast (docs/iss.md):
# * buffers hold float32 *values* (fp.to_values), so arithmetic is native float32 for FP32 and float64 plus
#   one integer rounding for the other formats (the fp.value_* paths), never the bit-pattern oracle;
# * everything about an instruction that does not depend on the machine state (decoding, the config
#   checks, operand shapes and strides, in-instruction overlaps, which duplicate writes win) is computed
#   once per instruction and cached per configuration and device;
# * every operand is an affine view of its buffer (``as_strided``), never an index tensor;
# * the barrier and undefined-read checks are numpy views of per-element stamps and written flags: a
#   barrier bumps an epoch instead of clearing masks.

_PLAN_CACHE: dict = {}
_PLAN_CACHE_LIMIT = 20_000
_FETCH_CACHE_LIMIT = 100_000
"""Fetched plans kept per machine (by pc). A plan weighs a few KiB (its operands' views and checks), so a
model program of millions of straight-line instructions (mamba-130m on a 2x2 array) must not keep them
all: when full, the cache starts over."""


@functools.lru_cache(maxsize=1 << 16)
def _decode_word(word: int):
    """The decoded instruction, or the IllegalInstruction the decoder raises (cached per word)."""
    try:
        return isa.decode(word)
    except IllegalInstruction as error:
        return error


@functools.lru_cache(maxsize=64)
def _bit_reversal(width: int) -> tuple[int, ...]:
    """Column order that turns each level of the pairwise tree into "first half + second half": with
    columns stored at bit-reversed positions, the pair (2i, 2i+1) sits at (q, q + width/2)."""
    bits = width.bit_length() - 1
    return tuple(int(f"{c:0{bits}b}"[::-1], 2) if bits else 0 for c in range(width))


class _Access:
    """One affine operand: ``shape``/``strides`` in elements from element ``offset`` of a buffer."""

    __slots__ = ("buffer", "shape", "strides", "offset", "source", "dense", "numel", "last")

    def __init__(self, buffer: Buffer, shape, strides, offset: int, source: isa.BufferAccess):
        self.buffer, self.shape, self.strides = Buffer(buffer), tuple(shape), tuple(strides)
        self.offset = offset
        self.source = source
        self.numel = 1
        for size in self.shape:
            self.numel *= size
        self.dense = _is_dense(self.shape, self.strides)
        self.last = offset + sum((size - 1) * stride for size, stride in zip(self.shape, self.strides))

    @classmethod
    def of(cls, access: isa.BufferAccess) -> "_Access":
        shape = [count for count, _ in access.loops] + [access.extent]
        strides = [stride for _, stride in access.loops] + [1]
        return cls(access.buffer, shape, strides, access.address, access)

    def tensor(self, values: torch.Tensor) -> torch.Tensor:
        return values.as_strided(self.shape, self.strides, self.offset)

    def array(self, array: np.ndarray) -> np.ndarray:
        """The same view of a numpy array (flags, stamps): a slice when dense, else a strided view."""
        if self.dense:
            return array[self.offset:self.offset + self.numel]
        item = array.itemsize
        return np.ndarray(self.shape, array.dtype, array, self.offset * item,
                          tuple(s * item for s in self.strides))

    def indices(self) -> np.ndarray:
        """Element addresses in access order (for messages and the static overlap checks)."""
        return access_indices(self.source).flatten().numpy()

    @property
    def span(self) -> tuple[int, int]:
        return self.offset, self.source.last


def _is_dense(shape, strides) -> bool:
    """Whether the view covers a contiguous range with no element twice (row-major, innermost stride 1)."""
    expected = 1
    for size, stride in reversed(list(zip(shape, strides))):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _overlaps(read: _Access, written: np.ndarray) -> np.ndarray:
    """Per element of ``read`` (access order): whether the element is in the set ``written``."""
    return np.isin(read.indices(), written)


def _last_wins(index: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """For writes to ``index`` in order: (targets, positions) of the surviving writes, or None when no
    element is written twice."""
    reversed_index = index[::-1]
    unique, first_from_end = np.unique(reversed_index, return_index=True)
    if len(unique) == len(index):
        return None
    return unique, len(index) - 1 - first_from_end


class _Plan:
    """What an instruction does, independent of the machine state."""

    __slots__ = ("instruction", "code", "handler", "access", "error", "extra", "counter", "halts")

    def __init__(self, instruction, code, handler):
        self.instruction, self.code, self.handler = instruction, code, handler
        self.counter = _CLASS_COUNTER.get(instruction.OPCODE)
        self.halts = isinstance(instruction, isa.Halt)
        self.access: dict[str, _Access] = {}
        self.error: tuple[str, str] | None = None  # (kind, message): undefined behaviour seen statically
        self.extra: dict = {}


class Machine(_Machine):
    """The golden ISS, fast: the semantics of :class:`ReferenceMachine`, vectorized on float32 values,
    on CPU or a CUDA device.

    Parameters
    ----------
    config : MarcaConfig
    memory : bytes, bytearray or 1-D uint8 tensor
        The memory image (copied); byte ``k`` is AXI address ``k``; accesses beyond it are BUS_ERROR.
    buffer_fill : int or None
        Bit pattern every buffer element holds at start (default: the compute format's canonical NaN).
    check_hazards, check_undefined : bool
        Raise :class:`ProgramError` for missing barriers / reads of never-written buffer elements.
    device : str or torch.device
        Where the memory image, the buffers and the arithmetic live ("cpu", "cuda", ...).
    """

    def __init__(self, config: MarcaConfig, memory, *, buffer_fill: int | None = None,
                 check_hazards: bool = True, check_undefined: bool = True, device="cpu"):
        image = self._checked_image(config, memory)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must name a torch device, not {device!r}") from None
        fmt = config.compute_format
        if fmt.exp_bits == 8 and fmt.man_bits == 23 and not fp.subnormals_are_kept(self.device):
            raise RuntimeError("float32 arithmetic flushes subnormals in this process (FTZ/DAZ set, e.g. by "
                               "torch.set_flush_denormal(True)); the FP32 fast path needs IEEE gradual "
                               "underflow")
        self.memory_size = len(image)
        padded = torch.zeros(-(-max(len(image), 1) // 8) * 8, dtype=torch.uint8)
        padded[:len(image)] = image
        self.memory = padded.to(self.device)
        fill = config.compute_format.canonical_nan if buffer_fill is None else buffer_fill
        self._fill_value = float(fp.to_values(torch.tensor([fill]), fmt)[0])
        self.values = {b: torch.empty((isa.buffer_elements(config, b),), dtype=torch.float32,
                                      device=self.device) for b in Buffer}
        # Written flags, one byte per element: numpy views for strided accesses, bytearray.find for dense
        # ones.
        self._written_bytes = {b: bytearray(isa.buffer_elements(config, b)) for b in Buffer}
        self.written = {b: np.frombuffer(self._written_bytes[b], dtype=bool) for b in Buffer}
        self.check_hazards = check_hazards
        self.check_undefined = check_undefined
        self._memory_host = self.memory.numpy() if self.device.type == "cpu" else None
        # Element-wise arithmetic on numpy views of the buffers (FP32 on the CPU; fp._xp).
        self._host_arithmetic = self.device.type == "cpu" and fp._is_fp32(fmt)
        key = (config, str(self.device))
        self._plans = _PLAN_CACHE.setdefault(key, {})
        self._fetched: dict[int, object] = {}
        self._views: dict = {}              # _Access -> its view of self.values (updated in place)
        self._fetched_span = [None, None]
        self.restart()

    def restart(self, *, keep_buffers: bool = False) -> None:
        """The state at a program's start: buffers filled, written flags and barrier bookkeeping cleared,
        counters zero. The memory image stays, and so do the cached plans (a host that keeps one machine
        for a sequence of programs, :class:`marca.compiler.model.ModelSession`, plans each instruction
        once); a run after ``restart()`` is the run of a new machine on the same image (the hardware after
        a reset).

        ``keep_buffers``: the next program starts where the last one stopped, without a reset (the ISA:
        buffers keep their contents from one program to the next): the buffers and their written flags
        stay, so the next program may read what earlier ones left (resident weights); barrier bookkeeping
        and counters start afresh (HALT waited for both streams)."""
        for buffer, values in () if keep_buffers else self.values.items():
            values.fill_(self._fill_value)          # in place: the cached views stay valid
            self._written_bytes[buffer][:] = bytes(len(self._written_bytes[buffer]))
        # Barrier bookkeeping: stamps[(stream, kind)][buffer][e] is the epoch in which the stream last
        # touched element e that way; a barrier starts a new epoch. Arrays are made on first touch.
        self._epoch = 0
        self._stamps = {(stream, kind): {} for stream in ("dma", "compute") for kind in ("read", "write")}
        # Per (stream, kind, buffer): [epoch, first, last] of the elements touched in that epoch, so that
        # most checks are settled without looking at the stamps (disjoint spans cannot conflict).
        self._spans: dict = {}
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.pc = None

    def read_memory(self, address: int, size: int) -> bytes:
        """``size`` bytes of the memory image from ``address`` (the host reading over the bus)."""
        self._check_host_range(address, size)
        return bytes(self.memory[address:address + size].cpu().numpy().tobytes())

    def write_memory(self, address: int, data) -> None:
        """The host writing ``data`` into the memory image at ``address``; fetched code it overwrites is
        fetched again."""
        data = bytes(data)
        self._check_host_range(address, len(data))
        if data:
            self.memory[address:address + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) \
                .to(self.device)
            self._forget_fetched(address, address + len(data) - 1)

    def _check_host_range(self, address: int, size: int) -> None:
        if address < 0 or size < 0 or address + size > self.memory_size:
            raise ValueError(f"bytes {address}..{address + size} are outside the memory image of "
                             f"{self.memory_size} bytes")

    def _forget_fetched(self, first: int, last: int) -> None:
        """Drop the fetched plans of instructions that overlap bytes ``first..last``."""
        low, high = self._fetched_span
        if low is not None and first < high and last >= low:
            self._fetched = {pc_: entry for pc_, entry in self._fetched.items()
                             if pc_ + isa.INSTRUCTION_BYTES <= first or pc_ > last}

    # State in the reference representation ---------------------------------------------------------------

    def memory_bytes(self) -> bytes:
        return bytes(self.memory[:self.memory_size].cpu().numpy().tobytes())

    def buffer_bits(self, buffer: Buffer) -> torch.Tensor:
        """A buffer's contents as compute-format bit patterns (int64, on the CPU)."""
        return fp.from_values(self.values[Buffer(buffer)].cpu(), self.config.compute_format)

    def _memory_elements(self, size: int) -> torch.Tensor:
        return self.memory.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[size])

    # Checks ---------------------------------------------------------------------------------------------

    def _check_streams(self, stream: str, reads, writes, pc) -> None:
        """As ReferenceMachine._check_streams, on accesses: conflicts with the other stream since the last
        barrier raise ProgramError; then the accesses are recorded.

        Per (stream, kind, buffer) the machine keeps ``[epoch, first, last, pending]``: the span of the
        elements touched in that epoch and the accesses not yet stamped. An access outside the other
        stream's span cannot conflict (the usual case: no numpy at all); one inside it stamps the pending
        accesses and compares stamps element by element."""
        other = "compute" if stream == "dma" else "dma"
        epoch = self._epoch
        spans = self._spans
        if self.check_hazards:
            for kind, accesses in (("read", reads), ("write", writes)):
                against = ("write",) if kind == "read" else ("read", "write")
                for access in accesses:
                    first, last = access.offset, access.last
                    for other_kind in against:
                        span = spans.get((other, other_kind, access.buffer))
                        if span is None or span[0] != epoch or span[1] > last or span[2] < first:
                            continue
                        stamps = self._stamped(other, other_kind, access.buffer)
                        if bool((access.array(stamps) == epoch).any()):
                            index = access.indices()
                            first = int(index[stamps[index] == epoch].min())
                            raise self._barrier_error(stream, kind, access.buffer, other, other_kind, first,
                                                      pc)
        for kind, accesses in (("read", reads), ("write", writes)):
            for access in accesses:
                key = (stream, kind, access.buffer)
                span = spans.get(key)
                if span is None or span[0] != epoch:
                    spans[key] = [epoch, access.offset, access.last, [access]]
                else:
                    span[1], span[2] = min(span[1], access.offset), max(span[2], access.last)
                    span[3].append(access)

    def _stamped(self, stream: str, kind: str, buffer: Buffer) -> np.ndarray:
        """The stamps of (stream, kind) on ``buffer``, with the pending accesses of the epoch stamped."""
        table = self._stamps[(stream, kind)]
        stamps = table.get(buffer)
        if stamps is None:
            stamps = table[buffer] = np.full(len(self.written[buffer]), -1, np.int32)
        span = self._spans.get((stream, kind, buffer))
        if span is not None:
            for access in span[3]:
                access.array(stamps)[...] = span[0]
            span[3].clear()
        return stamps

    def _check_defined(self, access: _Access, name: str, pc) -> None:
        if self.check_undefined:
            written = self.written[access.buffer]
            if access.dense:
                end = access.offset + access.numel
                defined = self._written_bytes[access.buffer].find(0, access.offset, end) < 0
            else:
                defined = bool(access.array(written).all())
            if not defined:
                index = access.indices()
                first = int(index[~written[index]][0])
                raise self._undefined_error(name, access.buffer, first, pc)

    def _view(self, access: _Access) -> torch.Tensor:
        """``access``'s view of its buffer, made once per machine (as_strided costs more than the small
        instructions' arithmetic)."""
        view = self._views.get(access)
        if view is None:
            if len(self._views) >= _PLAN_CACHE_LIMIT:
                self._views.clear()
            view = self._views[access] = access.tensor(self.values[access.buffer])
        return view

    def _write(self, access: _Access, values: torch.Tensor, survivors) -> None:
        """``values`` (access shape) into the buffer; where the access names an element twice the last
        write wins (``survivors``: precomputed targets and positions)."""
        target = self.values[access.buffer]
        if survivors is None:
            self._view(access).copy_(values if values.shape == access.shape else values.reshape(access.shape))
        else:
            elements, positions = survivors
            target[elements.to(target.device)] = values.reshape(-1)[positions.to(target.device)]
        access.array(self.written[access.buffer])[...] = True

    # Execution ------------------------------------------------------------------------------------------

    def _fetch(self, pc: int) -> tuple:
        """The plan of the instruction at ``pc``, cached per pc (a STORE over fetched code drops entries)."""
        plan = self._fetched.get(pc)
        if plan is None:
            host = self._memory_host
            word = int.from_bytes(host[pc:pc + isa.INSTRUCTION_BYTES].tobytes(), "little") \
                if host is not None else self._word(pc)
            decoded = _decode_word(word)
            if len(self._fetched) >= _FETCH_CACHE_LIMIT:
                self._fetched.clear()
                self._fetched_span = [None, None]
            plan = self._fetched[pc] = decoded if isinstance(decoded, IllegalInstruction) \
                else self._plan(decoded)
            low, high = self._fetched_span
            self._fetched_span = [pc if low is None else min(low, pc),
                                  pc + isa.INSTRUCTION_BYTES if high is None
                                  else max(high, pc + isa.INSTRUCTION_BYTES)]
        if isinstance(plan, IllegalInstruction):
            return None, plan
        return plan.instruction, plan

    def _step(self, plan: "_Plan", pc: int) -> ErrorCode:
        return self._execute(plan, pc)

    def execute(self, instruction: isa.Instruction, *, pc: int | None = None) -> ErrorCode:
        """Check and execute one decoded instruction. Returns its error code (the state is unchanged
        unless NONE); raises ProgramError (state unchanged) for undefined behaviour."""
        return self._execute(self._plan(instruction), pc)

    def _plan(self, instruction: isa.Instruction) -> "_Plan":
        plan = self._plans.get(instruction)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_LIMIT:
                self._plans.clear()
            plan = self._plans[instruction] = _make_plan(instruction, self.config)
        return plan

    def _execute(self, plan: "_Plan", pc) -> ErrorCode:
        if plan.handler is None:
            return self._reference_step(plan.instruction, pc)
        if plan.code != ErrorCode.NONE:
            return plan.code
        code = plan.handler(self, plan, pc)
        if code != ErrorCode.NONE:
            return code
        self.counters["instructions"] += 1
        if plan.counter:
            self.counters[plan.counter] += 1
        return ErrorCode.NONE

    def _reference_step(self, instruction, pc) -> ErrorCode:
        """An instruction class without a fast handler runs on a ReferenceMachine holding this state."""
        reference = ReferenceMachine(self.config, bytes(1), check_hazards=self.check_hazards,
                                     check_undefined=self.check_undefined)
        reference.memory = self.memory[:self.memory_size].cpu().clone()
        reference.buffers = {b: self.buffer_bits(b) for b in Buffer}
        reference.written = {b: torch.from_numpy(self.written[b].copy()) for b in Buffer}
        reference.counters = dict(self.counters)
        for stream, kind, buffer in list(self._spans):
            self._stamped(stream, kind, buffer)
        for key, table in self._stamps.items():
            reference._pending[key] = {b: torch.from_numpy(stamps == self._epoch)
                                       for b, stamps in table.items()}
        code = reference.execute(instruction, pc=pc)
        if code == ErrorCode.NONE:
            self.memory[:self.memory_size] = reference.memory.to(self.device)
            self._fetched.clear()
            fmt = self.config.compute_format
            for b in Buffer:
                self.values[b] = fp.to_values(reference.buffers[b], fmt).to(self.device)
                self.written[b][...] = reference.written[b].numpy()
            self._views.clear()
            self.counters = reference.counters
            for key, table in reference._pending.items():
                for b, mask in table.items():
                    stamps = self._stamped(*key, b)
                    touched = np.flatnonzero(mask.numpy())
                    stamps[touched] = self._epoch
                    if len(touched):
                        self._spans[key + (b,)] = [self._epoch, int(touched[0]), int(touched[-1]), []]
        return code

    # Handlers: one per instruction class, each given the instruction's plan ---------------------------

    def _barrier(self, plan, pc) -> ErrorCode:
        self._epoch += 1
        return ErrorCode.NONE

    def _load(self, plan: _Plan, pc) -> ErrorCode:
        i, extra = plan.instruction, plan.extra
        if extra["memory_last"] >= self.memory_size:
            return ErrorCode.BUS_ERROR
        access = plan.access["buffer"]
        self._check_streams("dma", [], [access], pc)
        bits = extra["memory"].tensor(self._memory_elements(extra["size"]))
        values = self._memory_values(bits, extra)
        self._write(access, values, extra["survivors"])
        self.counters["dma_bytes_read"] += i.row_count * i.row_elements * extra["size"]
        return ErrorCode.NONE

    def _gather(self, plan: _Plan, pc) -> ErrorCode:
        # As ReferenceMachine._gather: rows in order, the first failing row decides the error (id beyond
        # memory: BUS_ERROR; id >= table_rows: INDEX_RANGE; table row beyond memory: BUS_ERROR), and on
        # error the buffer is left as it was. The ids are a few bytes: read and checked on the host.
        i, extra = plan.instruction, plan.extra
        size = extra["size"]
        rows = i.row_count
        readable = min(rows, max(0, (self.memory_size - i.index_address) // isa.INDEX_BYTES))
        ids = np.zeros(rows, dtype=np.int64)
        if readable:
            start = i.index_address
            ids[:readable] = self.memory[start:start + isa.INDEX_BYTES * readable].cpu().numpy().view("<u4")
        code = _gather_failure(i, ids, readable, size, self.memory_size)
        if code != ErrorCode.NONE:
            return code
        access = plan.access["buffer"]
        self._check_streams("dma", [], [access], pc)
        elements = self._memory_elements(size)
        index = torch.from_numpy((i.memory_address + ids * i.memory_row_stride) // size)[:, None] \
            + extra["row"]
        bits = elements[index.to(self.device)]
        values = self._memory_values(bits, extra)
        self._write(access, values, extra["survivors"])
        self.counters["dma_bytes_read"] += rows * (isa.INDEX_BYTES + i.row_elements * size)
        return ErrorCode.NONE

    def _memory_values(self, bits: torch.Tensor, extra: dict) -> torch.Tensor:
        """Memory elements (the signed int8/16/32 view) read in their format and converted to the compute
        format, as values. Elements of at most 16 bits are looked up in a table of that very conversion at
        every pattern (numpy on the CPU: one gather instead of a dozen torch operations)."""
        size = extra["size"]
        if size > 2:
            return fp.value_convert(fp.to_values(bits, extra["format"]), self.config.compute_format)
        table = _conversion_table(extra["format"], self.config.compute_format, size, str(self.device))
        if self.device.type == "cpu":
            return torch.from_numpy(table[bits.numpy().view(np.uint8 if size == 1 else np.uint16)])
        return table[bits.to(torch.int64) & ((1 << (8 * size)) - 1)]

    def _store(self, plan: _Plan, pc) -> ErrorCode:
        i, extra = plan.instruction, plan.extra
        if extra["memory_last"] >= self.memory_size:
            return ErrorCode.BUS_ERROR
        access = plan.access["buffer"]
        self._check_defined(access, "STORE", pc)
        self._check_streams("dma", [access], [], pc)
        size, fmt = extra["size"], extra["format"]
        elements = self._memory_elements(size)
        if self._memory_host is not None:
            bits = fp.value_bits(self._view(access).numpy(), fmt)
            bits = torch.from_numpy(bits.astype({1: np.uint8, 2: np.uint16, 4: np.uint32}[size])
                                    .view({1: np.uint8, 2: np.int16, 4: np.int32}[size]))
        else:
            bits = fp.value_bits(self._view(access), fmt)
            bits = (bits - ((bits >> (8 * size - 1)) << (8 * size))).to(elements.dtype)  # signed range
        survivors = extra["survivors"]
        if survivors is None:
            extra["memory"].tensor(elements).copy_(bits)
        else:
            targets, positions = survivors
            elements[targets.to(self.device)] = bits.reshape(-1)[positions.to(self.device)]
        self._forget_fetched(extra["memory_first"], extra["memory_last"])    # the program overwrote code
        self.counters["dma_bytes_written"] += i.row_count * i.row_elements * size
        return ErrorCode.NONE

    def _linear(self, plan: _Plan, pc) -> ErrorCode:
        i, access = plan.instruction, plan.access
        reads = [access[name] for name in ("matrix", "vector", "bias") if name in access]
        for name, read in zip(("matrix", "vector", "bias"), reads):
            self._check_defined(read, name, pc)
        if plan.error is not None:
            raise ProgramError(*plan.error, pc)
        self._check_streams("compute", reads, [access["output"]], pc)
        R, C = self.config.array_rows, self.config.array_cols
        K, J, T = i.chunk_count, i.row_tile_count, i.token_count
        matrix = self._view(access["matrix"]).reshape(J, K, R, C)
        vector = self._view(access["vector"])                                          # [T, K, C]
        bias = self._view(access["bias"]) if "bias" in access else None
        out = linear_values(matrix, vector, bias, self.config.compute_format)
        self._write(access["output"], out, None)
        self.counters["linear_beats"] += T * J * K
        return ErrorCode.NONE

    def _elementwise(self, plan: _Plan, pc) -> ErrorCode:
        i, access = plan.instruction, plan.access
        names = plan.extra["names"]
        for name in names:
            self._check_defined(access[name], name, pc)
        if plan.error is not None:
            raise ProgramError(*plan.error, pc)
        self._check_streams("compute", [access[name] for name in names], [access["dst"]], pc)
        lanes = plan.extra["lanes"]
        operands = {name: self._view(lanes[name]) for name in names}
        if self._host_arithmetic:
            operands = {name: view.numpy() for name, view in operands.items()}
            with _quiet():
                result = torch.from_numpy(plan.extra["compute"](operands, self.config.compute_format))
        else:
            result = plan.extra["compute"](operands, self.config.compute_format)
        self._write(plan.extra["dst"], result, plan.extra["survivors"])
        self.counters["elementwise_beats"] += i.outer_count * i.inner_count
        return ErrorCode.NONE

    def _nonlinear(self, plan: _Plan, pc) -> ErrorCode:
        i, access = plan.instruction, plan.access
        if plan.error is not None:
            raise ProgramError(*plan.error, pc)
        self._check_defined(access["src"], "src", pc)
        self._check_streams("compute", [access["src"]], [access["dst"]], pc)
        source = self._view(access["src"]).reshape(-1)
        result = nonlinear_values(i.function, source, self.config)
        self._write(access["dst"], result, None)
        self.counters["nonlinear_lines"] += i.line_count
        self.counters["nonlinear_beats"] += i.line_count * plan.extra["passes"]
        return ErrorCode.NONE


def _make_plan(instruction: isa.Instruction, config: MarcaConfig) -> _Plan:
    """Everything about ``instruction`` that does not depend on the machine state."""
    maker = _PLAN_MAKERS.get(type(instruction))
    if maker is None:
        return _Plan(instruction, ErrorCode.NONE, None)
    code = isa.check_instruction(instruction, config)
    handler = getattr(Machine, maker[1])
    plan = _Plan(instruction, code, handler)
    if code == ErrorCode.NONE:
        for access in isa.buffer_accesses(instruction, config):
            plan.access[access.name] = _Access.of(access)
        maker[0](plan, config)
    return plan


def _gather_failure(i: isa.Gather, ids: np.ndarray, readable: int, size: int, memory_size: int) -> ErrorCode:
    """The error of the first failing GATHER row, in row order (NONE when every row is good): row r fails
    with BUS_ERROR when its id lies beyond memory (r >= ``readable``), INDEX_RANGE when the id is not
    below ``table_rows``, BUS_ERROR when the table row it names ends beyond memory."""
    rows = len(ids)
    in_table = ids < i.table_rows
    row_end = i.memory_address + np.where(in_table, ids, 0) * i.memory_row_stride + i.row_elements * size
    failing = np.flatnonzero(~in_table | (row_end > memory_size))
    first = min(readable, int(failing[0]) if len(failing) else rows)
    if first == rows:
        return ErrorCode.NONE
    if first == readable or in_table[first]:
        return ErrorCode.BUS_ERROR
    return ErrorCode.INDEX_RANGE


def _plan_nothing(plan: _Plan, config: MarcaConfig) -> None:
    pass


def _plan_dma(plan: _Plan, config: MarcaConfig) -> None:
    i = plan.instruction
    if i.memory_format == isa.MemoryFormat.COMPUTE:
        size, fmt = config.compute_bytes, config.compute_format
    else:
        size, fmt = config.storage_bytes, config.storage_format
    first, last = isa.memory_access(i, config)
    memory = _Access(Buffer.WEIGHT, (i.row_count, i.row_elements), (i.memory_row_stride // size, 1),
                     i.memory_address // size, None)
    plan.extra.update(size=size, format=fmt, memory_first=first, memory_last=last, memory=memory)
    access = plan.access["buffer"]
    if isinstance(i, (isa.Load, isa.Gather)):      # rows may overlap in the buffer: later rows win
        plan.extra["survivors"] = None if access.dense else _tensor_survivors(_last_wins(access.indices()))
        if isinstance(i, isa.Gather):
            plan.extra["row"] = torch.arange(i.row_elements, dtype=torch.int64)[None, :]
    else:                            # rows may overlap in memory: later rows win
        index = (memory.offset + np.arange(i.row_count)[:, None] * memory.strides[0]
                 + np.arange(i.row_elements)[None, :]).reshape(-1)
        plan.extra["survivors"] = None if memory.dense or i.row_count == 1 \
            else _tensor_survivors(_last_wins(index))


def _tensor_survivors(survivors):
    if survivors is None:
        return None
    elements, positions = survivors
    return torch.from_numpy(elements.astype(np.int64)), torch.from_numpy(positions.astype(np.int64))


def _plan_linear(plan: _Plan, config: MarcaConfig) -> None:
    i, access = plan.instruction, plan.access
    output = access["output"]
    out_index = output.indices()
    if len(np.unique(out_index)) != len(out_index):
        plan.error = ("overlap", "LINEAR writes an output element twice")
        return
    for name in ("matrix", "vector", "bias"):
        read = access.get(name)
        if read is None or read.buffer != output.buffer:
            continue
        if read.dense:
            low, high = read.span
            hit = bool(((out_index >= low) & (out_index <= high)).any()) if name != "bias" else None
        else:
            hit = None
        if hit is None:
            hits = _overlaps(read, out_index)
            if name == "bias":
                hits &= read.indices() != out_index
            hit = bool(hits.any())
        if hit:
            plan.error = ("overlap", f"LINEAR output overlaps its {name} operand")
            return


def _plan_elementwise(plan: _Plan, config: MarcaConfig) -> None:
    i, access = plan.instruction, plan.access
    R, C = config.array_rows, config.array_cols
    O, I = i.outer_count, i.inner_count
    lane_strides = {Broadcast.LANE: (C, 1), Broadcast.ROW: (1, 0), Broadcast.COLUMN: (0, 1),
                    Broadcast.SCALAR: (0, 0)}
    lanes = {}
    for name in isa.operands_used(i.op):
        read = access[name]
        broadcast = getattr(i, f"{name}_broadcast")
        lanes[name] = _Access(read.buffer, (O, I, R, C), read.strides[:2] + lane_strides[broadcast],
                              read.offset, read.source)
    plan.extra["lanes"] = lanes
    plan.extra["names"] = isa.operands_used(i.op)
    op = ElementwiseOp(i.op)
    plan.extra["compute"] = lambda operands, fmt: elementwise_values(op, operands, fmt)
    dst = access["dst"]
    dst_index = dst.indices()
    # A beat may not read what an earlier beat of the same instruction wrote.
    unique, first = np.unique(dst_index, return_index=True)
    first_beat = first // config.lanes
    beat_of = np.arange(O * I)
    for name, read in ((n, lanes[n]) for n in isa.operands_used(i.op)):
        if read.buffer != dst.buffer:
            continue
        index = _Access.of(read.source).indices().reshape(O * I, -1)
        where = np.searchsorted(unique, index).clip(0, len(unique) - 1)
        written_earlier = (unique[where] == index) & (first_beat[where] < beat_of[:, None])
        if bool(written_earlier.any()):
            plan.error = ("overlap", f"operand {name} reads {read.buffer.name} elements that an earlier beat "
                          "of the same instruction wrote")
            break
    plan.extra["survivors"] = None if dst.dense else _tensor_survivors(_last_wins(dst_index))
    # The destination shaped like the result ([O, I, R, C]): written without a reshape.
    plan.extra["dst"] = _Access(dst.buffer, (O, I, R, C), dst.strides[:2] + (C, 1), dst.offset, dst.source)


def _plan_nonlinear(plan: _Plan, config: MarcaConfig) -> None:
    i = plan.instruction
    lines = i.line_count * config.lanes
    if i.src_buffer == i.dst_buffer and i.src_address != i.dst_address \
            and i.src_address < i.dst_address + lines and i.dst_address < i.src_address + lines:
        plan.error = ("overlap", "NONLINEAR source and destination overlap without being equal")
    plan.extra["passes"] = len(_NONLINEAR_PROGRAM[i.function](config).passes)


_PLAN_MAKERS = {
    isa.Load: (_plan_dma, "_load"), isa.Gather: (_plan_dma, "_gather"), isa.Store: (_plan_dma, "_store"),
    isa.Linear: (_plan_linear, "_linear"),
    isa.Elementwise: (_plan_elementwise, "_elementwise"), isa.Nonlinear: (_plan_nonlinear, "_nonlinear"),
    isa.Barrier: (_plan_nothing, "_barrier"), isa.Halt: (_plan_nothing, "_barrier"),
}
"""Instruction class -> (plan maker, handler name). A class missing here runs on the reference machine."""


# Arithmetic on values --------------------------------------------------------------------------------

_SAFE_MAGNITUDE = 2.0 ** -50
_LINEAR_BLOCK = 1 << 20          # products per torch block on the CPU (cache-sized)
_DEVICE_LINEAR_BLOCK = 1 << 25   # on a device: a whole `paper` GEMM (48 x 24 x 1024 x 16 = 18.9 M)
_LINEAR_SMALL = 1 << 22      # products up to which a plain FP32 LINEAR runs in numpy (_linear_plain_small)


def _quiet():
    """numpy paths: overflow to Inf and NaN are results here, not faults (one errstate per use)."""
    return np.errstate(all="ignore")


def _no_tiny(values: torch.Tensor) -> bool:
    """No nonzero magnitude below 2^-50. Then every product of two such FP32 values is 0 or at least
    2^-100, so every product, tree sum and accumulator value is a multiple of 2^-123 (sums of multiples
    stay multiples, and rounding keeps them), never a subnormal: IEEE float32 needs no flush anywhere."""
    return not fp._any_small(values, _SAFE_MAGNITUDE, inclusive=False)


def linear_values(matrix: torch.Tensor, vector: torch.Tensor, bias, fmt: FloatFormat) -> torch.Tensor:
    """``out[t, j, r]``: for chunks k in order, ``acc = add(acc, tree_c(mul(matrix[j, k, r, c],
    vector[t, k, c])))`` from ``bias[t, j, r]`` (or +0), on values (``matrix [J, K, R, C]``,
    ``vector [T, K, C]``).

    On the CPU: FP32 operands with no tiny magnitudes (:func:`_no_tiny`) skip the flush checks, which then
    cannot fire (numpy for small instructions, blocked torch for large ones); everything else takes the
    compiled rounded loop. On a device: blocked torch with the contract's value operations."""
    T, (J, K, R, C) = vector.shape[0], matrix.shape
    native = fmt.exp_bits == 8 and fmt.man_bits == 23
    if matrix.device.type != "cpu":
        return _linear_blocked(matrix, vector, bias, fmt, plain=False, block=_DEVICE_LINEAR_BLOCK)
    plain = native and _no_tiny(matrix) and _no_tiny(vector) and (bias is None or _no_tiny(bias))
    if not plain:
        return _linear_rounded(matrix, vector, bias, fmt)
    if T * J * K * R * C <= _LINEAR_SMALL:
        return _linear_plain_small(matrix, vector, bias)
    return _linear_blocked(matrix, vector, bias, fmt, plain=True, block=_LINEAR_BLOCK)


def _linear_blocked(matrix: torch.Tensor, vector: torch.Tensor, bias, fmt: FloatFormat, *, plain: bool,
                    block: int) -> torch.Tensor:
    """linear_values as torch operations on blocks of at most ``block`` products (whole row tiles of the
    matrix, then tokens): columns taken in bit-reversed order so each tree level adds two contiguous
    halves, then the chunks accumulated in order. ``plain``: float32's own ``*`` and ``+`` (FP32 data that
    passed :func:`_no_tiny`); else the contract's value operations (flush, rounding to ``fmt``). The block
    only bounds memory: every output is computed whole inside one block, so any block size gives the same
    bits. On a device, one torch call launches kernels whose fixed cost dominates small tensors: the
    device block (:data:`_DEVICE_LINEAR_BLOCK`) takes a whole instruction at once."""
    J, K, R, C = matrix.shape
    T = vector.shape[0]
    order = torch.tensor(_bit_reversal(C), device=matrix.device)
    matrix, vector = matrix[..., order], vector[..., order]
    if plain:
        mul, add = torch.mul, torch.add
    else:
        def mul(a, b):
            return fp.value_mul(a, b, fmt)

        def add(a, b):
            return fp.value_add(a, b, fmt)
    out = torch.empty((T, J, R), dtype=torch.float32, device=matrix.device)
    tile = K * R * C
    j_block = max(1, min(J, block // tile))
    t_block = max(1, block // (tile * j_block))
    for j0 in range(0, J, j_block):
        tiles = matrix[j0:j0 + j_block]
        for t0 in range(0, T, t_block):
            x = mul(tiles[None], vector[t0:t0 + t_block, None, :, None, :])     # [t, j, K, R, C]
            while x.shape[-1] > 1:
                half = x.shape[-1] // 2
                x = add(x[..., :half], x[..., half:])
            sums = x[..., 0]                                                    # [t, j, K, R]
            acc = bias[t0:t0 + t_block, j0:j0 + j_block] if bias is not None \
                else torch.zeros(sums.shape[:2] + (R,), dtype=torch.float32, device=matrix.device)
            for k in range(K):
                acc = add(acc, sums[:, :, k])
            out[t0:t0 + t_block, j0:j0 + j_block] = acc
    return out


def _rounding(fmt: FloatFormat) -> tuple[int, float, float]:
    """The contract's rounding of ``fmt`` as :func:`marca.golden.kernels.linear_rounded` takes it:
    significant bits, the magnitude that overflows to Inf (``2^(emax+1)``), the smallest normal."""
    return fmt.man_bits + 1, 2.0 ** (fmt.emax + 1), 2.0 ** fmt.emin


def _linear_rounded(matrix: torch.Tensor, vector: torch.Tensor, bias, fmt: FloatFormat) -> torch.Tensor:
    """linear_values on the CPU with every product and sum rounded by the contract (any format; FP32 whose
    operands hold tiny magnitudes): one compiled loop, :func:`marca.golden.kernels.linear_rounded`, since
    the chunk accumulation is a sequence of roundings that numpy or torch would pay per step."""
    from .kernels import linear_rounded        # numba: imported (and the loop loaded) on first use
    J, K, R, C = matrix.shape
    T = vector.shape[0]
    bias = np.zeros((0, 0, 0), dtype=np.float32) if bias is None else bias.numpy()
    order = np.asarray(_bit_reversal(C), dtype=np.int64)
    out = np.empty((T, J, R), dtype=np.float32)
    return torch.from_numpy(linear_rounded(matrix.numpy(), vector.numpy(), bias, order, *_rounding(fmt), out))


def _linear_plain_small(matrix: torch.Tensor, vector: torch.Tensor, bias) -> torch.Tensor:
    """linear_values for a small FP32 instruction on the CPU whose operands passed :func:`_no_tiny`: plain
    float32 numpy (whose per-call cost is a fraction of torch's), the row tree on the natural pairs
    ``(2i, 2i+1)`` (strided views), and the chunk accumulation as one ``np.add.accumulate``, which adds
    strictly in order, one float32 rounding per chunk (``acc = ((init + s_0) + s_1) + ...``)."""
    with _quiet():
        x = matrix.numpy()[None] * vector.numpy()[:, None, :, None, :]        # [T, J, K, R, C]
        while x.shape[-1] > 1:
            x = x[..., 0::2] + x[..., 1::2]
        T, J, K, R, _ = x.shape
        steps = np.empty((T, J, K + 1, R), dtype=np.float32)
        steps[:, :, 0] = 0.0 if bias is None else bias.numpy()
        steps[:, :, 1:] = x[..., 0]
        return torch.from_numpy(np.add.accumulate(steps, axis=2)[:, :, -1])


def elementwise_values(op: ElementwiseOp, operands: dict, fmt: FloatFormat) -> torch.Tensor:
    """:func:`elementwise_op` on values (torch tensors, or numpy arrays: see ``marca.golden.fp._xp``)."""
    a, b, c = operands.get("a"), operands.get("b"), operands.get("c")
    op = int(op)           # plain int comparisons: comparing amaranth enum members is slow
    if op == ElementwiseOp.PASS:
        return a.copy() if isinstance(a, np.ndarray) else a.clone()
    if op == ElementwiseOp.CMP_SELECT:
        xp = fp._xp(a, b, c)
        a, b, c = fp._broadcast(xp, a, b, c)
        return xp.where(a < b, c, a)
    return _arithmetic(op, a, b, c, fmt, "value_")


@functools.lru_cache(maxsize=1024)
def _constant_value(bits: int, fmt: FloatFormat) -> float:
    return float(fp.to_values(torch.tensor([bits]), fmt)[0])


@functools.lru_cache(maxsize=1024)
def _constant_tensor(bits: int, fmt: FloatFormat, device: str):
    """A constant operand as a 0-dim float32 tensor, or a numpy float32 scalar for ``device="host"`` (both
    broadcast by every value operation)."""
    if device == "host":
        return np.float32(_constant_value(bits, fmt))
    return torch.tensor(_constant_value(bits, fmt), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=32)
def _nonlinear_setup(function: NonlinearFunction, config: MarcaConfig):
    program = _NONLINEAR_PROGRAM[function](config)
    return program, nonlinear.constants_for(config)


_TABLE_WIDTH = 16


@functools.lru_cache(maxsize=32)
def _conversion_table(source: FloatFormat, target: FloatFormat, size: int, device: str):
    """``value_convert(to_values(bits, source), target)`` at every ``8·size``-bit element pattern (a numpy
    array on the CPU, a tensor elsewhere); to_values reads only the format's own low bits."""
    every = torch.arange(1 << (8 * size), dtype=torch.int64)
    table = fp.value_convert(fp.to_values(every, source), target).contiguous()
    return table.numpy() if device == "cpu" else table.to(device)


@functools.lru_cache(maxsize=32)
def _nonlinear_table(function: NonlinearFunction, config: MarcaConfig, device: str) -> torch.Tensor:
    """The golden function of a compute format of at most 16 bits at every input pattern, as values."""
    fmt = config.compute_format
    every = torch.arange(1 << fmt.width, dtype=torch.int64)
    return fp.to_values(_NONLINEAR_GOLDEN[function](every, config), fmt).to(device)


def nonlinear_values(function: NonlinearFunction, x: torch.Tensor, config: MarcaConfig) -> torch.Tensor:
    """The NONLINEAR golden function on values.

    Compute formats of at most 16 bits look the result up in a table of the golden function itself
    (:data:`_NONLINEAR_GOLDEN` at all 2^width patterns, made once per configuration). Wider formats run
    the function's pass program (marca.golden.nonlinear) pass by pass with the fast arithmetic; its
    FUNCTION passes (the lane extension) run on values through
    :func:`marca.golden.nonlinear.lane_function_values`, which the nonlinear unit's golden defines beside
    the bit-pattern :func:`~marca.golden.nonlinear.lane_function`."""
    fmt = config.compute_format
    if fmt.width <= _TABLE_WIDTH:
        table = _nonlinear_table(function, config, str(x.device))
        return table[fp.from_values(x, fmt)]
    program, constants = _nonlinear_setup(function, config)
    results = []
    host = x.device.type == "cpu" and fp._is_fp32(fmt)      # numpy: a fraction of torch's per-call cost
    source = x.numpy() if host else x

    def fetch(operand):
        if operand is None:
            return None
        if operand.kind == "input":
            return source
        if operand.kind == "result":
            return results[operand.index]
        return _constant_tensor(operand.bits, fmt, device)

    device = "host" if host else str(x.device)
    with _quiet():
        for step in program.passes:
            a, b, c = fetch(step.a), fetch(step.b), fetch(step.c)
            if step.op == ElementwiseOp.FUNCTION:
                out = nonlinear.lane_function_values(step.function, a, b, c, constants)
            else:
                out = elementwise_values(step.op, {"a": a, "b": b, "c": c}, fmt)
            results.append(out)
    out = results[-1]
    if host:
        return torch.from_numpy(out if out.shape == x.shape else np.broadcast_to(out, x.shape).copy())
    return out.expand(x.shape)


def elementwise_op(op: ElementwiseOp, operands: dict, fmt: FloatFormat) -> torch.Tensor:
    """``op`` on the operands it uses (``operands['a']`` ...), computing only that op.

    Bit-identical to :func:`marca.golden.pe_array.elementwise` (which evaluates every op and selects one;
    tests/test_iss.py checks the two agree on every op); this form is just faster for the simulator.
    """
    a, b, c = operands.get("a"), operands.get("b"), operands.get("c")
    op = int(op)
    if op == ElementwiseOp.PASS:
        return pe_array.read(a, fmt)
    if op == ElementwiseOp.CMP_SELECT:
        less, _, _ = fp.compare(a, b, fmt)
        return torch.where(less, pe_array.read(c, fmt), pe_array.read(a, fmt))
    return _arithmetic(op, a, b, c, fmt, "")


_ARITHMETIC = {ElementwiseOp.MUL: "mul", ElementwiseOp.ADD: "add", ElementwiseOp.SUB: "sub",
               ElementwiseOp.MULADD: "mul_add", ElementwiseOp.MIN: "minimum", ElementwiseOp.MAX: "maximum"}


def _arithmetic(op: int, a, b, c, fmt: FloatFormat, prefix: str):
    """The arithmetic element-wise ops: ``fp.<name>`` on bit patterns (``prefix=""``), ``fp.value_<name>``
    on values (``"value_"``)."""
    name = _ARITHMETIC.get(op)
    if name is None:
        raise ValueError(f"op {op!r} is not an element-wise instruction op")
    function = getattr(fp, prefix + name)
    return function(a, b, c, fmt) if name == "mul_add" else function(a, b, fmt)


def _write_last_wins(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``target[index] = values`` where a repeated index takes its last value (in-order hardware writes);
    torch's own index_put leaves duplicates unspecified."""
    unique, inverse = torch.unique(index, return_inverse=True)
    if len(unique) == len(index):
        target[index] = values
        return
    last = torch.full((len(unique),), -1, dtype=torch.int64)
    last.scatter_reduce_(0, inverse, torch.arange(len(index), dtype=torch.int64), reduce="amax")
    target[unique] = values[last]


def run_program(config: MarcaConfig, memory, program_address: int = 0, *, reference: bool = False,
                **options) -> tuple[RunResult, "Machine | ReferenceMachine"]:
    """Run the program at ``program_address`` in ``memory``; returns the result and the machine (whose
    ``memory_bytes()`` is the final image). ``reference=True`` runs the slow oracle
    (:class:`ReferenceMachine`, which takes no ``device``) instead of the fast :class:`Machine`."""
    max_instructions = options.pop("max_instructions", 1_000_000)
    machine = (ReferenceMachine if reference else Machine)(config, memory, **options)
    return machine.run(program_address, max_instructions=max_instructions), machine
