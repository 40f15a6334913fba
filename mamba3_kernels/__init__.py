"""Mamba-3 scan kernels."""
