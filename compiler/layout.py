"""Memory layout pass: where every tensor lives in memory (docs/compiler.md, Data layout).

A :class:`MemoryImage` is laid out block by block; with ``materialize=False`` it only tracks addresses and
sizes, so a model can be compiled from its shapes alone (weights too big for this machine): the program
and every address are the same as with values, only the bytes are missing.
"""

from dataclasses import dataclass, field

import torch

from marca.golden.iss import pack_elements

__all__ = ["ceil_div", "largest", "TensorPlace", "Region", "MemoryImage", "tile_matrix", "untile_matrix", "line_vector"]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def largest(low: int, high: int, ok) -> int:
    """The largest value in [low, high] for which ``ok`` holds (``ok(low)`` is known to hold; ``ok`` is
    monotone: the planners' "does this working set still fit")."""
    best = low
    while low <= high:
        middle = (low + high) // 2
        if ok(middle):
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return best


@dataclass(frozen=True)
class TensorPlace:
    """Where a tensor lives in memory: ``rows`` rows of ``row_elements`` elements, ``row_stride`` bytes
    apart, in the ``storage`` or ``compute`` format; ``layout`` says how the tensor maps to those rows."""

    address: int
    rows: int
    row_elements: int
    row_stride: int
    format: str
    layout: str

    @property
    def compute(self) -> bool:
        return self.format == "compute"


@dataclass
class Region:
    """A named block of the memory image."""

    name: str
    address: int
    size: int


@dataclass
class MemoryImage:
    """A memory image laid out block by block (each block aligned to ``alignment`` bytes).

    ``materialize=False``: addresses only (``data`` stays None), for compiling from shapes."""

    alignment: int = 64
    materialize: bool = True
    data: bytearray | None = None
    regions: dict = field(default_factory=dict)
    size: int = 0

    def __post_init__(self):
        if self.materialize and self.data is None:
            self.data = bytearray()

    def allocate(self, name: str, size: int) -> int:
        address = -(-self.size // self.alignment) * self.alignment
        self.size = address + size
        if self.materialize:
            self.data.extend(bytes(self.size - len(self.data)))
        self.regions[name] = Region(name, address, size)
        return address

    def place(self, name: str, bits, element_bytes: int, count: int | None = None) -> int:
        """Allocate and fill a block with ``bits`` (or, from shapes, ``count`` elements left empty)."""
        if bits is None or not self.materialize:
            count = count if bits is None else torch.as_tensor(bits).numel()
            return self.allocate(name, count * element_bytes)
        payload = pack_elements(bits, element_bytes)
        address = self.allocate(name, len(payload))
        self.data[address:address + len(payload)] = payload
        return address


def tile_matrix(matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``matrix [out, in]`` padded with zeros and cut into ``rows x cols`` tiles, lines in (row tile, chunk)
    order, flattened (row-major inside a tile)."""
    out_dim, in_dim = matrix.shape
    J, K = ceil_div(out_dim, rows), ceil_div(in_dim, cols)
    padded = torch.zeros(J * rows, K * cols, dtype=matrix.dtype)
    padded[:out_dim, :in_dim] = matrix
    return padded.reshape(J, rows, K, cols).permute(0, 2, 1, 3).reshape(-1)


def untile_matrix(lines: torch.Tensor, out_dim: int, in_dim: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`tile_matrix`."""
    J, K = ceil_div(out_dim, rows), ceil_div(in_dim, cols)
    return lines.reshape(J, K, rows, cols).permute(0, 2, 1, 3).reshape(J * rows, K * cols)[:out_dim, :in_dim]


def line_vector(values: torch.Tensor, lines: int, lanes: int) -> torch.Tensor:
    """``values`` zero-padded to ``lines`` whole lines of ``lanes`` elements."""
    out = torch.zeros(lines * lanes, dtype=torch.float64)
    out[:len(values)] = values
    return out
