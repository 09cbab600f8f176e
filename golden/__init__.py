"""Bit-exact PyTorch golden models of the numerics contract (docs/numerics.md), block by block as in hw/."""
