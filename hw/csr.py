"""Control and status registers behind an AXI4-Lite subordinate port, with the performance counters.

Register map (32-bit registers, byte addresses; the address map is :data:`REGISTERS` and
:func:`counter_offset`, which the testbenches and docs/shell.md use):

==========  ===============  ====  ==========================================================================
offset      name             R/W   meaning
==========  ===============  ====  ==========================================================================
0x00        CONTROL          W     bit 0 ``start`` (ignored while busy), bit 1 ``soft_reset``; reads 0
0x04        STATUS           R     bit 0 ``busy``, bit 1 ``done`` (the last run ended), bit 2 ``error``
0x08        ERROR_CODE       R     0 = none; otherwise the ISA's error code (docs/shell.md)
0x0C        ERROR_PC         R     byte address of the instruction that failed (low 32 bits)
0x10        PROGRAM_LO       RW    byte address of the first instruction, bits 31..0
0x14        PROGRAM_HI       RW    bits 63..32 (only ``addr_width - 32`` bits are kept)
0x18        ID               R     ``0x4D415243`` ("MARC")
0x1C        COUNTER_COUNT    R     number of 64-bit counters
0x40 + 8k   COUNTER[k]_LO    R     counter ``k`` bits 31..0; reading it latches bits 63..32 for _HI
0x44 + 8k   COUNTER[k]_HI    R     counter ``k`` bits 63..32 as latched by the last _LO read
==========  ===============  ====  ==========================================================================

Counters are cleared when a run starts (``start`` accepted) and by a soft reset, then count until the run
ends, so after ``done`` they describe exactly that run. For timing (issue 7) every input from the units is
registered before use: counter increments are added one cycle after the cycle they describe, and STATUS
shows ``busy``/``done`` one cycle late as well, so counts are complete when ``done`` reads 1. Writes to read-only registers are ignored; every
access answers ``OKAY``.
"""

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .axi import AXI4LiteSignature, AXIResponse

__all__ = ["REGISTERS", "COUNTER_BASE", "ID_VALUE", "counter_offset", "CSRFile"]

REGISTERS = {
    "CONTROL": 0x00, "STATUS": 0x04, "ERROR_CODE": 0x08, "ERROR_PC": 0x0C,
    "PROGRAM_LO": 0x10, "PROGRAM_HI": 0x14, "ID": 0x18, "COUNTER_COUNT": 0x1C,
}
COUNTER_BASE = 0x40
ID_VALUE = 0x4D415243


def counter_offset(index: int) -> int:
    """Byte offset of counter ``index``'s low word (its high word is 4 bytes above)."""
    return COUNTER_BASE + 8 * index


class CSRFile(wiring.Component):
    """AXI4-Lite register file and performance counters.

    Parameters
    ----------
    program_address_width : int
        Width of ``program_address`` (the AXI4 master's address width).
    counters : dict of str to int
        Counter names, in register order, mapped to the width of their per-cycle increment
        (1 for "cycles where X", more for byte counts).
    error_code_width : int
        Width of ``error_code``.
    bus_addr_width : int
        Address bits of the AXI4-Lite port (at least enough for the counters).

    Ports
    -----
    bus : In(AXI4LiteSignature)
        The subordinate port. Accepts a write when address and data are both valid; one outstanding
        write response and one outstanding read response at a time (legal AXI4-Lite back-pressure).
    start : Out(1)
        One-cycle pulse (from a flip-flop) the cycle after the host's write of ``start`` is accepted while
        ``busy`` is low.
    soft_reset : Out(1)
        One-cycle pulse (from a flip-flop) the cycle after the host's write of ``soft_reset``.
    program_address : Out(program_address_width)
    busy, done : In(1)
        Controller state shown in STATUS.
    error_code : In(error_code_width)
    error_pc : In(program_address_width)
    counter_increments.<name> : In(width)
        Added to counter ``<name>`` every cycle while ``counting`` is high.
    counting : In(1)
        Counters advance only while high (the accelerator holds it high during a run).
    irq : Out(1)
        High while STATUS shows ``done`` and not ``busy`` (registered: the counters are complete).

    Timing: ``start``/``soft_reset`` pulse one cycle after the write is accepted and the write response
    follows one cycle later; STATUS and ``irq`` show ``busy``/``done`` one cycle after the controller;
    counter increments are registered and added one cycle after the cycle they describe; a read's
    address is registered, then decoded, so its data comes two cycles after the address is accepted.
    """

    def __init__(self, *, program_address_width: int, counters: dict, error_code_width: int = 8,
                 bus_addr_width: int = 12):
        self._MustUse__silence = True     # a rejected parameter must not also warn 'never used'
        if not isinstance(program_address_width, int) or not 16 <= program_address_width <= 64:
            raise ValueError(f"program_address_width must be an integer in [16, 64], "
                             f"not {program_address_width!r}")
        if not isinstance(counters, dict) or not counters or \
                not all(isinstance(k, str) and isinstance(v, int) and 1 <= v <= 32 for k, v in counters.items()):
            raise ValueError(f"counters must be a non-empty dict of names to increment widths in [1, 32], "
                             f"not {counters!r}")
        if not isinstance(error_code_width, int) or not 1 <= error_code_width <= 32:
            raise ValueError(f"error_code_width must be an integer in [1, 32], not {error_code_width!r}")
        if not isinstance(bus_addr_width, int) or COUNTER_BASE + 8 * len(counters) > 1 << bus_addr_width:
            raise ValueError(f"bus_addr_width must cover {len(counters)} counters, not {bus_addr_width!r}")
        self.program_address_width = program_address_width
        self.counter_names = tuple(counters)
        self.bus_addr_width = bus_addr_width
        super().__init__({
            "bus": In(AXI4LiteSignature(addr_width=bus_addr_width, data_width=32)),
            "start": Out(1), "soft_reset": Out(1),
            "program_address": Out(program_address_width),
            "busy": In(1), "done": In(1), "error_code": In(error_code_width),
            "error_pc": In(program_address_width),
            "counter_increments": In(wiring.Signature({name: Out(width) for name, width in counters.items()})),
            "counting": In(1), "irq": Out(1),
        })
        self._MustUse__silence = False

    def elaborate(self, platform):
        m = Module()
        bus = self.bus

        counters = [Signal(64, name=f"counter_{name}") for name in self.counter_names]
        high_latch = Signal(32)
        program = Signal(64)
        m.d.comb += self.program_address.eq(program[:self.program_address_width])

        # Write channel: take address and data together, answer OKAY.
        # The response comes two cycles after the write, so that a ``start`` (registered) has already
        # reached STATUS and ``irq`` when the host sees it.
        write_fire = Signal()
        write_settling = Signal()
        m.d.comb += [
            write_fire.eq(bus.awvalid & bus.wvalid & ~bus.bvalid & ~write_settling),
            bus.awready.eq(write_fire),
            bus.wready.eq(write_fire),
            bus.bresp.eq(AXIResponse.OKAY),
        ]
        m.d.sync += write_settling.eq(write_fire)
        with m.If(bus.bvalid & bus.bready):
            m.d.sync += bus.bvalid.eq(0)
        with m.If(write_settling):
            m.d.sync += bus.bvalid.eq(1)

        write_offset = Signal(self.bus_addr_width)
        m.d.comb += write_offset.eq(bus.awaddr & ~3)

        def strobed(old, new):
            out = []
            for byte in range(4):
                out.append(Mux(bus.wstrb[byte], new[8 * byte:8 * byte + 8], old[8 * byte:8 * byte + 8]))
            return Cat(*out)

        # ``start`` and ``soft_reset`` leave from flip-flops (one cycle after the write), so the host bus
        # reaches no further than these registers.
        start = Signal()
        soft_reset = Signal()
        m.d.comb += [self.start.eq(start), self.soft_reset.eq(soft_reset)]
        m.d.sync += [start.eq(0), soft_reset.eq(0)]
        with m.If(write_fire):
            with m.Switch(write_offset):
                with m.Case(REGISTERS["CONTROL"]):
                    with m.If(bus.wstrb[0] & bus.wdata[0] & ~self.busy & ~start):
                        m.d.sync += start.eq(1)
                    with m.If(bus.wstrb[0] & bus.wdata[1]):
                        m.d.sync += soft_reset.eq(1)
                with m.Case(REGISTERS["PROGRAM_LO"]):
                    m.d.sync += program[:32].eq(strobed(program[:32], bus.wdata))
                with m.Case(REGISTERS["PROGRAM_HI"]):
                    m.d.sync += program[32:].eq(strobed(program[32:], bus.wdata))

        # STATUS is registered one cycle behind the controller, like the counters (whose increments are
        # registered): when ``done`` reads 1, every count of the run is complete. A start shows busy at once.
        status_busy = Signal()
        status_done = Signal()
        m.d.sync += [status_busy.eq(self.busy | start), status_done.eq(self.done & ~start)]
        m.d.comb += self.irq.eq(status_done & ~status_busy)

        # Read channel: one response at a time, two cycles: the address is registered first (the host
        # bridge drives it from deep logic), then decoded into the registered read data.
        read_data = Signal(32)
        read_offset = Signal(self.bus_addr_width)
        read_pending = Signal()
        m.d.comb += [
            bus.arready.eq(~bus.rvalid & ~read_pending),
            bus.rresp.eq(AXIResponse.OKAY),
            bus.rdata.eq(read_data),
        ]
        with m.If(bus.rvalid & bus.rready):
            m.d.sync += bus.rvalid.eq(0)
        with m.If(bus.arvalid & bus.arready):
            m.d.sync += [read_pending.eq(1), read_offset.eq(bus.araddr & ~3)]
        with m.If(read_pending):
            m.d.sync += [read_pending.eq(0), bus.rvalid.eq(1)]
            m.d.sync += read_data.eq(0)
            with m.Switch(read_offset):
                with m.Case(REGISTERS["STATUS"]):
                    m.d.sync += read_data.eq(Cat(status_busy, status_done, self.error_code != 0))
                with m.Case(REGISTERS["ERROR_CODE"]):
                    m.d.sync += read_data.eq(self.error_code)
                with m.Case(REGISTERS["ERROR_PC"]):
                    m.d.sync += read_data.eq(self.error_pc[:32])
                with m.Case(REGISTERS["PROGRAM_LO"]):
                    m.d.sync += read_data.eq(program[:32])
                with m.Case(REGISTERS["PROGRAM_HI"]):
                    m.d.sync += read_data.eq(program[32:])
                with m.Case(REGISTERS["ID"]):
                    m.d.sync += read_data.eq(ID_VALUE)
                with m.Case(REGISTERS["COUNTER_COUNT"]):
                    m.d.sync += read_data.eq(len(counters))
                for index, counter in enumerate(counters):
                    with m.Case(counter_offset(index)):
                        m.d.sync += [read_data.eq(counter[:32]), high_latch.eq(counter[32:])]
                    with m.Case(counter_offset(index) + 4):
                        m.d.sync += read_data.eq(high_latch)

        # Counters: cleared by a start or a soft reset, then advance while counting. The increments come
        # from deep logic in the units, so they are registered first and added one cycle later; the
        # 64-bit add then starts at flip-flops.
        for name, counter in zip(self.counter_names, counters):
            increment = getattr(self.counter_increments, name)
            pending = Signal(len(increment), name=f"increment_{name}")
            with m.If(start | soft_reset):
                m.d.sync += [counter.eq(0), pending.eq(0)]
            with m.Else():
                m.d.sync += [counter.eq(counter + pending), pending.eq(Mux(self.counting, increment, 0))]
        return m
