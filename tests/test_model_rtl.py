"""Whole Mamba models on the accelerator RTL (Verilator): a prompt prefill and decode steps, with random
AXI pauses, bit for bit against the golden ISS (every step's whole memory image and counters) on tiny and
fpga-small, one of them with d_inner in streamed channel groups, rows streamed in chunks and the norm in
d_model chunks (the dataflow of models too big for the buffers)."""

import pytest
import torch

from marca.compiler import CompileOptions, compile_model
from marca.config import FPGA_SMALL, TINY

transformers = pytest.importorskip("transformers")

PROMPT, DECODE = [5, 1, 30], [7, 2, 19, 11]


def small_model(seed):
    config = transformers.MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=40, state_size=4,
                                      intermediate_size=32, time_step_rank=1)
    torch.manual_seed(seed)
    return transformers.MambaForCausalLM(config).to(torch.float64).eval()


@pytest.mark.verilator
@pytest.mark.parametrize("preset, options", [
    (TINY, CompileOptions(max_group_lines=1, stream_rows=True)),
    (FPGA_SMALL, CompileOptions()),
], ids=["tiny-streamed", "fpga-small"])
def test_model_on_rtl_equals_iss(preset, options):
    from marca.tb.model import check_against_iss, run_model_on_rtl
    compiled = compile_model(small_model(3), config=preset, prompt_length=len(PROMPT), options=options)
    if options.stream_rows:
        plan = compiled.programs["decode"].mixer_plan
        assert plan.groups > 1 and not plan.hidden_resident and not plan.output_resident
    run = run_model_on_rtl(compiled, PROMPT, DECODE, pause=0.3, seed=7, name=f"model-{preset.name}")
    assert len(run.steps) == 1 + len(DECODE)
    check_against_iss(compiled, run)


def test_a_corrupted_rtl_image_is_caught():
    """The comparison can fail: one flipped byte in a layer's scan state after a step is reported."""
    from marca.tb.model import ModelRun, check_against_iss
    from marca.tb.mamba import RtlStep
    from marca.golden.iss import run_program
    from marca.isa import ErrorCode
    compiled = compile_model(small_model(3), config=TINY, prompt_length=len(PROMPT))
    memory = bytearray(compiled.memory)
    memory[compiled.ids:compiled.ids + 12] = b"".join(i.to_bytes(4, "little") for i in PROMPT)
    result, machine = run_program(TINY, memory, compiled.programs["prefill"].address)
    image = bytearray(machine.memory_bytes())
    state = compiled.states[1][1]
    image[state.address + 3] ^= 0x40
    fake = ModelRun(bytes(memory), [], [RtlStep(bytes(image), ErrorCode.NONE, 0, 2, result.counters, 0.0)])
    with pytest.raises(AssertionError, match="layer 1 ssm_state"):
        check_against_iss(compiled, fake)
