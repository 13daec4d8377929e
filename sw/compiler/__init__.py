"""Compile GEMMs (and, with the runtime issue, whole layers) into accelerator instruction streams."""
