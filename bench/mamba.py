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

Every run is also checked bit for bit against the golden ISS (``marca.tb.mamba.evaluate``). Prints the
tables (they are in docs/mamba.md) and writes ``out_dir/mamba.json``.
"""

import json
import pathlib
import sys
import time

__all__ = ["SIZES", "run"]

SIZES = {"d_model": 32, "d_state": 16, "tokens": 16, "seed": 1}


def _variants():
    from marca.compiler.report import SWITCH_VARIANTS
    return SWITCH_VARIANTS


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
    rtl = mamba.run_on_rtl(config, prepared, name="bench-mamba")
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
    results["wall_seconds"] = round(time.time() - started, 1)
    print(tables(results))
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
    run(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "build/bench"))
