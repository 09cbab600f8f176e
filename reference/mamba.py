"""Float reference of the Mamba-1 mixer (one layer's "mixer", without the norm and the residual).

This is what the accelerator must compute, written plainly so that it documents the hardware's work:
the selective scan is a per-token loop of element-wise operations over a ``d_inner x d_state`` tile and
one reduction over ``d_state``. It runs on any float dtype and any device (CPU or CUDA), and its
parameters carry the names of transformers' ``MambaMixer``::

    in_proj.weight   [2*d_inner, d_model]       in_proj.bias   [2*d_inner]   (optional)
    conv1d.weight    [d_inner, 1, d_conv]       conv1d.bias    [d_inner]     (optional)
    x_proj.weight    [dt_rank + 2*d_state, d_inner]
    dt_proj.weight   [d_inner, dt_rank]         dt_proj.bias   [d_inner]
    A_log            [d_inner, d_state]
    D                [d_inner]
    out_proj.weight  [d_model, d_inner]         out_proj.bias  [d_model]     (optional)

Every function is pure: tensors in, new tensors out; nothing is modified in place. All arithmetic runs
in the dtype and on the device of the weights (see :func:`cast_weights`). Token-major layouts:
activations are ``[L, features]`` or ``[batch, L, features]``; states are
``conv_state [d_inner, d_conv]`` and ``ssm_state [d_inner, d_state]`` (with a leading batch axis when
the input has one), the same layouts as transformers' cache.

The conv state holds the last ``d_conv`` inputs of the causal convolution (the ``x`` half of
``in_proj``'s output, before the convolution), oldest first, newest last. A decode step shifts the new
input in at the end and then the convolution is one dot product per channel with that window, so the
oldest entry is never read again; keeping ``d_conv`` (not ``d_conv - 1``) entries matches transformers.

See docs/reference.md for the equations, the checks against transformers and the processor numbers.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "MambaDims",
    "PARAMETER_NAMES",
    "OPTIONAL_PARAMETER_NAMES",
    "random_mixer_weights",
    "dims_from_weights",
    "cast_weights",
    "zero_states",
    "state_matrix",
    "in_projection",
    "causal_conv",
    "ssm_parameters",
    "selective_scan",
    "output_projection",
    "mixer_prefill",
    "mixer_decode",
]

#: Parameters every mixer has.
PARAMETER_NAMES = (
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
)
#: Parameters a mixer may have (``MambaConfig(use_bias=True)``); ``conv1d.bias`` may also be absent
#: (``use_conv_bias=False``).
OPTIONAL_PARAMETER_NAMES = ("in_proj.bias", "out_proj.bias")


@dataclass(frozen=True)
class MambaDims:
    """Sizes of one Mamba-1 mixer.

    Parameters
    ----------
    d_model : int
        Width of the residual stream (``hidden_size`` in transformers).
    d_state : int
        SSM state size per channel (``state_size``).
    d_conv : int
        Causal convolution width (``conv_kernel``).
    expand : int
        ``d_inner = expand * d_model`` (``intermediate_size``).
    dt_rank : int or "auto"
        Rank of the step-size projection (``time_step_rank``); ``"auto"`` is ``ceil(d_model / 16)`` and
        is replaced by that integer when the object is built.
    bias : bool
        Whether ``in_proj`` and ``out_proj`` have biases (``use_bias``; Mamba checkpoints have none).
    conv_bias : bool
        Whether ``conv1d`` has a bias (``use_conv_bias``; Mamba checkpoints have one).
    """

    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    bias: bool = False
    conv_bias: bool = True

    def __post_init__(self):
        for name in ("d_model", "d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.dt_rank == "auto":
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        elif not _is_positive_int(self.dt_rank):
            raise ValueError(f"dt_rank must be a positive integer or 'auto', not {self.dt_rank!r}")
        for name in ("bias", "conv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, not {getattr(self, name)!r}")

    @property
    def d_inner(self) -> int:
        """Channels of the inner (expanded) stream."""
        return self.expand * self.d_model

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every parameter this mixer has, by transformers' name."""
        shapes = {
            "in_proj.weight": (2 * self.d_inner, self.d_model),
            "conv1d.weight": (self.d_inner, 1, self.d_conv),
            "x_proj.weight": (self.dt_rank + 2 * self.d_state, self.d_inner),
            "dt_proj.weight": (self.d_inner, self.dt_rank),
            "dt_proj.bias": (self.d_inner,),
            "A_log": (self.d_inner, self.d_state),
            "D": (self.d_inner,),
            "out_proj.weight": (self.d_model, self.d_inner),
        }
        if self.conv_bias:
            shapes["conv1d.bias"] = (self.d_inner,)
        if self.bias:
            shapes["in_proj.bias"] = (2 * self.d_inner,)
            shapes["out_proj.bias"] = (self.d_model,)
        return shapes


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _uniform(shape, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def random_mixer_weights(
    dims: MambaDims,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
    dt_floor: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """Weights initialised the way transformers' ``MambaMixer`` initialises a fresh mixer.

    Linear and convolution weights (and biases) are uniform in ``±1/sqrt(fan_in)`` (PyTorch's default for
    ``nn.Linear`` and ``nn.Conv1d``); ``dt_proj.weight`` is uniform in ``±dt_rank**-0.5``;
    ``dt_proj.bias`` is the inverse softplus of a step ``dt`` drawn log-uniformly in ``[dt_min, dt_max]``
    (floored at ``dt_floor``), so ``softplus(dt_proj.bias)`` starts in that range; ``A_log[d, n] =
    log(n + 1)`` (S4D-real, so ``A = -(1..d_state)``) and ``D = 1``.

    The numbers depend only on ``seed`` (drawn on the CPU in float64, then converted), not on ``dtype``
    or ``device``.
    """
    if not isinstance(dims, MambaDims):
        raise ValueError(f"dims must be a MambaDims, not {dims!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, not {dtype!r}")
    if not 0 < dt_min < dt_max:
        raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min < dt_max, not {dt_min!r}, {dt_max!r}")
    if not dt_floor > 0:
        raise ValueError(f"dt_floor must be positive, not {dt_floor!r}")
    generator = torch.Generator().manual_seed(seed)
    d_inner, d_state, dt_rank = dims.d_inner, dims.d_state, dims.dt_rank
    weights: dict[str, torch.Tensor] = {}

    weights["in_proj.weight"] = _uniform((2 * d_inner, dims.d_model), dims.d_model**-0.5, generator)
    if dims.bias:
        weights["in_proj.bias"] = _uniform((2 * d_inner,), dims.d_model**-0.5, generator)
    # Depthwise convolution: fan_in = (in_channels / groups) * kernel = d_conv.
    weights["conv1d.weight"] = _uniform((d_inner, 1, dims.d_conv), dims.d_conv**-0.5, generator)
    if dims.conv_bias:
        weights["conv1d.bias"] = _uniform((d_inner,), dims.d_conv**-0.5, generator)
    weights["x_proj.weight"] = _uniform((dt_rank + 2 * d_state, d_inner), d_inner**-0.5, generator)
    weights["dt_proj.weight"] = _uniform((d_inner, dt_rank), dt_rank**-0.5, generator)
    log_dt = torch.rand(d_inner, generator=generator, dtype=torch.float64)
    dt = torch.exp(log_dt * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
    weights["dt_proj.bias"] = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
    weights["A_log"] = torch.log(torch.arange(1, d_state + 1, dtype=torch.float64)).expand(d_inner, -1)
    weights["D"] = torch.ones(d_inner, dtype=torch.float64)
    weights["out_proj.weight"] = _uniform((dims.d_model, d_inner), d_inner**-0.5, generator)
    if dims.bias:
        weights["out_proj.bias"] = _uniform((dims.d_model,), d_inner**-0.5, generator)
    return {name: value.to(dtype=dtype, device=device).contiguous() for name, value in weights.items()}


def dims_from_weights(weights: dict[str, torch.Tensor]) -> MambaDims:
    """The :class:`MambaDims` that ``weights`` belong to; checks every shape, dtype and device.

    Raises ``ValueError`` naming the parameter that is missing, unexpected or of the wrong shape, or
    whose dtype or device differs from ``in_proj.weight``'s.
    """
    if not isinstance(weights, dict):
        raise ValueError(f"weights must be a dict of tensors, not {type(weights).__name__}")
    for name in ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "A_log", "conv1d.weight"):
        if name not in weights:
            raise ValueError(f"weights lacks {name!r}")
    d_inner2, d_model = weights["in_proj.weight"].shape
    d_inner, d_state = weights["A_log"].shape
    dt_rank = weights["dt_proj.weight"].shape[1]
    d_conv = weights["conv1d.weight"].shape[-1]
    if d_inner2 != 2 * d_inner or d_inner % d_model:
        raise ValueError(
            f"in_proj.weight has shape {tuple(weights['in_proj.weight'].shape)}, which does not fit "
            f"A_log's d_inner = {d_inner} (need [2*d_inner, d_model] with d_model dividing d_inner)"
        )
    dims = MambaDims(
        d_model,
        d_state=d_state,
        d_conv=d_conv,
        expand=d_inner // d_model,
        dt_rank=dt_rank,
        bias="in_proj.bias" in weights,
        conv_bias="conv1d.bias" in weights,
    )
    expected = dims.parameter_shapes()
    if ("in_proj.bias" in weights) != ("out_proj.bias" in weights):
        raise ValueError("weights must have both of 'in_proj.bias' and 'out_proj.bias' or neither")
    reference = weights["in_proj.weight"]
    if not reference.dtype.is_floating_point:
        raise ValueError(f"in_proj.weight must be a float tensor, not {reference.dtype}")
    for name, value in weights.items():
        if name not in expected:
            raise ValueError(f"weights has an unexpected parameter {name!r}")
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[name]:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must have shape {expected[name]}, not {shape}")
        if value.dtype != reference.dtype or value.device != reference.device:
            raise ValueError(
                f"{name} is {value.dtype} on {value.device}, but in_proj.weight is {reference.dtype} on "
                f"{reference.device}; use cast_weights"
            )
    for name in expected:
        if name not in weights:
            raise ValueError(f"weights lacks {name!r}")
    return dims


def cast_weights(
    weights: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """A copy of ``weights`` in ``dtype`` on ``device`` (either left as is when ``None``)."""
    return {name: value.detach().to(dtype=dtype, device=device) for name, value in weights.items()}


def zero_states(
    weights: dict[str, torch.Tensor], batch_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(conv_state, ssm_state)``: zeros, ``[d_inner, d_conv]`` and ``[d_inner, d_state]``, with a
    leading ``batch_size`` axis unless it is ``None``."""
    dims = dims_from_weights(weights)
    if batch_size is not None and not _is_positive_int(batch_size):
        raise ValueError(f"batch_size must be a positive integer or None, not {batch_size!r}")
    lead = () if batch_size is None else (batch_size,)
    like = weights["A_log"]
    conv_state = like.new_zeros(lead + (dims.d_inner, dims.d_conv))
    ssm_state = like.new_zeros(lead + (dims.d_inner, dims.d_state))
    return conv_state, ssm_state


def state_matrix(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """``A = -exp(A_log)``, ``[d_inner, d_state]``: weights only, so the host computes it once."""
    return -torch.exp(weights["A_log"])


def _linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    outputs = inputs @ weight.T
    return outputs if bias is None else outputs + bias


def in_projection(
    weights: dict[str, torch.Tensor], hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x, z = split(in_proj(hidden))``: ``hidden [..., L, d_model]`` -> two ``[..., L, d_inner]``."""
    projected = _linear(hidden, weights["in_proj.weight"], weights.get("in_proj.bias"))
    x, z = projected.chunk(2, dim=-1)
    return x, z


def causal_conv(
    weights: dict[str, torch.Tensor], x: torch.Tensor, conv_state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution plus bias (no activation), carrying the conv state.

    ``x [batch, L, d_inner]``, ``conv_state [batch, d_inner, d_conv]`` (the ``d_conv`` inputs before this
    chunk, oldest first). With ``window = concat(conv_state over time, x)`` (``d_conv + L`` steps), output
    token ``t`` is ``bias + sum_k weight[:, k] * window[t + 1 + k]``: tap ``d_conv - 1`` meets the current
    token, tap 0 the oldest. Returns ``(conv_out [batch, L, d_inner], new conv_state)``, the new state being
    the last ``d_conv`` steps of the window.
    """
    d_conv = conv_state.shape[-1]
    length = x.shape[-2]
    window = torch.cat([conv_state.transpose(-1, -2), x], dim=-2)  # [batch, d_conv + L, d_inner]
    taps = weights["conv1d.weight"][:, 0, :]  # [d_inner, d_conv]
    conv_out = window[..., 1 : 1 + length, :] * taps[:, 0]
    for tap in range(1, d_conv):
        conv_out = conv_out + window[..., 1 + tap : 1 + tap + length, :] * taps[:, tap]
    if "conv1d.bias" in weights:
        conv_out = conv_out + weights["conv1d.bias"]
    new_conv_state = window[..., -d_conv:, :].transpose(-1, -2).contiguous()
    return conv_out, new_conv_state


def ssm_parameters(
    weights: dict[str, torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``delta, B, C`` from the convolved, activated ``x [..., L, d_inner]``.

    ``dt, B, C = split(x_proj(x))``; ``delta = softplus(dt_proj(dt) + dt_proj.bias)``. Shapes
    ``[..., L, d_inner]``, ``[..., L, d_state]``, ``[..., L, d_state]``. ``softplus`` is
    ``torch.nn.functional.softplus`` (``log(1 + exp(v))``, and ``v`` itself above 20), as in transformers.
    """
    d_state = weights["A_log"].shape[-1]
    dt_rank = weights["dt_proj.weight"].shape[-1]
    projected = x @ weights["x_proj.weight"].T
    dt, B, C = projected.split([dt_rank, d_state, d_state], dim=-1)
    delta = F.softplus(_linear(dt, weights["dt_proj.weight"], weights["dt_proj.bias"]))
    return delta, B, C


def selective_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    ssm_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan, one token at a time, exactly as the hardware steps it.

    ``x, delta [batch, L, d_inner]``; ``A [d_inner, d_state]`` (already ``-exp(A_log)``);
    ``B, C [batch, L, d_state]``; ``D [d_inner]``; ``ssm_state [batch, d_inner, d_state]``. Per token ``t``::

        dA  = exp(delta[t, d] * A[d, n])                  element-wise over the d_inner x d_state tile
        h   = dA * h + (delta[t, d] * B[t, n]) * x[t, d]   element-wise
        y[t, d] = sum_n h[d, n] * C[t, n] + D[d] * x[t, d] reduction over d_state, then element-wise

    Returns ``(y [batch, L, d_inner], final ssm_state)``. The reduction's order of addition is
    PyTorch's; the golden models fix the hardware's (a balanced pairwise tree, docs/numerics.md).
    """
    state = ssm_state
    outputs = []
    for t in range(x.shape[-2]):
        delta_t = delta[..., t, :, None]  # [batch, d_inner, 1]
        x_t = x[..., t, :, None]  # [batch, d_inner, 1]
        decay = torch.exp(delta_t * A)  # [batch, d_inner, d_state]
        state = decay * state + (delta_t * B[..., t, None, :]) * x_t
        y_t = (state @ C[..., t, :, None])[..., 0] + D * x[..., t, :]
        outputs.append(y_t)
    return torch.stack(outputs, dim=-2), state


def output_projection(weights: dict[str, torch.Tensor], y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``out_proj(y * silu(z))``: the gate, then the projection back to ``d_model``."""
    return _linear(y * F.silu(z), weights["out_proj.weight"], weights.get("out_proj.bias"))


def _check_states(dims: MambaDims, like: torch.Tensor, batch_shape: tuple, conv_state, ssm_state):
    expected = {
        "conv_state": batch_shape + (dims.d_inner, dims.d_conv),
        "ssm_state": batch_shape + (dims.d_inner, dims.d_state),
    }
    for name, value in (("conv_state", conv_state), ("ssm_state", ssm_state)):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[name]:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must have shape {expected[name]}, not {shape}")
        if value.dtype != like.dtype or value.device != like.device:
            raise ValueError(
                f"{name} must be {like.dtype} on {like.device} like the weights, not {value.dtype} on "
                f"{value.device}"
            )


def mixer_prefill(
    weights: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    conv_state: torch.Tensor | None = None,
    ssm_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the mixer over ``L`` tokens.

    Parameters
    ----------
    weights : dict of str to Tensor
        The mixer's parameters (transformers' names); all arithmetic is in their dtype, on their device.
    hidden : Tensor
        ``[L, d_model]`` or ``[batch, L, d_model]``, same dtype and device as the weights; ``L >= 1``.
    conv_state, ssm_state : Tensor, optional
        States to start from (``[batch,] d_inner, d_conv`` and ``[batch,] d_inner, d_state``); zeros
        (a fresh sequence) when omitted. Passing both continues a sequence (chunked prefill).

    Returns
    -------
    out : Tensor
        ``[batch,] L, d_model``.
    conv_state, ssm_state : Tensor
        The states after the last token, ready for :func:`mixer_decode` or another prefill.
    """
    dims = dims_from_weights(weights)
    like = weights["in_proj.weight"]
    if not isinstance(hidden, torch.Tensor) or hidden.ndim not in (2, 3) or hidden.shape[-1] != dims.d_model:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(
            f"hidden must have shape [L, {dims.d_model}] or [batch, L, {dims.d_model}], not {shape}"
        )
    if hidden.shape[-2] < 1:
        raise ValueError("hidden must hold at least one token (L >= 1)")
    if hidden.dtype != like.dtype or hidden.device != like.device:
        raise ValueError(
            f"hidden must be {like.dtype} on {like.device} like the weights, not {hidden.dtype} on "
            f"{hidden.device}"
        )
    if (conv_state is None) != (ssm_state is None):
        raise ValueError("conv_state and ssm_state must be given together (or neither)")
    unbatched = hidden.ndim == 2
    batch_shape = () if unbatched else (hidden.shape[0],)
    if conv_state is None:
        conv_state, ssm_state = zero_states(weights, None if unbatched else hidden.shape[0])
    _check_states(dims, like, batch_shape, conv_state, ssm_state)
    if unbatched:
        hidden, conv_state, ssm_state = hidden[None], conv_state[None], ssm_state[None]

    x, z = in_projection(weights, hidden)
    conv_out, conv_state = causal_conv(weights, x, conv_state)
    x = F.silu(conv_out)
    delta, B, C = ssm_parameters(weights, x)
    y, ssm_state = selective_scan(x, delta, state_matrix(weights), B, C, weights["D"], ssm_state)
    out = output_projection(weights, y, z)

    if unbatched:
        out, conv_state, ssm_state = out[0], conv_state[0], ssm_state[0]
    return out, conv_state, ssm_state


def mixer_decode(
    weights: dict[str, torch.Tensor],
    hidden_token: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step: ``hidden_token [d_model]`` or ``[batch, d_model]`` with the states carried in.

    The same computation as :func:`mixer_prefill` with ``L = 1``: the conv state shifts the new input in
    (its oldest entry drops out) and the convolution is one dot product per channel over it; the SSM
    state takes one scan step. Returns ``(out [batch,] d_model, conv_state, ssm_state)``.
    """
    if not isinstance(hidden_token, torch.Tensor) or hidden_token.ndim not in (1, 2):
        is_tensor = isinstance(hidden_token, torch.Tensor)
        shape = tuple(hidden_token.shape) if is_tensor else type(hidden_token).__name__
        raise ValueError(f"hidden_token must have shape [d_model] or [batch, d_model], not {shape}")
    out, conv_state, ssm_state = mixer_prefill(weights, hidden_token.unsqueeze(-2), conv_state, ssm_state)
    return out.squeeze(-2), conv_state, ssm_state
