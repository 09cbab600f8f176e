"""Benchmark: deduplicated Verilog against one module per instance, and Verilator options.

    python -m marca.bench.verilog [out_dir] [preset ...] [--no-build]   (``marca bench verilog``: all presets)
    python -m marca.bench.verilog [out_dir] --flags [preset ...]        (the Verilator options alone)

For each preset (``tiny``, ``fpga-medium``, ``default``) the accelerator is elaborated once and its RTLIL
written to Verilog twice: as Amaranth names it (``per-instance``: one module per instance) and through
:func:`marca.verilog.deduplicate_rtlil` (``deduplicated``). For each: Verilog size (bytes, lines,
modules), the Yosys RTLIL -> Verilog seconds, a fresh Verilator build in a folder of its own (seconds,
C++ bytes that Verilator wrote) and the simulation speed on a small Mamba prefill (``CASE``): simulated
cycles per wall-clock second, with the memory image checked bit for bit against the golden ISS
(``marca.tb.mamba.evaluate``) and between the two builds. The deduplicated Verilog's largest modules
(lines per definition) are listed in the JSON too.

``FLAG_VARIANTS`` then builds the deduplicated ``FLAG_PRESET`` with Verilator options other than the
project's (``marca.sim.VERILATOR_ARGS`` and ``OPT_FAST=-O2``) and measures them the same way; each must stay
bit-exact. ``python -m marca.bench.verilog out_dir --flags preset ...`` runs only that study, on the given
presets, and writes ``out_dir/verilog-flags.json``.

Every build here compiles Verilator's run-time library itself (the shared object cache of
:mod:`marca.objcache` is off), so that the builds are timed alike.

Builds are timed on whatever else the machine is running: ratios within one run are the honest figures.
Writes ``out_dir/verilog.json`` and prints a table (docs/verification.md).
"""

import hashlib
import json
import os
import pathlib
import re
import resource
import shutil
import sys
import time

# Builds `default` twice in Verilator (tens of minutes): run by name.
EXPLICIT_ONLY = True

__all__ = ["PRESETS", "CASE", "FLAG_PRESET", "FLAG_VARIANTS", "run", "flags_study", "table", "flags_table"]

PRESETS = ("tiny", "fpga-medium", "default")
#: The Mamba prefill whose simulation speed is measured (small: the default preset simulates slowly).
CASE = {"d_model": 16, "d_state": 4, "length": 2, "seed": 7}
FLAG_PRESET = "fpga-medium"
#: Verilator options tried instead of marca.sim's, on the deduplicated FLAG_PRESET: (removed, added).
#: (Verilator already splits its output into files of ~20,000 statements by default; ``--output-groups``
#: then joins them into that many compiler runs.)
FLAG_VARIANTS = {
    "a C++ file per class (no --output-groups)": (("--output-groups", "2"), ()),
    "module inlining (Verilator's default)": (("-fno-inline",), ()),
    "x-assign/x-initial fast": ((), ("--x-assign", "fast", "--x-initial", "fast")),
    "threads 2": ((), ("--threads", "2")),
}
TOP = "accelerator"


def _verilog_figures(text: str) -> dict:
    return {"bytes": len(text.encode()), "lines": text.count("\n"),
            "modules": len(re.findall(r"^module ", text, flags=re.MULTILINE))}


def _largest_modules(text: str, count: int = 8) -> dict:
    """The ``count`` module definitions with the most lines: where the Verilog's size is."""
    lines, name, start = {}, None, 0
    for number, line in enumerate(text.splitlines()):
        if line.startswith("module "):
            name, start = re.split(r"[(\s]", line[len("module "):], maxsplit=1)[0], number
        elif line.startswith("endmodule") and name is not None:
            lines[name] = number - start + 1
    return dict(sorted(lines.items(), key=lambda item: -item[1])[:count])


def _cpp_bytes(build_dir: pathlib.Path) -> int:
    """Bytes of C++ that Verilator generated (the model's ``V<top>*`` sources and headers)."""
    return sum(path.stat().st_size for path in build_dir.glob("V*") if path.suffix in (".cpp", ".h"))


def _lint_clean(verilog_text: str, root: pathlib.Path) -> bool:
    """``verilator --lint-only -Wall`` with the project's waivers (``marca lint``) passes."""
    import subprocess
    from marca import sim
    from marca.cli import LINT_WAIVERS
    sim.verilator_env()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{TOP}-lint.v"
    path.write_text(verilog_text)
    result = subprocess.run(["verilator", "--lint-only", "-Wall", *LINT_WAIVERS, "--top-module", TOP, str(path)],
                            capture_output=True, text=True)
    path.unlink()
    return result.returncode == 0


def _verilate(verilog_text: str, label: str, root: pathlib.Path) -> dict:
    """Verilator's translation to C++ alone, with the options of a cocotb build, for the presets whose
    C++ compile would take too long here: seconds and C++ bytes."""
    import subprocess
    from marca import sim
    sim.verilator_env()
    folder = root / f"{label}-verilate"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / f"{TOP}.v").write_text(verilog_text)
    started = time.monotonic()
    subprocess.run(["verilator", "-cc", "-Mdir", str(folder), "--top-module", TOP, "--vpi", "--public-flat-rw",
                    "--prefix", "Vtop", *sim.VERILATOR_ARGS, str(folder / f"{TOP}.v")],
                   check=True, capture_output=True)
    figures = {"verilate_seconds": round(time.monotonic() - started, 1), "cpp_bytes": _cpp_bytes(folder)}
    shutil.rmtree(folder)
    return figures


def _variant_args(variant: str) -> tuple[str, ...]:
    """The Verilator options of a FLAG_VARIANTS entry: the project's, less the removed, plus the added."""
    from marca import sim
    removed, added = FLAG_VARIANTS[variant]
    return tuple(a for a in sim.VERILATOR_ARGS if a not in removed) + tuple(added)


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's finished child processes: Verilator, make, the compilers
    (the build's cost whatever else the machine runs; its wall seconds depend on the load)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measure(config, verilog_text: str, label: str, root: pathlib.Path, prepared, args=None) -> dict:
    from marca import sim
    from marca.tb import mamba
    os.environ["MARCA_OBJCACHE_DIR"] = ""       # every build compiles its own run-time library
    started, cpu = time.monotonic(), _children_cpu_seconds()
    build_dir = sim.build(verilog_text, TOP, label=label, root=root, base_args=args or sim.VERILATOR_ARGS)
    figures = {"args": list(args or sim.VERILATOR_ARGS), "build_seconds": round(time.monotonic() - started, 1),
               "build_cpu_seconds": round(_children_cpu_seconds() - cpu, 1), "cpp_bytes": _cpp_bytes(build_dir)}
    rtl = mamba.run_on_rtl(config, [prepared], name="bench-verilog", build_dir=build_dir)
    mamba.evaluate(prepared, rtl)      # raises on any bit that differs from the golden ISS
    step = rtl[prepared.case.name]["prefill"][0]
    figures |= {"sim_cycles": step.counters["cycles"], "sim_seconds": round(step.seconds, 2),
                "cycles_per_second": round(step.counters["cycles"] / step.seconds, 1),
                "image_sha": hashlib.sha256(step.image).hexdigest()[:16]}
    shutil.rmtree(build_dir)           # big (tens of MB for the default preset), and never reused
    return figures


def _preset(name: str, root: pathlib.Path, build: bool = True) -> dict:
    from marca.config import preset
    from marca.hw.accelerator import Accelerator
    from marca.tb import mamba
    from marca.verilog import convert_rtlil, deduplicate_rtlil, rtlil_to_verilog
    config = preset(name)
    prepared = mamba.prepare(mamba.MixerCase(name="bench", config=config, decode=False, **CASE))
    started = time.monotonic()
    rtlil, _ = convert_rtlil(Accelerator(config), TOP, deduplicate=False)
    result = {"elaborate_seconds": round(time.monotonic() - started, 1)}
    deduplicated, report = deduplicate_rtlil(rtlil)
    result["distinct_modules"] = {module: len(paths) for module, paths in report.instances.items()}
    for variant, text in (("per-instance", rtlil), ("deduplicated", deduplicated)):
        print(f"[bench verilog] {name} {variant}: emitting, building, simulating ...", flush=True)
        started = time.monotonic()
        verilog_text = rtlil_to_verilog(text)
        result[variant] = {"yosys_seconds": round(time.monotonic() - started, 1), **_verilog_figures(verilog_text),
                           "lint_clean": _lint_clean(verilog_text, root)}
        if variant == "deduplicated":
            result[variant]["largest_modules"] = _largest_modules(verilog_text)
        if not build:
            result[variant] |= _verilate(verilog_text, f"{name}-{variant}", root)
            continue
        result[variant] |= _measure(config, verilog_text, f"{name}-{variant}", root, prepared)
    if not build:
        return result
    if result["per-instance"]["image_sha"] != result["deduplicated"]["image_sha"]:
        raise AssertionError(f"{name}: the two builds left different memory images")
    if name == FLAG_PRESET:
        result["flags"] = _flags(config, rtlil_to_verilog(deduplicated), root, prepared)
    return result


def _flags(config, verilog_text: str, root: pathlib.Path, prepared) -> dict:
    flags = {}
    for variant in FLAG_VARIANTS:
        print(f"[bench verilog] {config.name} deduplicated, {variant}: building, simulating ...", flush=True)
        args = _variant_args(variant)
        flags[variant] = {"args": list(args), **_measure(config, verilog_text, f"{config.name}-flags", root,
                                                         prepared, args=args)}
    return flags


def flags_study(out_dir: pathlib.Path, presets=(FLAG_PRESET,)) -> dict:
    """The options study alone: each preset's deduplicated Verilog built with the project's options and
    with each of FLAG_VARIANTS; writes ``out_dir/verilog-flags.json`` and prints the tables."""
    from marca import sim
    from marca.config import preset
    from marca.hw.accelerator import Accelerator
    from marca.tb import mamba
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = (out_dir / "verilog-builds").resolve()
    results = {"case": CASE, "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(), "presets": {}}
    for name in presets:
        config = preset(name)
        prepared = mamba.prepare(mamba.MixerCase(name="bench", config=config, decode=False, **CASE))
        verilog_text = sim.emit_verilog(Accelerator(config), TOP)
        print(f"[bench verilog] {name} deduplicated, project options: building, simulating ...", flush=True)
        entry = {"deduplicated": {**_verilog_figures(verilog_text),
                                  **_measure(config, verilog_text, f"{name}-flags", root, prepared)}}
        entry["flags"] = _flags(config, verilog_text, root, prepared)
        results["presets"][name] = entry
        (out_dir / "verilog-flags.json").write_text(json.dumps(results, indent=1) + "\n")
    results["load_average_at_end"] = os.getloadavg()
    (out_dir / "verilog-flags.json").write_text(json.dumps(results, indent=1) + "\n")
    print(flags_table(results))
    return results


def table(results: dict) -> str:
    """The Markdown tables of docs/verification.md (any number of ``verilog.json`` results merged)."""
    def cell(figures, key, form):
        return form(figures[key]) if key in figures else "-"

    lines = ["| preset | Verilog | lines | modules | C++ (MB) | verilator -cc (s) | build (s) | "
             "simulation (cycles/s) |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["presets"].items():
        before, after = entry["per-instance"], entry["deduplicated"]
        for variant, figures in (("per instance", before), ("deduplicated", after)):
            lines.append(f"| {name}, {variant} | {figures['bytes'] / 1e6:.2f} MB | {figures['lines']:,} | "
                         f"{figures['modules']} | {figures['cpp_bytes'] / 1e6:.1f} | "
                         f"{cell(figures, 'verilate_seconds', lambda v: f'{v:.0f}')} | "
                         f"{cell(figures, 'build_seconds', lambda v: f'{v:.0f}')} | "
                         f"{cell(figures, 'cycles_per_second', lambda v: f'{v:,.0f}')} |")
        ratio = lambda key: (f"{before[key] / after[key]:.1f}x" if key in before and key in after else "-")
        speed = (f"{after['cycles_per_second'] / before['cycles_per_second']:.2f}x"
                 if "cycles_per_second" in after else "-")
        lines.append(f"| {name}, before / after | {ratio('bytes')} | {ratio('lines')} | "
                     f"{before['modules']} -> {after['modules']} | {ratio('cpp_bytes')} | "
                     f"{ratio('verilate_seconds')} | {ratio('build_seconds')} | {speed} (after / before) |")
    return "\n".join(lines) + "\n" + flags_table(results)


def flags_table(results: dict) -> str:
    """The Markdown table of each preset's options study (``flags`` entries), if any."""
    lines = []
    for name, entry in results["presets"].items():
        if "flags" not in entry:
            continue
        base = entry["deduplicated"]
        lines += ["", f"Verilator options on `{name}` (deduplicated Verilog; `OPT_FAST=-O2` throughout):", "",
                  "| options | C++ (MB) | build (s) | build (CPU s) | simulation (cycles/s) | bit-exact |",
                  "|---|---|---|---|---|---|"]
        cpu = lambda figures: f"{figures['build_cpu_seconds']:.0f}" if "build_cpu_seconds" in figures else "-"
        lines.append(f"| project's: `{' '.join(base['args'])}` | "
                     f"{base['cpp_bytes'] / 1e6:.1f} | {base['build_seconds']:.0f} | {cpu(base)} | "
                     f"{base['cycles_per_second']:,.0f} | yes |")
        for variant, figures in entry["flags"].items():
            lines.append(f"| {variant}: `{' '.join(figures['args'])}` | {figures['cpp_bytes'] / 1e6:.1f} | "
                         f"{figures['build_seconds']:.0f} | {cpu(figures)} | {figures['cycles_per_second']:,.0f} | "
                         f"{'yes' if figures['image_sha'] == base['image_sha'] else 'NO'} |")
    return "\n".join(lines) + ("\n" if lines else "")


def run(out_dir: pathlib.Path, presets=PRESETS, *, build: bool = True) -> dict:
    """Measure every preset in ``presets``; print the table, write ``out_dir/verilog.json``.

    ``build=False``: no Verilator builds or simulations, only the Verilog and Verilator's C++ (``verilator
    -cc`` without the compile; for a loaded machine, where the default preset's builds take an hour)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = (out_dir / "verilog-builds").resolve()
    results = {"case": CASE, "build": build, "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
               "presets": {}}
    started = time.time()
    for name in presets:
        results["presets"][name] = _preset(name, root, build)
        (out_dir / "verilog.json").write_text(json.dumps(results, indent=1) + "\n")   # partial results too
    results["load_average_at_end"] = os.getloadavg()
    results["wall_seconds"] = round(time.time() - started, 1)
    (out_dir / "verilog.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return results


if __name__ == "__main__":
    from marca.bench import command_line
    arguments = [argument for argument in command_line(__doc__, ("--no-build", "--flags"))
                 if argument not in ("--no-build", "--flags")]
    out = pathlib.Path(arguments[0] if arguments else "build/bench")
    if "--flags" in sys.argv[1:]:
        flags_study(out, tuple(arguments[1:]) or (FLAG_PRESET,))
    else:
        run(out, tuple(arguments[1:]) or PRESETS, build="--no-build" not in sys.argv[1:])
