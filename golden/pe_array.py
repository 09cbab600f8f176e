"""Golden model of the reduction-alternative PE array, written from docs/numerics.md, marca/ops.py and
docs/pe_array.md (never from the RTL).

All values are bit patterns in ``int64`` tensors (as :mod:`marca.golden.fp`). Lanes are numbered
row-major: lane ``(r, c)`` is ``r·C + c``.

* :func:`expand_operand` applies a :class:`~marca.ops.Broadcast` mode to an operand field.
* :func:`elementwise` computes one :class:`~marca.ops.ElementwiseOp` per lane.
* :func:`linear_chunks` / :func:`gemv` compute rows' tree sums and accumulations in the contract's order.
* :func:`run_beats` models the array beat by beat (held tile, accumulators, which beats produce results):
  the scoreboard model of the testbenches.
"""

from collections.abc import Callable

import torch

from ..formats import FloatFormat
from ..ops import ArrayMode, Broadcast, ElementwiseOp
from . import fp

__all__ = ["read", "expand_operand", "elementwise", "linear_chunks", "gemv", "run_beats", "BEAT_FIELDS",
           "Extension"]

Extension = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, FloatFormat], torch.Tensor]
"""Golden model of a lane extension: ``(function, a, b, c, fmt) -> result`` on bit-pattern tensors."""

BEAT_FIELDS = ("mode", "op", "function", "broadcast_a", "broadcast_b", "broadcast_c", "first", "last",
               "slot", "hold_a", "use_held_a")
"""Control fields of a beat (one integer per beat); the operands ``a``, ``b``, ``c`` have ``R·C`` values."""


def read(bits, fmt: FloatFormat) -> torch.Tensor:
    """The operand as the contract reads it: NaN → canonical NaN, subnormal → zero of its sign."""
    bits = torch.as_tensor(bits, dtype=torch.int64)
    exponent = (bits >> fmt.man_bits) & fmt.exp_max
    mantissa = bits & ((1 << fmt.man_bits) - 1)
    bits = torch.where(exponent == 0, bits & fmt.sign_bit, bits)
    return torch.where((exponent == fmt.exp_max) & (mantissa != 0), fmt.canonical_nan, bits)


def expand_operand(values, broadcast, rows: int, cols: int) -> torch.Tensor:
    """Lane values ``[..., R·C]`` of an operand field ``values[..., R·C]`` under ``broadcast``.

    ``broadcast`` is a :class:`~marca.ops.Broadcast` or a tensor of them shaped like ``values[..., 0]``.
    """
    values = torch.as_tensor(values, dtype=torch.int64)
    lanes = rows * cols
    if values.shape[-1] != lanes:
        raise ValueError(f"values must have {lanes} lanes in the last dimension, not {values.shape[-1]}")
    row_index = torch.arange(lanes) // cols
    col_index = torch.arange(lanes) % cols
    choices = {
        Broadcast.LANE: values,
        Broadcast.ROW: values[..., row_index],
        Broadcast.COLUMN: values[..., col_index],
        Broadcast.SCALAR: values[..., :1].expand(values.shape),
    }
    broadcast = torch.as_tensor(broadcast, dtype=torch.int64)
    out = torch.zeros_like(values)
    for mode, lane_values in choices.items():
        out = torch.where((broadcast == int(mode))[..., None], lane_values, out)
    return out


def elementwise(op, a, b, c, fmt: FloatFormat, *, function=None,
                extension: Extension | None = None) -> torch.Tensor:
    """``op(a, b, c)`` per element (marca/ops.py): ``op`` an :class:`~marca.ops.ElementwiseOp` or a tensor
    of them broadcastable against the operands. ``FUNCTION`` uses ``extension(function, a, b, c, fmt)``;
    without an extension it reads as ``PASS`` (what the array built without one does)."""
    a, b, c = (torch.as_tensor(x, dtype=torch.int64) for x in (a, b, c))
    a, b, c = torch.broadcast_tensors(a, b, c)
    op = torch.as_tensor(op, dtype=torch.int64)
    less, _, _ = fp.compare(a, b, fmt)
    results = {
        ElementwiseOp.PASS: read(a, fmt),
        ElementwiseOp.MUL: fp.mul(a, b, fmt),
        ElementwiseOp.ADD: fp.add(a, b, fmt),
        ElementwiseOp.SUB: fp.sub(a, b, fmt),
        ElementwiseOp.MULADD: fp.add(fp.mul(a, b, fmt), c, fmt),
        ElementwiseOp.MIN: fp.minimum(a, b, fmt),
        ElementwiseOp.MAX: fp.maximum(a, b, fmt),
        ElementwiseOp.CMP_SELECT: torch.where(less, read(c, fmt), read(a, fmt)),
        ElementwiseOp.FUNCTION: read(a, fmt),
    }
    if extension is not None:
        function = torch.zeros_like(a) if function is None else torch.as_tensor(function, dtype=torch.int64)
        results[ElementwiseOp.FUNCTION] = extension(function.expand(a.shape), a, b, c, fmt)
    out = torch.zeros_like(a)
    for code, value in results.items():
        out = torch.where(op == int(code), value, out)
    return out


def linear_chunks(a, b, fmt: FloatFormat, start=None) -> torch.Tensor:
    """Rows' accumulators after chunks ``k = 0 .. K−1``: ``a``, ``b`` are ``[K, R, C]`` lane operands,
    ``start`` ``[R]`` the initial accumulators (default +0). ``acc = add(acc, tree_sum(mul(a, b)))``."""
    a, b = torch.as_tensor(a, dtype=torch.int64), torch.as_tensor(b, dtype=torch.int64)
    sums = fp.tree_sum(fp.mul(a, b, fmt), fmt)            # [K, R], pairwise in the contract's order
    acc = torch.zeros(a.shape[1], dtype=torch.int64) if start is None \
        else torch.as_tensor(start, dtype=torch.int64).clone()
    for chunk in range(a.shape[0]):
        acc = fp.add(acc, sums[chunk], fmt)
    return acc


def gemv(weight, x, fmt: FloatFormat, *, cols: int, bias=None) -> torch.Tensor:
    """``weight [R, K] · x [K] (+ bias [R])`` as an array with ``cols`` columns computes it: the input
    dimension in chunks of ``cols`` (``K`` a multiple of ``cols``), rows reduced by their trees, chunk
    sums accumulated in order starting from the bias (or +0)."""
    weight, x = torch.as_tensor(weight, dtype=torch.int64), torch.as_tensor(x, dtype=torch.int64)
    rows, k = weight.shape
    if k % cols:
        raise ValueError(f"the input dimension {k} must be a multiple of cols={cols}")
    a = weight.reshape(rows, k // cols, cols).transpose(0, 1)          # [K/C, R, C]
    b = x.reshape(k // cols, 1, cols).expand(a.shape)
    return linear_chunks(a, b, fmt, start=bias)


def run_beats(beats: dict, *, rows: int, cols: int, fmt: FloatFormat,
              extension: Extension | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The array's output beats for a sequence of input beats.

    ``beats`` maps each name of :data:`BEAT_FIELDS` to a ``[N]`` tensor (``function`` and ``slot`` may be
    missing: 0) and
    ``a``, ``b``, ``c`` to ``[N, R·C]`` tensors. Returns ``(source, mode, result)``: for each output beat
    in order, the index of the input beat that produced it, its mode, and its ``R·C`` values.
    Linear beats accumulate in the accumulator set named by their ``slot``. The held tile and the
    accumulators start at +0 (the array's reset state).
    """
    lanes = rows * cols
    control = {name: torch.as_tensor(beats.get(name, 0), dtype=torch.int64) for name in BEAT_FIELDS}
    count = len(control["mode"])
    control = {name: value.expand(count) for name, value in control.items()}
    a_beat = expand_operand(beats["a"], control["broadcast_a"], rows, cols)
    b_lane = expand_operand(beats["b"], control["broadcast_b"], rows, cols)
    c_lane = expand_operand(beats["c"], control["broadcast_c"], rows, cols)

    # Held tile: a beat with hold_a uses and stores its own a; use_held_a reads the last stored tile.
    held = torch.zeros(lanes, dtype=torch.int64)
    a_lane = a_beat.clone()
    for index in range(count):
        if control["hold_a"][index]:
            held = a_beat[index]
        elif control["use_held_a"][index]:
            a_lane[index] = held

    linear = control["mode"] == int(ArrayMode.LINEAR)
    results = torch.zeros((count, lanes), dtype=torch.int64)
    results[~linear] = elementwise(control["op"][~linear, None], a_lane[~linear], b_lane[~linear],
                                   c_lane[~linear], fmt, function=control["function"][~linear, None],
                                   extension=extension)
    linear_index = torch.nonzero(linear).flatten()
    if len(linear_index):
        products = fp.mul(a_lane[linear_index], b_lane[linear_index], fmt).reshape(-1, rows, cols)
        sums = fp.tree_sum(products, fmt)                                      # [N_linear, R]
        bias = c_lane[linear_index].reshape(-1, rows, cols)[:, :, cols - 1]    # lane (r, C-1)'s c
        accumulators = {}
        for position, index in enumerate(linear_index.tolist()):
            slot = int(control["slot"][index])
            start = bias[position] if control["first"][index] else \
                accumulators.get(slot, torch.zeros(rows, dtype=torch.int64))
            accumulators[slot] = fp.add(start, sums[position], fmt)
            results[index, :rows] = accumulators[slot]
    produces = ~linear | (control["last"] != 0)
    source = torch.nonzero(produces).flatten()
    return source, control["mode"][source], results[source]
