"""Host tool: talks to the board top's UART bridge, loads a program and memory image, runs the accelerator,
reads the results back and compares them with the golden model.

The protocol logic is written once, as ``async`` code over a :class:`Transport`:

* :class:`SerialTransport` (pyserial) drives a real board. Its methods block and never suspend, so the
  command line runs the same coroutines with :func:`asyncio.run`.
* ``marca.tb.board.SimUartTransport`` drives the board top in Verilator under cocotb: it wiggles the
  simulated UART pins and waits in simulated time.

Command line::

    python -m marca.fpga.host --port /dev/ttyUSB0 identify
    python -m marca.fpga.host --port /dev/ttyUSB0 run --config fpga-small --image memory.bin \\
        --program-address 0x8000 --compare 0x4000:0x1000 [--expect golden.bin | --golden]
    python -m marca.fpga.host --port /dev/ttyUSB0 run --config fpga-small --random-program 7
    python -m marca.fpga.host --port /dev/ttyUSB0 run --config fpga-small --mamba 1

Errors are exceptions derived from :class:`HostError`, each with a message that says what to check:
:class:`LinkTimeout` (no or short reply), :class:`FramingError` (the board saw a corrupt byte, or the reply
was malformed), :class:`BridgeError` (the bridge refused a request: address, bad command, CSR response),
:class:`AcceleratorError` (the accelerator stopped with an error code), :class:`AcceleratorTimeout` (it
did not finish in time) and :class:`ResultMismatch` (results differ from the golden model).
"""

import abc
import argparse
import asyncio
import dataclasses
import struct
import sys
import time
from pathlib import Path

from .uart import IDENTIFY_MAGIC, PROTOCOL_VERSION, Command, Status

__all__ = [
    "HostError", "LinkTimeout", "FramingError", "BridgeError", "AcceleratorError", "AcceleratorTimeout",
    "ResultMismatch", "Transport", "SerialTransport", "BoardLink", "RunResult", "run_program",
    "compare_memory", "golden_image", "MambaBlock", "mamba_block", "main",
]

# Words per READ_MEM / WRITE_MEM request: small enough that a lost reply is noticed quickly, large enough
# that USB round trips do not dominate (1 KiB is ~10 ms at 1 Mbaud).
CHUNK_WORDS = 256


class HostError(RuntimeError):
    """Base of every host tool error."""


class LinkTimeout(HostError):
    """The board did not answer (in full) in time."""


class FramingError(HostError):
    """A corrupt byte: the board saw a bad stop bit, or the reply did not have the protocol's shape."""


class BridgeError(HostError):
    """The bridge answered a request with an error status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class AcceleratorError(HostError):
    """The accelerator ended a run with an error code."""

    def __init__(self, message: str, code: int, pc: int):
        super().__init__(message)
        self.code = code
        self.pc = pc


class AcceleratorTimeout(HostError):
    """The accelerator was still busy when the run's time limit passed."""


class ResultMismatch(HostError):
    """Memory read back from the board differs from the expected (golden) image."""

    def __init__(self, message: str, mismatches: list):
        super().__init__(message)
        self.mismatches = mismatches


class Transport(abc.ABC):
    """A byte pipe to the board's UART, with the clock the timeouts are measured on."""

    #: Seconds one byte takes on the wire (10 bits); replies get this much time per byte, with margin.
    byte_seconds: float
    #: Seconds allowed for a reply to begin (host and USB latency, bridge work).
    latency_seconds: float

    @abc.abstractmethod
    async def send(self, data: bytes) -> None:
        """Send ``data``."""

    @abc.abstractmethod
    async def receive(self, count: int, timeout: float) -> bytes:
        """Up to ``count`` bytes; fewer only when ``timeout`` seconds passed first."""

    @abc.abstractmethod
    async def sleep(self, seconds: float) -> None:
        """Wait (real time for a board, simulated time in simulation)."""

    @abc.abstractmethod
    def now(self) -> float:
        """Seconds on the transport's clock."""

    async def discard_input(self, quiet_seconds: float) -> bytes:
        """Read and drop bytes until none arrive for ``quiet_seconds``; return what was dropped."""
        dropped = bytearray()
        while True:
            chunk = await self.receive(1, quiet_seconds)
            if not chunk:
                return bytes(dropped)
            dropped += chunk


class SerialTransport(Transport):
    """The board over a serial port (pyserial), e.g. ``/dev/ttyUSB0`` for the ULX3S's FT231X."""

    def __init__(self, port: str, *, baud: int = 1_000_000, latency_seconds: float = 0.1):
        try:
            import serial
        except ImportError:  # pragma: no cover - depends on the installation
            raise HostError("pyserial is not installed: `pip install marca[fpga]` "
                            "(or `pip install pyserial`)") from None
        try:
            self._serial = serial.Serial(port, baudrate=baud, bytesize=8, parity="N", stopbits=1,
                                         timeout=0.05)
        except serial.SerialException as error:
            raise HostError(f"cannot open serial port {port!r}: {error}") from None
        self.byte_seconds = 10 / baud
        self.latency_seconds = latency_seconds

    async def send(self, data: bytes) -> None:
        self._serial.write(data)
        self._serial.flush()

    async def receive(self, count: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        data = bytearray()
        while len(data) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._serial.timeout = min(remaining, 0.5)
            data += self._serial.read(count - len(data))
        return bytes(data)

    async def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def now(self) -> float:
        return time.monotonic()

    def close(self) -> None:
        self._serial.close()


_STATUS_MEANING = {
    Status.SLVERR: "the accelerator's CSR port answered SLVERR",
    Status.DECERR: "no CSR at that address (DECERR)",
    Status.ADDRESS_ERROR: "address misaligned or outside the board's memory",
    Status.BAD_COMMAND: "the bridge did not recognize the command (corrupted byte or protocol mismatch)",
    Status.FRAMING_ERROR: "the board received a byte with a bad stop bit: check the baud rate and cable",
    Status.FRAME_TIMEOUT: "the request stopped arriving half-way",
    Status.OVERRUN: "the board lost received bytes (receive queue full)",
}


class BoardLink:
    """The bridge protocol (docs/fpga.md, :mod:`marca.fpga.uart`) over a :class:`Transport`.

    Parameters
    ----------
    transport : Transport
    resync_seconds : float
        How long the line must stay quiet for the bridge to drop a broken request (its
        ``frame_timeout_cycles``); waited out after a framing error before the next request.
    """

    def __init__(self, transport: Transport, *, resync_seconds: float = 0.06):
        self.transport = transport
        self.resync_seconds = resync_seconds
        self.memory_bytes = None

    async def _request(self, request: bytes, reply_bytes: int, what: str) -> bytes:
        """Send ``request``; return the reply's ``reply_bytes`` payload bytes after checking its status."""
        transport = self.transport
        await transport.send(request)
        timeout = transport.latency_seconds + 2 * (reply_bytes + 1 + len(request)) * transport.byte_seconds
        reply = await transport.receive(reply_bytes + 1, timeout)
        if len(reply) < reply_bytes + 1:
            # A short reply that ends in an error status is the bridge rejecting the request early.
            if reply and reply[-1] in (Status.FRAMING_ERROR, Status.BAD_COMMAND):
                await self._resync()
                self._raise_status(reply[-1], what)
            raise LinkTimeout(f"{what}: the board answered {len(reply)} of {reply_bytes + 1} bytes within "
                              f"{timeout:.3g} s; is the board programmed, the port right, the baud rate "
                              f"{round(10 / transport.byte_seconds)}?")
        status = reply[-1]
        if status != Status.OK:
            if status in (Status.FRAMING_ERROR, Status.BAD_COMMAND):
                await self._resync()
            self._raise_status(status, what)
        return reply[:-1]

    async def _resync(self) -> None:
        await self.transport.sleep(self.resync_seconds)
        await self.transport.discard_input(self.resync_seconds)

    @staticmethod
    def _raise_status(status: int, what: str):
        try:
            name = Status(status).name
        except ValueError:
            raise FramingError(f"{what}: reply ends in 0x{status:02x}, which is no status: the reply was "
                               f"corrupted or the board runs another protocol") from None
        if status in (Status.FRAMING_ERROR, Status.BAD_COMMAND):
            raise FramingError(f"{what}: {name}: {_STATUS_MEANING[status]}")
        raise BridgeError(f"{what}: {name}: {_STATUS_MEANING.get(status, '')}", status)

    async def identify(self) -> dict:
        """Check that a marca bridge of this protocol version answers; return its description."""
        reply = await self._request(bytes([Command.IDENTIFY]), 8, "IDENTIFY")
        if reply[:4] != IDENTIFY_MAGIC:
            raise FramingError(f"IDENTIFY: the board answered {reply!r}, not a marca bridge")
        if reply[4] != PROTOCOL_VERSION:
            raise HostError(f"IDENTIFY: bridge protocol version {reply[4]}, this host tool speaks "
                            f"{PROTOCOL_VERSION}: rebuild the bitstream or update the host tool")
        self.memory_bytes = 1 << reply[5]
        return {"protocol_version": reply[4], "memory_bytes": self.memory_bytes}

    async def write_memory(self, address: int, data: bytes) -> None:
        """Write ``data`` (padded with zeros to whole words) at byte ``address`` (a multiple of 4)."""
        _check_address(address)
        data = bytes(data) + bytes(-len(data) % 4)
        for offset in range(0, len(data), 4 * CHUNK_WORDS):
            chunk = data[offset:offset + 4 * CHUNK_WORDS]
            words = len(chunk) // 4
            request = struct.pack("<BIH", Command.WRITE_MEM, address + offset, words - 1) + chunk
            await self._request(request, 0, f"WRITE_MEM 0x{address + offset:08x} ({words} words)")

    async def read_memory(self, address: int, length: int) -> bytes:
        """``length`` bytes from byte ``address`` (a multiple of 4)."""
        _check_address(address)
        words_total = (length + 3) // 4
        data = bytearray()
        for first in range(0, words_total, CHUNK_WORDS):
            words = min(CHUNK_WORDS, words_total - first)
            request = struct.pack("<BIH", Command.READ_MEM, address + 4 * first, words - 1)
            data += await self._request(request, 4 * words, f"READ_MEM 0x{address + 4 * first:08x} "
                                                            f"({words} words)")
        return bytes(data[:length])

    async def read_csr(self, address: int) -> int:
        reply = await self._request(struct.pack("<BI", Command.READ_CSR, address), 4,
                                    f"READ_CSR 0x{address:x}")
        return int.from_bytes(reply, "little")

    async def write_csr(self, address: int, value: int) -> None:
        await self._request(struct.pack("<BII", Command.WRITE_CSR, address, value & 0xFFFF_FFFF), 0,
                            f"WRITE_CSR 0x{address:x}")


def _check_address(address: int) -> None:
    if address < 0 or address % 4:
        raise ValueError(f"memory address must be a non-negative multiple of 4, not 0x{address:x}")


@dataclasses.dataclass
class RunResult:
    """What a run left: the regions read back, the counters, and the time it took on the board."""

    regions: dict          # address -> bytes read back
    counters: list         # 64-bit performance counters in CSR order
    polls: int
    seconds: float         # on the transport's clock, from start to done


async def run_program(link: BoardLink, *, image: bytes, program_address: int,
                      read_back: list[tuple[int, int]], timeout_seconds: float = 10.0,
                      poll_seconds: float = 0.001, image_address: int = 0,
                      verify_load: bool = False) -> RunResult:
    """Load ``image`` (which holds the program at ``program_address``), start, wait, read back.

    ``read_back`` lists ``(address, length)`` regions to read after the run. Raises
    :class:`AcceleratorError` if the run ends with an error code, :class:`AcceleratorTimeout` if it does
    not end within ``timeout_seconds`` (on the transport's clock). ``verify_load`` reads the image back
    before starting (doubles the load time; for doubtful links).
    """
    from marca.hw.csr import ID_VALUE, REGISTERS, counter_offset

    info = await link.identify()
    end = image_address + len(image)
    if end > info["memory_bytes"]:
        raise HostError(f"the memory image ends at 0x{end:x}, past the board's {info['memory_bytes']} "
                        f"bytes of memory: build the bitstream with more --memory-kib")
    for address, length in read_back:
        if address + length > info["memory_bytes"]:
            raise HostError(f"read-back region 0x{address:x}+{length} is outside the board's memory")
    identity = await link.read_csr(REGISTERS["ID"])
    if identity != ID_VALUE:
        raise HostError(f"the accelerator's ID register reads 0x{identity:08x}, not 0x{ID_VALUE:08x}: "
                        f"is this a link-test bitstream?")
    status = await link.read_csr(REGISTERS["STATUS"])
    if status & 1:
        raise HostError("the accelerator is busy before the run: reset the board (or write soft_reset)")

    await link.write_memory(image_address, image)
    if verify_load:
        loaded = await link.read_memory(image_address, len(image))
        if loaded != bytes(image):
            first = next(index for index, (a, b) in enumerate(zip(loaded, image)) if a != b)
            raise HostError(f"memory load verification failed: byte 0x{image_address + first:x} reads "
                            f"0x{loaded[first]:02x}, written 0x{image[first]:02x}")
    await link.write_csr(REGISTERS["PROGRAM_LO"], program_address & 0xFFFF_FFFF)
    await link.write_csr(REGISTERS["PROGRAM_HI"], program_address >> 32)
    started = link.transport.now()
    await link.write_csr(REGISTERS["CONTROL"], 1)
    polls = 0
    while True:
        status = await link.read_csr(REGISTERS["STATUS"])
        polls += 1
        if not status & 1 and status & 2:
            break
        if link.transport.now() - started > timeout_seconds:
            raise AcceleratorTimeout(f"the accelerator is still busy after {timeout_seconds:g} s "
                                     f"(STATUS 0x{status:x}, {polls} polls)")
        await link.transport.sleep(poll_seconds)
    seconds = link.transport.now() - started
    if status & 4:
        from marca.isa import ErrorCode
        code = await link.read_csr(REGISTERS["ERROR_CODE"])
        pc = await link.read_csr(REGISTERS["ERROR_PC"])
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"unknown error code {code}"
        raise AcceleratorError(f"the accelerator stopped with {name} (code {code}) at instruction "
                               f"address 0x{pc:x}", code, pc)
    counters = []
    for index in range(await link.read_csr(REGISTERS["COUNTER_COUNT"])):
        low = await link.read_csr(counter_offset(index))
        high = await link.read_csr(counter_offset(index) + 4)
        counters.append(low | high << 32)
    regions = {address: await link.read_memory(address, length) for address, length in read_back}
    return RunResult(regions=regions, counters=counters, polls=polls, seconds=seconds)


def compare_memory(regions: dict, expected: bytes, *, expected_address: int = 0, limit: int = 10) -> None:
    """Raise :class:`ResultMismatch` listing the first ``limit`` differing 32-bit words."""
    mismatches = []
    total = 0
    for address, data in regions.items():
        want = expected[address - expected_address:address - expected_address + len(data)]
        if len(want) != len(data):
            raise HostError(f"the expected image does not cover 0x{address:x}+{len(data)}")
        for offset in range(0, len(data), 4):
            got_word, want_word = data[offset:offset + 4], want[offset:offset + 4]
            if got_word != want_word:
                total += 1
                if len(mismatches) < limit:
                    mismatches.append((address + offset, got_word.hex(), want_word.hex()))
    if total:
        lines = "\n".join(f"  0x{address:08x}: board {got} expected {want}"
                          for address, got, want in mismatches)
        raise ResultMismatch(f"{total} word(s) differ from the golden model:\n{lines}", mismatches)


def golden_image(config, image: bytes, program_address: int) -> bytes:
    """The memory image the golden instruction-set simulator leaves after running ``image``."""
    from marca.golden.iss import run_program as golden_run

    result, machine = golden_run(config, image, program_address)
    if result.error:
        raise HostError(f"the golden model itself stops with {result.error.name}: {result.message}")
    return bytes(machine.memory_bytes())


@dataclasses.dataclass
class MambaBlock:
    """A tiny Mamba block ready to load: the memory image (program, weights, tokens, zero states), where
    its program starts and the regions it writes (outputs, conv state, SSM state)."""

    image: bytes
    program_address: int
    regions: list
    instructions: int

    D_MODEL, D_STATE, LENGTH = 16, 4, 4

    def describe(self, seed: int) -> str:
        return (f"Mamba block (d_model {self.D_MODEL}, d_state {self.D_STATE}, {self.LENGTH} tokens, seed {seed}): "
                f"{self.instructions} instructions, image {len(self.image)} bytes")


def mamba_block(config, seed: int) -> MambaBlock:
    """The compiler's prefill program for one d_model 16, d_state 4 mixer over 4 tokens, with random
    weights and tokens from ``seed``."""
    from marca.tb import mamba

    prepared = mamba.prepare(mamba.MixerCase(name=f"block-{seed}", config=config, d_model=MambaBlock.D_MODEL,
                                             d_state=MambaBlock.D_STATE, length=MambaBlock.LENGTH, seed=seed,
                                             decode=False))
    compiled = prepared.prefill
    regions = [(place.address, place.rows * place.row_stride)
               for place in (compiled.output, compiled.conv_state, compiled.ssm_state)]
    return MambaBlock(prepared.prefill_image, compiled.program_address, regions, len(compiled.instructions))


def resolve_config(value: str):
    """A preset name or a config.json path."""
    from marca.config import MarcaConfig, preset
    return MarcaConfig.load(value) if value.endswith(".json") else preset(value)


def _parse_region(text: str) -> tuple[int, int]:
    try:
        address, length = text.split(":")
        return int(address, 0), int(length, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a region is ADDRESS:LENGTH (e.g. 0x4000:0x100), not {text!r}")


async def _main_async(args) -> int:
    transport = SerialTransport(args.port, baud=args.baud)
    link = BoardLink(transport)
    try:
        if args.command == "identify":
            print(await link.identify())
            return 0
        if args.random_program is not None:
            from marca.golden.random_program import random_program
            program = random_program(resolve_config(args.config), seed=args.random_program, length=40)
            image, program_address = program.memory, program.program_address
            args.golden = True
            print(f"random program {args.random_program}: {len(program.instructions)} instructions, "
                  f"image {len(image)} bytes")
        elif args.mamba is not None:
            block = mamba_block(resolve_config(args.config), args.mamba)
            image, program_address = block.image, block.program_address
            args.golden = True
            args.compare = args.compare or block.regions
            print(block.describe(args.mamba))
        else:
            if args.image is None or args.program_address is None:
                raise HostError("run needs --image and --program-address (or --random-program SEED, --mamba SEED)")
            image, program_address = Path(args.image).read_bytes(), args.program_address
        regions = args.compare or [(0, len(image))]
        if args.golden:
            expected = golden_image(resolve_config(args.config), image, program_address)
        elif args.expect:
            expected = Path(args.expect).read_bytes()
        else:
            expected = None
        result = await run_program(link, image=image, program_address=program_address, read_back=regions,
                                   timeout_seconds=args.timeout, verify_load=args.verify_load)
        print(f"run finished in {result.seconds * 1e3:.1f} ms ({result.polls} polls); "
              f"counters {result.counters}")
        if args.dump:
            for address, data in result.regions.items():
                Path(f"{args.dump}_{address:08x}.bin").write_bytes(data)
        if expected is not None:
            compare_memory(result.regions, expected)
            print(f"results match the golden model ({sum(len(d) for d in result.regions.values())} bytes)")
        return 0
    finally:
        transport.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marca.fpga.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyUSB0")
    parser.add_argument("--baud", type=int, default=1_000_000)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("identify", help="check the link and print the bridge's description")
    run = commands.add_parser("run", help="load a memory image, run its program, compare the results")
    run.add_argument("--config", default="fpga-small",
                     help="preset or config.json the bitstream was built for (for --golden)")
    run.add_argument("--image", help="memory image (raw bytes loaded at address 0)")
    run.add_argument("--program-address", type=lambda text: int(text, 0),
                     help="byte address of the program's first instruction in the image")
    run.add_argument("--random-program", type=int, metavar="SEED",
                     help="instead of --image: a constrained-random program for --config, "
                          "checked with --golden")
    run.add_argument("--mamba", type=int, metavar="SEED",
                     help="instead of --image: a tiny Mamba block (the compiler's prefill program for a "
                          "d_model 16, d_state 4 mixer over 4 tokens, random weights from SEED), its outputs "
                          "and states checked with --golden")
    run.add_argument("--compare", type=_parse_region, action="append",
                     help="ADDRESS:LENGTH region to read back and compare (repeatable; default: all)")
    run.add_argument("--expect", help="expected memory image after the run (raw bytes from address 0)")
    run.add_argument("--golden", action="store_true", help="compute the expected image with the golden ISS")
    run.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the run")
    run.add_argument("--dump", help="write each region read back to DUMP_<address>.bin")
    run.add_argument("--verify-load", action="store_true", help="read the image back before starting")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_main_async(args))
    except (HostError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
