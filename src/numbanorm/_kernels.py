"""Numba kernels for batch normalization.

Every array a kernel sees is a C-contiguous 3-D view ``(outer, features, inner)``
of the caller's data: the feature axis in the middle, everything before it
merged into ``outer`` and everything after it into ``inner``. ``(N, C)`` and
channels-last data have ``inner == 1``; ``(N, C, H, W)`` has ``inner == H * W``.
Kernels write into their output arguments and check nothing: ``api.py`` decides
dtypes and layouts and validates before any kernel runs.

Parallel kernels split ``outer`` into ``chunks`` contiguous slabs, one per
thread, and give each slab its own row of an accumulator that is reduced
serially afterwards (the pattern of stumpy): race-free, and deterministic for a
given thread count. Statistics and sums accumulate in float64 whatever the
input dtype; the mean and variance come from a blocked two-pass (each block's
mean, then its squared deviations while the block is still in cache) merged
block by block with Chan's update, so the input is read once from memory and
``E[x**2] - E[x]**2`` never appears.
"""

import numpy as np
from numba import njit, prange

from ._config import CACHE, FASTMATH

# Elements in one block of the two-pass statistics: small enough that the second
# pass over the block finds it in L1/L2, large enough to amortize the merge.
BLOCK_ELEMENTS = 16384
# Features in one block of (N, C) data: with 16384 // 1024 = 16 rows a block, the
# per-block merge costs a sixteenth of the data's pass.
FEATURE_TILE = 1024

_options = dict(cache=CACHE, fastmath=FASTMATH, nogil=True, error_model="numpy")
jit = njit(**_options)
# Only explicit prange loops run in parallel: Numba would otherwise turn every
# small array expression (``np.zeros``, ``a[:] = 0``) into a parallel region of
# its own, each costing a thread-pool launch.
_prange_only = dict.fromkeys(("comprehension", "reduction", "inplace_binop", "setitem", "numpy", "stencil", "fusion"), False)
parallel_jit = njit(parallel=dict(_prange_only, prange=True), **_options)


@jit
def _bounds(n, chunks, t):
    """The slab ``[start, stop)`` of ``range(n)`` that chunk ``t`` of ``chunks`` owns."""
    return t * n // chunks, (t + 1) * n // chunks


@jit
def chan_merge(count, mean, m2, other_count, other_mean, other_m2):
    """Fold the statistics of one part into another, in place (Chan et al., 1979).

    ``count`` values with per-feature ``mean`` and ``m2`` (sum of squared
    deviations) absorb ``other_count`` values with ``other_mean``/``other_m2``.
    Returns the merged count.
    """
    if other_count == 0:
        return count
    total = count + other_count
    weight = other_count / total
    cross = count * weight
    for c in range(mean.shape[0]):
        delta = other_mean[c] - mean[c]
        mean[c] += delta * weight
        m2[c] += other_m2[c] + delta * delta * cross
    return total


@jit
def _block_stats(x, rows_start, rows_stop, features_start, features_stop, block_mean, block_m2):
    """Mean and m2 of one block: rows ``rows_start:rows_stop``, features ``features_start:features_stop``.

    Two passes, the second while the block is still in cache.
    """
    outer, features, inner = x.shape
    block_mean[:] = 0.0
    block_m2[:] = 0.0
    if inner == 1:
        rows = x.reshape((outer, features))
        for n in range(rows_start, rows_stop):
            for c in range(features_start, features_stop):
                block_mean[c - features_start] += rows[n, c]
        block_mean /= rows_stop - rows_start
        for n in range(rows_start, rows_stop):
            for c in range(features_start, features_stop):
                deviation = rows[n, c] - block_mean[c - features_start]
                block_m2[c - features_start] += deviation * deviation
    else:
        for n in range(rows_start, rows_stop):
            for c in range(features_start, features_stop):
                total = 0.0
                for i in range(inner):
                    total += x[n, c, i]
                block_mean[c - features_start] += total
        block_mean /= (rows_stop - rows_start) * inner
        for n in range(rows_start, rows_stop):
            for c in range(features_start, features_stop):
                centre = block_mean[c - features_start]
                total = 0.0
                for i in range(inner):
                    deviation = x[n, c, i] - centre
                    total += deviation * deviation
                block_m2[c - features_start] += total


@jit
def _slab_stats(x, start, stop, mean, m2, block_mean, block_m2):
    """Count, mean and m2 of rows ``start:stop`` of ``x``, written into ``mean``/``m2``.

    The slab is cut into blocks of about ``BLOCK_ELEMENTS`` values; wide rows
    (``inner == 1`` with many features) are also cut across the features, so
    that a block always spans several rows and its merge stays cheap.
    """
    outer, features, inner = x.shape
    tile = max(1, min(features, FEATURE_TILE)) if inner == 1 else max(1, features)
    rows_per_block = max(1, BLOCK_ELEMENTS // (tile * inner))
    count = 0.0
    mean[:] = 0.0
    m2[:] = 0.0
    for block_start in range(start, stop, rows_per_block):
        block_stop = min(block_start + rows_per_block, stop)
        block_count = float((block_stop - block_start) * inner)
        for tile_start in range(0, features, tile):
            tile_stop = min(tile_start + tile, features)
            tile_mean = block_mean[tile_start:tile_stop]
            tile_m2 = block_m2[tile_start:tile_stop]
            _block_stats(x, block_start, block_stop, tile_start, tile_stop, tile_mean, tile_m2)
            chan_merge(count, mean[tile_start:tile_stop], m2[tile_start:tile_stop], block_count, tile_mean, tile_m2)
        count += block_count
    return count


@parallel_jit
def partial_stats(x, chunks, mean, m2):
    """Per-feature mean and m2 (sum of squared deviations) of ``x`` into ``mean``/``m2``.

    Returns the number of values per feature.
    """
    outer, features, inner = x.shape
    chunks = max(1, min(chunks, outer))
    slab_count = np.zeros(chunks)
    slab_mean = np.empty((chunks, features))
    slab_m2 = np.empty((chunks, features))
    scratch = np.empty((chunks, 2, features))
    if chunks == 1:  # skip the thread pool: its start-up dominates small arrays
        slab_count[0] = _slab_stats(x, 0, outer, slab_mean[0], slab_m2[0], scratch[0, 0], scratch[0, 1])
    else:
        for t in prange(chunks):
            start, stop = _bounds(outer, chunks, t)
            slab_count[t] = _slab_stats(x, start, stop, slab_mean[t], slab_m2[t], scratch[t, 0], scratch[t, 1])
    count = 0.0
    mean[:] = 0.0
    m2[:] = 0.0
    for t in range(chunks):
        count = chan_merge(count, mean, m2, slab_count[t], slab_mean[t], slab_m2[t])
    return count


@jit
def _slab_normalize(x, start, stop, mean, scale, shift, y):
    """``y = (x - mean) * scale + shift`` on rows ``start:stop``, in float64 before the final cast."""
    outer, features, inner = x.shape
    if inner == 1:
        rows = x.reshape((outer, features))
        out_rows = y.reshape((outer, features))
        for n in range(start, stop):
            for c in range(features):
                out_rows[n, c] = (rows[n, c] - mean[c]) * scale[c] + shift[c]
    else:
        for n in range(start, stop):
            for c in range(features):
                centre = mean[c]
                factor = scale[c]
                offset = shift[c]
                for i in range(inner):
                    y[n, c, i] = (x[n, c, i] - centre) * factor + offset


@parallel_jit
def normalize(x, mean, scale, shift, chunks, y):
    """``y = (x - mean) * scale + shift`` per feature; ``y`` may be ``x`` itself."""
    outer = x.shape[0]
    chunks = max(1, min(chunks, outer))
    if chunks == 1:
        _slab_normalize(x, 0, outer, mean, scale, shift, y)
    else:
        for t in prange(chunks):
            start, stop = _bounds(outer, chunks, t)
            _slab_normalize(x, start, stop, mean, scale, shift, y)


@jit
def forward_train(x, gamma, beta, eps, chunks, y, mean, var, invstd):
    """Batch statistics of ``x`` into ``mean``/``var``/``invstd``, then ``y``.

    ``var`` is the biased variance. Returns the number of values per feature.
    """
    count = partial_stats(x, chunks, mean, var)
    var /= count
    scale = np.empty_like(gamma)
    for c in range(var.shape[0]):
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
        scale[c] = gamma[c] * invstd[c]
    normalize(x, mean, scale, beta, chunks, y)
    return count


@jit
def update_running(running_mean, running_var, mean, var, momentum, count):
    """``running = (1 - momentum) * running + momentum * batch``, in float64 before the store.

    ``var`` is the batch's biased variance; ``running_var`` takes the unbiased one.
    """
    unbiased = count / (count - 1)
    for c in range(mean.shape[0]):
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c]
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * var[c] * unbiased


@jit
def _slab_grad_sums(dy, x, start, stop, mean, sum_dy, sum_dy_xmu):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per feature over rows ``start:stop``."""
    outer, features, inner = x.shape
    sum_dy[:] = 0.0
    sum_dy_xmu[:] = 0.0
    if inner == 1:
        rows = x.reshape((outer, features))
        grad_rows = dy.reshape((outer, features))
        for n in range(start, stop):
            for c in range(features):
                grad = np.float64(grad_rows[n, c])
                sum_dy[c] += grad
                sum_dy_xmu[c] += grad * (rows[n, c] - mean[c])
    else:
        for n in range(start, stop):
            for c in range(features):
                centre = mean[c]
                total = 0.0
                total_xmu = 0.0
                for i in range(inner):
                    grad = np.float64(dy[n, c, i])
                    total += grad
                    total_xmu += grad * (x[n, c, i] - centre)
                sum_dy[c] += total
                sum_dy_xmu[c] += total_xmu


@jit
def _slab_grad_input(dy, x, start, stop, mean, dy_scale, xmu_scale, offset, dx):
    """``dx = dy * dy_scale - (x - mean) * xmu_scale - offset`` on rows ``start:stop``."""
    outer, features, inner = x.shape
    if inner == 1:
        rows = x.reshape((outer, features))
        grad_rows = dy.reshape((outer, features))
        out_rows = dx.reshape((outer, features))
        for n in range(start, stop):
            for c in range(features):
                out_rows[n, c] = grad_rows[n, c] * dy_scale[c] - (rows[n, c] - mean[c]) * xmu_scale[c] - offset[c]
    else:
        for n in range(start, stop):
            for c in range(features):
                centre = mean[c]
                a = dy_scale[c]
                b = xmu_scale[c]
                d = offset[c]
                for i in range(inner):
                    dx[n, c, i] = dy[n, c, i] * a - (x[n, c, i] - centre) * b - d


@jit
def _slab_scale(dy, start, stop, dy_scale, dx):
    """``dx = dy * dy_scale`` on rows ``start:stop`` (the inference backward)."""
    outer, features, inner = dy.shape
    if inner == 1:
        grad_rows = dy.reshape((outer, features))
        out_rows = dx.reshape((outer, features))
        for n in range(start, stop):
            for c in range(features):
                out_rows[n, c] = grad_rows[n, c] * dy_scale[c]
    else:
        for n in range(start, stop):
            for c in range(features):
                a = dy_scale[c]
                for i in range(inner):
                    dx[n, c, i] = dy[n, c, i] * a


@parallel_jit
def grad_sums(dy, x, mean, chunks, sum_dy, sum_dy_xmu):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per feature, in float64."""
    outer, features, inner = x.shape
    chunks = max(1, min(chunks, outer))
    slab_dy = np.zeros((chunks, features))
    slab_dy_xmu = np.zeros((chunks, features))
    if chunks == 1:
        _slab_grad_sums(dy, x, 0, outer, mean, slab_dy[0], slab_dy_xmu[0])
    else:
        for t in prange(chunks):
            start, stop = _bounds(outer, chunks, t)
            _slab_grad_sums(dy, x, start, stop, mean, slab_dy[t], slab_dy_xmu[t])
    for c in range(features):
        sum_dy[c] = 0.0
        sum_dy_xmu[c] = 0.0
        for t in range(chunks):
            sum_dy[c] += slab_dy[t, c]
            sum_dy_xmu[c] += slab_dy_xmu[t, c]


@parallel_jit
def grad_input(dy, x, mean, dy_scale, xmu_scale, offset, training, chunks, dx):
    """``dx = dy * dy_scale - (x - mean) * xmu_scale - offset`` per feature.

    Without ``training`` the statistics are constants and ``dx = dy * dy_scale``:
    ``x`` is not read, so a NaN in it cannot reach ``dx``.
    """
    outer = x.shape[0]
    chunks = max(1, min(chunks, outer))
    if training:
        if chunks == 1:
            _slab_grad_input(dy, x, 0, outer, mean, dy_scale, xmu_scale, offset, dx)
        else:
            for t in prange(chunks):
                start, stop = _bounds(outer, chunks, t)
                _slab_grad_input(dy, x, start, stop, mean, dy_scale, xmu_scale, offset, dx)
    else:
        if chunks == 1:
            _slab_scale(dy, 0, outer, dy_scale, dx)
        else:
            for t in prange(chunks):
                start, stop = _bounds(outer, chunks, t)
                _slab_scale(dy, start, stop, dy_scale, dx)


@jit
def grad_input_scales(invstd, gamma, sum_dy, sum_dy_xhat, count):
    """The per-feature factors of ``grad_input`` for the training backward.

    ``dx = gamma * invstd * (dy - sum_dy / count - (x - mean) * invstd * sum_dy_xhat / count)``.
    """
    dy_scale = gamma * invstd
    xmu_scale = dy_scale * invstd * sum_dy_xhat / count
    offset = dy_scale * sum_dy / count
    return dy_scale, xmu_scale, offset


@jit
def backward(dy, x, mean, invstd, gamma, training, chunks, dx, dgamma, dbeta):
    """Gradients of batch normalization into ``dx``, ``dgamma`` and ``dbeta`` (float64).

    Training: ``dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``.
    Inference (the statistics are constants): ``dx = gamma * invstd * dy``.
    """
    grad_sums(dy, x, mean, chunks, dbeta, dgamma)
    dgamma *= invstd  # sum(dy * (x - mean)) * invstd = sum(dy * xhat)
    count = x.shape[0] * x.shape[2]
    dy_scale, xmu_scale, offset = grad_input_scales(invstd, gamma, dbeta, dgamma, count)
    grad_input(dy, x, mean, dy_scale, xmu_scale, offset, training, chunks, dx)
