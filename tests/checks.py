"""Comparisons against the float64 reference, with a tolerance per dtype and a scale per check.

A tolerance is relative to the scale of the result's rounding, not to a floor such as 1
(only to the dtype's smallest normal, where the scale is zero): an absolute 1e-5 passes any
gradient of 1e-7 (``gradient_scale`` is what ``dx``'s rounding is relative to).
"""

import numpy as np

import reference

# Per-dtype tolerance on results, relative to the scale of their rounding. float16 data is
# computed in float32 and rounded to float16; float32 and float64 data are normalized in
# their own dtype, from float64 statistics and sums (the mean split in two, ``_kernels``).
# Sums over the batch (``dgamma``, ``dbeta``) come back in float32 for float16 data.
TOLERANCE = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-9}


def assert_close(actual, expected, dtype, scale=None):
    """``actual`` within the tolerance of ``dtype``, relative to ``scale`` (default: the largest finite
    |expected|), and at least to ``dtype``'s smallest normal.

    ``scale`` may be an array (one scale per value, a feature's sum for example).
    The default suits results whose values share one scale (``y``, the statistics);
    gradients take ``assert_gradient_close``.
    """
    tol = TOLERANCE[np.dtype(dtype)]
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if scale is None:
        scale = np.max(np.abs(expected), initial=0.0, where=np.isfinite(expected))
    atol = tol * np.maximum(scale, np.finfo(dtype).tiny)
    if np.ndim(atol) == 0:
        np.testing.assert_allclose(actual, expected, rtol=tol, atol=atol)
        return
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bad = ~np.isclose(actual, expected, rtol=tol, atol=atol, equal_nan=True)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} values beyond the tolerance: actual {actual[bad][:5]}, "
        f"expected {expected[bad][:5]}, atol {np.broadcast_to(atol, bad.shape)[bad][:5]}"
    )


def gradient_scale(dy, x, mean, invstd, gamma=None, axis=1, training=True):
    """Per value, the scale of ``dx``'s rounding: the sum of its feature's terms' largest magnitudes, before they cancel.

    ``dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``, so that is
    ``|gamma * invstd|`` times: the largest ``|dy|``, plus ``|mean(dy)|`` and the largest
    ``|xhat * mean(dy * xhat)|`` in training. Not the largest ``|dx|`` (``assert_close``'s
    default): where the terms cancel, ``dx`` is their rounding alone (two values a feature
    give ``dx`` of about 1e-7 in float32, from terms of order 1), and it is that rounding the
    kernels must match, relative to the terms.
    """
    features = x.shape[axis]
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    dy = np.asarray(dy, dtype=np.float64)
    terms = np.abs(dy).max(axis=axes, initial=0.0)
    if training:
        count = x.size // features
        xhat = reference.xhat(x, mean, invstd, axis)
        terms = terms + np.abs(dy.sum(axis=axes)) / count
        terms = terms + np.abs(xhat).max(axis=axes, initial=0.0) * np.abs((dy * xhat).sum(axis=axes)) / count
    gamma = np.ones(features) if gamma is None else np.asarray(gamma, dtype=np.float64)
    return np.broadcast_to(reference._per_feature(np.abs(gamma * np.asarray(invstd)) * terms, x, axis), x.shape)


def assert_gradient_close(dx, ref_dx, dtype, scale):
    """``dx`` within ``dtype``'s tolerance of ``ref_dx``, value by value, relative to ``scale`` (``gradient_scale``),
    give or take the spacing of ``dtype``'s subnormals, where the rounding of a tiny ``dx`` ends."""
    assert np.shape(dx) == np.shape(ref_dx), (np.shape(dx), np.shape(ref_dx))
    error = np.abs(np.asarray(dx, dtype=np.float64) - ref_dx)
    within = error <= TOLERANCE[np.dtype(dtype)] * scale + float(np.finfo(dtype).smallest_subnormal)
    within |= np.asarray(dx, dtype=np.float64) == ref_dx  # equal infinities, whose difference is NaN
    bad = ~within & ~(np.isnan(dx) & np.isnan(ref_dx))
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} values beyond the tolerance: actual {np.asarray(dx)[bad][:5]}, "
        f"expected {ref_dx[bad][:5]}, scale {scale[bad][:5]}"
    )


def feature_sums(a, axis):
    """Per feature, the sum of ``|a|`` over every other axis, in float64: the scale of a sum's rounding."""
    return np.moveaxis(np.abs(np.asarray(a, dtype=np.float64)), axis, -1).reshape(-1, a.shape[axis]).sum(axis=0)


def assert_backward_close(actual, expected, dtype, dy, x, mean, invstd, gamma=None, axis=1, training=True):
    """``(dx, dgamma, dbeta)`` within the tolerance of ``expected``: ``dx`` in ``dtype``'s, relative
    to ``gradient_scale``; ``dgamma`` and ``dbeta`` in their own dtype's (float32 for float16
    data), relative to each feature's sum of its terms' magnitudes."""
    dx, dgamma, dbeta = actual
    expected_dx, expected_dgamma, expected_dbeta = expected
    assert_gradient_close(dx, np.asarray(expected_dx, dtype=np.float64), dtype, gradient_scale(dy, x, mean, invstd, gamma, axis, training))
    sums_dtype = np.float32 if np.dtype(dtype) == np.float16 else dtype
    xhat = reference.xhat(x, mean, invstd, axis)
    assert_close(dgamma, expected_dgamma, sums_dtype, scale=feature_sums(np.asarray(dy, dtype=np.float64) * xhat, axis))
    assert_close(dbeta, expected_dbeta, sums_dtype, scale=feature_sums(dy, axis))
