"""The replay (golden/replay.py) against the golden ISS it replays: equal memory images, buffers, written
flags and counters on random programs of every 16-bit configuration and on the trained model's compiled
prefill and decode programs; a replay with a wrong op, rounding or bias differs; out-of-scope machines and
failing GATHERs raise."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from marca.config import DEFAULT, FPGA_MEDIUM, FPGA_SMALL, TINY
from marca.golden import iss, replay
from marca.golden.random_program import random_program
from marca.golden.replay import Trace
from marca.isa import Buffer

MIXED = dataclasses.replace(TINY, name="fp16-compute-bf16-storage", storage_format="bf16")
CONFIGS = [TINY, FPGA_SMALL, FPGA_MEDIUM, MIXED]


def assert_same(expected: iss.Machine, got: iss.Machine, what: str) -> None:
    assert expected.memory_bytes() == got.memory_bytes(), f"{what}: memory images differ"
    for buffer in Buffer:
        assert torch.equal(expected.buffer_bits(buffer), got.buffer_bits(buffer)), f"{what}: {buffer.name}"
        assert np.array_equal(expected.written[buffer], got.written[buffer]), f"{what}: {buffer.name} flags"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_random_programs_replay_equal_iss(config):
    """12 random programs per configuration (every instruction class, specials in the data): the ISS
    runs each, its trace replays on a fresh machine of the same image."""
    for seed in range(12):
        generated = random_program(config, seed=7000 + seed, length=20 + 2 * seed)
        expected = iss.Machine(config, generated.memory)
        result = expected.run(generated.program_address)
        assert result.error.name == "NONE", result
        trace = Trace(config, generated.instructions, result.counters)
        got = iss.Machine(config, generated.memory)
        assert trace.run(got) == result.counters
        assert_same(expected, got, f"{config.name} seed {seed}")


@pytest.fixture(scope="module", params=[FPGA_SMALL, TINY], ids=lambda c: c.name)
def model(request):
    """The committed trained byte model compiled for a 2x2 preset: a prefill of 4 tokens and a decode
    step (~80,000 and ~19,000 instructions)."""
    from marca.compiler import compile_model
    from marca.reference.charlm import CHECKPOINT_DIR, load_checkpoint
    return compile_model(load_checkpoint(CHECKPOINT_DIR), None, request.param, prompt_length=4, logits="all")


def test_model_programs_replay_equal_iss(model):
    """Two prefill chunks and two decode steps: the replaying session (ISS on each program's first run,
    replay after) equals a plain ISS session in logits, memory, buffers and counters after every step."""
    generator = torch.Generator().manual_seed(3)
    plain, replaying = model.session(), model.session(replay=True)
    for step in ("prefill", "prefill", "decode", "decode"):
        if step == "prefill":
            ids = torch.randint(0, 256, (4,), generator=generator)
            expected, got = plain.prefill(ids), replaying.prefill(ids)
        else:
            token = int(torch.randint(0, 256, (1,), generator=generator))
            expected, got = plain.decode(token), replaying.decode(token)
        assert torch.equal(expected, got), step
        assert_same(plain.machine, replaying.machine, step)
        assert plain.steps[-1] == replaying.steps[-1]
    assert set(replaying._traces) == {"prefill", "decode"}


@pytest.fixture(scope="module")
def recorded():
    """fpga-small's decode step recorded by a replaying session: (session, memory image before the step,
    the image after the ISS ran it)."""
    from marca.compiler import compile_model
    from marca.reference.charlm import CHECKPOINT_DIR, load_checkpoint
    compiled = compile_model(load_checkpoint(CHECKPOINT_DIR), None, FPGA_SMALL, prompt_length=4, logits="all")
    session = compiled.session(replay=True)
    session.prefill(torch.arange(4))
    state = session.memory
    session.decode(5)
    return session, state, session.memory


@pytest.mark.parametrize("fault", [None, "ADD computed as SUB", "one significant bit fewer",
                                   "LINEAR bias ignored"])
def test_broken_replay_is_caught(recorded, fault):
    """The recorded decode step replayed as recorded leaves the ISS's memory image; replayed with one
    thing wrong, it does not."""
    session, state, expected = recorded
    trace = copy.copy(session._traces["decode"])
    trace.meta, trace.rounding = trace.meta.copy(), trace.rounding.copy()
    if fault == "ADD computed as SUB":
        rows = (trace.meta[:, 0] == replay._ELEMENTWISE) & (trace.meta[:, 3] == 2)
        assert rows.any()
        trace.meta[rows, 3] = 3
    elif fault == "one significant bit fewer":
        trace.rounding[1, 0] += 1
    elif fault == "LINEAR bias ignored":
        rows = (trace.meta[:, 0] == replay._LINEAR) & (trace.meta[:, 8] == 1)
        assert rows.any()
        trace.meta[rows, 8] = 0
    original = session._traces["decode"]
    session.machine.write_memory(0, state)
    session._traces["decode"] = trace
    try:
        session.decode(5)
    finally:
        session._traces["decode"] = original
    assert (session.memory == expected) == (fault is None)


def test_out_of_scope_machines_raise():
    generated = random_program(DEFAULT, seed=1, length=10)
    with pytest.raises(ValueError, match="compute_format is 32-bit"):
        Trace(DEFAULT, generated.instructions, {})
    tiny = random_program(TINY, seed=1, length=10)
    machine = iss.Machine(TINY, tiny.memory)
    result = machine.run(tiny.program_address)
    with pytest.raises(ValueError, match="configuration"):
        Trace(TINY, tiny.instructions, result.counters).run(iss.Machine(FPGA_SMALL, tiny.memory))


def test_failing_gather_raises(recorded):
    """A token id outside the embedding table (the ISS stops with INDEX_RANGE): the replay raises."""
    session, state, _ = recorded
    session.machine.write_memory(0, state)
    with pytest.raises(RuntimeError, match="GATHER"):
        session.prefill(torch.full((4,), 4000))
