"""Compiled loops (numba) for the contract's arithmetic where numpy cannot vectorise.

A LINEAR whose every product and sum must be rounded by the contract (docs/numerics.md) is a sequence:
the accumulator adds one chunk's tree sum at a time, rounding after each add, so the ``K`` steps cannot be
done at once, and a small configuration's instruction is many short steps on a few lanes. numpy or torch
pay several microseconds of call overhead per step (a 2x2 array's LINEAR of 384 chunks took ~3 ms); here
the loop is compiled once (cached on disk beside this file) and each step is a few nanoseconds.

The arithmetic is float64 rounded to the format, as ``fp.round_values`` does it vectorised: a product of
two significands of at most 24 bits is exact in float64; a float64 sum of two such values rounded again to
``p <= 24`` bits is innocuously double-rounded (53 >= 2p + 2, Figueroa's condition); float64's exponent range
keeps every result far from its own underflow. So rounding the float64 result once, to nearest even with an
unbounded exponent, then to ±Inf at or above ``2^(emax+1)`` and to a signed zero below ``2^emin`` (tininess
after rounding), is the contract. Operands are values (docs/iss.md): no subnormals, NaN for the canonical
NaN, which IEEE float64 propagates.
"""

import math

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def _round(x, bits, overflow, underflow):
    """float64 ``x`` rounded to ``bits`` significant bits (nearest even), then ±Inf at or above
    ``overflow`` and a signed zero below ``underflow``, both on the rounded magnitude."""
    if x == 0.0 or math.isnan(x) or math.isinf(x):
        return x
    mantissa, exponent = math.frexp(x)                      # x = mantissa * 2^exponent, 0.5 <= |mantissa| < 1
    rounded = math.ldexp(np.rint(math.ldexp(mantissa, bits)), exponent - bits)   # rint: nearest even
    magnitude = abs(rounded)
    if magnitude >= overflow:
        return math.copysign(math.inf, x)
    if magnitude < underflow:
        return math.copysign(0.0, x)
    return rounded


@numba.njit(cache=True)
def linear_rounded(matrix, vector, bias, order, bits, overflow, underflow, out):
    """``out[t, j, r]``: from ``bias[t, j, r]`` (or +0 when ``bias`` has no rows), for chunks ``k`` in
    order, ``acc = round(acc + tree)`` where ``tree`` is the pairwise tree of the rounded products
    ``matrix[j, k, r, c] * vector[t, k, c]``. The tree adds, level by level, the first half of the columns
    to the second half in the column order ``order`` (bit-reversed: then those halves are the contract's
    pairs ``(2i, 2i+1)``, see ``iss._bit_reversal``)."""
    J, K, R, C = matrix.shape
    T = vector.shape[0]
    work = np.empty(C, dtype=np.float64)
    for t in range(T):
        for j in range(J):
            for r in range(R):
                acc = np.float64(bias[t, j, r]) if bias.shape[0] else 0.0
                for k in range(K):
                    for c in range(C):
                        column = order[c]
                        work[c] = _round(np.float64(matrix[j, k, r, column]) * np.float64(vector[t, k, column]),
                                         bits, overflow, underflow)
                    width = C
                    while width > 1:
                        width //= 2
                        for c in range(width):
                            work[c] = _round(work[c] + work[c + width], bits, overflow, underflow)
                    acc = _round(acc + work[0], bits, overflow, underflow)
                out[t, j, r] = acc
    return out
