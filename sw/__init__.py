"""ambert host software: the integer reference and quantizer (quant), and the ``ambert`` command."""
