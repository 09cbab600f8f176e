"""``make sim``: a small Mamba language model generating text on the generated accelerator, in Verilator.

    python -m marca.demo [--config demo|PRESET|config.json] [--checkpoint DIR] [--prompt TEXT]
                         [--tokens 4] [--pause 0] [--out build/demo]
    python -m marca.demo --mixer [--d-model 32] [--d-state 16] [--tokens 16] ...   one mixer (the older demo)

The model demo (docs/model.md): the byte-level Shakespeare Mamba shipped in reference/checkpoints (d_model
128, 4 layers, vocabulary 256; or ``--checkpoint DIR``) is compiled for the configuration
(``marca.compiler.compile_model``: a prefill of the prompt and a decode step in one memory image), the
prompt is prefilled and ``--tokens`` tokens are generated greedily **on the RTL** (cocotbext-axi memory
behind the AXI4 master, one simulator run per step, the states carried from step to step in memory). After
every step the RTL's whole memory image and counters are checked bit for bit against the golden ISS running
the same step, and the logits against transformers' MambaForCausalLM in float64. Prints the text as it is
generated, then cycles per token (prefill, decode), PE utilization per operation class, DRAM traffic per
token and the agreement with the float reference; writes ``<out>/demo.json``.

The mixer demo (``--mixer``), step by step (docs/mamba.md):

1. draws random mixer weights (``marca.reference.mamba.random_mixer_weights``, initialised like a fresh
   transformers ``MambaMixer``) and ``--tokens`` random input tokens;
2. compiles a prefill of those tokens and a decode step (``marca.compiler``);
3. builds the accelerator's Verilog for the configuration in Verilator (once; cached in build/sim/);
4. runs the prefill, then a chain of decode steps over the same tokens, on the RTL;
5. checks every run against the golden instruction-set simulator (whole memory image and deterministic
   counters bit for bit) and the decode chain against the prefill (bit for bit);
6. prints the error against the float reference, cycles, cycles per token, PE utilization per operation
   class, DRAM traffic and where the cycles go, and writes it all to ``<out>/demo.json``.

The default configuration ``demo`` is the 4 x 4 BF16 array with a 256-bit bus of bench/accelerator.py
(same Verilog, so one build serves both): the DEFAULT preset's 8 x 8 FP32 array takes ~2 min to emit and
8-25 min to build in Verilator on a 2-core machine (measured, docs/mamba.md), too long for a first run.
``--config default`` runs it anyway.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from marca.bench.accelerator import BENCH_CONFIG

__all__ = ["DEMO_CONFIG", "DEMO_CHECKPOINT", "main", "print_report", "resolve_config", "run_demo",
           "run_model_demo"]


# The benchmark's configuration, imported so that the demo and ``marca bench accelerator`` share one build.
DEMO_CONFIG = BENCH_CONFIG
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "reference" / "checkpoints" / "shakespeare-mamba"


def run_model_demo(config, *, checkpoint=DEMO_CHECKPOINT, prompt: str = "ROMEO:", tokens: int = 4,
                   pause: float = 0.0, seed: int = 1) -> dict:
    """Generate ``tokens`` tokens after ``prompt`` on the RTL, each step checked against the ISS and the
    float64 reference; returns the report."""
    import torch

    from marca.compiler import compile_model
    from marca.generate import _float_model, load_checkpoint
    from marca.golden.iss import COUNTER_NAMES
    from marca.tb.model import RtlModelSession
    from marca.tb.mamba import build_accelerator
    torch.set_num_threads(1)
    started = time.perf_counter()
    state, mamba_config, tokenizer = load_checkpoint(checkpoint)
    ids = tokenizer.encode(prompt)
    compiled = compile_model(state, mamba_config, config, prompt_length=len(ids))
    reference = _float_model(state, mamba_config)
    print(f"compiled {compiled.shape.layers} layers, d_model {compiled.shape.d_model}: prefill "
          f"{len(compiled.programs['prefill'].instructions)} instructions, decode step "
          f"{len(compiled.programs['decode'].instructions)}; memory image {compiled.memory_size / 1024:.0f} KiB "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    print("building the accelerator in Verilator (cached after the first time; a few minutes) ...", flush=True)
    build_accelerator(config)
    rtl, iss = RtlModelSession(compiled, pause=pause, seed=seed), compiled.session()
    decode = tokenizer.decoder()
    sequence, text, agree, delta = list(ids), "", [], 0.0
    print(f"\n{prompt}", end="", flush=True)
    for step in range(tokens):
        if step == 0:
            logits, golden = rtl.prefill(ids)[-1], iss.prefill(ids)[-1]
        else:
            logits, golden = rtl.decode(sequence[-1])[-1], iss.decode(sequence[-1])[-1]
        image = iss.memory                     # the ISS machine's whole image, read once
        if rtl.memory != image:
            wrong = next(k for k in range(len(image)) if rtl.memory[k] != image[k])
            raise AssertionError(f"step {step}: the RTL's memory differs from the ISS's at {wrong:#x}")
        for name in COUNTER_NAMES:
            if rtl.steps[-1][name] != iss.steps[-1][name]:
                raise AssertionError(f"step {step}: counter {name}: RTL {rtl.steps[-1][name]}, "
                                     f"ISS {iss.steps[-1][name]}")
        with torch.no_grad():
            expected = reference(torch.tensor([sequence])).logits[0, -1]
        agree.append(int(torch.argmax(logits)) == int(torch.argmax(expected)))
        delta = max(delta, float((logits - expected).abs().max()))
        token = int(torch.argmax(logits))
        sequence.append(token)
        piece = decode(token)
        text += piece
        print(piece, end="", flush=True)
    print("\n")
    prefill, decodes = rtl.steps[0], rtl.steps[1:]

    def per_token(step, name):
        return step[name] / step["tokens"]

    def utilization(steps):
        cycles = sum(s["cycles"] for s in steps)
        return {kind: sum(s[f"{kind}_beats"] for s in steps) / max(1, cycles)
                for kind in ("linear", "elementwise", "nonlinear")}

    from marca import perf

    def bounds(steps):
        """Fraction of ideal (array beats / cycles) and of the DRAM bound (max(bytes read with the
        instruction fetch, bytes written) at one bus beat per cycle / cycles) over ``steps``."""
        cycles = max(1, sum(s["cycles"] for s in steps))
        beats = sum(s["linear_beats"] + s["elementwise_beats"] + s["nonlinear_beats"] for s in steps)
        dram = sum(perf.dram_bound_cycles(config, s) for s in steps)
        return {"fraction_of_ideal": beats / cycles, "fraction_of_dram_bound": dram / cycles}
    report = {"checkpoint": str(checkpoint), "config": config.name, "prompt": prompt, "generated": text,
              "prompt_tokens": len(ids), "tokens": tokens, "pause": pause,
              "prefill_cycles_per_token": per_token(prefill, "cycles"),
              "decode_cycles_per_token": (sum(s["cycles"] for s in decodes) / len(decodes)) if decodes else None,
              "dram_bytes_per_token": {"prefill": (prefill["dma_bytes_read"] + prefill["dma_bytes_written"])
                                       / prefill["tokens"],
                                       "decode": (sum(s["dma_bytes_read"] + s["dma_bytes_written"] for s in decodes)
                                                  / len(decodes)) if decodes else None},
              "pe_utilization": {"prefill": utilization([prefill]), "decode": utilization(decodes or [prefill])},
              "bounds": {"prefill": bounds([prefill]), "decode": bounds(decodes or [prefill])},
              "top1_agreement_with_float64": sum(agree) / len(agree), "max_abs_logit_difference": delta,
              "clock_mhz": config.fpga_clock_mhz, "seconds": time.perf_counter() - started,
              "rtl_equals_iss": True, "steps": rtl.steps}
    return report


def print_model_report(report: dict) -> None:
    use = report["pe_utilization"]
    print(f"every step: RTL memory image and counters = golden ISS, bit for bit (AXI pause {report['pause']})")
    bounds = report["bounds"]

    def fractions(kind):
        return (f"{bounds[kind]['fraction_of_ideal']:.1%} of ideal, "
                f"{bounds[kind]['fraction_of_dram_bound']:.1%} of the DRAM bound")
    print(f"prefill: {report['prefill_cycles_per_token']:.0f} cycles/token ({fractions('prefill')}), "
          f"DRAM {report['dram_bytes_per_token']['prefill']:.0f} B/token, PE utilization linear "
          f"{use['prefill']['linear']:.1%} element-wise {use['prefill']['elementwise']:.1%} nonlinear "
          f"{use['prefill']['nonlinear']:.1%}")
    if report["decode_cycles_per_token"] is not None:
        print(f"decode:  {report['decode_cycles_per_token']:.0f} cycles/token "
              f"({report['clock_mhz'] * 1e6 / report['decode_cycles_per_token']:.1f} tokens/s at "
              f"{report['clock_mhz']:g} MHz; {fractions('decode')}), "
              f"DRAM {report['dram_bytes_per_token']['decode']:.0f} B/token, "
              f"PE utilization linear {use['decode']['linear']:.1%} element-wise {use['decode']['elementwise']:.1%} "
              f"nonlinear {use['decode']['nonlinear']:.1%}")
    print(f"float64 reference: greedy top-1 agreement {report['top1_agreement_with_float64']:.0%}, "
          f"max |dlogit| {report['max_abs_logit_difference']:.3g}")


def resolve_config(value: str):
    """``demo`` (the default), a preset name, or a config JSON path."""
    from marca.cli import load_config
    if value == "demo":
        return DEMO_CONFIG
    return load_config(value)


class _ProgressLine:
    """One updating terminal line (or sparse plain lines when stdout is not a terminal)."""

    def __init__(self, totals: dict, stream=sys.stdout):
        self.totals = totals          # job -> (instructions per run, runs)
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.perf_counter()
        self.last_plain = 0.0

    def __call__(self, job, step, retired, cycles, done):
        per_run, runs = self.totals[job]
        kind = job.split("/")[-1]
        fraction = min(1.0, (step + (1.0 if done else retired / per_run)) / runs)
        width = 30
        bar = "#" * round(fraction * width) + "-" * (width - round(fraction * width))
        where = f"step {step + 1}/{runs}" if runs > 1 else f"{min(retired, per_run)}/{per_run} instructions"
        text = f"  {kind:<8}[{bar}] {fraction:4.0%}  {where}, {cycles:,} cycles"
        if self.tty:
            self.stream.write("\r" + text.ljust(79))
            if done and step == runs - 1:
                self.stream.write("\n")
            self.stream.flush()
        elif (done and step == runs - 1) or time.perf_counter() - self.last_plain > 5:
            self.last_plain = time.perf_counter()
            print(text, file=self.stream, flush=True)


def run_demo(config, *, d_model: int = 32, d_state: int = 16, tokens: int = 16, seed: int = 1,
             decode: bool = True, pause: float = 0.0, progress: bool = True, name: str = "demo",
             resident: bool = True) -> dict:
    """Compile, simulate and check one mixer; return the report (see :func:`print_report`). ``resident``:
    the decode steps after the first find the weights on chip (where the plan keeps them there)."""
    from marca.tb import mamba
    timings = {}
    started = time.perf_counter()
    case = mamba.MixerCase(name="mixer", config=config, d_model=d_model, d_state=d_state, length=tokens,
                           seed=seed, decode=decode, resident=resident)
    prepared = mamba.prepare(case)
    timings["compile_seconds"] = time.perf_counter() - started
    dims = prepared.prefill.dims
    if progress:
        print(f"compiled: prefill {len(prepared.prefill.instructions)} instructions "
              f"(token block {prepared.prefill.block_tokens}, weights "
              f"{'resident' if prepared.prefill.weights_resident else 'streamed'})"
              + (f", decode step {len(prepared.decode.instructions)} instructions" if decode else "")
              + (f" ({len(prepared.decode.resident_instructions)} with the weights resident)"
                 if decode and prepared.decode.resident_instructions else "")
              + f"; memory image {len(prepared.prefill_image) / 1024:.1f} KiB", flush=True)
        print("building the accelerator in Verilator (cached after the first time; a few minutes) ...",
              flush=True)
    started = time.perf_counter()
    build_dir = mamba.build_accelerator(config)
    timings["build_seconds"] = time.perf_counter() - started
    if progress:
        print(f"  {build_dir} ({timings['build_seconds']:.0f} s)", flush=True)
        print("running on the RTL (Verilator + cocotb; AXI memory model, CSRs over AXI4-Lite):", flush=True)
    totals = {"mixer/prefill": (len(prepared.prefill.instructions), 1)}
    if decode:
        totals["mixer/decode"] = (len(prepared.decode.instructions), tokens)
    started = time.perf_counter()
    rtl = mamba.run_on_rtl(config, [prepared], name=name, pause=pause,
                           progress=_ProgressLine(totals) if progress else None)
    timings["simulation_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    report = mamba.evaluate(prepared, rtl)          # raises on any difference from the golden ISS
    timings["golden_check_seconds"] = time.perf_counter() - started
    prefill_counters = rtl["mixer"]["prefill"][0].counters
    report["dims"] = {"d_model": dims.d_model, "d_inner": dims.d_inner, "d_state": dims.d_state,
                      "dt_rank": dims.dt_rank, "d_conv": dims.d_conv}
    report["configuration"] = config.to_dict()
    report["prefill"]["cycles_per_token"] = prefill_counters["cycles"] / tokens
    report["prefill"]["utilization"] = mamba.utilization(prepared.prefill, prefill_counters)
    report["prefill"]["instructions"] = len(prepared.prefill.instructions)
    report["prefill"]["block_tokens"] = prepared.prefill.block_tokens
    report["prefill"]["weights_resident"] = prepared.prefill.weights_resident
    if decode:      # the first step loads the weights; with resident weights the later ones do not
        steps = rtl["mixer"]["decode"]
        resident_steps = bool(prepared.decode.resident_instructions) and len(steps) > 1
        first = steps[0 if resident_steps else -1].counters
        report["decode"]["cycles_per_token"] = first["cycles"]
        report["decode"]["utilization"] = mamba.utilization(prepared.decode, first)
        report["decode"]["instructions"] = len(prepared.decode.instructions)
        if resident_steps:
            last = steps[-1].counters
            report["decode_resident"] = {"cycles_per_token": last["cycles"],
                                         "utilization": mamba.utilization(prepared.decode, last),
                                         "instructions": len(prepared.decode.resident_instructions)}
    report["bit_exact_with_iss"] = True
    report["timings"] = {key: round(value, 1) for key, value in timings.items()}
    return report


def _format(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:.1%}"


def print_report(report: dict, stream=sys.stdout) -> None:
    """The demo's summary tables."""
    def say(text=""):
        print(text, file=stream)

    prefill, decode = report["prefill"], report.get("decode")
    runs = 1 + (decode["steps"] if decode else 0)
    say(f"golden ISS: final memory image and deterministic counters bit-identical after all {runs} runs"
        + ("; the decode chain equals the prefill bit for bit (outputs and both states)" if decode else ""))
    config = report["configuration"]
    say(f"accuracy against the float64 reference (weights and tokens rounded to {config['storage_format']}): "
        f"max abs error {prefill['max_abs_error']:.2e} (largest |output| {prefill['max_abs_reference']:.2f}), "
        f"relative error {prefill['relative_error']:.2e} ({prefill['relative_error_vs_rounded_reference']:.2e} against "
        f"the reference rounded to {config['storage_format']} like the output), scan state relative error "
        f"{prefill['state_relative_error']:.2e}")
    columns = [("prefill", prefill)] + ([("decode step", decode)] if decode else []) \
        + ([("weights resident", report["decode_resident"])] if report.get("decode_resident") else [])
    say()
    say(f"{'':<34}" + "".join(f"{title:>18}" for title, _ in columns))
    rows = [("tokens", lambda r, t: report["length"] if t == "prefill" else 1),
            ("cycles", lambda r, t: r["utilization"]["cycles"]),
            ("cycles per token", lambda r, t: round(r["cycles_per_token"])),
            ("ideal cycles (one beat per cycle)", lambda r, t: r["utilization"]["ideal_cycles"]),
            ("fraction of ideal", lambda r, t: r["utilization"]["fraction_of_ideal"]),
            ("DRAM bound (bytes / bus width)", lambda r, t: round(r["utilization"]["dram_bound_cycles"])),
            ("fraction of the DRAM bound", lambda r, t: r["utilization"]["fraction_of_dram_bound"]),
            ("useful PE utilization", lambda r, t: r["utilization"]["useful_utilization"]),
            ("DRAM bytes read", lambda r, t: r["utilization"]["dma_bytes_read"]),
            ("DRAM bytes written", lambda r, t: r["utilization"]["dma_bytes_written"]),
            ("instruction bytes fetched", lambda r, t: r["utilization"]["fetch_bytes"])]
    for label, get in rows:
        say(f"{label:<34}" + "".join(f"{_format(get(r, t)):>18}" for t, r in columns))
    say()
    say("PE utilization per operation class (share of all cycles the array spent on the class's beats;")
    say("padding efficiency = useful lane operations / issued lane operations):")
    say(f"{'class':<14}" + "".join(f"{title + ' beats':>24}{'share':>8}{'padding':>9}" for title, _ in columns))
    for kind in ("linear", "element-wise", "nonlinear", "scan"):
        cells = ""
        for _, r in columns:
            entry = r["utilization"]["classes"][kind]
            padding = entry["padding_efficiency"]
            cells += f"{entry['beats']:>24,}{entry['share_of_cycles']:>8.1%}" \
                     f"{(f'{padding:.0%}' if padding is not None else '-'):>9}"
        say(f"{kind:<14}{cells}")
    say()
    say("where the cycles go (array beats = the ideal; compute busy with the array idle = dependent")
    say("instructions waiting for results in the pipeline; compute idle = barriers waiting for the DMA, fetch):")
    for name, title in (("array_beats", "array beats"), ("compute_busy_array_idle", "compute busy, array idle"),
                        ("compute_idle", "compute idle")):
        say(f"  {title:<32}" + "".join(f"{r['utilization']['cycle_breakdown'][name]:>11,}"
                                       f"{r['utilization']['cycle_breakdown'][name] / r['utilization']['cycles']:>7.1%}"
                                       for _, r in columns))
    say(f"  {'DMA read busy':<32}" + "".join(f"{'':>11}{r['utilization']['dma_read_busy_fraction']:>7.1%}"
                                             for _, r in columns))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marca.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo",
                        help="'demo' (4x4 BF16, 256-bit bus; the default), a preset (default, fpga-small, "
                             "fpga-medium, tiny, paper) or a config JSON file")
    parser.add_argument("--d-model", type=int, default=32, help="model width (d_inner = 2 d_model)")
    parser.add_argument("--d-state", type=int, default=16, help="SSM state size per channel")
    parser.add_argument("--tokens", type=int, default=None,
                        help="model: tokens to generate (default 4); mixer: prefill length = decode steps (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the weights and tokens")
    parser.add_argument("--out", default="build/demo", help="folder for demo.json")
    parser.add_argument("--no-decode", action="store_true", help="skip the chain of decode steps")
    parser.add_argument("--no-resident", action="store_true",
                        help="mixer demo: every decode step loads the weights (default: the steps after the "
                             "first find them on chip, where they fit)")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="probability of a random pause on each AXI channel each cycle (stress)")
    parser.add_argument("--mixer", action="store_true", help="the one-mixer demo instead of the model")
    parser.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help="model demo: checkpoint folder")
    parser.add_argument("--prompt", default="ROMEO:", help="model demo: the prompt")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = 8 if args.mixer else 4
    try:
        config = resolve_config(args.config)
        for name in ("d_model", "d_state", "tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    except ValueError as error:
        parser.error(str(error))
    if not args.mixer:
        print(f"marca demo: a Mamba language model generating {args.tokens} tokens on {config.name} "
              f"({config.array_rows}x{config.array_cols} PEs) in Verilator", flush=True)
        report = run_model_demo(config, checkpoint=args.checkpoint, prompt=args.prompt, tokens=args.tokens,
                                pause=args.pause, seed=args.seed)
        print_model_report(report)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out / 'demo.json'} ({report['seconds']:.0f} s)")
        return 0
    from marca.reference.mamba import MambaDims
    dims = MambaDims(d_model=args.d_model, d_state=args.d_state)
    compute, storage = config.compute_format, config.storage_format
    print(f"marca demo: one Mamba-1 mixer (d_model {dims.d_model}, d_inner {dims.d_inner}, d_state "
          f"{dims.d_state}, dt_rank {dims.dt_rank}, d_conv {dims.d_conv}), {args.tokens} tokens, seed {args.seed}")
    print(f"configuration {config.name}: {config.array_rows}x{config.array_cols} PEs, compute {compute.name}, "
          f"storage {storage.name}, {config.axi_data_width}-bit AXI, buffers weight/activation/state/scratch "
          f"{config.weight_buffer_kib}/{config.activation_buffer_kib}/{config.state_buffer_kib}/"
          f"{config.scratch_buffer_kib} KiB", flush=True)
    try:
        report = run_demo(config, d_model=args.d_model, d_state=args.d_state, tokens=args.tokens,
                          seed=args.seed, decode=not args.no_decode, pause=args.pause,
                          resident=not args.no_resident)
    except Exception as error:       # CompileError: sizes that do not fit the configuration's buffers
        from marca.compiler import CompileError
        if isinstance(error, CompileError):
            print(f"cannot compile this mixer for {config.name}: {error}", file=sys.stderr)
            return 2
        raise
    print_report(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    timings = report["timings"]
    print(f"\nwrote {out / 'demo.json'} (compile {timings['compile_seconds']} s, build {timings['build_seconds']} s, "
          f"simulation {timings['simulation_seconds']} s, golden check {timings['golden_check_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
