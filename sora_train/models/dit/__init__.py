"""Spacetime-patch diffusion transformer and its size registry."""

from .dit import DiT
from .sizes import DIT_SIZES, build_dit

__all__ = ["DiT", "DIT_SIZES", "build_dit"]
