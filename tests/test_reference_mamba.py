"""The float Mamba-1 mixer reference (marca.reference.mamba) against transformers' MambaMixer.

MambaMixer (transformers' pure-PyTorch fallback path, the one used without the mamba_ssm / causal_conv1d
CUDA kernels) is built by hand from a MambaConfig, offline, and loaded with the very same weights. Both run
in float32 on the CPU, so they agree to float32 round-off: the largest difference measured is ~1e-7 of
the largest magnitude, the tolerance is 1e-5 of it, and a 1e-3 perturbation of any one parameter tensor
breaks it (test_a_perturbed_parameter_is_caught).
"""

import dataclasses

import pytest
import torch

from marca.reference.mamba import (
    OPTIONAL_PARAMETER_NAMES,
    PARAMETER_NAMES,
    MambaDims,
    cast_weights,
    dims_from_weights,
    mixer_decode,
    mixer_prefill,
    random_mixer_weights,
    zero_states,
)

# Float32 round-off between two orders of the same arithmetic is ~1e-7 of a tensor's largest magnitude.
TOLERANCE = 1e-5


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal within TOLERANCE relative to each element and to the largest magnitude of ``expected``."""
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(
        actual, expected, rtol=TOLERANCE, atol=TOLERANCE * scale, msg=lambda m: f"{what}: {m}"
    )


def distinguishing_weights(dims: MambaDims, seed: int) -> dict[str, torch.Tensor]:
    """Realistic weights, but with A_log and D varied per channel so a mix-up of channels or states shows,
    and steps delta up to 0.5 (as in trained models) so the scan weighs more in the output."""
    weights = random_mixer_weights(dims, seed=seed, dt_min=1e-2, dt_max=0.5)
    generator = torch.Generator().manual_seed(seed + 1000)
    weights["A_log"] = weights["A_log"] + 0.3 * torch.randn(weights["A_log"].shape, generator=generator)
    weights["D"] = torch.randn(weights["D"].shape, generator=generator)
    return weights


def random_hidden(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# transformers' MambaMixer
# ---------------------------------------------------------------------------------------------------------


def transformers_mixer(dims: MambaDims, weights: dict[str, torch.Tensor]):
    import transformers  # a test dependency (pyproject's `test` extra): missing means a broken set-up
    from transformers.models.mamba.modeling_mamba import MambaMixer

    config = transformers.MambaConfig(
        hidden_size=dims.d_model,
        state_size=dims.d_state,
        conv_kernel=dims.d_conv,
        expand=dims.expand,
        time_step_rank=dims.dt_rank,
        use_bias=dims.bias,
        use_conv_bias=dims.conv_bias,
        hidden_act="silu",
        num_hidden_layers=1,
        vocab_size=8,
    )
    mixer = MambaMixer(config, layer_idx=0).eval()
    mixer.load_state_dict(weights, strict=True)
    return config, mixer


def transformers_cache(config):
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=config)


def cached_states(cache) -> tuple[torch.Tensor, torch.Tensor]:
    return cache.get_conv_state(0, state_idx=0), cache.get_recurrent_state(0, state_idx=0)


SIZES = [
    # (dims, batch, lengths)
    (MambaDims(16, d_state=4), 1, (1, 2, 3, 4, 5, 8)),
    (MambaDims(16, d_state=4, d_conv=3, expand=3, dt_rank=3), 2, (1, 7, 32)),
    (MambaDims(32, d_state=16, bias=True), 3, (1, 9, 32)),
    (MambaDims(32, d_state=8, conv_bias=False), 2, (2, 16)),
    (MambaDims(64), 2, (13, 32)),
    (MambaDims(128, d_state=16), 1, (32,)),
]


def size_id(dims: MambaDims) -> str:
    flags = ("-bias" if dims.bias else "") + ("" if dims.conv_bias else "-noconvbias")
    return f"m{dims.d_model}-n{dims.d_state}-k{dims.d_conv}-e{dims.expand}-r{dims.dt_rank}{flags}"


@pytest.mark.parametrize("dims, batch, lengths", SIZES, ids=[f"{size_id(d)}-b{b}" for d, b, _ in SIZES])
def test_prefill_matches_transformers(dims, batch, lengths):
    weights = distinguishing_weights(dims, seed=dims.d_model + batch)
    config, mixer = transformers_mixer(dims, weights)
    for length in lengths:
        hidden = random_hidden((batch, length, dims.d_model), seed=length)
        with torch.no_grad():
            expected = mixer(hidden)
            cache = transformers_cache(config)
            mixer(hidden, cache=cache)
        expected_conv_state, expected_ssm_state = cached_states(cache)

        out, conv_state, ssm_state = mixer_prefill(weights, hidden)
        assert_matches(out, expected, f"prefill output, L={length}")
        assert_matches(conv_state, expected_conv_state, f"conv state, L={length}")
        assert_matches(ssm_state, expected_ssm_state, f"ssm state, L={length}")

        # Without a batch axis: the same numbers.
        out_single, conv_single, ssm_single = mixer_prefill(weights, hidden[0])
        assert_matches(out_single, expected[0], f"unbatched prefill output, L={length}")
        assert_matches(conv_single, expected_conv_state[0], f"unbatched conv state, L={length}")
        assert_matches(ssm_single, expected_ssm_state[0], f"unbatched ssm state, L={length}")


@pytest.mark.parametrize(
    "dims, prompt_length",
    [(MambaDims(16, d_state=4), 1), (MambaDims(32, bias=True), 5), (MambaDims(64), 3)],
    ids=["m16-prompt1", "m32-bias-prompt5", "m64-prompt3"],
)
def test_decode_matches_transformers_cache(dims, prompt_length):
    """Prefill a prompt, then decode token by token; transformers uses its cache (recurrent) path."""
    batch, steps = 2, 12
    weights = distinguishing_weights(dims, seed=7)
    config, mixer = transformers_mixer(dims, weights)
    hidden = random_hidden((batch, prompt_length + steps, dims.d_model), seed=3)
    cache = transformers_cache(config)
    with torch.no_grad():
        expected_prompt = mixer(hidden[:, :prompt_length], cache=cache)
    out, conv_state, ssm_state = mixer_prefill(weights, hidden[:, :prompt_length])
    assert_matches(out, expected_prompt, "prompt output")
    for step in range(prompt_length, prompt_length + steps):
        with torch.no_grad():
            expected = mixer(hidden[:, step : step + 1], cache=cache)[:, 0]
        out, conv_state, ssm_state = mixer_decode(weights, hidden[:, step], conv_state, ssm_state)
        expected_conv_state, expected_ssm_state = cached_states(cache)
        assert_matches(out, expected, f"decode output, token {step}")
        assert_matches(conv_state, expected_conv_state, f"conv state after token {step}")
        assert_matches(ssm_state, expected_ssm_state, f"ssm state after token {step}")


def perturbed(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    noise = torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(99))
    return {**weights, name: weights[name] + 1e-3 * noise}


@pytest.mark.parametrize("name", PARAMETER_NAMES + OPTIONAL_PARAMETER_NAMES)
def test_a_perturbed_parameter_is_caught(name):
    """The comparison can fail: adding ~1e-3 noise to any one parameter tensor exceeds the tolerance.

    The output alone is a weak witness of the step-size path (D·x dominates it; a 1e-3 change of
    dt_proj.weight moves it by ~1e-7 of its size), which is why every comparison also checks the states.
    """
    dims = MambaDims(32, d_state=8, bias=True)
    weights = distinguishing_weights(dims, seed=5)
    config, mixer = transformers_mixer(dims, weights)
    hidden = random_hidden((2, 8, dims.d_model), seed=11)
    cache = transformers_cache(config)
    with torch.no_grad():
        expected = mixer(hidden, cache=cache)
    _, expected_ssm_state = cached_states(cache)

    def compare(candidate_weights, what):
        out, _, ssm_state = mixer_prefill(candidate_weights, hidden)
        assert_matches(out, expected, f"{what} output")
        assert_matches(ssm_state, expected_ssm_state, f"{what} ssm state")

    compare(weights, "unperturbed")
    with pytest.raises(AssertionError):
        compare(perturbed(weights, name), f"perturbed {name}")


# ---------------------------------------------------------------------------------------------------------
# Self-consistency: decode, chunked prefill, precision
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dims", [MambaDims(16, d_state=4), MambaDims(32, d_conv=3, bias=True), MambaDims(64)], ids=size_id
)
def test_chained_decode_equals_prefill(dims):
    length = 20
    weights = distinguishing_weights(dims, seed=2)
    hidden = random_hidden((2, length, dims.d_model), seed=4)
    expected, expected_conv_state, expected_ssm_state = mixer_prefill(weights, hidden)
    conv_state, ssm_state = zero_states(weights, batch_size=2)
    outputs = []
    for t in range(length):
        out, conv_state, ssm_state = mixer_decode(weights, hidden[:, t], conv_state, ssm_state)
        outputs.append(out)
    assert_matches(torch.stack(outputs, dim=1), expected, "chained decode vs prefill")
    assert_matches(conv_state, expected_conv_state, "conv state")
    assert_matches(ssm_state, expected_ssm_state, "ssm state")


def test_chunked_prefill_equals_prefill():
    dims = MambaDims(32, d_state=8)
    weights = distinguishing_weights(dims, seed=3)
    hidden = random_hidden((27, dims.d_model), seed=6)
    expected, expected_conv_state, expected_ssm_state = mixer_prefill(weights, hidden)
    conv_state, ssm_state = zero_states(weights)
    outputs = []
    for start, stop in ((0, 2), (2, 11), (11, 12), (12, 27)):
        out, conv_state, ssm_state = mixer_prefill(weights, hidden[start:stop], conv_state, ssm_state)
        outputs.append(out)
    assert_matches(torch.cat(outputs), expected, "chunked prefill vs prefill")
    assert_matches(conv_state, expected_conv_state, "conv state")
    assert_matches(ssm_state, expected_ssm_state, "ssm state")


def test_decode_that_forgets_the_conv_state_is_caught():
    """Chained decode with the conv state dropped each step (a plausible hardware bug) must not pass."""
    dims = MambaDims(16, d_state=4)
    weights = distinguishing_weights(dims, seed=8)
    hidden = random_hidden((10, dims.d_model), seed=9)
    expected, _, _ = mixer_prefill(weights, hidden)
    conv_state, ssm_state = zero_states(weights)
    outputs = []
    for t in range(10):
        out, _, ssm_state = mixer_decode(weights, hidden[t], torch.zeros_like(conv_state), ssm_state)
        outputs.append(out)
    with pytest.raises(AssertionError):
        assert_matches(torch.stack(outputs), expected, "decode without conv state")


def test_float32_agrees_with_float64():
    dims = MambaDims(64)
    weights = distinguishing_weights(dims, seed=4)
    hidden = random_hidden((2, 32, dims.d_model), seed=10)
    out32, conv32, ssm32 = mixer_prefill(weights, hidden)
    out64, conv64, ssm64 = mixer_prefill(cast_weights(weights, dtype=torch.float64), hidden.double())
    assert out64.dtype == ssm64.dtype == torch.float64
    assert_matches(out32.double(), out64, "float32 vs float64 output")
    assert_matches(ssm32.double(), ssm64, "float32 vs float64 ssm state")
    assert_matches(conv32.double(), conv64, "float32 vs float64 conv state")


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 6e-2), (torch.float16, 1e-2)])
def test_low_precision_dtypes_run_close_to_float64(dtype, tolerance):
    dims = MambaDims(32, d_state=8)
    weights = distinguishing_weights(dims, seed=4)
    hidden = random_hidden((16, dims.d_model), seed=12)
    low = cast_weights(weights, dtype=dtype)
    out, conv_state, ssm_state = mixer_prefill(low, hidden.to(dtype))
    assert out.dtype == conv_state.dtype == ssm_state.dtype == dtype
    out64, _, _ = mixer_prefill(cast_weights(low, dtype=torch.float64), hidden.to(dtype).double())
    relative_error = (out.double() - out64).abs().max() / out64.abs().max()
    assert relative_error < tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    dims = MambaDims(64)
    weights = distinguishing_weights(dims, seed=4)
    hidden = random_hidden((2, 16, dims.d_model), seed=13)
    expected = mixer_prefill(weights, hidden)
    cuda_weights = cast_weights(weights, device="cuda")
    actual = mixer_prefill(cuda_weights, hidden.cuda())
    assert actual[0].device.type == "cuda"
    for got, want, what in zip(actual, expected, ("output", "conv state", "ssm state"), strict=True):
        assert_matches(got.cpu(), want, f"CUDA {what}")
    out, _, _ = mixer_decode(cuda_weights, hidden[:, 0].cuda(), *zero_states(cuda_weights, batch_size=2))
    assert_matches(out.cpu(), expected[0][:, 0], "CUDA decode")


# ---------------------------------------------------------------------------------------------------------
# Initialisation and argument checks
# ---------------------------------------------------------------------------------------------------------


def test_random_weights_look_like_a_fresh_mamba_mixer():
    dims = MambaDims(64, bias=True)
    weights = random_mixer_weights(dims, seed=1)
    assert dims_from_weights(weights) == dims
    assert {name: tuple(value.shape) for name, value in weights.items()} == dims.parameter_shapes()
    assert dims.dt_rank == 4 and dims.d_inner == 128
    assert torch.equal(weights["A_log"][5], torch.log(torch.arange(1.0, 17.0, dtype=torch.float64)).float())
    assert torch.equal(weights["D"], torch.ones(128))
    step = torch.nn.functional.softplus(weights["dt_proj.bias"].double())
    assert 1e-3 * 0.999 <= step.min() and step.max() <= 1e-1 * 1.001
    assert weights["in_proj.weight"].abs().max() <= 64**-0.5
    assert all(torch.equal(weights[n], random_mixer_weights(dims, seed=1)[n]) for n in weights)
    assert not torch.equal(weights["x_proj.weight"], random_mixer_weights(dims, seed=2)["x_proj.weight"])
    half = random_mixer_weights(dims, seed=1, dtype=torch.float16)
    assert half["in_proj.weight"].dtype == torch.float16
    assert torch.equal(half["x_proj.weight"], weights["x_proj.weight"].half())


def test_dims_validation():
    assert MambaDims(40).dt_rank == 3
    with pytest.raises(ValueError, match="d_model"):
        MambaDims(0)
    with pytest.raises(ValueError, match="dt_rank"):
        MambaDims(16, dt_rank="wide")
    with pytest.raises(ValueError, match="bias"):
        MambaDims(16, bias=1)
    with pytest.raises(ValueError, match="dims"):
        random_mixer_weights(16)
    with pytest.raises(ValueError, match="dtype"):
        random_mixer_weights(MambaDims(16), dtype=torch.int32)


def test_argument_validation():
    dims = MambaDims(16, d_state=4)
    weights = random_mixer_weights(dims)
    with pytest.raises(ValueError, match="hidden"):
        mixer_prefill(weights, torch.zeros(3, 15))
    with pytest.raises(ValueError, match="hidden"):
        mixer_prefill(weights, torch.zeros(0, 16))
    with pytest.raises(ValueError, match="hidden"):
        mixer_prefill(weights, torch.zeros(3, 16, dtype=torch.float64))
    conv_state, ssm_state = zero_states(weights, batch_size=2)
    with pytest.raises(ValueError, match="conv_state"):
        mixer_decode(weights, torch.zeros(16), conv_state, ssm_state[0])
    with pytest.raises(ValueError, match="ssm_state"):
        mixer_decode(weights, torch.zeros(2, 16), conv_state, ssm_state[:, :, :3])
    with pytest.raises(ValueError, match="together"):
        mixer_prefill(weights, torch.zeros(3, 16), conv_state=conv_state[0])
    with pytest.raises(ValueError, match="hidden_token"):
        mixer_decode(weights, torch.zeros(1, 2, 16), conv_state, ssm_state)
    with pytest.raises(ValueError, match="x_proj.weight"):
        mixer_prefill({**weights, "x_proj.weight": weights["x_proj.weight"][:-1]}, torch.zeros(3, 16))
    with pytest.raises(ValueError, match="A_log"):
        dims_from_weights({n: v for n, v in weights.items() if n != "A_log"})
    with pytest.raises(ValueError, match="D"):
        mixer_prefill({**weights, "D": weights["D"].double()}, torch.zeros(3, 16))
    with pytest.raises(ValueError, match="out_proj.bias"):
        dims_from_weights({**weights, "in_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match="unexpected"):
        dims_from_weights({**weights, "norm.weight": torch.zeros(16)})
    assert dataclasses.replace(dims, bias=True).parameter_shapes()["out_proj.bias"] == (16,)


def test_processor_benchmark_measures_a_small_size():
    """Keeps bench/processor.py working (its figures come from ``marca bench``, not from tests)."""
    from marca.bench.processor import _measure

    row = _measure(64, 8, torch.device("cpu"))
    assert row["prefill_tokens_per_s"] > 0 and row["decode_us_per_token"] > 0
    assert row["vectorised_scan_max_relative_difference"] < 1e-5
    fractions = row["fraction_linear"] + row["fraction_scan"] + row["fraction_other_elementwise"]
    assert fractions == pytest.approx(1.0)
