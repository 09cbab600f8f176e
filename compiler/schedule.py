"""Barrier insertion: the scheduling pass (the memory image moved to compiler/layout.py).

The machine runs DMA and compute instructions as two concurrent in-order streams (docs/isa.md); a
``BARRIER`` is needed exactly where an instruction of one stream touches a buffer element that the other
stream touched since the last barrier, one of them writing. :func:`insert_barriers` places the fewest
barriers that rule needs by tracking the touched elements, so a compiler writes its program as if it were
sequential and still gets all the DMA/compute overlap the rule allows.
"""

import torch

from marca import isa
from marca.config import MarcaConfig
from marca.golden.iss import access_indices

from .layout import MemoryImage, Region

__all__ = ["insert_barriers", "MemoryImage", "Region"]

_DMA = (isa.Load, isa.Gather, isa.Store)
_COMPUTE = (isa.Linear, isa.Elementwise, isa.Nonlinear)


def insert_barriers(instructions, config: MarcaConfig) -> list[isa.Instruction]:
    """``instructions`` with a ``BARRIER`` added before every instruction that would otherwise race with
    the other stream; existing barriers are kept, ``HALT`` needs none.

    Each stream's accesses since the last barrier are kept per (stream, read/write, buffer) as entries
    (first, last, element indices) with the bucket's bounding interval; a new access conflicts when it
    meets that interval, then one entry's interval, and the exact element sets intersect (the interval
    tests keep this fast on large buffers and long programs). The accesses of an instruction object are
    worked out once (the emitter hands out one object per distinct instruction)."""
    pending = {}          # (stream, kind, buffer) -> [low, high, entries]
    out = []
    known = {}            # id(instruction) -> (instruction, stream, other, touched)
    barrier = isa.Barrier()        # one object for every barrier added (none of the input's)
    for instruction in instructions:
        if isinstance(instruction, isa.Barrier):
            out.append(instruction)
            pending = {}
            continue
        seen = known.get(id(instruction))
        if seen is None:
            if not isinstance(instruction, _DMA + _COMPUTE):
                out.append(instruction)
                continue
            stream = "dma" if isinstance(instruction, _DMA) else "compute"
            other = "compute" if stream == "dma" else "dma"
            touched = [("write" if access.write else "read", access.buffer, _entry(access))
                       for access in isa.buffer_accesses(instruction, config)]
            # the instruction is kept with its accesses, so its id stays its own
            seen = known[id(instruction)] = (instruction, stream, other, touched)
        _, stream, other, touched = seen
        for kind, buffer, entry in touched:
            if (_conflicts(entry, pending.get((other, "write", buffer)))
                    or kind == "write" and _conflicts(entry, pending.get((other, "read", buffer)))):
                out.append(barrier)
                pending = {}
                break
        for kind, buffer, entry in touched:
            bucket = pending.get((stream, kind, buffer))
            if bucket is None:
                pending[(stream, kind, buffer)] = [entry[0], entry[1], [entry]]
            else:
                bucket[0], bucket[1] = min(bucket[0], entry[0]), max(bucket[1], entry[1])
                bucket[2].append(entry)
        out.append(instruction)
    return out


def _conflicts(entry, bucket) -> bool:
    if bucket is None or entry[1] < bucket[0] or bucket[1] < entry[0]:
        return False
    return any(_intersects(entry, previous) for previous in bucket[2])


def _entry(access: isa.BufferAccess):
    """``(first, last, indices)``; ``indices`` is None when the access covers every element from ``first``
    to ``last`` (the common case, recognised from its loop structure without listing them)."""
    span = access.extent
    loops = access.loops
    if len(loops) == 2:
        if loops[0][1] > loops[1][1]:
            loops = (loops[1], loops[0])
    elif len(loops) > 2:
        loops = sorted(loops, key=lambda loop: loop[1])
    dense = True
    for count, stride in loops:
        if count == 1 or stride == 0:
            continue
        if stride == span:
            span *= count
        else:
            dense = False
            break
    if dense:
        return access.address, access.address + span - 1, None
    indices = torch.unique(access_indices(access).flatten())
    return int(indices[0]), int(indices[-1]), indices


def _intersects(a, b) -> bool:
    """Whether two entries of the same buffer share an element."""
    first_a, last_a, indices_a = a
    first_b, last_b, indices_b = b
    if last_a < first_b or last_b < first_a:
        return False
    if indices_a is None and indices_b is None:
        return True
    low, high = max(first_a, first_b), min(last_a, last_b)
    if indices_a is None or indices_b is None:
        indices = indices_b if indices_a is None else indices_a
        return bool(((indices >= low) & (indices <= high)).any())
    window_a = indices_a[(indices_a >= low) & (indices_a <= high)]
    window_b = indices_b[(indices_b >= low) & (indices_b <= high)]
    return bool(torch.isin(window_a, window_b).any())
