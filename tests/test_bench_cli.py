"""The benchmarks' own command lines (``python -m marca.bench.<area>``): --help describes the command, an
unknown option is refused before any work starts."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("area", ["scale", "iss", "perf_validate"])
def test_bench_help_and_unknown_options(tmp_path, area):
    helped = subprocess.run([sys.executable, "-m", f"marca.bench.{area}", "--help"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert helped.returncode == 0 and f"marca bench {area}" in helped.stdout
    refused = subprocess.run([sys.executable, "-m", f"marca.bench.{area}", str(tmp_path / "out"), "--bogus"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and "--bogus" in refused.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "build").exists()   # nothing ran


def test_processor_refuses_an_unknown_model_size(tmp_path):
    refused = subprocess.run([sys.executable, "-m", "marca.bench.processor", str(tmp_path / "out"), "--models",
                              "--sizes", "130m,9b"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and "9b" in refused.stderr
    assert not (tmp_path / "out").exists()


def test_scale_comparison_leaves_out_skipped_scenarios():
    """A `marca bench scale` run with `--skip` lacks some scenarios: the comparison table lists what was
    modelled (with the measured CPU row and its ratio) instead of failing on the missing ones."""
    from marca.bench.scale import comparison_table
    results = {"paper|370m|hbm|True": {"decode-b1": {"tokens_per_second": 77.6}}}
    processor = {"models": [{"target": "cpu-1thread", "size": "370m", "dtype": "float32",
                             "prefill_tokens_per_s": 50.0, "decode_tokens_per_s": 7.76}]}
    table = comparison_table(results, processor)
    assert "| 370m | decode batch 1 | 77.6 | 7.76 | 10x |" in table
    assert "prefill 512" not in table.split("\n", 2)[2]
