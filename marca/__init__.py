"""marca: a generator of MARCA-style Mamba inference accelerators.

Shared definitions live here (:mod:`marca.config`, :mod:`marca.formats`, :mod:`marca.sim`); the gateware
is :mod:`marca.hw` (folder hw/), the golden models :mod:`marca.golden` (golden/), the cocotb testbenches
:mod:`marca.tb` (tb/) and the FPGA flow :mod:`marca.fpga` (fpga/).
"""

from .config import MarcaConfig, preset
from .formats import FloatFormat

__all__ = ["MarcaConfig", "FloatFormat", "preset"]
