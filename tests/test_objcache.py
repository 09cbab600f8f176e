"""marca/objcache.py, the OBJCACHE wrapper of Verilator builds: a run-time library compile (source in
``$VERILATOR_ROOT/include``) runs once per command line and is copied afterwards; every other compile runs
every time. A stand-in compiler counts its runs (no Verilator needed)."""

import stat
import subprocess
import sys

from marca import objcache


def _setup(tmp_path, monkeypatch):
    root = tmp_path / "verilator"
    (root / "include").mkdir(parents=True)
    (root / "include" / "verilated.cpp").write_text("// run-time library\n")
    (tmp_path / "design.cpp").write_text("// the design\n")
    compiler = tmp_path / "cc"
    compiler.write_text(f"#!{sys.executable}\n"
                        "import sys\n"
                        f"open({str(tmp_path / 'runs')!r}, 'a').write(sys.argv[-1] + '\\n')\n"
                        "out = sys.argv[sys.argv.index('-o') + 1]\n"
                        "open(out, 'w').write('object of ' + sys.argv[-1] + ' ' + ' '.join(sys.argv[1:sys.argv.index('-c')]))\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("VERILATOR_ROOT", str(root))
    monkeypatch.setenv("MARCA_OBJCACHE_DIR", str(tmp_path / "cache"))
    return root, compiler


def _runs(tmp_path):
    path = tmp_path / "runs"
    return path.read_text().split() if path.exists() else []


def test_runtime_library_compiles_once_per_command(tmp_path, monkeypatch):
    root, compiler = _setup(tmp_path, monkeypatch)
    library = str(root / "include" / "verilated.cpp")
    for build in ("a", "b"):
        folder = tmp_path / build
        folder.mkdir()
        monkeypatch.chdir(folder)
        assert objcache.main([str(compiler), "-Os", "-c", "-o", "verilated.o", library]) == 0
        assert (folder / "verilated.o").read_text() == f"object of {library} -Os"
    assert _runs(tmp_path) == [library]
    # Other options are another command: compiled again.
    assert objcache.main([str(compiler), "-O0", "-c", "-o", "verilated.o", library]) == 0
    assert _runs(tmp_path) == [library, library]
    assert (tmp_path / "b" / "verilated.o").read_text() == f"object of {library} -O0"


def test_design_sources_always_compile(tmp_path, monkeypatch):
    _, compiler = _setup(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    design = str(tmp_path / "design.cpp")
    for _ in range(2):
        assert objcache.main([str(compiler), "-c", "-o", "design.o", design]) == 0
    assert _runs(tmp_path) == [design, design]
    assert not (tmp_path / "cache").exists()


def test_a_failed_compile_is_not_cached(tmp_path, monkeypatch):
    root, _ = _setup(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    library = str(root / "include" / "verilated.cpp")
    assert objcache.main(["false", "-c", "-o", "verilated.o", library]) != 0
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_is_an_executable_script():
    """marca.sim hands the file itself to make as OBJCACHE."""
    result = subprocess.run([objcache.__file__, "true"], capture_output=True)
    assert result.returncode == 0
