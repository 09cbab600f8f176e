"""Benchmark: a Mamba-1 mixer end to end on the accelerator RTL (Verilator), at the demo's size.

    python -m marca.bench.mamba [out_dir]       (or ``marca bench mamba``)

For the demo configuration (``marca.demo.DEMO_CONFIG``: 4 x 4 BF16 array, 256-bit bus) and sizes
(d_model 32, d_state 16, 16 tokens):

* **prefill and decode**: cycles per token of a 16-token prefill and of a decode step (the last of a chain
  of 16 over the same tokens), PE utilization per operation class and overall, and the ideal bound: the
  array's peak is one beat (``R·C`` lane operations) per cycle, so the ideal cycle count of a program is its
  number of array beats, and the fraction of ideal is ideal / measured cycles.
* **buffer management**: the prefill compiled with each of MARCA's strategies on and off (compiler
  switches ``intra_operation``, ``inter_operation``): DRAM bytes read and written and cycles, measured by the
  RTL's counters. All variants must leave bit-identical outputs.
* **batched decode**: one decode step of ``B`` sequences (``BATCHES``; each with its own random states,
  every weight read shared), cycles per token, fraction of ideal (array beats / cycles) and of the DRAM
  bound (``max(bytes read incl. instruction fetch, bytes written) / bus bytes per cycle``, the AXI read
  and write channels being separate), tokens/s at the configuration's clock; from the RTL's counters and
  from the cycle model ``marca.perf``. Each RTL run is checked bit for bit against the ISS, and on the ISS
  the batched step equals ``B`` separate batch-1 steps (outputs and every sequence's states).

* **batched decode, streamed weights** (RTL at ``STREAMED["rtl_batches"]``, cycle model at every B): a
  mixer whose weights exceed the weight buffer
  (``STREAMED``: d_model 128 on the demo configuration with a 64-bit bus, ~220 KB of weights per step),
  B = 1 .. 32: where tokens/s stops growing and why.

``python -m marca.bench.mamba OUT --batched`` runs only the batched decode (RTL and cycle model);
``--batched --model-only`` only its cycle model (seconds).

Every run is also checked bit for bit against the golden ISS (``marca.tb.mamba.evaluate``). Prints the
tables (they are in docs/mamba.md) and writes ``out_dir/mamba.json``.
"""

import json
import pathlib
import sys
import time

__all__ = ["SIZES", "run"]

SIZES = {"d_model": 32, "d_state": 16, "tokens": 16, "seed": 1}
BATCHES = (1, 4, 16)
#: Batch sizes of the cycle model's curve (seconds each).
MODEL_BATCHES = (1, 2, 4, 8, 16)
#: The streamed-weights case: the demo configuration with a 64-bit bus and a mixer 4x the demo's width.
STREAMED = {"axi_data_width": 64, "d_model": 128, "batches": (1, 2, 4, 8, 16, 32), "rtl_batches": (1, 2, 4)}


def _variants():
    from marca.compiler.report import SWITCH_VARIANTS
    return SWITCH_VARIANTS


def batched_case(config, batch: int, *, seed: int = SIZES["seed"], d_model: int = SIZES["d_model"],
                 resident: bool = False):
    """A batched decode step of the demo's mixer: ``(PreparedCase, hidden, conv, ssm)`` with random tokens
    and states for ``batch`` sequences (``batch`` 1: the plain decode step). ``resident``: also the step
    that finds the weights on chip, where the plan keeps them there."""
    import torch
    from marca.compiler import CompileError, compile_mixer
    from marca.reference import mamba as reference
    from marca.tb import mamba
    dims = reference.MambaDims(d_model=d_model, d_state=SIZES["d_state"])
    weights = reference.random_mixer_weights(dims, seed=seed, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed + 2000 + batch)
    hidden = torch.randn(batch, dims.d_model, generator=generator, dtype=torch.float64)
    conv = torch.randn(batch, dims.d_inner, dims.d_conv, generator=generator, dtype=torch.float64) * 0.5
    ssm = torch.randn(batch, dims.d_inner, dims.d_state, generator=generator, dtype=torch.float64)
    try:
        compiled = compile_mixer(weights, config, mode="decode", batch=batch, resident=resident)
    except CompileError:        # the weights stream: no resident step
        compiled = compile_mixer(weights, config, mode="decode", batch=batch)
    image = compiled.write_inputs(None, hidden, *((conv, ssm) if batch > 1 else (conv[0], ssm[0])))
    case = mamba.MixerCase(name=f"batch{batch}", config=config, d_model=dims.d_model, d_state=dims.d_state,
                           length=batch, seed=seed, decode=False)
    return mamba.PreparedCase(case, weights, hidden, compiled, bytes(image)), hidden, conv, ssm


def _separate_steps_agree(prepared, hidden, conv, ssm, batched_image: bytes) -> bool:
    """On the ISS: the batched step's outputs and states equal ``B`` separate batch-1 steps'."""
    import torch
    from marca.compiler import compile_mixer
    compiled = prepared.prefill
    if compiled.batch == 1:
        return True
    one = compile_mixer(prepared.weights, compiled.config, mode="decode", options=compiled.options)
    out, conv_after, ssm_after = compiled.read_outputs(batched_image)
    for b in range(compiled.batch):
        alone = one.run(hidden[b:b + 1], conv[b], ssm[b])
        if not (torch.equal(alone.out[0], out[b]) and torch.equal(alone.conv_state, conv_after[b])
                and torch.equal(alone.ssm_state, ssm_after[b])):
            return False
    return True


def batched_figures(config, compiled, counters: dict, resident: bool = False) -> dict:
    """Per-token figures of one batched step from its counters (RTL or cycle model); ``resident``: of the
    step that finds the weights on chip."""
    from marca import perf
    from marca.compiler.program import program_counters
    B = compiled.batch
    static = program_counters(compiled.resident_instructions if resident else compiled.instructions, config)
    beats = static["linear_beats"] + static["elementwise_beats"] + static["nonlinear_beats"]
    cycles = counters["cycles"]
    read, written = static["dma_bytes_read"] + static["fetch_bytes"], static["dma_bytes_written"]
    bound = perf.dram_bound_cycles(config, static)
    return {"batch": B, "weights": "resident" if resident else "loaded" if compiled.weights_resident else "streamed",
            "instructions": static["instructions"],
            "block_tokens": compiled.plan.block_tokens, "scan_tiles": compiled.plan.scan_tiles,
            "cycles": cycles, "cycles_per_token": cycles / B,
            "array_beats": beats, "array_beats_per_token": beats / B, "fraction_of_ideal": beats / cycles,
            "dram_bytes_read": read, "dram_bytes_written": written, "dram_read_bytes_per_token": read / B,
            "dram_bound_cycles": bound, "fraction_of_dram_bound": bound / cycles,
            "bound": "array" if beats >= bound else "DRAM",
            "tokens_per_second": B * config.fpga_clock_mhz * 1e6 / cycles,
            "compute_busy_array_idle": (counters["compute_busy_cycles"] - beats) / cycles,
            "compute_idle": (cycles - counters["compute_busy_cycles"]) / cycles}


def batched_model(config, batches=MODEL_BATCHES, d_model: int = SIZES["d_model"]) -> list:
    """The batched decode curve from the cycle model (``marca.perf``, testbench memory): per batch size the
    step that loads (or streams) the weights and, where they stay on chip, the step that finds them."""
    from marca import perf
    rows = []
    for B in batches:
        compiled = batched_case(config, B, d_model=d_model, resident=True)[0].prefill
        for resident in (False, True) if compiled.resident_instructions else (False,):
            instructions = compiled.resident_instructions if resident else compiled.instructions
            report = perf.estimate(config, instructions)
            rows.append({**batched_figures(config, compiled, report.counters, resident),
                         "critical_path": critical_path(config, instructions, report)})
    return rows


def critical_path(config, instructions, report) -> dict:
    """Where a step's cycles go on the array's timeline (the cycle model's, ``report.timeline``), per
    operation class: ``beats``; ``inside``: cycles between an instruction's first and last beat beyond its
    beats (a beat waiting for an earlier beat's result in the pipeline: a row tile's chunks in order, a
    nonlinear pass over few lines waiting for the pass before); ``between``: cycles from the previous
    instruction's last beat to this one's first (its operands still in the pipeline, dispatch, a barrier
    waiting for the DMA). With one sequence every instruction depends on the one before, so ``inside`` and
    ``between`` are the pipeline latency on the step's critical path."""
    from marca.tb import mamba
    rows = {kind: {"instructions": 0, "beats": 0, "inside": 0, "between": 0}
            for kind in mamba.OPERATION_CLASSES}
    previous = None
    for index, first, last, count in report.timeline:
        row = rows[mamba.classify(instructions[index])]
        row["instructions"] += 1
        row["beats"] += count
        row["inside"] += last - first + 1 - count
        if previous is not None:
            row["between"] += max(0, first - previous - 1)
        previous = last
    start, end = report.timeline[0][1], report.timeline[-1][2]
    return {"classes": rows, "cycles": report.cycles, "before_first_beat": start,
            "after_last_beat": report.cycles - end - 1}


def streamed_config(config):
    import dataclasses
    return dataclasses.replace(config, name=f"{config.name.split('-bus')[0]}-bus{STREAMED['axi_data_width']}",
                               axi_data_width=STREAMED["axi_data_width"])


def batched_streamed(config) -> dict:
    """The streamed-weights curve (cycle model)."""
    narrow = streamed_config(config)
    return {"config": narrow.to_dict(), "d_model": STREAMED["d_model"],
            "rows": batched_model(narrow, STREAMED["batches"], STREAMED["d_model"])}


def streamed_rtl(config) -> list:
    """The streamed-weights case on its own RTL build (``STREAMED["rtl_batches"]``), checked against the
    ISS."""
    from marca.tb import mamba
    narrow = streamed_config(config)
    prepared = [batched_case(narrow, B, d_model=STREAMED["d_model"]) for B in STREAMED["rtl_batches"]]
    runs = mamba.run_on_rtl(narrow, [item[0] for item in prepared], name="bench-mamba-streamed")
    return batched_rtl_check(prepared, runs)


def batched_rtl_check(prepared_batches: list, rtl: dict) -> list:
    """Check each batched RTL run against the ISS (image, counters) and the ISS's batched step against
    separate steps; the RTL figures."""
    from marca.tb import mamba
    rows = []
    for prepared, hidden, conv, ssm in prepared_batches:
        compiled = prepared.prefill
        steps = rtl[prepared.case.name]["prefill"]
        golden, machine = mamba._compare_step(f"batched decode B={compiled.batch}", compiled.config, steps[0],
                                              prepared.prefill_image, compiled.program_address)
        if not _separate_steps_agree(prepared, hidden, conv, ssm, golden):
            raise AssertionError(f"batch {compiled.batch}: the batched step differs from separate steps")
        rows.append({**batched_figures(compiled.config, compiled, steps[0].counters), "counters": steps[0].counters,
                     "equals_iss": True, "equals_separate_steps": True})
        if compiled.resident_instructions:      # the second run: the weights found on chip, ISS without reset
            mamba._compare_step(f"batched decode B={compiled.batch}, weights resident", compiled.config,
                                steps[1], steps[0].image, compiled.resident_program_address, machine=machine)
            rows.append({**batched_figures(compiled.config, compiled, steps[1].counters, True),
                         "counters": steps[1].counters, "equals_iss": True})
    return rows


def run_batched(out_dir: pathlib.Path, *, rtl: bool = True) -> dict:
    """Only the batched decode (cycle model, and with ``rtl`` the RTL)."""
    from marca.demo import DEMO_CONFIG
    from marca.tb import mamba
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = DEMO_CONFIG
    started = time.time()
    results = {"config": config.to_dict(), "sizes": SIZES, "batched_model": batched_model(config),
               "batched_streamed": batched_streamed(config)}
    if rtl:
        prepared = [batched_case(config, B, resident=True) for B in BATCHES]
        runs = mamba.run_on_rtl(config, [item[0] for item in prepared], name="bench-mamba-batched")
        results["batched_rtl"] = batched_rtl_check(prepared, runs)
        results["batched_streamed"]["rtl"] = streamed_rtl(config)
    results["wall_seconds"] = round(time.time() - started, 1)
    print(batched_table(results))
    (out_dir / "mamba_batched.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def batched_table(results: dict) -> str:
    """The batched-decode table (docs/mamba.md)."""
    lines = ["| B | weights | source | cycles / step | cycles / token | array beats / token | fraction of ideal | "
             "DRAM bytes read / token | DRAM bound (cycles / step) | fraction of DRAM bound | tokens/s at "
             f"{results['config']['fpga_clock_mhz']:g} MHz | compute busy, array idle | compute idle |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for source, key in (("RTL", "batched_rtl"), ("cycle model", "batched_model")):
        for row in results.get(key, []):
            lines.append(f"| {row['batch']} | {row['weights']} | {source} | {row['cycles']:,} | "
                         f"{row['cycles_per_token']:,.0f} | "
                         f"{row['array_beats_per_token']:,.0f} | {row['fraction_of_ideal']:.1%} | "
                         f"{row['dram_read_bytes_per_token']:,.0f} | {row['dram_bound_cycles']:,.0f} | "
                         f"{row['fraction_of_dram_bound']:.1%} | {row['tokens_per_second']:,.0f} | "
                         f"{row['compute_busy_array_idle']:.1%} | {row['compute_idle']:.1%} |")
    streamed = results.get("batched_streamed")
    if streamed:
        lines += ["", f"Streamed weights: `{streamed['config']['name']}` "
                  f"({streamed['config']['axi_data_width']}-bit bus), d_model {streamed['d_model']}, "
                  f"d_state {results['sizes']['d_state']}:", "",
                  "| B | source | sequences per block | cycles / token | array beats / token | DRAM bound / token | "
                  "fraction of ideal | fraction of DRAM bound | tokens/s | compute idle |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for source, row in [("RTL", row) for row in streamed.get("rtl", [])] + \
                [("cycle model", row) for row in streamed["rows"]]:
            lines.append(f"| {row['batch']} | {source} | {row['block_tokens']} | {row['cycles_per_token']:,.0f} | "
                         f"{row['array_beats_per_token']:,.0f} | "
                         f"{row['dram_bound_cycles'] / row['batch']:,.0f} | "
                         f"{row['fraction_of_ideal']:.1%} | {row['fraction_of_dram_bound']:.1%} | "
                         f"{row['tokens_per_second']:,.0f} | {row['compute_idle']:.1%} |")
    return "\n".join(lines) + "\n"


def run(out_dir: pathlib.Path) -> dict:
    from marca.tb import mamba

    from marca.demo import DEMO_CONFIG
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = DEMO_CONFIG
    started = time.time()
    cases = []
    for variant, options in _variants().items():
        cases.append(mamba.MixerCase(name=variant.replace(" ", "-"), config=config, d_model=SIZES["d_model"],
                                     d_state=SIZES["d_state"], length=SIZES["tokens"], seed=SIZES["seed"],
                                     decode=variant == "both on", options=options))
    prepared = [mamba.prepare(case) for case in cases]
    batches = [batched_case(config, B, resident=True) for B in BATCHES]
    rtl = mamba.run_on_rtl(config, prepared + [item[0] for item in batches], name="bench-mamba")
    results = {"config": config.to_dict(), "sizes": SIZES, "variants": {}}
    reference_output = None
    for item, variant in zip(prepared, _variants()):
        report = mamba.evaluate(item, rtl)          # bit-exact against the ISS, decode == prefill
        step = rtl[item.case.name]["prefill"][0]
        output = step.image[item.prefill.output.address:item.prefill.output.address
                            + item.prefill.output.rows * item.prefill.output.row_stride]
        if reference_output is None:
            reference_output = output
        elif output != reference_output:
            raise AssertionError(f"variant {variant}: output differs from 'both on' (the switches must not "
                                 "change a bit)")
        entry = {"instructions": len(item.prefill.instructions),
                 "block_tokens": item.prefill.block_tokens, "weights_resident": item.prefill.weights_resident,
                 "relative_error": report["prefill"]["relative_error"],
                 "prefill": mamba.utilization(item.prefill, step.counters),
                 "counters": step.counters}
        entry["prefill"]["cycles_per_token"] = step.counters["cycles"] / SIZES["tokens"]
        if "decode" in report:
            last = rtl[item.case.name]["decode"][-1]
            entry["decode"] = mamba.utilization(item.decode, last.counters)
            entry["decode"]["cycles_per_token"] = last.counters["cycles"]
            entry["decode"]["cycles_per_step"] = report["decode"]["cycles_per_step"]
            entry["decode_counters"] = last.counters
        results["variants"][variant] = entry
    results["batched_rtl"] = batched_rtl_check(batches, rtl)
    results["batched_model"] = batched_model(config)
    results["batched_streamed"] = batched_streamed(config)
    results["batched_streamed"]["rtl"] = streamed_rtl(config)
    results["wall_seconds"] = round(time.time() - started, 1)
    print(tables(results))
    print(batched_table(results))
    (out_dir / "mamba.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def tables(results: dict) -> str:
    """The benchmark's Markdown tables (docs/mamba.md)."""
    config, sizes = results["config"], results["sizes"]
    base = results["variants"]["both on"]
    lines = [(f"Configuration `{config['name']}` ({config['array_rows']}x{config['array_cols']} "
              f"{config['compute_format']} compute, {config['storage_format']} storage, "
              f"{config['axi_data_width']}-bit bus); d_model {sizes['d_model']}, d_state {sizes['d_state']}, "
              f"{sizes['tokens']} tokens; both buffer-management strategies on."), ""]
    lines += ["| | prefill | decode step |", "|---|---|---|"]
    prefill, decode = base["prefill"], base["decode"]

    def row(title, get, fmt):
        lines.append(f"| {title} | {fmt(get(prefill))} | {fmt(get(decode))} |")

    count = lambda v: f"{v:,}"
    share = lambda v: f"{v:.1%}"
    row("cycles", lambda r: r["cycles"], count)
    row("cycles per token", lambda r: round(r["cycles_per_token"]), count)
    row("ideal cycles (array beats)", lambda r: r["ideal_cycles"], count)
    row("ideal cycles per token", lambda r: round(r["ideal_cycles"] / (sizes["tokens"] if r is prefill else 1)),
        count)
    row("**fraction of ideal** (overall PE utilization)", lambda r: r["fraction_of_ideal"], share)
    row("useful PE utilization (no padding)", lambda r: r["useful_utilization"], share)
    for kind in ("linear", "element-wise", "nonlinear", "scan"):
        row(f"{kind}: share of cycles", lambda r, k=kind: r["classes"][k]["share_of_cycles"], share)
    row("compute busy, array idle", lambda r: r["cycle_breakdown"]["compute_busy_array_idle"] / r["cycles"], share)
    row("compute idle (barriers, DMA, fetch)", lambda r: r["cycle_breakdown"]["compute_idle"] / r["cycles"], share)
    row("DMA read busy", lambda r: r["dma_read_busy_fraction"], share)
    row("DRAM bytes read", lambda r: r["dma_bytes_read"], count)
    row("DRAM bytes written", lambda r: r["dma_bytes_written"], count)
    lines += ["", "Per operation class (prefill; padding = useful / issued lane operations):", "",
              "| class | beats | share of cycles | padding efficiency |", "|---|---|---|---|"]
    for kind, entry in prefill["classes"].items():
        padding = entry["padding_efficiency"]
        lines.append(f"| {kind} | {entry['beats']:,} | {entry['share_of_cycles']:.1%} | "
                     f"{'-' if padding is None else f'{padding:.0%}'} |")
    lines += ["", f"Buffer management (prefill of {sizes['tokens']} tokens, RTL counters):", "",
              ("| variant | instructions | DRAM read (B) | DRAM written (B) | cycles | cycles / token | "
               "fraction of ideal | weights resident |"), "|---|---|---|---|---|---|---|---|"]
    for variant, entry in results["variants"].items():
        p = entry["prefill"]
        lines.append(f"| {variant} | {entry['instructions']} | {p['dma_bytes_read']:,} | "
                     f"{p['dma_bytes_written']:,} | {p['cycles']:,} | {round(p['cycles_per_token']):,} | "
                     f"{p['fraction_of_ideal']:.1%} | {entry['weights_resident']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from marca.bench import command_line
    arguments = [a for a in command_line(__doc__, ("--batched", "--model-only")) if not a.startswith("--")]
    where = pathlib.Path(arguments[0] if arguments else "build/bench")
    if "--batched" in sys.argv:
        run_batched(where, rtl="--model-only" not in sys.argv)
    else:
        run(where)
