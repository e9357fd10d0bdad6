"""The functional API: validation, dtypes and layouts around the kernels.

Every argument is checked here, once, before any kernel runs. The arrays are
then brought into the kernels' canonical layout, a C-contiguous
``(outer, features, inner)`` view, without copying whenever such a view exists:
C-ordered arrays directly, Fortran-ordered ones through their transpose. Data
is copied only when the kernels cannot read it as it is: other layouts (sliced,
negative strides), float16 (computed in float32), integers and bools (float64),
non-native byte order, and in a mixed-precision backward the lower-precision
array. An ``out`` the kernels cannot write directly receives a copy.

A new result of 1 MiB to 32 MiB is usually a view into a buffer one cache line
longer, placed at the input's offset within a line (``_new_output``): its
values, dtype, shape and order are as any other result's, but ``owndata`` is
False and ``ndarray.resize`` refuses it. Pass ``out`` for an array of your own.
"""

import math
import numbers

import numba
import numpy as np
from numpy.exceptions import AxisError

from . import _kernels
from ._config import PARALLEL_MIN_BYTES, STREAM_MIN_BYTES, check_threading_layer

__all__ = [
    "batch_norm_stats",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_partial_stats",
    "merge_stats",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
]


# --- argument checks -------------------------------------------------------------------


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


def _data(a, name):
    """``a`` as an ndarray of float16/32/64 (integers and bools become float64)."""
    if type(a) is np.ndarray and (a.dtype is _FLOAT32 or a.dtype is _FLOAT64):
        return a  # the common case, checked in a fraction of the time (small arrays feel it)
    a = _unmasked_array(a, name)
    kind = a.dtype.kind
    # A copy is Fortran-ordered only when ``a`` is (order "A"), as the kernels' own copies are.
    if kind == "f" and a.dtype.itemsize <= 8:
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="), order="A")
    if kind in "biu":
        return a.astype(np.float64, order="A")
    raise TypeError(
        f"{name} must hold real numbers (float16, float32, float64, integer or bool), got dtype {a.dtype}"
    )


def _refuse_masked(a, name, written=False):
    """Refuse a masked array with masked values: ``np.asarray`` keeps the values under the
    mask. Read, they would enter the computation; ``written`` (``out``, a running statistic),
    the mask would hide what the call writes under it."""
    if type(a) is not np.ndarray and np.ma.is_masked(a):
        if written:
            raise TypeError(
                f"{name} is a masked array with masked values, which would hide what is written "
                f"under them: pass {name}.data, or unmask it first ({name}.mask = False)"
            )
        raise TypeError(
            f"{name} is a masked array with masked values, which would be used as they are: "
            "fill them first (.filled(value)), or pass the unmasked values only"
        )


def _as_array(a, name):
    """``np.asarray(a)``, its failure named: a ragged nested list, say."""
    try:
        return np.asarray(a)
    except ValueError as error:
        raise ValueError(f"{name} does not convert to an array: {error}") from None


def _unmasked_array(a, name):
    """``_as_array(a, name)`` of an input that is read: not a masked array with masked values."""
    _refuse_masked(a, name)
    return _as_array(a, name)


def _feature_axis(axis, x):
    """``axis`` as a non-negative index into ``x.shape``; ``x`` has at least 2 dimensions."""
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch and features), got shape {x.shape}")
    if type(axis) is not int:  # the exact type first: the ABC check costs a microsecond
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        axis = int(axis)
    if not -x.ndim <= axis < x.ndim:
        raise AxisError(axis, x.ndim, "axis")
    return axis % x.ndim


def _number(value, name, low, high):
    """``value`` as a float in ``[low, high]``."""
    if type(value) is not float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float's range, such as 10**400
            raise ValueError(f"{name} must be a number that a float can hold, got a {type(value).__name__} beyond its range") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _flag(value, name):
    """``value`` as a bool; anything but ``bool`` and ``numpy.bool_`` is refused (``"no"`` would mean True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _per_feature(v, name, features, float32=False):
    """``v`` as a C-contiguous float64 array of shape ``(features,)``.

    ``float32``: a C-contiguous float32 ndarray is returned as it is (for the
    small kernels that compile for either: a conversion costs small arrays).
    """
    if type(v) is np.ndarray and v.shape == (features,):
        if v.dtype is _FLOAT64 or (float32 and v.dtype is _FLOAT32):
            flags = v.flags
            if flags.c_contiguous and flags.aligned:
                return v
        if v.dtype is _FLOAT32:
            return v.astype(np.float64)  # a new C-contiguous, aligned array
    v = _unmasked_array(v, name)
    if v.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {v.dtype}")
    if v.shape != (features,):
        raise ValueError(f"{name} must have shape ({features},), got {v.shape}")
    v = np.ascontiguousarray(v, dtype=np.float64)
    return v if v.flags.aligned else v.copy()


def _running_pair(running_mean, running_var, features):
    """Check that the running statistics are two arrays that training can update in place."""
    _running(running_mean, "running_mean", features)
    _running(running_var, "running_var", features)
    if np.shares_memory(running_mean, running_var):  # exact: interleaved columns of one array are fine
        raise ValueError("running_mean and running_var must not share memory: both are updated in place")


def _running(v, name, features):
    """Check that ``v`` is a running statistic that training can update in place."""
    if type(v) is np.ndarray and (v.dtype is _FLOAT32 or v.dtype is _FLOAT64) and v.shape == (features,):
        if v.flags.writeable:
            return
    if not isinstance(v, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array (training updates it in place), got {type(v).__name__}")
    if v.dtype.kind != "f" or v.dtype.itemsize > 8:
        raise TypeError(f"{name} must have dtype float16, float32 or float64, got {v.dtype}")
    if v.shape != (features,):
        raise ValueError(f"{name} must have shape ({features},), got {v.shape}")
    if not v.flags.writeable:
        raise ValueError(f"{name} is read-only, but training updates it in place")
    _refuse_masked(v, name, written=True)


def _ones(features, dtype=_FLOAT64):
    """An absent ``gamma``: a new array of ones (``np.ones`` takes three times as long, 0.6 µs)."""
    ones = np.empty(features, dtype)
    ones.fill(1.0)
    return ones


def _compute_dtype(dtype):
    """The dtype the kernels see: float16 is computed in float32."""
    if dtype is _FLOAT32 or dtype is _FLOAT64:
        return dtype
    return _FLOAT32 if dtype == np.float16 else dtype


# --- layouts ---------------------------------------------------------------------------


def _transposes(a):
    """Whether ``a`` reaches the canonical layout through its transpose (Fortran order)."""
    return not a.flags.c_contiguous and a.flags.f_contiguous


def _shape3(shape, axis):
    """``(outer, features, inner)``: the axes before ``axis`` merged, ``axis``, the axes after it merged."""
    if axis == 1 and len(shape) == 2:  # (N, C): without the slices and products, which small arrays feel
        return shape[0], shape[1], 1
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def _to_3d(a, axis, transposed, dtype, shape3=None):
    """The ``(outer, features, inner)`` C-contiguous array of ``a`` in ``dtype``; a view when possible.

    ``shape3``: ``_shape3(a.shape, axis)``, when the caller has it.
    """
    if not transposed and a.dtype is dtype:
        flags = a.flags
        if flags.c_contiguous and flags.aligned:  # the common case, without a call that changes nothing
            return a.reshape(shape3 or _shape3(a.shape, axis))
    if transposed:
        a, axis = a.T, a.ndim - 1 - axis
    a = np.ascontiguousarray(a, dtype=dtype)
    if not a.flags.aligned:  # as ``_view_3d``; a copy also spares a compilation for unaligned arrays
        a = a.copy()
    return a.reshape(_shape3(a.shape, axis))


def _view_3d(a, axis, transposed, dtype):
    """Like ``_to_3d`` for an output, but ``None`` where only a copy would do.

    An array whose address is not a multiple of its itemsize (a buffer read at
    an odd offset, ``np.frombuffer(..., offset=1)``) is not aligned for the
    kernels: their vector stores need a 32- or 64-byte boundary, which whole values
    from such an address never reach.
    """
    if a.dtype != dtype or not a.flags.aligned:
        return None
    if transposed:
        a, axis = a.T, a.ndim - 1 - axis
    if not a.flags.c_contiguous:
        return None
    return a.reshape(_shape3(a.shape, axis))


def _from_3d(a3, shape, transposed):
    """The inverse of ``_to_3d``: ``a3`` seen with ``shape`` (and the same memory order)."""
    return a3.reshape(shape[::-1]).T if transposed else a3.reshape(shape)


def _output(out, x, sources, axis, transposed, dtype):
    """Where the kernel writes: a 3-D view of ``out`` when it has one, else a new array.

    ``sources`` are the 3-D arrays the kernel reads (all of ``x``'s shape and
    the compute dtype); ``out`` may be one of them, but not overlap one in part.
    """
    compute = sources[0].dtype
    if out is None:
        return _new_output(sources[0])
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"out must have shape {x.shape}, got {out.shape}")
    if out.dtype.newbyteorder("=") != dtype:  # any byte order: a non-native out receives a copy
        raise TypeError(f"out must have dtype {dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    _refuse_masked(out, "out", written=True)
    # The kernels write through a plain ndarray view: Numba compiles for no subclass
    # (np.memmap, np.matrix, a masked array with nothing masked), and ``out`` is returned as given.
    out3 = _view_3d(np.asarray(out), axis, transposed, compute)
    # The kernels are element-wise where they write: writing through the view is safe when it
    # shares nothing with a source or is that source itself (all are C-contiguous with one
    # shape, so the same start means the same elements).
    if out3 is None or any(
        np.may_share_memory(out3, source) and out3.ctypes.data != source.ctypes.data for source in sources
    ):
        return _new_output(sources[0])
    return out3


# From this size a new output starts where its first source does within a cache line
# (``_kernels.new_like``): the call costs about 0.4 µs more than ``np.empty``.
ALIGNED_OUTPUT_MIN_BYTES = 2**20


def _new_output(source3):
    """A new array like the 3-D ``source3``, for a kernel to write.

    Not from Numba's allocator near ``FRESH_PAGES_BYTES``: the line it adds
    would take a 32 MiB array past glibc's mmap threshold, onto fresh pages at
    each call, and without the huge pages NumPy asks for (the inference of
    4096x1024 float64 took 2.15-2.5x the time).
    """
    if not ALIGNED_OUTPUT_MIN_BYTES <= source3.nbytes <= FRESH_PAGES_BYTES - FRESH_PAGES_MARGIN:
        return np.empty(source3.shape, dtype=source3.dtype)
    return _kernels.new_like(source3)


def _finish(y3, out, shape, transposed, dtype):
    """The caller's result from the kernel's output ``y3``."""
    if out is None and not transposed and y3.dtype is dtype:
        return y3.reshape(shape)
    y = _from_3d(y3, shape, transposed)
    if out is None:
        return y.astype(dtype, copy=False)
    if not np.may_share_memory(y, out):
        out[...] = y
    return out


# Above this size glibc's malloc hands out fresh pages (its mmap threshold at most), which
# the kernel zeroes through the cache when they are first touched.
FRESH_PAGES_BYTES = 32 * 2**20
# How far below FRESH_PAGES_BYTES ``_new_output`` stops taking Numba's allocator: room for
# the line ``new_like`` adds and for the allocators' own headers, with plenty to spare.
FRESH_PAGES_MARGIN = 2**16


def _stream(out3, sources, forward_into_new=False):
    """Whether a kernel writes ``out3`` with non-temporal stores (``NUMBANORM_STREAM_MIN_BYTES``).

    Only ``(N, C)`` and channels-last outputs (``inner == 1``) are streamed.
    Not an output in place of one of the kernel's ``sources``: its lines are
    in cache, just read, and streaming over them was 0.85-0.98x as fast. Not a
    forward's new output above ``FRESH_PAGES_BYTES``: its lines are in cache
    too, zeroed, and streaming over them was 0.89-1.05x as fast (into a reused
    ``out``, 1.16-1.52x; a backward's new ``dx``, 1.00-1.19x).
    """
    if out3.nbytes < STREAM_MIN_BYTES or out3.shape[2] != 1 or not out3.flags.aligned:
        return False
    if any(out3.ctypes.data == source.ctypes.data for source in sources):
        return False
    return not (forward_into_new and out3.nbytes > FRESH_PAGES_BYTES)


_read_num_threads = None  # the thread count's getter, bound at the first parallel call (``_chunks``)


def _chunks(nbytes):
    """How many slabs a kernel splits the work into: one thread for small arrays.

    Otherwise ``numba.get_num_threads()``, read without its lock: once the
    pool has started, the public function takes a process-wide lock and then
    calls the threading layer's getter (the calling thread's count, which
    ``numba.set_num_threads`` sets). With hot caches the lock took 0.35 µs of
    the call's 0.5 µs; right after a kernel, the call takes about twice as long.
    """
    global _read_num_threads
    if nbytes < PARALLEL_MIN_BYTES:
        return 1
    if _read_num_threads is None:
        # A thread that calls during the check takes the public function: one check, one warning.
        _read_num_threads = numba.get_num_threads
        check_threading_layer()  # starts the pool, which binds the getter
        _read_num_threads = _thread_count_getter()
    threads = _read_num_threads()
    return threads if threads > 0 else numba.get_num_threads()  # the public call says what broke


def _thread_count_getter():
    """The threading layer's own ``get_num_threads`` (private to Numba), or the public function."""
    from numba.np.ufunc import parallel

    getter = getattr(parallel, "_get_num_threads", None)
    return getter if callable(getter) else numba.get_num_threads


# --- the API ---------------------------------------------------------------------------


def batch_norm_stats(x, *, axis=1):
    """Per-feature mean and biased variance of ``x``.

    Parameters
    ----------
    x : array_like, at least 2-D
        Real data (float16/32/64; integers and bools are taken as float64).
    axis : int, default 1
        The feature axis; the statistics reduce over every other axis.

    Returns
    -------
    mean, var : ndarray of float64, shape ``(x.shape[axis],)``
        ``var`` is the biased variance (divided by the number of values).

    Raises
    ------
    TypeError
        ``x`` does not hold real numbers; ``axis`` is not an integer.
    ValueError
        ``x`` has fewer than 2 dimensions or no values per feature, or does not
        convert to an array (a ragged nested list).
    numpy.exceptions.AxisError
        ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np, numbanorm
    >>> mean, var = numbanorm.batch_norm_stats(np.array([[1.0, 10.0], [3.0, 30.0]]))
    >>> mean, var
    (array([ 2., 20.]), array([  1., 100.]))
    """
    x3 = _stats_input(x, axis)
    if x3.shape[0] * x3.shape[2] == 0:
        raise ValueError(f"x must have at least 1 value per feature, got shape {np.shape(x)}")
    mean, var, invstd = np.empty(x3.shape[1]), np.empty(x3.shape[1]), np.empty(x3.shape[1])
    _kernels.batch_stats(x3, _chunks(x3.nbytes), 0.0, mean, var, invstd)  # invstd: scratch
    return mean, var


def batch_norm_partial_stats(x, *, axis=1):
    """Mergeable statistics of ``x``: per-feature count, mean and sum of squared deviations.

    The parts of a batch that lives in pieces (chunks, processes) each give
    ``(count, mean, m2)``; :func:`merge_stats` combines them into the statistics
    of the whole batch. An empty part is allowed and has count 0.

    Parameters
    ----------
    x : array_like, at least 2-D
    axis : int, default 1
        The feature axis.

    Returns
    -------
    count, mean, m2 : ndarray of float64, shape ``(x.shape[axis],)``
        ``m2 / count`` is the biased variance.

    Raises
    ------
    TypeError, ValueError, numpy.exceptions.AxisError
        As :func:`batch_norm_stats`, except that an empty ``x`` is allowed.

    Examples
    --------
    >>> import numpy as np, numbanorm
    >>> x = np.arange(12.0).reshape(6, 2)
    >>> parts = [numbanorm.batch_norm_partial_stats(x[:2]), numbanorm.batch_norm_partial_stats(x[2:])]
    >>> count, mean, m2 = numbanorm.merge_stats(parts)
    >>> mean, m2 / count
    (array([5., 6.]), array([11.66666667, 11.66666667]))
    """
    count, mean, m2 = _partial_stats(x, axis)
    return np.full(mean.shape, count), mean, m2


def _stats_input(x, axis):
    """``x`` checked and viewed as ``(N, C, H*W)`` in the dtype the kernels compute in."""
    x = _data(x, "x")
    axis = _feature_axis(axis, x)
    return _to_3d(x, axis, _transposes(x), _compute_dtype(x.dtype))


def _partial_stats(x, axis):
    x3 = _stats_input(x, axis)
    features = x3.shape[1]
    mean = np.empty(features)
    m2 = np.empty(features)
    count = _kernels.partial_stats(x3, _chunks(x3.nbytes), mean, m2)
    return count, mean, m2


def merge_stats(parts):
    """Combine ``(count, mean, m2)`` statistics of parts of a batch (Chan's pairwise update).

    Parameters
    ----------
    parts : iterable of (count, mean, m2)
        As returned by :func:`batch_norm_partial_stats`, all with the same
        number of features. Parts with count 0 contribute nothing.

    Returns
    -------
    count, mean, m2 : ndarray of float64
        The statistics of the concatenated parts, to float64 rounding.

    Raises
    ------
    TypeError
        ``parts`` is not an iterable of triples (a single triple included); a
        triple holds something other than real numbers, or a masked array
        with masked values.
    ValueError
        ``parts`` is empty; a triple has other than three items, or arrays
        that are not 1-D or disagree in shape with each other or with the
        first triple's; a count is negative, infinite or NaN; an ``m2`` is
        negative; a member does not convert to an array.

    Examples
    --------
    >>> import numpy as np, numbanorm
    >>> x = np.array([[1.0], [2.0], [3.0], [10.0]])
    >>> count, mean, m2 = numbanorm.merge_stats(
    ...     [numbanorm.batch_norm_partial_stats(x[:1]), numbanorm.batch_norm_partial_stats(x[1:])])
    >>> count, mean, m2 / count
    (array([4.]), array([4.]), array([12.5]))
    """
    parts = [_stats_triple(part, f"parts[{i}]") for i, part in enumerate(_iterable(parts, "parts"))]
    if not parts:
        raise ValueError("parts must hold at least one (count, mean, m2) triple")
    for i, part in enumerate(parts[1:], 1):
        if part[0].shape != parts[0][0].shape:
            raise ValueError(f"parts[{i}] has {part[0].shape[0]} features and parts[0] {parts[0][0].shape[0]}")
    # Pairwise (tree) merging keeps the rounding error logarithmic in the number of parts.
    while len(parts) > 1:
        merged = [_merge_pair(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    count, mean, m2 = parts[0]
    return count.copy(), mean.copy(), m2.copy()


def _iterable(value, name):
    """``value`` itself, if it can be iterated; else a ``TypeError`` that names it."""
    try:
        iter(value)
    except TypeError:
        raise TypeError(f"{name} must be an iterable of (count, mean, m2) triples, got {type(value).__name__}") from None
    return value


def _stats_triple(part, name):
    """``part`` as three 1-D float64 arrays of one shape, checked: a ``(count, mean, m2)`` of :func:`merge_stats`."""
    if isinstance(part, np.ndarray) and part.ndim < 2:  # merge_stats(triple), not merge_stats([triple])
        raise TypeError(f"{name} must be a (count, mean, m2) triple, got a {part.ndim}-D array: "
                        "pass a list of triples, such as [batch_norm_partial_stats(x)]")
    if not hasattr(part, "__len__"):
        raise TypeError(f"{name} must be a (count, mean, m2) triple, got {type(part).__name__}")
    if len(part) != 3:
        raise ValueError(f"{name} must be a (count, mean, m2) triple, got {len(part)} items")
    arrays = []
    for member, array in zip(("count", "mean", "m2"), part):
        array = _unmasked_array(array, f"{name}'s {member}")
        if array.dtype.kind not in "biuf":  # as ``_per_feature``
            raise TypeError(f"{name}'s {member} must hold real numbers, got dtype {array.dtype}")
        arrays.append(array.astype(np.float64, copy=False))
    count, mean, m2 = arrays
    if count.ndim != 1:
        raise ValueError(f"{name}'s count, mean and m2 must be 1-D arrays (one value per feature), got {count.ndim}-D")
    if not count.shape == mean.shape == m2.shape:
        raise ValueError(f"{name}'s count, mean and m2 must have one shape, got {count.shape}, {mean.shape} and {m2.shape}")
    bad = ~((count >= 0) & (count < np.inf))
    if bad.any():
        raise ValueError(f"{name}'s count must be finite and >= 0, got {count[bad][0]}")
    if (m2 < 0).any():  # a NaN passes: it stays in its feature
        raise ValueError(f"{name}'s m2 (a sum of squared deviations) must be >= 0, got {m2[m2 < 0][0]}")
    return count, mean, m2


def _merge_pair(a, b):
    count_a, mean_a, m2_a = a
    count_b, mean_b, m2_b = b
    count = count_a + count_b
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        weight = np.where(count > 0, count_b / count, 0.0)
        delta = mean_b - mean_a
        # As _kernels.chan_merge: the weighted sum where the update is not finite (an infinite
        # mean); and beside an infinite mean a NaN m2, as the kernels' blocks give it.
        update = mean_a + delta * weight
        update = np.where(np.abs(update) < np.inf, update, mean_a * (1.0 - weight) + mean_b * weight)
        infinite = np.isinf(mean_a) | np.isinf(mean_b)
        mean = np.where(count_b > 0, update, mean_a)
        m2 = np.where(count_b > 0, np.where(infinite, np.nan, m2_a + m2_b + delta * delta * count_a * weight), m2_a)
    mean = np.where(count_a > 0, mean, mean_b)
    m2 = np.where(count_a > 0, m2, m2_b)
    return count, mean, m2


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
    momentum=0.1,
    out=None,
):
    """Batch normalization: ``y = gamma * (x - mean) / sqrt(var + eps) + beta``.

    Parameters
    ----------
    x : array_like, at least 2-D
        Real data. float16/32/64 keep their dtype (float16 is computed in
        float32); integers and bools are taken as float64.
    gamma, beta : array_like, shape ``(x.shape[axis],)``, optional
        Scale and shift; ``None`` means 1 and 0.
    axis : int, default 1
        The feature axis: 1 for ``(N, C)`` and ``(N, C, *spatial)`` as in
        PyTorch, -1 for channels-last data.
    eps : float, default 1e-5
        Added to the variance; must be non-negative.
    training : bool, default True
        True normalizes with the batch's mean and biased variance (and updates
        the running statistics if given); False with ``running_mean`` and
        ``running_var``.
    running_mean, running_var : ndarray, shape ``(x.shape[axis],)``, optional
        In training, updated in place when given (both or neither):
        ``new = (1 - momentum) * old + momentum * batch``, ``running_var``
        taking the unbiased variance. Required in inference.
    momentum : float, default 0.1
        Weight of the new batch in the running averages, in [0, 1].
    out : ndarray, optional
        Receives the result; same shape and dtype as the result. May be ``x``.
        A subclass (``np.memmap``, say) is written through and returned as given.

    Returns
    -------
    y : ndarray
        Same shape and dtype as ``x`` (float64 for integer input), in ``x``'s
        memory order when that is C or Fortran; ``out`` when given. A new
        result of 1-32 MiB may be a view that does not own its memory (see
        the module's docstring).
    mean, invstd : ndarray of float64, shape ``(x.shape[axis],)``
        The statistics used, ``invstd = 1 / sqrt(var + eps)``: what
        :func:`batch_norm_backward` takes.

    Raises
    ------
    TypeError
        Non-real data; ``axis`` is not an integer; ``eps`` or ``momentum`` is
        not a real number; ``training`` is not a bool; a non-array ``out`` or
        running statistic; wrong ``out`` dtype; in training, a running
        statistic whose dtype is not float16, float32 or float64; a masked
        array with masked values as ``x``, ``gamma``, ``beta``, ``out`` or a
        running statistic.
    ValueError
        Wrong shapes; fewer than 2 dimensions; ``eps < 0``; ``momentum``
        outside [0, 1]; a read-only ``out``; in training, a read-only running
        statistic; fewer than 2 values per feature
        in training; inference without running statistics; in training,
        running statistics that share memory with each other or with ``out``;
        an input that does not convert to an array (a ragged nested list), or
        an ``eps`` too large for a float.
    numpy.exceptions.AxisError
        ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np, numbanorm
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]], dtype=np.float32)
    >>> y, mean, invstd = numbanorm.batch_norm_forward(x, eps=0.0)
    >>> y
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    """
    x = _data(x, "x")
    axis = _feature_axis(axis, x)
    shape3 = _shape3(x.shape, axis)
    features = shape3[1]
    eps = _number(eps, "eps", 0.0, math.inf)
    training = _flag(training, "training")
    momentum = _number(momentum, "momentum", 0.0, 1.0)  # unused in inference, but wrong there too
    # The kernels take float32 parameters as well (``normalize_params``), each combination of
    # dtypes a compilation of its own (about a second): absent ones take the data's.
    compute = _compute_dtype(x.dtype)
    gamma = _ones(features, compute) if gamma is None else _per_feature(gamma, "gamma", features, float32=True)
    beta = np.zeros(features, compute) if beta is None else _per_feature(beta, "beta", features, float32=True)
    if training:
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must be given together, or neither")
        if running_mean is not None:
            _running_pair(running_mean, running_var, features)
            if out is not None:
                for v, name in ((running_mean, "running_mean"), (running_var, "running_var")):
                    # y is written first: the update would read y, and write over it.
                    if isinstance(out, np.ndarray) and np.shares_memory(v, out):
                        raise ValueError(f"{name} must not share memory with out: both are written")
        outer, _, inner = shape3
        count = outer * inner
        if count < 2:
            raise ValueError(
                f"x must have more than 1 value per feature in training, got shape {x.shape} "
                f"with feature axis {axis}"
            )
    else:
        if running_mean is None or running_var is None:
            raise ValueError("inference (training=False) needs running_mean and running_var")
        running = (
            _per_feature(running_mean, "running_mean", features, float32=True),
            _per_feature(running_var, "running_var", features, float32=True),
        )

    transposed = _transposes(x)
    x3 = _to_3d(x, axis, transposed, compute, shape3)
    y3 = _output(out, x, (x3,), axis, transposed, x.dtype)
    chunks = _chunks(x3.nbytes)
    stream = _stream(y3, (x3,), forward_into_new=out is None or not np.may_share_memory(y3, out))
    if training:
        mean = np.empty(features)
        var = np.empty(features)
        invstd = np.empty(features)
        _kernels.forward_train(x3, gamma, beta, eps, chunks, stream, y3, mean, var, invstd)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, momentum, count)
    else:
        mean = np.empty(features)  # returned: a copy of the running mean, in float64
        invstd = np.empty(features)
        _kernels.inference(x3, *running, eps, gamma, beta, chunks, stream, y3, mean, invstd)
    return _finish(y3, out, x.shape, transposed, x.dtype), mean, invstd


def _in_kernel_dtype(v):
    """Whether the kernels can update ``v`` in place: float32 or float64 in native byte order, aligned."""
    dtype = v.dtype
    return (dtype is _FLOAT32 or dtype is _FLOAT64 or (dtype.isnative and dtype != np.float16)) and v.flags.aligned


def _update_running(running_mean, running_var, mean, var, momentum, count):
    if not (_in_kernel_dtype(running_mean) and _in_kernel_dtype(running_var)):
        # Numba has no float16 arithmetic, nor non-native byte orders, and an unaligned array
        # would cost a compilation of its own. In float64 before the store, as the kernel.
        running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
        running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + momentum * var * (count / (count - 1))
    else:  # plain ndarray views, as for ``out`` (``_output``)
        var_weight = momentum * (count / (count - 1))  # one factor: _kernels.update_running
        _kernels.update_running(np.asarray(running_mean), np.asarray(running_var), mean, var, momentum, var_weight)


def _gradient_inputs(dy, x, axis):
    """Checked ``dy``/``x``, their canonical views, and what the result looks like."""
    x = _data(x, "x")
    dy = _data(dy, "dy")
    axis = _feature_axis(axis, x)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x, {x.shape}, got {dy.shape}")
    dtype = x.dtype if x.dtype is dy.dtype else np.result_type(x.dtype, dy.dtype)
    compute = _compute_dtype(dtype)
    transposed = _transposes(x)
    x3 = _to_3d(x, axis, transposed, compute)
    dy3 = _to_3d(dy, axis, transposed, compute, x3.shape)
    return x, x3, dy3, axis, transposed, dtype


def batch_norm_backward(dy, x, mean, invstd, gamma=None, *, axis=1, training=True, out=None):
    """Gradients of :func:`batch_norm_forward` with respect to ``x``, ``gamma`` and ``beta``.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to ``y``; the shape of ``x``.
    x : array_like
        The forward's input.
    mean, invstd : array_like, shape ``(x.shape[axis],)``
        The statistics the forward returned.
    gamma : array_like, shape ``(x.shape[axis],)``, optional
        The forward's scale; ``None`` means 1.
    axis : int, default 1
        The feature axis.
    training : bool, default True
        As in the forward. True differentiates through the batch statistics;
        False treats them as constants: ``dx = dy * gamma * invstd``.
    out : ndarray, optional
        Receives ``dx``; same shape and dtype as ``dx``. May be ``dy`` (or
        ``x``) itself, for an in-place backward. A subclass is written through
        and returned as given.

    Returns
    -------
    dx : ndarray
        Shape of ``x``, dtype of ``x`` and ``dy`` promoted together; ``out``
        when given. A new result of 1-32 MiB may be a view that does not own
        its memory (see the module's docstring).
    dgamma, dbeta : ndarray, shape ``(x.shape[axis],)``
        ``sum(dy * xhat)`` and ``sum(dy)`` over all but the feature axis,
        in the dtype of ``dx`` (float32 when that is float16, whose range a
        sum over a batch overflows).

    Raises
    ------
    TypeError
        Non-real data; ``axis`` is not an integer; ``training`` is not a bool;
        a non-array ``out``; wrong ``out`` dtype; a masked array with masked
        values as an input or ``out``.
    ValueError
        Wrong shapes; fewer than 2 dimensions; a read-only ``out``; an input
        that does not convert to an array (a ragged nested list).
    numpy.exceptions.AxisError
        ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np, numbanorm
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = numbanorm.batch_norm_forward(x, eps=0.0)
    >>> dx, dgamma, dbeta = numbanorm.batch_norm_backward(np.array([[1.0], [0.0]]), x, mean, invstd)
    >>> dx.ravel(), dgamma, dbeta
    (array([0., 0.]), array([-1.]), array([1.]))
    """
    x, x3, dy3, axis, transposed, dtype = _gradient_inputs(dy, x, axis)
    training = _flag(training, "training")
    features = x3.shape[1]
    mean = _per_feature(mean, "mean", features)
    invstd = _per_feature(invstd, "invstd", features)
    # As in the forward: float32 as well, and an absent gamma in the data's dtype.
    gamma = _ones(features, x3.dtype) if gamma is None else _per_feature(gamma, "gamma", features, float32=True)
    dx3 = _output(out, x, (x3, dy3), axis, transposed, dtype)
    # In the kernels' dtype: sums over the batch overflow float16, whose parameter gradients stay in float32.
    dgamma = np.empty(features, x3.dtype)
    dbeta = np.empty(features, x3.dtype)
    _kernels.backward(dy3, x3, mean, invstd, gamma, training, _chunks(x3.nbytes), _stream(dx3, (dy3, x3)), dx3, dgamma, dbeta)
    return _finish(dx3, out, x.shape, transposed, dtype), dgamma, dbeta


def batch_norm_backward_reduce(dy, x, mean, invstd, *, axis=1):
    """The backward's per-feature reductions, to be summed across the parts of a batch.

    Returns ``(sum_dy, sum_dy_xhat)`` in float64, where ``xhat = (x - mean) * invstd``:
    ``dbeta`` and ``dgamma`` of this part. Summed over all parts (for example
    with an MPI all-reduce), they give the whole batch's ``dbeta``/``dgamma`` and
    feed :func:`batch_norm_backward_elemt`.

    Parameters are as in :func:`batch_norm_backward`.

    Raises
    ------
    TypeError
        Non-real data; ``axis`` is not an integer; a masked array with masked values.
    ValueError
        ``dy`` not shaped like ``x``; ``mean`` or ``invstd`` not of shape
        ``(x.shape[axis],)``; fewer than 2 dimensions; an input that does
        not convert to an array.
    numpy.exceptions.AxisError
        ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np, numbanorm
    >>> x = np.array([[1.0], [3.0], [5.0], [7.0]])
    >>> dy = np.array([[1.0], [0.0], [0.0], [1.0]])
    >>> _, mean, invstd = numbanorm.batch_norm_forward(x, eps=0.0)
    >>> parts = [numbanorm.batch_norm_backward_reduce(dy[i:i + 2], x[i:i + 2], mean, invstd) for i in (0, 2)]
    >>> sum_dy, sum_dy_xhat = np.sum(parts, axis=0)
    >>> dx = [numbanorm.batch_norm_backward_elemt(dy[i:i + 2], x[i:i + 2], mean, invstd, None, sum_dy, sum_dy_xhat, 4)
    ...       for i in (0, 2)]
    >>> np.allclose(np.concatenate(dx), numbanorm.batch_norm_backward(dy, x, mean, invstd)[0])
    True
    """
    x, x3, dy3, axis, transposed, dtype = _gradient_inputs(dy, x, axis)
    features = x3.shape[1]
    mean = _per_feature(mean, "mean", features)
    invstd = _per_feature(invstd, "invstd", features)
    sum_dy = np.empty(features)
    sum_dy_xmu = np.empty(features)
    _kernels.grad_sums(dy3, x3, mean, _chunks(x3.nbytes), sum_dy, sum_dy_xmu)
    with np.errstate(invalid="ignore"):  # 0 * inf, a constant feature's with eps=0: NaN, as batch_norm_backward's
        return sum_dy, sum_dy_xmu * invstd


def batch_norm_backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, *, axis=1, out=None):
    """``dx`` of a part of a batch, from the whole batch's statistics and reductions.

    Parameters
    ----------
    dy, x : array_like
        This part's gradient and input.
    mean, invstd : array_like, shape ``(features,)``
        The whole batch's statistics.
    gamma : array_like or None
        The scale; ``None`` means 1.
    sum_dy, sum_dy_xhat : array_like, shape ``(features,)``
        :func:`batch_norm_backward_reduce` summed over all parts.
    count : int
        Values per feature in the whole batch; at least 1. From
        :func:`merge_stats`, whose ``count`` has one (equal) entry per feature:
        ``count[0]``.
    axis, out
        As in :func:`batch_norm_backward`.

    Returns
    -------
    dx : ndarray
        As :func:`batch_norm_backward` would give for this part; ``out`` when given.

    Raises
    ------
    TypeError
        Non-real data or ``count``; ``axis`` is not an integer; a non-array
        ``out`` or one of the wrong dtype; a masked array with masked values.
    ValueError
        ``dy`` not shaped like ``x``; a per-feature argument not of shape
        ``(x.shape[axis],)``; ``count`` below 1, not whole or too large for
        a float; fewer than 2 dimensions; a read-only ``out``; an input that
        does not convert to an array.
    numpy.exceptions.AxisError
        ``axis`` is out of range.

    Examples
    --------
    The example of :func:`batch_norm_backward_reduce` splits a batch in two
    parts and puts it back together with this function.
    """
    x, x3, dy3, axis, transposed, dtype = _gradient_inputs(dy, x, axis)
    features = x3.shape[1]
    mean = _per_feature(mean, "mean", features)
    invstd = _per_feature(invstd, "invstd", features)
    gamma = _ones(features) if gamma is None else _per_feature(gamma, "gamma", features)
    sum_dy = _per_feature(sum_dy, "sum_dy", features)
    sum_dy_xhat = _per_feature(sum_dy_xhat, "sum_dy_xhat", features)
    count = _number(count, "count", 1.0, math.inf)
    if not count.is_integer():
        raise ValueError(f"count must be a whole number of values, got {count}")
    dx3 = _output(out, x, (x3, dy3), axis, transposed, dtype)
    params = _kernels.new_params(_kernels.BACKWARD_ROWS, x3, dx3)
    folded = _kernels.grad_params(mean, invstd, gamma, sum_dy, sum_dy_xhat, count, params)
    _kernels.grad_input(dy3, x3, params, folded, True, _chunks(x3.nbytes), _stream(dx3, (dy3, x3)), dx3)
    return _finish(dx3, out, x.shape, transposed, dtype)
