"""A cycle model of the generated accelerator: cycles and the RTL's counter breakdown from a configuration, a
program and a memory system, fast enough for a whole model at paper scale (docs/performance.md).

    from marca.perf import MemorySystem, estimate
    report = estimate(config, instructions, MemorySystem(read_latency=8, write_latency=8))
    report.cycles, report.counters["array_linear_cycles"], report.counters["stall_hazard_cycles"]

What it models, unit by unit (the RTL's structure is in docs/shell.md):

* **Fetch and decode**: instruction words are read over the shared AXI read channel
  (``256 / axi_data_width`` beats each) at most ``fetch queue depth`` words ahead of decode; decode holds a
  word for ``Controller.check_cycles`` cycles of checks before it can be dispatched. Fetch does not decode:
  it also requests the ``fetch queue depth`` words behind HALT, and the controller is done only once those
  reads have completed (``fetch_idle``).
* **Two instruction streams**: LOAD/STORE go to the DMA one at a time; compute instructions go to the
  engine once it has generated the previous one's beats; BARRIER and HALT wait for both units to be idle.
* **The compute engine**: one beat per cycle; the scoreboard makes a beat that reads a line still in the
  array wait until its producer is written back (``hazard distance`` = array latency + the engine's
  pipeline), inside an instruction (LINEAR chunk rounds shorter than the distance, NONLINEAR passes over a
  batch of lines) and between instructions (the first beats of an instruction against the last beats of
  the previous ones).
* **The DMA**: 2-D transfers cut into bursts (beat-aligned, at most 256 beats, never across 4 KiB), the
  address side's per-row and per-burst issue cycles, the outstanding-read limit, one beat per cycle on the
  data side with one set-up cycle per row, the converter's latency and the completion handshakes.
* **The memory system** (:class:`MemorySystem`): read latency, write-response latency, a sustained
  bandwidth in bytes per cycle (DRAM; the bus carries at most one beat per cycle), and the probability
  that a channel pauses in a cycle (the testbench's random AXI pauses), taken as a slower beat rate and a
  longer request handshake where the request meets an idle channel (a request made while earlier bursts
  still stream was accepted meanwhile: its handshake is hidden). One read channel serves instruction fetch
  and DMA loads in request order.

What it ignores (each costs at most a few cycles per event in the RTL): the write-port arbitration
between DMA loads and compute results in the same buffer, the AR arbitration's idle cycle when fetch and
DMA alternate, the order of requests on the read channel where it is not the model's (a LOAD's bursts are
queued when it is dispatched, before the fetch request that decode's next take frees, although that one
reaches the bus first), write-channel back-pressure beyond the pause rate, and error handling (a program
is assumed to run to HALT).

Latencies come from the hardware's own definitions: the array's from :class:`marca.hw.pe_array.PEArray`
(built from the float units' ``latency`` attributes), the decoder's from an elaborated
:class:`marca.hw.controller.Controller`, the converter's from :class:`marca.hw.fp.FloatConvert`, the
NONLINEAR pass programs from :func:`marca.hw.engine.nonlinear_schedule`, burst limits and outstanding
reads from :mod:`marca.hw.dma`. The remaining numbers are register stages of the engine, DMA and top
(:data:`PIPELINE`), each named after the registers it counts, and are checked against the RTL's cycle
counter by ``marca bench perf_validate`` (tests/test_perf.py holds the model to the recorded counts).
"""

import collections
import functools
import inspect
import itertools
import math
import operator
from dataclasses import dataclass, field

from marca import isa
from marca.config import MarcaConfig
from marca.isa import LinearInit
from marca.ops import Broadcast

__all__ = ["MemorySystem", "HardwareTiming", "PIPELINE", "PerfReport", "hardware_timing", "estimate",
           "TESTBENCH_MEMORY"]


@dataclass(frozen=True, kw_only=True)
class MemorySystem:
    """The memory behind the AXI4 manager port, in accelerator clock cycles.

    read_latency : cycles from a read request accepted on the bus to its first data beat.
    write_latency : cycles from the last write beat of a burst to its write response.
    burst_gap : idle cycles between two read bursts on the data channel (a fixed gap: pauses do not stretch it).
    bytes_per_cycle : sustained DRAM bandwidth (None: the bus's beat per cycle is the limit).
    pause : probability that a channel pauses in a cycle (cocotbext-axi's random pauses).
    """

    read_latency: float = 8.0
    write_latency: float = 4.0
    burst_gap: float = 0.0
    bytes_per_cycle: float | None = None
    pause: float = 0.0

    def __post_init__(self):
        for name in ("read_latency", "write_latency", "burst_gap"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative number, not {getattr(self, name)!r}")
        if self.bytes_per_cycle is not None and not self.bytes_per_cycle > 0:
            raise ValueError(f"bytes_per_cycle must be positive or None, not {self.bytes_per_cycle!r}")
        if not isinstance(self.pause, (int, float)) or not 0 <= self.pause < 1:
            raise ValueError(f"pause must be in [0, 1), not {self.pause!r}")

    def beat_period(self, beat_bytes: int) -> float:
        """Cycles per data beat on one channel."""
        period = 1.0 / (1.0 - self.pause)
        if self.bytes_per_cycle is not None:
            period = max(period, beat_bytes / self.bytes_per_cycle)
        return period

    def handshake(self) -> float:
        """Expected extra cycles of one handshake under pauses."""
        return self.pause / (1.0 - self.pause)


# cocotbext-axi's AxiRam as the testbenches use it: read latency and write response fitted on the recorded
# pairs of ``marca bench perf_validate``; no gap between read bursts (traced on the tiny RTL: the R beats of
# consecutive bursts follow each other in consecutive cycles, docs/performance.md).
TESTBENCH_MEMORY = MemorySystem(read_latency=4.0, write_latency=2.0, burst_gap=0.0)

PIPELINE = {
    # Controller and top.
    "fetch_ar_slice": 1,          # hw/accelerator.py: the shared AR register slice
    "fetch_queue_write": 1,       # InstructionFetch: the SyncFIFO shows a word the cycle after its last beat
    "start_to_running": 0,        # cycles counter starts with `running` (the first cycle fetch may issue)
    "halt_to_done": 2,            # Controller: HALT dispatched -> stopping -> running falls; equally the
                                  # last fetch beat -> in_flight 0 (fetch_idle) -> running falls
    # Compute engine (hw/engine.py).
    "dispatch_to_issue": 3,       # compute_valid register, command accept, skid buffer head
    "issue_to_ready": 7,          # fetch, staged, operand queue (SyncFIFOBuffered), result queue, write,
                                  # scoreboard clear: a dependent beat issues the array's latency in the
                                  # producer's mode + this later (fitted: micro-chain)
    # DMA (hw/dma.py).
    "dma_dispatch_to_start": 2,   # dma_valid register, command accept
    "dma_row_setup": 2,           # per row, address and data side: the row's set-up register, then the
                                  # first burst's length register (fitted: micro-dma-rows)
    "dma_burst_interval": 2,      # a burst's length is registered a cycle before it is issued
    "dma_ar_to_bus": 2,           # read_address skid buffer, the top's AR slice
    "gather_id_stages": 3,        # GATHER: id word, range check and id * row_stride, table address
    "dma_load_tail": 5,           # line-write skid buffer, `finished` register, done, controller's register
    "dma_store_to_w": 5,          # line read, queue, cut register, W skid buffer (+ converter latency)
    "dma_store_row_gap": 3,       # a row end flushes the line queue: lines are read again
    "dma_store_tail": 4,          # B register, bursts_open, `finished` register, done, controller's register
}
"""Register stages the model counts, by name; the comment says which registers of the RTL they are."""


@dataclass(frozen=True)
class HardwareTiming:
    """The hardware numbers the model needs, each read from its definition (see :func:`hardware_timing`)."""

    lanes: int
    rows: int
    cols: int
    beat_bytes: int
    fetch_beats: int
    fetch_queue_depth: int
    check_cycles: int
    array_latency: int
    linear_latency: int
    elementwise_latency: int
    linear_to_elementwise_gap: int
    in_flight_depth: int
    convert_latency: int
    burst_limit: int
    max_outstanding_beats: int
    boundary_bytes: int
    nonlinear_batch: int
    nonlinear_passes: dict = field(hash=False)   # function -> list of (reads: [("input"|"slot", slot)], writes slot|None)

    def hazard_distance(self, kind: str) -> int:
        """Cycles from the issue of a ``kind`` beat (``"linear"`` or element-wise) to the earliest issue of a
        beat that reads its result: the array's latency in that mode plus the engine's pipeline."""
        latency = self.linear_latency if kind == "linear" else self.elementwise_latency
        return latency + PIPELINE["issue_to_ready"]


def _silenced(elaboratable):
    elaboratable._MustUse__silence = True      # built to read numbers from, never elaborated into a design
    return elaboratable


@functools.lru_cache(maxsize=32)
def hardware_timing(config: MarcaConfig) -> HardwareTiming:
    """Read the hardware's latencies and limits for ``config`` from the hw modules (cached per config)."""
    from amaranth.hdl import Fragment

    from marca.hw import dma as dma_module
    from marca.hw.controller import Controller, InstructionFetch
    from marca.hw.engine import NONLINEAR_BATCH, nonlinear_schedule
    from marca.hw.fp import FloatConvert
    from marca.hw.nonlinear import FunctionLane
    from marca.hw.pe_array import PEArray

    isa.check_config(config)
    # The latencies depend on the columns (tree depth), not on the rows: one row builds cols lanes, not R·C.
    array = _silenced(PEArray(rows=1, cols=config.array_cols, fmt=config.compute_format,
                              lane_extension=FunctionLane.factory(config)))
    array_latency = max(array.linear_latency, array.elementwise_latency)
    dma = _silenced(dma_module.DMA(addr_width=config.axi_addr_width, data_width=config.axi_data_width,
                                   storage_format=config.storage_format, compute_format=config.compute_format,
                                   lanes=config.lanes, line_width=16))
    for engine in dma.engines:
        _silenced(engine)
    controller = Controller(config=config, dma_layout=dma.command_layout)
    Fragment.get(controller, None)            # check_cycles is the depth of the check pipeline it builds
    beat_bytes = config.axi_data_width // 8
    fetch_defaults = inspect.signature(InstructionFetch.__init__).parameters
    _, schedule = nonlinear_schedule(config)
    passes = {}
    for function, steps in schedule.items():
        passes[int(function)] = [([(step[name][0], step[name][1]) for name in "abc"
                                   if step[name] is not None and step[name][0] in ("input", "slot")],
                                  step["slot"]) for step in steps]
    return HardwareTiming(
        lanes=config.lanes, rows=config.array_rows, cols=config.array_cols, beat_bytes=beat_bytes,
        fetch_beats=max(1, isa.INSTRUCTION_BITS // config.axi_data_width),
        fetch_queue_depth=fetch_defaults["queue_depth"].default,
        check_cycles=controller.check_cycles,
        array_latency=array_latency, in_flight_depth=array_latency + 10,
        linear_latency=array.linear_latency, elementwise_latency=array.elementwise_latency,
        linear_to_elementwise_gap=array.linear_to_elementwise_gap,
        convert_latency=FloatConvert.latency,
        burst_limit=min(dma_module._MAX_BURST_BEATS, dma_module._BOUNDARY_BYTES // beat_bytes),
        max_outstanding_beats=dma.engines[0].max_outstanding_beats,
        boundary_bytes=dma_module._BOUNDARY_BYTES,
        nonlinear_batch=NONLINEAR_BATCH, nonlinear_passes=passes)


# ------------------------------------------------------------------------------------------------------
# Beats of compute instructions: what each reads and writes, and when it issues relative to the first
# ------------------------------------------------------------------------------------------------------

_SCRATCH_SOURCE = "nonlinear-scratch"     # the engine's private scratch (a source of its own)


class _Beats:
    """The beats of one compute instruction: count, the relative issue time of beat ``b`` with the
    instruction's own scoreboard stalls, and each beat's reads and write (fields as plain ints, for speed)."""

    def __init__(self, instruction, timing: HardwareTiming, config: MarcaConfig):
        self.t = timing
        self.distance = distance = timing.hazard_distance("linear" if isinstance(instruction, isa.Linear) else "")
        lanes, R, C = timing.lanes, timing.rows, timing.cols
        i = instruction
        if isinstance(i, isa.Linear):
            self.kind = "linear"
            self.tiles, self.chunks = int(i.row_tile_count), int(i.chunk_count)
            self.round = int(i.token_count) * self.tiles
            self.count = self.round * self.chunks
            self.round_time = max(self.round, distance)
            self.duration = (self.chunks - 1) * self.round_time + self.round
            self.matrix = (int(i.matrix_buffer), int(i.matrix_address) // lanes)
            self.vector = (int(i.vector_buffer), int(i.vector_address), int(i.vector_token_stride) * C, C)
            self.output = (int(i.output_buffer), int(i.output_address), int(i.output_token_stride) * R, R)
            self.bias = (int(i.bias_buffer), int(i.bias_address), int(i.bias_token_stride) * R, R) \
                if i.init == LinearInit.BIAS else None
        elif isinstance(i, isa.Elementwise):
            self.kind = "elementwise"
            self.inner = int(i.inner_count)
            self.count = int(i.outer_count) * self.inner
            self.duration = self.count
            self.operands = []
            for name in isa.operands_used(i.op):
                broadcast = getattr(i, f"{name}_broadcast")
                g = isa.granule(config, broadcast)
                self.operands.append((int(getattr(i, f"{name}_buffer")), int(getattr(i, f"{name}_address")),
                                      int(getattr(i, f"{name}_outer_stride")) * g,
                                      int(getattr(i, f"{name}_inner_stride")) * g, broadcast == Broadcast.ROW))
            self.dst = (int(i.dst_buffer), int(i.dst_address), int(i.dst_outer_stride) * lanes,
                        int(i.dst_inner_stride) * lanes)
        else:
            self.kind = "nonlinear"
            passes = timing.nonlinear_passes[int(i.function)]
            self.passes = passes
            batch = timing.nonlinear_batch
            self.line_count = int(i.line_count)
            self.batches = -(-self.line_count // batch)
            last = self.line_count - (self.batches - 1) * batch
            self.count = self.line_count * len(passes)
            # Pass starts within a batch of n lines: after the previous pass, and `distance` after every
            # pass whose result it reads (line l of pass p reads line l of pass q).
            self.starts = {n: self._pass_starts(n, distance) for n in {batch, last}}
            self.batch_time = {n: self.starts[n][-1] + n for n in self.starts}
            self.last_lines = last
            self.duration = (self.batches - 1) * self.batch_time[batch] + self.batch_time[last]
            self.src = (int(i.src_buffer), int(i.src_address) // lanes)
            self.dst = (int(i.dst_buffer), int(i.dst_address) // lanes)

    def read_sources(self) -> set:
        if not hasattr(self, "_reads"):
            self._reads = self._read_sources()
        return self._reads

    def write_sources(self) -> set:
        if not hasattr(self, "_writes"):
            self._writes = self._write_sources()
        return self._writes

    def _read_sources(self) -> set:
        if self.kind == "linear":
            sources = {self.matrix[0], self.vector[0], self.output[0]}
            return sources | ({self.bias[0]} if self.bias else set())
        if self.kind == "elementwise":
            return {operand[0] for operand in self.operands}
        return {self.src[0], _SCRATCH_SOURCE}

    def _write_sources(self) -> set:
        if self.kind == "linear":
            return {self.output[0]}
        if self.kind == "elementwise":
            return {self.dst[0]}
        return {self.dst[0], _SCRATCH_SOURCE}

    def tail(self, distance):
        """(relative issue time, write) of the last beats (cached)."""
        if not hasattr(self, "_tail"):
            self._tail = [(offset, write) for offset, _, write in
                          map(self.beat, range(max(0, self.count - distance - 1), self.count))]
        return self._tail

    def _pass_starts(self, lines, distance):
        starts, writer = [], {}
        for number, (reads, slot) in enumerate(self.passes):
            start = starts[-1] + lines if starts else 0
            for kind, value in reads:
                if kind == "slot" and value in writer:
                    start = max(start, starts[writer[value]] + distance)
            starts.append(start)
            if slot is not None:
                writer[slot] = number
        return starts

    def beat(self, b):
        """(relative issue time, reads [(source, line, position, row_read)], write (source, line, position,
        partial)) of beat ``b`` (loop order of the RTL's beat generator)."""
        lanes = self.t.lanes
        if self.kind == "linear":
            k, rest = divmod(b, self.round)
            t, j = divmod(rest, self.tiles)
            buffer, address, token_stride, step = self.vector
            vector = address + t * token_stride + k * step
            reads = [(self.matrix[0], self.matrix[1] + j * self.chunks + k, 0, False),
                     (buffer, vector // lanes, vector % lanes, False)]
            buffer, address, token_stride, step = self.output
            out = address + t * token_stride + j * step
            if k > 0:
                reads.append((buffer, out // lanes, out % lanes, True))
            elif self.bias is not None:
                bias_buffer, bias_address, bias_stride, bias_step = self.bias
                bias = bias_address + t * bias_stride + j * bias_step
                reads.append((bias_buffer, bias // lanes, bias % lanes, True))
            return k * self.round_time + rest, reads, (buffer, out // lanes, out % lanes, True)
        if self.kind == "elementwise":
            o, n = divmod(b, self.inner)
            reads = []
            for buffer, address, outer, inner, row_read in self.operands:
                element = address + o * outer + n * inner
                reads.append((buffer, element // lanes, element % lanes, row_read))
            buffer, address, outer, inner = self.dst
            return b, reads, (buffer, (address + o * outer + n * inner) // lanes, 0, False)
        batch = self.t.nonlinear_batch
        per_batch = batch * len(self.passes)
        number, rest = divmod(b, per_batch)
        lines = batch if number < self.batches - 1 else self.last_lines
        step, line = divmod(rest, lines)
        when = number * self.batch_time[batch] + self.starts[lines][step] + line
        reads_of, slot = self.passes[step]
        reads = []
        for kind, value in reads_of:
            if kind == "input":
                reads.append((self.src[0], self.src[1] + number * batch + line, 0, False))
            else:
                reads.append((_SCRATCH_SOURCE, value * batch + line, 0, False))
        if slot is None:
            write = (self.dst[0], self.dst[1] + number * batch + line, 0, False)
        else:
            write = (_SCRATCH_SOURCE, slot * batch + line, 0, False)
        return when, reads, write


# ------------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------------

@dataclass
class PerfReport:
    """What :func:`estimate` returns: ``cycles`` and ``counters`` named as the RTL's (marca.hw.controller
    .COUNTERS: the deterministic ones exactly, the timing ones modelled)."""

    cycles: int
    counters: dict
    config: MarcaConfig
    memory: MemorySystem
    #: Per compute instruction, in program order: (index in the program, first beat's issue cycle, last
    #: beat's issue cycle, beats): the array's timeline, for critical-path breakdowns.
    timeline: list = field(default_factory=list)

    @property
    def array_beats(self) -> int:
        return self.counters["array_linear_cycles"] + self.counters["array_elementwise_cycles"]

    @property
    def pe_utilization(self) -> float:
        """Array beats per cycle (every beat keeps all ``R·C`` PEs busy)."""
        return self.array_beats / max(1, self.cycles)


class _ReadChannel:
    """The shared AXI read data channel: requests are served in order, one beat per ``period``."""

    def __init__(self, memory: MemorySystem, beat_bytes: int):
        self.period = memory.beat_period(beat_bytes)
        # A request that meets an idle channel pays its AR handshake under pauses; one made while earlier
        # bursts stream was accepted meanwhile (the AR sink takes requests ahead of the data), so back to
        # back bursts pay only the gap.
        self.latency = memory.read_latency + memory.handshake()
        self.gap = memory.burst_gap
        self.free = -math.inf      # the next cycle a beat can be delivered

    def request(self, at: float, beats: int) -> tuple[float, float]:
        """A burst requested on the bus at ``at``: (first beat, last beat)."""
        first = max(at + self.latency, self.free + self.gap)
        last = first + (beats - 1) * self.period
        self.free = last + self.period
        return first, last


class _Model:
    def __init__(self, config: MarcaConfig, memory: MemorySystem, timeline: bool = True):
        self.config = config
        self.memory = memory
        self.keep_timeline = timeline
        self.t = hardware_timing(config)
        self.read = _ReadChannel(memory, self.t.beat_bytes)
        self.write_period = memory.beat_period(self.t.beat_bytes)
        self.counters = {name: 0 for name in _COUNTER_NAMES}
        self.timeline, self.index = [], None
        self.dma_writes = []         # (buffer, first cycle, last cycle, lines) of each LOAD's buffer writes
        # Compute engine state.
        self.history = []            # (first issue, last issue, _Beats) of instructions possibly in flight
        self.last_issue = -1.0       # last beat issued
        self.last_kind = None        # its kind
        self.generator_free = 0.0    # the beat generator can take a command (dispatch allowed)
        self.compute_idle = 0.0      # every beat written back
        self.busy_until = 0.0        # for compute_busy_cycles
        # DMA state.
        self.dma_idle = 0.0
        # What the model works out from an instruction alone (a DMA's bursts, a compute instruction's
        # beats), once per instruction object: the compiler hands out one object per distinct instruction,
        # and a small preset's long program repeats a few thousand of them millions of times.
        self.known = {}

    def _known(self, i, make):
        """``make(i)``, remembered for the object ``i`` (with ``i`` itself, so its id stays its own); the
        memo is emptied when it grows past :data:`_KNOWN_LIMIT` objects (a program of distinct objects)."""
        entry = self.known.get(id(i))
        if entry is None:
            if len(self.known) >= _KNOWN_LIMIT:
                self.known.clear()
            entry = self.known[id(i)] = (i, make(i))
        return entry[1]

    # -- DMA -------------------------------------------------------------------------------------------

    def _rows(self, i):
        config, t = self.config, self.t
        element_bytes = isa.memory_element_bytes(i, config)
        per_beat = t.beat_bytes // element_bytes
        for r in range(i.row_count):
            address = i.memory_address + r * i.memory_row_stride
            offset = (address % t.beat_bytes) // element_bytes
            beats = -(-(offset + i.row_elements) // per_beat)
            start = address - address % t.beat_bytes
            bursts = []
            while beats:
                to_boundary = (t.boundary_bytes - start % t.boundary_bytes) // t.beat_bytes
                n = min(beats, to_boundary, t.burst_limit)
                bursts.append(n)
                beats -= n
                start += n * t.beat_bytes
            yield bursts

    def _dma_facts(self, i):
        """(bursts of each row, bytes moved, buffer, lines written, store, gather) of a DMA instruction."""
        data = i.row_count * i.row_elements * isa.memory_element_bytes(i, self.config)
        return (tuple(map(tuple, self._rows(i))), data, int(i.buffer), -(-i.row_count * i.row_elements // self.t.lanes),
                isinstance(i, isa.Store), isinstance(i, _GATHER))

    def dma(self, i, dispatch: float):
        t, P = self.t, PIPELINE
        start = dispatch + P["dma_dispatch_to_start"]
        rows, data, buffer, lines, store, gather = self._known(i, self._dma_facts)
        setup, interval = P["dma_row_setup"], P["dma_burst_interval"]
        if not store:
            row_setup = start                # address side: the cycle a row is set up
            taken = start                    # data side: the last beat taken (or the set-up cycle)
            outstanding = collections.deque()   # (time the burst's last beat is taken, beats)
            in_flight = 0
            limit = t.max_outstanding_beats - t.burst_limit
            id_request = start
            channel = self.read
            latency, gap, period = channel.latency, channel.gap, channel.period
            to_bus = P["dma_ar_to_bus"]
            for row in rows:
                if gather:
                    # GATHER: each row's address waits for its id, a one-beat read issued when the previous
                    # row's bursts are, then three registered stages (id word, range check and
                    # id * row_stride, table address). Row r is placed at stride r (same cost unless it
                    # crosses 4 KiB).
                    _, arrived = self.read.request(id_request + P["dma_ar_to_bus"], 1)
                    row_setup = max(row_setup, arrived + 1 + P["gather_id_stages"] - setup)
                request = row_setup + setup + 1      # set-up, then the burst length register
                taken += setup
                for number, beats in enumerate(row):
                    if number:
                        request += interval
                    # The outstanding-read limit: wait until enough earlier beats were taken.
                    while in_flight > limit:
                        done, n = outstanding.popleft()
                        in_flight -= n
                        done += 1
                        if done > request:
                            request = done
                    # self.read.request(request + dma_ar_to_bus, beats), inline; (b if b > a else a) is
                    # max(a, b)
                    at = request + to_bus + latency
                    free = channel.free + gap
                    first = free if free > at else at
                    last = first + (beats - 1) * period
                    taken += beats
                    if last + 1 > taken:
                        taken = last + 1
                    # A slow data side holds the read channel (its skid buffer holds two beats).
                    free = last + period
                    channel.free = taken - 2 if taken - 2 > free else free
                    outstanding.append((taken, beats))
                    in_flight += beats
                # The address side's next row: its set-up register the cycle after this request (the
                # row register, the burst length register, the request: a row every 3 cycles).
                row_setup = request
                id_request = request + 1
            end = taken + t.convert_latency + P["dma_load_tail"]
            if not gather:      # its line writes into the buffer, for the write port's contention
                self.dma_writes.append((buffer, start, taken, lines))
            self.counters["dma_read_busy_cycles"] += end - start
            self.counters["dma_bytes_read"] += data
            if gather:
                self.counters["dma_bytes_read"] += _GATHER_ID_BYTES * i.row_count
        else:
            w = start + P["dma_store_to_w"] + t.convert_latency
            first_row = True
            for row in rows:
                if not first_row:
                    w += P["dma_store_row_gap"]
                first_row = False
                beats = sum(row)
                w += beats * self.write_period
            end = w + self.memory.write_latency + self.memory.handshake() + P["dma_store_tail"]
            self.counters["dma_write_busy_cycles"] += end - start
            self.counters["dma_bytes_written"] += data
        self.dma_idle = end

    # -- compute ---------------------------------------------------------------------------------------

    def _beats(self, i):
        return _Beats(i, self.t, self.config)

    def compute(self, i, dispatch: float):
        t = self.t
        beats = self._known(i, self._beats)
        first = max(dispatch + PIPELINE["dispatch_to_issue"], self.last_issue + 1)
        if beats.kind != "linear" and self.last_kind == "linear":
            # The array keeps its results in order: an element-wise beat waits for the last linear one's
            # tree (PEArray.linear_to_elementwise_gap).
            first = max(first, self.last_issue + 1 + t.linear_to_elementwise_gap)
        self.last_kind = beats.kind
        # Scoreboard against the previous instructions' beats still in flight at `first`: only producers
        # that write a source this instruction reads are expanded into beats (their last ones, once).
        self.history = [entry for entry in self.history if entry[1] + entry[2].distance > first]
        reads = beats.read_sources()
        recent = []
        for producer_first, _, producer in self.history:
            if producer.write_sources() & reads:
                recent += [(producer_first + offset + producer.distance, write)
                           for offset, write in producer.tail(producer.distance)
                           if producer_first + offset + producer.distance > first]
        stall = 0.0
        if recent:
            horizon = max(ready for ready, _ in recent) - first
            written = {}
            for ready, (source, line, position, partial) in recent:
                written.setdefault((source, line), []).append((ready, position, partial))
            for b in range(beats.count):
                offset, operands, _ = beats.beat(b)
                if offset >= horizon:
                    break
                for source, line, position, row_read in operands:
                    for ready, wposition, partial in written.get((source, line), ()):
                        if not partial or not row_read or wposition == position:
                            stall = max(stall, ready - (first + offset))
        first += stall
        self.counters["stall_hazard_cycles"] += stall + (beats.duration - beats.count)
        last = first + beats.duration - 1
        # One write port per buffer, alternating between the DMA and the engine when both write: the array
        # loses about one cycle for each line a LOAD writes into the instruction's destination buffer while
        # the instruction writes there.
        write_latency = beats.distance - PIPELINE["issue_to_ready"]
        begin, finish = first + write_latency, last + write_latency
        # Instructions issue in order, so a LOAD whose writes ended before this one's begin meets no later
        # instruction either: drop it (the list stays the few LOADs in flight, not the program's).
        self.dma_writes = [entry for entry in self.dma_writes if entry[2] > begin]
        written = beats.write_sources()
        lost = 0.0
        for buffer, start, end, lines in self.dma_writes:
            if buffer in written and start < finish:
                lost += lines * (min(end, finish) - max(start, begin)) / max(1.0, end - start)
        if lost:
            lost = int(lost)
            self.counters["stall_array_cycles"] += lost
            self.counters["stall_write_cycles"] += lost
            last += lost
        self.history.append((first, last, beats))
        if self.keep_timeline:
            self.timeline.append((self.index, first, last, beats.count))
        self.last_issue = last
        generator_done = max(dispatch + PIPELINE["dispatch_to_issue"] - 1 + beats.count, last - 1)
        self.generator_free = generator_done
        self.compute_idle = last + beats.distance
        begin = max(dispatch + 1, self.busy_until)
        self.counters["compute_busy_cycles"] += max(0.0, self.compute_idle - begin)
        self.busy_until = max(self.busy_until, self.compute_idle)
        if beats.kind == "linear":
            self.counters["linear_beats"] += beats.count
            self.counters["array_linear_cycles"] += beats.count
        elif beats.kind == "elementwise":
            self.counters["elementwise_beats"] += beats.count
            self.counters["array_elementwise_cycles"] += beats.count
        else:
            self.counters["nonlinear_lines"] += beats.line_count
            self.counters["nonlinear_beats"] += beats.count
            self.counters["array_elementwise_cycles"] += beats.count

    # -- controller ------------------------------------------------------------------------------------

    def run(self, instructions) -> PerfReport:
        t, P = self.t, PIPELINE
        if not isinstance(instructions, (list, tuple)):
            instructions = list(instructions)
        try:     # the first HALT (types compared in C: a long program is scanned in a fraction of a second)
            halt = operator.indexOf(map(type, instructions), isa.Halt)
        except ValueError:
            halt = len(instructions) - 1
        n = halt + 1
        depth = t.fetch_queue_depth
        # Fetch does not decode: it reads `depth` words past HALT (their requests leave before HALT is
        # dispatched: each when the word `depth` places ahead of it is taken), and done waits for them.
        words = n + depth
        ring = depth + 1
        ready = [0.0] * ring         # word k is in the fetch queue at ready[k % ring] (at most depth ahead)
        fetch_request = -1.0
        fetch_last = -math.inf       # the last fetch beat
        request = self.read.request
        ar_slice, queue_write, fetch_beats = P["fetch_ar_slice"], P["fetch_queue_write"], t.fetch_beats

        def fetch(k, at):
            nonlocal fetch_request, fetch_last
            if k >= words:
                return
            fetch_request = max(fetch_request + 1, at)
            _, last = request(fetch_request + ar_slice, fetch_beats)
            ready[k % ring] = last + queue_write
            fetch_last = max(fetch_last, last)

        for k in range(min(depth, words)):
            fetch(k, P["start_to_running"])
        dispatch = -1.0
        c = self.counters
        check = t.check_cycles + 1
        units = {}                   # type -> 0 DMA, 1 compute, 2 other
        stall_fetch = stall_dispatch = 0
        channel = self.read
        latency, gap, period = channel.latency, channel.gap, channel.period
        fetch_span = (fetch_beats - 1) * period
        # (``b if b > a else a`` is ``max(a, b)``, without the call)
        for k, instruction in enumerate(itertools.islice(instructions, n)):
            word = ready[k % ring]
            if k:
                taken = dispatch if dispatch > word else word
                waited = word - dispatch
                stall_fetch += waited if waited > 0.0 else 0.0
            else:
                taken = word
                stall_fetch += word
            # fetch(k + depth, taken + 1), inline (k + depth < words; _ReadChannel.request)
            at = taken + 1
            fetch_request += 1
            if at > fetch_request:
                fetch_request = at
            at = fetch_request + ar_slice + latency
            free = channel.free + gap
            first = free if free > at else at
            last = first + fetch_span
            channel.free = last + period
            ready[(k + depth) % ring] = last + queue_write
            if last > fetch_last:
                fetch_last = last
            checked = taken + check
            kind = type(instruction)
            unit_kind = units.get(kind)
            if unit_kind is None:
                unit_kind = units[kind] = 0 if isinstance(instruction, _DMA) else \
                    1 if isinstance(instruction, (isa.Linear, isa.Elementwise, isa.Nonlinear)) else 2
            if unit_kind == 0:
                unit = self.dma_idle
            elif unit_kind == 1:
                unit = self.generator_free
            else:
                unit = max(self.dma_idle, self.compute_idle, self.generator_free)
            dispatch = unit if unit > checked else checked
            stall_dispatch += dispatch - checked
            name = _CLASS_COUNTERS.get(kind)
            if name:
                c[name] += 1
            if unit_kind == 0:
                self.dma(instruction, dispatch)
            elif unit_kind == 1:
                self.index = k
                self.compute(instruction, dispatch)
        c["stall_fetch_cycles"] += stall_fetch
        c["stall_dispatch_cycles"] += stall_dispatch
        c["instructions"] += n
        c["fetch_bytes"] += n * isa.INSTRUCTION_BYTES
        # HALT dispatched -> stopping -> running falls; the last fetch beat -> in_flight 0 (fetch idle) ->
        # running falls: the same two registers after whichever is later.
        cycles = max(dispatch, fetch_last) + P["halt_to_done"]
        c["cycles"] = cycles
        out = {name: int(round(value)) for name, value in c.items()}
        return PerfReport(cycles=out["cycles"], counters=out, config=self.config, memory=self.memory,
                          timeline=[(k, int(round(first)), int(round(last)), count)
                                    for k, first, last, count in self.timeline])


_COUNTER_NAMES = (
    "instructions", "load_instructions", "store_instructions", "linear_instructions",
    "elementwise_instructions", "nonlinear_instructions", "barrier_instructions", "fetch_bytes",
    "dma_bytes_read", "dma_bytes_written", "linear_beats", "elementwise_beats", "nonlinear_lines",
    "nonlinear_beats", "cycles", "compute_busy_cycles", "dma_read_busy_cycles", "dma_write_busy_cycles",
    "array_linear_cycles", "array_elementwise_cycles", "stall_fetch_cycles", "stall_dispatch_cycles",
    "stall_hazard_cycles", "stall_array_cycles", "stall_write_cycles")

_KNOWN_LIMIT = 1 << 16                         # instruction objects _Model.known remembers at most
_GATHER = getattr(isa, "Gather", ())           # GATHER (embedding rows by id), where the ISA has it
_GATHER_ID_BYTES = 4                           # one little-endian uint32 id per row (marca.isa.Gather)
_DMA = tuple(c for c in (isa.Load, isa.Store, _GATHER) if c)

_CLASS_COUNTERS = {isa.Load: "load_instructions", isa.Store: "store_instructions",
                   isa.Linear: "linear_instructions", isa.Elementwise: "elementwise_instructions",
                   isa.Nonlinear: "nonlinear_instructions", isa.Barrier: "barrier_instructions"}
if _GATHER:
    _CLASS_COUNTERS[_GATHER] = "load_instructions"     # counted as a load (marca.golden.iss)


def dram_bound_cycles(config: MarcaConfig, counters: dict) -> float:
    """The DRAM bound of a run with these counters: the bytes it moved at one bus beat per cycle, the larger
    of the reads (instruction fetch included) and the writes (the AXI read and write channels are
    separate)."""
    moved = max(counters["dma_bytes_read"] + counters["fetch_bytes"], counters["dma_bytes_written"])
    return moved / (config.axi_data_width // 8)


def estimate(config: MarcaConfig, instructions, memory: MemorySystem = TESTBENCH_MEMORY, *,
             timeline: bool = True) -> PerfReport:
    """Model ``instructions`` (a straight-line program ending in HALT) on ``Accelerator(config)`` with
    ``memory``; returns a :class:`PerfReport` (``timeline`` False: without its timeline, which holds an
    entry per compute instruction: for programs of tens of millions of instructions)."""
    if not isinstance(config, MarcaConfig):
        raise ValueError(f"config must be a MarcaConfig, not {config!r}")
    if not isinstance(memory, MemorySystem):
        raise ValueError(f"memory must be a MemorySystem, not {memory!r}")
    if not isinstance(timeline, bool):
        raise ValueError(f"timeline must be a bool, not {timeline!r}")
    return _Model(config, memory, timeline).run(instructions)
