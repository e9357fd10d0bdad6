"""Plain float64 NumPy batch normalization: the oracle the kernels are tested against.

Short and obviously right, with no concern for speed or memory.
"""

import numpy as np


def _reduced_axes(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis % x.ndim)


def _per_feature(v, x, axis):
    """A per-feature vector shaped to broadcast against ``x`` along ``axis``."""
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def xhat(x, mean, invstd, axis=1):
    """``(x - mean) * invstd`` in float64, the statistics taken along ``axis``."""
    return (np.asarray(x, dtype=np.float64) - _per_feature(mean, x, axis)) * _per_feature(invstd, x, axis)


def stats(x, axis=1):
    """Mean and biased variance per feature."""
    x = np.asarray(x, dtype=np.float64)
    axes = _reduced_axes(x, axis)
    return x.mean(axis=axes), x.var(axis=axes)


def forward(x, gamma=None, beta=None, axis=1, eps=1e-5, training=True,
            running_mean=None, running_var=None, momentum=0.1):
    """``(y, mean, invstd, new_running_mean, new_running_var)`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    features = x.shape[axis]
    gamma = np.ones(features) if gamma is None else np.asarray(gamma, dtype=np.float64)
    beta = np.zeros(features) if beta is None else np.asarray(beta, dtype=np.float64)
    new_running_mean, new_running_var = running_mean, running_var
    if training:
        mean, var = stats(x, axis)
        count = x.size // features
        if running_mean is not None:
            new_running_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
            new_running_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * var * count / (count - 1)
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    normalized = xhat(x, mean, invstd, axis)
    y = _per_feature(gamma, x, axis) * normalized + _per_feature(beta, x, axis)
    return y, mean, invstd, new_running_mean, new_running_var


def backward(dy, x, mean, invstd, gamma=None, axis=1, training=True):
    """``(dx, dgamma, dbeta)`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    features = x.shape[axis]
    gamma = np.ones(features) if gamma is None else np.asarray(gamma, dtype=np.float64)
    axes = _reduced_axes(x, axis)
    normalized = xhat(x, mean, invstd, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * normalized).sum(axis=axes)
    scale = _per_feature(gamma * invstd, x, axis)
    if training:
        count = x.size // features
        dx = scale * (dy - _per_feature(dbeta / count, x, axis) - normalized * _per_feature(dgamma / count, x, axis))
    else:
        dx = scale * dy
    return dx, dgamma, dbeta
