"""Dev-board platforms and top wrappers for the ambert accelerator."""
