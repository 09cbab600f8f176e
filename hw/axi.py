"""AXI4 and AXI4-Lite signatures, seen from the manager (master) side.

The members carry the AMBA names without the channel prefix's separator (``awaddr``, ``wdata``, ...), so a
component that exposes a bus as ``m_axi`` gets flat port names the way the top level wants them (see
:func:`flat_members` and :func:`interface_view`): ``m_axi_awaddr``, ``m_axi_wdata``, ... which is what
``cocotbext.axi.AxiBus.from_prefix(dut, "m_axi")`` and the usual IP-packaging tools look for.

Only the signals this design uses are present: INCR bursts (``axsize`` is always the full bus width),
a single ID, no locks, caches, QoS or user signals (AXI slaves treat the absent ones as their defaults).

:class:`SkidBuffer` is the register slice the design puts on its AXI channels (and other ready/valid
boundaries) so that no combinational path crosses a unit.
"""

from amaranth.hdl import Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["AXIResponse", "AXIBurst", "AXI4Signature", "AXI4LiteSignature", "flat_members", "interface_view",
           "SkidBuffer"]


class AXIResponse:
    """``xRESP`` codes."""

    OKAY = 0b00
    EXOKAY = 0b01
    SLVERR = 0b10
    DECERR = 0b11


class AXIBurst:
    """``AxBURST`` codes."""

    FIXED = 0b00
    INCR = 0b01
    WRAP = 0b10


def _check_width(name, value, allowed):
    if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, not {value!r}")


class AXI4Signature(wiring.Signature):
    """AXI4 manager interface: five channels, INCR bursts of full-width beats.

    Parameters
    ----------
    addr_width : int
        Address bits (16..64).
    data_width : int
        Data bits per beat (32..1024, a power of two).
    id_width : int
        Transaction ID bits (the manager always drives ID 0).
    """

    def __init__(self, *, addr_width: int, data_width: int, id_width: int = 1):
        _check_width("addr_width", addr_width, range(16, 65))
        _check_width("data_width", data_width, {32, 64, 128, 256, 512, 1024})
        _check_width("id_width", id_width, range(1, 17))
        self.addr_width = addr_width
        self.data_width = data_width
        self.id_width = id_width
        super().__init__({
            "awid": Out(id_width), "awaddr": Out(addr_width), "awlen": Out(8), "awsize": Out(3),
            "awburst": Out(2), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(data_width), "wstrb": Out(data_width // 8), "wlast": Out(1), "wvalid": Out(1),
            "wready": In(1),
            "bid": In(id_width), "bresp": In(2), "bvalid": In(1), "bready": Out(1),
            "arid": Out(id_width), "araddr": Out(addr_width), "arlen": Out(8), "arsize": Out(3),
            "arburst": Out(2), "arvalid": Out(1), "arready": In(1),
            "rid": In(id_width), "rdata": In(data_width), "rresp": In(2), "rlast": In(1), "rvalid": In(1),
            "rready": Out(1),
        })

    def __eq__(self, other):
        return (type(other) is type(self) and (self.addr_width, self.data_width, self.id_width) ==
                (other.addr_width, other.data_width, other.id_width))

    def __repr__(self):
        return (f"AXI4Signature(addr_width={self.addr_width}, data_width={self.data_width}, "
                f"id_width={self.id_width})")


class AXI4LiteSignature(wiring.Signature):
    """AXI4-Lite manager interface (flip it for a subordinate such as the CSR file).

    Parameters
    ----------
    addr_width : int
        Address bits (4..64).
    data_width : int
        32 or 64.
    """

    def __init__(self, *, addr_width: int, data_width: int = 32):
        _check_width("addr_width", addr_width, range(4, 65))
        _check_width("data_width", data_width, {32, 64})
        self.addr_width = addr_width
        self.data_width = data_width
        super().__init__({
            "awaddr": Out(addr_width), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(data_width), "wstrb": Out(data_width // 8), "wvalid": Out(1), "wready": In(1),
            "bresp": In(2), "bvalid": In(1), "bready": Out(1),
            "araddr": Out(addr_width), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
            "rdata": In(data_width), "rresp": In(2), "rvalid": In(1), "rready": Out(1),
        })

    def __eq__(self, other):
        return (type(other) is type(self) and
                (self.addr_width, self.data_width) == (other.addr_width, other.data_width))

    def __repr__(self):
        return f"AXI4LiteSignature(addr_width={self.addr_width}, data_width={self.data_width})"


def flat_members(prefix: str, signature: wiring.Signature) -> dict:
    """Members ``{prefix}_{name}`` of a signature, for a top level whose Verilog ports must be flat.

    Amaranth joins nested member names with ``__``; a bus exposed as ``m_axi`` would give
    ``m_axi__awaddr``. Exposing the members flat gives ``m_axi_awaddr``, the name AXI tools expect.
    ``signature`` is given as the component sees it (flip it for a subordinate port).
    """
    members = {}
    for name, member in signature.members.items():
        if not member.is_port:
            raise ValueError(f"signature member {name!r} must be a port for flat_members")
        members[f"{prefix}_{name}"] = member.flow(member.shape)
    return members


class _InterfaceView:
    """An interface object whose members are a component's flat ports (see :func:`interface_view`)."""

    def __init__(self, signature, members):
        self.signature = signature
        for name, value in members.items():
            setattr(self, name, value)


def interface_view(component: wiring.Component, prefix: str, signature: wiring.Signature):
    """The flat ports ``{prefix}_*`` of ``component`` as one interface object of ``signature``.

    Lets code inside (and around) the component use ``wiring.connect`` on a flat bus.
    """
    return _InterfaceView(signature, {name: getattr(component, f"{prefix}_{name}")
                                      for name in signature.members})


class SkidBuffer:
    """A two-entry pipeline register whose outputs are all flip-flops: ``in_ready`` (a registered ready),
    ``out_valid`` and the payload ``o``. It passes one transfer per cycle while the consumer is ready;
    the consumer's ``out_ready`` only moves the skid buffer's own registers, and ``in_valid`` / ``i`` only
    reach its data inputs, so no combinational path crosses it. Fields named in ``clear_when_empty`` read
    zero while ``out_valid`` is low (write enables). Used as the register slice on AXI channels (the
    DMA's, the accelerator's shared AR) and on the DMA's line-write port.
    """

    def __init__(self, m, name, fields, *, clear_when_empty=()):
        self.in_valid = Signal(name=f"{name}_in_valid")
        self.in_ready = Signal(name=f"{name}_in_ready")
        self.out_valid = Signal(name=f"{name}_out_valid")
        self.out_ready = Signal(name=f"{name}_out_ready")
        self.i = {key: Signal(width, name=f"{name}_in_{key}") for key, width in fields.items()}
        self.o = {key: Signal(width, name=f"{name}_out_{key}") for key, width in fields.items()}
        skid_valid = Signal(name=f"{name}_skid_valid")
        skid = {key: Signal(width, name=f"{name}_skid_{key}") for key, width in fields.items()}
        self.empty = Signal(name=f"{name}_empty")
        m.d.comb += [self.in_ready.eq(~skid_valid), self.empty.eq(~self.out_valid & ~skid_valid)]
        with m.If(~self.out_valid | self.out_ready):
            with m.If(skid_valid):
                m.d.sync += [self.out_valid.eq(1), skid_valid.eq(0)]
                m.d.sync += [self.o[key].eq(skid[key]) for key in fields]
            with m.Else():
                m.d.sync += self.out_valid.eq(self.in_valid)
                m.d.sync += [self.o[key].eq(Mux(self.in_valid, self.i[key], 0)) for key in clear_when_empty]
                with m.If(self.in_valid):
                    m.d.sync += [self.o[key].eq(self.i[key]) for key in fields if key not in clear_when_empty]
        with m.Elif(self.in_valid & ~skid_valid):
            m.d.sync += skid_valid.eq(1)
            m.d.sync += [skid[key].eq(self.i[key]) for key in fields]
