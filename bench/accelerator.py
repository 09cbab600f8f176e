"""Benchmark of the whole accelerator in Verilator: cycles, counters and PE utilization of reference programs.

Programs (each also checked bit for bit against the golden ISS while it runs):

* ``gemv-streamed``: a 256 x 1024 GEMV whose weights stream from memory block by block (double-buffered in
  the weight buffer: the DMA loads block ``b + 1`` while the array works on block ``b``); partial sums stay
  in the activation buffer and feed the next block as its bias.
* ``elementwise-chain``: 32 dependent element-wise instructions (mul, add, muladd, max, ...) over 256 lines
  held on chip, between one load and one store.
* ``exp-long``: exp of 256 lines (4096 elements on a 4 x 4 array; ``4 + exp_degree`` PE passes per line),
  in chunks of 64 lines software-pipelined against their loads and stores.

PE utilization = useful PE operations / (cycles x lanes): a GEMV beat is ``lanes`` multiply-adds, an
element-wise beat ``lanes`` operations, a nonlinear pass ``lanes`` operations. Cycles are the accelerator's
own ``cycles`` counter (start to done, loads and stores included).

The configuration (``BENCH_CONFIG``) is a 4 x 4 BF16 array with a 256-bit bus: one beat carries one line of
16 BF16 weights, so the bus can feed the array at the rate it consumes weights ("bandwidth allows").
``BUS_BOUND_CONFIG`` is the same with a 64-bit bus: a line takes four beats, so the streamed GEMV is bound
by the bus, and its figure of merit is the bus utilization = (DMA bytes read + instruction bytes) /
(cycles x bus bytes per beat), with the testbench memory's latency (AXI model, no pauses).
"""

import dataclasses
import json
import pathlib
import time

from marca import isa, sim
from marca.config import FPGA_MEDIUM, MarcaConfig
from marca.isa import (
    Barrier,
    Buffer,
    Elementwise,
    Halt,
    Linear,
    LinearInit,
    Load,
    Nonlinear,
    NonlinearFunction,
    Store,
)
from marca.ops import Broadcast, ElementwiseOp

__all__ = ["BENCH_CONFIG", "BUS_BOUND_CONFIG", "programs", "run"]

BENCH_CONFIG = dataclasses.replace(
    FPGA_MEDIUM, name="bench-4x4-bus256", axi_data_width=256, weight_buffer_kib=32, activation_buffer_kib=16,
    state_buffer_kib=4, scratch_buffer_kib=16)
BUS_BOUND_CONFIG = dataclasses.replace(BENCH_CONFIG, name="bench-4x4-bus64", axi_data_width=64)


def _random_storage(config: MarcaConfig, count: int, seed: int, scale: float = 1.0) -> bytes:
    import torch
    from marca.golden import fp
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(count, generator=generator, dtype=torch.float64) * scale
    bits = fp.encode(values, config.storage_format)
    size = config.storage_bytes
    return b"".join(int(v).to_bytes(size, "little") for v in bits.tolist())


def _image(instructions, regions, size):
    memory = bytearray(size)
    program = isa.encode_program(instructions)
    memory[:len(program)] = program
    for address, data in regions:
        memory[address:address + len(data)] = data
    return bytes(memory)


def gemv_streamed(config: MarcaConfig, *, outputs: int = 256, inputs: int = 1024, block_chunks: int = 8):
    """(instructions, memory, useful operations) of a GEMV streamed block by block."""
    R, C, lanes, size = config.array_rows, config.array_cols, config.lanes, config.storage_bytes
    J, K = outputs // R, inputs // C
    blocks = K // block_chunks
    block_lines = J * block_chunks
    program_bytes = 4096
    vector_address = program_bytes
    weight_address = vector_address + inputs * size
    output_address = weight_address + J * K * lanes * size
    # Weights pre-tiled in memory block by block: block b holds lines (j, k_local), row-major tiles.
    weights = _random_storage(config, J * K * lanes, seed=1, scale=0.1)
    vector = _random_storage(config, inputs, seed=2)
    program = [Load(memory_address=vector_address, row_count=1, row_elements=inputs, memory_row_stride=0,
                    buffer=Buffer.SCRATCH, buffer_address=0, buffer_row_stride=0)]

    def load_block(b):
        half = (b % 2) * block_lines * lanes
        return Load(memory_address=weight_address + b * block_lines * lanes * size, row_count=1,
                    row_elements=block_lines * lanes, memory_row_stride=0, buffer=Buffer.WEIGHT,
                    buffer_address=half, buffer_row_stride=0)

    program += [load_block(0), Barrier()]
    for b in range(blocks):
        if b + 1 < blocks:
            program.append(load_block(b + 1))
        program.append(Linear(matrix_buffer=Buffer.WEIGHT, matrix_address=(b % 2) * block_lines * lanes,
                              chunk_count=block_chunks, row_tile_count=J, token_count=1,
                              vector_buffer=Buffer.SCRATCH, vector_address=b * block_chunks * C,
                              vector_token_stride=0, output_buffer=Buffer.ACTIVATION, output_address=0,
                              output_token_stride=0,
                              init=LinearInit.ZERO if b == 0 else LinearInit.BIAS,
                              bias_buffer=Buffer.ACTIVATION, bias_address=0, bias_token_stride=0))
        program.append(Barrier())
    program += [Store(memory_address=output_address, row_count=1, row_elements=outputs, memory_row_stride=0,
                      buffer=Buffer.ACTIVATION, buffer_address=0, buffer_row_stride=0), Halt()]
    memory = _image(program, [(vector_address, vector), (weight_address, weights)],
                    output_address + outputs * size)
    return program, memory, J * K * lanes


def elementwise_chain(config: MarcaConfig, *, lines: int = 256, steps: int = 32):
    lanes, size = config.lanes, config.storage_bytes
    program_bytes = 4096
    data_address = program_bytes
    output_address = data_address + lines * lanes * size
    data = _random_storage(config, lines * lanes, seed=3, scale=0.5)
    ops = [ElementwiseOp.MUL, ElementwiseOp.ADD, ElementwiseOp.MULADD, ElementwiseOp.MAX, ElementwiseOp.SUB,
           ElementwiseOp.MIN, ElementwiseOp.CMP_SELECT, ElementwiseOp.PASS]
    program = [Load(memory_address=data_address, row_count=1, row_elements=lines * lanes, memory_row_stride=0,
                    buffer=Buffer.ACTIVATION, buffer_address=0, buffer_row_stride=0),
               Load(memory_address=data_address, row_count=1, row_elements=lanes, memory_row_stride=0,
                    buffer=Buffer.STATE, buffer_address=0, buffer_row_stride=0), Barrier()]
    source, target = Buffer.ACTIVATION, Buffer.SCRATCH
    for step in range(steps):
        program.append(Elementwise(
            op=ops[step % len(ops)], outer_count=1, inner_count=lines,
            dst_buffer=target, dst_address=0, dst_outer_stride=0, dst_inner_stride=1,
            a_buffer=source, a_address=0, a_inner_stride=1,
            b_buffer=Buffer.STATE, b_broadcast=Broadcast.COLUMN, b_address=0,
            c_buffer=Buffer.STATE, c_broadcast=Broadcast.SCALAR, c_address=step % lanes))
        source, target = target, source
    program += [Barrier(), Store(memory_address=output_address, row_count=1, row_elements=lines * lanes,
                                 memory_row_stride=0, buffer=source, buffer_address=0, buffer_row_stride=0),
                Halt()]
    memory = _image(program, [(data_address, data)], output_address + lines * lanes * size)
    return program, memory, steps * lines * lanes


def exp_long(config: MarcaConfig, *, lines: int = 256, chunk_lines: int = 64):
    """exp of ``lines`` lines, software-pipelined in chunks: while the array works on chunk ``s`` the DMA
    loads chunk ``s + 1`` and stores chunk ``s - 1`` (one BARRIER per stage)."""
    from marca.golden import nonlinear
    lanes, size = config.lanes, config.storage_bytes
    data_address = 4096
    output_address = data_address + lines * lanes * size
    data = _random_storage(config, lines * lanes, seed=4, scale=3.0)
    chunk = chunk_lines * lanes
    chunks = lines // chunk_lines

    def load(s):
        return Load(memory_address=data_address + s * chunk * size, row_count=1, row_elements=chunk,
                    memory_row_stride=0, buffer=Buffer.ACTIVATION, buffer_address=s * chunk, buffer_row_stride=0)

    def store(s):
        return Store(memory_address=output_address + s * chunk * size, row_count=1, row_elements=chunk,
                     memory_row_stride=0, buffer=Buffer.SCRATCH, buffer_address=s * chunk, buffer_row_stride=0)

    program = [load(0), Barrier()]
    for s in range(chunks + 1):
        if s + 1 < chunks:
            program.append(load(s + 1))
        if s >= 1:
            program.append(store(s - 1))
        if s < chunks:
            program.append(Nonlinear(function=NonlinearFunction.EXP, line_count=chunk_lines,
                                     src_buffer=Buffer.ACTIVATION, src_address=s * chunk,
                                     dst_buffer=Buffer.SCRATCH, dst_address=s * chunk))
        program.append(Barrier())
    program.append(Halt())
    memory = _image(program, [(data_address, data)], output_address + lines * lanes * size)
    passes = len(nonlinear.exp_program(config))
    return program, memory, passes * lines * lanes


def programs(config: MarcaConfig = BENCH_CONFIG) -> dict:
    """{name: (instructions, memory image, useful PE operations)}."""
    return {"gemv-streamed": gemv_streamed(config), "elementwise-chain": elementwise_chain(config),
            "exp-long": exp_long(config)}


def run(out_dir: pathlib.Path) -> dict:
    """Build the benchmark configuration, run every program in Verilator, print a table, write
    ``out_dir/accelerator.json`` and return the results."""
    from marca.hw.accelerator import Accelerator
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {"config": BENCH_CONFIG.to_dict(), "programs": {}, "bus_bound": {}}
    for config, key in ((BENCH_CONFIG, "programs"), (BUS_BOUND_CONFIG, "bus_bound")):
        build_dir = sim.build(sim.emit_verilog(Accelerator(config), "accelerator"), "accelerator",
                              label=f"accelerator-{config.name}")
        raw = (out_dir / f"accelerator-raw-{config.name}.json").resolve()   # the simulator runs elsewhere
        sim.run(build_dir, "accelerator", "marca.tb.accelerator", testcase="benchmark", name="bench",
                params={"config": config.to_dict(), "out": str(raw)})
        measured = json.loads(raw.read_text())
        lanes, bus = config.lanes, config.axi_data_width // 8
        if key == "bus_bound":
            results["bus_bound_config"] = config.to_dict()
        for name, (_, _, useful) in programs(config).items():
            counters = measured[name]
            cycles = counters["cycles"]
            results[key][name] = {
                "cycles": cycles, "useful_pe_operations": useful,
                "pe_utilization": useful / (cycles * lanes),
                "array_busy_fraction": (counters["array_linear_cycles"] + counters["array_elementwise_cycles"])
                / cycles,
                "bus_read_utilization": (counters["dma_bytes_read"] + counters["fetch_bytes"]) / (cycles * bus),
                "counters": counters,
            }
        print(f"accelerator benchmark ({config.name}: {config.array_rows}x{config.array_cols} "
              f"{config.compute_format.name}, {config.axi_data_width}-bit bus), bit-exact with the ISS")
        print(f"{'program':<20} {'cycles':>8} {'PE util':>8} {'bus rd':>7} {'DMA rd B':>9} {'DMA wr B':>9} "
              f"{'stall hz':>8} {'stall dp':>8}")
        for name, entry in results[key].items():
            c = entry["counters"]
            print(f"{name:<20} {entry['cycles']:>8} {entry['pe_utilization']:>8.1%} "
                  f"{entry['bus_read_utilization']:>7.1%} {c['dma_bytes_read']:>9} {c['dma_bytes_written']:>9} "
                  f"{c['stall_hazard_cycles']:>8} {c['stall_dispatch_cycles']:>8}")
    results["wall_seconds"] = round(time.time() - started, 1)
    (out_dir / "accelerator.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    from marca.bench import command_line
    command_line(__doc__)
    run(pathlib.Path("build/bench"))
