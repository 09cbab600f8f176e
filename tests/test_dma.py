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
