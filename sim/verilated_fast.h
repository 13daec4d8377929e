// Faster sign extension for Verilated models, included before every model file (--compiler-include).
//
// Verilator's VL_EXTENDS_* build the sign bits as -(x & signbit) | x. In the array every PE extends
// both int8 operands, its 16-bit product and its 32-bit partial sum every cycle, and GCC does not see
// through that form; a left shift and an arithmetic right shift compile to one movsx. Measured on the
// 16x16 accelerator model: 0.61 -> 0.76 M cycles/s. Same results: for the clean inputs Verilator
// passes, both forms give lhs's sign in every bit from lbits up.
#ifndef AMBERT_VERILATED_FAST_H_
#define AMBERT_VERILATED_FAST_H_

#include "verilated.h"  // the original inline functions first; the macros below replace later uses

static inline IData ambert_extends_i(int lbits, IData lhs) {
    return static_cast<IData>(static_cast<int32_t>(lhs << (32 - lbits)) >> (32 - lbits));
}
static inline QData ambert_extends_q(int lbits, QData lhs) {
    return static_cast<QData>(static_cast<int64_t>(lhs << (64 - lbits)) >> (64 - lbits));
}

#define VL_EXTENDS_II(obits, lbits, lhs) ambert_extends_i((lbits), (lhs))
#define VL_EXTENDS_QI(obits, lbits, lhs) ambert_extends_q((lbits), (lhs))
#define VL_EXTENDS_QQ(obits, lbits, lhs) ambert_extends_q((lbits), (lhs))
#define VL_MULS_III(lbits, lhs, rhs)                                      \
    static_cast<IData>(static_cast<int32_t>(ambert_extends_i((lbits), (lhs))) \
                       * static_cast<int32_t>(ambert_extends_i((lbits), (rhs))))

#endif  // AMBERT_VERILATED_FAST_H_
