"""The one configuration object that drives generation, simulation, the compiler and the FPGA flow.

Only the top levels take a whole :class:`MarcaConfig`; leaf blocks take keyword-only scalars (formats,
sizes) so each can be built and tested alone. Every invariant is checked here, in ``__post_init__``, with a
``ValueError`` naming the field and the value. Presets are ``dataclasses.replace(DEFAULT, ...)``.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .formats import FloatFormat

__all__ = ["MarcaConfig", "DEFAULT", "FPGA_SMALL", "FPGA_MEDIUM", "PAPER", "TINY", "PRESETS", "preset"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_power_of_two(value) -> bool:
    return _is_int(value) and value > 0 and value & (value - 1) == 0


@dataclass(frozen=True, kw_only=True)
class MarcaConfig:
    """Generator parameters.

    Array
        ``array_rows`` x ``array_cols`` PEs; each row has a balanced pairwise adder tree over its
        ``array_cols`` products, so ``array_cols`` is a power of two.
    Numerics
        ``compute_format`` (PEs, trees, accumulators, nonlinear units, scan state) and ``storage_format``
        (memory, weight and activation buffers); see docs/numerics.md.
    Nonlinear functions
        ``exp_degree``: degree of the e^r polynomial of exp (also inside SiLU and softplus);
        ``softplus_degree``: degree of softplus's log1p(u)/u polynomial (docs/nonlinear.md).
    Buffers
        Sizes in KiB of the on-chip weight, activation, state and scratch buffers.
    Bus
        ``axi_data_width`` bits per beat of the AXI4 master; ``axi_addr_width`` address bits.
    """

    name: str = "default"

    array_rows: int = 8
    array_cols: int = 8

    compute_format: FloatFormat | str = "fp32"
    storage_format: FloatFormat | str = "bf16"

    exp_degree: int = 3
    softplus_degree: int = 4  # degree 3 leaves softplus at ~5e-4 relative, the target (docs/nonlinear.md)

    weight_buffer_kib: int = 64
    activation_buffer_kib: int = 32
    state_buffer_kib: int = 32
    scratch_buffer_kib: int = 16

    axi_data_width: int = 128
    axi_addr_width: int = 32

    fpga_clock_mhz: float = 50.0

    def __post_init__(self):
        def fail(field_name, message):
            raise ValueError(f"{field_name} {message}, not {getattr(self, field_name)!r}")

        if not isinstance(self.name, str) or not self.name:
            fail("name", "must be a non-empty string")
        for name in ("array_rows", "array_cols"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= 256:
                fail(name, "must be an integer in [1, 256]")
        if not _is_power_of_two(self.array_cols):
            fail("array_cols", "must be a power of two (each row reduces through a balanced tree)")
        for name in ("compute_format", "storage_format"):
            value = getattr(self, name)
            if isinstance(value, str):  # a format may be given by name; store the FloatFormat
                try:
                    object.__setattr__(self, name, FloatFormat.named(value))
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from None
            elif not isinstance(value, FloatFormat):
                fail(name, "must be a FloatFormat or a format name ('fp32', 'bf16', 'fp16')")
        for name in ("exp_degree", "softplus_degree"):
            if not _is_int(getattr(self, name)) or not 1 <= getattr(self, name) <= 6:
                fail(name, "must be an integer in [1, 6]")
        for name in ("weight_buffer_kib", "activation_buffer_kib", "state_buffer_kib",
                     "scratch_buffer_kib"):
            if not _is_power_of_two(getattr(self, name)):
                fail(name, "must be a power of two (KiB)")
        if not _is_power_of_two(self.axi_data_width) or not 32 <= self.axi_data_width <= 1024:
            fail("axi_data_width", "must be a power of two in [32, 1024]")
        if not _is_int(self.axi_addr_width) or not 16 <= self.axi_addr_width <= 64:
            fail("axi_addr_width", "must be an integer in [16, 64]")
        if not isinstance(self.fpga_clock_mhz, (int, float)) or isinstance(self.fpga_clock_mhz, bool) \
                or not 0 < self.fpga_clock_mhz <= 1000:
            fail("fpga_clock_mhz", "must be a number in (0, 1000]")

        # Buffers must hold at least what the array consumes at once.
        tile_bytes = self.array_rows * self.array_cols * self.storage_bytes
        if self.weight_buffer_kib * 1024 < 2 * tile_bytes:
            fail("weight_buffer_kib", f"must hold two {self.array_rows}x{self.array_cols} weight tiles "
                                      f"({2 * tile_bytes} bytes)")
        state_tile_bytes = self.array_rows * self.array_cols * self.compute_bytes
        for name in ("activation_buffer_kib", "state_buffer_kib", "scratch_buffer_kib"):
            if getattr(self, name) * 1024 < 2 * state_tile_bytes:
                fail(name, f"must hold two array-sized tiles in the compute format "
                           f"({2 * state_tile_bytes} bytes)")

    # Derived values ------------------------------------------------------------------------------------

    @property
    def lanes(self) -> int:
        """Element-wise lanes: one per PE."""
        return self.array_rows * self.array_cols

    @property
    def storage_bytes(self) -> int:
        """Bytes per element in memory (storage widths are padded to whole bytes)."""
        return (self.storage_format.width + 7) // 8

    @property
    def compute_bytes(self) -> int:
        return (self.compute_format.width + 7) // 8

    # JSON ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_json() if isinstance(value, FloatFormat) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "MarcaConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a configuration is a JSON object, not {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown configuration field(s): {', '.join(unknown)}")
        values = dict(data)
        for name in ("compute_format", "storage_format"):
            if name in values:
                try:
                    values[name] = FloatFormat.from_json(values[name])
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from None
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "MarcaConfig":
        return cls.from_dict(json.loads(text))

    def write(self, path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path) -> "MarcaConfig":
        return cls.from_json(Path(path).read_text())


DEFAULT = MarcaConfig()

# The FPGA preset (`make bitstream`): routes on an ECP5-85F with room to spare and closes timing at 50 MHz
# (58.5 MHz, docs/fpga.md): 4 BF16 PEs (2x2), small buffers, a 32-bit bus.
FPGA_SMALL = dataclasses.replace(
    DEFAULT, name="fpga-small", array_rows=2, array_cols=2,
    compute_format="bf16", storage_format="bf16",
    exp_degree=2,
    weight_buffer_kib=4, activation_buffer_kib=2, state_buffer_kib=2, scratch_buffer_kib=1,
    axi_data_width=32)

# The same with 16 PEs (4x4): the array of the benchmarks, and the bigger FPGA build of docs/fpga.md (it
# fits the ECP5-85F's resources, but its routing does not converge yet).
FPGA_MEDIUM = dataclasses.replace(FPGA_SMALL, name="fpga-medium", array_rows=4, array_cols=4)

# The scale of the MARCA chip (24 MB on chip); for generation and resource estimates, not simulation.
PAPER = dataclasses.replace(
    DEFAULT, name="paper", array_rows=32, array_cols=32,
    weight_buffer_kib=16384, activation_buffer_kib=4096, state_buffer_kib=2048,
    scratch_buffer_kib=2048, axi_data_width=512)

# The smallest useful configuration: quick simulations.
TINY = dataclasses.replace(
    DEFAULT, name="tiny", array_rows=2, array_cols=2,
    compute_format="fp16", storage_format="fp16",
    weight_buffer_kib=1, activation_buffer_kib=1, state_buffer_kib=1, scratch_buffer_kib=1,
    axi_data_width=32)

PRESETS = {config.name: config for config in (DEFAULT, FPGA_SMALL, FPGA_MEDIUM, PAPER, TINY)}


def preset(name: str) -> MarcaConfig:
    """The preset called ``name``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
