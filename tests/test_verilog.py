"""`marca verilog` and `marca lint` as a user runs them: Verilog plus config.json, lint-clean; and the
deduplicated emission of marca.verilog: one definition per distinct module, the same netlist."""

import re
import subprocess
import sys

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from marca import verilog
from marca.cli import load_config, top_component
from marca.config import MarcaConfig, preset
from marca.formats import BF16, FP16
from marca.hw.fp import FloatAdder


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


def test_each_distinct_module_is_defined_once(tiny_verilog):
    text = (tiny_verilog / "marca_accelerator.v").read_text()
    modules = re.findall(r"^module (\\?[\w.$]+)", text, flags=re.MULTILINE)
    assert len(modules) == len(set(modules))
    # No module is named by its place in the hierarchy ("\marca_accelerator.array.adder_0_0") any more.
    assert [name for name in modules if "." in name] == []
    def instances(module, name):
        return len(re.findall(rf"^  {module} {name}", text, flags=re.MULTILINE))

    # The tiny preset's 2x2 array: two rows, one definition, which instantiates the two PEs of a row, one
    # definition, which holds the one adder definition.
    assert modules.count("marca_array_row_fp16") == 1
    assert instances("marca_array_row_fp16", "row_") == 2
    assert modules.count("marca_processing_element_fp16") == 1
    assert instances("marca_processing_element_fp16", "pe_") == 2
    assert modules.count("marca_float_adder_fp16") == 1
    assert instances("marca_float_adder_fp16", "") == 1
    # The compute engine's repeated parts: one scoreboard entry per beat in flight, one granule move per
    # operand, each one definition.
    assert modules.count("marca_scoreboard_entry") == 1
    assert instances("marca_scoreboard_entry", "scoreboard_") > 1
    assert modules.count("marca_granule_align") == 1
    assert instances("marca_granule_align", "") == 3


class _Adders(wiring.Component):
    """Three adders, two of one format: two distinct modules."""

    a: In(16)
    b: In(16)
    fp16_sum: Out(16)
    bf16_sum: Out(16)

    def elaborate(self, platform):
        m = Module()
        m.submodules.first = first = FloatAdder(fmt=FP16)
        m.submodules.second = second = FloatAdder(fmt=FP16)
        m.submodules.third = third = FloatAdder(fmt=BF16)
        # Connected in different orders: Amaranth then numbers the copies' ports differently.
        m.d.comb += [first.a.eq(self.a), first.b.eq(self.b), second.b.eq(first.result), second.a.eq(self.a),
                     third.a.eq(self.a), third.b.eq(self.b), self.fp16_sum.eq(second.result),
                     self.bf16_sum.eq(third.result)]
        return m


def test_identical_modules_are_merged_and_different_ones_kept():
    original, report = verilog.convert_rtlil(_Adders(), "adders", deduplicate=False)
    assert report is None and original.count("\nmodule ") == 4
    merged, report = verilog.convert_rtlil(_Adders(), "adders")
    assert (report.modules_before, report.modules_after) == (4, 3)
    assert report.instances == {"marca_float_adder_fp16": ("adders.first", "adders.second"),
                                "marca_float_adder_bf16": ("adders.third",)}
    assert verilog.flattened_differences(original, merged, "adders") == []


@pytest.fixture(scope="module")
def tiny_rtlil():
    """The tiny preset's RTLIL, one module per instance (Amaranth's own naming)."""
    text, _ = verilog.convert_rtlil(top_component(preset("tiny")), "marca_accelerator", deduplicate=False)
    return text


def test_deduplication_keeps_the_netlist(tiny_rtlil):
    merged, report = verilog.deduplicate_rtlil(tiny_rtlil)
    assert report.modules_after < report.modules_before
    assert verilog.flattened_differences(tiny_rtlil, merged, "marca_accelerator") == []


def test_a_wrong_merge_is_caught(tiny_rtlil, monkeypatch):
    # Deliberately broken: modules with the same port names count as the same (an adder and a multiplier).
    def ports_only(module, class_of):
        return repr(sorted(line.split()[-1] for item in module.items for line in item
                           if line.startswith("  wire ") and (" input " in line or " output " in line)))
    monkeypatch.setattr(verilog, "_structure", ports_only)
    merged, report = verilog.deduplicate_rtlil(tiny_rtlil)
    differences = verilog.flattened_differences(tiny_rtlil, merged, "marca_accelerator")
    assert any("array.row_0.pe_0.adder." in item for item in differences)


@pytest.mark.verilator
def test_emitted_verilog_is_lint_clean(tiny_verilog):
    result = marca("lint", "--dir", str(tiny_verilog))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clean" in result.stdout


def test_config_file_is_accepted(tiny_verilog):
    # The written config.json, given back to --config, resolves to the preset it came from; the Verilog is
    # a function of the configuration alone (a second elaboration would cost ~1 minute of the suite).
    assert load_config(str(tiny_verilog / "config.json")) == load_config("tiny") == preset("tiny")


def test_bad_configuration_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"array_cols": 3}')
    result = marca("verilog", "--config", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "array_cols must be a power of two" in result.stderr
    assert "Traceback" not in result.stderr
