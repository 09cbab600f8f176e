"""Golden models of the float operations, written from the numerics contract (docs/numerics.md).

Every function is vectorized PyTorch on **bit patterns** held in ``int64`` tensors (one element per
operand); integers (``to_int``, ``from_int``, ``ldexp``'s shift) are signed ``int64`` values.

How exactness is reached: operands are decoded into float64 (subnormals read as zero). Products of two
operands of any supported format (at most 24 significant bits each) are exact in float64's 53 bits; sums
are rounded once to 53 bits, and since 53 >= 2 * 24 + 2 that first rounding never changes the final
round-to-nearest-even result (double rounding is innocuous at that precision for + and *). The float64
result is then rounded to the target format by :func:`encode` with an unbounded exponent, and flushed or
overflowed afterwards: exactly the contract's "round and flush".
"""

import torch

from marca.formats import FloatFormat

__all__ = [
    "decode", "encode", "mul", "add", "sub", "mul_add", "minimum", "maximum", "compare",
    "convert", "to_int", "from_int", "ldexp", "tree_sum", "special_values", "random_bits",
    "ROUNDING_MODES",
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
