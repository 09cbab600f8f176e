"""A compiled Mamba language model (compiler/model.py) on the accelerator RTL (Verilator), against the
golden ISS (docs/model.md).

Host side only: the cocotb test is tb/mamba.py's :func:`~marca.tb.mamba.mixer_jobs` (a job = a memory image
and a program address run step after step, each step starting from the memory the RTL left, with patches).
A generation is one job: step 0 runs the prefill program on the image with the prompt's ids written in;
step ``k > 0`` writes the next token's id and the decode program's code over the prefill program's place
(the program address of a job is fixed; the code has no pc-relative parts, and the decode code fits in
the two programs' places), so the layers' conv and scan states chain through memory exactly as on a host.
:func:`check_against_iss` replays the same patches on the golden ISS and compares every step's whole
memory image and deterministic counters; :class:`RtlModelSession` runs step by step for ``marca generate
--backend rtl`` (one simulator launch per step).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from marca import isa
from marca.isa import ErrorCode

__all__ = ["ModelRun", "run_model_on_rtl", "check_against_iss", "RtlModelSession"]


def _ids_bytes(ids) -> bytes:
    return b"".join(int(i).to_bytes(4, "little") for i in ids)


@dataclass
class ModelRun:
    """The RTL's steps of one generation: ``images`` after each step, error codes, counters, seconds,
    and the patches each step applied (for the ISS replay)."""

    initial: bytes
    patches: list
    steps: list


def _patches(compiled, decode_ids):
    prefill, decode = compiled.programs["prefill"], compiled.programs["decode"]
    code = isa.encode_program(decode.instructions)
    room = decode.address + len(code) - prefill.address
    if room < len(code):
        raise AssertionError("the decode program does not fit over the prefill program's place")
    return [[(compiled.ids, _ids_bytes([token])), (prefill.address, code)] for token in decode_ids]


def run_model_on_rtl(compiled, prompt_ids, decode_ids, *, pause: float = 0.0, seed: int = 1,
                     name: str = "model", progress=None) -> ModelRun:
    """Prefill ``prompt_ids`` then one decode step per id of ``decode_ids`` on ``Accelerator(config)``."""
    from marca import sim
    from marca.tb.mamba import RtlStep, build_accelerator
    config = compiled.config
    if len(prompt_ids) != compiled.prompt_length:
        raise ValueError(f"the prefill takes {compiled.prompt_length} ids, not {len(prompt_ids)}")
    memory = bytearray(compiled.memory)
    memory[compiled.ids:compiled.ids + 4 * len(prompt_ids)] = _ids_bytes(prompt_ids)
    build_dir = build_accelerator(config)
    work = (build_dir / name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "initial.bin").write_bytes(memory)
    patches = _patches(compiled, decode_ids)
    steps = [{"patches": [], "out": str(work / "out0.bin")}]
    for k, step_patches in enumerate(patches, start=1):
        files = []
        for n, (address, data) in enumerate(step_patches):
            path = work / f"patch{k}.{n}.bin"
            path.write_bytes(data)
            files.append([address, str(path)])
        steps.append({"patches": files, "out": str(work / f"out{k}.bin")})
    results_file = work / "results.json"
    results_file.unlink(missing_ok=True)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"jobs": [{"name": f"{name}/run", "memory": str(work / "initial.bin"),
                                          "program_address": compiled.programs["prefill"].address,
                                          "steps": steps}], "results": str(results_file)}, indent=1))
    params = {"config": config.to_dict(), "spec": str(spec), "pause": pause, "seed": seed,
              "memory_bits": max(12, math.ceil(math.log2(len(memory) + 1))), "poll_cycles": 5000,
              "progress": None}
    sim.run(build_dir, "accelerator", "marca.tb.mamba", testcase="mixer_jobs", name=name, params=params)
    out = []
    for entry in json.loads(results_file.read_text()):
        out.append(RtlStep(Path(entry["image"]).read_bytes(), ErrorCode(entry["error"]), entry["error_pc"],
                           entry["status"], entry["counters"], entry["seconds"]))
    return ModelRun(bytes(memory), patches, out)


def check_against_iss(compiled, run: ModelRun) -> list[bytes]:
    """Replay ``run`` on the golden ISS; assert every step's image, error code and deterministic counters
    equal the RTL's. Returns the ISS images."""
    from marca.golden.iss import COUNTER_NAMES, run_program
    memory = bytearray(run.initial)
    images = []
    for k, rtl in enumerate(run.steps):
        if k:
            for address, data in run.patches[k - 1]:
                memory[address:address + len(data)] = data
        longest = max(len(p.instructions) for p in compiled.programs.values())
        result, machine = run_program(compiled.config, memory, compiled.programs["prefill"].address,
                                      max_instructions=longest + 1)
        golden = machine.memory_bytes()
        where = "prefill" if k == 0 else f"decode step {k}"
        if result.error != ErrorCode.NONE or rtl.error != ErrorCode.NONE:
            raise AssertionError(f"{where}: RTL {rtl.error.name}, ISS {result.error.name} {result.message}")
        if rtl.image != golden:
            wrong = next(i for i in range(len(golden)) if rtl.image[i] != golden[i])
            raise AssertionError(f"{where}: the RTL's memory differs from the ISS's, first at {wrong:#x} "
                                 f"(region {_region_of(compiled, wrong)})")
        for name in COUNTER_NAMES:
            if rtl.counters[name] != result.counters[name]:
                raise AssertionError(f"{where}: counter {name} = {rtl.counters[name]}, ISS {result.counters[name]}")
        images.append(golden)
        memory = bytearray(golden)
    return images


def _region_of(compiled, address):
    for region in compiled.regions.values():
        if region.address <= address < region.address + region.size:
            return region.name
    return "none"


class RtlModelSession:
    """``marca generate --backend rtl``: the same interface as the ISS's ModelSession, one simulator launch
    per step (the memory image carries the states from step to step)."""

    def __init__(self, compiled, *, pause: float = 0.0, seed: int = 1):
        self.compiled, self.pause, self.seed = compiled, pause, seed
        self.memory = bytearray(compiled.memory)
        self.steps: list[dict] = []

    def _run(self, mode, ids):
        from marca import sim
        from marca.compiler.mamba import read_place
        from marca.tb.mamba import build_accelerator
        compiled, config = self.compiled, self.compiled.config
        program = compiled.programs[mode]
        self.memory[compiled.ids:compiled.ids + 4 * len(ids)] = _ids_bytes(ids)
        build_dir = build_accelerator(config)
        work = (build_dir / "generate").resolve()
        work.mkdir(parents=True, exist_ok=True)
        (work / "in.bin").write_bytes(self.memory)
        results = work / "results.json"
        results.unlink(missing_ok=True)
        spec = work / "spec.json"
        spec.write_text(json.dumps({"jobs": [{"name": f"generate/{mode}", "memory": str(work / "in.bin"),
                                              "program_address": program.address,
                                              "steps": [{"patches": [], "out": str(work / "out.bin")}]}],
                                    "results": str(results)}))
        params = {"config": config.to_dict(), "spec": str(spec), "pause": self.pause, "seed": self.seed,
                  "memory_bits": max(12, math.ceil(math.log2(len(self.memory) + 1))), "poll_cycles": 5000,
                  "progress": None}
        sim.run(build_dir, "accelerator", "marca.tb.mamba", testcase="mixer_jobs", name="generate", params=params)
        entry = json.loads(results.read_text())[0]
        if entry["error"] != ErrorCode.NONE:
            raise RuntimeError(f"the {mode} program faulted on the RTL: {ErrorCode(entry['error']).name}")
        self.memory = bytearray(Path(entry["image"]).read_bytes())
        self.steps.append({"mode": mode, "tokens": len(ids), **entry["counters"]})
        return read_place(config, self.memory, compiled.logits, program.logits_rows)[:, :compiled.shape.vocab]

    def prefill(self, ids):
        return self._run("prefill", list(ids))

    def decode(self, token):
        return self._run("decode", [token])
