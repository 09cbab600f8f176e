"""Golden models of the float operations, written from the numerics contract (docs/numerics.md).

Every function is vectorized PyTorch on **bit patterns** held in ``int64`` tensors (one element per
operand); integers (``to_int``, ``from_int``, ``ldexp``'s shift) are signed ``int64`` values.

How exactness is reached: operands are decoded into float64 (subnormals read as zero). Products of two
operands of any supported format (at most 24 significant bits each) are exact in float64's 53 bits; sums
are rounded once to 53 bits, and since 53 >= 2 * 24 + 2 that first rounding never changes the final
round-to-nearest-even result (double rounding is innocuous at that precision for + and *). The float64
result is then rounded to the target format by :func:`encode` with an unbounded exponent, and flushed or
overflowed afterwards: exactly the contract's "round and flush".

Those functions are the slow, obviously correct **oracle**. Beside them, the ``value_*`` functions are the
fast paths of the golden instruction-set simulator (docs/iss.md): they work on float32 *values* instead of
bit patterns (every number of every supported format is exactly a float32; NaN stands for the canonical
NaN), use native float32 arithmetic for FP32 and float64 arithmetic plus an integer rounding step for the
other formats, and apply flush-to-zero, "tininess after rounding" and NaN canonicalisation explicitly.
tests/test_iss_fast.py holds them equal to the oracle bit for bit.
"""

import numpy as np
import torch

from marca.formats import FloatFormat

__all__ = [
    "decode", "encode", "mul", "add", "sub", "mul_add", "minimum", "maximum", "compare",
    "convert", "to_int", "from_int", "ldexp", "tree_sum", "special_values", "random_bits",
    "ROUNDING_MODES",
    "to_values", "from_values", "round_values", "value_mul", "value_add", "value_sub", "value_mul_add",
    "value_minimum", "value_maximum", "value_tree_sum", "value_convert", "value_bits",
    "subnormals_are_kept",
]

ROUNDING_MODES = ("nearest_even", "toward_zero", "floor")


def _as_int64(bits) -> torch.Tensor:
    return torch.as_tensor(bits, dtype=torch.int64)


def decode(bits, fmt: FloatFormat) -> torch.Tensor:
    """float64 values of bit patterns; subnormals read as zeros of their sign, any NaN as NaN."""
    bits = _as_int64(bits)
    sign = (bits >> (fmt.width - 1)) & 1
    exponent = (bits >> fmt.man_bits) & fmt.exp_max
    mantissa = bits & ((1 << fmt.man_bits) - 1)
    significand = (mantissa | (1 << fmt.man_bits)).to(torch.float64)
    magnitude = torch.ldexp(significand, (exponent - fmt.bias - fmt.man_bits).to(torch.float64))
    magnitude = torch.where(exponent == 0, 0.0, magnitude)
    magnitude = torch.where(exponent == fmt.exp_max,
                            torch.where(mantissa == 0, torch.inf, torch.nan), magnitude)
    return torch.where(sign == 1, -magnitude, magnitude)


def encode(values, fmt: FloatFormat) -> torch.Tensor:
    """Round float64 ``values`` into ``fmt``: nearest even with an unbounded exponent, then ±Inf above the
    largest finite and a signed zero below the smallest normal; any NaN becomes the canonical NaN."""
    values = torch.as_tensor(values, dtype=torch.float64)
    sign = torch.signbit(values).to(torch.int64)
    magnitude = values.abs()
    fraction, exponent = torch.frexp(magnitude)              # magnitude = fraction * 2^exponent, [0.5, 1)
    # Round the significand to `precision` bits: torch.round rounds half to even.
    significand = torch.round(torch.ldexp(fraction, torch.tensor(float(fmt.precision), dtype=torch.float64)))
    significand = significand.to(torch.int64)
    exponent = exponent.to(torch.int64) - 1                   # value = 1.xxx * 2^exponent
    carry = significand == (1 << fmt.precision)               # rounding carried out of the significand
    significand = torch.where(carry, significand >> 1, significand)
    exponent = torch.where(carry, exponent + 1, exponent)
    biased = exponent + fmt.bias
    bits = (biased << fmt.man_bits) | (significand & ((1 << fmt.man_bits) - 1))
    bits = torch.where(biased > fmt.exp_max - 1, fmt.inf, bits)   # overflow
    bits = torch.where(biased < 1, 0, bits)                       # flush (tininess after rounding)
    bits = torch.where(magnitude == 0, 0, bits)
    bits = torch.where(torch.isinf(magnitude), fmt.inf, bits)
    bits = bits | (sign << (fmt.width - 1))
    return torch.where(torch.isnan(values), fmt.canonical_nan, bits)


def mul(a, b, fmt: FloatFormat) -> torch.Tensor:
    """a * b, rounded once. Inf * 0 is NaN; zero results carry sign(a) ^ sign(b)."""
    return encode(decode(a, fmt) * decode(b, fmt), fmt)


def add(a, b, fmt: FloatFormat) -> torch.Tensor:
    """a + b, rounded once. An exact zero sum is +0 unless both operands are -0."""
    return encode(decode(a, fmt) + decode(b, fmt), fmt)


def sub(a, b, fmt: FloatFormat) -> torch.Tensor:
    """a - b = add(a, b with its sign bit flipped)."""
    return add(a, _as_int64(b) ^ fmt.sign_bit, fmt)


def mul_add(a, b, c, fmt: FloatFormat) -> torch.Tensor:
    """a * b + c with two roundings (the PE's multiplier, then its adder)."""
    return add(mul(a, b, fmt), c, fmt)


def _min_max(a, b, fmt: FloatFormat, want_max: bool) -> torch.Tensor:
    x, y = decode(a, fmt), decode(b, fmt)
    # Order with -0 < +0: compare values, break zero ties by the sign bit.
    x_below = (x < y) | ((x == y) & torch.signbit(x) & ~torch.signbit(y))
    pick_x = ~x_below if want_max else x_below
    chosen = torch.where(pick_x, x, y)
    chosen = torch.where(torch.isnan(x) | torch.isnan(y), torch.nan, chosen)
    return encode(chosen, fmt)  # re-encoding a decoded operand gives it back (subnormals as zeros)


def minimum(a, b, fmt: FloatFormat) -> torch.Tensor:
    """The smaller operand (-0 < +0); a NaN operand gives the canonical NaN."""
    return _min_max(a, b, fmt, want_max=False)


def maximum(a, b, fmt: FloatFormat) -> torch.Tensor:
    """The larger operand (-0 < +0); a NaN operand gives the canonical NaN."""
    return _min_max(a, b, fmt, want_max=True)


def compare(a, b, fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IEEE comparison flags ``(lt, eq, gt)``: -0 == +0, subnormals are zeros, NaN gives all False."""
    x, y = decode(a, fmt), decode(b, fmt)
    return x < y, x == y, x > y


def convert(x, source: FloatFormat, target: FloatFormat) -> torch.Tensor:
    """Bit patterns of ``source`` rounded into ``target``."""
    return encode(decode(x, source), target)


def _check_int_bits(int_bits: int) -> None:
    if not isinstance(int_bits, int) or not 2 <= int_bits <= 32:
        raise ValueError(f"int_bits must be an integer in [2, 32], not {int_bits!r}")


def to_int(x, fmt: FloatFormat, int_bits: int, rounding: str = "nearest_even") -> torch.Tensor:
    """Signed ``int_bits``-bit integer values: rounded by ``rounding``, saturated, NaN gives 0."""
    _check_int_bits(int_bits)
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, not {rounding!r}")
    values = decode(x, fmt)
    rounded = {"nearest_even": torch.round, "toward_zero": torch.trunc, "floor": torch.floor}[rounding](values)
    lowest, highest = -(1 << (int_bits - 1)), (1 << (int_bits - 1)) - 1
    rounded = rounded.clamp(lowest, highest)                  # ±Inf saturate too
    rounded = torch.where(torch.isnan(rounded), 0.0, rounded)
    return rounded.to(torch.int64)


def from_int(n, fmt: FloatFormat, int_bits: int) -> torch.Tensor:
    """Signed ``int_bits``-bit integers rounded into ``fmt`` (0 gives +0)."""
    _check_int_bits(int_bits)
    n = _as_int64(n)
    lowest, highest = -(1 << (int_bits - 1)), (1 << (int_bits - 1)) - 1
    if bool(((n < lowest) | (n > highest)).any()):
        raise ValueError(f"from_int: values outside the signed {int_bits}-bit range")
    return encode(n.to(torch.float64), fmt)


def ldexp(x, n, fmt: FloatFormat) -> torch.Tensor:
    """x * 2^n exactly (the exponent insert of the fast exp); ±Inf above range, signed zero below."""
    values = decode(x, fmt)
    # Clamping the shift keeps float64 exact and changes no result: any |n| beyond 600 already over- or
    # underflows every supported format.
    shift = _as_int64(n).clamp(-600, 600).to(torch.float64)
    return encode(torch.ldexp(values, shift), fmt)


def tree_sum(bits, fmt: FloatFormat) -> torch.Tensor:
    """Sum over the last dimension (a power of two) in the balanced pairwise order of the row trees:
    level 0 adds (x0 + x1), (x2 + x3), ...; each next level adds the previous sums pairwise."""
    bits = _as_int64(bits)
    width = bits.shape[-1]
    if width < 1 or width & (width - 1):
        raise ValueError(f"tree_sum needs a power-of-two last dimension, not {width}")
    while bits.shape[-1] > 1:
        bits = add(bits[..., 0::2], bits[..., 1::2], fmt)
    return bits[..., 0]


def special_values(fmt: FloatFormat) -> torch.Tensor:
    """Corner-case bit patterns: both zeros, subnormals, the smallest and largest normals, one and its
    neighbours, values whose sums and products carry or tie, ±Inf, NaNs (quiet, signalling, negative)."""
    man_mask = (1 << fmt.man_bits) - 1
    patterns = [
        0, 1, man_mask, 1 << (fmt.man_bits - 1),                      # zero, subnormals
        fmt.smallest_normal, fmt.smallest_normal + 1,                 # smallest normals
        fmt.largest_finite, fmt.largest_finite - 1,                   # largest finite
        fmt.one, fmt.one + 1, fmt.one - 1, fmt.one | man_mask,        # around one, all-ones mantissa
        fmt.one + (1 << fmt.man_bits), fmt.one | (1 << (fmt.man_bits - 1)),  # two, one and a half
        (fmt.bias + fmt.man_bits) << fmt.man_bits,                    # 2^man_bits: ulp 1 (ties)
        ((fmt.bias + fmt.man_bits + 1) << fmt.man_bits) | 1,          # odd ulp at 2^(man_bits+1)
        fmt.inf, fmt.canonical_nan, fmt.inf | 1, fmt.inf | man_mask,  # Inf, NaNs
    ]
    positive = torch.tensor(patterns, dtype=torch.int64)
    return torch.cat([positive, positive | fmt.sign_bit])


def random_bits(count: int, fmt: FloatFormat, generator: torch.Generator | None = None,
                specials: float = 0.05) -> torch.Tensor:
    """``count`` random bit patterns: uniform over all patterns, exponents concentrated near the bias
    half of the time (so sums and products stay in range and round), plus a share of special values."""
    uniform = torch.randint(0, 1 << fmt.width, (count,), generator=generator, dtype=torch.int64)
    near = fmt.bias + torch.randint(-fmt.man_bits - 3, fmt.man_bits + 4, (count,), generator=generator)
    near = near.clamp(1, fmt.exp_max - 1)
    mantissa = torch.randint(0, 1 << fmt.man_bits, (count,), generator=generator, dtype=torch.int64)
    sign = torch.randint(0, 2, (count,), generator=generator, dtype=torch.int64)
    centred = (sign << (fmt.width - 1)) | (near << fmt.man_bits) | mantissa
    pick = torch.rand(count, generator=generator)
    bits = torch.where(pick < 0.5, centred, uniform)
    table = special_values(fmt)
    special = table[torch.randint(0, len(table), (count,), generator=generator)]
    return torch.where(pick > 1 - specials, special, bits)


# Fast paths on values ------------------------------------------------------------------------------------
#
# A *value* tensor is float32 and holds numbers as the contract reads them: zeros, normal numbers of the
# format, ±Inf, and NaN (which stands for the canonical NaN; payloads are meaningless). Every format with
# exp_bits <= 8 and man_bits <= 23 fits float32 exactly, and DAZ is applied once, when bits become values.
#
# FP32 arithmetic uses float32 itself. IEEE round-to-nearest-even with gradual underflow equals the
# contract everywhere except where a result is below the smallest normal, 2^-126:
# * a sum below 2^-126 is exact (both operands are multiples of 2^-149), so it is a subnormal float32 that
#   the contract flushes to the zero of its sign: flush every subnormal sum;
# * a product near or below 2^-126 is rounded by the contract to 24 bits with an unbounded exponent, by
#   gradual underflow to the 2^-149 grid: they differ both ways (2^-126 - 2^-150 stays below 2^-126 for
#   the contract but is a tie that gradual underflow rounds up to 2^-126; products just under 2^-126 that
#   the contract rounds up become subnormals). In every lane whose float32 product is a nonzero
#   subnormal or exactly ±2^-126 the product is recomputed scaled by 2^24 (exact, since |a| < 2 there),
#   which float32 rounds to 24 bits in its normal range: it reaches 2^-102 exactly when the contract's
#   rounding reaches 2^-126.
# Other formats compute in float64: products of two <= 24-bit significands are exact and a sum rounded to
# 53 bits and then to p <= 24 bits is innocuously double-rounded (53 >= 2p + 2), so one integer rounding
# of the float64 result (:func:`round_values`) gives the contract's result, flush and overflow included.

_FLOAT32_MIN_NORMAL = 2.0 ** -126
_SCALE = 2.0 ** 24


def _is_fp32(fmt: FloatFormat) -> bool:
    return fmt.exp_bits == 8 and fmt.man_bits == 23


def _fits_float32(fmt: FloatFormat) -> None:
    if fmt.exp_bits > 8 or fmt.man_bits > 23:
        raise ValueError(f"fmt {fmt.name} does not fit float32 values (exp_bits <= 8, man_bits <= 23)")


def subnormals_are_kept(device="cpu") -> bool:
    """True when float32 arithmetic on ``device`` keeps subnormal results (no FTZ/DAZ mode set in the
    process). The FP32 fast paths need it: they detect the lanes to fix by their subnormal results."""
    tiny = torch.tensor([_FLOAT32_MIN_NORMAL], dtype=torch.float32, device=device)
    return bool((tiny * 0.5 != 0).item()) and bool(((tiny * 0.5) * 2 == tiny).item())


def to_values(bits, fmt: FloatFormat) -> torch.Tensor:
    """float32 values of bit patterns (any integer dtype; the low ``fmt.width`` bits count): subnormals
    read as zeros of their sign, any NaN as NaN."""
    _fits_float32(fmt)
    bits = torch.as_tensor(bits)
    element_dtype = {16: torch.int16, 32: torch.int32}.get(fmt.width)
    if fmt.exp_bits == 8 and bits.dtype == element_dtype:
        # Memory elements (BF16, FP32) in int32 arithmetic: the shift puts the sign at bit 31 either way.
        word = bits.to(torch.int32) << (32 - fmt.width) if fmt.width == 16 else bits
        word = torch.where((word & 0x7F800000) == 0, word & -0x80000000, word)
        return word.view(torch.float32)
    bits = bits.to(torch.int64) & ((1 << fmt.width) - 1)
    if fmt.exp_bits == 8:             # float32's own exponent field: a shift, then DAZ
        word = bits << (23 - fmt.man_bits)
        word = torch.where((word & 0x7F800000) == 0, word & 0x80000000, word)
    else:
        sign = ((bits >> (fmt.width - 1)) & 1) << 31
        exponent = (bits >> fmt.man_bits) & fmt.exp_max
        mantissa = bits & ((1 << fmt.man_bits) - 1)
        word = sign | ((exponent + (127 - fmt.bias)) << 23) | (mantissa << (23 - fmt.man_bits))
        word = torch.where(exponent == 0, sign, word)
        special = sign | 0x7F800000 | ((mantissa != 0).to(torch.int64) << 22)
        word = torch.where(exponent == fmt.exp_max, special, word)
    word = word - ((word >> 31) << 32)          # two's complement int32 range, explicitly
    return word.to(torch.int32).view(torch.float32)


def from_values(values, fmt: FloatFormat) -> torch.Tensor:
    """Bit patterns (int64) of float32 values that ``fmt`` represents exactly (what the ``value_*``
    functions return); NaN gives the canonical NaN."""
    _fits_float32(fmt)
    values = torch.as_tensor(values, dtype=torch.float32)
    word = values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if fmt.exp_bits == 8:
        bits = word >> (23 - fmt.man_bits)
    else:
        sign = (word >> 31) << (fmt.width - 1)
        exponent = (word >> 23) & 0xFF
        mantissa = (word & 0x7FFFFF) >> (23 - fmt.man_bits)
        bits = sign | ((exponent - 127 + fmt.bias) << fmt.man_bits) | mantissa
        bits = torch.where(exponent == 0, sign, bits)
        bits = torch.where(exponent == 0xFF, sign | fmt.inf, bits)
    return torch.where(torch.isnan(values), fmt.canonical_nan, bits)


def round_values(values, fmt: FloatFormat) -> torch.Tensor:
    """float64 ``values`` rounded into ``fmt`` by the contract (nearest even with an unbounded exponent,
    then ±Inf above range and a signed zero below the smallest normal), as float32 values.

    Rounds the float64 significand in the integer domain: every float64 here is normal (the supported
    formats' results lie far inside float64's exponent range), so adding half an ulp minus one plus the
    lowest kept bit and truncating is round-to-nearest-even, a carry moving into the exponent field."""
    _fits_float32(fmt)
    xp = _xp(values)
    x = values.astype(np.float64) if xp is np else torch.as_tensor(values).to(torch.float64)
    word = x.view(xp.int64)
    nan = xp.isnan(x)
    magnitude = xp.where(nan, 0, word & 0x7FFFFFFFFFFFFFFF)
    drop = 52 - fmt.man_bits
    magnitude = magnitude + ((1 << (drop - 1)) - 1) + ((magnitude >> drop) & 1)
    magnitude = (magnitude >> drop) << drop
    exponent = (magnitude >> 52) - 1023
    magnitude = xp.where(exponent > fmt.emax, 0x7FF0000000000000, magnitude)
    magnitude = xp.where(exponent < fmt.emin, 0, magnitude)
    rounded = xp.where(nan, xp.nan, (magnitude | (word & -0x8000000000000000)).view(xp.float64))
    return rounded.astype(np.float32) if xp is np else rounded.to(torch.float32)


_MINIMUM = np.minimum.reduce


def _any_small(values: torch.Tensor, limit: float, *, inclusive: bool) -> bool:
    """Whether a CPU tensor has a nonzero magnitude below (or at) ``limit``. numpy, because torch's
    ``any().item()`` alone costs ~20 us, which dominates small instructions."""
    array = values if isinstance(values, np.ndarray) else values.numpy()
    if array.size == 0:
        return False
    magnitude = np.abs(array)
    if _MINIMUM(magnitude, axis=None) > limit:       # the usual case, settled in two numpy calls (NaN: no)
        return False
    small = magnitude <= limit if inclusive else magnitude < limit
    return bool(np.logical_and(small, array != 0).any())


def _xp(*operands):
    """numpy when an operand is a numpy array (the ISS's small CPU instructions: numpy's per-call cost is
    a fraction of torch's), else torch. The value functions below are written once for both."""
    return np if any(isinstance(x, np.ndarray) for x in operands) else torch


def _on_host(x) -> bool:
    return isinstance(x, np.ndarray) or x.device.type == "cpu"


def _fp32_product(a, b, product):
    """Fix the lanes where float32 gradual underflow left ``product = a * b`` subnormal (module note)."""
    if _on_host(product) and not _any_small(product, _FLOAT32_MIN_NORMAL, inclusive=True):
        return product                         # the usual case; on CUDA a sync costs more than the fix
    xp = _xp(product)
    # <= : gradual underflow rounds (2^-126 - 2^-150) up to 2^-126 (a tie on its 2^-149 grid), where the
    # contract's 24-bit rounding keeps it below 2^-126 and flushes it.
    tiny = (product != 0) & (abs(product) <= _FLOAT32_MIN_NORMAL)
    scaled = (a * _SCALE) * b
    reaches = abs(scaled) >= _FLOAT32_MIN_NORMAL * _SCALE
    fixed = xp.where(reaches, xp.copysign(xp.full_like(product, _FLOAT32_MIN_NORMAL), product),
                     product * 0.0)
    return xp.where(tiny, fixed, product)


def _fp32_flush(total):
    """Subnormal sums (exact) to the zero of their sign."""
    if _on_host(total) and not _any_small(total, _FLOAT32_MIN_NORMAL, inclusive=False):
        return total
    return _xp(total).where(abs(total) < _FLOAT32_MIN_NORMAL, total * 0.0, total)


def _float64(x):
    return x.astype(np.float64) if isinstance(x, np.ndarray) else torch.as_tensor(x).to(torch.float64)


def value_mul(a, b, fmt: FloatFormat) -> torch.Tensor:
    """:func:`mul` on values."""
    if _is_fp32(fmt):
        return _fp32_product(a, b, a * b)
    return round_values(_float64(a) * _float64(b), fmt)


def value_add(a, b, fmt: FloatFormat) -> torch.Tensor:
    """:func:`add` on values."""
    if _is_fp32(fmt):
        return _fp32_flush(a + b)
    return round_values(_float64(a) + _float64(b), fmt)


def value_sub(a, b, fmt: FloatFormat) -> torch.Tensor:
    """:func:`sub` on values (IEEE defines a - b as a + (-b), signed zeros included)."""
    if _is_fp32(fmt):
        return _fp32_flush(a - b)
    return round_values(_float64(a) - _float64(b), fmt)


def value_mul_add(a, b, c, fmt: FloatFormat) -> torch.Tensor:
    """:func:`mul_add` on values: two roundings."""
    return value_add(value_mul(a, b, fmt), c, fmt)


def _value_min_max(a, b, want_max: bool):
    xp = _xp(a, b)
    a, b = _broadcast(xp, a, b)
    both_zero = (a == 0) & (b == 0)
    negative_first = xp.signbit(a)                  # of two zeros, -0 is the smaller
    if want_max:
        chosen = xp.where(both_zero, xp.where(negative_first, b, a), xp.maximum(a, b))
    else:
        chosen = xp.where(both_zero, xp.where(negative_first, a, b), xp.minimum(a, b))
    return xp.where(xp.isnan(a) | xp.isnan(b), xp.float32(xp.nan) if xp is np else xp.nan, chosen)


def value_minimum(a, b, fmt: FloatFormat) -> torch.Tensor:
    """:func:`minimum` on values (-0 < +0, NaN wins)."""
    return _value_min_max(a, b, want_max=False)


def value_maximum(a, b, fmt: FloatFormat) -> torch.Tensor:
    """:func:`maximum` on values (-0 < +0, NaN wins)."""
    return _value_min_max(a, b, want_max=True)


def _broadcast(xp, *operands):
    if xp is np:
        return np.broadcast_arrays(*(np.asarray(x, dtype=np.float32) for x in operands))
    return torch.broadcast_tensors(*(torch.as_tensor(x) for x in operands))


def value_convert(values, target: FloatFormat) -> torch.Tensor:
    """Values rounded into ``target`` (for a source format that fits float32)."""
    if _is_fp32(target):
        return torch.as_tensor(values, dtype=torch.float32)     # every source value is an FP32 value
    return round_values(values, target)


def value_bits(values, target: FloatFormat):
    """``from_values(value_convert(values, target), target)``: values rounded into ``target`` as its bit
    patterns (what a STORE writes), for torch tensors or numpy arrays. A target with float32's exponent
    field (FP32, BF16, any ``(8, m)``) takes a shortcut on the float32 words themselves: values hold no
    subnormals, so rounding to nearest even is ``(magnitude + half - 1 + lowest kept bit) >> dropped`` (a
    carry moves into the exponent; the largest finite rounds up to the Inf pattern, as the contract's
    overflow does), and nothing can fall below the target's smallest normal, which is float32's."""
    if target.exp_bits != 8 or not isinstance(values, np.ndarray):
        result = from_values(value_convert(torch.as_tensor(values), target), target)
        return result.numpy() if isinstance(values, np.ndarray) else result
    word = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)
    drop = 23 - target.man_bits
    magnitude = word & 0x7FFFFFFF
    if drop:
        magnitude = (magnitude + ((1 << (drop - 1)) - 1) + ((magnitude >> drop) & 1)) >> drop
    bits = ((word >> 31) << (target.width - 1)) | magnitude
    return np.where(np.isnan(values), target.canonical_nan, bits)


def value_tree_sum(values, fmt: FloatFormat) -> torch.Tensor:
    """:func:`tree_sum` on values: the same balanced pairwise order."""
    width = values.shape[-1]
    if width < 1 or width & (width - 1):
        raise ValueError(f"value_tree_sum needs a power-of-two last dimension, not {width}")
    while values.shape[-1] > 1:
        values = value_add(values[..., 0::2], values[..., 1::2], fmt)
    return values[..., 0]
