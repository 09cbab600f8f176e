"""The effect of the buffer-management switches, measured on the golden ISS (for docs and benchmarks).

:func:`switch_report` compiles one mixer four ways (both strategies on, each off, both off), runs each on
the golden instruction-set simulator and returns the counters; :func:`markdown_table` renders them. A
benchmark module (``bench/compiler.py``) only needs to call these and write the JSON.
"""

import time

import torch

from marca.config import MarcaConfig
from marca.reference import mamba as reference

from .mamba import CompileOptions, compile_mixer

__all__ = ["SWITCH_VARIANTS", "switch_report", "markdown_table"]

SWITCH_VARIANTS = {
    "both on": CompileOptions(),
    "intra off": CompileOptions(intra_operation=False),
    "inter off": CompileOptions(inter_operation=False),
    "both off": CompileOptions(intra_operation=False, inter_operation=False),
}


def switch_report(config: MarcaConfig, *, d_model: int = 64, d_state: int = 16, length: int = 32,
                  seed: int = 1) -> list[dict]:
    """One row per variant: counters, token block, weight residency, relative output error against the
    float reference and the simulator's wall time."""
    dims = reference.MambaDims(d_model=d_model, d_state=d_state)
    weights = reference.random_mixer_weights(dims, seed=seed, dtype=torch.float64)
    hidden = torch.randn(length, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected, _, _ = reference.mixer_prefill(weights, hidden)
    rows = []
    for name, options in SWITCH_VARIANTS.items():
        start = time.perf_counter()
        compiled = compile_mixer(weights, config, length=length, options=options)
        run = compiled.run(hidden)
        rows.append({
            "variant": name, "config": config.name, "d_model": d_model, "d_state": d_state, "length": length,
            **run.result.counters, "block_tokens": compiled.block_tokens,
            "weights_resident": compiled.weights_resident,
            "relative_error": float((run.out - expected).norm() / expected.norm()),
            "seconds": time.perf_counter() - start,
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = [("variant", "variant"), ("instructions", "instructions"), ("barrier_instructions", "barriers"),
               ("dma_bytes_read", "DMA read (B)"), ("dma_bytes_written", "DMA written (B)"),
               ("linear_beats", "linear beats"), ("elementwise_beats", "element-wise beats"),
               ("nonlinear_beats", "nonlinear beats"), ("block_tokens", "block tokens"),
               ("weights_resident", "weights resident"), ("relative_error", "rel. error vs float")]
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[key]:.1e}" if key == "relative_error" else str(row[key]) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
