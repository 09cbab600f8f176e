"""A compiled Mamba-1 mixer end to end on the accelerator RTL (Verilator), against the golden ISS and the
float reference (docs/mamba.md).

Two halves:

* **Host side** (plain Python, used by tests/test_mamba_rtl.py, ``marca.demo`` and ``marca.bench.mamba``):
  :func:`prepare` compiles a mixer with random weights (prefill of ``L`` tokens and, optionally, a decode
  step for a chain of ``L`` decode steps over the same tokens), :func:`run_on_rtl` runs the memory images on
  the emitted Verilog, :func:`evaluate` runs the same images on the golden ISS and compares everything:
  the whole final memory image bit for bit after every run, the ISS's deterministic counters, chained
  decode against prefill bit for bit, and the output against the float reference (measured errors).
  :func:`utilization` turns the RTL's counters into PE utilization per operation class.
* **cocotb side**: the test :func:`mixer_jobs` runs a list of jobs on the accelerator. A job is a memory
  image and a program address, run once per *step*; step ``k > 0`` starts from the memory the RTL left
  after step ``k - 1`` with a patch applied (the next token of a decode chain written over the input
  rows), so the states a decode step leaves in memory feed the next step exactly as they would on a real
  host. It reuses tb/accelerator.py's :class:`~marca.tb.accelerator.AcceleratorTB` (AxiRam with optional
  random pauses on every channel, AxiLiteMaster CSR access); its own run loop waits for ``irq`` in
  ``poll_cycles`` slices instead of every cycle and, between slices, reads the ``instructions`` and
  ``cycles`` counters over AXI-Lite to report progress (a JSON line per poll in a progress file).

The scoreboard is on the host side: the cocotb test only runs and records (images, counters, error
codes), so the demo and the benchmark use the same path as the tests.

Parameters of :func:`mixer_jobs` (``marca.sim.tb_params``): ``config`` (MarcaConfig dict), ``spec`` (path
of the job list JSON written by :func:`run_on_rtl`), ``pause``, ``seed``, ``memory_bits``,
``poll_cycles``, ``progress`` (path or None).
"""

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cocotb
from cocotb.triggers import ClockCycles, First, RisingEdge
from marca.hw.csr import REGISTERS, counter_offset

from marca.isa import ErrorCode
from marca.sim import tb_params

if TYPE_CHECKING:
    import torch
    from marca.compiler import CompiledMixer, CompileOptions

    from marca.config import MarcaConfig

__all__ = [
    "MixerCase",
    "PreparedCase",
    "RtlStep",
    "build_accelerator",
    "classify",
    "evaluate",
    "mixer_jobs",
    "prepare",
    "reference_errors",
    "run_on_rtl",
    "utilization",
]


# ------------------------------------------------------------------------------------------------------
# cocotb side
# ------------------------------------------------------------------------------------------------------

async def _run_with_progress(tb, memory: bytes, program_address: int, *, poll_cycles: int, report,
                             timeout_cycles: int):
    """Like ``AcceleratorTB.run`` but waits for ``irq`` in slices of ``poll_cycles`` cycles (Python does not
    run every cycle) and calls ``report(instructions, cycles)`` after each slice."""
    from marca.hw.controller import COUNTERS
    index = {name: k for k, name in enumerate(COUNTERS)}
    dut = tb.dut
    await tb.start(memory, program_address)
    waited = 0
    while not int(dut.irq.value):
        await First(RisingEdge(dut.irq), ClockCycles(dut.clk, poll_cycles))
        waited += poll_cycles
        if report is not None and not int(dut.irq.value):
            retired = await tb.read_register(counter_offset(index["instructions"]))
            cycles = await tb.read_register(counter_offset(index["cycles"]))
            report(retired, cycles)
        if waited > timeout_cycles:
            raise AssertionError(f"the accelerator did not finish in {timeout_cycles} cycles (hang)")
    status = await tb.read_register(REGISTERS["STATUS"])
    code = ErrorCode(await tb.read_register(REGISTERS["ERROR_CODE"]))
    pc = await tb.read_register(REGISTERS["ERROR_PC"])
    counters = await tb.read_counters()
    tb.ram.fault = (0, 0)
    image = tb.ram.read(0, len(memory))
    return status, code, pc, counters, image


@cocotb.test()
async def mixer_jobs(dut):
    """Run every job of the spec file step by step; write each step's final image and counters."""
    from marca.tb.accelerator import AcceleratorTB
    params = tb_params()
    spec = json.loads(Path(params["spec"]).read_text())
    tb = AcceleratorTB(dut, params)
    await tb.reset()
    progress_path = params.get("progress")

    def progress_line(entry):          # a few lines per run: opening the file each time costs nothing
        if progress_path:
            with open(progress_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
    results = []
    for job in spec["jobs"]:
        memory = Path(job["memory"]).read_bytes()
        for step_number, step in enumerate(job["steps"]):
            memory = bytearray(memory)
            for address, patch_file in step["patches"]:
                patch = Path(patch_file).read_bytes()
                memory[address:address + len(patch)] = patch
            started = time.perf_counter()

            def report(retired, cycles, job=job, step_number=step_number):
                progress_line({"job": job["name"], "step": step_number, "retired": retired, "cycles": cycles})

            status, code, pc, counters, image = await _run_with_progress(
                tb, bytes(memory), step.get("program_address", job["program_address"]),
                poll_cycles=params.get("poll_cycles", 2000),
                report=report, timeout_cycles=params.get("timeout_cycles", 20_000_000))
            wall = time.perf_counter() - started
            out_file = Path(step["out"])
            out_file.write_bytes(image)
            results.append({"job": job["name"], "step": step_number, "status": status, "error": int(code),
                            "error_pc": pc, "counters": counters, "image": str(out_file),
                            "seconds": round(wall, 3)})
            progress_line({"job": job["name"], "step": step_number, "done": True,
                           "retired": counters["instructions"], "cycles": counters["cycles"]})
            dut._log.info("%s step %d: %s, %d cycles, %.1f s (%.0f cycles/s)", job["name"], step_number,
                          code.name, counters["cycles"], wall, counters["cycles"] / max(wall, 1e-9))
            memory = image
    Path(spec["results"]).write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------------------------------------------
# Host side: cases, compilation, runs
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MixerCase:
    """One end-to-end case: a mixer of ``d_model`` / ``d_state`` with random weights (``seed``), a prefill
    of ``length`` tokens from zero states, and with ``decode`` also ``length`` chained decode steps over the
    same tokens. ``options`` are the compiler's (buffer-management switches); ``resident``: the decode
    chain's steps after the first find the weights on chip (``compile_mixer(resident=True)``) where the
    plan keeps them there (else every step loads them)."""

    name: str
    config: "MarcaConfig"
    d_model: int = 16
    d_state: int = 4
    length: int = 4
    seed: int = 1
    decode: bool = True
    options: "CompileOptions | None" = None
    resident: bool = False

    def __post_init__(self):
        from marca.compiler import CompileOptions

        from marca.config import MarcaConfig
        if not isinstance(self.config, MarcaConfig):
            raise ValueError(f"config must be a MarcaConfig, not {self.config!r}")  # noqa: TRY004
        if self.options is not None and not isinstance(self.options, CompileOptions):
            raise ValueError(f"options must be a CompileOptions or None, not {self.options!r}")
        for name in ("d_model", "d_state", "length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")


@dataclass
class PreparedCase:
    """A compiled case: weights, tokens, programs and input images (host side, no simulation yet)."""

    case: MixerCase
    weights: dict
    hidden: "torch.Tensor"          # [L, d_model] float64
    prefill: "CompiledMixer"
    prefill_image: bytes
    decode: "CompiledMixer | None" = None
    decode_first_image: bytes | None = None
    decode_patches: list = field(default_factory=list)   # per step k >= 1: (address, bytes) of token k


def build_accelerator(config: "MarcaConfig") -> Path:
    """Build (once; cached by hash) the Verilator model of ``Accelerator(config)``. The label is the one
    tests/test_accelerator.py and bench/accelerator.py use, so equal configurations share one build."""
    from marca.hw.accelerator import Accelerator

    from marca import sim
    verilog = sim.emit_verilog(Accelerator(config), "accelerator")
    return sim.build(verilog, "accelerator", label=f"accelerator-{config.name}")


def _hidden_patch(compiled, hidden_rows) -> tuple[int, bytes]:
    """The bytes of the input rows ``hidden_rows`` as ``compiled`` places them (states untouched)."""
    image = compiled.write_inputs(None, hidden_rows)
    place = compiled.hidden
    end = place.address + (place.rows - 1) * place.row_stride + place.row_elements * compiled.config.storage_bytes
    return place.address, bytes(image[place.address:end])


def prepare(case: MixerCase) -> PreparedCase:
    """Compile ``case`` (prefill and, with ``case.decode``, a decode step) and write its input images."""
    import torch
    from marca.compiler import CompileError, CompileOptions, compile_mixer
    from marca.reference import mamba as reference
    dims = reference.MambaDims(d_model=case.d_model, d_state=case.d_state)
    weights = reference.random_mixer_weights(dims, seed=case.seed, dtype=torch.float64)
    hidden = torch.randn(case.length, case.d_model, generator=torch.Generator().manual_seed(case.seed + 1000),
                         dtype=torch.float64)
    options = case.options or CompileOptions()
    prefill = compile_mixer(weights, case.config, mode="prefill", length=case.length, options=options)
    prepared = PreparedCase(case, weights, hidden, prefill, bytes(prefill.write_inputs(None, hidden)))
    if case.decode:
        try:
            decode = compile_mixer(weights, case.config, mode="decode", options=options, resident=case.resident)
        except CompileError:        # the weights do not stay on chip: every step loads them
            decode = compile_mixer(weights, case.config, mode="decode", options=options)
        prepared.decode = decode
        prepared.decode_first_image = bytes(decode.write_inputs(None, hidden[0:1]))
        prepared.decode_patches = [_hidden_patch(decode, hidden[k:k + 1]) for k in range(1, case.length)]
    return prepared


@dataclass
class RtlStep:
    """What the RTL left after one run: memory image, error code, counters, simulation wall time."""

    image: bytes
    error: ErrorCode
    error_pc: int
    status: int
    counters: dict
    seconds: float


def run_on_rtl(config: "MarcaConfig", prepared: list[PreparedCase], *, name: str = "mamba", pause: float = 0.0, seed: int = 1,
               progress=None, poll_cycles: int = 2000, build_dir: Path | None = None) -> dict:
    """Run the prefill (and the decode chain) of every case in ``prepared`` on one build of
    ``Accelerator(config)``, in one simulator process. A ``prefill`` that is a decode step compiled with
    ``resident=True`` (bench/mamba.py's batched cases) runs twice: loading the weights, then finding them.

    ``progress(job, step, retired, cycles, done)`` is called from a thread while the simulation runs.
    ``build_dir``: a Verilator build of the accelerator to use instead of :func:`build_accelerator`'s
    (bench/verilog.py compares builds of differently emitted Verilog).
    Returns ``{case name: {"prefill": [RtlStep], "decode": [RtlStep, ...]}}``.
    """
    from marca import sim
    build_dir = Path(build_dir) if build_dir else build_accelerator(config)
    work = (build_dir / name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    jobs, memory_size = [], 0
    for item in prepared:
        if item.case.config != config:
            raise ValueError(f"case {item.case.name} is for configuration {item.case.config.name}, "
                             f"not {config.name}")
        key = item.case.name
        (work / f"{key}.prefill.bin").write_bytes(item.prefill_image)
        steps = [{"patches": [], "out": str(work / f"{key}.prefill.out0.bin")}]
        if item.prefill.resident_instructions:      # a decode step (batched bench): again, weights on chip
            steps.append({"patches": [], "out": str(work / f"{key}.prefill.out1.bin"),
                          "program_address": item.prefill.resident_program_address})
        jobs.append({"name": f"{key}/prefill", "memory": str(work / f"{key}.prefill.bin"),
                     "program_address": item.prefill.program_address, "steps": steps})
        memory_size = max(memory_size, len(item.prefill_image))
        if item.decode is not None:
            (work / f"{key}.decode.bin").write_bytes(item.decode_first_image)
            steps = [{"patches": [], "out": str(work / f"{key}.decode.out0.bin"),
                      "program_address": item.decode.program_address}]
            for k, (address, data) in enumerate(item.decode_patches, start=1):
                patch = work / f"{key}.decode.in{k}.bin"
                patch.write_bytes(data)
                steps.append({"patches": [[address, str(patch)]], "out": str(work / f"{key}.decode.out{k}.bin"),
                              "program_address": decode_program_address(item.decode, k)})
            jobs.append({"name": f"{key}/decode", "memory": str(work / f"{key}.decode.bin"),
                         "program_address": item.decode.program_address, "steps": steps})
            memory_size = max(memory_size, len(item.decode_first_image))
    results_file = work / "results.json"
    results_file.unlink(missing_ok=True)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "results": str(results_file)}, indent=1))
    progress_file = work / "progress.jsonl"
    progress_file.write_text("")
    params = {"config": config.to_dict(), "spec": str(spec), "pause": pause, "seed": seed,
              "memory_bits": max(12, math.ceil(math.log2(memory_size + 1))),
              "poll_cycles": poll_cycles, "progress": str(progress_file) if progress else None}
    stop = threading.Event()
    watcher = None
    if progress:
        watcher = threading.Thread(target=_follow, args=(progress_file, progress, stop), daemon=True)
        watcher.start()
    try:
        sim.run(build_dir, "accelerator", "marca.tb.mamba", testcase="mixer_jobs", name=name, params=params)
    finally:
        stop.set()
        if watcher:
            watcher.join()
    out = {}
    for entry in json.loads(results_file.read_text()):
        case, kind = entry["job"].split("/")
        step = RtlStep(Path(entry["image"]).read_bytes(), ErrorCode(entry["error"]), entry["error_pc"],
                       entry["status"], entry["counters"], entry["seconds"])
        out.setdefault(case, {"prefill": [], "decode": []})[kind].append(step)
    return out


def _follow(path: Path, callback, stop: threading.Event):
    """Call ``callback`` for every JSON line appended to ``path`` until ``stop`` (then drain)."""
    position = 0
    while True:
        finished = stop.is_set()
        with open(path) as handle:
            handle.seek(position)
            while True:
                line = handle.readline()
                if not line.endswith("\n"):
                    break
                position += len(line.encode())
                entry = json.loads(line)
                callback(entry["job"], entry["step"], entry["retired"], entry["cycles"], entry.get("done", False))
        if finished:
            return
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------------
# Host side: golden comparison, accuracy, utilization
# ------------------------------------------------------------------------------------------------------

def _iss(config, memory: bytes, program_address: int, machine=None):
    """Run ``memory`` on a new ISS machine, or with ``machine`` on that one without a reset (its buffers as
    the last program left them, the memory image replaced by ``memory``: the RTL between two runs)."""
    from marca.golden.iss import Machine
    if machine is None:
        machine = Machine(config, memory)
    else:
        machine.write_memory(0, memory)
        machine.restart(keep_buffers=True)
    result = machine.run(program_address)
    return result, machine.memory_bytes(), machine


def _compare_step(where: str, config, rtl: RtlStep, memory_in: bytes, program_address: int, *,
                  machine=None) -> tuple[bytes, object]:
    """Run ``memory_in`` on the ISS (on ``machine`` without a reset, if given); assert the RTL step equals it
    (image, error, counters). Returns the ISS image and machine."""
    from marca.golden.iss import COUNTER_NAMES
    expected, golden, machine = _iss(config, memory_in, program_address, machine)
    if rtl.error != expected.error:
        raise AssertionError(f"{where}: RTL error {rtl.error.name}, ISS {expected.error.name} {expected.message}")
    if expected.error != ErrorCode.NONE:
        raise AssertionError(f"{where}: the compiled program faulted on the ISS: {expected}")
    if rtl.status & 0b111 != 0b010:
        raise AssertionError(f"{where}: STATUS {rtl.status:#x} after the run (expected done, no error)")
    if rtl.image != golden:
        wrong = [k for k in range(len(golden)) if rtl.image[k] != golden[k]]
        raise AssertionError(f"{where}: final memory differs from the ISS at {len(wrong)} bytes, first "
                             f"{wrong[0]:#x}: RTL {rtl.image[wrong[0]:wrong[0] + 8].hex()} "
                             f"ISS {golden[wrong[0]:wrong[0] + 8].hex()}")
    for name in COUNTER_NAMES:
        if rtl.counters[name] != expected.counters[name]:
            raise AssertionError(f"{where}: counter {name} = {rtl.counters[name]}, ISS {expected.counters[name]}")
    return golden, machine


def decode_program_address(decode, k: int) -> int:
    """The program of decode step ``k``: with resident weights, the loading step first, then the step
    that finds them on chip."""
    return decode.resident_program_address if k and decode.resident_instructions else decode.program_address


def _region_bytes(compiled, place, image: bytes, rows=None) -> bytes:
    size = compiled.config.compute_bytes if place.format == "compute" else compiled.config.storage_bytes
    rows = range(place.rows) if rows is None else rows
    return b"".join(image[place.address + r * place.row_stride:place.address + r * place.row_stride
                          + place.row_elements * size] for r in rows)


def reference_errors(prepared: PreparedCase, out, ssm_state=None) -> dict:
    """Errors of ``out [L, d_model]`` (and the final scan state) against the float64 reference run on the
    weights and tokens rounded to the storage format (what the accelerator receives, including its stored
    ``A``), from zero states."""
    from marca.golden import fp
    from marca.reference import mamba as reference
    storage = prepared.case.config.storage_format
    rounded = {name: fp.decode(fp.encode(value, storage), storage) for name, value in prepared.weights.items()}
    # The compiler stores A = -exp(A_log) (computed on the host) in the storage format; give the reference
    # the A_log whose A is exactly that stored A.
    stored_A = fp.decode(fp.encode(-prepared.weights["A_log"].exp(), storage), storage)
    rounded["A_log"] = (-stored_A).log()
    hidden = fp.decode(fp.encode(prepared.hidden, storage), storage)
    expected, _, expected_state = reference.mixer_prefill(rounded, hidden)
    error = (out - expected).abs()
    # The output is rounded to the storage format on its way to memory; against the reference rounded the
    # same way, what is left is the compute format's error (and one-ulp flips of that rounding).
    expected_rounded = fp.decode(fp.encode(expected, storage), storage)
    result = {"max_abs_error": float(error.max()),
              "relative_error_vs_rounded_reference": float((out - expected_rounded).norm() / expected.norm()),
              "max_abs_reference": float(expected.abs().max()),
              "max_error_over_max_reference": float(error.max() / expected.abs().max()),
              "relative_error": float((out - expected).norm() / expected.norm())}
    if ssm_state is not None:
        result["state_relative_error"] = float((ssm_state - expected_state).norm() / expected_state.norm())
    return result


def evaluate(prepared: PreparedCase, rtl: dict) -> dict:
    """Check one case's RTL runs against the golden ISS (whole image and deterministic counters after every
    run), chained decode against prefill (outputs and final states bit for bit), and measure the error
    against the float reference. Raises ``AssertionError`` on any mismatch; returns the measurements."""
    case, config = prepared.case, prepared.case.config
    runs = rtl[case.name]
    prefill_rtl = runs["prefill"][0]
    _compare_step(f"{case.name} prefill", config, prefill_rtl, prepared.prefill_image,
                  prepared.prefill.program_address)
    out, _, ssm = prepared.prefill.read_outputs(prefill_rtl.image)
    report = {"case": case.name, "config": config.name, "d_model": case.d_model, "d_state": case.d_state,
              "length": case.length, "prefill": {"counters": prefill_rtl.counters,
                                                 "sim_seconds": prefill_rtl.seconds,
                                                 **reference_errors(prepared, out, ssm)}}
    if prepared.decode is not None:
        decode = prepared.decode
        steps = runs["decode"]
        if len(steps) != case.length:
            raise AssertionError(f"{case.name}: {len(steps)} decode steps ran, {case.length} expected")
        memory_in = prepared.decode_first_image
        outputs, machine = [], None
        for k, step in enumerate(steps):
            if k:
                address, data = prepared.decode_patches[k - 1]
                memory_in = bytearray(steps[k - 1].image)
                memory_in[address:address + len(data)] = data
                memory_in = bytes(memory_in)
            # resident weights: the ISS keeps its buffers from step to step, as the RTL does
            _, machine = _compare_step(f"{case.name} decode step {k}", config, step, memory_in,
                                       decode_program_address(decode, k),
                                       machine=machine if decode.resident_instructions else None)
            outputs.append(_region_bytes(decode, decode.output, step.image))
        for k, row in enumerate(outputs):
            if row != _region_bytes(prepared.prefill, prepared.prefill.output, prefill_rtl.image, [k]):
                raise AssertionError(f"{case.name}: decode step {k}'s output differs from prefill token {k}")
        last = steps[-1].image
        for state in ("conv_state", "ssm_state"):
            if _region_bytes(decode, getattr(decode, state), last) != \
                    _region_bytes(prepared.prefill, getattr(prepared.prefill, state), prefill_rtl.image):
                raise AssertionError(f"{case.name}: the {state} after {case.length} decode steps differs from "
                                     "prefill's")
        cycles = [step.counters["cycles"] for step in steps]
        report["decode"] = {"steps": len(steps), "cycles_per_step": cycles,
                            "counters_last_step": steps[-1].counters,
                            "sim_seconds": sum(step.seconds for step in steps),
                            "equals_prefill_bit_for_bit": True}
    return report


# ------------------------------------------------------------------------------------------------------
# Utilization per operation class
# ------------------------------------------------------------------------------------------------------

OPERATION_CLASSES = ("linear", "element-wise", "nonlinear", "scan")


def classify(instruction) -> str | None:
    """The operation class of one compute instruction of a compiled mixer (None for DMA, barrier, halt).

    * ``scan``: the per-token selective-scan step: the decay ``MUL`` (delta as a ROW operand), ``EXP``,
      the drive ``MUL`` (ROW x COLUMN), the state update ``MULADD`` and ``y = h·C + D·x`` (a ``LINEAR``
      whose matrix is the state, not a weight). Recognised by those shapes, which only the scan emits.
    * ``linear``: the projections (``LINEAR`` on weight tiles).
    * ``nonlinear``: SiLU and softplus.
    * ``element-wise``: the convolution taps, bias, gate, ``delta·x``, ``D·x``, zero fills, window slide.
    """
    from marca.isa import Buffer, Elementwise, Linear, Nonlinear, NonlinearFunction
    from marca.ops import Broadcast, ElementwiseOp
    if isinstance(instruction, Linear):
        return "linear" if instruction.matrix_buffer == Buffer.WEIGHT else "scan"
    if isinstance(instruction, Nonlinear):
        return "scan" if instruction.function == NonlinearFunction.EXP else "nonlinear"
    if isinstance(instruction, Elementwise):
        broadcasts = {instruction.a_broadcast, instruction.b_broadcast, instruction.c_broadcast} \
            if instruction.op == ElementwiseOp.MULADD else {instruction.a_broadcast, instruction.b_broadcast}
        if Broadcast.ROW in broadcasts or Broadcast.COLUMN in broadcasts:
            return "scan"
        if instruction.op == ElementwiseOp.MULADD and Buffer.WEIGHT not in (
                instruction.a_buffer, instruction.b_buffer, instruction.c_buffer):
            return "scan"
        return "element-wise"
    return None


def _beats(instruction, config) -> int:
    from marca.golden import nonlinear

    from marca.isa import Elementwise, Linear, Nonlinear, NonlinearFunction
    if isinstance(instruction, Linear):
        return instruction.token_count * instruction.row_tile_count * instruction.chunk_count
    if isinstance(instruction, Elementwise):
        return instruction.outer_count * instruction.inner_count
    if isinstance(instruction, Nonlinear):
        program = {NonlinearFunction.EXP: nonlinear.exp_program, NonlinearFunction.SILU: nonlinear.silu_program,
                   NonlinearFunction.SOFTPLUS: nonlinear.softplus_program}[instruction.function](config)
        return instruction.line_count * len(program)
    return 0


def useful_operations(config, dims, length: int) -> dict:
    """Lane operations a mixer of ``length`` tokens needs with no padding (a multiply-add of a linear
    operation counts one, as one lane does one per beat; a nonlinear function costs its passes)."""
    from marca.golden import nonlinear
    Dm, Di, N, Rk, Dc = dims.d_model, dims.d_inner, dims.d_state, dims.dt_rank, dims.d_conv
    exp_passes = len(nonlinear.exp_program(config))
    silu_passes = len(nonlinear.silu_program(config))
    softplus_passes = len(nonlinear.softplus_program(config))
    return {
        "linear": length * (2 * Di * Dm + (Rk + 2 * N) * Di + Di * Rk + Dm * Di),
        # conv taps and bias, delta·x, D·x, the gate
        "element-wise": length * Di * (Dc + 1 + 3),
        "nonlinear": length * Di * (2 * silu_passes + softplus_passes),
        # decay mul, exp, drive mul, update muladd, y = h·C
        "scan": length * Di * N * (3 + exp_passes + 1),
    }


def utilization(compiled, counters: dict) -> dict:
    """PE utilization of one RTL run of ``compiled`` from its counters.

    Per class: ``beats`` (array beats, each ``R·C`` lane operations), ``share_of_cycles`` (beats /
    cycles: the class's part of the overall utilization), ``useful_operations`` (no padding) and
    ``padding_efficiency`` (useful / issued lane operations). Overall: ``ideal_cycles`` = all beats (the
    array's peak is one beat per cycle), ``fraction_of_ideal`` = ideal / measured cycles, and
    ``useful_utilization`` = useful lane operations / (cycles · lanes).
    """
    config = compiled.config
    lanes = config.lanes
    beats = dict.fromkeys(OPERATION_CLASSES, 0)
    for instruction in compiled.instructions:
        kind = classify(instruction)
        if kind:
            beats[kind] += _beats(instruction, config)
    total = sum(beats.values())
    counted = counters["linear_beats"] + counters["elementwise_beats"] + counters["nonlinear_beats"]
    if total != counted:
        raise AssertionError(f"classified beats {total} != counted beats {counted}")
    cycles = counters["cycles"]
    from marca import perf
    dram_bound = perf.dram_bound_cycles(config, counters)
    useful = useful_operations(config, compiled.dims, compiled.length)
    classes = {kind: {"beats": beats[kind], "share_of_cycles": beats[kind] / cycles,
                      "useful_operations": useful[kind],
                      "padding_efficiency": useful[kind] / (beats[kind] * lanes) if beats[kind] else None}
               for kind in OPERATION_CLASSES}
    return {"cycles": cycles, "lanes": lanes, "classes": classes, "ideal_cycles": total,
            "fraction_of_ideal": total / cycles, "dram_bound_cycles": dram_bound,
            "fraction_of_dram_bound": dram_bound / cycles,
            "useful_utilization": sum(useful.values()) / (cycles * lanes),
            "array_busy_fraction": (counters["array_linear_cycles"] + counters["array_elementwise_cycles"])
            / cycles,
            # Where the cycles go: the array takes a beat; the compute engine is busy but the array idles
            # (operands of dependent instructions still in the pipeline, fill and drain); the compute engine
            # is idle (a BARRIER waits for the DMA, or the next instruction is not fetched yet).
            "cycle_breakdown": {"array_beats": total,
                                "compute_busy_array_idle": counters["compute_busy_cycles"] - total,
                                "compute_idle": cycles - counters["compute_busy_cycles"]},
            "dma_read_busy_fraction": counters["dma_read_busy_cycles"] / cycles,
            "dma_write_busy_fraction": counters["dma_write_busy_cycles"] / cycles,
            "stalls": {name: counters[name] for name in counters if name.startswith("stall_")},
            "dma_bytes_read": counters["dma_bytes_read"], "dma_bytes_written": counters["dma_bytes_written"],
            "fetch_bytes": counters["fetch_bytes"]}
