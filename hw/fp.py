"""Pipelined floating-point units of the numerics contract (docs/numerics.md), bit-exact with
:mod:`marca.golden.fp`.

Every unit is a :class:`amaranth.lib.wiring.Component` built for one :class:`~marca.formats.FloatFormat`
(and a second format or an integer width where it needs one), with the same interface convention:

* data inputs ``a`` (and ``b``, ``subtract``, ``shift`` where the operation has them), data output
  ``result`` (:class:`FloatCompare` has ``lt``/``eq``/``gt``/``minimum``/``maximum`` instead);
* ``enable`` (input, reset value 1): a clock enable for every pipeline register, so the stream logic
  around a unit stalls the whole pipeline by holding it low;
* ``latency`` (attribute): a result appears on the outputs after exactly ``latency`` enabled clock cycles
  after its inputs were presented on an enabled cycle; one operation per cycle, sustained. Outputs come
  straight from registers.

Float results follow the contract's "round and flush": round to nearest even at the format's precision
with an unbounded exponent, then +/-Inf above the largest finite and a signed zero below the smallest
normal (tininess after rounding). Subnormal inputs read as zeros; any NaN input gives the canonical NaN.
Integer ports are signed shapes (two's complement). Design notes and measured sizes: docs/fp_units.md.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.hdl import EnableInserter
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from marca.formats import FloatFormat

__all__ = [
    "FloatMultiplier", "FloatAdder", "FloatCompare", "FloatConvert", "FloatToInt", "IntToFloat",
    "FloatScale", "FLOAT_ROUNDING", "INT_ROUNDING",
]

FLOAT_ROUNDING = ("nearest_even", "truncate")
"""Rounding choices of the float-producing units. Only ``"nearest_even"`` is the contract; ``"truncate"``
is a deliberately wrong variant kept so that the tests can prove they catch a rounding error."""

INT_ROUNDING = ("nearest_even", "toward_zero", "floor")
"""Rounding modes of :class:`FloatToInt` (all three are part of the contract)."""

_INT_BITS_RANGE = range(2, 33)      # as marca.golden.fp.to_int / from_int
_SHIFT_BITS_RANGE = range(2, 33)


def _check_format(name: str, value) -> None:
    if not isinstance(value, FloatFormat):
        raise ValueError(f"{name} must be a marca.formats.FloatFormat, not {value!r}")


def _check_int(name: str, value, allowed: range) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be an integer in [{allowed.start}, {allowed.stop - 1}], "
                         f"not {value!r}")


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, not {value!r}")


class _Operand:
    """Fields and classification of one float operand (combinational, from its bit pattern)."""

    def __init__(self, value, fmt: FloatFormat, *, flip_sign=None):
        self.sign = value[-1] if flip_sign is None else value[-1] ^ flip_sign
        self.exponent = value[fmt.man_bits:fmt.man_bits + fmt.exp_bits]
        self.mantissa = value[:fmt.man_bits]
        self.is_zero = self.exponent == 0                       # zeros and subnormals (read as zero)
        self.is_special = self.exponent == fmt.exp_max
        self.is_inf = self.is_special & (self.mantissa == 0)
        self.is_nan = self.is_special & (self.mantissa != 0)
        # Significand with its hidden one; only meaningful for normal numbers.
        self.significand = Cat(self.mantissa, Const(1, 1))
        # The operand as read: a subnormal becomes the zero of its sign.
        self.as_read = Cat(Mux(self.is_zero, 0, self.mantissa), self.exponent, self.sign)


def _pack(fmt: FloatFormat, sign, exponent, mantissa):
    return Cat(mantissa, exponent[:fmt.exp_bits] if len(exponent) > fmt.exp_bits else exponent, sign)


def _zero(fmt: FloatFormat, sign):
    return Cat(Const(0, fmt.width - 1), sign)


def _inf(fmt: FloatFormat, sign):
    return Cat(Const(fmt.inf, fmt.width - 1), sign)


def _round_and_flush(m: Module, fmt: FloatFormat, *, sign, exponent, significand, guard, sticky,
                     truncate: bool = False):
    """Packed float of ``(-1)^sign * significand.guard_sticky * 2^(exponent - bias)``.

    ``significand`` holds ``fmt.precision`` bits with its leading one at the top; ``exponent`` is the
    biased exponent of that leading one as a signed value wide enough for any out-of-range result;
    ``guard`` is the next bit, ``sticky`` the OR of all bits below. Rounds to nearest even at the full
    precision (unbounded exponent), then overflows to Inf or flushes to a signed zero.
    """
    assert len(significand) == fmt.precision
    lsb = significand[0]
    round_up = Const(0, 1) if truncate else guard & (sticky | lsb)
    rounded = Signal(fmt.precision, name="rounded")
    m.d.comb += rounded.eq(significand + round_up)
    # Rounding carries out of the significand only from all ones; deciding that (and the exponent
    # checks below) beside the increment, not after it, keeps the carry chain off the critical path.
    carry = round_up & (significand == (1 << fmt.precision) - 1)
    overflow = (exponent >= fmt.exp_max) | (carry & (exponent == fmt.exp_max - 1))
    underflow = (exponent < 0) | (~carry & (exponent == 0))      # exponent + carry <= 0
    exponent_field = Mux(carry, exponent[:fmt.exp_bits] + 1, exponent[:fmt.exp_bits])[:fmt.exp_bits]
    # On a carry the increment wrapped the significand to zero: the mantissa field is zero, as it must be.
    return Mux(overflow, _inf(fmt, sign),
               Mux(underflow, _zero(fmt, sign), Cat(rounded[:fmt.man_bits], exponent_field, sign)))


def _leading_zeros(value):
    """Number of leading zeros of ``value`` (a nonzero value; zero gives a meaningless count) as a
    balanced tree: log-depth, unlike a priority chain."""
    def count(bits):                   # -> (count, all_zero); len(bits) is a power of two
        if len(bits) == 1:             # a one-bit block counts 0 (its all_zero covers the rest)
            return Cat(), ~bits[0]
        half = len(bits) // 2
        high_count, high_zero = count(bits[half:])
        low_count, low_zero = count(bits[:half])
        return Mux(high_zero, Cat(low_count, Const(1, 1)), Cat(high_count, Const(0, 1))), high_zero & low_zero
    size = 1 << max(len(value) - 1, 0).bit_length()
    padded = Cat(Const((1 << (size - len(value))) - 1, size - len(value)), value)   # ones below
    return count(padded)[0] if size > 1 else Const(0, 1)


def _normalize_left(m: Module, value, name: str):
    """Shift ``value`` left until its top bit is one: a leading-zero tree, then one barrel shift.
    Return ``(shifted, shift_count)``; for a zero ``value`` both are meaningless (callers check zero)."""
    shift = Signal(max(len(value) - 1, 1).bit_length(), name=f"{name}_shift")
    m.d.comb += shift.eq(_leading_zeros(value))
    shifted = Signal(len(value), name=f"{name}_shifted")
    m.d.comb += shifted.eq(value << shift)
    return shifted, shift


class _PipelinedUnit(wiring.Component):
    """Common part: every ``sync`` register of :meth:`elaborate_pipeline` is gated by ``enable``."""

    latency: int

    def elaborate(self, platform):
        m = Module()
        self.elaborate_pipeline(m)
        return EnableInserter(self.enable)(m)

    def elaborate_pipeline(self, m: Module) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class FloatMultiplier(_PipelinedUnit):
    """``result = a * b`` in ``fmt`` (contract ``mul``). Latency 2.

    Stage 1 decodes the operands, classifies specials, forms the exact ``2·precision``-bit product of
    the significands and the sum of the exponents, and ORs the product's low bits into sticky bits;
    stage 2 normalizes (at most one position), rounds to nearest even and packs, flushing or
    overflowing.

    Parameters
    ----------
    fmt : FloatFormat
    rounding : str
        ``"nearest_even"`` (the contract) or ``"truncate"`` (a deliberately wrong test variant).

    Attributes
    ----------
    a, b : In(fmt.width)
    enable : In(1), init 1
        Clock enable of the pipeline.
    result : Out(fmt.width)
    latency : int
        2.
    """

    latency = 2

    def __init__(self, *, fmt: FloatFormat, rounding: str = "nearest_even"):
        _check_format("fmt", fmt)
        _check_choice("rounding", rounding, FLOAT_ROUNDING)
        self.fmt = fmt
        self.rounding = rounding
        super().__init__({"a": In(fmt.width), "b": In(fmt.width), "enable": In(1, init=1),
                          "result": Out(fmt.width)})

    def elaborate_pipeline(self, m):
        fmt = self.fmt
        p = fmt.precision
        a, b = _Operand(self.a, fmt), _Operand(self.b, fmt)

        # Stage 1: specials, exact product, exponent sum.
        s1_sign = Signal(name="s1_sign")
        s1_special = Signal(name="s1_special")          # result fully decided in stage 1
        s1_special_value = Signal(fmt.width, name="s1_special_value")
        # Only the top p + 2 product bits are kept; the bits below them are ORed here, beside the
        # multiplier, so that stage 2 (normalize, round, pack) starts from a short sticky term.
        s1_product = Signal(p + 2, name="s1_product")
        s1_sticky = Signal(name="s1_sticky")            # OR of product bits [0, p - 2)
        s1_exponent = Signal(signed(fmt.exp_bits + 3), name="s1_exponent")
        product = Signal(2 * p, name="product")
        m.d.comb += product.eq(a.significand * b.significand)
        sign = a.sign ^ b.sign
        nan = a.is_nan | b.is_nan | (a.is_inf & b.is_zero) | (b.is_inf & a.is_zero)
        m.d.sync += [
            s1_sign.eq(sign),
            s1_special.eq(a.is_special | b.is_special | a.is_zero | b.is_zero),
            s1_special_value.eq(Mux(nan, fmt.canonical_nan,
                                    Mux(a.is_inf | b.is_inf, _inf(fmt, sign), _zero(fmt, sign)))),
            s1_product.eq(product[p - 2:]),
            s1_sticky.eq(product[:p - 2] != 0 if p > 2 else 0),
            s1_exponent.eq(a.exponent + b.exponent - fmt.bias),
        ]

        # Stage 2: the product is in [1, 4): normalize by at most one position, round, pack.
        # s1_product[i] is product bit i + p - 2.
        top = s1_product[p + 1]
        significand = Mux(top, s1_product[2:], s1_product[1:p + 1])
        guard = Mux(top, s1_product[1], s1_product[0])
        sticky = Mux(top, s1_product[0] | s1_sticky, s1_sticky)
        exponent = Signal(signed(fmt.exp_bits + 4), name="s2_exponent")
        m.d.comb += exponent.eq(s1_exponent + top)
        packed = _round_and_flush(m, fmt, sign=s1_sign, exponent=exponent, significand=significand,
                                  guard=guard, sticky=sticky, truncate=self.rounding == "truncate")
        m.d.sync += self.result.eq(Mux(s1_special, s1_special_value, packed))


class FloatAdder(_PipelinedUnit):
    """``result = a + b``, or ``a - b`` when ``subtract`` is 1, in ``fmt`` (contract ``add``/``sub``).
    Latency 4.

    Stage 1 decodes, classifies specials, orders the operands by magnitude and takes the exponent
    difference (clamped to the alignment range); stage 2 aligns the smaller significand (guard, round
    and sticky bits) and adds or subtracts; stage 3 normalizes (log-depth leading-zero count and one
    left shift); stage 4 rounds to nearest even and packs. Four stages keep every stage within a 50 MHz
    budget on an ECP5 (docs/fp_units.md, "Timing").
    An exact zero sum is +0 except (-0) + (-0) = -0; a flushed tiny sum keeps the sign of the exact sum.

    Parameters
    ----------
    fmt : FloatFormat
    rounding : str
        ``"nearest_even"`` (the contract) or ``"truncate"`` (a deliberately wrong test variant).

    Attributes
    ----------
    a, b : In(fmt.width)
    subtract : In(1)
        1: compute ``a - b`` (the sign bit of ``b`` flipped; a NaN ``b`` still gives the canonical NaN).
        Pipelined with its operands.
    enable : In(1), init 1
        Clock enable of the pipeline.
    result : Out(fmt.width)
    latency : int
        4.
    """

    latency = 4

    def __init__(self, *, fmt: FloatFormat, rounding: str = "nearest_even"):
        _check_format("fmt", fmt)
        _check_choice("rounding", rounding, FLOAT_ROUNDING)
        self.fmt = fmt
        self.rounding = rounding
        super().__init__({"a": In(fmt.width), "b": In(fmt.width), "subtract": In(1),
                          "enable": In(1, init=1), "result": Out(fmt.width)})

    def elaborate_pipeline(self, m):
        fmt = self.fmt
        p = fmt.precision
        # Aligned significands carry three extra bits below the precision: guard, round, sticky.
        width = p + 3
        a = _Operand(self.a, fmt)
        b = _Operand(self.b, fmt, flip_sign=self.subtract)

        # Stage 1: specials, magnitude order, exponent difference.
        nan = a.is_nan | b.is_nan | (a.is_inf & b.is_inf & (a.sign != b.sign))
        special_value = Mux(
            nan, fmt.canonical_nan,
            Mux(a.is_inf, _inf(fmt, a.sign),
                Mux(b.is_inf, _inf(fmt, b.sign),
                    Mux(a.is_zero & b.is_zero, _zero(fmt, a.sign & b.sign),
                        # One operand is zero: the sum is the other one, exactly.
                        Mux(a.is_zero, Cat(b.mantissa, b.exponent, b.sign),
                            Cat(a.mantissa, a.exponent, a.sign))))))
        a_magnitude = Cat(a.mantissa, a.exponent)
        b_magnitude = Cat(b.mantissa, b.exponent)
        swap = b_magnitude > a_magnitude
        s1_special = Signal(name="s1_special")
        s1_special_value = Signal(fmt.width, name="s1_special_value")
        s1_sign = Signal(name="s1_sign")
        s1_subtract = Signal(name="s1_effective_subtract")
        s1_exponent = Signal(fmt.exp_bits, name="s1_exponent")
        # The alignment distance: the exponent difference, clamped to `width` (past `width` positions only
        # the sticky bit survives). Both differences are clamped beside the magnitude compare.
        s1_distance = Signal(range(width + 1), name="s1_distance")
        a_minus_b = Signal(fmt.exp_bits, name="a_minus_b")
        b_minus_a = Signal(fmt.exp_bits, name="b_minus_a")
        m.d.comb += [a_minus_b.eq(a.exponent - b.exponent), b_minus_a.eq(b.exponent - a.exponent)]
        s1_big = Signal(p, name="s1_big")
        s1_small = Signal(p, name="s1_small")
        m.d.sync += [
            s1_special.eq(a.is_special | b.is_special | a.is_zero | b.is_zero),
            s1_special_value.eq(special_value),
            s1_sign.eq(Mux(swap, b.sign, a.sign)),
            s1_subtract.eq(a.sign ^ b.sign),
            s1_exponent.eq(Mux(swap, b.exponent, a.exponent)),
            s1_distance.eq(Mux(swap, Mux(b_minus_a > width, width, b_minus_a),
                               Mux(a_minus_b > width, width, a_minus_b))),
            s1_big.eq(Mux(swap, b.significand, a.significand)),
            s1_small.eq(Mux(swap, a.significand, b.significand)),
        ]

        # Stage 2: align the smaller significand (bits shifted out OR into the sticky bit), add.
        # The shifter works on [small, 0...0] of 2*width bits.
        extended = Signal(2 * width, name="s2_extended")
        m.d.comb += extended.eq(Cat(Const(0, width + 3), s1_small) >> s1_distance)
        aligned = Signal(width + 1, name="s2_aligned")
        m.d.comb += aligned.eq(Cat(extended[width] | (extended[:width] != 0), extended[width + 1:]))
        big = Cat(Const(0, 3), s1_big)
        s2_sum = Signal(width + 1, name="s2_sum")
        s2_special = Signal(name="s2_special")
        s2_special_value = Signal(fmt.width, name="s2_special_value")
        s2_sign = Signal(name="s2_sign")
        s2_exponent = Signal(fmt.exp_bits, name="s2_exponent")
        m.d.sync += [
            # One carry chain for both: big - aligned = big + ~aligned + 1 (big >= aligned, no borrow).
            s2_sum.eq(big + (aligned ^ Mux(s1_subtract, (1 << (width + 1)) - 1, 0)) + s1_subtract),
            s2_special.eq(s1_special),
            s2_special_value.eq(s1_special_value),
            s2_sign.eq(s1_sign),
            s2_exponent.eq(s1_exponent),
        ]

        # Stage 3: normalize so the leading one is at the top of width+1 bits.
        normalized, shift = _normalize_left(m, s2_sum, "s3_normalize")
        s3_normalized = Signal(width + 1, name="s3_normalized")
        s3_exponent = Signal(signed(fmt.exp_bits + 3), name="s3_exponent")
        s3_zero = Signal(name="s3_zero")                # exact zero sum
        s3_special = Signal(name="s3_special")
        s3_special_value = Signal(fmt.width, name="s3_special_value")
        s3_sign = Signal(name="s3_sign")
        m.d.sync += [
            s3_normalized.eq(normalized),
            # The big operand's leading one sits one below the top (the top is the carry position).
            s3_exponent.eq(s2_exponent + 1 - shift),
            s3_zero.eq(s2_sum == 0),
            s3_special.eq(s2_special),
            s3_special_value.eq(s2_special_value),
            s3_sign.eq(s2_sign),
        ]

        # Stage 4: round, pack.
        packed = _round_and_flush(m, fmt, sign=s3_sign, exponent=s3_exponent,
                                  significand=s3_normalized[width + 1 - p:], guard=s3_normalized[width - p],
                                  sticky=s3_normalized[:width - p] != 0,
                                  truncate=self.rounding == "truncate")
        m.d.sync += self.result.eq(Mux(s3_special, s3_special_value,
                                       Mux(s3_zero, _zero(fmt, 0), packed)))


class FloatCompare(_PipelinedUnit):
    """IEEE comparison flags and minimum/maximum of ``a`` and ``b`` in ``fmt`` (contract ``compare``,
    ``min``, ``max``). Latency 1.

    Both operands are read first (subnormals as zeros of their sign), then mapped to keys whose unsigned
    order is the total order with -0 < +0. Flags treat -0 = +0 and are all 0 when an operand is NaN;
    ``minimum``/``maximum`` return the chosen operand as read, or the canonical NaN.

    Parameters
    ----------
    fmt : FloatFormat

    Attributes
    ----------
    a, b : In(fmt.width)
    enable : In(1), init 1
        Clock enable of the pipeline.
    lt, eq, gt : Out(1)
        ``a < b``, ``a == b``, ``a > b``.
    minimum, maximum : Out(fmt.width)
    latency : int
        1.
    """

    latency = 1

    def __init__(self, *, fmt: FloatFormat):
        _check_format("fmt", fmt)
        self.fmt = fmt
        super().__init__({"a": In(fmt.width), "b": In(fmt.width), "enable": In(1, init=1),
                          "lt": Out(1), "eq": Out(1), "gt": Out(1),
                          "minimum": Out(fmt.width), "maximum": Out(fmt.width)})

    def elaborate_pipeline(self, m):
        fmt = self.fmt
        a, b = _Operand(self.a, fmt), _Operand(self.b, fmt)
        a_read = Signal(fmt.width, name="a_read")
        b_read = Signal(fmt.width, name="b_read")
        m.d.comb += [a_read.eq(a.as_read), b_read.eq(b.as_read)]

        def key(value, sign):  # negative: invert all bits; positive: set the sign bit
            return Mux(sign, ~value, value | fmt.sign_bit)
        a_key = Signal(fmt.width, name="a_key")
        b_key = Signal(fmt.width, name="b_key")
        m.d.comb += [a_key.eq(key(a_read, a.sign)), b_key.eq(key(b_read, b.sign))]
        unordered = a.is_nan | b.is_nan
        both_zero = a.is_zero & b.is_zero
        a_below = a_key < b_key
        b_below = b_key < a_key
        m.d.sync += [
            self.lt.eq(~unordered & ~both_zero & a_below),
            self.gt.eq(~unordered & ~both_zero & b_below),
            self.eq.eq(~unordered & (both_zero | (a_read == b_read))),
            self.minimum.eq(Mux(unordered, fmt.canonical_nan, Mux(b_below, b_read, a_read))),
            self.maximum.eq(Mux(unordered, fmt.canonical_nan, Mux(a_below, b_read, a_read))),
        ]


class FloatConvert(_PipelinedUnit):
    """``result = a`` converted from ``source`` to ``target`` (contract ``convert``). Latency 1.

    NaN gives the target's canonical NaN, +/-Inf stays +/-Inf, zeros and subnormals give a zero of the
    same sign, anything else is re-biased, rounded to nearest even (when the target has fewer mantissa
    bits) and flushed or overflowed. ``source == target`` is allowed: it canonicalizes.

    Parameters
    ----------
    source, target : FloatFormat
    rounding : str
        ``"nearest_even"`` (the contract) or ``"truncate"`` (a deliberately wrong test variant).

    Attributes
    ----------
    a : In(source.width)
    enable : In(1), init 1
        Clock enable of the pipeline.
    result : Out(target.width)
    latency : int
        1.
    """

    latency = 1

    def __init__(self, *, source: FloatFormat, target: FloatFormat, rounding: str = "nearest_even"):
        _check_format("source", source)
        _check_format("target", target)
        _check_choice("rounding", rounding, FLOAT_ROUNDING)
        self.source = source
        self.target = target
        self.rounding = rounding
        super().__init__({"a": In(source.width), "enable": In(1, init=1), "result": Out(target.width)})

    def elaborate_pipeline(self, m):
        source, target = self.source, self.target
        x = _Operand(self.a, source)
        exponent = Signal(signed(max(source.exp_bits, target.exp_bits) + 3), name="exponent")
        m.d.comb += exponent.eq(x.exponent - source.bias + target.bias)
        drop = source.man_bits - target.man_bits
        if drop > 0:
            significand = x.significand[drop:]
            guard = x.mantissa[drop - 1]
            sticky = x.mantissa[:drop - 1] != 0 if drop > 1 else Const(0, 1)
        else:
            significand = Cat(Const(0, -drop), x.significand)
            guard = sticky = Const(0, 1)
        packed = _round_and_flush(m, target, sign=x.sign, exponent=exponent, significand=significand,
                                  guard=guard, sticky=sticky, truncate=self.rounding == "truncate")
        m.d.sync += self.result.eq(
            Mux(x.is_nan, target.canonical_nan,
                Mux(x.is_inf, _inf(target, x.sign),
                    Mux(x.is_zero, _zero(target, x.sign), packed))))


class FloatToInt(_PipelinedUnit):
    """``result`` = ``a`` rounded to a signed ``int_bits``-bit integer (contract ``to_int``). Latency 2.

    ``rounding`` is ``"nearest_even"``, ``"toward_zero"`` or ``"floor"`` (toward minus infinity).
    Values beyond the range and +/-Inf saturate to the most negative / most positive integer; NaN, zeros
    and subnormals give 0. Stage 1 shifts the significand into fixed point (integer part, guard, sticky)
    and decides the rounding increment; stage 2 adds it, saturates and applies the sign.

    Parameters
    ----------
    fmt : FloatFormat
    int_bits : int
        Width of the integer result, 2..32.
    rounding : str

    Attributes
    ----------
    a : In(fmt.width)
    enable : In(1), init 1
        Clock enable of the pipeline.
    result : Out(signed(int_bits))
    latency : int
        2.
    """

    latency = 2

    def __init__(self, *, fmt: FloatFormat, int_bits: int, rounding: str = "nearest_even"):
        _check_format("fmt", fmt)
        _check_int("int_bits", int_bits, _INT_BITS_RANGE)
        _check_choice("rounding", rounding, INT_ROUNDING)
        self.fmt = fmt
        self.int_bits = int_bits
        self.rounding = rounding
        super().__init__({"a": In(fmt.width), "enable": In(1, init=1),
                          "result": Out(signed(int_bits))})

    def elaborate_pipeline(self, m):
        fmt, n = self.fmt, self.int_bits
        p = fmt.precision
        x = _Operand(self.a, fmt)
        # Unbiased exponent of the leading one.
        exponent = Signal(signed(fmt.exp_bits + 2), name="exponent")
        m.d.comb += exponent.eq(x.exponent - fmt.bias)
        # |x| >= 2^(n-1) saturates (exactly -2^(n-1) is the saturated negative value anyway).
        saturate = x.is_inf | (~x.is_special & ~x.is_zero & (exponent >= n - 1))
        small = exponent < -1                       # 0 < |x| < 1/2: integer part 0, guard 0, sticky 1
        # For exponent in [-1, n-2]: |x| = (significand << (exponent+1)) * 2^-p, so the integer part is
        # everything above the low p bits, the guard bit is bit p-1 and the sticky bits the rest.
        distance = Signal(range(n), name="distance")
        m.d.comb += distance.eq(Mux(small | saturate, 0, (exponent + 1)[:len(distance)]))
        fixed = Signal(p + n - 1, name="fixed")
        m.d.comb += fixed.eq(x.significand << distance)
        integer = Mux(small, 0, fixed[p:])
        guard = ~small & fixed[p - 1]
        sticky = small | (fixed[:p - 1] != 0 if p > 1 else Const(0, 1))
        if self.rounding == "nearest_even":
            increment = guard & (sticky | integer[0])
        elif self.rounding == "toward_zero":
            increment = Const(0, 1)
        else:  # floor: a negative value with any fraction rounds away from zero
            increment = x.sign & (guard | sticky)

        s1_integer = Signal(n - 1, name="s1_integer")
        s1_increment = Signal(name="s1_increment")
        s1_sign = Signal(name="s1_sign")
        s1_zero = Signal(name="s1_zero")             # NaN, zero, subnormal
        s1_saturate = Signal(name="s1_saturate")
        m.d.sync += [
            s1_integer.eq(integer),
            s1_increment.eq(increment),
            s1_sign.eq(x.sign),
            s1_zero.eq(x.is_nan | x.is_zero),
            s1_saturate.eq(saturate),
        ]

        # Stage 2: magnitude up to 2^(n-1); positive 2^(n-1) saturates, negative 2^(n-1) is the minimum.
        magnitude = Signal(n, name="s2_magnitude")
        m.d.comb += magnitude.eq(s1_integer + s1_increment)
        most_positive = (1 << (n - 1)) - 1
        most_negative = -(1 << (n - 1))
        overflow = s1_saturate | (~s1_sign & magnitude[n - 1])
        m.d.sync += self.result.eq(
            Mux(s1_zero, 0,
                Mux(overflow, Mux(s1_sign, most_negative, most_positive),
                    Mux(s1_sign, -magnitude.as_signed(), magnitude.as_signed()))))


class IntToFloat(_PipelinedUnit):
    """``result`` = the signed ``int_bits``-bit integer ``a`` rounded into ``fmt`` (contract
    ``from_int``). Latency 2.

    0 gives +0; magnitudes above the largest finite give +/-Inf. Stage 1 takes the magnitude and
    normalizes it (log-depth leading-zero shift); stage 2 rounds to nearest even and packs.

    Parameters
    ----------
    fmt : FloatFormat
    int_bits : int
        Width of the integer input, 2..32.
    rounding : str
        ``"nearest_even"`` (the contract) or ``"truncate"`` (a deliberately wrong test variant).

    Attributes
    ----------
    a : In(signed(int_bits))
    enable : In(1), init 1
        Clock enable of the pipeline.
    result : Out(fmt.width)
    latency : int
        2.
    """

    latency = 2

    def __init__(self, *, fmt: FloatFormat, int_bits: int, rounding: str = "nearest_even"):
        _check_format("fmt", fmt)
        _check_int("int_bits", int_bits, _INT_BITS_RANGE)
        _check_choice("rounding", rounding, FLOAT_ROUNDING)
        self.fmt = fmt
        self.int_bits = int_bits
        self.rounding = rounding
        super().__init__({"a": In(signed(int_bits)), "enable": In(1, init=1), "result": Out(fmt.width)})

    def elaborate_pipeline(self, m):
        fmt, n = self.fmt, self.int_bits
        p = fmt.precision
        sign = self.a[n - 1]
        magnitude = Signal(n, name="magnitude")     # |-2^(n-1)| = 2^(n-1) still fits n unsigned bits
        m.d.comb += magnitude.eq(Mux(sign, -self.a, self.a))
        normalized, shift = _normalize_left(m, magnitude, "normalize")
        s1_normalized = Signal(n, name="s1_normalized")
        s1_shift = Signal(len(shift), name="s1_shift")
        s1_sign = Signal(name="s1_sign")
        s1_zero = Signal(name="s1_zero")
        m.d.sync += [
            s1_normalized.eq(normalized),
            s1_shift.eq(shift),
            s1_sign.eq(sign),
            s1_zero.eq(self.a == 0),
        ]

        exponent = Signal(signed(max(fmt.exp_bits, n.bit_length()) + 3), name="s2_exponent")
        m.d.comb += exponent.eq(n - 1 + fmt.bias - s1_shift)
        if n >= p:
            significand = s1_normalized[n - p:]
            guard = s1_normalized[n - p - 1] if n > p else Const(0, 1)
            sticky = s1_normalized[:n - p - 1] != 0 if n > p + 1 else Const(0, 1)
        else:
            significand = Cat(Const(0, p - n), s1_normalized)
            guard = sticky = Const(0, 1)
        packed = _round_and_flush(m, fmt, sign=s1_sign, exponent=exponent, significand=significand,
                                  guard=guard, sticky=sticky, truncate=self.rounding == "truncate")
        m.d.sync += self.result.eq(Mux(s1_zero, 0, packed))


class FloatScale(_PipelinedUnit):
    """``result = ldexp(a, shift)`` = ``a * 2^shift`` in ``fmt`` (contract ``ldexp``; the exponent
    insert of the fast exponential). Latency 1.

    Adds ``shift`` to the exponent field: exact, no rounding. NaN gives the canonical NaN; +/-Inf and
    zeros come out unchanged (a subnormal as the zero of its sign); a result above the largest finite
    gives +/-Inf and one below the smallest normal a signed zero.

    Parameters
    ----------
    fmt : FloatFormat
    shift_bits : int
        Width of the signed shift, 2..32.

    Attributes
    ----------
    a : In(fmt.width)
    shift : In(signed(shift_bits))
    enable : In(1), init 1
        Clock enable of the pipeline.
    result : Out(fmt.width)
    latency : int
        1.
    """

    latency = 1

    def __init__(self, *, fmt: FloatFormat, shift_bits: int):
        _check_format("fmt", fmt)
        _check_int("shift_bits", shift_bits, _SHIFT_BITS_RANGE)
        self.fmt = fmt
        self.shift_bits = shift_bits
        super().__init__({"a": In(fmt.width), "shift": In(signed(shift_bits)), "enable": In(1, init=1),
                          "result": Out(fmt.width)})

    def elaborate_pipeline(self, m):
        fmt = self.fmt
        x = _Operand(self.a, fmt)
        exponent = Signal(signed(max(fmt.exp_bits, self.shift_bits) + 2), name="exponent")
        m.d.comb += exponent.eq(x.exponent + self.shift)
        m.d.sync += self.result.eq(
            Mux(x.is_nan, fmt.canonical_nan,
                Mux(x.is_inf, _inf(fmt, x.sign),
                    Mux(x.is_zero | (exponent <= 0), _zero(fmt, x.sign),
                        Mux(exponent >= fmt.exp_max, _inf(fmt, x.sign),
                            Cat(x.mantissa, exponent[:fmt.exp_bits], x.sign))))))
