"""The integer contract's widths and ranges, which the reference (:mod:`ambert.sw.quant.ref`), the
hardware and the quantizer all take from here.

A GEMM accumulates int8 x int8 products in int32; requantization multiplies by ``m0`` (unsigned,
``REQUANT_M0_BITS`` bits) and shifts right by ``0 <= shift <= REQUANT_SHIFT_MAX`` with one rounding, so the
product needs 62 bits and int64 (or a 64-bit hardware sum) holds it with its rounding half. Outputs
saturate to int8 or int16. docs/integer-contract.md says the rest.
"""

__all__ = ["INT8_MIN", "INT8_MAX", "INT16_MIN", "INT16_MAX", "INT32_MIN", "INT32_MAX", "OUT_RANGE",
           "REQUANT_M0_BITS", "REQUANT_SHIFT_MAX"]

INT8_MIN, INT8_MAX = -(1 << 7), (1 << 7) - 1
INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
OUT_RANGE = {8: (INT8_MIN, INT8_MAX), 16: (INT16_MIN, INT16_MAX), 32: (INT32_MIN, INT32_MAX)}

REQUANT_M0_BITS = 31            # 0 <= m0 < 2**31
REQUANT_SHIFT_MAX = 62          # |acc * m0| < 2**62: a shift past it would only ever round to 0 or -1
