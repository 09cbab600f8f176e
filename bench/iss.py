"""Benchmark: speed of the golden instruction-set simulator (docs/iss.md).

    python -m marca.bench.iss [out_dir]       (or ``marca bench iss``)
    marca bench iss --device cuda              (the device's figures alone: ``iss-cuda.json``)

Torch runs on one thread. Every figure is measured twice: wall-clock seconds, and the CPU seconds of this
process (``time.process_time``), which on a shared, loaded machine stay close to what an idle core would
take while wall time grows with the load; rates are given per CPU second ("M/s") and the load average is
recorded beside every figure. CUDA figures are wall time (after ``torch.cuda.synchronize``).
**Lane operations** are the
PE array's work: ``R·C`` per LINEAR, ELEMENTWISE or NONLINEAR beat (a LINEAR lane operation is one
multiply-add), i.e. ``(linear_beats + elementwise_beats + nonlinear_beats) · R·C`` from the counters.

* **per class**: lane operations per second of single LINEAR (GEMV and GEMM), ELEMENTWISE (scan-like
  MULADD with row broadcast, plain MUL) and NONLINEAR (exp, SiLU, softplus) instructions, and bytes per
  second of a LOAD and a STORE, at the ``paper``
  preset's size (32 x 32 array), fast machine, CPU; the reference machine (the simulator before issue 12,
  kept as the oracle) on the same instructions;
* **fixed cost**: microseconds per instruction of a program of 1-beat instructions on the ``default``
  preset, with the plan cache warm (a rerun) and cold (first sight of every instruction);
* **mixers**: the issue's four mixer cases (``paper`` d_model 768 prefill 4 and 32 tokens, ``default``
  d_model 128 prefill 16 and a decode step) and three on the 2x2 presets with BF16 and FP16 compute
  (``fpga-small`` d_model 128 prefill 16 and decode, ``tiny`` d_model 64 decode), fast and reference (the 32-token ``paper`` prefill only fast
  unless MARCA_BENCH_ISS_SLOW=1), and the fast machine with the hazard and undefined-read checks off, to
  price them; each after a first, untimed-for-the-table run ("first s") that also builds what a process
  makes once per configuration (NONLINEAR and LOAD tables, the compiled LINEAR loop);
* **mamba-130m decode step**: one mixer layer of mamba-130m's shape (d_model 768, d_state 16, random
  weights) as a decode step on the ``paper`` preset, measured, and predicted from the per-class rates and
  the fixed cost;
* **mamba-130m decode step, whole model** (with ``MARCA_BENCH_ISS_MODEL=1``; compiling takes minutes): the
  24-layer model with its LM head through ``marca.compiler.model.compile_model``, two decode steps of one
  session (the first plans every instruction: predicted with the cold fixed cost; the second with the warm
  one), measured and predicted;
* **CUDA**: the mixers and per-class figures again with ``device="cuda"`` when a CUDA device is present;
  ``--device cuda`` (:func:`run_device`) measures the device alone, its fixed cost and the mamba-130m
  steps included, each mixer checked against the CPU machine.

Prints the tables and writes ``out_dir/iss.json``.
"""

import json
import os
import pathlib
import time

__all__ = ["run"]

MIXERS = [("paper", 768, "prefill", 4), ("paper", 768, "prefill", 32), ("default", 128, "prefill", 16),
          ("default", 128, "decode", None), ("fpga-small", 128, "prefill", 16), ("fpga-small", 128, "decode", None),
          ("tiny", 64, "decode", None)]
"""The issue's four cases, then the small configurations with other compute formats (BF16 on fpga-small,
FP16 on tiny), whose LINEARs take the rounded loop (golden/kernels.py)."""


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _lane_ops(counters: dict, lanes: int) -> int:
    return (counters["linear_beats"] + counters["elementwise_beats"] + counters["nonlinear_beats"]) * lanes


def _synchronize(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _class_machine(config, device, reference):
    """A machine with random storage-format data loaded in every buffer (its first 2^21 elements)."""
    import torch

    from marca import isa
    from marca.golden import fp, iss
    generator = torch.Generator().manual_seed(1)
    most = 1 << 21
    values = torch.randn(most, generator=generator, dtype=torch.float64)
    data = iss.pack_elements(fp.encode(values, config.storage_format), config.storage_bytes)
    ids = torch.randint(0, _GATHER_TABLE_ROWS, (_GATHER_ROWS,), generator=generator)
    data += iss.pack_elements(ids, isa.INDEX_BYTES)          # GATHER's ids, after the data
    machine = iss.ReferenceMachine(config, data) if reference else iss.Machine(config, data, device=device)
    for buffer in isa.Buffer:
        elements = min(isa.buffer_elements(config, buffer), most)
        for start in range(0, elements, 1 << 15):       # rows of at most 2^16 - 1 elements
            machine.execute(isa.Load(memory_address=start * config.storage_bytes, row_count=1,
                                     row_elements=min(1 << 15, elements - start), buffer=buffer,
                                     buffer_address=start))
    machine.execute(isa.Barrier())
    return machine


_GATHER_ROWS, _GATHER_TABLE_ROWS, _GATHER_WIDTH = 32, 2048, 768


def _class_cases(config):
    from marca import isa
    from marca.isa import Buffer, NonlinearFunction
    from marca.ops import Broadcast, ElementwiseOp
    lanes, R, C = config.lanes, config.array_rows, config.array_cols
    scan = dict(outer_count=24, inner_count=16, dst_outer_stride=16, dst_inner_stride=1)   # 768 x 16 states
    return {
        "linear gemv (J 48, K 24, T 1)": isa.Linear(chunk_count=24, row_tile_count=48, token_count=1,
                                                    vector_buffer=Buffer.ACTIVATION, vector_token_stride=24,
                                                    output_buffer=Buffer.SCRATCH, output_token_stride=48),
        "linear gemm (J 48, K 24, T 16)": isa.Linear(chunk_count=24, row_tile_count=48, token_count=16,
                                                     vector_buffer=Buffer.ACTIVATION, vector_token_stride=24,
                                                     output_buffer=Buffer.SCRATCH, output_token_stride=48),
        "elementwise muladd (row broadcast, 384 beats)": isa.Elementwise(
            op=ElementwiseOp.MULADD, dst_buffer=Buffer.SCRATCH, **scan,
            a_buffer=Buffer.ACTIVATION, a_broadcast=Broadcast.ROW, a_outer_stride=1,
            b_buffer=Buffer.STATE, b_outer_stride=16, b_inner_stride=1,
            c_buffer=Buffer.WEIGHT, c_outer_stride=16, c_inner_stride=1),
        "elementwise mul (384 beats)": isa.Elementwise(
            op=ElementwiseOp.MUL, dst_buffer=Buffer.SCRATCH, **scan,
            a_buffer=Buffer.STATE, a_outer_stride=16, a_inner_stride=1,
            b_buffer=Buffer.WEIGHT, b_outer_stride=16, b_inner_stride=1),
        "gather (32 rows of 768 from 2048)": isa.Gather(
            memory_address=0, row_count=_GATHER_ROWS, row_elements=_GATHER_WIDTH,
            memory_row_stride=_GATHER_WIDTH * config.storage_bytes, buffer=Buffer.ACTIVATION,
            buffer_row_stride=_GATHER_WIDTH, index_address=(1 << 21) * config.storage_bytes,
            table_rows=_GATHER_TABLE_ROWS),
        "load (storage -> compute, 2^20 elements)": isa.Load(memory_address=0, row_count=32,
                                                              row_elements=1 << 15,
                                                              memory_row_stride=config.storage_bytes << 15,
                                                              buffer=Buffer.WEIGHT,
                                                              buffer_row_stride=1 << 15),
        "store (compute -> storage, 2^19 elements)": isa.Store(memory_address=0, row_count=16,
                                                               row_elements=1 << 15,
                                                               memory_row_stride=config.storage_bytes << 15,
                                                               buffer=Buffer.SCRATCH,
                                                               buffer_row_stride=1 << 15),
        **{f"nonlinear {f.name.lower()} (24 lines)": isa.Nonlinear(function=f, line_count=24,
                                                                   src_buffer=Buffer.STATE,
                                                                   dst_buffer=Buffer.SCRATCH)
           for f in (NonlinearFunction.EXP, NonlinearFunction.SILU, NonlinearFunction.SOFTPLUS)},
    }, lanes, (R, C)


def _per_class(config, device: str, reference: bool, repeats: int) -> dict:
    from marca import isa
    from marca.golden.iss import COUNTER_NAMES
    from marca.isa import ErrorCode
    machine = _class_machine(config, device, reference)
    cases, lanes, _ = _class_cases(config)
    out = {}
    for name, instruction in cases.items():
        machine.execute(isa.Barrier())              # each case after the previous one's DMA or compute
        before = dict(machine.counters)
        code = machine.execute(instruction)          # warm: plan made, tables built
        if code != ErrorCode.NONE:
            raise AssertionError(f"{name}: {code.name}")
        _synchronize(device)
        best, best_cpu = None, None
        for _ in range(repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            machine.execute(instruction)
            _synchronize(device)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
            best = elapsed if best is None else min(best, elapsed)
            best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
        done = {k: (machine.counters[k] - before[k]) // (repeats + 1) for k in COUNTER_NAMES}
        ops = _lane_ops(done, lanes)
        moved = done["dma_bytes_read"] + done["dma_bytes_written"]
        timing = best if device.startswith("cuda") else max(best_cpu, 1e-6)
        out[name] = {"lane_operations": ops, "dma_bytes": moved, "seconds": best, "cpu_seconds": best_cpu,
                     "lane_operations_per_second": ops / timing, "dma_bytes_per_second": moved / timing,
                     "load": _load()}
    return out


def _fixed_cost(config, count: int = 300, device: str = "cpu", reference: bool = True) -> dict:
    """A program of ``count`` 1-beat element-wise instructions (distinct, so a cold run plans each)."""
    import torch

    from marca import isa
    from marca.golden import iss
    from marca.isa import Buffer
    from marca.ops import ElementwiseOp
    lanes = config.lanes
    program = [isa.Load(memory_address=0x10000, row_count=1, row_elements=4 * lanes, buffer=Buffer.STATE),
               isa.Barrier()]
    for k in range(count):
        program.append(isa.Elementwise(op=ElementwiseOp.MUL, outer_count=1, inner_count=1,
                                       dst_buffer=Buffer.SCRATCH, dst_address=(k % 64) * lanes,
                                       a_buffer=Buffer.STATE, a_address=(k % 4) * lanes,
                                       b_buffer=Buffer.STATE, b_address=((k // 4) % 4) * lanes))
    program.append(isa.Halt())
    memory = bytearray(0x10000 + 8 * lanes * config.storage_bytes)
    code = isa.encode_program(program)
    memory[:len(code)] = code
    values = torch.randn(4 * lanes, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    from marca.golden import fp
    data = iss.pack_elements(fp.encode(values, config.storage_format), config.storage_bytes)
    memory[0x10000:0x10000 + len(data)] = data
    out = {}
    for label in ("cold", "warm"):
        if label == "cold":
            iss._PLAN_CACHE.clear()
            iss._decode_word.cache_clear()
        started, started_cpu = time.perf_counter(), time.process_time()
        result, machine = iss.run_program(config, memory, device=device)
        machine.memory_bytes()          # on a device: waits for its work
        elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        out[label] = {"instructions": result.counters["instructions"],
                      "wall_microseconds_per_instruction": 1e6 * elapsed / result.counters["instructions"],
                      "microseconds_per_instruction": 1e6 * cpu / result.counters["instructions"],
                      "load": _load()}
    if not reference:
        return out
    started, started_cpu = time.perf_counter(), time.process_time()
    result, _ = iss.run_program(config, memory, reference=True)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    out["reference"] = {"wall_microseconds_per_instruction": 1e6 * elapsed / result.counters["instructions"],
                        "microseconds_per_instruction": 1e6 * cpu / result.counters["instructions"],
                        "load": _load()}
    return out


def _mixer(preset: str, d_model: int, mode: str, length):
    import torch

    from marca.compiler.mamba import compile_mixer
    from marca.config import PRESETS
    from marca.reference import mamba as reference
    config = PRESETS[preset]
    dims = reference.MambaDims(d_model=d_model)
    weights = reference.random_mixer_weights(dims, seed=1, dtype=torch.float64)
    compiled = compile_mixer(weights, config, mode=mode, length=length)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(compiled.length, d_model, generator=generator, dtype=torch.float64)
    return config, compiled, compiled.write_inputs(None, hidden)


def _mixers(cases):
    """``(name, (config, compiled, memory))`` of each mixer case ``(preset, d_model, mode, length)``."""
    for preset, d_model, mode, length in cases:
        name = f"{preset} d_model {d_model} {mode}" + (f" {length} tokens" if length else " step")
        yield name, _mixer(preset, d_model, mode, length)


def _run_mixer(config, compiled, memory, **options) -> dict:
    from marca.golden import iss
    from marca.isa import ErrorCode
    device = str(options.get("device", "cpu"))
    started, started_cpu = time.perf_counter(), time.process_time()
    result, machine = iss.run_program(config, memory, compiled.program_address, **options)
    image = machine.memory_bytes()
    _synchronize(device)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    if result.error != ErrorCode.NONE:
        raise AssertionError(f"mixer faulted: {result}")
    ops = _lane_ops(result.counters, config.lanes)
    timing = elapsed if device.startswith("cuda") else cpu
    return {"wall_seconds": elapsed, "cpu_seconds": cpu, "seconds": timing,
            "instructions": result.counters["instructions"], "lane_operations": ops,
            "lane_operations_per_second": ops / timing, "load": _load(), "image": image,
            "counters": result.counters}


def _class_breakdown(config, compiled, memory) -> dict:
    """CPU seconds per instruction class of one fast run (each instruction timed; the timing adds a few
    microseconds per instruction)."""
    from marca.golden import iss
    seconds, counts = {}, {}
    machine = iss.Machine(config, memory)
    execute = machine._execute

    def timed(plan, pc):
        started = time.process_time()
        code = execute(plan, pc)
        name = plan.instruction.OPCODE.name
        seconds[name] = seconds.get(name, 0.0) + time.process_time() - started
        counts[name] = counts.get(name, 0) + 1
        return code
    machine._execute = timed
    machine.run(compiled.program_address)
    total = sum(seconds.values())
    return {name: {"instructions": counts[name], "cpu_seconds": seconds[name], "share": seconds[name] / total,
                   "microseconds_each": 1e6 * seconds[name] / counts[name]}
            for name in sorted(seconds, key=seconds.get, reverse=True)}


def _predict(counters: dict, config, rates: dict, fixed_us: float) -> float:
    """Seconds predicted from the per-class rates: LINEAR at the GEMV rate, ELEMENTWISE at the MULADD
    rate, NONLINEAR at the mean of the three functions' rates, DMA bytes at the LOAD and STORE rates, plus
    the fixed cost per instruction."""
    lanes = config.lanes
    nonlinear = [v["lane_operations_per_second"] for k, v in rates.items() if k.startswith("nonlinear")]
    linear_rate = rates["linear gemv (J 48, K 24, T 1)"]["lane_operations_per_second"]
    elementwise_rate = rates["elementwise muladd (row broadcast, 384 beats)"]["lane_operations_per_second"]
    load_rate = rates["load (storage -> compute, 2^20 elements)"]["dma_bytes_per_second"]
    store_rate = rates["store (compute -> storage, 2^19 elements)"]["dma_bytes_per_second"]
    return (counters["linear_beats"] * lanes / linear_rate
            + counters["elementwise_beats"] * lanes / elementwise_rate
            + counters["nonlinear_beats"] * lanes / (sum(nonlinear) / len(nonlinear))
            + counters["dma_bytes_read"] / load_rate + counters["dma_bytes_written"] / store_rate
            + counters["instructions"] * fixed_us * 1e-6)


def _model_decode(rates: dict, fixed: dict, device: str = "cpu") -> dict:
    """A whole mamba-130m-shaped model (transformers' random initialisation: d_model 768, 24 layers,
    vocabulary 50,280, d_state 16) compiled for the ``paper`` preset (marca.compiler.model): two decode
    steps of one session (GATHER embedding, 24 x [RMSNorm, mixer, residual], final RMSNorm, LM head) on the
    fast ISS. The session keeps one machine: the first step plans every instruction (cold fixed cost), the
    second finds them planned (warm)."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    from marca.compiler.model import compile_model
    from marca.config import PAPER
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280,
                                         state_size=16)).eval()
    compiled = compile_model(model, config=PAPER, prompt_length=1)
    session = compiled.session(device=device)
    timing = "wall_microseconds_per_instruction" if device != "cpu" else "microseconds_per_instruction"
    out = {"image_bytes": compiled.memory_size, "steps": []}
    for step, (token, warmth) in enumerate([(11, "cold"), (12, "warm")]):
        started, started_cpu = time.perf_counter(), time.process_time()
        logits = session.decode(token)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
        counters = {k: v for k, v in session.steps[-1].items() if isinstance(v, int) and k != "tokens"}
        predicted = _predict(counters, PAPER, rates, fixed[warmth][timing])
        entry = {"cpu_seconds": cpu, "wall_seconds": elapsed, "load": _load(), "counters": counters,
                 "plans": warmth, "lane_operations": _lane_ops(counters, PAPER.lanes),
                 "predicted_seconds": predicted, "logits_finite": bool(torch.isfinite(logits).all())}
        out["steps"].append(entry)
        print(f"\nmamba-130m-shaped model on {device}, decode step {step + 1} ({warmth} plans; 24 layers, LM head, "
              f"paper preset): {cpu:.2f} CPU s measured ({elapsed:.2f} s wall, load {entry['load']}), {predicted:.2f} s "
              f"predicted; {counters['instructions']} instructions, {entry['lane_operations']:,d} lane "
              f"operations, {counters['dma_bytes_read']:,d} DMA bytes read; logits finite: "
              f"{entry['logits_finite']}")
    return out


def run_device(out_dir: pathlib.Path, device: str) -> dict:
    """The device figures alone (``marca bench iss --device cuda``): per class, the mixers (each checked
    against the fast CPU machine's memory image and counters), the one-layer mamba-130m-shaped decode step
    measured and predicted from this device's per-class rates and its fixed cost, and with
    ``MARCA_BENCH_ISS_MODEL=1`` the whole model's two decode steps; wall seconds after a device
    synchronisation. Writes ``out_dir/iss-<device>.json`` (the CPU figures stay in ``iss.json``)."""
    import torch

    from marca.config import DEFAULT, PAPER
    torch.set_num_threads(1)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = str(torch.device(device))
    label = name.replace(":", "")
    results = {"device": name, "device_name": torch.cuda.get_device_name(torch.device(device))
               if name.startswith("cuda") else None, "cpus": os.cpu_count(), "load_at_start": _load(),
               "torch": torch.__version__}
    path = out_dir / f"iss-{label}.json"

    def save():
        path.write_text(json.dumps(results, indent=2))

    print(f"[iss] device {name} ({results['device_name']}), torch {torch.__version__}", flush=True)
    results["per_class"] = _per_class(PAPER, name, False, 5)
    print(f"\n{'instruction (paper preset, wall time on ' + label + ')':48s} {'lane ops':>10s} {'M/s':>9s}")
    for case, entry in results["per_class"].items():
        unit = "lane_operations" if entry["lane_operations"] else "dma_bytes"
        print(f"{case:48s} {entry[unit]:10,d} {entry[unit + '_per_second'] / 1e6:9.1f}"
              + ("" if unit == "lane_operations" else "  (DMA: MB/s)"), flush=True)
    save()
    results["fixed_cost"] = _fixed_cost(DEFAULT, device=name, reference=False)
    fixed = results["fixed_cost"]
    print(f"\nfixed cost in wall time (default preset, 1-beat MUL): warm "
          f"{fixed['warm']['wall_microseconds_per_instruction']:.0f} us, cold "
          f"{fixed['cold']['wall_microseconds_per_instruction']:.0f} us per instruction", flush=True)
    save()
    results["mixers"] = {}

    def mixers(cases):
        print(f"\n{'mixer (wall seconds)':40s} {'instr':>6s} {'lane ops':>12s} {'cpu fast s':>10s} "
              f"{'first s':>8s} {label + ' s':>8s} {'M/s':>8s}")
        for case, (config, compiled, memory) in _mixers(cases):
            cpu = _run_mixer(config, compiled, memory)
            first = _run_mixer(config, compiled, memory, device=name)
            warm = _run_mixer(config, compiled, memory, device=name)
            for run_ in (first, warm):
                if run_["image"] != cpu["image"] or run_["counters"] != cpu["counters"]:
                    raise AssertionError(f"{case}: the {name} and CPU machines differ")
            results["mixers"][case] = {"cpu": cpu, "first_run": first, "device": warm}
            print(f"{case:40s} {warm['instructions']:6d} {warm['lane_operations']:12,d} "
                  f"{cpu['cpu_seconds']:10.2f} {first['wall_seconds']:8.2f} {warm['wall_seconds']:8.3f} "
                  f"{warm['lane_operations_per_second'] / 1e6:8.1f}", flush=True)
            for run_ in results["mixers"][case].values():
                run_.pop("image")
            save()

    # The 32 x 32 presets first; the 2x2 ones (tens of thousands of 4-lane instructions, each paying the
    # device's fixed cost) after the mamba-130m steps.
    mixers([case for case in MIXERS if case[0] in ("paper", "default")])
    config, compiled, memory = _mixer("paper", 768, "decode", None)
    measured = _run_mixer(config, compiled, memory, device=name)
    measured = _run_mixer(config, compiled, memory, device=name)
    measured.pop("image")
    predicted = _predict(measured["counters"], config, results["per_class"],
                         fixed["warm"]["wall_microseconds_per_instruction"])
    results["mamba_130m_decode_layer"] = {"measured": measured, "predicted_seconds": predicted}
    print(f"\nmamba-130m-shaped decode step, one layer (paper preset) on {name}: {measured['seconds']:.3f} s "
          f"measured, {predicted:.3f} s predicted from this device's per-class rates and fixed cost", flush=True)
    save()
    if os.environ.get("MARCA_BENCH_ISS_MODEL") == "1":
        results["mamba_130m_decode_model"] = _model_decode(results["per_class"], fixed, device=name)
        save()
    mixers([case for case in MIXERS if case[0] not in ("paper", "default")])
    results["load_at_end"] = _load()
    save()
    print(f"[iss] wrote {path}")
    return results


def run(out_dir: pathlib.Path, device: str | None = None) -> dict:
    """The CPU figures, and the CUDA ones when a CUDA device is present; ``device`` given: that device's
    figures alone (:func:`run_device`)."""
    import torch

    from marca.config import PAPER
    if device is not None:
        return run_device(out_dir, device)
    torch.set_num_threads(1)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slow = os.environ.get("MARCA_BENCH_ISS_SLOW") == "1"
    cuda = torch.cuda.is_available()
    results = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_at_start": _load(),
               "cuda_device": torch.cuda.get_device_name(0) if cuda else None}

    print(f"[iss] load average {results['load_at_start']} on {os.cpu_count()} CPUs, torch 1 thread",
          flush=True)
    results["per_class"] = {"fast": _per_class(PAPER, "cpu", False, 3),
                            "reference": _per_class(PAPER, "cpu", True, 1)}
    print(f"\n{'instruction (paper preset, per CPU second)':48s} {'lane ops':>10s} {'fast M/s':>9s} "
          f"{'ref M/s':>8s} {'speed-up':>8s}")
    for name, fast in results["per_class"]["fast"].items():
        ref = results["per_class"]["reference"][name]
        unit = "lane_operations" if fast["lane_operations"] else "dma_bytes"
        print(f"{name:48s} {fast[unit]:10,d} {fast[unit + '_per_second'] / 1e6:9.1f} "
              f"{ref[unit + '_per_second'] / 1e6:8.2f} "
              f"{fast[unit + '_per_second'] / ref[unit + '_per_second']:7.0f}x"
              + ("" if unit == "lane_operations" else "  (DMA: MB/s)"))

    from marca.config import DEFAULT
    results["fixed_cost"] = _fixed_cost(DEFAULT)
    fixed = results["fixed_cost"]
    print("\nfixed cost in CPU time (default preset, 1-beat MUL): "
          f"warm {fixed['warm']['microseconds_per_instruction']:.0f} us, "
          f"cold {fixed['cold']['microseconds_per_instruction']:.0f} us, reference "
          f"{fixed['reference']['microseconds_per_instruction']:.0f} us per instruction")

    results["mixers"] = {}
    print(f"\n{'mixer (CPU seconds)':34s} {'instr':>6s} {'lane ops':>12s} {'fast s':>8s} {'M/s':>6s} "
          f"{'no checks s':>11s} {'ref s':>8s} {'speed-up':>8s} {'wall s':>7s} {'load':>5s} {'first s':>7s}")
    for (preset, _, mode, length), (name, (config, compiled, memory)) in zip(MIXERS, _mixers(MIXERS)):
        # The first run in a process also builds what is made once per configuration (the 16-bit NONLINEAR
        # tables, the LOAD tables, the compiled LINEAR loop): recorded apart, the timed runs come after it.
        first = _run_mixer(config, compiled, memory)
        fast = _run_mixer(config, compiled, memory)
        unchecked = _run_mixer(config, compiled, memory, check_hazards=False, check_undefined=False)
        entry = {"fast": fast, "unchecked": unchecked, "first_run": first}
        if slow or not (preset == "paper" and length == 32):
            entry["reference"] = _run_mixer(config, compiled, memory, reference=True)
            if entry["reference"]["image"] != fast["image"] or \
                    entry["reference"]["counters"] != fast["counters"]:
                raise AssertionError(f"{name}: fast and reference machines differ")
        if cuda:
            entry["cuda"] = _run_mixer(config, compiled, memory, device="cuda")
            entry["cuda"] = _run_mixer(config, compiled, memory, device="cuda")     # warm
            if entry["cuda"]["image"] != fast["image"]:
                raise AssertionError(f"{name}: CUDA and CPU machines differ")
        if mode == "prefill" and preset in ("default", "fpga-small"):
            entry["classes"] = _class_breakdown(config, compiled, memory)
        ref = entry.get("reference")
        print(f"{name:34s} {fast['instructions']:6d} {fast['lane_operations']:12,d} {fast['seconds']:8.2f} "
              f"{fast['lane_operations_per_second'] / 1e6:6.1f} {unchecked['seconds']:11.2f} "
              + (f"{ref['seconds']:8.2f} {ref['seconds'] / fast['seconds']:7.1f}x" if ref
                 else f"{'-':>8s} {'-':>8s}")
              + f" {fast['wall_seconds']:7.2f} {fast['load']:5.1f} {first['seconds']:7.2f}")
        results["mixers"][name] = entry

    for name, entry in results["mixers"].items():
        if "classes" in entry:
            print(f"\n{name}, CPU time per instruction class (fast machine): " + ", ".join(
                f"{k} {v['share']:.0%} ({v['instructions']} x {v['microseconds_each']:.0f} us)"
                for k, v in entry["classes"].items()))

    # mamba-130m-shaped decode step, one layer, predicted and measured.
    config, compiled, memory = _mixer("paper", 768, "decode", None)
    measured = _run_mixer(config, compiled, memory)
    # Per run, not per instruction: the machine's buffers and flags (24 MiB of buffers on `paper`), the copy
    # of the memory image in and out.
    from marca.golden import iss
    started = time.process_time()
    iss.Machine(config, memory).memory_bytes()
    setup = time.process_time() - started
    predicted = _predict(measured["counters"], config, results["per_class"]["fast"],
                         fixed["warm"]["microseconds_per_instruction"]) + setup
    results["mamba_130m_decode_layer"] = {"measured": measured, "predicted_seconds": predicted,
                                          "setup_seconds": setup, "layers": 24,
                                          "predicted_token_seconds_24_layers": 24 * predicted}
    print(f"\nmamba-130m-shaped decode step, one layer (paper preset): {measured['seconds']:.3f} s measured, "
          f"{predicted:.3f} s predicted from the per-class rates (CPU seconds; {setup:.3f} s of it machine "
          f"set-up and image copies); {measured['instructions']} instructions, "
          f"{measured['lane_operations']:,d} lane operations (load {measured['load']})")

    if os.environ.get("MARCA_BENCH_ISS_MODEL") == "1":
        results["mamba_130m_decode_model"] = _model_decode(results["per_class"]["fast"], fixed)

    if cuda:
        results["per_class"]["cuda"] = _per_class(PAPER, "cuda", False, 5)
        print(f"\nCUDA ({results['cuda_device']}):")
        for name, entry in results["per_class"]["cuda"].items():
            print(f"  {name:48s} {entry['lane_operations_per_second'] / 1e6:10.1f} M lane ops/s")
        for name, entry in results["mixers"].items():
            print(f"  {name:48s} {entry['cuda']['seconds']:8.3f} s "
                  f"{entry['cuda']['lane_operations_per_second'] / 1e6:10.1f} M lane ops/s")
    else:
        print("\nCUDA: no device in this process; not measured")

    for entry in results["mixers"].values():
        for run_ in entry.values():
            run_.pop("image", None)
    results["mamba_130m_decode_layer"]["measured"].pop("image", None)
    results["load_at_end"] = _load()
    (out_dir / "iss.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    from marca.bench import command_line
    arguments = command_line(__doc__)
    run(pathlib.Path(arguments[0] if arguments else "build/bench"))
