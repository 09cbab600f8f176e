"""Golden instruction-set simulator: runs a program on a memory image bit-exactly (docs/isa.md).

The machine model, the encoding and the legality rules come from :mod:`marca.isa`; the arithmetic from the
golden unit models: :mod:`marca.golden.fp` (DMA format conversion), :mod:`marca.golden.pe_array`
(element-wise ops, row trees and accumulators) and :mod:`marca.golden.nonlinear` (exp, SiLU, softplus).
Each instruction is executed whole and vectorized (one PyTorch gather, compute and scatter per operand),
which is exact because a legal program cannot observe the order of beats inside an instruction.

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

import dataclasses
from dataclasses import dataclass

import torch

from marca import isa
from marca.config import MarcaConfig
from marca.formats import FloatFormat
from marca.isa import Buffer, ErrorCode, IllegalInstruction, LinearInit, NonlinearFunction
from marca.ops import ElementwiseOp

from . import fp, nonlinear, pe_array

__all__ = ["ProgramError", "RunResult", "Machine", "COUNTER_NAMES", "run_program", "memory_to_tensor",
           "pack_elements", "unpack_elements", "access_indices", "elementwise_op"]

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
        return torch.frombuffer(bytearray(memory), dtype=torch.uint8).clone() if len(memory) \
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


class Machine:
    """The architectural state (memory image, four buffers, counters) and the instruction semantics.

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
        if not isinstance(config, MarcaConfig):
            raise ValueError(f"config must be a MarcaConfig, not {config!r}")
        isa.check_config(config)
        self.config = config
        self.memory = memory_to_tensor(memory)
        if len(self.memory) > 1 << config.axi_addr_width:
            raise ValueError(f"memory of {len(self.memory)} bytes exceeds the {config.axi_addr_width}-bit "
                             f"address space")
        fill = config.compute_format.canonical_nan if buffer_fill is None else buffer_fill
        self.buffers = {b: torch.full((isa.buffer_elements(config, b),), fill, dtype=torch.int64)
                        for b in Buffer}
        self.written = {b: torch.zeros(len(self.buffers[b]), dtype=torch.bool) for b in Buffer}
        self.check_hazards = check_hazards
        self.check_undefined = check_undefined
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._clear_pending()
        self.pc = None

    # Memory helpers ------------------------------------------------------------------------------------

    def memory_bytes(self) -> bytes:
        return bytes(self.memory.numpy().tobytes())

    def read_elements(self, address: int, count: int, *, storage: bool = True) -> torch.Tensor:
        """``count`` contiguous elements at byte ``address`` (storage format by default) as bit patterns."""
        size = self.config.storage_bytes if storage else self.config.compute_bytes
        width = (self.config.storage_format if storage else self.config.compute_format).width
        return self._gather_memory(address + size * torch.arange(count, dtype=torch.int64), size, width)

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
                            raise ProgramError(
                                "barrier", f"{stream} {kind} of {buffer.name} elements that an earlier "
                                f"{other} "
                                f"instruction {other_kind}s (first {int(torch.nonzero(pending & mask)[0])}) "
                                "with no BARRIER between them", pc)
        for kind, accesses in (("read", reads), ("write", writes)):
            for buffer, mask in accesses:
                table = self._pending[(stream, kind)]
                table[buffer] = table[buffer] | mask if buffer in table else mask

    def _check_defined(self, buffer: Buffer, indices: torch.Tensor, name: str, pc) -> None:
        if self.check_undefined:
            defined = self.written[buffer][indices.flatten()]
            if not bool(defined.all()):
                first = int(indices.flatten()[~defined][0])
                raise ProgramError("undefined", f"{name} reads {buffer.name} element {first}, which nothing "
                                   "has written", pc)

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

    def run(self, program_address: int = 0, *, max_instructions: int = 1_000_000) -> RunResult:
        """Fetch, check and execute from ``program_address`` until HALT or an error."""
        self.pc = program_address
        if program_address % isa.INSTRUCTION_BYTES:
            return RunResult(ErrorCode.MISALIGNED, program_address, program_address, dict(self.counters),
                             "program address is not a multiple of the instruction size")
        for _ in range(max_instructions):
            pc = self.pc
            if pc + isa.INSTRUCTION_BYTES > len(self.memory):
                return RunResult(ErrorCode.BUS_ERROR, pc, pc, dict(self.counters), "fetch beyond memory")
            word = int.from_bytes(self.memory[pc:pc + isa.INSTRUCTION_BYTES].numpy().tobytes(), "little")
            self.counters["fetch_bytes"] += isa.INSTRUCTION_BYTES
            try:
                instruction = isa.decode(word)
            except IllegalInstruction as error:
                return RunResult(error.code, pc, pc, dict(self.counters), str(error))
            code = self.execute(instruction, pc=pc)
            if code != ErrorCode.NONE:
                return RunResult(code, pc, pc, dict(self.counters), f"{instruction.OPCODE.name}: {code.name}")
            self.pc = pc + isa.INSTRUCTION_BYTES
            if isinstance(instruction, isa.Halt):
                return RunResult(ErrorCode.NONE, None, self.pc, dict(self.counters))
        raise ProgramError("runaway", f"no HALT within {max_instructions} instructions", self.pc)

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
            start = access_indices(dataclasses.replace(access, extent=1))   # [O, I, 1]
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


def elementwise_op(op: ElementwiseOp, operands: dict, fmt: FloatFormat) -> torch.Tensor:
    """``op`` on the operands it uses (``operands['a']`` ...), computing only that op.

    Bit-identical to :func:`marca.golden.pe_array.elementwise` (which evaluates every op and selects one;
    tests/test_iss.py checks the two agree on every op); this form is just faster for the simulator.
    """
    a, b, c = operands.get("a"), operands.get("b"), operands.get("c")
    if op == ElementwiseOp.PASS:
        return pe_array.read(a, fmt)
    if op == ElementwiseOp.MUL:
        return fp.mul(a, b, fmt)
    if op == ElementwiseOp.ADD:
        return fp.add(a, b, fmt)
    if op == ElementwiseOp.SUB:
        return fp.sub(a, b, fmt)
    if op == ElementwiseOp.MULADD:
        return fp.add(fp.mul(a, b, fmt), c, fmt)
    if op == ElementwiseOp.MIN:
        return fp.minimum(a, b, fmt)
    if op == ElementwiseOp.MAX:
        return fp.maximum(a, b, fmt)
    if op == ElementwiseOp.CMP_SELECT:
        less, _, _ = fp.compare(a, b, fmt)
        return torch.where(less, pe_array.read(c, fmt), pe_array.read(a, fmt))
    raise ValueError(f"op {op!r} is not an element-wise instruction op")


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


def run_program(config: MarcaConfig, memory, program_address: int = 0,
                **options) -> tuple[RunResult, Machine]:
    """Run the program at ``program_address`` in ``memory``; returns the result and the machine (whose
    ``memory_bytes()`` is the final image)."""
    max_instructions = options.pop("max_instructions", 1_000_000)
    machine = Machine(config, memory, **options)
    return machine.run(program_address, max_instructions=max_instructions), machine
