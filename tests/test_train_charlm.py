"""The byte-level Shakespeare Mamba: the training scan, the functional forward pass, the committed checkpoint.

No corpus download: the checkpoint, its training text's byte counts and a Hamlet excerpt are in the
repository (reference/checkpoints/shakespeare-mamba/).
"""

import json
from functools import partial

import pytest
import torch

from marca.reference import charlm, train_charlm
from marca.reference.charlm import (
    CHECKPOINT_DIR,
    VALIDATION_EXCERPT,
    bits_per_byte,
    byte_tensor,
    chunked_scan,
    evaluation_segments,
    fast_scan,
    lm_forward,
    load_checkpoint,
    model_config,
    reference_scan,
    sequence_logits,
    unigram_bits_per_byte,
    weights_from_model,
)

transformers = pytest.importorskip("transformers")


def _scan_inputs(*, batch=2, length=13, d_inner=6, d_state=4, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    delta = torch.nn.functional.softplus(normal(batch, length, d_inner))
    A = -torch.rand(d_inner, d_state, generator=generator, dtype=torch.float64) * 4
    tensors = (normal(batch, length, d_inner), delta, A, normal(batch, length, d_state),
               normal(batch, length, d_state), normal(d_inner), normal(batch, d_inner, d_state))
    return [t.requires_grad_() for t in tensors]


def _scan_matches(scan) -> bool:
    """``scan`` equals the reference recurrence in float64: outputs, final state and the gradients of a
    loss of both with respect to every input (the initial state included)."""
    inputs = _scan_inputs()
    expected_y, expected_state = reference_scan(*inputs)
    y, state = scan(*inputs)
    weight_y = torch.randn(expected_y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weight_state = torch.randn(expected_state.shape, generator=torch.Generator().manual_seed(2),
                               dtype=torch.float64)
    expected_grads = torch.autograd.grad((expected_y * weight_y).sum() + (expected_state * weight_state).sum(),
                                         inputs)
    grads = torch.autograd.grad((y * weight_y).sum() + (state * weight_state).sum(), inputs)
    close = partial(torch.allclose, rtol=1e-10, atol=1e-12)
    return close(y, expected_y) and close(state, expected_state) and all(
        close(g, e) for g, e in zip(grads, expected_grads))


def test_fast_scan_equals_reference_recurrence():
    assert _scan_matches(fast_scan)


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
def test_chunked_scan_equals_reference_recurrence(chunk):
    assert _scan_matches(partial(chunked_scan, chunk=chunk))


def _state_reset_at_chunk_boundary(x, delta, A, B, C, D, ssm_state):
    # Broken: every chunk starts from the initial state instead of the previous chunk's final state.
    return chunked_scan(x, delta, A, B, C, D, ssm_state, chunk=4,
                        scan=lambda *args: fast_scan(*args[:-1], ssm_state))


def _decay_one_token_late(x, delta, A, B, C, D, ssm_state):
    # Broken: token t decays with token t-1's step size.
    return fast_scan(x, delta.roll(1, dims=1), A, B, C, D, ssm_state)


class _ForgetsFinalStateGradient(charlm._ScanFunction):
    # Broken backward: the gradient arriving at the final state is dropped (values are right).
    @staticmethod
    def backward(ctx, grad_y, grad_state):
        return charlm._ScanFunction.backward(ctx, grad_y, None)


@pytest.mark.parametrize("broken", [_state_reset_at_chunk_boundary, _decay_one_token_late,
                                    _ForgetsFinalStateGradient.apply])
def test_broken_scans_are_caught(broken):
    assert not _scan_matches(broken)


def test_training_gradients_equal_transformers():
    """One training loss through lm_forward (fast scan) and through transformers' MambaForCausalLM (its
    own CPU path, in training mode): same loss, same gradient for every parameter."""
    torch.manual_seed(3)
    model = transformers.MambaForCausalLM(model_config(d_model=32, n_layer=2)).train()
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    expected_loss = model(tokens, labels=tokens, use_cache=False).loss
    expected = torch.autograd.grad(expected_loss, list(model.parameters()))
    logits, _ = lm_forward(weights_from_model(model), tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    for (name, _), grad, want in zip(model.named_parameters(), grads, expected):
        assert torch.allclose(grad, want, rtol=1e-3, atol=1e-5 * want.abs().max()), name


@pytest.fixture(scope="module")
def checkpoint_model():
    return load_checkpoint()


@pytest.fixture(scope="module")
def excerpt():
    return VALIDATION_EXCERPT.read_bytes()


def test_checkpoint_is_a_small_tied_mamba_for_causal_lm(checkpoint_model):
    model = transformers.MambaForCausalLM.from_pretrained(CHECKPOINT_DIR, local_files_only=True)
    assert isinstance(model, transformers.MambaForCausalLM)
    config = model.config
    assert (config.vocab_size, config.state_size, config.expand) == (256, 16, 2)
    assert config.hidden_size % 16 == 0
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()   # tied
    assert (CHECKPOINT_DIR / "model.safetensors").stat().st_size <= 10 * 2**20
    for a, b in zip(model.state_dict().values(), checkpoint_model.state_dict().values()):
        assert torch.equal(a, b)


def test_functional_forward_equals_transformers_on_the_checkpoint(checkpoint_model, excerpt):
    """lm_forward by chunked prefill (states carried over 3 chunks) gives transformers' logits; the same
    with the states dropped between chunks does not (the comparison can fail)."""
    tokens = byte_tensor(excerpt[:192])[None]
    with torch.no_grad():
        expected = checkpoint_model(tokens, use_cache=False).logits
        weights = weights_from_model(checkpoint_model)
        chunked = sequence_logits(weights, tokens, chunk=64)
        reference = sequence_logits(weights, tokens, chunk=64, scan=reference_scan)
        dropped = torch.cat([lm_forward(weights, tokens[:, s:s + 64])[0] for s in range(0, 192, 64)], 1)
    tolerance = 1e-4 * expected.abs().max()
    assert (chunked - expected).abs().max() < tolerance
    assert (reference - expected).abs().max() < tolerance
    assert (dropped - expected).abs().max() > 100 * tolerance


def test_checkpoint_beats_the_unigram_baseline(checkpoint_model, excerpt):
    """On the committed Hamlet excerpt (validation text, never trained on) the model is at least 1.5 bits
    per byte better than the training text's byte frequencies."""
    tokens = byte_tensor(excerpt)[None]
    with torch.no_grad():
        logits = sequence_logits(weights_from_model(checkpoint_model), tokens[:, :-1], chunk=1024)
    model_bits = bits_per_byte(logits, tokens[:, 1:])
    counts = json.loads((CHECKPOINT_DIR / "unigram_counts.json").read_text())
    unigram_bits = unigram_bits_per_byte(counts, excerpt[1:])
    assert unigram_bits > 4.0
    assert model_bits < unigram_bits - 1.5, (model_bits, unigram_bits)


def test_unigram_baseline():
    # Two equally frequent bytes in the training text: 1 bit each, up to the add-one smoothing.
    value = unigram_bits_per_byte(b"ab" * 5000, b"abba")
    assert value == pytest.approx(-torch.log2(torch.tensor(5001 / 10256.0)).item())
    with pytest.raises(ValueError, match="256 numbers"):
        unigram_bits_per_byte([1, 2, 3], b"a")


def test_evaluation_segments():
    text = bytes(range(256)) * 40
    segments = evaluation_segments(text, count=5, length=33)
    assert segments.shape == (5, 33)
    stride = (len(text) - 33) // 4       # evenly spaced from the start: 0, 2551, ..., 10204
    for index in range(5):
        assert bytes(segments[index].tolist()) == text[index * stride:index * stride + 33]
    with pytest.raises(ValueError, match="too short"):
        evaluation_segments(text[:100], count=5, length=33)
    with pytest.raises(ValueError, match="length"):
        evaluation_segments(text, count=5, length=1)


def test_learning_rate_schedule():
    lr = partial(train_charlm.learning_rate, peak=1e-3, warmup=10, total=110)
    assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-3) and lr(60) == pytest.approx(0.55e-3) and lr(110) == pytest.approx(1e-4)


def test_training_command_rejects_bad_options(capsys):
    assert train_charlm.main(["--d-model", "100"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert train_charlm.main(["--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="chunk"):
        chunked_scan(*_scan_inputs(), chunk=0)
    with pytest.raises(ValueError, match="tokens"):
        lm_forward({}, torch.zeros(3))
