"""Per-PE logic of the nonlinear functions (issues #4 and 13): the PE array's lane extension.

exp, SiLU, softplus and rsqrt run as programs of element-wise passes on the PE array
(:mod:`marca.golden.nonlinear` holds the programs, the fitted constants and the bit-exact golden model).
Every piece of arithmetic of those programs (the rounding of t = x·log2 e to an integer through the adder,
x − n·ln2, every Horner step, the Newton steps) runs on each PE's own multiplier and adder with constants
broadcast to every lane; what a PE cannot do with them is the bit logic in :class:`FunctionLane`, one per
lane, selected by the beat's ``function`` field when the op is ``ElementwiseOp.FUNCTION``:

* ``EXP_SCALE``: ``a · 2^n`` where ``b = C + n`` holds ``n`` in its low mantissa bits (the exp program's
  rounding sum): the bits are the integer, so no float-to-integer shifter. FP32 and FP16: one small
  exponent adder with overflow to Inf and flush to zero; BF16: the factor ``2^(n-k)`` (its exponent field
  is ``b``'s mantissa field, wiring), which the PE's multiplier applies to the polynomial scaled by
  ``2^k``, its own overflow and flush doing the rest.
* ``NEGATIVE_MAGNITUDE``: ``-min(|a|, 128)`` (a sign bit and one exponent compare).
* ``RSQRT_SEED``: ``magic - (|a| >> 1)`` on the exponent and top mantissa bits (one constant subtractor):
  rsqrt's bit-trick seed.
* ``RSQRT_SELECT``: rsqrt's special cases by ``b = x`` (NaN or negative -> NaN, ±0 -> ±Inf, +Inf -> +0),
  else ``a``.

The lane is combinational and sits in front of the PE's multiplier: its two outputs are the multiplier's
operands of a FUNCTION beat, ``result`` (``a`` passed on with its exponent field replaced, forced to a
finite value, or the seed) and ``factor`` (1, EXP_SCALE's ``2^(n-k)``, or the NaN, ±Inf or +0 by which
``b`` decides EXP_SCALE and RSQRT_SELECT). The array reads them as any operands (NaNs canonical,
subnormals signed zeros) and runs ``mul(result, factor)`` and ``add(·, -0)``, so the lane has no register,
no output mux into the array's datapath, and leaves NaN payloads, subnormals, and BF16's exponent sum with
its overflow and flush to the multiplier; the golden sub-operations
(:func:`marca.golden.nonlinear.lane_function`) are what the array gives. No per-lane table: every constant
is a broadcast operand. Build it for the array with
``PEArray(..., lane_extension=FunctionLane.factory(config))``.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from marca.golden.nonlinear import (
    FUNCTION_BITS,
    MAGNITUDE_BOUND_EXPONENT,
    LaneFunction,
    build_constants,
    exp_int_bits,
    exp_scale_on_multiplier,
    rsqrt_seed_dropped_bits,
)

from marca.formats import FloatFormat

__all__ = ["FAULTS", "FunctionLane"]

FAULTS = (None, "scale_no_overflow", "scale_window_unchecked", "magnitude_no_clamp", "rsqrt_seed_no_shift",
          "nan_without_mantissa", "result_unforced", "factor_binade")
"""Deliberately broken variants, kept so the tests can prove they catch each kind of mistake."""


class _Fields:
    """Sign, exponent field and mantissa of a bit pattern, with the contract's classification."""

    def __init__(self, value, fmt: FloatFormat):
        self.value = value
        self.sign = value[fmt.width - 1]
        self.exponent = value[fmt.man_bits:fmt.width - 1]
        self.mantissa = value[:fmt.man_bits]
        self.is_zero = self.exponent == 0                      # zeros and subnormals (read as zero)
        self.is_special = self.exponent == fmt.exp_max
        self.is_nan = self.is_special & (self.mantissa != 0)
        self.is_inf = self.is_special & (self.mantissa == 0)


class FunctionLane(wiring.Component):
    """The bit logic of one PE for exp, SiLU, softplus and rsqrt (see the module docstring).

    Parameters
    ----------
    fmt : FloatFormat
        Compute format of the PE.
    exp_degree, softplus_degree : int
        As :class:`marca.config.MarcaConfig` (they pick the program's broadcast constants; the lane itself
        depends only on ``fmt``: its one constant is rsqrt's seed ``magic``).
    _fault : str or None
        A deliberately broken variant (:data:`FAULTS`), for tests only.
    _omit : iterable of LaneFunction
        Sub-operations left out (their code passes ``a`` on, times 1), for the cost breakdown of
        ``marca bench nonlinear`` only.

    Attributes
    ----------
    function : In(function_bits)
        :class:`marca.golden.nonlinear.LaneFunction` code.
    a, b : In(fmt.width)
        Operands (at the array's input stage).
    result, factor : Out(fmt.width)
        The PE multiplier's two operands for a FUNCTION beat (combinational): the array's result of the
        beat is the contract's ``mul(result, factor)``, which is the golden sub-operation's result. A NaN
        here is any NaN pattern and a subnormal stands for its zero (the multiplier reads them so).
    function_bits : int
        2.
    latency : int
        0: no register of its own; the array runs the result through the PE's multiplier and adder like
        any operand (``mul(result, factor)``, then ``add(·, -0)``).
    """

    function_bits = FUNCTION_BITS
    latency = 0

    def __init__(self, *, fmt: FloatFormat, exp_degree: int = 3, softplus_degree: int = 4,
                 _fault: str | None = None, _omit=()):
        self._MustUse__silence = True     # a rejected parameter must not also warn 'never used'
        if not isinstance(fmt, FloatFormat):
            raise ValueError(f"fmt must be a FloatFormat, not {fmt!r}")
        if _fault not in FAULTS:
            raise ValueError(f"_fault must be one of {FAULTS}, not {_fault!r}")
        omit = tuple(_omit)
        if not all(isinstance(code, LaneFunction) for code in omit):
            raise ValueError(f"_omit must hold LaneFunction codes, not {_omit!r}")
        self._omit = frozenset(omit)
        self.fmt = fmt
        self._fault = _fault
        self.on_multiplier = exp_scale_on_multiplier(fmt)
        self.constants = build_constants(fmt=fmt, exp_degree=exp_degree, softplus_degree=softplus_degree)
        super().__init__({"function": In(FUNCTION_BITS), "a": In(fmt.width), "b": In(fmt.width),
                          "result": Out(fmt.width), "factor": Out(fmt.width)})
        self._MustUse__silence = False

    @classmethod
    def factory(cls, config, **options):
        """A callable building one lane for ``config`` (a MarcaConfig): ``PEArray(lane_extension=...)``."""
        def build():
            return cls(fmt=config.compute_format, exp_degree=config.exp_degree,
                       softplus_degree=config.softplus_degree, **options)
        return build

    # Sub-operations ---------------------------------------------------------------------------------------

    def _exp_window(self, m: Module, b: _Fields):
        """EXP_SCALE's reading of ``b = C + n`` (golden ``exp_scale``): ``(n, b_up, b_down)``, where ``n`` is
        the signed integer (None on the multiplier, whose factor field is read from ``b``'s mantissa) and
        ``b_up`` / ``b_down`` say that ``b`` alone decides +Inf / +0 (outside the window; ``b``'s NaN is
        decided by the caller).

        C = 1.5·2^(p-1): in the binade of C (exponent field E0 = bias + p - 1, ulp 1) the mantissa field is
        ``2^(m-1) + n``, so ``n`` is the mantissa with its top bit flipped, read as a signed number: no
        shifter. The next binade (ulp 2) is ``n = 2^(m-1) + 2·mantissa``, only within the window in BF16.
        The window is ``|n| < 2^exp_bits`` for the field sum; on the multiplier, every mantissa of C's
        binade and, in the next, those whose factor field ``2^m + 2·mantissa`` is below all ones."""
        fmt = self.fmt
        man = fmt.man_bits
        int_bits = exp_int_bits(fmt)
        base_field = fmt.bias + fmt.precision - 1
        in_low = ~b.sign & (b.exponent == base_field)
        in_high = ~b.sign & (b.exponent == base_field + 1)
        below = b.sign | (b.exponent < base_field)
        above = ~b.sign & (b.exponent > base_field + 1)            # +Inf too (NaN is decided first)
        n_low = Cat(b.mantissa[:man - 1], ~b.mantissa[man - 1])
        high_first = 1 << (man - 1)
        if self.on_multiplier:
            n = None
            low_inside = Const(1, 1)
            high_inside = b.mantissa < (fmt.exp_max - (1 << man) + 1) // 2
        else:
            # Low binade: n = mantissa - 2^(m-1), an m-bit signed number; inside the window when its bits
            # above int_bits - 1 are copies of its sign.
            limit = 1 << (int_bits - 1)
            low_top = n_low[min(int_bits - 1, man - 1):]
            low_inside = (low_top == 0) | (low_top == (1 << len(low_top)) - 1)
            n = Signal(signed(int_bits), name="scale_n")
            if high_first < limit:
                high_value = Signal(man + 2, name="scale_n_high")
                m.d.comb += high_value.eq(Cat(Const(0, 1), b.mantissa) + high_first)
                high_inside = high_value < limit
                m.d.comb += n.eq(Mux(in_high, high_value, n_low[:min(man, int_bits)].as_signed()))
            else:
                high_inside = Const(0, 1)
                m.d.comb += n.eq(n_low[:min(man, int_bits)].as_signed())
        if self._fault == "scale_window_unchecked":
            low_inside = Const(1, 1)
        # Low binade outside the window: the sign of n (the mantissa's top bit) says which way.
        b_up = above | (in_low & ~low_inside & b.mantissa[man - 1]) | (in_high & ~high_inside)
        b_down = below | (in_low & ~low_inside & ~b.mantissa[man - 1])
        return n, b_up, b_down

    def _rsqrt_seed(self, a: _Fields):
        """``magic - (|a| >> 1)`` with the shifted operand's low ``rsqrt_seed_dropped_bits`` bits taken as
        zeros (so those bits of the result are ``magic``'s, no logic); ``magic`` keeps it a positive normal
        number."""
        fmt = self.fmt
        dropped = rsqrt_seed_dropped_bits(fmt)
        shift = 0 if self._fault == "rsqrt_seed_no_shift" else 1
        kept = a.value[dropped + shift:fmt.width - 1]
        return Const(self.constants.rsqrt_magic, fmt.width) - Cat(Const(0, dropped), kept)

    def elaborate(self, platform):
        """Two outputs, the multiplier's operands. ``factor`` is 1 but where ``b`` decides: EXP_SCALE's and
        RSQRT_SELECT's special cases (NaN, ±Inf, +0 by ``b``; then ``result`` is a positive finite number,
        so the product is the factor whatever ``a`` is) and, on the multiplier (BF16), EXP_SCALE's
        ``2^(n-k)``. ``result`` is
        ``a``'s fields passed on (EXP_SCALE, RSQRT_SELECT), with the exponent field replaced (EXP_SCALE's
        field sum ``a + n`` with its overflow and flush; NEGATIVE_MAGNITUDE's clamp) and the sign set
        (NEGATIVE_MAGNITUDE), or RSQRT_SEED's integer."""
        m = Module()
        fmt = self.fmt
        man, exp_bits = fmt.man_bits, fmt.exp_bits
        a, b = _Fields(self.a, fmt), _Fields(self.b, fmt)
        scale, magnitude, seed, select = (
            Const(0, 1) if code in self._omit else self.function == code
            for code in (LaneFunction.EXP_SCALE, LaneFunction.NEGATIVE_MAGNITUDE, LaneFunction.RSQRT_SEED,
                         LaneFunction.RSQRT_SELECT))
        b_nan = b.is_nan

        # EXP_SCALE: b NaN -> NaN; b outside the window -> +Inf / +0 (by the factor); else a·2^n.
        n, b_up, b_down = self._exp_window(m, b)
        scale_inside = scale & ~b_nan & ~b_up & ~b_down
        # RSQRT_SELECT (a = the Newton result r, b = x): x NaN or below zero -> NaN; x zero -> Inf of x's
        # sign; x = +Inf -> +0; else r.
        x_zero = b.is_zero
        select_nan = (b.sign & ~x_zero) | b_nan
        select_zero = b.is_special & ~b.sign          # +Inf (NaN is decided first)
        select_decides = b.sign | x_zero | b.is_special
        decides = (scale & ~scale_inside) | (select & select_decides)
        if self._fault == "result_unforced":         # a NaN or Inf a spoils the factor's decision
            decides = Const(0, 1)

        # The factor: 1, or the forced special (its exponent field all ones or zero), or 2^(n-k).
        nan = (scale & b_nan) | (select & select_nan)
        if self._fault == "nan_without_mantissa":        # a forced NaN comes out as Inf
            nan = Const(0, 1)
        ones = (scale & b_nan) | (scale & b_up & ~b_down) | (select & (select_nan | x_zero))
        zeros = (scale & b_down & ~b_nan) | (select & select_zero & ~select_nan)
        factor_exponent = Signal(exp_bits, name="factor_exponent")
        with m.If(ones):
            m.d.comb += factor_exponent.eq(fmt.exp_max)
        with m.Elif(zeros):
            m.d.comb += factor_exponent.eq(0)
        if self.on_multiplier:
            # 2^(n-k): its exponent field is b's mantissa field in C's binade, 2^m + 2·mantissa in the next
            # (exp_polynomial_shift): wiring, no adder.
            base_field = fmt.bias + fmt.precision - 1
            low_binade = b.exponent[0] == (base_field & 1)
            if self._fault == "factor_binade":      # the next binade read as C's
                low_binade = Const(1, 1)
            with m.Elif(scale & low_binade):
                m.d.comb += factor_exponent.eq(b.mantissa)
            with m.Elif(scale):
                m.d.comb += factor_exponent.eq(Cat(Const(0, 1), b.mantissa) + (1 << man))
        with m.Else():
            m.d.comb += factor_exponent.eq(fmt.bias)
        # Named: the factor's bits cross into the PE by their own names (an unnamed one would be a numbered
        # port, a different module for every lane to the Verilog deduplication).
        factor_nan, factor_sign = Signal(name="factor_nan"), Signal(name="factor_sign")
        m.d.comb += [factor_nan.eq(nan), factor_sign.eq(select & x_zero & b.sign)]
        m.d.comb += self.factor.eq(Cat(Const(0, man - 1), factor_nan, factor_exponent, factor_sign))

        # The result.
        clamp = a.exponent >= MAGNITUDE_BOUND_EXPONENT + fmt.bias     # NEGATIVE_MAGNITUDE: Inf and NaN too
        if self._fault == "magnitude_no_clamp":
            clamp = a.is_inf
        clamped = magnitude & clamp
        if self.on_multiplier:
            overflow = underflow = Const(0, 1)
            sum_exponent = a.exponent
        else:
            exponent = Signal(signed(max(exp_bits, exp_int_bits(fmt)) + 1), name="scale_exponent")
            m.d.comb += exponent.eq(a.exponent + n)
            overflow = scale & (exponent >= fmt.exp_max)
            if self._fault == "scale_no_overflow":
                overflow = Const(0, 1)
            underflow = scale & (exponent <= 0)
            sum_exponent = Mux(scale, exponent[:exp_bits], a.exponent)
        result_exponent = Signal(exp_bits, name="result_exponent")
        with m.If(decides):
            # Where the factor decides (its Inf, zero or NaN), the result is any positive finite nonzero
            # number: a's exponent field with its top bit cleared and its lowest set (a normal one).
            m.d.comb += result_exponent.eq(Cat(Const(1, 1), a.exponent[1:exp_bits - 1], Const(0, 1)))
        with m.Elif(overflow):
            m.d.comb += result_exponent.eq(fmt.exp_max)
        with m.Elif(underflow):
            m.d.comb += result_exponent.eq(0)
        with m.Elif(clamped):
            m.d.comb += result_exponent.eq(MAGNITUDE_BOUND_EXPONENT + fmt.bias)
        with m.Else():
            m.d.comb += result_exponent.eq(sum_exponent)
        kept_mantissa = Mux(~decides & (overflow | underflow | clamped), 0, a.mantissa)
        sign = magnitude | (a.sign & ~decides)
        with m.If(seed):
            m.d.comb += self.result.eq(self._rsqrt_seed(a))
        with m.Else():
            m.d.comb += self.result.eq(Cat(kept_mantissa, result_exponent, sign))
        return m
