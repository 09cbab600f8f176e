"""DMA engine: 2-D strided transfers between memory (AXI4 manager, INCR bursts) and the line buffers, with
storage <-> compute format conversion.

A transfer moves ``rows`` rows of ``row_elements`` elements. Row ``r`` lies in memory at byte address
``address + r * row_stride`` (storage format, ``storage_bytes`` per element, element-aligned) and in the
buffer at element position ``(line, position) + r * (row_step_lines, row_step_position)`` where a buffer
position counts ``lanes`` elements per line (carrying from ``position`` into ``line``). Element ``j`` of a
row follows element ``j - 1`` in both places (the buffer side carries into the next line).

Loads convert every element from the storage to the compute format, stores from compute to storage
(:class:`marca.hw.fp.FloatConvert`, the contract's ``convert``; equal formats canonicalise). Buffer
elements outside the transferred rows are left untouched (element write enables), and memory bytes outside
them too (write strobes).

How it runs at one beat per cycle
---------------------------------
Each direction has an *address side* and a *data side* that walk the same rows independently:

* the address side issues bursts: beat-aligned, at most 256 beats, never crossing a 4 KiB boundary;
  reads are kept at most ``max_outstanding_beats`` ahead of the data;
* the data side follows beat by beat. A beat's ``K = data_width / (8 * storage_bytes)`` elements land in
  the buffer at a running position ``(L, p)``: element ``q`` goes to lane ``p + q`` of a two-line window
  (lane masks decided a stage early, the data by a K-way rotation per lane); the part in the first line
  merges into a line accumulator, which is written when the window passes the end of its line (or at the
  end of the row), the part in the second line starts the next accumulation. So a load writes each
  buffer line about once, leaving the shared write port free for the PE array most of the time. Stores
  read lines ahead into a three-line queue and cut each beat out of its first two (then register it).

Every boundary is a flip-flop (for timing closure, docs/shell.md): AR, AW, W, R and the line-write port
pass through two-entry skid buffers with registered ready (``SkidBuffer``), B is registered, and
``done``/``bytes_read``/``bytes_written`` come from registers. No combinational path runs from an input
of the DMA to an output or deep into its logic; the pipelines keep one beat per cycle.

Gather (the ISA's ``GATHER``)
----------------------------
A load command with ``gather`` set reads, before each row ``r``, the uint32 id at ``index_address + 4r``
(one single-beat read on the same AR/R channels, issued as soon as the previous row's bursts are issued),
checks ``id < table_rows`` and takes ``address + id * row_stride`` as the row's memory address (three
register stages: word select, compare and multiply, add); then the row runs as a load row. An id outside
the table sets ``index_error`` (sticky until the next command) and ends the transfer like an error; a
row's bursts wait for its id, so a gather costs about one memory round trip per row more than a load.

Errors and abort
----------------
An ``xRESP`` other than OKAY sets ``error`` (sticky until the next command) and stops issuing bursts; every
burst already issued still completes (all its R beats taken, all its W beats sent, its B taken) so the bus
is left clean. ``abort`` does the same without an error. ``done`` pulses when the transfer (or the drain)
is finished; ``busy`` is high from the accepted command until then.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from marca import isa
from marca.formats import FloatFormat

from .axi import AXI4Signature, AXIBurst, AXIResponse, SkidBuffer
from .buffers import ReadPortSignature, WritePortSignature
from .fp import FloatConvert

__all__ = ["DMA", "dma_command_layout", "MEMORY_FORMATS"]

_MAX_BURST_BEATS = 256
_BOUNDARY_BYTES = 4096
_TABLE_ROWS_WIDTH = next(f.width for f in isa.field_layout(isa.Opcode.GATHER) if f.name == "table_rows")
_INDEX_BITS = 8 * isa.INDEX_BYTES


def dma_command_layout(*, addr_width: int, line_width: int, position_width: int, buffer_width: int,
                       count_width: int = 16) -> data.StructLayout:
    """Payload of a DMA command (see the module docstring for the meaning of each field; ``gather``,
    ``index_address`` and ``table_rows`` only matter for a gather, a load)."""
    return data.StructLayout({
        "store": 1,
        "gather": 1,
        "index_address": addr_width,
        "table_rows": _TABLE_ROWS_WIDTH,
        "memory_format": 1,
        "buffer": buffer_width,
        "address": addr_width,
        "row_stride": addr_width,
        "rows": count_width,
        "row_elements": count_width,
        "line": line_width,
        "position": position_width,
        "row_step_lines": line_width,
        "row_step_position": position_width,
    })


def _any(terms):
    result = Const(0, 1)
    for term in terms:
        result = result | term
    return result


def _popcount(value):
    total = Const(0, 1)
    for bit in value:
        total = total + bit
    return total


class _RowWalker:
    """Registers that walk the rows of a transfer: current row's address, buffer position and count."""

    def __init__(self, m, name, command, *, addr_width, line_width, position_width, count_width, lanes):
        self.address = Signal(addr_width, name=f"{name}_address")
        self.line = Signal(line_width, name=f"{name}_line")
        self.position = Signal(position_width, name=f"{name}_position")
        self.rows_left = Signal(count_width, name=f"{name}_rows_left")
        self._command = command
        self._lanes = lanes
        self._m = m

    def load(self, command):
        return [self.address.eq(command.address), self.line.eq(command.line),
                self.position.eq(command.position), self.rows_left.eq(command.rows)]

    def advance(self):
        command = self._command
        position_sum = Signal(len(self.position) + 1, name=f"{self.address.name}_position_sum")
        self._m.d.comb += position_sum.eq(self.position + command.row_step_position)
        carry = position_sum >= self._lanes
        return [self.address.eq(self.address + command.row_stride),
                self.position.eq(Mux(carry, position_sum - self._lanes, position_sum)),
                self.line.eq(self.line + command.row_step_lines + carry),
                self.rows_left.eq(self.rows_left - 1)]


class _DMAEngine(wiring.Component):
    """AXI4 DMA between memory (one memory-side format, ``storage_format``) and line buffers (compute
    format). :class:`DMA` holds one engine per memory format; the command's ``memory_format`` is ignored
    here.

    Parameters
    ----------
    addr_width, data_width : int
        AXI4 address and data widths.
    storage_format, compute_format : FloatFormat
    lanes : int
        Elements per buffer line (``array_rows * array_cols``); at least one beat's worth of elements.
    line_width : int
        Bits of a buffer line address.
    buffer_width : int
        Bits of the buffer select (passed through on ``buffer``).
    count_width : int
        Bits of ``rows`` and ``row_elements``.
    max_outstanding_beats : int
        Read beats requested but not yet received, at most; at least the longest burst
        (``min(256, 4096 / beat bytes)``), since a read burst is issued only while no more than
        ``max_outstanding_beats`` minus that are outstanding.
    axi_id : int
        ARID/AWID of this engine's bursts.

    Ports
    -----
    command : In(stream.Signature(dma_command_layout(...)))
        Accepted only while idle. ``rows`` and ``row_elements`` must be at least 1 (the controller
        checks). Memory addresses are taken modulo ``storage_bytes`` alignment (low bits ignored).
    axi : Out(AXI4Signature)
        Read channels carry ``axi_id`` (an outside mux may share them with instruction fetch by ID).
    buffer : Out(buffer_width)
        The buffer of the current command.
    buffer_write : Out(WritePortSignature)
        Line writes of loads, from a skid buffer (``addr``, ``data``, ``en`` are flip-flops; ``en`` never
        waits on ``ready``).
    buffer_read : Out(ReadPortSignature)
        Line reads of stores (data one cycle after ``en``; ``addr`` a flip-flop, ``en`` two gates from
        flip-flops).
    busy, done, error : Out(1)
        See the module docstring. ``error`` stays high from the failing response until the next command.
        ``done`` pulses one gate after a registered "finished" (a cycle after the last beat settles).
    index_error : Out(1)
        A gather read an id ``>= table_rows`` (a register, high from then until the next command).
    abort : In(1)
        Stop issuing bursts, drain, finish with ``done``.
    bytes_read, bytes_written : Out(...)
        Per-cycle counts of element bytes read from / written to memory (for the counters), registered: a
        cycle after the beat, always before ``done``.
    read_active, write_active : Out(1)
        A load / store is in progress (for the per-unit busy counters).
    """

    def __init__(self, *, addr_width: int, data_width: int, storage_format: FloatFormat,
                 compute_format: FloatFormat, lanes: int, line_width: int, buffer_width: int = 2,
                 count_width: int = 16, max_outstanding_beats: int = 512, axi_id: int = 0):
        self._MustUse__silence = True     # a rejected parameter must not also warn 'never used'
        for name, value in (("storage_format", storage_format), ("compute_format", compute_format)):
            if not isinstance(value, FloatFormat):
                raise ValueError(f"{name} must be a FloatFormat, not {value!r}")
        for name, value in (("lanes", lanes), ("line_width", line_width), ("buffer_width", buffer_width),
                            ("count_width", count_width), ("max_outstanding_beats", max_outstanding_beats)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        self.axi_signature = AXI4Signature(addr_width=addr_width, data_width=data_width)
        self.storage_format = storage_format
        self.compute_format = compute_format
        self.storage_bytes = (storage_format.width + 7) // 8
        if self.storage_bytes & (self.storage_bytes - 1):
            raise ValueError(f"storage_format must be 1, 2 or 4 bytes wide, not {storage_format!r}")
        self.beat_bytes = data_width // 8
        if self.storage_bytes > self.beat_bytes:
            raise ValueError(f"data_width ({data_width}) must hold at least one storage element")
        self.elements_per_beat = self.beat_bytes // self.storage_bytes
        if lanes < self.elements_per_beat:
            raise ValueError(f"lanes must be at least the elements per bus beat "
                             f"({self.elements_per_beat}), not {lanes!r}")
        self.addr_width = addr_width
        self.data_width = data_width
        self.lanes = lanes
        self.line_width = line_width
        self.position_width = max(1, ceil_log2(lanes))
        self.count_width = count_width
        burst_limit = min(_MAX_BURST_BEATS, _BOUNDARY_BYTES // self.beat_bytes)
        if max_outstanding_beats < burst_limit:
            raise ValueError(f"max_outstanding_beats must be at least the longest burst ({burst_limit} beats), "
                             f"not {max_outstanding_beats!r}")
        self.max_outstanding_beats = max_outstanding_beats
        self.axi_id = axi_id
        self.command_layout = dma_command_layout(
            addr_width=addr_width, line_width=line_width, position_width=self.position_width,
            buffer_width=buffer_width, count_width=count_width)
        line_bits = lanes * compute_format.width
        super().__init__({
            "command": In(stream.Signature(self.command_layout)),
            "axi": Out(self.axi_signature),
            "buffer": Out(buffer_width),
            "buffer_write": Out(WritePortSignature(addr_width=line_width, data_width=line_bits,
                                                   elements=lanes)),
            "buffer_read": Out(ReadPortSignature(addr_width=line_width, data_width=line_bits)),
            "busy": Out(1), "done": Out(1), "error": Out(1), "index_error": Out(1), "abort": In(1),
            "bytes_read": Out(ceil_log2(self.beat_bytes + 1)),
            "bytes_written": Out(ceil_log2(self.beat_bytes + 1)),
            "read_active": Out(1), "write_active": Out(1),
        })
        self._MustUse__silence = False

    # -- helpers ---------------------------------------------------------------------------------------

    def _beats_for(self, m, name, address, row_elements):
        """(element offset of ``address`` in its beat, beats covering the row)."""
        k = self.elements_per_beat
        offset = Signal(max(1, exact_log2(k)), name=f"{name}_offset")
        if k > 1:
            m.d.comb += offset.eq(address[exact_log2(self.storage_bytes):exact_log2(self.beat_bytes)])
        beats = Signal(self.count_width + 1, name=f"{name}_beats")
        m.d.comb += beats.eq((offset + row_elements + k - 1) >> exact_log2(k))
        return offset, beats

    def _burst_beats(self, m, name, address, beats_left):
        """(beats of the next burst at beat-aligned ``address`` with ``beats_left`` beats to go, whether
        that burst takes them all)."""
        shift = exact_log2(self.beat_bytes)
        to_boundary = Signal(range(_BOUNDARY_BYTES // self.beat_bytes + 1), name=f"{name}_to_boundary")
        m.d.comb += to_boundary.eq((_BOUNDARY_BYTES >> shift) - address[shift:exact_log2(_BOUNDARY_BYTES)])
        limit = min(_MAX_BURST_BEATS, _BOUNDARY_BYTES // self.beat_bytes)
        burst = Signal(range(limit + 1), name=f"{name}_burst")
        smaller = Mux(beats_left < to_boundary, beats_left, to_boundary)
        m.d.comb += burst.eq(Mux(smaller > limit, limit, smaller))
        ends_row = Signal(name=f"{name}_ends_row")      # the burst takes all of ``beats_left``
        m.d.comb += ends_row.eq((beats_left <= to_boundary) & (beats_left <= limit))
        return burst, ends_row

    def _convert(self, m, name, values, source, target, enable, in_slot, out_slot):
        """K element converters in parallel; ``values`` packed ``in_slot`` bits apart."""
        out = Signal(self.elements_per_beat * out_slot, name=f"{name}_converted")
        for index in range(self.elements_per_beat):
            unit = FloatConvert(source=source, target=target)
            m.submodules[f"{name}_convert{index}"] = unit
            m.d.comb += [unit.a.eq(values[index * in_slot:index * in_slot + source.width]),
                         unit.enable.eq(enable),
                         out[index * out_slot:index * out_slot + target.width].eq(unit.result)]
        return out, FloatConvert.latency

    # -- elaborate -------------------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        axi = self.axi
        k = self.elements_per_beat
        lanes = self.lanes
        cw = self.compute_format.width
        slot = 8 * self.storage_bytes
        beat_shift = exact_log2(self.beat_bytes)

        command = Signal(self.command_layout)
        active = Signal()          # a command is being executed (address and data sides not both done)
        aborting = Signal()        # stop issuing; drain what was issued
        error = Signal()
        index_error = Signal()     # a gather id outside the table
        failed = Signal()          # either error: stop issuing, drain, finish
        m.d.comb += [self.buffer.eq(command.buffer), self.error.eq(error), self.busy.eq(active),
                     self.index_error.eq(index_error), failed.eq(error | index_error),
                     self.command.ready.eq(~active)]

        start = Signal()
        m.d.comb += start.eq(self.command.valid & ~active)
        with m.If(start):
            m.d.sync += [command.eq(self.command.payload), active.eq(1), aborting.eq(0), error.eq(0),
                         index_error.eq(0)]
        with m.If(active & self.abort):
            m.d.sync += aborting.eq(1)

        walker_args = dict(addr_width=self.addr_width, line_width=self.line_width,
                           position_width=self.position_width, count_width=self.count_width, lanes=lanes)

        # ================= address side (shared shape for AR and AW) =================================
        # Three steps, each from registers: row set-up (address, beats of the row), burst length (a cycle
        # later, into `burst_beats`), push into the AR/AW skid buffer. Bursts leave at most every other
        # cycle, rows every third: the data side needs at least as long for any burst of two beats or more.
        address_walker = _RowWalker(m, "issue", command, **walker_args)
        issue_row_ready = Signal()       # issue_address/issue_beats_left describe the current row
        issue_address = Signal(self.addr_width)     # beat-aligned address of the next burst
        issue_beats_left = Signal(self.count_width + 1)
        issue_done = Signal()
        burst_ready = Signal()           # burst_beats/burst_last hold the next burst
        burst_limit = min(_MAX_BURST_BEATS, _BOUNDARY_BYTES // self.beat_bytes)
        burst_beats = Signal(range(burst_limit + 1))
        burst_length = Signal(8)         # burst_beats - 1, as AxLEN
        burst_last = Signal()            # the burst ends the row
        _, row_beats = self._beats_for(m, "issue", address_walker.address, command.row_elements)
        burst, ends_row = self._burst_beats(m, "issue", issue_address, issue_beats_left)
        with m.If(active & issue_row_ready & ~burst_ready):
            m.d.sync += [burst_beats.eq(burst), burst_length.eq(burst - 1), burst_last.eq(ends_row),
                         burst_ready.eq(1)]
        # Gather: a row is set up only once its address (from its id) is in the walker.
        issue_index = Signal(self.addr_width)       # byte address of the next id to read
        id_requested = Signal()                     # the current row's id read is issued
        issue_address_known = Signal()              # address_walker.address is the current row's
        with m.If(start):
            m.d.sync += [*address_walker.load(self.command.payload), issue_row_ready.eq(0),
                         issue_done.eq(0), burst_ready.eq(0), id_requested.eq(0), issue_address_known.eq(0),
                         issue_index.eq(self.command.payload.index_address)]
        with m.Elif(active & ~issue_done & ~issue_row_ready):
            with m.If(address_walker.rows_left == 0):
                m.d.sync += issue_done.eq(1)
            with m.Elif(~command.gather | issue_address_known):
                m.d.sync += [issue_address.eq(Cat(Const(0, beat_shift), address_walker.address[beat_shift:])),
                             issue_beats_left.eq(row_beats), issue_row_ready.eq(1), burst_ready.eq(0)]

        with m.If(active & (aborting | failed)):
            m.d.sync += issue_done.eq(1)
        issue_can = Signal()
        m.d.comb += issue_can.eq(active & issue_row_ready & burst_ready & ~issue_done & ~aborting & ~failed)

        # AR and AW leave from skid buffers: AxVALID and the payload are flip-flops, and AxREADY only
        # moves the skid buffer. A burst is counted (outstanding reads; write burst length pushed to
        # `burst_fifo` for the W side) when it enters its skid buffer, so W beats never wait for AWREADY
        # and an abort still completes every burst already requested.
        request_fields = {"address": self.addr_width, "length": 8}
        read_address = SkidBuffer(m, "read_address", request_fields)
        write_address = SkidBuffer(m, "write_address", request_fields)
        m.d.comb += [axi.arid.eq(self.axi_id), axi.araddr.eq(read_address.o["address"]),
                     axi.arlen.eq(read_address.o["length"]), axi.arsize.eq(beat_shift),
                     axi.arburst.eq(AXIBurst.INCR), axi.arvalid.eq(read_address.out_valid),
                     read_address.out_ready.eq(axi.arready),
                     axi.awid.eq(self.axi_id), axi.awaddr.eq(write_address.o["address"]),
                     axi.awlen.eq(write_address.o["length"]), axi.awsize.eq(beat_shift),
                     axi.awburst.eq(AXIBurst.INCR), axi.awvalid.eq(write_address.out_valid),
                     write_address.out_ready.eq(axi.awready)]
        id_request = Signal()           # a gather's single-beat id read enters the AR skid buffer
        m.d.comb += [read_address.i["address"].eq(Mux(id_request,
                                                      Cat(Const(0, beat_shift), issue_index[beat_shift:]),
                                                      issue_address)),
                     read_address.i["length"].eq(Mux(id_request, 0, burst_length)),
                     write_address.i["address"].eq(issue_address), write_address.i["length"].eq(burst_length)]

        bursts_open = Signal(range(64))          # write bursts issued whose B has not come back
        burst_fifo = m.submodules.burst_fifo = SyncFIFO(width=9, depth=8)   # their lengths, for W
        outstanding_reads = Signal(range(self.max_outstanding_beats + _MAX_BURST_BEATS + 1))
        read_beat_taken = Signal()
        request_new = Signal()
        with m.If(~command.store):
            # Room for a burst of the longest kind, so the check needs no adder.
            room = (outstanding_reads <= self.max_outstanding_beats - burst_limit)
            m.d.comb += request_new.eq(issue_can & read_address.in_ready & room)
            m.d.comb += id_request.eq(active & command.gather & ~issue_done & ~issue_row_ready & ~id_requested
                                      & (address_walker.rows_left != 0) & ~aborting & ~failed
                                      & read_address.in_ready & room)
            m.d.comb += read_address.in_valid.eq(request_new | id_request)
        with m.Else():
            m.d.comb += request_new.eq(issue_can & write_address.in_ready & burst_fifo.w_rdy
                                       & (bursts_open < 32))
            m.d.comb += write_address.in_valid.eq(request_new)
        with m.If(request_new):
            m.d.sync += [issue_address.eq(issue_address + (burst_beats << beat_shift)),
                         issue_beats_left.eq(issue_beats_left - burst_beats), burst_ready.eq(0)]
            with m.If(burst_last):
                m.d.sync += [issue_row_ready.eq(0), *address_walker.advance(), id_requested.eq(0),
                             issue_address_known.eq(0)]
        with m.If(id_request):
            m.d.sync += [id_requested.eq(1), issue_index.eq(issue_index + isa.INDEX_BYTES)]
        m.d.sync += outstanding_reads.eq(outstanding_reads + Mux(request_new & ~command.store, burst_beats, 0)
                                         + id_request - read_beat_taken)

        # ================= load data side: R -> skid -> convert -> line accumulator -> write skid ========
        load_walker = _RowWalker(m, "load", command, **walker_args)
        load_row_ready = Signal()
        load_done = Signal()
        load_remaining = Signal(self.count_width + 2)       # elements from the beat start to the row end
        load_first = Signal()
        load_line = Signal(self.line_width)                 # line of the current beat's element 0
        load_pos = Signal(self.position_width + 1)          # its position in that line
        load_offset, _ = self._beats_for(m, "load", load_walker.address, command.row_elements)
        load_index = Signal(self.addr_width)        # byte address of the next id (its word in the beat)
        load_address_known = Signal()               # load_walker.address is the current row's (gather)
        id_pending = Signal()                       # the row's id beat is taken, its address on the way

        with m.If(start):
            m.d.sync += [*load_walker.load(self.command.payload), load_row_ready.eq(0), load_done.eq(0),
                         load_index.eq(self.command.payload.index_address), load_address_known.eq(0),
                         id_pending.eq(0)]
        with m.Elif(active & ~command.store & ~load_done & ~load_row_ready):
            with m.If(load_walker.rows_left == 0):
                m.d.sync += load_done.eq(1)
            with m.Elif(~command.gather | load_address_known):
                # Element 0 of the first beat sits `offset` elements before the row's first element.
                below = load_walker.position < load_offset
                m.d.sync += [
                    load_row_ready.eq(1), load_first.eq(1),
                    load_remaining.eq(load_offset + command.row_elements),
                    load_line.eq(load_walker.line - below),
                    load_pos.eq(load_walker.position + Mux(below, lanes, 0) - load_offset),
                ]

        with m.If(active & ~command.store & (aborting | failed)):
            m.d.sync += load_done.eq(1)

        # Element mask of the current beat.
        beat_mask = Signal(k)
        for q in range(k):
            m.d.comb += beat_mask[q].eq((~load_first | (q >= load_offset)) & (q < load_remaining))
        last_beat = Signal()
        m.d.comb += last_beat.eq(load_remaining <= k)

        # R enters a skid buffer (RREADY is a flip-flop); the engine takes beats from its registered end.
        read_data = SkidBuffer(m, "read_data", {"data": self.data_width, "error": 1})
        m.d.comb += [read_data.in_valid.eq(axi.rvalid & (axi.rid == self.axi_id)),
                     read_data.i["data"].eq(axi.rdata),
                     read_data.i["error"].eq(axi.rresp != AXIResponse.OKAY),
                     axi.rready.eq(read_data.in_ready)]

        # Conversion pipeline (stall-able, one beat per cycle).
        pipe_enable = Signal()
        r_take = Signal()    # an R beat enters the pipeline as row data
        r_drain = Signal()   # an R beat is dropped (abort/error drain)
        id_wanted = Signal()  # a gather row waits for its id beat (the next R beat)
        id_take = Signal()   # an R beat is taken as a gather id
        m.d.comb += r_drain.eq(active & ~command.store & (aborting | failed))
        m.d.comb += id_wanted.eq(active & ~command.store & command.gather & ~load_done & ~load_row_ready
                                 & (load_walker.rows_left != 0) & ~load_address_known & ~id_pending)
        m.d.comb += read_data.out_ready.eq(r_drain | (load_row_ready & pipe_enable) | id_wanted)
        m.d.comb += read_beat_taken.eq(read_data.out_valid & read_data.out_ready)
        m.d.comb += [r_take.eq(read_beat_taken & ~r_drain & load_row_ready),
                     id_take.eq(read_beat_taken & ~r_drain & ~load_row_ready)]
        with m.If(read_beat_taken & read_data.o["error"] & active):
            m.d.sync += error.eq(1)

        # Gather id -> row address, three registered stages: the id word of the beat; the range check
        # and id * row_stride (an id below table_rows fits the table_rows field); + table address. The
        # new address goes to both walkers at once (the address side waits for it, see above).
        id_word = Signal(_INDEX_BITS)
        id_valid = Signal(2)
        id_in_range = Signal()
        id_offset = Signal(self.addr_width)
        gather_address = Signal(self.addr_width)
        gather_address_valid = Signal()
        word_select = load_index[exact_log2(isa.INDEX_BYTES):beat_shift]
        m.d.sync += [id_word.eq(read_data.o["data"].word_select(word_select, _INDEX_BITS)
                                if self.beat_bytes > isa.INDEX_BYTES else read_data.o["data"][:_INDEX_BITS]),
                     id_valid[0].eq(id_take & ~read_data.o["error"]),
                     id_valid[1].eq(id_valid[0]), id_in_range.eq(id_word < command.table_rows),
                     id_offset.eq(id_word[:_TABLE_ROWS_WIDTH] * command.row_stride),
                     gather_address_valid.eq(id_valid[1] & id_in_range),
                     gather_address.eq(command.address + id_offset)]
        with m.If(id_take):
            m.d.sync += [id_pending.eq(1), load_index.eq(load_index + isa.INDEX_BYTES)]
        with m.If(active & id_valid[1] & ~id_in_range & ~error):
            m.d.sync += index_error.eq(1)
        with m.If(gather_address_valid):
            m.d.sync += [id_pending.eq(0), load_address_known.eq(1), load_walker.address.eq(gather_address),
                         issue_address_known.eq(1), address_walker.address.eq(gather_address)]
        with m.If(r_take):
            m.d.sync += [load_first.eq(0), load_remaining.eq(load_remaining - k)]
            position_next = load_pos + k
            with m.If(position_next >= lanes):
                m.d.sync += [load_pos.eq(position_next - lanes), load_line.eq(load_line + 1)]
            with m.Else():
                m.d.sync += load_pos.eq(position_next)
            with m.If(last_beat):
                m.d.sync += [load_row_ready.eq(0), *load_walker.advance(), load_address_known.eq(0)]
        bytes_read = Signal.like(self.bytes_read)
        m.d.sync += bytes_read.eq(Mux(r_take, _popcount(beat_mask) * self.storage_bytes,
                                      Mux(id_take, isa.INDEX_BYTES, 0)))
        m.d.comb += self.bytes_read.eq(bytes_read)

        converted, latency = self._convert(m, "load", read_data.o["data"], self.storage_format,
                                           self.compute_format, pipe_enable, slot, cw)
        if latency == 0:
            raise NotImplementedError("the load path expects a registered converter")
        # Where the beat lands, decided beside the converter (stage 0, from registers) and carried with it:
        # element q goes to lane (pos + q) of the two-line window [current line | next line], so lane j of
        # the current line takes element j - pos and lane j of the next line element j + lanes - pos.
        position_is = [Signal(name=f"load_position_is{j}") for j in range(lanes)]
        for j in range(lanes):
            m.d.comb += position_is[j].eq(load_pos == j)
        low_mask0 = Signal(lanes)
        high_mask0 = Signal(lanes)
        for j in range(lanes):
            m.d.comb += [
                low_mask0[j].eq(_any(beat_mask[q] & position_is[j - q] for q in range(min(k, j + 1)))),
                high_mask0[j].eq(_any(beat_mask[q] & position_is[j + lanes - q]
                                      for q in range(j + 1, k) if j + lanes - q < lanes)),
            ]
        stage_valid = Signal(latency + 1)
        stage_low = [Signal(lanes, name=f"load_low_mask{i}") for i in range(latency + 1)]
        stage_high = [Signal(lanes, name=f"load_high_mask{i}") for i in range(latency + 1)]
        stage_line = [Signal(self.line_width, name=f"load_line{i}") for i in range(latency + 1)]
        stage_rotation = [Signal(max(1, exact_log2(k)), name=f"load_rotation{i}") for i in range(latency + 1)]
        stage_last = Signal(latency + 1)
        stage_reaches_end = Signal(latency + 1)     # the beat reaches the end of its line
        m.d.comb += [stage_valid[0].eq(r_take), stage_low[0].eq(low_mask0), stage_high[0].eq(high_mask0),
                     stage_line[0].eq(load_line), stage_last[0].eq(last_beat),
                     stage_reaches_end[0].eq(load_pos + k >= lanes)]
        if k > 1:
            m.d.comb += stage_rotation[0].eq(load_pos[:exact_log2(k)])
        for i in range(latency):
            with m.If(pipe_enable):
                m.d.sync += [stage_valid[i + 1].eq(stage_valid[i]), stage_low[i + 1].eq(stage_low[i]),
                             stage_high[i + 1].eq(stage_high[i]), stage_line[i + 1].eq(stage_line[i]),
                             stage_rotation[i + 1].eq(stage_rotation[i]), stage_last[i + 1].eq(stage_last[i]),
                             stage_reaches_end[i + 1].eq(stage_reaches_end[i])]
        out_valid, low_mask, high_mask = stage_valid[latency], stage_low[latency], stage_high[latency]
        out_line, out_last, reaches_end = stage_line[latency], stage_last[latency], stage_reaches_end[latency]

        # Line accumulator. Line writes go through a skid buffer, so the buffer port's address, data and
        # enables are flip-flops and its ready only moves the skid buffer; the pipeline advances while the
        # skid buffer has room.
        accumulator = Signal(lanes * cw)
        accumulator_mask = Signal(lanes)
        accumulator_line = Signal(self.line_width)
        flush_pending = Signal()
        # rotated[r]: the element that lands on lanes j with j = r (mod k); lanes j of the current line
        # and of the next line take rotated[j mod k] and rotated[(j + lanes) mod k] (masks say which).
        rotated = []
        for r in range(k):
            element = Signal(cw, name=f"load_rotated{r}")
            with m.Switch(stage_rotation[latency]):
                for shift in range(k):
                    with m.Case(shift):
                        q = (r - shift) % k
                        m.d.comb += element.eq(converted[q * cw:(q + 1) * cw])
            rotated.append(element)
        low = Cat(*(rotated[j % k] for j in range(lanes)))
        high = Cat(*(rotated[(j + lanes) % k] for j in range(lanes)))
        merged = Signal(lanes * cw)
        for lane in range(lanes):
            bits = slice(lane * cw, (lane + 1) * cw)
            m.d.comb += merged[bits].eq(Mux(low_mask[lane], low[bits], accumulator[bits]))
        merged_mask = accumulator_mask | low_mask
        write_now = Signal()
        m.d.comb += write_now.eq(out_valid & (reaches_end | out_last) & (merged_mask != 0))
        line_write = SkidBuffer(m, "line_write", {"addr": self.line_width, "data": lanes * cw, "en": lanes},
                                 clear_when_empty=("en",))
        write = self.buffer_write
        m.d.comb += [write.addr.eq(line_write.o["addr"]), write.data.eq(line_write.o["data"]),
                     write.en.eq(line_write.o["en"]), line_write.out_ready.eq(write.ready)]
        with m.If(flush_pending):
            m.d.comb += [line_write.i["addr"].eq(accumulator_line), line_write.i["data"].eq(accumulator),
                         line_write.i["en"].eq(accumulator_mask), line_write.in_valid.eq(1), pipe_enable.eq(0)]
            with m.If(line_write.in_ready):
                m.d.sync += [flush_pending.eq(0), accumulator_mask.eq(0)]
        with m.Else():
            m.d.comb += [line_write.i["addr"].eq(out_line), line_write.i["data"].eq(merged),
                         line_write.i["en"].eq(merged_mask), line_write.in_valid.eq(write_now),
                         pipe_enable.eq(line_write.in_ready)]
            with m.If(out_valid & pipe_enable):
                with m.If(reaches_end):
                    m.d.sync += [accumulator.eq(high), accumulator_mask.eq(high_mask),
                                 accumulator_line.eq(out_line + 1)]
                    with m.If(out_last & (high_mask != 0)):
                        m.d.sync += flush_pending.eq(1)
                    with m.Elif(out_last):
                        m.d.sync += accumulator_mask.eq(0)
                with m.Else():
                    m.d.sync += [accumulator.eq(merged), accumulator_mask.eq(Mux(out_last, 0, merged_mask)),
                                 accumulator_line.eq(out_line)]
        load_busy_pipe = Signal()
        m.d.comb += load_busy_pipe.eq((stage_valid[1:] != 0) | flush_pending | ~line_write.empty)

        # ================= store data side: lines -> queue -> beat cut -> convert -> W skid ============
        store_walker = _RowWalker(m, "store", command, **walker_args)
        store_row_ready = Signal()
        store_done = Signal()
        store_remaining = Signal(self.count_width + 2)
        store_first = Signal()
        store_pos = Signal(self.position_width + 1)
        store_offset, _ = self._beats_for(m, "store", store_walker.address, command.row_elements)

        # Line queue: entries[0] holds line `queue_line`, entries[1] the next one.
        queue = [Signal(lanes * cw, name=f"queue{i}") for i in range(3)]
        queue_count = Signal(range(4))
        queue_line = Signal(self.line_width)          # line in queue[0]
        read_line = Signal(self.line_width)           # next line to request
        read_in_flight = Signal()
        read_discard = Signal()
        queue_pop = Signal()
        queue_flush = Signal()

        with m.If(start):
            m.d.sync += [*store_walker.load(self.command.payload), store_row_ready.eq(0), store_done.eq(0)]
        with m.Elif(active & command.store & ~store_done & ~store_row_ready):
            with m.If(store_walker.rows_left == 0):
                m.d.sync += store_done.eq(1)
            with m.Else():
                below = store_walker.position < store_offset
                first_line = store_walker.line - below
                m.d.sync += [
                    store_row_ready.eq(1), store_first.eq(1),
                    store_remaining.eq(store_offset + command.row_elements),
                    store_pos.eq(store_walker.position + Mux(below, lanes, 0) - store_offset),
                    queue_line.eq(first_line), read_line.eq(first_line),
                ]

        # Read lines ahead while the queue has room (counting the read in flight). The request depends on
        # registers only (a read in the cycle that flushes the queue is discarded on arrival).
        read_request = Signal()
        m.d.comb += read_request.eq(active & command.store & store_row_ready &
                                    (queue_count + read_in_flight < 3))
        m.d.comb += [self.buffer_read.addr.eq(read_line), self.buffer_read.en.eq(read_request)]
        m.d.sync += [read_in_flight.eq(read_request), read_discard.eq(queue_flush)]
        with m.If(read_request):
            m.d.sync += read_line.eq(read_line + 1)
        arriving = read_in_flight & ~read_discard & ~queue_flush

        # Queue update: pop first, then append the arriving line.
        count_after_pop = Signal(range(4))
        m.d.comb += count_after_pop.eq(queue_count - queue_pop)
        with m.If(queue_flush):
            m.d.sync += queue_count.eq(0)
        with m.Else():
            with m.If(queue_pop):
                m.d.sync += [queue[0].eq(queue[1]), queue[1].eq(queue[2]), queue_line.eq(queue_line + 1)]
            with m.If(arriving):
                with m.Switch(count_after_pop):
                    for index in range(3):
                        with m.Case(index):
                            m.d.sync += queue[index].eq(self.buffer_read.data)
            m.d.sync += queue_count.eq(count_after_pop + arriving)

        # Cut the beat out of the first two lines.
        crossing = store_pos + k > lanes
        have_lines = Signal()
        m.d.comb += have_lines.eq((queue_count >= 2) | ((queue_count == 1) & ~crossing))
        cut = Signal(k * cw)
        m.d.comb += cut.eq(Cat(queue[0], queue[1]) >> (store_pos * cw))
        store_mask = Signal(k)
        for q in range(k):
            m.d.comb += store_mask[q].eq((~store_first | (q >= store_offset)) & (q < store_remaining))
        store_last_beat = store_remaining <= k

        with m.If(active & command.store & (aborting | error)):
            m.d.sync += store_done.eq(1)

        # W beats follow the burst lengths the AW side issued (a FIFO), so wlast is always right and
        # an abort can still pay every beat it owes.
        w_enable = Signal()
        w_take = Signal()
        w_drain = Signal()
        w_beat = Signal()
        burst_left = Signal(9)                       # beats left in the current W burst (0: next burst)
        beat_available = (burst_left != 0) | burst_fifo.r_rdy
        m.d.comb += [
            w_take.eq(active & command.store & store_row_ready & ~aborting & ~error & have_lines
                      & beat_available & w_enable),
            w_drain.eq(active & command.store & (aborting | error) & beat_available & w_enable),
            w_beat.eq(w_take | w_drain),
        ]
        beats_this_burst = Mux(burst_left == 0, burst_fifo.r_data, burst_left)
        with m.If(w_beat):
            m.d.sync += burst_left.eq(beats_this_burst - 1)
            m.d.comb += burst_fifo.r_en.eq(burst_left == 0)
        with m.If(w_take):
            m.d.sync += [store_first.eq(0), store_remaining.eq(store_remaining - k)]
            position_next = store_pos + k
            with m.If(position_next >= lanes):
                m.d.sync += store_pos.eq(position_next - lanes)
                m.d.comb += queue_pop.eq(1)
            with m.Else():
                m.d.sync += store_pos.eq(position_next)
            with m.If(store_last_beat):
                m.d.sync += [store_row_ready.eq(0), *store_walker.advance()]
                m.d.comb += queue_flush.eq(1)

        # Store pipeline: the cut beat is registered, converted, then enters the W skid buffer (WVALID,
        # WDATA, WSTRB, WLAST are flip-flops; WREADY only moves the skid buffer; the pipeline advances
        # while it has room).
        cut_registered = Signal(k * cw)
        with m.If(w_enable):
            m.d.sync += cut_registered.eq(cut)
        store_converted, convert_latency = self._convert(m, "store", cut_registered, self.compute_format,
                                                         self.storage_format, w_enable, cw, slot)
        store_latency = 1 + convert_latency
        w_valid = Signal(store_latency + 1)
        w_strb = [Signal(self.beat_bytes, name=f"store_strb{i}") for i in range(store_latency + 1)]
        w_last = Signal(store_latency + 1)
        strobe = Signal(self.beat_bytes)
        for q in range(k):
            m.d.comb += strobe[q * self.storage_bytes:(q + 1) * self.storage_bytes].eq(
                Mux(store_mask[q] & ~w_drain, (1 << self.storage_bytes) - 1, 0))
        m.d.comb += [w_valid[0].eq(w_beat), w_strb[0].eq(strobe), w_last[0].eq(beats_this_burst == 1)]
        for i in range(store_latency):
            with m.If(w_enable):
                m.d.sync += [w_valid[i + 1].eq(w_valid[i]), w_strb[i + 1].eq(w_strb[i]),
                             w_last[i + 1].eq(w_last[i])]
        write_data = SkidBuffer(m, "write_data", {"data": self.data_width, "strb": self.beat_bytes, "last": 1,
                                                   "bytes": len(self.bytes_written)})
        m.d.comb += [write_data.in_valid.eq(w_valid[store_latency]), write_data.i["data"].eq(store_converted),
                     write_data.i["strb"].eq(w_strb[store_latency]), write_data.i["last"].eq(w_last[store_latency]),
                     write_data.i["bytes"].eq(_popcount(w_strb[store_latency])),
                     w_enable.eq(write_data.in_ready),
                     axi.wvalid.eq(write_data.out_valid), axi.wdata.eq(write_data.o["data"]),
                     axi.wstrb.eq(write_data.o["strb"]), axi.wlast.eq(write_data.o["last"]),
                     write_data.out_ready.eq(axi.wready)]
        bytes_written = Signal.like(self.bytes_written)
        m.d.sync += bytes_written.eq(Mux(axi.wvalid & axi.wready, write_data.o["bytes"], 0))
        m.d.comb += self.bytes_written.eq(bytes_written)
        m.d.comb += [burst_fifo.w_data.eq(burst_beats), burst_fifo.w_en.eq(request_new & command.store)]

        # Write responses, registered (BREADY is always high).
        m.d.comb += axi.bready.eq(1)
        b_fire = Signal()
        b_error = Signal()
        m.d.sync += [b_fire.eq(axi.bvalid & (axi.bid == self.axi_id)),
                     b_error.eq(axi.bvalid & (axi.bid == self.axi_id) & (axi.bresp != AXIResponse.OKAY))]
        m.d.sync += bursts_open.eq(bursts_open + (request_new & command.store) - b_fire)
        with m.If(b_error):
            m.d.sync += error.eq(1)

        # ================= completion =================
        # `finished` is evaluated from registers and registered itself (once true it stays true until the
        # next command), so `done` is one gate deep.
        finished = Signal()
        with m.If(command.store):
            m.d.comb += finished.eq(issue_done & store_done & ~burst_fifo.r_rdy & (burst_left == 0)
                                    & (w_valid == 0) & write_data.empty & (bursts_open == 0) & ~b_fire
                                    & write_address.empty)
        with m.Else():
            m.d.comb += finished.eq(issue_done & load_done & (outstanding_reads == 0) & ~load_busy_pipe
                                    & (stage_valid == 0) & read_address.empty & (id_valid == 0)
                                    & ~gather_address_valid)
        finished_registered = Signal()
        m.d.sync += finished_registered.eq(active & finished & ~start)
        with m.If(active & finished_registered):
            m.d.sync += [active.eq(0), finished_registered.eq(0)]
            m.d.comb += self.done.eq(1)
        m.d.comb += [self.read_active.eq(active & ~command.store), self.write_active.eq(active & command.store)]

        # An abort can leave the line queue and the accumulator holding a stale row: start afresh.
        with m.If(start):
            m.d.sync += [queue_count.eq(0), read_discard.eq(1), accumulator_mask.eq(0), flush_pending.eq(0)]
        return m


MEMORY_FORMATS = ("storage", "compute")
"""The command's ``memory_format`` values: 0 memory holds ``storage_format`` elements (converted), 1 memory
holds ``compute_format`` elements (copied with the contract's reading only); as ``marca.isa.MemoryFormat``."""


class DMA(wiring.Component):
    """AXI4 DMA between memory and the line buffers, for both memory-side formats of the ISA.

    One :class:`_DMAEngine` per distinct memory format (one when storage and compute formats are equal);
    the command's ``memory_format`` picks the engine, and the bus and buffer ports follow the engine that
    took the last command. Transfers run one at a time, so the engines never compete.

    Parameters
    ----------
    addr_width, data_width : int
        AXI4 address and data widths.
    storage_format, compute_format : FloatFormat
    lanes : int
        Elements per buffer line; at least the elements of one bus beat in either memory format.
    line_width, buffer_width, count_width, max_outstanding_beats, axi_id
        As :class:`_DMAEngine`.

    Ports
    -----
    As :class:`_DMAEngine`: ``command``, ``axi``, ``buffer``, ``buffer_write``, ``buffer_read``, ``busy``,
    ``done``, ``error``, ``index_error``, ``abort``, ``bytes_read``, ``bytes_written``, ``read_active``,
    ``write_active``.
    """

    def __init__(self, *, addr_width: int, data_width: int, storage_format: FloatFormat,
                 compute_format: FloatFormat, lanes: int, line_width: int, buffer_width: int = 2,
                 count_width: int = 16, max_outstanding_beats: int = 512, axi_id: int = 0):
        self._MustUse__silence = True     # a rejected parameter must not also warn 'never used'
        shared = dict(addr_width=addr_width, data_width=data_width, compute_format=compute_format,
                      lanes=lanes, line_width=line_width, buffer_width=buffer_width, count_width=count_width,
                      max_outstanding_beats=max_outstanding_beats, axi_id=axi_id)
        memory_formats = [storage_format] if storage_format == compute_format else [storage_format,
                                                                                       compute_format]
        self.engines = [_DMAEngine(storage_format=fmt, **shared) for fmt in memory_formats]
        engine = self.engines[0]
        self.storage_format = storage_format
        self.compute_format = compute_format
        self.lanes = lanes
        self.command_layout = engine.command_layout
        self.axi_signature = engine.axi_signature
        super().__init__(dict(engine.signature.members))
        self._MustUse__silence = False

    def elaborate(self, platform):
        m = Module()
        engines = self.engines
        for index, engine in enumerate(engines):
            m.submodules[f"engine{index}"] = engine
        if len(engines) == 1:
            engine = engines[0]
            wiring.connect(m, wiring.flipped(self.command), engine.command)
            wiring.connect(m, engine.axi, wiring.flipped(self.axi))
            wiring.connect(m, engine.buffer_write, wiring.flipped(self.buffer_write))
            wiring.connect(m, engine.buffer_read, wiring.flipped(self.buffer_read))
            m.d.comb += [self.buffer.eq(engine.buffer), self.busy.eq(engine.busy), self.done.eq(engine.done),
                         self.error.eq(engine.error), self.index_error.eq(engine.index_error),
                         engine.abort.eq(self.abort),
                         self.bytes_read.eq(engine.bytes_read), self.bytes_written.eq(engine.bytes_written),
                         self.read_active.eq(engine.read_active), self.write_active.eq(engine.write_active)]
            return m

        selected = Signal()     # the engine of the last accepted command
        wanted = self.command.payload.memory_format
        busy = Signal()
        m.d.comb += busy.eq(engines[0].busy | engines[1].busy)
        m.d.comb += self.command.ready.eq(~busy)
        with m.If(self.command.valid & ~busy):
            m.d.sync += selected.eq(wanted)
        for index, engine in enumerate(engines):
            mine = selected == index
            m.d.comb += [engine.command.payload.eq(self.command.payload),
                         engine.command.valid.eq(self.command.valid & ~busy & (wanted == index)),
                         engine.abort.eq(self.abort)]
            # Inputs from the bus reach only the selected engine; the other sees an idle bus.
            axi = engine.axi
            m.d.comb += [axi.awready.eq(self.axi.awready & mine), axi.wready.eq(self.axi.wready & mine),
                         axi.bvalid.eq(self.axi.bvalid & mine), axi.bid.eq(self.axi.bid),
                         axi.bresp.eq(self.axi.bresp),
                         axi.arready.eq(self.axi.arready & mine), axi.rvalid.eq(self.axi.rvalid & mine),
                         axi.rid.eq(self.axi.rid), axi.rdata.eq(self.axi.rdata), axi.rresp.eq(self.axi.rresp),
                         axi.rlast.eq(self.axi.rlast),
                         engine.buffer_write.ready.eq(self.buffer_write.ready & mine),
                         engine.buffer_read.data.eq(self.buffer_read.data)]
            with m.If(mine):
                for name, member in self.axi_signature.members.items():
                    if member.flow == Out:
                        m.d.comb += getattr(self.axi, name).eq(getattr(axi, name))
                m.d.comb += [self.buffer_write.addr.eq(engine.buffer_write.addr),
                             self.buffer_write.data.eq(engine.buffer_write.data),
                             self.buffer_write.en.eq(engine.buffer_write.en),
                             self.buffer_read.addr.eq(engine.buffer_read.addr),
                             self.buffer_read.en.eq(engine.buffer_read.en),
                             self.buffer.eq(engine.buffer), self.error.eq(engine.error),
                             self.index_error.eq(engine.index_error),
                             self.bytes_read.eq(engine.bytes_read), self.bytes_written.eq(engine.bytes_written)]
        m.d.comb += [self.busy.eq(busy), self.done.eq(engines[0].done | engines[1].done),
                     self.read_active.eq(engines[0].read_active | engines[1].read_active),
                     self.write_active.eq(engines[0].write_active | engines[1].write_active)]
        return m
