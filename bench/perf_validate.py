"""Validation of the cycle model (``marca.perf``) against the RTL: (configuration, program) pairs run in
Verilator, their counters recorded, the model's cycles compared.

    marca bench perf_validate                 run the pairs on the RTL (several minutes: builds), record
                                              tests/data/rtl_cycles.json, print and write the comparison
    python -m marca.bench.perf_validate --compare
                                              compare the model with the recorded counts only (seconds)
    python -m marca.bench.perf_validate --fetch NAME [RUNS]
                                              fetch-only programs (HALT alone, 16 and 48 BARRIERs) on
                                              configuration NAME's RTL: once without pauses, RUNS times
                                              (default 30) with 20 % pauses on every channel and on AR
                                              only; the RTL's mean cycles beside the model's (a build and
                                              a few minutes)

The pairs: four configurations (2x2 FP16 32-bit bus, 2x2 FP32/BF16 64-bit bus, 2x2 BF16 32-bit bus, 4x4
BF16 256-bit bus) times programs of every kind: constrained-random programs
(``marca.golden.random_program``), the accelerator benchmark's three programs sized to the buffers
(``marca.bench.accelerator``), micro-programs (a dependent chain of one-beat instructions, strided DMA
rows), compiled Mamba mixers in prefill and decode (``marca.tb.mamba.prepare``) and a small whole model
(``compile_model``: embedding by GATHER, norms, two layers, LM head) in prefill and decode; each configuration
runs once without AXI pauses and once with random pauses on every channel.

The recorded JSON holds, per pair, the configuration, the pause probability, the program (encoded,
compressed) and the RTL's counters, so the test (tests/test_perf.py) needs no simulator. Rerun this command
when the RTL changes.
"""

import base64
import dataclasses
import json
import pathlib
import time
import zlib

from marca import isa
from marca.config import FPGA_SMALL, TINY, MarcaConfig

# Rewrites tests/data/rtl_cycles.json from Verilator runs: run by name when the RTL changes.
EXPLICIT_ONLY = True

__all__ = ["CONFIGS", "RECORD", "programs", "record", "compare", "recorded_config", "decode_program", "run",
           "fetch_experiment"]

RECORD = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "rtl_cycles.json"
DETERMINISTIC = ("instructions", "load_instructions", "store_instructions", "linear_instructions",
                 "elementwise_instructions", "nonlinear_instructions", "barrier_instructions", "fetch_bytes",
                 "dma_bytes_read", "dma_bytes_written", "linear_beats", "elementwise_beats", "nonlinear_lines",
                 "nonlinear_beats")
"""Counters the ISS defines exactly: a pair whose counts the model does not reproduce is stale."""

MIXED = dataclasses.replace(TINY, name="mixed", array_rows=2, array_cols=2, compute_format="fp32",
                            storage_format="bf16", axi_data_width=64, weight_buffer_kib=2,
                            activation_buffer_kib=2, state_buffer_kib=2, scratch_buffer_kib=2)


def _bench_config():
    from marca.bench.accelerator import BENCH_CONFIG
    return BENCH_CONFIG


def _configs():
    # The names (and so the build labels) of tests/test_accelerator.py and bench/accelerator.py: one build
    # each, shared with those.
    return {"tiny": TINY, "mixed": MIXED, "fpga-small": FPGA_SMALL, "bench-4x4-bus256": _bench_config()}


CONFIGS = ("tiny", "mixed", "fpga-small", "bench-4x4-bus256")
PAUSES = (0.0, 0.2)


def _micro_programs(config: MarcaConfig):
    """Small programs that isolate one mechanism each: a chain of dependent one-beat instructions (the
    scoreboard's distance), many short strided DMA rows (per-row costs), back-to-back barriers (dispatch)."""
    from marca.isa import Barrier, Buffer, Elementwise, ElementwiseOp, Halt, Load, Store
    lanes, size = config.lanes, config.storage_bytes
    data = 4096
    load = Load(memory_address=data, row_count=4, row_elements=lanes, memory_row_stride=lanes * size,
                buffer=Buffer.ACTIVATION, buffer_address=0, buffer_row_stride=lanes)
    chain = [load, Barrier()]
    for _ in range(24):
        chain.append(Elementwise(op=ElementwiseOp.ADD, outer_count=1, inner_count=1, dst_buffer=Buffer.ACTIVATION,
                                 dst_address=0, a_buffer=Buffer.ACTIVATION, a_address=0,
                                 b_buffer=Buffer.ACTIVATION, b_address=lanes))
    chain += [Barrier(), Store(memory_address=data + 2048, row_count=1, row_elements=lanes, memory_row_stride=0,
                               buffer=Buffer.ACTIVATION, buffer_address=0, buffer_row_stride=0), Halt()]
    rows = [Load(memory_address=data, row_count=24, row_elements=3, memory_row_stride=5 * size,
                 buffer=Buffer.SCRATCH, buffer_address=1, buffer_row_stride=3),
            Barrier(),
            Store(memory_address=data + 2048, row_count=16, row_elements=5, memory_row_stride=7 * size,
                  buffer=Buffer.SCRATCH, buffer_address=0, buffer_row_stride=4),
            Barrier(), Halt()]
    barriers = [Barrier()] * 16 + [Halt()]
    return {"micro-chain": chain, "micro-dma-rows": rows, "micro-barriers": barriers}


def _image(instructions, size=16384, seed=7):
    import random
    rng = random.Random(seed)
    memory = bytearray(rng.getrandbits(8) & 0x3F for _ in range(size))   # small finite values
    program = isa.encode_program(instructions)
    memory[:len(program)] = program
    return bytes(memory)


def programs(name: str) -> dict:
    """{program name: (instructions, memory image, program address, decode steps)} for configuration
    ``name``; ``decode steps`` > 1 runs the image that many times (a decode chain)."""
    from marca.bench import accelerator as bench
    from marca.golden.random_program import random_program
    from marca.tb import mamba
    config = _configs()[name]
    out = {}
    for seed in (1, 2, 3):
        generated = random_program(config, seed=seed, length=30, weights={"gather": 0})
        out[f"random-{seed}"] = (generated.instructions, generated.memory, generated.program_address, 1)
    small = config.weight_buffer_kib <= 4
    sizes = dict(gemv=dict(outputs=16, inputs=128, block_chunks=4) if small else {},
                 chain=dict(lines=min(64, isa.buffer_lines(config, isa.Buffer.SCRATCH)), steps=12) if small else {},
                 exp=dict(lines=32, chunk_lines=16) if small else {})
    if config.lanes * config.compute_bytes * 32 > config.scratch_buffer_kib * 1024:
        sizes["exp"] = dict(lines=16, chunk_lines=8)
    for key, function in (("gemv", bench.gemv_streamed), ("chain", bench.elementwise_chain),
                          ("exp", bench.exp_long)):
        instructions, memory, _ = function(config, **sizes[key])
        out[f"bench-{key}"] = (instructions, memory, 0, 1)
    for key, instructions in _micro_programs(config).items():
        out[key] = (instructions, _image(instructions), 0, 1)
    d_model = 32 if name == "bench-4x4-bus256" else 16
    case = mamba.MixerCase(name="mixer", config=config, d_model=d_model, d_state=8 if small else 16,
                           length=8, seed=11)
    prepared = mamba.prepare(case)
    out["mamba-prefill"] = (prepared.prefill.instructions, prepared.prefill_image,
                            prepared.prefill.program_address, 1)
    out["mamba-decode"] = (prepared.decode.instructions, prepared.decode_first_image,
                           prepared.decode.program_address, 1)
    out.update(_model_programs(config, d_model))
    return out


def _model_programs(config: MarcaConfig, d_model: int) -> dict:
    """A small whole model (``compile_model``: GATHER embedding, 2 layers of RMSNorm, mixer and residual,
    the final norm and the LM head) in prefill (4 tokens) and decode. Both run from the compiled image
    (ids 0, zero states): the programs are straight-line, so their timing does not depend on the values."""
    import torch
    import transformers
    from marca.compiler import compile_model
    mamba_config = transformers.MambaConfig(hidden_size=d_model, num_hidden_layers=2, vocab_size=40, state_size=8,
                                            intermediate_size=2 * d_model, time_step_rank=max(1, d_model // 16))
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(mamba_config).to(torch.float64).eval()
    compiled = compile_model(model, config=config, prompt_length=4)
    return {f"model-{mode}": (compiled.programs[mode].instructions, bytes(compiled.memory),
                              compiled.programs[mode].address, 1) for mode in ("prefill", "decode")}


def encode_program(instructions) -> str:
    return base64.b64encode(zlib.compress(isa.encode_program(instructions), 9)).decode()


def decode_program(text: str) -> list:
    return isa.decode_program(zlib.decompress(base64.b64decode(text)))


def _run_config(name: str, pause: float) -> dict:
    """Run every program of configuration ``name`` on its RTL build with ``pause``; {program: counters}."""
    from marca import sim
    from marca.tb import mamba
    config = _configs()[name]
    build_dir = mamba.build_accelerator(config)
    label = f"perf-validate-{'pause' if pause else 'nopause'}"
    folder = (build_dir / label).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    jobs, memory_size, listing = [], 0, programs(name)
    for program, (_, memory, address, _) in listing.items():
        (folder / f"{program}.bin").write_bytes(memory)
        jobs.append({"name": f"{program}/run", "memory": str(folder / f"{program}.bin"),
                     "program_address": address, "steps": [{"patches": [], "out": str(folder / f"{program}.out")}]})
        memory_size = max(memory_size, len(memory))
    results_file = folder / "results.json"
    results_file.unlink(missing_ok=True)
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "results": str(results_file)}, indent=1))
    params = {"config": config.to_dict(), "spec": str(spec), "pause": pause, "seed": 5,
              "memory_bits": max(12, (memory_size + 1).bit_length()), "poll_cycles": 50_000, "progress": None}
    sim.run(build_dir, "accelerator", "marca.tb.mamba", testcase="mixer_jobs", name=label, params=params)
    measured = {}
    for entry in json.loads(results_file.read_text()):
        if entry["error"]:
            raise AssertionError(f"{name}/{entry['job']}: the RTL stopped with error {entry['error']}")
        measured[entry["job"].split("/")[0]] = entry["counters"]
    return {program: {"program": encode_program(listing[program][0]), "counters": measured[program]}
            for program in listing}


def record(path: pathlib.Path = RECORD, configs=CONFIGS, pauses=PAUSES) -> dict:
    """Run every pair of ``configs`` x ``pauses`` on the RTL and write the recorded counts to ``path``
    (pairs of other configurations already recorded there are kept)."""
    kept = []
    if path.exists():
        kept = [pair for pair in json.loads(path.read_text())["pairs"]
                if not (pair["config"]["name"] in configs and pair["pause"] in pauses)]
    pairs = []
    for name in configs:
        for pause in pauses:
            started = time.time()
            for program, entry in _run_config(name, pause).items():
                pairs.append({"config": _configs()[name].to_dict(), "pause": pause, "program_name": program,
                              **entry})
            print(f"[perf_validate] {name} pause {pause}: {time.time() - started:.0f} s", flush=True)
            data = {"command": "marca bench perf_validate", "pairs": kept + pairs}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def recorded_config(fields: dict) -> MarcaConfig:
    """The configuration of a recorded pair. Fields the current MarcaConfig no longer has are dropped (the
    timing depends on the array, formats, buffers and bus); rerun the recording when the RTL changes."""
    known = {f.name for f in dataclasses.fields(MarcaConfig)}
    return MarcaConfig.from_dict({name: value for name, value in fields.items() if name in known})


def compare(data: dict) -> list[dict]:
    """The model against every recorded pair: a row per pair with both cycle counts and the error."""
    from marca import perf
    rows = []
    for pair in data["pairs"]:
        config = recorded_config(pair["config"])
        memory = dataclasses.replace(perf.TESTBENCH_MEMORY, pause=pair["pause"])
        report = perf.estimate(config, decode_program(pair["program"]), memory)
        rtl = pair["counters"]["cycles"]
        stale = [name for name in DETERMINISTIC if report.counters[name] != pair["counters"][name]]
        rows.append({"config": config.name, "program": pair["program_name"], "pause": pair["pause"], "stale": stale,
                     "instructions": pair["counters"]["instructions"], "rtl_cycles": rtl,
                     "model_cycles": report.cycles, "error": (report.cycles - rtl) / rtl,
                     "rtl": pair["counters"], "model": report.counters})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table; pairs whose deterministic counters the model no longer reproduces (the RTL changed
    since the recording) are marked stale and left out of the summary."""
    lines = ["| configuration | program | AXI pauses | instructions | RTL cycles | model cycles | error |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        mark = " (stale: RTL changed since)" if row.get("stale") else ""
        lines.append(f"| {row['config']} | {row['program']} | {row['pause']:.0%} | {row['instructions']:,} | "
                     f"{row['rtl_cycles']:,} | {row['model_cycles']:,} | {row['error']:+.1%}{mark} |")
    fresh = [row for row in rows if not row.get("stale")] or rows
    worst = max(fresh, key=lambda row: abs(row["error"]))
    mean = sum(abs(row["error"]) for row in fresh) / len(fresh)
    lines += ["", f"{len(fresh)} current pairs of {len(rows)}; worst error {worst['error']:+.1%} ({worst['config']} / {worst['program']}, "
                  f"pauses {worst['pause']:.0%}); mean absolute error {mean:.1%}."]
    return "\n".join(lines)


def run(out_dir: pathlib.Path, *, rerun: bool = True) -> dict:
    """Record (unless ``rerun`` is false), compare, print the table, write ``out_dir/perf_validate.json``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = record() if rerun else json.loads(RECORD.read_text())
    rows = compare(data)
    print(table(rows))
    fresh = [row for row in rows if not row["stale"]] or rows
    summary = {"pairs": len(rows), "current_pairs": len(fresh), "worst_error": max(abs(row["error"]) for row in fresh),
               "rows": [{key: value for key, value in row.items() if key not in ("rtl", "model")} for row in rows]}
    (out_dir / "perf_validate.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------------
# Fetch under pauses: one program repeated with fresh random pauses, the RTL's mean against the model
# ------------------------------------------------------------------------------------------------------

FETCH_PROGRAMS = {"halt": 0, "barriers-16": 16, "barriers-48": 48}
"""Fetch-only programs: this many BARRIERs, then HALT."""

try:
    import cocotb as _cocotb
except ImportError:          # the simulator extras are not installed: the RTL side is unavailable
    _cocotb = None

if _cocotb is not None:
    @_cocotb.test()
    async def fetch_runs(dut):
        """Run each job ``repeat`` times, pauses (``pause``) only on the named ``channels`` of the memory;
        write every run's counters to ``out``."""
        import random as _random
        from marca.sim import tb_params
        from marca.tb.accelerator import AcceleratorTB
        from marca.tb.axi_ram import random_pauses
        params = tb_params()
        tb = AcceleratorTB(dut, dict(params, pause=0.0))
        rng = _random.Random(params["seed"])
        channels = {"aw": tb.ram.write_if.aw_channel, "w": tb.ram.write_if.w_channel,
                    "b": tb.ram.write_if.b_channel, "ar": tb.ram.read_if.ar_channel,
                    "r": tb.ram.read_if.r_channel}
        if params["pause"]:
            for name in params["channels"]:
                generator = random_pauses(_random.Random(rng.random()), params["pause"])
                channels[name].set_pause_generator(generator)
        await tb.reset()
        results = []
        for job in params["jobs"]:
            memory = pathlib.Path(job["memory"]).read_bytes()
            for _ in range(job["repeat"]):
                _, _, counters, _, _ = await tb.run(memory, 0)
                results.append({"job": job["name"], "cycles": counters["cycles"]})
        pathlib.Path(params["out"]).write_text(json.dumps(results))


def fetch_experiment(name: str, runs: int = 30) -> list[dict]:
    """:data:`FETCH_PROGRAMS` on configuration ``name``'s RTL without pauses (once: it is deterministic) and
    ``runs`` times each with 20 % pauses on every channel (as the recording) and on AR only; rows of the
    RTL's mean and standard deviation beside the model's cycles. Prints a table."""
    import statistics
    from marca import perf, sim
    from marca.isa import Barrier, Halt
    from marca.tb import mamba
    config = _configs()[name]
    build_dir = mamba.build_accelerator(config)
    folder = (build_dir / "perf-validate-fetch").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    programs_ = {key: [Barrier()] * count + [Halt()] for key, count in FETCH_PROGRAMS.items()}
    rows = []
    settings = (("none", 0.0, [], 1), ("all", 0.2, ["aw", "w", "b", "ar", "r"], runs), ("ar", 0.2, ["ar"], runs))
    for label, pause, channels, repeat in settings:
        jobs = []
        for key, instructions in programs_.items():
            (folder / f"{key}.bin").write_bytes(_image(instructions))
            jobs.append({"name": key, "memory": str(folder / f"{key}.bin"), "repeat": repeat})
        out = folder / f"{label}.json"
        params = {"config": config.to_dict(), "pause": pause, "channels": channels, "seed": 5, "jobs": jobs,
                  "memory_bits": 14, "out": str(out)}
        sim.run(build_dir, "accelerator", "marca.bench.perf_validate", testcase="fetch_runs",
                name=f"perf-validate-fetch-{label}", params=params)
        measured = json.loads(out.read_text())
        for key, instructions in programs_.items():
            cycles = [entry["cycles"] for entry in measured if entry["job"] == key]
            # The model has one pause probability for every channel; AR-only pauses are not its case.
            memory = dataclasses.replace(perf.TESTBENCH_MEMORY, pause=pause)
            model = perf.estimate(config, instructions, memory) if label != "ar" else None
            rows.append({"config": name, "program": key, "pauses": label, "runs": len(cycles),
                         "rtl_mean": statistics.mean(cycles),
                         "rtl_sd": statistics.stdev(cycles) if len(cycles) > 1 else 0.0,
                         "model": model.cycles if model else None})
    print("| configuration | program | pauses (20 %) | runs | RTL cycles, mean (sd) | model cycles |")
    print("|---|---|---|---:|---:|---:|")
    for row in rows:
        model = f"{row['model']:,}" if row["model"] is not None else "-"
        print(f"| {row['config']} | {row['program']} | {row['pauses']} | {row['runs']} | "
              f"{row['rtl_mean']:,.1f} ({row['rtl_sd']:.1f}) | {model} |")
    return rows


if __name__ == "__main__":
    # --compare: the recorded counts only; --config NAME ...: record only these configurations.
    from marca.bench import command_line
    arguments = command_line(__doc__, ("--fetch", "--config", "--out", "--compare"))
    if "--fetch" in arguments:      # --fetch NAME [RUNS]
        rest = arguments[arguments.index("--fetch") + 1:]
        fetch_experiment(rest[0], int(rest[1]) if len(rest) > 1 else 30)
    elif "--config" in arguments:     # --config NAME ... [--out PATH]
        out = pathlib.Path(arguments[arguments.index("--out") + 1]) if "--out" in arguments else RECORD
        names = arguments[arguments.index("--config") + 1:]
        record(out, configs=tuple(names[:names.index("--out")] if "--out" in names else names))
    else:
        run(pathlib.Path("build/bench"), rerun="--compare" not in arguments)
