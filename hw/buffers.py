"""On-chip buffers: line-organised memories that feed the PE array one full line per cycle per operand.

A buffer holds ``lines`` lines of ``lanes`` compute-format elements (one line = one operand field of the
PE array, ``array_rows * array_cols`` elements). It is split into ``banks`` memories by lane group: bank
``k`` holds elements ``k * lanes / banks`` .. ``(k + 1) * lanes / banks - 1`` of every line, all banks
share the line address. Splitting keeps each physical memory a width that block RAMs map to, and the
element-granular write enables let the DMA fill a line a bus beat at a time without a read-modify-write.

Every buffer has ``read_ports`` independent read ports (the PE array's operands ``a``, ``b``, ``c`` and the
DMA's store path each get their own, so no operand ever waits for another) and one write port shared by
the DMA and the PE array's results; :class:`WriteArbiter` alternates between the two when both want it.
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

__all__ = ["LineBuffer", "WritePortSignature", "ReadPortSignature", "WriteArbiter"]


class ReadPortSignature(wiring.Signature):
    """A synchronous line read: ``data`` holds line ``addr`` one cycle after ``en`` was high.

    Members (requester's view): ``addr`` Out, ``en`` Out, ``data`` In.
    """

    def __init__(self, *, addr_width: int, data_width: int):
        super().__init__({"addr": Out(addr_width), "en": Out(1), "data": In(data_width)})


class WritePortSignature(wiring.Signature):
    """A line write with one enable per element, with back-pressure.

    Members (requester's view): ``addr``, ``data``, ``en`` (one bit per element) Out; ``ready`` In. A write
    happens in a cycle where ``en`` is non-zero and ``ready`` is high.
    """

    def __init__(self, *, addr_width: int, data_width: int, elements: int):
        super().__init__({"addr": Out(addr_width), "data": Out(data_width), "en": Out(elements),
                          "ready": In(1)})


def _check_positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


class LineBuffer(wiring.Component):
    """A banked line memory.

    Parameters
    ----------
    lines : int
        Number of lines (a power of two).
    lanes : int
        Elements per line.
    element_width : int
        Bits per element (the compute format's width).
    read_ports : int
        Number of read ports.
    banks : int
        Lane groups (divides ``lanes``).

    Ports
    -----
    read[k] : In(ReadPortSignature)
        Read port ``k``; latency 1, not transparent (a read in the cycle of a write to the same line
        returns the old contents; the controller never does that, see docs/shell.md).
    write : In(WritePortSignature)
        Always ``ready``. A read sees every write taken in an earlier cycle. Buffers of more than
        ``DISTRIBUTED_MAX_LINES`` lines are block RAM with the write registered inside (it lands a cycle
        late, and the reads are transparent for it, which looks the same from outside); smaller ones are
        LUT RAM written directly (see docs/shell.md).
    """

    def __init__(self, *, lines: int, lanes: int, element_width: int, read_ports: int = 1, banks: int = 1):
        self._MustUse__silence = True     # a rejected parameter must not also warn 'never used'
        _check_positive("lines", lines)
        if lines & (lines - 1):
            raise ValueError(f"lines must be a power of two, not {lines!r}")
        _check_positive("lanes", lanes)
        _check_positive("element_width", element_width)
        _check_positive("read_ports", read_ports)
        _check_positive("banks", banks)
        if lanes % banks:
            raise ValueError(f"banks must divide lanes ({lanes}), not {banks!r}")
        self.lines = lines
        self.lanes = lanes
        self.element_width = element_width
        self.banks = banks
        self.addr_width = max(1, ceil_log2(lines))
        line_width = lanes * element_width
        super().__init__({
            "read": In(ReadPortSignature(addr_width=self.addr_width, data_width=line_width)).array(read_ports),
            "write": In(WritePortSignature(addr_width=self.addr_width, data_width=line_width, elements=lanes)),
        })
        self._MustUse__silence = False

    # Buffers of at most this many lines are built from LUT RAM (``ram_style = "distributed"``), larger
    # ones from block RAM: a block RAM is 256-bit-wide lines x 1 read port = 8 DP16KD however shallow, while
    # 16 x 4-bit LUT RAM cells cost in proportion to the depth (32 lines x 256 bits x 4 ports = 512 cells).
    DISTRIBUTED_MAX_LINES = 32

    def elaborate(self, platform):
        m = Module()
        per_bank = self.lanes // self.banks
        bank_width = per_bank * self.element_width
        distributed = self.lines <= self.DISTRIBUTED_MAX_LINES
        m.d.comb += self.write.ready.eq(1)
        if distributed:
            # LUT RAM reads asynchronously into a register, so a read that collides with a write returns
            # the old contents by itself: the write goes straight in.
            write_addr, write_data, write_en = self.write.addr, self.write.data, self.write.en
        else:
            # Block RAM leaves a read that collides with a write on the other port undefined, so Yosys
            # would delay the write by a cycle and add a bypass to give the old contents. Here the write
            # is registered (it lands one cycle late) and the read ports are transparent for it: to the
            # ports that is the same as an immediate write with non-transparent reads (a read sees every
            # write taken in an earlier cycle, none taken in its own cycle), at the same cost as Yosys's
            # version, but the write port's requesters (arbiter, DMA, compute engine) now end at these
            # flip-flops instead of running on into the bypass compare and the block RAM's inputs.
            write_addr = Signal(self.addr_width, name="staged_addr")
            write_data = Signal(self.lanes * self.element_width, name="staged_data")
            write_en = Signal(self.lanes, name="staged_en")
            m.d.sync += [write_addr.eq(self.write.addr), write_data.eq(self.write.data),
                         write_en.eq(self.write.en)]
        for bank in range(self.banks):
            memory = Memory(shape=bank_width, depth=self.lines, init=[],
                            attrs={"ram_style": "distributed" if distributed else "block"})
            m.submodules[f"bank{bank}"] = memory
            write = memory.write_port(granularity=self.element_width)
            bits = slice(bank * bank_width, (bank + 1) * bank_width)
            m.d.comb += [
                write.addr.eq(write_addr),
                write.data.eq(write_data[bits]),
                write.en.eq(write_en[bank * per_bank:(bank + 1) * per_bank]),
            ]
            for port in self.read:
                read = memory.read_port(transparent_for=() if distributed else [write])
                m.d.comb += [read.addr.eq(port.addr), read.en.eq(port.en), port.data[bits].eq(read.data)]
        return m


class WriteArbiter(wiring.Component):
    """Shares one buffer write port between two requesters, alternating when both want it.

    The port belongs to one requester at a time (the *owner*, a register): only the owner's request goes
    to the buffer and only the owner sees ``ready``, so ``ready`` and the select of the line-wide
    multiplexer come straight from that register, not from the other requester's ``en`` in the same
    cycle. Ownership passes to the other requester after a cycle in which it waited and the owner either
    wrote or did not want the port: when both keep writing they alternate every cycle (no cycle of the
    port is lost); a requester that starts writing while the other owns the idle port waits one cycle.
    A requester must not make ``en`` wait on ``ready`` (it never would be granted).

    Ports
    -----
    requests[k] : In(WritePortSignature)
        Requester ``k`` (``ready`` is high in the cycle its write is taken).
    grant : Out(WritePortSignature)
        To the buffer.
    """

    def __init__(self, *, addr_width: int, data_width: int, elements: int):
        signature = WritePortSignature(addr_width=addr_width, data_width=data_width, elements=elements)
        super().__init__({"requests": In(signature).array(2), "grant": Out(signature)})

    def elaborate(self, platform):
        m = Module()
        first, second = self.requests
        owner_second = Signal()
        with m.If(owner_second):
            m.d.comb += [self.grant.addr.eq(second.addr), self.grant.data.eq(second.data),
                         self.grant.en.eq(second.en), second.ready.eq(self.grant.ready)]
        with m.Else():
            m.d.comb += [self.grant.addr.eq(first.addr), self.grant.data.eq(first.data),
                         self.grant.en.eq(first.en), first.ready.eq(self.grant.ready)]
        wants_first, wants_second = first.en.any(), second.en.any()
        owner_wants = Mux(owner_second, wants_second, wants_first)
        other_wants = Mux(owner_second, wants_first, wants_second)
        with m.If(other_wants & (~owner_wants | self.grant.ready)):
            m.d.sync += owner_second.eq(~owner_second)
        return m
