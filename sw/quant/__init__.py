"""The integer BERT reference (the bit-exact contract) and the quantizer that produces its constants."""
