"""How fast a processor runs one Mamba-1 mixer in PyTorch: the baseline the accelerator is measured against.

For a few sizes (``d_model`` 64, 256, 768 with ``d_state = 16``, ``d_conv = 4``, ``expand = 2``; ``L`` 128 to
2048 tokens, batch 1, float32) it measures, on the CPU with one thread and with PyTorch's default thread
count, and on CUDA when ``torch.cuda.is_available()``:

- prefill throughput (tokens/s) of :func:`marca.reference.mamba.mixer_prefill`, whose scan is the plain
  per-token loop the hardware steps through;
- prefill throughput with a vectorised scan (transformers' slow path: the decays ``exp(delta*A)`` and the
  inputs ``delta*B*x`` of every token at once, a one-operation recurrence per token, then every token's
  ``h @ C`` as one batched product) -- a fairer processor baseline, checked against the reference;
- decode latency per token of :func:`marca.reference.mamba.mixer_decode`, chained steps with states;
- where prefill time goes: each piece of the mixer timed alone, grouped as *linear* (in_proj, x_proj,
  dt_proj, out_proj), *scan* (the selective scan: element-wise work plus the reduction over d_state) and
  *other element-wise* (convolution, SiLU, softplus, gate).

Run: ``python -m marca.bench.processor [out_dir] [--models] [--sizes 370m,790m] [--no-bf16] [--cuda]`` or
through ``marca bench``; writes ``processor.json``. ``--models``: the whole-model rows only; ``--sizes``:
those model sizes only; ``--no-bf16``: no CPU bfloat16 rows; ``--cuda``: the CUDA rows alone.
"""

import json
import os
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F

from marca.reference.mamba import (
    MambaDims,
    causal_conv,
    in_projection,
    mixer_decode,
    mixer_prefill,
    output_projection,
    random_mixer_weights,
    selective_scan,
    ssm_parameters,
    state_matrix,
    zero_states,
)

__all__ = ["run", "SIZES", "vectorised_scan", "MODEL_SIZES", "CPU_BF16_SIZES", "cpu_model_sizes", "measure_model",
           "model_rows", "model_parameters"]

#: (d_model, sequence lengths) measured; batch 1, float32.
SIZES = ((64, (128, 512, 2048)), (256, (128, 512, 2048)), (768, (128, 512, 2048)))
DECODE_STEPS = 32
LINEAR_PIECES = ("in_proj", "x_proj", "dt_proj", "out_proj")
SCAN_PIECES = ("scan",)
ELEMENTWISE_PIECES = ("conv", "silu", "softplus", "gate")


def vectorised_scan(x, delta, A, B, C, D, ssm_state):
    """The selective scan of :func:`marca.reference.mamba.selective_scan`, with all element-wise work
    outside the recurrence done for every token at once; same arguments and results."""
    decay = torch.exp(delta[..., None] * A)  # [B, L, d_inner, d_state]
    inputs = (delta[..., None] * B[..., None, :]) * x[..., None]
    states = torch.empty_like(decay)
    state = ssm_state
    for t in range(x.shape[-2]):
        state = torch.addcmul(inputs[..., t, :, :], decay[..., t, :, :], state)
        states[..., t, :, :] = state
    y = (states @ C[..., None])[..., 0] + D * x
    return y, state


def _prefill_with_vectorised_scan(weights, hidden):
    """:func:`marca.reference.mamba.mixer_prefill` (from zero states, batched) with the scan swapped."""
    x, z = in_projection(weights, hidden)
    conv_state, ssm_state = zero_states(weights, hidden.shape[0])
    x = F.silu(causal_conv(weights, x, conv_state)[0])
    delta, B, C = ssm_parameters(weights, x)
    y, _ = vectorised_scan(x, delta, state_matrix(weights), B, C, weights["D"], ssm_state)
    return output_projection(weights, y, z)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device, clock, *, min_repeats=3, min_seconds=0.3, max_repeats=20) -> float:
    """Shortest time of ``fn()`` on ``clock`` over several calls after one warm-up call.

    The shortest, not the median: these machines are shared, and other processes only ever add time, so
    the best of several runs is the closest to what the processor does on its own (as timeit advises).
    """
    fn()
    _synchronize(device)
    times = []
    while len(times) < min_repeats or (sum(times) < min_seconds and len(times) < max_repeats):
        start = clock()
        fn()
        _synchronize(device)
        times.append(clock() - start)
    return min(times)


def _piece_times(weights, hidden, device, clock) -> dict[str, float]:
    """Each piece of the prefill timed alone on inputs computed beforehand (same functions and order)."""
    W = weights
    d_state = W["A_log"].shape[-1]
    dt_rank = W["dt_proj.weight"].shape[-1]
    x, z = in_projection(W, hidden)
    conv_state, ssm_state = zero_states(W, hidden.shape[0])
    conv_out, _ = causal_conv(W, x, conv_state)
    x_act = F.silu(conv_out)
    dt, B, C = (x_act @ W["x_proj.weight"].T).split([dt_rank, d_state, d_state], -1)
    dt_pre = dt @ W["dt_proj.weight"].T + W["dt_proj.bias"]
    delta = F.softplus(dt_pre)
    A = state_matrix(W)
    y, _ = selective_scan(x_act, delta, A, B, C, W["D"], ssm_state)
    gated = y * F.silu(z)
    pieces = {
        "in_proj": lambda: in_projection(W, hidden),
        "conv": lambda: causal_conv(W, x, conv_state),
        "silu": lambda: F.silu(conv_out),
        "x_proj": lambda: x_act @ W["x_proj.weight"].T,
        "dt_proj": lambda: dt @ W["dt_proj.weight"].T + W["dt_proj.bias"],
        "softplus": lambda: F.softplus(dt_pre),
        "scan": lambda: selective_scan(x_act, delta, A, B, C, W["D"], ssm_state),
        "gate": lambda: y * F.silu(z),
        "out_proj": lambda: gated @ W["out_proj.weight"].T,
    }
    return {
        name: _best_seconds(fn, device, clock, min_repeats=2, min_seconds=0.05) for name, fn in pieces.items()
    }


def _measure(d_model: int, length: int, device: torch.device, clock=time.perf_counter, seed: int = 0) -> dict:
    dims = MambaDims(d_model)
    weights = random_mixer_weights(dims, seed=seed, device=device)
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn((1, length, d_model), generator=generator).to(device)
    decode_hidden = torch.randn((1, 16 + DECODE_STEPS, d_model), generator=generator).to(device)

    with torch.inference_mode():
        prefill_s = _best_seconds(lambda: mixer_prefill(weights, hidden), device, clock)
        vectorised_s = _best_seconds(lambda: _prefill_with_vectorised_scan(weights, hidden), device, clock)
        reference_out = mixer_prefill(weights, hidden)[0]
        vectorised_out = _prefill_with_vectorised_scan(weights, hidden)
        scale = reference_out.abs().max().item()
        vectorised_error = (vectorised_out - reference_out).abs().max().item() / scale
        if vectorised_error > 1e-4:
            raise AssertionError(f"vectorised scan differs from the reference by {vectorised_error:.2e}")

        pieces = _piece_times(weights, hidden, device, clock)

        # Decode continues a 16-token prompt.
        _, conv_state, ssm_state = mixer_prefill(weights, decode_hidden[:, :16])
        tokens = decode_hidden[:, 16:]

        def decode_steps():
            c, s = conv_state, ssm_state
            for t in range(tokens.shape[1]):
                _, c, s = mixer_decode(weights, tokens[:, t], c, s)

        decode_s = _best_seconds(decode_steps, device, clock, min_seconds=0.2) / tokens.shape[1]

    total = sum(pieces.values())
    linear = sum(pieces[p] for p in LINEAR_PIECES)
    scan = sum(pieces[p] for p in SCAN_PIECES)
    elementwise = sum(pieces[p] for p in ELEMENTWISE_PIECES)
    return {
        "d_model": d_model,
        "d_inner": dims.d_inner,
        "d_state": dims.d_state,
        "length": length,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": length / prefill_s,
        "prefill_vectorised_scan_s": vectorised_s,
        "prefill_vectorised_scan_tokens_per_s": length / vectorised_s,
        "vectorised_scan_max_relative_difference": vectorised_error,
        "decode_us_per_token": decode_s * 1e6,
        "piece_s": pieces,
        "pieces_total_s": total,
        "fraction_linear": linear / total,
        "fraction_scan": scan / total,
        "fraction_other_elementwise": elementwise / total,
        "fraction_elementwise_with_scan": (scan + elementwise) / total,
    }


#: Released Mamba-1 sizes for the whole-model rows (d_model, layers); vocab 50,280, d_state 16.
MODEL_SIZES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}
#: CPU whole-model rows: every size whose weights fit this machine's memory (:func:`cpu_model_sizes`), in
#: float32; bfloat16 for these sizes only (this CPU has no bf16 instructions, AVX2 only; with torch 2.13 the
#: bf16 rows ran as fast as float32 on a quiet machine, docs/performance.md).
CPU_BF16_SIZES = ("130m", "370m")
MODEL_PREFILL_TOKENS = 512
MODEL_DECODE_TOKENS = 16


def measure_model(size: str, device: torch.device, dtype: torch.dtype, clock=time.perf_counter) -> dict:
    """transformers' ``MambaForCausalLM`` at a released size (random weights: timing does not depend on the
    values): prefill tokens/s of a 512-token prompt (one forward pass, batch 1) and decode tokens/s (greedy
    ``generate`` of 16 tokens after a 16-token prompt, minus that prompt's forward pass)."""
    from transformers import MambaConfig, MambaForCausalLM
    d_model, layers = MODEL_SIZES[size]
    config = MambaConfig(hidden_size=d_model, num_hidden_layers=layers, vocab_size=50280, state_size=16,
                         expand=2, conv_kernel=4)
    torch.manual_seed(0)
    with torch.device(device):          # initialised where it runs (a 2.8b model: seconds, not minutes)
        model = MambaForCausalLM(config).to(dtype=dtype).eval()
    prompt = torch.randint(0, 50280, (1, MODEL_PREFILL_TOKENS), device=device)
    short = prompt[:, :16]
    # The best of two timed runs after a warm-up; one for the sizes above 370m on the CPU (minutes each).
    repeats = 1 if device.type == "cpu" and d_model > 1024 else 2
    with torch.inference_mode():
        prefill_s = _best_seconds(lambda: model(prompt), device, clock, min_repeats=repeats, min_seconds=0.1,
                                  max_repeats=3)
        short_s = _best_seconds(lambda: model(short), device, clock, min_repeats=repeats, min_seconds=0.1,
                                max_repeats=3)
        generate_s = _best_seconds(
            lambda: model.generate(short, max_new_tokens=MODEL_DECODE_TOKENS, min_new_tokens=MODEL_DECODE_TOKENS,
                                   do_sample=False, pad_token_id=0), device, clock, min_repeats=repeats,
            min_seconds=0.1, max_repeats=3)
    decode_s = max(generate_s - short_s, 1e-9) / MODEL_DECODE_TOKENS
    return {"size": size, "d_model": d_model, "layers": layers, "dtype": str(dtype).replace("torch.", ""),
            "device": device.type, "prefill_tokens": MODEL_PREFILL_TOKENS,
            "prefill_tokens_per_s": MODEL_PREFILL_TOKENS / prefill_s,
            "decode_tokens_per_s": 1.0 / decode_s, "parameters": sum(p.numel() for p in model.parameters())}


def _available_memory_bytes() -> int:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def model_parameters(size: str) -> int:
    """Parameters of the released size (transformers' MambaForCausalLM, tied embedding), from shapes."""
    d_model, layers = MODEL_SIZES[size]
    d_inner, d_state, rank = 2 * d_model, 16, -(-d_model // 16)
    layer = (d_model * 2 * d_inner + d_inner * 4 + d_inner + d_inner * (rank + 2 * d_state) + rank * d_inner
             + d_inner + d_inner * d_state + d_inner + d_inner * d_model + d_model)
    return 50280 * d_model + layers * layer + d_model


def cpu_model_sizes(bytes_per_parameter: int = 4, headroom: float = 1.5) -> tuple[list[str], dict]:
    """(sizes that fit, {size: why not} for the others): a size fits when ``headroom`` x its weights fit the
    memory available now (the model, its activations and the allocator's slack)."""
    available = _available_memory_bytes()
    fits, skipped = [], {}
    for size in MODEL_SIZES:
        need = model_parameters(size) * bytes_per_parameter * headroom
        if need <= available:
            fits.append(size)
        else:
            skipped[size] = f"needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
    return fits, skipped


def model_rows(sizes=None, on_row=None, bf16: bool = True, cpu: bool = True) -> list[dict]:
    """Whole-model rows: CPU one thread (float32 for every size of ``sizes`` (default all) that fits memory,
    bfloat16 for :data:`CPU_BF16_SIZES` unless ``bf16`` is false; none when ``cpu`` is false), CUDA when
    present (those sizes, bf16 and fp32)."""
    rows = []
    default_threads = torch.get_num_threads()
    fits, skipped = cpu_model_sizes() if cpu else ([], {})
    for size, why in skipped.items():
        if sizes and size not in sizes:
            continue
        rows.append({"target": "cpu-1thread", "size": size, "dtype": "float32", "skipped": why})
        print(f"model {size} cpu-1thread fp32: not measured ({why})", flush=True)
    try:
        torch.set_num_threads(1)
        # Smallest first, bf16 beside its fp32 row; ``on_row`` sees the rows so far after each one.
        plan = []
        for size in (size for size in fits if not sizes or size in sizes):
            plan.append((size, torch.float32))
            if bf16 and size in CPU_BF16_SIZES:
                plan.append((size, torch.bfloat16))
        for size, dtype in plan:
            row = {"target": "cpu-1thread", **measure_model(size, torch.device("cpu"), dtype, time.thread_time)}
            rows.append(row)
            if on_row:
                on_row(rows)
            print(f"model {size} cpu-1thread {row['dtype']}: prefill {row['prefill_tokens_per_s']:,.1f} tok/s, "
                  f"decode {row['decode_tokens_per_s']:,.2f} tok/s", flush=True)
    finally:
        torch.set_num_threads(default_threads)
    if torch.cuda.is_available():
        for size in (size for size in MODEL_SIZES if not sizes or size in sizes):
            for dtype in (torch.bfloat16, torch.float32):
                row = {"target": "cuda", "cuda_device": torch.cuda.get_device_name(),
                       **measure_model(size, torch.device("cuda"), dtype)}
                rows.append(row)
                if on_row:
                    on_row(rows)
                print(f"model {size} cuda {row['dtype']}: prefill {row['prefill_tokens_per_s']:,.0f} tok/s, "
                      f"decode {row['decode_tokens_per_s']:,.1f} tok/s", flush=True)
    else:
        rows.append({"target": "cuda", "skipped": "no CUDA device (torch.cuda.is_available() is false)"})
    return rows


def _processor_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _targets():
    """(label, device, threads, clock name) to measure: CPU single-threaded, CPU default, CUDA if present.

    Single-threaded CPU work runs entirely in the calling thread, so its thread CPU time is what it
    costs, however busy the machine is; several threads or a GPU need wall-clock time.
    """
    default_threads = torch.get_num_threads()
    targets = [("cpu-1thread", torch.device("cpu"), 1, "thread_time")]
    if default_threads != 1:
        label = f"cpu-{default_threads}threads"
        targets.append((label, torch.device("cpu"), default_threads, "perf_counter"))
    if torch.cuda.is_available():
        targets.append(("cuda", torch.device("cuda"), default_threads, "perf_counter"))
    return targets, default_threads


def run(out_dir: pathlib.Path, *, models_only: bool = False, sizes=None, bf16: bool = True,
        cuda_only: bool = False) -> dict:
    """Measure, print a table, write ``out_dir/processor.json`` and return what it holds (``models_only``:
    the whole-model rows only, ``python -m marca.bench.processor OUT --models``; ``sizes``: those model sizes
    only, ``--sizes 370m,790m``; ``bf16=False``: no CPU bfloat16 rows, ``--no-bf16``; ``cuda_only``: the CUDA
    rows alone, ``--cuda``, an error without a CUDA device)."""
    if cuda_only and not torch.cuda.is_available():
        raise ValueError("--cuda: no CUDA device (torch.cuda.is_available() is false)")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets, default_threads = _targets()
    if cuda_only:
        targets = [target for target in targets if target[0] == "cuda"]
    # Other processes on the machine skew CPU timings; the load average before and after says how much.
    load_before = os.getloadavg()[0]
    results = []
    started = time.perf_counter()
    header = (
        f"{'target':<14} {'d_model':>7} {'L':>5} {'prefill tok/s':>13} {'vec-scan tok/s':>14} "
        f"{'decode us/tok':>13} {'linear':>7} {'scan':>6} {'elem':>6}"
    )
    print(header)
    print("-" * len(header))
    try:
        for label, device, threads, clock_name in ([] if models_only else targets):
            torch.set_num_threads(threads)
            for d_model, lengths in SIZES:
                for length in lengths:
                    row = {"target": label, "device": device.type, "threads": threads, "clock": clock_name}
                    row.update(_measure(d_model, length, device, getattr(time, clock_name)))
                    results.append(row)
                    print(
                        f"{label:<14} {d_model:>7} {length:>5} {row['prefill_tokens_per_s']:>13.0f} "
                        f"{row['prefill_vectorised_scan_tokens_per_s']:>14.0f} "
                        f"{row['decode_us_per_token']:>13.0f} "
                        f"{row['fraction_linear']:>7.0%} {row['fraction_scan']:>6.0%} "
                        f"{row['fraction_other_elementwise']:>6.0%}",
                        flush=True,
                    )
    finally:
        torch.set_num_threads(default_threads)
    def partial(rows):
        (out_dir / "processor.json").write_text(json.dumps({"benchmark": "processor", "partial": True,
                                                            "models": rows, "processor": _processor_name(),
                                                            "torch": torch.__version__}, indent=2) + "\n")
    models = model_rows(sizes, on_row=partial, bf16=bf16, cpu=not cuda_only)
    report = {
        "benchmark": "processor",
        "models": models,
        "what": "Mamba-1 mixer (marca.reference.mamba), batch 1, float32, d_state 16, d_conv 4, expand 2",
        "torch": torch.__version__,
        "processor": _processor_name(),
        "cpu_count": default_threads,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "decode_steps_timed": DECODE_STEPS,
        "pieces": {"linear": LINEAR_PIECES, "scan": SCAN_PIECES, "other_elementwise": ELEMENTWISE_PIECES},
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    (out_dir / "processor.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"({report['processor']}, {default_threads} threads by default, torch {torch.__version__}, "
        f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}, {report['wall_s']:.0f} s)"
    )
    return report


if __name__ == "__main__":
    from marca.bench import command_line
    argv = command_line(__doc__, ("--models", "--sizes", "--no-bf16", "--cuda"))
    sizes = argv[argv.index("--sizes") + 1].split(",") if "--sizes" in argv else None
    unknown = sorted(set(sizes or ()) - set(MODEL_SIZES))
    if unknown:
        print(f"unknown size(s) {', '.join(unknown)}; known: {', '.join(MODEL_SIZES)}", file=sys.stderr)
        raise SystemExit(2)
    arguments = [a for a in argv if not a.startswith("--") and (sizes is None or a != argv[argv.index("--sizes") + 1])]
    run(pathlib.Path(arguments[0] if arguments else "build/bench"), models_only="--models" in argv, sizes=sizes,
        bf16="--no-bf16" not in argv, cuda_only="--cuda" in argv)
