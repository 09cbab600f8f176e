"""PE array in Verilator under cocotb, bit for bit against the golden model (issue #3).

Each shape × format below is built once (``marca.sim.build`` caches by hash) and runs one simulation with
several cases (tb/pe_array.py): random beats of both modes with random stalls on both streams, the same
without stalls, and the cycle-exact properties (one beat per cycle, results exactly ``latency`` cycles
after acceptance, accumulation-chain and mode-switch intervals). The matrix covers every shape in at
least one format and every format in at least one shape; the lane-extension hook rides on the 4×4 build.
A deliberately broken array (a tree that pairs its products in the wrong order, and one that drops a
beat) must fail.
"""

import pytest
import torch
from marca.hw.pe_array import PEArray
from marca.tb.pe_array import (
    PE_ARRAY_BUILD_ARGS,
    SelectExtension,
    concat_beats,
    pattern_beats,
    random_beats,
    select_extension_golden,
    take_beats,
    write_case,
)

from marca import sim
from marca.formats import BF16, FP16, FP32
from marca.ops import ArrayMode, ElementwiseOp

pytestmark = pytest.mark.verilator

# The C++ of a flattened array is large (an 8x16 array: ~55 files); at gcc -O0 it compiles ~10x faster than
# at the default -O2, and the simulation speed hardly matters since Python drives every cycle.
BUILD_ARGS = PE_ARRAY_BUILD_ARGS

# (rows, cols, fmt, random beats, lane extension latency or None)
MATRIX = {
    "2x2-fp32": (2, 2, FP32, 2500, None),
    "4x4-fp16": (4, 4, FP16, 1500, 3),
    "8x16-bf16": (8, 16, BF16, 500, None),
}


def _array(rows, cols, fmt, extension_latency, fault=None):
    extension = None if extension_latency is None else SelectExtension(width=fmt.width,
                                                                       latency=extension_latency)
    return PEArray(rows=rows, cols=cols, fmt=fmt, lane_extension=extension, _fault=fault)


def _cases(dut, tmp_path, random_count, extension, seed):
    rows, cols, fmt = dut.rows, dut.cols, dut.fmt
    generator = torch.Generator().manual_seed(seed)
    function_bits = dut.function_bits
    common = {"latency_linear": dut.linear_latency, "latency_elementwise": dut.elementwise_latency}
    cases = []

    def add(name, beats, **options):
        path = write_case(tmp_path / f"{name}.npz", dut, beats, extension=extension)
        cases.append({"name": name, "file": path,
                      "seed": len(cases) + seed, "valid_rate": 1.0, "ready_rate": 1.0, **common, **options})

    def random(count):
        beats = random_beats(rows=rows, cols=cols, fmt=fmt, count=count, generator=generator,
                             function_bits=function_bits, slots=dut.accumulators)
        if extension is not None:   # more FUNCTION beats than the uniform draw of ops gives
            function = torch.rand(len(beats["op"]), generator=generator) < 0.3
            beats["op"] = torch.where(function, int(ElementwiseOp.FUNCTION), beats["op"])
        return beats

    add("random_stalls", random(random_count), valid_rate=0.7, ready_rate=0.6)
    add("random_backpressure", random(random_count // 4), valid_rate=1.0, ready_rate=0.25)
    add("random_free", random(random_count // 2))
    # Cycle-exact properties, no stalls.
    count = 48
    elementwise = pattern_beats(rows=rows, cols=cols, fmt=fmt, count=count, generator=generator,
                                mode=ArrayMode.ELEMENTWISE)
    linear = pattern_beats(rows=rows, cols=cols, fmt=fmt, count=count, generator=generator,
                           mode=ArrayMode.LINEAR)
    add("elementwise_full_rate", elementwise, check_latency=True, expect_interval=[1] * (count - 1))
    add("linear_full_rate", linear, check_latency=True, expect_interval=[1] * (count - 1))
    chain = 4
    chains = pattern_beats(rows=rows, cols=cols, fmt=fmt, count=4 * chain, generator=generator,
                           mode=ArrayMode.LINEAR, chain=chain)
    gaps = ([1] + [dut.accumulator_interval] * (chain - 1)) * 4
    switch = concat_beats(chains, take_beats(elementwise, slice(0, 4)), take_beats(linear, slice(0, 4)))
    add("chains_and_switches", switch, check_latency=True,
        expect_interval=gaps[1:] + [dut.linear_to_elementwise_gap + 1, 1, 1, 1,
                                    dut.elementwise_to_linear_gap + 1, 1, 1, 1])
    interleaved = pattern_beats(rows=rows, cols=cols, fmt=fmt, count=dut.accumulators * chain * 3,
                                generator=generator, mode=ArrayMode.LINEAR, chain=chain,
                                interleave=dut.accumulators)
    add("interleaved_chains_full_rate", interleaved, check_latency=True,
        expect_interval=[1] * (len(interleaved["mode"]) - 1))
    return cases


def _build(name, dut):
    return sim.build(sim.emit_verilog(dut, "pe_array"), "pe_array", label=f"pe_array-{name}",
                     extra_args=BUILD_ARGS)


@pytest.mark.parametrize("name", list(MATRIX))
def test_pe_array_against_golden(name, tmp_path):
    rows, cols, fmt, random_count, extension_latency = MATRIX[name]
    dut = _array(rows, cols, fmt, extension_latency)
    extension = None if extension_latency is None else select_extension_golden
    cases = _cases(dut, tmp_path, random_count, extension, seed=rows * 100 + cols)
    sim.run(_build(name, dut), "pe_array", "marca.tb.pe_array", params={"cases": cases}, name=name)


@pytest.mark.parametrize("fault", ["tree_order", "drop_beat"])
def test_broken_array_is_caught(fault, tmp_path):
    dut = _array(2, 4, BF16, None, fault=fault)
    generator = torch.Generator().manual_seed(3)
    beats = random_beats(rows=2, cols=4, fmt=BF16, count=300, generator=generator, slots=dut.accumulators)
    case = {"name": fault, "file": write_case(tmp_path / "case.npz", dut, beats), "seed": 1,
            "valid_rate": 0.8, "ready_rate": 0.7, "latency_linear": dut.linear_latency,
            "latency_elementwise": dut.elementwise_latency, "max_cycles": 20000}
    with pytest.raises(AssertionError):
        sim.run(_build(f"2x4-bf16-{fault}", dut), "pe_array", "marca.tb.pe_array", params={"cases": [case]},
                name=fault)
