"""GATHER (embedding lookup, docs/isa.md): the golden ISS against an independent expectation (table rows
picked by id in Python, converted by the format golden model), its errors and their order, its counters,
the hazard rule; then the RTL against the ISS in Verilator (directed gather programs with random AXI
pauses, every error, random programs rich in gathers; tb/accelerator.py ``gathers``)."""

import dataclasses
import json

import pytest
import torch

from marca import isa
from marca.config import PRESETS, TINY
from marca.golden import fp, iss
from marca.golden.random_program import random_program
from marca.isa import Buffer, ErrorCode, MemoryFormat

# One preset per distinct (compute, storage) format pair of the presets: the smallest buffers of each.
FORMAT_PRESETS = {}
for _config in sorted(PRESETS.values(), key=lambda c: sum(isa.buffer_elements(c, b) for b in Buffer)):
    FORMAT_PRESETS.setdefault((_config.compute_format, _config.storage_format), _config.name)

TABLE = 0x4000
IDS = 0x3000
OUT = 0x8000


def _image(config, table_bits, ids, *, compute=False, size=0xC000):
    """Memory with ``table_bits`` ([rows, elements] bit patterns) at TABLE, rows ``stride`` bytes apart,
    and the uint32 ``ids`` at IDS."""
    memory = bytearray(size)
    element_bytes = config.compute_bytes if compute else config.storage_bytes
    data = iss.pack_elements(table_bits, element_bytes)
    memory[TABLE:TABLE + len(data)] = data
    raw = b"".join(int(i).to_bytes(4, "little") for i in ids)
    memory[IDS:IDS + len(raw)] = raw
    return memory


def _run(config, memory, program):
    code = isa.encode_program(program + [isa.Halt()])
    memory[:len(code)] = code
    return iss.run_program(config, memory)


def _stored(config, machine, rows, elements):
    """The buffer rows as the program stored them (compute format, exact)."""
    data = machine.memory_bytes()[OUT:OUT + rows * elements * config.compute_bytes]
    bits = iss.unpack_elements(data, config.compute_bytes, config.compute_format.width)
    return bits.reshape(rows, elements)


@pytest.mark.parametrize("name", sorted(FORMAT_PRESETS.values()))
@pytest.mark.parametrize("memory_format", list(MemoryFormat), ids=lambda f: f.name.lower())
def test_gather_picks_rows_by_id(name, memory_format):
    """Every preset's formats (FORMAT_PRESETS), both memory formats: repeated ids, id 0 and id table_rows-1, a row stride
    wider than the row; the buffer rows equal the table rows named by the ids, converted as LOAD does."""
    config = PRESETS[name]
    compute = memory_format == MemoryFormat.COMPUTE
    fmt = config.compute_format if compute else config.storage_format
    element_bytes = config.compute_bytes if compute else config.storage_bytes
    table_rows, elements, pad = 9, 5, 3
    generator = torch.Generator().manual_seed(len(name) + 10 * int(memory_format))
    table = fp.random_bits(table_rows * (elements + pad), fmt, generator).reshape(table_rows, elements + pad)
    ids = [3, 0, 8, 3, 3, 5, 8]
    memory = _image(config, table, ids, compute=compute)
    gather = isa.Gather(memory_address=TABLE, row_count=len(ids), row_elements=elements,
                        memory_row_stride=(elements + pad) * element_bytes, buffer=Buffer.SCRATCH,
                        buffer_address=7, buffer_row_stride=elements, memory_format=memory_format,
                        index_address=IDS, table_rows=table_rows)
    store = isa.Store(memory_address=OUT, row_count=len(ids), row_elements=elements,
                      memory_row_stride=elements * config.compute_bytes, buffer=Buffer.SCRATCH,
                      buffer_address=7, buffer_row_stride=elements, memory_format=MemoryFormat.COMPUTE)
    result, machine = _run(config, memory, [gather, store])
    assert result.error == ErrorCode.NONE, result
    expected = fp.convert(table[ids, :elements], fmt, config.compute_format)
    assert torch.equal(_stored(config, machine, len(ids), elements), expected)
    assert result.counters["load_instructions"] == 1
    assert result.counters["dma_bytes_read"] == len(ids) * (4 + elements * element_bytes)


def test_overlapping_buffer_rows_keep_the_last():
    config = TINY
    table = torch.arange(4 * 4, dtype=torch.int64).reshape(4, 4) + 0x3C00     # fp16 1.0, 1.0009, ...
    memory = _image(config, table, [1, 2, 3])
    gather = isa.Gather(memory_address=TABLE, row_count=3, row_elements=4, memory_row_stride=8,
                        buffer=Buffer.STATE, buffer_address=0, buffer_row_stride=2, index_address=IDS,
                        table_rows=4)
    store = isa.Store(memory_address=OUT, row_count=1, row_elements=8, buffer=Buffer.STATE,
                      memory_format=MemoryFormat.COMPUTE)
    result, machine = _run(config, memory, [gather, store])
    assert result.error == ErrorCode.NONE
    assert _stored(config, machine, 1, 8).tolist() == [[*table[1, :2].tolist(), *table[2, :2].tolist(),
                                                        *table[3].tolist()]]


@pytest.mark.parametrize("bad_id", [5, 6, 0xFFFF_FFFF])
def test_id_outside_the_table_halts_with_index_range(bad_id):
    config = TINY
    table = torch.zeros(5, 4, dtype=torch.int64)
    memory = _image(config, table, [4, 0, bad_id, 1])
    load = isa.Load(memory_address=TABLE, row_count=1, row_elements=4, buffer=Buffer.STATE)
    gather = isa.Gather(memory_address=TABLE, row_count=4, row_elements=4, memory_row_stride=8,
                        buffer=Buffer.STATE, index_address=IDS, table_rows=5)
    result, _ = _run(config, memory, [load, gather, isa.Barrier()])
    assert (result.error, result.error_pc) == (ErrorCode.INDEX_RANGE, 32)
    assert result.counters["instructions"] == 1 and result.counters["load_instructions"] == 1
    # Three ids, the bad one not among them: fine.
    result, _ = _run(config, memory, [load, dataclasses.replace(gather, row_count=2)])
    assert result.error == ErrorCode.NONE


def test_static_errors():
    config = TINY
    memory = _image(config, torch.zeros(4, 4, dtype=torch.int64), [0, 1])
    gather = isa.Gather(memory_address=TABLE, row_count=2, row_elements=4, memory_row_stride=8,
                        buffer=Buffer.STATE, index_address=IDS, table_rows=4)
    for changes, code in [({"index_address": IDS + 2}, ErrorCode.MISALIGNED),
                          ({"memory_row_stride": 7}, ErrorCode.MISALIGNED),
                          ({"buffer_address": isa.buffer_elements(config, Buffer.STATE) - 4,
                            "buffer_row_stride": 4}, ErrorCode.BUFFER_RANGE),
                          ({"memory_row_stride": 1 << 31}, ErrorCode.MEMORY_RANGE),   # the 4th row
                          ({"index_address": (1 << 32) - 4}, ErrorCode.MEMORY_RANGE)]:
        result, _ = _run(config, bytearray(memory), [isa.Barrier(), dataclasses.replace(gather, **changes)])
        assert (result.error, result.error_pc) == (code, 32), changes


def test_runtime_error_order_follows_the_rows():
    """Rows go in order (id, range check, table row); the first failing row decides the error. A table
    that reaches beyond memory is fine while the ids name rows inside it."""
    config = TINY
    size = 0xC000
    rows_in_memory = (size - TABLE) // 8
    memory = _image(config, torch.zeros(4, 4, dtype=torch.int64), [0, 1], size=size)
    gather = isa.Gather(memory_address=TABLE, row_count=2, row_elements=4, memory_row_stride=8,
                        buffer=Buffer.STATE, index_address=IDS, table_rows=rows_in_memory + 10)

    def error(ids, **changes):
        image = bytearray(memory)
        raw = b"".join(int(i).to_bytes(4, "little") for i in ids)
        image[IDS:IDS + len(raw)] = raw
        result, _ = _run(config, image, [dataclasses.replace(gather, row_count=len(ids), **changes)])
        return result.error

    beyond, outside = rows_in_memory + 1, rows_in_memory + 10
    assert error([0, rows_in_memory - 1]) == ErrorCode.NONE
    assert error([0, beyond]) == ErrorCode.BUS_ERROR
    assert error([0, outside, beyond]) == ErrorCode.INDEX_RANGE
    assert error([0, beyond, outside]) == ErrorCode.BUS_ERROR
    # The id array runs off the end of memory: its second id is unreadable.
    tail = isa.Gather(memory_address=TABLE, row_count=2, row_elements=4, memory_row_stride=8,
                      buffer=Buffer.STATE, index_address=size - 4, table_rows=1)
    result, _ = _run(config, bytearray(memory), [tail])
    assert result.error == ErrorCode.BUS_ERROR                       # id 0 (= 0) is fine, id 1 unreadable
    result, _ = _run(config, bytearray(memory), [dataclasses.replace(tail, index_address=size - 8)])
    assert result.error == ErrorCode.NONE


def test_gather_needs_a_barrier_before_compute_reads_it():
    config = TINY
    lanes = config.lanes
    memory = _image(config, torch.full((2, lanes), 0x3C00, dtype=torch.int64), [1])
    gather = isa.Gather(memory_address=TABLE, row_count=1, row_elements=lanes, memory_row_stride=2 * lanes,
                        buffer=Buffer.ACTIVATION, index_address=IDS, table_rows=2)
    use = isa.Nonlinear(line_count=1, src_buffer=Buffer.ACTIVATION, dst_buffer=Buffer.SCRATCH)
    with pytest.raises(iss.ProgramError, match="barrier"):
        _run(config, bytearray(memory), [gather, use])
    result, _ = _run(config, bytearray(memory), [gather, isa.Barrier(), use])
    assert result.error == ErrorCode.NONE


def test_random_programs_contain_gathers_and_index_range_tails():
    config = TINY
    gathers = 0
    for seed in range(2):
        generated = random_program(config, seed=seed, length=30)
        gathers += sum(isinstance(i, isa.Gather) for i in generated.instructions)
        result, _ = iss.run_program(config, generated.memory)
        assert result.error == ErrorCode.NONE, result
    assert gathers >= 2
    generated = random_program(config, seed=5, length=10, final_error=ErrorCode.INDEX_RANGE)
    result, _ = iss.run_program(config, generated.memory)
    assert isinstance(generated.instructions[-1], isa.Gather)
    assert (result.error, result.error_pc) == (ErrorCode.INDEX_RANGE, 32 * (len(generated.instructions) - 1))


# The accelerator in Verilator ------------------------------------------------------------------------------

# As tests/test_accelerator.py's MIXED (equal Verilog, so the build is shared): fp32 compute, bf16 storage
# (two DMA engines), a 64-bit bus (two ids per beat).
MIXED = dataclasses.replace(TINY, name="mixed", array_rows=2, array_cols=2, compute_format="fp32",
                            storage_format="bf16", axi_data_width=64, weight_buffer_kib=2,
                            activation_buffer_kib=2, state_buffer_kib=2, scratch_buffer_kib=2)


@pytest.mark.verilator
@pytest.mark.parametrize("config", [TINY, MIXED], ids=lambda c: c.name)
def test_gather_rtl_matches_iss(config, tmp_path):
    """tb/accelerator.py ``gathers``: directed gather programs (every error included) and random programs
    rich in gathers, random pauses on every AXI channel; memory image, error code and pc, counters equal
    to the ISS."""
    from marca.hw.accelerator import Accelerator

    from marca import sim
    verilog = sim.emit_verilog(Accelerator(config), "accelerator")
    build_dir = sim.build(verilog, "accelerator", label=f"accelerator-{config.name}")
    params = dict(config=config.to_dict(), pause=0.3, seed=3, programs=2, length=20, gathers=True)
    sim.run(build_dir, "accelerator", "marca.tb.accelerator", params=params, testcase="gathers",
            name="gathers")
    # Cycles from start to done of a LOAD and a GATHER of the same rows (docs/shell.md quotes them: run
    # with -s to see them).
    out = tmp_path / "gather_cost.json"
    sim.run(build_dir, "accelerator", "marca.tb.accelerator", params=dict(params, out=str(out)),
            testcase="gather_cost", name="gather-cost")
    cycles = json.loads(out.read_text())
    print(f"{config.name}: {cycles}")
    for key, value in cycles.items():
        if key.startswith("gather"):
            assert value > cycles[key.replace("gather", "load")]     # the ids cost something
