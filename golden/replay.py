"""Replay: a straight-line program the golden ISS has run once, run again as one compiled loop.

A model's programs are straight-line code whose every buffer and memory address is fixed when it is
compiled (only ``GATHER``'s table rows depend on data: the token ids). A host that runs the same program
again and again (a prefill chunk after chunk, a decode step per token) pays the ISS's per-instruction
Python work every time: on a 2x2 array, ~17,000 instructions of a few lanes each per token of the trained
byte model, ~0.3 CPU s per byte (docs/iss.md). :class:`Trace` lowers the program once into index tables
(each distinct instruction object once: a model program repeats a few thousand of them millions of times)
and :meth:`Trace.run` executes it in one numba call, on the machine's memory image.

Scope: compute and storage formats of 16 bits (the 2x2 presets ``fpga-small`` and ``tiny``, where the
fixed cost dominates), on the CPU. The arithmetic is the fast ISS's (docs/iss.md): values in float64,
each product and sum rounded once by the contract (:func:`marca.golden.kernels._round`), the 16-bit
NONLINEAR and the memory formats by tables over every bit pattern built from the golden models. What it
leaves out: the hazard and undefined-read checks, which depend only on the instruction sequence (fixed) and
were made when the ISS ran the program (:class:`marca.compiler.model.ModelSession` records a trace only
from a run that ended without error); ``GATHER``'s id checks stay (they depend on data) and raise.

Exactness: tests/test_replay.py holds a replay equal to the ISS, memory image and buffers, on random
programs and on the compiled model's prefill and decode programs of both presets, and shows that a replay
with a wrong op or rounding differs.
"""

import math

import numba
import numpy as np
import torch
from numba.core import types
from numba.extending import intrinsic

from marca import isa
from marca.isa import Buffer, LinearInit

from . import fp
from .iss import _NONLINEAR_GOLDEN, access_indices

__all__ = ["Trace"]

_LOAD, _STORE, _GATHER, _LINEAR, _ELEMENTWISE, _NONLINEAR = range(6)
_FIELDS = 12
_WRITES = {_LOAD: 1, _GATHER: 0, _LINEAR: 2, _ELEMENTWISE: 0, _NONLINEAR: 1}
"""Which index array of a lowered instruction holds the buffer elements it writes."""


@intrinsic
def _bits_of(typingctx, x):
    """The IEEE bit pattern of a float64 as an int64 (a bit cast, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))
    return types.int64(types.float64), codegen


@intrinsic
def _float_of(typingctx, w):
    """The float64 whose bit pattern is the int64 ``w``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))
    return types.float64(types.int64), codegen


@numba.njit(cache=True, inline="always")
def _round(x, drop, emax, emin):
    """float64 ``x`` rounded by the contract to a format with ``53 - drop`` significant bits: nearest even
    with an unbounded exponent, then ±Inf above ``2^emax``'s binade and a signed zero below ``2^emin``,
    both on the rounded magnitude (``fp.round_values`` on one value: the significand rounded in the integer
    domain, a carry moving into the exponent; every float64 here is normal or zero)."""
    w = _bits_of(x)
    magnitude = w & 0x7FFFFFFFFFFFFFFF
    if magnitude >= 0x7FF0000000000000 or magnitude == 0:      # Inf, NaN, ±0
        return x
    magnitude += ((np.int64(1) << (drop - 1)) - 1) + ((magnitude >> drop) & 1)
    magnitude = (magnitude >> drop) << drop
    exponent = (magnitude >> 52) - 1023
    if exponent > emax:
        magnitude = np.int64(0x7FF0000000000000)
    elif exponent < emin:
        magnitude = np.int64(0)
    return _float_of(magnitude | (w & np.int64(-0x8000000000000000)))


@numba.njit(cache=True, inline="always")
def _encode(x, man_bits, bias, exp_max, width, canonical_nan):
    """The bit pattern of a value already representable in the format (or ±0, ±Inf, NaN)."""
    if math.isnan(x):
        return canonical_nan
    sign = np.int64(1) if math.copysign(1.0, x) < 0 else np.int64(0)
    magnitude = abs(x)
    top = sign << (width - 1)
    if magnitude == 0.0:
        return top
    if math.isinf(magnitude):
        return top | (exp_max << man_bits)
    fraction, exponent = math.frexp(magnitude)          # magnitude = fraction * 2^exponent, [0.5, 1)
    significand = np.int64(math.ldexp(fraction, man_bits + 1))
    return top | ((exponent - 1 + bias) << man_bits) | (significand - (np.int64(1) << man_bits))


@numba.njit(cache=True)
def _replay(sequence, meta, pool, memory, values, load, nonlinear, rounding, encoding, work):
    """Execute ``sequence`` (ids of rows of ``meta``) on ``memory`` (uint8) and ``values`` (float64, the
    four buffers end to end). ``load[f]``: the compute value a LOAD makes of each bit pattern of memory
    format ``f`` (0 storage, 1 compute); ``nonlinear[function]``: the value of each compute pattern's
    result; ``rounding[f]`` = (dropped float64 bits, emax, emin), ``encoding[f]`` = (man_bits, bias,
    exp_max, width, canonical NaN). Returns 0, or ``-(row + 1)`` of a GATHER whose id fails."""
    cb, co, cu = rounding[1, 0], rounding[1, 1], rounding[1, 2]
    c_man, c_bias, c_max, c_width, c_nan = encoding[1, 0], encoding[1, 1], encoding[1, 2], encoding[1, 3], \
        encoding[1, 4]
    memory_size = memory.shape[0]
    for step in range(sequence.shape[0]):
        row = meta[sequence[step]]
        kind, base, n = row[0], row[1], row[2]
        if kind == _LOAD:                       # 16-bit formats: 2-byte memory elements
            f = row[4]
            for e in range(n):
                address = pool[base + e]
                bits = np.int64(memory[address]) | (np.int64(memory[address + 1]) << 8)
                values[pool[base + n + e]] = load[f, bits]
        elif kind == _STORE:
            f = row[4]
            for e in range(n):
                value = _round(values[pool[base + e]], rounding[f, 0], rounding[f, 1], rounding[f, 2])
                bits = _encode(value, encoding[f, 0], encoding[f, 1], encoding[f, 2], encoding[f, 3],
                               encoding[f, 4])
                address = pool[base + n + e]
                memory[address] = bits & 0xFF
                memory[address + 1] = (bits >> 8) & 0xFF
        elif kind == _GATHER:
            size, f, rows, width = row[3], row[4], row[5], row[6]
            table, stride, ids, table_rows = row[7], row[8], row[9], row[10]
            for r in range(rows):
                at = ids + 4 * r
                if at + 4 > memory_size:
                    return -(r + 1)
                token = np.int64(memory[at]) | (np.int64(memory[at + 1]) << 8) | \
                    (np.int64(memory[at + 2]) << 16) | (np.int64(memory[at + 3]) << 24)
                start = table + token * stride
                if token >= table_rows or start + width * size > memory_size:
                    return -(r + 1)
                for e in range(width):
                    address = start + e * size
                    bits = np.int64(memory[address]) | (np.int64(memory[address + 1]) << 8)
                    values[pool[base + r * width + e]] = load[f, bits]
        elif kind == _LINEAR:
            T, J, K, R, C, bias = row[3], row[4], row[5], row[6], row[7], row[8]
            matrix, vector = base, base + J * K * R * C
            output = vector + T * K * C
            biases = output + T * J * R
            count = 0
            for t in range(T):
                for j in range(J):
                    for r in range(R):
                        acc = values[pool[biases + count]] if bias else 0.0
                        for k in range(K):
                            for c in range(C):
                                work[c] = _round(values[pool[matrix + ((j * K + k) * R + r) * C + c]]
                                                 * values[pool[vector + (t * K + k) * C + c]], cb, co, cu)
                            width = C
                            while width > 1:
                                width //= 2
                                for c in range(width):
                                    work[c] = _round(work[2 * c] + work[2 * c + 1], cb, co, cu)
                            acc = _round(acc + work[0], cb, co, cu)
                        work[C + count] = acc
                        count += 1
            for e in range(count):
                values[pool[output + e]] = work[C + e]
        elif kind == _ELEMENTWISE:
            op = row[3]
            for e in range(n):
                a = values[pool[base + n + e]]
                b = values[pool[base + 2 * n + e]]
                c = values[pool[base + 3 * n + e]]
                if op == 0:                                     # PASS
                    result = a
                elif op == 1:                                   # MUL
                    result = _round(a * b, cb, co, cu)
                elif op == 2:                                   # ADD
                    result = _round(a + b, cb, co, cu)
                elif op == 3:                                   # SUB
                    result = _round(a - b, cb, co, cu)
                elif op == 4:                                   # MULADD: two roundings
                    result = _round(_round(a * b, cb, co, cu) + c, cb, co, cu)
                elif op == 5 or op == 6:                        # MIN, MAX: -0 < +0, NaN wins
                    if math.isnan(a) or math.isnan(b):
                        result = math.nan
                    elif a == 0.0 and b == 0.0:
                        negative_a = math.copysign(1.0, a) < 0
                        result = (a if negative_a else b) if op == 5 else (b if negative_a else a)
                    else:
                        result = min(a, b) if op == 5 else max(a, b)
                else:                                           # CMP_SELECT
                    result = c if a < b else a
                work[e] = result
            for e in range(n):
                values[pool[base + e]] = work[e]
        else:                                                   # NONLINEAR
            function = row[3]
            for e in range(n):
                bits = _encode(values[pool[base + e]], c_man, c_bias, c_max, c_width, c_nan)
                work[e] = nonlinear[function, bits]
            for e in range(n):
                values[pool[base + n + e]] = work[e]
    return 0


def _indices(access: isa.BufferAccess, bases: dict) -> np.ndarray:
    return (access_indices(access) + bases[access.buffer]).numpy()


class Trace:
    """A program lowered for :meth:`run`: ``instructions`` as the ISS ran them (straight-line, in order,
    HALT last) and the ``counters`` of that run, which every replay reports (they depend only on the
    instructions)."""

    def __init__(self, config, instructions, counters: dict):
        formats = (config.storage_format, config.compute_format)
        for name, fmt in zip(("storage_format", "compute_format"), formats):
            if fmt.width != 16:
                raise ValueError(f"replay needs 16-bit formats; {config.name}'s {name} is {fmt.width}-bit")
        self.config = config
        self.counters = dict(counters)
        lanes = config.lanes
        self.bases, total = {}, 0
        for buffer in Buffer:
            self.bases[buffer] = total
            total += isa.buffer_elements(config, buffer)
        self.elements = total
        patterns = torch.arange(1 << 16, dtype=torch.int64)
        # A LOAD's value of each memory pattern: read (subnormals to zeros, NaNs to NaN), rounded to compute.
        self.load = np.stack([fp.round_values(fp.decode(patterns, fmt), config.compute_format).double().numpy()
                              for fmt in formats])
        self.rounding = np.array([(52 - fmt.man_bits, fmt.emax, fmt.emin) for fmt in formats], dtype=np.int64)
        self.encoding = np.array([(fmt.man_bits, fmt.bias, fmt.exp_max, fmt.width, fmt.canonical_nan)
                                  for fmt in formats], dtype=np.int64)
        functions = max(int(f) for f in _NONLINEAR_GOLDEN) + 1
        self.nonlinear = np.full((functions, 1 << 16), np.nan)
        for function, golden in _NONLINEAR_GOLDEN.items():
            self.nonlinear[int(function)] = fp.decode(golden(patterns, config), config.compute_format).numpy()

        rows, pool, written, ids = [], [], np.zeros(total, dtype=bool), {}
        size = 0
        sequence = []
        largest = 1
        for instruction in instructions:
            key = id(instruction)
            if key not in ids:
                row, parts = self._lower(instruction, lanes)
                if row is None:
                    ids[key] = -1
                else:
                    ids[key] = len(rows)
                    row[1] = size
                    rows.append(row)
                    pool.extend(parts)
                    size += sum(len(p) for p in parts)
                    largest = max(largest, row[2])       # results held until all are computed
                    if row[0] in _WRITES:
                        written[parts[_WRITES[row[0]]]] = True
            if ids[key] >= 0:
                sequence.append(ids[key])
        self._instructions = instructions          # ids stay valid while the objects live
        self.meta = np.array(rows, dtype=np.int64).reshape(-1, _FIELDS)
        self.pool = np.concatenate(pool).astype(np.int64) if pool else np.zeros(0, dtype=np.int64)
        self.sequence = np.array(sequence, dtype=np.int32)
        self.written = written
        self._scratch = np.empty(largest + config.array_cols, dtype=np.float64)

    def _lower(self, i, lanes):
        """(meta row, index arrays) of one instruction; (None, None) for BARRIER and HALT."""
        config, bases = self.config, self.bases
        row = [0] * _FIELDS
        if isinstance(i, (isa.Load, isa.Store)):
            memory_format = 1 if i.memory_format == isa.MemoryFormat.COMPUTE else 0
            size = isa.memory_element_bytes(i, config)
            rows_ = np.arange(i.row_count)[:, None]
            elements = np.arange(i.row_elements)[None, :]
            memory = (i.memory_address + rows_ * i.memory_row_stride + elements * size).ravel()
            buffer = (bases[i.buffer] + i.buffer_address + rows_ * i.buffer_row_stride + elements).ravel()
            row[0] = _LOAD if isinstance(i, isa.Load) else _STORE
            row[2:5] = [len(memory), size, memory_format]
            return row, ([memory, buffer] if isinstance(i, isa.Load) else [buffer, memory])
        if isinstance(i, isa.Gather):
            size = isa.memory_element_bytes(i, config)
            rows_ = np.arange(i.row_count)[:, None]
            elements = np.arange(i.row_elements)[None, :]
            buffer = (bases[i.buffer] + i.buffer_address + rows_ * i.buffer_row_stride + elements).ravel()
            row[0] = _GATHER
            row[2:11] = [len(buffer), size, 1 if i.memory_format == isa.MemoryFormat.COMPUTE else 0,
                         i.row_count, i.row_elements, i.memory_address, i.memory_row_stride, i.index_address,
                         i.table_rows]
            return row, [buffer]
        if isinstance(i, isa.Linear):
            accesses = {a.name: a for a in isa.buffer_accesses(i, config)}
            T, J, K = i.token_count, i.row_tile_count, i.chunk_count
            parts = [_indices(accesses[name], bases).ravel() for name in ("matrix", "vector", "output")]
            has_bias = i.init == LinearInit.BIAS
            if has_bias:
                parts.append(_indices(accesses["bias"], bases).ravel())
            row[0] = _LINEAR
            row[2:9] = [T * J * config.array_rows, T, J, K, config.array_rows, config.array_cols, int(has_bias)]
            return row, parts
        if isinstance(i, isa.Elementwise):
            accesses = {a.name: a for a in isa.buffer_accesses(i, config)}
            C = config.array_cols
            lane = np.arange(lanes)
            offsets = {isa.Broadcast.LANE: lane, isa.Broadcast.ROW: lane // C, isa.Broadcast.COLUMN: lane % C,
                       isa.Broadcast.SCALAR: np.zeros_like(lane)}
            dst = _indices(accesses["dst"], bases).ravel()
            parts = [dst]
            for name in ("a", "b", "c"):
                if name in accesses:
                    start = access_indices(accesses[name]._replace(extent=1)).numpy()
                    index = start + offsets[getattr(i, f"{name}_broadcast")] + bases[getattr(i, f"{name}_buffer")]
                    parts.append(index.ravel())
                else:
                    parts.append(np.zeros(len(dst), dtype=np.int64))
            row[0] = _ELEMENTWISE
            row[2:4] = [len(dst), int(i.op)]
            return row, parts
        if isinstance(i, isa.Nonlinear):
            accesses = {a.name: a for a in isa.buffer_accesses(i, config)}
            src, dst = (_indices(accesses[name], bases).ravel() for name in ("src", "dst"))
            row[0] = _NONLINEAR
            row[2:4] = [len(src), int(i.function)]
            return row, [src, dst]
        if isinstance(i, (isa.Barrier, isa.Halt)):
            return None, None
        raise ValueError(f"replay cannot lower {type(i).__name__}")

    def run(self, machine) -> dict:
        """Replay the program on ``machine`` (a :class:`marca.golden.iss.Machine` on the CPU, just
        restarted): its memory image changes as the ISS would change it, its buffers and written flags end
        as the ISS would leave them; returns the counters."""
        if machine.config != self.config or machine.device.type != "cpu":
            raise ValueError("a trace replays on a CPU machine of the configuration it was recorded for")
        values = np.full(self.elements, machine._fill_value, dtype=np.float64)
        failed = _replay(self.sequence, self.meta, self.pool, machine._memory_host, values, self.load,
                         self.nonlinear, self.rounding, self.encoding, self._scratch)
        if failed:
            raise RuntimeError(f"replay: a GATHER's id {-failed - 1} is outside its table or the memory")
        for buffer in Buffer:
            start = self.bases[buffer]
            stop = start + isa.buffer_elements(self.config, buffer)
            machine.values[buffer].copy_(torch.from_numpy(values[start:stop].astype(np.float32)))
            machine.written[buffer][:] = self.written[start:stop]
        machine.counters = dict(self.counters)
        return dict(self.counters)
