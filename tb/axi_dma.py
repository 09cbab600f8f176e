"""cocotb testbench of the DMA engine (marca.hw.dma) against cocotbext-axi's AxiRam with random pauses.

The device under test is :class:`DMAHarness`: one :class:`~marca.hw.dma.DMA` and one line buffer. Random
sequences of loads and stores run against a Python model of memory and buffer (elements converted with
:func:`marca.golden.fp.convert`); after every sequence the whole memory image must match bit for bit.
Bus errors (a region whose accesses answer SLVERR) and aborts must end with ``done`` and a clean bus.
"""

import random

from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from marca.hw.axi import AXI4Signature, flat_members, interface_view
from marca.hw.buffers import LineBuffer
from marca.hw.dma import DMA

from marca.formats import FloatFormat

__all__ = ["DMAHarness", "harness_from_params"]


class DMAHarness(wiring.Component):
    """A DMA with one line buffer; AXI ports flat (``m_axi_*``), the command stream as ``command__*``."""

    def __init__(self, *, addr_width, data_width, storage_format, compute_format, lanes, lines):
        self.lines = lines
        self.dma = DMA(addr_width=addr_width, data_width=data_width, storage_format=storage_format,
                       compute_format=compute_format, lanes=lanes, line_width=(lines - 1).bit_length())
        self.axi_signature = AXI4Signature(addr_width=addr_width, data_width=data_width)
        super().__init__({
            **flat_members("m_axi", self.axi_signature),
            "command": In(stream.Signature(self.dma.command_layout)),
            "busy": Out(1), "done": Out(1), "error": Out(1), "abort": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.dma = dma = self.dma
        m.submodules.buffer = buffer = LineBuffer(lines=self.lines, lanes=dma.lanes,
                                                  element_width=dma.compute_format.width, read_ports=1)
        wiring.connect(m, dma.axi, wiring.flipped(interface_view(self, "m_axi", self.axi_signature)))
        wiring.connect(m, wiring.flipped(self.command), dma.command)
        wiring.connect(m, dma.buffer_write, buffer.write)
        wiring.connect(m, dma.buffer_read, buffer.read[0])
        m.d.comb += [self.busy.eq(dma.busy), self.done.eq(dma.done), self.error.eq(dma.error),
                     dma.abort.eq(self.abort)]
        return m


def harness_from_params(params: dict) -> DMAHarness:
    return DMAHarness(addr_width=params["addr_width"], data_width=params["data_width"],
                      storage_format=FloatFormat(*params["storage"]),
                      compute_format=FloatFormat(*params["compute"]),
                      lanes=params["lanes"], lines=params["lines"])


# ---- cocotb side ------------------------------------------------------------------------------------

try:
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import ClockCycles, RisingEdge
except ImportError:     # imported by pytest for the harness only
    cocotb = None

if cocotb is not None:
    import torch
    from cocotbext.axi import AxiBus
    from marca.golden import fp as golden_fp
    from marca.tb.axi_ram import FaultyAxiRam, pause_all_channels

    from marca.sim import tb_params

    class DMATB:
        def __init__(self, dut, params):
            self.dut = dut
            self.params = params
            self.harness = harness_from_params(params)
            self.layout = self.harness.dma.command_layout
            self.storage = FloatFormat(*params["storage"])
            self.compute = FloatFormat(*params["compute"])
            self.storage_bytes = (self.storage.width + 7) // 8
            self.lanes = params["lanes"]
            self.lines = params["lines"]
            self.memory_size = params["memory_size"]
            self.rng = random.Random(params.get("seed", 1))
            cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
            self.ram = FaultyAxiRam(AxiBus.from_prefix(dut, "m_axi"), dut.clk, dut.rst, size=self.memory_size)
            pause_all_channels(self.ram, self.rng, params.get("pause", 0.0))
            self.buffer = [0] * (self.lines * self.lanes)    # model: compute-format bit patterns

        async def reset(self):
            self.dut.command__valid.value = 0
            self.dut.abort.value = 0
            self.dut.rst.value = 1
            await ClockCycles(self.dut.clk, 3)
            self.dut.rst.value = 0
            await RisingEdge(self.dut.clk)

        def memory_side(self, memory_format):
            fmt = self.compute if memory_format else self.storage
            return fmt, (fmt.width + 7) // 8

        def pack(self, *, store, memory_format, address, rows, row_elements, row_stride, buffer_address, buffer_row_stride):
            lanes = self.lanes
            payload = self.layout.const({
                "store": store, "memory_format": memory_format, "buffer": 0, "address": address, "row_stride": row_stride,
                "rows": rows, "row_elements": row_elements,
                "line": buffer_address // lanes, "position": buffer_address % lanes,
                "row_step_lines": buffer_row_stride // lanes, "row_step_position": buffer_row_stride % lanes,
            })
            return payload.as_value().value

        async def transfer(self, abort_after=None, **fields):
            self.dut.command__payload.value = self.pack(**fields)
            self.dut.command__valid.value = 1
            await RisingEdge(self.dut.clk)
            while not int(self.dut.command__ready.value):
                await RisingEdge(self.dut.clk)
            self.dut.command__valid.value = 0
            cycles = 0
            while True:
                await RisingEdge(self.dut.clk)
                cycles += 1
                if abort_after is not None and cycles == abort_after:
                    self.dut.abort.value = 1
                if int(self.dut.done.value):
                    error = int(self.dut.error.value)
                    break
                assert cycles < 200_000, "DMA hung"
            self.dut.abort.value = 0
            await RisingEdge(self.dut.clk)
            return error, cycles

        # -- model ---------------------------------------------------------------------------------------
        def model(self, *, store, memory_format, address, rows, row_elements, row_stride, buffer_address,
                  buffer_row_stride):
            memory_fmt, size = self.memory_side(memory_format)
            total = self.lines * self.lanes
            for r in range(rows):
                base = address + r * row_stride
                indices = [(buffer_address + r * buffer_row_stride + e) % total for e in range(row_elements)]
                if not store:
                    raw = self.ram.read(base, row_elements * size)
                    values = [int.from_bytes(raw[e * size:(e + 1) * size], "little") & ((1 << memory_fmt.width) - 1)
                              for e in range(row_elements)]
                    converted = golden_fp.convert(torch.tensor(values), memory_fmt, self.compute).tolist()
                    for index, value in zip(indices, converted):
                        self.buffer[index] = value
                else:
                    values = [self.buffer[index] for index in indices]
                    converted = golden_fp.convert(torch.tensor(values), self.compute, memory_fmt).tolist()
                    self.expected[base:base + row_elements * size] = b"".join(
                        value.to_bytes(size, "little") for value in converted)

        def random_transfer(self, store):
            rng, lanes = self.rng, self.lanes
            memory_format = rng.randrange(2)
            _, size = self.memory_side(memory_format)
            rows = rng.choice([1, 1, 2, 3, 5])
            row_elements = rng.choice([1, 2, 3, lanes - 1, lanes, lanes + 1, 2 * lanes + 3,
                                       rng.randrange(1, 4 * lanes)])
            row_elements = max(1, row_elements)
            row_stride = (row_elements + rng.randrange(0, 9)) * size
            span = (rows - 1) * row_stride + row_elements * size
            if rng.random() < 0.3:     # straddle a 4 KiB boundary
                address = 4096 * rng.randrange(1, self.memory_size // 4096) - rng.randrange(1, span + 1)
                address -= address % size
            else:
                address = rng.randrange(0, (self.memory_size - span) // size) * size
            address = max(0, min(address, self.memory_size - span))
            address -= address % size
            total = self.lines * self.lanes
            buffer_row_stride = rng.choice([row_elements, lanes * ((row_elements + lanes - 1) // lanes),
                                            row_elements + rng.randrange(0, lanes)])
            buffer_address = rng.randrange(0, total)
            return dict(store=store, memory_format=memory_format, address=address, rows=rows, row_elements=row_elements,
                        row_stride=row_stride, buffer_address=buffer_address,
                        buffer_row_stride=buffer_row_stride)

    def _check_memory(tb, what):
        got = tb.ram.read(0, tb.memory_size)
        if got != bytes(tb.expected):
            wrong = [i for i in range(tb.memory_size) if got[i] != tb.expected[i]]
            raise AssertionError(f"memory differs at {len(wrong)} bytes from {wrong[0]:#x} "
                                 f"(got {got[wrong[0]:wrong[0] + 8].hex()}, expected "
                                 f"{bytes(tb.expected[wrong[0]:wrong[0] + 8]).hex()}) after {what}")

    def _random_bytes(rng, count):
        return bytes(rng.getrandbits(8) for _ in range(count))

    @cocotb.test()
    async def random_transfers(dut):
        """Random loads and stores; the memory image matches the model after every store."""
        tb = DMATB(dut, tb_params())
        await tb.reset()
        image = _random_bytes(tb.rng, tb.memory_size)
        tb.ram.write(0, image)
        tb.expected = bytearray(image)
        # Fill the buffer first so that stores read defined data.
        await_fill = dict(store=0, memory_format=0, address=0, rows=1, row_elements=tb.lines * tb.lanes, row_stride=0,
                          buffer_address=0, buffer_row_stride=0)
        error, _ = await tb.transfer(**await_fill)
        assert not error
        tb.model(**await_fill)
        for step in range(tb.params.get("transfers", 40)):
            fields = tb.random_transfer(store=step % 2)
            error, cycles = await tb.transfer(**fields)
            assert not error, f"unexpected bus error in {fields}"
            tb.model(**fields)
            if fields["store"]:
                _check_memory(tb, fields)

    @cocotb.test()
    async def bus_errors_and_abort(dut):
        """SLVERR on a load or a store ends the transfer with error; abort ends it early; the bus stays
        clean (a following transfer is exact)."""
        tb = DMATB(dut, tb_params())
        await tb.reset()
        image = _random_bytes(tb.rng, tb.memory_size)
        tb.ram.write(0, image)
        tb.expected = bytearray(image)
        size, lanes = tb.storage_bytes, tb.lanes
        big = dict(memory_format=0, address=0, rows=4, row_elements=4 * lanes, row_stride=4 * lanes * size,
                   buffer_address=0, buffer_row_stride=4 * lanes)
        for store in (0, 1):
            tb.ram.fault = (2 * lanes * size, 2 * lanes * size + 1)
            error, _ = await tb.transfer(store=store, **big)
            assert error, f"bus error not reported ({'store' if store else 'load'})"
            tb.ram.fault = (0, 0)
            error, _ = await tb.transfer(store=store, abort_after=5, **big)
            assert not error
        # A clean round trip afterwards.
        tb.ram.write(0, image)
        tb.expected = bytearray(image)
        load = dict(store=0, memory_format=1, address=64, rows=2, row_elements=lanes + 1,
                    row_stride=(lanes + 3) * tb.memory_side(1)[1],
                    buffer_address=1, buffer_row_stride=lanes + 1)
        stored = dict(load, store=1, address=tb.memory_size // 2)
        for fields in (load, stored):
            error, _ = await tb.transfer(**fields)
            assert not error
            tb.model(**fields)
        _check_memory(tb, "the round trip after errors and aborts")

    @cocotb.test()
    async def throughput(dut):
        """Without pauses an aligned contiguous load streams one beat per cycle (plus fixed overhead)."""
        params = tb_params()
        if params.get("pause"):
            return
        tb = DMATB(dut, params)
        await tb.reset()
        elements = tb.lines * tb.lanes
        beats = elements * tb.storage_bytes * 8 // params["data_width"]
        _, cycles = await tb.transfer(store=0, memory_format=0, address=0, rows=1, row_elements=elements, row_stride=0,
                                      buffer_address=0, buffer_row_stride=0)
        dut._log.info("load of %d beats took %d cycles", beats, cycles)
        assert cycles <= beats * 1.1 + 40, f"load of {beats} beats took {cycles} cycles"
        _, cycles = await tb.transfer(store=1, memory_format=0, address=0, rows=1, row_elements=elements, row_stride=0,
                                      buffer_address=0, buffer_row_stride=0)
        dut._log.info("store of %d beats took %d cycles", beats, cycles)
        assert cycles <= beats * 1.1 + 40, f"store of {beats} beats took {cycles} cycles"

    @cocotb.test()
    async def write_address_waits_for_write_data(dut):
        """A subordinate that raises AWREADY only while WVALID is high (legal AXI) must not deadlock the
        DMA: W beats may not wait for AWREADY."""
        params = tb_params()
        tb = DMATB(dut, dict(params, pause=0.0))

        def awready_after_wvalid():
            while True:
                yield not int(dut.m_axi_wvalid.value)

        tb.ram.write_if.aw_channel.set_pause_generator(awready_after_wvalid())
        await tb.reset()
        image = _random_bytes(tb.rng, tb.memory_size)
        tb.ram.write(0, image)
        tb.expected = bytearray(image)
        lanes = tb.lanes
        for fields in (dict(store=0, memory_format=0, address=0, rows=2, row_elements=2 * lanes + 1,
                            row_stride=64, buffer_address=0, buffer_row_stride=3 * lanes),
                       dict(store=1, memory_format=0, address=1024, rows=2, row_elements=2 * lanes + 1,
                            row_stride=96, buffer_address=0, buffer_row_stride=3 * lanes)):
            error, _ = await tb.transfer(**fields)
            assert not error
            tb.model(**fields)
        _check_memory(tb, "stores behind an AWREADY that waits for WVALID")
