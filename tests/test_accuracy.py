"""The accuracy benchmark's machinery (bench/accuracy.py) on the committed checkpoint, without the corpus."""

import pytest
import torch

import marca.compiler
from marca.bench import accuracy
from marca.reference.charlm import CHECKPOINT_DIR, VALIDATION_EXCERPT, byte_tensor, load_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def weights():
    return accuracy.checkpoint_weights()


@pytest.fixture(scope="module")
def excerpt():
    return VALIDATION_EXCERPT.read_bytes()


def test_storage_rounding_follows_the_numerics_contract():
    """Rounding into FP16 storage flushes subnormals and overflows to infinity (a plain torch cast keeps
    the subnormal and gives the same infinity), BF16 rounds to nearest even."""
    weights = {"backbone.embeddings.weight": torch.tensor([1e-6, 7e4, 1.0 + 2**-9, 3.0]),
               "backbone.layers.0.norm.weight": torch.ones(2),
               "backbone.layers.0.mixer.A_log": torch.zeros(1, 2)}
    rounded, state_matrices, census = accuracy.storage_rounded(weights, "fp16")
    assert rounded["backbone.embeddings.weight"].tolist() == [0.0, float("inf"), 1.0 + 2**-9, 3.0]
    assert torch.tensor(1e-6).half().item() != 0          # a torch cast would keep the subnormal
    assert census["flushed"] == 1 and census["overflowed"] == 1
    assert state_matrices[0].tolist() == [[-1.0, -1.0]]
    assert rounded["lm_head.weight"] is rounded["backbone.embeddings.weight"]
    rounded, _, census = accuracy.storage_rounded(weights, "bf16")
    # 1 + 2^-9 is a tie between 1 and 1 + 2^-7 in BF16's 8-bit significand: nearest even is 1.
    assert rounded["backbone.embeddings.weight"][2].item() == 1.0
    assert rounded["backbone.embeddings.weight"][1].item() == 70144.0
    assert census["flushed"] == census["overflowed"] == 0
    assert 144 / 7e4 <= census["max_relative_error"] <= 2**-8


def test_storage_rounding_of_the_checkpoint(weights):
    fp32, _, census = accuracy.storage_rounded(weights, "fp32")
    assert census["overflowed"] == 0
    assert all(torch.equal(fp32[name], weights[name]) or census["flushed"] for name in weights)
    bf16, _, census = accuracy.storage_rounded(weights, "bf16")
    for name, value in bf16.items():
        assert torch.equal(value, value.bfloat16().float()), name      # representable in BF16
        assert torch.allclose(value, weights[name], rtol=2**-8, atol=1e-37), name
    assert 0 < census["max_relative_error"] <= 2**-8


def test_chunked_teacher_forcing_carries_the_states(weights, excerpt):
    """Chunked prefill gives the whole-sequence figure; a model that loses its states between chunks
    does not (so the check can fail)."""
    segments = byte_tensor(excerpt[:1025])[None]
    forward = accuracy.float_model(weights)
    whole = accuracy.teacher_forced_bits(forward, segments, chunk=1024)
    chunked = accuracy.teacher_forced_bits(forward, segments, chunk=100)
    forgetful = accuracy.teacher_forced_bits(lambda tokens, states: forward(tokens, None), segments, chunk=100)
    assert chunked == pytest.approx(whole, abs=1e-5)
    assert abs(forgetful - whole) > 1e-2


def test_greedy_generation_equals_transformers_generate(weights, excerpt):
    prompts = torch.stack([byte_tensor(excerpt[0:24]), byte_tensor(excerpt[600:624])])
    ours = accuracy.greedy_continuations(accuracy.float_model(weights), prompts, steps=16)
    model = load_checkpoint()
    with torch.no_grad():
        theirs = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=16,
                                do_sample=False, pad_token_id=0)[:, 24:]
    assert torch.equal(ours, theirs)


def test_agreement_counts_bytes_before_the_first_difference():
    reference = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    other = torch.tensor([[1, 2, 0, 4], [5, 6, 7, 8], [0, 9, 9, 9]])
    result = accuracy.agreement(other, reference)
    assert result["matched_bytes"] == [2, 4, 0]
    assert result["mean_matched_bytes"] == pytest.approx(2.0)
    assert result["prompts_fully_matched"] == 1 and result["of_bytes"] == 4


def test_prompts_start_at_line_starts():
    text = b"".join(b"line %03d of the text\n" % i for i in range(100))
    prompts = accuracy.prompts_from(text, count=4, length=8)
    assert [bytes(p.tolist()) for p in prompts] == [b"line 000", b"line 025", b"line 050", b"line 075"]


class _FakeSession:
    """Stands in for a compiled model's ISS session: logits that say which call and token made them."""

    def __init__(self, calls):
        self.calls = calls

    def prefill(self, ids):
        self.calls.append(("prefill", ids.tolist()))
        return torch.stack([torch.full((256,), float(i)) for i in ids.tolist()]).double()

    def decode(self, token):
        self.calls.append(("decode", token))
        return torch.full((1, 256), -float(token)).double()


def test_iss_model_drives_one_session_per_sequence(monkeypatch):
    calls, compiled_with = [], []

    class _Compiled:
        def session(self):
            return _FakeSession(calls)

    def fake_compile(model, mamba_config, config, *, prompt_length, logits):
        compiled_with.append((model, config.name, prompt_length, logits))
        return _Compiled()

    monkeypatch.setattr(marca.compiler, "compile_model", fake_compile)
    monkeypatch.setattr(accuracy, "load_checkpoint", lambda path: "the model")
    forward = accuracy.iss_model(CHECKPOINT_DIR, "tiny", prompt_length=3)
    assert compiled_with == [("the model", "tiny", 3, "all")]
    logits, sessions = forward(torch.tensor([[1, 2, 3], [4, 5, 6]]), None)
    assert logits.shape == (2, 3, 256) and logits.dtype == torch.float32
    assert logits[1, :, 0].tolist() == [4.0, 5.0, 6.0] and len(sessions) == 2
    logits, sessions = forward(torch.tensor([[7], [8]]), sessions)
    assert logits[:, 0, 0].tolist() == [-7.0, -8.0]
    assert calls == [("prefill", [1, 2, 3]), ("prefill", [4, 5, 6]), ("decode", 7), ("decode", 8)]
    with pytest.raises(ValueError, match="takes 3 tokens"):
        forward(torch.tensor([[1, 2]]), None)


def test_iss_rows_say_what_they_need_without_the_compiler(monkeypatch):
    monkeypatch.delattr(marca.compiler, "compile_model", raising=False)
    with pytest.raises(NotImplementedError, match="whole-model compiler"):
        accuracy.iss_model(CHECKPOINT_DIR, "default", prompt_length=4)
