# amaranth: UnusedElaboratable=no
"""Fast tier of the UART (fpga/uart.py) in Amaranth's simulator: transmitter into receiver, bit timing on
the wire, framing errors, and a receiver whose bit clock is off by too much being caught."""

import random

import pytest
from amaranth.hdl import Module
from amaranth.sim import Simulator

from marca.fpga.uart import UARTReceiver, UARTTransmitter


def loopback(data: bytes, *, tx_clocks_per_bit: int, rx_clocks_per_bit: int, gaps: bool = True):
    """Send ``data`` through a transmitter into a receiver; return the received (byte, framing_error)s and
    the cycles at which the line changed."""
    m = Module()
    m.submodules.tx = tx = UARTTransmitter(clocks_per_bit=tx_clocks_per_bit)
    m.submodules.rx = rx = UARTReceiver(clocks_per_bit=rx_clocks_per_bit)
    m.d.comb += rx.rx.eq(tx.tx)
    received, edges = [], []
    rng = random.Random(len(data))

    async def sender(ctx):
        for byte in data:
            ctx.set(tx.i.payload, byte)
            ctx.set(tx.i.valid, 1)
            await ctx.tick().until(tx.i.ready)
            ctx.set(tx.i.valid, 0)
            if gaps:
                await ctx.tick().repeat(rng.randrange(1, 3 * tx_clocks_per_bit))

    async def receiver(ctx):
        cycle, previous = 0, 1
        limit = (len(data) + 2) * 14 * max(tx_clocks_per_bit, rx_clocks_per_bit)
        while len(received) < len(data) and cycle < limit:
            await ctx.tick()
            cycle += 1
            line = ctx.get(tx.tx)
            if line != previous:
                edges.append(cycle)
                previous = line
            if ctx.get(rx.o.valid):
                received.append((ctx.get(rx.o.payload.data), ctx.get(rx.o.payload.framing_error)))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(sender)
    sim.add_testbench(receiver)
    sim.run()
    return received, edges


@pytest.mark.parametrize("clocks_per_bit", [4, 5, 8, 13])
def test_loopback(clocks_per_bit):
    data = bytes([0x00, 0xFF, 0x55, 0xAA, 0x01, 0x80]) + random.Random(clocks_per_bit).randbytes(20)
    received, _ = loopback(data, tx_clocks_per_bit=clocks_per_bit, rx_clocks_per_bit=clocks_per_bit)
    assert received == [(byte, 0) for byte in data]


def test_transmitter_bit_timing():
    """Every level on the wire lasts a whole number of bit times, and 0x55 toggles every bit."""
    received, edges = loopback(b"\x55", tx_clocks_per_bit=6, rx_clocks_per_bit=6, gaps=False)
    assert received == [(0x55, 0)]
    # start(0) 1 0 1 0 1 0 1 0 stop(1): ten toggles, one bit apart, the last back to idle.
    assert [later - earlier for earlier, later in zip(edges, edges[1:])] == [6] * 9


def test_receiver_tolerates_small_clock_error():
    """A sender 4 % faster or slower than the receiver still gets through (8N1 allows about 5 %)."""
    data = random.Random(3).randbytes(16)
    for tx_clocks_per_bit in (24, 26):
        received, _ = loopback(data, tx_clocks_per_bit=tx_clocks_per_bit, rx_clocks_per_bit=25)
        assert received == [(byte, 0) for byte in data]


def test_mismatched_baud_is_caught():
    """A receiver at twice the sender's baud rate must not deliver the data intact (the test can fail)."""
    data = bytes([0x00, 0x0F, 0x33])
    received, _ = loopback(data, tx_clocks_per_bit=16, rx_clocks_per_bit=8)
    assert [byte for byte, _ in received[:len(data)]] != list(data) or any(error for _, error in received)


def test_framing_error_and_break():
    """A low stop bit sets framing_error; a line held low (break) gives one byte, not a stream of them."""
    m = Module()
    m.submodules.rx = rx = UARTReceiver(clocks_per_bit=4)
    received = []

    async def drive(ctx):
        async def bits(levels):
            for level in levels:
                ctx.set(rx.rx, level)
                await ctx.tick().repeat(4)

        ctx.set(rx.rx, 1)
        await ctx.tick().repeat(8)
        await bits([0, 1, 0, 1, 0, 0, 0, 0, 0, 0])        # 0x05 with a low stop bit
        await bits([1, 1])
        await bits([0] * 60)                               # break
        await bits([1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])  # then 0xFE, clean

    async def watch(ctx):
        for _ in range(4 * 100):
            await ctx.tick()
            if ctx.get(rx.o.valid):
                received.append((ctx.get(rx.o.payload.data), ctx.get(rx.o.payload.framing_error)))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(drive)
    sim.add_testbench(watch)
    sim.run()
    assert received == [(0x05, 1), (0x00, 1), (0xFE, 0)]


@pytest.mark.parametrize("component", [UARTReceiver, UARTTransmitter])
@pytest.mark.parametrize("value", [3, 0, 4.0, True])
def test_clocks_per_bit_validated(component, value):
    with pytest.raises(ValueError, match="clocks_per_bit must be an integer of at least 4"):
        component(clocks_per_bit=value)
