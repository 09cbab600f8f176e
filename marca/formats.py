"""Floating-point formats of the numerics contract (docs/numerics.md).

A format is IEEE-style: one sign bit, ``exp_bits`` of biased exponent, ``man_bits`` of stored mantissa
(hidden leading one). The contract departs from IEEE 754 on purpose: subnormals are flushed (inputs read as
zero, results flushed with their sign kept) and every NaN is the canonical quiet NaN.
"""

from dataclasses import dataclass

__all__ = ["FloatFormat", "FP32", "BF16", "FP16", "NAMED_FORMATS"]

# Exponent and mantissa limits: every value of every supported format, and every exact sum or product of
# two of them, fits a float64 with room to spare, which keeps the golden models simple and exact.
_EXP_BITS_RANGE = range(2, 9)
_MAN_BITS_RANGE = range(1, 24)


@dataclass(frozen=True)
class FloatFormat:
    """A float format ``(exp_bits, man_bits)``; width is ``1 + exp_bits + man_bits``."""

    exp_bits: int
    man_bits: int

    def __post_init__(self):
        if not isinstance(self.exp_bits, int) or isinstance(self.exp_bits, bool) \
                or self.exp_bits not in _EXP_BITS_RANGE:
            raise ValueError(f"exp_bits must be an integer in [{_EXP_BITS_RANGE.start}, "
                             f"{_EXP_BITS_RANGE.stop - 1}], not {self.exp_bits!r}")
        if not isinstance(self.man_bits, int) or isinstance(self.man_bits, bool) \
                or self.man_bits not in _MAN_BITS_RANGE:
            raise ValueError(f"man_bits must be an integer in [{_MAN_BITS_RANGE.start}, "
                             f"{_MAN_BITS_RANGE.stop - 1}], not {self.man_bits!r}")

    @classmethod
    def named(cls, name: str) -> "FloatFormat":
        """The format called ``name`` (``"fp32"``, ``"bf16"``, ``"fp16"``)."""
        try:
            return NAMED_FORMATS[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown float format name {name!r}; known: "
                             f"{', '.join(sorted(NAMED_FORMATS))}") from None

    @property
    def name(self) -> str:
        for name, fmt in NAMED_FORMATS.items():
            if fmt == self:
                return name
        return f"e{self.exp_bits}m{self.man_bits}"

    @property
    def width(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def precision(self) -> int:
        """Significand bits including the hidden one."""
        return self.man_bits + 1

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def exp_max(self) -> int:
        """All-ones exponent field: Inf and NaN."""
        return (1 << self.exp_bits) - 1

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite number."""
        return self.exp_max - 1 - self.bias

    @property
    def canonical_nan(self) -> int:
        """Bit pattern of the canonical quiet NaN: sign 0, exponent all ones, top mantissa bit set."""
        return (self.exp_max << self.man_bits) | (1 << (self.man_bits - 1))

    @property
    def inf(self) -> int:
        """Bit pattern of +Inf (set the top bit for -Inf)."""
        return self.exp_max << self.man_bits

    @property
    def sign_bit(self) -> int:
        return 1 << (self.width - 1)

    @property
    def largest_finite(self) -> int:
        return ((self.exp_max - 1) << self.man_bits) | ((1 << self.man_bits) - 1)

    @property
    def smallest_normal(self) -> int:
        return 1 << self.man_bits

    @property
    def one(self) -> int:
        return self.bias << self.man_bits

    def to_json(self) -> str | dict:
        return self.name if self.name in NAMED_FORMATS else {"exp_bits": self.exp_bits,
                                                             "man_bits": self.man_bits}

    @classmethod
    def from_json(cls, value) -> "FloatFormat":
        if isinstance(value, str):
            return cls.named(value)
        if isinstance(value, dict) and set(value) == {"exp_bits", "man_bits"}:
            return cls(**value)
        raise ValueError(f"a float format is a name or {{exp_bits, man_bits}}, not {value!r}")


FP32 = FloatFormat(8, 23)
BF16 = FloatFormat(8, 7)
FP16 = FloatFormat(5, 10)

NAMED_FORMATS = {"fp32": FP32, "bf16": BF16, "fp16": FP16}
