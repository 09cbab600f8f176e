"""Fast tier of the PE array tests: Amaranth's simulator, small shapes, a few hundred beats each.

The same stimulus, golden scoreboard and properties as the Verilator tier (tests/test_pe_array.py):
bit-exact results in order under random stalls, cycle-exact latency and one beat per cycle without
stalls, hazard intervals, the lane-extension hook, and deliberately broken variants that must be caught.
"""

import numpy as np
import pytest
import torch
from amaranth.sim import Simulator
from marca.golden.pe_array import run_beats
from marca.hw.pe_array import PEArray, pe_array_layouts, tree_node_column
from marca.tb.pe_array import (
    SelectExtension,
    concat_beats,
    pack_beats,
    pattern_beats,
    random_beats,
    select_extension_golden,
    unpack_results,
)

from marca.formats import BF16, FP16, FP32
from marca.ops import ArrayMode, ElementwiseOp


def simulate(dut: PEArray, words: list[int], *, valid_rate=1.0, ready_rate=1.0, seed=0, expected=None,
             max_cycles=None):
    """Drive ``words`` into ``dut.i`` and collect ``dut.o``; returns (accept cycles, [(cycle, word)])."""
    rng = np.random.default_rng(seed)
    expected = len(words) if expected is None else expected
    max_cycles = max_cycles or 40 * len(words) + 200
    accepted, outputs = [], []

    async def bench(ctx):
        next_beat, presenting = 0, False
        for cycle in range(1, max_cycles + 1):
            if not presenting and next_beat < len(words) and (valid_rate >= 1 or rng.random() < valid_rate):
                ctx.set(dut.i.payload.as_value(), words[next_beat])
                presenting = True
            ctx.set(dut.i.valid, int(presenting))
            ready = 1 if ready_rate >= 1 else int(rng.random() < ready_rate)
            ctx.set(dut.o.ready, ready)
            if presenting and ctx.get(dut.i.ready):
                accepted.append(cycle)
                next_beat += 1
                presenting = False
            if ready and ctx.get(dut.o.valid):
                outputs.append((cycle, ctx.get(dut.o.payload.as_value())))
            await ctx.tick()
            if len(outputs) >= expected and next_beat == len(words):
                break

    simulator = Simulator(dut)
    simulator.add_clock(1e-6)
    simulator.add_testbench(bench)
    simulator.run()
    return accepted, outputs


def check(dut, beats, *, extension=None, **options):
    """Run ``beats`` through ``dut`` and compare with the golden model.

    Returns (acceptance cycles, [(cycle, result word)], source beat of each result)."""
    source, mode, result = run_beats(beats, rows=dut.rows, cols=dut.cols, fmt=dut.fmt, extension=extension)
    words = pack_beats(dut.layouts.operands, beats)
    accepted, outputs = simulate(dut, words, expected=len(source), **options)
    assert len(accepted) == len(words), f"{len(accepted)} of {len(words)} beats accepted"
    assert len(outputs) == len(source), f"{len(outputs)} result beats, expected {len(source)}"
    got_mode, got_result = unpack_results(dut.layouts.results, [word for _, word in outputs], dut.lanes)
    assert got_mode.tolist() == mode.tolist()
    mismatch = np.nonzero((got_result != result.numpy()).any(axis=1))[0]
    assert not len(mismatch), (f"result beat {mismatch[0]} (input beat {int(source[mismatch[0]])}) differs: "
                               f"{[hex(v) for v in got_result[mismatch[0]]]} expected "
                               f"{[hex(v) for v in result[mismatch[0]].tolist()]}")
    return accepted, outputs, source


# Parameters and layouts -------------------------------------------------------------------------------

def test_parameters_are_validated():
    with pytest.raises(ValueError, match="rows"):
        PEArray(rows=0, cols=2, fmt=FP32)
    with pytest.raises(ValueError, match="cols"):
        PEArray(rows=2, cols=3, fmt=FP32)
    with pytest.raises(ValueError, match="fmt"):
        PEArray(rows=2, cols=2, fmt="fp32")
    with pytest.raises(ValueError, match="lane_extension"):
        PEArray(rows=2, cols=2, fmt=FP32, lane_extension=3)
    with pytest.raises(ValueError, match="accumulators"):
        PEArray(rows=2, cols=2, fmt=FP32, accumulators=3)


def test_layouts_carry_function_field_only_with_extension():
    plain = pe_array_layouts(rows=2, cols=2, fmt=BF16)
    extended = pe_array_layouts(rows=2, cols=2, fmt=BF16, function_bits=3)
    assert "function" not in dict(plain.operands.members)
    assert extended.operands["function"].shape.width == 3
    assert plain.operands["a"].shape.length == 4


def test_tree_nodes_take_every_column_but_the_last_once():
    for cols in (1, 2, 4, 8, 16, 32):
        depth = (cols - 1).bit_length()
        columns = [tree_node_column(level, first) for level in range(depth)
                   for first in range(0, cols, 2 << level)]
        assert sorted(columns) == list(range(cols - 1))


# Behaviour --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, cols, fmt, accumulators",
                         [(2, 2, FP32, None), (2, 4, BF16, None), (3, 2, FP16, 1), (1, 1, BF16, 2)])
def test_random_beats_with_stalls(rows, cols, fmt, accumulators):
    dut = PEArray(rows=rows, cols=cols, fmt=fmt, accumulators=accumulators)
    beats = random_beats(rows=rows, cols=cols, fmt=fmt, count=160,
                         generator=torch.Generator().manual_seed(rows), slots=dut.accumulators)
    check(dut, beats, valid_rate=0.7, ready_rate=0.6, seed=cols)


def test_no_stalls_one_beat_per_cycle_and_exact_latency():
    dut = PEArray(rows=2, cols=4, fmt=BF16)
    generator = torch.Generator().manual_seed(5)
    elementwise = pattern_beats(rows=2, cols=4, fmt=BF16, count=24, generator=generator,
                                mode=ArrayMode.ELEMENTWISE)
    linear = pattern_beats(rows=2, cols=4, fmt=BF16, count=24, generator=generator, mode=ArrayMode.LINEAR)
    for beats, latency in ((elementwise, dut.elementwise_latency), (linear, dut.linear_latency)):
        accepted, outputs, source = check(dut, beats)
        assert np.diff(accepted).tolist() == [1] * (len(accepted) - 1)
        assert [cycle for cycle, _ in outputs] == [accepted[s] + latency for s in source.tolist()]


def test_accumulation_chains_and_mode_switches_cost_the_documented_gaps():
    dut = PEArray(rows=2, cols=4, fmt=FP16)
    generator = torch.Generator().manual_seed(6)
    chains = pattern_beats(rows=2, cols=4, fmt=FP16, count=12, generator=generator, mode=ArrayMode.LINEAR,
                           chain=3)
    elementwise = pattern_beats(rows=2, cols=4, fmt=FP16, count=3, generator=generator,
                                mode=ArrayMode.ELEMENTWISE)
    beats = concat_beats(chains, elementwise, chains)
    accepted, _, _ = check(dut, beats)
    chain_gaps = [1, dut.accumulator_interval, dut.accumulator_interval] * 4
    expected = chain_gaps[1:] + [dut.linear_to_elementwise_gap + 1, 1, 1, 1] + chain_gaps[1:]
    assert np.diff(accepted).tolist() == expected
    assert dut.linear_to_elementwise_gap < dut.linear_latency   # cheaper than a drain


def test_interleaved_accumulation_chains_run_at_full_rate():
    dut = PEArray(rows=2, cols=4, fmt=BF16)
    assert dut.accumulators >= dut.accumulator_interval > 1
    beats = pattern_beats(rows=2, cols=4, fmt=BF16, count=dut.accumulators * 3 * 4,
                          generator=torch.Generator().manual_seed(8), mode=ArrayMode.LINEAR, chain=3,
                          interleave=dut.accumulators)
    accepted, outputs, source = check(dut, beats)
    assert np.diff(accepted).tolist() == [1] * (len(accepted) - 1)
    assert [cycle for cycle, _ in outputs] == [accepted[s] + dut.linear_latency for s in source.tolist()]

def test_lane_extension_hook():
    """A stand-in extension (result = a, b, c or −a by ``function``) slower than the linear path, so the
    element-wise-to-linear gap is exercised too."""
    extension = SelectExtension(width=BF16.width, latency=12)
    dut = PEArray(rows=2, cols=2, fmt=BF16, lane_extension=extension)
    assert dut.function_bits == 2 and dut.elementwise_latency == dut.input_stage + 12 > dut.linear_latency
    beats = random_beats(rows=2, cols=2, fmt=BF16, count=120, generator=torch.Generator().manual_seed(7),
                         function_bits=2, slots=dut.accumulators)
    beats["op"] = torch.where(torch.rand(len(beats["op"])) < 0.4, int(ElementwiseOp.FUNCTION), beats["op"])
    check(dut, beats, extension=select_extension_golden, valid_rate=0.8, ready_rate=0.7, seed=3)


# Deliberately broken variants must be caught ---------------------------------------------------------

@pytest.mark.parametrize("fault", ["tree_order", "drop_beat", "no_stall"])
def test_broken_variants_are_caught(fault):
    dut = PEArray(rows=2, cols=4, fmt=BF16, _fault=fault)
    generator = torch.Generator().manual_seed(11)
    beats = random_beats(rows=2, cols=4, fmt=BF16, count=120, generator=generator, slots=dut.accumulators)
    with pytest.raises(AssertionError):
        check(dut, beats, valid_rate=0.8, ready_rate=0.5, seed=1)


# Golden model, against the contract directly ----------------------------------------------------------

def test_golden_broadcast_modes():
    from marca.golden.pe_array import expand_operand

    from marca.ops import Broadcast
    values = torch.arange(6)
    assert expand_operand(values, Broadcast.LANE, 2, 3).tolist() == [0, 1, 2, 3, 4, 5]
    assert expand_operand(values, Broadcast.ROW, 2, 3).tolist() == [0, 0, 0, 1, 1, 1]
    assert expand_operand(values, Broadcast.COLUMN, 2, 3).tolist() == [0, 1, 2, 0, 1, 2]
    assert expand_operand(values, Broadcast.SCALAR, 2, 3).tolist() == [0] * 6


def test_golden_elementwise_special_cases():
    from marca.golden import fp
    from marca.golden.pe_array import elementwise
    f = FP16
    one, two, subnormal, nan = f.one, f.one + (1 << f.man_bits), 1, f.inf | 5
    negative_one = one | f.sign_bit
    op = ElementwiseOp
    # PASS reads its operand: canonical NaN, subnormal -> signed zero.
    assert elementwise(op.PASS, [nan, subnormal | f.sign_bit, two], 0, 0, f).tolist() == \
        [f.canonical_nan, f.sign_bit, two]
    # CMP_SELECT: c where a < b, else read(a); unordered compares keep a.
    got = elementwise(op.CMP_SELECT, [one, two, nan, one], [two, one, one, nan], [negative_one, negative_one,
                      negative_one, negative_one], f)
    assert got.tolist() == [negative_one, two, f.canonical_nan, one]
    # MULADD rounds twice: the product is rounded before the add.
    a = torch.tensor([one + 1])
    assert elementwise(op.MULADD, a, a, negative_one, f).tolist() == \
        fp.add(fp.mul(a, a, f), negative_one, f).tolist()


def test_golden_gemv_is_close_to_float_reference():
    from marca.golden import fp
    from marca.golden.pe_array import gemv
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 32, generator=generator, dtype=torch.float64)
    x = torch.randn(32, generator=generator, dtype=torch.float64)
    bits = gemv(fp.encode(weight, FP32), fp.encode(x, FP32), FP32, cols=8)
    reference = fp.decode(fp.encode(weight, FP32), FP32) @ fp.decode(fp.encode(x, FP32), FP32)
    assert torch.allclose(fp.decode(bits, FP32), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["TINY", "FPGA_SMALL"])
def test_real_nonlinear_lane_extension_plugs_in(preset):
    """The nonlinear units (issue #4) as the lane extension: FUNCTION beats give their golden results
    (FP16: EXP_SCALE's field sum in the lane; BF16: its factor on the PE's multiplier)."""
    from marca import config as presets
    from marca.golden.nonlinear import LaneFunction, constants_for, lane_function
    from marca.hw.nonlinear import FunctionLane
    config = getattr(presets, preset)
    constants = constants_for(config)

    def extension(function, a, b, c, fmt):
        out = torch.zeros_like(a)
        for code in LaneFunction:
            out = torch.where(function == int(code), lane_function(code, a, b, c, constants), out)
        return out

    dut = PEArray(rows=2, cols=2, fmt=config.compute_format, lane_extension=FunctionLane.factory(config))
    beats = random_beats(rows=2, cols=2, fmt=dut.fmt, count=80, generator=torch.Generator().manual_seed(9),
                         function_bits=dut.function_bits, slots=dut.accumulators, linear_share=0.2)
    beats["op"] = torch.where(torch.rand(len(beats["op"])) < 0.6, int(ElementwiseOp.FUNCTION), beats["op"])
    beats["function"] = beats["function"] % len(LaneFunction)
    check(dut, beats, extension=extension, valid_rate=0.8, ready_rate=0.8, seed=2)
