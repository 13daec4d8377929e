"""The protocol between the host and the accelerator, which hardware and software both import and
neither owns: the instruction set and its word layouts (:mod:`.isa`), the host link's framing, CRC-32 and
HELLO (:mod:`.link`), and the integer contract's widths (:mod:`.contract`). It imports nothing else of
ambert's."""
