"""Helpers shared by the cocotb benches: packing lanes into the flat vectors Amaranth's Verilog uses."""


def pack(values, bits):
    """Lane values (signed or unsigned) -> one integer, lane 0 in the low bits."""
    return sum((v & ((1 << bits) - 1)) << (bits * i) for i, v in enumerate(values))


def unpack(value, bits, n):
    """One integer -> ``n`` signed lane values of ``bits`` bits, lane 0 from the low bits."""
    out = []
    for i in range(n):
        v = (value >> (bits * i)) & ((1 << bits) - 1)
        out.append(v - (1 << bits) if v >> (bits - 1) else v)
    return out
