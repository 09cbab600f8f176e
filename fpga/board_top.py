"""Board top: the accelerator with on-chip memory behind its AXI4 master and a UART host bridge on its CSRs.

::

    uart_rx ─► UARTReceiver ─► HostBridge ─► UARTTransmitter ─► uart_tx
                                 │     │
                     word port   │     │  AXI4-Lite (CSRs)
                                 ▼     ▼
                  AXI4Memory ◄── AXI4 ── Accelerator

:class:`BoardTop` has no pins and no clock generation: it is what runs in Verilator (ports ``clk``, ``rst``,
``uart_rx``, ``uart_tx``, ``leds``). :class:`ULX3SBoardTop` puts it on the ULX3S: a PLL makes the design
clock from the 25 MHz oscillator and the UART goes to the FT231X USB-serial chip.
"""

from amaranth import (Array, Cat, ClockDomain, ClockSignal, Const, Elaboratable, Instance, Module, Mux,
                      ResetSignal, Signal)
from amaranth.lib import io, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from marca.config import MarcaConfig
from marca.hw.axi import AXI4LiteSignature, AXI4Signature, AXIResponse

from .uart import HostBridge, UARTReceiver, UARTTransmitter, WordPortSignature, _check_clocks_per_bit

__all__ = ["AXI4Memory", "CSRScratch", "BoardTop", "ULX3SBoardTop", "ecp5_pll_parameters",
           "DEFAULT_MEMORY_BYTES", "DEFAULT_CLOCKS_PER_BIT"]

DEFAULT_MEMORY_BYTES = 64 * 1024
DEFAULT_CLOCKS_PER_BIT = 50       # 1 Mbaud at the 50 MHz board clock


def _check_power_of_two(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two of at least {minimum}, not {value!r}")


class AXI4Memory(wiring.Component):
    """On-chip memory with an AXI4 subordinate port and a 32-bit word port for the host bridge.

    The memory is ``data_width`` bits wide with one write port and one read port, so it maps onto the
    FPGA's block RAM without copies. AXI4 writes and the word port's writes share the write port; AXI4
    reads and the word port's reads share the read port. The word port always wins: its request is
    registered and carried out in the next cycle, and the AXI4 side learns of it from a register (``wready``
    is low in that cycle, or no read beat is issued).

    Every AXI4 handshake output (``awready``, ``wready``, ``bvalid``, ``arready``, ``rvalid`` with its
    payload) comes straight from a flip-flop, and block-RAM read data only goes into registers, so no
    combinational path crosses from the AXI4 manager into this memory and back, and none starts at the
    block RAM's slow clock-to-out and runs into the manager.

    The AXI4 side takes INCR bursts (every burst type is treated as INCR) of full-width beats, one read and
    one write transaction at a time, each at one beat per cycle. Read beats go through a three-entry
    output queue (a read issued in cycle *t* is in the queue in cycle *t* + 2, and its slot is free again
    in the cycle after the manager took it, so three slots keep one beat per cycle); a new read address is
    accepted once the previous burst's last beat has been issued. A beat outside the memory is not written
    (writes answer ``SLVERR``) or reads as zero with ``DECERR``.

    Parameters
    ----------
    memory_bytes : int
        Size (a power of two).
    data_width : int
        AXI4 beat and memory row width.
    addr_width : int
        AXI4 address bits.
    id_width : int
        AXI4 ID bits; IDs are echoed.

    Ports
    -----
    axi : In(AXI4Signature(...))
        The subordinate port.
    bridge : In(WordPortSignature(addr_width=log2(memory_bytes) - 2))
        Word accesses: a write lands in the cycle after ``write_enable``; read data is valid two cycles
        after ``read_enable`` (see :class:`~marca.fpga.uart.WordPortSignature`).
    """

    READ_QUEUE_DEPTH = 3

    def __init__(self, *, memory_bytes: int, data_width: int, addr_width: int, id_width: int = 1):
        _check_power_of_two("memory_bytes", memory_bytes, max(8, data_width // 8))
        self.memory_bytes = memory_bytes
        self.data_width = data_width
        self.addr_width = addr_width
        self.id_width = id_width
        super().__init__({
            "axi": In(AXI4Signature(addr_width=addr_width, data_width=data_width, id_width=id_width)),
            "bridge": In(WordPortSignature(addr_width=exact_log2(memory_bytes) - 2)),
        })

    def elaborate(self, platform):
        m = Module()
        beat_bytes = self.data_width // 8
        beat_shift = exact_log2(beat_bytes)
        lanes = self.data_width // 32
        lane_bits = exact_log2(lanes)
        depth = self.memory_bytes // beat_bytes
        memory_shift = exact_log2(self.memory_bytes)

        m.submodules.memory = memory = Memory(shape=self.data_width, depth=depth, init=[])
        write_port = memory.write_port(granularity=8)
        read_port = memory.read_port()

        def row(byte_address):
            return byte_address[beat_shift:memory_shift]

        def in_range(byte_address):
            if self.addr_width <= memory_shift:
                return Const(1)
            return byte_address[memory_shift:] == 0

        axi, bridge = self.axi, self.bridge

        # Word port, registered: the request seen in cycle t is carried out in cycle t + 1.
        bridge_write = Signal()
        bridge_read = Signal()
        bridge_row = Signal(exact_log2(depth))
        bridge_data = Signal(32)
        bridge_lane_enables = Signal(beat_bytes)
        bridge_lane = bridge.addr[:lane_bits] if lane_bits else Const(0, 1)
        read_lane = Signal.like(bridge_lane)      # lane of the word being read, until its data is out
        m.d.sync += [bridge_write.eq(bridge.write_enable), bridge_read.eq(bridge.read_enable),
                     bridge_row.eq(bridge.addr >> lane_bits), bridge_data.eq(bridge.write_data)]
        if lane_bits:
            m.d.sync += bridge_lane_enables.eq(0b1111 << (bridge_lane * 4))
        else:
            m.d.sync += bridge_lane_enables.eq(0b1111)
        with m.If(bridge.read_enable):
            m.d.sync += read_lane.eq(bridge_lane)
        m.d.comb += bridge.read_data.eq(read_port.data.word_select(read_lane, 32) if lane_bits
                                        else read_port.data)

        # Write engine. `awready`, `wready` and `bvalid` are registers; `wready` is low in a cycle that
        # the word port's (registered) write takes, decided one cycle ahead from the word port's request.
        write_address = Signal(self.addr_width)
        write_in_range = Signal()
        write_id = Signal(self.id_width)
        write_error = Signal()
        awready = Signal(init=1)
        wready = Signal()
        bvalid = Signal()
        in_burst = Signal()              # address taken, last beat not yet
        m.d.comb += [axi.awready.eq(awready), axi.wready.eq(wready), axi.bvalid.eq(bvalid),
                     axi.bid.eq(write_id), axi.bresp.eq(write_error.replicate(2) & AXIResponse.SLVERR)]
        beat_taken = Signal()
        m.d.comb += beat_taken.eq(axi.wvalid & wready)
        burst_continues = Signal()
        m.d.comb += burst_continues.eq(Mux(in_burst, ~(beat_taken & axi.wlast), axi.awvalid & awready))
        m.d.sync += wready.eq(burst_continues & ~bridge.write_enable)
        with m.If(axi.awvalid & awready):
            m.d.sync += [awready.eq(0), in_burst.eq(1), write_address.eq(axi.awaddr),
                         write_in_range.eq(in_range(axi.awaddr)), write_id.eq(axi.awid), write_error.eq(0)]
        with m.If(beat_taken):
            next_write_address = write_address + beat_bytes
            m.d.sync += [write_address.eq(next_write_address),
                         write_in_range.eq(in_range(next_write_address[:self.addr_width]))]
            with m.If(~write_in_range):
                m.d.sync += write_error.eq(1)
            with m.If(axi.wlast):
                m.d.sync += [in_burst.eq(0), bvalid.eq(1)]
        with m.If(bvalid & axi.bready):
            m.d.sync += [bvalid.eq(0), awready.eq(1)]

        with m.If(bridge_write):
            m.d.comb += [write_port.addr.eq(bridge_row), write_port.data.eq(bridge_data.replicate(lanes)),
                         write_port.en.eq(bridge_lane_enables)]
        with m.Else():
            m.d.comb += [write_port.addr.eq(row(write_address)), write_port.data.eq(axi.wdata),
                         write_port.en.eq(axi.wstrb & (beat_taken & write_in_range).replicate(beat_bytes))]

        # Read engine: issue a row read per beat while the output queue has a free slot (counted by
        # `credits`, a register, so issuing does not wait on `rready`), and not in a cycle that the word
        # port's read takes. The block RAM's data goes straight into the queue.
        queue_depth = self.READ_QUEUE_DEPTH
        arready = Signal(init=1)
        issuing = Signal()               # a burst is being issued
        issue_address = Signal(self.addr_width)
        issue_in_range = Signal()
        issue_last = Signal()
        beats_left = Signal(8)           # beats after the current one
        issue_id = Signal(self.id_width)
        credits = Signal(range(queue_depth + 1), init=queue_depth)
        issue = Signal()
        m.d.comb += [axi.arready.eq(arready), issue.eq(issuing & (credits != 0) & ~bridge_read)]
        with m.If(axi.arvalid & arready):
            m.d.sync += [arready.eq(0), issuing.eq(1), issue_address.eq(axi.araddr),
                         issue_in_range.eq(in_range(axi.araddr)), issue_id.eq(axi.arid),
                         beats_left.eq(axi.arlen), issue_last.eq(axi.arlen == 0)]
        with m.If(issue):
            next_issue_address = issue_address + beat_bytes
            m.d.sync += [issue_address.eq(next_issue_address),
                         issue_in_range.eq(in_range(next_issue_address[:self.addr_width])),
                         beats_left.eq(beats_left - 1), issue_last.eq(beats_left == 1)]
            with m.If(issue_last):
                m.d.sync += [issuing.eq(0), arready.eq(1)]
        m.d.comb += [read_port.en.eq(issue | bridge_read),
                     read_port.addr.eq(Mux(bridge_read, bridge_row, row(issue_address)))]

        # The beat whose row the block RAM outputs this cycle.
        arriving = Signal()
        arriving_last = Signal()
        arriving_ok = Signal()
        arriving_id = Signal(self.id_width)
        m.d.sync += [arriving.eq(issue), arriving_last.eq(issue_last), arriving_ok.eq(issue_in_range),
                     arriving_id.eq(issue_id)]

        # Output queue: slot 0 drives the R channel; slots shift down when the manager takes a beat.
        slot_valid = [Signal(name=f"read_slot{index}_valid") for index in range(queue_depth)]
        slot_data = [Signal(self.data_width, name=f"read_slot{index}_data") for index in range(queue_depth)]
        slot_last = [Signal(name=f"read_slot{index}_last") for index in range(queue_depth)]
        slot_error = [Signal(name=f"read_slot{index}_error") for index in range(queue_depth)]
        slot_id = [Signal(self.id_width, name=f"read_slot{index}_id") for index in range(queue_depth)]
        taken = Signal()
        m.d.comb += [axi.rvalid.eq(slot_valid[0]), axi.rdata.eq(slot_data[0]), axi.rlast.eq(slot_last[0]),
                     axi.rid.eq(slot_id[0]),
                     axi.rresp.eq(Const(AXIResponse.DECERR, 2) & slot_error[0].replicate(2)),
                     taken.eq(slot_valid[0] & axi.rready)]
        m.d.sync += credits.eq(credits - issue + taken)
        for index in range(queue_depth):
            # Where the arriving beat goes: the first free slot after this cycle's shift.
            below_full = Const(1) if index == 0 else slot_valid[index - 1]
            here_full = slot_valid[index]
            above_full = slot_valid[index + 1] if index + 1 < queue_depth else Const(0)
            lands_here = arriving & Mux(taken, here_full & ~above_full, below_full & ~here_full)
            with m.If(lands_here):
                m.d.sync += [slot_valid[index].eq(1),
                             slot_data[index].eq(read_port.data & arriving_ok.replicate(self.data_width)),
                             slot_last[index].eq(arriving_last), slot_error[index].eq(~arriving_ok),
                             slot_id[index].eq(arriving_id)]
            with m.Elif(taken):
                if index + 1 < queue_depth:
                    m.d.sync += [slot_valid[index].eq(slot_valid[index + 1]),
                                 slot_data[index].eq(slot_data[index + 1]),
                                 slot_last[index].eq(slot_last[index + 1]),
                                 slot_error[index].eq(slot_error[index + 1]),
                                 slot_id[index].eq(slot_id[index + 1])]
                else:
                    m.d.sync += slot_valid[index].eq(0)
        return m


class CSRScratch(wiring.Component):
    """Four read-write 32-bit registers on an AXI4-Lite subordinate port: stands in for the accelerator in
    the link-test image (``--no-accelerator``) and in the bridge tests.

    Registers at byte addresses 0x0, 0x4, 0x8, 0xC; any other address answers ``DECERR`` (reads give 0).
    """

    def __init__(self, *, addr_width: int = 8):
        self.addr_width = addr_width
        super().__init__({"axil": In(AXI4LiteSignature(addr_width=addr_width))})

    def elaborate(self, platform):
        m = Module()
        registers = [Signal(32, name=f"register_{index}") for index in range(4)]
        bus = self.axil

        def decode(address):
            return address[4:] == 0, address[2:4]

        read_valid = Signal()
        read_data = Signal(32)
        read_response = Signal(2)
        m.d.comb += [bus.arready.eq(~read_valid), bus.rvalid.eq(read_valid), bus.rdata.eq(read_data),
                     bus.rresp.eq(read_response)]
        with m.If(bus.arvalid & ~read_valid):
            hit, index = decode(bus.araddr)
            m.d.sync += [read_valid.eq(1), read_response.eq(Mux(hit, AXIResponse.OKAY, AXIResponse.DECERR)),
                         read_data.eq(Mux(hit, Array(registers)[index], 0))]
        with m.If(read_valid & bus.rready):
            m.d.sync += read_valid.eq(0)

        write_response_valid = Signal()
        write_response = Signal(2)
        take = Signal()
        m.d.comb += [take.eq(bus.awvalid & bus.wvalid & ~write_response_valid),
                     bus.awready.eq(take), bus.wready.eq(take),
                     bus.bvalid.eq(write_response_valid), bus.bresp.eq(write_response)]
        with m.If(take):
            hit, index = decode(bus.awaddr)
            m.d.sync += [write_response_valid.eq(1),
                         write_response.eq(Mux(hit, AXIResponse.OKAY, AXIResponse.DECERR))]
            with m.If(hit):
                with m.Switch(index):
                    for number, register in enumerate(registers):
                        with m.Case(number):
                            m.d.sync += register.eq(bus.wdata)
        with m.If(write_response_valid & bus.bready):
            m.d.sync += write_response_valid.eq(0)
        return m



class BoardTop(wiring.Component):
    """Accelerator + on-chip memory + UART host bridge, without pins (what Verilator runs).

    Parameters
    ----------
    config : MarcaConfig
        Accelerator configuration (its ``axi_data_width`` is the memory width).
    clocks_per_bit : int
        UART clocks per bit (board: 50 at 50 MHz for 1 Mbaud; simulation: a few).
    memory_bytes : int
        On-chip memory size (a power of two).
    frame_timeout_cycles : int
        Bridge quiet-line timeout (see :mod:`marca.fpga.uart`).
    with_accelerator : bool
        ``False`` puts :class:`CSRScratch` on the CSR bus instead of the accelerator: a link-test image.

    Ports
    -----
    uart_rx : In(1)
        From the host (idle high).
    uart_tx : Out(1)
        To the host (idle high).
    leds : Out(8)
        0: heartbeat (clock running, out of reset); 1: receiving; 2: sending; 3: the accelerator's ``irq``
        (its last run ended and it is idle); the rest 0.
    """

    uart_rx: In(1, init=1)
    uart_tx: Out(1, init=1)
    leds: Out(8)

    def __init__(self, config: MarcaConfig, *, clocks_per_bit: int = DEFAULT_CLOCKS_PER_BIT,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES, frame_timeout_cycles: int = 2_500_000,
                 with_accelerator: bool = True):
        if not isinstance(config, MarcaConfig):
            raise ValueError(f"config must be a MarcaConfig, not {config!r}")
        _check_power_of_two("memory_bytes", memory_bytes, max(8, config.axi_data_width // 8))
        self.config = config
        self.clocks_per_bit = clocks_per_bit
        self.memory_bytes = memory_bytes
        self.frame_timeout_cycles = frame_timeout_cycles
        self.with_accelerator = with_accelerator
        _check_clocks_per_bit(clocks_per_bit)  # bad parameters fail here, not at elaboration
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        config = self.config
        m.submodules.receiver = receiver = UARTReceiver(clocks_per_bit=self.clocks_per_bit)
        m.submodules.transmitter = transmitter = UARTTransmitter(clocks_per_bit=self.clocks_per_bit)
        m.d.comb += [receiver.rx.eq(self.uart_rx), self.uart_tx.eq(transmitter.tx)]

        m.submodules.memory = memory = AXI4Memory(
            memory_bytes=self.memory_bytes, data_width=config.axi_data_width,
            addr_width=config.axi_addr_width)

        done = Const(0)
        if self.with_accelerator:
            from marca.hw.accelerator import Accelerator
            m.submodules.accelerator = accelerator = Accelerator(config)
            wiring.connect(m, accelerator.m_axi, memory.axi)
            csr_signature = accelerator.axil_signature     # manager view, as the bridge sees it
            csr_target = accelerator.s_axil
            done = accelerator.irq
        else:
            m.submodules.csr_scratch = scratch = CSRScratch()
            csr_signature = scratch.axil.signature.flip()
            csr_target = scratch.axil
            for name in ("awvalid", "wvalid", "bready", "arvalid", "rready"):  # memory's AXI port idle
                m.d.comb += getattr(memory.axi, name).eq(0)

        m.submodules.bridge = bridge = HostBridge(
            memory_bytes=self.memory_bytes, csr_addr_width=csr_signature.addr_width,
            frame_timeout_cycles=self.frame_timeout_cycles)
        wiring.connect(m, receiver.o, bridge.rx)
        wiring.connect(m, bridge.tx, transmitter.i)
        wiring.connect(m, bridge.memory, memory.bridge)
        wiring.connect(m, bridge.csr, csr_target)

        heartbeat = Signal(24)
        m.d.sync += heartbeat.eq(heartbeat + 1)
        m.d.comb += self.leds.eq(Cat(heartbeat[-1], ~self.uart_rx, ~self.uart_tx, done))
        return m



def ecp5_pll_parameters(input_mhz: float, output_mhz: float) -> dict:
    """EHXPLLL divider settings for ``output_mhz`` from ``input_mhz`` (CLKOP feedback).

    Searches the dividers for the closest output with the VCO in 400..800 MHz and the phase detector in
    3.125..400 MHz (the ECP5 datasheet's ranges), preferring a VCO near 600 MHz. Returns the dividers and the
    frequency actually reached.
    """
    best = None
    for input_div in range(1, 129):
        pfd = input_mhz / input_div
        if not 3.125 <= pfd <= 400:
            continue
        for feedback_div in range(1, 81):
            output = pfd * feedback_div
            for output_div in range(1, 129):
                vco = output * output_div
                if not 400 <= vco <= 800:
                    continue
                error = abs(output - output_mhz)
                # Among equally close settings, a VCO mid-range (600 MHz) has the most margin.
                key = (round(error, 9), abs(vco - 600))
                if best is None or key < best[0]:
                    best = (key, input_div, feedback_div, output_div, output, vco)
    if best is None:
        raise ValueError(f"no ECP5 PLL setting makes {output_mhz} MHz from {input_mhz} MHz")
    (error, _), input_div, feedback_div, output_div, output, vco = best
    if error > 0.01 * output_mhz:
        raise ValueError(f"the closest ECP5 PLL output to {output_mhz} MHz is {output:.3f} MHz")
    return {"input_div": input_div, "feedback_div": feedback_div, "output_div": output_div,
            "output_mhz": output, "vco_mhz": vco}


class ULX3SBoardTop(Elaboratable):
    """:class:`BoardTop` on the ULX3S: PLL from the 25 MHz oscillator, UART to the FT231X, LEDs.

    The design clock is ``config.fpga_clock_mhz``; ``baud`` must divide it to an integer number of clocks
    per bit within 1 %.
    """

    OSCILLATOR_MHZ = 25.0

    def __init__(self, config: MarcaConfig, *, baud: int = 1_000_000,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES, with_accelerator: bool = True):
        self.config = config
        self.pll = ecp5_pll_parameters(self.OSCILLATOR_MHZ, config.fpga_clock_mhz)
        clock_hz = self.pll["output_mhz"] * 1e6
        clocks_per_bit = round(clock_hz / baud)
        if clocks_per_bit < 4 or abs(clock_hz / clocks_per_bit - baud) > 0.01 * baud:
            raise ValueError(f"baud {baud} is not reachable from a {clock_hz / 1e6:.3f} MHz clock")
        _check_power_of_two("memory_bytes", memory_bytes, max(8, config.axi_data_width // 8))
        self.baud = baud
        self.clock_hz = clock_hz
        self.clocks_per_bit = clocks_per_bit
        self.memory_bytes = memory_bytes
        self.with_accelerator = with_accelerator

    def elaborate(self, platform):
        m = Module()
        oscillator = platform.request(platform.default_clk, dir="-")
        m.submodules.oscillator_buffer = oscillator_buffer = io.Buffer("i", oscillator)
        pll_clock = Signal()
        pll_locked = Signal()
        pll = self.pll
        m.submodules.pll = Instance(
            "EHXPLLL",
            p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
            p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB",
            p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD",
            p_CLKI_DIV=pll["input_div"], p_CLKFB_DIV=pll["feedback_div"], p_FEEDBK_PATH="CLKOP",
            p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=pll["output_div"],
            p_CLKOP_CPHASE=(pll["output_div"] - 1) // 2, p_CLKOP_FPHASE=0,
            a_FREQUENCY_PIN_CLKI=f"{self.OSCILLATOR_MHZ:g}", a_FREQUENCY_PIN_CLKOP=f"{pll['output_mhz']:g}",
            a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1", a_MFG_GMCREF_SEL="2",
            i_CLKI=oscillator_buffer.i, i_CLKFB=pll_clock, i_RST=0, i_STDBY=0, i_PHASESEL0=0,
            i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1, i_PLLWAKESYNC=0, i_ENCLKOP=0,
            o_CLKOP=pll_clock, o_LOCK=pll_locked)
        m.domains.sync = ClockDomain("sync")
        m.d.comb += ClockSignal("sync").eq(pll_clock)
        # The reset leaves the PLL's lock through a two-flip-flop synchronizer (high from configuration
        # until two clocks after lock) and then a DCCA onto a global network: it reaches ~15,000 flip-flops,
        # which over general routing made one of the slowest and most congested nets of the design
        # (nextpnr promotes only clocks to globals by itself).
        m.domains.reset_source = ClockDomain("reset_source", reset_less=True, local=True)
        m.d.comb += ClockSignal("reset_source").eq(pll_clock)
        reset_stages = Signal(2, init=0b11)
        m.d.reset_source += reset_stages.eq(Cat(~pll_locked, reset_stages[0]))
        m.submodules.reset_buffer = Instance("DCCA", i_CLKI=reset_stages[1], i_CE=1,
                                             o_CLKO=ResetSignal("sync"))
        # No explicit constraint on pll_clock: nextpnr derives it from the PLL dividers and the 25 MHz
        # oscillator's constraint (a constraint on the net would name a net that synthesis renames).

        m.submodules.top = top = BoardTop(
            self.config, clocks_per_bit=self.clocks_per_bit, memory_bytes=self.memory_bytes,
            frame_timeout_cycles=int(self.clock_hz * 0.05), with_accelerator=self.with_accelerator)
        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx_buffer = uart_rx = io.Buffer("i", uart.rx)
        m.submodules.uart_tx_buffer = uart_tx = io.Buffer("o", uart.tx)
        m.d.comb += [top.uart_rx.eq(uart_rx.i), uart_tx.o.eq(top.uart_tx)]
        for index in range(8):
            led = io.Buffer("o", platform.request("led", index, dir="-"))
            m.submodules[f"led_buffer_{index}"] = led
            m.d.comb += led.o.eq(top.leds[index])
        return m
