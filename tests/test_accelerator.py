"""The whole accelerator in Verilator: directed programs per instruction class, programs ending in each error,
constrained-random programs, all compared bit for bit with the golden ISS (tb/accelerator.py)."""

import dataclasses
import os

import pytest
from marca.hw.accelerator import Accelerator

from marca import sim
from marca.config import FPGA_SMALL, TINY, MarcaConfig


# A third shape: fp32 compute with bf16 storage (the two DMA memory formats differ), 2x2, 64-bit bus.
MIXED = dataclasses.replace(TINY, name="mixed", array_rows=2, array_cols=2, compute_format="fp32",
                            storage_format="bf16", axi_data_width=64, weight_buffer_kib=2,
                            activation_buffer_kib=2, state_buffer_kib=2, scratch_buffer_kib=2)

CONFIGS = {config.name: config for config in (TINY, FPGA_SMALL, MIXED)}


def build(config: MarcaConfig):
    verilog = sim.emit_verilog(Accelerator(config), "accelerator")
    return sim.build(verilog, "accelerator", label=f"accelerator-{config.name}")


@pytest.mark.verilator
@pytest.mark.parametrize("name", CONFIGS)
def test_accelerator_programs(name):
    config = CONFIGS[name]
    build_dir = build(config)
    params = dict(config=config.to_dict(), pause=0.2, seed=len(name), programs=3, length=25)
    sim.run(build_dir, "accelerator", "marca.tb.accelerator", params=params, name="programs")


def test_accelerator_rejects_non_power_of_two_rows():
    with pytest.raises(ValueError, match="array_rows"):
        Accelerator(dataclasses.replace(TINY, array_rows=3))


@pytest.mark.verilator
@pytest.mark.skipif(not os.environ.get("MARCA_FAULT_TESTS"),
                    reason="an extra Verilator build (~2 min); set MARCA_FAULT_TESTS=1 to run")
def test_accelerator_catches_a_broken_scoreboard():
    """With the scoreboard off, a LINEAR reads partial sums before they are written: the ISS comparison fails."""
    verilog = sim.emit_verilog(Accelerator(TINY, _fault="no_scoreboard"), "accelerator")
    build_dir = sim.build(verilog, "accelerator", label="accelerator-tiny-no-scoreboard")
    params = dict(config=TINY.to_dict(), pause=0.0, seed=1, programs=2, length=25, errors=False)
    with pytest.raises(AssertionError):
        sim.run(build_dir, "accelerator", "marca.tb.accelerator", params=params, testcase="programs",
                name="broken")
