"""Batch normalization of dask arrays: per-chunk statistics, a tree reduction, a blockwise pass.

Needs the optional extra ``dask`` (``pip install "numbanorm[dask]"``).

The array may be chunked along every axis but the feature axis. Each chunk's
``(count, mean, m2)`` comes from :func:`numbanorm.batch_norm_partial_stats`
(the Numba kernels, run by the workers), the chunks' statistics are merged in a
tree with :func:`numbanorm.merge_stats`, and every chunk is then normalized
with the merged statistics. The backward is built the same way from
:func:`numbanorm.batch_norm_backward_reduce` (summed in a tree) and
:func:`numbanorm.batch_norm_backward_elemt`. Nothing is computed until the
caller computes (or persists) a result, and the results equal those of the
in-memory functions on the same data to the core tolerances.
"""

import math
import numbers
from functools import partial

import numpy as np

try:
    import dask.array as da
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"numbanorm.dask needs dask ({error}): pip install 'numbanorm[dask]'", name=error.name) from error

from . import api
from .api import _feature_axis, _flag, _number

__all__ = [
    "batch_norm_partial_stats",
    "batch_norm_stats",
    "batch_norm_forward",
    "batch_norm_backward",
]

_SPLIT_EVERY = 16


# --- argument checks -------------------------------------------------------------------


def _array(a, name):
    """``a`` as a dask array of real numbers; anything else (a NumPy array) as one chunk.

    One chunk, not dask's automatic chunking, which may cut a large array along
    its feature axis: the kernels parallelize an in-memory array themselves.
    """
    if not isinstance(a, da.Array):
        a = da.from_array(api._unmasked_array(a, name), chunks=-1)
    if a.dtype.kind not in "biuf" or a.dtype.itemsize > 8:
        raise TypeError(
            f"{name} must hold real numbers (float16, float32, float64, integer or bool), got dtype {a.dtype}"
        )
    return a


def _result_dtype(*dtypes):
    """The dtype the in-memory API returns for inputs of ``dtypes``: integers and bools count as float64."""
    return np.result_type(*(dtype if dtype.kind == "f" else np.float64 for dtype in dtypes))


def _checked_axis(axis, x):
    """The feature axis of ``x``, which must lie in a single chunk of known size."""
    axis = _feature_axis(axis, x)
    if math.isnan(x.shape[axis]):
        raise ValueError(
            f"x must have a known size along the feature axis {axis}, got shape {x.shape}; "
            "call x.compute_chunk_sizes() first"
        )
    if len(x.chunks[axis]) != 1:
        raise ValueError(
            f"x must have a single chunk along the feature axis {axis}, got chunks {x.chunks[axis]}; "
            f"rechunk it with x.rechunk({{{axis}: -1}})"
        )
    return axis


def _check_same_shape(dy, x):
    """Refuse a ``dy`` whose shape is not ``x``'s, saying so when an unknown (NaN) size is why."""
    if not _same_shape(dy.shape, x.shape):
        unknown = any(math.isnan(size) for size in dy.shape + x.shape)
        hint = (
            "; an unknown size (nan) matches only an unknown one: call compute_chunk_sizes() on the array whose sizes are unknown"
            if unknown
            else ""
        )
        raise ValueError(f"dy must have the shape of x, {x.shape}, got {dy.shape}{hint}")


def _same_shape(shape, other):
    """Whether two dask shapes agree, an unknown (NaN) size agreeing with another unknown one."""
    return len(shape) == len(other) and all(
        a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(shape, other)
    )


def _vector(v, name, features):
    """A per-feature argument as a single-chunk float64 dask array of shape ``(features,)``."""
    if isinstance(v, da.Array):
        if v.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers, got dtype {v.dtype}")
        if v.shape != (features,):
            raise ValueError(f"{name} must have shape ({features},), got {v.shape}")
        return v.astype(np.float64).rechunk(-1)
    return da.from_array(api._per_feature(v, name, features), chunks=-1)


def _split_every(split_every):
    if split_every is None:
        return _SPLIT_EVERY
    if isinstance(split_every, (bool, np.bool_)) or not isinstance(split_every, numbers.Integral):
        raise TypeError(f"split_every must be an integer, got {split_every!r}")
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    return int(split_every)


# --- graph building --------------------------------------------------------------------


def _reduce_blocks(block_function, arrays, vectors, feature_axis, rows, merge, split_every):
    """``block_function`` on matching blocks of ``arrays``, merged in a tree, as a dask array of shape ``rows``.

    ``block_function(*blocks, *vectors)`` returns a float64 array of shape
    ``rows``; ``vectors`` are single-chunk ``(features,)`` arrays passed whole
    to every call. ``merge`` takes such results stacked along a first axis and
    returns theirs, of shape ``rows``. The block results form one dask array,
    one entry of shape ``rows`` per block (a single graph layer), which
    :func:`dask.array.reduction` merges in a tree of fan-in ``split_every``:
    the graph takes time linear in the number of blocks to build. (A
    ``dask.delayed`` call per block merged every earlier graph layer into its
    own: 49 s to build the backward of 8000 blocks.) A block's result has size
    1 along each axis of ``arrays``, so chunks of unknown size need no special case.
    """
    index, arguments = _blockwise_arguments(arrays, vectors, feature_axis)
    ndim = len(index)
    new_axes = {ndim + i: size for i, size in enumerate(rows)}
    parts = da.blockwise(
        partial(_block_result, block_function, ndim),
        index + tuple(new_axes),
        *arguments,
        new_axes=new_axes,
        adjust_chunks=dict.fromkeys(index, 1),
        dtype=np.float64,
        meta=np.empty((0,) * (ndim + len(rows))),
    )
    # The fan-in is shared among the axes that have several blocks (dask shares it among all).
    chunked = [axis for axis in index if parts.numblocks[axis] > 1]
    fan_in = _fan_in(split_every, len(chunked))
    return da.reduction(
        parts,
        chunk=_unchanged,
        combine=partial(_merge_results, merge),
        aggregate=partial(_merge_results, merge),
        axis=index,
        dtype=np.float64,
        split_every={axis: fan_in if axis in chunked else 1 for axis in index},
        meta=np.empty((0,) * len(rows)),
    )


def _fan_in(split_every, axes):
    """The fan-in of each of ``axes`` reduced axes: the largest ``r`` with ``r ** axes <= split_every``, 2 at least.

    In integers: ``int(64 ** (1 / 3))`` is 3, the float root being 3.9999999999999996.
    """
    axes = max(1, axes)
    root = max(2, round(split_every ** (1 / axes)))
    while root > 2 and root**axes > split_every:
        root -= 1
    while (root + 1) ** axes <= split_every:
        root += 1
    return root


def _block_result(block_function, ndim, *arguments):
    result = block_function(*arguments)
    return result.reshape((1,) * ndim + result.shape)


def _unchanged(parts, axis, keepdims):
    return parts


def _merge_results(merge, parts, axis, keepdims):
    """``merge`` of the block results in ``parts`` (blocks along ``axis``, the leading axes)."""
    # The count of results spelled out: ``-1`` cannot be inferred when they are empty (no features).
    merged = merge(parts.reshape((math.prod(parts.shape[: len(axis)]),) + parts.shape[len(axis) :]))
    return merged.reshape((1,) * len(axis) + merged.shape) if keepdims else merged


def _blockwise(block_function, arrays, vectors, feature_axis, dtype):
    """``block_function(*blocks, *vectors)`` over the matching blocks of ``arrays``.

    ``arrays`` share one shape; ``vectors`` are single-chunk ``(features,)``
    arrays, each passed whole to every call. The result has ``dtype``.
    """
    index, arguments = _blockwise_arguments(arrays, vectors, feature_axis)
    return da.blockwise(block_function, index, *arguments, dtype=dtype, meta=np.empty((0,) * len(index), dtype))


def _blockwise_arguments(arrays, vectors, feature_axis):
    """The index of ``arrays``' axes, and ``arrays`` and ``vectors`` each followed by its index, for ``da.blockwise``."""
    index = tuple(range(arrays[0].ndim))
    arguments = []
    for a in arrays:
        arguments += [a, index]
    for v in vectors:
        arguments += [v, (feature_axis,)]
    return index, arguments


def _values_per_feature(shape, axis):
    """How many values of an array of ``shape`` each feature has (NaN for an unknown size)."""
    return math.prod(shape[:axis] + shape[axis + 1 :])


# --- statistics ------------------------------------------------------------------------


def _stats_block(x, axis):
    return np.stack(api.batch_norm_partial_stats(x, axis=axis))


def _at_least_one_value(count):
    """``count``, once checked: the statistics need a value per feature (what unknown chunk sizes hid)."""
    if count.size and count[0] < 1:
        raise ValueError("x must have at least 1 value per feature, got 0")
    return count


def _after_check(value, checked_count):
    """``value``, computed only once ``checked_count`` has passed its check."""
    return value


def _checked(mean, count, check):
    """``mean`` and ``count``, both computed only once ``check(count)`` has passed.

    An unknown chunk size hides how many values each feature has until the
    count is computed: the mean, too, must then raise rather than be 0.
    """
    count = count.map_blocks(check, dtype=np.float64)
    return da.map_blocks(_after_check, mean, count, dtype=np.float64), count


def _merge_stats_blocks(parts):
    return np.stack(api.merge_stats(list(parts)))


def batch_norm_partial_stats(x, *, axis=1, split_every=None):
    """Mergeable statistics of a dask array: per-feature count, mean and m2, lazily.

    Each chunk's statistics come from :func:`numbanorm.batch_norm_partial_stats`
    and are merged in a tree with :func:`numbanorm.merge_stats`. The results can
    be merged further with the statistics of other arrays.

    Parameters
    ----------
    x : dask.array.Array or array_like, at least 2-D
        Real data, chunked along any axes but the feature axis.
    axis : int, default 1
        The feature axis.
    split_every : int, optional
        How many parts one node of the reduction tree merges (default 16).

    Returns
    -------
    count, mean, m2 : dask.array.Array of float64, shape ``(x.shape[axis],)``
        Lazy; ``m2 / count`` is the biased variance.

    Raises
    ------
    TypeError
        ``x`` does not hold real numbers; ``axis`` or ``split_every`` is not an integer.
    ValueError
        ``x`` has fewer than 2 dimensions or several chunks or an unknown size along the feature axis;
        ``split_every < 2``.
    numpy.exceptions.AxisError
        ``axis`` is out of range.

    Examples
    --------
    >>> import dask.array as da, numbanorm.dask
    >>> x = da.arange(12.0, chunks=4).reshape(6, 2)
    >>> count, mean, m2 = numbanorm.dask.batch_norm_partial_stats(x)
    >>> mean.compute(), (m2 / count).compute()
    (array([5., 6.]), array([11.66666667, 11.66666667]))
    """
    x = _array(x, "x")
    axis = _checked_axis(axis, x)
    stats = _reduce_blocks(
        partial(_stats_block, axis=axis), [x], [], axis, (3, x.shape[axis]), _merge_stats_blocks, _split_every(split_every)
    )
    return stats[0], stats[1], stats[2]


def batch_norm_stats(x, *, axis=1, split_every=None):
    """Per-feature mean and biased variance of a dask array, lazily.

    Parameters
    ----------
    x : dask.array.Array or array_like, at least 2-D
        Real data, chunked along any axes but the feature axis.
    axis : int, default 1
        The feature axis.
    split_every : int, optional
        Fan-in of the reduction tree (default 16).

    Returns
    -------
    mean, var : dask.array.Array of float64, shape ``(x.shape[axis],)``

    Raises
    ------
    As :func:`batch_norm_partial_stats`; ``ValueError`` when ``x`` has no values
    per feature (when computed, if its chunk sizes are unknown).

    Examples
    --------
    >>> import dask.array as da, numbanorm.dask
    >>> x = da.from_array([[1.0, 10.0], [3.0, 30.0]], chunks=(1, 2))
    >>> mean, var = numbanorm.dask.batch_norm_stats(x)
    >>> mean.compute(), var.compute()
    (array([ 2., 20.]), array([  1., 100.]))
    """
    count, mean, m2 = batch_norm_partial_stats(x, axis=axis, split_every=split_every)
    if _values_per_feature(x.shape, axis) == 0:  # a NaN (unknown chunk sizes) passes, as in the forward
        raise ValueError(f"x must have at least 1 value per feature, got shape {x.shape}")
    mean, count = _checked(mean, count, _at_least_one_value)
    return mean, m2 / count


# --- forward and backward --------------------------------------------------------------


def _at_least_two_values(count):
    """``count``, once checked: training needs more than 1 value per feature (what unknown chunk sizes hid)."""
    if count.size and count[0] < 2:
        raise ValueError(f"x must have more than 1 value per feature in training, got {count[0]:g}")
    return count


def _normalize_block(x, mean, var, gamma, beta, *, axis, eps, dtype):
    y, _, _ = api.batch_norm_forward(
        x, gamma, beta, axis=axis, eps=eps, training=False, running_mean=mean, running_var=var
    )
    return y.astype(dtype, copy=False)


def batch_norm_forward(
    x,
    gamma=None,
    beta=None,
    *,
    axis=1,
    eps=1e-5,
    training=True,
    running_mean=None,
    running_var=None,
    split_every=None,
):
    """Batch normalization of a dask array: ``y = gamma * (x - mean) / sqrt(var + eps) + beta``.

    In training the statistics of the whole array come from a tree reduction of
    the chunks' statistics; every chunk is then normalized with them. The result
    equals :func:`numbanorm.batch_norm_forward` on the computed array.

    Parameters
    ----------
    x : dask.array.Array or array_like, at least 2-D
        Real data, chunked along any axes but the feature axis.
        float16/32/64 keep their dtype; integers and bools give float64.
    gamma, beta : array_like, shape ``(x.shape[axis],)``, optional
        Scale and shift (NumPy or dask arrays); ``None`` means 1 and 0.
    axis : int, default 1
        The feature axis.
    eps : float, default 1e-5
        Added to the variance; non-negative.
    training : bool, default True
        True normalizes with the array's statistics, False with ``running_mean``
        and ``running_var``.
    running_mean, running_var : array_like, shape ``(x.shape[axis],)``, optional
        Required in inference (``training=False``) and refused in training: a
        lazy computation cannot update them in place. To update them, compute
        :func:`batch_norm_partial_stats` (count, mean, m2) alongside ``y`` and
        apply ``new = (1 - momentum) * old + momentum * batch`` with the
        unbiased variance ``m2 / (count - 1)``.
    split_every : int, optional
        Fan-in of the reduction tree (default 16).

    Returns
    -------
    y : dask.array.Array
        Shape and chunks of ``x``; dtype of ``x`` (float64 for integer input).
    mean, invstd : dask.array.Array of float64, shape ``(x.shape[axis],)``
        The statistics used, ``invstd = 1 / sqrt(var + eps)``: what
        :func:`batch_norm_backward` takes.

    Raises
    ------
    TypeError
        ``x`` does not hold real numbers; ``axis``, ``eps``, ``training`` or ``split_every``
        has the wrong type.
    ValueError
        Wrong shapes; several chunks or an unknown size along the feature axis; ``eps < 0``; fewer
        than 2 values per feature in training; running statistics given in
        training or missing in inference.
    numpy.exceptions.AxisError
        ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np, dask.array as da, numbanorm.dask
    >>> x = da.from_array(np.array([[1.0, 2.0], [3.0, 6.0]], dtype=np.float32), chunks=(1, 2))
    >>> y, mean, invstd = numbanorm.dask.batch_norm_forward(x, eps=0.0)
    >>> y.compute()
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    """
    x = _array(x, "x")
    axis = _checked_axis(axis, x)
    features = x.shape[axis]
    eps = _number(eps, "eps", 0.0, math.inf)
    training = _flag(training, "training")
    split_every = _split_every(split_every)  # checked in inference too, which does not use it
    gamma = _vector(np.ones(features) if gamma is None else gamma, "gamma", features)
    beta = _vector(np.zeros(features) if beta is None else beta, "beta", features)
    if training:
        if running_mean is not None or running_var is not None:
            raise ValueError(
                "running_mean and running_var cannot be updated in place by a lazy computation: "
                "pass neither in training, and update them from batch_norm_partial_stats(x)"
            )
        # A NaN (unknown chunk sizes) passes here, and is checked when computed.
        if _values_per_feature(x.shape, axis) < 2:
            raise ValueError(
                f"x must have more than 1 value per feature in training, got shape {x.shape} "
                f"with feature axis {axis}"
            )
        count, mean, m2 = batch_norm_partial_stats(x, axis=axis, split_every=split_every)
        mean, count = _checked(mean, count, _at_least_two_values)
        var = m2 / count
    else:
        if running_mean is None or running_var is None:
            raise ValueError("inference (training=False) needs running_mean and running_var")
        mean = _vector(running_mean, "running_mean", features)
        var = _vector(running_var, "running_var", features)
    invstd = 1.0 / da.sqrt(var + eps)
    dtype = _result_dtype(x.dtype)
    normalize = partial(_normalize_block, axis=axis, eps=eps, dtype=dtype)
    y = _blockwise(normalize, [x], [mean, var, gamma, beta], axis, dtype)
    return y, mean, invstd


def _reduce_block(dy, x, mean, invstd, *, axis):
    sum_dy, sum_dy_xhat = api.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    # The count rides along so that chunks of unknown size need no special case.
    return np.stack([sum_dy, sum_dy_xhat, np.full_like(sum_dy, _values_per_feature(x.shape, axis))])


def _sum_blocks(parts):
    return parts.sum(axis=0)


def _grad_input_block(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, *, axis, dtype):
    if x.size == 0:  # every block is empty when the count is 0, which elemt refuses
        return np.empty(x.shape, dtype)
    dx = api.batch_norm_backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count[0], axis=axis)
    return dx.astype(dtype, copy=False)


def _inference_grad_input_block(dy, mean, invstd, gamma, *, axis, dtype):
    # dx = dy * gamma * invstd: the inference backward reads no x, and dy in dx's dtype stands in for it.
    dy = dy.astype(dtype, copy=False)
    dx, _, _ = api.batch_norm_backward(dy, dy, mean, invstd, gamma, axis=axis, training=False)
    return dx.astype(dtype, copy=False)


def batch_norm_backward(dy, x, mean, invstd, gamma=None, *, axis=1, training=True, split_every=None):
    """Gradients of :func:`batch_norm_forward` with respect to ``x``, ``gamma`` and ``beta``, lazily.

    ``sum(dy)`` and ``sum(dy * xhat)`` are reduced over the chunks in a tree
    (:func:`numbanorm.batch_norm_backward_reduce`), then every chunk's ``dx``
    comes from :func:`numbanorm.batch_norm_backward_elemt`.

    Parameters
    ----------
    dy, x : dask.array.Array or array_like
        The gradient of the loss with respect to ``y``, and the forward's input;
        same shape, chunked along any axes but the feature axis (``dy`` is
        rechunked like ``x`` where their chunks differ).
    mean, invstd : array_like, shape ``(x.shape[axis],)``
        The statistics :func:`batch_norm_forward` returned (dask or NumPy arrays).
    gamma : array_like, shape ``(x.shape[axis],)``, optional
        The forward's scale; ``None`` means 1.
    axis : int, default 1
        The feature axis.
    training : bool, default True
        As in the forward: True differentiates through the batch statistics;
        False treats them as constants.
    split_every : int, optional
        Fan-in of the reduction tree (default 16).

    Returns
    -------
    dx : dask.array.Array
        Shape and chunks of ``x``; dtype of ``x`` and ``dy`` promoted together.
    dgamma, dbeta : dask.array.Array, shape ``(x.shape[axis],)``
        ``sum(dy * xhat)`` and ``sum(dy)``, in the dtype of ``dx`` (float32 for
        float16, whose range a sum over a batch overflows), as
        :func:`numbanorm.batch_norm_backward` returns them.

    Raises
    ------
    TypeError
        Non-real data; ``axis`` or ``split_every`` is not an integer; ``training``
        is not a bool.
    ValueError
        Wrong shapes; several chunks or an unknown size along the feature axis.
    numpy.exceptions.AxisError
        ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np, dask.array as da, numbanorm.dask
    >>> x = da.from_array(np.array([[1.0], [3.0]]), chunks=1)
    >>> y, mean, invstd = numbanorm.dask.batch_norm_forward(x, eps=0.0)
    >>> dy = da.from_array(np.array([[1.0], [0.0]]), chunks=1)
    >>> dx, dgamma, dbeta = numbanorm.dask.batch_norm_backward(dy, x, mean, invstd)
    >>> dx.compute().ravel(), dgamma.compute(), dbeta.compute()
    (array([0., 0.]), array([-1.]), array([1.]))
    """
    x = _array(x, "x")
    dy = _array(dy, "dy")
    axis = _checked_axis(axis, x)
    _check_same_shape(dy, x)
    training = _flag(training, "training")
    features = x.shape[axis]
    mean = _vector(mean, "mean", features)
    invstd = _vector(invstd, "invstd", features)
    gamma = _vector(np.ones(features) if gamma is None else gamma, "gamma", features)
    if dy.chunks != x.chunks:
        dy = dy.rechunk(x.chunks)
    dtype = _result_dtype(x.dtype, dy.dtype)
    sums = _reduce_blocks(
        partial(_reduce_block, axis=axis), [dy, x], [mean, invstd], axis, (3, features), _sum_blocks, _split_every(split_every)
    )
    sum_dy, sum_dy_xhat, count = sums[0], sums[1], sums[2]
    if training:
        grad_input = partial(_grad_input_block, axis=axis, dtype=dtype)
        dx = _blockwise(grad_input, [dy, x], [mean, invstd, gamma, sum_dy, sum_dy_xhat, count], axis, dtype)
    else:
        # Element-wise: each block of dx waits for its block of dy only, not for the sums (nor reads x).
        grad_input = partial(_inference_grad_input_block, axis=axis, dtype=dtype)
        dx = _blockwise(grad_input, [dy], [mean, invstd, gamma], axis, dtype)
    sums_dtype = api._compute_dtype(dtype)
    return dx, sum_dy_xhat.astype(sums_dtype), sum_dy.astype(sums_dtype)
