"""The last passes: barrier insertion (compiler/schedule.py), encoding into the memory image, and the
printer that shows the program with the sections the lowering passes named."""

from marca import isa
from marca.config import MarcaConfig
from marca.golden import nonlinear
from marca.golden.iss import COUNTER_NAMES

from .emit import Emitter, encode_fast
from .layout import MemoryImage
from .schedule import insert_barriers

__all__ = ["finish_program", "format_listing", "program_counters"]


def finish_program(emitter: Emitter, image: MemoryImage, config: MarcaConfig, name: str = "program"):
    """HALT, barriers, encoding: ``(instructions, sections, program_address)``; the code is placed in
    ``image`` (only its size when the image is not materialized). ``sections`` index the final list."""
    original = emitter.program + [isa.Halt()]
    program = insert_barriers(original, config)
    # where the sections' first instructions went (barriers were added before some instructions): only
    # those positions are kept (a dict of every instruction's would be most of a long program's memory)
    wanted = {index for index, _ in emitter.sections}
    position, j, count = {}, 0, len(original)
    for k, instruction in enumerate(program):
        if j < count and instruction is original[j]:
            if j in wanted:
                position[j] = k
            j += 1
    sections = [(position.get(index, len(program) - 1), label) for index, label in emitter.sections]
    if image.materialize:
        code = encode_fast(program)
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


_NONLINEAR_PROGRAMS = {isa.NonlinearFunction.EXP: nonlinear.exp_program,
                       isa.NonlinearFunction.SILU: nonlinear.silu_program,
                       isa.NonlinearFunction.SOFTPLUS: nonlinear.softplus_program,
                       isa.NonlinearFunction.RSQRT: nonlinear.rsqrt_program}
_CLASS_COUNTER = {isa.Load: "load_instructions", isa.Gather: "load_instructions", isa.Store: "store_instructions",
                  isa.Linear: "linear_instructions", isa.Elementwise: "elementwise_instructions",
                  isa.Nonlinear: "nonlinear_instructions", isa.Barrier: "barrier_instructions"}


def program_counters(instructions, config: MarcaConfig) -> dict[str, int]:
    """The ISS's deterministic counters (docs/isa.md, Counters) of a straight-line program that runs to its
    HALT, from the instructions alone: no weights, no simulation (how a model too big for this machine is
    measured; a test checks them against a run)."""
    counters = dict.fromkeys(COUNTER_NAMES, 0)
    passes = {}
    for instruction in instructions:
        counters["instructions"] += 1
        counters["fetch_bytes"] += isa.INSTRUCTION_BYTES
        kind = type(instruction)
        if kind in _CLASS_COUNTER:
            counters[_CLASS_COUNTER[kind]] += 1
        if kind in (isa.Load, isa.Gather, isa.Store):
            data = instruction.row_count * instruction.row_elements * isa.memory_element_bytes(instruction, config)
            if kind is isa.Store:
                counters["dma_bytes_written"] += data
            else:
                counters["dma_bytes_read"] += data + (instruction.row_count * isa.INDEX_BYTES
                                                      if kind is isa.Gather else 0)
        elif kind is isa.Linear:
            counters["linear_beats"] += instruction.token_count * instruction.row_tile_count * instruction.chunk_count
        elif kind is isa.Elementwise:
            counters["elementwise_beats"] += instruction.outer_count * instruction.inner_count
        elif kind is isa.Nonlinear:
            function = instruction.function
            if function not in passes:
                passes[function] = len(_NONLINEAR_PROGRAMS[function](config))
            counters["nonlinear_lines"] += instruction.line_count
            counters["nonlinear_beats"] += instruction.line_count * passes[function]
    return counters
