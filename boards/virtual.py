"""A virtual board on a pseudo-terminal: the Verilated board top — UART PHY, link endpoint, accelerator.

    python -m ambert.boards.virtual --lanes 4 --banks 4 --bank-words 1024 --acc-depth 128
    python -m ambert.boards.virtual --board icebreaker          # a board file's configuration, exactly

prints the pty's path on its first line and serves until the host side closes. The host talks to it
exactly as to a board on a UART (``device="board:/dev/pts/N"``): every byte is driven bit by bit onto the
board top's ``rx`` pin and read back off ``tx`` (``ambert.sim.fastsim.BoardSim``), at an accelerated baud (4 clock
cycles a bit), through the same link hardware a bitstream carries. Faults for tests: ``--flip``,
``--drop``, ``--dup`` (per-byte probabilities, both directions, applied on the pty), ``--stall-after N``
(stop answering after N received bytes), ``--reset-after N`` (press the board's reset after N received
bytes: it restarts and announces itself with a HELLO, as a board does).
"""

import argparse
import os
import random
import select
import sys
import tty


from ambert.hw.config import AcceleratorConfig
from ambert.proto.isa import DeviceShape

__all__ = ["VirtualBoard", "FaultyFd", "damage", "main"]

# the board's retransmission timeout, in its cycles: ~60 ms of the simulation (the host's is 50 ms)
RETRY_CYCLES = 100_000
# cycles run between looks at the pty while the board has work in hand
SLICE_CYCLES = 20_000


def damage(data, rng, flip=0.0, drop=0.0, dup=0.0):
    """``data`` as a bad line delivers it: each byte dropped, one bit flipped, or doubled, with the given
    probabilities (``rng``: a ``random.Random``)."""
    out = bytearray()
    for b in data:
        r = rng.random()
        if r < drop:
            continue
        if r < drop + flip:
            b ^= 1 << rng.randrange(8)
        out.append(b)
        if rng.random() < dup:
            out.append(b)
    return bytes(out)


class FaultyFd:
    """A byte transport on a file descriptor that damages traffic on purpose (seeded, reproducible)."""

    def __init__(self, fd, flip=0.0, drop=0.0, dup=0.0, seed=0):
        self.fd = fd
        self.flip, self.drop, self.dup = flip, drop, dup
        self.rng = random.Random(seed)
        self.received = 0

    def _damage(self, data):
        if not (self.flip or self.drop or self.dup):
            return data
        return damage(data, self.rng, self.flip, self.drop, self.dup)

    def write(self, data):
        data = self._damage(data)
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def read(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return b""
        try:
            data = os.read(self.fd, 65536)
        except OSError:             # the host closed its side
            raise EOFError from None
        if not data:
            raise EOFError
        self.received += len(data)
        return self._damage(data)


class VirtualBoard:
    def __init__(self, config, transport, stall_after=None, reset_after=None):
        from ambert.sim.fastsim import BoardSim
        self.config = config
        self.board = BoardSim(config, retry_cycles=RETRY_CYCLES)
        self.transport = transport
        self.stall_after, self.reset_after = stall_after, reset_after

    def power_on(self):
        """Run the board out of reset; its HELLO goes nowhere (no host has the port open yet)."""
        self.board.run(b"", SLICE_CYCLES)

    def serve(self):
        board = self.board
        while True:
            if self.stall_after is not None and self.transport.received >= self.stall_after:
                self.transport.read(1.0)              # deaf and dumb from now on, like a hung board
                continue
            if self.reset_after is not None and self.transport.received >= self.reset_after:
                self.reset_after = None
                board.reset()
            data = self.transport.read(0.005 if board.quiet else 0)
            out = board.run(data, SLICE_CYCLES)
            if out:
                self.transport.write(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ambert.boards.virtual", description=__doc__.split("\n\n")[0])
    p.add_argument("--board", help="serve this board's configuration (boards/<name>.py) instead of the "
                                    "--lanes/--banks/--bank-words/--acc-depth given")
    p.add_argument("--size", default="small", help="the board's size (with --board; default: small)")
    p.add_argument("--lanes", type=int, default=4)
    p.add_argument("--banks", type=int, default=4)
    p.add_argument("--bank-words", type=int, default=1024)
    p.add_argument("--acc-depth", type=int, default=128)
    p.add_argument("--flip", type=float, default=0.0)
    p.add_argument("--drop", type=float, default=0.0)
    p.add_argument("--dup", type=float, default=0.0)
    p.add_argument("--stall-after", type=int)
    p.add_argument("--reset-after", type=int)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.board:
        from . import get_board
        try:
            config = get_board(args.board).config(args.size)
        except ValueError as e:
            p.error(str(e))
    else:
        try:
            config = AcceleratorConfig(DeviceShape(lanes=args.lanes, banks=args.banks, bank_words=args.bank_words,
                                                   acc_depth=args.acc_depth))
        except ValueError as e:
            p.error(str(e))
    master, slave = os.openpty()
    tty.setraw(slave)
    board = VirtualBoard(config, FaultyFd(master, args.flip, args.drop, args.dup, args.seed),
                         args.stall_after, args.reset_after)
    board.power_on()                            # the model is built and out of reset before we announce
    print(os.ttyname(slave), flush=True)
    try:
        board.serve()
    except (EOFError, KeyboardInterrupt):
        return 0


if __name__ == "__main__":
    sys.exit(main())
