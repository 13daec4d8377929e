"""Program a board with the bitstream ``make bitstream`` built.

    python -m ambert.boards.program ulx3s [--size small]

Uses the board file's programmer (openFPGALoader for the ULX3S, iceprog for the iCEBreaker) when it is
installed; otherwise says how to get it and the command to run.
"""

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from . import BOARD_NAMES, get_board

ROOT = Path(__file__).resolve().parent.parent
INSTALL = {"openFPGALoader": "apt-get install openfpgaloader (or build it: github.com/trabucayre/openFPGALoader)",
           "iceprog": "apt-get install fpga-icestorm"}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m ambert.boards.program", description=__doc__.split("\n\n")[0])
    p.add_argument("board", choices=BOARD_NAMES)
    p.add_argument("--size", default="small")
    p.add_argument("--out", help="build folder (default build/boards)")
    args = p.parse_args(argv)
    board = get_board(args.board)
    bit = Path(args.out or ROOT / "build" / "boards") / f"{board.name}-{args.size}" / board.bitstream_name
    if not bit.exists():
        print(f"no bitstream at {bit}: run `make bitstream BOARD={board.name} SIZE={args.size}` first",
              file=sys.stderr)
        return 2
    cmd = [*board.programmer, str(bit)]
    if shutil.which(board.programmer[0]) is None:
        print(f"{board.programmer[0]} is not installed: {INSTALL.get(board.programmer[0], 'install it')}\n"
              f"then program the board with:\n  {shlex.join(cmd)}", file=sys.stderr)
        return 2
    print(shlex.join(cmd), file=sys.stderr)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
