"""The DMA engine in Verilator against cocotbext-axi's AxiRam with random pauses on every channel."""

import zlib

import pytest
from marca.tb.axi_dma import harness_from_params

from marca import sim
from marca.formats import BF16, FP16, FP32


CASES = {
    # name: (storage, compute, bus bits, lanes, lines)
    "fp16-bus32-lanes4": (FP16, FP16, 32, 4, 16),
    "bf16-fp32-bus128-lanes16": (BF16, FP32, 128, 16, 8),
    "bf16-bus64-lanes4": (BF16, BF16, 64, 4, 32),
}


def _params(name, **extra):
    storage, compute, data_width, lanes, lines = CASES[name]
    return dict(addr_width=32, data_width=data_width, storage=[storage.exp_bits, storage.man_bits],
                compute=[compute.exp_bits, compute.man_bits], lanes=lanes, lines=lines,
                memory_size=1 << 14, **extra)


def _build(params, name):
    verilog = sim.emit_verilog(harness_from_params(params), "dma_harness")
    return sim.build(verilog, "dma_harness", label=f"dma-{name}")


@pytest.mark.verilator
@pytest.mark.parametrize("name", CASES)
def test_dma(name):
    params = _params(name, pause=0.3, seed=zlib.crc32(name.encode()), transfers=30)
    build_dir = _build(params, name)
    sim.run(build_dir, "dma_harness", "marca.tb.axi_dma", params=params, name="paused")
    sim.run(build_dir, "dma_harness", "marca.tb.axi_dma", params=_params(name, seed=7, transfers=10),
            testcase="throughput", name="free")


def test_dma_rejects_bad_parameters():
    from marca.hw.dma import DMA
    with pytest.raises(ValueError, match="lanes"):
        DMA(addr_width=32, data_width=128, storage_format=FP16, compute_format=FP16, lanes=4, line_width=4)
    with pytest.raises(ValueError, match="storage_format"):
        DMA(addr_width=32, data_width=128, storage_format="fp16", compute_format=FP16, lanes=8, line_width=4)
    with pytest.raises(ValueError, match="max_outstanding_beats"):
        DMA(addr_width=32, data_width=32, storage_format=FP16, compute_format=FP16, lanes=4, line_width=4,
            max_outstanding_beats=255)


def test_skid_buffer_passes_every_item_once_in_order():
    """The boundary skid buffer under random valid and ready: nothing lost, nothing duplicated, in order,
    and one item per cycle while both sides are willing."""
    import random

    from amaranth.hdl import Module
    from amaranth.sim import Simulator
    from marca.hw.axi import SkidBuffer

    m = Module()
    skid = SkidBuffer(m, "skid", {"data": 16, "en": 4}, clear_when_empty=("en",))
    rng = random.Random(3)
    items = [rng.randrange(1 << 16) for _ in range(300)]
    received = []

    async def testbench(ctx):
        sent = 0
        streaming = 0
        for cycle in range(2000):
            free_running = cycle < 100           # both sides always willing: one item per cycle
            ctx.set(skid.in_valid, sent < len(items) and (free_running or rng.random() < 0.6))
            ctx.set(skid.i["data"], items[sent] if sent < len(items) else 0)
            ctx.set(skid.i["en"], 0xF)
            ctx.set(skid.out_ready, free_running or rng.random() < 0.6)
            if not ctx.get(skid.out_valid):
                assert ctx.get(skid.o["en"]) == 0, "write enables must read zero while empty"
            if ctx.get(skid.out_valid) and ctx.get(skid.out_ready):
                received.append(ctx.get(skid.o["data"]))
                streaming += free_running
            if ctx.get(skid.in_valid) and ctx.get(skid.in_ready):
                sent += 1
            await ctx.tick()
        assert streaming >= 95

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    assert received == items
