"""The fast golden ISS against the slow oracle, bit for bit.

* fp.value_* (float32 values, as torch tensors and as numpy arrays) against the bit-pattern oracle fp.* :
  exhaustive over the 16-bit formats' one-input conversions, random pairs plus all pairs of special values
  plus pairs built on the underflow and rounding boundaries for the two-input operations;
* the lane extension on values (nonlinear.lane_function_values) against nonlinear.lane_function;
* linear_values (both FP32 paths) / elementwise_values / nonlinear_values against the oracle compositions;
* :class:`iss.Machine` against :class:`iss.ReferenceMachine` on constrained-random programs (every preset
  shape and format, every instruction class, every hardware error; ``MARCA_ISS_PROGRAMS`` sets how many per
  configuration, 6 by default: set it to 170 for the run of more than 1,000 that docs/iss.md records), on
  targeted GATHERs, on programs with barriers removed, through the reference fallback, and on compiled
  Mamba programs: memory image, result and counters;
* deliberately broken fast paths (a missing flush, the product fix left out, the flush check skipped
  on tiny data, a wrong tree or chunk order, lane functions without their range checks, GATHER's error
  order) are caught by the same checks;
* the device plumbing on ``device="cpu"``; the same equality on CUDA when a CUDA device is present.
"""

import dataclasses
import functools
import os

import numpy as np
import pytest
import torch

from marca import isa
from marca.config import DEFAULT, FPGA_MEDIUM, FPGA_SMALL, TINY
from marca.formats import BF16, FP16, FP32, FloatFormat
from marca.golden import fp, iss, nonlinear, pe_array
from marca.golden.random_program import random_program
from marca.isa import ErrorCode
from marca.ops import ElementwiseOp

FORMATS = [FP32, BF16, FP16, FloatFormat(5, 2), FloatFormat(4, 23), FloatFormat(8, 3)]
FP32_STORAGE = dataclasses.replace(DEFAULT, name="fp32-storage", storage_format="fp32")
BF16_FP32 = dataclasses.replace(FPGA_MEDIUM, name="bf16-storage-fp32", compute_format="fp32")
CONFIGS = [TINY, FPGA_SMALL, FPGA_MEDIUM, DEFAULT, FP32_STORAGE, BF16_FP32]
PROGRAMS = int(os.environ.get("MARCA_ISS_PROGRAMS", "6"))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def read(bits, fmt):
    """The oracle's reading of a pattern (DAZ, canonical NaN)."""
    return fp.encode(fp.decode(bits, fmt), fmt)


def fast(function, fmt, *bits, host=False):
    """A value_* function on patterns: to values (numpy arrays with ``host``), compute, back to patterns."""
    values = [fp.to_values(b, fmt) for b in bits]
    if host:
        with np.errstate(all="ignore"):
            return fp.from_values(torch.from_numpy(function(*(v.numpy() for v in values), fmt)), fmt)
    return fp.from_values(function(*values, fmt), fmt)


def boundary_pairs(fmt, count, generator):
    """Pairs whose products land within a few ulps of the smallest normal (both sides of the flush
    boundary, ties included) and pairs whose sums cancel to tiny results."""
    a = fp.random_bits(count, fmt, generator, specials=0)
    half_way = fmt.bias + fmt.emin // 2                  # a near 2^(emin/2), so b is normal too
    a = (a & ((1 << fmt.man_bits) - 1)) | (half_way << fmt.man_bits)
    a = a | (torch.randint(0, 2, (count,), generator=generator) << (fmt.width - 1))
    target = fp.encode(torch.full((count,), 2.0 ** fmt.emin, dtype=torch.float64)
                       / fp.decode(a, fmt).abs(), fmt)
    b = target + torch.randint(-3, 4, (count,), generator=generator)
    # Sums: x + (-(x ± a few ulps)) for x near the smallest normals, so the exact sum is tiny.
    x = fmt.smallest_normal + torch.randint(0, 1 << min(fmt.man_bits, 12), (count,), generator=generator)
    y = (x + torch.randint(-4, 5, (count,), generator=generator)).clamp(min=0) | fmt.sign_bit
    return torch.cat([a, x]), torch.cat([b, y])


def special_pairs(fmt):
    table = fp.special_values(fmt)
    return table.repeat_interleave(len(table)), table.repeat(len(table))


# Conversions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [BF16, FP16, FloatFormat(5, 2), FloatFormat(8, 3)], ids=lambda f: f.name)
def test_values_round_trip_every_pattern(fmt):
    every = torch.arange(1 << fmt.width, dtype=torch.int64)
    values = fp.to_values(every, fmt)
    assert values.dtype == torch.float32
    decoded = fp.decode(every, fmt)
    assert torch.equal(torch.isnan(values), torch.isnan(decoded))
    finite = ~torch.isnan(decoded)
    assert torch.equal(values.double()[finite], decoded[finite])
    assert torch.equal(torch.signbit(values[finite]), torch.signbit(decoded[finite]))
    assert torch.equal(fp.from_values(values, fmt), read(every, fmt))


@pytest.mark.parametrize("source", [BF16, FP16, FloatFormat(8, 3)], ids=lambda f: f.name)
@pytest.mark.parametrize("target", [FP32, BF16, FP16, FloatFormat(4, 3)], ids=lambda f: f.name)
def test_convert_every_pattern(source, target):
    every = torch.arange(1 << source.width, dtype=torch.int64)
    got = fp.from_values(fp.value_convert(fp.to_values(every, source), target), target)
    assert torch.equal(got, fp.convert(every, source, target))


@pytest.mark.parametrize("fmt", [BF16, FP16, FP32], ids=lambda f: f.name)
def test_values_of_memory_element_dtypes(fmt):
    """LOADs hand to_values the memory's own signed int16/int32 elements (a separate fast path)."""
    generator = torch.Generator().manual_seed(2)
    bits = torch.cat([torch.arange(1 << 16, dtype=torch.int64) if fmt.width == 16
                      else fp.random_bits(1_000_000, fmt, generator), fp.special_values(fmt)])
    dtype = {16: torch.int16, 32: torch.int32}[fmt.width]
    signed = (bits - ((bits >> (fmt.width - 1)) << fmt.width)).to(dtype)
    assert torch.equal(fp.to_values(signed, fmt).view(torch.int32), fp.to_values(bits, fmt).view(torch.int32))


def test_fp32_conversions_random_and_special():
    generator = torch.Generator().manual_seed(1)
    bits = torch.cat([fp.random_bits(1_000_000, FP32, generator), fp.special_values(FP32)])
    values = fp.to_values(bits, FP32)
    assert torch.equal(fp.from_values(values, FP32), read(bits, FP32))
    for target in (BF16, FP16, FloatFormat(5, 2)):
        got = fp.from_values(fp.value_convert(values, target), target)
        assert torch.equal(got, fp.convert(bits, FP32, target))


@pytest.mark.parametrize("target", [FP32, BF16, FloatFormat(8, 3), FP16], ids=lambda f: f.name)
def test_value_bits_equal_oracle(target):
    """fp.value_bits (what a STORE writes; numpy's integer shortcut for targets with float32's exponent
    field) against the oracle's conversion, from FP32 values: random, special, and values whose rounding
    ties, carries into the exponent or overflows."""
    generator = torch.Generator().manual_seed(23)
    largest = FP32.largest_finite
    bits = torch.cat([fp.random_bits(300_000, FP32, generator), fp.special_values(FP32),
                      torch.tensor([largest, largest - 1, largest - (1 << 15), 0x3F808000, 0x3F818000,
                                    0x3F807FFF, 0x3F80FFFF, 0xBF808000])])
    expected = fp.convert(bits, FP32, target)
    values = fp.to_values(bits, FP32)
    assert torch.equal(fp.value_bits(values, target), expected)
    assert torch.equal(torch.from_numpy(fp.value_bits(values.numpy(), target)), expected)
    strided = values[::3]                                     # STORE hands it strided views of the buffer
    assert torch.equal(torch.from_numpy(fp.value_bits(strided.numpy(), target)), expected[::3])


# Two-input operations ---------------------------------------------------------------------------------------

BINARY = {"mul": (fp.value_mul, fp.mul), "add": (fp.value_add, fp.add), "sub": (fp.value_sub, fp.sub),
          "minimum": (fp.value_minimum, fp.minimum), "maximum": (fp.value_maximum, fp.maximum)}


def binary_mismatches(name, fmt, a, b, host=False):
    value_function, oracle = BINARY[name]
    return int((fast(value_function, fmt, a, b, host=host) != oracle(a, b, fmt)).sum())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("name", list(BINARY))
def test_binary_equals_oracle(fmt, name):
    generator = torch.Generator().manual_seed(hash((fmt.exp_bits, fmt.man_bits, name)) % 1000)
    count = 1_000_000 if fmt == FP32 and name in ("mul", "add") else 200_000
    pairs = [(fp.random_bits(count, fmt, generator), fp.random_bits(count, fmt, generator)),
             special_pairs(fmt), boundary_pairs(fmt, 50_000, generator)]
    for a, b in pairs:
        assert binary_mismatches(name, fmt, a, b) == 0


@pytest.mark.parametrize("fmt", [FP32, BF16], ids=lambda f: f.name)
@pytest.mark.parametrize("name", list(BINARY))
def test_binary_on_numpy_equals_oracle(fmt, name):
    """The same value functions on numpy arrays (what the ISS runs for small FP32 instructions on the
    CPU): random pairs, all pairs of special values, the flush boundary."""
    generator = torch.Generator().manual_seed(hash((fmt.exp_bits, fmt.man_bits, name, "numpy")) % 1000)
    pairs = [(fp.random_bits(100_000, fmt, generator), fp.random_bits(100_000, fmt, generator)),
             special_pairs(fmt), boundary_pairs(fmt, 50_000, generator)]
    for a, b in pairs:
        assert binary_mismatches(name, fmt, a, b, host=True) == 0


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_mul_add_and_compare_select_equal_oracle(fmt):
    generator = torch.Generator().manual_seed(7)
    a, b, c = (fp.random_bits(200_000, fmt, generator) for _ in range(3))
    got = fast(fp.value_mul_add, fmt, a, b, c)
    assert torch.equal(got, fp.mul_add(a, b, c, fmt))
    for op in (ElementwiseOp.CMP_SELECT, ElementwiseOp.PASS):
        values = {name: fp.to_values(x, fmt) for name, x in (("a", a), ("b", b), ("c", c))}
        got = fp.from_values(iss.elementwise_values(op, values, fmt), fmt)
        assert torch.equal(got, iss.elementwise_op(op, {"a": a, "b": b, "c": c}, fmt))


def test_boundary_pairs_straddle_the_flush():
    """The boundary pairs really test the boundary: the oracle rounds some products up to the smallest
    normal, flushes others, and some of them are the ties that gradual underflow rounds the other way."""
    generator = torch.Generator().manual_seed(3)
    a, b = boundary_pairs(FP32, 50_000, generator)
    oracle = fp.mul(a, b, FP32) & ~FP32.sign_bit
    assert int((oracle == FP32.smallest_normal).sum()) > 1000 and int((oracle == 0).sum()) > 1000
    ieee = (fp.to_values(a, FP32) * fp.to_values(b, FP32)).view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    assert int(((ieee == FP32.smallest_normal) & (oracle == 0)).sum()) > 0


@pytest.mark.parametrize("host", [False, True], ids=["torch", "numpy"])
@pytest.mark.parametrize("fault", ["no product fix", "strict product test", "no sum flush"])
def test_broken_fast_paths_are_caught(monkeypatch, fault, host):
    generator = torch.Generator().manual_seed(5)
    a, b = boundary_pairs(FP32, 50_000, generator)
    name = "add" if fault == "no sum flush" else "mul"
    assert binary_mismatches(name, FP32, a, b, host=host) == 0
    if fault == "no product fix":
        monkeypatch.setattr(fp, "_fp32_product", lambda a, b, product: product)
    elif fault == "strict product test":     # the fix applied only below 2^-126, not at it
        original = fp._fp32_product

        def strict(a, b, product):
            return fp._xp(product).where(abs(product) == 2.0 ** -126, product, original(a, b, product))
        monkeypatch.setattr(fp, "_fp32_product", strict)
    else:
        monkeypatch.setattr(fp, "_fp32_flush", lambda total: total)
    assert binary_mismatches(name, FP32, a, b, host=host) > 0


# Row trees and accumulators ------------------------------------------------------------------------------

def linear_case(fmt, J, K, R, C, T, generator, kind):
    """Random patterns (``random``), magnitudes in [2^-20, 2^20) (``plain``: the float32 path without flush
    checks), or products and sums around the smallest normal (``underflow``)."""
    matrix = fp.random_bits(J * K * R * C, fmt, generator, specials=0.01).reshape(J, K, R, C)
    vector = fp.random_bits(T * K * C, fmt, generator, specials=0.01).reshape(T, K, C)
    bias = fp.random_bits(T * J * R, fmt, generator, specials=0.01).reshape(T, J, R)
    if kind != "random":
        centre = {"plain": (0, 0, 0), "underflow": (fmt.emin // 2, fmt.emin - fmt.emin // 2, fmt.emin)}[kind]
        spread = 20 if kind == "plain" else 3

        def exponents(bits, middle):
            exponent = (fmt.bias + middle + torch.randint(-spread, spread, bits.shape, generator=generator))
            exponent = exponent.clamp(1, fmt.exp_max - 1)
            return (bits & (fmt.sign_bit | ((1 << fmt.man_bits) - 1))) | (exponent << fmt.man_bits)
        matrix, vector, bias = (exponents(x, m) for x, m in zip((matrix, vector, bias), centre))
    return matrix, vector, bias


def linear_oracle(matrix, vector, bias, fmt):
    products = fp.mul(matrix[None], vector[:, None, :, None, :], fmt)      # [T, J, K, R, C]
    sums = fp.tree_sum(products, fmt)
    acc = bias.clone()
    for k in range(matrix.shape[1]):
        acc = fp.add(acc, sums[:, :, k], fmt)
    return acc


def linear_fast(matrix, vector, bias, fmt):
    values = [None if x is None else fp.to_values(x, fmt) for x in (matrix, vector, bias)]
    return fp.from_values(iss.linear_values(*values, fmt), fmt)


@pytest.mark.parametrize("fmt", [FP32, BF16, FP16], ids=lambda f: f.name)
@pytest.mark.parametrize("kind", ["plain", "random", "underflow"])
def test_linear_values_equal_oracle(monkeypatch, fmt, kind):
    """Both FP32 paths (numpy for small instructions, blocked torch for large ones) on every case."""
    generator = torch.Generator().manual_seed(11)
    for J, K, R, C, T in [(3, 4, 2, 8, 2), (2, 3, 4, 4, 3), (1, 2, 1, 1, 1), (2, 5, 3, 16, 1)]:
        matrix, vector, bias = linear_case(fmt, J, K, R, C, T, generator, kind)
        expected = linear_oracle(matrix, vector, bias, fmt)
        for small in (iss._LINEAR_SMALL, 0):
            monkeypatch.setattr(iss, "_LINEAR_SMALL", small)
            assert torch.equal(linear_fast(matrix, vector, bias, fmt), expected)
            assert torch.equal(linear_fast(matrix, vector, None, fmt), linear_oracle(
                matrix, vector, torch.zeros_like(bias), fmt))
    # Cross-check the oracle composition with the PE array's golden GEMV on one token.
    matrix, vector, bias = linear_case(fmt, 2, 3, 2, 4, 1, generator, kind)
    weight = matrix.permute(0, 2, 1, 3).reshape(4, 12)
    expected = pe_array.gemv(weight, vector.reshape(-1), fmt, cols=4, bias=bias.reshape(-1))
    assert torch.equal(linear_fast(matrix, vector, bias, fmt).reshape(-1), expected)


@pytest.mark.parametrize("fmt", [FP32, BF16, FP16], ids=lambda f: f.name)
def test_linear_device_path_equals_oracle(fmt):
    """The device LINEAR (blocked torch with the contract's value operations, what ``device="cuda"`` runs)
    run here on CPU tensors: equal to the oracle on random, plain and underflow data for blocks of one row
    tile, a few tiles and the whole instruction; wrong with a column order not the tree's, or with float32's
    own operations (no rounding to the format, no flush)."""
    generator = torch.Generator().manual_seed(13)
    for kind in ("random", "plain", "underflow"):
        for J, K, R, C, T in [(3, 4, 2, 8, 2), (2, 5, 3, 16, 3)]:
            matrix, vector, bias = linear_case(fmt, J, K, R, C, T, generator, kind)
            expected = linear_oracle(matrix, vector, bias, fmt)
            values = [fp.to_values(x, fmt) for x in (matrix, vector, bias)]
            for block in (1, K * R * C * 2, iss._DEVICE_LINEAR_BLOCK):
                got = iss._linear_blocked(*values, fmt, plain=False, block=block)
                assert torch.equal(fp.from_values(got, fmt), expected), (kind, block)
            if kind == "underflow":       # float32's own operations keep subnormals: no flush
                own = iss._linear_blocked(*values, fmt, plain=True, block=1)
                assert not torch.equal(fp.from_values(fp.value_convert(own, fmt), fmt), expected), kind
    matrix, vector, bias = (fp.encode(torch.randn(shape, generator=generator, dtype=torch.float64), fmt)
                            for shape in ((2, 5, 3, 16), (3, 5, 16), (3, 2, 3)))   # sums whose order shows
    values = [fp.to_values(x, fmt) for x in (matrix, vector, bias)]
    natural = iss._linear_blocked(values[0][..., torch.tensor(iss._bit_reversal(16))], *values[1:], fmt,
                                  plain=False, block=1 << 20)     # bit reversal applied twice: natural pairs
    assert not torch.equal(fp.from_values(natural, fmt), linear_oracle(matrix, vector, bias, fmt))
    if fmt != FP32:                      # float32's own operations: no rounding of each step to the format
        own = iss._linear_blocked(*values, fmt, plain=True, block=1 << 20)
        assert not torch.equal(fp.from_values(fp.value_convert(own, fmt), fmt),
                               linear_oracle(matrix, vector, bias, fmt))


def test_linear_fast_path_without_its_guard_is_caught(monkeypatch):
    """The plain float32 path (no flush checks) is exact only on data without tiny magnitudes: with the
    guard forced open, tiny data gives a different result."""
    generator = torch.Generator().manual_seed(12)
    fmt = FP32
    found = False
    for _ in range(5):
        matrix, vector, bias = linear_case(fmt, 4, 4, 4, 8, 2, generator, "underflow")
        assert torch.equal(linear_fast(matrix, vector, bias, fmt), linear_oracle(matrix, vector, bias, fmt))
        with monkeypatch.context() as patch:
            patch.setattr(iss, "_no_tiny", lambda values: True)
            found |= not torch.equal(linear_fast(matrix, vector, bias, fmt),
                                     linear_oracle(matrix, vector, bias, fmt))
    assert found


@pytest.mark.parametrize("variant", ["columns in natural order", "no flush below the smallest normal",
                                     "one bit too many"])
@pytest.mark.parametrize("fmt", [FP32, BF16, FP16], ids=lambda f: f.name)
def test_linear_rounded_broken_variants_are_caught(monkeypatch, fmt, variant):
    """The compiled rounded LINEAR (golden/kernels.py: every format on the CPU, FP32 with tiny operands)
    equals the oracle, and the same loop fed a wrong column order, no flush, or one significant bit too
    many does not, on the same cases."""
    generator = torch.Generator().manual_seed(21)
    shapes = [(3, 4, 2, 8, 2), (2, 5, 3, 16, 1), (4, 6, 4, 4, 2)]
    if "flush" in variant:
        cases = [linear_case(fmt, *shape, generator, "underflow") for shape in shapes]
    else:                                # normal-distributed operands: sums whose order and rounding show
        cases = [[fp.encode(torch.randn(shape, generator=generator, dtype=torch.float64), fmt)
                  for shape in ((J, K, R, C), (T, K, C), (T, J, R))] for J, K, R, C, T in shapes]
    expected = [linear_oracle(*case, fmt) for case in cases]
    assert all(torch.equal(linear_fast(*case, fmt), want) for case, want in zip(cases, expected))
    if fmt == FP32 and "flush" not in variant:   # FP32 data without tiny magnitudes takes the plain paths:
        monkeypatch.setattr(iss, "_no_tiny", lambda values: False)    # force the rounded loop
        assert all(torch.equal(linear_fast(*case, fmt), want) for case, want in zip(cases, expected))
    bits, overflow, underflow = iss._rounding(fmt)
    if variant == "columns in natural order":
        monkeypatch.setattr(iss, "_bit_reversal", lambda width: tuple(range(width)))
    elif variant == "no flush below the smallest normal":
        monkeypatch.setattr(iss, "_rounding", lambda f: (bits, overflow, 0.0))
    else:
        monkeypatch.setattr(iss, "_rounding", lambda f: (bits + 1, overflow, underflow))
    assert any(not torch.equal(linear_fast(*case, fmt), want) for case, want in zip(cases, expected))


@pytest.mark.parametrize("config", [DEFAULT, FPGA_SMALL, TINY], ids=lambda c: c.name)
def test_nonlinear_values_equal_golden(config):
    fmt = config.compute_format
    generator = torch.Generator().manual_seed(13)
    bits = torch.cat([fp.random_bits(5_000, fmt, generator), fp.special_values(fmt)])
    for function in isa.NonlinearFunction:
        golden = iss._NONLINEAR_GOLDEN[function](bits, config)
        got = fp.from_values(iss.nonlinear_values(function, fp.to_values(bits, fmt), config), fmt)
        assert torch.equal(got, golden), function.name


@pytest.mark.parametrize("fmt", [FP32, BF16, FP16], ids=lambda f: f.name)
def test_lane_function_values_equal_golden(fmt):
    """The lane extension on values (nonlinear.lane_function_values, what the ISS runs) against the
    bit-pattern golden lane_function, on the patterns a value can hold (read: DAZ, canonical NaN): random
    pairs, all pairs of special values, and EXP_SCALE's b across its whole window and beyond it."""
    constants = nonlinear.build_constants(fmt=fmt)
    generator = torch.Generator().manual_seed(17)
    specials = special_pairs(fmt)
    window = fp.decode(torch.tensor([constants.round_constant]), fmt) \
        + torch.randint(-3 << fmt.exp_bits, 3 << fmt.exp_bits, (20_000,), generator=generator).double()
    a = torch.cat([fp.random_bits(40_000, fmt, generator), specials[0],
                   fp.random_bits(20_000, fmt, generator)])
    b = torch.cat([fp.random_bits(40_000, fmt, generator), specials[1], fp.encode(window, fmt)])
    a, b = read(a, fmt), read(b, fmt)
    for function in nonlinear.LaneFunction:
        golden = read(nonlinear.lane_function(function, a, b, b, constants), fmt)
        got = fp.from_values(nonlinear.lane_function_values(function, fp.to_values(a, fmt),
                                                            fp.to_values(b, fmt), None, constants), fmt)
        assert torch.equal(got, golden), function.name


@pytest.mark.parametrize("fault", ["exp_scale without its range check",
                                   "negative_magnitude without its clamp",
                                   "rsqrt_select with unsigned zeros"])
def test_broken_lane_function_values_are_caught(monkeypatch, fault):
    """A wrong value-domain lane function makes the ISS's NONLINEAR differ from the golden functions."""
    config = DEFAULT
    fmt = config.compute_format
    generator = torch.Generator().manual_seed(19)
    bits = torch.cat([fp.random_bits(5_000, fmt, generator), fp.special_values(fmt),
                      fp.encode(torch.tensor([-200.0, -100.0, 90.0, 200.0], dtype=torch.float64), fmt)])
    functions = list(isa.NonlinearFunction)

    def mismatches():
        return sum(int((fp.from_values(iss.nonlinear_values(f, fp.to_values(bits, fmt), config), fmt)
                        != iss._NONLINEAR_GOLDEN[f](bits, config)).sum()) for f in functions)
    assert mismatches() == 0
    # The ISS hands the lane functions numpy arrays on the CPU (FP32), torch tensors elsewhere.
    if fault == "exp_scale without its range check":
        def broken(a, b, constants):
            host = isinstance(a, np.ndarray)
            a, b = (torch.from_numpy(np.asarray(x)) if host else x for x in (a, b))
            n = b.double() - fp.decode(torch.tensor([constants.round_constant]), constants.fmt)[0]
            out = torch.ldexp(a.double(), n.clamp(-600, 600)).float()
            return out.numpy() if host else out
        monkeypatch.setattr(nonlinear, "exp_scale_values", broken)
    elif fault == "negative_magnitude without its clamp":       # -Inf then makes exp's reduction NaN
        monkeypatch.setattr(nonlinear, "negative_magnitude_values", lambda a: -abs(a))
    else:
        original = nonlinear.rsqrt_select_values
        monkeypatch.setattr(nonlinear, "rsqrt_select_values",
                            lambda x, b: fp._xp(x).where(x == 0, np.float32(np.inf), original(x, b)))
    assert mismatches() > 0


# Whole programs -----------------------------------------------------------------------------------------

def run_both(config, memory, program_address=0, device="cpu", **options):
    expected, reference = iss.run_program(config, memory, program_address, reference=True, **options)
    got, machine = iss.run_program(config, memory, program_address, device=device, **options)
    return (expected, reference.memory_bytes()), (got, machine.memory_bytes())


def assert_same(expected, got, where):
    (result, image), (fast_result, fast_image) = expected, got
    assert (fast_result.error, fast_result.error_pc, fast_result.pc) == \
        (result.error, result.error_pc, result.pc), where
    assert fast_result.counters == result.counters, where
    assert fast_image == image, where


ERROR_CODES = [code for code in ErrorCode if code != ErrorCode.NONE]


def random_cases(config, count, offset=0):
    """``count`` random programs; every second one ends in a hardware error, the codes in turn from
    ERROR_CODES[offset]."""
    for seed in range(count):
        final = ERROR_CODES[(seed // 2 + offset) % len(ERROR_CODES)] if seed % 2 else ErrorCode.NONE
        yield seed, random_program(config, seed=1000 + seed, length=16 + seed % 24, final_error=final)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_random_programs_equal_reference(config):
    """PROGRAMS random programs per configuration (default 6, half of them ending in a hardware error;
    the configurations start the error codes at different places, so that over the six every code ends at
    least two programs), every instruction class among each configuration's programs."""
    classes = set()
    for seed, generated in random_cases(config, PROGRAMS, offset=3 * CONFIGS.index(config)):
        expected, got = run_both(config, generated.memory)
        assert_same(expected, got, f"{config.name} seed {seed}")
        assert got[0].error == generated.expected_error, f"{config.name} seed {seed}"
        classes |= {type(i) for i in generated.instructions}
    if PROGRAMS >= 6:
        assert classes >= {isa.Load, isa.Gather, isa.Store, isa.Linear, isa.Elementwise, isa.Nonlinear,
                           isa.Barrier}, config.name


def test_random_programs_cover_every_error_code():
    """The schedule of test_random_programs_equal_reference ends programs in every hardware error."""
    ended = {ERROR_CODES[(seed // 2 + 3 * k) % len(ERROR_CODES)]
             for k in range(len(CONFIGS)) for seed in range(1, PROGRAMS, 2)}
    assert PROGRAMS < 6 or ended == set(ERROR_CODES)


def without_barriers(generated, keep):
    """The generated program without the BARRIERs whose number ``keep(number)`` rejects (its memory image
    otherwise unchanged)."""
    barriers = [n for n, i in enumerate(generated.instructions) if isinstance(i, isa.Barrier)]
    dropped = {n for k, n in enumerate(barriers) if not keep(k)}
    program = [i for n, i in enumerate(generated.instructions) if n not in dropped]
    code = isa.encode_program(program)
    memory = bytearray(generated.memory)
    memory[generated.program_address:generated.program_address + len(code)] = code
    return bytes(memory)


@pytest.mark.parametrize("config", [TINY, DEFAULT], ids=lambda c: c.name)
def test_missing_barriers_equal_reference(config):
    """Random programs with every BARRIER, or every third, removed: both machines raise the same
    ProgramError (kind and message: which stream, which buffer, the first element) or, where no hazard
    remains, agree on the run. This holds the fast machine's span-and-stamp bookkeeping to the reference's
    per-element masks."""
    raised = 0
    for seed, generated in random_cases(config, 6):
        memory = without_barriers(generated, (lambda k: False) if seed % 2 else (lambda k: k % 3 != seed % 3))
        outcomes = []
        for reference in (True, False):
            try:
                result, machine = iss.run_program(config, memory, generated.program_address,
                                                  reference=reference)
                outcomes.append((result.error, result.error_pc, result.counters, machine.memory_bytes()))
            except iss.ProgramError as error:
                outcomes.append(str(error))
        assert outcomes[0] == outcomes[1], f"{config.name} seed {seed}"
        raised += isinstance(outcomes[0], str) and outcomes[0].startswith("barrier")
    assert raised >= 3


def test_reference_fallback_equals_reference(monkeypatch):
    """An instruction class without a fast handler runs on a ReferenceMachine handed the fast machine's
    state (every class has a handler today; GATHER, NONLINEAR and STORE are taken away here)."""
    makers = {cls: maker for cls, maker in iss._PLAN_MAKERS.items()
              if cls not in (isa.Gather, isa.Nonlinear, isa.Store)}
    monkeypatch.setattr(iss, "_PLAN_MAKERS", makers)
    monkeypatch.setattr(iss, "_PLAN_CACHE", {})
    for config, offset in ((DEFAULT, 6), (TINY, 5)):     # the second program: INDEX_RANGE, BUS_ERROR
        for seed, generated in random_cases(config, 2, offset=offset):
            assert_same(*run_both(config, generated.memory), f"{config.name} seed {seed}")
        generated = next(random_cases(config, 1))[1]
        memory = without_barriers(generated, lambda k: False)
        messages = []
        for reference in (True, False):
            with pytest.raises(iss.ProgramError) as error:
                iss.run_program(config, memory, generated.program_address, reference=reference)
            messages.append(str(error.value))
        assert messages[0] == messages[1]


def test_program_errors_equal_reference():
    """Undefined behaviour raises the same ProgramError (kind and message) on both machines, and a
    program that modifies its own code is fetched anew."""
    config = TINY
    lanes = config.lanes
    cases = {
        "undefined": [isa.Store(memory_address=0x800, row_count=1, row_elements=1, buffer=isa.Buffer.STATE)],
        "barrier": [isa.Load(memory_address=0x800, row_count=1, row_elements=lanes, buffer=isa.Buffer.STATE),
                    isa.Nonlinear(line_count=1, src_buffer=isa.Buffer.STATE, dst_buffer=isa.Buffer.SCRATCH)],
        "overlap": [isa.Load(memory_address=0x800, row_count=1, row_elements=4 * lanes,
                             buffer=isa.Buffer.STATE),
                    isa.Barrier(),
                    isa.Elementwise(op=ElementwiseOp.PASS, outer_count=1, inner_count=3,
                                    dst_buffer=isa.Buffer.STATE, dst_address=lanes, dst_inner_stride=1,
                                    a_buffer=isa.Buffer.STATE, a_inner_stride=1)],
    }
    for kind, program in cases.items():
        memory = bytearray(0x1000)
        code = isa.encode_program(program + [isa.Halt()])
        memory[:len(code)] = code
        messages = []
        for reference in (True, False):
            with pytest.raises(iss.ProgramError, match=kind) as error:
                iss.run_program(config, memory, reference=reference)
            messages.append(str(error.value))
        assert messages[0] == messages[1]
    # Self-modifying code: the program's STORE overwrites its own first instruction with zeros (an
    # illegal opcode); running the same machine again must fetch the new word, not a cached one.
    memory = bytearray(0x1000)
    program = [isa.Barrier(),
               isa.Load(memory_address=0x800, row_count=1, row_elements=16, buffer=isa.Buffer.STATE),
               isa.Barrier(),
               isa.Store(memory_address=0, row_count=1, row_elements=16, buffer=isa.Buffer.STATE),
               isa.Halt()]
    code = isa.encode_program(program)
    memory[:len(code)] = code
    results = []
    for machine in (iss.ReferenceMachine(config, memory), iss.Machine(config, memory)):
        first, second = machine.run(), machine.run()
        results.append((first.error, second.error, second.error_pc, second.counters, machine.memory_bytes()))
    assert results[0] == results[1]
    assert results[1][:3] == (ErrorCode.NONE, ErrorCode.ILLEGAL_OPCODE, 0)


@pytest.mark.parametrize("fetch_limit", [None, 5], ids=["fetch cache", "fetch cache of 5"])
@pytest.mark.parametrize("config", [TINY, FPGA_SMALL, DEFAULT], ids=lambda c: c.name)
def test_restarted_machine_equals_a_new_one(monkeypatch, config, fetch_limit):
    """A machine kept for a sequence of programs (restart, host writes, run: what ModelSession does) runs
    each program as a new machine on the same image would: memory, result and counters; a read of an
    element that only the previous program wrote is undefined again; code the host overwrites is fetched
    anew. Also with a fetch cache that overflows (and starts over) many times per program."""
    if fetch_limit:
        monkeypatch.setattr(iss, "_FETCH_CACHE_LIMIT", fetch_limit)
    generated = [random_program(config, seed=seed, length=30) for seed in (3, 4)]
    kept = iss.Machine(config, generated[0].memory)
    image = generated[0].memory
    for step, program in enumerate(generated + generated[:1]):
        if step:                      # the host writes the next program's whole image (data and code)
            assert len(program.memory) == kept.memory_size
            kept.write_memory(0, program.memory)
            image = program.memory
        kept.restart()
        result = kept.run(program.program_address)
        fresh_result, fresh = iss.run_program(config, image, program.program_address)
        assert (result, kept.memory_bytes()) == (fresh_result, fresh.memory_bytes())
    lanes = config.lanes
    load = isa.Load(memory_address=0x800, row_count=1, row_elements=lanes, buffer=isa.Buffer.STATE)
    store = isa.Store(memory_address=0xA00, row_count=1, row_elements=lanes, buffer=isa.Buffer.STATE)
    machine = iss.Machine(config, bytearray(0x1000))
    machine.write_memory(0, isa.encode_program([load, isa.Barrier(), store, isa.Halt()]))
    assert machine.run().error == ErrorCode.NONE
    machine.write_memory(0, isa.encode_program([store, isa.Halt()]))
    machine.restart()
    with pytest.raises(iss.ProgramError, match="undefined"):
        machine.run()
    with pytest.raises(ValueError, match="outside the memory image"):
        machine.write_memory(0xFFF, b"ab")


def test_progress_is_reported(monkeypatch):
    """A long run reports its progress every PROGRESS_INTERVAL instructions and runs as without it."""
    monkeypatch.setattr(iss, "PROGRESS_INTERVAL", 4)
    generated = random_program(TINY, seed=5, length=30)
    seen = []
    result, machine = iss.run_program(TINY, generated.memory, generated.program_address)
    reported = iss.Machine(TINY, generated.memory)
    assert reported.run(generated.program_address, progress=seen.append) == result
    executed = result.counters["instructions"]              # the HALT included
    assert seen == list(range(4, executed, 4)) and len(seen) > 3
    assert reported.memory_bytes() == machine.memory_bytes()


def gather_case(config, ids, table_rows, *, row_elements=None, buffer_row_stride=None, memory_bytes=0x3000,
                index_address=0x2000):
    """A GATHER of ``ids`` from a random table at 0x1000 into STATE, then a STORE of what it wrote."""
    lanes = config.lanes
    elements = row_elements or lanes
    size = config.storage_bytes
    stride = elements if buffer_row_stride is None else buffer_row_stride
    generator = torch.Generator().manual_seed(len(ids) + table_rows)
    memory = bytearray(0x3000)
    table = iss.pack_elements(fp.random_bits(8 * elements, config.storage_format, generator), size)
    memory[0x1000:0x1000 + len(table)] = table
    for r, row_id in enumerate(ids):
        memory[index_address + 4 * r:index_address + 4 * r + 4] = row_id.to_bytes(4, "little")
    program = [isa.Gather(memory_address=0x1000, row_count=len(ids), row_elements=elements,
                          memory_row_stride=elements * size, buffer=isa.Buffer.STATE,
                          buffer_row_stride=stride, index_address=index_address, table_rows=table_rows),
               isa.Barrier(),
               isa.Store(memory_address=0x2800, row_count=len(ids), row_elements=elements,
                         memory_row_stride=elements * size, buffer=isa.Buffer.STATE,
                         buffer_row_stride=stride),
               isa.Halt()]
    code = isa.encode_program(program)
    memory[:len(code)] = code
    return memory[:memory_bytes]


GATHER_CASES = {   # (ids, table_rows, options)
    "in order": ([0, 1, 2, 3], 4, {}),
    "repeats and the last row": ([3, 3, 0, 7, 7], 8, {}),
    "rows overlapping in the buffer (later rows win)": ([1, 2, 5, 0], 8, {"buffer_row_stride": 3}),
    "one element per row": ([4, 0, 6], 7, {"row_elements": 1}),
    "id one past the table": ([0, 1, 4, 2], 4, {}),
    "id far beyond the table": ([0, 0xFFFFFFFF], 4, {}),
    "ids beyond memory": ([1, 2, 3], 8, {"index_address": 0x2ff8}),
    "an earlier bad id before an unreadable one": ([1, 9, 3], 8, {"index_address": 0x2ff8}),
    "table row beyond memory": ([0, 1], 8, {"memory_bytes": 0x1000 + 48 * 4, "index_address": 0x1000 - 64}),
}


@pytest.mark.parametrize("config", [DEFAULT, FP32_STORAGE], ids=lambda c: c.name)
def test_gather_equals_reference(config):
    """GATHER (the fast handler) against the reference: data, repeated ids, rows overlapping in the buffer,
    and which row's error wins (INDEX_RANGE, ids beyond memory, table rows beyond memory)."""
    codes = set()
    for name, (ids, table_rows, options) in GATHER_CASES.items():
        memory = gather_case(config, ids, table_rows, **options)
        expected, got = run_both(config, memory)
        assert_same(expected, got, name)
        codes.add(got[0].error)
    assert codes == {ErrorCode.NONE, ErrorCode.INDEX_RANGE, ErrorCode.BUS_ERROR}


@pytest.mark.parametrize("fault", ["index check off by one", "last failing row decides",
                                   "ids beyond memory read as zero"])
def test_broken_gather_is_caught(monkeypatch, fault):
    config = DEFAULT
    original = iss._gather_failure
    if fault == "index check off by one":
        broken = functools.partial(original_with_table_rows, original, 1)
    elif fault == "last failing row decides":
        def broken(i, ids, readable, size, memory_size):
            codes = [original(dataclasses.replace(i, row_count=1), ids[r:r + 1], int(r < readable), size,
                              memory_size) for r in range(len(ids))]
            return next((code for code in reversed(codes) if code != ErrorCode.NONE), ErrorCode.NONE)
    else:
        def broken(i, ids, readable, size, memory_size):
            return original(i, ids, len(ids), size, memory_size)
    monkeypatch.setattr(iss, "_gather_failure", broken)
    differ = 0
    for name, (ids, table_rows, options) in GATHER_CASES.items():
        (expected, _), (got, _) = run_both(config, gather_case(config, ids, table_rows, **options))
        differ += (expected.error, expected.error_pc) != (got.error, got.error_pc)
    assert differ > 0


def original_with_table_rows(original, extra, i, *args):
    """_gather_failure with ``table_rows`` grown by ``extra`` (an off-by-one range check)."""
    return original(dataclasses.replace(i, table_rows=i.table_rows + extra), *args)


def mamba_case(config, d_model, mode, length, seed=1):
    from marca.compiler.mamba import compile_mixer
    from marca.reference import mamba as reference
    weights = reference.random_mixer_weights(reference.MambaDims(d_model=d_model, d_state=8), seed=seed,
                                             dtype=torch.float64)
    compiled = compile_mixer(weights, config, mode=mode, length=length)
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(length or 1, d_model, generator=generator, dtype=torch.float64)
    conv = torch.randn(2 * d_model, 4, generator=generator, dtype=torch.float64)
    ssm = torch.randn(2 * d_model, 8, generator=generator, dtype=torch.float64)
    return compiled, compiled.write_inputs(None, hidden, conv, ssm)


@pytest.mark.parametrize("config,d_model,mode,length", [
    (DEFAULT, 16, "prefill", 5), (DEFAULT, 32, "decode", None), (FPGA_SMALL, 8, "prefill", 3),
    (TINY, 8, "decode", None), (FP32_STORAGE, 16, "prefill", 2)], ids=lambda v: getattr(v, "name", str(v)))
def test_mamba_programs_equal_reference(config, d_model, mode, length):
    compiled, memory = mamba_case(config, d_model, mode, length)
    expected, got = run_both(config, memory, compiled.program_address)
    assert expected[0].error == ErrorCode.NONE
    assert_same(expected, got, f"{config.name} d_model {d_model} {mode}")


def test_device_argument():
    config = FPGA_SMALL
    generated = random_program(config, seed=3, length=20)
    expected, got = run_both(config, generated.memory, device=torch.device("cpu"))
    assert_same(expected, got, "device=torch.device('cpu')")
    with pytest.raises(ValueError, match="device"):
        iss.Machine(config, generated.memory, device="no-such-device")


@CUDA
@pytest.mark.parametrize("config", [TINY, DEFAULT, FP32_STORAGE], ids=lambda c: c.name)
def test_cuda_equals_reference(config):
    for seed, generated in random_cases(config, 20):
        assert_same(*run_both(config, generated.memory, device="cuda"), f"cuda {config.name} seed {seed}")
    compiled, memory = mamba_case(config, 16, "prefill", 3)
    assert_same(*run_both(config, memory, compiled.program_address, device="cuda"),
                f"cuda {config.name} mamba")
