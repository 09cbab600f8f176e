"""Per-PE logic of the nonlinear functions (issues #4 and 13): the PE array's lane extension.

exp, SiLU, softplus and rsqrt run as programs of element-wise passes on the PE array
(:mod:`marca.golden.nonlinear` holds the programs, the fitted constants and the bit-exact golden model).
Every piece of arithmetic of those programs (the rounding of t = x·log2 e to an integer through the adder,
x − n·ln2, every Horner step, the Newton steps) runs on each PE's own multiplier and adder with constants
broadcast to every lane; what a PE cannot do with them is the bit logic in :class:`FunctionLane`, one per
lane, selected by the beat's ``function`` field when the op is ``ElementwiseOp.FUNCTION``:

* ``EXP_SCALE``: ``a · 2^n`` where ``b = C + n`` holds ``n`` in its low mantissa bits (the exp program's
  rounding sum): the bits are the integer, so no float-to-integer shifter; one small exponent adder with
  overflow to Inf and flush to zero.
* ``NEGATIVE_MAGNITUDE``: ``-min(|a|, 128)`` (a sign bit and one exponent compare).
* ``RSQRT_SEED``: ``magic - (|a| >> 1)`` on the exponent and top mantissa bits (one constant subtractor):
  rsqrt's bit-trick seed.
* ``RSQRT_SELECT``: rsqrt's special cases by ``b = x`` (NaN or negative -> NaN, ±0 -> ±Inf, +Inf -> +0),
  else ``a``.

The four share one output datapath (``a``'s fields passed on with the exponent field replaced or forced,
or the seed), and the array reads the result through its adder (``add(x, -0)``: NaNs canonical,
subnormals signed zeros), so the lane leaves NaN payloads and subnormals to that read; the golden
sub-operations (:func:`marca.golden.nonlinear.lane_function`) are what the array reads. No per-lane
table: every constant is a broadcast operand. Build it for the array with
``PEArray(..., lane_extension=FunctionLane.factory(config))``.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.hdl import EnableInserter
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from marca.golden.nonlinear import (
    FUNCTION_BITS,
    MAGNITUDE_BOUND_EXPONENT,
    LaneFunction,
    build_constants,
    exp_int_bits,
    rsqrt_seed_dropped_bits,
)

from marca.formats import FloatFormat

__all__ = ["FAULTS", "FunctionLane"]

FAULTS = (None, "scale_no_overflow", "scale_window_unchecked", "magnitude_no_clamp", "rsqrt_seed_no_shift",
          "nan_without_mantissa")
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
        Sub-operations left out (their code passes ``a`` on), for the cost breakdown of
        ``marca bench nonlinear`` only.

    Attributes
    ----------
    function : In(function_bits)
        :class:`marca.golden.nonlinear.LaneFunction` code.
    a, b, c : In(fmt.width)
        Operands (``c`` is unused).
    enable : In(1), init 1
        Clock enable of the result register.
    result : Out(fmt.width)
        Registered result, ``latency`` enabled cycles after the operands; its contract read (canonical NaN,
        subnormals as signed zeros: the array's ``add(x, -0)``) is the golden sub-operation's result.
    function_bits : int
        2.
    latency : int
        1 (combinational logic, then the result register; the array joins the result to its adder's ``x`` at
        the comparator stage, so a deeper pipeline would only add registers).
    """

    function_bits = FUNCTION_BITS
    latency = 1

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
        self.constants = build_constants(fmt=fmt, exp_degree=exp_degree, softplus_degree=softplus_degree)
        super().__init__({"function": In(FUNCTION_BITS), "a": In(fmt.width), "b": In(fmt.width),
                          "c": In(fmt.width), "enable": In(1, init=1), "result": Out(fmt.width)})
        self._MustUse__silence = False

    @classmethod
    def factory(cls, config, **options):
        """A callable building one lane for ``config`` (a MarcaConfig): ``PEArray(lane_extension=...)``."""
        def build():
            return cls(fmt=config.compute_format, exp_degree=config.exp_degree,
                       softplus_degree=config.softplus_degree, **options)
        return build

    # Sub-operations ---------------------------------------------------------------------------------------

    def _exp_scale(self, m: Module, a: _Fields, b: _Fields):
        """EXP_SCALE's pieces (golden ``exp_scale``): ``(exponent, b_up, b_down)``, where ``exponent`` is
        ``a``'s exponent field plus ``n`` (signed) and ``b_up`` / ``b_down`` say that ``b`` alone decides
        +Inf / +0 (outside the window; ``b``'s NaN is decided by the caller).

        ``b = C + n``, C = 1.5·2^(p-1): in the binade of C (exponent field E0 = bias + p - 1, ulp 1) the
        mantissa field is ``2^(m-1) + n``, so ``n`` is the mantissa with its top bit flipped, read as a
        signed number: no shifter. The next binade (ulp 2) is ``n = 2^(m-1) + 2·mantissa``, only within
        the window in BF16."""
        fmt = self.fmt
        man, int_bits = fmt.man_bits, exp_int_bits(fmt)
        limit = 1 << (int_bits - 1)
        base_field = fmt.bias + fmt.precision - 1
        in_low = ~b.sign & (b.exponent == base_field)
        in_high = ~b.sign & (b.exponent == base_field + 1)
        below = b.sign | (b.exponent < base_field)
        above = ~b.sign & (b.exponent > base_field + 1)            # +Inf too (NaN is decided first)
        # Low binade: n = mantissa - 2^(m-1), an m-bit signed number; inside the window when its bits
        # above int_bits - 1 are copies of its sign.
        n_low = Cat(b.mantissa[:man - 1], ~b.mantissa[man - 1])
        low_top = n_low[min(int_bits - 1, man - 1):]
        low_inside = (low_top == 0) | (low_top == (1 << len(low_top)) - 1)
        if self._fault == "scale_window_unchecked":
            low_inside = Const(1, 1)
        n = Signal(signed(int_bits), name="scale_n")
        high_first = 1 << (man - 1)
        if high_first < limit:
            high_value = Signal(man + 2, name="scale_n_high")
            m.d.comb += high_value.eq(Cat(Const(0, 1), b.mantissa) + high_first)
            high_inside = high_value < limit
            m.d.comb += n.eq(Mux(in_high, high_value, n_low[:min(man, int_bits)].as_signed()))
        else:
            high_inside = Const(0, 1)
            m.d.comb += n.eq(n_low[:min(man, int_bits)].as_signed())
        # Low binade outside the window: the sign of n (the mantissa's top bit) says which way.
        b_up = above | (in_low & ~low_inside & b.mantissa[man - 1]) | (in_high & ~high_inside)
        b_down = below | (in_low & ~low_inside & ~b.mantissa[man - 1])
        exponent = Signal(signed(max(fmt.exp_bits, int_bits) + 1), name="scale_exponent")
        m.d.comb += exponent.eq(a.exponent + n)
        return exponent, b_up, b_down

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
        """The four sub-operations share one output: sign, exponent field and mantissa are each chosen
        from ``a``'s fields (EXP_SCALE, NEGATIVE_MAGNITUDE and RSQRT_SELECT pass ``a`` on with its
        exponent replaced or forced, decided by ``b``'s or ``a``'s classification), forced patterns, or
        RSQRT_SEED's integer. The array reads the result through its adder (``add(x, -0)``), which makes
        NaNs canonical and subnormals signed zeros, so a NaN here is any NaN pattern and a subnormal
        stands for its zero (the golden sub-operations are what that read gives)."""
        m = Module()
        fmt = self.fmt
        man, exp_bits = fmt.man_bits, fmt.exp_bits
        a, b = _Fields(self.a, fmt), _Fields(self.b, fmt)
        scale, magnitude, seed, select = (
            Const(0, 1) if code in self._omit else self.function == code
            for code in (LaneFunction.EXP_SCALE, LaneFunction.NEGATIVE_MAGNITUDE, LaneFunction.RSQRT_SEED,
                         LaneFunction.RSQRT_SELECT))
        b_nan = b.is_nan

        # EXP_SCALE: b NaN -> NaN; b outside the window -> +Inf / +0; else a's fields with exponent + n.
        exponent, b_up, b_down = self._exp_scale(m, a, b)
        overflow = exponent >= fmt.exp_max
        if self._fault == "scale_no_overflow":
            overflow = Const(0, 1)
        underflow = exponent <= 0
        # NEGATIVE_MAGNITUDE: a | sign, clamped to -2^7 from 2^7 up (Inf and NaN too).
        clamp = a.exponent >= MAGNITUDE_BOUND_EXPONENT + fmt.bias
        if self._fault == "magnitude_no_clamp":
            clamp = a.is_inf
        # RSQRT_SELECT (a = the Newton result r, b = x): x NaN or below zero -> NaN; x zero -> Inf of x's
        # sign; x = +Inf -> +0; else r.
        x_zero = b.is_zero
        select_nan = (b.sign & ~x_zero) | b_nan
        select_zero = b.is_special & ~b.sign          # +Inf (NaN is decided first)

        nan = (scale & b_nan) | (select & select_nan)
        ones = nan | (scale & (b_up | (overflow & ~b_down))) | (select & x_zero)
        zeros = (scale & (b_down | underflow)) | (select & select_zero)
        kept_exponent = Mux(scale, exponent[:exp_bits],
                            Mux(magnitude & clamp, MAGNITUDE_BOUND_EXPONENT + fmt.bias, a.exponent))
        kept_mantissa = Mux(ones | zeros | (magnitude & clamp), 0, a.mantissa)
        seed_value = self._rsqrt_seed(a)
        sign = Signal(name="sign")
        with m.If(magnitude):
            m.d.comb += sign.eq(1)
        with m.Elif(select & x_zero):
            m.d.comb += sign.eq(b.sign)
        with m.Elif(seed | (scale & (b_up | b_down)) | (select & select_zero)):
            m.d.comb += sign.eq(0)
        with m.Else():
            m.d.comb += sign.eq(a.sign)
        if self._fault == "nan_without_mantissa":        # a forced NaN comes out as Inf
            nan = Const(0, 1)
        value = Signal(fmt.width, name="value")
        with m.If(seed):
            m.d.comb += value.eq(seed_value)
        with m.Else():
            m.d.comb += value.eq(Cat(
                kept_mantissa[:man - 1], kept_mantissa[man - 1] | nan,
                Mux(ones, fmt.exp_max, Mux(zeros, 0, kept_exponent)), sign))
        m.d.sync += self.result.eq(value)
        return EnableInserter(self.enable)(m)
