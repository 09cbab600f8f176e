"""cocotb + Verilator testbench of the float units (hw/fp.py): one wide harness per format runs millions
of vectors through every unit, bit-exact against :mod:`marca.golden.fp`.

:class:`FloatUnitsHarness` puts ``lanes`` copies of every unit side by side: a multiplier, an
adder/subtracter, a comparator (flags, minimum, maximum), an exponent scaler, converters to each other
named format, a float-to-int converter per rounding mode and an int-to-float converter. All lanes of all
units are fed from one packed ``stimulus`` port every cycle and answer on one packed ``response`` port, so
the Python side does one write and one read per cycle whatever the lane count (per-cycle Python is the
bottleneck of cocotb). Fields are packed field-major: field ``f`` of lane ``l`` sits at
``offset(f) + l * width(f)``.

:func:`make_vectors` builds the stimulus (targeted corners, an exhaustive sweep of every pattern of
16-bit one-input operations, random pairs), :func:`expected_responses` the golden answers;
:func:`check_responses` compares every output bit and lists the first failing operands in hex. The cocotb
test :func:`float_units_match_golden` ties them together; tests/test_fp_units.py builds and runs it.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import cocotb
import numpy as np
import torch
from amaranth import Cat, Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from marca.formats import NAMED_FORMATS, FloatFormat
from marca.hw import fp as hw

__all__ = ["Field", "FloatUnitsHarness", "make_vectors", "expected_responses", "check_responses",
           "float_units_match_golden"]


@dataclass(frozen=True)
class Field:
    """One per-lane field of the packed stimulus or response."""

    name: str
    width: int
    signed: bool = False
    latency: int = 0           # response fields: the latency of the unit that drives it


class FloatUnitsHarness(wiring.Component):
    """``lanes`` lanes of every float unit of ``fmt``, driven together (a test harness, not a block).

    Parameters
    ----------
    fmt : FloatFormat
    lanes : int
    int_bits : int
        Integer width of the float-to-int and int-to-float units.
    shift_bits : int
        Shift width of the exponent scaler.
    rounding : str
        Passed to the float-producing units; ``"truncate"`` builds the deliberately broken variant.

    Attributes
    ----------
    stimulus : In(sum of input field widths * lanes)
    enable : In(1), init 1
        Clock enable of every unit.
    response : Out(sum of output field widths * lanes)
    input_fields, output_fields : list of Field
    """

    def __init__(self, *, fmt: FloatFormat, lanes: int, int_bits: int, shift_bits: int,
                 rounding: str = "nearest_even"):
        if not isinstance(lanes, int) or lanes < 1:
            raise ValueError(f"lanes must be a positive integer, not {lanes!r}")
        self.fmt, self.lanes, self.int_bits, self.shift_bits = fmt, lanes, int_bits, shift_bits
        self.rounding = rounding
        self.targets = [target for target in NAMED_FORMATS.values() if target != fmt]
        self.input_fields = [Field("a", fmt.width), Field("b", fmt.width), Field("subtract", 1),
                             Field("shift", shift_bits, signed=True),
                             Field("integer", int_bits, signed=True)]
        self.output_fields = [
            Field("mul", fmt.width, latency=hw.FloatMultiplier.latency),
            Field("add", fmt.width, latency=hw.FloatAdder.latency),
            *(Field(name, 1, latency=hw.FloatCompare.latency) for name in ("lt", "eq", "gt")),
            *(Field(name, fmt.width, latency=hw.FloatCompare.latency) for name in ("minimum", "maximum")),
            Field("scale", fmt.width, latency=hw.FloatScale.latency),
            *(Field(f"convert_{target.name}", target.width, latency=hw.FloatConvert.latency)
              for target in self.targets),
            *(Field(f"to_int_{mode}", int_bits, signed=True, latency=hw.FloatToInt.latency)
              for mode in hw.INT_ROUNDING),
            Field("from_int", fmt.width, latency=hw.IntToFloat.latency),
        ]
        super().__init__({
            "stimulus": In(lanes * sum(field.width for field in self.input_fields)),
            "enable": In(1, init=1),
            "response": Out(lanes * sum(field.width for field in self.output_fields)),
        })

    def elaborate(self, platform):
        m = Module()
        fmt, rounding = self.fmt, self.rounding
        inputs, offset = {}, 0
        for field in self.input_fields:
            inputs[field.name] = [self.stimulus[offset + lane * field.width:offset + (lane + 1) * field.width]
                                  for lane in range(self.lanes)]
            offset += self.lanes * field.width
        outputs = {field.name: [] for field in self.output_fields}

        def add_unit(name, unit, lane, **ports):
            m.submodules[f"{name}_{lane}"] = unit
            m.d.comb += unit.enable.eq(self.enable)
            for port, value in ports.items():
                m.d.comb += getattr(unit, port).eq(value)
            return unit

        for lane in range(self.lanes):
            a, b = inputs["a"][lane], inputs["b"][lane]
            shift = inputs["shift"][lane].as_signed()
            integer = inputs["integer"][lane].as_signed()
            outputs["mul"].append(add_unit("mul", hw.FloatMultiplier(fmt=fmt, rounding=rounding), lane,
                                           a=a, b=b).result)
            outputs["add"].append(add_unit("add", hw.FloatAdder(fmt=fmt, rounding=rounding), lane, a=a, b=b,
                                           subtract=inputs["subtract"][lane]).result)
            compare = add_unit("compare", hw.FloatCompare(fmt=fmt), lane, a=a, b=b)
            for name in ("lt", "eq", "gt", "minimum", "maximum"):
                outputs[name].append(getattr(compare, name))
            outputs["scale"].append(add_unit("scale", hw.FloatScale(fmt=fmt, shift_bits=self.shift_bits),
                                             lane, a=a, shift=shift).result)
            for target in self.targets:
                unit = hw.FloatConvert(source=fmt, target=target, rounding=rounding)
                outputs[f"convert_{target.name}"].append(
                    add_unit(f"convert_{target.name}", unit, lane, a=a).result)
            for mode in hw.INT_ROUNDING:
                unit = hw.FloatToInt(fmt=fmt, int_bits=self.int_bits, rounding=mode)
                outputs[f"to_int_{mode}"].append(add_unit(f"to_int_{mode}", unit, lane, a=a).result)
            unit = hw.IntToFloat(fmt=fmt, int_bits=self.int_bits, rounding=rounding)
            outputs["from_int"].append(add_unit("from_int", unit, lane, a=integer).result)

        m.d.comb += self.response.eq(Cat(*(value for field in self.output_fields
                                           for value in outputs[field.name])))
        return m


# --- stimulus -------------------------------------------------------------------------------------------

def _normal_bits(sign, exponent, mantissa, fmt: FloatFormat) -> torch.Tensor:
    return (sign << (fmt.width - 1)) | (exponent << fmt.man_bits) | mantissa


def _corner_pairs(fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs of the golden special values, and products that carry out of the significand on
    rounding right at the flush and overflow boundaries (tininess after rounding; overflow after
    rounding), which random operands almost never hit in wide formats."""
    from marca.golden import fp as golden
    specials = golden.special_values(fmt)
    a, b = torch.meshgrid(specials, specials, indexing="ij")
    a_list, b_list = [a.flatten()], [b.flatten()]
    all_ones = (1 << fmt.man_bits) - 1
    mantissas = [(all_ones, 1), (all_ones, all_ones), (all_ones, 0), (all_ones - 1, 1), (1, all_ones)]
    pairs = []
    for target in (0, fmt.exp_max - 1):           # product exponent before rounding: emin - 1 or emax
        for delta in (-1, 0, 1):
            exponent_sum = target + delta + fmt.bias   # Ea + Eb = biased product exponent + bias
            splits = {1, fmt.exp_max - 1, exponent_sum // 2, exponent_sum - 1, exponent_sum - fmt.exp_max + 1}
            for ea in sorted(splits):
                eb = exponent_sum - ea
                if 1 <= ea <= fmt.exp_max - 1 and 1 <= eb <= fmt.exp_max - 1:
                    for ma, mb in mantissas:
                        for sa in (0, 1):
                            for sb in (0, 1):
                                pairs.append((_normal_bits(sa, ea, ma, fmt), _normal_bits(sb, eb, mb, fmt)))
    if pairs:
        pair_tensor = torch.tensor(pairs, dtype=torch.int64)
        a_list.append(pair_tensor[:, 0])
        b_list.append(pair_tensor[:, 1])
    return torch.cat(a_list), torch.cat(b_list)


def _corner_singles(fmt: FloatFormat, int_bits: int) -> torch.Tensor:
    """Operands at the rounding boundaries of every conversion target and of the integer range."""
    from marca.golden import fp as golden
    values = []
    for target in NAMED_FORMATS.values():
        smallest = 2.0 ** target.emin
        largest = (2 - 2.0 ** -target.man_bits) * 2.0 ** target.emax
        for k in range(1, fmt.precision + 2):
            values += [smallest * (1 - 2.0 ** -k), smallest * (1 + 2.0 ** -k),
                       largest * (1 + 2.0 ** -k), largest * (1 - 2.0 ** -k)]
        values += [largest + 2.0 ** (target.emax - target.man_bits - 1)]            # tie at overflow
    limit = 2.0 ** (int_bits - 1)
    values += [limit, limit - 0.5, limit - 1, limit - 1.5, limit + 1, limit + 0.5, 0.5, 1.5, 2.5, 0.25,
               0.75, 1.0, 3.5]
    values = torch.tensor(values, dtype=torch.float64)
    return golden.encode(torch.cat([values, -values]), fmt)


def make_vectors(fmt: FloatFormat, *, int_bits: int, shift_bits: int, random_count: int,
                 exhaustive: bool, seed: int) -> dict[str, torch.Tensor]:
    """Stimulus vectors (``int64`` tensors of equal length): corners, then (if ``exhaustive``) every
    ``fmt`` pattern in ``a`` and every ``int_bits`` integer in ``integer``, then ``random_count`` random
    vectors. Random operands mix the golden model's generator (exponents near the bias, specials),
    uniform patterns, products aimed at the flush and overflow boundaries, near-cancelling sums and
    multipliers with few significant bits (which make ties)."""
    from marca.golden import fp as golden
    generator = torch.Generator().manual_seed(seed)

    def randint(low, high, count):
        return torch.randint(low, high, (count,), generator=generator, dtype=torch.int64)

    corner_a, corner_b = _corner_pairs(fmt)
    singles = _corner_singles(fmt, int_bits)
    a_parts, b_parts = [corner_a, singles], [corner_b, golden.random_bits(len(singles), fmt, generator)]
    if exhaustive:
        a_parts.append(torch.arange(1 << fmt.width, dtype=torch.int64))
        b_parts.append(golden.random_bits(1 << fmt.width, fmt, generator))

    count = random_count
    shares = {"golden": 0.4, "uniform": 0.2, "boundary": 0.15, "cancel": 0.1}
    sizes = {name: int(count * share) for name, share in shares.items()}
    sizes["few_bits"] = count - sum(sizes.values())
    man_mask = (1 << fmt.man_bits) - 1
    # golden generator: exponents near the bias half of the time, 5% specials
    a_parts.append(golden.random_bits(sizes["golden"], fmt, generator))
    b_parts.append(golden.random_bits(sizes["golden"], fmt, generator))
    a_parts.append(randint(0, 1 << fmt.width, sizes["uniform"]))
    b_parts.append(randint(0, 1 << fmt.width, sizes["uniform"]))
    # products whose exponent lands at emin or emax (+-2): flush, overflow, tininess after rounding
    n = sizes["boundary"]
    ea = randint(1, fmt.exp_max, n)
    target = torch.where(randint(0, 2, n) == 1, fmt.exp_max - 1, 0) + randint(-2, 3, n)
    eb = (target + fmt.bias - ea).clamp(1, fmt.exp_max - 1)
    a_parts.append(_normal_bits(randint(0, 2, n), ea, randint(0, 1 << fmt.man_bits, n), fmt))
    b_parts.append(_normal_bits(randint(0, 2, n), eb, randint(0, 1 << fmt.man_bits, n), fmt))
    # near-cancelling sums: b = -(a + a few ulps), exponent equal or one off
    n = sizes["cancel"]
    a_bits = golden.random_bits(n, fmt, generator)
    b_bits = (a_bits + randint(-4, 5, n) + (randint(-1, 2, n) << fmt.man_bits)) & ((1 << fmt.width) - 1)
    a_parts.append(a_bits)
    b_parts.append(b_bits ^ (randint(0, 2, n) << (fmt.width - 1)))
    # multipliers with 1-3 significant bits: many exact ties in products and sums
    n = sizes["few_bits"]
    keep = randint(0, min(3, fmt.man_bits) + 1, n)
    few = randint(0, 1 << fmt.man_bits, n) & (man_mask ^ ((1 << (fmt.man_bits - keep)) - 1))
    exponent = (fmt.bias + randint(-fmt.man_bits - 3, fmt.man_bits + 4, n)).clamp(1, fmt.exp_max - 1)
    a_parts.append(golden.random_bits(n, fmt, generator))
    b_parts.append(_normal_bits(randint(0, 2, n), exponent, few, fmt))

    a, b = torch.cat(a_parts), torch.cat(b_parts)
    total = len(a)
    # integers: every value first (when exhaustive), then uniform and uniform-in-bit-length values
    low, high = -(1 << (int_bits - 1)), 1 << (int_bits - 1)
    int_parts = [torch.arange(low, high, dtype=torch.int64)] if exhaustive else []
    remaining = total - sum(len(part) for part in int_parts)
    if remaining > 0:
        uniform = randint(low, high, remaining)
        lengths = randint(0, int_bits, remaining)
        by_length = (torch.rand(remaining, generator=generator) * (2.0 ** lengths)).to(torch.int64)
        by_length = torch.where(randint(0, 2, remaining) == 1, -by_length, by_length).clamp(low, high - 1)
        int_parts.append(torch.where(randint(0, 2, remaining) == 1, uniform, by_length))
    integer = torch.cat(int_parts)
    if len(integer) > total:  # the integer sweep is longer than the float vectors: pad the floats
        extra = len(integer) - total
        a = torch.cat([a, golden.random_bits(extra, fmt, generator)])
        b = torch.cat([b, golden.random_bits(extra, fmt, generator)])
        total = len(integer)
    else:
        integer = integer[:total]
    # shifts: the whole range, twice the exponent range, and small ones
    shift_low, shift_high = -(1 << (shift_bits - 1)), 1 << (shift_bits - 1)
    span = 2 * fmt.bias + 3
    shift = torch.stack([randint(shift_low, shift_high, total),
                         randint(-span, span + 1, total).clamp(shift_low, shift_high - 1),
                         randint(-8, 9, total).clamp(shift_low, shift_high - 1)])
    shift = shift[randint(0, 3, total), torch.arange(total)]
    subtract = randint(0, 2, total)
    return {"a": a, "b": b, "subtract": subtract, "shift": shift, "integer": integer}


def expected_responses(harness_fmt: FloatFormat, targets, int_bits: int,
                       vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Golden answers for every response field."""
    from marca.golden import fp as golden
    fmt = harness_fmt
    a, b = vectors["a"], vectors["b"]
    lt, eq, gt = golden.compare(a, b, fmt)
    expected = {
        "mul": golden.mul(a, b, fmt),
        "add": torch.where(vectors["subtract"] == 1, golden.sub(a, b, fmt), golden.add(a, b, fmt)),
        "lt": lt.to(torch.int64), "eq": eq.to(torch.int64), "gt": gt.to(torch.int64),
        "minimum": golden.minimum(a, b, fmt), "maximum": golden.maximum(a, b, fmt),
        "scale": golden.ldexp(a, vectors["shift"], fmt),
        "from_int": golden.from_int(vectors["integer"], fmt, int_bits),
    }
    for target in targets:
        expected[f"convert_{target.name}"] = golden.convert(a, fmt, target)
    for mode in hw.INT_ROUNDING:
        expected[f"to_int_{mode}"] = golden.to_int(a, fmt, int_bits, mode)
    return expected


# Which operands each response field depends on (for failure reports).
_OPERANDS = {"mul": ("a", "b"), "add": ("a", "b", "subtract"), "lt": ("a", "b"), "eq": ("a", "b"),
             "gt": ("a", "b"), "minimum": ("a", "b"), "maximum": ("a", "b"), "scale": ("a", "shift"),
             "from_int": ("integer",)}


def check_responses(vectors, responses, expected, *, show: int = 5) -> dict[str, dict]:
    """Bit-for-bit comparison of every field: ``{field: {"vectors", "mismatches", "first"}}`` where
    ``first`` lists the first ``show`` failing operands and results in hex."""
    report = {}
    for name, want in expected.items():
        got = responses[name]
        bad = torch.nonzero(got != want).flatten()
        operands = _OPERANDS.get(name, ("a",))
        first = []
        for index in bad[:show].tolist():
            described = ", ".join(f"{operand}={_hex(vectors[operand][index])}" for operand in operands)
            first.append(f"{described}: got {_hex(got[index])}, expected {_hex(want[index])}")
        report[name] = {"vectors": len(want), "mismatches": len(bad), "first": first}
    return report


def _hex(value) -> str:
    value = int(value)
    return f"-{-value:#x}" if value < 0 else f"{value:#x}"


# --- packing --------------------------------------------------------------------------------------------

def _pack_rows(fields: list[Field], lanes: int, values: dict[str, np.ndarray]) -> list[int]:
    """Rows (one per cycle) of packed stimulus integers from ``values[name]`` of shape (rows, lanes)."""
    columns = []
    for field in fields:
        data = values[field.name].astype(np.int64) & ((1 << field.width) - 1)
        bits = (data[:, :, None] >> np.arange(field.width, dtype=np.int64)) & 1   # (rows, lanes, width)
        columns.append(bits.reshape(len(data), lanes * field.width).astype(np.uint8))
    bits = np.concatenate(columns, axis=1)
    packed = np.packbits(bits, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


class _ResponseRows:
    """Responses read from the simulator as binary strings, kept compactly as little-endian bytes."""

    _BLOCK = 2048

    def __init__(self, width: int):
        self.width = width
        self.pending: list[str] = []
        self.blocks: list[np.ndarray] = []

    def append(self, binary: str) -> None:
        self.pending.append(binary)
        if len(self.pending) == self._BLOCK:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        text = "".join(self.pending).encode("ascii")
        bits = np.frombuffer(text, dtype=np.uint8).reshape(len(self.pending), self.width) - ord("0")
        if bits.max(initial=0) > 1:
            raise AssertionError("the response holds X or Z bits")
        self.blocks.append(np.packbits(bits[:, ::-1], axis=1, bitorder="little"))
        self.pending = []

    def __len__(self) -> int:
        return sum(len(block) for block in self.blocks) + len(self.pending)

    def rows(self) -> np.ndarray:
        """(rows, bytes) uint8, bit ``i`` of a row in byte ``i // 8`` at position ``i % 8``."""
        self._flush()
        return np.concatenate(self.blocks)


def _unpack_rows(fields: list[Field], lanes: int, packed: np.ndarray,
                 block: int = 4096) -> dict[str, np.ndarray]:
    """Response fields of shape (rows, lanes) from rows of little-endian bytes."""
    values = {field.name: np.empty((len(packed), lanes), dtype=np.int64) for field in fields}
    for start in range(0, len(packed), block):
        bits = np.unpackbits(packed[start:start + block], axis=1, bitorder="little")
        offset = 0
        for field in fields:
            chunk = bits[:, offset:offset + lanes * field.width].reshape(len(bits), lanes, field.width)
            data = np.packbits(chunk, axis=2, bitorder="little").astype(np.int64)
            data = (data << (8 * np.arange(data.shape[2], dtype=np.int64))).sum(axis=2)
            if field.signed:
                data = np.where(data >= 1 << (field.width - 1), data - (1 << field.width), data)
            values[field.name][start:start + block] = data
            offset += lanes * field.width
    return values


# --- the cocotb test ------------------------------------------------------------------------------------

async def _drive(dut, stimulus_rows: list[int], *, idle_row: int, stall_cycles: int, seed: int,
                 latency: int) -> np.ndarray:
    """Present one row per enabled cycle; during the first ``stall_cycles`` cycles hold ``enable`` low at
    random (with garbage on the stimulus). Return the response read after every enabled clock edge, as
    rows of little-endian bytes."""
    from cocotb.clock import Clock
    from cocotb.triggers import FallingEdge

    rng = random.Random(seed)
    width = len(dut.stimulus)
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.enable.value = 1
    dut.stimulus.value = idle_row
    dut.rst.value = 1
    await FallingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    responses = _ResponseRows(len(dut.response))
    stimulus = dut.stimulus
    response = dut.response
    enable = dut.enable
    total = len(stimulus_rows) + latency      # drain the deepest pipeline
    presented = cycle = 0
    enabled_before = False
    falling = FallingEdge(dut.clk)
    while presented < total:
        await falling
        if enabled_before:
            responses.append(str(response.value))
        stalled = cycle < stall_cycles and rng.random() < 0.3
        if stalled:
            enable.value = 0
            stimulus.value = rng.getrandbits(width)
        else:
            if cycle <= stall_cycles:
                enable.value = 1
            stimulus.value = stimulus_rows[presented] if presented < len(stimulus_rows) else idle_row
            presented += 1
        enabled_before = not stalled
        cycle += 1
    await falling
    responses.append(str(response.value))
    return responses.rows()


@cocotb.test()
async def float_units_match_golden(dut):
    """Drive the harness with corners, exhaustive sweeps and random vectors; compare with golden."""
    import time

    from marca.sim import tb_params
    params = tb_params()
    fmt = FloatFormat.from_json(params["fmt"])
    lanes, int_bits, shift_bits = params["lanes"], params["int_bits"], params["shift_bits"]
    harness = FloatUnitsHarness(fmt=fmt, lanes=lanes, int_bits=int_bits, shift_bits=shift_bits)
    harness._MustUse__silence = True          # only its field lists are needed here
    started = time.perf_counter()
    vectors = make_vectors(fmt, int_bits=int_bits, shift_bits=shift_bits,
                           random_count=params["random_count"], exhaustive=params["exhaustive"],
                           seed=params.get("seed", 0))
    total = len(vectors["a"])
    rows = -(-total // lanes)
    padded = {name: np.concatenate([value.numpy(), np.zeros(rows * lanes - total, dtype=np.int64)])
              .reshape(rows, lanes) for name, value in vectors.items()}
    stimulus_rows = _pack_rows(harness.input_fields, lanes, padded)
    generated = time.perf_counter()

    latency = max(field.latency for field in harness.output_fields)
    responses = await _drive(dut, stimulus_rows, idle_row=0, stall_cycles=params.get("stall_cycles", 0),
                             seed=params.get("seed", 0), latency=latency)
    simulated = time.perf_counter()

    unpacked = _unpack_rows(harness.output_fields, lanes, responses)
    got = {}
    for field in harness.output_fields:
        # The result of stimulus row r is read after enabled edge r + latency (1-based).
        data = unpacked[field.name][field.latency - 1:field.latency - 1 + rows]
        got[field.name] = torch.from_numpy(data.reshape(-1)[:total].copy())
    expected = expected_responses(fmt, harness.targets, int_bits, vectors)
    report = check_responses(vectors, got, expected)
    checked = time.perf_counter()
    summary = {
        "fmt": fmt.name, "lanes": lanes, "vectors": total, "cycles": len(responses),
        "seconds": {"generate": generated - started, "simulate": simulated - generated,
                    "check": checked - simulated},
        "fields": report,
    }
    if params.get("report"):
        Path(params["report"]).write_text(json.dumps(summary, indent=1))
    dut._log.info("%d vectors x %d units in %d cycles: %.1f s simulating (%.0f cycles/s)", total,
                  len(harness.output_fields), len(responses), simulated - generated,
                  len(responses) / max(simulated - generated, 1e-9))

    expect_failing = set(params.get("expect_mismatches", ()))
    problems = []
    for name, result in report.items():
        if name in expect_failing:
            if result["mismatches"] == 0:
                problems.append(f"{name}: the broken variant was NOT caught (0 mismatches)")
        elif result["mismatches"]:
            problems.append(f"{name}: {result['mismatches']} of {result['vectors']} mismatches; first:\n  "
                            + "\n  ".join(result["first"]))
    assert not problems, f"{fmt.name} float units vs golden:\n" + "\n".join(problems)
