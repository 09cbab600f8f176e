"""The CSR file in Amaranth's simulator: AXI4-Lite handshakes with random delays, the register map, the
start/soft-reset pulses and the 64-bit counters (the Verilator tier drives it through the accelerator with
cocotbext-axi's AxiLiteMaster: tests/test_accelerator.py)."""

import random

import pytest
from amaranth.sim import Simulator
from marca.hw.csr import ID_VALUE, REGISTERS, CSRFile, counter_offset


async def _write(ctx, bus, rng, address, value, strobe=0xF):
    ctx.set(bus.awaddr, address)
    ctx.set(bus.wdata, value)
    ctx.set(bus.wstrb, strobe)
    aw_pending, w_pending = True, True
    ctx.set(bus.awvalid, 1)
    for _ in range(rng.randrange(3)):
        await ctx.tick()
    ctx.set(bus.wvalid, 1)
    for _ in range(50):
        await ctx.tick()
        aw_done = ctx.get(bus.awvalid) and ctx.get(bus.awready)
        w_done = ctx.get(bus.wvalid) and ctx.get(bus.wready)
        if aw_done:
            ctx.set(bus.awvalid, 0)
            aw_pending = False
        if w_done:
            ctx.set(bus.wvalid, 0)
            w_pending = False
        if not aw_pending and not w_pending:
            break
    ctx.set(bus.awvalid, 0)
    ctx.set(bus.wvalid, 0)
    for _ in range(rng.randrange(3)):
        await ctx.tick()
    ctx.set(bus.bready, 1)
    for _ in range(50):
        if ctx.get(bus.bvalid):
            assert ctx.get(bus.bresp) == 0
            await ctx.tick()
            break
        await ctx.tick()
    else:
        raise AssertionError("no write response")
    ctx.set(bus.bready, 0)


async def _read(ctx, bus, rng, address):
    ctx.set(bus.araddr, address)
    ctx.set(bus.arvalid, 1)
    for _ in range(50):
        if ctx.get(bus.arready):
            await ctx.tick()
            break
        await ctx.tick()
    ctx.set(bus.arvalid, 0)
    for _ in range(rng.randrange(3)):
        await ctx.tick()
    ctx.set(bus.rready, 1)
    for _ in range(50):
        if ctx.get(bus.rvalid):
            value = ctx.get(bus.rdata)
            await ctx.tick()
            ctx.set(bus.rready, 0)
            return value
        await ctx.tick()
    raise AssertionError("no read response")


def test_csr_register_map_and_counters():
    dut = CSRFile(program_address_width=40, counters={"cycles": 1, "bytes": 5}, error_code_width=4)
    rng = random.Random(3)
    seen = {"start": 0, "soft_reset": 0}

    async def watch(ctx):
        async for _, _, start, soft_reset in ctx.tick().sample(dut.start, dut.soft_reset):
            seen["start"] += start
            seen["soft_reset"] += soft_reset

    async def bench(ctx):
        bus = dut.bus
        assert await _read(ctx, bus, rng, REGISTERS["ID"]) == ID_VALUE
        assert await _read(ctx, bus, rng, REGISTERS["COUNTER_COUNT"]) == 2
        await _write(ctx, bus, rng, REGISTERS["PROGRAM_LO"], 0x1234_5660)
        await _write(ctx, bus, rng, REGISTERS["PROGRAM_HI"], 0xAB)
        await _write(ctx, bus, rng, REGISTERS["PROGRAM_HI"], 0xFFFF_FF00, strobe=0b0010)   # byte 1 only
        assert await _read(ctx, bus, rng, REGISTERS["PROGRAM_LO"]) == 0x1234_5660
        assert await _read(ctx, bus, rng, REGISTERS["PROGRAM_HI"]) == 0xFFAB
        assert ctx.get(dut.program_address) == 0xAB_1234_5660       # 40 bits kept
        # Status, error code, error pc come from the inputs (STATUS one cycle late, like the counters).
        ctx.set(dut.busy, 1)
        ctx.set(dut.error_code, 6)
        ctx.set(dut.error_pc, 0x40)
        await ctx.tick()
        assert await _read(ctx, bus, rng, REGISTERS["STATUS"]) == 0b101
        assert await _read(ctx, bus, rng, REGISTERS["ERROR_CODE"]) == 6
        assert await _read(ctx, bus, rng, REGISTERS["ERROR_PC"]) == 0x40
        # start is ignored while busy; soft reset is not.
        await _write(ctx, bus, rng, REGISTERS["CONTROL"], 1)
        assert seen["start"] == 0
        await _write(ctx, bus, rng, REGISTERS["CONTROL"], 2)
        assert seen["soft_reset"] == 1
        ctx.set(dut.busy, 0)
        ctx.set(dut.error_code, 0)
        ctx.set(dut.done, 1)
        await ctx.tick()
        assert await _read(ctx, bus, rng, REGISTERS["STATUS"]) == 0b010
        # Counters: cleared by start, advance while counting, 64 bits read low-then-high.
        await _write(ctx, bus, rng, REGISTERS["CONTROL"], 1)
        assert seen["start"] == 1
        ctx.set(dut.counting, 1)
        ctx.set(dut.counter_increments.cycles, 1)
        ctx.set(dut.counter_increments.bytes, 17)
        for _ in range(100):
            await ctx.tick()
        ctx.set(dut.counting, 0)
        await ctx.tick()
        cycles = await _read(ctx, bus, rng, counter_offset(0))
        assert await _read(ctx, bus, rng, counter_offset(0) + 4) == 0
        moved = await _read(ctx, bus, rng, counter_offset(1))
        assert moved == 17 * cycles and 100 <= cycles <= 102
        assert await _read(ctx, bus, rng, counter_offset(1) + 4) == 0
        # Unknown addresses read 0 and writes to them are ignored.
        await _write(ctx, bus, rng, 0x3C, 0xFFFF_FFFF)
        assert await _read(ctx, bus, rng, 0x3C) == 0

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.add_process(watch)
    sim.run()


def test_csr_rejects_bad_parameters():
    with pytest.raises(ValueError, match="counters"):
        CSRFile(program_address_width=32, counters={})
    with pytest.raises(ValueError, match="program_address_width"):
        CSRFile(program_address_width=8, counters={"a": 1})


def test_csr_registered_increments_count_exactly():
    """Increments are registered and added a cycle late: none lost or doubled, and a start clears the
    counts; STATUS and ``irq`` follow the controller one cycle late, so counts are complete when done shows."""
    dut = CSRFile(program_address_width=32, counters={"cycles": 1, "bytes": 8}, error_code_width=4)
    rng = random.Random(5)

    async def bench(ctx):
        bus = dut.bus
        for run, length in enumerate((37, 5)):
            ctx.set(dut.counter_increments.cycles, 1)
            ctx.set(dut.counter_increments.bytes, 200)
            await _write(ctx, bus, rng, REGISTERS["CONTROL"], 1)
            ctx.set(dut.busy, 1)
            ctx.set(dut.done, 0)
            ctx.set(dut.counting, 1)
            for _ in range(length):
                await ctx.tick()
            ctx.set(dut.counting, 0)
            ctx.set(dut.busy, 0)
            ctx.set(dut.done, 1)
            assert not ctx.get(dut.irq)
            await ctx.tick()
            assert ctx.get(dut.irq)
            assert await _read(ctx, bus, rng, REGISTERS["STATUS"]) == 0b010
            assert await _read(ctx, bus, rng, counter_offset(0)) == length, f"run {run}"
            assert await _read(ctx, bus, rng, counter_offset(1)) == 200 * length, f"run {run}"

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
