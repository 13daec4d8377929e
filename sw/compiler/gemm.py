"""Place one GEMM in the buffer pool and emit its instruction stream.

Placement is static and simple: activations in bank 0, weights and requant parameters in bank 1, outputs
in bank 2. A GEMM larger than a bank is split into N-chunks (weights loaded once per chunk) and M-chunks
(at most ``acc_depth`` rows); each chunk is one MATMUL. Array shape, pool size and layouts all come from
the :class:`hw.isa.AcceleratorConfig`.
"""

from dataclasses import dataclass

import numpy as np

from hw.isa import MODE_WORDS, PARAM_WORDS_PER_LANE_GROUP, Mode, Program

__all__ = ["GemmPlan", "plan_gemm", "gemm_program"]

A_BANK, W_BANK, O_BANK = 0, 1, 2


@dataclass(frozen=True)
class GemmPlan:
    m: int
    k: int
    n: int
    mode: Mode
    k_tiles: int
    n_tiles: int
    m_chunk: int            # rows per MATMUL
    n_tiles_chunk: int      # n-tiles per MATMUL

    def chunks(self):
        """Yield (first n-tile, n-tiles, first row, rows) of each MATMUL, N-chunk-major."""
        for n0 in range(0, self.n_tiles, self.n_tiles_chunk):
            for m0 in range(0, self.m, self.m_chunk):
                yield n0, min(self.n_tiles_chunk, self.n_tiles - n0), m0, min(self.m_chunk, self.m - m0)


def plan_gemm(config, m, k, n, mode):
    """Choose chunk sizes so every MATMUL's operands fit their banks; raises ValueError if none can."""
    if min(m, k, n) < 1:
        raise ValueError(f"GEMM shape must be positive, not {m}x{k}x{n}")
    mode = Mode(mode)
    lanes, bank = config.lanes, config.bank_words
    k_tiles = -(-k // lanes)
    n_tiles = -(-n // lanes)
    per_n_tile = k_tiles * lanes + PARAM_WORDS_PER_LANE_GROUP
    if per_n_tile > bank or k_tiles > bank:
        raise ValueError(f"K={k} needs {per_n_tile} pool words per weight tile column; a bank has {bank}")
    nt_chunk = min(n_tiles, bank // per_n_tile, 0xFFFF)
    m_chunk = min(m, config.acc_depth, bank // k_tiles, bank // (MODE_WORDS[mode] * nt_chunk))
    while m_chunk < 1 and nt_chunk > 1:
        nt_chunk //= 2
        m_chunk = min(m, config.acc_depth, bank // k_tiles, bank // (MODE_WORDS[mode] * nt_chunk))
    if m_chunk < 1:
        raise ValueError(f"GEMM {m}x{k}x{n} does not fit a bank of {bank} words")
    # equal chunks: a short last chunk would leave the array waiting on weight loads
    m_chunk = -(-m // -(-m // m_chunk))
    return GemmPlan(m=m, k=k, n=n, mode=mode, k_tiles=k_tiles, n_tiles=n_tiles, m_chunk=m_chunk,
                    n_tiles_chunk=nt_chunk)


def gemm_program(config, a, w, bias, m0, shift, mode):
    """Return ``(program, decode)``: run the program, then ``decode(answers)`` gives the [M, N] result of
    ``requant(a @ w.T + bias)`` exactly as ``ref_gemm`` + ``ref_requant`` define it (``mode`` INT32: the
    int32 ``a @ w.T + bias``)."""
    a, w = np.asarray(a, dtype=np.int8), np.asarray(w, dtype=np.int8)
    m, k = a.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"inner dimensions differ: a is {a.shape}, w is {w.shape}")
    bias = np.broadcast_to(np.asarray(bias, dtype=np.int64), (n,))
    m0 = np.broadcast_to(np.asarray(m0, dtype=np.int64), (n,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.int64), (n,))
    plan = plan_gemm(config, m, k, n, mode)
    lanes, bank = config.lanes, config.bank_words
    prog = Program(config)
    blocks = []
    for nt0, ntc, r0, rc in plan.chunks():
        cols = slice(nt0 * lanes, min(n, (nt0 + ntc) * lanes))
        ncols = cols.stop - cols.start
        if r0 == 0:
            wq = config.pack_weights(w[cols])
            prog.load(W_BANK * bank, wq)
            p_addr = W_BANK * bank + len(wq)
            prog.load(p_addr, config.pack_params(bias[cols], m0[cols], shift[cols]))
        prog.load(A_BANK * bank, config.pack_activations(a[r0:r0 + rc]))
        prog.matmul(A_BANK * bank, W_BANK * bank, p_addr, O_BANK * bank, rc, plan.k_tiles, ntc, plan.mode)
        words = ntc * rc * MODE_WORDS[plan.mode]
        prog.store(O_BANK * bank, words)
        blocks.append((r0, rc, cols, ncols, words * config.host_words_per_pool_word))
    prog.sync()

    def decode(answers):
        dtype = {Mode.INT8: np.int8, Mode.INT16: np.int16, Mode.INT32: np.int32}[plan.mode]
        out = np.zeros((m, n), dtype=dtype)
        pos = 0
        for r0, rc, cols, ncols, count in blocks:
            chunk = config.words_from_host(answers[pos:pos + count])
            out[r0:r0 + rc, cols] = config.unpack_output(chunk, rc, ncols, plan.mode)
            pos += count
        return out, answers[pos]          # the result and the final SYNC status word

    return prog, decode
