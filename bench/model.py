"""Benchmark: the whole-model compiler on the golden ISS (docs/model.md).

``marca bench model`` writes ``model.json``: for the 2-layer test model of tests/test_model.py (d_model 16,
vocabulary 40, random transformers initialisation, float64) on every simulated preset, the max |logit
difference| against transformers' MambaForCausalLM in float64 and the top-1 agreement over a 4-token
prompt; and the compiled program of each released size on each preset from shapes alone (instructions per
decode step, DRAM bytes per decoded token, the mixer's tiling) for the small presets' sizes that compile
in seconds.
"""

import json
import pathlib
import time

import torch

__all__ = ["run", "logit_errors", "program_sizes"]

PROMPT = [3, 17, 1, 30]


def logit_errors() -> list[dict]:
    import transformers

    from marca.compiler import compile_model
    from marca.config import DEFAULT, FPGA_SMALL, TINY
    config = transformers.MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=40, state_size=8,
                                      intermediate_size=32, time_step_rank=1)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
    rows = []
    for preset in (DEFAULT, TINY, FPGA_SMALL):
        logits = compile_model(model, config=preset, prompt_length=len(PROMPT), logits="all").session().prefill(PROMPT)
        rows.append({"config": preset.name, "max_abs_logit_difference": float((logits - expected).abs().max()),
                     "max_abs_logit": float(expected.abs().max()),
                     "top1_agreement": float((logits.argmax(-1) == expected.argmax(-1)).double().mean())})
    return rows


def program_sizes(sizes=("130m",), presets=("default", "paper")) -> list[dict]:
    from marca.compiler import compile_model
    from marca.compiler.program import program_counters
    from marca.config import preset
    from marca.generate import random_config
    rows = []
    for size in sizes:
        for name in presets:
            config = preset(name)
            started = time.perf_counter()
            compiled = compile_model(None, random_config(size), config, prompt_length=1)
            decode = compiled.programs["decode"]
            counters = program_counters(decode.instructions, config)
            rows.append({"size": size, "config": name, "decode_instructions": len(decode.instructions),
                         "dram_bytes_per_decoded_token": counters["dma_bytes_read"] + counters["dma_bytes_written"]
                         + counters["fetch_bytes"], "weight_bytes": compiled.weight_bytes,
                         "memory_bytes": compiled.memory_size, "mixer_plan": decode.mixer_plan.describe(),
                         "compile_seconds": time.perf_counter() - started})
    return rows


def program_size_by_layers(size: str = "130m", preset_name: str = "fpga-small", prompt_length: int = 5) -> dict:
    """Instructions of a released size's prefill and decode step on a preset, from shapes, extrapolated from
    1- and 2-layer compiles (the layers are the same program at other addresses): for presets where the
    whole model's compile takes tens of minutes on this machine."""
    from marca.compiler import compile_model
    from marca.config import preset
    from marca.generate import random_config
    counts, seconds = {}, {}
    for layers in (1, 2):
        mamba_config = random_config(size)
        mamba_config.num_hidden_layers = layers
        started = time.perf_counter()
        compiled = compile_model(None, mamba_config, preset(preset_name), prompt_length=prompt_length)
        seconds[layers] = time.perf_counter() - started
        counts[layers] = {mode: len(program.instructions) for mode, program in compiled.programs.items()}
    layers = random_config(size).num_hidden_layers
    result = {"size": size, "config": preset_name, "prompt_tokens": prompt_length, "layers": layers,
              "compile_seconds": seconds}
    for mode in ("prefill", "decode"):
        per_layer = counts[2][mode] - counts[1][mode]
        result[mode] = {"per_layer": per_layer, "outside_layers": counts[1][mode] - per_layer,
                        "whole_model": counts[1][mode] + (layers - 1) * per_layer}
    return result


def run(out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results = {"logit_errors": logit_errors(), "program_sizes": program_sizes()}
    for row in results["logit_errors"]:
        print(f"  {row['config']:<11} max |dlogit| {row['max_abs_logit_difference']:.2e} "
              f"(|logits| up to {row['max_abs_logit']:.2f}), top-1 {row['top1_agreement']:.0%}")
    for row in results["program_sizes"]:
        print(f"  {row['size']} on {row['config']}: decode step {row['decode_instructions']} instructions, "
              f"{row['dram_bytes_per_decoded_token'] / 1e6:.1f} MB DRAM per token ({row['mixer_plan']})")
    (out_dir / "model.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="program size of a released size from 1- and 2-layer compiles")
    parser.add_argument("--size", default="130m")
    parser.add_argument("--config", default="fpga-small")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(program_size_by_layers(args.size, args.config), indent=1))
