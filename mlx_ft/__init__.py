"""mlxft: fine-tune with mlx-lm, evaluate every checkpoint on tool calls, pick by eval score, fuse."""

from mlx_ft import _blas

_blas.preload()

__version__ = "0.1.0"
