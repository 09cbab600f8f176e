# amaranth: UnusedElaboratable=no
"""The board top in Verilator under cocotb (tb/board.py), driven through a simulated UART by the same
host-tool code that drives a real board (fpga/host.py).

* ``test_bridge_link``: the link-test top (bridge + memory + scratch CSRs): every command, every error
  status, recovery from corrupt input and a silent board.
* ``test_memory_axi``: the on-chip memory's AXI4 port under random bursts and random pauses on every
  channel while the bridge's word port competes for it (checked to fail when wready ignores the bridge).
* ``test_program_end_to_end``: the FPGA preset's accelerator in the board top runs random programs loaded
  over the UART; the memory read back equals the golden instruction-set simulator's bit for bit, and a
  program that faults is reported with its error code and address.

The UART runs at 8 (link) or 4 (programs) clocks per bit so that a byte costs 80 or 40 cycles; the board
uses 50 (1 Mbaud at 50 MHz).
"""

import numpy as np
import pytest

from marca import sim
from marca.config import FPGA_SMALL

FRAME_TIMEOUT_CYCLES = 2000


def _link_params(clocks_per_bit):
    return {"clocks_per_bit": clocks_per_bit, "frame_timeout_cycles": FRAME_TIMEOUT_CYCLES, "clock_ns": 10}


def _board_build(config, *, clocks_per_bit, memory_bytes, with_accelerator, label):
    from marca.fpga.board_top import BoardTop
    top = BoardTop(config, clocks_per_bit=clocks_per_bit, memory_bytes=memory_bytes,
                   frame_timeout_cycles=FRAME_TIMEOUT_CYCLES, with_accelerator=with_accelerator)
    return sim.build(sim.emit_verilog(top, "board_top"), "board_top", label=label)


@pytest.mark.verilator
def test_bridge_link():
    memory_bytes = 8192
    build_dir = _board_build(FPGA_SMALL, clocks_per_bit=8, memory_bytes=memory_bytes, with_accelerator=False,
                             label="board-link")
    sim.run(build_dir, "board_top", "marca.tb.board", testcase="test_bridge_link", name="link",
            params={**_link_params(8), "memory_bytes": memory_bytes})


@pytest.mark.verilator
def test_memory_axi():
    from marca.tb.board import MemoryHarness
    memory_bytes, data_width = 8192, FPGA_SMALL.axi_data_width
    harness = MemoryHarness(memory_bytes=memory_bytes, data_width=data_width, addr_width=32)
    build_dir = sim.build(sim.emit_verilog(harness, "memory_top"), "memory_top",
                          label=f"axi-memory-{data_width}")
    sim.run(build_dir, "memory_top", "marca.tb.board", testcase="test_memory_axi", name="axi",
            params={"memory_bytes": memory_bytes, "data_width": data_width})


@pytest.mark.verilator
def test_program_end_to_end(tmp_path):
    from marca.golden.iss import run_program as golden_run
    from marca.golden.random_program import random_program
    from marca.isa import ErrorCode

    config = FPGA_SMALL
    memory_bytes = 16 * 1024
    cases = []
    for seed, final_error in [(1, ErrorCode.NONE), (2, ErrorCode.NONE),
                              (3, next(code for code in ErrorCode if code))]:
        program = random_program(config, seed=seed, length=12, data_bytes=1024, output_bytes=512,
                                 final_error=final_error)
        assert len(program.memory) <= memory_bytes
        result, machine = golden_run(config, program.memory, program.program_address)
        assert result.error == final_error, result
        cases.append({
            "image": np.frombuffer(program.memory, dtype=np.uint8),
            "expected": np.frombuffer(machine.memory_bytes(), dtype=np.uint8),
            "program_address": program.program_address,
            "regions": [(program.output_address, program.output_bytes),
                        (program.data_address, program.data_bytes)],
            "error_code": int(result.error), "error_pc": -1 if result.error_pc is None else result.error_pc,
        })
    # A tiny Mamba block: the compiler's prefill program for one mixer with its weights and tokens; the
    # outputs and the states it writes back are read over the link and compared bit for bit with the ISS.
    from marca.fpga.host import mamba_block
    block = mamba_block(config, seed=8)
    assert len(block.image) <= memory_bytes
    result, machine = golden_run(config, block.image, block.program_address)
    assert result.error == ErrorCode.NONE, result
    cases.append({
        "image": np.frombuffer(block.image, dtype=np.uint8),
        "expected": np.frombuffer(machine.memory_bytes(), dtype=np.uint8),
        "program_address": block.program_address, "regions": block.regions,
        "error_code": 0, "error_pc": -1,
    })
    case_files = []
    for index, case in enumerate(cases):
        path = tmp_path / f"case{index}.npz"
        np.savez(path, **case)
        case_files.append(str(path))

    # 4 clocks per bit (the minimum) halves the cycles spent on the UART; the large accelerator model
    # simulates at only ~10-20k cycles/s.
    build_dir = _board_build(config, clocks_per_bit=4, memory_bytes=memory_bytes, with_accelerator=True,
                             label=f"board-{config.name}")
    sim.run(build_dir, "board_top", "marca.tb.board", testcase="test_program_end_to_end", name="programs",
            params={**_link_params(4), "memory_bytes": memory_bytes, "cases": case_files})
