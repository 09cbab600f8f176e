"""Testbench of the PE array: stimulus, payload packing, and the cocotb test run in Verilator.

The pytest side (tests/test_pe_array.py) draws the beats with :func:`random_beats` or a property
pattern, computes the expected output beats with the golden model (``marca.golden.pe_array.run_beats``),
and writes both to an ``.npz`` file whose path reaches the cocotb test through ``tb_params()``; the
simulator process therefore needs neither torch nor the golden model. The cocotb test drives the operand
stream and takes the result stream in one coroutine per clock cycle (random gaps on ``i.valid`` and
random ``o.ready`` when asked), checks every output beat bit for bit and in order, and records each
beat's acceptance and delivery cycle for the cycle-exact properties.

Payloads are packed with the offsets of the layouts from :func:`marca.hw.pe_array.pe_array_layouts`,
never hand-written bit positions.
"""

import json
import pathlib
import time

import numpy as np
from amaranth.hdl import Shape

from ..formats import FloatFormat
from ..ops import ArrayMode, Broadcast, ElementwiseOp

# torch and the golden models are imported inside the stimulus functions only: the simulator process,
# which imports this module for its cocotb test, needs numpy alone and starts faster without torch.

__all__ = ["PE_ARRAY_BUILD_ARGS", "narrow_bits", "random_beats", "pattern_beats", "take_beats",
           "concat_beats", "pack_beats", "unpack_results", "field_slot", "write_case", "SelectExtension",
           "select_extension_golden", "test_pe_array_stream"]


PE_ARRAY_BUILD_ARGS = ("-CFLAGS", "-O0")
"""Verilator arguments of every PE array build (tests and benchmark share the builds): gcc -O0 compiles
the large flattened C++ of an array ~10x faster than -O2; Python drives every cycle, so the slower
simulated model costs little."""


# A stand-in lane extension ---------------------------------------------------------------------------

class SelectExtension:
    """Factory of a trivial lane extension for tests of the array's ``FUNCTION`` hook (the real one is
    the nonlinear units of issue #4): ``result = (a, b, c, −a)[function]`` after ``latency`` cycles.

    ``SelectExtension(latency=2)`` is the ``lane_extension`` callable; each call builds one lane.
    """

    function_bits = 2

    def __init__(self, *, width: int, latency: int = 2):
        self.width, self.latency = width, latency

    def __call__(self):
        from amaranth.hdl import Module, Mux, Signal
        from amaranth.lib import wiring
        from amaranth.lib.wiring import In, Out
        width, latency, function_bits = self.width, self.latency, self.function_bits

        class _Select(wiring.Component):
            def __init__(self):
                self.latency, self.function_bits = latency, function_bits
                super().__init__({"function": In(function_bits), "a": In(width), "b": In(width),
                                  "c": In(width), "enable": In(1), "result": Out(width)})

            def elaborate(self, platform):
                m = Module()
                function = self.function
                value = Mux(function == 0, self.a, Mux(function == 1, self.b,
                            Mux(function == 2, self.c, self.a ^ (1 << (width - 1)))))
                for stage in range(latency):
                    register = Signal(width, name=f"stage_{stage}")
                    with m.If(self.enable):
                        m.d.sync += register.eq(value)
                    value = register
                m.d.comb += self.result.eq(value)
                return m

        return _Select()


def select_extension_golden(function, a, b, c, fmt: FloatFormat):
    """Golden model of :class:`SelectExtension`."""
    import torch
    negated = a ^ fmt.sign_bit
    return torch.where(function == 0, a,
                       torch.where(function == 1, b, torch.where(function == 2, c, negated)))


# Stimulus --------------------------------------------------------------------------------------------

def _control(count, **fields):
    import torch
    beats = {name: torch.zeros(count, dtype=torch.int64) for name in
             ("mode", "op", "function", "broadcast_a", "broadcast_b", "broadcast_c", "first", "last",
              "slot", "hold_a", "use_held_a")}
    for name, value in fields.items():
        beats[name] = torch.as_tensor(value, dtype=torch.int64).expand(count).clone()
    return beats


def narrow_bits(count: int, fmt: FloatFormat, generator, *, spread: int = 2):
    """Random normal numbers with exponents within ``spread`` of 1.0 and random signs: sums of these
    cancel and round, so a tree that adds in another order gives other bits."""
    import torch
    exponent = fmt.bias + torch.randint(-spread, spread + 1, (count,), generator=generator)
    mantissa = torch.randint(0, 1 << fmt.man_bits, (count,), generator=generator)
    sign = torch.randint(0, 2, (count,), generator=generator)
    return (sign << (fmt.width - 1)) | (exponent << fmt.man_bits) | mantissa


def random_beats(*, rows: int, cols: int, fmt: FloatFormat, count: int, generator,
                 function_bits: int = 0, slots: int = 1, linear_share: float = 0.5) -> dict:
    """About ``count`` random beats: element-wise beats with every op and broadcast mode, and linear
    accumulation chains of 1 to 4 chunks (``first`` ... ``last``; up to three chains on distinct ones of
    ``slots`` accumulators interleaved; sometimes element-wise beats in between), held-tile stores and
    uses, and operands drawn with specials (``marca.golden.fp.random_bits``) or from a narrow range
    where the order of additions shows (:func:`narrow_bits`)."""
    import torch

    from ..golden import fp as golden_fp
    lanes = rows * cols
    mode, first, last, slot = [], [], [], []

    def append(beat_mode, beat_first, beat_last, beat_slot):
        mode.append(int(beat_mode))
        first.append(beat_first)
        last.append(beat_last)
        slot.append(beat_slot)

    def coin(probability):
        return bool(torch.rand((), generator=generator) < probability)

    while len(mode) < count:       # whole groups only: every accumulation ends with `last`
        if coin(linear_share):
            # 1 to 3 accumulation chains on distinct slots, their chunks interleaved round-robin.
            group = 1 if slots == 1 or coin(0.5) else int(torch.randint(2, min(slots, 3) + 1, (),
                                                                       generator=generator))
            chain_slots = torch.randperm(slots, generator=generator)[:group].tolist()
            lengths = torch.randint(1, 5, (group,), generator=generator).tolist()
            for chunk in range(max(lengths)):
                for chain_slot, length in zip(chain_slots, lengths):
                    if chunk < length:
                        append(ArrayMode.LINEAR, int(chunk == 0), int(chunk == length - 1), chain_slot)
                if chunk < max(lengths) - 1 and coin(0.15):
                    # An element-wise beat in the middle of an accumulation (first/last are ignored).
                    append(ArrayMode.ELEMENTWISE, int(coin(0.5)), int(coin(0.5)), 0)
        else:
            append(ArrayMode.ELEMENTWISE, int(coin(0.5)), int(coin(0.5)), int(coin(0.5)))
    count = len(mode)
    beats = _control(count, mode=mode, first=first, last=last, slot=slot)
    beats["op"] = torch.randint(0, len(ElementwiseOp), (count,), generator=generator)
    if function_bits:
        beats["function"] = torch.randint(0, 1 << function_bits, (count,), generator=generator)
    for name in ("broadcast_a", "broadcast_b", "broadcast_c"):
        beats[name] = torch.randint(0, len(Broadcast), (count,), generator=generator)
    linear = beats["mode"] == int(ArrayMode.LINEAR)
    # Linear beats mostly look like GEMV chunks (weights per lane, input per column, bias per row).
    typical = linear & (torch.rand(count, generator=generator) < 0.6)
    beats["broadcast_a"] = torch.where(typical, int(Broadcast.LANE), beats["broadcast_a"])
    beats["broadcast_b"] = torch.where(typical, int(Broadcast.COLUMN), beats["broadcast_b"])
    beats["broadcast_c"] = torch.where(typical, int(Broadcast.ROW), beats["broadcast_c"])
    beats["hold_a"] = (torch.rand(count, generator=generator) < 0.1).to(torch.int64)
    beats["hold_a"][0] = 1     # the held tile is defined from here on, whatever ran before
    beats["use_held_a"] = (torch.rand(count, generator=generator) < 0.2).to(torch.int64)
    narrow = torch.rand(count, generator=generator) < 0.4    # order-sensitive values on 40% of beats
    for name in ("a", "b", "c"):
        wide = golden_fp.random_bits(count * lanes, fmt, generator).reshape(count, lanes)
        beats[name] = torch.where(narrow[:, None], narrow_bits(count * lanes, fmt, generator).reshape(
            count, lanes), wide)
    return beats


def pattern_beats(*, rows: int, cols: int, fmt: FloatFormat, count: int, generator,
                  mode: ArrayMode, first: int = 1, last: int = 1, op: ElementwiseOp = ElementwiseOp.MULADD,
                  chain: int = 1, interleave: int = 1) -> dict:
    """Regular beats for the cycle-exact properties: ``count`` beats of one mode (linear beats in chains
    of ``chain`` chunks when ``chain > 1``, ``interleave`` chains on slots ``0 .. interleave−1`` taking
    turns beat by beat), GEMV-like broadcasts, random finite operands."""
    import torch

    from ..golden import fp as golden_fp
    lanes = rows * cols
    slot = torch.arange(count) % interleave
    if chain > 1:
        position = torch.arange(count) // interleave % chain
        first, last = (position == 0).to(torch.int64), (position == chain - 1).to(torch.int64)
    beats = _control(count, mode=int(mode), op=int(op), first=first, last=last, slot=slot,
                     broadcast_a=int(Broadcast.LANE), broadcast_b=int(Broadcast.COLUMN),
                     broadcast_c=int(Broadcast.ROW))
    for name in ("a", "b", "c"):
        beats[name] = golden_fp.random_bits(count * lanes, fmt, generator, specials=0.0).reshape(count, lanes)
    return beats



def take_beats(beats: dict, index) -> dict:
    """The beats ``index`` (a slice or index tensor) of a beat sequence."""
    import torch
    return {key: value[index] for key, value in beats.items() if isinstance(value, torch.Tensor)}


def concat_beats(*parts: dict) -> dict:
    """One beat sequence from several."""
    import torch
    keys = [key for key in parts[0] if isinstance(parts[0][key], torch.Tensor)]
    return {key: torch.cat([part[key] for part in parts]) for key in keys}


# Packing ---------------------------------------------------------------------------------------------

def field_slot(layout, name: str) -> tuple[int, int]:
    """``(offset, width)`` of a field of a StructLayout; for an array field, ``width`` of one element."""
    field = layout[name]
    shape = field.shape
    element = getattr(shape, "elem_shape", None)
    width = Shape.cast(element).width if element is not None else Shape.cast(shape).width
    return field.offset, width


def _pack_values(values: np.ndarray, width: int) -> np.ndarray:
    """Each row of ``values`` [N, lanes] packed into one little-endian integer, as Python ints."""
    if width % 8 == 0 and width <= 64:
        dtype = {8: "<u1", 16: "<u2", 32: "<u4", 64: "<u8"}.get(width)
        if dtype is not None:
            raw = values.astype(dtype)
            return [int.from_bytes(row.tobytes(), "little") for row in raw]
    out = []
    for row in values:
        packed = 0
        for index, value in enumerate(row.tolist()):
            packed |= int(value) << (index * width)
        out.append(packed)
    return out


def pack_beats(layout, beats: dict) -> list[int]:
    """The operand payload of every beat as an integer (offsets from ``layout``)."""
    count = len(beats["mode"])
    packed = [0] * count
    for name, _ in layout:
        offset, width = field_slot(layout, name)
        value = beats.get(name)
        if value is None:
            continue
        value = np.asarray(value, dtype=np.int64)
        if value.ndim == 2:
            words = _pack_values(value, width)
        else:
            words = [int(v) & ((1 << width) - 1) for v in value.tolist()]
        packed = [p | (w << offset) for p, w in zip(packed, words)]
    return packed


def _lane_values(field: int, width: int, lanes: int) -> list[int]:
    """``lanes`` little-endian ``width``-bit values from the low bits of ``field``."""
    dtype = {8: "<u1", 16: "<u2", 32: "<u4"}.get(width)
    if dtype is not None:
        raw = (field & ((1 << (width * lanes)) - 1)).to_bytes(width * lanes // 8, "little")
        return np.frombuffer(raw, dtype=dtype).astype(np.int64).tolist()
    mask = (1 << width) - 1
    return [(field >> (index * width)) & mask for index in range(lanes)]


def unpack_results(layout, words: list[int], lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mode [N], result [N, lanes])`` from result payload integers (offsets from ``layout``)."""
    mode_offset, mode_width = field_slot(layout, "mode")
    result_offset, width = field_slot(layout, "result")
    modes = np.array([(w >> mode_offset) & ((1 << mode_width) - 1) for w in words], dtype=np.int64)
    results = np.array([_lane_values(w >> result_offset, width, lanes) for w in words],
                       dtype=np.int64).reshape(len(words), lanes)
    return modes, results


def write_case(path, dut, beats: dict, *, extension=None) -> str:
    """Write ``beats`` packed for ``dut`` and the golden model's output beats to ``path`` (.npz) for the
    cocotb test; returns the path as a string."""
    from ..golden.pe_array import run_beats
    source, mode, result = run_beats(beats, rows=dut.rows, cols=dut.cols, fmt=dut.fmt, extension=extension)
    result_offset, result_width = field_slot(dut.layouts.results, "result")
    mode_offset, _ = field_slot(dut.layouts.results, "mode")
    np.savez(path, words=np.array([f"{w:x}" for w in pack_beats(dut.layouts.operands, beats)]),
             source=source.numpy(), mode=mode.numpy(), result=result.numpy(),
             beat_mode=np.asarray(beats["mode"]), result_offset=result_offset, result_width=result_width,
             mode_offset=mode_offset)
    return str(path)


# cocotb ----------------------------------------------------------------------------------------------

try:
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import ReadOnly, RisingEdge
except ImportError:  # pragma: no cover - cocotb is a test dependency
    cocotb = None

if cocotb is not None:

    @cocotb.test()
    async def test_pe_array_stream(dut):
        """Drive every stimulus file named in the parameters; check results and timing properties.

        Parameters (``tb_params()``): ``cases``: list of ``{"file", "valid_rate", "ready_rate",
        "seed", "latency_linear", "latency_elementwise", "expect_full_rate"}``.
        """
        from marca.sim import tb_params
        params = tb_params()
        Clock(dut.clk, 10, unit="ns").start()
        dut.rst.value = 1
        dut.i__valid.value = 0
        dut.o__ready.value = 0
        for _ in range(3):
            await RisingEdge(dut.clk)
        dut.rst.value = 0
        failures, report = [], {}
        for case in params["cases"]:
            started = time.perf_counter()
            case_failures, stats = await _run_case(dut, case)
            failures += case_failures
            report[case["name"]] = {**stats, "seconds": time.perf_counter() - started}
        if params.get("report"):
            pathlib.Path(params["report"]).write_text(json.dumps(report, indent=2))
        assert not failures, "\n".join(failures[:20])

    async def _run_case(dut, case) -> list[str]:
        stimulus = np.load(case["file"], allow_pickle=False)
        words = [int(x, 16) for x in stimulus["words"].tolist()]
        expected_mode, expected_result = stimulus["mode"], stimulus["result"]
        expected_source = stimulus["source"].tolist()
        beat_mode = stimulus["beat_mode"].tolist()
        result_offset, width = int(stimulus["result_offset"]), int(stimulus["result_width"])
        mode_offset = int(stimulus["mode_offset"])
        lanes = expected_result.shape[1]
        rng = np.random.default_rng(case["seed"])
        valid_rate, ready_rate = case["valid_rate"], case["ready_rate"]
        limit = case.get("max_cycles", 50 * len(words) + 1000)

        next_beat, accepted_cycle, outputs = 0, [], []
        presenting = False
        cycle = 0
        while len(outputs) < len(expected_source) and cycle < limit:
            await RisingEdge(dut.clk)
            cycle += 1
            if not presenting and next_beat < len(words) and (valid_rate >= 1 or rng.random() < valid_rate):
                dut.i__payload.value = words[next_beat]
                presenting = True
            dut.i__valid.value = int(presenting)     # once valid, held until accepted
            ready = 1 if ready_rate >= 1 else int(rng.random() < ready_rate)
            dut.o__ready.value = ready
            await ReadOnly()
            if presenting and int(dut.i__ready.value):
                accepted_cycle.append(cycle)
                next_beat += 1
                presenting = False
            if ready and int(dut.o__valid.value):
                outputs.append((cycle, int(dut.o__payload.value)))
        failures = []
        name = case["name"]
        if len(outputs) != len(expected_source):
            failures.append(f"{name}: {len(outputs)} result beats of {len(expected_source)} after {cycle} "
                            f"cycles ({next_beat} of {len(words)} beats accepted)")
        for index, (out_cycle, word) in enumerate(outputs[:len(expected_source)]):
            mode = (word >> mode_offset) & 1
            values = _lane_values(word >> result_offset, width, lanes)
            if mode != expected_mode[index] or values != expected_result[index].tolist():
                wrong = [lane for lane in range(lanes) if values[lane] != expected_result[index][lane]]
                failures.append(f"{name}: result beat {index} (input beat {expected_source[index]}): "
                                f"mode {mode} expected {expected_mode[index]}; lanes {wrong[:8]} got "
                                f"{[hex(values[lane]) for lane in wrong[:4]]} expected "
                                f"{[hex(int(expected_result[index][lane])) for lane in wrong[:4]]}")
                if len(failures) > 10:
                    break
        if case.get("check_latency") and not failures:
            for index, (out_cycle, _) in enumerate(outputs):
                source = expected_source[index]
                want = case["latency_linear"] if beat_mode[source] == 0 else case["latency_elementwise"]
                got = out_cycle - accepted_cycle[source]
                if got != want:
                    failures.append(f"{name}: beat {source} delivered {got} cycles after acceptance, "
                                    f"latency is {want}")
                    break
        if case.get("expect_interval") is not None and not failures:
            gaps = np.diff(np.array(accepted_cycle))
            want = np.array(case["expect_interval"], dtype=np.int64)
            if gaps.tolist() != want.tolist():
                failures.append(f"{name}: acceptance intervals {gaps.tolist()[:40]} expected "
                                f"{want.tolist()[:40]}")
        dut._log.info("%s: %d beats in, %d results, %d cycles", name, next_beat, len(outputs), cycle)
        busy = (outputs[-1][0] - accepted_cycle[0] + 1) if outputs and accepted_cycle else 0
        return failures, {"beats": next_beat, "results": len(outputs), "cycles": cycle,
                          "first_accept_to_last_result": busy}
