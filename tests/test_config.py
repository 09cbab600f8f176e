"""The configuration object: presets, JSON round trip, and a ValueError naming every bad field."""

import dataclasses
import json

import pytest

from marca.config import DEFAULT, PRESETS, MarcaConfig, preset
from marca.formats import FloatFormat


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip_through_json(name, tmp_path):
    config = preset(name)
    assert MarcaConfig.from_json(config.to_json()) == config
    assert MarcaConfig.load(config.write(tmp_path / "config.json")) == config


def test_formats_by_name():
    config = MarcaConfig(compute_format="bf16", storage_format="fp16")
    assert config.compute_format == FloatFormat(8, 7)
    assert config.storage_format == FloatFormat(5, 10)
    custom = MarcaConfig(compute_format=FloatFormat(6, 9), storage_format=FloatFormat(6, 9))
    assert MarcaConfig.from_json(custom.to_json()) == custom


@pytest.mark.parametrize("changes, field, value", [
    (dict(array_cols=3), "array_cols", "3"),
    (dict(array_cols=0), "array_cols", "0"),
    (dict(array_rows=True), "array_rows", "True"),
    (dict(compute_format="fp8"), "compute_format", "'fp8'"),
    (dict(storage_format=12), "storage_format", "12"),
    (dict(exp_degree=0), "exp_degree", "0"),
    (dict(softplus_degree=9), "softplus_degree", "9"),
    (dict(weight_buffer_kib=3), "weight_buffer_kib", "3"),
    (dict(array_rows=32, array_cols=32, weight_buffer_kib=1), "weight_buffer_kib", "1"),
    (dict(array_rows=16, array_cols=16, state_buffer_kib=1), "state_buffer_kib", "1"),
    (dict(axi_data_width=48), "axi_data_width", "48"),
    (dict(fpga_clock_mhz=-5), "fpga_clock_mhz", "-5"),
    (dict(name=""), "name", "''"),
])
def test_invalid_values_name_the_field(changes, field, value):
    with pytest.raises(ValueError) as error:
        dataclasses.replace(DEFAULT, **changes)
    assert str(error.value).startswith(field)
    assert value in str(error.value)


@pytest.mark.parametrize("exp_bits, man_bits, field", [(0, 10, "exp_bits"), (9, 10, "exp_bits"),
                                                         (5, 0, "man_bits"), (5, 24, "man_bits")])
def test_invalid_formats(exp_bits, man_bits, field):
    with pytest.raises(ValueError, match=f"^{field} .*{exp_bits if field == 'exp_bits' else man_bits}"):
        FloatFormat(exp_bits, man_bits)


def test_json_errors():
    with pytest.raises(ValueError, match="unknown configuration field.*array_depth"):
        MarcaConfig.from_dict({"array_depth": 3})
    with pytest.raises(ValueError, match="compute_format"):
        MarcaConfig.from_dict({"compute_format": {"exp_bits": 5}})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    data = json.loads(DEFAULT.to_json())
    data["array_rows"] = 4
    assert MarcaConfig.from_dict(data).array_rows == 4
