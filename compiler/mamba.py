"""Compiler of a Mamba-1 mixer to a marca program and memory image (docs/compiler.md).

Input: the mixer's weights with transformers' ``MambaMixer`` names (``in_proj.weight``, ``conv1d.weight``,
``conv1d.bias``, ``x_proj.weight``, ``dt_proj.weight``, ``dt_proj.bias``, ``A_log``, ``D``,
``out_proj.weight``, optional ``in_proj.bias``/``out_proj.bias``), a :class:`~marca.config.MarcaConfig`
and a mode: a prefill of ``L`` tokens or a decode step (``L = 1``). Both carry the convolution and scan
states in and out through memory, so a prefill can continue a sequence and decode steps chain.

Output: a :class:`CompiledMixer`: the program, the memory image (weights in place, program at the end),
and where the inputs, outputs and states live, with helpers to write inputs and read results.

Buffer management (MARCA's idea 3), each switchable in :class:`CompileOptions`:

* **intra-operation**: every weight tile fetched from memory serves every token of the on-chip token
  block (one ``LINEAR`` over ``T`` tokens), and each input chunk is shared by all ``R`` rows of a tile
  (the array's COLUMN broadcast). Off: weights are fetched again for every token.
* **inter-operation**: the element-wise chains (convolution taps, activations, the scan step) keep their
  intermediates in the scratch and activation buffers. Off: every element-wise and nonlinear result makes
  a round trip through memory (a compute-format store and load) before its next use.

Both switches change only the traffic, never a result: the arithmetic and its order are the same, so the
switched programs leave bit-identical outputs (tests/test_compiler.py checks it).
"""

from dataclasses import dataclass

import torch

from marca import isa
from marca.config import MarcaConfig
from marca.golden import fp
from marca.golden.iss import RunResult, pack_elements, run_program, unpack_elements
from marca.isa import Broadcast, Buffer, ElementwiseOp, LinearInit, MemoryFormat, NonlinearFunction
from marca.reference.mamba import MambaDims, dims_from_weights

from .schedule import MemoryImage, insert_barriers

__all__ = ["CompileOptions", "CompileError", "TensorPlace", "CompiledMixer", "MixerRun", "compile_mixer"]


class CompileError(ValueError):
    """The mixer cannot be compiled for this configuration (the message says what does not fit)."""


@dataclass(frozen=True, kw_only=True)
class CompileOptions:
    """Switches and limits of the compiler.

    intra_operation, inter_operation : bool
        The two buffer-management strategies (module docstring).
    max_block_tokens : int or None
        At most this many tokens on chip at once (default: as many as the buffers hold).
    max_weight_lines : int or None
        Use at most this many weight-buffer lines for matrix tiles (default: all that the per-channel
        parameters leave); smaller values force weight streaming and chunk splitting (for tests).
    max_scan_tiles : int or None
        At most this many channel tiles of ``R`` channels per scan group (default: as many as the state
        buffer holds); fewer than all forces the grouped scan (for tests).
    """

    intra_operation: bool = True
    inter_operation: bool = True
    max_block_tokens: int | None = None
    max_weight_lines: int | None = None
    max_scan_tiles: int | None = None

    def __post_init__(self):
        for name in ("intra_operation", "inter_operation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, not {getattr(self, name)!r}")
        for name in ("max_block_tokens", "max_weight_lines", "max_scan_tiles"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {value!r}")


@dataclass(frozen=True)
class TensorPlace:
    """Where a tensor lives in memory: ``rows`` rows of ``row_elements`` elements, ``row_stride`` bytes
    apart, in the ``storage`` or ``compute`` format; ``layout`` says how the tensor maps to those rows."""

    address: int
    rows: int
    row_elements: int
    row_stride: int
    format: str
    layout: str


@dataclass
class MixerRun:
    """Results of running a compiled mixer on the golden ISS."""

    out: torch.Tensor          # [L, d_model] float64 (storage-format values)
    conv_state: torch.Tensor   # [d_inner, d_conv]
    ssm_state: torch.Tensor    # [d_inner, d_state]
    result: RunResult


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``matrix [out, in]`` padded with zeros and cut into R x C tiles, lines in (row tile, chunk) order."""
    out_dim, in_dim = matrix.shape
    J, K = _ceil_div(out_dim, rows), _ceil_div(in_dim, cols)
    padded = torch.zeros(J * rows, K * cols, dtype=torch.float64)
    padded[:out_dim, :in_dim] = matrix
    return padded.reshape(J, rows, K, cols).permute(0, 2, 1, 3).reshape(-1)


def _untile(lines: torch.Tensor, out_dim: int, in_dim: int, rows: int, cols: int) -> torch.Tensor:
    J, K = _ceil_div(out_dim, rows), _ceil_div(in_dim, cols)
    return lines.reshape(J, K, rows, cols).permute(0, 2, 1, 3).reshape(J * rows, K * cols)[:out_dim, :in_dim]


@dataclass
class CompiledMixer:
    """A compiled mixer: program, memory image and the places of its inputs, outputs and states.

    ``hidden`` (input, storage format, ``[L, d_model]`` rows), ``output`` (storage, ``[L, d_model]``),
    ``conv_state`` (compute format, ``d_conv`` rows of ``d_inner`` padded to whole lines, oldest first:
    the transpose of the reference's ``[d_inner, d_conv]``), ``ssm_state`` (compute format, the
    ``d_inner x d_state`` state cut into ``R x C`` tiles, line ``(j, k)`` = channels ``j·R..``, states
    ``k·C..``). The program reads the states at its start and writes them back in place at its end.
    """

    config: MarcaConfig
    dims: MambaDims
    options: CompileOptions
    length: int
    instructions: list
    memory: bytes
    program_address: int
    hidden: TensorPlace
    output: TensorPlace
    conv_state: TensorPlace
    ssm_state: TensorPlace
    block_tokens: int
    weights_resident: bool
    regions: dict

    # Host side -------------------------------------------------------------------------------------------

    def _put(self, memory: bytearray, place: TensorPlace, bits: torch.Tensor) -> None:
        size = self.config.storage_bytes if place.format == "storage" else self.config.compute_bytes
        bits = bits.reshape(place.rows, place.row_elements)
        for row in range(place.rows):
            data = pack_elements(bits[row], size)
            start = place.address + row * place.row_stride
            memory[start:start + len(data)] = data

    def _get(self, memory, place: TensorPlace) -> torch.Tensor:
        compute = place.format == "compute"
        size = self.config.compute_bytes if compute else self.config.storage_bytes
        fmt = self.config.compute_format if compute else self.config.storage_format
        starts = [place.address + r * place.row_stride for r in range(place.rows)]
        rows = [unpack_elements(bytes(memory[start:start + place.row_elements * size]), size, fmt.width)
                for start in starts]
        return fp.decode(torch.stack(rows), fmt)

    def write_inputs(self, memory, hidden, conv_state=None, ssm_state=None) -> bytearray:
        """A copy of ``memory`` (default: this mixer's image) with ``hidden [L, d_model]`` and the states
        (``[d_inner, d_conv]``, ``[d_inner, d_state]``; zeros when omitted) written in, rounded to the
        formats of their places."""
        memory = bytearray(self.memory if memory is None else memory)
        d, config = self.dims, self.config
        hidden = torch.as_tensor(hidden, dtype=torch.float64).reshape(self.length, d.d_model)
        self._put(memory, self.hidden, fp.encode(hidden, config.storage_format))
        conv = torch.zeros(d.d_inner, d.d_conv, dtype=torch.float64) if conv_state is None \
            else torch.as_tensor(conv_state, dtype=torch.float64)
        padded = torch.zeros(d.d_conv, self.conv_state.row_elements, dtype=torch.float64)
        padded[:, :d.d_inner] = conv.T
        self._put(memory, self.conv_state, fp.encode(padded, config.compute_format))
        ssm = torch.zeros(d.d_inner, d.d_state, dtype=torch.float64) if ssm_state is None \
            else torch.as_tensor(ssm_state, dtype=torch.float64)
        tiles = _tiles(ssm, config.array_rows, config.array_cols)
        self._put(memory, self.ssm_state, fp.encode(tiles, config.compute_format))
        return memory

    def read_outputs(self, memory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(out [L, d_model], conv_state [d_inner, d_conv], ssm_state [d_inner, d_state])`` as float64."""
        d, config = self.dims, self.config
        out = self._get(memory, self.output)
        conv = self._get(memory, self.conv_state)[:, :d.d_inner].T.contiguous()
        lines = self._get(memory, self.ssm_state).flatten()
        ssm = _untile(lines, d.d_inner, d.d_state, config.array_rows, config.array_cols)
        return out, conv, ssm

    def run(self, hidden, conv_state=None, ssm_state=None, **iss_options) -> MixerRun:
        """Write the inputs, run the program on the golden ISS, read the results."""
        memory = self.write_inputs(None, hidden, conv_state, ssm_state)
        result, machine = run_program(self.config, memory, self.program_address, **iss_options)
        if result.error != isa.ErrorCode.NONE:
            raise RuntimeError(f"compiled program faulted: {result}")
        out, conv, ssm = self.read_outputs(machine.memory_bytes())
        return MixerRun(out, conv, ssm, result)

    def listing(self) -> str:
        """The program as assembly text."""
        return isa.disassemble(self.instructions)


class _Allocator:
    """First-fit line regions in buffers."""

    def __init__(self, config: MarcaConfig):
        self.config = config
        self.free = {b: isa.buffer_lines(config, b) for b in Buffer}
        self.next = dict.fromkeys(Buffer, 0)

    def take(self, name: str, lines: int, buffers) -> tuple[Buffer, int]:
        for buffer in buffers:
            if self.free[buffer] >= lines:
                address = self.next[buffer] * self.config.lanes
                self.next[buffer] += lines
                self.free[buffer] -= lines
                return buffer, address
        raise CompileError(f"{name} needs {lines} lines of {self.config.lanes} elements, more than is left "
                           "in "
                           f"the {', '.join(b.name.lower() for b in buffers)} buffer(s) "
                           f"({', '.join(str(self.free[b]) for b in buffers)} lines)")


class _MixerCompiler:
    def __init__(self, weights, config: MarcaConfig, length: int, options: CompileOptions):
        isa.check_config(config)
        self.config, self.length, self.options = config, length, options
        self.dims = dims_from_weights(weights)
        self.w = {name: value.detach().to("cpu", torch.float64) for name, value in weights.items()}
        R, C, P = config.array_rows, config.array_cols, config.lanes
        self.R, self.C, self.P = R, C, P
        d = self.dims
        self.lines = lambda n: _ceil_div(n, P)
        self.Dm_l, self.Di_l = self.lines(d.d_model), self.lines(d.d_inner)
        self.Rk_l, self.N_l = self.lines(d.dt_rank), self.lines(d.d_state)
        self.Jd, self.Kn = _ceil_div(d.d_inner, R), _ceil_div(d.d_state, C)
        self.program = []
        self.image = MemoryImage()

    # Emission helpers -------------------------------------------------------------------------------------

    def emit(self, instruction):
        try:
            isa.encode(instruction)
        except ValueError as error:
            raise CompileError(f"an instruction field overflows ({error}); the mixer is too large for "
                               "this compiler's tiling") from None
        self.program.append(instruction)

    def load_lines(self, memory_address, lines, buffer, address, *, compute=False):
        size = self.config.compute_bytes if compute else self.config.storage_bytes
        for first in range(0, lines, 0xFFFF):
            count = min(0xFFFF, lines - first)
            self.emit(isa.Load(memory_address=memory_address + first * self.P * size, row_count=count,
                               row_elements=self.P, memory_row_stride=self.P * size, buffer=buffer,
                               buffer_address=address + first * self.P, buffer_row_stride=self.P,
                               memory_format=MemoryFormat.COMPUTE if compute else MemoryFormat.STORAGE))

    def store_lines(self, memory_address, lines, buffer, address, *, compute=True):
        size = self.config.compute_bytes if compute else self.config.storage_bytes
        for first in range(0, lines, 0xFFFF):
            count = min(0xFFFF, lines - first)
            self.emit(isa.Store(memory_address=memory_address + first * self.P * size, row_count=count,
                                row_elements=self.P, memory_row_stride=self.P * size, buffer=buffer,
                                buffer_address=address + first * self.P, buffer_row_stride=self.P,
                                memory_format=MemoryFormat.COMPUTE if compute else MemoryFormat.STORAGE))

    def spill(self, buffer, address, lines):
        """Inter-operation management off: the result goes to memory and comes back before its next use."""
        if self.options.inter_operation:
            return
        self.store_lines(self.spill_address, lines, buffer, address, compute=True)
        self.load_lines(self.spill_address, lines, buffer, address, compute=True)

    def elementwise(self, op, outer, inner, dst, a, b=None, c=None, *, spill=True):
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

    def nonlinear(self, function, buffer, address, lines):
        self.emit(isa.Nonlinear(function=function, line_count=lines, src_buffer=buffer, src_address=address,
                                dst_buffer=buffer, dst_address=address))
        self.spill(buffer, address, lines)

    def zero_fill(self, buffer, address, lines):
        for first in range(0, lines, 0xFFFF):
            count = min(0xFFFF, lines - first)
            self.elementwise(ElementwiseOp.PASS, count, 1, (buffer, address + first * self.P, 1, 0),
                             (Buffer.WEIGHT, self.param["zero"], 0, 0, Broadcast.SCALAR), spill=False)

    # Linear operations ----------------------------------------------------------------------------------

    def linear(self, name, tokens, vector, output, bias=None):
        """``output[t] = matrix · vector[t] (+ bias)`` for ``tokens`` tokens.

        vector: (buffer, address, token stride in elements); output: (buffer, address, token stride);
        bias: (buffer, address) shared by all tokens, or None.
        """
        matrix = self.matrices[name]
        J, K, R, C = matrix["J"], matrix["K"], self.R, self.C
        (vb, va, vs), (ob, oa, os) = vector, output
        if vs % C or os % R:
            raise AssertionError("token strides must be whole chunks and row tiles")

        def emit_linear(matrix_address, j0, j_count, k0, k_count, accumulate):
            fields = dict(matrix_buffer=Buffer.WEIGHT, matrix_address=matrix_address, chunk_count=k_count,
                          row_tile_count=j_count, token_count=tokens, vector_buffer=vb,
                          vector_address=va + k0 * C, vector_token_stride=vs // C, output_buffer=ob,
                          output_address=oa + j0 * R, output_token_stride=os // R)
            if accumulate:
                fields.update(init=LinearInit.BIAS, bias_buffer=ob, bias_address=oa + j0 * R,
                              bias_token_stride=os // R)
            elif bias is not None:
                fields.update(init=LinearInit.BIAS, bias_buffer=bias[0], bias_address=bias[1] + j0 * R,
                              bias_token_stride=0)
            self.emit(isa.Linear(**fields))

        if self.weights_resident:
            emit_linear(self.weight_area + matrix["offset"] * self.P, 0, J, 0, K, False)
            return
        half = self.stream_lines
        line_bytes = self.P * self.config.storage_bytes
        if K <= half:
            group = min(J, half // K)
            for j0 in range(0, J, group):
                count = min(group, J - j0)
                address = self._next_half()
                self.load_lines(matrix["memory"] + j0 * K * line_bytes, count * K, Buffer.WEIGHT, address)
                emit_linear(address, j0, count, 0, K, False)
        else:   # a row tile's chunks do not fit: split them and accumulate in place through the bias path
            for j in range(J):
                for k0 in range(0, K, half):
                    count = min(half, K - k0)
                    address = self._next_half()
                    self.load_lines(matrix["memory"] + (j * K + k0) * line_bytes, count, Buffer.WEIGHT,
                                    address)
                    emit_linear(address, j, 1, k0, count, k0 > 0)

    def _next_half(self):
        self.half = 1 - self.half if self.stream_halves == 2 else 0
        return self.weight_area + self.half * self.stream_lines * self.P

    # The mixer --------------------------------------------------------------------------------------------

    def layout_memory(self):
        d, config, R, C, P = self.dims, self.config, self.R, self.C, self.P
        storage = config.storage_format
        w = self.w
        Di, Dm, N, Rk = d.d_inner, d.d_model, d.d_state, d.dt_rank

        def vector(values, lines):
            out = torch.zeros(lines * P, dtype=torch.float64)
            out[:len(values)] = values
            return out

        # Per-channel parameters, loaded once into the start of the weight buffer (line-aligned each).
        params = [("zero", torch.zeros(P, dtype=torch.float64))]
        taps = w["conv1d.weight"][:, 0, :]
        params += [(f"conv_tap{k}", vector(taps[:, k], self.Di_l)) for k in range(d.d_conv)]
        if "conv1d.bias" in w:
            params.append(("conv_bias", vector(w["conv1d.bias"], self.Di_l)))
        params.append(("dt_bias", vector(w["dt_proj.bias"], self.Di_l)))
        params.append(("D", vector(w["D"], self.Di_l)))
        if "in_proj.bias" in w:
            params.append(("in_x_bias", vector(w["in_proj.bias"][:Di], self.Di_l)))
            params.append(("in_z_bias", vector(w["in_proj.bias"][Di:], self.Di_l)))
        if "out_proj.bias" in w:
            params.append(("out_bias", vector(w["out_proj.bias"], self.Dm_l)))
        self.param, offset = {}, 0
        for name, values in params:
            self.param[name] = offset
            offset += len(values)
        self.param_lines = offset // P
        block = torch.cat([values for _, values in params])
        self.param_memory = self.image.place("parameters", fp.encode(block, storage), config.storage_bytes)
        A = -torch.exp(w["A_log"])       # weights only: done once on the host
        self.A_memory = self.image.place("A tiles", fp.encode(_tiles(A, R, C), storage), config.storage_bytes)

        in_w, x_w = w["in_proj.weight"], w["x_proj.weight"]
        self.matrices = {}
        for name, matrix in (("in_x", in_w[:Di]), ("in_z", in_w[Di:]), ("x_dt", x_w[:Rk]),
                             ("x_B", x_w[Rk:Rk + N]), ("x_C", x_w[Rk + N:]), ("dt", w["dt_proj.weight"]),
                             ("out", w["out_proj.weight"])):
            tiles = _tiles(matrix, R, C)
            address = self.image.place(f"matrix {name}", fp.encode(tiles, storage), config.storage_bytes)
            self.matrices[name] = dict(J=_ceil_div(matrix.shape[0], R), K=_ceil_div(matrix.shape[1], C),
                                       memory=address, lines=len(tiles) // P)

        sb, cb = config.storage_bytes, config.compute_bytes
        L = self.length
        self.hidden = TensorPlace(self.image.allocate("hidden", L * Dm * sb), L, Dm, Dm * sb, "storage",
                                  "[L, d_model] row-major")
        self.output = TensorPlace(self.image.allocate("output", L * Dm * sb), L, Dm, Dm * sb, "storage",
                                  "[L, d_model] row-major")
        conv_address = self.image.allocate("conv_state", d.d_conv * self.Di_l * P * cb)
        self.conv_state = TensorPlace(conv_address, d.d_conv,
                                      self.Di_l * P, self.Di_l * P * cb, "compute",
                                      "[d_conv, d_inner padded to lines], oldest first")
        state_lines = self.Jd * self.Kn
        self.ssm_state = TensorPlace(self.image.allocate("ssm_state", state_lines * P * cb), state_lines, P,
                                     P * cb, "compute", "R x C tiles of [d_inner, d_state], lines (j, k)")

    def plan_buffers(self):
        """Place the state, the scan's scratch tiles, the weight area and the token-block regions."""
        config, P = self.config, self.P
        d = self.dims
        weight_lines = isa.buffer_lines(config, Buffer.WEIGHT)
        if self.param_lines >= weight_lines:
            raise CompileError(f"the per-channel parameters need {self.param_lines} weight-buffer lines "
                               f"(plus at least one for matrix tiles); the weight buffer has {weight_lines}")
        area = weight_lines - self.param_lines
        if self.options.max_weight_lines is not None:
            area = min(area, self.options.max_weight_lines)
        self.weight_area = self.param_lines * P
        total = sum(m["lines"] for m in self.matrices.values())
        self.weights_resident = self.options.intra_operation and total <= area
        if self.weights_resident:
            offset = 0
            for matrix in self.matrices.values():
                matrix["offset"] = offset
                offset += matrix["lines"]
        self.stream_halves = 2 if area >= 2 else 1
        self.stream_lines = area // self.stream_halves
        self.half = 0

        allocator = _Allocator(config)
        # The scan works on groups of channel tiles whose state h and A tiles sit together in the state
        # buffer. One group (all channels) keeps h on chip for the whole program; otherwise every token
        # block loads each group's h and A, runs its tokens, and stores h back (channels are independent).
        state_lines = isa.buffer_lines(config, Buffer.STATE)
        self.group_tiles = min(self.Jd, state_lines // (2 * self.Kn))
        if self.group_tiles < 1:
            raise CompileError(f"one channel tile of the scan needs {2 * self.Kn} state-buffer lines (h and "
                               "A "
                               f"for d_state={d.d_state}); the state buffer has {state_lines} (state-chunk "
                               "tiling is not implemented)")
        if self.options.max_scan_tiles is not None:
            self.group_tiles = min(self.group_tiles, self.options.max_scan_tiles)
        tile_lines = self.group_tiles * self.Kn
        self.h = allocator.take("the scan state h", tile_lines, [Buffer.STATE])
        self.A = allocator.take("the scan's A tiles", tile_lines, [Buffer.STATE])
        scratch_order = [Buffer.SCRATCH, Buffer.ACTIVATION, Buffer.STATE]
        self.dA = allocator.take("the scan's decay tile", tile_lines, scratch_order)
        self.dBx = allocator.take("the scan's drive tile", tile_lines, scratch_order)

        per_token = {name: self.row_lines(name) for name in
                     ("H", "X", "Z", "XC", "DT", "BB", "CC", "DELTA", "DX", "DXD", "Y", "OUT")}
        fixed = dict(X=d.d_conv * self.Di_l)
        order = [Buffer.ACTIVATION, Buffer.SCRATCH, Buffer.STATE]

        def attempt(tokens):
            trial = _copy_allocator(allocator)
            # Biggest regions first keeps first-fit from stranding space.
            names = sorted(per_token, key=lambda n: -(per_token[n] * tokens + fixed.get(n, 0)))
            return {n: trial.take(n, per_token[n] * tokens + fixed.get(n, 0), order) for n in names}

        limit = min(self.length, self.options.max_block_tokens or self.length)
        low, high, best = 1, limit, None
        while low <= high:       # the largest token block whose regions fit
            middle = (low + high) // 2
            try:
                best = (middle, attempt(middle))
                low = middle + 1
            except CompileError:
                high = middle - 1
        if best is None:
            attempt(1)           # raises the CompileError that says what does not fit
        self.block_tokens, self.regions = best
        spill_lines = max(self.block_tokens * self.Di_l, tile_lines, d.d_conv * self.Di_l)
        self.spill_address = self.image.allocate("spill", spill_lines * P * config.compute_bytes) \
            if not self.options.inter_operation else None

    def region(self, name, row=0):
        buffer, address = self.regions[name]
        return buffer, address + row * self.row_lines(name) * self.P

    def row_lines(self, name):
        """Lines per token of a token-block region."""
        return {"H": self.Dm_l, "OUT": self.Dm_l, "DT": self.Rk_l, "BB": self.N_l, "CC": self.N_l}.get(
            name, self.Di_l)

    @property
    def scan_groups(self) -> int:
        return _ceil_div(self.Jd, self.group_tiles)

    def load_scan_group(self, j0, count):
        """h and A tiles of channel tiles j0 .. j0 + count - 1 into the state buffer."""
        P, Kn = self.P, self.Kn
        self.load_lines(self.ssm_state.address + j0 * Kn * P * self.config.compute_bytes, count * Kn,
                        self.h[0], self.h[1], compute=True)
        self.load_lines(self.A_memory + j0 * Kn * P * self.config.storage_bytes, count * Kn,
                        self.A[0], self.A[1])

    def compile_block(self, t0, tokens):
        d, P = self.dims, self.P
        Di_l, Dm_l = self.Di_l, self.Dm_l
        W = Buffer.WEIGHT
        dc = d.d_conv
        # 1. hidden tokens in (the pads stay zero from the start).
        hb, ha = self.region("H")
        self.emit(isa.Load(memory_address=self.hidden.address + t0 * self.hidden.row_stride, row_count=tokens,
                           row_elements=d.d_model, memory_row_stride=self.hidden.row_stride, buffer=hb,
                           buffer_address=ha, buffer_row_stride=Dm_l * P))

        # 2. in_proj -> x (after the conv history in the window X) and z.
        def linear(name, vector_region, vector_lines, output, output_lines, bias_name=None, row=0):
            bias = (W, self.param[bias_name]) if bias_name and bias_name in self.param else None
            vb, va = self.region(vector_region, row)
            ob, oa = output
            if self.options.intra_operation:
                self.linear(name, tokens, (vb, va, vector_lines * P), (ob, oa, output_lines * P), bias)
            else:       # no reuse across tokens: one token at a time, the weights fetched again each time
                for t in range(tokens):
                    self.linear(name, 1, (vb, va + t * vector_lines * P, vector_lines * P),
                                (ob, oa + t * output_lines * P, output_lines * P), bias)

        linear("in_x", "H", Dm_l, self.region("X", dc), Di_l, "in_x_bias")
        linear("in_z", "H", Dm_l, self.region("Z"), Di_l, "in_z_bias")

        # 3. causal depthwise conv: XC[t] = sum_k tap_k * X[t + 1 + k] (+ bias), then SiLU.
        xb, xa = self.region("X")
        cb_, ca = self.region("XC")
        tap = lambda k: (W, self.param[f"conv_tap{k}"], 0, 1)
        window = lambda k: (xb, xa + (1 + k) * Di_l * P, Di_l, 1)
        xc = (cb_, ca, Di_l, 1)
        self.elementwise(ElementwiseOp.MUL, tokens, Di_l, xc, tap(0), window(0))
        for k in range(1, dc):
            self.elementwise(ElementwiseOp.MULADD, tokens, Di_l, xc, tap(k), window(k), xc)
        if "conv_bias" in self.param:
            self.elementwise(ElementwiseOp.ADD, tokens, Di_l, xc, xc, (W, self.param["conv_bias"], 0, 1))
        self.nonlinear(NonlinearFunction.SILU, cb_, ca, tokens * Di_l)

        # 4. x_proj -> dt, B, C; dt_proj + bias -> softplus -> delta.
        linear("x_dt", "XC", Di_l, self.region("DT"), self.Rk_l)
        linear("x_B", "XC", Di_l, self.region("BB"), self.N_l)
        linear("x_C", "XC", Di_l, self.region("CC"), self.N_l)
        linear("dt", "DT", self.Rk_l, self.region("DELTA"), Di_l, "dt_bias")
        db, da = self.region("DELTA")
        self.nonlinear(NonlinearFunction.SOFTPLUS, db, da, tokens * Di_l)
        dxb, dxa = self.region("DX")
        self.elementwise(ElementwiseOp.MUL, tokens, Di_l, (dxb, dxa, Di_l, 1), (db, da, Di_l, 1), xc)
        dxdb, dxda = self.region("DXD")
        self.elementwise(ElementwiseOp.MUL, tokens, Di_l, (dxdb, dxda, Di_l, 1), (W, self.param["D"], 0, 1),
                         xc)

        # 5. the selective scan, token by token, one group of channel tiles at a time.
        Kn = self.Kn
        tile = lambda place: (place[0], place[1], Kn, 1)
        for j0 in range(0, self.Jd, self.group_tiles):
            count = min(self.group_tiles, self.Jd - j0)
            if self.scan_groups > 1:
                self.load_scan_group(j0, count)
            for t in range(tokens):
                def rows(name, granule_offset=j0 * self.R):
                    buffer, address = self.region(name, t)
                    return buffer, address + granule_offset
                # decay = exp(delta[t, d] * A[d, n])
                self.elementwise(ElementwiseOp.MUL, count, Kn, tile(self.dA),
                                 (*rows("DELTA"), 1, 0, Broadcast.ROW), tile(self.A))
                self.nonlinear(NonlinearFunction.EXP, self.dA[0], self.dA[1], count * Kn)
                # drive = (delta[t, d] * x[t, d]) * B[t, n]
                self.elementwise(ElementwiseOp.MUL, count, Kn, tile(self.dBx),
                                 (*rows("DX"), 1, 0, Broadcast.ROW),
                                 (*self.region("BB", t), 0, 1, Broadcast.COLUMN))
                # h = decay * h + drive
                self.elementwise(ElementwiseOp.MULADD, count, Kn, tile(self.h), tile(self.dA), tile(self.h),
                                 tile(self.dBx))
                # y[t, d] = sum_n h[d, n] * C[t, n] + D[d] * x[t, d]
                yb, ya = rows("Y")
                ccb, cca = self.region("CC", t)
                bb, ba = rows("DXD")
                self.emit(isa.Linear(matrix_buffer=self.h[0], matrix_address=self.h[1], chunk_count=Kn,
                                     row_tile_count=count, token_count=1, vector_buffer=ccb,
                                     vector_address=cca, output_buffer=yb, output_address=ya,
                                     init=LinearInit.BIAS, bias_buffer=bb, bias_address=ba))
            if self.scan_groups > 1:
                self.store_lines(self.ssm_state.address + j0 * Kn * self.P * self.config.compute_bytes,
                                 count * Kn, self.h[0], self.h[1])

        # 6. gate and out_proj.
        zb, za = self.region("Z")
        self.nonlinear(NonlinearFunction.SILU, zb, za, tokens * Di_l)
        yb, ya = self.region("Y")
        self.elementwise(ElementwiseOp.MUL, tokens, Di_l, (yb, ya, Di_l, 1), (yb, ya, Di_l, 1),
                         (zb, za, Di_l, 1))
        ob, oa = self.region("OUT")
        linear("out", "Y", Di_l, (ob, oa), Dm_l, "out_bias")
        self.emit(isa.Store(memory_address=self.output.address + t0 * self.output.row_stride,
                            row_count=tokens,
                            row_elements=d.d_model, memory_row_stride=self.output.row_stride, buffer=ob,
                            buffer_address=oa, buffer_row_stride=Dm_l * P))

        # 7. slide the conv window: the last d_conv steps move to the front (a forward copy is safe).
        self.elementwise(ElementwiseOp.PASS, dc, Di_l, (xb, xa, Di_l, 1),
                         (xb, xa + tokens * Di_l * P, Di_l, 1), spill=False)

    def compile(self) -> CompiledMixer:
        self.layout_memory()
        self.plan_buffers()
        d, P = self.dims, self.P
        # Start: parameters, states, zeroed activation regions, resident weights.
        self.load_lines(self.param_memory, self.param_lines, Buffer.WEIGHT, 0)
        if self.scan_groups == 1:
            self.load_scan_group(0, self.Jd)
        for name, (buffer, address) in self.regions.items():
            rows = {"H": self.Dm_l, "OUT": self.Dm_l, "DT": self.Rk_l, "BB": self.N_l, "CC": self.N_l}.get(
                name, self.Di_l)
            extra = d.d_conv * self.Di_l if name == "X" else 0
            self.zero_fill(buffer, address, rows * self.block_tokens + extra)
        xb, xa = self.regions["X"]
        self.load_lines(self.conv_state.address, d.d_conv * self.Di_l, xb, xa, compute=True)
        if self.weights_resident:
            for matrix in self.matrices.values():
                self.load_lines(matrix["memory"], matrix["lines"], Buffer.WEIGHT,
                                self.weight_area + matrix["offset"] * P)
        for t0 in range(0, self.length, self.block_tokens):
            self.compile_block(t0, min(self.block_tokens, self.length - t0))
        # End: the states go back in place.
        if self.scan_groups == 1:
            self.store_lines(self.ssm_state.address, self.ssm_state.rows, self.h[0], self.h[1])
        self.store_lines(self.conv_state.address, d.d_conv * self.Di_l, xb, xa)
        self.program.append(isa.Halt())
        program = insert_barriers(self.program, self.config)
        code = isa.encode_program(program)
        program_address = self.image.allocate("program", len(code))
        self.image.data[program_address:program_address + len(code)] = code
        return CompiledMixer(
            config=self.config, dims=self.dims, options=self.options, length=self.length,
            instructions=program,
            memory=bytes(self.image.data), program_address=program_address, hidden=self.hidden,
            output=self.output, conv_state=self.conv_state, ssm_state=self.ssm_state,
            block_tokens=self.block_tokens, weights_resident=self.weights_resident,
            regions=dict(self.image.regions))


def _copy_allocator(allocator: _Allocator) -> _Allocator:
    copy = _Allocator.__new__(_Allocator)
    copy.config, copy.free, copy.next = allocator.config, dict(allocator.free), dict(allocator.next)
    return copy


def compile_mixer(weights: dict, config: MarcaConfig, *, mode: str = "prefill", length: int | None = None,
                  options: CompileOptions = CompileOptions()) -> CompiledMixer:
    """Compile a Mamba-1 mixer.

    Parameters
    ----------
    weights : dict of str to Tensor
        transformers ``MambaMixer`` names (see the module docstring); any float dtype.
    config : MarcaConfig
    mode : "prefill" or "decode"
        ``prefill`` runs ``length`` tokens; ``decode`` one token (``length`` 1 or None).
    options : CompileOptions
    """
    if not isinstance(config, MarcaConfig):
        raise ValueError(f"config must be a MarcaConfig, not {config!r}")
    if mode not in ("prefill", "decode"):
        raise ValueError(f"mode must be 'prefill' or 'decode', not {mode!r}")
    if mode == "decode":
        if length not in (None, 1):
            raise ValueError(f"a decode step has length 1, not {length!r}")
        length = 1
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be a positive integer for a prefill, not {length!r}")
    if not isinstance(options, CompileOptions):
        raise ValueError(f"options must be a CompileOptions, not {options!r}")
    return _MixerCompiler(weights, config, length, options).compile()

