"""The Mamba-1 mixer: memory layout of its weights, the tiling plan for a configuration, and its lowering
to instructions (docs/compiler.md).

Dataflow of one token block (``T`` tokens), with ``d_inner`` cut into channel groups of ``G`` lines:

* stage 1, per group: in_proj x rows of the group → conv window, causal conv + bias, SiLU → ``xc``;
  x_proj's dt, B, C partial sums accumulate over the groups (its input is all of ``d_inner``);
* stage 2, per group: dt_proj rows + bias, softplus → delta; delta·xc, D·xc; the selective scan per token
  (in scan groups of channel tiles whose ``h`` and ``A`` sit in the state buffer); in_proj z rows, SiLU,
  ``y · silu(z)``;
* stage 3: out_proj over all of ``d_inner`` → the block's output rows, in groups of output row tiles when
  they do not fit.

With one group (everything fits, the usual case on big buffers) ``xc`` and ``y`` never leave the chip;
with several, each group's ``xc`` and ``y`` (and its conv window) make one round trip through memory in
the exact compute format. Channels are independent in the conv and the scan, and every reduction keeps its
order, so the grouping never changes a bit.
"""

from dataclasses import dataclass, field, replace

import torch

from marca import isa
from marca.config import MarcaConfig
from marca.golden import fp
from marca.isa import Broadcast, Buffer, ElementwiseOp, LinearInit, NonlinearFunction
from marca.reference.mamba import MambaDims

from .emit import Allocator, Emitter
from .layout import MemoryImage, TensorPlace, ceil_div, largest, line_vector, tile_matrix
from .linear import InMemory, Matrix, OnChip, WeightArea, emit_linear, prefetch_weights
from .options import CompileError, CompileOptions

__all__ = ["MixerWeights", "MixerPlan", "layout_mixer", "plan_mixer", "lower_mixer", "resident_weights",
           "MIXER_MATRICES"]

#: The mixer's matrices as the compiler splits them (in_proj into its x and z halves, x_proj into dt/B/C).
MIXER_MATRICES = ("in_x", "in_z", "x_dt", "x_B", "x_C", "dt", "out")

_ACTIVATION_ORDER = (Buffer.ACTIVATION, Buffer.SCRATCH, Buffer.STATE)
_SCRATCH_ORDER = (Buffer.SCRATCH, Buffer.ACTIVATION, Buffer.STATE)
_SCAN_ORDER = (Buffer.STATE, Buffer.SCRATCH, Buffer.ACTIVATION)


@dataclass
class MixerWeights:
    """Where one mixer's weights and states live in memory.

    ``parameters``: the per-channel vectors (conv taps, conv bias, dt bias, D, optional in_proj bias
    halves), each ``d_inner`` padded to whole lines, vector after vector (``vectors`` names them in order);
    ``out_bias``: optional out_proj bias (``d_model`` padded to lines); ``A``: ``-exp(A_log)`` in R x C
    tiles; ``matrices``: the tiled matrices; ``conv_state`` / ``ssm_state``: the states (compute format) of
    sequence 0; ``batch``: sequences whose states follow one another (sequence ``b``'s at
    :meth:`conv_state_of` / :meth:`ssm_state_of`), for batched decode.
    """

    dims: MambaDims
    vectors: list
    parameters: int
    out_bias: int | None
    A: int
    matrices: dict
    conv_state: TensorPlace
    ssm_state: TensorPlace
    batch: int = 1

    def conv_state_of(self, b: int) -> TensorPlace:
        """Sequence ``b``'s convolution state (sequences are ``d_conv`` rows apart)."""
        return _sequence(self.conv_state, b)

    def ssm_state_of(self, b: int) -> TensorPlace:
        """Sequence ``b``'s scan state (sequences are ``J_d·K_n`` tile lines apart)."""
        return _sequence(self.ssm_state, b)


def _sequence(place: TensorPlace, b: int) -> TensorPlace:
    return replace(place, address=place.address + b * place.rows * place.row_stride)


def _lines(config, n):
    return ceil_div(n, config.lanes)


def layout_mixer(image: MemoryImage, prefix: str, weights: dict | None, dims: MambaDims,
                 config: MarcaConfig, batch: int = 1) -> MixerWeights:
    """Place one mixer's weights (``weights`` with transformers' MambaMixer names, or None: shapes only)
    and the states of ``batch`` sequences in ``image``."""
    R, C, P = config.array_rows, config.array_cols, config.lanes
    storage, sb, cb = config.storage_format, config.storage_bytes, config.compute_bytes
    d = dims
    Di, Dm, N, Rk = d.d_inner, d.d_model, d.d_state, d.dt_rank
    Di_l, Dm_l = _lines(config, Di), _lines(config, Dm)
    w = None if weights is None else {name: value.detach().to("cpu", torch.float64)
                                      for name, value in weights.items()}
    has = (lambda name: name in w) if w is not None else \
        (lambda name: name in d.parameter_shapes())
    vectors = [f"conv_tap{k}" for k in range(d.d_conv)]
    if has("conv1d.bias"):
        vectors.append("conv_bias")
    vectors += ["dt_bias", "D"]
    if has("in_proj.bias"):
        vectors += ["in_x_bias", "in_z_bias"]

    def encoded(values):
        return None if values is None else fp.encode(values, storage)

    block = None
    if w is not None:
        taps = w["conv1d.weight"][:, 0, :]
        values = {f"conv_tap{k}": taps[:, k] for k in range(d.d_conv)}
        values.update(dt_bias=w["dt_proj.bias"], D=w["D"])
        if "conv1d.bias" in w:
            values["conv_bias"] = w["conv1d.bias"]
        if "in_proj.bias" in w:
            values.update(in_x_bias=w["in_proj.bias"][:Di], in_z_bias=w["in_proj.bias"][Di:])
        block = torch.cat([line_vector(values[name], Di_l, P) for name in vectors])
    parameters = image.place(f"{prefix}parameters", encoded(block), sb, len(vectors) * Di_l * P)
    out_bias = None
    if has("out_proj.bias"):
        out_bias = image.place(f"{prefix}out_proj bias",
                               encoded(None if w is None else line_vector(w["out_proj.bias"], Dm_l, P)),
                               sb, Dm_l * P)
    Jd, Kn = ceil_div(Di, R), ceil_div(N, C)
    A = image.place(f"{prefix}A tiles", encoded(None if w is None else tile_matrix(-torch.exp(w["A_log"]), R, C)),
                    sb, Jd * Kn * P)   # A = -exp(A_log): weights only, done once on the host
    shapes = {"in_x": (Di, Dm), "in_z": (Di, Dm), "x_dt": (Rk, Di), "x_B": (N, Di), "x_C": (N, Di),
              "dt": (Di, Rk), "out": (Dm, Di)}
    if w is not None:
        in_w, x_w = w["in_proj.weight"], w["x_proj.weight"]
        values = {"in_x": in_w[:Di], "in_z": in_w[Di:], "x_dt": x_w[:Rk], "x_B": x_w[Rk:Rk + N],
                  "x_C": x_w[Rk + N:], "dt": w["dt_proj.weight"], "out": w["out_proj.weight"]}
    matrices = {}
    for name in MIXER_MATRICES:
        rows, cols = shapes[name]
        J, K = ceil_div(rows, R), ceil_div(cols, C)
        address = image.place(f"{prefix}matrix {name}",
                              encoded(None if w is None else tile_matrix(values[name], R, C)), sb, J * K * P)
        matrices[name] = Matrix(name, address, J, K)
    conv_state = TensorPlace(image.allocate(f"{prefix}conv_state", batch * d.d_conv * Di_l * P * cb),
                             d.d_conv,
                             Di_l * P, Di_l * P * cb, "compute", "[d_conv, d_inner padded to lines], oldest first")
    ssm_state = TensorPlace(image.allocate(f"{prefix}ssm_state", batch * Jd * Kn * P * cb), Jd * Kn, P,
                            P * cb,
                            "compute", "R x C tiles of [d_inner, d_state], lines (j, k)")
    return MixerWeights(dims, vectors, parameters, out_bias, A, matrices, conv_state, ssm_state, batch)


@dataclass
class MixerPlan:
    """The tiling and buffer allocation of a mixer for one configuration and token count.

    block_tokens: tokens per block; group_lines: lines of d_inner per channel group (all of them: one
    group); parameters_resident: every per-channel vector on chip for the whole mixer (else each group
    loads its slice); hidden_resident / output_resident: the block's input / output rows on chip (else
    streamed in chunks through ``staging`` / written in groups of ``output_group_tiles`` row tiles);
    scan_tiles: channel tiles per scan group; scan_resident: h and A stay on chip for the whole mixer;
    weights_resident: every matrix stays in the weight buffer; regions: buffer and element address of
    each region; weight_area: (element address, lines) of the streaming area; sequences: every token is
    its own sequence (batched decode: per-token conv windows and scan states, h/dA/dBx regions of
    ``block_tokens`` scan groups each)."""

    block_tokens: int
    group_lines: int
    parameters_resident: bool
    hidden_resident: bool
    output_resident: bool
    output_group_tiles: int
    staging_lines: int
    scan_tiles: int
    scan_resident: bool
    weights_resident: bool
    groups: int = 1
    regions: dict = field(default_factory=dict)
    weight_area: tuple = (0, 0)
    parameter_area: int = 0
    sequences: bool = False

    def describe(self) -> str:
        keys = ("block_tokens", "group_lines", "parameters_resident", "hidden_resident", "output_resident",
                "output_group_tiles", "staging_lines", "scan_tiles", "scan_resident", "weights_resident")
        text = ", ".join(f"{key}={getattr(self, key)}" for key in keys)
        return text + (", sequences=True" if self.sequences else "")


def _row_lines(config, dims, fused=False):
    """Lines per token of each token-block region (``fused``: dt, B and C share one row per token,
    :func:`_fused_offsets`)."""
    Di_l = _lines(config, dims.d_inner)
    if fused:
        offsets = _fused_offsets(config, dims)
        lines = _lines(config, offsets["end"])
        return Di_l, {"XP": lines, "DT": lines, "BB": lines, "CC": lines}
    return Di_l, {"DT": _lines(config, dims.dt_rank), "BB": _lines(config, dims.d_state),
                  "CC": _lines(config, dims.d_state)}


def _fused_offsets(config, dims):
    """Element offsets of dt, B and C in a token's x_proj row when x_proj's three parts are written by one
    LINEAR (its row tiles one after another): dt's row tiles, then B's, then C's."""
    R = config.array_rows
    Jdt, Jn = ceil_div(dims.dt_rank, R), ceil_div(dims.d_state, R)
    return {"DT": 0, "BB": Jdt * R, "CC": (Jdt + Jn) * R, "end": (Jdt + 2 * Jn) * R}


def _can_fuse(config, dims) -> bool:
    """B and C start on a chunk of the array's columns (the scan reads them as C-wide operands)."""
    offsets = _fused_offsets(config, dims)
    return offsets["BB"] % config.array_cols == 0 and offsets["CC"] % config.array_cols == 0


def plan_mixer(layout: MixerWeights, config: MarcaConfig, options: CompileOptions, length: int,
               base: Allocator, sequences: bool = False) -> MixerPlan:
    """Choose the tiling of ``layout``'s mixer for ``length`` tokens: the biggest channel group, then the
    biggest token block, that fit beside what ``base`` already holds. Raises CompileError (the buffer,
    the need, what there is) when not even one token of one line of channels fits.

    ``sequences``: the tokens are one decode step of ``length`` independent sequences (batched decode):
    each token has its own conv window (``d_conv`` history rows + the token) and its own scan state, so the
    scan regions hold a scan group per token of the block. Big blocks share each weight read among more
    sequences but leave less room for the scan group (more, shorter scan instructions per token), so the
    block size is chosen by :func:`_batched_cost`, an instruction and weight-traffic estimate."""
    d = layout.dims
    R, C, P = config.array_rows, config.array_cols, config.lanes
    fused = sequences and _can_fuse(config, d)
    Di_l, small = _row_lines(config, d, fused)
    Dm_l = _lines(config, d.d_model)
    Jd, Kn = ceil_div(d.d_inner, R), ceil_div(d.d_state, C)
    vectors = len(layout.vectors)
    total_matrix_lines = sum(m.lines for m in layout.matrices.values())
    longest_input = max(m.K for m in layout.matrices.values())
    top = min(Di_l, options.max_group_lines or Di_l, 4095)
    group_candidates = []
    g = top
    while True:
        group_candidates.append(g)
        if g == 1:
            break
        g = ceil_div(g, 2)
    token_limit = min(length, options.max_block_tokens or length)

    def attempt(T, G, params_resident, hidden_resident, output_resident, O, staging_chunks, S):
        trial = base.copy()
        regions = {}
        parameter_lines = vectors * (Di_l if params_resident else G)
        regions["PARAMS"] = trial.take("the per-channel parameters", parameter_lines, [Buffer.WEIGHT])
        area_lines = trial.free(Buffer.WEIGHT)
        if options.max_weight_lines is not None:
            area_lines = min(area_lines, options.max_weight_lines)
        if area_lines < 1:
            raise CompileError(f"the weight buffer has no line left for matrix tiles after "
                               f"{parameter_lines} lines of per-channel parameters "
                               f"(configuration {config.name!r}: {trial.size[Buffer.WEIGHT]} lines)")
        area = (trial.next[Buffer.WEIGHT] * P, area_lines)
        if sequences:
            regions["A"] = trial.take("the scan's A tiles of one scan group", S * Kn, _SCAN_ORDER)
            # dBx before dA: the decay tiles, written while the DMA loads h, then take another buffer than h
            # where they can (one write port per buffer: the DMA's writes would stall the array's)
            for name, what in (("h", "scan states h"), ("dBx", "drive tiles"), ("dA", "decay tiles")):
                regions[name] = trial.take(f"the {what} of one scan group for {T} sequences", T * S * Kn,
                                           _SCAN_ORDER)
            if not (G >= Di_l and S >= Jd):     # several scan groups: a second h and A, loaded under the scan
                regions["A2"] = trial.take("the scan's A tiles of the next scan group", S * Kn, _SCAN_ORDER)
                regions["h2"] = trial.take(f"the scan states h of the next scan group for {T} sequences",
                                           T * S * Kn, _SCAN_ORDER)
        else:
            regions["h"] = trial.take("the scan state h of one scan group", S * Kn, [Buffer.STATE])
            regions["A"] = trial.take("the scan's A tiles of one scan group", S * Kn, [Buffer.STATE])
            regions["dA"] = trial.take("the scan's decay tile", S * Kn, _SCRATCH_ORDER)
            regions["dBx"] = trial.take("the scan's drive tile", S * Kn, _SCRATCH_ORDER)
        need = {name: T * G for name in ("XC", "Z", "DELTA", "DX", "DXD", "Y")}
        need["X"] = T * (d.d_conv + 1) * G if sequences else (d.d_conv + T) * G
        need.update({name: T * lines for name, lines in small.items() if not fused or name == "XP"})
        if hidden_resident:
            need["H"] = T * Dm_l
        need["OUT"] = T * Dm_l if output_resident else ceil_div(T * O * R, P)
        if layout.out_bias is not None:
            need["OBIAS"] = Dm_l if output_resident else ceil_div(O * R, P)
        if staging_chunks:
            need["STAGING"] = ceil_div(T * staging_chunks * C, P)
        for name in sorted(need, key=lambda n: -need[n]):      # biggest first keeps first fit from stranding
            regions[name] = trial.take(f"the token block's {name} region ({T} tokens)", need[name],
                                       _ACTIVATION_ORDER)
        if fused:         # dt, B and C inside each token's x_proj row
            buffer, address = regions["XP"]
            for name, offset in _fused_offsets(config, d).items():
                if name != "end":
                    regions[name] = (buffer, address + offset)
        return regions, area

    def build(T, G, params_resident, hidden_resident, output_resident, O, staging_chunks, S):
        regions, area = attempt(T, G, params_resident, hidden_resident, output_resident, O, staging_chunks, S)
        weights_resident = options.intra_operation and total_matrix_lines <= area[1]
        plan = MixerPlan(block_tokens=T, group_lines=G, parameters_resident=params_resident,
                         hidden_resident=hidden_resident, output_resident=output_resident,
                         output_group_tiles=O,
                         staging_lines=ceil_div(T * staging_chunks * C, P) if staging_chunks else 0,
                         scan_tiles=S, scan_resident=G >= Di_l and S >= Jd, weights_resident=weights_resident,
                         groups=ceil_div(Di_l, G), regions=regions, weight_area=area,
                         parameter_area=regions["PARAMS"][1], sequences=sequences)
        return plan

    def fits(*args) -> bool:
        try:
            attempt(*args)
            return True
        except CompileError:
            return False

    error = None
    for G in group_candidates:
        group_tiles = min(Jd, G * C)
        scan_top = min(group_tiles, options.max_scan_tiles or group_tiles)
        for params_resident in ((True, False) if G < Di_l else (True,)):
            for hidden_resident, output_resident in (((False, False),) if options.stream_rows else
                                                     ((True, True), (False, True), (True, False), (False, False))):
                streamed = not hidden_resident or G < Di_l
                staging = 1 if streamed else 0
                O = 0 if output_resident else 1
                args = lambda T=1, S=1, O=O, staging=staging: (T, G, params_resident, hidden_resident,
                                                                output_resident, O, staging, S)
                try:
                    attempt(*args())
                except CompileError as failure:     # the last one tried is the minimal working set
                    error = failure
                    continue
                if sequences:     # the block (with its biggest scan group) of the least estimated cost
                    top = largest(1, token_limit, lambda t: fits(*args(T=t, S=1)))
                    best = None
                    sizes = range(top, 0, -1) if top <= 64 else \
                        sorted({ceil_div(top, n) for n in range(1, 65)}, reverse=True)
                    for t in sizes:
                        # the whole state in one group first: fewer tiles need the second copy of h and A
                        s = scan_top if fits(*args(T=t, S=scan_top)) else \
                            largest(1, scan_top, lambda s: fits(*args(T=t, S=s)))
                        cost = _batched_cost(build(*args(T=t, S=s)), layout, config, length, Jd)
                        if best is None or cost < best[0]:
                            best = (cost, t, s)
                    T, S = best[1:]
                else:
                    # h and A of as many channel tiles as the state buffer holds (as before the token block)
                    S = max(1, min(scan_top, base.free(Buffer.STATE) // (2 * Kn)))
                    while S > 1 and not fits(*args(S=S)):
                        S = ceil_div(S, 2)
                    T = largest(1, token_limit, lambda t: fits(*args(T=t, S=S)))
                if staging:
                    staging = largest(1, longest_input, lambda k: fits(*args(T=T, S=S, staging=k)))
                if not output_resident:
                    O = largest(1, ceil_div(d.d_model, R), lambda o: fits(*args(T=T, S=S, staging=staging,
                                                                                 O=o)))
                return build(*args(T=T, S=S, staging=staging, O=O))
    raise error


#: Cycles an instruction of the batched scan costs beyond its beats (dispatch, operands in the pipeline),
#: roughly, from marca.perf on the demo configuration; the planner only compares block sizes with it.
_INSTRUCTION_CYCLES = 20


def _batched_cost(plan: MixerPlan, layout: MixerWeights, config: MarcaConfig, length: int, Jd: int) -> float:
    """Estimated overhead cycles of a batched decode step of ``length`` sequences with ``plan``: per block,
    about 30 instructions outside the scan and, per scan group, 6 plus 3 per sequence (decay, drive,
    output), each ``_INSTRUCTION_CYCLES``; plus the weights' bus cycles again for every block when they
    are streamed (resident weights are read once per step whatever the blocks)."""
    T, S = plan.block_tokens, plan.scan_tiles
    blocks = ceil_div(length, T)
    scan_groups = ceil_div(Jd, S) * plan.groups
    cycles = blocks * _INSTRUCTION_CYCLES * (30 + scan_groups * (6 + 3 * T))
    if not plan.weights_resident:
        weight_bytes = sum(m.lines for m in layout.matrices.values()) * config.lanes * config.storage_bytes
        cycles += blocks * weight_bytes / (config.axi_data_width // 8)
    return cycles


def lower_mixer(emitter: Emitter, layout: MixerWeights, plan: MixerPlan, config: MarcaConfig,
                options: CompileOptions, *, length: int, hidden: TensorPlace, output: TensorPlace,
                staging_memory: dict, zero: tuple, loaded: bool = False) -> None:
    """Emit the mixer's program: ``length`` tokens from ``hidden`` rows to ``output`` rows, states read
    from and written back to ``layout``'s state places. ``staging_memory``: memory places ``XC`` and ``Y``
    (``[block_tokens, d_inner padded]`` compute rows) for the channel-grouped dataflow; ``zero``: (buffer,
    address) of a +0 element.

    ``loaded`` (a decode step whose plan keeps them all on chip, :func:`resident_weights`): the matrices,
    the per-channel parameters and ``A`` are already where ``plan`` puts them, left there by an earlier
    program of the same plan (buffers keep their contents between programs, docs/isa.md): no LOAD of
    them."""
    if loaded and not resident_weights(plan):
        raise CompileError("resident weights need a decode step whose plan keeps every matrix, the "
                           "per-channel parameters and A on chip (weights_resident, parameters_resident, "
                           f"scan_resident); this plan has {plan.describe()}")
    _MixerLowering(emitter, layout, plan, config, options, length, hidden, output, staging_memory, zero,
                   loaded).run()


def resident_weights(plan: MixerPlan) -> bool:
    """Whether a program of ``plan`` can find its weights left on chip by an earlier one: a decode step
    (the batched lowering) that keeps every matrix, the per-channel parameters and ``A`` on chip."""
    return plan.sequences and plan.weights_resident and plan.parameters_resident and plan.scan_resident


class _MixerLowering:
    def __init__(self, emitter, layout, plan, config, options, length, hidden, output, staging_memory, zero,
                 loaded=False):
        self.loaded = loaded
        self.em, self.layout, self.plan, self.config, self.options = emitter, layout, plan, config, options
        self.length, self.hidden, self.output, self.staging_memory, self.zero = (length, hidden, output,
                                                                                 staging_memory, zero)
        self.R, self.C, self.P = config.array_rows, config.array_cols, config.lanes
        d = layout.dims
        self.d = d
        self.fused = plan.sequences and "XP" in plan.regions
        self.Di_l, self.small = _row_lines(config, d, self.fused)
        self.Dm_l = _lines(config, d.d_model)
        self.Jd, self.Kn = ceil_div(d.d_inner, self.R), ceil_div(d.d_state, self.C)
        self.G = plan.group_lines
        self.multi = plan.groups > 1
        self.seq = plan.sequences
        self.window = (d.d_conv + 1) * self.G     # lines of one sequence's conv window (batched decode)
        self.matrices = {name: Matrix(m.name, m.memory, m.J, m.K) for name, m in layout.matrices.items()}
        staging = plan.regions.get("STAGING")
        self.area = WeightArea(config, plan.weight_area[0], plan.weight_area[1],
                               (*staging, plan.staging_lines) if staging else None)

    # Regions -------------------------------------------------------------------------------------------

    def token_lines(self, name):
        return self.small.get(name, self.Dm_l if name in ("H", "OUT") else self.G)

    def region(self, name, t=0):
        buffer, address = self.plan.regions[name]
        return buffer, address + t * self.token_lines(name) * self.P

    def onchip(self, name, first=0, row=0):
        buffer, address = self.region(name)
        return OnChip(buffer, address + row * self.token_lines(name) * self.P, self.token_lines(name) * self.P,
                      first)

    def parameter(self, name, g0):
        """(buffer, element address) of vector ``name`` for the group starting at line ``g0``."""
        index = self.layout.vectors.index(name)
        if self.plan.parameters_resident:
            return Buffer.WEIGHT, self.plan.parameter_area + (index * self.Di_l + g0) * self.P
        return Buffer.WEIGHT, self.plan.parameter_area + index * self.G * self.P

    def parameter_onchip(self, name, g0):
        if name not in self.layout.vectors:
            return None
        buffer, address = self.parameter(name, g0)
        return OnChip(buffer, address, 0, g0 * self.C)

    def linear(self, name, tokens, source, output, **kwargs):
        emit_linear(self.em, self.area, self.matrices[name], tokens, source, output,
                    intra_operation=self.options.intra_operation, **kwargs)

    # Program -------------------------------------------------------------------------------------------

    def run(self):
        em, plan, P, d = self.em, self.plan, self.P, self.d
        em.section(f"mixer: {plan.describe()}")
        self.pending, self.prefetched, self.hidden_loaded = {}, None, None
        self.scan_copy, self.scan_loaded, self.scan_store = 0, None, None   # scan groups' two copies
        self.h_ahead = None       # (block, first tile) of a scan group whose h was loaded ahead
        if self.seq:
            self.run_sequences()
            return
        if plan.parameters_resident:
            em.load_lines(self.layout.parameters, len(self.layout.vectors) * self.Di_l, Buffer.WEIGHT,
                          plan.parameter_area)
        if plan.scan_resident and self.seq:      # A stays; each block loads its sequences' h
            em.load_lines(self.layout.A, self.Jd * self.Kn, *plan.regions["A"])
        elif plan.scan_resident:
            self.load_scan_group(0, self.Jd)
        for name in sorted(plan.regions):
            if name in ("PARAMS", "h", "A", "dA", "dBx"):
                continue
            buffer, address = plan.regions[name]
            em.zero_fill(buffer, address, self.region_lines(name), self.zero)
        if not self.multi and not self.seq:
            xb, xa = self.region("X")
            em.load_lines(self.layout.conv_state.address, d.d_conv * self.Di_l, xb, xa, compute=True)
        if plan.weights_resident:
            offset = plan.weight_area[0]
            for matrix in self.matrices.values():
                matrix.resident = offset
                em.load_lines(matrix.memory, matrix.lines, Buffer.WEIGHT, offset)
                offset += matrix.lines * P
        for t0 in range(0, self.length, plan.block_tokens):
            self.block(t0, min(plan.block_tokens, self.length - t0))
        if plan.scan_resident and not self.seq:
            em.store_lines(self.layout.ssm_state.address, self.layout.ssm_state.rows, *plan.regions["h"])
        if not self.multi and not self.seq:
            em.store_lines(self.layout.conv_state.address, d.d_conv * self.Di_l, *self.region("X"))

    def run_sequences(self):
        """Batched decode: the order of :meth:`run` changed so that the loads overlap compute. The DMA starts
        at once on what the first projection reads (the first block's hidden rows, the first weight group or
        the resident ``in_x``) and the zero fills run under it (after a barrier for the zero line alone, so
        that they do not wait for those loads); the parameters and ``A`` follow; resident weights are loaded
        matrix by matrix one use ahead (:meth:`ensure`) instead of all before the first block, so the DMA
        streams them while the array works on the previous projection."""
        em, plan, P = self.em, self.plan, self.P
        if plan.parameters_resident:
            self.pending["parameters"] = (self.layout.parameters, len(self.layout.vectors) * self.Di_l,
                                          Buffer.WEIGHT, plan.parameter_area)
        if plan.scan_resident:      # A stays; each block loads its sequences' h
            self.pending["A"] = (self.layout.A, self.Jd * self.Kn, *plan.regions["A"])
        if plan.weights_resident:
            offset = plan.weight_area[0]
            for name, matrix in self.matrices.items():
                matrix.resident = offset
                self.pending[name] = (matrix.memory, matrix.lines, Buffer.WEIGHT, offset)
                offset += matrix.lines * P
        if self.loaded:     # an earlier program of this plan left them all where they belong
            self.pending = {}
        fills = [name for name in sorted(plan.regions)
                 if name not in ("PARAMS", "h", "A", "h2", "A2", "dA", "dBx")
                 and not (self.fused and name in ("DT", "BB", "CC"))]
        em.emit(isa.Barrier())      # the zero line, before the loads below
        if plan.hidden_resident:
            first = min(plan.block_tokens, self.length)
            fills.remove("H")
            if self.Dm_l * P != self.d.d_model:      # pads after the hidden rows: zero first
                em.zero_fill(*plan.regions["H"], self.region_lines("H"), self.zero)
            self.load_hidden(0, first)
            self.hidden_loaded = 0
            self.ensure("in_x", *(("parameters",) if "in_x_bias" in self.layout.vectors else ()))
            self.prefetch_group(self.matrices["in_x"], first, rows=(0, min(self.Jd, self.G * self.C)))
        # Regions that follow one another in a buffer filled by one instruction: few instructions to fetch
        # while the first LOAD holds the read channel
        spans = []
        for buffer, address, lines in sorted((*plan.regions[name], self.region_lines(name)) for name in fills):
            if spans and spans[-1][0] == buffer and spans[-1][1] + spans[-1][2] * P == address:
                spans[-1][2] += lines
            else:
                spans.append([buffer, address, lines])
        for buffer, address, lines in spans:
            em.zero_fill(buffer, address, lines, self.zero)
        for t0 in range(0, self.length, plan.block_tokens):
            self.block(t0, min(plan.block_tokens, self.length - t0))

    def load_hidden(self, t0, tokens):
        hb, ha = self.region("H")
        place = self.hidden
        self.em.dma(isa.Load, memory_address=place.address + t0 * place.row_stride, rows=tokens,
                    row_elements=place.row_elements, memory_row_stride=place.row_stride, buffer=hb,
                    address=ha, buffer_row_stride=self.Dm_l * self.P, compute=place.compute)

    def prefetch(self, t0, tokens):
        """Batched decode, one channel group, rows on chip: LOAD the next block's hidden rows and conv states
        while this block's out_proj runs (its H and X regions are free by then), so the next block starts
        without waiting for them."""
        following = t0 + tokens
        if not (self.seq and not self.multi and self.plan.hidden_resident and following < self.length):
            return
        count = min(self.plan.block_tokens, self.length - following)
        self.load_hidden(following, count)
        self.conv_states(isa.Load, following, count, 0, self.Di_l, 0)
        self.prefetched = following

    def fused_x_proj(self):
        """Batched decode: x_proj's dt, B and C parts as one matrix when their tiles follow one another in
        memory and (resident) in the weight buffer, else None."""
        if not self.fused:
            return None
        parts = [self.matrices[name] for name in ("x_dt", "x_B", "x_C")]
        line_bytes = self.P * self.config.storage_bytes
        for a, b in zip(parts, parts[1:]):
            if b.memory != a.memory + a.lines * line_bytes:
                return None
            if (a.resident is None) != (b.resident is None) or \
                    (a.resident is not None and b.resident != a.resident + a.lines * self.P):
                return None
        return Matrix("x_proj", parts[0].memory, sum(m.J for m in parts), parts[0].K, parts[0].resident)

    def prefetch_group(self, matrix, tokens, rows=None, chunks=None, taper=False):
        """Streamed weights: LOAD the next weight group of ``matrix``'s next LINEAR now (on-chip sources
        only), under the work before it (the streamed counterpart of :meth:`ensure`)."""
        if self.seq and matrix.resident is None:
            prefetch_weights(self.em, self.area, matrix, tokens, rows=rows, chunks=chunks, taper=taper)

    def ensure(self, *names):
        """LOAD what ``names`` name (resident matrices, ``parameters``, ``A``) if not loaded yet: a decode
        step loads each just before its first use, so the DMA streams it under the work before."""
        loads = [self.pending.pop(name) for name in names if name in self.pending]
        line_bytes = self.P * self.config.storage_bytes
        while loads:        # one LOAD for neighbours in memory and in the buffer (x_proj's three parts)
            memory, lines, buffer, address = loads.pop(0)
            while loads and loads[0][0] == memory + lines * line_bytes and loads[0][2] == buffer and \
                    loads[0][3] == address + lines * self.P:
                lines += loads.pop(0)[1]
            self.em.load_lines(memory, lines, buffer, address)

    def region_lines(self, name):
        plan, d = self.plan, self.d
        T = plan.block_tokens
        if name == "X":
            return T * self.window if self.seq else (d.d_conv + T) * self.G
        if name == "OUT" and not plan.output_resident:
            return ceil_div(T * plan.output_group_tiles * self.R, self.P)
        if name == "OBIAS":
            return self.Dm_l if plan.output_resident else ceil_div(plan.output_group_tiles * self.R, self.P)
        if name == "STAGING":
            return plan.staging_lines
        return T * self.token_lines(name)

    def groups(self):
        for g0 in range(0, self.Di_l, self.G):
            yield g0, min(self.G, self.Di_l - g0)

    def load_group_parameters(self, g0, lines):
        if self.plan.parameters_resident:
            return
        P, sb = self.P, self.config.storage_bytes
        self.em.dma(isa.Load, memory_address=self.layout.parameters + g0 * P * sb, rows=len(self.layout.vectors),
                    row_elements=lines * P, memory_row_stride=self.Di_l * P * sb, buffer=Buffer.WEIGHT,
                    address=self.plan.parameter_area, buffer_row_stride=self.G * P, compute=False)

    def load_scan_group(self, j0, count):
        """h and A tiles of channel tiles j0 .. j0 + count - 1 into the state buffer."""
        P, Kn, config = self.P, self.Kn, self.config
        self.em.load_lines(self.layout.ssm_state.address + j0 * Kn * P * config.compute_bytes, count * Kn,
                           *self.plan.regions["h"], compute=True)
        self.em.load_lines(self.layout.A + j0 * Kn * P * config.storage_bytes, count * Kn, *self.plan.regions["A"])

    def conv_states(self, kind, t0, tokens, g0, lines, offset):
        """Batched decode: LOAD (STORE) the conv states of sequences ``t0 ..`` into (from) their windows'
        rows starting ``offset`` elements into each window, channel lines ``g0 .. g0 + lines - 1``."""
        P, G, dc, cb = self.P, self.G, self.d.d_conv, self.config.compute_bytes
        xb, xa = self.region("X")
        first = self.layout.conv_state_of(t0)
        if lines == self.Di_l:      # one group: a sequence's state is one contiguous row of d_conv lines
            self.em.dma(kind, memory_address=first.address, rows=tokens, row_elements=dc * lines * P,
                        memory_row_stride=first.rows * first.row_stride, buffer=xb, address=xa + offset,
                        buffer_row_stride=self.window * P, compute=True)
            return
        for t in range(tokens):
            state = self.layout.conv_state_of(t0 + t)
            self.em.dma(kind, memory_address=state.address + g0 * P * cb, rows=dc, row_elements=lines * P,
                        memory_row_stride=state.row_stride, buffer=xb,
                        address=xa + t * self.window * P + offset, buffer_row_stride=G * P, compute=True)

    def scan_transfer(self, t0, tokens, j0, count, copy):
        """The 2-D transfer of the block's ``h`` of channel tiles ``j0 ..`` between memory and scan copy
        ``copy`` (0: ``h``, 1: ``h2``)."""
        S, Kn, P = self.plan.scan_tiles, self.Kn, self.P
        hb, ha = self.plan.regions["h2" if copy else "h"]
        first = self.layout.ssm_state_of(t0)
        return dict(memory_address=first.address + j0 * Kn * P * self.config.compute_bytes, rows=tokens,
                    row_elements=count * Kn * P, memory_row_stride=first.rows * first.row_stride,
                    buffer=hb, address=ha, buffer_row_stride=S * Kn * P, compute=True)

    def load_scan_sequences(self, t0, tokens, j0, count, copy, parts=("h", "A")):
        """LOAD the block's ``h`` (and, when it does not stay, ``A``) of channel tiles ``j0 ..`` into scan
        copy ``copy`` (``parts``: only those)."""
        if "h" in parts:
            self.em.dma(isa.Load, **self.scan_transfer(t0, tokens, j0, count, copy))
        if "A" in parts and not self.plan.scan_resident:
            self.em.load_lines(self.layout.A + j0 * self.Kn * self.P * self.config.storage_bytes,
                               count * self.Kn, *self.plan.regions["A2" if copy else "A"])

    def scan_sequences(self, t0, tokens, g0, j0, count, following=None):
        """Batched decode: one scan step of every sequence of the block on channel tiles ``j0 ..``. Each
        sequence has its own ``h`` (loaded and stored with one 2-D transfer for the block); the steps of the
        sequences are independent, so the program interleaves them stage by stage (the decay of every
        sequence, one EXP, the drives, one MULADD, the outputs) and no instruction waits for the one
        before.

        With several scan groups there are two copies of ``h`` and ``A`` (``h2``, ``A2``) and the groups
        alternate between them: ``following`` (``(j0, count)`` of the next group) is loaded into the other
        copy under this group's EXP, and this group's ``h`` is stored under the next group's work (after
        its decay, so that the STORE's barrier does not wait for a LOAD), so the DMA works under the scan
        instead of between its groups."""
        em, P, R, C, Kn = self.em, self.P, self.R, self.C, self.Kn
        S = self.plan.scan_tiles
        copy = self.scan_copy
        (hb, ha), A = self.plan.regions["h2" if copy else "h"], self.plan.regions["A2" if copy else "A"]
        (ab, aa), (bb, ba) = self.plan.regions["dA"], self.plan.regions["dBx"]
        stride = S * Kn * P          # elements from one sequence's scan group tiles to the next
        if self.scan_loaded != (t0, j0):
            self.load_scan_sequences(t0, tokens, j0, count, copy)
        if not self.plan.scan_resident:
            a_tiles = (*A, Kn, 1)
        else:
            a_tiles = (A[0], A[1] + j0 * Kn * P, Kn, 1)
        offset = (j0 - g0 * C) * R

        def rows(name, t):
            buffer, address = self.region(name, t)
            return buffer, address + offset

        for t in range(tokens):      # decay = delta[t, d] * A[d, n]
            em.elementwise(ElementwiseOp.MUL, count, Kn, (ab, aa + t * stride, Kn, 1),
                           (*rows("DELTA", t), 1, 0, Broadcast.ROW), a_tiles)
        if self.scan_store:         # the previous group's h, from the other copy
            em.dma(isa.Store, **self.scan_store)
            self.scan_store = None
        if count == S:
            em.nonlinear(NonlinearFunction.EXP, ab, aa, tokens * S * Kn)
        else:
            for t in range(tokens):
                em.nonlinear(NonlinearFunction.EXP, ab, aa + t * stride, count * Kn)
        self.scan_loaded = None
        if following:       # h under the EXP, A under the drive (a LOAD holds up dispatch till the DMA is free)
            if self.h_ahead != (t0, following[0]):
                self.load_scan_sequences(t0, tokens, *following, 1 - copy, ("h",))
            self.scan_loaded = (t0, following[0])
        self.ensure("in_z")      # the projection after the scan, loaded under it
        group_tiles = (g0 * C, min(self.Jd, (g0 + self.G) * C))
        if j0 == group_tiles[0]:      # in the channel group's first scan group: the DMA has time under the scan
            self.prefetch_group(self.matrices["in_z"], tokens, rows=group_tiles)
        for t in range(tokens):      # drive = (delta[t, d] * x[t, d]) * B[t, n]
            em.elementwise(ElementwiseOp.MUL, count, Kn, (bb, ba + t * stride, Kn, 1),
                           (*rows("DX", t), 1, 0, Broadcast.ROW),
                           (*self.region("BB", t), 0, 1, Broadcast.COLUMN))
        # h = decay * h + drive, every sequence in one instruction
        tiles = lambda buffer, address: (buffer, address, S * Kn, 1)
        em.elementwise(ElementwiseOp.MULADD, tokens, count * Kn, tiles(hb, ha), tiles(ab, aa), tiles(hb, ha),
                       tiles(bb, ba))
        if following:
            self.load_scan_sequences(t0, tokens, *following, 1 - copy, ("A",))
        for t in range(tokens):      # y[t, d] = sum_n h[d, n] * C[t, n] + D[d] * x[t, d]
            out_b, out_a = rows("Y", t)
            ccb, cca = self.region("CC", t)
            bias_b, bias_a = rows("DXD", t)
            em.emit(isa.Linear(matrix_buffer=hb, matrix_address=ha + t * stride, chunk_count=Kn,
                               row_tile_count=count, token_count=1, vector_buffer=ccb, vector_address=cca,
                               output_buffer=out_b, output_address=out_a, init=LinearInit.BIAS,
                               bias_buffer=bias_b, bias_address=bias_a))
        transfer = self.scan_transfer(t0, tokens, j0, count, copy)
        if following:
            self.scan_store, self.scan_copy = transfer, 1 - copy
        else:
            em.dma(isa.Store, **transfer)

    def hidden_source(self, t0, tokens):
        if self.plan.hidden_resident:
            return self.onchip("H")
        place = self.hidden
        return InMemory(place.address + t0 * place.row_stride, place.row_stride, place.row_elements, place.compute)

    def block(self, t0, tokens):
        em, d, P, G, C = self.em, self.d, self.P, self.G, self.C
        cb = self.config.compute_bytes
        dc = d.d_conv
        W = Buffer.WEIGHT
        em.section(f"mixer block: tokens {t0}..{t0 + tokens - 1}")
        prefetched = self.seq and self.prefetched == t0
        if self.plan.hidden_resident and not prefetched and self.hidden_loaded != t0:
            self.load_hidden(t0, tokens)
        if self.seq:        # what the first projection reads first, then what follows it
            self.ensure("in_x", *(("parameters",) if "in_x_bias" in self.layout.vectors else ()))
        source = self.hidden_source(t0, tokens)
        xb, xa = self.region("X")
        cxb, cxa = self.region("XC")
        state = self.layout.conv_state

        # Stage 1: in_proj x, conv, SiLU, x_proj partial sums.
        for index, (g0, lines) in enumerate(self.groups()):
            if self.multi:
                em.section(f"stage 1, channel lines {g0}..{g0 + lines - 1}")
            self.load_group_parameters(g0, lines)
            if self.multi and not self.seq:
                em.dma(isa.Load, memory_address=state.address + g0 * P * cb, rows=dc, row_elements=lines * P,
                       memory_row_stride=state.row_stride, buffer=xb, address=xa, buffer_row_stride=G * P,
                       compute=True)
            tiles = (g0 * C, min(self.Jd, (g0 + lines) * C))
            step = self.window if self.seq else G       # from one token's window rows to the next
            self.ensure("in_x")
            self.linear("in_x", tokens, source, OnChip(xb, xa + dc * G * P, step * P, g0 * C), rows=tiles,
                        bias=self.parameter_onchip("in_x_bias", g0))
            if self.seq and not prefetched:     # the window's history rows, under the projection
                self.conv_states(isa.Load, t0, tokens, g0, lines, 0)
            self.ensure("parameters")
            tap = lambda k: (*self.parameter(f"conv_tap{k}", g0), 0, 1)
            window = lambda k: (xb, xa + (1 + k) * G * P, step, 1)
            xc = (cxb, cxa, G, 1)
            em.elementwise(ElementwiseOp.MUL, tokens, lines, xc, tap(0), window(0))
            self.ensure("x_dt", "x_B", "x_C")     # under the convolution (a LOAD holds up dispatch)
            chunks = (g0 * self.R, min(self.matrices["x_dt"].K, (g0 + lines) * self.R))
            self.prefetch_group(self.fused_x_proj() or self.matrices["x_dt"], tokens, chunks=chunks)
            for k in range(1, dc):
                em.elementwise(ElementwiseOp.MULADD, tokens, lines, xc, tap(k), window(k), xc)
            if "conv_bias" in self.layout.vectors:
                em.elementwise(ElementwiseOp.ADD, tokens, lines, xc, xc, (*self.parameter("conv_bias", g0), 0, 1))
            em.nonlinear(NonlinearFunction.SILU, cxb, cxa, tokens * G)
            # the conv window's last d_conv rows are the history of the next block
            if self.seq:        # each sequence's window rows 1 .. d_conv are its next conv state
                self.conv_states(isa.Store, t0, tokens, g0, lines, G * P)
            elif self.multi:
                em.dma(isa.Store, memory_address=state.address + g0 * P * cb, rows=dc, row_elements=lines * P,
                       memory_row_stride=state.row_stride, buffer=xb, address=xa + tokens * G * P,
                       buffer_row_stride=G * P, compute=True)
            else:     # slide in place (a forward copy is legal in one instruction)
                em.elementwise(ElementwiseOp.PASS, dc, lines, (xb, xa, G, 1), (xb, xa + tokens * G * P, G, 1),
                               spill=False)
            x_all = self.fused_x_proj()
            if x_all:       # one LINEAR for dt, B and C: T x 9 row tiles of accumulators hide the pipeline
                emit_linear(self.em, self.area, x_all, tokens, OnChip(cxb, cxa, G * P, g0 * self.R),
                            self.onchip("XP"), chunks=chunks, accumulate=index > 0,
                            intra_operation=self.options.intra_operation)
            else:
                for name, region in (("x_dt", "DT"), ("x_B", "BB"), ("x_C", "CC")):
                    self.linear(name, tokens, OnChip(cxb, cxa, G * P, g0 * self.R), self.onchip(region),
                                chunks=chunks, accumulate=index > 0)
            if self.multi:
                place = self.staging_memory["XC"]
                em.dma(isa.Store, memory_address=place.address + g0 * P * cb, rows=tokens, row_elements=lines * P,
                       memory_row_stride=place.row_stride, buffer=cxb, address=cxa, buffer_row_stride=G * P,
                       compute=True)

        # Stage 2: delta, the scan, the gate.
        db, da = self.region("DELTA")
        yb, ya = self.region("Y")
        zb, za = self.region("Z")
        Kn = self.Kn
        tile = lambda place: (place[0], place[1], Kn, 1)
        h, A, dA, dBx = (self.plan.regions[name] for name in ("h", "A", "dA", "dBx"))
        for g0, lines in self.groups():
            if self.multi:
                em.section(f"stage 2, channel lines {g0}..{g0 + lines - 1}")
                self.load_group_parameters(g0, lines)
                place = self.staging_memory["XC"]
                em.dma(isa.Load, memory_address=place.address + g0 * P * cb, rows=tokens, row_elements=lines * P,
                       memory_row_stride=place.row_stride, buffer=cxb, address=cxa, buffer_row_stride=G * P,
                       compute=True)
            tiles = (g0 * C, min(self.Jd, (g0 + lines) * C))
            self.ensure("dt")
            self.linear("dt", tokens, self.onchip("DT"), OnChip(db, da, G * P, g0 * C), rows=tiles,
                        bias=self.parameter_onchip("dt_bias", g0))
            if self.seq and self.scan_loaded != (t0, tiles[0]):     # the first scan group, under dt and softplus
                self.load_scan_sequences(t0, tokens, tiles[0], min(self.plan.scan_tiles, tiles[1] - tiles[0]),
                                         self.scan_copy)
                self.scan_loaded = (t0, tiles[0])
                after = tiles[0] + self.plan.scan_tiles      # and the second group's h (its A: under the drive)
                if after < tiles[1] and "h2" in self.plan.regions:
                    self.load_scan_sequences(t0, tokens, after, min(self.plan.scan_tiles, tiles[1] - after),
                                             1 - self.scan_copy, ("h",))
                    self.h_ahead = (t0, after)
            self.ensure("A")
            em.nonlinear(NonlinearFunction.SOFTPLUS, db, da, tokens * G)
            xc = (cxb, cxa, G, 1)
            dxb, dxa = self.region("DX")
            em.elementwise(ElementwiseOp.MUL, tokens, lines, (dxb, dxa, G, 1), (db, da, G, 1), xc)
            dxdb, dxda = self.region("DXD")
            em.elementwise(ElementwiseOp.MUL, tokens, lines, (dxdb, dxda, G, 1), (*self.parameter("D", g0), 0, 1),
                           xc)
            # the selective scan, token by token, one scan group of channel tiles at a time
            for j0 in range(tiles[0], tiles[1], self.plan.scan_tiles):
                count = min(self.plan.scan_tiles, tiles[1] - j0)
                if self.seq:
                    after = j0 + self.plan.scan_tiles
                    following = (after, min(self.plan.scan_tiles, tiles[1] - after)) \
                        if after < tiles[1] and "h2" in self.plan.regions else None
                    self.scan_sequences(t0, tokens, g0, j0, count, following)
                    continue
                if not self.plan.scan_resident:
                    self.load_scan_group(j0, count)
                for t in range(tokens):
                    def rows(name, offset=(j0 - g0 * C) * self.R):
                        buffer, address = self.region(name, t)
                        return buffer, address + offset
                    # decay = exp(delta[t, d] * A[d, n])
                    em.elementwise(ElementwiseOp.MUL, count, Kn, tile(dA), (*rows("DELTA"), 1, 0, Broadcast.ROW),
                                   tile(A))
                    em.nonlinear(NonlinearFunction.EXP, dA[0], dA[1], count * Kn)
                    # drive = (delta[t, d] * x[t, d]) * B[t, n]
                    em.elementwise(ElementwiseOp.MUL, count, Kn, tile(dBx), (*rows("DX"), 1, 0, Broadcast.ROW),
                                   (*self.region("BB", t), 0, 1, Broadcast.COLUMN))
                    # h = decay * h + drive
                    em.elementwise(ElementwiseOp.MULADD, count, Kn, tile(h), tile(dA), tile(h), tile(dBx))
                    # y[t, d] = sum_n h[d, n] * C[t, n] + D[d] * x[t, d]
                    out_b, out_a = rows("Y")
                    ccb, cca = self.region("CC", t)
                    bias_b, bias_a = rows("DXD")
                    em.emit(isa.Linear(matrix_buffer=h[0], matrix_address=h[1], chunk_count=Kn,
                                       row_tile_count=count, token_count=1, vector_buffer=ccb, vector_address=cca,
                                       output_buffer=out_b, output_address=out_a, init=LinearInit.BIAS,
                                       bias_buffer=bias_b, bias_address=bias_a))
                if not self.plan.scan_resident:
                    em.store_lines(self.layout.ssm_state.address + j0 * Kn * P * cb, count * Kn, *h)
            self.linear("in_z", tokens, source, OnChip(zb, za, G * P, g0 * C), rows=tiles,
                        bias=self.parameter_onchip("in_z_bias", g0))
            self.ensure("out")
            if not self.multi and g0 + lines >= self.Di_l:
                # out_proj's first two groups, one in each half, under the gate: the first where in_z's
                # next-to-last group was, the second where its last one was (its barrier waits for in_z's
                # LINEAR, not for the gate)
                J = self.matrices["out"].J
                j1 = J if self.plan.output_resident else min(J, self.plan.output_group_tiles)
                last = t0 + tokens >= self.length and j1 >= J
                for _ in range(2):
                    self.prefetch_group(self.matrices["out"], tokens, rows=(0, j1), taper=last)
            em.nonlinear(NonlinearFunction.SILU, zb, za, tokens * G)
            em.elementwise(ElementwiseOp.MUL, tokens, lines, (yb, ya, G, 1), (yb, ya, G, 1), (zb, za, G, 1))
            if self.multi:
                place = self.staging_memory["Y"]
                em.dma(isa.Store, memory_address=place.address + g0 * P * cb, rows=tokens, row_elements=lines * P,
                       memory_row_stride=place.row_stride, buffer=yb, address=ya, buffer_row_stride=G * P,
                       compute=True)

        self.prefetch(t0, tokens)
        # Stage 3: out_proj.
        em.section("stage 3: out_proj")
        if self.multi:
            place = self.staging_memory["Y"]
            y_source = InMemory(place.address, place.row_stride, self.Di_l * P, True)
        else:
            y_source = self.onchip("Y")
        self.output_projection(t0, tokens, y_source)

    def output_projection(self, t0, tokens, y_source):
        em, P, R = self.em, self.P, self.R
        out, sb = self.output, self.config.storage_bytes
        size = self.config.compute_bytes if out.compute else sb
        J = self.matrices["out"].J
        group = J if self.plan.output_resident else self.plan.output_group_tiles
        ob, oa = self.region("OUT")
        for j0 in range(0, J, group):
            j1 = min(J, j0 + group)
            bias = None
            if self.layout.out_bias is not None:
                bb, ba = self.region("OBIAS")
                count = min(j1 * R, self.d.d_model) - j0 * R
                em.dma(isa.Load, memory_address=self.layout.out_bias + j0 * R * sb, rows=1, row_elements=count,
                       memory_row_stride=count * sb, buffer=bb, address=ba, buffer_row_stride=count, compute=False)
                bias = OnChip(bb, ba, 0, j0)
            stride = self.Dm_l * P if self.plan.output_resident else group * R
            last = self.seq and t0 + tokens >= self.length and j1 >= J      # the step's last LINEAR
            self.linear("out", tokens, y_source, OnChip(ob, oa, stride, j0), rows=(j0, j1), bias=bias, taper=last)
            first = j0 * R
            count = min(j1 * R, out.row_elements) - first
            em.dma(isa.Store, memory_address=out.address + t0 * out.row_stride + first * size, rows=tokens,
                   row_elements=count, memory_row_stride=out.row_stride, buffer=ob, address=oa,
                   buffer_row_stride=stride, compute=out.compute)
