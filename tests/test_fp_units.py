# amaranth: UnusedElaboratable=no
"""cocotb + Verilator tier of the float units (hw/fp.py; testbench tb/fp_units.py).

One wide harness per format (every unit, LANES lanes side by side, all driven every cycle) runs, bit for
bit against marca.golden.fp:

* FP16 and BF16: all 65,536 patterns through every one-input operation (conversions to the other two
  formats, float-to-int in all three rounding modes) and all 65,536 int16 values through int-to-float;
  the golden special values in every pair, carry-out pairs at the flush and overflow boundaries and
  1,000,000 random operand sets through every two-input operation (mul, add/sub, compare/min/max,
  ldexp); the first cycles with random clock-enable stalls.
* FP32: the same corners and 1,000,000 random operand sets through every operation.

A deliberately broken build (truncating instead of rounding) runs through the same check, which must
report mismatches exactly in the rounding operations. Every unit's emitted Verilog passes
``verilator --lint-only -Wall`` with the waivers explained in docs/fp_units.md.
"""

import json
import subprocess

import pytest

from marca import sim
from marca.formats import BF16, FP16, FP32, NAMED_FORMATS, FloatFormat
from marca.hw import fp as hw
from marca.tb.fp_units import FloatUnitsHarness

pytestmark = pytest.mark.verilator

TOPLEVEL = "fp_units_harness"
TESTBENCH = "marca.tb.fp_units"
LANES = 4           # measured: 4 lanes build ~2x faster than 8 and simulate at least as many vectors/s
SHIFT_BITS = 9
RANDOM_COUNT = 1_000_000
CASES = {
    "fp16": {"fmt": FP16, "int_bits": 16, "exhaustive": True},
    "bf16": {"fmt": BF16, "int_bits": 16, "exhaustive": True},
    "fp32": {"fmt": FP32, "int_bits": 32, "exhaustive": False},
}
# Warnings that Amaranth's Verilog backend (Yosys write_verilog) produces for any design; see
# docs/fp_units.md, "Lint".
LINT_WAIVERS = ("-Wno-DECLFILENAME", "-Wno-UNUSEDSIGNAL", "-Wno-PROCASSINIT", "-Wno-WIDTHEXPAND",
                "-Wno-WIDTHTRUNC")


def build_harness(fmt: FloatFormat, *, int_bits: int, lanes: int = LANES, rounding: str = "nearest_even"):
    harness = FloatUnitsHarness(fmt=fmt, lanes=lanes, int_bits=int_bits, shift_bits=SHIFT_BITS,
                                rounding=rounding)
    label = f"fp-units-{fmt.name}-x{lanes}" + ("" if rounding == "nearest_even" else f"-{rounding}")
    return sim.build(sim.emit_verilog(harness, TOPLEVEL), TOPLEVEL, label=label)


def run_harness(build_dir, fmt: FloatFormat, *, int_bits: int, lanes: int, random_count: int,
                exhaustive: bool, report, name: str, stall_cycles: int = 2000, **extra):
    params = {"fmt": fmt.to_json(), "lanes": lanes, "int_bits": int_bits, "shift_bits": SHIFT_BITS,
              "random_count": random_count, "exhaustive": exhaustive, "stall_cycles": stall_cycles,
              "report": str(report), "seed": 2024, **extra}
    sim.run(build_dir, TOPLEVEL, TESTBENCH, params=params, name=name)
    return json.loads(report.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_float_units_match_golden(case, tmp_path):
    fmt, int_bits, exhaustive = CASES[case]["fmt"], CASES[case]["int_bits"], CASES[case]["exhaustive"]
    build_dir = build_harness(fmt, int_bits=int_bits)
    report = run_harness(build_dir, fmt, int_bits=int_bits, lanes=LANES, random_count=RANDOM_COUNT,
                         exhaustive=exhaustive, report=tmp_path / "report.json", name=f"golden-{case}")
    minimum = RANDOM_COUNT + ((1 << fmt.width) if exhaustive else 0)
    assert report["vectors"] >= minimum
    assert all(field["mismatches"] == 0 and field["vectors"] == report["vectors"]
               for field in report["fields"].values())
    print(f"{case}: {report['vectors']} vectors through {len(report['fields'])} outputs in "
          f"{report['cycles']} cycles; seconds {report['seconds']}")


def test_broken_rounding_is_caught(tmp_path):
    """Truncating units through the same check: it must fail, naming exactly the rounding operations."""
    build_dir = build_harness(FP16, int_bits=16, lanes=2, rounding="truncate")
    report_path = tmp_path / "report.json"
    with pytest.raises(AssertionError, match="cocotb tests of marca.tb.fp_units failed"):
        run_harness(build_dir, FP16, int_bits=16, lanes=2, random_count=20_000, exhaustive=False,
                    report=report_path, name="broken", stall_cycles=200)
    report = json.loads(report_path.read_text())
    failing = {name for name, field in report["fields"].items() if field["mismatches"]}
    # FP16 -> FP32 widens exactly, and compare, ldexp and to_int do not use the float rounding.
    assert failing == {"mul", "add", "convert_bf16", "from_int"}
    assert all(field["first"] and " got 0x" in field["first"][0]
               for name, field in report["fields"].items() if name in failing)


def _units(fmt: FloatFormat):
    others = [target for target in NAMED_FORMATS.values() if target != fmt]
    return {
        "mul": hw.FloatMultiplier(fmt=fmt), "add": hw.FloatAdder(fmt=fmt),
        "compare": hw.FloatCompare(fmt=fmt),
        **{f"convert_{t.name}": hw.FloatConvert(source=fmt, target=t) for t in others},
        **{f"to_int_{mode}": hw.FloatToInt(fmt=fmt, int_bits=16, rounding=mode) for mode in hw.INT_ROUNDING},
        "from_int": hw.IntToFloat(fmt=fmt, int_bits=32),
        "scale": hw.FloatScale(fmt=fmt, shift_bits=SHIFT_BITS),
    }


@pytest.mark.parametrize("fmt", [FP32, BF16, FP16], ids=lambda fmt: fmt.name)
def test_lint(fmt, tmp_path):
    sim.verilator_env()
    failures = []
    for name, unit in _units(fmt).items():
        top = f"fp_{name}"
        path = tmp_path / f"{top}.v"
        path.write_text(sim.emit_verilog(unit, top))
        result = subprocess.run(["verilator", "--lint-only", "-Wall", *LINT_WAIVERS, "--top-module", top,
                                 str(path)], capture_output=True, text=True, check=False)
        if result.returncode:
            failures.append(f"{top}:\n{result.stderr[-2000:]}")
    assert not failures, "\n".join(failures)
