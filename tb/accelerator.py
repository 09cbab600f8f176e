"""cocotb testbench of the whole accelerator: programs run on the RTL and on the golden ISS, compared bit for bit.

The memory is cocotbext-axi's AxiRam behind ``m_axi_*`` with random pauses on every channel; accesses
beyond the memory image answer SLVERR (the ISS's BUS_ERROR). The host is an AxiLiteMaster on ``s_axil_*``:
it writes the program address, starts, waits for ``irq`` (done), and reads status, error code, error PC and
every counter. After each program the RTL's memory image, error code and error PC must equal the ISS's;
on success the ISS's deterministic counters too.

Parameters (``marca.sim.tb_params``): ``config`` (MarcaConfig as a dict), ``pause`` (probability),
``seed``, ``programs`` (constrained-random programs per run), ``length`` (instructions each),
``directed`` (run the directed programs), ``errors`` (run one program per error code). The ``gathers`` test
(only with ``gathers`` set) runs :func:`gather_programs` and random programs rich in ``GATHER``.
"""

import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster
from marca.golden.iss import COUNTER_NAMES, Machine
from marca.hw.controller import COUNTERS
from marca.hw.csr import REGISTERS, counter_offset
from marca.tb.axi_ram import FaultyAxiRam, pause_all_channels

from marca import isa
from marca.config import MarcaConfig
from marca.isa import ErrorCode
from marca.sim import tb_params

__all__ = ["AcceleratorTB", "run_and_compare", "gather_programs"]


class AcceleratorTB:
    def __init__(self, dut, params):
        self.dut = dut
        self.params = params
        self.config = MarcaConfig.from_dict(params["config"])
        self.rng = random.Random(params.get("seed", 1))
        cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
        self.memory_size = 1 << params.get("memory_bits", 18)
        self.ram = FaultyAxiRam(AxiBus.from_prefix(dut, "m_axi"), dut.clk, dut.rst, size=self.memory_size)
        pause_all_channels(self.ram, self.rng, params.get("pause", 0.0))
        self.host = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axil"), dut.clk, dut.rst)
        self.host.write_if.log.setLevel("WARNING")
        self.host.read_if.log.setLevel("WARNING")

    async def reset(self):
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, 4)
        self.dut.rst.value = 0
        await ClockCycles(self.dut.clk, 2)

    async def read_register(self, offset: int) -> int:
        return int.from_bytes((await self.host.read(offset, 4)).data, "little")

    async def write_register(self, offset: int, value: int) -> None:
        await self.host.write(offset, value.to_bytes(4, "little"))

    async def read_counters(self) -> dict:
        values = {}
        for index, name in enumerate(COUNTERS):
            low = await self.read_register(counter_offset(index))
            high = await self.read_register(counter_offset(index) + 4)
            values[name] = low | high << 32
        return values

    async def start(self, memory: bytes, program_address: int):
        """Load ``memory`` (addresses beyond it answer SLVERR) and start the program at ``program_address``."""
        if len(memory) > self.memory_size:
            raise ValueError("memory image larger than the simulated memory")
        self.ram.fault = (0, 0)
        self.ram.write(0, bytes(memory) + bytes(self.memory_size - len(memory)))
        self.ram.fault = (len(memory), 1 << 64)
        await self.write_register(REGISTERS["PROGRAM_LO"], program_address & 0xFFFF_FFFF)
        await self.write_register(REGISTERS["PROGRAM_HI"], program_address >> 32)
        await self.write_register(REGISTERS["CONTROL"], 1)

    async def run(self, memory: bytes, program_address: int, *, timeout_cycles: int = 2_000_000):
        """Load ``memory``, start at ``program_address``, wait for done. Returns (code, pc, counters,
        cycles, memory image)."""
        await self.start(memory, program_address)
        cycles = 0
        while not int(self.dut.irq.value):
            await RisingEdge(self.dut.clk)
            cycles += 1
            if cycles > timeout_cycles:
                raise AssertionError(f"the accelerator did not finish in {timeout_cycles} cycles (hang)")
        status = await self.read_register(REGISTERS["STATUS"])
        assert status & 0b011 == 0b010, f"STATUS {status:#x} after irq"
        code = ErrorCode(await self.read_register(REGISTERS["ERROR_CODE"]))
        pc = await self.read_register(REGISTERS["ERROR_PC"])
        counters = await self.read_counters()
        self.ram.fault = (0, 0)
        image = self.ram.read(0, len(memory))
        return code, pc, counters, cycles, image


async def run_and_compare(tb: AcceleratorTB, memory: bytes, program_address: int, name: str,
                          *, compare_counters: bool = True):
    """Run on the RTL and the ISS; assert equal results. Returns the RTL's (counters, cycles)."""
    machine = Machine(tb.config, memory)
    expected = machine.run(program_address)
    code, pc, counters, cycles, image = await tb.run(memory, program_address)
    where = f"{name} (config {tb.config.name})"
    assert code == expected.error, f"{where}: error code {code.name}, ISS {expected.error.name} " \
                                   f"({expected.message})"
    if expected.error != ErrorCode.NONE:
        assert pc == expected.error_pc, f"{where}: error pc {pc:#x}, ISS {expected.error_pc:#x}"
    golden = machine.memory_bytes()
    if image != golden and expected.error != ErrorCode.BUS_ERROR:
        wrong = [k for k in range(len(golden)) if image[k] != golden[k]]
        raise AssertionError(f"{where}: memory differs at {len(wrong)} bytes, first {wrong[0]:#x}: "
                             f"RTL {image[wrong[0]:wrong[0] + 8].hex()} ISS {golden[wrong[0]:wrong[0] + 8].hex()}")
    if expected.error == ErrorCode.NONE and compare_counters:
        for counter in COUNTER_NAMES:
            assert counters[counter] == expected.counters[counter], \
                f"{where}: counter {counter} = {counters[counter]}, ISS {expected.counters[counter]}"
    tb.dut._log.info("%s: %s in %d cycles", where, code.name, cycles)
    return counters, cycles


def _program_image(instructions, data: bytes, data_address: int, size: int) -> bytes:
    memory = bytearray(size)
    program = isa.encode_program(instructions)
    memory[:len(program)] = program
    memory[data_address:data_address + len(data)] = data
    return bytes(memory)


def directed_programs(config: MarcaConfig, rng: random.Random):
    """(name, memory, program address) per instruction class, each a small hand-written program."""
    import torch
    from marca.golden import fp

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

    R, C, lanes = config.array_rows, config.array_cols, config.lanes
    size = config.storage_bytes
    lines = 4
    data_address = 4096
    output_address = 8192
    generator = torch.Generator().manual_seed(rng.randrange(1 << 30))
    values = torch.randn(4 * lines * lanes, generator=generator, dtype=torch.float64) * 2
    bits = fp.encode(values, config.storage_format)
    data = b"".join(int(v).to_bytes(size, "little") for v in bits.tolist())
    memory_size = 12288

    def fill(buffer, offset_lines=0):
        return Load(memory_address=data_address + offset_lines * lanes * size, row_count=lines,
                    row_elements=lanes, memory_row_stride=lanes * size, buffer=buffer, buffer_address=0,
                    buffer_row_stride=lanes)

    def store(buffer, count=lines, address=output_address):
        return Store(memory_address=address, row_count=count, row_elements=lanes, memory_row_stride=lanes * size,
                     buffer=buffer, buffer_address=0, buffer_row_stride=lanes)

    loads = [fill(Buffer.WEIGHT, 0), fill(Buffer.ACTIVATION, lines), fill(Buffer.STATE, 2 * lines),
             fill(Buffer.SCRATCH, 3 * lines), Barrier()]
    programs = []
    # DMA: strided, unaligned, both memory formats.
    programs.append(("dma", loads[:2] + [
        Load(memory_address=data_address + 3 * size, row_count=3, row_elements=lanes + 1,
             memory_row_stride=(lanes + 5) * size, buffer=Buffer.SCRATCH, buffer_address=1,
             buffer_row_stride=lanes + 2),
        Store(memory_address=output_address + 2 * size, row_count=3, row_elements=lanes + 1,
              memory_row_stride=(lanes + 7) * size, buffer=Buffer.SCRATCH, buffer_address=1,
              buffer_row_stride=lanes + 2),
        Store(memory_address=output_address + 1024, row_count=2, row_elements=lanes,
              memory_row_stride=lanes * config.compute_bytes, buffer=Buffer.ACTIVATION, buffer_address=0,
              buffer_row_stride=lanes, memory_format=isa.MemoryFormat.COMPUTE),
        Load(memory_address=output_address + 1024, row_count=2, row_elements=lanes,
             memory_row_stride=lanes * config.compute_bytes, buffer=Buffer.STATE, buffer_address=0,
             buffer_row_stride=lanes, memory_format=isa.MemoryFormat.COMPUTE),
        store(Buffer.STATE, 2, output_address + 2048), Halt()]))
    # Element-wise: every op, broadcasts, strides.
    ops = [op for op in ElementwiseOp if op != ElementwiseOp.FUNCTION]
    body = []
    for k, op in enumerate(ops):
        broadcast = list(Broadcast)[k % 4]
        body.append(Elementwise(op=op, outer_count=2, inner_count=2, dst_buffer=Buffer.SCRATCH,
                                dst_address=0, dst_outer_stride=2, dst_inner_stride=1,
                                a_buffer=Buffer.ACTIVATION, a_address=0, a_outer_stride=2, a_inner_stride=1,
                                b_buffer=Buffer.WEIGHT, b_broadcast=broadcast,
                                b_address=isa.granule(config, broadcast) * (k % 2),
                                b_outer_stride=1, b_inner_stride=0,
                                c_buffer=Buffer.STATE, c_broadcast=Broadcast.ROW, c_address=R,
                                c_outer_stride=1, c_inner_stride=1))
        body.append(Barrier())
        body.append(store(Buffer.SCRATCH, lines, output_address + k * lines * lanes * size))
        body.append(Barrier())
    programs.append(("elementwise", loads + body + [Halt()]))
    # Linear: GEMV and a GEMM over tokens, zero and bias starts.
    programs.append(("linear", loads + [
        Linear(matrix_buffer=Buffer.WEIGHT, matrix_address=0, chunk_count=2, row_tile_count=2, token_count=1,
               vector_buffer=Buffer.ACTIVATION, vector_address=C, vector_token_stride=0,
               output_buffer=Buffer.SCRATCH, output_address=0, output_token_stride=0),
        Linear(matrix_buffer=Buffer.WEIGHT, matrix_address=0, chunk_count=1, row_tile_count=2, token_count=3,
               vector_buffer=Buffer.ACTIVATION, vector_address=0, vector_token_stride=1,
               output_buffer=Buffer.STATE, output_address=0, output_token_stride=2,
               init=LinearInit.BIAS, bias_buffer=Buffer.ACTIVATION, bias_address=lanes, bias_token_stride=1),
        Barrier(), store(Buffer.SCRATCH, 1), store(Buffer.STATE, lines, output_address + lanes * size * 4),
        Halt()]))
    # Nonlinear: each function, in place and not, more lines than a batch.
    body = [fill(Buffer.SCRATCH, 0), Barrier()]
    for k, function in enumerate(NonlinearFunction):
        body += [Nonlinear(function=function, line_count=lines, src_buffer=Buffer.ACTIVATION, src_address=0,
                           dst_buffer=Buffer.SCRATCH, dst_address=0), Barrier(),
                 store(Buffer.SCRATCH, lines, output_address + k * lines * lanes * size), Barrier()]
    body += [Nonlinear(function=NonlinearFunction.EXP, line_count=2, src_buffer=Buffer.STATE, src_address=lanes,
                       dst_buffer=Buffer.STATE, dst_address=lanes), Barrier(),
             store(Buffer.STATE, lines, output_address + len(NonlinearFunction) * lines * lanes * size)]
    programs.append(("nonlinear", loads + body + [Halt()]))
    return [(name, _program_image(program, data, data_address, memory_size), 0) for name, program in programs]


def gather_programs(config: MarcaConfig, rng: random.Random):
    """(name, memory, program address) exercising GATHER: many rows, repeated ids, id 0 and table_rows-1,
    unaligned rows, both memory formats, the weight buffer; then INDEX_RANGE, the bus errors of an id and
    of a table row beyond memory, and which of them a GATHER meets first. Results are stored in the compute
    format, so the memory image shows the buffer bit for bit."""
    import torch
    from marca.golden import fp

    from marca.isa import Barrier, Buffer, Gather, Halt, MemoryFormat, Store

    lanes, size, compute_size = config.lanes, config.storage_bytes, config.compute_bytes
    table_address, ids_address, output_address, memory_size = 4096, 8192, 12288, 16384
    generator = torch.Generator().manual_seed(rng.randrange(1 << 30))
    table = fp.random_bits(4096 // size, config.storage_format, generator)
    data = b"".join(int(v).to_bytes(size, "little") for v in table.tolist())

    def image(program, ids):
        memory = bytearray(_program_image(program, data, table_address, memory_size))
        raw = b"".join(int(i).to_bytes(4, "little") for i in ids)
        memory[ids_address:ids_address + len(raw)] = raw
        return bytes(memory)

    def store_out(buffer, rows, elements, address=output_address, buffer_address=0, stride=None):
        stride = elements if stride is None else stride
        return Store(memory_address=address, row_count=rows, row_elements=elements,
                     memory_row_stride=elements * compute_size, buffer=buffer, buffer_address=buffer_address,
                     buffer_row_stride=stride, memory_format=MemoryFormat.COMPUTE)

    wide_rows = 12
    wide = [rng.randrange(wide_rows) for _ in range(16)] + [wide_rows - 1, 0, wide_rows - 1, 3, 3]
    ids = wide + [rng.randrange(5) for _ in range(6)] + [0, 4]
    first_compute, first_small = len(wide) * 4, (len(wide) + 6) * 4
    program = [
        # 21 rows of lanes + 1 elements, rows (lanes + 3) elements apart in memory: unaligned in the beat.
        Gather(memory_address=table_address + 2 * size, row_count=len(wide), row_elements=lanes + 1,
               memory_row_stride=(lanes + 3) * size, buffer=Buffer.SCRATCH, buffer_address=1,
               buffer_row_stride=lanes + 1, index_address=ids_address, table_rows=wide_rows),
        # Compute-format rows into the weight buffer.
        Gather(memory_address=table_address + 64, row_count=6, row_elements=lanes,
               memory_row_stride=lanes * compute_size, buffer=Buffer.WEIGHT, buffer_address=lanes,
               buffer_row_stride=lanes, memory_format=MemoryFormat.COMPUTE,
               index_address=ids_address + first_compute, table_rows=5),
        # One element per row, a table of 5 single elements.
        Gather(memory_address=table_address + 6 * size, row_count=2, row_elements=1, memory_row_stride=size,
               buffer=Buffer.STATE, buffer_address=3, buffer_row_stride=1,
               index_address=ids_address + first_small, table_rows=5),
        store_out(Buffer.SCRATCH, len(wide), lanes + 1, buffer_address=1),
        store_out(Buffer.WEIGHT, 6, lanes, output_address + 2048, buffer_address=lanes),
        store_out(Buffer.STATE, 1, 2, output_address + 3072, buffer_address=3),
        Halt()]
    programs = [("gather", image(program, ids))]

    def faulting(name, ids, **fields):
        gather = dict(memory_address=table_address, row_count=len(ids), row_elements=lanes,
                      memory_row_stride=lanes * size, buffer=Buffer.STATE, index_address=ids_address,
                      table_rows=8)
        gather.update(fields)
        # A store before it shows in the image; the compute instruction after it may start meanwhile.
        return (name, image([program[0], store_out(Buffer.SCRATCH, 2, lanes + 1, buffer_address=1),
                             Gather(**gather), Barrier(), Halt()], wide + [0] * 8 + ids))

    base = dict(index_address=ids_address + 4 * (len(wide) + 8))
    row_beyond = (memory_size - table_address) // (lanes * size)          # the first row beyond memory
    programs += [
        faulting("gather-index-range", [1, 7, 8, 2], **base),
        faulting("gather-index-range-max", [0xFFFF_FFFF], **base),
        faulting("gather-id-beyond-memory", [], index_address=memory_size - 4, row_count=2),
        faulting("gather-row-beyond-memory", [1, row_beyond], table_rows=row_beyond + 1, **base),
        faulting("gather-index-range-first", [1, row_beyond + 1, row_beyond], table_rows=row_beyond + 1,
                 **base),
        faulting("gather-bus-error-first", [1, row_beyond, row_beyond + 1], table_rows=row_beyond + 1,
                 **base),
        faulting("gather-misaligned", [0], index_address=ids_address + 2),
        faulting("gather-memory-range", [0], memory_row_stride=1 << (config.axi_addr_width - 1), **base),
    ]
    return [(name, memory, 0) for name, memory in programs]


def error_programs(config: MarcaConfig, seed: int):
    """(name, memory, program address) with one program per error code (random_program's faulting tails),
    plus a misaligned program address and a fetch that runs off the end of memory."""
    from marca.golden.random_program import random_program
    out = []
    for code in ErrorCode:
        if code == ErrorCode.NONE:
            continue
        generated = random_program(config, seed=seed + int(code), length=6, final_error=code)
        out.append((f"error-{code.name}", generated.memory, generated.program_address))
    generated = random_program(config, seed=seed, length=3)
    out.append(("error-misaligned-program", generated.memory, 16))
    # No HALT: the last instruction word is followed by the end of memory.
    words = isa.encode_program([isa.Barrier(), isa.Barrier()])
    out.append(("error-fetch-beyond-memory", words, 0))
    return out


@cocotb.test()
async def programs(dut):
    """Directed programs per class, programs ending in each error, and constrained-random programs."""
    from marca.golden.random_program import random_program
    params = tb_params()
    tb = AcceleratorTB(dut, params)
    await tb.reset()
    seed = params.get("seed", 1)
    if params.get("directed", True):
        for name, memory, address in directed_programs(tb.config, random.Random(seed)):
            await run_and_compare(tb, memory, address, name)
    if params.get("errors", True):
        for name, memory, address in error_programs(tb.config, seed):
            await run_and_compare(tb, memory, address, name)
    for number in range(params.get("programs", 4)):
        generated = random_program(tb.config, seed=seed * 1000 + number, length=params.get("length", 30))
        await run_and_compare(tb, generated.memory, generated.program_address, f"random-{number}")


@cocotb.test()
async def gathers(dut):
    """GATHER: the directed programs of :func:`gather_programs`, random programs rich in gathers, and a
    random program ending in INDEX_RANGE."""
    from marca.golden.random_program import random_program
    params = tb_params()
    if not params.get("gathers"):      # tests/test_gather.py runs it; the random programs have gathers too
        return
    tb = AcceleratorTB(dut, params)
    await tb.reset()
    seed = params.get("seed", 1)
    for name, memory, address in gather_programs(tb.config, random.Random(seed)):
        await run_and_compare(tb, memory, address, name)
    for number in range(params.get("programs", 2)):
        generated = random_program(tb.config, seed=seed * 1000 + number, length=params.get("length", 20),
                                   weights={"gather": 6})
        await run_and_compare(tb, generated.memory, generated.program_address, f"random-gathers-{number}")
    generated = random_program(tb.config, seed=seed, length=6, final_error=ErrorCode.INDEX_RANGE)
    await run_and_compare(tb, generated.memory, generated.program_address, "random-index-range")


@cocotb.test()
async def gather_cost(dut):
    """Cycles of a LOAD and of a GATHER of the same rows (ids 0 .. n-1), no pauses; JSON to ``out``."""
    import json

    from marca.isa import Buffer, Gather, Halt, Load
    params = tb_params()
    if "out" not in params:
        return
    tb = AcceleratorTB(dut, dict(params, pause=0.0))
    await tb.reset()
    config, results = tb.config, {}
    for rows, elements in ((16, config.lanes), (16, 8 * config.lanes), (1, config.lanes)):
        common = dict(memory_address=4096, row_count=rows, row_elements=elements,
                      memory_row_stride=elements * config.storage_bytes, buffer=Buffer.SCRATCH,
                      buffer_row_stride=elements)
        ids = b"".join(k.to_bytes(4, "little") for k in range(rows))
        for name, instruction in (("load", Load(**common)),
                                  ("gather", Gather(**common, index_address=2048, table_rows=rows))):
            memory = bytearray(16384)
            program = isa.encode_program([instruction, Halt()])
            memory[:len(program)] = program
            memory[2048:2048 + len(ids)] = ids
            _, cycles = await run_and_compare(tb, bytes(memory), 0, f"{name}-{rows}x{elements}")
            results[f"{name} {rows} rows x {elements} elements"] = cycles
    with open(params["out"], "w") as out:
        json.dump(results, out, indent=2)


@cocotb.test()
async def soft_reset_mid_run(dut):
    """A soft reset during a long program stops it cleanly; the next program then runs exactly."""
    from marca.golden.random_program import random_program
    params = tb_params()
    tb = AcceleratorTB(dut, params)
    await tb.reset()
    generated = random_program(tb.config, seed=99, length=30)
    tb.ram.write(0, generated.memory)
    tb.ram.fault = (len(generated.memory), 1 << 64)
    await tb.write_register(REGISTERS["PROGRAM_LO"], generated.program_address)
    await tb.write_register(REGISTERS["CONTROL"], 1)
    await ClockCycles(dut.clk, 150)
    await tb.write_register(REGISTERS["CONTROL"], 2)
    for _ in range(100_000):
        await RisingEdge(dut.clk)
        status = await tb.read_register(REGISTERS["STATUS"])
        if not status & 1:
            break
    else:
        raise AssertionError("soft reset did not stop the accelerator")
    assert await tb.read_register(REGISTERS["ERROR_CODE"]) == 0
    await run_and_compare(tb, generated.memory, generated.program_address, "after-soft-reset")


@cocotb.test()
async def benchmark(dut):
    """The reference programs of bench/accelerator.py, without pauses; counters written to ``out``."""
    import json

    from marca.bench.accelerator import programs as bench_programs
    params = tb_params()
    if "out" not in params:
        return
    tb = AcceleratorTB(dut, dict(params, pause=0.0, memory_bits=params.get("memory_bits", 20)))
    await tb.reset()
    results = {}
    for name, (_, memory, _) in bench_programs(tb.config).items():
        counters, _ = await run_and_compare(tb, memory, 0, name)
        results[name] = counters
    with open(params["out"], "w") as out:
        json.dump(results, out, indent=2)
