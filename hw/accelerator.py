"""The accelerator top: ``Accelerator(config)`` with an AXI4 manager port and an AXI4-Lite subordinate port.

    host ── s_axil_* (AXI4-Lite) ──► CSRFile ──► Controller ◄── InstructionFetch (ARID 1) ──┐
                                                     │                                      │
    memory ◄── m_axi_* (AXI4) ──► read mux ◄── DMA (ID 0, storage <-> compute format) ──────┘
                                                     │
                          four LineBuffers (weight, activation, state, scratch; read ports a, b, c, DMA)
                                                     │
                                 ComputeEngine ──► PEArray (+ FunctionLane per lane) ──► write-back

Ports are flat (``m_axi_awaddr``, ``s_axil_awaddr``, ... plus ``clk`` and ``rst``) so that the emitted
Verilog matches what AXI tools and ``cocotbext.axi.AxiBus.from_prefix(dut, "m_axi")`` /
``AxiLiteBus.from_prefix(dut, "s_axil")`` expect; ``m_axi`` and ``s_axil`` give the same ports as
interface objects for Amaranth designs that wrap the accelerator (:func:`marca.hw.axi.interface_view`).
"""

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from marca import isa
from marca.config import MarcaConfig
from marca.isa import Buffer, Opcode
from marca.ops import ArrayMode

from .axi import AXI4LiteSignature, AXI4Signature, SkidBuffer, flat_members, interface_view
from .buffers import LineBuffer, WriteArbiter
from .controller import COUNTERS, Controller, InstructionFetch
from .engine import ComputeEngine, check_accelerator_config
from .csr import CSRFile
from .dma import DMA
from .nonlinear import FunctionLane
from .pe_array import PEArray

__all__ = ["Accelerator", "CSR_ADDR_WIDTH", "DMA_ID", "FETCH_ID"]

CSR_ADDR_WIDTH = 12
DMA_ID = 0
FETCH_ID = 1


class Accelerator(wiring.Component):
    """The whole accelerator for one :class:`~marca.config.MarcaConfig`.

    Ports
    -----
    m_axi_* : the AXI4 manager (data and instruction fetch), ``axi_data_width`` bits, ID width 1.
    s_axil_* : the AXI4-Lite subordinate with the CSRs of :mod:`marca.hw.csr` (12 address bits).
    irq : Out(1)
        High while ``done`` (the last run ended) and not busy.

    ``_fault`` builds a deliberately broken variant for tests (see :class:`ComputeEngine`).
    """

    def __init__(self, config: MarcaConfig, *, _fault: str | None = None):
        self._MustUse__silence = True     # a rejected configuration must not also warn 'never used'
        check_accelerator_config(config)
        if _fault not in (None, "no_scoreboard"):
            raise ValueError(f"_fault must be None or 'no_scoreboard', not {_fault!r}")
        self._fault = _fault
        self.config = config
        self.axi_signature = AXI4Signature(addr_width=config.axi_addr_width, data_width=config.axi_data_width)
        self.axil_signature = AXI4LiteSignature(addr_width=CSR_ADDR_WIDTH, data_width=32)
        self.line_widths = {b: max(1, (isa.buffer_lines(config, b) - 1).bit_length()) for b in Buffer}
        super().__init__({
            **flat_members("m_axi", self.axi_signature),
            **flat_members("s_axil", self.axil_signature.flip()),
            "irq": Out(1),
        })
        self._MustUse__silence = False

    @property
    def m_axi(self):
        return interface_view(self, "m_axi", self.axi_signature)

    @property
    def s_axil(self):
        return interface_view(self, "s_axil", self.axil_signature.flip())

    def elaborate(self, platform):
        m = Module()
        config = self.config
        line_width = max(self.line_widths.values())

        m.submodules.csr = csr = CSRFile(program_address_width=config.axi_addr_width, counters=COUNTERS,
                                         error_code_width=4, bus_addr_width=CSR_ADDR_WIDTH)
        m.submodules.fetch = fetch = InstructionFetch(addr_width=config.axi_addr_width,
                                                      data_width=config.axi_data_width, axi_id=FETCH_ID)
        m.submodules.dma = dma = DMA(addr_width=config.axi_addr_width, data_width=config.axi_data_width,
                                     storage_format=config.storage_format, compute_format=config.compute_format,
                                     lanes=config.lanes, line_width=line_width, axi_id=DMA_ID)
        m.submodules.array = array = PEArray(rows=config.array_rows, cols=config.array_cols,
                                             fmt=config.compute_format,
                                             lane_extension=FunctionLane.factory(config))
        m.submodules.engine = engine = ComputeEngine(
            config=config, array_layouts=array.layouts, function_bits=array.function_bits,
            array_latency=max(array.linear_latency, array.elementwise_latency), line_widths=self.line_widths,
            _fault=self._fault)
        m.submodules.controller = controller = Controller(config=config, dma_layout=dma.command_layout)

        # Host side.
        wiring.connect(m, wiring.flipped(self.s_axil), csr.bus)
        m.d.comb += [
            controller.start.eq(csr.start), controller.soft_reset.eq(csr.soft_reset),
            controller.program_address.eq(csr.program_address),
            csr.busy.eq(controller.busy), csr.done.eq(controller.done), csr.error_code.eq(controller.error_code),
            csr.error_pc.eq(controller.error_pc),
        ]
        # From the CSRs' registered STATUS: the counters are complete when it rises.
        m.d.comb += self.irq.eq(csr.irq)

        # Controller to units.
        wiring.connect(m, fetch.instruction, controller.instruction)
        m.d.comb += [fetch.start.eq(controller.fetch_start), fetch.stop.eq(controller.fetch_stop),
                     fetch.address.eq(controller.program_address), controller.fetch_idle.eq(fetch.idle)]
        wiring.connect(m, controller.dma_command, dma.command)
        m.d.comb += [controller.dma_busy.eq(dma.busy), controller.dma_done.eq(dma.done),
                     controller.dma_error.eq(dma.error), controller.dma_index_error.eq(dma.index_error),
                     dma.abort.eq(controller.dma_abort)]
        wiring.connect(m, controller.compute_command, engine.command)
        m.d.comb += [controller.compute_idle.eq(engine.idle), engine.abort.eq(controller.compute_abort)]
        wiring.connect(m, engine.array_in, array.i)
        wiring.connect(m, array.o, engine.array_out)

        # Buffers: read ports a, b, c (compute engine) and 3 (DMA); one write port behind an arbiter.
        buffers = {}
        for buffer in Buffer:
            name = buffer.name.lower()
            unit = LineBuffer(lines=isa.buffer_lines(config, buffer), lanes=config.lanes,
                              element_width=config.compute_format.width, read_ports=4)
            m.submodules[f"buffer_{name}"] = buffers[buffer] = unit
            reads = getattr(engine, f"reads_{name}")
            for position in range(3):
                wiring.connect(m, reads[position], unit.read[position])
            selected = dma.buffer == int(buffer)
            width = self.line_widths[buffer]
            read = unit.read[3]
            m.d.comb += [read.addr.eq(dma.buffer_read.addr[:width]), read.en.eq(dma.buffer_read.en & selected)]
            if buffer == Buffer.WEIGHT:
                write = unit.write
                m.d.comb += [write.addr.eq(dma.buffer_write.addr[:width]), write.data.eq(dma.buffer_write.data),
                             write.en.eq(Mux(selected, dma.buffer_write.en, 0))]
                dma_ready = write.ready
            else:
                arbiter = WriteArbiter(addr_width=width, data_width=config.lanes * config.compute_format.width,
                                       elements=config.lanes)
                m.submodules[f"arbiter_{name}"] = arbiter
                request = arbiter.requests[0]
                m.d.comb += [request.addr.eq(dma.buffer_write.addr[:width]), request.data.eq(dma.buffer_write.data),
                             request.en.eq(Mux(selected, dma.buffer_write.en, 0))]
                dma_ready = request.ready
                wiring.connect(m, getattr(engine, f"writes_{name}"), arbiter.requests[1])
                wiring.connect(m, arbiter.grant, unit.write)
            with m.If(selected):
                m.d.comb += [dma.buffer_read.data.eq(read.data), dma.buffer_write.ready.eq(dma_ready)]

        # AXI4: the DMA owns AW/W/B; AR is shared with fetch (held while a request waits), R goes by RID.
        bus = self.m_axi
        for name in ("awid", "awaddr", "awlen", "awsize", "awburst", "awvalid", "wdata", "wstrb", "wlast",
                     "wvalid", "bready"):
            m.d.comb += getattr(bus, name).eq(getattr(dma.axi, name))
        for name in ("awready", "wready", "bid", "bresp", "bvalid"):
            m.d.comb += getattr(dma.axi, name).eq(getattr(bus, name))
        # AR goes through a two-entry register slice (a skid buffer) with a registered grant, so that
        # neither requester's ARREADY depends on the bus or on the other requester in the same cycle, and
        # the bus's ARVALID/AR* leave from flip-flops. The grant stays with a requester whose request is
        # still waiting, moves to the other one when only it waits, and stays put when neither does.
        ar_names = ("arid", "araddr", "arlen", "arsize", "arburst")
        ar_width = sum(len(getattr(bus, name)) for name in ar_names)
        grant_fetch = Signal()
        ar_slice = SkidBuffer(m, "ar_slice", {"request": ar_width})
        m.d.comb += [fetch.axi.arready.eq(ar_slice.in_ready & grant_fetch),
                     dma.axi.arready.eq(ar_slice.in_ready & ~grant_fetch)]
        fetch_fire = fetch.axi.arvalid & fetch.axi.arready
        dma_fire = dma.axi.arvalid & dma.axi.arready
        m.d.comb += [ar_slice.in_valid.eq(fetch_fire | dma_fire),
                     ar_slice.i["request"].eq(Mux(grant_fetch, Cat(*(getattr(fetch.axi, name) for name in ar_names)),
                                                Cat(*(getattr(dma.axi, name) for name in ar_names)))),
                     ar_slice.out_ready.eq(bus.arready)]
        fetch_waits = fetch.axi.arvalid & ~fetch_fire
        dma_waits = dma.axi.arvalid & ~dma_fire
        with m.If(fetch_waits & ~dma_waits):
            m.d.sync += grant_fetch.eq(1)
        with m.Elif(dma_waits & ~fetch_waits):
            m.d.sync += grant_fetch.eq(0)
        m.d.comb += [Cat(*(getattr(bus, name) for name in ar_names)).eq(ar_slice.o["request"]),
                     bus.arvalid.eq(ar_slice.out_valid)]
        for unit, identity in ((fetch, FETCH_ID), (dma, DMA_ID)):
            mine = bus.rid == identity
            m.d.comb += [unit.axi.rvalid.eq(bus.rvalid & mine), unit.axi.rid.eq(bus.rid),
                         unit.axi.rdata.eq(bus.rdata), unit.axi.rresp.eq(bus.rresp), unit.axi.rlast.eq(bus.rlast)]
        m.d.comb += bus.rready.eq(Mux(bus.rid == FETCH_ID, fetch.axi.rready, dma.axi.rready))

        # Counters.
        events = csr.counter_increments
        retire = controller.retire
        accepted = array.i.valid & array.i.ready
        m.d.comb += [
            csr.counting.eq(controller.running),
            events.instructions.eq(retire),
            events.load_instructions.eq(retire & ((controller.retired == Opcode.LOAD)
                                                  | (controller.retired == Opcode.GATHER))),   # docs/isa.md
            events.store_instructions.eq(retire & (controller.retired == Opcode.STORE)),
            events.linear_instructions.eq(retire & (controller.retired == Opcode.LINEAR)),
            events.elementwise_instructions.eq(retire & (controller.retired == Opcode.ELEMENTWISE)),
            events.nonlinear_instructions.eq(retire & (controller.retired == Opcode.NONLINEAR)),
            events.barrier_instructions.eq(retire & (controller.retired == Opcode.BARRIER)),
            events.fetch_bytes.eq(Mux(controller.fetched, isa.INSTRUCTION_BYTES, 0)),
            events.dma_bytes_read.eq(dma.bytes_read), events.dma_bytes_written.eq(dma.bytes_written),
            events.linear_beats.eq(engine.linear_beat), events.elementwise_beats.eq(engine.elementwise_beat),
            events.nonlinear_lines.eq(engine.nonlinear_line), events.nonlinear_beats.eq(engine.nonlinear_beat),
            events.cycles.eq(1), events.compute_busy_cycles.eq(engine.active | ~engine.idle),
            events.dma_read_busy_cycles.eq(dma.read_active), events.dma_write_busy_cycles.eq(dma.write_active),
            events.array_linear_cycles.eq(accepted & (array.i.payload.mode == ArrayMode.LINEAR)),
            events.array_elementwise_cycles.eq(accepted & (array.i.payload.mode == ArrayMode.ELEMENTWISE)),
            events.stall_fetch_cycles.eq(controller.stall_fetch),
            events.stall_dispatch_cycles.eq(controller.stall_dispatch),
            events.stall_hazard_cycles.eq(engine.hazard_stall), events.stall_array_cycles.eq(engine.array_stall),
            events.stall_write_cycles.eq(engine.write_stall),
        ]
        return m
