"""The on-chip buffer pool: banked SRAM shared by activations, weights, parameters and outputs."""

from amaranth import Module, Signal, unsigned
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["BankPort", "BufferPool", "SUBBANKS"]

SUBBANKS = 4     # by default each bank interleaves four memories, so an output row of up to 4 words is one write


class BankPort(wiring.Signature):
    """One bank's ports, from the user's side.

    Read: ``r_addr`` (word offset in the bank) with ``r_en``; ``r_data`` is valid ``read_latency``
    cycles later (the pool's, 1 to 3): the word before the writes of the cycle the read is issued in.
    Write: ``w_en[s]`` writes ``w_data[s]`` to word ``subbanks * w_row + s``: up to ``subbanks`` aligned
    words a cycle.
    """

    def __init__(self, word_bits, bank_words, subbanks=SUBBANKS):
        super().__init__({
            "r_addr": Out(range(bank_words)),
            "r_en": Out(1),
            "r_data": In(unsigned(word_bits)),
            "w_row": Out(range(bank_words // subbanks)),
            "w_data": Out(data.ArrayLayout(unsigned(word_bits), subbanks)),
            "w_en": Out(subbanks),
        })


class BufferPool(wiring.Component):
    """``banks`` independent banks of ``bank_words`` words of ``word_bits`` bits.

    Each bank has one read port (one word a cycle, ``read_latency`` cycles of latency: 2 registers each
    memory's output before the multiplexer that picks the sub-bank; 3 also registers the bank's read
    address and enable, and its write, in front of its memories, which may lie across the chip: a write
    then lands a cycle later, as the read it must stay ahead of) and one write port (up to
    ``subbanks`` aligned words a cycle), so three streams — activations in, weights in, outputs out — run
    at full rate when they live in different banks. ``subbanks`` (4 or 1) is how many memories a bank
    interleaves: 4 writes a whole INT32 output row of a wide array at once; 1 is one memory a bank, for
    a small FPGA whose block RAMs are few (its outputs come slower than a word a cycle anyway). Global
    word address = ``bank * bank_words + offset``.

    Members: ``bank`` (``banks`` x :class:`BankPort`, flipped).
    """

    def __init__(self, word_bits, banks, bank_words, subbanks=SUBBANKS, read_latency=1):
        if read_latency not in (1, 2, 3):
            raise ValueError(f"read_latency must be 1, 2 or 3, not {read_latency!r}")
        if subbanks not in (1, SUBBANKS):
            raise ValueError(f"subbanks must be 1 or {SUBBANKS}, not {subbanks!r}")
        if bank_words % subbanks or bank_words < subbanks:
            raise ValueError(f"bank_words must be a positive multiple of {subbanks}, not {bank_words}")
        self.word_bits, self.banks, self.bank_words, self.subbanks = word_bits, banks, bank_words, subbanks
        self.read_latency = read_latency
        super().__init__({"bank": In(BankPort(word_bits, bank_words, subbanks)).array(banks)})

    def elaborate(self, platform):
        m = Module()
        S = self.subbanks
        sub_bits = (S - 1).bit_length()
        depth = self.bank_words // S
        for b in range(self.banks):
            port = self.bank[b]
            r_addr, r_en = port.r_addr, port.r_en
            w_row, w_data, w_en = port.w_row, port.w_data, port.w_en
            if self.read_latency == 3:
                # (the write too, so that a read still sees every write issued before it; the ULX3S
                # target's pool is one memory a bank, so that is its 96-bit word, not four)
                r_addr = Signal.like(port.r_addr, name=f"bank{b}_r_addr")
                r_en = Signal(name=f"bank{b}_r_en")
                w_row = Signal.like(port.w_row, name=f"bank{b}_w_row")
                w_data = Signal.like(port.w_data, name=f"bank{b}_w_data", reset_less=True)
                w_en = Signal.like(port.w_en, name=f"bank{b}_w_en")
                m.d.sync += [r_addr.eq(port.r_addr), r_en.eq(port.r_en), w_row.eq(port.w_row),
                             w_data.eq(port.w_data), w_en.eq(port.w_en)]
            sub_sel = Signal(max(1, sub_bits), name=f"sub_sel{b}")
            if S > 1:
                with m.If(r_en):
                    m.d.sync += sub_sel.eq(r_addr[:sub_bits])
                if self.read_latency >= 2:
                    sub_sel_q = Signal.like(sub_sel, name=f"sub_sel{b}_q")
                    m.d.sync += sub_sel_q.eq(sub_sel)
                    sub_sel = sub_sel_q
            for s in range(S):
                mem = memory.Memory(shape=unsigned(self.word_bits), depth=depth, init=[])
                m.submodules[f"bank{b}_sub{s}"] = mem
                rp = mem.read_port()
                wp = mem.write_port()
                m.d.comb += [rp.addr.eq(r_addr >> sub_bits), rp.en.eq(r_en),
                             wp.addr.eq(w_row), wp.data.eq(w_data[s]), wp.en.eq(w_en[s])]
                r_data = rp.data
                if self.read_latency >= 2:
                    r_data = Signal(self.word_bits, name=f"bank{b}_sub{s}_q", reset_less=True)
                    m.d.sync += r_data.eq(rp.data)
                with m.If(sub_sel == s):
                    m.d.comb += port.r_data.eq(r_data)
        return m
