"""exp, SiLU, softplus and rsqrt on the PE array in Verilator, bit for bit against the golden programs (issue #4).

One array per compute format, built once, with the FunctionLane extension of a preset configuration:
FP32 (DEFAULT: exp degree 3, softplus degree 4) on ``MARCA_NONLINEAR_RANDOM`` random patterns (60,000 by
default; 700,000 gives the 1,050,000-input run of docs/nonlinear.md, ~10 minutes of simulation) plus half
as many uniform values in [-40, 100], corner cases, segment edges, range bounds and every binade's ends;
BF16 (FPGA_SMALL) and FP16 (TINY) on every one of the 65,536 inputs. Each program's every pass is compared
(tb/nonlinear.py). A lane whose EXP_SCALE forgets its window check, and one whose forced NaNs lack their
mantissa bit (read as Inf by the PE's multiplier), must fail."""

import dataclasses
import os

import pytest
from marca.golden import nonlinear as nl
from marca.hw.nonlinear import FunctionLane
from marca.hw.pe_array import PEArray
from marca.tb.nonlinear import stimulus, write_case

from marca import sim
from marca.config import DEFAULT, FPGA_SMALL, TINY

pytestmark = pytest.mark.verilator

RANDOM = int(os.environ.get("MARCA_NONLINEAR_RANDOM", "60000"))

# name: (configuration, rows, cols, random inputs for formats wider than 16 bits)
MATRIX = {
    "fp32-default": (DEFAULT, 4, 4, RANDOM),
    "bf16-fpga-small": (FPGA_SMALL, 4, 4, 0),
    "fp16-tiny": (TINY, 4, 4, 0),
}


def _run(tmp_path, label, config, rows, cols, random_count, fault=None, functions=nl.FUNCTIONS, stride=1):
    """Build (once) the array with the FunctionLane extension, run the programs; return (inputs, log)."""
    array = PEArray(rows=rows, cols=cols, fmt=config.compute_format,
                    lane_extension=FunctionLane.factory(config, _fault=fault))
    toplevel = "nonlinear_array"
    build_dir = sim.build(sim.emit_verilog(array, toplevel), toplevel, label=f"nonlinear-{label}")
    constants = nl.constants_for(config)
    x = stimulus(constants, random_count=random_count)[::stride]
    runs = {}
    for name in functions:
        program = nl.programs(constants)[name]
        runs[name] = (program, [e.numpy() for e in nl.run_program(program, x, constants, every_pass=True)])
    case = write_case(tmp_path / "case.npz", name=label, array=array, x=x.numpy(), runs=runs)
    log = build_dir / label / "sim.log"
    try:
        sim.run(build_dir, toplevel, "marca.tb.nonlinear", params={"cases": [case]}, name=label)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{log.read_text()[-3000:]}") from None
    return len(x), log


@pytest.mark.parametrize("label", MATRIX)
def test_programs_on_array(tmp_path, label):
    config, rows, cols, random_count = MATRIX[label]
    count, _ = _run(tmp_path, label, config, rows, cols, random_count)
    if config.compute_format.width <= 16:
        assert count == 1 << 16
    else:
        assert count >= RANDOM * 3 // 2


@pytest.mark.parametrize("fault", ["scale_window_unchecked", "nan_without_mantissa"])
def test_broken_lane_is_caught(tmp_path, fault):
    """A lane whose EXP_SCALE forgets the window check of n (exp of x < -22 wraps around instead of
    flushing to +0), or whose forced NaNs lack their mantissa bit (the PE's multiplier then reads the NaN
    factor of exp(NaN) as Inf): exp's last pass must mismatch on a 1x1 FP16 array (every 16th input)."""
    config = dataclasses.replace(TINY, name="tiny-broken")
    label = f"fp16-broken-{fault}"
    with pytest.raises(AssertionError, match=f"{label}/exp: pass \\d+ \\(FUNCTION, function 0\\)"):
        _run(tmp_path, label, config, 1, 1, 0, fault=fault, functions=("exp",), stride=16)
