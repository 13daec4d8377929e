#!/usr/bin/env python3
"""Effective payload throughput of the host link as a fraction of the UART's line rate.

Both ends run the real protocol code (sw/link: framing, CRC, go-back-N with the board's window) over a
modeled full-duplex UART — 10 bits per byte at the given baud, on a virtual clock — carrying the traffic
of one MiniLM layer's programs (instruction streams out, answers back) at several byte-error rates.
Modeled, not timed: the figure is the protocol's, independent of this machine. Then, per board file
size that can hold MiniLM, the modeled latency of one MiniLM sentence on the board: its host traffic and
device cycles measured on the simulated accelerator of that size, the line at the board's baud and the
clean-line payload fraction above, the compute at the clock its board file declares (the last column says
whether a build of that board file met it). Last lines:

    link: baud=... payload_fraction=... (clean line, host to board)
    board-latency: <board>/<size> <seconds> s ; ...
"""

import heapq
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ambert.boards.virtual import damage  # noqa: E402  (after the path is set)

BAUD = 3_000_000


class Uart:
    """Two directions of a UART on a shared virtual clock; bytes may be damaged on the way."""

    def __init__(self, baud, error_rate, seed):
        self.now = 0.0
        self.byte_time = 10 / baud
        self.error_rate = error_rate
        self.rng = random.Random(seed)
        self.free_at = [0.0, 0.0]           # when each direction's line is next idle
        self.arrivals = [[], []]            # heaps of (time, seq, bytes) towards side 0 / side 1
        self.count = 0

    def end(self, side):
        uart = self

        class End:
            def write(self, data):
                if uart.error_rate:
                    data = damage(data, uart.rng, flip=uart.error_rate)
                start = max(uart.now, uart.free_at[side])
                uart.free_at[side] = start + len(data) * uart.byte_time
                uart.count += 1
                heapq.heappush(uart.arrivals[1 - side], (uart.free_at[side], uart.count, data))

            def read(self, timeout):
                q, out = uart.arrivals[side], b""
                while q and q[0][0] <= uart.now:
                    out += heapq.heappop(q)[2]
                return out
        return End()

    def next_event(self):
        times = [q[0][0] for q in self.arrivals if q]
        return min(times) if times else None


def transfer(out_bytes, back_bytes, baud, error_rate, seed=0):
    """Move ``out_bytes`` host->board and ``back_bytes`` board->host; return the virtual seconds."""
    from ambert.sw.link import Endpoint
    uart = Uart(baud, error_rate, seed)
    frame_time = (256 + 12) * 10 / baud
    retry = 4 * 4 * frame_time                  # four windows of full frames
    host = Endpoint(uart.end(0), window=4, max_payload=256, retry_s=retry, max_retries=10_000,
                    clock=lambda: uart.now)
    board = Endpoint(uart.end(1), window=4, max_payload=256, retry_s=retry, max_retries=10_000,
                     clock=lambda: uart.now)
    host.queue(out_bytes)
    board.queue(back_bytes)
    while not (host.idle and board.idle and len(board.received) == len(out_bytes)
               and len(host.received) == len(back_bytes)):
        host.poll(0)
        board.poll(0)
        nxt = uart.next_event()
        timers = [ep.timer + ep.retry_s + 1e-9 for ep in (host, board) if ep.unacked]   # just past: poll uses >
        candidates = [t for t in [nxt, *timers] if t is not None]
        uart.now = max(uart.now, min(candidates)) if candidates else uart.now
    assert bytes(board.received) == out_bytes and bytes(host.received) == back_bytes
    return uart.now, host, board


def main():
    import numpy as np
    rng = np.random.default_rng(0)
    # one MiniLM layer's programs at sequence 128 move about 3.6 MiB out and 0.55 MiB back (e2e_minilm);
    # a 1/16 slice of each keeps this quick and the ratio the same
    out_bytes, back_bytes = rng.bytes(3_600_000 // 16 // 4 * 4), rng.bytes(550_000 // 16 // 4 * 4)
    print(f"modeled UART at {BAUD:,} baud (10 bits/byte), window 4, 256-byte payloads; "
          f"{len(out_bytes):,} B out, {len(back_bytes):,} B back, concurrently")
    print(f"{'byte error rate':>16} {'seconds':>9} {'out payload / line rate':>24} {'retransmitted':>14}")
    clean = None
    for err in (0.0, 1e-5, 1e-4):
        t, host, board = transfer(out_bytes, back_bytes, BAUD, err)
        frac = len(out_bytes) / (t * BAUD / 10)
        clean = frac if clean is None else clean
        print(f"{err:>16g} {t:>9.3f} {frac:>24.1%} {host.retransmitted + board.retransmitted:>14}")
    print(f"link: baud={BAUD} payload_fraction={clean:.3f} (clean line, host to board)")
    board_latency(clean)


def board_latency(payload_fraction, sentence="Hello there!"):
    """MiniLM, one sentence, on each board size: link time + compute time (an upper bound: on a board
    the array computes while the next words arrive)."""
    import dataclasses
    import json
    from ambert.boards import BOARD_NAMES, get_board
    from ambert.sw.quant.hf import encode
    from ambert.sw.quant.quantize import quantize_pretrained
    from ambert.sw.runtime import OffloadedBert
    from ambert.sw.runtime.base import DeviceError
    from ambert.sw.runtime.sim import SimDevice
    qm, model, tok = quantize_pretrained(progress=False)
    enc = encode(tok, [sentence])
    print(f"\nMiniLM, one sentence ({enc['input_ids'].shape[1]} tokens), modeled on each board")
    print(f"{'board/size':<18} {'array':>6} {'baud':>10} {'clock MHz':>10} {'link MB':>8} {'cycles':>12} "
          f"{'link s':>8} {'compute s':>10} {'total s':>8}  build")
    lines = []
    for name in BOARD_NAMES:
        board = get_board(name)
        for size in board.sizes:
            size, config = size.name, size.config
            # the board runs at the clock its file declares; a build report says whether timing met it
            # (a report of another clock or configuration is of an older board file: "stale")
            report = ROOT / "build" / "boards" / f"{name}-{size}" / "report.json"
            built = "not built"
            if report.exists():
                r = json.loads(report.read_text())
                same = (abs(r.get("clock_mhz", 0) - board.clock(size) / 1e6) < 1e-6
                        and r.get("config") == dataclasses.asdict(config))
                built = r["status"] if same else "stale (rebuild)"
            clock = board.clock(size)
            mod = OffloadedBert(qm, model.config, [SimDevice(config)])
            try:
                mod(**enc)
            except DeviceError as e:
                print(f"{name + '/' + size:<18} cannot hold MiniLM: {str(e)[:80]}")
                continue
            stats = mod.last_stats
            link_s = 4 * stats.host_words * 10 / board.baud / payload_fraction
            compute_s = stats.cycles / clock
            lanes = config.shape.lanes
            print(f"{name + '/' + size:<18} {lanes:>2}x{lanes:<3} {board.baud:>10,} {clock / 1e6:>10.1f} "
                  f"{4 * stats.host_words / 1e6:>8.2f} {stats.cycles:>12,} {link_s:>8.1f} {compute_s:>10.2f} "
                  f"{link_s + compute_s:>8.1f}  {built}")
            lines.append(f"{name}/{size} {link_s + compute_s:.1f} s")
    print("board-latency: " + " ; ".join(lines))


if __name__ == "__main__":
    main()
