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
  the buffer at a running position ``(L, p)``: the beat is shifted into a two-line window at ``p``; the
  part in the first line merges into a line accumulator, which is written when the window passes the end
  of its line (or at the end of the row), the part in the second line starts the next accumulation. So
  a load writes each buffer line about once, leaving the shared write port free for the PE array most
  of the time. Stores read lines ahead into a three-line queue and cut each beat out of its first two.

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

from marca.formats import FloatFormat

from .axi import AXI4Signature, AXIBurst, AXIResponse
from .buffers import ReadPortSignature, WritePortSignature
from .fp import FloatConvert

__all__ = ["DMA", "dma_command_layout", "MEMORY_FORMATS"]

_MAX_BURST_BEATS = 256
_BOUNDARY_BYTES = 4096


def dma_command_layout(*, addr_width: int, line_width: int, position_width: int, buffer_width: int,
                       count_width: int = 16) -> data.StructLayout:
    """Payload of a DMA command (see the module docstring for the meaning of each field)."""
    return data.StructLayout({
        "store": 1,
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
        Read beats requested but not yet received, at most.
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
        Line writes of loads (waits on ``ready``).
    buffer_read : Out(ReadPortSignature)
        Line reads of stores (data one cycle after ``en``).
    busy, done, error : Out(1)
        See the module docstring. ``error`` stays high from the failing response until the next command.
    abort : In(1)
        Stop issuing bursts, drain, finish with ``done``.
    bytes_read, bytes_written : Out(...)
        Per-cycle counts of element bytes read from / written to memory (for the counters).
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
            "busy": Out(1), "done": Out(1), "error": Out(1), "abort": In(1),
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
        """Beats of the next burst at beat-aligned ``address`` with ``beats_left`` beats to go."""
        shift = exact_log2(self.beat_bytes)
        to_boundary = Signal(range(_BOUNDARY_BYTES // self.beat_bytes + 1), name=f"{name}_to_boundary")
        m.d.comb += to_boundary.eq((_BOUNDARY_BYTES >> shift) - address[shift:exact_log2(_BOUNDARY_BYTES)])
        limit = min(_MAX_BURST_BEATS, _BOUNDARY_BYTES // self.beat_bytes)
        burst = Signal(range(limit + 1), name=f"{name}_burst")
        smaller = Mux(beats_left < to_boundary, beats_left, to_boundary)
        m.d.comb += burst.eq(Mux(smaller > limit, limit, smaller))
        return burst

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
        m.d.comb += [self.buffer.eq(command.buffer), self.error.eq(error), self.busy.eq(active),
                     self.command.ready.eq(~active)]

        start = Signal()
        m.d.comb += start.eq(self.command.valid & ~active)
        with m.If(start):
            m.d.sync += [command.eq(self.command.payload), active.eq(1), aborting.eq(0), error.eq(0)]
        with m.If(active & self.abort):
            m.d.sync += aborting.eq(1)

        walker_args = dict(addr_width=self.addr_width, line_width=self.line_width,
                           position_width=self.position_width, count_width=self.count_width, lanes=lanes)

        # ================= address side (shared shape for AR and AW) =================================
        address_walker = _RowWalker(m, "issue", command, **walker_args)
        issue_row_ready = Signal()       # issue_address/issue_beats_left describe the current row
        issue_address = Signal(self.addr_width)     # beat-aligned address of the next burst
        issue_beats_left = Signal(self.count_width + 1)
        issue_done = Signal()
        _, row_beats = self._beats_for(m, "issue", address_walker.address, command.row_elements)
        burst = self._burst_beats(m, "issue", issue_address, issue_beats_left)
        with m.If(start):
            m.d.sync += [*address_walker.load(self.command.payload), issue_row_ready.eq(0),
                         issue_done.eq(0)]
        with m.Elif(active & ~issue_done & ~issue_row_ready):
            with m.If(address_walker.rows_left == 0):
                m.d.sync += issue_done.eq(1)
            with m.Else():
                m.d.sync += [issue_address.eq(Cat(Const(0, beat_shift), address_walker.address[beat_shift:])),
                             issue_beats_left.eq(row_beats), issue_row_ready.eq(1)]

        with m.If(active & (aborting | error)):
            m.d.sync += issue_done.eq(1)
        issue_fire = Signal()
        issue_can = Signal()
        m.d.comb += issue_can.eq(active & issue_row_ready & ~issue_done & ~aborting & ~error)

        def after_issue():
            m.d.sync += [issue_address.eq(issue_address + (burst << beat_shift)),
                         issue_beats_left.eq(issue_beats_left - burst)]
            with m.If(issue_beats_left == burst):
                m.d.sync += [issue_row_ready.eq(0), *address_walker.advance()]

        # Read address channel.
        bursts_open = Signal(range(64))          # write bursts issued whose B has not come back
        burst_fifo = m.submodules.burst_fifo = SyncFIFO(width=9, depth=8)   # their lengths, for W
        outstanding_reads = Signal(range(self.max_outstanding_beats + _MAX_BURST_BEATS + 1))
        read_beat_taken = Signal()
        m.d.comb += [axi.arid.eq(self.axi_id), axi.araddr.eq(issue_address), axi.arlen.eq(burst - 1),
                     axi.arsize.eq(beat_shift), axi.arburst.eq(AXIBurst.INCR),
                     axi.awid.eq(self.axi_id), axi.awaddr.eq(issue_address), axi.awlen.eq(burst - 1),
                     axi.awsize.eq(beat_shift), axi.awburst.eq(AXIBurst.INCR)]
        # A request, once valid, stays valid until accepted (AXI), whatever an abort or an error says
        # meanwhile: `request_pending` remembers it. A write burst is committed to the W side (its length
        # pushed to `burst_fifo`) when its AWVALID rises, so W beats never wait for AWREADY.
        request_pending = Signal()
        request_new = Signal()
        with m.If(~command.store):
            m.d.comb += request_new.eq(~request_pending & issue_can
                                       & (outstanding_reads + burst <= self.max_outstanding_beats))
            m.d.comb += axi.arvalid.eq(request_pending | request_new)
            m.d.comb += issue_fire.eq(axi.arvalid & axi.arready)
            m.d.sync += request_pending.eq(axi.arvalid & ~axi.arready)
        with m.Else():
            m.d.comb += request_new.eq(~request_pending & issue_can & burst_fifo.w_rdy & (bursts_open < 32))
            m.d.comb += axi.awvalid.eq(request_pending | request_new)
            m.d.comb += issue_fire.eq(axi.awvalid & axi.awready)
            m.d.sync += request_pending.eq(axi.awvalid & ~axi.awready)
        with m.If(issue_fire):
            after_issue()
        m.d.sync += outstanding_reads.eq(outstanding_reads + Mux(issue_fire & ~command.store, burst, 0)
                                         - read_beat_taken)

        # ================= load data side: R -> convert -> line accumulator ============================
        load_walker = _RowWalker(m, "load", command, **walker_args)
        load_row_ready = Signal()
        load_done = Signal()
        load_remaining = Signal(self.count_width + 2)       # elements from the beat start to the row end
        load_first = Signal()
        load_line = Signal(self.line_width)                 # line of the current beat's element 0
        load_pos = Signal(self.position_width + 1)          # its position in that line
        load_offset, _ = self._beats_for(m, "load", load_walker.address, command.row_elements)

        with m.If(start):
            m.d.sync += [*load_walker.load(self.command.payload), load_row_ready.eq(0), load_done.eq(0)]
        with m.Elif(active & ~command.store & ~load_done & ~load_row_ready):
            with m.If(load_walker.rows_left == 0):
                m.d.sync += load_done.eq(1)
            with m.Else():
                # Element 0 of the first beat sits `offset` elements before the row's first element.
                below = load_walker.position < load_offset
                m.d.sync += [
                    load_row_ready.eq(1), load_first.eq(1),
                    load_remaining.eq(load_offset + command.row_elements),
                    load_line.eq(load_walker.line - below),
                    load_pos.eq(load_walker.position + Mux(below, lanes, 0) - load_offset),
                ]

        with m.If(active & ~command.store & (aborting | error)):
            m.d.sync += load_done.eq(1)

        # Element mask of the current beat.
        beat_mask = Signal(k)
        for q in range(k):
            m.d.comb += beat_mask[q].eq((~load_first | (q >= load_offset)) & (q < load_remaining))
        last_beat = Signal()
        m.d.comb += last_beat.eq(load_remaining <= k)

        # Conversion pipeline (stall-able, one beat per cycle).
        pipe_enable = Signal()
        r_take = Signal()    # an R beat enters the pipeline as row data
        r_drain = Signal()   # an R beat is dropped (abort/error drain)
        m.d.comb += r_drain.eq(active & ~command.store & (aborting | error))
        m.d.comb += [axi.rready.eq(Mux(r_drain, 1, load_row_ready & pipe_enable))]
        m.d.comb += r_take.eq(axi.rvalid & axi.rready & ~r_drain & (axi.rid == self.axi_id))
        m.d.comb += read_beat_taken.eq(axi.rvalid & axi.rready & (axi.rid == self.axi_id))
        with m.If(axi.rvalid & axi.rready & (axi.rresp != AXIResponse.OKAY) & active):
            m.d.sync += error.eq(1)
        with m.If(r_take):
            m.d.sync += [load_first.eq(0), load_remaining.eq(load_remaining - k)]
            position_next = load_pos + k
            with m.If(position_next >= lanes):
                m.d.sync += [load_pos.eq(position_next - lanes), load_line.eq(load_line + 1)]
            with m.Else():
                m.d.sync += load_pos.eq(position_next)
            with m.If(last_beat):
                m.d.sync += [load_row_ready.eq(0), *load_walker.advance()]
        m.d.comb += self.bytes_read.eq(Mux(r_take, _popcount(beat_mask) * self.storage_bytes, 0))

        converted, latency = self._convert(m, "load", axi.rdata, self.storage_format, self.compute_format,
                                           pipe_enable, slot, cw)
        stage_valid = Signal(latency + 1)
        stage_mask = [Signal(k, name=f"load_mask{i}") for i in range(latency + 1)]
        stage_line = [Signal(self.line_width, name=f"load_line{i}") for i in range(latency + 1)]
        stage_pos = [Signal(self.position_width + 1, name=f"load_pos{i}") for i in range(latency + 1)]
        stage_last = Signal(latency + 1)
        m.d.comb += [stage_valid[0].eq(r_take), stage_mask[0].eq(beat_mask), stage_line[0].eq(load_line),
                     stage_pos[0].eq(load_pos), stage_last[0].eq(last_beat)]
        for i in range(latency):
            with m.If(pipe_enable):
                m.d.sync += [stage_valid[i + 1].eq(stage_valid[i]), stage_mask[i + 1].eq(stage_mask[i]),
                             stage_line[i + 1].eq(stage_line[i]), stage_pos[i + 1].eq(stage_pos[i]),
                             stage_last[i + 1].eq(stage_last[i])]
        out_valid, out_mask = stage_valid[latency], stage_mask[latency]
        out_line, out_pos, out_last = stage_line[latency], stage_pos[latency], stage_last[latency]
        if latency == 0:
            raise NotImplementedError("the load path expects a registered converter")

        # Line accumulator.
        accumulator = Signal(lanes * cw)
        accumulator_mask = Signal(lanes)
        accumulator_line = Signal(self.line_width)
        flush_pending = Signal()
        window = Signal(2 * lanes * cw)
        window_mask = Signal(2 * lanes)
        m.d.comb += [window.eq(converted << (out_pos * cw)), window_mask.eq(out_mask << out_pos)]
        low, high = window[:lanes * cw], window[lanes * cw:]
        low_mask, high_mask = window_mask[:lanes], window_mask[lanes:]
        merged = Signal(lanes * cw)
        for lane in range(lanes):
            bits = slice(lane * cw, (lane + 1) * cw)
            m.d.comb += merged[bits].eq(Mux(low_mask[lane], low[bits], accumulator[bits]))
        merged_mask = accumulator_mask | low_mask
        reaches_end = out_pos + k >= lanes
        write_now = Signal()
        m.d.comb += write_now.eq(out_valid & (reaches_end | out_last) & (merged_mask != 0))
        write = self.buffer_write
        with m.If(flush_pending):
            m.d.comb += [write.addr.eq(accumulator_line), write.data.eq(accumulator),
                         write.en.eq(accumulator_mask), pipe_enable.eq(0)]
            with m.If(write.ready):
                m.d.sync += [flush_pending.eq(0), accumulator_mask.eq(0)]
        with m.Else():
            m.d.comb += [write.addr.eq(out_line), write.data.eq(merged),
                         write.en.eq(Mux(write_now, merged_mask, 0)),
                         pipe_enable.eq(~out_valid | ~write_now | write.ready)]
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
        m.d.comb += load_busy_pipe.eq((stage_valid[1:] != 0) | flush_pending)

        # ================= store data side: lines -> queue -> beat cut -> convert -> W =================
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

        # Read lines ahead while the queue has room (counting the read in flight).
        read_request = Signal()
        m.d.comb += read_request.eq(active & command.store & store_row_ready & ~queue_flush &
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

        # Store conversion pipeline + W.
        store_converted, store_latency = self._convert(m, "store", cut, self.compute_format,
                                                       self.storage_format, w_enable, cw, slot)
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
        m.d.comb += [axi.wvalid.eq(w_valid[store_latency]), axi.wstrb.eq(w_strb[store_latency]),
                     axi.wlast.eq(w_last[store_latency]), axi.wdata.eq(store_converted),
                     w_enable.eq(~axi.wvalid | axi.wready)]
        w_fire = axi.wvalid & axi.wready
        m.d.comb += self.bytes_written.eq(Mux(w_fire, _popcount(axi.wstrb), 0))
        m.d.comb += [burst_fifo.w_data.eq(burst), burst_fifo.w_en.eq(request_new & command.store)]

        # Write responses.
        m.d.comb += axi.bready.eq(1)
        b_fire = axi.bvalid & axi.bready & (axi.bid == self.axi_id)
        m.d.sync += bursts_open.eq(bursts_open + (request_new & command.store) - b_fire)
        with m.If(b_fire & (axi.bresp != AXIResponse.OKAY)):
            m.d.sync += error.eq(1)

        # ================= completion =================
        finished = Signal()
        with m.If(command.store):
            m.d.comb += finished.eq(issue_done & store_done & ~burst_fifo.r_rdy & (burst_left == 0)
                                    & (w_valid == 0) & (bursts_open == 0) & ~axi.awvalid)
        with m.Else():
            m.d.comb += finished.eq(issue_done & load_done & (outstanding_reads == 0) & ~load_busy_pipe
                                    & (stage_valid == 0) & ~axi.arvalid)
        with m.If(active & finished & ~start):
            m.d.sync += active.eq(0)
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
    ``done``, ``error``, ``abort``, ``bytes_read``, ``bytes_written``, ``read_active``, ``write_active``.
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
                         self.error.eq(engine.error), engine.abort.eq(self.abort),
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
                             self.bytes_read.eq(engine.bytes_read), self.bytes_written.eq(engine.bytes_written)]
        m.d.comb += [self.busy.eq(busy), self.done.eq(engines[0].done | engines[1].done),
                     self.read_active.eq(engines[0].read_active | engines[1].read_active),
                     self.write_active.eq(engines[0].write_active | engines[1].write_active)]
        return m
