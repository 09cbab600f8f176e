"""A whole Mamba language model (transformers ``MambaForCausalLM``) compiled for the accelerator
(docs/model.md).

    compiled = compile_model(model_or_state_dict, mamba_config, config, prompt_length=L)
    session = compiled.session()               # the golden ISS; tb/model.py runs the same on the RTL
    logits = session.prefill(ids)              # [1 or L, vocab] float64
    logits = session.decode(next_id)           # [1, vocab]

One memory image holds the weights, every layer's conv and scan states, the activations and two
programs: a prefill of ``prompt_length`` tokens and a decode step. With ``batch=B`` (B > 1) it holds the
states of ``B`` sequences per layer and a third program, ``decode_batch``: one decode step of all ``B``
sequences (``session.decode_batch(ids)``, ``[B, vocab]``), every weight read shared by the ``B`` tokens.
The prefill and the decode step work on sequence 0's states; ``session.copy_sequence(0, b)`` moves a
prefilled sequence into slot ``b``. Each program is

    embedding: GATHER of the token ids' rows (the host writes only the ids) -> residual (compute format)
    per layer: RMSNorm (residual -> normed, storage format, as the model's dtype would hold it)
               mixer (normed -> mixer output, storage), states read and written back in place
               residual += mixer output (compute format: ``residual_in_fp32``)
    norm_f on the tokens whose logits are wanted, LM head (vocabulary tiles) -> logits (compute format)

RMSNorm on the PEs: squares (element-wise), the sum of squares as a LINEAR whose matrix is the squared
row and whose vector is ones (each row tree sums its share), a second LINEAR over the row partial sums,
``mean + eps`` as one MULADD, rsqrt as a NONLINEAR of the lanes, then the scale by ``rsqrt`` (scalar
broadcast) and by the norm weight. Everything is tiled in ``d_model`` chunks and token blocks, so any size
runs on any configuration (the passes raise CompileError only when one line of one token does not fit).
"""

import math
from dataclasses import dataclass, field

import torch

from marca import isa
from marca.config import MarcaConfig
from marca.golden import fp
from marca.golden.iss import Machine, pack_elements
from marca.isa import Broadcast, Buffer, ElementwiseOp, LinearInit, NonlinearFunction
from marca.reference.mamba import MambaDims

from .emit import Allocator, Emitter
from .layout import MemoryImage, TensorPlace, ceil_div, largest, line_vector, tile_matrix
from .linear import InMemory, Matrix, OnChip, WeightArea, emit_linear
from .mamba import read_place, spill_bytes
from .mixer import MixerPlan, layout_mixer, lower_mixer, plan_mixer
from .options import CompileError, CompileOptions
from .program import finish_program, format_listing

__all__ = ["ModelShape", "model_shape", "CompiledModel", "ModelProgram", "ModelSession", "compile_model",
           "state_dict_of"]

_ACTIVATION_ORDER = (Buffer.ACTIVATION, Buffer.SCRATCH, Buffer.STATE)


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Mamba language model (from a transformers ``MambaConfig``)."""

    dims: MambaDims
    layers: int
    vocab: int
    eps: float
    tied: bool

    @property
    def d_model(self) -> int:
        return self.dims.d_model

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of ``MambaForCausalLM.state_dict()`` this compiler reads, by name."""
        shapes = {"backbone.embeddings.weight": (self.vocab, self.d_model),
                  "backbone.norm_f.weight": (self.d_model,)}
        for n in range(self.layers):
            shapes[f"backbone.layers.{n}.norm.weight"] = (self.d_model,)
            for name, shape in self.dims.parameter_shapes().items():
                shapes[f"backbone.layers.{n}.mixer.{name}"] = shape
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab, self.d_model)
        return shapes

    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.parameter_shapes().values())


def model_shape(mamba_config) -> ModelShape:
    """A :class:`ModelShape` from a transformers ``MambaConfig`` (or its ``to_dict()``)."""
    get = (lambda name, default=None: mamba_config.get(name, default)) if isinstance(mamba_config, dict) \
        else (lambda name, default=None: getattr(mamba_config, name, default))
    try:
        d_model, layers, vocab = int(get("hidden_size")), int(get("num_hidden_layers")), int(get("vocab_size"))
        inner = int(get("intermediate_size") or 2 * d_model)
    except (TypeError, ValueError):
        raise ValueError("the Mamba config needs integer hidden_size, num_hidden_layers and vocab_size") from None
    if inner % d_model:
        raise ValueError(f"intermediate_size {inner} is not a multiple of hidden_size {d_model}")
    dims = MambaDims(d_model=d_model, d_state=int(get("state_size", 16)), d_conv=int(get("conv_kernel", 4)),
                     expand=inner // d_model, dt_rank=get("time_step_rank", "auto"),
                     bias=bool(get("use_bias", False)), conv_bias=bool(get("use_conv_bias", True)))
    if layers < 1 or vocab < 1:
        raise ValueError(f"num_hidden_layers and vocab_size must be positive, not {layers}, {vocab}")
    return ModelShape(dims=dims, layers=layers, vocab=vocab, eps=float(get("layer_norm_epsilon", 1e-5)),
                      tied=bool(get("tie_word_embeddings", True)))


def state_dict_of(model_or_state_dict, mamba_config=None):
    """``(state_dict, mamba_config)`` from a transformers model or a state dict with its config."""
    if hasattr(model_or_state_dict, "state_dict") and hasattr(model_or_state_dict, "config"):
        return model_or_state_dict.state_dict(), mamba_config or model_or_state_dict.config
    if mamba_config is None:
        raise ValueError("a state dict needs its MambaConfig")
    return model_or_state_dict, mamba_config


def _check_state_dict(state_dict: dict, shape: ModelShape) -> None:
    for name, expected in shape.parameter_shapes().items():
        if name not in state_dict:
            raise ValueError(f"the state dict has no {name!r} (expected shape {expected})")
        got = tuple(state_dict[name].shape)
        if got != expected:
            raise ValueError(f"{name} has shape {got}, expected {expected}")


@dataclass
class ModelProgram:
    """One compiled program of the model (``prefill`` of ``tokens`` tokens or a ``decode`` step)."""

    mode: str
    tokens: int
    logits_rows: int
    address: int
    instructions: list
    sections: list
    mixer_plan: MixerPlan
    row_plan: tuple
    head_plan: dict

    def listing(self) -> str:
        return format_listing(self.instructions, self.sections)


@dataclass
class CompiledModel:
    """A compiled model: one memory image, two programs, the places the host reads and writes.

    ``ids``: ``max(prompt_length, batch)`` little-endian uint32 token ids; ``logits``: ``[rows, vocab]``
    compute format; ``residual`` / ``normed`` / ``mixer_out``: ``[max(prompt_length, batch), d_model]`` rows
    padded to lines; ``states``: each layer's (conv, scan) state places of sequence 0 (sequence ``b``'s
    follow, :meth:`state_places`)."""

    config: MarcaConfig
    shape: ModelShape
    options: CompileOptions
    prompt_length: int
    memory: bytes | None
    memory_size: int
    ids: int
    logits: TensorPlace
    residual: TensorPlace
    normed: TensorPlace
    mixer_out: TensorPlace
    states: list
    programs: dict
    regions: dict
    weight_bytes: int
    embedding_on_host: bool = False
    embedding: torch.Tensor | None = field(default=None, repr=False)
    batch: int = 1

    def state_places(self, b: int) -> list:
        """Each layer's (conv_state, ssm_state) places of sequence ``b``."""
        if not 0 <= b < self.batch:
            raise ValueError(f"sequence {b} is outside the batch of {self.batch}")
        shift = lambda place: TensorPlace(place.address + b * place.rows * place.row_stride, place.rows,
                                          place.row_elements, place.row_stride, place.format, place.layout)
        return [(shift(conv), shift(ssm)) for conv, ssm in self.states]

    def session(self, **iss_options) -> "ModelSession":
        """A fresh sequence on the golden ISS (zero states); ``progress``, ``replay``, ``traces``
        (:class:`ModelSession`) and the options of :class:`marca.golden.iss.Machine` pass through."""
        if self.memory is None:
            raise ValueError("a model compiled from shapes alone has no weights to run")
        return ModelSession(self, **iss_options)


class _HostPort:
    """The host's reads and writes of a machine's memory image, by slice (``port[a:b]``, ``port[a:b] = data``),
    so that the session's helpers address memory as they would a bytearray."""

    def __init__(self, machine: Machine):
        self.machine = machine

    def __getitem__(self, span: slice) -> bytes:
        return self.machine.read_memory(span.start, span.stop - span.start)

    def __setitem__(self, span: slice, data) -> None:
        if len(data) != span.stop - span.start:
            raise ValueError(f"{len(data)} bytes do not fill bytes {span.start}..{span.stop}")
        self.machine.write_memory(span.start, data)


class ModelSession:
    """A sequence being generated on the golden ISS: prefill a prompt, then decode step by step. One
    machine holds the memory image for the whole session (the states stay in it between steps; each run
    starts as a new machine would, :meth:`Machine.restart`, but with the instructions already planned);
    ``steps`` keeps each run's counters."""

    def __init__(self, compiled: CompiledModel, *, progress=None, replay: bool = False, traces=None,
                 **iss_options):
        self.compiled = compiled
        self.progress = progress        # called with (mode, instructions done, program length) on long runs
        self.max_instructions = iss_options.pop("max_instructions", None)
        self.machine = Machine(compiled.config, compiled.memory, **iss_options)
        self.port = _HostPort(self.machine)
        self.steps: list[dict] = []
        # replay: each program runs on the ISS once (checks on), then as a compiled replay of that run
        # (marca.golden.replay; 16-bit presets on the CPU), which leaves memory, buffers and counters as
        # the ISS would. traces: a dict that sessions of the same compiled model share (default: this
        # session's own), so that only the first session runs each program on the ISS.
        self.replay = replay
        self._traces = {} if traces is None else traces

    @property
    def memory(self) -> bytes:
        """The whole memory image now."""
        return self.machine.memory_bytes()

    def _write_ids(self, ids) -> list[int]:
        ids = [int(i) for i in torch.as_tensor(ids).flatten().tolist()]
        address = self.compiled.ids
        self.port[address:address + 4 * len(ids)] = b"".join(i.to_bytes(4, "little") for i in ids)
        if self.compiled.embedding_on_host:       # the machine has no GATHER: the host embeds
            for index, token in enumerate(ids):
                if not 0 <= token < self.compiled.shape.vocab:
                    raise ValueError(f"token id {token} is outside the vocabulary of {self.compiled.shape.vocab}")
                row = torch.zeros(self.compiled.residual.row_elements, dtype=torch.float64)
                row[:self.compiled.shape.d_model] = self.compiled.embedding[token]
                place = self.compiled.residual
                bits = fp.encode(row, self.compiled.config.compute_format)
                data = pack_elements(bits, self.compiled.config.compute_bytes)
                start = place.address + index * place.row_stride
                self.port[start:start + len(data)] = data
        return ids

    def run(self, mode: str, ids) -> torch.Tensor:
        program = self.compiled.programs[mode]
        ids = self._write_ids(ids)
        if len(ids) != program.tokens:
            raise ValueError(f"the {mode} program takes {program.tokens} token ids, not {len(ids)}")
        self.machine.restart()
        trace = self._traces.get(mode) if self.replay else None
        if trace is not None:
            counters = trace.run(self.machine)
        else:
            limit = self.max_instructions or len(program.instructions) + 1      # straight-line code
            report = None if self.progress is None else \
                (lambda done: self.progress(mode, done, len(program.instructions)))
            result = self.machine.run(program.address, max_instructions=limit, progress=report)
            if result.error != isa.ErrorCode.NONE:
                raise RuntimeError(f"the {mode} program faulted: {result.error.name} at {result.error_pc} "
                                   f"{result.message}")
            counters = result.counters
            if self.replay:
                from marca.golden.replay import Trace
                self._traces[mode] = Trace(self.compiled.config, program.instructions, counters)
        self.steps.append({"mode": mode, "tokens": len(ids), **counters})
        return self.read_logits(program.logits_rows)

    def read_logits(self, rows: int) -> torch.Tensor:
        return read_place(self.compiled.config, self.port, self.compiled.logits, rows)[:, :self.compiled.shape.vocab]

    def prefill(self, ids) -> torch.Tensor:
        return self.run("prefill", ids)

    def decode(self, token: int) -> torch.Tensor:
        return self.run("decode", [token])

    def decode_batch(self, tokens) -> torch.Tensor:
        """One decode step of every sequence of the batch (token ``b`` continues sequence ``b``):
        ``[batch, vocab]`` logits."""
        if "decode_batch" not in self.compiled.programs:
            raise ValueError("the model was compiled without batch > 1")
        return self.run("decode_batch", tokens)

    def reset_sequence(self, b: int = 0) -> None:
        """Zero every layer's states of sequence ``b`` (a fresh sequence: a prefill continues the states it
        finds)."""
        for pair in self.compiled.state_places(b):
            for place in pair:
                self.port[place.address:place.address + place.rows * place.row_stride] = \
                    bytes(place.rows * place.row_stride)

    def copy_sequence(self, source: int, destination: int) -> None:
        """The host copies every layer's states of sequence ``source`` over sequence ``destination``'s (the
        prefill and the single decode step use sequence 0)."""
        for src, dst in zip(self.compiled.state_places(source), self.compiled.state_places(destination)):
            for a, b in zip(src, dst):
                size = a.rows * a.row_stride
                self.port[b.address:b.address + size] = self.port[a.address:a.address + size]


# Row stages (embedding, RMSNorm, residual add): token blocks x d_model chunks ---------------------------

def _plan_rows(config, base: Allocator, Dm_l: int, tokens: int, chunk_limit: int, options: CompileOptions):
    """(token block, chunk lines, regions) for the row stages: XR, SQ (token x chunk lines each), PART,
    MS (a line per token) in the compute buffers and NW (chunk lines) in the weight buffer."""
    def attempt(T, D):
        trial = base.copy()
        regions = {"NW": trial.take("the norm weight chunk", D, [Buffer.WEIGHT])}
        for name, lines in (("XR", T * D), ("SQ", T * D), ("PART", T), ("MS", T)):
            regions[name] = trial.take(f"the row stage's {name} region ({T} tokens, {D} lines each)", lines,
                                       _ACTIVATION_ORDER)
        return regions

    def fits(T, D):
        try:
            attempt(T, D)
            return True
        except CompileError:
            return False

    attempt(1, 1)       # raises what does not fit
    D = largest(1, min(Dm_l, chunk_limit), lambda d: fits(1, d))
    T = largest(1, min(tokens, options.max_block_tokens or tokens), lambda t: fits(t, D))
    return T, D, attempt(T, D)


class _ModelLowering:
    def __init__(self, compiled_parts, mode, tokens, logits_rows, options, sequences=False):
        self.__dict__.update(compiled_parts)
        self.mode, self.tokens, self.logits_rows, self.options = mode, tokens, logits_rows, options
        self.sequences = sequences
        config = self.config
        self.P, self.R, self.C = config.lanes, config.array_rows, config.array_cols
        self.em = Emitter(config, inter_operation=options.inter_operation, spill_address=self.spill)

    def lower(self):
        em, config, P = self.em, self.config, self.P
        shape = self.shape
        em.section(f"{self.mode}: {self.tokens} token(s), constants")
        em.load_lines(self.constants, self.constant_lines, Buffer.WEIGHT, 0)
        em.load_lines(self.compute_constants, 1, Buffer.WEIGHT, self.constant_lines * P, compute=True)
        base = Allocator(config, {Buffer.WEIGHT: self.constant_lines + 1})
        chunk_limit = 1 if self.options.stream_rows else self.ones_lines * self.R
        row_T, row_D, row_regions = _plan_rows(config, base, self.Dm_l, self.tokens, chunk_limit, self.options)
        self.row = (row_T, row_D, row_regions)
        if not self.embedding_on_host:
            em.section("embedding: GATHER of the token ids' rows")
            self.embed(row_T, row_D, row_regions)
        mixer_plan = plan_mixer(self.layers[0], config, self.options, self.tokens, base, self.sequences)
        for n, layer in enumerate(self.layers):
            em.section(f"layer {n}: RMSNorm")
            self.rms_norm(self.norm_weights[n], self.tokens, 0, row_T, row_D, row_regions)
            em.section(f"layer {n}: mixer")
            lower_mixer(em, layer, mixer_plan, config, self.options, length=self.tokens, hidden=self.normed,
                        output=self.mixer_out, staging_memory=self.staging, zero=(Buffer.WEIGHT, 0))
            em.section(f"layer {n}: residual add")
            self.residual_add(row_T, row_D, row_regions)
        first = self.tokens - self.logits_rows
        em.section("norm_f")
        self.rms_norm(self.norm_f, self.logits_rows, first, row_T, row_D, row_regions)
        em.section("LM head: vocabulary tiles")
        head_plan = self.lm_head(base, first)
        program, sections, address = finish_program(em, self.image, config, f"{self.mode} program")
        return ModelProgram(self.mode, self.tokens, self.logits_rows, address, program, sections, mixer_plan,
                            (row_T, row_D), head_plan)

    def chunks(self, D):
        for c0 in range(0, self.Dm_l, D):
            yield c0, min(D, self.Dm_l - c0)

    def valid(self, c0, lines):
        """Valid elements of a chunk (the rows' pads beyond d_model are never written)."""
        return min((c0 + lines) * self.P, self.shape.d_model) - c0 * self.P

    def embed(self, T, D, regions):
        em, P, config = self.em, self.P, self.config
        sb, cb = config.storage_bytes, config.compute_bytes
        xb, xa = regions["XR"]
        for t0 in range(0, self.tokens, T):
            tokens = min(T, self.tokens - t0)
            for c0, lines in self.chunks(D):
                count = self.valid(c0, lines)
                em.emit(isa.Gather(memory_address=self.embedding_table + c0 * P * sb, row_count=tokens,
                                   row_elements=count, memory_row_stride=self.shape.d_model * sb, buffer=xb,
                                   buffer_address=xa, buffer_row_stride=D * P, index_address=self.ids + 4 * t0,
                                   table_rows=self.shape.vocab))
                em.dma(isa.Store, memory_address=self.residual.address + t0 * self.residual.row_stride + c0 * P * cb,
                       rows=tokens, row_elements=count, memory_row_stride=self.residual.row_stride, buffer=xb,
                       address=xa, buffer_row_stride=D * P, compute=True)

    def rms_norm(self, weight, rows, first, T, D, regions):
        """normed[first ..] = RMSNorm(residual[first ..]) for ``rows`` tokens."""
        em, P, C, R, config = self.em, self.P, self.C, self.R, self.config
        sb, cb = config.storage_bytes, config.compute_bytes
        W = Buffer.WEIGHT
        (xb, xa), (qb, qa), (pb, pa), (mb, ma), (_, nwa) = (regions[n] for n in ("XR", "SQ", "PART", "MS", "NW"))
        for name in ("PART", "MS"):
            em.zero_fill(*regions[name], T, (W, 0))
        single = self.Dm_l <= D
        res, out = self.residual, self.normed
        for t0 in range(first, first + rows, T):
            tokens = min(T, first + rows - t0)

            def load_rows(c0, lines):
                em.dma(isa.Load, memory_address=res.address + t0 * res.row_stride + c0 * P * cb, rows=tokens,
                       row_elements=lines * P, memory_row_stride=res.row_stride, buffer=xb, address=xa,
                       buffer_row_stride=D * P, compute=True)

            for c0, lines in self.chunks(D):      # sum of squares, chunk by chunk, on the row trees
                load_rows(c0, lines)
                em.elementwise(ElementwiseOp.MUL, tokens, lines, (qb, qa, D, 1), (xb, xa, D, 1), (xb, xa, D, 1))
                for t in range(tokens):
                    fields = dict(matrix_buffer=qb, matrix_address=qa + t * D * P, chunk_count=lines,
                                  row_tile_count=1, token_count=1, vector_buffer=W, vector_address=P,
                                  output_buffer=pb, output_address=pa + t * P)
                    if c0:
                        fields.update(init=LinearInit.BIAS, bias_buffer=pb, bias_address=pa + t * P)
                    em.emit(isa.Linear(**fields))
            # the R row sums of every token into one total (each row of the ones tile sums them all)
            em.emit(isa.Linear(matrix_buffer=W, matrix_address=P, chunk_count=ceil_div(R, C), row_tile_count=1,
                               token_count=tokens, vector_buffer=pb, vector_address=pa, vector_token_stride=P // C,
                               output_buffer=mb, output_address=ma, output_token_stride=P // R))
            scalar = self.constant_lines * P
            em.elementwise(ElementwiseOp.MULADD, tokens, 1, (mb, ma, 1, 0), (mb, ma, 1, 0),
                           (W, scalar, 0, 0, Broadcast.SCALAR), (W, scalar + 1, 0, 0, Broadcast.SCALAR))
            em.nonlinear(NonlinearFunction.RSQRT, mb, ma, tokens)
            for c0, lines in self.chunks(D):      # x · rsqrt(mean + eps), then · weight
                if not single:
                    load_rows(c0, lines)
                em.load_lines(weight + c0 * P * sb, lines, W, nwa)
                em.elementwise(ElementwiseOp.MUL, tokens, lines, (xb, xa, D, 1), (xb, xa, D, 1),
                               (mb, ma, P, 0, Broadcast.SCALAR))
                em.elementwise(ElementwiseOp.MUL, tokens, lines, (xb, xa, D, 1), (xb, xa, D, 1), (W, nwa, 0, 1))
                em.dma(isa.Store, memory_address=out.address + t0 * out.row_stride + c0 * P * sb, rows=tokens,
                       row_elements=self.valid(c0, lines), memory_row_stride=out.row_stride, buffer=xb,
                       address=xa, buffer_row_stride=D * P, compute=False)

    def residual_add(self, T, D, regions):
        em, P, config = self.em, self.P, self.config
        sb, cb = config.storage_bytes, config.compute_bytes
        (ab, aa), (bb, ba) = regions["XR"], regions["SQ"]
        res, mix = self.residual, self.mixer_out
        for t0 in range(0, self.tokens, T):
            tokens = min(T, self.tokens - t0)
            for c0, lines in self.chunks(D):
                em.dma(isa.Load, memory_address=res.address + t0 * res.row_stride + c0 * P * cb, rows=tokens,
                       row_elements=lines * P, memory_row_stride=res.row_stride, buffer=ab, address=aa,
                       buffer_row_stride=D * P, compute=True)
                em.dma(isa.Load, memory_address=mix.address + t0 * mix.row_stride + c0 * P * sb, rows=tokens,
                       row_elements=lines * P, memory_row_stride=mix.row_stride, buffer=bb, address=ba,
                       buffer_row_stride=D * P, compute=False)
                em.elementwise(ElementwiseOp.ADD, tokens, lines, (ab, aa, D, 1), (ab, aa, D, 1), (bb, ba, D, 1))
                em.dma(isa.Store, memory_address=res.address + t0 * res.row_stride + c0 * P * cb, rows=tokens,
                       row_elements=self.valid(c0, lines), memory_row_stride=res.row_stride, buffer=ab,
                       address=aa, buffer_row_stride=D * P, compute=True)

    def lm_head(self, base: Allocator, first: int) -> dict:
        """logits[r] = head · normed[first + r], in groups of vocabulary row tiles."""
        em, P, R, C, config = self.em, self.P, self.R, self.C, self.config
        head = Matrix("lm_head", self.head, ceil_div(self.shape.vocab, R), ceil_div(self.shape.d_model, C))
        rows = self.logits_rows
        T_limit = min(rows, self.options.max_block_tokens or rows)

        def attempt(T, resident, I, O):
            trial = base.copy()
            regions = {}
            if resident:
                regions["H"] = trial.take("the LM head's input rows", T * self.Dm_l, _ACTIVATION_ORDER)
            else:
                regions["STAGING"] = trial.take("the LM head's input chunks", ceil_div(T * I * C, P),
                                                _ACTIVATION_ORDER)
            regions["OUT"] = trial.take("the LM head's logit tiles", ceil_div(T * O * R, P), _ACTIVATION_ORDER)
            lines = trial.free(Buffer.WEIGHT)
            if self.options.max_weight_lines is not None:
                lines = min(lines, self.options.max_weight_lines)
            if lines < 1:
                raise CompileError(f"the weight buffer has no line left for the LM head's tiles "
                                   f"(configuration {config.name!r})")
            return regions, (trial.next[Buffer.WEIGHT] * P, lines)

        def fits(*args):
            try:
                attempt(*args)
                return True
            except CompileError:
                return False

        for resident in ((False,) if self.options.stream_rows else (True, False)):
            if fits(1, resident, 1, 1):
                break
        else:
            attempt(1, False, 1, 1)
        T = largest(1, T_limit, lambda t: fits(t, resident, 1, 1))
        I = 0 if resident else largest(1, head.K, lambda i: fits(T, resident, i, 1))
        O = largest(1, head.J, lambda o: fits(T, resident, I, o))
        regions, (area_address, area_lines) = attempt(T, resident, I, O)
        staging = (*regions["STAGING"], ceil_div(T * I * C, P)) if not resident else None
        area = WeightArea(config, area_address, area_lines, staging)
        ob, oa = regions["OUT"]
        out = self.normed
        logits = self.logits
        cb = config.compute_bytes
        for name, (buffer, address) in regions.items():
            em.zero_fill(buffer, address, ceil_div(T * (self.Dm_l * P if name == "H" else
                                                        (I * C if name == "STAGING" else O * R)), P), (Buffer.WEIGHT, 0))
        for t0 in range(first, first + rows, T):
            tokens = min(T, first + rows - t0)
            if resident:
                hb, ha = regions["H"]
                em.dma(isa.Load, memory_address=out.address + t0 * out.row_stride, rows=tokens,
                       row_elements=self.shape.d_model, memory_row_stride=out.row_stride, buffer=hb, address=ha,
                       buffer_row_stride=self.Dm_l * P, compute=False)
                source = OnChip(hb, ha, self.Dm_l * P)
            else:
                source = InMemory(out.address + t0 * out.row_stride, out.row_stride, self.shape.d_model, False)
            for j0 in range(0, head.J, O):
                j1 = min(head.J, j0 + O)
                emit_linear(em, area, head, tokens, source, OnChip(ob, oa, O * R, j0), rows=(j0, j1),
                            intra_operation=self.options.intra_operation)
                count = min(j1 * R, self.shape.vocab) - j0 * R
                em.dma(isa.Store, memory_address=logits.address + (t0 - first) * logits.row_stride + j0 * R * cb,
                       rows=tokens, row_elements=count, memory_row_stride=logits.row_stride, buffer=ob, address=oa,
                       buffer_row_stride=O * R, compute=True)
        return {"block_tokens": T, "input_resident": resident, "staging_chunks": I, "vocabulary_tile_rows": O * R,
                "weight_area_lines": area_lines}


def compile_model(model_or_state_dict=None, mamba_config=None, config: MarcaConfig | None = None, *,
                  prompt_length: int = 1, logits: str = "last", options: CompileOptions = CompileOptions(),
                  gather: bool | None = None, check_address_space: bool = True,
                  batch: int = 1) -> CompiledModel:
    """Compile a Mamba language model: a prefill of ``prompt_length`` tokens and a decode step in one image.

    Parameters
    ----------
    model_or_state_dict : MambaForCausalLM, dict or None
        The model, or its ``state_dict()`` (with ``mamba_config``), or None to compile from shapes alone
        (same program, addresses and ISS counters; the image is not built).
    mamba_config : transformers MambaConfig or dict, optional (taken from the model when given one)
    config : MarcaConfig
    prompt_length : int
        Tokens of the prefill program.
    logits : "last" or "all"
        The prefill writes the logits of its last token only, or of every token.
    gather : bool or None
        Embed with the machine's GATHER (default: when the ISA has it), else the host writes the rows.
    check_address_space : bool
        Raise CompileError when the image exceeds ``2**axi_addr_width`` bytes (False: a shapes-only
        study of what a model would need; ``memory_size`` says it).
    batch : int
        Sequences of the batched decode step (``decode_batch`` program, B > 1); 1: no batched program and
        the same image and programs as without the argument.
    """
    if not isinstance(config, MarcaConfig):
        raise ValueError(f"config must be a MarcaConfig, not {config!r}")
    if not isinstance(prompt_length, int) or isinstance(prompt_length, bool) or prompt_length < 1:
        raise ValueError(f"prompt_length must be a positive integer, not {prompt_length!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 0xFFFF:
        raise ValueError(f"batch must be an integer from 1 to 65535, not {batch!r}")
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', not {logits!r}")
    if not isinstance(options, CompileOptions):
        raise ValueError(f"options must be a CompileOptions, not {options!r}")
    isa.check_config(config)
    if model_or_state_dict is None:
        if mamba_config is None:
            raise ValueError("compiling from shapes needs the MambaConfig")
        state_dict = None
    else:
        state_dict, mamba_config = state_dict_of(model_or_state_dict, mamba_config)
    shape = model_shape(mamba_config)
    if state_dict is not None:
        _check_state_dict(state_dict, shape)
    gather = hasattr(isa, "Gather") if gather is None else gather

    P, R, C = config.lanes, config.array_rows, config.array_cols
    sb, cb = config.storage_bytes, config.compute_bytes
    storage = config.storage_format
    d_model, vocab = shape.d_model, shape.vocab
    Dm_l = ceil_div(d_model, P)
    image = MemoryImage(materialize=state_dict is not None)

    def weight(name):
        return state_dict[name].detach().to("cpu", torch.float64)

    def put(name, values, count):
        return image.place(name, None if values is None else fp.encode(values, storage), sb, count)

    # Constants: a zero line, ones (the norm's reduction vector and its partial-sum tile), then one line
    # in the compute format (exact): 1/d_model and eps.
    weight_lines = isa.buffer_lines(config, Buffer.WEIGHT)
    ones_lines = max(ceil_div(R, C), min(ceil_div(Dm_l, R), weight_lines // 8))
    constant_lines = 1 + ones_lines
    constant_values = torch.cat([torch.zeros(P, dtype=torch.float64), torch.ones(ones_lines * P, dtype=torch.float64)])
    constants = image.place("constants", fp.encode(constant_values, storage) if image.materialize else None, sb,
                            constant_lines * P)
    scalars = torch.zeros(P, dtype=torch.float64)
    scalars[0], scalars[1] = 1.0 / d_model, shape.eps
    compute_constants = image.place("compute constants", fp.encode(scalars, config.compute_format)
                                    if image.materialize else None, cb, P)
    weights_start = image.size
    embedding_table = put("embedding rows", None if state_dict is None else
                          weight("backbone.embeddings.weight"), vocab * d_model)
    layers, norm_weights = [], []
    for n in range(shape.layers):
        prefix = f"backbone.layers.{n}."
        norm_weights.append(put(f"layer {n} norm", None if state_dict is None else
                                line_vector(weight(prefix + "norm.weight"), Dm_l, P), Dm_l * P))
        mixer_weights = None if state_dict is None else \
            {name[len(prefix) + 6:]: value for name, value in state_dict.items() if name.startswith(prefix + "mixer.")}
        layers.append(layout_mixer(image, f"layer {n} ", mixer_weights, shape.dims, config, batch))
    norm_f = put("norm_f", None if state_dict is None else line_vector(weight("backbone.norm_f.weight"), Dm_l, P),
                 Dm_l * P)
    head_name = "backbone.embeddings.weight" if shape.tied else "lm_head.weight"
    J, K = ceil_div(vocab, R), ceil_div(d_model, C)
    head = put("LM head tiles", None if state_dict is None else tile_matrix(weight(head_name), R, C), J * K * P)
    weight_bytes = image.size - weights_start

    logits_rows = prompt_length if logits == "all" else 1
    L = max(prompt_length, batch)           # rows of the token places: the prefill's or the batch's
    ids = image.allocate("token ids", 4 * L)
    row = Dm_l * P
    residual = TensorPlace(image.allocate("residual", L * row * cb), L, d_model, row * cb, "compute",
                           "[tokens, d_model] rows padded to lines")
    normed = TensorPlace(image.allocate("normed", L * row * sb), L, d_model, row * sb, "storage",
                         "[tokens, d_model] rows padded to lines")
    mixer_out = TensorPlace(image.allocate("mixer output", L * row * sb), L, d_model, row * sb, "storage",
                            "[tokens, d_model] rows padded to lines")
    logits_stride = ceil_div(vocab * cb, 64) * 64
    logit_places = max(logits_rows, batch)
    logits_place = TensorPlace(image.allocate("logits", logit_places * logits_stride), logit_places, vocab,
                               logits_stride, "compute", "[rows, vocab]")
    inner_row = ceil_div(shape.dims.d_inner, P) * P
    staging = {name: TensorPlace(image.allocate(f"mixer staging {name}", L * inner_row * cb), L, inner_row,
                                 inner_row * cb, "compute", "[block tokens, d_inner]") for name in ("XC", "Y")}
    spill = None if options.inter_operation else image.allocate("spill", spill_bytes(config))
    parts = dict(config=config, shape=shape, image=image, Dm_l=Dm_l, ones_lines=ones_lines,
                 constant_lines=constant_lines, constants=constants, compute_constants=compute_constants,
                 embedding_table=embedding_table, layers=layers, norm_weights=norm_weights, norm_f=norm_f,
                 head=head, ids=ids, residual=residual, normed=normed, mixer_out=mixer_out, logits=logits_place,
                 staging=staging, spill=spill, embedding_on_host=not gather)
    programs = {"prefill": _ModelLowering(parts, "prefill", prompt_length, logits_rows, options).lower(),
                "decode": _ModelLowering(parts, "decode", 1, 1, options, True).lower()}
    if batch > 1:
        programs["decode_batch"] = _ModelLowering(parts, "decode_batch", batch, batch, options, True).lower()
    if check_address_space and image.size > 1 << config.axi_addr_width:
        raise CompileError(f"the memory image needs {image.size} bytes; the configuration {config.name!r} "
                           f"addresses {1 << config.axi_addr_width} (axi_addr_width {config.axi_addr_width})")
    return CompiledModel(
        config=config, shape=shape, options=options, prompt_length=prompt_length,
        memory=bytes(image.data) if image.materialize else None, memory_size=image.size, ids=ids,
        logits=logits_place, residual=residual, normed=normed, mixer_out=mixer_out,
        states=[(layer.conv_state, layer.ssm_state) for layer in layers], programs=programs,
        regions=dict(image.regions), weight_bytes=weight_bytes, embedding_on_host=not gather,
        embedding=None if gather or state_dict is None else weight("backbone.embeddings.weight"), batch=batch)
