"""The Mamba-1 mixer compiler: compiled programs on the golden ISS against reference/mamba.py (tolerance),
decode chains against prefill (bit for bit), and the buffer-management switches (same bits, less traffic)."""

import dataclasses

import pytest
import torch

from marca import isa
from marca.compiler import CompileError, CompileOptions, compile_mixer
from marca.config import DEFAULT, TINY
from marca.golden import fp, iss, nonlinear
from marca.reference import mamba as reference

FP32_4x4 = dataclasses.replace(DEFAULT, name="fp32-4x4", storage_format="fp32", array_rows=4, array_cols=4)
FP32_3x4 = dataclasses.replace(DEFAULT, name="fp32-3x4", storage_format="fp32", array_rows=3, array_cols=4)
FP32_8x8 = dataclasses.replace(DEFAULT, name="fp32-8x8", storage_format="fp32")

# Output tolerance for FP32 compute (relative, in the 2-norm over the whole output). The scan state is
# looser: softplus's piecewise polynomial has up to ~10% relative error far left of 0 (docs/compiler.md),
# where Mamba's step sizes live, and the state carries that error; the output barely feels it.
OUT_TOLERANCE = 1e-3
STATE_TOLERANCE = 3e-2


def mixer(d_model, d_state, seed=1):
    dims = reference.MambaDims(d_model=d_model, d_state=d_state)
    return reference.random_mixer_weights(dims, seed=seed, dtype=torch.float64)


def tokens(length, d_model, seed=0):
    return torch.randn(length, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def relative(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def reference_with_accelerator_functions(weights, hidden, conv_state, ssm_state, config):
    """reference/mamba.py's prefill in float64, but with exp, SiLU and softplus replaced by the golden
    models of the accelerator's nonlinear units (applied to compute-format roundings of their inputs).
    What remains between this and the compiled program is only the compute format's rounding of every
    other operation, so it pins the compiler's data movement and operation order down tightly."""
    fmt = config.compute_format

    def unit(function):
        return lambda x: fp.decode(function(fp.encode(x, fmt), config), fmt)

    silu, softplus, exp = unit(nonlinear.silu), unit(nonlinear.softplus), unit(nonlinear.exp)
    x, z = reference.in_projection(weights, hidden[None])
    conv_out, conv = reference.causal_conv(weights, x, conv_state[None])
    x = silu(conv_out)
    d_state, dt_rank = weights["A_log"].shape[-1], weights["dt_proj.weight"].shape[-1]
    dt, B, C = (x @ weights["x_proj.weight"].T).split([dt_rank, d_state, d_state], dim=-1)
    delta = softplus(dt @ weights["dt_proj.weight"].T + weights["dt_proj.bias"])
    A = reference.state_matrix(weights)
    h, ys = ssm_state[None], []
    for t in range(x.shape[-2]):
        h = exp(delta[:, t, :, None] * A) * h + (delta[:, t, :, None] * x[:, t, :, None]) * B[:, t, None, :]
        ys.append((h @ C[:, t, :, None])[..., 0] + weights["D"] * x[:, t])
    y = torch.stack(ys, dim=-2)
    out = (y * silu(z)) @ weights["out_proj.weight"].T
    return out[0], conv[0], h[0]


@pytest.mark.parametrize("config, d_model, d_state, length", [
    (FP32_4x4, 16, 4, 1),
    (FP32_4x4, 16, 8, 5),
    (FP32_3x4, 24, 16, 9),          # nothing divides the 3-row array: padding everywhere
    (FP32_8x8, 64, 16, 32),
], ids=lambda v: getattr(v, "name", str(v)))
def test_prefill_matches_reference(config, d_model, d_state, length):
    weights = mixer(d_model, d_state)
    hidden = tokens(length, d_model)
    conv0 = torch.randn(2 * d_model, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.5
    ssm0 = torch.randn(2 * d_model, d_state, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    compiled = compile_mixer(weights, config, length=length)
    # A fresh sequence: within tolerance of the float reference.
    run = compiled.run(hidden)
    out, conv, ssm = reference.mixer_prefill(weights, hidden)
    assert relative(run.out, out) < OUT_TOLERANCE
    assert relative(run.conv_state, conv) < 1e-6
    assert relative(run.ssm_state, ssm) < STATE_TOLERANCE
    # Continuing from random states: tightly equal to the reference run with the accelerator's functions.
    run = compiled.run(hidden, conv0, ssm0)
    out, conv, ssm = reference_with_accelerator_functions(weights, hidden, conv0, ssm0, config)
    assert relative(run.out, out) < 1e-5
    assert relative(run.conv_state, conv) < 1e-6
    assert relative(run.ssm_state, ssm) < 1e-5


def test_chained_decode_equals_prefill_bit_for_bit():
    config, length = FP32_4x4, 6
    weights = mixer(16, 8, seed=2)
    hidden = tokens(length, 16, seed=3)
    prefill = compile_mixer(weights, config, length=length).run(hidden)
    decode = compile_mixer(weights, config, mode="decode")
    conv, ssm, outs = None, None, []
    for t in range(length):
        step = decode.run(hidden[t:t + 1], conv, ssm)
        outs.append(step.out[0])
        conv, ssm = step.conv_state, step.ssm_state
    assert torch.equal(torch.stack(outs), prefill.out)
    assert torch.equal(ssm, prefill.ssm_state) and torch.equal(conv, prefill.conv_state)
    # and the chain follows the float reference's own decode chain
    ref_conv, ref_ssm = reference.zero_states(weights)
    ref_outs = []
    for t in range(length):
        ref_out, ref_conv, ref_ssm = reference.mixer_decode(weights, hidden[t], ref_conv, ref_ssm)
        ref_outs.append(ref_out)
    assert relative(torch.stack(outs), torch.stack(ref_outs)) < OUT_TOLERANCE


def test_chunked_prefill_equals_whole_prefill():
    config = FP32_3x4
    weights = mixer(16, 4, seed=4)
    hidden = tokens(7, 16, seed=5)
    whole = compile_mixer(weights, config, length=7).run(hidden)
    first = compile_mixer(weights, config, length=3).run(hidden[:3])
    second = compile_mixer(weights, config, length=4).run(hidden[3:], first.conv_state, first.ssm_state)
    assert torch.equal(torch.cat([first.out, second.out]), whole.out)
    assert torch.equal(second.ssm_state, whole.ssm_state)


def test_buffer_management_switches_change_traffic_not_results():
    config, length = FP32_4x4, 8
    weights = mixer(16, 8, seed=6)
    hidden = tokens(length, 16, seed=7)
    variants = {
        "both": CompileOptions(),
        "no intra": CompileOptions(intra_operation=False),
        "no inter": CompileOptions(inter_operation=False),
        "neither": CompileOptions(intra_operation=False, inter_operation=False),
        "streamed": CompileOptions(max_weight_lines=4, max_block_tokens=3),
        "chunk split": CompileOptions(max_weight_lines=1, max_block_tokens=5),
        "grouped scan": CompileOptions(max_scan_tiles=3, max_block_tokens=3),
    }
    runs, compiled = {}, {}
    for name, options in variants.items():
        compiled[name] = compile_mixer(weights, config, length=length, options=options)
        runs[name] = compiled[name].run(hidden)
    for name, run in runs.items():
        assert torch.equal(run.out, runs["both"].out), name
        assert torch.equal(run.ssm_state, runs["both"].ssm_state), name
    read = {name: run.result.counters["dma_bytes_read"] for name, run in runs.items()}
    written = {name: run.result.counters["dma_bytes_written"] for name, run in runs.items()}
    assert compiled["both"].weights_resident and not compiled["streamed"].weights_resident
    assert compiled["streamed"].block_tokens == 3
    # intra-operation reuse: weights fetched once instead of once per token
    assert read["no intra"] > 3 * read["both"]
    # inter-operation: intermediates stay on chip instead of going out and back
    assert written["no inter"] > 5 * written["both"] and read["no inter"] > read["both"]
    assert read["neither"] > max(read["no intra"], read["no inter"])
    # the same arithmetic work in every variant
    beats = {name: run.result.counters["linear_beats"] for name, run in runs.items()}
    assert len(set(beats.values())) == 1, beats
    assert read["grouped scan"] > read["both"]     # the grouped scan fetches h and A per block
    # chunk splitting accumulates through the bias path: more LINEAR instructions, same beats
    assert runs["chunk split"].result.counters["linear_instructions"] > runs["streamed"].result.counters[
        "linear_instructions"]


def test_bf16_storage_matches_reference_on_rounded_weights():
    config = dataclasses.replace(DEFAULT, name="default-4x4", array_rows=4, array_cols=4)   # bf16 storage
    weights = mixer(16, 8, seed=9)
    rounded = {name: fp.decode(fp.encode(value, config.storage_format), config.storage_format)
               for name, value in weights.items() if name != "A_log"}
    A = fp.decode(fp.encode(-torch.exp(weights["A_log"]), config.storage_format), config.storage_format)
    rounded["A_log"] = torch.log(-A)
    hidden = fp.decode(fp.encode(tokens(6, 16, seed=10), config.storage_format), config.storage_format)
    run = compile_mixer(weights, config, length=6).run(hidden)
    out, _, _ = reference.mixer_prefill(rounded, hidden)
    assert relative(run.out, out) < 1e-2      # the output itself is rounded to bf16 (2^-9)


def test_fp16_configuration_runs():
    config = dataclasses.replace(TINY, name="tiny-fp16", weight_buffer_kib=4, activation_buffer_kib=4,
                                 state_buffer_kib=2, scratch_buffer_kib=2)
    weights = mixer(16, 4, seed=11)
    hidden = tokens(4, 16, seed=12)
    run = compile_mixer(weights, config, length=4).run(hidden)
    out, _, _ = reference.mixer_prefill(weights, hidden)
    assert relative(run.out, out) < 5e-2


def test_the_reference_comparison_catches_a_broken_program():
    """Drop the convolution-bias instruction from a correct program: the tolerance check must fail."""
    config = FP32_4x4
    weights = mixer(16, 4, seed=13)
    hidden = tokens(3, 16, seed=14)
    compiled = compile_mixer(weights, config, length=3)
    out, _, _ = reference.mixer_prefill(weights, hidden)
    assert relative(compiled.run(hidden).out, out) < OUT_TOLERANCE
    bias_address = None
    for instruction in compiled.instructions:
        if isinstance(instruction, isa.Elementwise) and instruction.op == isa.ElementwiseOp.ADD:
            bias_address = instruction
            break
    assert bias_address is not None
    broken_program = [i for i in compiled.instructions if i is not bias_address]
    memory = bytearray(compiled.write_inputs(None, hidden))
    code = isa.encode_program(broken_program)
    memory[compiled.program_address:compiled.program_address + len(code)] = code
    result, machine = iss.run_program(config, memory, compiled.program_address)
    assert result.error == isa.ErrorCode.NONE
    broken_out, _, _ = compiled.read_outputs(machine.memory_bytes())
    assert relative(broken_out, out) > 10 * OUT_TOLERANCE


def test_barriers_are_needed_and_minimal():
    config = FP32_4x4
    weights = mixer(16, 4, seed=15)
    compiled = compile_mixer(weights, config, length=4)
    barriers = sum(isinstance(i, isa.Barrier) for i in compiled.instructions)
    assert 0 < barriers < len(compiled.instructions) // 3
    stripped = [i for i in compiled.instructions if not isinstance(i, isa.Barrier)]
    memory = bytearray(compiled.write_inputs(None, tokens(4, 16)))
    code = isa.encode_program(stripped)
    memory[compiled.program_address:compiled.program_address + len(code)] = code
    with pytest.raises(iss.ProgramError, match="barrier"):
        iss.run_program(config, memory, compiled.program_address)


def test_compile_errors():
    weights = mixer(64, 16)
    # one channel tile's h and A: 2 x 100 lines of TINY's 128 (state-chunk tiling is not implemented;
    # d_state 16 needs 16); the message names the buffer, the need and what the configuration has
    with pytest.raises(CompileError, match=r"A tiles of one scan group needs 100 lines .* 'tiny' has state 28 of 128"):
        compile_mixer(mixer(16, 200), TINY, length=2)
    with pytest.raises(ValueError, match="mode"):
        compile_mixer(weights, FP32_8x8, mode="train", length=2)
    with pytest.raises(ValueError, match="length"):
        compile_mixer(weights, FP32_8x8, mode="decode", length=2)
    with pytest.raises(ValueError, match="length"):
        compile_mixer(weights, FP32_8x8, length=0)
    with pytest.raises(ValueError, match="max_block_tokens"):
        CompileOptions(max_block_tokens=0)


def test_layout_description():
    compiled = compile_mixer(mixer(16, 4), FP32_3x4, length=2)
    assert compiled.hidden.rows == 2 and compiled.hidden.row_elements == 16
    assert compiled.conv_state.format == "compute" and compiled.ssm_state.format == "compute"
    assert compiled.program_address % isa.INSTRUCTION_BYTES == 0
    assert compiled.program_address >= max(r.address + r.size for name, r in compiled.regions.items()
                                           if name != "program")
    text = compiled.listing()
    assert isa.assemble(text) == compiled.instructions


@pytest.mark.parametrize("dims", [
    reference.MambaDims(d_model=16, d_state=4, bias=True, conv_bias=False),      # biases, no conv bias
    reference.MambaDims(d_model=20, d_state=6, d_conv=2, expand=1, dt_rank=3),   # odd sizes everywhere
], ids=["biases", "odd-sizes"])
def test_mixer_variants(dims):
    weights = reference.random_mixer_weights(dims, seed=16, dtype=torch.float64)
    hidden = tokens(5, dims.d_model, seed=17)
    run = compile_mixer(weights, FP32_4x4, length=5).run(hidden)
    out, conv, _ = reference.mixer_prefill(weights, hidden)
    assert relative(run.out, out) < OUT_TOLERANCE
    assert relative(run.conv_state, conv) < 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_insert_barriers_makes_random_programs_legal(seed):
    """Strip the barriers from a constrained-random program; insert_barriers must put back enough for the
    ISS's race check (which lists exact elements) and never more than one per instruction."""
    from marca.compiler import insert_barriers
    from marca.golden.random_program import random_program
    config = [TINY, FP32_3x4, FP32_4x4][seed % 3]
    generated = random_program(config, seed=100 + seed, length=60)
    stripped = [i for i in generated.instructions if not isinstance(i, isa.Barrier)]
    rebuilt = insert_barriers(stripped, config)
    assert [i for i in rebuilt if not isinstance(i, isa.Barrier)] == stripped
    memory = bytearray(generated.memory)
    code = isa.encode_program(rebuilt)
    memory[:len(code)] = code
    result, machine = iss.run_program(config, memory)
    assert result.error == isa.ErrorCode.NONE
    expected, reference_machine = iss.run_program(config, generated.memory)
    data = slice(generated.data_address, None)        # the program regions differ by their barriers
    assert machine.memory_bytes()[data] == reference_machine.memory_bytes()[data]


def test_scan_in_channel_groups_when_the_state_does_not_fit():
    """A 1 KiB state buffer holds 16 lines; 64 channels x 16 states need 128 for h and A together, so the
    scan runs in groups of channel tiles that load and store their state every token block."""
    config = dataclasses.replace(FP32_4x4, name="fp32-4x4-small-state", state_buffer_kib=1)
    weights = mixer(32, 16, seed=18)
    hidden = tokens(6, 32, seed=19)
    compiled = compile_mixer(weights, config, length=6, options=CompileOptions(max_block_tokens=4))
    run = compiled.run(hidden)
    out, conv, ssm = reference.mixer_prefill(weights, hidden)
    assert relative(run.out, out) < OUT_TOLERANCE
    assert relative(run.ssm_state, ssm) < STATE_TOLERANCE
    whole = compile_mixer(weights, FP32_4x4, length=6).run(hidden)
    assert torch.equal(run.out, whole.out) and torch.equal(run.ssm_state, whole.ssm_state)


def test_mixer_larger_than_the_buffers_runs_in_channel_groups():
    """d_model 64 on TINY (1 KiB buffers): d_inner is 32 lines, its per-channel parameters alone 224 of the
    weight buffer's 128, a token's conv window 160 of the activation buffer's 128. The compiler cuts
    d_inner into channel groups that stream through memory; the result equals, bit for bit, the same
    array with buffers big enough for one group, and follows the float reference."""
    weights, hidden = mixer(64, 16, seed=20), tokens(2, 64, seed=21)
    grouped = compile_mixer(weights, TINY, length=2)
    assert grouped.plan.groups > 1 and not grouped.plan.parameters_resident
    roomy = dataclasses.replace(TINY, name="tiny-roomy", weight_buffer_kib=64, activation_buffer_kib=16,
                                state_buffer_kib=16, scratch_buffer_kib=16)
    whole = compile_mixer(weights, roomy, length=2)
    assert whole.plan.groups == 1
    run, expected = grouped.run(hidden), whole.run(hidden)
    assert torch.equal(run.out, expected.out) and torch.equal(run.ssm_state, expected.ssm_state)
    assert torch.equal(run.conv_state, expected.conv_state)
    out, _, _ = reference.mixer_prefill(weights, hidden)
    assert relative(run.out, out) < 5e-2            # FP16 throughout


def test_forced_channel_groups_are_bit_identical():
    config = FP32_4x4
    weights, hidden = mixer(32, 8, seed=22), tokens(6, 32, seed=23)
    conv0 = torch.randn(64, 4, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    ssm0 = torch.randn(64, 8, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    whole = compile_mixer(weights, config, length=6).run(hidden, conv0, ssm0)
    for options in (CompileOptions(max_group_lines=1), CompileOptions(max_group_lines=3, max_block_tokens=4),
                    CompileOptions(max_group_lines=2, inter_operation=False, max_scan_tiles=3)):
        compiled = compile_mixer(weights, config, length=6, options=options)
        assert compiled.plan.groups > 1
        run = compiled.run(hidden, conv0, ssm0)
        assert torch.equal(run.out, whole.out), options
        assert torch.equal(run.ssm_state, whole.ssm_state) and torch.equal(run.conv_state, whole.conv_state)


# Batched decode: B sequences, one token each, every sequence with its own states --------------------------

def batch_inputs(B, d_model, d_state, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, d_model, generator=generator, dtype=torch.float64)
    conv = torch.randn(B, 2 * d_model, 4, generator=generator, dtype=torch.float64) * 0.5
    ssm = torch.randn(B, 2 * d_model, d_state, generator=generator, dtype=torch.float64)
    return hidden, conv, ssm


def batched_mismatches(weights, config, B, hidden, conv, ssm, options=CompileOptions()):
    """Run one batched step and B separate batch-1 steps; the sequences whose output or states differ."""
    one = compile_mixer(weights, config, mode="decode", options=options)
    batched = compile_mixer(weights, config, mode="decode", batch=B, options=options)
    run = batched.run(hidden, conv, ssm)
    wrong = []
    for b in range(B):
        alone = one.run(hidden[b:b + 1], conv[b], ssm[b])
        if not (torch.equal(alone.out[0], run.out[b]) and torch.equal(alone.conv_state, run.conv_state[b])
                and torch.equal(alone.ssm_state, run.ssm_state[b])):
            wrong.append(b)
    return batched, wrong


@pytest.mark.parametrize("config, d_model, d_state, B, options", [
    (FP32_4x4, 16, 4, 3, CompileOptions()),
    (FP32_4x4, 16, 8, 5, CompileOptions(max_scan_tiles=3)),          # scan groups, the last one partial
    (FP32_4x4, 16, 8, 5, CompileOptions(max_group_lines=1, max_block_tokens=2)),   # channel groups, blocks
    (FP32_4x4, 16, 8, 4, CompileOptions(max_weight_lines=6)),         # streamed weights, split chunks
    (FP32_4x4, 16, 8, 3, CompileOptions(intra_operation=False, inter_operation=False)),
    (FP32_4x4, 16, 4, 4, CompileOptions(stream_rows=True)),           # input and output rows streamed
    (FP32_3x4, 24, 8, 3, CompileOptions()),     # B and C off the column chunks: x_proj's parts not fused
], ids=["plain", "scan-groups", "channel-groups", "streamed", "switches-off", "stream-rows", "3x4"])
def test_batched_decode_equals_separate_steps(config, d_model, d_state, B, options):
    """A batched decode step leaves every sequence's output, conv state and scan state exactly as its own
    batch-1 step does."""
    weights = mixer(d_model, d_state, seed=30)
    batched, wrong = batched_mismatches(weights, config, B, *batch_inputs(B, d_model, d_state, seed=31),
                                        options=options)
    assert batched.plan.sequences and wrong == []
    if options.max_weight_lines:
        assert not batched.plan.weights_resident
    if options.max_group_lines:
        assert batched.plan.groups > 1 and batched.plan.block_tokens < B


def test_batched_decode_on_the_demo_configuration():
    """The demo's sizes at B = 16 (the planner's blocks of sequences and whole-state scan groups)."""
    from marca.demo import DEMO_CONFIG
    weights = mixer(32, 16, seed=32)
    batched, wrong = batched_mismatches(weights, DEMO_CONFIG, 16, *batch_inputs(16, 32, 16, seed=33))
    assert wrong == []
    assert batched.plan.block_tokens > 1 and batched.plan.scan_tiles == 16   # 16 channel tiles: one group
    # x_proj's dt (1 row tile), B and C (4 each) in one LINEAR per block
    assert any(isinstance(i, isa.Linear) and i.row_tile_count == 9 for i in batched.instructions)


def test_batched_decode_check_catches_shared_states(monkeypatch):
    """Broken variant: every block of one sequence reads and writes sequence 0's states (two sequences
    sharing a state); the comparison with separate steps must catch it."""
    from marca.compiler import mixer as mixer_module
    weights = mixer(16, 4, seed=34)
    inputs = batch_inputs(3, 16, 4, seed=35)
    monkeypatch.setattr(mixer_module, "_sequence", lambda place, b: place)
    _, wrong = batched_mismatches(weights, FP32_4x4, 3, *inputs, options=CompileOptions(max_block_tokens=1))
    assert wrong != []


def test_decode_step_is_the_batched_lowering_of_one_sequence():
    """A decode step is the batched decode's lowering with B = 1 (per-sequence conv window, fused x_proj
    where it can, weights loaded one use ahead); ``batch=1`` is the same program."""
    weights = mixer(16, 4, seed=36)
    plain = compile_mixer(weights, FP32_4x4, mode="decode")
    assert compile_mixer(weights, FP32_4x4, mode="decode", batch=1).instructions == plain.instructions
    assert plain.plan.sequences and plain.plan.block_tokens == 1
    with pytest.raises(ValueError, match="batch"):
        compile_mixer(weights, FP32_4x4, mode="decode", batch=0)
    with pytest.raises(ValueError, match="batch"):
        compile_mixer(weights, FP32_4x4, mode="prefill", length=4, batch=2)


# Resident weights: a decode step that finds them left on chip by the step before ------------------------

def resident_chain(compiled, steps, conv, ssm, *, keep_buffers=True):
    """Run ``compiled``'s loading step and then its resident step ``len(steps) - 1`` times on one ISS
    machine (buffers kept between programs, inputs patched in by the host); the outputs and final states."""
    from marca.tb.mamba import _hidden_patch
    machine = iss.Machine(compiled.config, compiled.write_inputs(None, steps[0], conv, ssm))
    outputs = []
    for k, hidden in enumerate(steps):
        if k:
            machine.write_memory(*_hidden_patch(compiled, hidden))
            machine.restart(keep_buffers=keep_buffers)
        address = compiled.resident_program_address if k else compiled.program_address
        result = machine.run(address)
        assert result.error == isa.ErrorCode.NONE, result
        out, conv_after, ssm_after = compiled.read_outputs(machine.memory_bytes())
        outputs.append(out)
    return outputs, conv_after, ssm_after


@pytest.mark.parametrize("batch", [1, 3])
def test_resident_weights_decode_equals_loading_decode(batch):
    """Three chained decode steps, the last two finding the weights on chip: outputs and states bit for bit
    those of three loading steps; the resident step reads no weight, parameter or A byte."""
    weights = mixer(16, 4, seed=40)
    hidden, conv, ssm = batch_inputs(batch, 16, 4, seed=41)
    steps = [hidden + k for k in range(3)]
    conv, ssm = (conv, ssm) if batch > 1 else (conv[0], ssm[0])
    compiled = compile_mixer(weights, FP32_4x4, mode="decode", batch=batch, resident=True)
    outputs, conv_after, ssm_after = resident_chain(compiled, steps, conv, ssm)
    expected_conv, expected_ssm = conv, ssm
    for k, rows in enumerate(steps):
        run = compiled.run(rows, expected_conv, expected_ssm)
        assert torch.equal(outputs[k], run.out), f"step {k}"
        expected_conv, expected_ssm = run.conv_state, run.ssm_state
    assert torch.equal(conv_after, expected_conv) and torch.equal(ssm_after, expected_ssm)
    from marca.compiler.program import program_counters
    loaded, resident = (program_counters(program, FP32_4x4)["dma_bytes_read"]
                        for program in (compiled.instructions, compiled.resident_instructions))
    weights_bytes = sum(region.size for name, region in compiled.regions.items()
                        if name.startswith(("matrix ", "parameters", "A tiles")))
    assert loaded - resident == weights_bytes


def test_resident_step_after_a_reset_reads_undefined_buffers():
    """Broken use: the resident step on a machine whose buffers were reset reads never-written weights."""
    weights = mixer(16, 4, seed=40)
    hidden, conv, ssm = batch_inputs(1, 16, 4, seed=41)
    compiled = compile_mixer(weights, FP32_4x4, mode="decode", resident=True)
    with pytest.raises(iss.ProgramError, match="nothing has written"):
        resident_chain(compiled, [hidden, hidden], conv[0], ssm[0], keep_buffers=False)


def test_resident_weights_need_them_on_chip():
    weights = mixer(16, 4, seed=40)
    with pytest.raises(CompileError, match="resident weights need"):
        compile_mixer(weights, FP32_4x4, mode="decode", resident=True, options=CompileOptions(max_weight_lines=8))
    with pytest.raises(ValueError, match="resident"):
        compile_mixer(weights, FP32_4x4, mode="prefill", length=2, resident=True)


def test_contiguous_dma_rows_become_long_rows():
    """The emitter merges rows that follow one another in memory and in the buffer into rows of whole lines
    as long as the 16-bit field allows, the rest in one more row; the elements moved are the same."""
    from marca.compiler.emit import Emitter
    config = dataclasses.replace(DEFAULT, name="lanes-1024", array_rows=32, array_cols=32)
    emitter = Emitter(config)
    lines = 150             # 153,600 elements: two rows of 63 lines and a rest of 24
    emitter.load_lines(4096, lines, isa.Buffer.WEIGHT, 0)
    program = emitter.program
    assert [(i.row_count, i.row_elements) for i in program] == [(2, 63 * 1024), (1, 24 * 1024)]
    moved = [(i.memory_address + r * i.memory_row_stride, i.buffer_address + r * i.buffer_row_stride, i.row_elements)
             for i in program for r in range(i.row_count)]
    size = config.storage_bytes
    assert moved == [(4096, 0, 64512), (4096 + 64512 * size, 64512, 64512),
                     (4096 + 2 * 64512 * size, 2 * 64512, 24576)]
    emitter = Emitter(config)         # rows with a gap stay rows
    emitter.dma(isa.Load, memory_address=0, rows=3, row_elements=1024, memory_row_stride=8192, buffer=isa.Buffer.WEIGHT,
                address=0, buffer_row_stride=1024, compute=False)
    assert [(i.row_count, i.row_elements) for i in emitter.program] == [(3, 1024)]


def test_weight_blocks_of_several_row_tiles_when_a_row_does_not_fit():
    """A weight area smaller than one row tile's chunks: the compiler streams blocks of several row tiles x
    a few chunks (the tiles' accumulations interleave instead of one chain per tile), bit for bit the
    program whose weights all fit."""
    weights = mixer(32, 4, seed=3)
    hidden, conv, ssm = batch_inputs(2, 32, 4, seed=4)
    expected = compile_mixer(weights, FP32_4x4, mode="decode", batch=2).run(hidden, conv, ssm)
    compiled = compile_mixer(weights, FP32_4x4, mode="decode", batch=2, options=CompileOptions(max_weight_lines=10))
    shapes = {(i.row_tile_count, i.chunk_count) for i in compiled.instructions
              if isinstance(i, isa.Linear) and i.matrix_buffer == isa.Buffer.WEIGHT}
    assert max(tiles for tiles, _ in shapes) > 1
    run = compiled.run(hidden, conv, ssm)
    assert torch.equal(run.out, expected.out) and torch.equal(run.conv_state, expected.conv_state) \
        and torch.equal(run.ssm_state, expected.ssm_state)


def test_emitter_hands_out_one_object_per_distinct_instruction():
    """A prefill repeats its token block's instructions: the emitter keeps one object per distinct
    instruction (a small preset's 2048-token prefill is tens of millions of them) and the passes after it
    work once per object (barriers, encoding); the program's words are still isa.encode_program's, which
    encodes every entry on its own. Equal fields of another instruction type are another instruction."""
    from marca.compiler import Emitter
    from marca.compiler.emit import encode_fast
    compiled = compile_mixer(mixer(16, 4), TINY, mode="prefill", length=8)
    program = compiled.instructions
    assert len({id(i) for i in program}) == len(set(program)) < len(program) // 2
    code = isa.encode_program(program)
    assert encode_fast(program) == code
    assert compiled.memory[compiled.program_address:compiled.program_address + len(code)] == code
    emitter = Emitter(TINY)
    fields = dict(memory_address=64, row_count=2, row_elements=4, memory_row_stride=8, buffer=isa.Buffer.SCRATCH,
                  buffer_address=0, buffer_row_stride=4)
    for instruction in (isa.Load(**fields), isa.Load(**fields), isa.Store(**fields),
                        isa.Load(**{**fields, "row_count": 3})):
        emitter.emit(instruction)
    first, again, store, other = emitter.program
    assert again is first and store is not first and other is not first
    assert (type(store), other.row_count) == (isa.Store, 3)
    with pytest.raises(CompileError, match="row_count"):
        emitter.emit(isa.Load(**{**fields, "row_count": 1 << 16}))


def test_streamed_decode_blocks_chunks_when_few_tokens_pass_a_weight_group():
    """Streamed weights at B = 1: whole row tiles fit half the weight area, but one token through a few tiles
    leaves each chunk round shorter than the array's latency, so the compiler streams groups of many tiles x
    a few chunks (accumulated through the bias path) in balanced sizes, and the step's last LINEAR (out_proj)
    ends with a shorter piece; bit for bit the step whose weights all fit."""
    weights = mixer(32, 4, seed=5)
    hidden, conv, ssm = batch_inputs(1, 32, 4, seed=6)
    expected = compile_mixer(weights, FP32_4x4, mode="decode").run(hidden, conv[0], ssm[0])
    compiled = compile_mixer(weights, FP32_4x4, mode="decode", options=CompileOptions(max_weight_lines=64))
    assert not compiled.weights_resident
    streamed = [i for i in compiled.instructions if isinstance(i, isa.Linear) and i.matrix_buffer == isa.Buffer.WEIGHT]
    assert any(i.init == isa.LinearInit.BIAS and i.bias_address == i.output_address for i in streamed)
    assert streamed[-1].chunk_count < streamed[-3].chunk_count      # out_proj's last group in pieces
    run = compiled.run(hidden, conv[0], ssm[0])
    assert torch.equal(run.out, expected.out) and torch.equal(run.conv_state, expected.conv_state) \
        and torch.equal(run.ssm_state, expected.ssm_state)
