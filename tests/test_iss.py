"""The golden instruction-set simulator: directed programs per instruction class against float references
(tolerance) and against compositions of the golden unit models (bit for bit); errors, counters, the
undefined-behaviour checks; constrained-random programs."""

import dataclasses

import pytest
import torch

from marca import isa
from marca.config import DEFAULT, FPGA_SMALL, TINY
from marca.golden import fp, iss, nonlinear, pe_array
from marca.golden.random_program import random_program
from marca.isa import Buffer, ErrorCode
from marca.ops import Broadcast, ElementwiseOp

FP32_STORAGE = dataclasses.replace(DEFAULT, name="fp32-storage", storage_format="fp32")


class Image:
    """A memory image built piece by piece: the program at 0, data placed at chosen addresses."""

    def __init__(self, config, size=1 << 16):
        self.config = config
        self.memory = bytearray(size)

    def put(self, address, bits, *, compute=False):
        size = self.config.compute_bytes if compute else self.config.storage_bytes
        data = iss.pack_elements(bits, size)
        self.memory[address:address + len(data)] = data

    def get(self, machine, address, count, *, compute=False):
        size = self.config.compute_bytes if compute else self.config.storage_bytes
        fmt = self.config.compute_format if compute else self.config.storage_format
        return iss.unpack_elements(machine.memory_bytes()[address:address + count * size], size, fmt.width)

    def run(self, program, **options):
        code = isa.encode_program(program + [isa.Halt()])
        self.memory[:len(code)] = code
        result, machine = iss.run_program(self.config, self.memory, **options)
        return result, machine


def storage_bits(values, config):
    return fp.encode(torch.as_tensor(values, dtype=torch.float64), config.storage_format)


def to_compute(bits, config):
    return fp.convert(bits, config.storage_format, config.compute_format)


def load_lines(address, buffer, elements, config, row_elements=None, **fields):
    row_elements = row_elements or config.lanes
    return isa.Load(memory_address=address, row_count=elements // row_elements, row_elements=row_elements,
                    memory_row_stride=row_elements * config.storage_bytes, buffer=buffer,
                    buffer_row_stride=row_elements, **fields)


# LINEAR ---------------------------------------------------------------------------------------------------

def gemv_program(config, weight_bits, x_bits, bias_bits=None, **options):
    """GEMM of tokens ``x [T, in]`` by ``weight [out, in]`` (dims multiples of C and R)."""
    R, C = config.array_rows, config.array_cols
    out_dim, in_dim = weight_bits.shape
    T = x_bits.shape[0]
    J, K = out_dim // R, in_dim // C
    tiles = weight_bits.reshape(J, R, K, C).permute(0, 2, 1, 3).reshape(-1)
    image = Image(config)
    image.put(0x4000, tiles)
    image.put(0x8000, x_bits)
    program = [load_lines(0x4000, Buffer.WEIGHT, tiles.numel(), config),
               load_lines(0x8000, Buffer.ACTIVATION, x_bits.numel(), config, row_elements=in_dim)]
    init = {}
    if bias_bits is not None:
        image.put(0xA000, bias_bits)
        program.append(load_lines(0xA000, Buffer.STATE, out_dim, config, row_elements=out_dim))
        init = dict(init=isa.LinearInit.BIAS, bias_buffer=Buffer.STATE)
    program += [isa.Barrier(),
                isa.Linear(chunk_count=K, row_tile_count=J, token_count=T, vector_buffer=Buffer.ACTIVATION,
                           vector_token_stride=K, output_buffer=Buffer.SCRATCH, output_token_stride=J,
                           **init),
                isa.Barrier(),
                isa.Store(memory_address=0xC000, row_count=T, row_elements=out_dim,
                          memory_row_stride=out_dim * config.compute_bytes, buffer=Buffer.SCRATCH,
                          buffer_row_stride=out_dim, memory_format=isa.MemoryFormat.COMPUTE)]
    result, machine = image.run(program, **options)
    assert result.error == ErrorCode.NONE, result
    return image.get(machine, 0xC000, T * out_dim, compute=True).reshape(T, out_dim), result


@pytest.mark.parametrize("config", [DEFAULT, FPGA_SMALL, TINY], ids=lambda c: c.name)
def test_linear_matches_golden_composition_and_float(config):
    R, C = config.array_rows, config.array_cols
    generator = torch.Generator().manual_seed(3)
    out_dim, in_dim, T = 3 * R, 4 * C, 3
    weight = torch.randn(out_dim, in_dim, generator=generator, dtype=torch.float64)
    x = torch.randn(T, in_dim, generator=generator, dtype=torch.float64)
    bias = torch.randn(out_dim, generator=generator, dtype=torch.float64)
    w_bits, x_bits, b_bits = (storage_bits(v, config) for v in (weight, x, bias))
    out, result = gemv_program(config, w_bits, x_bits, b_bits)
    assert result.counters["linear_beats"] == T * 3 * 4
    fmt = config.compute_format
    for t in range(T):   # bit for bit: the PE array's golden GEMV on the converted operands
        expected = pe_array.gemv(to_compute(w_bits, config), to_compute(x_bits[t], config), fmt, cols=C,
                                 bias=to_compute(b_bits, config))
        assert torch.equal(out[t], expected)
    reference = fp.decode(x_bits, config.storage_format) @ fp.decode(w_bits, config.storage_format).T \
        + fp.decode(b_bits, config.storage_format)
    tolerance = 1e-5 if fmt == DEFAULT.compute_format else 5e-2
    assert torch.allclose(fp.decode(out, fmt), reference, rtol=tolerance, atol=tolerance * in_dim ** 0.5)


def _small_linear(pairs: str, chunk_order: str):
    """iss._linear_plain_small with the row tree's pairs (``"natural"``: (2i, 2i+1), ``"halves"``: (i, i +
    C/2)) and the chunk order (``"forward"``, ``"reverse"``) chosen: the right one and two wrong ones."""
    import numpy as np

    def linear(matrix, vector, bias):
        x = matrix.numpy()[None] * vector.numpy()[:, None, :, None, :]
        while x.shape[-1] > 1:
            half = x.shape[-1] // 2
            x = x[..., 0::2] + x[..., 1::2] if pairs == "natural" else x[..., :half] + x[..., half:]
        sums = x[..., 0] if chunk_order == "forward" else x[..., ::-1, :, 0]
        acc = np.zeros(sums.shape[:2] + sums.shape[3:], np.float32) if bias is None else bias.numpy().copy()
        for k in range(sums.shape[2]):
            acc = acc + sums[:, :, k]
        return torch.from_numpy(acc)
    return linear


@pytest.mark.parametrize("machine", ["reference", "fast, large path: natural column order",
                                     "fast, small path: tree on halves", "fast, small path: chunks reversed"])
def test_broken_linear_order_is_caught(monkeypatch, machine):
    """A simulator that sums a row left to right instead of the balanced tree (the reference machine), pairs
    the wrong columns (the fast machine's large path with its bit-reversed column order replaced by the
    natural order; its small numpy path adding halves instead of neighbours), or adds the chunks in the
    wrong order fails the bit-exact check."""
    config = FP32_STORAGE
    C = config.array_cols
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(config.array_rows, 4 * C, generator=generator, dtype=torch.float64) * \
        torch.logspace(-4, 4, 4 * C, dtype=torch.float64)
    x = torch.randn(1, 4 * C, generator=generator, dtype=torch.float64)
    w_bits, x_bits = storage_bits(weight, config), storage_bits(x, config)
    expected = pe_array.gemv(w_bits, x_bits[0], config.compute_format, cols=C)

    def sequential_sum(bits, fmt):
        total = bits[..., 0]
        for k in range(1, bits.shape[-1]):
            total = fp.add(total, bits[..., k], fmt)
        return total

    reference = machine == "reference"
    out, _ = gemv_program(config, w_bits, x_bits, reference=reference)
    assert torch.equal(out[0], expected)
    if reference:
        monkeypatch.setattr(iss.fp, "tree_sum", sequential_sum)
    elif "large path" in machine:
        monkeypatch.setattr(iss, "_LINEAR_SMALL", 0)
        out, _ = gemv_program(config, w_bits, x_bits)
        assert torch.equal(out[0], expected)          # the large path itself is right
        monkeypatch.setattr(iss, "_bit_reversal", lambda width: tuple(range(width)))
    else:
        monkeypatch.setattr(iss, "_linear_plain_small", _small_linear("natural", "forward"))
        out, _ = gemv_program(config, w_bits, x_bits)
        assert torch.equal(out[0], expected)          # the test's own copy of the small path is right
        pairs = "halves" if "halves" in machine else "natural"
        monkeypatch.setattr(iss, "_linear_plain_small",
                            _small_linear(pairs, "reverse" if "reversed" in machine else "forward"))
    broken, _ = gemv_program(config, w_bits, x_bits, reference=reference)
    assert not torch.equal(broken[0], expected)


# ELEMENTWISE and NONLINEAR: one scan step ---------------------------------------------------------------

def test_scan_step_matches_golden_composition_and_float():
    """h = exp(delta·A)·h + (delta·x)·B over J channel tiles × K state chunks with ROW/COLUMN broadcasts,
    then y = h·C + D·x through LINEAR with the state as the matrix."""
    config = FP32_STORAGE
    R, C, lanes = config.array_rows, config.array_cols, config.lanes
    J, K = 2, 2
    d_inner, d_state = J * R, K * C
    g = torch.Generator().manual_seed(5)
    A = -torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) * 4
    h = torch.randn(d_inner, d_state, generator=g, dtype=torch.float64)
    delta = torch.rand(d_inner, generator=g, dtype=torch.float64) * 0.5
    x = torch.randn(d_inner, generator=g, dtype=torch.float64)
    B = torch.randn(d_state, generator=g, dtype=torch.float64)
    Cv = torch.randn(d_state, generator=g, dtype=torch.float64)
    D = torch.randn(d_inner, generator=g, dtype=torch.float64)

    def tiles(matrix):   # [d_inner, d_state] -> lines (j, k) of R x C
        return matrix.reshape(J, R, K, C).permute(0, 2, 1, 3).reshape(-1)

    def line(vector):    # element-wise operands are whole lines: pad with zeros
        return torch.cat([vector, torch.zeros(lanes - len(vector), dtype=torch.float64)])

    bits = {name: storage_bits(v, config) for name, v in
            dict(A=tiles(A), h=tiles(h), delta=line(delta), x=line(x), B=B, C=Cv, D=line(D)).items()}
    image = Image(config)
    address = {}
    for n, (name, value) in enumerate(bits.items()):
        address[name] = 0x2000 + n * 0x1000
        image.put(address[name], value)
    E = Buffer.ACTIVATION
    S, X = Buffer.STATE, Buffer.SCRATCH
    layout = {"A": (Buffer.WEIGHT, 0), "h": (S, 0), "delta": (E, 0), "x": (E, lanes), "B": (E, 2 * lanes),
              "C": (E, 3 * lanes), "D": (Buffer.WEIGHT, J * K * lanes)}
    program = [isa.Load(memory_address=address[n], row_count=1, row_elements=bits[n].numel(), buffer=b,
                        buffer_address=a) for n, (b, a) in layout.items()]
    dA, dBx, dx, bias = 0, J * K * lanes, 2 * J * K * lanes, 2 * J * K * lanes + lanes
    tile_strides = dict(outer_count=J, inner_count=K, dst_outer_stride=K, dst_inner_stride=1)
    program += [
        isa.Barrier(),
        isa.Elementwise(op=ElementwiseOp.MUL, outer_count=1, inner_count=1, dst_buffer=X, dst_address=dx,
                        a_buffer=E, a_address=0, b_buffer=E, b_address=lanes),                 # delta·x
        isa.Elementwise(op=ElementwiseOp.MUL, outer_count=1, inner_count=1, dst_buffer=X, dst_address=bias,
                        a_buffer=Buffer.WEIGHT, a_address=J * K * lanes, b_buffer=E, b_address=lanes),  # D·x
        isa.Elementwise(op=ElementwiseOp.MUL, dst_buffer=X, dst_address=dA, **tile_strides,
                        a_buffer=E, a_broadcast=Broadcast.ROW, a_outer_stride=1,
                        b_buffer=Buffer.WEIGHT, b_outer_stride=K, b_inner_stride=1),            # delta·A
        isa.Nonlinear(function=isa.NonlinearFunction.EXP, line_count=J * K, src_buffer=X, src_address=dA,
                      dst_buffer=X, dst_address=dA),
        isa.Elementwise(op=ElementwiseOp.MUL, dst_buffer=X, dst_address=dBx, **tile_strides,
                        a_buffer=X, a_broadcast=Broadcast.ROW, a_address=dx, a_outer_stride=1,
                        b_buffer=E, b_broadcast=Broadcast.COLUMN, b_address=2 * lanes, b_inner_stride=1),
        isa.Elementwise(op=ElementwiseOp.MULADD, dst_buffer=S, **tile_strides,
                        a_buffer=X, a_address=dA, a_outer_stride=K, a_inner_stride=1,
                        b_buffer=S, b_outer_stride=K, b_inner_stride=1,
                        c_buffer=X, c_address=dBx, c_outer_stride=K, c_inner_stride=1),
        isa.Linear(matrix_buffer=S, chunk_count=K, row_tile_count=J, token_count=1, vector_buffer=E,
                   vector_address=3 * lanes, output_buffer=E, output_address=4 * lanes,
                   init=isa.LinearInit.BIAS, bias_buffer=X, bias_address=bias),
        isa.Barrier(),
        isa.Store(memory_address=0xC000, row_count=1, row_elements=J * K * lanes, buffer=S,
                  memory_format=isa.MemoryFormat.COMPUTE),
        isa.Store(memory_address=0xE000, row_count=1, row_elements=d_inner, buffer=E,
                  buffer_address=4 * lanes,
                  memory_format=isa.MemoryFormat.COMPUTE)]
    result, machine = image.run(program)
    assert result.error == ErrorCode.NONE, result
    h_out = image.get(machine, 0xC000, J * K * lanes, compute=True)
    y_out = image.get(machine, 0xE000, d_inner, compute=True)

    # Bit for bit: the same arithmetic composed from the golden unit models.
    fmt = config.compute_format
    c = {name: to_compute(value, config) for name, value in bits.items()}
    d_rows = c["delta"][:d_inner].reshape(J, 1, R, 1)
    x_rows = c["x"][:d_inner].reshape(J, 1, R, 1)
    decay = nonlinear.exp(fp.mul(d_rows, c["A"].reshape(J, K, R, C), fmt), config)
    drive = fp.mul(fp.mul(d_rows, x_rows, fmt), c["B"].reshape(1, K, 1, C), fmt)
    h_new = fp.add(fp.mul(decay, c["h"].reshape(J, K, R, C), fmt), drive, fmt)
    assert torch.equal(h_out, h_new.reshape(-1))
    y_expected = torch.cat([pe_array.linear_chunks(h_new[j], c["C"].reshape(K, 1, C).expand(K, R, C), fmt,
                                                   start=fp.mul(c["D"], c["x"], fmt)[j * R:(j + 1) * R])
                            for j in range(J)])
    assert torch.equal(y_out, y_expected)

    # Within tolerance of float64 (exp's polynomial error dominates).
    h_float = torch.exp(delta[:, None] * A) * h + (delta * x)[:, None] * B
    y_float = h_float @ Cv + D * x
    assert torch.allclose(fp.decode(h_out, fmt), tiles(h_float), rtol=1e-3, atol=1e-3)
    assert torch.allclose(fp.decode(y_out, fmt), y_float, rtol=1e-3, atol=1e-3)
    assert result.counters["elementwise_beats"] == 2 + 3 * J * K
    assert result.counters["nonlinear_lines"] == J * K


@pytest.mark.parametrize("function", list(isa.NonlinearFunction))
def test_nonlinear_matches_golden(function):
    config = TINY
    lanes = config.lanes
    values = torch.linspace(-6, 6, 8 * lanes, dtype=torch.float64)
    image = Image(config)
    image.put(0x1000, storage_bits(values, config))
    program = [load_lines(0x1000, Buffer.STATE, 8 * lanes, config), isa.Barrier(),
               isa.Nonlinear(function=function, line_count=8, src_buffer=Buffer.STATE,
                             dst_buffer=Buffer.SCRATCH,
                             dst_address=lanes),
               isa.Barrier(),
               isa.Store(memory_address=0x2000, row_count=1, row_elements=8 * lanes, buffer=Buffer.SCRATCH,
                         buffer_address=lanes)]
    result, machine = image.run(program)
    assert result.error == ErrorCode.NONE
    golden = {isa.NonlinearFunction.EXP: nonlinear.exp, isa.NonlinearFunction.SILU: nonlinear.silu,
              isa.NonlinearFunction.SOFTPLUS: nonlinear.softplus,
              isa.NonlinearFunction.RSQRT: nonlinear.rsqrt}[function]
    expected = golden(storage_bits(values, config), config)
    assert torch.equal(image.get(machine, 0x2000, 8 * lanes), expected)
    reference = {isa.NonlinearFunction.EXP: torch.exp, isa.NonlinearFunction.SILU: torch.nn.functional.silu,
                 isa.NonlinearFunction.SOFTPLUS: torch.nn.functional.softplus,
                 isa.NonlinearFunction.RSQRT: torch.rsqrt}[function](values)
    assert torch.allclose(fp.decode(expected, config.compute_format), reference, rtol=2e-2, atol=2e-2,
                          equal_nan=True)


# DMA ------------------------------------------------------------------------------------------------------

def test_dma_strides_and_conversions():
    config = DEFAULT                                     # bf16 storage, fp32 compute
    lanes = config.lanes
    g = torch.Generator().manual_seed(6)
    values = torch.randn(5, 12, generator=g, dtype=torch.float64)
    bits = storage_bits(values, config)
    image = Image(config)
    image.put(0x1000, bits)
    # Rows 1 and 3, elements 2..9 -> buffer rows 16 elements apart, then back out densely.
    program = [isa.Load(memory_address=0x1000 + (12 + 2) * 2, row_count=2, row_elements=8,
                        memory_row_stride=2 * 12 * 2, buffer=Buffer.STATE, buffer_address=3,
                        buffer_row_stride=16),
               isa.Store(memory_address=0x3000, row_count=2, row_elements=8, memory_row_stride=16,
                         buffer=Buffer.STATE, buffer_address=3, buffer_row_stride=16),
               isa.Store(memory_address=0x4000, row_count=1, row_elements=8, buffer=Buffer.STATE,
                         buffer_address=19, memory_format=isa.MemoryFormat.COMPUTE)]
    result, machine = image.run(program)
    assert result.error == ErrorCode.NONE, result
    assert torch.equal(image.get(machine, 0x3000, 16).reshape(2, 8), bits[[1, 3], 2:10])
    assert torch.equal(image.get(machine, 0x4000, 8, compute=True), to_compute(bits[3, 2:10], config))
    assert result.counters["dma_bytes_read"] == 32 and result.counters["dma_bytes_written"] == 32 + 32
    assert lanes == 64


def test_store_rounds_to_nearest_even():
    config = DEFAULT
    one = 0x3F800000
    patterns = torch.tensor([one | 0x8000, one | 0x18000, one | 0x8001, one | 0x7FFF, 0x00400000, 0x7F800001],
                            dtype=torch.int64)  # tie to even down, tie up, above tie, below, subnormal, NaN
    image = Image(config)
    image.put(0x1000, patterns, compute=True)
    program = [isa.Load(memory_address=0x1000, row_count=1, row_elements=6, buffer=Buffer.STATE,
                        memory_format=isa.MemoryFormat.COMPUTE),
               isa.Store(memory_address=0x2000, row_count=1, row_elements=6, buffer=Buffer.STATE)]
    result, machine = image.run(program)
    assert result.error == ErrorCode.NONE
    assert image.get(machine, 0x2000, 6).tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x0000, 0x7FC0]


# Errors, counters, undefined behaviour ---------------------------------------------------------------------

@pytest.mark.parametrize("code", [c for c in ErrorCode if c != ErrorCode.NONE])
def test_errors_halt_cleanly(code):
    config = FPGA_SMALL
    generated = random_program(config, seed=11, length=8, final_error=code)
    result, machine = iss.run_program(config, generated.memory)
    assert result.error == code
    faulting_pc = (len(generated.instructions) - (0 if code in (ErrorCode.ILLEGAL_OPCODE,
                                                                ErrorCode.ILLEGAL_FIELD) else 1)) * 32
    assert result.error_pc == faulting_pc
    assert result.counters["instructions"] == faulting_pc // 32
    assert result.counters["fetch_bytes"] == faulting_pc + 32


def test_fetch_errors():
    config = TINY
    result, _ = iss.run_program(config, bytes(64), program_address=16)
    assert result.error == ErrorCode.MISALIGNED
    barrier = isa.encode_program([isa.Barrier()])
    result, _ = iss.run_program(config, barrier)
    assert (result.error, result.error_pc) == (ErrorCode.BUS_ERROR, 32)


def _machine(config=TINY):
    memory = bytearray(4096)
    return iss.Machine(config, memory)


def test_missing_barrier_is_reported():
    machine = _machine()
    lanes = TINY.lanes
    machine.execute(isa.Load(memory_address=0, row_count=1, row_elements=lanes, buffer=Buffer.STATE))
    nonlinear_op = isa.Nonlinear(line_count=1, src_buffer=Buffer.STATE, dst_buffer=Buffer.SCRATCH)
    with pytest.raises(iss.ProgramError, match="barrier"):
        machine.execute(nonlinear_op)
    machine.execute(isa.Barrier())
    assert machine.execute(nonlinear_op) == ErrorCode.NONE
    # compute wrote SCRATCH; a store of it needs a barrier too
    with pytest.raises(iss.ProgramError, match="barrier"):
        machine.execute(isa.Store(memory_address=64, row_count=1, row_elements=1, buffer=Buffer.SCRATCH))
    # a load into a different region of SCRATCH does not
    assert machine.execute(isa.Load(memory_address=0, row_count=1, row_elements=lanes, buffer=Buffer.SCRATCH,
                                    buffer_address=lanes)) == ErrorCode.NONE


def test_overlap_and_undefined_are_reported():
    machine = _machine()
    lanes = TINY.lanes
    with pytest.raises(iss.ProgramError, match="undefined"):
        machine.execute(isa.Store(memory_address=0, row_count=1, row_elements=1, buffer=Buffer.STATE))
    machine.execute(isa.Load(memory_address=0, row_count=1, row_elements=4 * lanes, buffer=Buffer.STATE))
    machine.execute(isa.Barrier())
    # beat 1 reads line 1, which beat 0 wrote: undefined
    shift = isa.Elementwise(op=ElementwiseOp.PASS, outer_count=1, inner_count=3, dst_buffer=Buffer.STATE,
                            dst_address=lanes, dst_inner_stride=1, a_buffer=Buffer.STATE, a_inner_stride=1)
    with pytest.raises(iss.ProgramError, match="overlap"):
        machine.execute(shift)
    # the other direction (each beat reads a line no earlier beat wrote) is fine
    assert machine.execute(dataclasses.replace(shift, dst_address=0, a_address=lanes)) == ErrorCode.NONE
    with pytest.raises(iss.ProgramError, match="overlap"):
        machine.execute(isa.Nonlinear(line_count=2, src_buffer=Buffer.STATE, dst_buffer=Buffer.STATE,
                                      dst_address=lanes))


def test_runaway_program():
    program = isa.encode_program([isa.Barrier()] * 4)
    with pytest.raises(iss.ProgramError, match="runaway"):
        iss.run_program(TINY, program + bytes(64), max_instructions=3)


# Constrained-random programs -------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [TINY, FPGA_SMALL, DEFAULT], ids=lambda c: c.name)
def test_random_programs_are_legal_and_deterministic(config):
    for seed in range(3):
        generated = random_program(config, seed=seed, length=40)
        first, machine = iss.run_program(config, generated.memory)
        assert first.error == ErrorCode.NONE, first
        assert first.counters["instructions"] == len(generated.instructions)
        # The buffer start pattern must not matter: a legal program reads only what it wrote.
        as_tensor = torch.frombuffer(bytearray(generated.memory), dtype=torch.uint8)
        second, other = iss.run_program(config, as_tensor, buffer_fill=0)
        assert machine.memory_bytes() == other.memory_bytes()
        assert first.counters == second.counters
        assert machine.memory_bytes() != generated.memory      # it stored something


@pytest.mark.parametrize("op", [op for op in ElementwiseOp if op != ElementwiseOp.FUNCTION])
def test_simulator_ops_equal_pe_array_golden(op):
    """The ISS computes only the requested op; it must agree with the PE array's golden model bit for bit."""
    for fmt_config in (DEFAULT, TINY):
        fmt = fmt_config.compute_format
        generator = torch.Generator().manual_seed(int(op))
        a, b, c = (fp.random_bits(20000, fmt, generator) for _ in range(3))
        expected = pe_array.elementwise(op, a, b, c, fmt)
        assert torch.equal(iss.elementwise_op(op, {"a": a, "b": b, "c": c}, fmt), expected)
