"""The instruction-set definition: encoding round trips, decode errors, assembly text, legality rules, and
docs/isa.md being up to date with the definition."""

import random
from pathlib import Path

import pytest

from marca import isa
from marca.config import DEFAULT, FPGA_SMALL, PAPER, TINY
from marca.isa import Buffer, ErrorCode, IllegalInstruction, Opcode
from marca.ops import Broadcast, ElementwiseOp

DOC = Path(__file__).resolve().parent.parent / "docs" / "isa.md"


def random_instruction(rng: random.Random) -> isa.Instruction:
    """Any legal-by-decode instruction: random values in every field."""
    while True:
        cls = rng.choice(list(isa.INSTRUCTION_TYPES.values()))
        values = {}
        for layout in isa.field_layout(cls.OPCODE):
            if layout.kind is not None:
                values[layout.name] = rng.choice(list(layout.kind))
            else:
                values[layout.name] = rng.choice([0, 1, rng.getrandbits(layout.width),
                                                  (1 << layout.width) - 1])
        instruction = cls(**values)
        try:
            isa.encode(instruction)
        except IllegalInstruction:
            continue
        return instruction


def test_layouts_fit_and_do_not_overlap():
    for opcode in Opcode:
        used = set(range(isa.OPCODE_BITS))
        for field in isa.field_layout(opcode):
            bits = set(range(field.lsb, field.msb + 1))
            assert not bits & used, (opcode, field)
            used |= bits
            if field.kind is not None:
                assert max(field.kind) < 1 << field.width
        assert max(used) < isa.INSTRUCTION_BITS


def test_encode_decode_round_trip():
    rng = random.Random(1)
    for _ in range(2000):
        instruction = random_instruction(rng)
        word = isa.encode(instruction)
        assert word & 0xFF == instruction.OPCODE
        assert isa.decode(word) == instruction
        assert isa.parse_instruction(isa.format_instruction(instruction)) == instruction


def test_program_bytes_and_assembly_round_trip():
    rng = random.Random(2)
    program = [random_instruction(rng) for _ in range(50)]
    data = isa.encode_program(program)
    assert len(data) == 50 * isa.INSTRUCTION_BYTES
    assert isa.decode_program(data) == program
    text = isa.disassemble(data)
    assert isa.assemble("# a comment\n\n" + text) == program
    # Little-endian: the opcode is the first byte of each word.
    assert [data[k * isa.INSTRUCTION_BYTES] for k in range(50)] == [int(i.OPCODE) for i in program]


def test_assembly_example():
    text = """
        LOAD memory_address=0x100 row_count=2 row_elements=8 memory_row_stride=16 buffer=ACTIVATION
        ELEMENTWISE op=MULADD outer_count=1 inner_count=4 dst_buffer=STATE dst_inner_stride=1 \
a_buffer=STATE a_inner_stride=1 b_broadcast=ROW c_buffer=SCRATCH c_broadcast=SCALAR  # in place
        HALT
    """.replace("\\\n", "")
    program = isa.assemble(text)
    assert program[0] == isa.Load(memory_address=0x100, row_count=2, row_elements=8, memory_row_stride=16,
                                  buffer=Buffer.ACTIVATION)
    assert program[1].op == ElementwiseOp.MULADD and program[1].b_broadcast == Broadcast.ROW
    assert isinstance(program[2], isa.Halt)
    with pytest.raises(ValueError, match="line 1: unknown opcode"):
        isa.assemble("JUMP 3")
    with pytest.raises(ValueError, match="bad field"):
        isa.assemble("HALT x=1")
    with pytest.raises(ValueError, match="not a Buffer"):
        isa.assemble("LOAD buffer=DRAM")


@pytest.mark.parametrize("word, code", [
    (0, ErrorCode.ILLEGAL_OPCODE),
    (0x09, ErrorCode.ILLEGAL_OPCODE),
    (0xFF | (1 << 100), ErrorCode.ILLEGAL_OPCODE),
    (int(Opcode.HALT) | (1 << 8), ErrorCode.ILLEGAL_FIELD),                  # reserved bit
    (int(Opcode.BARRIER) | (1 << 255), ErrorCode.ILLEGAL_FIELD),
])
def test_decode_errors(word, code):
    with pytest.raises(IllegalInstruction) as info:
        isa.decode(word)
    assert info.value.code == code


def _word(instruction_type, **overrides) -> int:
    """Encode fields without the legality check (to build illegal words)."""
    word = int(instruction_type.OPCODE)
    for layout in isa.field_layout(instruction_type.OPCODE):
        word |= int(overrides.get(layout.name, 1 if "count" in layout.name else 0)) << layout.lsb
    return word


@pytest.mark.parametrize("instruction_type, overrides", [
    (isa.Elementwise, {"op": 9, "dst_buffer": 1}),                   # undefined ElementwiseOp
    (isa.Elementwise, {"op": int(ElementwiseOp.FUNCTION), "dst_buffer": 1}),
    (isa.Elementwise, {"dst_buffer": 0}),                             # compute writes the weight buffer
    (isa.Elementwise, {"inner_count": 0, "dst_buffer": 1}),           # zero count
    (isa.Nonlinear, {"function": 4, "dst_buffer": 1}),               # undefined NonlinearFunction
    (isa.Linear, {"output_buffer": 1, "token_count": 0}),
    (isa.Load, {"row_elements": 0}),
    (isa.Gather, {"table_rows": 0, "row_elements": 1}),               # an empty table
    (isa.Gather, {"row_count": 0, "row_elements": 1, "table_rows": 1}),
])
def test_illegal_fields(instruction_type, overrides):
    with pytest.raises(IllegalInstruction) as info:
        isa.decode(_word(instruction_type, **overrides))
    assert info.value.code == ErrorCode.ILLEGAL_FIELD
    # and the same word with the field repaired decodes
    repaired = {**overrides, "op": 1, "function": 0, "dst_buffer": 1, "output_buffer": 1,
                "inner_count": 1, "token_count": 1, "row_elements": 1, "row_count": 1, "table_rows": 1}
    isa.decode(_word(instruction_type, **{k: v for k, v in repaired.items() if k in overrides}))


def test_encode_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="row_count"):
        isa.encode(isa.Load(row_count=1 << 16, row_elements=1))
    with pytest.raises(IllegalInstruction):
        isa.encode(isa.Nonlinear(line_count=1, dst_buffer=Buffer.WEIGHT))


def test_check_instruction():
    config = DEFAULT                                  # 8 x 8, fp32 compute, bf16 storage
    lanes = config.lanes
    ok = isa.Elementwise(op=ElementwiseOp.ADD, outer_count=2, inner_count=3, dst_buffer=Buffer.SCRATCH,
                         dst_outer_stride=3, dst_inner_stride=1, a_buffer=Buffer.ACTIVATION,
                         a_broadcast=Broadcast.ROW, a_address=8, a_outer_stride=1,
                         b_broadcast=Broadcast.COLUMN, b_address=16, b_inner_stride=1)
    assert isa.check_instruction(ok, config) == ErrorCode.NONE
    import dataclasses
    assert isa.check_instruction(dataclasses.replace(ok, a_address=4), config) == ErrorCode.MISALIGNED
    def verdict(**changes):
        return isa.check_instruction(dataclasses.replace(ok, **changes), config)

    assert verdict(dst_address=lanes // 2) == ErrorCode.MISALIGNED
    last_line = isa.buffer_elements(config, Buffer.SCRATCH) - lanes
    assert verdict(dst_address=last_line) == ErrorCode.BUFFER_RANGE
    # c is unused by ADD: its fields are not checked
    assert isa.check_instruction(dataclasses.replace(ok, c_address=3), config) == ErrorCode.NONE
    # misalignment wins over range
    assert verdict(dst_address=last_line + 1) == ErrorCode.MISALIGNED

    load = isa.Load(memory_address=2, row_count=2, row_elements=4, memory_row_stride=6, buffer=Buffer.STATE)
    assert isa.check_instruction(load, config) == ErrorCode.NONE
    assert isa.check_instruction(dataclasses.replace(load, memory_format=isa.MemoryFormat.COMPUTE),
                                 config) == ErrorCode.MISALIGNED
    assert isa.check_instruction(dataclasses.replace(load, memory_address=(1 << 32) - 8),
                                 config) == ErrorCode.MEMORY_RANGE
    assert isa.check_instruction(dataclasses.replace(load, buffer_address=1 << 20),
                                 config) == ErrorCode.BUFFER_RANGE


def test_check_gather():
    """GATHER: LOAD's rules, the index address's alignment, and MEMORY_RANGE over the whole table and the
    id array (not only the rows the ids name), in the documented priority."""
    import dataclasses
    config = DEFAULT                                  # bf16 storage (2 bytes), fp32 compute, 32-bit bus
    gather = isa.Gather(memory_address=0x1000, row_count=3, row_elements=8, memory_row_stride=16,
                        buffer=Buffer.STATE, buffer_address=5, buffer_row_stride=8, index_address=0x800,
                        table_rows=100)
    assert isa.check_instruction(gather, config) == ErrorCode.NONE

    def verdict(**changes):
        return isa.check_instruction(dataclasses.replace(gather, **changes), config)

    assert isa.memory_access(gather, config) == (0x1000, 0x1000 + 99 * 16 + 15)
    assert isa.index_access(gather) == (0x800, 0x800 + 11)
    assert isa.index_access(isa.Load(row_count=1, row_elements=1)) is None
    assert verdict(index_address=0x802) == ErrorCode.MISALIGNED
    assert verdict(memory_row_stride=17) == ErrorCode.MISALIGNED
    assert verdict(memory_format=isa.MemoryFormat.COMPUTE, memory_row_stride=18) == ErrorCode.MISALIGNED
    top = 1 << config.axi_addr_width
    # The last table row reaches past the address space although every id might be small.
    assert verdict(memory_address=top - 100 * 16) == ErrorCode.NONE
    assert verdict(memory_address=top - 100 * 16 + 2) == ErrorCode.MEMORY_RANGE
    assert verdict(table_rows=(top - 0x1000) // 16 + 1) == ErrorCode.MEMORY_RANGE
    assert verdict(index_address=top - 12) == ErrorCode.NONE
    assert verdict(index_address=top - 8) == ErrorCode.MEMORY_RANGE
    assert verdict(index_address=1 << 40) == ErrorCode.MEMORY_RANGE          # the field is wider than the bus
    last_row = isa.buffer_elements(config, Buffer.STATE) - 8
    assert verdict(buffer_address=last_row - 16) == ErrorCode.NONE
    assert verdict(buffer_address=last_row - 15) == ErrorCode.BUFFER_RANGE
    # Priority: misaligned before buffer range before memory range.
    assert verdict(buffer_address=last_row, index_address=top - 2) == ErrorCode.MISALIGNED
    assert verdict(buffer_address=last_row, index_address=top - 4) == ErrorCode.BUFFER_RANGE
    # The weight buffer may be gathered into (it is a DMA destination), and the count fields are checked.
    assert verdict(buffer=Buffer.WEIGHT) == ErrorCode.NONE
    with pytest.raises(IllegalInstruction, match="table_rows"):
        isa.encode(dataclasses.replace(gather, table_rows=0))
    assert isa.disassemble([gather]) == (
        "GATHER memory_address=0x1000 row_count=3 row_elements=8 memory_row_stride=16 buffer=STATE "
        "buffer_address=5 buffer_row_stride=8 index_address=0x800 table_rows=100\n")


def test_buffer_geometry():
    assert isa.buffer_lines(DEFAULT, Buffer.WEIGHT) == 64 * 1024 // (64 * 4)
    assert isa.buffer_lines(TINY, Buffer.STATE) == 1024 // (4 * 2)
    assert isa.granule(DEFAULT, Broadcast.ROW) == 8 and isa.granule(DEFAULT, Broadcast.SCALAR) == 1
    for config in (DEFAULT, FPGA_SMALL, PAPER, TINY):
        isa.check_config(config)


def test_doc_is_up_to_date():
    text = DOC.read_text()
    assert isa.updated_doc(text) == text, \
        "docs/isa.md is stale: run .venv/bin/python -m marca.isa docs/isa.md"


def test_amaranth_struct_layouts_match_the_encoding():
    from amaranth.hdl import Const
    from amaranth.lib import data
    rng = random.Random(3)
    for _ in range(200):
        instruction = random_instruction(rng)
        layout = isa.struct_layout(instruction.OPCODE)
        assert layout.size == isa.INSTRUCTION_BITS
        view = data.Const(layout, isa.encode(instruction))
        assert view.opcode == instruction.OPCODE
        for field in isa.field_layout(instruction.OPCODE):
            assert int(view[field.name]) == int(getattr(instruction, field.name)), field.name
        fields = {f.name: getattr(instruction, f.name) for f in isa.field_layout(instruction.OPCODE)}
        word = layout.const({"opcode": instruction.OPCODE, **fields}).as_value()
        assert isinstance(word, Const) and word.value == isa.encode(instruction)
