"""Nonlinear functions on the PE lanes (issue #4): fitted constants, pass programs, bit-exact golden model.

exp, SiLU, softplus and rsqrt are **programs**: short sequences of element-wise passes over the PE array's lanes
(``marca.ops.ElementwiseOp``: MUL, SUB, MULADD, ... and FUNCTION). A FUNCTION pass runs one of the few
bit-logic sub-operations of the lane extension (:class:`LaneFunction`: floor, exponent insert, coefficient
select, range select); all arithmetic runs on the PE's own multiplier and adder. This module is the single
source of

* the **constants** the generator emits: the 2^f polynomial of exp and the piecewise polynomial tables of
  SiLU and softplus, the seed constant and correction polynomial of rsqrt, fitted here in float64 and
  rounded to the compute format (:func:`build_constants`);
* the **programs** (:func:`exp_program`, :func:`silu_program`, :func:`softplus_program`,
  :func:`rsqrt_program`), a plain data
  structure (:class:`Program` of :class:`Pass` es with :class:`Operand` s) that the golden model below, the
  hardware testbenches and the controller all execute;
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
    "MAX_DEGREE",
    "PIECEWISE_FUNCTIONS",
    "FunctionConstants",
    "LaneFunction",
    "Operand",
    "Pass",
    "PiecewiseTable",
    "Program",
    "SegmentLayout",
    "SignLayout",
    "build_constants",
    "constant",
    "constants_for",
    "exp",
    "exp_int_bits",
    "exp_program",
    "exp_scale",
    "floor",
    "lane_function",
    "programs",
    "range_select",
    "reference",
    "result_of",
    "rsqrt",
    "rsqrt_correction_is_fused",
    "rsqrt_program",
    "rsqrt_seed",
    "rsqrt_select",
    "run_program",
    "silu",
    "silu_program",
    "softplus",
    "softplus_program",
]

LOG2E = 1.0 / math.log(2.0)
MAX_DEGREE = 4
PIECEWISE_FUNCTIONS = ("silu", "softplus")
FUNCTIONS = ("exp", "silu", "softplus", "rsqrt")


class LaneFunction(enum.IntEnum):
    """Sub-operations of the lane extension (the ``function`` field of a FUNCTION beat).

    ``FLOOR``
        ``a`` rounded down to an integer-valued float (the split of ``t = x·log2 e`` into ``n``).
    ``EXP_SCALE``
        ``a · 2^n`` with ``n`` the integer value of ``b`` (the "shift" into the exponent field); ``b = +Inf``
        gives +Inf and ``b = -Inf`` gives +0 whatever ``a`` is; a NaN ``b`` gives NaN.
    ``SILU_SELECT`` / ``SOFTPLUS_SELECT``
        Range select on ``x = a``: NaN -> NaN; ``x >= 2^K+`` -> ``x``; ``x <= -2^K-`` -> ``c``; else ``b``.
    ``SILU_COEFFICIENT_k`` / ``SOFTPLUS_COEFFICIENT_k``
        Coefficient ``k`` of the polynomial segment that ``x = a`` falls in (a small constant ROM).
    ``RSQRT_SEED``
        The bit-trick seed of ``1/sqrt(a)``: the integer ``magic - (|a| >> 1)`` on the bits (sign cleared),
        a positive normal number for every ``a`` (:func:`rsqrt_seed`).
    ``RSQRT_SELECT``
        rsqrt's special cases by ``x = a``: NaN or negative -> NaN; ±0 (and subnormals) -> ±Inf; +Inf -> +0;
        else ``b`` (:func:`rsqrt_select`).
    """

    FLOOR = 0
    EXP_SCALE = 1
    SILU_SELECT = 2
    SOFTPLUS_SELECT = 3
    SILU_COEFFICIENT_0 = 4
    SILU_COEFFICIENT_1 = 5
    SILU_COEFFICIENT_2 = 6
    SILU_COEFFICIENT_3 = 7
    SILU_COEFFICIENT_4 = 8
    SOFTPLUS_COEFFICIENT_0 = 9
    SOFTPLUS_COEFFICIENT_1 = 10
    SOFTPLUS_COEFFICIENT_2 = 11
    SOFTPLUS_COEFFICIENT_3 = 12
    SOFTPLUS_COEFFICIENT_4 = 13
    RSQRT_SEED = 14
    RSQRT_SELECT = 15

    @classmethod
    def coefficient(cls, function: str, k: int) -> "LaneFunction":
        """The sub-operation that selects coefficient ``k`` of ``function`` ("silu" or "softplus")."""
        return cls[f"{function.upper()}_COEFFICIENT_{k}"]

    @classmethod
    def select(cls, function: str) -> "LaneFunction":
        return cls[f"{function.upper()}_SELECT"]

    @property
    def piecewise(self) -> tuple[str, int] | None:
        """``(function, k)`` for a coefficient select, else None."""
        if "_COEFFICIENT_" not in self.name:
            return None
        function, k = self.name.split("_COEFFICIENT_")
        return function.lower(), int(k)


FUNCTION_BITS = 4  # width of the ``function`` field: 16 sub-operations


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


# Piecewise polynomial tables ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SignLayout:
    """Segments of one sign of x, chosen from the exponent field and the top mantissa bits.

    ``bound_exponent`` K: ``|x| >= 2^K`` is outside the polynomial range (the range select handles it).
    Octave ``o`` (``o = 0 .. octaves-1``) is the binade ``[2^(K-octaves+o), 2^(K-octaves+o+1))``, split into
    ``2^parts_bits[o]`` equal parts by the top mantissa bits; part 0 of octave 0 also takes every smaller
    magnitude down to 0. Hardware: ``octave = clamp(E - E_base, 0, octaves-1)`` with
    ``E_base = K - octaves + bias``; ``part = 0`` if ``E < E_base`` else the top ``parts_bits[octave]``
    mantissa bits; ``index = offset[octave] + part`` (a few constants per octave).
    """

    bound_exponent: int
    parts_bits: tuple[int, ...]

    @property
    def octaves(self) -> int:
        return len(self.parts_bits)

    @property
    def segments(self) -> int:
        return sum(1 << bits for bits in self.parts_bits)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First segment (relative to the sign's first) of every octave."""
        out, total = [], 0
        for bits in self.parts_bits:
            out.append(total)
            total += 1 << bits
        return tuple(out)

    def base_field(self, fmt: FloatFormat) -> int:
        """Biased exponent field of octave 0."""
        return self.bound_exponent - self.octaves + fmt.bias

    def threshold_field(self, fmt: FloatFormat) -> int:
        """Exponent field from which ``|x| >= 2^K`` (the range select's compare)."""
        return self.bound_exponent + fmt.bias

    def valid_for(self, fmt: FloatFormat) -> bool:
        return (max(self.parts_bits) <= fmt.man_bits and self.base_field(fmt) >= 1
                and self.threshold_field(fmt) <= fmt.exp_max - 1)

    def magnitude_intervals(self) -> list[tuple[float, float]]:
        """``(low, high)`` of |x| of every segment of this sign, in index order."""
        out = []
        for octave, bits in enumerate(self.parts_bits):
            scale = 2.0 ** (self.bound_exponent - self.octaves + octave)
            for part in range(1 << bits):
                low = 0.0 if octave == 0 and part == 0 else scale * (1 + part / (1 << bits))
                out.append((low, scale * (1 + (part + 1) / (1 << bits))))
        return out


@dataclass(frozen=True)
class SegmentLayout:
    """Segments of both signs: indices ``0 .. positive.segments-1`` for x >= 0 (sign bit 0), then the
    negative sign's. See :class:`SignLayout`."""

    positive: SignLayout
    negative: SignLayout

    @property
    def segments(self) -> int:
        return self.positive.segments + self.negative.segments

    def side(self, sign: int) -> SignLayout:
        return self.negative if sign else self.positive

    def valid_for(self, fmt: FloatFormat) -> bool:
        return self.positive.valid_for(fmt) and self.negative.valid_for(fmt)

    def segment_index(self, bits, fmt: FloatFormat) -> torch.Tensor:
        bits = torch.as_tensor(bits, dtype=torch.int64)
        sign = (bits >> (fmt.width - 1)) & 1
        field = (bits >> fmt.man_bits) & fmt.exp_max
        mantissa = bits & ((1 << fmt.man_bits) - 1)
        index = torch.zeros_like(bits)
        for sign_value, side, first in ((0, self.positive, 0), (1, self.negative, self.positive.segments)):
            difference = field - side.base_field(fmt)
            octave = difference.clamp(0, side.octaves - 1)
            offsets = torch.tensor(side.offsets, dtype=torch.int64)[octave]
            shifts = fmt.man_bits - torch.tensor(side.parts_bits, dtype=torch.int64)[octave]
            masks = (torch.tensor([1 << bits for bits in side.parts_bits], dtype=torch.int64) - 1)[octave]
            part = torch.where(difference < 0, 0, (mantissa >> shifts) & masks)
            index = torch.where(sign == sign_value, first + offsets + part, index)
        return index

    def intervals(self) -> list[tuple[float, float]]:
        """``(low, high)`` in x of every segment, by index (low <= x < high for x >= 0, low < x <= high
        for x < 0)."""
        return (list(self.positive.magnitude_intervals())
                + [(-high, -low) for low, high in self.negative.magnitude_intervals()])


@dataclass(frozen=True)
class PiecewiseTable:
    """Fitted coefficients of one function: ``p(x) = sum_k coefficients[index][k] · x^k`` on each segment.

    ``coefficients`` holds bit patterns of the compute format. Evaluated by Horner in x with MULADD passes.
    """

    function: str
    fmt: FloatFormat
    layout: SegmentLayout
    degree: int
    coefficients: tuple[tuple[int, ...], ...]

    def coefficient_bits(self, k: int) -> list[int]:
        """Coefficient ``k`` of every segment, by segment index (the ROM contents of one sub-operation)."""
        return [row[k] for row in self.coefficients]


@dataclass(frozen=True)
class FunctionConstants:
    """Everything the generator emits for the nonlinear functions of one compute format."""

    fmt: FloatFormat
    log2e: int
    exp_coefficients: tuple[int, ...]     # 2^f ≈ sum_k c_k f^k, bit patterns, c_0 first
    silu: PiecewiseTable
    softplus: PiecewiseTable
    rsqrt_magic: int = 0                    # RSQRT_SEED's integer constant
    rsqrt_coefficients: tuple[int, ...] = ()  # correction 1 + b1·d + b2·d², bit patterns (b1, b2)

    @property
    def exp_degree(self) -> int:
        return len(self.exp_coefficients) - 1

    def table(self, function: str) -> PiecewiseTable:
        if function not in PIECEWISE_FUNCTIONS:
            raise ValueError(f"function must be one of {PIECEWISE_FUNCTIONS}, not {function!r}")
        return getattr(self, function)


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


def _fit_exp(fmt: FloatFormat, degree: int) -> tuple[int, ...]:
    """2^f on [0, 1]: minimax relative error with p(0) = 1 and p(1) = 2 held exactly, then rounded so that
    the program's own Horner evaluation gives exactly 1 at f = 0 and exactly 2 at f = 1."""
    if degree == 1:
        values = [1.0, 1.0]  # Schraudolph: 2^f ≈ 1 + f
    else:
        # p(f) = 1 + f + sum_{k>=2} a_k (f^k - f): both end constraints hold for any a_k.
        f = np.linspace(0.0, 1.0, 2001)
        design = np.stack([f ** k - f for k in range(2, degree + 1)], axis=1)[None]
        target = (2.0 ** f - 1.0 - f)[None]
        free = _lawson(design, target, (1.0 / 2.0 ** f)[None], 400)[0]
        values = [1.0, 1.0 - float(free.sum())] + [float(a) for a in free]
    bits = [_encode_value(v, fmt) for v in values]
    one, two = fmt.one, _encode_value(2.0, fmt)
    # Nudge c_1 by ulps (nearest first) until the program's Horner evaluation at f = 1 gives exactly 2.
    for step in sorted(range(-64, 65), key=abs):
        trial = list(bits)
        trial[1] = bits[1] + step
        trial[0] = one
        if _horner_constant(trial, one, fmt) == two and _horner_constant(trial, 0, fmt) == one:
            return tuple(trial)
    raise ValueError(f"exp_degree {degree}: no rounding of the 2^f coefficients in {fmt.name} is exact at "
                     "f = 0 and f = 1")


def _horner_constant(coefficients, f_bits: int, fmt: FloatFormat) -> int:
    """The exp program's polynomial passes at one f (the same passes as :func:`exp_program`)."""
    f = torch.tensor([f_bits])
    degree = len(coefficients) - 1
    value = fp.mul_add(f, torch.tensor([coefficients[degree]]), torch.tensor([coefficients[degree - 1]]), fmt)
    for k in range(degree - 2, -1, -1):
        value = fp.mul_add(value, f, torch.tensor([coefficients[k]]), fmt)
    return int(value[0])


def _rsqrt_seed_ratios(fmt: FloatFormat, magic: int, samples: int = 1 << 16) -> np.ndarray:
    """``seed(x) · sqrt(x)`` (the seed's ratio to the true result) over one period of the seed's error,
    x in [1, 4): every mantissa of both exponent parities (at most ``samples`` evenly spaced ones each)."""
    step = max(1, (1 << fmt.man_bits) // samples)
    mantissa = np.arange(0, 1 << fmt.man_bits, step, dtype=np.int64)
    mantissa = np.concatenate([mantissa, [(1 << fmt.man_bits) - 1]])
    ratios = []
    for parity in (0, 1):
        bits = ((fmt.bias + parity) << fmt.man_bits) | mantissa
        seed = magic - (bits >> 1)
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


def _target(function: str, x: np.ndarray) -> np.ndarray:
    if function == "silu":
        return x / (1.0 + np.exp(-x))
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _fit_segments(function: str, degree: int, intervals: np.ndarray) -> np.ndarray:
    """float64 coefficients (powers of x) of every ``(low, high)`` interval: minimax absolute error,
    fitted on a scaled variable and expanded. SiLU's segments that reach 0 are held to p(0) = 0 (so
    silu(0) = 0 and tiny inputs keep their relative accuracy)."""
    low, high = intervals[:, 0], intervals[:, 1]
    center, half = (low + high) / 2, (high - low) / 2
    points = 96
    u = np.concatenate([[-1.0], np.cos(np.pi * (np.arange(points) + 0.5) / points)[::-1], [1.0]])
    x = center[:, None] + half[:, None] * u[None, :]
    hold_zero = ((low == 0.0) | (high == 0.0)) & (function == "silu") & (degree >= 1)
    u_at_zero = -center / half
    powers = np.broadcast_to(np.stack([u ** k for k in range(degree + 1)], axis=1)[None],
                             (len(low), len(u), degree + 1))
    zero_powers = np.stack([u_at_zero ** k for k in range(degree + 1)], axis=1)
    design = np.where(hold_zero[:, None, None], powers - zero_powers[:, None, :], powers)
    design[hold_zero, :, 0] = 0.0
    scaled = _lawson(design, _target(function, x), np.ones_like(x), 100)
    scaled[hold_zero, 0] = -np.einsum("bi,bi->b", scaled[hold_zero, 1:], zero_powers[hold_zero, 1:])
    expanded = np.zeros_like(scaled)
    for k in range(degree + 1):
        for j in range(k + 1):
            expanded[:, j] += scaled[:, k] * math.comb(k, j) * (-center) ** (k - j) / half ** k
    expanded[hold_zero, 0] = 0.0
    return expanded


class _SegmentFitter:
    """Fits and scores segments of one function, degree and format, caching each interval's fit."""

    def __init__(self, function: str, degree: int, fmt: FloatFormat):
        self.function, self.degree, self.fmt = function, degree, fmt
        self._cache = {}

    def fit(self, intervals) -> list[tuple[tuple[int, ...], float]]:
        """``(rounded coefficient bits, max abs error in float64)`` of every interval."""
        missing = [interval for interval in intervals if interval not in self._cache]
        if missing:
            values = _fit_segments(self.function, self.degree, np.array(missing, dtype=np.float64))
            rounded = fp.encode(torch.from_numpy(values), self.fmt)
            coefficients = fp.decode(rounded, self.fmt).numpy()
            grid = np.linspace(0.0, 1.0, 257)
            for row, (low, high), bits, coefficient_values in zip(range(len(missing)), missing, rounded.tolist(),
                                                                 coefficients):
                x = low + (high - low) * grid
                p = sum(c * x ** k for k, c in enumerate(coefficient_values))
                self._cache[(low, high)] = (tuple(int(b) for b in bits),
                                            float(np.abs(p - _target(self.function, x)).max()))
        return [self._cache[interval] for interval in intervals]

    def tail_error(self, sign: int, bound_exponent: int) -> float:
        """Error of the range select beyond ±2^K: x itself above, -0 (SiLU) or exp(x) (softplus) below."""
        bound = 2.0 ** bound_exponent
        if self.function == "silu":
            return bound / (1.0 + math.exp(bound))
        return math.log1p(math.exp(-bound)) if sign == 0 else math.exp(-2 * bound) / 2

    def side(self, sign: int, layout: SignLayout) -> float:
        intervals = layout.magnitude_intervals()
        if sign:
            intervals = [(-high, -low) for low, high in intervals]
        return max(max(error for _, error in self.fit(intervals)), self.tail_error(sign, layout.bound_exponent))


def _greedy_side(fitter: _SegmentFitter, sign: int, bound_exponent: int, octaves: int,
                 budget: int) -> tuple[float, SignLayout]:
    """Split the octave holding the worst segment into twice the parts while the budget allows."""
    parts = [0] * octaves
    frozen = set()
    while True:
        layout = SignLayout(bound_exponent, tuple(parts))
        intervals = layout.magnitude_intervals()
        if sign:
            intervals = [(-high, -low) for low, high in intervals]
        errors = [error for _, error in fitter.fit(intervals)]
        octave_errors = [max(errors[offset:offset + (1 << bits)])
                         for offset, bits in zip(layout.offsets, parts)]
        candidates = [o for o in range(octaves) if o not in frozen]
        if not candidates:
            break
        worst = max(candidates, key=lambda o: octave_errors[o])
        if layout.segments + (1 << parts[worst]) > budget or parts[worst] + 1 > fitter.fmt.man_bits:
            frozen.add(worst)
            continue
        parts[worst] += 1
    layout = SignLayout(bound_exponent, tuple(parts))
    return fitter.side(sign, layout), layout


def _best_table(function: str, fmt: FloatFormat, segments: int, degree: int) -> PiecewiseTable:
    """Per sign, try every bound exponent K in {3, 4, 5} and octave count, split greedily, and keep the
    layout with the smallest max abs error (float64 model with the rounded coefficients)."""
    fitter = _SegmentFitter(function, degree, fmt)
    budget = segments // 2
    sides = []
    for sign in (0, 1):
        best = None
        for bound_exponent in (3, 4, 5):
            for octaves in range(1, min(budget, 16) + 1):
                if not SignLayout(bound_exponent, (0,) * octaves).valid_for(fmt):
                    continue
                score, layout = _greedy_side(fitter, sign, bound_exponent, octaves, budget)
                if best is None or score < best[0]:
                    best = (score, layout)
        if best is None:
            raise ValueError(f"{function}_segments {segments}: no segment layout fits {fmt.name}")
        sides.append(best[1])
    layout = SegmentLayout(positive=sides[0], negative=sides[1])
    intervals = layout.intervals()
    coefficients = tuple(bits for bits, _ in fitter.fit(intervals))
    return PiecewiseTable(function=function, fmt=fmt, layout=layout, degree=degree, coefficients=coefficients)


def _check_degree(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_DEGREE:
        raise ValueError(f"{name} must be an integer in [{low}, {MAX_DEGREE}], not {value!r}")


@functools.cache
def build_constants(*, fmt: FloatFormat, exp_degree: int = 3, silu_segments: int = 32, silu_degree: int = 2,
                    softplus_segments: int = 16, softplus_degree: int = 2) -> FunctionConstants:
    """Fit and round every constant of the nonlinear functions for one compute format (cached)."""
    if not isinstance(fmt, FloatFormat):
        raise ValueError(f"fmt must be a FloatFormat, not {fmt!r}")
    _check_degree("exp_degree", exp_degree, 1)
    _check_degree("silu_degree", silu_degree, 0)
    _check_degree("softplus_degree", softplus_degree, 0)
    for name, value in (("silu_segments", silu_segments), ("softplus_segments", softplus_segments)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 2 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 2, not {value!r}")
    log2e = _encode_value(LOG2E, fmt)
    exp_coefficients = _fit_exp(fmt, exp_degree)
    silu_table = _best_table("silu", fmt, silu_segments, silu_degree)
    softplus_table = _best_table("softplus", fmt, softplus_segments, softplus_degree)
    rsqrt_magic, rsqrt_coefficients = _fit_rsqrt(fmt)
    return FunctionConstants(fmt=fmt, log2e=log2e, exp_coefficients=exp_coefficients, silu=silu_table,
                             softplus=softplus_table, rsqrt_magic=rsqrt_magic,
                             rsqrt_coefficients=rsqrt_coefficients)


def constants_for(config) -> FunctionConstants:
    """:func:`build_constants` for a :class:`marca.config.MarcaConfig`."""
    return build_constants(fmt=config.compute_format, exp_degree=config.exp_degree,
                           silu_segments=config.silu_segments, silu_degree=config.silu_degree,
                           softplus_segments=config.softplus_segments, softplus_degree=config.softplus_degree)


def _constants(source):
    if isinstance(source, FunctionConstants):
        return source
    return constants_for(source)


# The programs ---------------------------------------------------------------------------------------------

def _exp_passes(constants, argument: Operand, first: int) -> list[Pass]:
    """exp(argument) as passes numbered from ``first``: t = x·log2e; n = floor(t); f = t - n;
    p = 2^f by Horner; exp = p · 2^n."""
    c = constants.exp_coefficients
    degree = len(c) - 1
    t, n, f = result_of(first), result_of(first + 1), result_of(first + 2)
    passes = [
        Pass(ElementwiseOp.MUL, argument, constant(constants.log2e), comment="t = x * log2(e)"),
        Pass(ElementwiseOp.FUNCTION, t, function=LaneFunction.FLOOR, comment="n = floor(t)"),
        Pass(ElementwiseOp.SUB, t, n, comment="f = t - n, in [0, 1]"),
        Pass(ElementwiseOp.MULADD, f, constant(c[degree]), constant(c[degree - 1]),
             comment=f"p = c{degree} * f + c{degree - 1}"),
    ]
    for k in range(degree - 2, -1, -1):
        passes.append(Pass(ElementwiseOp.MULADD, result_of(first + len(passes) - 1), f, constant(c[k]),
                           comment=f"p = p * f + c{k}"))
    passes.append(Pass(ElementwiseOp.FUNCTION, result_of(first + len(passes) - 1), n,
                       function=LaneFunction.EXP_SCALE, comment="exp = p * 2^n (exponent insert)"))
    return passes


def _polynomial_passes(constants, function: str, first: int) -> list[Pass]:
    """Per-lane coefficient selects interleaved with Horner steps in x: p = (c_d x + c_{d-1}) x + ..."""
    degree = constants.table(function).degree
    passes = [Pass(ElementwiseOp.FUNCTION, INPUT, function=LaneFunction.coefficient(function, degree),
                   comment=f"c{degree}(segment of x)")]
    value = result_of(first)
    for k in range(degree - 1, -1, -1):
        passes.append(Pass(ElementwiseOp.FUNCTION, INPUT, function=LaneFunction.coefficient(function, k),
                           comment=f"c{k}(segment of x)"))
        passes.append(Pass(ElementwiseOp.MULADD, value, INPUT, result_of(first + len(passes) - 1),
                           comment=f"p = p * x + c{k}"))
        value = result_of(first + len(passes) - 1)
    return passes


def exp_program(source) -> Program:
    """exp(x): ``4 + exp_degree`` passes. ``source`` is a MarcaConfig or :class:`FunctionConstants`."""
    constants = _constants(source)
    return Program("exp", constants.fmt, tuple(_exp_passes(constants, INPUT, 0)))


def silu_program(source) -> Program:
    """silu(x): ``2 · silu_degree + 2`` passes; x <= -2^K- gives -0, x >= 2^K+ gives x."""
    constants = _constants(source)
    passes = _polynomial_passes(constants, "silu", 0)
    negative_zero = constants.fmt.sign_bit
    passes.append(Pass(ElementwiseOp.FUNCTION, INPUT, result_of(len(passes) - 1), constant(negative_zero),
                       function=LaneFunction.SILU_SELECT, comment="x above range: x; below: -0"))
    return Program("silu", constants.fmt, tuple(passes))


def softplus_program(source) -> Program:
    """softplus(x): the exp passes, then the polynomial, then the range select (x above the range, exp(x)
    below it): ``4 + exp_degree + 2 · softplus_degree + 2`` passes."""
    constants = _constants(source)
    passes = _exp_passes(constants, INPUT, 0)
    exponential = result_of(len(passes) - 1)
    passes += _polynomial_passes(constants, "softplus", len(passes))
    passes.append(Pass(ElementwiseOp.FUNCTION, INPUT, result_of(len(passes) - 1), exponential,
                       function=LaneFunction.SOFTPLUS_SELECT, comment="x above range: x; below: exp(x)"))
    return Program("softplus", constants.fmt, tuple(passes))


def rsqrt_correction_is_fused(fmt: FloatFormat) -> bool:
    """Whether rsqrt's last arithmetic pass adds the correction as ``y·w + y`` (one rounding near the
    result) or multiplies ``y · (1 + w)`` (the factor rounded near 1: up to 0.7 ulp more). The fused form
    needs ``y·w`` normal down to half an ulp of the smallest result ``y ≈ 2^-(emax+1)/2``: FP32 and BF16
    yes, FP16 no (there ``y·w`` would flush to zero for the smallest results: 16 ulps off)."""
    smallest_result = -(fmt.emax + 1) / 2
    return smallest_result - fmt.precision - 1 >= fmt.emin


def rsqrt_program(source) -> Program:
    """1/sqrt(x): 7 passes. The lane's bit-trick seed ``y``, one third-order correction on the multiplier
    and adder (``d = x·y·y - 1``, ``w = d·(b1 + b2·d)``, then ``y·w + y`` or ``y·(1 + w)``:
    :func:`rsqrt_correction_is_fused`; ``x·y`` first, so nothing under- or overflows for any normal x),
    then the lane's special-case select."""
    constants = _constants(source)
    fmt = constants.fmt
    b1, b2 = constants.rsqrt_coefficients
    minus_one = fmt.one | fmt.sign_bit
    y, h, d, q, w = (result_of(k) for k in range(5))
    passes = [
        Pass(ElementwiseOp.FUNCTION, INPUT, function=LaneFunction.RSQRT_SEED, comment="y = magic - (bits >> 1)"),
        Pass(ElementwiseOp.MUL, INPUT, y, comment="h = x * y"),
        Pass(ElementwiseOp.MULADD, h, y, constant(minus_one), comment="d = h * y - 1"),
        Pass(ElementwiseOp.MULADD, d, constant(b2), constant(b1), comment="q = b2 * d + b1"),
    ]
    if rsqrt_correction_is_fused(fmt):
        passes += [Pass(ElementwiseOp.MUL, q, d, comment="w = q * d"),
                   Pass(ElementwiseOp.MULADD, y, w, y, comment="r = y * w + y")]
    else:
        passes += [Pass(ElementwiseOp.MULADD, q, d, constant(fmt.one), comment="g = q * d + 1"),
                   Pass(ElementwiseOp.MUL, y, result_of(4), comment="r = y * g")]
    passes.append(Pass(ElementwiseOp.FUNCTION, INPUT, result_of(5), function=LaneFunction.RSQRT_SELECT,
                       comment="x NaN or < 0: NaN; ±0: ±Inf; +Inf: +0"))
    return Program("rsqrt", fmt, tuple(passes))


def programs(source) -> dict[str, Program]:
    """All four programs of a configuration, by name (:data:`FUNCTIONS`)."""
    return {"exp": exp_program(source), "silu": silu_program(source), "softplus": softplus_program(source),
            "rsqrt": rsqrt_program(source)}


# Golden model of the lane extension ----------------------------------------------------------------------

def _read(bits, fmt: FloatFormat) -> torch.Tensor:
    """The contract's read of an operand: canonical NaN, subnormals as zeros of their sign."""
    return fp.encode(fp.decode(bits, fmt), fmt)


def floor(a, fmt: FloatFormat) -> torch.Tensor:
    """FLOOR: the largest integer-valued float <= a (exact: always representable or overflowing to -Inf in
    tiny formats); ±Inf, signed zeros kept; subnormals read as zeros; NaN gives the canonical NaN."""
    return fp.encode(torch.floor(fp.decode(a, fmt)), fmt)


def exp_int_bits(fmt: FloatFormat) -> int:
    """Width of the saturated integer exponent shift: every |n| beyond its range over- or underflows."""
    return fmt.exp_bits + 2


def exp_scale(a, b, fmt: FloatFormat) -> torch.Tensor:
    """EXP_SCALE: ``ldexp(a, to_int(b, exp_bits + 2, toward_zero))`` (contract ldexp: exact, ±Inf above
    range, signed zero below), except that ``b`` decides first: NaN -> canonical NaN, +Inf -> +Inf,
    -Inf -> +0 (exp of ±Inf, where the program's fraction is Inf - Inf = NaN)."""
    shift = fp.to_int(b, fmt, exp_int_bits(fmt), "toward_zero")
    out = fp.ldexp(a, shift, fmt)
    b_value = fp.decode(b, fmt)
    out = torch.where(b_value == torch.inf, fmt.inf, out)
    out = torch.where(b_value == -torch.inf, 0, out)
    return torch.where(torch.isnan(b_value), fmt.canonical_nan, out)


def range_select(x, b, c, layout: SegmentLayout, fmt: FloatFormat) -> torch.Tensor:
    """SILU_SELECT / SOFTPLUS_SELECT: NaN x -> canonical NaN; x >= 2^K+ (and +Inf) -> read(x);
    x <= -2^K- (and -Inf) -> read(c); otherwise read(b). Compares only sign and exponent field."""
    x = torch.as_tensor(x, dtype=torch.int64)
    sign = (x >> (fmt.width - 1)) & 1
    field = (x >> fmt.man_bits) & fmt.exp_max
    is_nan = (field == fmt.exp_max) & ((x & ((1 << fmt.man_bits) - 1)) != 0)
    above = (sign == 0) & (field >= layout.positive.threshold_field(fmt))
    below = (sign == 1) & (field >= layout.negative.threshold_field(fmt))
    out = torch.where(above, _read(x, fmt), torch.where(below, _read(c, fmt), _read(b, fmt)))
    return torch.where(is_nan, fmt.canonical_nan, out)


def rsqrt_seed(a, magic: int, fmt: FloatFormat) -> torch.Tensor:
    """RSQRT_SEED: the integer ``magic - ((a with its sign cleared) >> 1)`` as a bit pattern. ``magic`` is
    chosen so this is a positive normal number for every pattern (specials too; RSQRT_SELECT fixes them)."""
    a = torch.as_tensor(a, dtype=torch.int64)
    return magic - ((a & (fmt.sign_bit - 1)) >> 1)


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
    fmt = constants.fmt
    function = LaneFunction(function)
    if function == LaneFunction.FLOOR:
        return floor(a, fmt)
    if function == LaneFunction.EXP_SCALE:
        return exp_scale(a, b, fmt)
    if function == LaneFunction.RSQRT_SEED:
        return rsqrt_seed(a, constants.rsqrt_magic, fmt)
    if function == LaneFunction.RSQRT_SELECT:
        return rsqrt_select(a, b, fmt)
    if function in (LaneFunction.SILU_SELECT, LaneFunction.SOFTPLUS_SELECT):
        name = "silu" if function == LaneFunction.SILU_SELECT else "softplus"
        return range_select(a, b, c, constants.table(name).layout, fmt)
    name, k = function.piecewise
    table = constants.table(name)
    rom = torch.tensor([row[k] if k <= table.degree else 0 for row in table.coefficients], dtype=torch.int64)
    return rom[table.layout.segment_index(a, fmt)]


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
