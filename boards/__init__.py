"""Dev boards for the ambert accelerator: each board file is data (:class:`ambert.boards.board.Board`); the
build (``python -m ambert.boards.build``) and the virtual board (``python -m ambert.boards.virtual``) use them."""

BOARD_NAMES = ("icebreaker", "ulx3s")


def get_board(name):
    """The :class:`ambert.boards.board.Board` called ``name``."""
    import importlib
    if name not in BOARD_NAMES:
        raise ValueError(f"unknown board {name!r}: pick one of {', '.join(BOARD_NAMES)}")
    return importlib.import_module(f"ambert.boards.{name}").BOARD
