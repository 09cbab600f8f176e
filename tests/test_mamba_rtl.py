"""A compiled Mamba-1 mixer end to end on the accelerator RTL (tb/mamba.py, docs/mamba.md).

Verilator tier: four configurations: TINY (2x2 FP16/FP16, 32-bit bus, random AXI pauses), MIXED (2x2 FP32
compute / BF16 storage, 64-bit bus), FPGA_SMALL (4x4 BF16, 32-bit bus, random pauses), whose builds are the
ones tests/test_accelerator.py makes (shared), and FP32 (MIXED with FP32 storage, for the FP32 accuracy
bound; its own build). Per configuration, in one simulator process: prefills
from zero states and chains of decode steps over the same tokens. After every run the whole memory image
and the deterministic counters equal the golden ISS's; chained decode equals prefill bit for bit (outputs
and both final states); the output is within a per-format tolerance of the float reference.

Fast tier: the scoreboard itself (tb/mamba.py's ``evaluate``) fed with ISS runs in place of RTL runs
passes, and catches a flipped bit, a wrong counter and a decode chain that loses its state.
"""

import dataclasses
import json

import pytest
from marca.hw.controller import COUNTERS
from marca.tb import mamba

from marca.config import FPGA_SMALL, TINY
from marca.isa import ErrorCode
from marca.sim import BUILD_ROOT


# The same configuration as tests/test_accelerator.py's MIXED (field for field, so the Verilog and its
# build are shared): FP32 compute with BF16 storage, so the DMA converts and states travel as FP32.
MIXED = dataclasses.replace(TINY, name="mixed", array_rows=2, array_cols=2, compute_format="fp32",
                            storage_format="bf16", axi_data_width=64, weight_buffer_kib=2,
                            activation_buffer_kib=2, state_buffer_kib=2, scratch_buffer_kib=2)

# FP32 compute and storage: the output is not rounded to a narrower format, so the error left is the compute
# format's and the nonlinear units' (the 1e-3 bound of docs/compiler.md). The one build of this file's own.
FP32 = dataclasses.replace(MIXED, name="fp32-2x2", storage_format="fp32")

# Relative 2-norm error of the output against the float64 reference on storage-rounded weights and tokens.
# The output is itself rounded to the storage format (BF16: 2^-9 relative per element).
TOLERANCE = {"tiny": 1e-2, "mixed": 5e-3, "fp32-2x2": 1e-3, "fpga-small": 5e-2}
# Relative 2-norm error of the final scan state (compute format, never rounded to storage): FP32 must be
# within 1e-3 since softplus and SiLU are relatively accurate (issue 13: it was 6.1e-3).
STATE_TOLERANCE = {"fp32-2x2": 1e-3}

CASES = {
    "tiny": [mamba.MixerCase(name="d16-n4-L8", config=TINY, d_model=16, d_state=4, length=8, seed=1),
             mamba.MixerCase(name="d16-n8-L32", config=TINY, d_model=16, d_state=8, length=32, seed=2,
                             decode=False)],
    "mixed": [mamba.MixerCase(name="d16-n16-L4", config=MIXED, d_model=16, d_state=16, length=4, seed=3)],
    "fp32-2x2": [mamba.MixerCase(name="d16-n8-L12", config=FP32, d_model=16, d_state=8, length=12, seed=6,
                                 decode=False)],
    "fpga-small": [mamba.MixerCase(name="d32-n4-L4", config=FPGA_SMALL, d_model=32, d_state=4, length=4, seed=4),
                   mamba.MixerCase(name="d16-n16-L6", config=FPGA_SMALL, d_model=16, d_state=16, length=6,
                                   seed=5)],
}
PAUSE = {"tiny": 0.2, "mixed": 0.0, "fp32-2x2": 0.0, "fpga-small": 0.1}


@pytest.mark.verilator
@pytest.mark.parametrize("name", CASES)
def test_mamba_mixer_on_rtl(name):
    cases = CASES[name]
    config = cases[0].config
    prepared = [mamba.prepare(case) for case in cases]
    rtl = mamba.run_on_rtl(config, prepared, name="mamba-test", pause=PAUSE[name], seed=7)
    reports = []
    for item in prepared:
        report = mamba.evaluate(item, rtl)     # bit-exact image and counters, decode == prefill
        error = report["prefill"]["relative_error"]
        assert error < TOLERANCE[name], f"{item.case.name} on {name}: relative error {error:.2e}"
        state_error = report["prefill"]["state_relative_error"]
        assert state_error < STATE_TOLERANCE.get(name, 1.0), f"{item.case.name} on {name}: scan state {state_error:.2e}"
        report["utilization"] = mamba.utilization(item.prefill, rtl[item.case.name]["prefill"][0].counters)
        reports.append(report)
    out = BUILD_ROOT / "mamba" / f"test-{name}.json"     # measured numbers for docs/mamba.md
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(reports, indent=1))


# ------------------------------------------------------------------------------------------------------
# Fast tier: the scoreboard can fail
# ------------------------------------------------------------------------------------------------------

def _iss_as_rtl(prepared, *, forget_buffers=False):
    """What a perfect RTL would leave: the ISS's runs in the shape :func:`mamba.run_on_rtl` returns.
    ``forget_buffers``: a broken machine whose buffers read zero at the start of every run."""
    from marca.golden.iss import run_program

    def step(memory, address):
        options = dict(buffer_fill=0, check_undefined=False) if forget_buffers else {}
        result, machine = run_program(prepared.case.config, memory, address, **options)
        counters = dict(dict.fromkeys(COUNTERS, 0), **result.counters, cycles=1)     # the RTL's own: 0
        return mamba.RtlStep(machine.memory_bytes(), result.error, 0, 0b010, counters, 0.0)

    prefill = [step(prepared.prefill_image, prepared.prefill.program_address)]
    decode, memory = [], prepared.decode_first_image
    for k in range(prepared.case.length):
        if k:
            address, data = prepared.decode_patches[k - 1]
            memory = bytearray(decode[-1].image)
            memory[address:address + len(data)] = data
        decode.append(step(bytes(memory), mamba.decode_program_address(prepared.decode, k)))
    return {prepared.case.name: {"prefill": prefill, "decode": decode}}


def test_scoreboard_catches_a_machine_that_forgets_resident_weights():
    """Resident weights: a machine that clears its buffers between runs computes the later steps from zero
    weights; the scoreboard (whose ISS keeps its buffers) must catch it at step 1."""
    from marca.demo import DEMO_CONFIG
    prepared = mamba.prepare(mamba.MixerCase(name="forgets", config=DEMO_CONFIG, d_model=16, d_state=16, length=2,
                                             resident=True))
    assert prepared.decode.resident_instructions is not None
    with pytest.raises(AssertionError, match="decode step 1: final memory differs"):
        mamba.evaluate(prepared, _iss_as_rtl(prepared, forget_buffers=True))


@pytest.fixture(scope="module")
def tiny_case():
    prepared = mamba.prepare(mamba.MixerCase(name="fast", config=TINY, d_model=16, d_state=4, length=3))
    return prepared, _iss_as_rtl(prepared)


def test_scoreboard_accepts_the_iss(tiny_case):
    prepared, runs = tiny_case
    report = mamba.evaluate(prepared, runs)
    assert report["decode"]["equals_prefill_bit_for_bit"]
    assert report["prefill"]["relative_error"] < TOLERANCE["tiny"]


def test_scoreboard_catches_a_flipped_bit(tiny_case):
    prepared, runs = tiny_case
    step = runs["fast"]["prefill"][0]
    address = prepared.prefill.output.address + 3
    image = bytearray(step.image)
    image[address] ^= 0x10
    broken = {"fast": dict(runs["fast"], prefill=[dataclasses.replace(step, image=bytes(image))])}
    with pytest.raises(AssertionError, match="final memory differs"):
        mamba.evaluate(prepared, broken)


def test_scoreboard_catches_a_wrong_counter_and_error(tiny_case):
    prepared, runs = tiny_case
    step = runs["fast"]["prefill"][0]
    counters = dict(step.counters, linear_beats=step.counters["linear_beats"] - 1)
    broken = {"fast": dict(runs["fast"], prefill=[dataclasses.replace(step, counters=counters)])}
    with pytest.raises(AssertionError, match="counter linear_beats"):
        mamba.evaluate(prepared, broken)
    broken = {"fast": dict(runs["fast"], prefill=[dataclasses.replace(step, error=ErrorCode.BUS_ERROR)])}
    with pytest.raises(AssertionError, match="RTL error BUS_ERROR"):
        mamba.evaluate(prepared, broken)


def test_scoreboard_catches_a_decode_chain_that_differs_from_prefill(tiny_case):
    """A host that writes the wrong token into later decode steps: every step still equals the ISS (given the
    same inputs), but the chain no longer equals prefill."""
    prepared, _ = tiny_case
    wrong = dataclasses.replace(prepared, decode_patches=[mamba._hidden_patch(prepared.decode, prepared.hidden[0:1])]
                                * (prepared.case.length - 1))
    with pytest.raises(AssertionError, match="decode step 1's output differs from prefill token 1"):
        mamba.evaluate(wrong, _iss_as_rtl(wrong))


def test_operation_classes_cover_every_beat(tiny_case):
    prepared, runs = tiny_case
    counters = dict(runs["fast"]["prefill"][0].counters, cycles=10_000, compute_busy_cycles=9_000)
    result = mamba.utilization(prepared.prefill, counters)      # asserts classified == counted beats
    assert all(result["classes"][kind]["beats"] > 0 for kind in mamba.OPERATION_CLASSES)
    assert result["ideal_cycles"] == sum(result["classes"][kind]["beats"] for kind in mamba.OPERATION_CLASSES)
    assert sum(result["cycle_breakdown"].values()) == 10_000


def test_demo_arguments():
    from marca.bench.accelerator import BENCH_CONFIG

    from marca import demo
    assert demo.resolve_config("demo") == BENCH_CONFIG
    assert demo.resolve_config("tiny") == TINY
    for argv in (["--config", "no-such-preset"], ["--tokens", "0"], ["--d-model", "-1"]):
        with pytest.raises(SystemExit) as stop:
            demo.main(argv)
        assert stop.value.code == 2


@pytest.mark.verilator
def test_batched_decode_on_rtl():
    """A batched decode step of three sequences (each with its own random states) on the demo
    configuration's RTL with random AXI pauses: the whole memory image and the counters equal the ISS's,
    and on the ISS the step equals three separate batch-1 steps (outputs and every sequence's states)."""
    from marca.bench import mamba as bench
    from marca.demo import DEMO_CONFIG
    prepared = bench.batched_case(DEMO_CONFIG, 3, d_model=16)
    assert prepared[0].prefill.batch == 3 and prepared[0].prefill.plan.sequences
    rtl = mamba.run_on_rtl(DEMO_CONFIG, [prepared[0]], name="test-mamba-batched", pause=0.1, seed=7)
    rows = bench.batched_rtl_check([prepared], rtl)       # raises on any difference
    assert rows[0]["equals_separate_steps"] and rows[0]["cycles"] > 0


@pytest.mark.verilator
def test_resident_weights_decode_chain_on_rtl():
    """Resident weights on the demo configuration's RTL with random AXI pauses: the first decode step loads
    the weights, the next ones run the program without their LOADs and find them in the buffers the step
    before left (no reset between runs). Every step's image and counters equal the ISS's (one ISS machine
    keeping its buffers between the steps), and the chain equals the prefill bit for bit."""
    from marca.demo import DEMO_CONFIG
    case = mamba.MixerCase(name="resident", config=DEMO_CONFIG, d_model=16, d_state=16, length=3, seed=8,
                           resident=True)
    prepared = mamba.prepare(case)
    assert prepared.decode.resident_instructions is not None
    rtl = mamba.run_on_rtl(DEMO_CONFIG, [prepared], name="test-mamba-resident", pause=0.1, seed=7)
    report = mamba.evaluate(prepared, rtl)       # raises on any difference
    assert report["decode"]["equals_prefill_bit_for_bit"]
    read = [step.counters["dma_bytes_read"] for step in rtl["resident"]["decode"]]
    assert read[1] == read[2] < read[0]
