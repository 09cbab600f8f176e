"""The marca compiler: a Mamba-1 mixer (transformers' MambaMixer weights) + configuration + mode ->
program + memory image (docs/compiler.md)."""

from .mamba import CompiledMixer, CompileError, CompileOptions, MixerRun, TensorPlace, compile_mixer
from .report import markdown_table, switch_report
from .schedule import MemoryImage, insert_barriers

__all__ = ["compile_mixer", "CompileOptions", "CompileError", "CompiledMixer", "MixerRun", "TensorPlace",
           "insert_barriers", "MemoryImage", "switch_report", "markdown_table"]
