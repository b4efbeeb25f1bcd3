"""Quantisation from scratch: ``peftlab.quant.nf4`` (NF4/FP4/int4 code books, blockwise absmax,
double quantisation, packing, a reference 4-bit linear layer).

Import the submodule you need; this package imports nothing itself, so ``import peftlab`` stays fast.
"""
