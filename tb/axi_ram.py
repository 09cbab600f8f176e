"""cocotbext-axi helpers shared by the testbenches: an AxiRam whose accesses beyond its image (or in a chosen
region) answer SLVERR, and random pause generators for every channel."""

import logging
import random

from cocotbext.axi import AxiRam

__all__ = ["FaultyAxiRam", "random_pauses", "pause_all_channels"]


def random_pauses(rng: random.Random, probability: float):
    """An endless generator: True (pause) with ``probability`` each cycle."""
    while True:
        yield rng.random() < probability


class FaultyAxiRam(AxiRam):
    """AxiRam whose word accesses in ``[fault[0], fault[1])`` answer SLVERR (reads return zeros, writes are
    dropped): a memory image of ``image_bytes`` bytes is modelled with ``fault = (image_bytes, 2**64)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fault = (0, 0)
        ram = self

        async def read(address, length, _original=self.read_if._read):
            if ram.fault[0] <= address < ram.fault[1]:
                raise OSError("fault")
            return await _original(address, length)

        async def write(address, data, _original=self.write_if._write):
            if ram.fault[0] <= address < ram.fault[1]:
                raise OSError("fault")
            return await _original(address, data)

        self.read_if._read = read
        self.write_if._write = write
        for interface in (self.write_if, self.read_if):
            interface.log.setLevel(logging.ERROR)


def pause_all_channels(ram: AxiRam, rng: random.Random, probability: float) -> None:
    """Random pauses on AW, W, B, AR and R of ``ram``."""
    if not probability:
        return
    for channel in (ram.write_if.aw_channel, ram.write_if.w_channel, ram.write_if.b_channel,
                    ram.read_if.ar_channel, ram.read_if.r_channel):
        channel.set_pause_generator(random_pauses(random.Random(rng.random()), probability))
