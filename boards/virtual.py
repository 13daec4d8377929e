"""A virtual board on a pseudo-terminal: the link's device end in front of the Verilated accelerator.

    python -m boards.virtual --lanes 4 --banks 4 --bank-words 1024 --acc-depth 128

prints the pty's path on its first line and serves until the host side closes. The host talks to it
exactly as to a board on a UART (``device="board:/dev/pts/N"``). The device end of the link runs the
protocol model (:class:`sw.link.Endpoint`, the golden model for the board's link hardware); the
accelerator behind it is the same Verilated top the ``sim`` device uses. Faults for tests: ``--flip``,
``--drop``, ``--dup`` (per-byte probabilities, both directions), ``--stall-after N`` (stop answering
after N received bytes), ``--reset-after N`` (reset board and link after N received bytes, then announce
itself with a HELLO, as a board does after a reset).
"""

import argparse
import os
import random
import select
import sys
import tty

import numpy as np

from hw.isa import ISA_VERSION, AcceleratorConfig
from sw.link.arq import LINK_VERSION, Endpoint, Hello
from sw.link.frame import Frame, FrameType

__all__ = ["VirtualBoard", "FaultyFd", "damage", "main"]

MAX_PAYLOAD, WINDOW = 256, 4


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
        from sim.fastsim import FastSim
        self.config = config
        self.sim = FastSim(config)
        self.transport = transport
        self.stall_after, self.reset_after = stall_after, reset_after
        self.endpoint = Endpoint(transport, window=WINDOW, max_payload=MAX_PAYLOAD, on_hello=self._on_hello)

    def hello(self):
        c = self.config
        return Hello(LINK_VERSION, ISA_VERSION, c.lanes, c.banks, c.bank_words, c.acc_depth, MAX_PAYLOAD, WINDOW)

    def _on_hello(self, frame):
        self.reset()

    def reset(self):
        """Power-on state: accelerator reset, link at sequence 0; say so with a HELLO."""
        self.sim.reset()
        self.endpoint.reset()
        self.endpoint.send_frame(Frame(FrameType.HELLO, 0, self.hello().pack()))

    def serve(self):
        ep = self.endpoint
        while True:
            if self.stall_after is not None and self.transport.received >= self.stall_after:
                self.transport.read(1.0)              # deaf and dumb from now on, like a hung board
                continue
            if self.reset_after is not None and self.transport.received >= self.reset_after:
                self.reset_after = None
                self.reset()
            ep.poll(0.005)
            whole = len(ep.received) // 4 * 4
            if whole:
                words = np.frombuffer(bytes(ep.received[:whole]), dtype="<u4")
                del ep.received[:whole]
                answers = self.sim.run(words, 0).answers
                if answers:
                    ep.queue(np.asarray(answers, dtype="<u4").tobytes())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m boards.virtual", description=__doc__.split("\n\n")[0])
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
    config = AcceleratorConfig(lanes=args.lanes, banks=args.banks, bank_words=args.bank_words,
                               acc_depth=args.acc_depth)
    master, slave = os.openpty()
    tty.setraw(slave)
    board = VirtualBoard(config, FaultyFd(master, args.flip, args.drop, args.dup, args.seed),
                         args.stall_after, args.reset_after)
    board.sim.open()                            # build or load the Verilated model before announcing
    print(os.ttyname(slave), flush=True)
    try:
        board.serve()
    except (EOFError, KeyboardInterrupt):
        return 0


if __name__ == "__main__":
    sys.exit(main())
