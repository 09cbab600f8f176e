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
    calls, compiled_with, sessions_with = [], [], []

    class _Compiled:
        def session(self, **options):
            sessions_with.append(options)
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
    # tiny (16-bit formats) replays: both sessions share one dict of traces.
    assert [options["replay"] for options in sessions_with] == [True, True]
    assert sessions_with[0]["traces"] is sessions_with[1]["traces"]
    logits, sessions = forward(torch.tensor([[7], [8]]), sessions)
    assert logits[:, 0, 0].tolist() == [-7.0, -8.0]
    assert calls == [("prefill", [1, 2, 3]), ("prefill", [4, 5, 6]), ("decode", 7), ("decode", 8)]
    with pytest.raises(ValueError, match="takes 3 tokens"):
        forward(torch.tensor([[1, 2]]), None)


def test_iss_rows_say_what_they_need_without_the_compiler(monkeypatch):
    monkeypatch.delattr(marca.compiler, "compile_model", raising=False)
    with pytest.raises(NotImplementedError, match="whole-model compiler"):
        accuracy.iss_model(CHECKPOINT_DIR, "default", prompt_length=4)


def test_iss_row_scores_the_same_segments_and_merges_into_accuracy_json(weights, excerpt, tmp_path):
    """An ISS row (here the float model standing in for the ISS) scores the segments by chunked prefill and
    the float rows on the same segments; a stand-in that loses its states between chunks does not match
    them. merge_rows replaces the preset's row in accuracy.json, keeps the others, recomputes the deltas."""
    import json
    segments = torch.stack([byte_tensor(excerpt[0:600]), byte_tensor(excerpt[2000:2600])])
    prompts = torch.stack([byte_tensor(excerpt[0:32]), byte_tensor(excerpt[600:632])])
    forward = accuracy.float_model(weights)
    reference_text = accuracy.greedy_continuations(forward, prompts)
    row = accuracy.iss_row("default", forward, forward, segments, prompts, reference_text,
                           float_forward=forward, storage_forward=forward, storage_name="bf16")
    assert row["row"] == "ISS default" and row["predicted_bytes"] == 2 * 599 and row["segments"] == 2
    assert row["bits_per_byte"] == pytest.approx(row["same_segments"]["float32"], abs=1e-5)
    assert row["same_segments"]["storage BF16, float32 math"] == row["same_segments"]["float32"]
    assert row["greedy"]["prompts_fully_matched"] == 2 and row["cpu_seconds"] > 0
    forgetful = accuracy.iss_row("default", lambda tokens, states: forward(tokens, None), None, segments,
                                 prompts, reference_text, float_forward=forward)
    assert abs(forgetful["bits_per_byte"] - forgetful["same_segments"]["float32"]) > 1e-2
    assert "greedy" not in forgetful

    previous = {"rows": [{"row": "float32, transformers", "bits_per_byte": 2.5, "delta_vs_float32": 0.0},
                         {"row": "ISS default", "bits_per_byte": None, "not_run": "asked not to"},
                         {"row": "ISS paper", "bits_per_byte": None, "not_run": "asked not to"}],
                "unigram_bits_per_byte": 4.75}
    (tmp_path / "accuracy.json").write_text(json.dumps(previous))
    merged = accuracy.merge_rows(tmp_path, [dict(row, bits_per_byte=2.75)])
    written = json.loads((tmp_path / "accuracy.json").read_text())
    assert written == merged
    assert [r["row"] for r in written["rows"]] == ["float32, transformers", "ISS default", "ISS paper"]
    assert written["rows"][1]["bits_per_byte"] == 2.75
    assert written["rows"][1]["delta_vs_float32"] == pytest.approx(0.25)
    assert written["rows"][2] == previous["rows"][2]
    assert written["rows"][1]["delta_vs_storage_same_segments"] == pytest.approx(
        2.75 - row["same_segments"]["storage BF16, float32 math"])
    assert "ISS default (1,198 bytes) | 2.75000 | +0.25000" in accuracy.markdown_table(written)
    # A row over fewer segments than the file's float rows is compared with float32 on its own segments.
    previous["predicted_bytes"] = 100352
    (tmp_path / "accuracy.json").write_text(json.dumps(previous))
    written = accuracy.merge_rows(tmp_path, [dict(row, bits_per_byte=2.75)])
    assert written["rows"][1]["delta_vs_float32"] == pytest.approx(2.75 - row["same_segments"]["float32"])
