"""The last passes: barrier insertion (compiler/schedule.py), encoding into the memory image, and the
printer that shows the program with the sections the lowering passes named."""

from marca import isa
from marca.config import MarcaConfig

from .emit import Emitter
from .layout import MemoryImage
from .schedule import insert_barriers

__all__ = ["finish_program", "format_listing"]


def finish_program(emitter: Emitter, image: MemoryImage, config: MarcaConfig, name: str = "program"):
    """HALT, barriers, encoding: ``(instructions, sections, program_address)``; the code is placed in
    ``image`` (only its size when the image is not materialized). ``sections`` index the final list."""
    original = emitter.program + [isa.Halt()]
    program = insert_barriers(original, config)
    position, j = {}, 0
    for k, instruction in enumerate(program):
        if j < len(original) and instruction is original[j]:
            position[j] = k
            j += 1
    sections = [(position.get(index, len(program) - 1), label) for index, label in emitter.sections]
    if image.materialize:
        code = isa.encode_program(program)
        address = image.allocate(name, len(code))
        image.data[address:address + len(code)] = code
    else:
        address = image.allocate(name, len(program) * isa.INSTRUCTION_BYTES)
    return program, sections, address


def format_listing(instructions, sections=()) -> str:
    """Assembly text with each section's label as a ``#`` comment line before its first instruction."""
    labels = {}
    for index, label in sections:
        labels.setdefault(index, []).append(label)
    lines = []
    for index, instruction in enumerate(instructions):
        lines += [f"# {label}" for label in labels.get(index, [])]
        lines.append(isa.format_instruction(instruction))
    return "\n".join(lines) + "\n"
