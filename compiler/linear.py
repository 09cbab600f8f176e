"""Tiling pass for linear operations: ``out[t] = M · in[t] (+ bias)`` cut into LINEAR instructions and the
LOADs that feed them, whatever the sizes (docs/compiler.md, Tiling).

* The input vectors are on chip (:class:`OnChip`) or streamed from memory (:class:`InMemory`) in groups
  of ``C``-chunks through a staging region.
* The matrix is resident in the weight buffer (loaded once by the caller) or streamed: groups of whole
  row tiles through the two halves of the weight area (double buffering), or, when one row tile's chunks
  do not fit a half, chunk groups accumulated in place through the ``LINEAR`` bias path.

Every output element still adds its chunks in the order 0 .. K-1 (each group starts from the partial sum
of the previous ones), so any tiling gives the same bits as one ``LINEAR``.
"""

import functools
from dataclasses import dataclass, replace

from marca import isa
from marca.config import MarcaConfig
from marca.isa import Buffer, LinearInit

from .emit import Emitter
from .options import CompileError

__all__ = ["Matrix", "OnChip", "InMemory", "WeightArea", "emit_linear", "prefetch_weights"]


@dataclass
class Matrix:
    """A matrix stored pre-tiled in memory: line ``(j, k)`` at ``memory + (j·K + k)·R·C`` elements of the
    storage format; ``resident``: its element address in the weight buffer while it is held there."""

    name: str
    memory: int
    J: int
    K: int
    resident: int | None = None

    @property
    def lines(self) -> int:
        return self.J * self.K


@dataclass(frozen=True)
class OnChip:
    """Vectors in a buffer, one per token ``token_stride`` elements apart; ``address`` holds chunk (or, for
    outputs and biases, row tile) ``first`` of the matrix's input (output)."""

    buffer: Buffer
    address: int
    token_stride: int
    first: int = 0


@dataclass(frozen=True)
class InMemory:
    """Input vectors in memory: token rows ``row_stride`` bytes apart, ``row_elements`` valid elements each,
    in the compute (exact) or storage format."""

    address: int
    row_stride: int
    row_elements: int
    compute: bool


class WeightArea:
    """The part of the weight buffer that streamed matrix tiles pass through (two halves when it can), and
    the staging region that streamed input vectors pass through."""

    def __init__(self, config: MarcaConfig, address: int, lines: int, staging: tuple | None = None):
        if lines < 1:
            raise CompileError("no weight-buffer line is left for matrix tiles")
        self.config = config
        self.address, self.lines = address, lines
        self.halves = 2 if lines >= 2 else 1
        self.half_lines = lines // self.halves
        self.half = 0
        self.staging = staging        # (buffer, element address, lines) or None
        self.prefetched = []          # [(matrix name, first row tile, tiles, first chunk, chunks, address)]

    def next_half(self) -> int:
        self.half = 1 - self.half if self.halves == 2 else 0
        return self.address + self.half * self.half_lines * self.config.lanes


#: Cycles the DMA spends setting up each row of a transfer (row register, burst length, request), for
#: choosing weight blocks (the array's side comes from marca.perf.HardwareTiming.hazard_distance).
_ROW_SETUP_CYCLES = 3


def _block_shape(area: WeightArea, tokens: int, tiles: int, chunks: int) -> tuple[int, int]:
    """(row tiles, chunks) of a weight block when a row tile's ``chunks`` do not fit half the area: the
    shape of at most ``half`` lines whose DMA rows (one per tile, of ``c`` lines) and whose accumulation
    chains (``c`` chunks in order per tile, the ``J·T`` beats of a chunk round against the array's
    latency) cost the fewest estimated cycles per line."""
    from marca.perf import hardware_timing
    config, half = area.config, area.half_lines
    hazard = hardware_timing(config).hazard_distance("linear")
    beats_per_line = -(-config.lanes * config.storage_bytes // (config.axi_data_width // 8))
    best = None
    for c in range(1, min(half, chunks) + 1):
        J = min(tiles, half // c)
        dma = J * (_ROW_SETUP_CYCLES + c * beats_per_line)
        array = c * max(J * tokens, hazard)
        cost = max(dma, array) / (J * c)
        if best is None or cost < best[0]:
            best = (cost, J, c)
    return best[1], best[2]


def _first_group(area: WeightArea, matrix: Matrix, rows, chunks, tokens: int) -> tuple:
    """(first row tile, tiles, first chunk, chunks) of the first weight group :func:`emit_linear` streams for
    these row tiles and chunks: as many whole row tiles (their chunks ``chunks``) as half the area holds, or,
    when one row tile's chunks do not fit, a block of :func:`_block_shape`. When so few tokens pass through
    a group of whole row tiles that its chunk rounds are shorter than the array's latency (a decode step),
    the shape of :func:`_pipelined_shape` instead."""
    (j_lo, j_hi), (k_lo, k_hi) = rows, chunks
    half = area.half_lines
    tiles, count = j_hi - j_lo, k_hi - k_lo
    if count <= half:
        J = min(tiles, half // count)
        if not _few_tokens(area, rows, chunks, tokens):
            return j_lo, J, k_lo, count
        J, c = _pipelined_shape(area.config, half, tokens, tiles, count)
        return j_lo, J, k_lo, c
    J, c = _block_shape(area, tokens, tiles, count)
    return j_lo, J, k_lo, c


def _few_tokens(area: WeightArea, rows, chunks, tokens: int) -> bool:
    """Whether a group of whole row tiles fits half the area but passes too few tokens for its chunk
    rounds to hide the array's latency (a decode step's LINEARs)."""
    (j_lo, j_hi), (k_lo, k_hi) = rows, chunks
    count, tiles = k_hi - k_lo, j_hi - j_lo
    if count > area.half_lines or tiles < 1:
        return False
    J = min(tiles, area.half_lines // count)
    last = tiles % J or J          # the last group's tiles
    return tokens * min(J, last) < _hazard(area.config)


def _hazard(config) -> int:
    from marca.perf import hardware_timing
    return hardware_timing(config).hazard_distance("linear")


#: Cycles a streamed weight group costs beyond its bus beats and rows (dispatch, read latency, the tail of
#: the LOAD) and beyond its array cycles (the barrier before its LINEAR, the pipeline's drain), roughly, from
#: marca.perf on the demo configuration; only shapes are compared with them.
_GROUP_DMA_CYCLES, _GROUP_ARRAY_CYCLES = 15, 25


@functools.lru_cache(maxsize=256)
def _pipelined_shape(config: MarcaConfig, half: int, tokens: int, tiles: int, chunks: int) -> tuple[int, int]:
    """(row tiles, chunks) per weight group of a streamed LINEAR with few tokens, chosen by the estimated
    time of the double-buffered stream: group ``k + 1`` loads while group ``k``'s LINEAR runs, the barrier
    before each LINEAR waits for both, so the stream takes the first load, then per group the longer of its
    LINEAR and the next load, then the last LINEAR. A LINEAR of ``J`` tiles and ``c`` chunks takes ``c``
    rounds of ``max(J·T, hazard distance)`` cycles (a tile adds its chunks in order); a load of whole row
    tiles is one contiguous DMA row, a block of fewer chunks a row per tile. Groups of equal size (the last
    one no longer than the others) keep each load in step with the LINEAR it runs under and the stream's
    tail (the last LINEAR, under no load) short."""
    hazard = _hazard(config)
    beats_per_line = -(-config.lanes * config.storage_bytes // (config.axi_data_width // 8))

    def even(total, most):      # sizes of at most `most` that split `total` into as few equal parts
        return -(-total // -(-total // most))

    candidates = set()
    for c in range(1, min(half, chunks) + 1):
        c = even(chunks, c)
        J = min(tiles, half // c)
        if J:
            candidates.add((even(tiles, J), c))
    best = None
    for J, c in sorted(candidates):
        sizes = [(min(J, tiles - j), min(c, chunks - k)) for k in range(0, chunks, c) for j in range(0, tiles, J)]
        dma = [_GROUP_DMA_CYCLES + (1 if k == chunks else j) * _ROW_SETUP_CYCLES + j * k * beats_per_line
               for j, k in sizes]
        array = [_GROUP_ARRAY_CYCLES + k * max(j * tokens, hazard) for j, k in sizes]
        total = dma[0] + sum(max(a, d) for a, d in zip(array, dma[1:])) + array[-1]
        if best is None or total < best[0]:
            best = (total, J, c)
    return best[1], best[2]


def _load_group(emitter, area, matrix, group, address) -> None:
    j0, count, k0, k_count = group
    line_bytes = area.config.lanes * area.config.storage_bytes
    emitter.dma(isa.Load, memory_address=matrix.memory + (j0 * matrix.K + k0) * line_bytes, rows=count,
                row_elements=k_count * area.config.lanes, memory_row_stride=matrix.K * line_bytes,
                buffer=Buffer.WEIGHT, address=address, buffer_row_stride=k_count * area.config.lanes,
                compute=False)


def prefetch_weights(emitter: Emitter, area: WeightArea, matrix: Matrix, tokens: int, *,
                     rows: tuple[int, int] | None = None, chunks: tuple[int, int] | None = None,
                     taper: bool = False) -> None:
    """LOAD now the next weight group that ``emit_linear(matrix, rows=rows, chunks=chunks)`` (from an
    on-chip source) will stream, into the next half of the area, so the DMA streams it under the work in
    between; that call (with the same ``taper``) then starts from it. Called twice, it loads the first two
    groups (one per half).
    Nothing for a matrix kept in the weight buffer, nor when every half holds a prefetched group or one of
    another matrix."""
    if matrix.resident is not None or len(area.prefetched) >= area.halves:
        return
    rows, chunks = rows or (0, matrix.J), chunks or (0, matrix.K)
    groups = _groups(area, matrix, rows, chunks, tokens, taper)
    done = [entry for entry in area.prefetched if entry[0] == matrix.name]
    if len(done) != len(area.prefetched) or len(done) >= len(groups):
        return
    group = groups[len(done)]
    address = area.next_half()
    _load_group(emitter, area, matrix, group, address)
    area.prefetched.append((matrix.name, *group, address))


def _shift(operand, t: int):
    if isinstance(operand, InMemory):
        return replace(operand, address=operand.address + t * operand.row_stride)
    return replace(operand, address=operand.address + t * operand.token_stride)


def emit_linear(emitter: Emitter, area: WeightArea, matrix: Matrix, tokens: int, source, output: OnChip, *,
                rows: tuple[int, int] | None = None, chunks: tuple[int, int] | None = None,
                bias: OnChip | None = None, accumulate: bool = False, intra_operation: bool = True,
                taper: bool = False) -> None:
    """Row tiles ``rows`` of ``matrix`` times chunks ``chunks`` of ``source`` for ``tokens`` tokens into
    ``output`` (``accumulate``: add to the partial sums already there; otherwise start from ``bias`` or +0).
    ``taper``: a streamed matrix's last group in shrinking pieces (:func:`_groups`; for a program's last
    LINEAR).

    intra_operation False: one token at a time, so the matrix is fetched again for every token."""
    if not intra_operation and tokens > 1:
        for t in range(tokens):
            emit_linear(emitter, area, matrix, 1, _shift(source, t), _shift(output, t), rows=rows, chunks=chunks,
                        bias=bias, accumulate=accumulate)
        return
    rows = rows or (0, matrix.J)
    chunks = chunks or (0, matrix.K)
    if rows[0] >= rows[1] or chunks[0] >= chunks[1]:
        return
    C = area.config.array_cols
    if isinstance(source, InMemory):
        buffer, address, lines = area.staging
        group = max(1, lines * area.config.lanes // (tokens * C))
        size = area.config.compute_bytes if source.compute else area.config.storage_bytes
        for k0 in range(chunks[0], chunks[1], group):
            k1 = min(chunks[1], k0 + group)
            first, count = k0 * C, min(k1 * C, source.row_elements) - k0 * C
            emitter.dma(isa.Load, memory_address=source.address + first * size, rows=tokens, row_elements=count,
                        memory_row_stride=source.row_stride, buffer=buffer, address=address,
                        buffer_row_stride=(k1 - k0) * C, compute=source.compute)
            _weights(emitter, area, matrix, tokens, OnChip(buffer, address, (k1 - k0) * C, k0), output, rows,
                     (k0, k1), bias, accumulate or k0 > chunks[0], taper and k1 == chunks[1])
    else:
        _weights(emitter, area, matrix, tokens, source, output, rows, chunks, bias, accumulate, taper)


def _weights(emitter, area, matrix, tokens, vector, output, rows, chunks, bias, accumulate, taper=False):
    config = area.config
    R, C, P = config.array_rows, config.array_cols, config.lanes
    K = matrix.K
    if vector.token_stride % C or output.token_stride % R:
        raise AssertionError("token strides must be whole chunks and row tiles")

    def linear(matrix_address, j0, j_count, k0, k_count, partial):
        fields = dict(matrix_buffer=Buffer.WEIGHT, matrix_address=matrix_address, chunk_count=k_count,
                      row_tile_count=j_count, token_count=tokens, vector_buffer=vector.buffer,
                      vector_address=vector.address + (k0 - vector.first) * C,
                      vector_token_stride=vector.token_stride // C, output_buffer=output.buffer,
                      output_address=output.address + (j0 - output.first) * R,
                      output_token_stride=output.token_stride // R)
        if partial:
            fields.update(init=LinearInit.BIAS, bias_buffer=output.buffer, bias_address=fields["output_address"],
                          bias_token_stride=output.token_stride // R)
        elif bias is not None:
            fields.update(init=LinearInit.BIAS, bias_buffer=bias.buffer,
                          bias_address=bias.address + (j0 - bias.first) * R, bias_token_stride=0)
        emitter.emit(isa.Linear(**fields))

    (j_lo, j_hi), (k_lo, k_hi) = rows, chunks
    k_count = k_hi - k_lo
    if matrix.resident is not None:
        if k_count == K:
            linear(matrix.resident + j_lo * K * P, j_lo, j_hi - j_lo, 0, K, accumulate)
        else:
            for j in range(j_lo, j_hi):
                linear(matrix.resident + (j * K + k_lo) * P, j, 1, k_lo, k_count, accumulate)
        return
    prefetched, area.prefetched = area.prefetched, []
    # Groups of `step` row tiles x `c` chunks (all the chunks when a row tile's fit half the area). Chunk
    # blocks outer: a tile's next block comes after every other tile's (no wait on it), accumulating
    # through the bias path.
    groups = _groups(area, matrix, rows, chunks, tokens, taper)
    addresses = {}          # group index -> element address of its half, once loaded
    for entry in prefetched:
        if entry[0] == matrix.name and entry[1:5] in groups:
            addresses[groups.index(entry[1:5])] = entry[5]

    def load(index, address):
        _load_group(emitter, area, matrix, groups[index], address)
        addresses[index] = address
        area.half = (address - area.address) // (area.half_lines * area.config.lanes)

    for index, (j0, count, k0, k_count) in enumerate(groups):
        if index not in addresses:
            load(index, area.next_half())
        linear(addresses[index], j0, count, k0, k_count, accumulate or k0 > k_lo)
        # Two groups were prefetched: the one after the next goes into this one's half once this LINEAR
        # is done, so that each later load runs under a LINEAR as in plain double buffering.
        if index + 1 in addresses and index + 2 < len(groups) and index + 2 not in addresses:
            load(index + 2, addresses[index])


#: Chunks of the last piece a tapered stream ends with (:func:`_groups`).
_TAPER_CHUNKS = 2


def _groups(area: WeightArea, matrix: Matrix, rows, chunks, tokens: int, taper: bool = False) -> list:
    """The weight groups (first row tile, tiles, first chunk, chunks) :func:`emit_linear` streams, in order:
    the shape of :func:`_first_group`, chunk blocks outer. ``taper`` with few tokens (:func:`_few_tokens`):
    the last group cut into pieces of halving chunk counts, so that the stream ends with a short LINEAR
    (the program's last one runs under no load)."""
    (j_lo, j_hi), (k_lo, k_hi) = rows, chunks
    _, step, _, c = _first_group(area, matrix, rows, chunks, tokens)
    groups = [(j0, min(step, j_hi - j0), k0, min(c, k_hi - k0)) for k0 in range(k_lo, k_hi, c)
              for j0 in range(j_lo, j_hi, step)]
    if taper and len(groups) > 1 and _few_tokens(area, rows, chunks, tokens):
        j0, count, k0, c = groups.pop()
        while c > _TAPER_CHUNKS:
            piece = max(_TAPER_CHUNKS, c // 2)
            groups.append((j0, count, k0, piece))
            k0, c = k0 + piece, c - piece
        groups.append((j0, count, k0, c))
    return groups
