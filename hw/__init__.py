"""Amaranth gateware of the accelerator, one module per block."""
