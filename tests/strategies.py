"""Hypothesis strategies shared by the tests: shapes with a feature axis, dtypes, layouts, values."""

import math

import numpy as np
from hypothesis import strategies as st

DTYPES = (np.float16, np.float32, np.float64)
LAYOUTS = ("C", "F", "strided", "reversed", "permuted", "readonly", "unaligned")


@st.composite
def shapes_and_axes(draw, min_dims=2, max_dims=5, min_per_feature=2, max_size=3000):
    """``(shape, axis)`` with at least ``min_per_feature`` values per feature."""
    ndim = draw(st.integers(min_dims, max_dims))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    # Occasionally a long batch axis, as real batches have.
    batch = 0 if axis % ndim != 0 else 1
    shape[batch] = draw(st.one_of(st.just(shape[batch]), st.integers(2, 300)))
    # Occasionally more features than the kernels take in one tile (1024).
    if max_size >= 2200 and draw(st.integers(0, 9)) == 0:
        shape = [1] * ndim
        shape[axis] = draw(st.integers(1020, 1100))
        shape[batch] = 2
    while math.prod(shape) > max_size:  # a soft bound: the loop below may pass it a little
        largest = max(range(ndim), key=lambda i: shape[i])
        shape[largest] //= 2
    # Occasionally, where ``max_size`` is the default or more, one axis long enough to give
    # each feature more values than a block of the statistics holds (``_kernels.BLOCK_BYTES``:
    # 65536 float32 values, 32768 float64), so that blocks merge inside one call: the batch
    # of (N, C) data, the rows of channels-last data, or the spatial run of (N, C, H, W) data,
    # which the statistics cut into one block a row (``_kernels._blocked_stats``): there two
    # rows before the feature axis make two blocks. (With the feature axis first, a long run
    # is one row and one block.)
    if max_size >= 3000 and draw(st.integers(0, 19)) == 0:
        shape = [1] * ndim
        shape[axis] = draw(st.integers(1, 3))
        long = draw(st.sampled_from([i for i in range(ndim) if i != axis % ndim]))
        shape[long] = draw(st.integers(65537, 140000))  # more than a float32 block, two float64 ones
        if long > axis % ndim > 0:
            shape[0] = 2
    while math.prod(shape) // shape[axis] < min_per_feature:
        shape[batch] += 1
    return tuple(shape), axis


@st.composite
def arrays(draw, shape, dtype, low=-1000.0, high=1000.0):
    """Values of ``dtype`` in ``[low, high]``, from a seeded generator (fast for large shapes).

    Hypothesis chooses the seed and the distribution; "few-values" draws from
    five values only, so that small features are often constant or nearly so.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["uniform", "normal", "few-values"]))
    if kind == "uniform":
        values = rng.uniform(low, high, size=shape)
    elif kind == "normal":
        values = np.clip(rng.normal(0.0, (high - low) / 8, size=shape), low, high)
    else:
        values = rng.choice(np.linspace(low, high, 5), size=shape)
    return values.astype(dtype)


def with_layout(a, layout):
    """An array equal to ``a`` in the memory layout named by ``layout`` (one of ``LAYOUTS``).

    "permuted" moves the axes in memory (for 2-D arrays that is Fortran order).
    "unaligned" is C-contiguous but one byte into its buffer, so that its address
    is not a multiple of its itemsize (as ``np.frombuffer(..., offset=1)`` or a
    memory map of a file with an odd-sized header gives); it stays writeable.
    """
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":
        padded = np.zeros((2 * a.shape[0],) + a.shape[1:], dtype=a.dtype)
        padded[::2] = a
        return padded[::2]
    if layout == "reversed":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if layout == "permuted":
        order = tuple(range(1, a.ndim)) + (0,)  # the first axis varies fastest in memory
        return np.ascontiguousarray(a.transpose(order)).transpose(np.argsort(order))
    if layout == "unaligned":
        buffer = np.zeros(a.nbytes + 1, dtype=np.uint8)
        b = buffer[1:].view(a.dtype).reshape(a.shape)
        b[...] = a
        assert not b.flags.aligned or a.size == 0
        return b
    if layout == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    raise ValueError(f"unknown layout {layout!r}")

