"""Benchmark (explicit only): where a released size's ISS logits part from float64 (docs/model.md).

    python -m marca.bench.model_sensitivity             # 130m shapes, "Hello", default, every layer
    python -m marca.bench.model_sensitivity --layers 4 --config default --out build/bench
    python -m marca.bench.model_sensitivity --float-only      # the float64 references only, every layer

The random-initialised Mamba of a released size (``marca generate --random``: transformers' initialisation,
seed 0) is run three ways on the same prompt:

* ``float64``: transformers' MambaForCausalLM in float64 with the FP32 weights (what ``marca generate``
  compares against);
* ``storage-rounded``: the same float64 model with every weight rounded to the configuration's storage
  format and the RMSNorm and mixer outputs rounded to it too (what the accelerator stores; its compute
  format is not emulated);
* the golden ISS, the program stopped after every layer's residual add to read the residual stream.

Per layer it reports the residual's difference from both references (relative to the residual's RMS),
and the **local** error: the float64 storage-rounded layer applied to the ISS's own residual from the layer
before, against the ISS's residual after the layer. A defect (a wrong tile, chunk, GATHER, RSQRT...) shows as
a large local error at one layer; sensitivity shows as small local errors (the rounding of the formats)
that grow from layer to layer in the same way as the float64 model's own response to storage rounding.
The LM head's local error (norm_f and the head in float64 on the ISS's final residual) closes the chain.
Writes ``model_sensitivity.json``.
"""

import argparse
import json
import math
import pathlib
import time

import torch

__all__ = ["run", "measure", "EXPLICIT_ONLY"]

#: ``marca bench`` runs this only when named (the 24-layer ISS prefill takes tens of minutes).
EXPLICIT_ONLY = True


def _truncated(state, mamba_config, layers: int):
    import copy
    config = copy.deepcopy(mamba_config)
    config.num_hidden_layers = layers
    keep = {name: value for name, value in state.items()
            if not name.startswith("backbone.layers.") or int(name.split(".")[2]) < layers}
    return keep, config


def _rel(a, b, scale):
    return {"max_abs": float((a - b).abs().max()), "rms_rel": float((a - b).pow(2).mean().sqrt() / scale)}


def measure(size: str = "130m", layers: int | None = None, config_name: str = "default",
            prompt: str = "Hello", seed: int = 0, iss: bool = True, log=print) -> dict:
    """The per-layer and logit comparisons (``iss=False``: the two float64 references only, in minutes)."""
    from transformers import MambaForCausalLM

    from marca import isa
    from marca.compiler import compile_model
    from marca.compiler.mamba import read_place
    from marca.config import preset
    from marca.generate import _float_model, random_config, storage_rounded_model
    from marca.golden.iss import Machine, ProgramError
    torch.set_num_threads(1)
    started = time.perf_counter()
    config = preset(config_name)
    mamba_config = random_config(size)
    torch.manual_seed(seed)                      # as marca generate --random builds it
    state = MambaForCausalLM(mamba_config).eval().state_dict()
    if layers is not None:
        state, mamba_config = _truncated(state, mamba_config, layers)
    layers = mamba_config.num_hidden_layers
    ids = list(prompt.encode("utf-8"))
    exact = _float_model(state, mamba_config)
    rounded = storage_rounded_model(state, mamba_config, config.storage_format)
    with torch.no_grad():
        out64 = exact(torch.tensor([ids]), output_hidden_states=True)
        outbf = rounded(torch.tensor([ids]), output_hidden_states=True)
    log(f"float references built ({time.perf_counter() - started:.0f} s); logits |max| "
        f"{float(out64.logits.abs().max()):.2f}, std {float(out64.logits.std()):.2f}")

    if not iss:
        rows = []
        for n in range(layers):
            h64, hbf = out64.hidden_states[n][0], outbf.hidden_states[n][0]
            scale = float(h64.pow(2).mean().sqrt())
            rows.append({"layer": n, "residual_rms": scale,
                         "storage_rounded_vs_float64": _rel(hbf, h64, scale)})
            log(f"layer {n:2d}: residual rms {scale:8.2f}; storage-rounded vs float64 "
                f"{rows[-1]['storage_rounded_vs_float64']['rms_rel']:.2e}")
        l64, lbf = out64.logits[0], outbf.logits[0]
        scale = float(l64.pow(2).mean().sqrt())
        top = l64.topk(2, -1).values
        logit_row = {"logits_rms": scale, "logits_max_abs": float(l64.abs().max()),
                     "storage_rounded_vs_float64": _rel(lbf, l64, scale),
                     "top1_storage_rounded_vs_float64":
                         float((lbf.argmax(-1) == l64.argmax(-1)).double().mean()),
                     "float64_top1_top2_gap": [float(g) for g in top[:, 0] - top[:, 1]]}
        log(f"logits (rms {scale:.2f}, |max| {logit_row['logits_max_abs']:.2f}): storage-rounded vs float64 "
            f"max |d| "
            f"{logit_row['storage_rounded_vs_float64']['max_abs']:.3g}, top-1 "
            f"{logit_row['top1_storage_rounded_vs_float64']:.0%}; float64's top-1 - top-2 gaps "
            + ", ".join(f"{g:.3g}" for g in logit_row["float64_top1_top2_gap"]))
        return {"size": size, "layers": layers, "config": config.name, "prompt": prompt, "seed": seed,
                "per_layer": rows, "logits": logit_row, "seconds": time.perf_counter() - started}
    compiled = compile_model(state, mamba_config, config, prompt_length=len(ids), logits="all")
    program = compiled.programs["prefill"]
    stops = {}      # instruction index where layer n's residual add ends -> n (-1: the embedding)
    labels = [(index, label) for index, label in program.sections]
    for k, (index, label) in enumerate(labels):
        if label.endswith("RMSNorm") or label == "norm_f":
            n = int(label.split()[1].rstrip(":")) - 1 if label.startswith("layer") else layers - 1
            stops[index] = n
    log(f"compiled: prefill {len(program.instructions)} instructions ({time.perf_counter() - started:.0f} s)")
    memory = bytearray(compiled.memory)
    address = compiled.ids
    memory[address:address + 4 * len(ids)] = b"".join(i.to_bytes(4, "little") for i in ids)
    machine = Machine(config, memory)
    position, pc, rows = 0, program.address, []
    previous = None
    for stop in sorted(stops):
        try:
            machine.run(pc, max_instructions=stop - position)
            raise RuntimeError("the program halted before its last layer")
        except ProgramError as error:
            if error.kind != "runaway":
                raise
        pc, position = machine.pc, stop
        image = machine.memory_bytes()
        residual = read_place(config, image, compiled.residual)[:, :compiled.shape.d_model]
        n = stops[stop]
        if n < 0:
            previous = residual
            continue
        h64, hbf = out64.hidden_states[n][0], outbf.hidden_states[n][0]
        scale = float(h64.pow(2).mean().sqrt())
        with torch.no_grad():
            local = rounded.backbone.layers[n](previous[None])[0]
        row = {"layer": n, "residual_rms": scale, "vs_float64": _rel(residual, h64, scale),
               "vs_storage_rounded": _rel(residual, hbf, scale), "local": _rel(residual, local, scale),
               "storage_rounded_vs_float64": _rel(hbf, h64, scale)}
        rows.append(row)
        log(f"layer {n:2d}: residual rms {scale:8.2f}; ISS vs float64 {row['vs_float64']['rms_rel']:.2e}, "
            f"vs storage-rounded {row['vs_storage_rounded']['rms_rel']:.2e}, "
            f"local {row['local']['rms_rel']:.2e}; "
            f"storage-rounded vs float64 {row['storage_rounded_vs_float64']['rms_rel']:.2e} "
            f"({time.perf_counter() - started:.0f} s)")
        previous = residual
    result = machine.run(pc, max_instructions=len(program.instructions) + 1 - position)
    if result.error != isa.ErrorCode.NONE:
        raise RuntimeError(f"the prefill faulted: {result.error.name} {result.message}")
    image = machine.memory_bytes()
    logits = read_place(config, image, compiled.logits)[:, :compiled.shape.vocab]
    with torch.no_grad():
        head_local = rounded.lm_head(rounded.backbone.norm_f(previous[None]))[0]
    l64, lbf = out64.logits[0], outbf.logits[0]
    scale = float(l64.pow(2).mean().sqrt())
    top = l64.topk(2, -1).values
    logit_row = {"logits_rms": scale, "logits_max_abs": float(l64.abs().max()),
                 "vs_float64": _rel(logits, l64, scale), "vs_storage_rounded": _rel(logits, lbf, scale),
                 "local": _rel(logits, head_local, scale),
                 "storage_rounded_vs_float64": _rel(lbf, l64, scale),
                 "top1_vs_float64": float((logits.argmax(-1) == l64.argmax(-1)).double().mean()),
                 "top1_storage_rounded_vs_float64": float((lbf.argmax(-1) == l64.argmax(-1)).double().mean()),
                 "float64_top1_top2_gap": [float(g) for g in top[:, 0] - top[:, 1]]}
    log(f"logits (rms {scale:.2f}, |max| {logit_row['logits_max_abs']:.2f}): ISS vs float64 max |d| "
        f"{logit_row['vs_float64']['max_abs']:.3g}, "
        f"vs storage-rounded {logit_row['vs_storage_rounded']['max_abs']:.3g}, "
        f"head local {logit_row['local']['max_abs']:.3g}; storage-rounded vs float64 "
        f"{logit_row['storage_rounded_vs_float64']['max_abs']:.3g}; "
        f"top-1 ISS {logit_row['top1_vs_float64']:.0%}, "
        f"storage-rounded {logit_row['top1_storage_rounded_vs_float64']:.0%}")
    return {"size": size, "layers": layers, "config": config.name, "prompt": prompt, "seed": seed,
            "instructions": len(program.instructions), "per_layer": rows, "logits": logit_row,
            "seconds": time.perf_counter() - started}


def run(out_dir: pathlib.Path, layers: int | None = None, config_name: str = "default", iss: bool = True,
        size: str = "130m") -> dict:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = measure(size, layers=layers, config_name=config_name, iss=iss)
    suffix = ("" if size == "130m" else f"_{size}") + ("" if layers is None else f"_{layers}layers") \
        + ("" if iss else "_float")
    name = "model_sensitivity" if not suffix and config_name == "default" else \
        f"model_sensitivity_{config_name}{suffix}"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="130m", help="a marca generate --random size (default 130m)")
    parser.add_argument("--layers", type=int, default=None, help="the first N layers only (default all)")
    parser.add_argument("--config", default="default")
    parser.add_argument("--float-only", action="store_true", help="the two float64 references only (no ISS)")
    parser.add_argument("--out", default="build/bench")
    args = parser.parse_args()
    run(args.out, args.layers, args.config, iss=not args.float_only, size=args.size)
