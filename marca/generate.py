"""``marca generate``: a Mamba language model generating text on the accelerator (docs/model.md).

    marca generate (--checkpoint DIR | --random SIZE) --prompt TEXT --tokens N
                   --backend reference|iss|rtl --config PRESET|FILE [--temperature T --top-k K --seed S]
                   [--batch B]

streams the generated text to stdout as it is produced (a progress line on stderr), then prints the report
(cycles per token for prefill and decode from the cycle model marca.perf, tokens/s at the configuration's
clock, DRAM bytes per token, PE utilization per operation class, agreement with the float reference) and
writes it as JSON. ``--random SIZE`` builds the released shapes with random weights; a model too big for
this machine's memory is compiled from its shapes alone (program size, memory, DRAM bytes per token).
``--batch B`` generates ``B`` sequences from ``B`` copies of the prompt: one prefill, its states copied
into every sequence's slot, then batched decode steps (``decode_batch``: the ``B`` tokens share every
weight read); each sequence samples its own tokens (with ``--temperature 0`` they stay identical). The
report adds the batched step's figures (``decode_batch``) and every sequence's text.
"""

import codecs
import json
import math
import sys
import time
from pathlib import Path

__all__ = ["RELEASED_SIZES", "add_parser", "generate", "random_config", "load_checkpoint", "ByteTokenizer",
           "storage_rounded_model"]

#: The released Mamba shapes: d_model, layers (vocabulary 50,280, d_state 16, d_conv 4, expand 2), plus
#: two toy sizes for simulations.
RELEASED_SIZES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48),
                  "2.8b": (2560, 64)}
TOY_SIZES = {"toy": (16, 2, 256), "small": (64, 2, 256)}


def random_config(size: str):
    """A transformers MambaConfig of a released (or toy) size."""
    from transformers import MambaConfig
    if size in RELEASED_SIZES:
        d_model, layers = RELEASED_SIZES[size]
        vocab = 50280
    elif size in TOY_SIZES:
        d_model, layers, vocab = TOY_SIZES[size]
    else:
        raise ValueError(f"unknown size {size!r}; known: {', '.join([*RELEASED_SIZES, *TOY_SIZES])}")
    return MambaConfig(hidden_size=d_model, num_hidden_layers=layers, vocab_size=vocab, state_size=16,
                       conv_kernel=4, expand=2, intermediate_size=2 * d_model,
                       time_step_rank=math.ceil(d_model / 16), tie_word_embeddings=True)


class ByteTokenizer:
    """Token ids are the prompt's UTF-8 bytes (vocabulary 256)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: decoder.decode(bytes([token]) if token < 256 else b"?")


class _HuggingFaceTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decoder(self):
        ids, shown = [], ""

        def step(token):
            nonlocal shown
            ids.append(token)
            text = self.tokenizer.decode(ids)
            new, shown = text[len(shown):], text
            return new
        return step


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                    "spiece.model")


def load_checkpoint(folder):
    """``(state_dict, MambaConfig, tokenizer)`` from a folder as transformers saves it (config.json +
    safetensors), offline. Raises ValueError naming what is missing or wrong."""
    import torch
    from safetensors.torch import load_file
    from transformers import MambaConfig
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise ValueError(f"checkpoint folder {str(folder)!r} has no config.json")
    try:
        config = MambaConfig.from_json_file(str(folder / "config.json"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder / 'config.json'}: {error}") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint folder {str(folder)!r} has no .safetensors file")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    state = {name: value.to(torch.float32) for name, value in state.items()}
    tokenizer = ByteTokenizer()
    # Only a folder with tokenizer files gets a transformers tokenizer: without them AutoTokenizer builds
    # an empty one for the model type (every text encodes to no ids).
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer
            tokenizer = _HuggingFaceTokenizer(AutoTokenizer.from_pretrained(str(folder),
                                                                            local_files_only=True))
        except Exception:         # tokenizer files transformers cannot load offline: bytes
            pass
    return state, config, tokenizer


def _float_model(state, mamba_config):
    import torch
    from transformers import MambaForCausalLM
    model = MambaForCausalLM(mamba_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [name for name in missing if name != "lm_head.weight"]:
        raise ValueError(f"the checkpoint lacks {missing[0]!r}")
    model.tie_weights()
    return model.to(torch.float64).eval()


def storage_rounded_model(state, mamba_config, storage_format):
    """The float64 reference with every weight, and each RMSNorm's and mixer's output, rounded to the
    accelerator's storage format (what its memory holds; the compute format is not emulated). Its distance
    from the plain float64 model is the model's own sensitivity to that rounding: a random-initialised
    released size amplifies it from layer to layer (docs/model.md, bench/model_sensitivity.py)."""
    import torch
    from marca.golden import fp

    def rounded(values):
        return fp.decode(fp.encode(values.to(torch.float64), storage_format), storage_format)
    model = _float_model({name: rounded(value) for name, value in state.items()}, mamba_config)
    layers = model.backbone.layers
    for module in [*(layer.norm for layer in layers), *(layer.mixer for layer in layers),
                   model.backbone.norm_f]:
        module.register_forward_hook(lambda module, inputs, output: rounded(output))
    return model


def _choose(logits, temperature: float, top_k: int | None, generator) -> int:
    import torch
    if temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits.to(torch.float64) / temperature
    if top_k:
        threshold = torch.topk(scaled, min(top_k, len(scaled))).values[-1]
        scaled = torch.where(scaled < threshold, torch.tensor(-math.inf, dtype=scaled.dtype), scaled)
    return int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator))


def _progress(message: str) -> None:
    print(f"\r\033[K[marca generate] {message}", end="", file=sys.stderr, flush=True)


def _program_figures(config, program, tokens: int) -> dict:
    """Counters, cycles (marca.perf, when it can be imported) and their per-token figures."""
    from marca.compiler.program import program_counters
    counters = program_counters(program.instructions, config)
    figures = {"tokens": tokens, "instructions": len(program.instructions), **counters,
               "dram_bytes_per_token": (counters["dma_bytes_read"] + counters["dma_bytes_written"]
                                        + counters["fetch_bytes"]) / tokens}
    try:
        from marca import perf
        report = perf.estimate(config, program.instructions)
    except ImportError:        # the cycle model is optional
        return figures
    cycles = report.cycles
    lanes = config.lanes
    figures.update(cycles=cycles, cycles_per_token=cycles / tokens,
                   tokens_per_second=tokens * config.fpga_clock_mhz * 1e6 / max(1, cycles),
                   pe_utilization={"linear": counters["linear_beats"] / max(1, cycles),
                                   "elementwise": counters["elementwise_beats"] / max(1, cycles),
                                   "nonlinear": counters["nonlinear_beats"] / max(1, cycles),
                                   "all": report.pe_utilization},
                   lanes=lanes)
    return figures


def generate(args) -> int:
    import torch
    from marca.cli import load_config
    from marca.compiler import compile_model
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.tokens < 1:
        raise ValueError(f"--tokens must be at least 1, not {args.tokens}")
    batch = getattr(args, "batch", 1)
    if not 1 <= batch <= 0xFFFF:
        raise ValueError(f"--batch must be from 1 to 65535, not {batch}")
    if batch > 1 and args.backend == "rtl":
        raise ValueError("--batch needs --backend iss or reference (the RTL model session runs one sequence)")
    config = load_config(args.config)
    if args.checkpoint:
        state, mamba_config, tokenizer = load_checkpoint(args.checkpoint)
    else:
        mamba_config, state, tokenizer = random_config(args.random), None, ByteTokenizer()
    from marca.compiler import model_shape
    shape = model_shape(mamba_config)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    unknown = [i for i in ids if not 0 <= i < shape.vocab]
    if unknown:
        raise ValueError(f"the prompt has tokens outside the model's vocabulary of {shape.vocab} "
                         f"(ids {unknown[:5]})")
    report = {"model": args.checkpoint or f"random {args.random}", "config": config.name,
              "backend": args.backend, "d_model": shape.d_model, "layers": shape.layers, "vocab": shape.vocab,
              "parameters": shape.parameter_count(), "prompt_tokens": len(ids),
              "clock_mhz": config.fpga_clock_mhz, "storage_format": config.storage_format.name,
              "batch": batch}
    # Weights for this size at FP32 plus the memory image: more than half this machine's memory -> shapes only.
    available = _available_memory()
    need = shape.parameter_count() * (8 + config.storage_bytes)
    shapes_only = args.shapes_only or (state is None and available is not None and need > available / 2)
    if state is None and not shapes_only:
        from transformers import MambaForCausalLM
        torch.manual_seed(args.seed)
        _progress(f"building random weights ({shape.parameter_count() / 1e6:.0f} M parameters)")
        model = MambaForCausalLM(mamba_config).eval()
        state = model.state_dict()
    _progress("compiling")
    compile_started = time.perf_counter()
    compiled = compile_model(state if not shapes_only else None, mamba_config, config, prompt_length=len(ids),
                             check_address_space=not shapes_only, batch=batch)
    bits = max(1, compiled.memory_size - 1).bit_length()
    if bits > config.axi_addr_width:      # only from shapes: say what the configuration would need
        report["address_bits_needed"] = bits
        _progress(f"note: the image needs {bits} address bits; {config.name!r} has axi_addr_width "
                  f"{config.axi_addr_width}\n")
    report["compile_seconds"] = time.perf_counter() - compile_started
    sizes = {mode: len(program.instructions) for mode, program in compiled.programs.items()}
    _progress(f"compiled in {report['compile_seconds']:.0f} s: prefill {sizes['prefill']} instructions, "
              f"decode step {sizes['decode']}; memory image {compiled.memory_size / 2**20:.1f} MiB\n")
    report["memory_bytes"] = compiled.memory_size
    report["weight_bytes"] = compiled.weight_bytes
    report["prefill"] = _program_figures(config, compiled.programs["prefill"], len(ids))
    report["decode"] = _program_figures(config, compiled.programs["decode"], 1)
    if batch > 1:
        report["decode_batch"] = _program_figures(config, compiled.programs["decode_batch"], batch)
    report["program_bytes"] = {mode: len(p.instructions) * 32 for mode, p in compiled.programs.items()}
    if shapes_only:
        report["shapes_only"] = True
        _progress("compiled from shapes alone (no weights on this machine)\n")
        return _finish(report, args, started)
    reference_model = _float_model(state, mamba_config)
    rounded_model = None if args.backend == "reference" else \
        storage_rounded_model(state, mamba_config, config.storage_format)
    generator = torch.Generator().manual_seed(args.seed)
    decoders = [tokenizer.decoder() for _ in range(batch)]
    sequences, agreement, max_delta = [list(ids) for _ in range(batch)], [], 0.0
    rounded_agreement, rounded_delta, rounding_delta, max_logit = [], 0.0, 0.0, 0.0
    session = None
    if args.backend == "iss":
        # 16-bit presets: each program's first run on the ISS, later runs replayed (marca.golden.replay).
        replay = not getattr(args, "no_replay", False) and config.compute_format.width == 16 \
            and config.storage_format.width == 16
        report["iss_replay"] = replay
        session = compiled.session(replay=replay, progress=lambda mode, done, total: _progress(
            f"{mode}: {done:,d} of {total:,d} instructions ({time.perf_counter() - started:.0f} s)"))
    elif args.backend == "rtl":
        from marca.tb.model import RtlModelSession
        session = RtlModelSession(compiled, pause=args.pause, seed=args.seed)
    texts = [""] * batch
    for step in range(args.tokens):
        _progress(f"{'prefill' if step == 0 else 'decode'} step {step + 1}/{args.tokens} "
                  f"({time.perf_counter() - started:.0f} s)")
        if session is None:
            rows = [None] * batch
        elif step == 0:
            rows = [session.prefill(ids)[-1]] * batch
            for b in range(1, batch):         # every sequence starts from the prompt's states
                session.copy_sequence(0, b)
        elif batch == 1:
            rows = [session.decode(sequences[0][-1])[-1]]
        else:
            rows = list(session.decode_batch([tokens[-1] for tokens in sequences]))
        for b, (tokens, logits) in enumerate(zip(sequences, rows)):
            with torch.no_grad():
                expected = reference_model(torch.tensor([tokens])).logits[0, -1]
            if logits is None:
                logits = expected
            else:
                with torch.no_grad():
                    rounded = rounded_model(torch.tensor([tokens])).logits[0, -1]
                agreement.append(int(torch.argmax(logits)) == int(torch.argmax(expected)))
                max_delta = max(max_delta, float((logits - expected).abs().max()))
                rounded_agreement.append(int(torch.argmax(logits)) == int(torch.argmax(rounded)))
                rounded_delta = max(rounded_delta, float((logits - rounded).abs().max()))
                rounding_delta = max(rounding_delta, float((rounded - expected).abs().max()))
                max_logit = max(max_logit, float(expected.abs().max()))
            token = _choose(logits, args.temperature, args.top_k, generator)
            tokens.append(token)
            piece = decoders[b](token)
            texts[b] += piece
            if b == 0:
                print(piece, end="", flush=True)
    print(flush=True)
    _progress("done\n")
    report["generated"] = texts[0]
    report["generated_ids"] = sequences[0][len(ids):]
    if batch > 1:
        report["generated_batch"] = texts
        report["generated_ids_batch"] = [tokens[len(ids):] for tokens in sequences]
        for b, text in enumerate(texts[1:], start=1):
            print(f"[sequence {b}] {text}", flush=True)
    if session is not None:
        report["top1_agreement"] = sum(agreement) / len(agreement)
        report["max_abs_logit_difference"] = max_delta
        report["max_abs_logit"] = max_logit
        report["storage_rounded_reference"] = {
            "top1_agreement": sum(rounded_agreement) / len(rounded_agreement),
            "max_abs_logit_difference": rounded_delta,
            "float64_max_abs_logit_difference": rounding_delta}
        report["measured_counters"] = session.steps
    return _finish(report, args, started)


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _finish(report, args, started) -> int:
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"model {report['model']} ({report['parameters'] / 1e6:.1f} M parameters, {report['layers']} layers, "
             f"d_model {report['d_model']}) on {report['config']}, backend {report['backend']}",
             f"program: prefill {report['prefill']['instructions']} instructions, decode "
             f"{report['decode']['instructions']}; memory image {report['memory_bytes'] / 2**20:.1f} MiB"]
    for mode in ("prefill", "decode", "decode_batch"):
        if mode not in report:
            continue
        figures = report[mode]
        title = f"decode, batch {report['batch']}" if mode == "decode_batch" else mode
        line = f"{title}: DRAM {figures['dram_bytes_per_token'] / 1e6:.3f} MB/token"
        if "cycles" in figures:
            use = figures["pe_utilization"]
            line += (f", {figures['cycles_per_token']:.0f} cycles/token, {figures['tokens_per_second']:.3g} "
                     f"tokens/s at {report['clock_mhz']:g} MHz, PE utilization linear {use['linear']:.1%} "
                     f"element-wise {use['elementwise']:.1%} nonlinear {use['nonlinear']:.1%}")
        lines.append(line)
    if "top1_agreement" in report:
        lines.append(f"agreement with the float64 reference: greedy top-1 {report['top1_agreement']:.1%}, "
                     f"max |dlogit| {report['max_abs_logit_difference']:.3g} "
                     f"(|logits| up to {report['max_abs_logit']:.3g})")
        rounded = report["storage_rounded_reference"]
        lines.append(f"against float64 with weights and stored activations rounded to "
                     f"{report['storage_format']}: top-1 {rounded['top1_agreement']:.1%}, "
                     f"max |dlogit| {rounded['max_abs_logit_difference']:.3g} "
                     f"(that rounding alone moves float64's logits by up to "
                     f"{rounded['float64_max_abs_logit_difference']:.3g})")
    lines.append(f"took {report['seconds']:.1f} s; report written to {args.out}")
    print("\n".join(lines))
    return 0


def add_parser(commands) -> None:
    """Register ``generate`` on the ``marca`` command's subparsers."""
    parser = commands.add_parser("generate", help="generate text with a Mamba model on the accelerator")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="folder with config.json + safetensors (transformers' layout)")
    source.add_argument("--random", metavar="SIZE", help=f"random weights of a released size "
                        f"({', '.join(RELEASED_SIZES)}) or a toy one ({', '.join(TOY_SIZES)})")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, default=16, help="tokens to generate (>= 1)")
    parser.add_argument("--backend", choices=("reference", "iss", "rtl"), default="iss")
    parser.add_argument("--config", default="default", help="preset name or config JSON file")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="random weights and sampling")
    parser.add_argument("--batch", type=int, default=1,
                        help="sequences generated together from copies of the prompt (batched decode)")
    parser.add_argument("--shapes-only", action="store_true", help="compile from shapes alone and report")
    parser.add_argument("--pause", type=float, default=0.0, help="rtl: AXI pause probability")
    parser.add_argument("--no-replay", action="store_true",
                        help="iss: run every step on the ISS (by default a 16-bit preset's programs run on "
                             "the ISS once, then as their bit-exact replay, marca.golden.replay)")
    parser.add_argument("--out", default="build/generate/report.json")
    parser.set_defaults(handler=generate)
