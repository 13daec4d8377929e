"""Where the systolic array's multipliers go on an ECP5-85F: each array column on adjacent DSP sites of one strip.

The LFE5U-85F's 156 MULT18X18D lie in three strips across the die (tile rows 10, 34, 58), thirteen DSP
blocks of four multipliers each. Left to itself, nextpnr's placer scatters an array's PEs over all three
strips (even a 4 x 4's), and at 12 x 12 (153 of 156 multipliers in use) the routing does not converge.
Laying each array column on consecutive multipliers of one strip keeps the 32-bit partial sums between
neighbours short (the 9-bit activations between columns go further): with nextpnr's static placer and
router2 the 12 x 12 routes (see the README's results). The BEL names are nextpnr's, as a placed design
reports them: ``X{column}/Y{row}/MULT18_{slot}``.
"""

import re

__all__ = ["array_bels", "constrain_array", "SITES"]

STRIP_ROWS = (10, 34, 58)
BLOCK_COLUMNS = (4, 13, 22, 31, 40, 49, 58, 69, 78, 87, 96, 105, 114)    # a block's first tile
SLOTS = (0, 1, 4, 5)                    # the multipliers' tiles in a block (the ALU54s are in 3 and 7)
STRIP_SITES = len(BLOCK_COLUMNS) * len(SLOTS)
SITES = len(STRIP_ROWS) * STRIP_SITES   # 156
PE_MULTIPLIER = re.compile(r"board\.accel\.engine\.array\.pe_(\d+)_(\d+)\.")


def array_bels(rows, cols):
    """``{(i, j): bel}`` for a ``rows`` x ``cols`` array: column j on ``rows`` consecutive multipliers of one
    strip, PE row i at the i-th, as many whole columns to a strip as fit, strips in order."""
    per_strip = STRIP_SITES // rows
    if per_strip == 0 or cols > per_strip * len(STRIP_ROWS):
        raise ValueError(f"a {rows} x {cols} array does not fit the ECP5-85F's DSP strips a column at a time "
                         f"({len(STRIP_ROWS)} strips of {STRIP_SITES} multipliers)")
    bels = {}
    for j in range(cols):
        strip, column = divmod(j, per_strip)
        for i in range(rows):
            block, slot = divmod(column * rows + i, len(SLOTS))
            x = BLOCK_COLUMNS[block] + SLOTS[slot]
            bels[i, j] = f"X{x}/Y{STRIP_ROWS[strip]}/MULT18_{SLOTS[slot]}"
    return bels


def constrain_array(netlist, rows, cols):
    """Set the ``BEL`` attribute of each PE's multiplier in ``netlist`` (Yosys' JSON, as a dict, changed in
    place); return how many. Raises ValueError unless there is exactly one multiplier a PE."""
    bels = array_bels(rows, cols)
    placed = {}
    for module in netlist["modules"].values():
        for name, cell in module["cells"].items():
            match = PE_MULTIPLIER.match(name)
            if cell["type"] == "MULT18X18D" and match:
                pe = int(match[1]), int(match[2])
                if pe not in bels or pe in placed:
                    raise ValueError(f"multiplier {name} is not the one of a PE in a {rows} x {cols} array")
                cell["attributes"]["BEL"] = placed[pe] = bels[pe]
    if len(placed) != rows * cols:
        raise ValueError(f"the netlist has {len(placed)} PE multipliers, not {rows * cols}: was the array "
                         f"mapped to DSP blocks?")
    return len(placed)
