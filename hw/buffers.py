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

from amaranth.hdl import Module, Signal
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
        Always ``ready``.
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

    def elaborate(self, platform):
        m = Module()
        per_bank = self.lanes // self.banks
        bank_width = per_bank * self.element_width
        m.d.comb += self.write.ready.eq(1)
        for bank in range(self.banks):
            memory = Memory(shape=bank_width, depth=self.lines, init=[])
            m.submodules[f"bank{bank}"] = memory
            write = memory.write_port(granularity=self.element_width)
            bits = slice(bank * bank_width, (bank + 1) * bank_width)
            m.d.comb += [
                write.addr.eq(self.write.addr),
                write.data.eq(self.write.data[bits]),
                write.en.eq(self.write.en[bank * per_bank:(bank + 1) * per_bank]),
            ]
            for port in self.read:
                read = memory.read_port()
                m.d.comb += [read.addr.eq(port.addr), read.en.eq(port.en), port.data[bits].eq(read.data)]
        return m


class WriteArbiter(wiring.Component):
    """Shares one buffer write port between two requesters, alternating priority when both want it.

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
        prefer_second = Signal()
        wants = [first.en.any(), second.en.any()]
        take_second = Signal()
        m.d.comb += take_second.eq(wants[1] & (~wants[0] | prefer_second))
        chosen_ready = self.grant.ready
        with m.If(take_second):
            m.d.comb += [self.grant.addr.eq(second.addr), self.grant.data.eq(second.data),
                         self.grant.en.eq(second.en), second.ready.eq(chosen_ready)]
        with m.Else():
            m.d.comb += [self.grant.addr.eq(first.addr), self.grant.data.eq(first.data),
                         self.grant.en.eq(first.en), first.ready.eq(chosen_ready)]
        with m.If(wants[0] & wants[1] & chosen_ready):
            m.d.sync += prefer_second.eq(~take_second)
        return m
