# amaranth: UnusedElaboratable=no
"""Fast tier of the float units (hw/fp.py): Amaranth's simulator, a few hundred random and corner vectors
per unit and format, compared bit for bit with marca.golden.fp, with random clock-enable stalls (and
garbage on the inputs while stalled) to check the pipelines' enable and latency."""

import random

import pytest
import torch
from amaranth.sim import Simulator

from marca.formats import BF16, FP16, FP32, FloatFormat
from marca.golden import fp as golden
from marca.hw import fp as hw

FORMATS = [FP32, BF16, FP16, FloatFormat(4, 3), FloatFormat(2, 1), FloatFormat(8, 1)]
FORMAT_IDS = [fmt.name for fmt in FORMATS]
RANDOM_COUNT = 300


def simulate(unit, inputs: dict[str, list[int]], outputs: list[str], *, seed: int = 0,
             stall_probability: float = 0.3) -> dict[str, list[int]]:
    """Present ``inputs`` to ``unit`` one set per enabled cycle, with random stalls; return the outputs
    that belong to each input set, read ``unit.latency`` enabled cycles later."""
    count = len(next(iter(inputs.values())))
    collected = {name: [] for name in outputs}
    rng = random.Random(seed)
    ports = {name: getattr(unit, name) for name in inputs}

    async def testbench(ctx):
        presented = enabled_edges = 0
        while len(collected[outputs[0]]) < count:
            enable = int(rng.random() >= stall_probability)
            ctx.set(unit.enable, enable)
            for name, port in ports.items():
                if enable and presented < count:
                    ctx.set(port, inputs[name][presented])
                else:  # stalled or drained: garbage that must not reach any result
                    ctx.set(port, rng.getrandbits(len(port)) - (
                        1 << (len(port) - 1) if port.shape().signed else 0))
            await ctx.tick()
            if enable:
                presented += 1
                enabled_edges += 1
                if enabled_edges >= unit.latency:
                    for name in outputs:
                        collected[name].append(ctx.get(getattr(unit, name)))

    sim = Simulator(unit)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return collected


def operand_pairs(fmt: FloatFormat, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair of the golden special values, then random pairs."""
    generator = torch.Generator().manual_seed(seed)
    specials = golden.special_values(fmt)
    a_special, b_special = torch.meshgrid(specials, specials, indexing="ij")
    a = torch.cat([a_special.flatten(), golden.random_bits(RANDOM_COUNT, fmt, generator)])
    b = torch.cat([b_special.flatten(), golden.random_bits(RANDOM_COUNT, fmt, generator)])
    return a, b


def single_operands(fmt: FloatFormat, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([golden.special_values(fmt), golden.random_bits(RANDOM_COUNT, fmt, generator)])


def assert_bits_equal(name: str, operands: dict[str, torch.Tensor], got, expected) -> None:
    got = torch.as_tensor(got, dtype=torch.int64)
    expected = torch.as_tensor(expected, dtype=torch.int64)
    bad = torch.nonzero(got != expected).flatten()
    if len(bad):
        lines = [", ".join(f"{key}={int(value[i]):#x}" for key, value in operands.items())
                 + f": got {int(got[i]):#x}, expected {int(expected[i]):#x}" for i in bad[:8]]
        raise AssertionError(f"{name}: {len(bad)} of {len(got)} mismatches\n" + "\n".join(lines))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_multiplier(fmt):
    a, b = operand_pairs(fmt, seed=1)
    out = simulate(hw.FloatMultiplier(fmt=fmt), {"a": a.tolist(), "b": b.tolist()}, ["result"])
    assert_bits_equal("mul", {"a": a, "b": b}, out["result"], golden.mul(a, b, fmt))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_adder(fmt):
    a, b = operand_pairs(fmt, seed=2)
    subtract = torch.randint(0, 2, a.shape, generator=torch.Generator().manual_seed(3))
    out = simulate(hw.FloatAdder(fmt=fmt), {"a": a.tolist(), "b": b.tolist(),
                                            "subtract": subtract.tolist()}, ["result"])
    expected = torch.where(subtract == 1, golden.sub(a, b, fmt), golden.add(a, b, fmt))
    assert_bits_equal("add/sub", {"a": a, "b": b, "subtract": subtract}, out["result"], expected)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_compare(fmt):
    a, b = operand_pairs(fmt, seed=4)
    names = ["lt", "eq", "gt", "minimum", "maximum"]
    out = simulate(hw.FloatCompare(fmt=fmt), {"a": a.tolist(), "b": b.tolist()}, names)
    lt, eq, gt = golden.compare(a, b, fmt)
    expected = {"lt": lt, "eq": eq, "gt": gt, "minimum": golden.minimum(a, b, fmt),
                "maximum": golden.maximum(a, b, fmt)}
    for name in names:
        assert_bits_equal(name, {"a": a, "b": b}, out[name], expected[name])


@pytest.mark.parametrize("source", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("target", [FP32, BF16, FP16, FloatFormat(4, 3)], ids=lambda f: f.name)
def test_convert(source, target):
    x = single_operands(source, seed=5)
    out = simulate(hw.FloatConvert(source=source, target=target), {"a": x.tolist()}, ["result"])
    assert_bits_equal(f"convert {source.name}->{target.name}", {"x": x}, out["result"],
                      golden.convert(x, source, target))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("rounding", hw.INT_ROUNDING)
@pytest.mark.parametrize("int_bits", [2, 8, 32])
def test_to_int(fmt, rounding, int_bits):
    x = single_operands(fmt, seed=6)
    # Values around the integer range and halfway points, which random patterns rarely hit.
    halves = torch.randint(-(2 ** int_bits) - 3, 2 ** int_bits + 3, (200,),
                           generator=torch.Generator().manual_seed(7))
    extra = golden.encode(halves.to(torch.float64) / 2, fmt)
    x = torch.cat([x, extra])
    out = simulate(hw.FloatToInt(fmt=fmt, int_bits=int_bits, rounding=rounding), {"a": x.tolist()},
                   ["result"])
    assert_bits_equal(f"to_int {rounding}", {"x": x}, out["result"],
                      golden.to_int(x, fmt, int_bits, rounding))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("int_bits", [2, 5, 16, 32])
def test_from_int(fmt, int_bits):
    generator = torch.Generator().manual_seed(8)
    low, high = -(1 << (int_bits - 1)), 1 << (int_bits - 1)
    edges = torch.tensor([low, low + 1, -1, 0, 1, high - 2, high - 1], dtype=torch.int64)
    n = torch.cat([edges, torch.randint(low, high, (RANDOM_COUNT,), generator=generator),
                   # small magnitudes, where every rounding case of narrow formats shows
                   torch.randint(max(low, -4096), min(high, 4096), (100,), generator=generator)])
    out = simulate(hw.IntToFloat(fmt=fmt, int_bits=int_bits), {"a": n.tolist()}, ["result"])
    assert_bits_equal("from_int", {"n": n}, out["result"], golden.from_int(n, fmt, int_bits))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("shift_bits", [3, 9])
def test_scale(fmt, shift_bits):
    x = single_operands(fmt, seed=9)
    generator = torch.Generator().manual_seed(10)
    low, high = -(1 << (shift_bits - 1)), 1 << (shift_bits - 1)
    shift = torch.randint(low, high, x.shape, generator=generator)
    out = simulate(hw.FloatScale(fmt=fmt, shift_bits=shift_bits),
                   {"a": x.tolist(), "shift": shift.tolist()}, ["result"])
    assert_bits_equal("ldexp", {"x": x, "shift": shift}, out["result"], golden.ldexp(x, shift, fmt))


def test_truncating_variant_is_caught():
    """The fast tier's own check finds the deliberately wrong rounding."""
    a, b = operand_pairs(BF16, seed=11)
    out = simulate(hw.FloatMultiplier(fmt=BF16, rounding="truncate"),
                   {"a": a.tolist(), "b": b.tolist()}, ["result"])
    with pytest.raises(AssertionError, match="mismatches"):
        assert_bits_equal("mul", {"a": a, "b": b}, out["result"], golden.mul(a, b, BF16))


def test_latencies_and_ports():
    assert hw.FloatMultiplier(fmt=FP32).latency == 2
    assert hw.FloatAdder(fmt=FP32).latency == 4
    assert hw.FloatCompare(fmt=FP32).latency == 1
    assert hw.FloatConvert(source=FP32, target=BF16).latency == 1
    assert hw.FloatToInt(fmt=FP32, int_bits=8).latency == 2
    assert hw.IntToFloat(fmt=FP32, int_bits=8).latency == 2
    assert hw.FloatScale(fmt=FP32, shift_bits=8).latency == 1
    unit = hw.FloatAdder(fmt=BF16)
    assert unit.enable.init == 1 and len(unit.a) == 16 and len(unit.result) == 16
    assert hw.FloatToInt(fmt=BF16, int_bits=12).result.shape().signed
    assert hw.FloatScale(fmt=BF16, shift_bits=6).shift.shape().signed


@pytest.mark.parametrize("make, message", [
    (lambda: hw.FloatMultiplier(fmt="bf16"), "fmt must be"),
    (lambda: hw.FloatAdder(fmt=BF16, rounding="up"), "rounding must be"),
    (lambda: hw.FloatConvert(source=BF16, target=None), "target must be"),
    (lambda: hw.FloatToInt(fmt=BF16, int_bits=1), "int_bits must be"),
    (lambda: hw.FloatToInt(fmt=BF16, int_bits=8, rounding="truncate"), "rounding must be"),
    (lambda: hw.IntToFloat(fmt=BF16, int_bits=33), "int_bits must be"),
    (lambda: hw.FloatScale(fmt=BF16, shift_bits=True), "shift_bits must be"),
])
def test_parameter_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()
