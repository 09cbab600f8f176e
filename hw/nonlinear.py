"""Per-PE logic of the nonlinear functions (issue #4): the PE array's lane extension.

exp, SiLU, softplus and rsqrt run as programs of element-wise passes on the PE array
(:mod:`marca.golden.nonlinear` holds the programs, the fitted constants and the bit-exact golden model).
The arithmetic of those programs (x·log2 e, t − n, the Horner steps) runs on each PE's own multiplier and
adder; what a PE cannot do with them is the bit logic in :class:`FunctionLane`, one per lane, selected by
the beat's ``function`` field when the op is ``ElementwiseOp.FUNCTION``:

* ``FLOOR``: round down to an integer-valued float (mask the fraction bits; for a negative non-integer,
  add one unit at the integer position). Splits ``t = x·log2 e`` into ``n``.
* ``EXP_SCALE``: ``a · 2^n`` for the integer value ``n`` of ``b`` (a small float-to-integer shift and an
  add to the exponent field, with overflow to ±Inf and flush to zero): the "shift" of the fast exp.
* ``*_COEFFICIENT_k``: coefficient ``k`` of the polynomial segment of ``a`` (segment index from the sign,
  the exponent field and a few top mantissa bits; a constant ROM per function).
* ``*_SELECT``: range select by sign and exponent field: ``a`` above the polynomial range, ``c`` below it,
  ``b`` (the polynomial) inside, NaN for a NaN ``a``.
* ``RSQRT_SEED``: ``magic - (|a| >> 1)`` on the bits (one constant subtractor): rsqrt's bit-trick seed.
* ``RSQRT_SELECT``: rsqrt's special cases by ``a`` (NaN or negative -> NaN, ±0 -> ±Inf, +Inf -> +0), else
  ``b``.

Build it for the array with ``PEArray(..., lane_extension=FunctionLane.factory(config))``.
"""

from amaranth import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.hdl import EnableInserter
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from marca.golden.nonlinear import (
    FUNCTION_BITS,
    PIECEWISE_FUNCTIONS,
    LaneFunction,
    SegmentLayout,
    build_constants,
    exp_int_bits,
)

from marca.formats import FloatFormat

__all__ = ["FAULTS", "FunctionLane"]

FAULTS = (None, "floor_no_increment", "scale_no_overflow", "coefficient_off_by_one")
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


def _pack(fmt: FloatFormat, sign, exponent, mantissa):
    return Cat(mantissa[:fmt.man_bits], exponent[:fmt.exp_bits], sign)


def _read(fmt: FloatFormat, operand: _Fields):
    """The contract's read: canonical NaN; a subnormal as the zero of its sign; anything else as is."""
    return Mux(operand.is_nan, fmt.canonical_nan,
               Mux(operand.is_zero, Cat(Const(0, fmt.width - 1), operand.sign), operand.value))


class FunctionLane(wiring.Component):
    """The bit logic of one PE for exp, SiLU, softplus and rsqrt (see the module docstring).

    Parameters
    ----------
    fmt : FloatFormat
        Compute format of the PE.
    exp_degree, silu_segments, silu_degree, softplus_segments, softplus_degree : int
        As :class:`marca.config.MarcaConfig`; pick the fitted constants
        (:func:`marca.golden.nonlinear.build_constants`). Only the piecewise tables end up in this unit; the
        exp coefficients are broadcast constants of the program.
    functions : tuple of str
        Piecewise functions to include ("silu", "softplus"); leaving one out drops its ROM and select
        (its codes then give +0). For cost measurements and builds that never run that function.
    _fault : str or None
        A deliberately broken variant (:data:`FAULTS`), for tests only.

    Attributes
    ----------
    function : In(function_bits)
        :class:`marca.golden.nonlinear.LaneFunction` code.
    a, b, c : In(fmt.width)
        Operands.
    enable : In(1), init 1
        Clock enable of the result register.
    result : Out(fmt.width)
        Registered result, ``latency`` enabled cycles after the operands.
    function_bits : int
        4.
    latency : int
        2 (stage 1 decodes, stage 2 finishes and selects; docs/nonlinear.md).
    """

    function_bits = FUNCTION_BITS
    latency = 2

    def __init__(self, *, fmt: FloatFormat, exp_degree: int = 3, silu_segments: int = 32, silu_degree: int = 2,
                 softplus_segments: int = 16, softplus_degree: int = 2,
                 functions: tuple[str, ...] = PIECEWISE_FUNCTIONS, _fault: str | None = None):
        self._MustUse__silence = True     # a rejected parameter must not also warn 'never used'
        if not isinstance(fmt, FloatFormat):
            raise ValueError(f"fmt must be a FloatFormat, not {fmt!r}")
        if not isinstance(functions, tuple) or any(name not in PIECEWISE_FUNCTIONS for name in functions):
            raise ValueError(f"functions must be a tuple of names from {PIECEWISE_FUNCTIONS}, not {functions!r}")
        if _fault not in FAULTS:
            raise ValueError(f"_fault must be one of {FAULTS}, not {_fault!r}")
        self.fmt = fmt
        self.functions = functions
        self._fault = _fault
        self.constants = build_constants(fmt=fmt, exp_degree=exp_degree, silu_segments=silu_segments,
                                         silu_degree=silu_degree, softplus_segments=softplus_segments,
                                         softplus_degree=softplus_degree)
        super().__init__({"function": In(FUNCTION_BITS), "a": In(fmt.width), "b": In(fmt.width),
                          "c": In(fmt.width), "enable": In(1, init=1), "result": Out(fmt.width)})
        self._MustUse__silence = False

    @classmethod
    def factory(cls, config, **options):
        """A callable building one lane for ``config`` (a MarcaConfig): ``PEArray(lane_extension=...)``."""
        def build():
            return cls(fmt=config.compute_format, exp_degree=config.exp_degree,
                       silu_segments=config.silu_segments, silu_degree=config.silu_degree,
                       softplus_segments=config.softplus_segments, softplus_degree=config.softplus_degree,
                       **options)
        return build

    # Sub-operations ---------------------------------------------------------------------------------------

    def _floor(self, m: Module, a: _Fields, a_1: _Fields):
        """Stage 1 (from ``a``): fraction mask, integer part, case; stage 2 (from registers and the
        registered operand ``a_1``): the increment and the result."""
        fmt = self.fmt
        man = fmt.man_bits
        unbiased = Signal(signed(fmt.exp_bits + 2), name="floor_unbiased")
        m.d.comb += unbiased.eq(a.exponent - fmt.bias)
        # Fraction bits of the mantissa field: the low man - unbiased bits, for 0 <= unbiased < man.
        fraction_mask = Signal(man, name="floor_fraction_mask")
        m.d.comb += fraction_mask.eq(Const((1 << man) - 1, man) >> unbiased.as_unsigned()[:max(1, man.bit_length())])
        has_fraction = (a.mantissa & fraction_mask) != 0
        round_up = a.sign & has_fraction
        if self._fault == "floor_no_increment":
            round_up = Const(0, 1)
        integer_1 = Signal(man + 2, name="floor_integer_part")        # 1.M with the fraction cleared
        mask_1 = Signal(man, name="floor_fraction_mask_1")
        round_up_1 = Signal(name="floor_round_up")
        case_1 = Signal(range(5), name="floor_case")                  # 0 .. 4, the branches below
        m.d.sync += [
            integer_1.eq(Cat(a.mantissa & ~fraction_mask, Const(1, 1))),
            mask_1.eq(fraction_mask),
            round_up_1.eq(round_up),
        ]
        with m.If(a.is_nan):
            m.d.sync += case_1.eq(0)
        with m.Elif(a.is_zero):
            m.d.sync += case_1.eq(1)
        with m.Elif(a.is_inf | (unbiased >= man)):
            m.d.sync += case_1.eq(2)
        with m.Elif(unbiased < 0):
            m.d.sync += case_1.eq(3)
        with m.Else():
            m.d.sync += case_1.eq(4)

        bumped = Signal(man + 2, name="floor_bumped")                 # + one unit at the integer position
        m.d.comb += bumped.eq(integer_1 + mask_1 + 1)
        carry = bumped[man + 1]                                       # reached the next power of two
        mid_mantissa = Mux(round_up_1, Mux(carry, 0, bumped[:man]), integer_1[:man])
        mid_exponent = a_1.exponent + (round_up_1 & carry)
        minus_one = _pack(fmt, Const(1, 1), Const(fmt.bias, fmt.exp_bits), Const(0, man))
        result = Signal(fmt.width, name="floor_result")
        with m.Switch(case_1):
            with m.Case(0):
                m.d.comb += result.eq(fmt.canonical_nan)
            with m.Case(1):
                m.d.comb += result.eq(Cat(Const(0, fmt.width - 1), a_1.sign))
            with m.Case(2):
                m.d.comb += result.eq(a_1.value)
            with m.Case(3):
                m.d.comb += result.eq(Mux(a_1.sign, minus_one, Cat(Const(0, fmt.width - 1), Const(0, 1))))
            with m.Default():
                m.d.comb += result.eq(_pack(fmt, a_1.sign, mid_exponent, mid_mantissa))
        return result

    def _exp_scale(self, m: Module, b: _Fields, a_1: _Fields):
        """Stage 1 (from ``b``): the saturated integer ``n`` and ``b``'s class; stage 2 (from registers
        and the registered operand ``a_1``): the exponent add and the result."""
        fmt = self.fmt
        man, int_bits = fmt.man_bits, exp_int_bits(fmt)
        # n = b rounded toward zero, saturated to int_bits (any |n| beyond it over- or underflows anyway).
        b_unbiased = Signal(signed(fmt.exp_bits + 2), name="scale_b_unbiased")
        m.d.comb += b_unbiased.eq(b.exponent - fmt.bias)
        shift_width = max(1, (int_bits - 1).bit_length())
        wide = Signal(man + int_bits + 1, name="scale_shifted")       # 1.M · 2^unbiased, fixed point
        m.d.comb += wide.eq(Cat(b.mantissa, Const(1, 1)) << b_unbiased.as_unsigned()[:shift_width])
        magnitude = wide[man:]                                        # the integer part
        limit = 1 << (int_bits - 1)
        n = Signal(signed(int_bits + 1), name="scale_n")
        with m.If(b.is_zero | (b_unbiased < 0)):
            m.d.comb += n.eq(0)
        with m.Elif(b.is_special | (b_unbiased >= int_bits - 1)):
            m.d.comb += n.eq(Mux(b.sign, -limit, limit - 1))
        with m.Else():
            m.d.comb += n.eq(Mux(b.sign, -magnitude, magnitude))
        n_1 = Signal.like(n, name="scale_n_1")
        b_nan_1, b_inf_1, b_sign_1 = Signal(name="scale_b_nan"), Signal(name="scale_b_inf"), Signal(name="scale_b_sign")
        m.d.sync += [n_1.eq(n), b_nan_1.eq(b.is_nan), b_inf_1.eq(b.is_inf), b_sign_1.eq(b.sign)]
        a = a_1
        exponent = Signal(signed(fmt.exp_bits + int_bits + 2), name="scale_exponent")
        m.d.comb += exponent.eq(a.exponent + n_1)
        overflow = exponent >= fmt.exp_max
        if self._fault == "scale_no_overflow":
            overflow = Const(0, 1)
        result = Signal(fmt.width, name="scale_result")
        with m.If(b_nan_1):
            m.d.comb += result.eq(fmt.canonical_nan)
        with m.Elif(b_inf_1):
            m.d.comb += result.eq(Mux(b_sign_1, 0, fmt.inf))
        with m.Elif(a.is_nan):
            m.d.comb += result.eq(fmt.canonical_nan)
        with m.Elif(a.is_inf):
            m.d.comb += result.eq(a.value)
        with m.Elif(a.is_zero | (exponent <= 0)):
            m.d.comb += result.eq(Cat(Const(0, fmt.width - 1), a.sign))
        with m.Elif(overflow):
            m.d.comb += result.eq(Cat(Const(fmt.inf, fmt.width - 1), a.sign))
        with m.Else():
            m.d.comb += result.eq(_pack(fmt, a.sign, exponent, a.mantissa))
        return result

    def _segment_index(self, m: Module, name: str, layout: SegmentLayout, a: _Fields):
        fmt = self.fmt
        index = Signal(range(max(layout.segments, 2)), name=f"{name}_segment")
        for sign, side, first in ((0, layout.positive, 0), (1, layout.negative, layout.positive.segments)):
            difference = Signal(signed(fmt.exp_bits + 2), name=f"{name}_octave_{sign}")
            m.d.comb += difference.eq(a.exponent - side.base_field(fmt))
            side_index = Signal.like(index, name=f"{name}_index_{sign}")
            with m.If(difference < 0):
                m.d.comb += side_index.eq(first)
            for octave, (offset, bits) in enumerate(zip(side.offsets, side.parts_bits)):
                top = a.mantissa[fmt.man_bits - bits:] if bits else Const(0, 1)
                condition = (difference >= side.octaves - 1) if octave == side.octaves - 1 \
                    else (difference == octave)
                with m.Elif(condition):
                    m.d.comb += side_index.eq(first + offset + top)
            with m.If(a.sign == sign):
                m.d.comb += index.eq(side_index)
        if self._fault == "coefficient_off_by_one":
            return Mux(index == 1, 2, index)
        return index

    def _coefficient(self, m: Module, name: str, a: _Fields, k):
        """Stage 1 (from ``a``): the segment index; stage 2: the ROM row and coefficient ``k``."""
        fmt = self.fmt
        table = self.constants.table(name)
        index_0 = self._segment_index(m, name, table.layout, a)
        index = Signal.like(index_0, name=f"{name}_segment_1")
        m.d.sync += index.eq(index_0)
        rows = [sum(row[j] << (j * fmt.width) for j in range(table.degree + 1)) for row in table.coefficients]
        row_width = (table.degree + 1) * fmt.width
        rom = Array(Const(row, row_width) for row in rows)
        row = Signal(row_width, name=f"{name}_row")
        m.d.comb += row.eq(rom[index])
        coefficient = Signal(fmt.width, name=f"{name}_coefficient")
        with m.Switch(k):
            for j in range(table.degree + 1):
                with m.Case(j):
                    m.d.comb += coefficient.eq(row[j * fmt.width:(j + 1) * fmt.width])
        return coefficient

    def _range_select(self, layout: SegmentLayout, a: _Fields, b: _Fields, c: _Fields):
        fmt = self.fmt
        above = ~a.sign & (a.exponent >= layout.positive.threshold_field(fmt))
        below = a.sign & (a.exponent >= layout.negative.threshold_field(fmt))
        return Mux(a.is_nan, fmt.canonical_nan,
                   Mux(above, _read(fmt, a), Mux(below, _read(fmt, c), _read(fmt, b))))

    def _rsqrt_select(self, a: _Fields, b: _Fields):
        fmt = self.fmt
        return Mux(a.is_nan | (a.sign & ~a.is_zero), fmt.canonical_nan,
                   Mux(a.is_zero, Cat(Const(fmt.inf, fmt.width - 1), a.sign),
                       Mux(a.is_inf, Const(0, fmt.width), _read(fmt, b))))

    def _rsqrt_seed(self, m: Module, a_1: _Fields):
        """Stage 2 (from the registered operand): ``magic - (|a| >> 1)``; ``magic`` keeps it positive."""
        fmt = self.fmt
        seed = Signal(fmt.width, name="rsqrt_seed")
        m.d.comb += seed.eq(Const(self.constants.rsqrt_magic, fmt.width) - a_1.value[1:fmt.width - 1])
        return seed

    def elaborate(self, platform):
        # Two stages (the class docstring): stage 1 decodes the operands (FLOOR's fraction mask,
        # EXP_SCALE's integer n, the segment indices, the whole range select), stage 2 finishes from
        # registers (FLOOR's increment, EXP_SCALE's exponent add, the coefficient ROMs) and picks the
        # function's result. Every register is gated by ``enable``.
        m = Module()
        fmt = self.fmt
        a, b, c = _Fields(self.a, fmt), _Fields(self.b, fmt), _Fields(self.c, fmt)
        a_register = Signal(fmt.width, name="a_1")
        function_1 = Signal(FUNCTION_BITS, name="function_1")
        m.d.sync += [a_register.eq(self.a), function_1.eq(self.function)]
        a_1 = _Fields(a_register, fmt)
        floor = self._floor(m, a, a_1)
        scale = self._exp_scale(m, b, a_1)
        outputs = {LaneFunction.FLOOR: floor, LaneFunction.EXP_SCALE: scale,
                   LaneFunction.RSQRT_SEED: self._rsqrt_seed(m, a_1)}
        # The range selects (and rsqrt's special-case select) are done in stage 1; one register holds the
        # selected function's.
        selects = {LaneFunction.select(name): self._range_select(self.constants.table(name).layout, a, b, c)
                   for name in self.functions}
        selects[LaneFunction.RSQRT_SELECT] = self._rsqrt_select(a, b)
        outputs[LaneFunction.RSQRT_SELECT] = Signal(fmt.width, name="select_1")
        select_1 = outputs[LaneFunction.RSQRT_SELECT]
        if selects:
            select_0 = Signal(fmt.width, name="select_0")
            m.d.comb += select_0.eq(list(selects.values())[-1])
            for code, value in list(selects.items())[:-1]:
                with m.If(self.function == int(code)):
                    m.d.comb += select_0.eq(value)
            m.d.sync += select_1.eq(select_0)
        for name in self.functions:
            first = LaneFunction.coefficient(name, 0)
            k = Signal(range(8), name=f"{name}_k")
            m.d.comb += k.eq(function_1 - first)
            coefficient = self._coefficient(m, name, a, k)
            for j in range(self.constants.table(name).degree + 1):
                outputs[LaneFunction.coefficient(name, j)] = coefficient
            outputs[LaneFunction.select(name)] = select_1
        value = Signal(fmt.width, name="value")
        with m.Switch(function_1):
            for code, output in outputs.items():
                with m.Case(int(code)):
                    m.d.comb += value.eq(output)
        m.d.sync += self.result.eq(value)
        return EnableInserter(self.enable)(m)
