"""Layers for model code: :class:`Mamba3` and its inference cache."""

from .mamba3 import Mamba3, Mamba3Cache

__all__ = ["Mamba3", "Mamba3Cache"]
