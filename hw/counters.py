"""Performance counters the host reads with the COUNTERS instruction."""

from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["PerfCounters"]


class PerfCounters(wiring.Component):
    """64-bit counters: ``busy`` (cycles the MATMUL engine is active), ``stalled`` (active cycles that fed
    no row to the array), ``macs`` (``macs_per_row`` for every row fed). They count from reset and wrap.

    Array efficiency over a run is ``useful MACs / (rows * cols * busy)``, computed by the host.
    """

    busy: Out(64)
    stalled: Out(64)
    macs: Out(64)
    active: In(1)
    issuing: In(1)

    def __init__(self, macs_per_row):
        self.macs_per_row = macs_per_row
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        with m.If(self.active):
            m.d.sync += self.busy.eq(self.busy + 1)
            with m.If(~self.issuing):
                m.d.sync += self.stalled.eq(self.stalled + 1)
        with m.If(self.issuing):
            m.d.sync += self.macs.eq(self.macs + self.macs_per_row)
        return m
