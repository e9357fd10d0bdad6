"""numbanorm: parallel Numba kernels for batch normalization on NumPy arrays."""

from ._config import preload_tbb

preload_tbb()

from .api import (  # noqa: E402
    batch_norm_backward,
    batch_norm_backward_elemt,
    batch_norm_backward_reduce,
    batch_norm_forward,
    batch_norm_partial_stats,
    batch_norm_stats,
    merge_stats,
)
from .layer import BatchNorm  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "batch_norm_backward",
    "batch_norm_backward_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_forward",
    "batch_norm_partial_stats",
    "batch_norm_stats",
    "merge_stats",
]
