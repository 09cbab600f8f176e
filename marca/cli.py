"""The ``marca`` command (also ``python -m marca``).

    marca verilog  --config default --out build/verilog/default   emit Verilog + config.json
    marca lint     --dir build/verilog/default                    verilator --lint-only -Wall
    marca bench    [AREA ...] --out build/bench                   run benchmarks, write JSON
    marca presets                                                 list the configuration presets
    marca generate --random 130m --prompt Hello --tokens 2        a Mamba model generating text
"""

import argparse
import importlib
import inspect
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

from .config import PRESETS, MarcaConfig, preset

__all__ = ["main", "load_config", "top_component"]

TOP_NAME = "marca_accelerator"


def load_config(value: str) -> MarcaConfig:
    """A preset name or the path of a config JSON file."""
    path = Path(value)
    if value.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"configuration file {value!r} does not exist")
        return MarcaConfig.load(path)
    return preset(value)


def top_component(config: MarcaConfig):
    """The accelerator top for ``config``."""
    from marca.hw.accelerator import Accelerator
    return Accelerator(config)


def _verilog(args) -> int:
    from .verilog import convert_rtlil, rtlil_to_verilog
    config = load_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"[marca] elaborating {TOP_NAME} for configuration {config.name!r} "
          f"({config.array_rows}x{config.array_cols} PEs, compute {config.compute_format.name}, "
          f"storage {config.storage_format.name}) ...", flush=True)
    rtlil, report = convert_rtlil(top_component(config), TOP_NAME, deduplicate=not args.no_deduplicate)
    text = rtlil_to_verilog(rtlil)
    verilog_path = out / f"{TOP_NAME}.v"
    verilog_path.write_text(text)
    config_path = config.write(out / "config.json")
    modules = (f"{report.modules_after} distinct modules for {report.modules_before} instances"
               if report else "one module per instance")
    print(f"[marca] wrote {verilog_path} ({text.count(chr(10))} lines, {modules}) and {config_path} "
          f"in {time.monotonic() - started:.1f} s")
    return 0


# Waivers for `verilator -Wall` on Amaranth's output, each explained in docs/verification.md: all are
# idioms of the Verilog that Amaranth (through Yosys' write_verilog) emits, whose meaning Verilog defines.
LINT_WAIVERS = (
    "-Wno-DECLFILENAME",    # every submodule is written into one file named after the top
    "-Wno-UNUSEDSIGNAL",    # whole ports and payloads are kept even where only some bits are read
    "-Wno-WIDTHEXPAND",     # operands of different widths: Verilog zero/sign-extends them, as intended
    "-Wno-WIDTHTRUNC",      # `!x` on a vector (logical not) and shifts assigned to narrower wires
    "-Wno-PROCASSINIT",     # a register's initial value plus its procedural default assignment
    "-Wno-CASEINCOMPLETE",  # `casez` after a default assignment: uncovered values keep the default
    "-Wno-CMPCONST",        # comparisons that a parameter made constant (e.g. a full-range counter)
)


def _lint(args) -> int:
    from .sim import verilator_env
    verilator_env()
    files = sorted(Path(args.dir).glob("*.v"))
    if not files:
        raise ValueError(f"no Verilog files in {args.dir!r}; run `make verilog` first")
    failures = 0
    for path in files:
        top = path.stem
        command = ["verilator", "--lint-only", "-Wall", *LINT_WAIVERS, "--top-module", top, str(path)]
        result = subprocess.run(command, capture_output=True, text=True)
        status = "clean" if result.returncode == 0 else "FAILED"
        print(f"[marca] lint {path.name}: {status}")
        if result.returncode:
            failures += 1
            print(result.stderr[-4000:])
    return 1 if failures else 0


def _bench_areas() -> list[str]:
    import marca.bench
    return sorted(info.name for info in pkgutil.iter_modules(marca.bench.__path__))


def _default_bench_areas() -> list[str]:
    """The benchmarks ``marca bench`` runs when none is named: all but those that declare
    ``EXPLICIT_ONLY = True`` (regenerators of recorded data and very long builds, run by name)."""
    return [area for area in _bench_areas()
            if not getattr(importlib.import_module(f"marca.bench.{area}"), "EXPLICIT_ONLY", False)]


def _bench(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    areas = args.areas or _default_bench_areas()
    unknown = sorted(set(areas) - set(_bench_areas()))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(_bench_areas())}")
    for area in areas:
        print(f"\n[marca] benchmark {area}", flush=True)
        started = time.monotonic()
        run = importlib.import_module(f"marca.bench.{area}").run
        # --device goes to the benchmarks that take one (accuracy); the others run where they always do.
        takes_device = "device" in inspect.signature(run).parameters
        if takes_device and args.device:
            run(out, device=args.device)
        else:
            run(out)
        print(f"[marca] benchmark {area} done in {time.monotonic() - started:.0f} s -> {out}")
    return 0


def _presets(args) -> int:
    for name, config in PRESETS.items():
        print(f"{name}: {config.array_rows}x{config.array_cols} PEs, compute {config.compute_format.name}, "
              f"storage {config.storage_format.name}, AXI {config.axi_data_width} bits")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="marca", description="MARCA-style Mamba accelerator generator")
    commands = parser.add_subparsers(dest="command", required=True)
    verilog = commands.add_parser("verilog", help="emit the accelerator's Verilog and its config.json")
    verilog.add_argument("--config", default="default", help="preset name or config JSON file")
    verilog.add_argument("--out", default="build/verilog/default", help="output folder")
    verilog.add_argument("--no-deduplicate", action="store_true",
                         help="one module per instance, as Amaranth names them (for comparisons)")
    verilog.set_defaults(handler=_verilog)
    lint = commands.add_parser("lint", help="verilator --lint-only -Wall on emitted Verilog")
    lint.add_argument("--dir", default="build/verilog/default")
    lint.set_defaults(handler=_lint)
    bench = commands.add_parser("bench", help="run benchmarks (the default set when none is named)")
    bench.add_argument("areas", nargs="*", help="benchmark names (modules of marca.bench); none: all but the explicit-only ones (perf_validate, verilog)")
    bench.add_argument("--out", default="build/bench")
    bench.add_argument("--device", default=None, help="torch device for benchmarks that take one (cpu, cuda)")
    bench.set_defaults(handler=_bench)
    presets = commands.add_parser("presets", help="list configuration presets")
    presets.set_defaults(handler=_presets)
    from .generate import add_parser as add_generate
    add_generate(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"marca: error: {error}", file=sys.stderr)
        return 2
