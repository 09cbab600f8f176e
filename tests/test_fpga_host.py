"""Fast tests of the host tool (fpga/host.py) against a Python model of the board's bridge protocol.

The model (:class:`ModelBoard`) answers requests the way docs/fpga.md specifies and can be told to
misbehave (stay silent, corrupt a reply, report a framing error, run forever, stop with an error code), so
every error path of the host tool is exercised without hardware or a simulator. The same host code runs
against the RTL in tests/test_fpga_board.py.
"""

import asyncio
import struct

import pytest

from marca.fpga import host
from marca.fpga.uart import IDENTIFY_MAGIC, PROTOCOL_VERSION, Command, Status
from marca.hw.csr import ID_VALUE, REGISTERS, counter_offset


class ModelBoard(host.Transport):
    """The bridge protocol over a bytearray memory and a model of the accelerator's CSRs."""

    byte_seconds = 1e-5
    latency_seconds = 1e-3

    def __init__(self, memory_bytes=4096, *, busy_polls=2, error_code=0, effect=None):
        self.memory = bytearray(memory_bytes)
        self.memory_bytes = memory_bytes
        self.registers = {REGISTERS["STATUS"]: 0, REGISTERS["ID"]: ID_VALUE, REGISTERS["COUNTER_COUNT"]: 2,
                          REGISTERS["PROGRAM_LO"]: 0, REGISTERS["PROGRAM_HI"]: 0, REGISTERS["ERROR_CODE"]: 0,
                          REGISTERS["ERROR_PC"]: 0, counter_offset(0): 1234, counter_offset(0) + 4: 0,
                          counter_offset(1): 5, counter_offset(1) + 4: 1}
        self.busy_polls, self.error_code, self.effect = busy_polls, error_code, effect
        self.pending = bytearray()
        self.replies = bytearray()
        self.clock = 0.0
        self.silent = False          # swallow requests without answering
        self.corrupt_next = None     # replace the next reply's status byte
        self.starts = 0

    async def send(self, data):
        self.pending += data
        while self.pending and not self.silent:
            if not self._execute():
                break

    def _execute(self) -> bool:
        request = self.pending
        opcode = request[0]
        sizes = {Command.IDENTIFY: 1, Command.READ_MEM: 7, Command.READ_CSR: 5, Command.WRITE_CSR: 9}
        if opcode == Command.WRITE_MEM:
            if len(request) < 7:
                return False
            size = 7 + 4 * (struct.unpack_from("<H", request, 5)[0] + 1)
        elif opcode in sizes:
            size = sizes[opcode]
        else:
            self._reply(b"", Status.BAD_COMMAND)
            self.pending.clear()
            return False
        if len(request) < size:
            return False
        frame = bytes(request[:size])
        del request[:size]
        if opcode == Command.IDENTIFY:
            self._reply(IDENTIFY_MAGIC + bytes([PROTOCOL_VERSION, self.memory_bytes.bit_length() - 1, 0, 0]))
        elif opcode in (Command.READ_MEM, Command.WRITE_MEM):
            address, words = struct.unpack_from("<IH", frame, 1)
            length = 4 * (words + 1)
            ok = address % 4 == 0 and address + length <= self.memory_bytes
            if opcode == Command.READ_MEM:
                self._reply(bytes(self.memory[address:address + length]) if ok else bytes(length),
                            Status.OK if ok else Status.ADDRESS_ERROR)
            else:
                if ok:
                    self.memory[address:address + length] = frame[7:]
                self._reply(b"", Status.OK if ok else Status.ADDRESS_ERROR)
        elif opcode == Command.READ_CSR:
            (address,) = struct.unpack_from("<I", frame, 1)
            if address == REGISTERS["STATUS"] and self.registers[address] & 1:
                self.polls_left -= 1
                if self.polls_left <= 0:
                    self._finish()
            value = self.registers.get(address)
            self._reply(struct.pack("<I", value or 0), Status.OK if value is not None else Status.DECERR)
        else:
            address, value = struct.unpack_from("<II", frame, 1)
            if address == REGISTERS["CONTROL"] and value & 1:
                self.starts += 1
                self.registers[REGISTERS["STATUS"]] = 1
                self.polls_left = self.busy_polls
            elif address in (REGISTERS["PROGRAM_LO"], REGISTERS["PROGRAM_HI"]):
                self.registers[address] = value
            self._reply(b"", Status.OK)
        return True

    def _finish(self):
        if self.error_code:
            self.registers[REGISTERS["ERROR_CODE"]] = self.error_code
            self.registers[REGISTERS["ERROR_PC"]] = 0x40
            self.registers[REGISTERS["STATUS"]] = 0b110
        else:
            if self.effect:
                self.effect(self.memory)
            self.registers[REGISTERS["STATUS"]] = 0b010

    def _reply(self, payload, status=Status.OK):
        if self.corrupt_next is not None:
            status, self.corrupt_next = self.corrupt_next, None
        self.replies += payload + bytes([status])

    async def receive(self, count, timeout):
        taken = bytes(self.replies[:count])
        del self.replies[:count]
        if len(taken) < count:
            self.clock += timeout
        return taken

    async def sleep(self, seconds):
        self.clock += seconds

    def now(self):
        self.clock += 1e-4       # every look at the clock costs a little time, like a real link
        return self.clock


def run(coroutine):
    return asyncio.run(coroutine)


def test_identify_and_memory_round_trip():
    board = ModelBoard(memory_bytes=8192)
    link = host.BoardLink(board)
    assert run(link.identify()) == {"protocol_version": PROTOCOL_VERSION, "memory_bytes": 8192}
    data = bytes(range(256)) * 9 + b"\x01\x02"           # longer than one request chunk, not whole words
    run(link.write_memory(0x100, data))
    assert board.memory[0x100:0x100 + len(data)] == data
    assert run(link.read_memory(0x100, len(data))) == data
    with pytest.raises(ValueError, match="multiple of 4"):
        run(link.read_memory(0x102, 4))


def test_status_errors():
    board = ModelBoard()
    link = host.BoardLink(board)
    with pytest.raises(host.BridgeError, match="ADDRESS_ERROR") as error:
        run(link.read_memory(4092, 8))
    assert error.value.status == Status.ADDRESS_ERROR
    with pytest.raises(host.BridgeError, match="DECERR"):
        run(link.read_csr(0x3C))
    board.corrupt_next = Status.FRAMING_ERROR
    with pytest.raises(host.FramingError, match="bad stop bit"):
        run(link.read_csr(REGISTERS["ID"]))
    board.corrupt_next = 0x5A
    with pytest.raises(host.FramingError, match="no status"):
        run(link.read_csr(REGISTERS["ID"]))
    assert run(link.read_csr(REGISTERS["ID"])) == ID_VALUE     # the link still works


def test_silent_board_times_out():
    board = ModelBoard()
    board.silent = True
    with pytest.raises(host.LinkTimeout, match="answered 0 of 9 bytes"):
        run(host.BoardLink(board).identify())


def test_wrong_device_is_named():
    board = ModelBoard()
    def reply(payload, status=Status.OK):
        board.replies.extend(b"XXXX" + payload[4:] + bytes([status]))

    board._reply = reply
    with pytest.raises(host.FramingError, match="not a marca bridge"):
        run(host.BoardLink(board).identify())


def test_run_program_happy_path_and_mismatch():
    def effect(memory):
        memory[0x200:0x208] = b"\x11" * 8

    board = ModelBoard(effect=effect, busy_polls=3)
    link = host.BoardLink(board)
    image = bytes(0x100) + b"\xAB" * 0x100
    result = run(host.run_program(link, image=image, program_address=0x40,
                                  read_back=[(0x200, 8), (0x100, 4)]))
    assert board.registers[REGISTERS["PROGRAM_LO"]] == 0x40 and board.starts == 1
    assert result.regions == {0x200: b"\x11" * 8, 0x100: b"\xAB" * 4}
    assert result.counters == [1234, 5 | 1 << 32]
    assert result.polls == 3
    expected = bytearray(0x300)
    expected[0x100:0x104] = b"\xAB" * 4
    expected[0x200:0x208] = b"\x11" * 8
    host.compare_memory(result.regions, bytes(expected))
    expected[0x204] ^= 1                                       # one flipped bit must be caught
    with pytest.raises(host.ResultMismatch, match="1 word") as error:
        host.compare_memory(result.regions, bytes(expected))
    assert error.value.mismatches == [(0x204, "11111111", "10111111")]
    assert run(host.run_program(link, image=image, program_address=0x40, read_back=[],
                                verify_load=True)).polls == 3


def test_verify_load_catches_a_bad_memory():
    board = ModelBoard()
    original = board._execute

    def stuck_bit(*args):      # every write sets bit 0 of byte 0x10: a memory fault
        done = original(*args)
        board.memory[0x10] |= 1
        return done

    board._execute = stuck_bit
    with pytest.raises(host.HostError, match="verification failed: byte 0x10 reads 0x01, written 0x00"):
        run(host.run_program(host.BoardLink(board), image=bytes(64), program_address=0, read_back=[],
                             verify_load=True))


def test_run_program_accelerator_error():
    from marca.isa import ErrorCode
    code = next(code for code in ErrorCode if code)
    board = ModelBoard(error_code=int(code))
    with pytest.raises(host.AcceleratorError, match=f"{code.name}.*0x40") as error:
        run(host.run_program(host.BoardLink(board), image=bytes(64), program_address=0, read_back=[]))
    assert error.value.code == code and error.value.pc == 0x40


def test_run_program_timeout_and_checks():
    board = ModelBoard(busy_polls=10**9)
    with pytest.raises(host.AcceleratorTimeout, match="still busy after 0.01 s"):
        run(host.run_program(host.BoardLink(board), image=bytes(64), program_address=0, read_back=[],
                             timeout_seconds=0.01))
    with pytest.raises(host.HostError, match="past the board's 4096 bytes"):
        run(host.run_program(host.BoardLink(ModelBoard()), image=bytes(5000), program_address=0,
                             read_back=[]))
    link_test = ModelBoard()
    link_test.registers[REGISTERS["ID"]] = 0
    with pytest.raises(host.HostError, match="link-test bitstream"):
        run(host.run_program(host.BoardLink(link_test), image=bytes(64), program_address=0, read_back=[]))


def test_cli_reports_a_missing_port(capsys):
    assert host.main(["--port", "/dev/does-not-exist", "identify"]) == 1
    assert "cannot open serial port" in capsys.readouterr().err


def _over_a_pty(board, *commands):
    """Run the host tool's command line once per ``commands`` entry against ``board`` behind a
    pseudo-terminal (the real pyserial transport); returns their exit statuses."""
    import os
    import select
    import threading
    import tty

    controller, device = os.openpty()
    tty.setraw(device)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if not select.select([controller], [], [], 0.05)[0]:
                continue
            try:
                data = os.read(controller, 4096)
            except OSError:
                return
            asyncio.run(board.send(data))
            if board.replies:
                os.write(controller, bytes(board.replies))
                board.replies.clear()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        return [host.main(["--port", os.ttyname(device), *command]) for command in commands]
    finally:
        stop.set()
        server.join()
        os.close(controller)
        os.close(device)


def test_serial_transport_over_a_pty(capsys):
    """The pyserial transport and the command line, against the model board behind a pseudo-terminal."""
    assert _over_a_pty(ModelBoard(memory_bytes=16384), ["identify"]) == [0]
    assert "'memory_bytes': 16384" in capsys.readouterr().out


def test_cli_runs_a_mamba_block(capsys):
    """``run --mamba SEED``: the compiled block is loaded, started at its program address and its outputs
    and states compared with the ISS. The model board's "accelerator" checks that it was given the
    block's image and program address and leaves the ISS's result in memory (computed beforehand: the
    board must answer within the host's reply timeout); one that corrupts a state byte is caught."""
    from marca.config import FPGA_SMALL
    from marca.golden.iss import run_program as golden_run

    block = host.mamba_block(FPGA_SMALL, seed=1)
    image, address = block.image, block.program_address
    _, machine = golden_run(FPGA_SMALL, image, address)
    result = machine.memory_bytes()

    def accelerator(corrupt):
        def effect(memory):
            assert board.registers[REGISTERS["PROGRAM_LO"]] == address
            assert bytes(memory[:len(image)]) == image
            memory[:len(result)] = result
            if corrupt:
                memory[address - 8] ^= 0x40                     # a byte of the state just below the program
        return effect

    board = ModelBoard(memory_bytes=16384)
    board.effect = accelerator(corrupt=False)
    assert _over_a_pty(board, ["run", "--config", "fpga-small", "--mamba", "1", "--timeout", "5"]) == [0]
    output = capsys.readouterr().out
    assert "Mamba block (d_model 16, d_state 4, 4 tokens, seed 1)" in output
    assert "results match the golden model" in output
    board = ModelBoard(memory_bytes=16384)
    board.effect = accelerator(corrupt=True)
    assert _over_a_pty(board, ["run", "--config", "fpga-small", "--mamba", "1", "--timeout", "5"]) == [1]
    assert "differ" in capsys.readouterr().err
