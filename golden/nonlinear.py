"""Nonlinear functions on the PE lanes (issues #4 and 13): constants, pass programs, bit-exact golden model.

exp, SiLU, softplus and rsqrt are **programs**: short sequences of element-wise passes over the PE array's
lanes (``marca.ops.ElementwiseOp``: MUL, SUB, MULADD, MAX, CMP_SELECT ... and FUNCTION). All arithmetic runs
on the PE's own multiplier and adder with constants broadcast to every lane (no per-lane table); a FUNCTION
pass runs one of four bit-logic sub-operations of the lane extension (:class:`LaneFunction`: exponent
insert, negative magnitude, rsqrt seed, rsqrt special cases). This module is the single source of

* the **constants** the generator emits, fitted here in float64 and rounded to the compute format
  (:func:`build_constants`): the e^r polynomial and the split of ln 2 of exp, the log1p(u)/u polynomial of
  softplus, the reciprocal seed of SiLU, the seed constant and correction of rsqrt;
* the **programs** (:func:`exp_program`, :func:`silu_program`, :func:`softplus_program`,
  :func:`rsqrt_program`), a plain data structure (:class:`Program` of :class:`Pass` es with
  :class:`Operand` s) that the golden model below, the hardware testbenches and the controller all execute;
* the **golden model** (:func:`run_program`, :func:`lane_function`), vectorized PyTorch on int64 bit
  patterns, built on :mod:`marca.golden.fp`, bit-exact with the hardware (same passes, same order, same
  roundings).

The design and its accuracy are described in docs/nonlinear.md.
"""

import enum
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..formats import FloatFormat
from ..ops import ElementwiseOp
from . import fp

__all__ = [
    "FUNCTIONS",
    "FUNCTION_BITS",
    "INPUT",
    "LOG2E",
    "MAGNITUDE_BOUND_EXPONENT",
    "RSQRT_SEED_MANTISSA_BITS",
    "MAX_DEGREE",
    "FunctionConstants",
    "LaneFunction",
    "Operand",
    "Pass",
    "Program",
    "build_constants",
    "constant",
    "constants_for",
    "exp",
    "exp_int_bits",
    "exp_program",
    "exp_scale",
    "exp_scale_on_multiplier",
    "exp_polynomial_shift",
    "exp_scale_values",
    "lane_function",
    "lane_function_values",
    "negative_magnitude",
    "negative_magnitude_values",
    "programs",
    "reference",
    "result_of",
    "rsqrt",
    "rsqrt_program",
    "rsqrt_seed",
    "rsqrt_seed_dropped_bits",
    "rsqrt_select",
    "rsqrt_select_values",
    "run_program",
    "silu",
    "silu_program",
    "softplus",
    "softplus_program",
]

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
MAX_DEGREE = 6
FUNCTIONS = ("exp", "silu", "softplus", "rsqrt")
MAGNITUDE_BOUND_EXPONENT = 7
RSQRT_SEED_MANTISSA_BITS = 5
"""RSQRT_SEED reads the exponent field and the top 5 mantissa bits of its operand (the lower ones are
taken as zeros): the seed's error grows from 3.4 % to 4.4 %, which the third-order correction absorbs
(docs/nonlinear.md), and the lane's subtractor is ``man_bits - 5`` bits shorter."""
"""NEGATIVE_MAGNITUDE clamps at -2^7 = -128: exp(-128) underflows in every format, and SiLU's
``x·exp(x)`` of the clamped input stays finite (no ``-Inf · 0``)."""


class LaneFunction(enum.IntEnum):
    """Sub-operations of the lane extension (the ``function`` field of a FUNCTION beat).

    ``EXP_SCALE``
        ``a · 2^n`` where ``b = C + n`` is the exp program's rounding sum (:func:`exp_scale`): ``n`` is read
        from ``b``'s low mantissa bits, no float-to-integer shifter. ``b`` NaN gives NaN; ``b`` below the
        window (t far below the range, -Inf) gives +0, above it (+Inf) gives +Inf, whatever ``a`` is;
        inside it ``n`` is added to ``a``'s exponent field (``a`` taken by its fields: in the programs it
        is then the polynomial's value, a positive normal number near 1), or, in formats where
        :func:`exp_scale_on_multiplier` holds (BF16), ``a`` (then the polynomial scaled by ``2^k``,
        :func:`exp_polynomial_shift`) is multiplied by ``2^(n-k)`` on the PE's multiplier.
    ``NEGATIVE_MAGNITUDE``
        ``-min(|a|, 2^7)``, NaN clamped too (:func:`negative_magnitude`): the argument of exp in SiLU and
        softplus, which never overflows.
    ``RSQRT_SEED``
        The bit-trick seed of ``1/sqrt(a)``: the integer ``magic - (|a| >> 1)`` on the bits (sign cleared;
        only the exponent field and the top :data:`RSQRT_SEED_MANTISSA_BITS` mantissa bits read), a
        positive normal number for every ``a`` (:func:`rsqrt_seed`).
    ``RSQRT_SELECT``
        rsqrt's special cases by ``x = b`` (``a`` is the Newton result r): NaN or negative -> NaN; ±0 (and
        subnormals) -> ±Inf; +Inf -> +0; else ``a`` (:func:`rsqrt_select` ``(x, r)``). ``a`` is the operand
        passed on in every sub-operation but the seed, so the lane has one datapath.
    """

    EXP_SCALE = 0
    NEGATIVE_MAGNITUDE = 1
    RSQRT_SEED = 2
    RSQRT_SELECT = 3


FUNCTION_BITS = 2  # width of the ``function`` field: 4 sub-operations


# Programs -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Operand:
    """Where a pass operand comes from.

    ``kind`` is ``"input"`` (the function's argument ``x``, per lane), ``"result"`` (the per-lane result of
    pass number ``index`` of the same program) or ``"constant"`` (the bit pattern ``bits`` broadcast to every
    lane: ``marca.ops.Broadcast.SCALAR``).
    """

    kind: str
    index: int = 0
    bits: int = 0

    def __post_init__(self):
        if self.kind not in ("input", "result", "constant"):
            raise ValueError(f"kind must be 'input', 'result' or 'constant', not {self.kind!r}")

    def __str__(self):
        return {"input": "x", "result": f"r{self.index}", "constant": f"#{self.bits:#x}"}[self.kind]


INPUT = Operand("input")


def result_of(index: int) -> Operand:
    return Operand("result", index=index)


def constant(bits: int) -> Operand:
    return Operand("constant", bits=bits)


@dataclass(frozen=True)
class Pass:
    """One element-wise pass: every lane computes ``op(a, b, c)`` (``function`` for ``FUNCTION``).

    Operands not used by ``op`` are None. The pass's result is ``result_of(its index)``.
    """

    op: ElementwiseOp
    a: Operand
    b: Operand | None = None
    c: Operand | None = None
    function: LaneFunction | None = None
    comment: str = ""

    def operands(self) -> tuple[Operand, ...]:
        return tuple(operand for operand in (self.a, self.b, self.c) if operand is not None)

    def __str__(self):
        name = self.op.name if self.function is None else f"FUNCTION.{self.function.name}"
        text = f"{name}({', '.join(map(str, self.operands()))})"
        return f"{text:<48} {self.comment}".rstrip()


@dataclass(frozen=True)
class Program:
    """A nonlinear function as element-wise passes; the output is the result of the last pass.

    An R x C array runs one pass over R·C elements per cycle (one beat), so a program of ``len(passes)``
    passes costs ``len(passes)`` cycles per R·C elements: ``R·C / len(passes)`` elements per cycle.
    """

    name: str
    fmt: FloatFormat
    passes: tuple[Pass, ...]

    def __post_init__(self):
        for number, step in enumerate(self.passes):
            for operand in step.operands():
                if operand.kind == "result" and not 0 <= operand.index < number:
                    raise ValueError(f"pass {number} of {self.name} reads result {operand.index}, "
                                     "which is not an earlier pass")
            if (step.op == ElementwiseOp.FUNCTION) != (step.function is not None):
                raise ValueError(f"pass {number} of {self.name}: function must be set exactly for FUNCTION")

    def __len__(self):
        return len(self.passes)

    @property
    def passes_per_element(self) -> int:
        """Array cycles per R·C elements (one pass = one beat)."""
        return len(self.passes)

    def live_values(self) -> int:
        """Most intermediate results alive at once (scratch tiles the controller must hold), counting the
        result being written and not counting the input ``x``."""
        last_use = {}
        for number, step in enumerate(self.passes):
            for operand in step.operands():
                if operand.kind == "result":
                    last_use[operand.index] = number
        last_use[len(self.passes) - 1] = len(self.passes)
        return max(sum(1 for produced, used in last_use.items() if produced <= number <= used)
                   for number in range(len(self.passes)))

    def listing(self) -> str:
        return "\n".join(f"r{number:<3} = {step}" for number, step in enumerate(self.passes))


@dataclass(frozen=True)
class FunctionConstants:
    """Everything the generator emits for the nonlinear functions of one compute format (bit patterns)."""

    fmt: FloatFormat
    log2e: int
    round_constant: int                   # C: t + C rounds t to an integer n held in C + n's mantissa
    ln2_parts: tuple[int, ...]            # ln 2 = sum of parts; n · part exact for the first of two
    exp_coefficients: tuple[int, ...]     # e^r ≈ sum_k c_k r^k, c_0 = 1 first (all times 2^k, c_0 = 2^k,
                                          # k = exp_polynomial_shift(fmt): BF16's gives 2^63·e^r)
    softplus_coefficients: tuple[int, ...]  # log1p(u)/u ≈ sum_k q_k u^k on [0, 1], q_0 first
    reciprocal_coefficients: tuple[int, ...]  # seed of 1/(1 + u) ≈ s_0 + s_1 u + s_2 u^2 on [0, 1]
    rsqrt_magic: int                      # RSQRT_SEED's integer constant
    rsqrt_coefficients: tuple[int, ...]   # correction 1 + b1·d + b2·d², (b1, b2)

    @property
    def exp_degree(self) -> int:
        return len(self.exp_coefficients) - 1

    @property
    def softplus_degree(self) -> int:
        return len(self.softplus_coefficients) - 1


def reference(function: str, x: torch.Tensor) -> torch.Tensor:
    """float64 references: torch.exp, F.silu, F.softplus, torch.rsqrt (the accuracy yardsticks, never
    bit-exact)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if function == "rsqrt":
        return torch.rsqrt(x)
    if function == "exp":
        return torch.exp(x)
    if function == "silu":
        return torch.nn.functional.silu(x)
    if function == "softplus":
        return torch.nn.functional.softplus(x)
    raise ValueError(f"function must be one of {FUNCTIONS}, not {function!r}")


def _encode_value(value: float, fmt: FloatFormat) -> int:
    return int(fp.encode(torch.tensor([value], dtype=torch.float64), fmt)[0])


def _decode_value(bits: int, fmt: FloatFormat) -> float:
    return float(fp.decode(torch.tensor([bits]), fmt)[0])


def _chebyshev(low: float, high: float, points: int = 400) -> np.ndarray:
    nodes = (low + high) / 2 + (high - low) / 2 * np.cos(np.pi * (np.arange(points) + 0.5) / points)
    return np.concatenate([[low, high], nodes])


def _fit_relative(x: np.ndarray, target: np.ndarray, degree: int, hold_one: bool) -> np.ndarray:
    """Minimax relative fit of ``target`` by a polynomial in ``x``; ``hold_one`` holds ``c_0 = 1``."""
    first = 1 if hold_one else 0
    design = np.stack([x ** k for k in range(first, degree + 1)], axis=1)[None]
    goal = (target - 1.0 if hold_one else target)[None]
    values = _lawson(design, goal, (1.0 / np.abs(target))[None], 300)[0]
    return np.concatenate([[1.0], values]) if hold_one else values


def _round_constant(fmt: FloatFormat) -> int:
    """C = 1.5·2^(p-1): for |t| < 2^(p-2) the sum t + C lies in [2^(p-1), 2^p), whose ulp is 1, so the adder
    rounds t to the nearest integer n and C + n holds n in its low mantissa bits. Every n the format needs
    fits when 2^(p-2) > emax + man_bits + 3 (FP32, FP16). BF16 (p = 8) holds only |n| < 64 so: t in
    [64, 128) lands in [2^p, 2^(p+1)) (ulp 2: n even, still decoded by EXP_SCALE), t < -64 below 2^(p-1)
    (EXP_SCALE gives +0, as it does n = -64: results below about 2^-63.5 flush)."""
    return _encode_value(1.5 * 2.0 ** (fmt.precision - 1), fmt)


def _ln2_parts(fmt: FloatFormat) -> tuple[int, ...]:
    """ln 2 as one constant (FP32: n·ln2 rounds by at most 128·ln2·2^-24 ≈ 5e-6 absolute) or, when the
    format is short (precision <= 16), split Cody–Waite style: ``hi`` with ``precision - 4`` significant bits
    (``n · hi`` exact wherever it fits the format: FP16 for every |n| <= 23, every normal result; BF16
    (``hi = 11/16``) for |n| <= 23, i.e. |x| < 16.3, and some larger n) and ``lo = ln2 - hi`` rounded (small:
    its product rounds by at most 128 · 0.0056 · 2^-9 = 1.4e-3 in BF16)."""
    if fmt.precision > 16:
        return (_encode_value(LN2, fmt),)
    bits = fmt.precision - 4
    scale = 2.0 ** bits
    high = math.floor(LN2 * scale + 0.5) / scale
    return (_encode_value(high, fmt), _encode_value(LN2 - high, fmt))


def _lawson(design: np.ndarray, target: np.ndarray, weight: np.ndarray, iterations: int) -> np.ndarray:
    """Weighted minimax fit by Lawson's iteratively reweighted least squares, batched over the first axis:
    minimises ``max |weight · (design @ coefficients - target)|`` per batch row."""
    batch, points, _ = design.shape
    lawson = np.full((batch, points), 1.0 / points)
    scaled_design = design * weight[..., None]
    scaled_target = target * weight
    for _ in range(iterations):
        root = np.sqrt(lawson)[..., None]
        a = scaled_design * root
        y = scaled_target * root[..., 0]
        normal = np.einsum("bpi,bpj->bij", a, a)
        # A tiny ridge keeps an all-zero column (a coefficient held at 0) solvable.
        ridge = 1e-14 * normal.trace(axis1=1, axis2=2)[:, None, None] / design.shape[2] + 1e-300
        coefficients = np.linalg.solve(normal + ridge * np.eye(design.shape[2]),
                                       np.einsum("bpi,bp->bi", a, y)[..., None])[..., 0]
        error = np.abs(np.einsum("bpi,bi->bp", scaled_design, coefficients) - scaled_target)
        lawson = lawson * (error + 1e-300)
        lawson /= lawson.sum(axis=1, keepdims=True)
    return coefficients


def rsqrt_seed_dropped_bits(fmt: FloatFormat) -> int:
    """How many low bits of ``|a| >> 1`` RSQRT_SEED takes as zeros (:data:`RSQRT_SEED_MANTISSA_BITS`)."""
    return max(0, fmt.man_bits - RSQRT_SEED_MANTISSA_BITS)


def _seed_operand(bits, fmt: FloatFormat):
    """``bits >> 1`` (sign already cleared) with its :func:`rsqrt_seed_dropped_bits` low bits cleared."""
    dropped = rsqrt_seed_dropped_bits(fmt)
    return ((bits >> 1) >> dropped) << dropped


def _rsqrt_seed_ratios(fmt: FloatFormat, magic: int, samples: int = 1 << 16) -> np.ndarray:
    """``seed(x) · sqrt(x)`` (the seed's ratio to the true result) over one period of the seed's error,
    x in [1, 4): every mantissa of both exponent parities (at most ``samples`` evenly spaced ones each)."""
    step = max(1, (1 << fmt.man_bits) // samples)
    mantissa = np.arange(0, 1 << fmt.man_bits, step, dtype=np.int64)
    mantissa = np.concatenate([mantissa, [(1 << fmt.man_bits) - 1]])
    ratios = []
    for parity in (0, 1):
        bits = ((fmt.bias + parity) << fmt.man_bits) | mantissa
        seed = magic - _seed_operand(bits, fmt)
        x = (1.0 + mantissa / 2.0 ** fmt.man_bits) * 2.0 ** parity
        seed_field = seed >> fmt.man_bits
        seed_value = (1.0 + (seed & ((1 << fmt.man_bits) - 1)) / 2.0 ** fmt.man_bits) \
            * np.exp2((seed_field - fmt.bias).astype(np.float64))
        ratios.append(seed_value * np.sqrt(x))
    return np.concatenate(ratios)


def _fit_rsqrt(fmt: FloatFormat) -> tuple[int, tuple[int, ...]]:
    """The seed constant and correction of rsqrt.

    The seed ``magic - (bits >> 1)`` halves and negates the exponent and roughly the mantissa's logarithm
    (the classic bit trick); ``magic`` is searched (coarse to fine, around ``1.5 · 2^m · (bias - 0.045)``)
    for the smallest max relative error of the seed alone (FP32: 0x5f37642f, 3.4%). With
    ``s = seed · sqrt(x)`` and ``d = x · seed² - 1 = s² - 1``, the result ``seed · (1 + b1·d + b2·d²)`` is a
    one-step third-order (Householder) correction; ``b1, b2`` (≈ -1/2, 3/8) are fitted minimax for the
    relative error over the seed's whole range of ``s``.
    """
    man = fmt.man_bits

    def score(magic, samples):
        ratios = _rsqrt_seed_ratios(fmt, magic, samples)
        return max(ratios.max() - 1.0, 1.0 - ratios.min())

    best = int(round(1.5 * (1 << man) * (fmt.bias - 0.0450466)))
    step = 1 << max(0, man - 11)
    span = 64 * step
    while True:   # coarse to fine; the last, unit step on the full sample set
        samples = 1 << 16 if step == 1 else 1 << 12
        best = min(range(best - span, best + span + 1, step), key=lambda magic: score(magic, samples))
        if step == 1:
            break
        span, step = 2 * step, max(1, step // 16)
    ratios = _rsqrt_seed_ratios(fmt, best)
    low, high = ratios.min(), ratios.max()
    points = 400
    s = (low + high) / 2 + (high - low) / 2 * np.cos(np.pi * (np.arange(points) + 0.5) / points)
    s = np.concatenate([[low, high], s])
    d = s * s - 1.0
    b1, b2 = _lawson(np.stack([s * d, s * d * d], axis=1)[None], (1.0 - s)[None], np.ones_like(s)[None], 300)[0]
    return best, (_encode_value(float(b1), fmt), _encode_value(float(b2), fmt))


def _check_degree(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_DEGREE:
        raise ValueError(f"{name} must be an integer in [{low}, {MAX_DEGREE}], not {value!r}")


@functools.cache
def build_constants(*, fmt: FloatFormat, exp_degree: int = 3, softplus_degree: int = 4) -> FunctionConstants:
    """Fit and round every constant of the nonlinear functions for one compute format (cached).

    exp: e^r on [-ln2/2, ln2/2] (the reduced argument), minimax relative with c_0 = 1 held (exp(0) = 1
    exactly, and the error vanishes as x -> 0). softplus: log1p(u)/u on [0, 1], minimax relative. SiLU:
    1/(1 + u) on [0, 1] by a quadratic seed (minimax relative) and one Newton step. rsqrt:
    :func:`_fit_rsqrt`."""
    if not isinstance(fmt, FloatFormat):
        raise ValueError(f"fmt must be a FloatFormat, not {fmt!r}")
    _check_degree("exp_degree", exp_degree, 1)
    _check_degree("softplus_degree", softplus_degree, 1)
    r = _chebyshev(-LN2 / 2, LN2 / 2)
    exp_values = _fit_relative(r, np.exp(r), exp_degree, hold_one=True)
    u = _chebyshev(0.0, 1.0)
    safe = np.maximum(u, 1e-12)
    softplus_values = _fit_relative(u, np.log1p(safe) / safe, softplus_degree, hold_one=False)
    reciprocal_values = _fit_relative(u, 1.0 / (1.0 + u), 2, hold_one=False)
    rsqrt_magic, rsqrt_coefficients = _fit_rsqrt(fmt)

    def encode(values):
        return tuple(_encode_value(float(v), fmt) for v in values)

    # Where EXP_SCALE multiplies by 2^(n-k), the polynomial gives 2^k·e^r: every coefficient times 2^k, which
    # scales every Horner step exactly (no step is near the format's range ends).
    exp_scale = 2.0 ** exp_polynomial_shift(fmt)
    return FunctionConstants(
        fmt=fmt, log2e=_encode_value(LOG2E, fmt), round_constant=_round_constant(fmt),
        ln2_parts=_ln2_parts(fmt), exp_coefficients=encode(exp_scale * exp_values),
        softplus_coefficients=encode(softplus_values), reciprocal_coefficients=encode(reciprocal_values),
        rsqrt_magic=rsqrt_magic, rsqrt_coefficients=rsqrt_coefficients)


def constants_for(config) -> FunctionConstants:
    """:func:`build_constants` for a :class:`marca.config.MarcaConfig`."""
    return build_constants(fmt=config.compute_format, exp_degree=config.exp_degree,
                           softplus_degree=config.softplus_degree)


def _constants(source):
    if isinstance(source, FunctionConstants):
        return source
    return constants_for(source)


# The programs ---------------------------------------------------------------------------------------------

class _Builder:
    """Appends passes and hands out their results."""

    def __init__(self):
        self.passes = []

    def add(self, op, a, b=None, c=None, function=None, comment=""):
        self.passes.append(Pass(op, a, b, c, function, comment))
        return result_of(len(self.passes) - 1)


def _exp_passes(builder: _Builder, constants: FunctionConstants, argument: Operand) -> Operand:
    """exp(argument): ``C + n = x·log2e + C`` (the adder rounds t to the integer n), ``n = (C + n) - C``,
    ``r = x - n·ln2`` (one or two MULADDs), ``p = e^r`` by Horner (c_0 = 1), ``p · 2^n`` (EXP_SCALE reads n
    from ``C + n``; where :func:`exp_scale_on_multiplier`, ``p = 2^k·e^r`` with c_0 = 2^k and EXP_SCALE is
    ``p · 2^(n-k)``, :func:`exp_polynomial_shift`)."""
    fmt = constants.fmt
    c = constants.exp_coefficients
    degree = len(c) - 1
    rounded = builder.add(ElementwiseOp.MULADD, argument, constant(constants.log2e),
                          constant(constants.round_constant), comment="C + n: n = round(x * log2(e))")
    n = builder.add(ElementwiseOp.SUB, rounded, constant(constants.round_constant), comment="n (exact)")
    reduced = argument
    for k, part in enumerate(constants.ln2_parts):
        reduced = builder.add(ElementwiseOp.MULADD, n, constant(part ^ fmt.sign_bit), reduced,
                              comment=f"r = x - n * ln2{'_hi' if k == 0 and len(constants.ln2_parts) > 1 else ''}"
                              if k == 0 else "r = r - n * ln2_lo")
    p = builder.add(ElementwiseOp.MULADD, reduced, constant(c[degree]), constant(c[degree - 1]),
                    comment=f"p = c{degree} * r + c{degree - 1}")
    for k in range(degree - 2, -1, -1):
        p = builder.add(ElementwiseOp.MULADD, p, reduced, constant(c[k]), comment=f"p = p * r + c{k}")
    return builder.add(ElementwiseOp.FUNCTION, p, rounded, function=LaneFunction.EXP_SCALE,
                       comment="exp = p * 2^n (n from C + n's low bits)")


def exp_program(source) -> Program:
    """exp(x): ``4 + exp_degree`` passes (one more in 16-bit formats, for the split ln 2).
    ``source`` is a MarcaConfig or :class:`FunctionConstants`."""
    constants = _constants(source)
    builder = _Builder()
    _exp_passes(builder, constants, INPUT)
    return Program("exp", constants.fmt, tuple(builder.passes))


def silu_program(source) -> Program:
    """silu(x) = x / (1 + e^-x), relatively accurate everywhere, from ``u = exp(-|x|)`` (never overflows):
    ``1/(1 + u)`` by a quadratic seed in u and one Newton step; ``x·u`` for x < 0 (``m·u`` with the clamped
    ``m = -|x|``, so -Inf gives -0), x itself otherwise (CMP_SELECT); then one product.
    ``exp passes + 9`` passes."""
    constants = _constants(source)
    fmt = constants.fmt
    s0, s1, s2 = constants.reciprocal_coefficients
    builder = _Builder()
    m = builder.add(ElementwiseOp.FUNCTION, INPUT, function=LaneFunction.NEGATIVE_MAGNITUDE,
                    comment="m = -min(|x|, 128)")
    u = _exp_passes(builder, constants, m)
    minus_one = fmt.one | fmt.sign_bit
    denominator = builder.add(ElementwiseOp.MULADD, u, constant(minus_one), constant(minus_one),
                              comment="-(1 + u)")
    seed = builder.add(ElementwiseOp.MULADD, u, constant(s2), constant(s1), comment="s2 * u + s1")
    seed = builder.add(ElementwiseOp.MULADD, seed, u, constant(s0), comment="y0 = (s2 * u + s1) * u + s0")
    two = _encode_value(2.0, fmt)
    newton = builder.add(ElementwiseOp.MULADD, denominator, seed, constant(two), comment="2 - (1 + u) * y0")
    reciprocal = builder.add(ElementwiseOp.MUL, seed, newton, comment="y = 1 / (1 + u) (Newton)")
    product = builder.add(ElementwiseOp.MUL, m, u, comment="m * u = x * e^x for x < 0")
    numerator = builder.add(ElementwiseOp.CMP_SELECT, INPUT, constant(0), product,
                            comment="x < 0: x * e^x; else x")
    builder.add(ElementwiseOp.MUL, numerator, reciprocal, comment="silu = numerator / (1 + u)")
    return Program("silu", fmt, tuple(builder.passes))


def softplus_program(source) -> Program:
    """softplus(x) = max(x, 0) + log1p(u), ``u = exp(-|x|)``: ``u·q(u)`` with ``q ≈ log1p(u)/u``
    (relative, so the far left keeps exp's accuracy), then ``max(x + u·q, u·q)`` (= u·q + max(x, 0)).
    ``exp passes + softplus_degree + 4`` passes."""
    constants = _constants(source)
    fmt = constants.fmt
    q = constants.softplus_coefficients
    degree = len(q) - 1
    builder = _Builder()
    m = builder.add(ElementwiseOp.FUNCTION, INPUT, function=LaneFunction.NEGATIVE_MAGNITUDE,
                    comment="m = -min(|x|, 128)")
    u = _exp_passes(builder, constants, m)
    p = builder.add(ElementwiseOp.MULADD, u, constant(q[degree]), constant(q[degree - 1]),
                    comment=f"q = q{degree} * u + q{degree - 1}")
    for k in range(degree - 2, -1, -1):
        p = builder.add(ElementwiseOp.MULADD, p, u, constant(q[k]), comment=f"q = q * u + q{k}")
    log1p = builder.add(ElementwiseOp.MUL, p, u, comment="log1p(u) = q * u")
    total = builder.add(ElementwiseOp.ADD, INPUT, log1p, comment="x + log1p(u)")
    builder.add(ElementwiseOp.MAX, total, log1p, comment="softplus = max(x + log1p(u), log1p(u))")
    return Program("softplus", fmt, tuple(builder.passes))


def rsqrt_program(source) -> Program:
    """1/sqrt(x): 7 passes. The lane's bit-trick seed ``y``, one third-order correction on the multiplier
    and adder (``d = x·y·y - 1``, ``y · (1 + d·(b1 + b2·d))``; ``x·y`` first, so nothing under- or
    overflows for any normal x), then the lane's special-case select."""
    constants = _constants(source)
    fmt = constants.fmt
    b1, b2 = constants.rsqrt_coefficients
    builder = _Builder()
    y = builder.add(ElementwiseOp.FUNCTION, INPUT, function=LaneFunction.RSQRT_SEED,
                    comment="y = magic - (bits >> 1)")
    h = builder.add(ElementwiseOp.MUL, INPUT, y, comment="h = x * y")
    d = builder.add(ElementwiseOp.MULADD, h, y, constant(fmt.one | fmt.sign_bit), comment="d = h * y - 1")
    q = builder.add(ElementwiseOp.MULADD, d, constant(b2), constant(b1), comment="q = b2 * d + b1")
    g = builder.add(ElementwiseOp.MULADD, q, d, constant(fmt.one), comment="g = q * d + 1")
    r = builder.add(ElementwiseOp.MUL, y, g, comment="r = y * g")
    builder.add(ElementwiseOp.FUNCTION, r, INPUT, function=LaneFunction.RSQRT_SELECT,
                comment="x NaN or < 0: NaN; ±0: ±Inf; +Inf: +0")
    return Program("rsqrt", fmt, tuple(builder.passes))


def programs(source) -> dict[str, Program]:
    """All four programs of a configuration, by name (:data:`FUNCTIONS`)."""
    return {"exp": exp_program(source), "silu": silu_program(source), "softplus": softplus_program(source),
            "rsqrt": rsqrt_program(source)}


# Golden model of the lane extension ----------------------------------------------------------------------

def _read(bits, fmt: FloatFormat) -> torch.Tensor:
    """The contract's read of an operand: canonical NaN, subnormals as zeros of their sign."""
    return fp.encode(fp.decode(bits, fmt), fmt)


def exp_int_bits(fmt: FloatFormat) -> int:
    """Width of the saturated integer exponent shift: every |n| beyond its range over- or underflows."""
    return fmt.exp_bits + 1


def exp_scale_on_multiplier(fmt: FloatFormat) -> bool:
    """Whether EXP_SCALE is ``mul(a, 2^(n-k))`` on the PE's multiplier (the lane only builds the factor from
    ``b = C + n``; the exp polynomial is scaled by ``2^k``, :func:`exp_polynomial_shift`) rather than
    ``a · 2^n`` on ``a``'s exponent field in the lane. With ``k = bias + 2^(p-1) - C`` the factor's exponent
    field is ``C + n``'s mantissa field itself in C's binade, and ``2^(p-1) + 2·mantissa`` in the next one
    (no adder): it is where every mantissa field is an exponent field below all ones, ``2^m < exp_max``: BF16
    (``k = 63``; the factor field 0 of n = -64 is the factor +0, so results of n <= -64 flush). FP32 and
    FP16 fail it, and no ``k`` would serve them: their results span ``2^emin`` to just below
    ``2^(emax+1)``, one more value of n than there are normal powers of two; their lane adds ``n`` to
    ``a``'s exponent field."""
    return (1 << fmt.man_bits) < fmt.exp_max


def exp_polynomial_shift(fmt: FloatFormat) -> int:
    """``k``: exp's polynomial gives ``2^k·e^r`` and EXP_SCALE multiplies it by ``2^(n-k)``, where
    :func:`exp_scale_on_multiplier` (``bias + 2^(p-1) - C`` = ``bias - 2^(p-2)``, 63 in BF16); else 0."""
    return fmt.bias - (1 << (fmt.precision - 2)) if exp_scale_on_multiplier(fmt) else 0


def _exp_scale_factor(b_value, constants: FunctionConstants):
    """``(inside, above, field)`` of EXP_SCALE on the multiplier: ``field = n - k + bias`` is the factor
    ``2^(n-k)``'s exponent field (0: the factor is +0), used where ``b`` lies in ``C + n``'s two binades
    ``[2^(p-1), 2^(p+1))`` and ``field < exp_max``; above: +Inf, a larger ``b``, or ``field >= exp_max``."""
    fmt = constants.fmt
    low = 2.0 ** (fmt.precision - 1)
    high = low * 4
    n = b_value - _decode_value(constants.round_constant, fmt)
    window = (b_value >= low) & (b_value < high)
    field = n - exp_polynomial_shift(fmt) + fmt.bias
    inside = window & (field < fmt.exp_max)
    above = (b_value >= high) | (window & (field >= fmt.exp_max))
    return inside, above, field


def exp_scale(a, b, constants: FunctionConstants) -> torch.Tensor:
    """EXP_SCALE: ``a · 2^n`` on ``a``'s fields, ``n = b - C``, where ``b`` must lie in ``[2^(p-1), 2^(p+1))``
    (two binades, see :func:`_round_constant`) and ``-2^exp_bits <= n < 2^exp_bits`` (:func:`exp_int_bits`;
    every n a result needs).

    ``b`` decides first: NaN -> canonical NaN; below the window (negative, zero, -Inf, small, or n too
    negative) -> +0; above it (+Inf, or n too large) -> +Inf. Otherwise the result is ``a``'s sign and
    mantissa with exponent field ``e = a's exponent field + n``: ``e >= exp_max`` -> Inf, ``e <= 0`` -> zero
    (both of ``a``'s sign). ``a`` is taken by its fields alone (a NaN, Inf, zero or subnormal ``a`` is not
    special): in the programs ``a`` is the exp polynomial's value, a positive normal number near 1, whenever
    ``b`` is inside the window, and there this is exactly ``ldexp(a, n)`` with the contract's overflow and
    flush.

    Where :func:`exp_scale_on_multiplier` (BF16): ``b`` NaN -> NaN; ``b`` below ``2^(p-1)`` -> +0; ``b`` at
    or above ``2^(p+1)``, or ``2^(n-k)`` above the format's largest power of two -> +Inf; otherwise the
    contract's ``mul(a, 2^(n-k))``, the factor +0 where ``2^(n-k)`` is below the normal range
    (:func:`exp_polynomial_shift`; in the programs ``a`` is the polynomial's value times ``2^k``, so this is
    ``ldexp(a / 2^k, n)`` with the contract's overflow and flush, and +0 for n = -64)."""
    fmt = constants.fmt
    a = torch.as_tensor(a, dtype=torch.int64)
    b_value = fp.decode(b, fmt)
    if exp_scale_on_multiplier(fmt):
        inside, above, field = _exp_scale_factor(b_value, constants)
        factor = torch.where(inside, field, 0.0).to(torch.int64) << fmt.man_bits
        out = fp.mul(a, factor, fmt)
        out = torch.where(inside, out, torch.where(above, fmt.inf, 0))
        return torch.where(torch.isnan(b_value), fmt.canonical_nan, out)
    low = 2.0 ** (fmt.precision - 1)
    high = low * 4
    n = b_value - _decode_value(constants.round_constant, fmt)
    limit = 2 ** (exp_int_bits(fmt) - 1)
    inside = (b_value >= low) & (b_value < high)
    shift = torch.where(inside, n, 0.0).clamp(-limit, limit - 1).to(torch.int64)
    sign = a & fmt.sign_bit
    field = ((a >> fmt.man_bits) & fmt.exp_max) + shift
    mantissa = a & ((1 << fmt.man_bits) - 1)
    out = torch.where(field >= fmt.exp_max, sign | fmt.inf,
                      torch.where(field <= 0, sign, sign | (field.clamp(0, fmt.exp_max) << fmt.man_bits) | mantissa))
    over = (b_value >= high) | (inside & (n >= limit))
    under = (b_value < low) | (inside & (n < -limit))
    out = torch.where(over, fmt.inf, torch.where(under, 0, out))
    return torch.where(torch.isnan(b_value), fmt.canonical_nan, out)


def negative_magnitude(a, fmt: FloatFormat) -> torch.Tensor:
    """NEGATIVE_MAGNITUDE: ``-min(|a|, 2^7)`` (subnormals read as -0); NaN, whose exponent field is above
    the bound's, is clamped too (-2^7): the programs get their NaN from ``x`` itself (SiLU's CMP_SELECT
    and softplus's ADD and MAX pass it on)."""
    value = fp.decode(a, fmt)
    return fp.encode(-value.abs().nan_to_num(nan=math.inf).clamp(max=2.0 ** MAGNITUDE_BOUND_EXPONENT), fmt)


def rsqrt_seed(a, magic: int, fmt: FloatFormat) -> torch.Tensor:
    """RSQRT_SEED: the integer ``magic - ((a with its sign cleared) >> 1)`` as a bit pattern, the low
    :func:`rsqrt_seed_dropped_bits` bits of the shifted operand taken as zeros (only the exponent field and
    the top :data:`RSQRT_SEED_MANTISSA_BITS` mantissa bits are read). ``magic`` is chosen so this is a
    positive normal number for every pattern (specials too; RSQRT_SELECT fixes them)."""
    a = torch.as_tensor(a, dtype=torch.int64)
    return magic - _seed_operand(a & (fmt.sign_bit - 1), fmt)


def rsqrt_select(x, b, fmt: FloatFormat) -> torch.Tensor:
    """RSQRT_SELECT: NaN ``x`` or ``x < 0`` -> canonical NaN; ±0 (subnormals read as zeros) -> ±Inf (IEEE
    rSqrt); +Inf -> +0; otherwise read(b)."""
    x = torch.as_tensor(x, dtype=torch.int64)
    value = fp.decode(x, fmt)
    out = _read(b, fmt)
    out = torch.where(value == torch.inf, 0, out)
    out = torch.where(value == 0, fmt.inf | (x & fmt.sign_bit), out)
    return torch.where(torch.isnan(value) | (value < 0), fmt.canonical_nan, out)


def lane_function(function: LaneFunction, a, b, c, constants) -> torch.Tensor:
    """Golden model of one FUNCTION pass of the lane extension."""
    constants = _constants(constants)
    fmt = constants.fmt
    function = LaneFunction(function)
    if function == LaneFunction.EXP_SCALE:
        return exp_scale(a, b, constants)
    if function == LaneFunction.NEGATIVE_MAGNITUDE:
        return negative_magnitude(a, fmt)
    if function == LaneFunction.RSQRT_SEED:
        return rsqrt_seed(a, constants.rsqrt_magic, fmt)
    return rsqrt_select(b, a, fmt)


def run_program(program: Program, x, constants, *, every_pass: bool = False):
    """Run ``program`` on bit patterns ``x`` (any shape), pass by pass, exactly as the lanes do.

    Returns the output bits, or with ``every_pass`` the list of every pass's result bits."""
    constants = _constants(constants)
    fmt = constants.fmt
    x = torch.as_tensor(x, dtype=torch.int64)
    results = []

    def fetch(operand):
        if operand is None:
            return torch.zeros_like(x)
        if operand.kind == "input":
            return x
        if operand.kind == "result":
            return results[operand.index]
        return torch.full_like(x, operand.bits)

    for step in program.passes:
        a, b, c = fetch(step.a), fetch(step.b), fetch(step.c)
        op = step.op
        if op == ElementwiseOp.PASS:
            out = _read(a, fmt)
        elif op == ElementwiseOp.MUL:
            out = fp.mul(a, b, fmt)
        elif op == ElementwiseOp.ADD:
            out = fp.add(a, b, fmt)
        elif op == ElementwiseOp.SUB:
            out = fp.sub(a, b, fmt)
        elif op == ElementwiseOp.MULADD:
            out = fp.mul_add(a, b, c, fmt)
        elif op == ElementwiseOp.MIN:
            out = fp.minimum(a, b, fmt)
        elif op == ElementwiseOp.MAX:
            out = fp.maximum(a, b, fmt)
        elif op == ElementwiseOp.CMP_SELECT:
            out = torch.where(fp.compare(a, b, fmt)[0], _read(c, fmt), _read(a, fmt))
        elif op == ElementwiseOp.FUNCTION:
            out = lane_function(step.function, a, b, c, constants)
        else:
            raise ValueError(f"unknown element-wise op {op!r}")
        results.append(out)
    return results if every_pass else results[-1]


def exp(x, config) -> torch.Tensor:
    """Golden exp of bit patterns ``x`` for a MarcaConfig (or :class:`FunctionConstants`)."""
    return run_program(exp_program(config), x, config)


def silu(x, config) -> torch.Tensor:
    return run_program(silu_program(config), x, config)


def softplus(x, config) -> torch.Tensor:
    return run_program(softplus_program(config), x, config)


def rsqrt(x, config) -> torch.Tensor:
    """Golden 1/sqrt(x) of bit patterns ``x`` (RMSNorm's reciprocal square root)."""
    return run_program(rsqrt_program(config), x, config)


# The lane extension on values (the golden ISS's fast path) -------------------------------------------------
#
# The same four sub-operations on float32 *values* (marca.golden.fp's value representation: numbers as the
# contract reads them, NaN for the canonical NaN, no subnormals), derived from the definitions above rather
# than from any implementation: EXP_SCALE's shift is an exact power-of-two scaling, so the contract's
# rounding reduces to its range check (fp.round_values); NEGATIVE_MAGNITUDE and RSQRT_SELECT only choose
# among their operands and constants; RSQRT_SEED is integer logic on the pattern itself.
# tests/test_iss_fast.py holds lane_function_values equal to lane_function bit for bit.

@functools.lru_cache(maxsize=64)
def _round_constant_value(bits: int, fmt: FloatFormat) -> float:
    return _decode_value(bits, fmt)


def exp_scale_values(a, b, constants: FunctionConstants):
    """:func:`exp_scale` on values (torch tensors or numpy arrays, see ``marca.golden.fp._xp``). A value's
    fields are those of its contract pattern: a NaN (canonical) has exponent field ``exp_max`` and
    mantissa ``1.5``, an Inf ``exp_max`` and ``1``, a zero ``0`` and ``1``; such an ``a`` is replaced by the
    (float64) number its fields would spell, so the exact scaling and the contract's range check below give
    :func:`exp_scale`'s field result."""
    fmt = constants.fmt
    xp = fp._xp(a, b)
    low = 2.0 ** (fmt.precision - 1)
    high = low * 4
    limit = 2 ** (exp_int_bits(fmt) - 1)
    b = fp._float64(b)
    if exp_scale_on_multiplier(fmt):
        # mul(a, 2^(n-k)): exact in float64 (a NaN, Inf or zero stays so), the contract's range check; a
        # factor field of 0 is the factor +0 (Inf times it: NaN).
        inside, above, field = _exp_scale_factor(b, constants)
        shift = xp.where(inside, field - fmt.bias, 0.0)
        a = fp._float64(a)
        scaled = np.ldexp(a, shift.astype(np.int32)) if xp is np else torch.ldexp(a, shift)
        scaled = xp.where(field == 0, a * 0.0, scaled)
        out = fp.round_values(scaled, fmt)
        out = xp.where(inside, out, xp.where(above, xp.inf, 0.0))
        out = xp.where(xp.isnan(b), xp.nan, out)
        return out.astype(np.float32) if xp is np else out.to(torch.float32)
    n = b - _round_constant_value(constants.round_constant, fmt)  # exact: b and C are integers below 2^25
    inside = (b >= low) & (b < high)
    shift = xp.where(inside, n, 0.0).clip(-limit, limit - 1)
    a = fp._float64(a)
    top = 2.0 ** (fmt.exp_max - fmt.bias)
    a = xp.where(xp.isnan(a), 1.5 * top,
                 xp.where(xp.isinf(a), xp.copysign(xp.full_like(a, top), a),
                          xp.where(a == 0, xp.copysign(xp.full_like(a, 2.0 ** -fmt.bias), a), a)))
    # a has at most 24 significant bits and |shift| <= 2^exp_bits: a·2^shift is exact in float64, so the
    # contract's rounding is only its overflow and flush.
    if xp is np:
        scaled = np.ldexp(a, shift.astype(np.int32))
    else:
        scaled = torch.ldexp(a, shift)
    out = fp.round_values(scaled, fmt)
    over = (b >= high) | (inside & (n >= limit))
    under = (b < low) | (inside & (n < -limit))
    out = xp.where(over, xp.inf, xp.where(under, 0.0, out))
    out = xp.where(xp.isnan(b), xp.nan, out)
    return out.astype(np.float32) if xp is np else out.to(torch.float32)


def negative_magnitude_values(a):
    """:func:`negative_magnitude` on values (2^7 is exact in every format; NaN gives -2^7)."""
    xp = fp._xp(a)
    bound = xp.full_like(a, 2.0 ** MAGNITUDE_BOUND_EXPONENT)
    return -xp.where(xp.isnan(a), bound, xp.minimum(abs(a), bound))


def rsqrt_select_values(x, b):
    """:func:`rsqrt_select` on values: NaN or negative ``x`` -> NaN; ±0 -> ±Inf; +Inf -> +0; else ``b``."""
    xp = fp._xp(x, b)
    x, b = fp._broadcast(xp, x, b)
    out = xp.where(x == xp.inf, xp.zeros_like(b), b)
    out = xp.where(x == 0, xp.copysign(xp.full_like(x, xp.inf), x), out)
    return xp.where(xp.isnan(x) | (x < 0), xp.full_like(x, xp.nan), out)


def lane_function_values(function: LaneFunction, a, b, c, constants) -> torch.Tensor:
    """:func:`lane_function` on float32 values (``marca.golden.fp.to_values``; torch tensors or numpy
    arrays): the same results, without a round trip through bit patterns (RSQRT_SEED, integer logic on the
    pattern, takes one)."""
    constants = _constants(constants)
    fmt = constants.fmt
    function = LaneFunction(function)
    if function == LaneFunction.EXP_SCALE:
        return exp_scale_values(a, b, constants)
    if function == LaneFunction.NEGATIVE_MAGNITUDE:
        return negative_magnitude_values(a)
    if function == LaneFunction.RSQRT_SEED:
        host = isinstance(a, np.ndarray)
        bits = fp.from_values(torch.from_numpy(a) if host else a, fmt)
        out = fp.to_values(rsqrt_seed(bits, constants.rsqrt_magic, fmt), fmt)
        return out.numpy() if host else out
    return rsqrt_select_values(b, a)
