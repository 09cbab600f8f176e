"""UART receiver and transmitter, and the host bridge that turns UART bytes into memory and CSR accesses.

The serial format is 8N1 (one start bit, eight data bits least significant first, one stop bit, no parity)
at ``clock / clocks_per_bit`` baud. On the ULX3S the board top runs at 50 MHz with 50 clocks per bit:
1 Mbaud, which the board's FT231X USB-serial chip carries without trouble. Simulations use a few clocks per
bit so that a byte costs tens of cycles.

Host bridge protocol (version 1)
--------------------------------
The host sends a *request frame*: one opcode byte, then its fields, little-endian. The bridge answers every
request (except NOP) with a *reply frame* whose length depends only on the request, so the host always knows
how many bytes to read; the last byte of every reply is a :class:`Status`.

==========  ======  =========================================  ==================================
request      code    fields after the opcode                    reply
==========  ======  =========================================  ==================================
NOP          0x00    none                                       none (padding, ignored)
IDENTIFY     0x49    none                                       "MRCA", version, log2(memory
                                                                bytes), 2 reserved bytes, status
READ_MEM     0x52    address u32, words-1 u16                   4*words data bytes, status
WRITE_MEM    0x57    address u32, words-1 u16, 4*words bytes    status
READ_CSR     0x72    address u32                                4 data bytes, status
WRITE_CSR    0x77    address u32, data u32                      status
==========  ======  =========================================  ==================================

Memory addresses are byte addresses of 32-bit words (multiples of 4) inside the board's on-chip memory; a
request that leaves the memory, or is misaligned, answers ``ADDRESS_ERROR`` without touching memory (a read
then sends zeros, so the reply keeps its length). CSR addresses go unchanged to the accelerator's AXI4-Lite
port, and the AXI response becomes the status (``OKAY`` -> ``OK``, ``SLVERR``, ``DECERR``).

Errors the bridge reports on its own: an unknown opcode answers ``BAD_COMMAND``; a byte whose stop bit is low
answers ``FRAMING_ERROR``. After either, the bridge ignores everything until the line has been quiet for
``frame_timeout_cycles``, so the host resynchronizes by waiting that long. A request that stops arriving
half-way answers ``FRAME_TIMEOUT`` after the same quiet time. Bytes that arrive while the receive queue is
full are lost and make the next status ``OVERRUN`` (the host tool never sends ahead of a reply, so this only
happens with a misbehaving host).
"""

import enum

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from marca.hw.axi import AXI4LiteSignature

__all__ = [
    "PROTOCOL_VERSION", "IDENTIFY_MAGIC", "Command", "Status", "ReceivedByte",
    "UARTReceiver", "UARTTransmitter", "WordPortSignature", "HostBridge",
]

PROTOCOL_VERSION = 1
IDENTIFY_MAGIC = b"MRCA"


class Command(enum.IntEnum):
    """Request opcodes of the host bridge protocol."""

    NOP = 0x00
    IDENTIFY = 0x49
    READ_MEM = 0x52
    WRITE_MEM = 0x57
    READ_CSR = 0x72
    WRITE_CSR = 0x77


class Status(enum.IntEnum):
    """The last byte of every reply."""

    OK = 0x00
    SLVERR = 0x02          # the accelerator's CSR port answered SLVERR
    DECERR = 0x03          # ... or DECERR (no register at that address)
    ADDRESS_ERROR = 0x04   # memory request misaligned or outside the on-chip memory
    BAD_COMMAND = 0x05     # unknown opcode
    FRAMING_ERROR = 0x06   # a received byte had a low stop bit
    FRAME_TIMEOUT = 0x07   # a request stopped arriving half-way
    OVERRUN = 0x08         # bytes were lost because the receive queue was full


# Bytes after the opcode, per command.
_HEADER_BYTES = {Command.READ_MEM: 6, Command.WRITE_MEM: 6, Command.READ_CSR: 4, Command.WRITE_CSR: 8,
                 Command.IDENTIFY: 0}

ReceivedByte = data.StructLayout({"data": 8, "framing_error": 1})


def _check_clocks_per_bit(clocks_per_bit):
    if not isinstance(clocks_per_bit, int) or isinstance(clocks_per_bit, bool) or clocks_per_bit < 4:
        raise ValueError(f"clocks_per_bit must be an integer of at least 4, not {clocks_per_bit!r}")


class UARTReceiver(wiring.Component):
    """8N1 UART receiver.

    The line is synchronized with two flip-flops, a start bit is recognized by a low level that is still
    low half a bit later, and every bit is sampled once in its middle. A stop bit that reads low gives a
    byte with ``framing_error`` set; the receiver then waits for the line to go high before it looks for
    the next start bit (so a held-low line, a "break", gives one byte, not a stream of them).

    Parameters
    ----------
    clocks_per_bit : int
        Clock cycles per bit (at least 4).

    Ports
    -----
    rx : In(1)
        The serial line (idle high).
    o : Out(stream.Signature(ReceivedByte, always_ready=True))
        One beat per received byte, ``valid`` for one cycle, in the middle of the stop bit. The receiver
        cannot wait, so the stream is always ready.
    """

    rx: In(1, init=1)
    o: Out(stream.Signature(ReceivedByte, always_ready=True))

    def __init__(self, *, clocks_per_bit: int):
        _check_clocks_per_bit(clocks_per_bit)
        self.clocks_per_bit = clocks_per_bit
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        line = Signal(init=1)
        m.submodules.line_sync = FFSynchronizer(self.rx, line, init=1)

        timer = Signal(range(self.clocks_per_bit))
        bit_index = Signal(range(8))
        shift = Signal(8)

        with m.If(timer != 0):
            m.d.sync += timer.eq(timer - 1)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~line):
                    m.d.sync += timer.eq(self.clocks_per_bit // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(timer == 0):
                    with m.If(line):  # a glitch, not a start bit
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [timer.eq(self.clocks_per_bit - 1), bit_index.eq(0)]
                        m.next = "DATA"
            with m.State("DATA"):
                with m.If(timer == 0):
                    m.d.sync += [shift.eq(Cat(shift[1:], line)), timer.eq(self.clocks_per_bit - 1),
                                 bit_index.eq(bit_index + 1)]
                    with m.If(bit_index == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(timer == 0):
                    m.d.comb += [self.o.valid.eq(1), self.o.payload.data.eq(shift),
                                 self.o.payload.framing_error.eq(~line)]
                    # Leaving at mid stop bit keeps half a bit of slack for a sender with a faster clock.
                    m.next = "IDLE"
                    with m.If(~line):
                        m.next = "BREAK"
            with m.State("BREAK"):
                with m.If(line):
                    m.next = "IDLE"
        return m


class UARTTransmitter(wiring.Component):
    """8N1 UART transmitter.

    Parameters
    ----------
    clocks_per_bit : int
        Clock cycles per bit (at least 4).

    Ports
    -----
    i : In(stream.Signature(8))
        Bytes to send; a byte is taken (``ready``) when the previous one's stop bit has been sent.
    tx : Out(1)
        The serial line (idle high), driven from a flip-flop.
    """

    i: In(stream.Signature(8))
    tx: Out(1, init=1)

    def __init__(self, *, clocks_per_bit: int):
        _check_clocks_per_bit(clocks_per_bit)
        self.clocks_per_bit = clocks_per_bit
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        timer = Signal(range(self.clocks_per_bit))
        bits_left = Signal(range(11))
        shift = Signal(10, init=0x3FF)  # start bit, 8 data bits, stop bit; shifted out LSB first

        m.d.comb += self.tx.eq(shift[0])
        with m.If(bits_left == 0):
            m.d.comb += self.i.ready.eq(1)
            with m.If(self.i.valid):
                m.d.sync += [shift.eq(Cat(Const(0, 1), self.i.payload, Const(1, 1))),
                             bits_left.eq(10), timer.eq(self.clocks_per_bit - 1)]
        with m.Elif(timer == 0):
            m.d.sync += [shift.eq(Cat(shift[1:], Const(1, 1))), bits_left.eq(bits_left - 1),
                         timer.eq(self.clocks_per_bit - 1)]
        with m.Else():
            m.d.sync += timer.eq(timer - 1)
        return m


class WordPortSignature(wiring.Signature):
    """A 32-bit word port into a memory, seen from the side that issues accesses.

    ``addr`` is a word address. A cycle with ``write_enable`` writes ``write_data``; a cycle with
    ``read_enable`` reads, and ``read_data`` holds the word two cycles later, for that cycle only (fixed
    latency 2, never waits). The memory registers the request before it acts on it (the write lands in
    the next cycle), so that the request never feeds its other port's handshakes combinationally. The
    memory serves this port with priority over anything else, so there is no ready signal.
    """

    def __init__(self, *, addr_width: int):
        if not isinstance(addr_width, int) or isinstance(addr_width, bool) or not 1 <= addr_width <= 30:
            raise ValueError(f"addr_width must be an integer in [1, 30], not {addr_width!r}")
        self.addr_width = addr_width
        super().__init__({
            "addr": Out(addr_width), "write_data": Out(32), "write_enable": Out(1),
            "read_enable": Out(1), "read_data": In(32),
        })

    def __eq__(self, other):
        return type(other) is type(self) and other.addr_width == self.addr_width

    def __repr__(self):
        return f"WordPortSignature(addr_width={self.addr_width})"


class HostBridge(wiring.Component):
    """Executes host bridge protocol requests (see the module docstring) on a memory and a CSR bus.

    Parameters
    ----------
    memory_bytes : int
        Size of the memory behind ``memory`` (a power of two, at least 8); requests outside it answer
        ``ADDRESS_ERROR``.
    csr_addr_width : int
        Address bits of the AXI4-Lite CSR port.
    frame_timeout_cycles : int
        Quiet cycles after which a half-received request is dropped (see the module docstring). Choose
        well above the longest pause the host leaves inside a request (USB latency: milliseconds).

    Ports
    -----
    rx : In(stream.Signature(ReceivedByte, always_ready=True))
        Bytes from :class:`UARTReceiver`; queued in a 16-byte FIFO.
    tx : Out(stream.Signature(8))
        Reply bytes to :class:`UARTTransmitter`.
    memory : Out(WordPortSignature)
        Word accesses into the on-chip memory.
    csr : Out(AXI4LiteSignature(addr_width=csr_addr_width))
        One outstanding access at a time to the accelerator's control registers.
    """

    def __init__(self, *, memory_bytes: int, csr_addr_width: int, frame_timeout_cycles: int):
        if not isinstance(memory_bytes, int) or memory_bytes < 8 or memory_bytes & (memory_bytes - 1):
            raise ValueError(f"memory_bytes must be a power of two of at least 8, not {memory_bytes!r}")
        if not isinstance(frame_timeout_cycles, int) or frame_timeout_cycles < 16:
            raise ValueError(f"frame_timeout_cycles must be an integer of at least 16, "
                             f"not {frame_timeout_cycles!r}")
        self.memory_bytes = memory_bytes
        self.csr_addr_width = csr_addr_width
        self.frame_timeout_cycles = frame_timeout_cycles
        super().__init__({
            "rx": In(stream.Signature(ReceivedByte, always_ready=True)),
            "tx": Out(stream.Signature(8)),
            "memory": Out(WordPortSignature(addr_width=exact_log2(memory_bytes) - 2)),
            "csr": Out(AXI4LiteSignature(addr_width=csr_addr_width)),
        })

    def elaborate(self, platform):
        m = Module()

        # Receive queue: the bridge is busy for a few cycles per byte at most, but a queue keeps a
        # pipelining host from losing bytes while a reply is being sent.
        m.submodules.rx_queue = rx_queue = fifo.SyncFIFOBuffered(width=9, depth=16)
        overrun = Signal()
        with m.If(self.rx.valid):
            m.d.comb += [rx_queue.w_data.eq(self.rx.payload.as_value()), rx_queue.w_en.eq(1)]
            with m.If(~rx_queue.w_rdy):
                m.d.sync += overrun.eq(1)
        byte_in = Signal(8)
        byte_framing_error = Signal()
        byte_valid = Signal()
        byte_take = Signal()  # driven by states that consume a byte
        received = ReceivedByte(rx_queue.r_data)
        m.d.comb += [byte_in.eq(received.data), byte_framing_error.eq(received.framing_error),
                     byte_valid.eq(rx_queue.r_rdy), rx_queue.r_en.eq(byte_take)]

        opcode = Signal(8)
        header = Signal(64)           # address u32, then count u16 or data u32
        header_left = Signal(range(9))
        header_index = Signal(range(8))
        address = header[0:32]
        words_minus_one = header[32:48]
        csr_write_data = header[32:64]

        word_address = Signal(30)     # current memory word
        words_left = Signal(17)
        no_words_left = Signal()      # words_left == 0, kept as a register (a 17-bit compare is 3 LUTs deep)
        word = Signal(32)             # word being assembled from bytes or sent as bytes
        byte_index = Signal(2)
        status = Signal(8)
        address_ok = Signal()
        memory_words = self.memory_bytes // 4
        end = Signal(31)
        m.d.comb += [
            end.eq(address[2:] + words_minus_one + 1),
            address_ok.eq((address[0:2] == 0) & (address[2:] < memory_words) & (end <= memory_words)),
        ]

        # Quiet-line timer while a request is incomplete or being discarded.
        quiet = Signal(range(self.frame_timeout_cycles + 1))
        timed_out = Signal()
        m.d.comb += timed_out.eq(quiet == self.frame_timeout_cycles)

        # Reply byte sender: SEND_WORD sends `send_count` bytes of `word`, LSB first, then goes to the
        # state named by `after_send`.
        send_count = Signal(range(9))
        after_send_read_loop = Signal()  # True: continue READ_MEM; False: send status
        identify_high = Signal(32)

        m.d.comb += [self.memory.addr.eq(word_address), self.memory.write_data.eq(word)]
        m.d.comb += [self.csr.awaddr.eq(address[:self.csr_addr_width]),
                     self.csr.araddr.eq(address[:self.csr_addr_width]),
                     self.csr.wdata.eq(csr_write_data), self.csr.wstrb.eq(0b1111),
                     self.csr.awprot.eq(0), self.csr.arprot.eq(0)]
        # The CSR bus's valids are registers, so the bridge's state logic does not run on into the
        # accelerator's CSR decode in the same cycle.
        csr_arvalid = Signal()
        csr_awvalid = Signal()
        csr_wvalid = Signal()
        m.d.comb += [self.csr.arvalid.eq(csr_arvalid), self.csr.awvalid.eq(csr_awvalid),
                     self.csr.wvalid.eq(csr_wvalid)]

        def take_byte():
            m.d.comb += byte_take.eq(1)
            m.d.sync += quiet.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                m.d.sync += quiet.eq(0)
                with m.If(byte_valid):
                    take_byte()
                    m.d.sync += [opcode.eq(byte_in), header_index.eq(0)]
                    with m.If(byte_framing_error):
                        m.d.sync += status.eq(Status.FRAMING_ERROR)
                        m.next = "REJECT"
                    with m.Elif(byte_in == Command.NOP):
                        pass
                    with m.Else():
                        m.d.sync += status.eq(Status.BAD_COMMAND)
                        m.next = "REJECT"
                        for command, length in _HEADER_BYTES.items():
                            with m.If(byte_in == command):
                                m.d.sync += [header_left.eq(length), status.eq(Status.OK)]
                                m.next = "HEADER"

            with m.State("HEADER"):
                with m.If(header_left == 0):
                    m.d.sync += [word_address.eq(address[2:]), words_left.eq(words_minus_one + 1),
                                 no_words_left.eq(0),
                                 byte_index.eq(0), word.eq(0)]
                    with m.If(((opcode == Command.READ_MEM) | (opcode == Command.WRITE_MEM)) & ~address_ok):
                        m.d.sync += status.eq(Status.ADDRESS_ERROR)
                    with m.Switch(opcode):
                        with m.Case(Command.READ_MEM):
                            m.next = "READ_ISSUE"
                        with m.Case(Command.WRITE_MEM):
                            m.next = "WRITE_DATA"
                        with m.Case(Command.READ_CSR):
                            m.d.sync += csr_arvalid.eq(1)
                            m.next = "CSR_READ_ADDRESS"
                        with m.Case(Command.WRITE_CSR):
                            m.d.sync += [csr_awvalid.eq(1), csr_wvalid.eq(1)]
                            m.next = "CSR_WRITE"
                        with m.Default():  # IDENTIFY
                            m.d.sync += [
                                word.eq(int.from_bytes(IDENTIFY_MAGIC, "little")),
                                identify_high.eq(PROTOCOL_VERSION | (exact_log2(self.memory_bytes) << 8)),
                                send_count.eq(8), after_send_read_loop.eq(0)]
                            m.next = "SEND_WORD"
                with m.Elif(byte_valid):
                    take_byte()
                    with m.If(byte_framing_error):
                        m.d.sync += status.eq(Status.FRAMING_ERROR)
                        m.next = "REJECT"
                    with m.Else():
                        m.d.sync += [header.word_select(header_index, 8).eq(byte_in),
                                     header_index.eq(header_index + 1), header_left.eq(header_left - 1)]
                with m.Elif(timed_out):
                    m.d.sync += status.eq(Status.FRAME_TIMEOUT)
                    m.next = "STATUS"
                with m.Else():
                    m.d.sync += quiet.eq(quiet + 1)

            with m.State("WRITE_DATA"):
                with m.If(no_words_left):
                    m.next = "STATUS"
                with m.Elif(byte_valid):
                    take_byte()
                    m.d.sync += [word.eq(Cat(word[8:], byte_in)), byte_index.eq(byte_index + 1)]
                    with m.If(byte_framing_error):
                        m.d.sync += status.eq(Status.FRAMING_ERROR)
                        m.next = "REJECT"
                    with m.Elif(byte_index == 3):
                        m.next = "WRITE_WORD"
                with m.Elif(timed_out):
                    m.d.sync += status.eq(Status.FRAME_TIMEOUT)
                    m.next = "STATUS"
                with m.Else():
                    m.d.sync += quiet.eq(quiet + 1)
            with m.State("WRITE_WORD"):
                m.d.comb += self.memory.write_enable.eq(status == Status.OK)
                m.d.sync += [word_address.eq(word_address + 1), words_left.eq(words_left - 1),
                             no_words_left.eq(words_left == 1)]
                m.next = "WRITE_DATA"

            with m.State("READ_ISSUE"):
                with m.If(no_words_left):
                    m.next = "STATUS"
                with m.Else():
                    m.d.comb += self.memory.read_enable.eq(status == Status.OK)
                    m.next = "READ_WAIT"
            with m.State("READ_WAIT"):   # the word port's read latency is 2
                m.next = "READ_CAPTURE"
            with m.State("READ_CAPTURE"):
                m.d.sync += [word.eq(Mux(status == Status.OK, self.memory.read_data, 0)),
                             word_address.eq(word_address + 1), words_left.eq(words_left - 1),
                             no_words_left.eq(words_left == 1), send_count.eq(4), after_send_read_loop.eq(1)]
                m.next = "SEND_WORD"

            with m.State("CSR_READ_ADDRESS"):
                with m.If(self.csr.arready):
                    m.d.sync += csr_arvalid.eq(0)
                    m.next = "CSR_READ_DATA"
            with m.State("CSR_READ_DATA"):
                m.d.comb += self.csr.rready.eq(1)
                with m.If(self.csr.rvalid):
                    m.d.sync += [word.eq(self.csr.rdata[:32]), send_count.eq(4), after_send_read_loop.eq(0),
                                 status.eq(self.csr.rresp)]
                    m.next = "SEND_WORD"
            with m.State("CSR_WRITE"):
                with m.If(self.csr.awready):
                    m.d.sync += csr_awvalid.eq(0)
                with m.If(self.csr.wready):
                    m.d.sync += csr_wvalid.eq(0)
                with m.If((~csr_awvalid | self.csr.awready) & (~csr_wvalid | self.csr.wready)):
                    m.next = "CSR_WRITE_RESPONSE"
            with m.State("CSR_WRITE_RESPONSE"):
                m.d.comb += self.csr.bready.eq(1)
                with m.If(self.csr.bvalid):
                    m.d.sync += status.eq(self.csr.bresp)
                    m.next = "STATUS"

            with m.State("SEND_WORD"):
                with m.If(send_count == 0):
                    m.next = "STATUS"
                    with m.If(after_send_read_loop):
                        m.next = "READ_ISSUE"
                with m.Else():
                    m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(word[0:8])]
                    with m.If(self.tx.ready):
                        m.d.sync += [word.eq(Cat(word[8:], identify_high[0:8])),
                                     identify_high.eq(identify_high[8:]),
                                     send_count.eq(send_count - 1)]

            with m.State("STATUS"):
                m.d.comb += [self.tx.valid.eq(1),
                             self.tx.payload.eq(Mux(overrun & (status == Status.OK), Status.OVERRUN, status))]
                with m.If(self.tx.ready):
                    m.d.sync += overrun.eq(0)
                    m.next = "IDLE"

            # Answer an unusable request at once, then drop bytes until the line is quiet.
            with m.State("REJECT"):
                m.d.comb += [self.tx.valid.eq(1), self.tx.payload.eq(status)]
                with m.If(self.tx.ready):
                    m.d.sync += quiet.eq(0)
                    m.next = "DISCARD"
            with m.State("DISCARD"):
                with m.If(byte_valid):
                    take_byte()
                with m.Elif(timed_out):
                    m.next = "IDLE"
                with m.Else():
                    m.d.sync += quiet.eq(quiet + 1)
        return m
