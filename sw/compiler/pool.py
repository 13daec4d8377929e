"""The buffer-pool planner: every tensor the device holds gets an address range for its lifetime.

Allocation is static and liveness-based — the "memory pool": the compiler allocates a region when it
emits the LOAD (or the MATMUL) that fills it and releases it after the last instruction that reads it, in
program order, and released ranges are reused. Program order is all that matters for correctness: the
sequencer holds back any command that would touch a range or bank port a running MATMUL or STORE still
uses (docs/isa.md). Where a tensor goes only decides how much overlaps; so ``alloc`` takes banks to
``avoid`` (used by whatever will be running when the region is filled) besides the banks it must not use.
"""

from dataclasses import dataclass

__all__ = ["PoolFull", "Region", "PoolPlanner"]

ALIGN = 4       # MATMUL outputs start on a multiple of 4 words; every region does, for simplicity


class PoolFull(ValueError):
    """No free range of the size asked for in the allowed banks."""


@dataclass(frozen=True)
class Region:
    bank: int
    offset: int
    words: int
    name: str
    bank_words: int

    @property
    def addr(self):
        """The global pool word address."""
        return self.bank * self.bank_words + self.offset


class PoolPlanner:
    """Best-fit allocation of aligned ranges in each bank of a :class:`ambert.proto.isa.DeviceShape`'s pool.

    ``live_words`` is what is allocated now, ``peak_words`` its maximum so far, and ``naive_words`` the
    sum of every allocation — what the same program would need if nothing were ever reused.
    """

    def __init__(self, shape):
        self.shape = shape
        self.reset()

    def reset(self):
        """Forget every allocation (the device was reset, or its contents no longer matter)."""
        self._free = {b: [(0, self.shape.bank_words)] for b in range(self.shape.banks)}
        self.live_words = self.peak_words = self.naive_words = 0

    def alloc(self, words, name, forbid=(), avoid=()):
        """A region of ``words`` words in a bank not in ``forbid``, outside ``avoid`` if any fits there."""
        if words < 1:
            raise ValueError(f"{name}: cannot allocate {words} words")
        size = -(-words // ALIGN) * ALIGN
        best = None
        for bank, runs in self._free.items():
            if bank in forbid:
                continue
            for start, length in runs:
                if length >= size:
                    # prefer banks nothing running uses, then the tightest fit (keeps big ranges whole)
                    rank = (bank in avoid, length, bank, start)
                    if best is None or rank < best[0]:
                        best = (rank, bank, start)
        if best is None:
            raise PoolFull(f"{name}: no free range of {size} words in banks "
                           f"{sorted(set(range(self.shape.banks)) - set(forbid))}")
        _, bank, start = best
        runs = self._free[bank]
        i = next(i for i, (s, _) in enumerate(runs) if s == start)
        s, length = runs[i]
        runs[i:i + 1] = [(s + size, length - size)] if length > size else []
        self.live_words += size
        self.peak_words = max(self.peak_words, self.live_words)
        self.naive_words += size
        return Region(bank, start, size, name, self.shape.bank_words)

    def release(self, region):
        """Return a region's range to its bank (merged with its free neighbours)."""
        runs = self._free[region.bank]
        runs.append((region.offset, region.words))
        runs.sort()
        merged = []
        for s, length in runs:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                if merged and merged[-1][0] + merged[-1][1] > s:
                    raise ValueError(f"{region.name}: released twice, or overlapping a free range")
                merged.append((s, length))
        self._free[region.bank] = merged
        self.live_words -= region.words
