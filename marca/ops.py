"""Opcodes of the reduction-alternative PE array, shared by the hardware, golden models and instruction set.

One definition, imported by ``marca.hw.pe_array`` (the RTL decoder of the array's payload),
``marca.golden.pe_array`` (the bit-exact model), the instruction set and the nonlinear units. The enums are
Amaranth enums with a fixed shape, so they can be used directly as payload fields in hardware and as plain
integers in Python.

Semantics are stated in terms of the numerics contract (docs/numerics.md): ``mul``, ``add``, ``sub``,
``min``, ``max``, ``compare`` are the contract's operations on the array's compute format, and
``read(x)`` is how the contract reads an operand: a NaN reads as the canonical NaN, a subnormal as the zero
of its sign, anything else as itself. Every element-wise result is therefore a contract output (a signed
zero, a normal number, an infinity or the canonical NaN).
"""

from amaranth.lib import enum

__all__ = ["ArrayMode", "ElementwiseOp", "Broadcast"]


class ArrayMode(enum.IntEnum, shape=1):
    """What the PE array does with one operand set (one stream beat).

    ``LINEAR``
        Reduction on. Each PE multiplies ``a · b``; each row adds its ``C`` products through its balanced
        pairwise adder tree (docs/numerics.md, Reductions) and adds the tree's sum to the row's
        accumulator. A beat flagged ``first`` starts the accumulator from the row's ``c`` operand (a bias,
        a partial sum, or +0); a beat flagged ``last`` sends the ``R`` accumulators out.
    ``ELEMENTWISE``
        Reduction off. The ``R · C`` PEs are independent lanes running one :class:`ElementwiseOp`; every
        beat sends ``R · C`` results out.
    """

    LINEAR = 0
    ELEMENTWISE = 1


class ElementwiseOp(enum.IntEnum, shape=4):
    """Operation of every lane in element-wise mode; ``a``, ``b``, ``c`` are the lane's operands.

    All operations round as the contract says: one rounding per ``mul``/``add``, two for ``MULADD``.
    """

    PASS = 0
    """``read(a)``: the operand as the contract reads it (canonical NaN, subnormal flushed to its zero)."""
    MUL = 1
    """``mul(a, b)``."""
    ADD = 2
    """``add(a, b)``."""
    SUB = 3
    """``sub(a, b)`` = ``add(a, -b)``."""
    MULADD = 4
    """``add(mul(a, b), c)``: the PE's multiplier, then its adder; two roundings."""
    MIN = 5
    """``min(a, b)`` (−0 < +0; a NaN operand gives the canonical NaN)."""
    MAX = 6
    """``max(a, b)``."""
    CMP_SELECT = 7
    """``read(c) if compare(a, b).lt else read(a)``: replace ``a`` by ``c`` where ``a < b``.

    The comparison is the contract's ``compare`` (−0 = +0; unordered when either of ``a``, ``b`` is a NaN,
    so the result is then ``read(a)``: the canonical NaN when ``a`` is a NaN, ``a`` when only ``b`` is).
    Uses: select a function's asymptote or approximation by the range of its argument (softplus:
    ``a = x``, ``b = threshold``, ``c = polynomial(x)`` gives the polynomial below the threshold and
    ``x`` above), one-sided clamps with a replacement value (``c`` = lower bound gives ``max``-like
    clamps that also map a range to a constant), masking by a threshold.
    """
    FUNCTION = 8
    """The lane's result comes from the array's per-lane extension (the nonlinear units, issue #4): the
    beat's ``function`` field selects the extension's sub-operation on ``a``, ``b``, ``c``. Only valid
    when the array was built with a ``lane_extension``."""


class Broadcast(enum.IntEnum, shape=2):
    """How one operand field of a beat feeds the ``R × C`` lanes (lane ``(r, c)`` is PE ``r·C + c``).

    Every operand field holds ``R · C`` values in row-major lane order; the broadcast mode says which of
    them lane ``(r, c)`` reads:

    ``LANE``
        Its own element ``r·C + c`` (a full tile, e.g. the scan state ``h[d, n]`` or a weight tile).
    ``ROW``
        Element ``r``: one value per row, shared by the row's columns (per-channel values such as
        ``delta[d]``, ``x[d]``, ``D[d]``, a per-row bias).
    ``COLUMN``
        Element ``c``: one value per column, shared by all rows (per-state vectors such as ``B[n]``,
        ``C[n]``; in linear mode the input-vector chunk of a GEMV).
    ``SCALAR``
        Element 0, shared by every lane (constants, thresholds, polynomial coefficients).
    """

    LANE = 0
    ROW = 1
    COLUMN = 2
    SCALAR = 3
