"""Paper-scale performance of the generated accelerator from the cycle model (``marca.perf``), for the
released Mamba sizes (docs/performance.md).

    marca bench scale            (or python -m marca.bench.scale [out_dir] [--quick] [--full]
                                  [--sizes 130m,370m] [--configs default] [--skip SIZE:SCENARIO,...]
                                  [--no-sweep] [--tables] [--resume])

``--quick``: 130m only; ``--full``: buffer management off and the `default` preset for every size (not only
the secondary sizes); ``--sizes``: these sizes; ``--configs``: only these presets' rows (``--configs default``:
the `default` preset's rows for every size of ``--sizes``);
``--skip``: leave these rows out (e.g. ``130m:prefill-2048``); ``--no-sweep``: no design sweep;
``--tables``: remake the tables and pictures from ``out_dir/scale.json`` without running; ``--resume``:
run only the rows and scenarios ``out_dir/scale.json`` lacks.

For each size (130m .. 2.8b, shapes from ``MambaDims``; weights are zeros of the right shapes: a program's
timing does not depend on the values, and a 2.8b model's FP32 weights would not fit this machine), each
configuration (``paper``, ``default``) and each memory system (HBM-class, DDR-class; the clock and the
bandwidths are :data:`CLOCK_HZ` and :data:`MEMORIES`):

* one mixer layer is compiled (``marca.compiler.compile_mixer``) for a prefill of L = 512 and 2048 tokens,
  a decode step, and a batched decode step of 16 sequences (``batch=16``: every weight read shared, each
  sequence's states its own), with both buffer management strategies on and off;
* the LM head (vocabulary x d_model) is a streamed GEMV/GEMM program (:func:`lm_head_program`) run per
  decoded token, once per prefill (the last token's logits);
* the model's cycles are layers x one layer + the head. Not included: the embedding lookup, the RMSNorms
  and residual adds (a few element-wise beats per token and layer).

Writes ``scale.json``, ``scale-roofline.png`` and ``scale-sweep.png`` to ``out_dir`` and prints the tables
of docs/performance.md.
"""

import base64
import dataclasses
import functools
import hashlib
import json
import pathlib
import time
import zlib

from marca import isa, perf
from marca.config import DEFAULT, PAPER, MarcaConfig
from marca.isa import Barrier, Buffer, Halt, Linear, Load, Store

__all__ = ["SIZES", "VOCAB", "CLOCK_HZ", "MEMORIES", "SCENARIOS", "lm_head_program", "layer_program",
           "model_run", "run"]

SIZES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}
"""Released Mamba-1 sizes: (d_model, layers); d_state 16, d_conv 4, expand 2, dt_rank ceil(d_model / 16)."""
VOCAB = 50280
CLOCK_HZ = 1.0e9          # MARCA's clock (28 nm, 1 GHz)
MEMORIES = {
    # name: (bytes per second, read latency in ns, what it stands for)
    "hbm": (1.555e12, 100.0, "HBM2-class, 1555 GB/s (an A100 40 GB's)"),
    "ddr": (51.2e9, 80.0, "DDR4-3200, two channels, 51.2 GB/s"),
}
SCENARIOS = {"prefill-512": ("prefill", 512), "prefill-2048": ("prefill", 2048), "decode-b1": ("decode", 1),
             "decode-b16": ("decode", 16)}
"""Scenario: (compiled mode, tokens per program)."""


def memory_system(name: str) -> perf.MemorySystem:
    bandwidth, latency_ns, _ = MEMORIES[name]
    cycles = latency_ns * 1e-9 * CLOCK_HZ
    return perf.MemorySystem(read_latency=cycles, write_latency=cycles, bytes_per_cycle=bandwidth / CLOCK_HZ)


def _zeros(dims):
    import torch
    d, di, r, n = dims.d_model, dims.d_inner, dims.dt_rank, dims.d_state
    return {"in_proj.weight": torch.zeros(2 * di, d), "conv1d.weight": torch.zeros(di, 1, dims.d_conv),
            "conv1d.bias": torch.zeros(di), "x_proj.weight": torch.zeros(r + 2 * n, di),
            "dt_proj.weight": torch.zeros(di, r), "dt_proj.bias": torch.zeros(di),
            "A_log": torch.zeros(di, n), "D": torch.zeros(di), "out_proj.weight": torch.zeros(d, di)}


PROGRAM_CACHE = pathlib.Path("build") / "scale-programs"
"""Compiled layer programs are kept here (keyed by the configuration, the compiler's source and the
arguments), so a rerun only reruns the model; delete the folder to compile afresh."""


def _cache_key(config: MarcaConfig, *parts) -> str:
    # The compiler does not read the bus width (nor the name): one program serves every bus of the sweep.
    config = dataclasses.replace(config, name="any", axi_data_width=PAPER.axi_data_width)
    compiler = pathlib.Path(__file__).resolve().parents[1] / "compiler"
    sources = b"".join(path.read_bytes() for path in sorted(compiler.glob("*.py")))
    digest = hashlib.sha256(config.to_json().encode() + sources + repr(parts).encode()).hexdigest()[:16]
    return f"{config.array_rows}x{config.array_cols}-{'-'.join(map(str, parts))}-{digest}"


def _decode(code: bytes) -> tuple:
    """``isa.decode_program(code)`` with one instruction object per distinct word (a layer program of the
    small presets repeats a few thousand instructions millions of times: decoded once each, and one object
    each in memory)."""
    width = isa.INSTRUCTION_BYTES
    if len(code) % width:
        raise ValueError(f"program length must be a multiple of {width} bytes, not {len(code)}")
    seen = {}
    out = []
    for k in range(0, len(code), width):
        word = code[k:k + width]
        instruction = seen.get(word)
        if instruction is None:
            instruction = seen[word] = isa.decode(int.from_bytes(word, "little"))
        out.append(instruction)
    return tuple(out)


@functools.lru_cache(maxsize=4)
def layer_program(config: MarcaConfig, d_model: int, mode: str, tokens: int, buffer_management: bool):
    """(instructions, state bytes) of one compiled mixer layer (weights: zeros of the right shapes)."""
    path = PROGRAM_CACHE / (_cache_key(config, d_model, mode, tokens, buffer_management) + ".json")
    if path.exists():
        cached = json.loads(path.read_text())
        return _decode(zlib.decompress(base64.b64decode(cached["program"]))), cached["state_bytes"]
    from marca.compiler import CompileOptions, compile_mixer
    from marca.reference.mamba import MambaDims
    dims = MambaDims(d_model=d_model)
    options = CompileOptions(intra_operation=buffer_management, inter_operation=buffer_management)
    compiled = compile_mixer(_zeros(dims), config, mode=mode, length=tokens if mode == "prefill" else None,
                             batch=tokens if mode == "decode" else 1, options=options)
    state_bytes = compiled.batch * sum(place.rows * place.row_elements * config.compute_bytes
                                       for place in (compiled.conv_state, compiled.ssm_state))
    path.parent.mkdir(parents=True, exist_ok=True)
    from marca.compiler.emit import encode_fast      # the emitter range-checked every field
    packer, chunks = zlib.compressobj(6), []
    for first in range(0, len(compiled.instructions), 1 << 20):     # tens of millions of words: in pieces
        chunks.append(packer.compress(encode_fast(compiled.instructions[first:first + (1 << 20)])))
    encoded = base64.b64encode(b"".join(chunks) + packer.flush()).decode()
    path.write_text(json.dumps({"program": encoded, "state_bytes": state_bytes}))
    return tuple(compiled.instructions), state_bytes


def lm_head_program(config: MarcaConfig, vocab: int, d_model: int, tokens: int) -> list:
    """A streamed LM head: ``tokens`` vectors of ``d_model`` (storage format) times the vocab x d_model
    matrix (pre-tiled in memory, row tile by row tile), logits stored. Weight blocks are double-buffered:
    the DMA loads block ``b + 1`` while the array works on block ``b``."""
    R, C, lanes, size = config.array_rows, config.array_cols, config.lanes, config.storage_bytes
    chunks = -(-d_model // C)
    row_tiles = -(-vocab // R)
    half = isa.buffer_lines(config, Buffer.WEIGHT) // 2
    activation_lines = isa.buffer_lines(config, Buffer.ACTIVATION) // 2
    block = max(1, min(row_tiles, half // chunks, activation_lines * lanes // (R * tokens)))
    blocks = -(-row_tiles // block)
    weights = 1 << 20
    logits = weights + row_tiles * chunks * lanes * size

    def load(b):
        tiles = min(block, row_tiles - b * block)
        return Load(memory_address=weights + b * block * chunks * lanes * size, row_count=tiles * chunks,
                    row_elements=lanes, memory_row_stride=lanes * size, buffer=Buffer.WEIGHT,
                    buffer_address=(b % 2) * half * lanes, buffer_row_stride=lanes)

    program = [Load(memory_address=4096, row_count=tokens, row_elements=d_model, memory_row_stride=d_model * size,
                    buffer=Buffer.SCRATCH, buffer_address=0, buffer_row_stride=chunks * C), load(0), Barrier()]
    for b in range(blocks):
        tiles = min(block, row_tiles - b * block)
        if b + 1 < blocks:
            program.append(load(b + 1))
        output = (b % 2) * activation_lines * lanes
        program += [Linear(matrix_buffer=Buffer.WEIGHT, matrix_address=(b % 2) * half * lanes,
                           chunk_count=chunks, row_tile_count=tiles, token_count=tokens,
                           vector_buffer=Buffer.SCRATCH, vector_address=0, vector_token_stride=chunks,
                           output_buffer=Buffer.ACTIVATION, output_address=output, output_token_stride=tiles),
                    Barrier(),
                    Store(memory_address=logits + b * block * R * size, row_count=tokens, row_elements=tiles * R,
                          memory_row_stride=vocab * size, buffer=Buffer.ACTIVATION, buffer_address=output,
                          buffer_row_stride=tiles * R)]
    program += [Barrier(), Halt()]
    return program


def _combine(parts):
    """Sum of (report, times) pairs into cycles and counters."""
    counters = {}
    for report, times in parts:
        for name, value in report.counters.items():
            counters[name] = counters.get(name, 0) + value * times
    return counters


def model_run(config: MarcaConfig, size: str, scenario: str, memory: perf.MemorySystem,
              buffer_management: bool = True) -> dict:
    """Cycles, tokens/s, PE utilization and DRAM bytes per token of the whole model (layers x one layer +
    the LM head) for one scenario."""
    d_model, layers = SIZES[size]
    mode, tokens = SCENARIOS[scenario]
    instructions, _ = layer_program(config, d_model, mode, tokens, buffer_management)
    layer = perf.estimate(config, instructions, memory, timeline=False)
    head_tokens = 1 if scenario.startswith("prefill") else tokens
    head = perf.estimate(config, lm_head_program(config, VOCAB, d_model, head_tokens), memory, timeline=False)
    counters = _combine([(layer, layers), (head, 1)])
    cycles = counters["cycles"]
    beats = counters["array_linear_cycles"] + counters["array_elementwise_cycles"]
    dram = counters["dma_bytes_read"] + counters["dma_bytes_written"]
    return {"cycles": cycles, "tokens": tokens, "tokens_per_second": tokens * CLOCK_HZ / cycles,
            "pe_utilization": beats / cycles, "dram_bytes_per_token": dram / tokens,
            "pe_operations": beats * config.lanes, "dram_bytes": dram,
            "layer_cycles": layer.cycles, "head_cycles": head.cycles, "layer_instructions": len(instructions)}


def _table(results, memory_name, buffer_management=True) -> str:
    lines = [f"Memory: {MEMORIES[memory_name][2]}; clock {CLOCK_HZ / 1e9:g} GHz; buffer management "
             f"{'on' if buffer_management else 'off'}.", "",
             "| config | size | prefill 512 tok/s | prefill 2048 tok/s | decode b=1 tok/s | decode b=16 tok/s | "
             "PE util (prefill 512 / 2048 / decode b=1) | DRAM B/token (prefill 512 / 2048 / decode b=1) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, entry in results.items():
        config, size, memory, managed = key.split("|")
        if memory != memory_name or managed != str(buffer_management) or "error" in entry:
            continue
        def value(scenario, key, spec):
            if scenario not in entry:
                return "-"
            number = entry[scenario][key]
            return format(number, ",.1f" if spec == "rate" and number < 100 else ",.0f" if spec == "rate" else spec)
        lines.append(f"| {config} | {size} | {value('prefill-512', 'tokens_per_second', 'rate')} | "
                     f"{value('prefill-2048', 'tokens_per_second', 'rate')} | "
                     f"{value('decode-b1', 'tokens_per_second', ',.1f')} | "
                     f"{value('decode-b16', 'tokens_per_second', ',.1f')} | "
                     f"{value('prefill-512', 'pe_utilization', '.1%')} / {value('prefill-2048', 'pe_utilization', '.1%')} / "
                     f"{value('decode-b1', 'pe_utilization', '.1%')} | "
                     f"{value('prefill-512', 'dram_bytes_per_token', ',.0f')} / "
                     f"{value('prefill-2048', 'dram_bytes_per_token', ',.0f')} / "
                     f"{value('decode-b1', 'dram_bytes_per_token', ',.0f')} |")
    return "\n".join(lines)


def _roofline(results, out: pathlib.Path, config: MarcaConfig, memory_name: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    peak = config.lanes * CLOCK_HZ
    bandwidth = min(MEMORIES[memory_name][0], config.axi_data_width / 8 * CLOCK_HZ)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    intensities = [2 ** k for k in range(-4, 14)]
    axes.loglog(intensities, [min(peak, bandwidth * x) for x in intensities], "k-",
                label=f"roof: {peak / 1e12:.2f} T lane-ops/s, {bandwidth / 1e9:.0f} GB/s")
    for size in SIZES:
        entry = results.get(f"{config.name}|{size}|{memory_name}|True")
        if not entry or "error" in entry:
            continue
        for scenario, marker in (("prefill-2048", "o"), ("prefill-512", "D"), ("decode-b1", "s"), ("decode-b16", "^")):
            if scenario not in entry:
                continue
            s = entry[scenario]
            x = s["pe_operations"] / s["dram_bytes"]
            y = s["pe_operations"] / (s["cycles"] / CLOCK_HZ)
            axes.loglog([x], [y], marker, label=f"{size} {scenario}")
    axes.set_xlabel("operational intensity (PE lane operations per DRAM byte)")
    axes.set_ylabel("attained lane operations per second")
    axes.set_title(f"Roofline: {config.name} ({config.array_rows}x{config.array_cols}), {memory_name}, modelled")
    axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def _sweep(out_dir: pathlib.Path, size: str, memory_name: str, arrays, bus_widths) -> dict:
    """Array size x bus width (the bandwidth the accelerator can draw, capped by the DRAM) for one model."""
    bandwidth, latency_ns, _ = MEMORIES[memory_name]
    grid = {}
    for rows in arrays:
        base = dataclasses.replace(PAPER, name=f"paper-{rows}x{rows}", array_rows=rows, array_cols=rows)
        for width in bus_widths:
            config = dataclasses.replace(base, axi_data_width=width)
            memory = memory_system(memory_name)
            grid[f"{rows}x{rows}|{width}"] = {
                scenario: model_run(config, size, scenario, memory)["tokens_per_second"]
                for scenario in ("prefill-512", "decode-b1")}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, scenario in zip(axes, ("prefill-512", "decode-b1")):
        for rows in arrays:
            axis.plot([w / 8 for w in bus_widths], [grid[f"{rows}x{rows}|{w}"][scenario] for w in bus_widths],
                      "o-", label=f"{rows}x{rows} PEs")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("bus bytes per cycle (GB/s at 1 GHz)")
        axis.set_ylabel("tokens / s")
        axis.set_title(f"{size} {scenario} ({memory_name})")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / "scale-sweep.png", dpi=120)
    plt.close(figure)
    return grid


SECONDARY_SIZES = ("130m",)
"""Sizes of the secondary rows (buffer management off; the ``default`` preset) in a normal run; ``--full``
runs them for every size (the big layers on the small preset's buffers compile for many minutes)."""

PUBLISHED = {
    "cpu": "463x vs a Xeon 8358P (whole CPU)",
    "gpu": "up to 11.66x vs an A100",
    "2.8b": "1.38x vs an A100 on Mamba-2.8B (an independent accelerator paper)",
}
"""MARCA's published speed-ups (its own baselines, not reproduced here), beside the table's ratios."""


def _plan(quick: bool, full: bool = False, sizes=None, skip=(), configs=None):
    """(config, size, memory, buffer management, scenarios) in the order they run; ``skip``: (size,
    scenario) pairs left out (``--skip 1.4b:prefill-2048,...``: the long compiles); ``configs``: only the
    rows of these presets (by name; naming ``default`` gives its rows for every size)."""
    plan = _full_plan(quick, full, sizes, configs)
    return [(config, size, memory, managed, tuple(s for s in scenarios if (size, s) not in set(skip)))
            for config, size, memory, managed, scenarios in plan
            if configs is None or config.name in configs]


def _full_plan(quick: bool, full: bool = False, sizes=None, configs=None):
    sizes = ["130m"] if quick else list(sizes or SIZES)
    secondary = sizes if full else [size for size in sizes if size in SECONDARY_SIZES]
    default_sizes = sizes if configs and DEFAULT.name in configs else secondary
    plan = []
    for size in sizes:
        plan.append((PAPER, size, "hbm", True, tuple(SCENARIOS)))
        plan.append((PAPER, size, "ddr", True, tuple(SCENARIOS)))
    for size in secondary:
        plan.append((PAPER, size, "hbm", False, ("prefill-512", "decode-b1")))
    for size in default_sizes:
        plan.append((DEFAULT, size, "hbm", True, tuple(SCENARIOS)))
        plan.append((DEFAULT, size, "ddr", True, tuple(SCENARIOS)))
    return plan


def comparison_table(results: dict, processor: dict | None) -> str:
    """The accelerator (modelled, ``paper``, HBM-class memory) beside the processors' measured whole-model
    rows of ``marca bench processor`` (``processor.json``'s ``models``), with the ratios and MARCA's
    published ones."""
    measured = {}
    for row in (processor or {}).get("models", []):
        if "skipped" not in row:
            measured[(row["target"], row["size"], row["dtype"])] = row
    gpu = next((row for row in (processor or {}).get("models", []) if row.get("target") == "cuda"), None)
    gpu_note = gpu.get("skipped", "") if gpu and "skipped" in gpu else ("no processor.json" if not processor else "")
    lines = ["| size | scenario | accelerator, paper, HBM-class (modelled) tok/s | CPU 1 thread fp32 (measured) tok/s "
             "| ratio | CPU 1 thread bf16 tok/s | ratio | GPU | MARCA published |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for size in SIZES:
        entry = results.get(f"paper|{size}|hbm|True")
        if not entry or "error" in entry:
            continue
        for scenario, key, label in (("prefill-512", "prefill_tokens_per_s", "prefill 512"),
                                     ("decode-b1", "decode_tokens_per_s", "decode batch 1")):
            if scenario not in entry:          # left out of this run (--skip)
                continue
            accelerator = entry[scenario]["tokens_per_second"]
            cells = []
            for dtype in ("float32", "bfloat16"):
                row = measured.get(("cpu-1thread", size, dtype))
                if row:
                    cells += [f"{row[key]:,.2f}", f"{accelerator / row[key]:,.0f}x"]
                else:
                    cells += ["not measured", "-"]
            gpu_cell = "; ".join(f"{row['dtype']} {row[key]:,.1f} ({accelerator / row[key]:.2f}x)"
                                 for (target, s, _), row in measured.items() if target == "cuda" and s == size) \
                or f"not measured ({gpu_note or 'no CUDA device'})"
            lines.append(f"| {size} | {label} | {accelerator:,.1f} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | "
                         f"{gpu_cell} | {PUBLISHED['2.8b'] if size == '2.8b' else PUBLISHED['cpu'] + '; ' + PUBLISHED['gpu']} |")
    return "\n".join(lines)


def run(out_dir: pathlib.Path, *, quick: bool = False, full: bool = False, sizes=None, skip=(),
        sweep: bool = True, tables_only: bool = False, resume: bool = False, configs=None) -> dict:
    """Model the plan, print the tables, write ``scale.json`` and the pictures. ``tables_only``: rerun
    nothing, make the tables, the comparison and the roofline from ``out_dir/scale.json`` (``--tables``:
    for a run stopped before its end; its results are written after every row). ``resume``: keep the rows
    of ``out_dir/scale.json`` and run only the plan's rows and scenarios it lacks (``--resume``); ``configs``:
    only these presets' rows (``--configs``)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {}
    summary = {"clock_hz": CLOCK_HZ, "memories": MEMORIES, "vocab": VOCAB, "sizes": SIZES, "results": results}
    summary["plan"] = {"quick": quick, "full": full, "sizes": list(sizes or SIZES), "skip": [list(p) for p in skip],
                       "configs": configs}
    if tables_only or resume:
        summary = json.loads((out_dir / "scale.json").read_text())
        results = summary["results"]
    plan = [] if tables_only else _plan(quick, full, sizes, skip, configs)
    for config, size, memory_name, managed, scenarios in plan:
        key = f"{config.name}|{size}|{memory_name}|{managed}"
        entry = dict(results.get(key, {})) if resume else {}
        if "error" in entry or all(scenario in entry for scenario in scenarios):
            continue
        memory = memory_system(memory_name)
        try:
            for scenario in scenarios:
                if scenario in entry:
                    continue
                began, cpu = time.time(), time.process_time()
                entry[scenario] = model_run(config, size, scenario, memory, managed)
                entry[scenario]["wall_seconds"] = round(time.time() - began, 1)
                entry[scenario]["cpu_seconds"] = round(time.process_time() - cpu, 1)
                results[key] = {name: entry[name] for name in SCENARIOS if name in entry}
                (out_dir / "scale.json").write_text(json.dumps(summary, indent=1) + "\n")
        except ValueError as error:        # CompileError: the layer does not compile for this preset
            print(f"[scale] {config.name} {size}: not compiled ({error})", flush=True)
            results[key] = {"error": str(error)}
            continue
        print(f"[scale] {config.name} {size} {memory_name} buffer management {'on' if managed else 'off'}: "
              + ", ".join(f"{scenario} {value['tokens_per_second']:,.1f} tok/s ({value.get('cpu_seconds', '?')} "
                          "CPU s)" for scenario, value in results[key].items())
              + f" ({time.time() - started:.0f} s)", flush=True)
        (out_dir / "scale.json").write_text(json.dumps(summary, indent=1) + "\n")
    tables = "\n\n".join([_table(results, "hbm"), _table(results, "ddr"), _table(results, "hbm", False)])
    print(tables)
    processor_file = out_dir / "processor.json"
    processor = json.loads(processor_file.read_text()) if processor_file.exists() else None
    summary["comparison"] = comparison_table(results, processor)
    print("\nAccelerator vs processors (processors: " + (str(processor_file) if processor else "no processor.json: "
          "run `marca bench processor` first") + ")\n" + summary["comparison"])
    _roofline(results, out_dir / "scale-roofline.png", PAPER, "hbm")
    if sweep:
        summary["sweep"] = _sweep(out_dir, "130m", "hbm", (16, 32, 64), (128, 256, 512, 1024))
    summary["tables"] = tables + "\n\n" + summary["comparison"]
    if not tables_only:
        summary["wall_seconds"] = round(time.time() - started, 1)
    (out_dir / "scale.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    # python -m marca.bench.scale [out_dir] [--quick] [--full] [--sizes 130m,370m] [--configs default]
    #                             [--skip SIZE:SCENARIO,...] [--no-sweep] [--tables] [--resume]
    from marca.bench import command_line
    argv = command_line(__doc__, ("--quick", "--full", "--sizes", "--configs", "--skip", "--no-sweep", "--tables",
                                  "--resume"))

    def option(name):
        return argv[argv.index(name) + 1].split(",") if name in argv else None
    values = {a for name in ("--sizes", "--configs", "--skip") if name in argv for a in [argv[argv.index(name) + 1]]}
    arguments = [a for a in argv if not a.startswith("--") and a not in values]
    run(pathlib.Path(arguments[0] if arguments else "build/bench"), quick="--quick" in argv, full="--full" in argv,
        sizes=option("--sizes"), skip=[tuple(item.split(":")) for item in option("--skip") or []],
        sweep="--no-sweep" not in argv, tables_only="--tables" in argv, resume="--resume" in argv,
        configs=option("--configs"))
