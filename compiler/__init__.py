"""The marca compiler: a Mamba language model (transformers' MambaForCausalLM) or one Mamba-1 mixer +
configuration -> programs + memory image (docs/compiler.md, docs/model.md).

A pipeline of small passes, each in its own module: ``layout`` (where every tensor lives in memory),
``mixer`` / ``model`` (lowering to operations, with the tiling plans that allocate the buffers),
``linear`` (tiling of linear operations), ``emit`` (instruction emission, spilling, buffer allocation),
``schedule`` (barrier insertion), ``program`` (encoding and the printer).
"""

from .emit import Allocator, Emitter
from .layout import MemoryImage, TensorPlace
from .mamba import CompiledMixer, MixerRun, compile_mixer
from .mixer import MixerPlan
from .model import CompiledModel, ModelSession, ModelShape, compile_model, model_shape
from .options import CompileError, CompileOptions
from .program import format_listing
from .report import markdown_table, switch_report
from .schedule import insert_barriers

__all__ = ["compile_mixer", "compile_model", "CompileOptions", "CompileError", "CompiledMixer", "MixerRun",
           "CompiledModel", "ModelSession", "ModelShape", "model_shape", "MixerPlan", "TensorPlace",
           "insert_barriers", "MemoryImage", "Allocator", "Emitter", "format_listing", "switch_report",
           "markdown_table"]
