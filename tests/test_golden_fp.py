"""The float golden models against independent references.

Inside the normal range the contract is IEEE 754 round-to-nearest-even, which torch's own float32, float16
and bfloat16 arithmetic implements (products and sums of these formats computed in float32 and rounded
once more are exact or innocuously double-rounded), so torch is the reference there. Flushing, NaN
canonicalisation, signed zeros and the integer conversions are checked case by case from the contract.
"""

import pytest
import torch

from marca.formats import BF16, FP16, FP32
from marca.golden import fp

TORCH_DTYPES = {FP32: torch.float32, FP16: torch.float16, BF16: torch.bfloat16}
FORMATS = [FP32, BF16, FP16]


def to_torch(bits, fmt):
    """Reinterpret bit patterns as torch's native tensor of the format."""
    unsigned = {32: torch.int32, 16: torch.int16}[fmt.width]
    wrapped = torch.where(bits >= 1 << (fmt.width - 1), bits - (1 << fmt.width), bits)
    return wrapped.to(unsigned).view(TORCH_DTYPES[fmt])


def from_torch(values, fmt):
    unsigned = {32: torch.int32, 16: torch.int16}[fmt.width]
    return values.view(unsigned).to(torch.int64) & ((1 << fmt.width) - 1)


def normal_or_zero(bits, fmt):
    exponent = (bits >> fmt.man_bits) & fmt.exp_max
    return (exponent > 1) & (exponent < fmt.exp_max)


def comfortably_normal(values, fmt):
    """Torch results far enough from the underflow boundary that gradual underflow cannot differ."""
    magnitude = values.to(torch.float64).abs()
    return (magnitude >= 2.0 ** (fmt.emin + 1)) & torch.isfinite(magnitude)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("op", ["mul", "add", "sub"])
def test_arithmetic_matches_ieee_in_the_normal_range(fmt, op):
    generator = torch.Generator().manual_seed(1)
    a = fp.random_bits(200_000, fmt, generator, specials=0)
    b = fp.random_bits(200_000, fmt, generator, specials=0)
    x, y = to_torch(a, fmt), to_torch(b, fmt)
    expected = {"mul": torch.mul, "add": torch.add, "sub": torch.sub}[op](x, y)
    keep = normal_or_zero(a, fmt) & normal_or_zero(b, fmt) & comfortably_normal(expected, fmt)
    got = getattr(fp, op)(a, b, fmt)
    assert keep.sum() > 100_000
    assert torch.equal(got[keep], from_torch(expected, fmt)[keep])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_overflow_gives_inf(fmt):
    big = torch.tensor([fmt.largest_finite])
    assert fp.mul(big, big, fmt).item() == fmt.inf
    assert fp.add(big, big, fmt).item() == fmt.inf
    assert fp.mul(big, big | fmt.sign_bit, fmt).item() == fmt.inf | fmt.sign_bit


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_flush_and_signed_zeros(fmt):
    tiny = torch.tensor([fmt.smallest_normal])
    half = torch.tensor([(fmt.bias - 1) << fmt.man_bits])           # 0.5
    assert fp.mul(tiny, half, fmt).item() == 0                       # would be subnormal: flushed
    assert fp.mul(tiny | fmt.sign_bit, half, fmt).item() == fmt.sign_bit   # sign kept
    subnormal = torch.tensor([1])
    assert fp.add(subnormal, subnormal, fmt).item() == 0            # subnormal inputs read as zero
    assert fp.mul(subnormal, torch.tensor([fmt.inf]), fmt).item() == fmt.canonical_nan  # 0 * Inf
    one = torch.tensor([fmt.one])
    assert fp.sub(one, one, fmt).item() == 0                         # x - x = +0
    neg_zero = torch.tensor([fmt.sign_bit])
    assert fp.add(neg_zero, neg_zero, fmt).item() == fmt.sign_bit    # -0 + -0 = -0
    assert fp.add(neg_zero, torch.tensor([0]), fmt).item() == 0     # -0 + +0 = +0
    # The smallest normal minus one ulp of it would be subnormal: flushed, sign of the exact result.
    next_up = torch.tensor([fmt.smallest_normal + 1])
    assert fp.sub(tiny, next_up, fmt).item() == fmt.sign_bit


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_tininess_after_rounding(fmt):
    # (1 + 2^-p... ) the largest value below the smallest normal that rounds up to it: (2 - 2^-p) * 2^(emin-1)
    below = torch.tensor([(2.0 - 2.0 ** -fmt.precision) * 2.0 ** (fmt.emin - 1)], dtype=torch.float64)
    assert fp.encode(below, fmt).item() == fmt.smallest_normal
    just_below = torch.tensor([(2.0 - 2.0 ** -(fmt.precision - 1)) * 2.0 ** (fmt.emin - 1)],
                              dtype=torch.float64)
    assert fp.encode(just_below, fmt).item() == 0


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_ties_round_to_even(fmt):
    one = fmt.one
    ulp = 2.0 ** -fmt.man_bits
    values = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + ulp / 8], dtype=torch.float64)
    assert fp.encode(values, fmt).tolist() == [one, one + 2, one + 1]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_nan_is_canonical(fmt):
    nans = torch.tensor([fmt.inf | 1, fmt.inf | fmt.sign_bit | 3, fmt.canonical_nan | fmt.sign_bit])
    one = torch.full_like(nans, fmt.one)
    for op in (fp.mul, fp.add, fp.sub, fp.minimum, fp.maximum):
        assert (op(nans, one, fmt) == fmt.canonical_nan).all()
        assert (op(one, nans, fmt) == fmt.canonical_nan).all()
    inf = torch.tensor([fmt.inf])
    assert fp.add(inf, inf | fmt.sign_bit, fmt).item() == fmt.canonical_nan
    lt, eq, gt = fp.compare(nans, one, fmt)
    assert not (lt | eq | gt).any()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_min_max_and_compare(fmt):
    generator = torch.Generator().manual_seed(2)
    a = fp.random_bits(50_000, fmt, generator, specials=0)
    b = fp.random_bits(50_000, fmt, generator, specials=0)
    x, y = fp.decode(a, fmt), fp.decode(b, fmt)
    keep = ~(torch.isnan(x) | torch.isnan(y)) & (x != 0) & (y != 0) & normal_or_zero(a, fmt) & \
        normal_or_zero(b, fmt)
    assert torch.equal(fp.minimum(a, b, fmt)[keep], torch.where(x < y, a, b)[keep])
    assert torch.equal(fp.maximum(a, b, fmt)[keep], torch.where(x > y, a, b)[keep])
    zero, neg_zero = torch.tensor([0]), torch.tensor([fmt.sign_bit])
    assert fp.minimum(zero, neg_zero, fmt).item() == fmt.sign_bit
    assert fp.maximum(neg_zero, zero, fmt).item() == 0
    lt, eq, gt = fp.compare(zero, neg_zero, fmt)
    assert (lt.item(), eq.item(), gt.item()) == (False, True, False)
    assert fp.minimum(torch.tensor([1]), torch.tensor([fmt.one]), fmt).item() == 0  # subnormal -> zero


@pytest.mark.parametrize("source", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("target", FORMATS, ids=lambda f: f.name)
def test_convert_matches_torch(source, target):
    if source.width == 16:
        bits = torch.arange(1 << 16, dtype=torch.int64)
    else:
        bits = fp.random_bits(200_000, source, torch.Generator().manual_seed(3), specials=0)
    expected = to_torch(bits, source).to(TORCH_DTYPES[target])
    keep = normal_or_zero(bits, source) & comfortably_normal(expected, target)
    got = fp.convert(bits, source, target)
    assert torch.equal(got[keep], from_torch(expected, target)[keep])
    if source == target:  # identity on every normal; subnormals flush, NaNs become canonical
        assert torch.equal(got[normal_or_zero(bits, source)], bits[normal_or_zero(bits, source)])


def test_integer_conversions():
    f = FP16
    values = torch.tensor([2.5, 3.5, -2.5, -0.5, 1.75, -1.75, 70000.0, -70000.0, 0.0], dtype=torch.float64)
    bits = fp.encode(values, f)  # 70000 overflows FP16: ±Inf, which saturates
    assert fp.to_int(bits, f, 8, "nearest_even").tolist() == [2, 4, -2, 0, 2, -2, 127, -128, 0]
    assert fp.to_int(bits, f, 8, "toward_zero").tolist() == [2, 3, -2, 0, 1, -1, 127, -128, 0]
    assert fp.to_int(bits, f, 8, "floor").tolist() == [2, 3, -3, -1, 1, -2, 127, -128, 0]
    assert fp.to_int(torch.tensor([f.canonical_nan]), f, 8, "floor").item() == 0
    n = torch.tensor([0, 1, -1, 2049, 2051, -(1 << 15)])
    assert fp.decode(fp.from_int(n, f, 16), f).tolist() == [0, 1, -1, 2048, 2052, -32768]
    assert fp.from_int(torch.tensor([0]), f, 16).item() == 0   # +0
    with pytest.raises(ValueError, match="int_bits"):
        fp.to_int(bits, f, 1)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_ldexp(fmt):
    one = torch.tensor([fmt.one, fmt.one, fmt.one, fmt.one | fmt.sign_bit, fmt.inf, 0, fmt.canonical_nan])
    shift = torch.tensor([3, -fmt.bias + 1, -fmt.bias, 10_000, -5, 7, 1])
    expected = [fmt.one + (3 << fmt.man_bits), fmt.smallest_normal, 0, fmt.inf | fmt.sign_bit,
                fmt.inf, 0, fmt.canonical_nan]
    assert fp.ldexp(one, shift, fmt).tolist() == expected


def test_tree_sum_order():
    f = FP16
    # 2048 + 1 + 1 + 0: pairwise gives (2048 + 1) + (1 + 0) = 2048 + 1 = 2048 (ties to even) ...
    values = fp.encode(torch.tensor([[2048.0, 1.0, 1.0, 0.0]], dtype=torch.float64), f)
    assert fp.decode(fp.tree_sum(values, f), f).item() == 2048.0
    # ... while adding the ones first would give 2050: the order is observable and fixed.
    values = fp.encode(torch.tensor([[2048.0, 0.0, 1.0, 1.0]], dtype=torch.float64), f)
    assert fp.decode(fp.tree_sum(values, f), f).item() == 2050.0
