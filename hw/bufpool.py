"""The on-chip buffer pool: banked SRAM shared by activations, weights, parameters and outputs."""

from amaranth import ClockSignal, Instance, Module, Signal, unsigned
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out

from .mac import is_ecp5

__all__ = ["BankPort", "BufferPool", "SUBBANKS", "registered_bram"]

SUBBANKS = 4     # by default each bank interleaves four memories, so an output row of up to 4 words is one write
ECP5_BRAM_WORDS = 2048      # a DP16KD as 2048 words of 9 bits, the deepest of its modes that a byte fits


def _memory(m, name, width, depth, r_addr, r_en, w_addr, w_data, w_en):
    """An Amaranth memory with one synchronous read port and one write port; returns the read data."""
    mem = memory.Memory(shape=unsigned(width), depth=depth, init=[])
    m.submodules[name] = mem
    rp, wp = mem.read_port(), mem.write_port()
    m.d.comb += [rp.addr.eq(r_addr), rp.en.eq(r_en), wp.addr.eq(w_addr), wp.data.eq(w_data), wp.en.eq(w_en)]
    return rp.data


def registered_bram(m, platform, name, width, depth, r_addr, r_en, w_addr, w_data, w_en):
    """A ``width`` x ``depth`` memory with a registered read: the word at ``r_addr`` (read when ``r_en``;
    else the last word read) two cycles later, before any write issued with or after the read.
    Returns the read data.

    On an ECP5 (``depth`` up to 2048) that is DP16KDs of 2048 x 9 bits (port A writes, port B reads), each
    with its own output register (REGMODE OUTREG): Yosys maps a memory to them without it, so the word's
    register lies in the fabric, and the block RAM's 5.8 ns clock-to-out and the route to that register
    were one cycle. Elsewhere, and in simulation, an Amaranth memory and a register after it.
    """
    if not (is_ecp5(platform) and depth <= ECP5_BRAM_WORDS):
        r_data = Signal(width, name=f"{name}_q", reset_less=True)
        m.d.sync += r_data.eq(_memory(m, name, width, depth, r_addr, r_en, w_addr, w_data, w_en))
        return r_data
    r_data = Signal(width, name=f"{name}_q")
    for j in range(-(-width // 9)):
        bits = slice(9 * j, min(9 * (j + 1), width))
        di, do = Signal(18, name=f"{name}_di{j}"), Signal(18, name=f"{name}_do{j}")
        m.d.comb += [di.eq(w_data[bits]), r_data[bits].eq(do)]
        # x9: address bits 13..3 are the word; the write on port A, the read on port B (never one address
        # in one cycle: the pool's promise, boards.build's NO_COLLISION_MEMORIES)
        ports = {f"i_ADA{k}": (w_addr[k - 3] if 3 <= k < 3 + len(w_addr) else 0) for k in range(14)}
        ports.update({f"i_ADB{k}": (r_addr[k - 3] if 3 <= k < 3 + len(r_addr) else 0) for k in range(14)})
        ports.update({f"i_DIA{k}": di[k] for k in range(18)})
        ports.update({f"i_DIB{k}": 0 for k in range(18)})
        ports.update({f"o_DOB{k}": do[k] for k in range(18)})
        ports.update({f"i_CS{p}{k}": 0 for p in "AB" for k in range(3)})
        m.submodules[f"{name}_{j}"] = Instance(
            "DP16KD",
            p_DATA_WIDTH_A=9, p_DATA_WIDTH_B=9, p_REGMODE_A="NOREG", p_REGMODE_B="OUTREG",
            p_RESETMODE="SYNC", p_ASYNC_RESET_RELEASE="SYNC", p_CSDECODE_A="0b000", p_CSDECODE_B="0b000",
            p_WRITEMODE_A="NORMAL", p_WRITEMODE_B="NORMAL", p_GSR="DISABLED",
            i_CLKA=ClockSignal(), i_CEA=w_en, i_WEA=w_en, i_OCEA=1, i_RSTA=0,
            i_CLKB=ClockSignal(), i_CEB=r_en, i_WEB=0, i_OCEB=1, i_RSTB=0,
            **ports,
        )
    return r_data


class BankPort(wiring.Signature):
    """One bank's ports, from the user's side.

    Read: ``r_addr`` (word offset in the bank) with ``r_en``; ``r_data`` is valid ``read_latency``
    cycles later (the pool's, 1 to 4): the word before the writes of the cycle the read is issued in.
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
    memory's output before the multiplexer that picks the sub-bank, on an ECP5 in the block RAMs' own
    output registers (:func:`registered_bram`); 3 also registers the bank's read
    address and enable, and its write, in front of its memories, which may lie across the chip: a write
    then lands a cycle later, as the read it must stay ahead of; 4 also registers each memory's word in
    the fabric after that, beside the memory, on its way to the bank multiplexer) and one write port (up to
    ``subbanks`` aligned words a cycle), so three streams — activations in, weights in, outputs out — run
    at full rate when they live in different banks. ``subbanks`` (4 or 1) is how many memories a bank
    interleaves: 4 writes a whole INT32 output row of a wide array at once; 1 is one memory a bank, for
    a small FPGA whose block RAMs are few (its outputs come slower than a word a cycle anyway). Global
    word address = ``bank * bank_words + offset``.

    Members: ``bank`` (``banks`` x :class:`BankPort`, flipped).
    """

    def __init__(self, word_bits, banks, bank_words, subbanks=SUBBANKS, read_latency=1):
        if read_latency not in (1, 2, 3, 4):
            raise ValueError(f"read_latency must be 1 to 4, not {read_latency!r}")
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
            if self.read_latency >= 3:
                # the write too, so that a read still sees every write issued before it. One register for
                # all of a bank's block RAMs: copies beside each would put the bank multiplexer's route
                # to them into the cycle instead (docs/timing.md)
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
                # (as many registers as the memory's word passes after its read)
                for k in range((self.read_latency >= 2) + (self.read_latency == 4)):
                    sub_sel_q = Signal.like(sub_sel, name=f"sub_sel{b}_q{k}")
                    m.d.sync += sub_sel_q.eq(sub_sel)
                    sub_sel = sub_sel_q
            for s in range(S):
                if self.read_latency >= 2:
                    r_data = registered_bram(m, platform, f"bank{b}_sub{s}", self.word_bits, depth,
                                             r_addr >> sub_bits, r_en, w_row, w_data[s], w_en[s])
                    if self.read_latency == 4:
                        # (from an ECP5 block RAM's output register to the bank multiplexer and on to the
                        # reader's register, placed at the multiplexer, took 8 ns of routing at 100 MHz)
                        fabric = Signal(self.word_bits, name=f"bank{b}_sub{s}_f", reset_less=True)
                        m.d.sync += fabric.eq(r_data)
                        r_data = fabric
                else:
                    r_data = _memory(m, f"bank{b}_sub{s}", self.word_bits, depth,
                                     r_addr >> sub_bits, r_en, w_row, w_data[s], w_en[s])
                with m.If(sub_sel == s):
                    m.d.comb += port.r_data.eq(r_data)
        return m
