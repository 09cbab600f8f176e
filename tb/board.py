"""Testbench of the board top (fpga/board_top.py) in Verilator: a simulated UART and the real host tool.

:class:`SimUartTransport` is the host tool's :class:`marca.fpga.host.Transport` for a simulation: it drives
the top's ``uart_rx`` pin bit by bit and decodes ``uart_tx``, waiting with timers of one bit, so Python
wakes per bit rather than per clock cycle. The cocotb tests then run the *same* host-tool coroutines that
drive a real board (:class:`marca.fpga.host.BoardLink`, :func:`marca.fpga.host.run_program`).

Parameters reach the tests through ``tb_params()``: ``clock_ns``, ``clocks_per_bit``,
``frame_timeout_cycles``, ``memory_bytes``; for the program test also ``cases`` (paths of ``.npz`` files
written by the pytest side, each with the image, program address, read-back regions, the golden image and
the expected error code and address), so the simulator process needs neither torch nor the golden model.
"""

import collections

import cocotb
from cocotb.clock import Clock
from cocotb.simtime import get_sim_time
from cocotb.triggers import FallingEdge, RisingEdge, Timer

from marca.fpga.host import Transport
from marca.sim import tb_params

__all__ = ["SimUartTransport", "BoardTB", "MemoryHarness", "test_bridge_link", "test_program_end_to_end",
           "test_memory_axi"]


class MemoryHarness:
    """Factory of a top for :class:`marca.fpga.board_top.AXI4Memory` alone: flat ``s_axi_*`` ports for
    cocotbext-axi and ``bridge_*`` ports for the word port."""

    def __new__(cls, *, memory_bytes: int, data_width: int, addr_width: int):
        from amaranth.hdl import Module
        from amaranth.lib import wiring

        from marca.fpga.board_top import AXI4Memory
        from marca.fpga.uart import WordPortSignature
        from marca.hw.axi import AXI4Signature, flat_members, interface_view

        subordinate = AXI4Signature(addr_width=addr_width, data_width=data_width).flip()
        word_port = WordPortSignature(addr_width=memory_bytes.bit_length() - 3).flip()

        class _Harness(wiring.Component):
            def __init__(self):
                super().__init__({**flat_members("s_axi", subordinate), **flat_members("bridge", word_port)})

            def elaborate(self, platform):
                m = Module()
                m.submodules.memory = memory = AXI4Memory(memory_bytes=memory_bytes, data_width=data_width,
                                                          addr_width=addr_width)
                wiring.connect(m, wiring.flipped(interface_view(self, "s_axi", subordinate)), memory.axi)
                wiring.connect(m, wiring.flipped(interface_view(self, "bridge", word_port)), memory.bridge)
                return m

        return _Harness()


class SimUartTransport(Transport):
    """The board top's UART pins as a host-tool transport, in simulated time.

    Parameters
    ----------
    dut : cocotb handle of the board top (ports ``uart_rx``, ``uart_tx``)
    bit_ns : int
        Nanoseconds per bit (clock period times the top's ``clocks_per_bit``).
    """

    def __init__(self, dut, *, bit_ns: int):
        if bit_ns % 2:
            raise ValueError(f"bit_ns must be even (the receiver samples at half bits), not {bit_ns!r}")
        self.dut = dut
        self.bit_ns = bit_ns
        self.byte_seconds = 10 * bit_ns * 1e-9
        self.latency_seconds = 50 * bit_ns * 1e-9  # the bridge answers within a few cycles
        self.received = collections.deque()
        self.framing_errors = 0  # bytes from the board with a low stop bit (its transmitter is broken)
        dut.uart_rx.value = 1
        self._receiver = cocotb.start_soon(self._receive_forever())

    async def send(self, data: bytes) -> None:
        for byte in data:
            await self.send_byte(byte)

    async def send_byte(self, byte: int, *, stop_bit: int = 1) -> None:
        """One 8N1 frame; ``stop_bit=0`` sends a corrupt frame (then a bit of idle line)."""
        line = self.dut.uart_rx
        for bit in [0] + [(byte >> index) & 1 for index in range(8)] + [stop_bit]:
            line.value = bit
            await Timer(self.bit_ns, unit="ns")
        line.value = 1
        if not stop_bit:
            await Timer(self.bit_ns, unit="ns")

    async def _receive_forever(self):
        line = self.dut.uart_tx
        while True:
            await FallingEdge(line)
            await Timer(self.bit_ns + self.bit_ns // 2, unit="ns")
            byte = 0
            for index in range(8):
                byte |= int(line.value) << index
                await Timer(self.bit_ns, unit="ns")
            if not int(line.value):
                self.framing_errors += 1
            self.received.append(byte)

    async def receive(self, count: int, timeout: float) -> bytes:
        deadline = self.now() + timeout
        while len(self.received) < count:
            remaining_ns = int((deadline - self.now()) * 1e9)
            if remaining_ns <= 0:
                break
            await Timer(min(remaining_ns, 10 * self.bit_ns), unit="ns")
        count = min(count, len(self.received))
        return bytes(self.received.popleft() for _ in range(count))

    async def sleep(self, seconds: float) -> None:
        await Timer(max(1, int(seconds * 1e9)), unit="ns")

    def now(self) -> float:
        return get_sim_time(unit="ns") * 1e-9


class BoardTB:
    """Clock, reset and the host link for the board top."""

    def __init__(self, dut):
        from marca.fpga.host import BoardLink
        params = tb_params()
        self.dut = dut
        self.params = params
        self.clock_ns = params.get("clock_ns", 10)
        self.transport = SimUartTransport(dut, bit_ns=self.clock_ns * params["clocks_per_bit"])
        resync_seconds = 1.5 * params["frame_timeout_cycles"] * self.clock_ns * 1e-9
        self.link = BoardLink(self.transport, resync_seconds=resync_seconds)
        Clock(dut.clk, self.clock_ns, unit="ns").start()

    async def reset(self):
        self.dut.rst.value = 1
        for _ in range(4):
            await RisingEdge(self.dut.clk)
        self.dut.rst.value = 0
        for _ in range(4):
            await RisingEdge(self.dut.clk)


@cocotb.test()
async def test_bridge_link(dut):
    """Every bridge command, every error status, and recovery from corrupt input (link-test top)."""
    import random

    from marca.fpga.host import BridgeError, FramingError, LinkTimeout
    from marca.fpga.uart import Status

    tb = BoardTB(dut)
    await tb.reset()
    link, transport = tb.link, tb.transport
    memory_bytes = tb.params["memory_bytes"]
    rng = random.Random(1)

    info = await link.identify()
    assert info == {"protocol_version": 1, "memory_bytes": memory_bytes}, info

    # Memory: a few regions, including the first and last words and one longer than a request chunk.
    model = bytearray(memory_bytes)
    for address, length in [(0, 64), (memory_bytes - 32, 32), (0x100, 1100), (0x40, 8)]:
        data = rng.randbytes(length)
        await link.write_memory(address, data)
        model[address:address + length] = data
    for address, length in [(0, 64), (memory_bytes - 32, 32), (0x100, 1100), (0x3C, 16), (0, 0x600)]:
        got = await link.read_memory(address, length)
        assert got == bytes(model[address:address + length]), f"read 0x{address:x}+{length} differs"

    # CSRs (the scratch registers) and their error responses.
    for index, value in enumerate([0xDEADBEEF, 0x01234567, 0, 0xFFFFFFFF]):
        await link.write_csr(4 * index, value)
    assert [await link.read_csr(4 * index) for index in range(4)] == [0xDEADBEEF, 0x01234567, 0, 0xFFFFFFFF]
    for operation in (link.read_csr(0x40), link.write_csr(0x80, 1)):
        try:
            await operation
        except BridgeError as error:
            assert error.status == Status.DECERR, error
        else:
            raise AssertionError("a CSR access outside the registers must answer DECERR")

    # Out-of-range memory requests are refused without touching memory; a read keeps its length.
    for operation in (link.read_memory(memory_bytes - 4, 8), link.write_memory(memory_bytes, b"\1\2\3\4")):
        try:
            await operation
        except BridgeError as error:
            assert error.status == Status.ADDRESS_ERROR, error
        else:
            raise AssertionError("a memory request past the end must answer ADDRESS_ERROR")
    assert await link.read_memory(memory_bytes - 32, 32) == bytes(model[-32:])

    # A corrupt byte (low stop bit) is answered with FRAMING_ERROR; the link then recovers.
    await transport.send_byte(0x52, stop_bit=0)
    try:
        await link.read_csr(0)
    except FramingError as error:
        assert "FRAMING_ERROR" in str(error), error
    else:
        raise AssertionError("a corrupt byte must be reported as a framing error")
    assert await link.read_csr(0) == 0xDEADBEEF

    # An unknown opcode answers BAD_COMMAND (the host tool reports it as a framing problem) and recovers.
    await transport.send(b"\x99\x01\x02")
    reply = await transport.receive(1, 1e-3)
    assert reply == bytes([Status.BAD_COMMAND]), reply
    await transport.sleep(link.resync_seconds)
    assert await link.read_csr(4) == 0x01234567

    # A request cut short answers FRAME_TIMEOUT after the quiet time.
    await transport.send(b"\x72\x00\x00")
    reply = await transport.receive(1, link.resync_seconds)
    assert reply == bytes([Status.FRAME_TIMEOUT]), reply

    # A board that does not answer gives LinkTimeout: hold the board in reset.
    dut.rst.value = 1
    try:
        await link.read_csr(0)
    except LinkTimeout as error:
        assert "answered 0 of 5 bytes" in str(error), error
    else:
        raise AssertionError("a silent board must raise LinkTimeout")
    dut.rst.value = 0
    await transport.sleep(link.resync_seconds)
    await transport.discard_input(link.resync_seconds)
    assert await link.identify() == info
    assert transport.framing_errors == 0


@cocotb.test()
async def test_program_end_to_end(dut):
    """Load compiled programs and memory images through the host tool, run them one after the other,
    compare the memory read back with the golden model; a case with an error code must raise
    :class:`marca.fpga.host.AcceleratorError` with that code and instruction address."""
    import numpy as np

    from marca.fpga.host import AcceleratorError, compare_memory, run_program

    tb = BoardTB(dut)
    await tb.reset()
    for path in tb.params["cases"]:
        case = np.load(path)
        image = case["image"].tobytes()
        expected = case["expected"].tobytes()
        regions = [tuple(int(value) for value in region) for region in case["regions"]]
        error_code = int(case["error_code"])
        try:
            result = await run_program(tb.link, image=image, program_address=int(case["program_address"]),
                                       read_back=regions,
                                       timeout_seconds=float(tb.params.get("timeout_seconds", 0.05)),
                                       poll_seconds=20 * tb.transport.byte_seconds,
                                       verify_load=bool(tb.params.get("verify_load", False)))
        except AcceleratorError as error:
            assert error_code, f"{path}: unexpected {error}"
            assert (error.code, error.pc) == (error_code, int(case["error_pc"])), f"{path}: {error}"
            dut._log.info(f"{path}: reported as expected: {error}")
            continue
        assert not error_code, f"{path}: the run should have stopped with error code {error_code}"
        dut._log.info(f"{path}: run took {result.seconds * 1e6:.1f} us simulated, {result.polls} polls, "
                      f"counters {result.counters}")
        compare_memory(result.regions, expected)


@cocotb.test()
async def test_memory_axi(dut):
    """AXI4Memory: random bursts with random pauses on every channel, while the word port (which has
    priority) writes and reads its own region; every byte checked against a model."""
    import logging
    import random

    from cocotbext.axi import AxiBus, AxiMaster

    params = tb_params()
    rng = random.Random(params.get("seed", 2))
    memory_bytes, data_width = params["memory_bytes"], params["data_width"]
    Clock(dut.clk, 10, unit="ns").start()
    for name in ("bridge_read_enable", "bridge_write_enable"):
        getattr(dut, name).value = 0
    dut.rst.value = 1
    for _ in range(3):
        await RisingEdge(dut.clk)
    dut.rst.value = 0

    master = AxiMaster(AxiBus.from_prefix(dut, "s_axi"), dut.clk, dut.rst)
    for interface in (master.write_if, master.read_if):
        interface.log.setLevel(logging.WARNING)

    def pauses(probability):
        pause_rng = random.Random(rng.random())
        while True:
            yield pause_rng.random() < probability

    for channel in (master.write_if.aw_channel, master.write_if.w_channel, master.write_if.b_channel,
                    master.read_if.ar_channel, master.read_if.r_channel):
        channel.set_pause_generator(pauses(0.3))

    half = memory_bytes // 2      # AXI uses the lower half, the word port the upper half
    model = bytearray(memory_bytes)
    word_port_done = False

    async def word_port_traffic():
        nonlocal word_port_done
        written = {}
        for _ in range(params.get("word_accesses", 300)):
            await RisingEdge(dut.clk)
            word = rng.randrange(half // 4, memory_bytes // 4)
            if rng.random() < 0.5 or not written:
                value = rng.getrandbits(32)
                dut.bridge_addr.value = word
                dut.bridge_write_data.value = value
                dut.bridge_write_enable.value = 1
                dut.bridge_read_enable.value = 0
                written[word] = value
            else:
                word = rng.choice(list(written))
                dut.bridge_addr.value = word
                dut.bridge_write_enable.value = 0
                dut.bridge_read_enable.value = 1
                await RisingEdge(dut.clk)
                dut.bridge_read_enable.value = 0
                await RisingEdge(dut.clk)      # read latency 2
                await FallingEdge(dut.clk)
                got = int(dut.bridge_read_data.value)
                assert got == written[word], f"word port read {word:#x}: {got:#x} != {written[word]:#x}"
                continue
            if rng.random() < 0.5:
                await RisingEdge(dut.clk)
                dut.bridge_write_enable.value = 0
                dut.bridge_read_enable.value = 0
                for _ in range(rng.randrange(4)):
                    await RisingEdge(dut.clk)
        await RisingEdge(dut.clk)
        dut.bridge_write_enable.value = 0
        dut.bridge_read_enable.value = 0
        word_port_done = True

    traffic = cocotb.start_soon(word_port_traffic())
    beat = data_width // 8
    for index in range(params.get("bursts", 60)):
        length = rng.choice([1, 2, beat, 3 * beat + 5, rng.randrange(1, 16 * beat)])
        address = rng.randrange(0, half - length)
        if rng.random() < 0.6:
            data = rng.randbytes(length)
            await master.write(address, data)
            model[address:address + length] = data
        else:
            got = await master.read(address, length)
            assert got.data == bytes(model[address:address + length]), \
                f"burst {index} read {address:#x}+{length}"
    await traffic
    assert word_port_done
    # Everything in the AXI half, once more, in one long read.
    got = await master.read(0, half)
    assert got.data == bytes(model[:half]), "final read of the AXI half differs"
    # Throughput: without pauses a long burst takes one beat per cycle (plus a few cycles of latency).
    for channel in (master.write_if.aw_channel, master.write_if.w_channel, master.write_if.b_channel,
                    master.read_if.ar_channel, master.read_if.r_channel):
        channel.clear_pause_generator()
        channel.pause = False          # clearing the generator leaves the last value in place
    beats = 64
    data = rng.randbytes(beats * beat)

    async def count_cycles(state):
        while state["counting"]:
            await RisingEdge(dut.clk)
            state["cycles"] += 1

    for direction in ("write", "read"):
        state = {"counting": True, "cycles": 0}
        counter = cocotb.start_soon(count_cycles(state))
        if direction == "write":
            await master.write(0, data)
        else:
            got = await master.read(0, beats * beat)
            assert got.data == data, "back-to-back burst read differs"
        state["counting"] = False
        await counter
        cycles = state["cycles"]
        assert cycles <= beats + 12, f"a {beats}-beat {direction} burst took {cycles} cycles"
        dut._log.info(f"{beats}-beat {direction} burst: {cycles} cycles")
    model[:beats * beat] = data
    # Beats outside the memory: writes answer SLVERR, reads DECERR and zeros.
    from cocotbext.axi import AxiResp
    result = await master.write(memory_bytes, bytes(beat), )
    assert result.resp == AxiResp.SLVERR, result.resp
    result = await master.read(memory_bytes, beat)
    assert result.resp == AxiResp.DECERR and result.data == bytes(beat), result
