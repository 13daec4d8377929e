"""Amaranth generators for the ambert accelerator (no file I/O, no torch)."""
