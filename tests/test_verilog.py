"""`marca verilog` and `marca lint` as a user runs them: Verilog plus config.json, lint-clean."""

import subprocess
import sys

import pytest

from marca.config import MarcaConfig, preset


def marca(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "marca", *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def tiny_verilog(tmp_path_factory):
    out = tmp_path_factory.mktemp("verilog")
    result = marca("verilog", "--config", "tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_verilog_and_config_are_written(tiny_verilog):
    text = (tiny_verilog / "marca_accelerator.v").read_text()
    assert "module marca_accelerator" in text
    assert MarcaConfig.load(tiny_verilog / "config.json") == preset("tiny")


@pytest.mark.verilator
def test_emitted_verilog_is_lint_clean(tiny_verilog):
    result = marca("lint", "--dir", str(tiny_verilog))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clean" in result.stdout


def test_config_file_is_accepted(tiny_verilog, tmp_path):
    result = marca("verilog", "--config", str(tiny_verilog / "config.json"), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "marca_accelerator.v").read_text() == (tiny_verilog / "marca_accelerator.v").read_text()


def test_bad_configuration_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"array_cols": 3}')
    result = marca("verilog", "--config", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "array_cols must be a power of two" in result.stderr
    assert "Traceback" not in result.stderr
