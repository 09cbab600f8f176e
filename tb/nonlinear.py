"""Testbench of the nonlinear functions on the PE array: programs of passes run in Verilator, bit for bit.

The pytest side (tests/test_nonlinear.py) builds a :class:`marca.hw.pe_array.PEArray` with the
:class:`marca.hw.nonlinear.FunctionLane` extension, runs the golden model
(:func:`marca.golden.nonlinear.run_program` with ``every_pass``) and writes a case file per program with
:func:`write_case`: the inputs, the passes, every pass's expected results and the payload offsets. The
cocotb test plays the controller: for each pass it streams all elements through the array as element-wise
beats (``Broadcast.LANE`` for per-element operands, ``Broadcast.SCALAR`` for the program's constants),
keeps the results as the next passes' operands, and compares every pass bit for bit. The simulator
process needs numpy only (no torch, no golden model).
"""

import json
import time

import numpy as np

from ..ops import ArrayMode, Broadcast, ElementwiseOp

__all__ = ["stimulus", "test_nonlinear_programs", "write_case"]

_KINDS = {"input": 0, "result": 1, "constant": 2}


def _field(layout, name):
    from amaranth.hdl import Shape
    field = layout[name]
    element = getattr(field.shape, "elem_shape", None)
    width = Shape.cast(element if element is not None else field.shape).width
    return field.offset, width


def stimulus(constants, *, random_count: int, seed: int = 4):
    """Input bit patterns for the functions of ``constants`` (a FunctionConstants).

    16-bit formats: every pattern (65,536). Wider formats: the corner cases (zeros, subnormals, ±Inf,
    NaNs, largest and smallest normals), with their neighbours: integer and half-integer multiples of
    ln 2 (where t = x·log2 e rounds to n), the edges of EXP_SCALE's window and of NEGATIVE_MAGNITUDE's
    bound, exp's overflow and underflow region; tiny magnitudes, the first and last pattern of every
    binade, then ``random_count`` random patterns (:func:`marca.golden.fp.random_bits`) and
    ``random_count // 2`` uniform values in [-40, 100].
    """
    import torch

    from ..golden import fp
    fmt = constants.fmt
    if fmt.width <= 16:
        return torch.arange(1 << fmt.width, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    # Half-integer t (where the rounding of t to n flips), the edges of EXP_SCALE's window of n
    # (|n| = 2^(exp_bits+1)), NEGATIVE_MAGNITUDE's bound ±128.
    window = 1 << (fmt.exp_bits + 1)
    edges = [0.0, 128.0, -128.0] + [t * 0.6931471805599453 for t in (window, -window, window - 0.5, 0.5 - window)]
    edges += [(k + 0.5) * 0.6931471805599453 for k in range(-160, 140)]
    edges += [k * 0.6931471805599453 for k in range(-160, 140)]
    edges += [88.72283935546875, -87.33654022216797, -103.27892303466797, 2.0 ** -30, -(2.0 ** -30)]
    centre = fp.encode(torch.tensor(edges, dtype=torch.float64), fmt)
    near = torch.cat([centre + step for step in range(-3, 4)]) & ((1 << fmt.width) - 1)
    tiny = torch.cat([torch.arange(fmt.smallest_normal - 4, fmt.smallest_normal + 400),
                      torch.arange(0, 64), fmt.one + torch.arange(-64, 64)])
    tiny = torch.cat([tiny, tiny | fmt.sign_bit])
    # Every binade's first and last pattern (rsqrt's seed and correction over all exponents).
    fields = torch.arange(1, fmt.exp_max) << fmt.man_bits
    binades = torch.cat([fields, fields | ((1 << fmt.man_bits) - 1)])
    binades = torch.cat([binades, binades | fmt.sign_bit])
    random = fp.random_bits(random_count, fmt, generator)
    values = torch.rand(random_count // 2, generator=generator, dtype=torch.float64) * 140 - 40
    return torch.cat([fp.special_values(fmt), near, tiny, binades, random, fp.encode(values, fmt)])


def write_case(path, *, name: str, array, x, runs: dict) -> str:
    """Write one stimulus file for the cocotb test: inputs ``x`` (int64 bit patterns), the array's payload
    offsets, and per program (``runs``: name -> ``(program, expected_passes)``, the golden result of
    every pass) its passes and expected results. All programs run on the same inputs, in order."""
    offsets = {key: _field(array.layouts.operands, key)[0] for key in
               ("mode", "op", "function", "broadcast_a", "broadcast_b", "broadcast_c", "a", "b", "c")}
    offsets["result"] = _field(array.layouts.results, "result")[0]
    arrays, names = {"x": np.asarray(x, dtype=np.int64)}, []
    width = None
    for program_name, (program, expected_passes) in runs.items():
        passes = []
        for step in program.passes:
            row = [int(step.op), int(step.function or 0)]
            for operand in (step.a, step.b, step.c):
                if operand is None:
                    row += [_KINDS["constant"], 0]
                else:
                    row += [_KINDS[operand.kind], operand.index if operand.kind == "result" else operand.bits]
            passes.append(row)
        arrays[f"passes_{program_name}"] = np.array(passes, dtype=np.int64)
        arrays[f"expected_{program_name}"] = np.stack([np.asarray(e, dtype=np.int64) for e in expected_passes])
        names.append(program_name)
        width = program.fmt.width
    arrays["meta"] = np.array(json.dumps({"name": name, "width": width, "lanes": array.lanes,
                                          "offsets": offsets, "programs": names}))
    np.savez(path, **arrays)
    return str(path)


def _pack(values: np.ndarray, width: int) -> list[int]:
    """Rows of ``values`` [beats, lanes] as little-endian integers."""
    dtype = {16: "<u2", 32: "<u4"}.get(width)
    if dtype is not None:
        raw = values.astype(dtype).tobytes()
        step = values.shape[1] * width // 8
        return [int.from_bytes(raw[i:i + step], "little") for i in range(0, len(raw), step)]
    return [sum(int(v) << (lane * width) for lane, v in enumerate(row)) for row in values]


def _unpack(word: int, width: int, lanes: int) -> np.ndarray:
    dtype = {16: "<u2", 32: "<u4"}.get(width)
    word &= (1 << (width * lanes)) - 1
    if dtype is not None:
        return np.frombuffer(word.to_bytes(width * lanes // 8, "little"), dtype=dtype).astype(np.int64)
    return np.array([(word >> (lane * width)) & ((1 << width) - 1) for lane in range(lanes)], dtype=np.int64)


try:
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import RisingEdge
except ImportError:  # pragma: no cover - cocotb is a test dependency
    cocotb = None

if cocotb is not None:

    @cocotb.test()
    async def test_nonlinear_programs(dut):
        """Run every case file named in ``tb_params()["cases"]``; every pass must match bit for bit."""
        from marca.sim import tb_params
        params = tb_params()
        Clock(dut.clk, 10, unit="ns").start()
        dut.rst.value = 1
        dut.i__valid.value = 0
        dut.o__ready.value = 1
        for _ in range(3):
            await RisingEdge(dut.clk)
        dut.rst.value = 0
        failures = []
        for path in params["cases"]:
            failures += await _run_case(dut, path)
        assert not failures, "\n".join(failures)

    async def _stream(dut, words: list[int]) -> list[int]:
        """Send ``words`` as operand beats, one per cycle, and return the result payloads.

        Element-wise beats with ``o.ready`` held high never stall the array (docs/pe_array.md), so the
        loop samples the registered outputs right after each clock edge instead of waiting for ReadOnly
        (half the simulator round trips); ``i.ready`` is checked on every cycle and a stall fails the
        test rather than being silently absorbed."""
        outputs, next_beat, cycles = [], 0, 0
        limit = len(words) + 64
        while len(outputs) < len(words) and cycles < limit:
            await RisingEdge(dut.clk)
            cycles += 1
            if next_beat and not dut.i__ready.value:
                raise AssertionError(f"the array stalled an element-wise beat (beat {next_beat})")
            if dut.o__valid.value:
                outputs.append(int(dut.o__payload.value))
            if next_beat < len(words):
                dut.i__payload.value = words[next_beat]
                dut.i__valid.value = 1
                next_beat += 1
            else:
                dut.i__valid.value = 0
        return outputs

    async def _run_case(dut, path) -> list[str]:
        case = np.load(path, allow_pickle=False)
        meta = json.loads(str(case["meta"]))
        width, lanes, offsets, name = meta["width"], meta["lanes"], meta["offsets"], meta["name"]
        x = case["x"]
        count = len(x)
        beats = -(-count // lanes)
        padded = np.zeros(beats * lanes, dtype=np.int64)
        padded[:count] = x
        # A pass identical to one already run on the same inputs (same op, function and operands, down to
        # the input) is not run twice: softplus starts with exactly the exp program's passes.
        computed = {}
        for program_name in meta["programs"]:
            expected = case[f"expected_{program_name}"]
            steps = case[f"passes_{program_name}"].tolist()
            signatures, results = [], []
            started, streamed = time.monotonic(), 0
            for number, (op, function, *operands) in enumerate(steps):
                pairs = list(zip(operands[0::2], operands[1::2]))
                signature = (op, function) + tuple(
                    signatures[value] if kind == _KINDS["result"] else (kind, value) for kind, value in pairs)
                signatures.append(signature)
                if signature not in computed:
                    computed[signature] = await _run_pass(dut, op, function, pairs, padded, results, beats,
                                                          lanes, width, offsets)
                    streamed += 1
                got = computed[signature]
                results.append(got)
                wrong = np.nonzero(got[:count] != expected[number])[0]
                if len(wrong):
                    first = wrong[0]
                    message = (f"{name}/{program_name}: pass {number} ({ElementwiseOp(op).name}, function "
                               f"{function}): {len(wrong)} of {count} lanes differ; first x={int(x[first]):#x} "
                               f"got {int(got[first]):#x} expected {int(expected[number][first]):#x}")
                    return [message]
            dut._log.info("%s/%s: %d elements, %d passes (%d streamed, %d beats), %.1f s", name, program_name,
                          count, len(steps), streamed, streamed * beats, time.monotonic() - started)
        return []

    async def _run_pass(dut, op, function, pairs, padded, results, beats, lanes, width, offsets):
        control = ((int(ArrayMode.ELEMENTWISE) << offsets["mode"]) | (op << offsets["op"])
                   | (function << offsets["function"]))
        fields = []
        for slot, (kind, value) in zip("abc", pairs):
            if kind == _KINDS["constant"]:
                control |= int(Broadcast.SCALAR) << offsets[f"broadcast_{slot}"]
                control |= value << offsets[slot]                 # element 0 feeds every lane
                fields.append(None)
            else:
                control |= int(Broadcast.LANE) << offsets[f"broadcast_{slot}"]
                source = padded if kind == _KINDS["input"] else results[value]
                fields.append(_pack(source.reshape(beats, lanes), width))
        words = []
        for beat in range(beats):
            word = control
            for slot, packed in zip("abc", fields):
                if packed is not None:
                    word |= packed[beat] << offsets[slot]
            words.append(word)
        outputs = await _stream(dut, words)
        if len(outputs) != beats:
            raise AssertionError(f"{len(outputs)} result beats for {beats} operand beats")
        return np.concatenate([_unpack(word >> offsets["result"], width, lanes) for word in outputs])
