"""One Mamba-1 mixer compiled on its own (``compile_mixer``): the mixer passes of compiler/mixer.py with a
storage-format input and output, for the block-level tests, the RTL testbench and the FPGA host tool.

Input: the mixer's weights with transformers' ``MambaMixer`` names (``in_proj.weight``, ``conv1d.weight``,
``conv1d.bias``, ``x_proj.weight``, ``dt_proj.weight``, ``dt_proj.bias``, ``A_log``, ``D``,
``out_proj.weight``, optional ``in_proj.bias``/``out_proj.bias``), a :class:`~marca.config.MarcaConfig`
and a mode: a prefill of ``L`` tokens or a decode step (``L = 1``), or a batched decode step of ``B``
independent sequences (``batch=B``: one token each, every sequence with its own states, every weight read
shared by the ``B`` tokens). All carry the convolution and scan states in and out through memory, so a
prefill can continue a sequence and decode steps chain.

Output: a :class:`CompiledMixer`: the program, the memory image (weights in place, program at the end),
and where the inputs, outputs and states live, with helpers to write inputs and read results.
"""

from dataclasses import dataclass

import torch

from marca import isa
from marca.config import MarcaConfig
from marca.golden import fp
from marca.golden.iss import RunResult, pack_elements, run_program, unpack_elements
from marca.isa import Buffer
from marca.reference.mamba import MambaDims, dims_from_weights

from .emit import Allocator, Emitter
from .layout import MemoryImage, TensorPlace, ceil_div, tile_matrix, untile_matrix
from .mixer import MixerPlan, layout_mixer, lower_mixer, plan_mixer
from .options import CompileError, CompileOptions
from .program import finish_program, format_listing

__all__ = ["CompileOptions", "CompileError", "TensorPlace", "CompiledMixer", "MixerRun", "compile_mixer",
           "read_place", "write_place", "spill_bytes"]


@dataclass
class MixerRun:
    """Results of running a compiled mixer on the golden ISS."""

    out: torch.Tensor          # [L, d_model] float64 (storage-format values)
    conv_state: torch.Tensor   # [d_inner, d_conv] ([B, d_inner, d_conv] for a batched step)
    ssm_state: torch.Tensor    # [d_inner, d_state] ([B, d_inner, d_state])
    result: RunResult


def write_place(config: MarcaConfig, memory: bytearray, place: TensorPlace, values: torch.Tensor) -> None:
    """``values`` (``[rows, row_elements]`` floats) rounded to the place's format and written in."""
    fmt = config.compute_format if place.compute else config.storage_format
    size = config.compute_bytes if place.compute else config.storage_bytes
    bits = fp.encode(torch.as_tensor(values, dtype=torch.float64), fmt).reshape(place.rows, place.row_elements)
    if place.row_stride == place.row_elements * size:
        data = pack_elements(bits, size)
        memory[place.address:place.address + len(data)] = data
        return
    for row in range(place.rows):
        data = pack_elements(bits[row], size)
        start = place.address + row * place.row_stride
        memory[start:start + len(data)] = data


def read_place(config: MarcaConfig, memory, place: TensorPlace, rows: int | None = None) -> torch.Tensor:
    """The place's first ``rows`` rows (default all) as float64 ``[rows, row_elements]``."""
    fmt = config.compute_format if place.compute else config.storage_format
    size = config.compute_bytes if place.compute else config.storage_bytes
    rows = place.rows if rows is None else rows
    length = place.row_elements * size
    if place.row_stride == length:
        data = bytes(memory[place.address:place.address + rows * length])
        return fp.decode(unpack_elements(data, size, fmt.width).reshape(rows, place.row_elements), fmt)
    starts = [place.address + r * place.row_stride for r in range(rows)]
    data = [unpack_elements(bytes(memory[start:start + length]), size, fmt.width) for start in starts]
    return fp.decode(torch.stack(data), fmt)


def spill_bytes(config: MarcaConfig) -> int:
    """Memory for the inter-operation-off round trips: any on-chip range of the compute buffers."""
    return sum(isa.buffer_elements(config, b) for b in Buffer if b != Buffer.WEIGHT) * config.compute_bytes


@dataclass
class CompiledMixer:
    """A compiled mixer: program, memory image and the places of its inputs, outputs and states.

    ``hidden`` (input, storage format, ``[L, d_model]`` rows), ``output`` (storage, ``[L, d_model]``),
    ``conv_state`` (compute format, ``d_conv`` rows of ``d_inner`` padded to whole lines, oldest first:
    the transpose of the reference's ``[d_inner, d_conv]``), ``ssm_state`` (compute format, the
    ``d_inner x d_state`` state cut into ``R x C`` tiles, line ``(j, k)`` = channels ``j·R..``, states
    ``k·C..``). The program reads the states at its start and writes them back in place at its end.
    ``batch`` > 1 (batched decode, ``L = batch``): ``conv_state`` / ``ssm_state`` are sequence 0's places
    and sequence ``b``'s follow at :meth:`state_places`; hidden and output row ``b`` is sequence ``b``'s.
    ``resident_instructions`` / ``resident_program_address`` (``resident=True``): a second program in the
    same image, the same step without the LOADs of the weights, per-channel parameters and ``A``: run it
    after a run of the first (or of itself) with no reset and no other program between (docs/isa.md,
    "Buffers between programs").
    """

    config: MarcaConfig
    dims: MambaDims
    options: CompileOptions
    length: int
    instructions: list
    memory: bytes
    program_address: int
    hidden: TensorPlace
    output: TensorPlace
    conv_state: TensorPlace
    ssm_state: TensorPlace
    plan: MixerPlan
    sections: list
    regions: dict
    batch: int = 1
    resident_instructions: list | None = None
    resident_program_address: int | None = None

    def state_places(self, b: int) -> tuple[TensorPlace, TensorPlace]:
        """(conv_state, ssm_state) places of sequence ``b``."""
        if not 0 <= b < self.batch:
            raise ValueError(f"sequence {b} is outside the batch of {self.batch}")
        shift = lambda place, size: TensorPlace(place.address + b * size, place.rows, place.row_elements,
                                                place.row_stride, place.format, place.layout)
        return (shift(self.conv_state, self.conv_state.rows * self.conv_state.row_stride),
                shift(self.ssm_state, self.ssm_state.rows * self.ssm_state.row_stride))

    @property
    def block_tokens(self) -> int:
        return self.plan.block_tokens

    @property
    def weights_resident(self) -> bool:
        return self.plan.weights_resident

    def write_inputs(self, memory, hidden, conv_state=None, ssm_state=None) -> bytearray:
        """A copy of ``memory`` (default: this mixer's image) with ``hidden [L, d_model]`` and the states
        (``[d_inner, d_conv]``, ``[d_inner, d_state]``, with a leading ``[B]`` for a batched step; zeros
        when omitted) written in, rounded to the formats of their places."""
        memory = bytearray(self.memory if memory is None else memory)
        d, config = self.dims, self.config
        hidden = torch.as_tensor(hidden, dtype=torch.float64).reshape(self.length, d.d_model)
        write_place(config, memory, self.hidden, hidden)
        batched = self.batch > 1
        for b in range(self.batch):
            conv_place, ssm_place = self.state_places(b)
            conv = torch.zeros(d.d_inner, d.d_conv, dtype=torch.float64) if conv_state is None \
                else torch.as_tensor(conv_state[b] if batched else conv_state, dtype=torch.float64)
            padded = torch.zeros(d.d_conv, conv_place.row_elements, dtype=torch.float64)
            padded[:, :d.d_inner] = conv.T
            write_place(config, memory, conv_place, padded)
            ssm = torch.zeros(d.d_inner, d.d_state, dtype=torch.float64) if ssm_state is None \
                else torch.as_tensor(ssm_state[b] if batched else ssm_state, dtype=torch.float64)
            tiles = tile_matrix(ssm, config.array_rows, config.array_cols)
            write_place(config, memory, ssm_place, tiles.reshape(ssm_place.rows, -1))
        return memory

    def read_outputs(self, memory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(out [L, d_model], conv_state [d_inner, d_conv], ssm_state [d_inner, d_state])`` as float64
        (the states with a leading ``[B]`` for a batched step)."""
        d, config = self.dims, self.config
        out = read_place(config, memory, self.output)
        convs, ssms = [], []
        for b in range(self.batch):
            conv_place, ssm_place = self.state_places(b)
            convs.append(read_place(config, memory, conv_place)[:, :d.d_inner].T.contiguous())
            lines = read_place(config, memory, ssm_place).flatten()
            ssms.append(untile_matrix(lines, d.d_inner, d.d_state, config.array_rows, config.array_cols))
        if self.batch == 1:
            return out, convs[0], ssms[0]
        return out, torch.stack(convs), torch.stack(ssms)

    def run(self, hidden, conv_state=None, ssm_state=None, **iss_options) -> MixerRun:
        """Write the inputs, run the program on the golden ISS, read the results."""
        memory = self.write_inputs(None, hidden, conv_state, ssm_state)
        result, machine = run_program(self.config, memory, self.program_address, **iss_options)
        if result.error != isa.ErrorCode.NONE:
            raise RuntimeError(f"compiled program faulted: {result}")
        out, conv, ssm = self.read_outputs(machine.memory_bytes())
        return MixerRun(out, conv, ssm, result)

    def listing(self) -> str:
        """The program as assembly text, with the lowering's sections as comments."""
        return format_listing(self.instructions, self.sections)


def compile_mixer(weights: dict, config: MarcaConfig, *, mode: str = "prefill", length: int | None = None,
                  options: CompileOptions = CompileOptions(), batch: int = 1,
                  resident: bool = False) -> CompiledMixer:
    """Compile a Mamba-1 mixer.

    Parameters
    ----------
    weights : dict of str to Tensor
        transformers ``MambaMixer`` names (see the module docstring); any float dtype.
    config : MarcaConfig
    mode : "prefill" or "decode"
        ``prefill`` runs ``length`` tokens; ``decode`` one token (``length`` 1 or None).
    options : CompileOptions
    batch : int
        Decode only: sequences per step (one token each, each with its own states). Every decode step,
        ``batch`` 1 included, is lowered the batched way (per-sequence conv windows, x_proj's parts fused
        where they can be, weights loaded one use ahead: ``plan_mixer(sequences=True)``).
    resident : bool
        Decode only: also emit the step that finds the weights already on chip (``resident_instructions``);
        a :class:`CompileError` when the plan cannot keep them all there.
    """
    if not isinstance(config, MarcaConfig):
        raise ValueError(f"config must be a MarcaConfig, not {config!r}")
    if mode not in ("prefill", "decode"):
        raise ValueError(f"mode must be 'prefill' or 'decode', not {mode!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 0xFFFF:
        raise ValueError(f"batch must be an integer from 1 to 65535, not {batch!r}")
    if batch > 1 and mode != "decode":
        raise ValueError(f"batch {batch} needs mode 'decode' (a prefill runs one sequence)")
    if not isinstance(resident, bool) or resident and mode != "decode":
        raise ValueError(f"resident must be a bool, and True only in mode 'decode', not {resident!r}")
    if mode == "decode":
        if length not in (None, 1, batch):
            raise ValueError(f"a decode step has length 1 per sequence, not {length!r}")
        length = batch
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be a positive integer for a prefill, not {length!r}")
    if not isinstance(options, CompileOptions):
        raise ValueError(f"options must be a CompileOptions, not {options!r}")
    isa.check_config(config)
    dims = dims_from_weights(weights)
    P, sb, cb = config.lanes, config.storage_bytes, config.compute_bytes
    image = MemoryImage()
    zero = image.place("zero line", fp.encode(torch.zeros(P, dtype=torch.float64), config.storage_format), sb)
    layout = layout_mixer(image, "", weights, dims, config, batch)
    Dm, L = dims.d_model, length
    hidden = TensorPlace(image.allocate("hidden", L * Dm * sb), L, Dm, Dm * sb, "storage", "[L, d_model] row-major")
    output = TensorPlace(image.allocate("output", L * Dm * sb), L, Dm, Dm * sb, "storage", "[L, d_model] row-major")
    plan = plan_mixer(layout, config, options, length, Allocator(config, {Buffer.WEIGHT: 1}), mode == "decode")
    staging = {}
    if plan.groups > 1:
        row = ceil_div(dims.d_inner, P) * P
        for name in ("XC", "Y"):
            staging[name] = TensorPlace(image.allocate(f"staging {name}", plan.block_tokens * row * cb),
                                        plan.block_tokens, row, row * cb, "compute", "[block tokens, d_inner]")
    spill = None if options.inter_operation else image.allocate("spill", spill_bytes(config))

    def program(name, loaded):
        emitter = Emitter(config, inter_operation=options.inter_operation, spill_address=spill)
        emitter.load_lines(zero, 1, Buffer.WEIGHT, 0)
        lower_mixer(emitter, layout, plan, config, options, length=length, hidden=hidden, output=output,
                    staging_memory=staging, zero=(Buffer.WEIGHT, 0), loaded=loaded)
        return finish_program(emitter, image, config, name)

    instructions, sections, address = program("program", False)
    resident_instructions, _, resident_address = program("program (weights resident)", True) if resident \
        else (None, None, None)
    return CompiledMixer(config=config, dims=dims, options=options, length=length, instructions=instructions,
                         memory=bytes(image.data), program_address=address, hidden=hidden, output=output,
                         conv_state=layout.conv_state, ssm_state=layout.ssm_state, plan=plan, sections=sections,
                         regions=dict(image.regions), batch=batch, resident_instructions=resident_instructions,
                         resident_program_address=resident_address)
