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
given thread count. ``(N, C, H, W)`` data with too few rows to share evenly (a
batch of one, or of three on two threads) is split by features for the
reductions (``_splits_features``), each slab then owning the statistics of its
features, and by runs of ``inner`` values (``x[n, c]``) for the element-wise
passes. Statistics and sums accumulate in float64 whatever the
input dtype; the mean and variance come from one pass over each block that
sums the deviations from the block's first value of the feature and their
squares, corrected to the block's mean and squared deviations (``_corrected``),
then merged block by block with Chan's update (the means less each feature's
first value, ``_origin``), so the input is read once from memory and converted
to float64 once. ``E[x**2] - E[x]**2`` never appears: the shift is a data
value, which bounds the cancellation. The element-wise passes
run ``(N, C)`` rows as one flat range of explicit vectors (``_vectors.py``;
wide rows in groups, ``_row_groups``), stored plainly or, when
``api.py`` asks for it on large arrays (``stream``), with non-temporal stores.
Their stores are aligned on the output, and their per-feature rows and new
outputs start where the output and the input do within a cache line
(``new_params``, ``new_like``), so that their loads are aligned too.
"""

import contextlib
import math

import numpy as np
from numba import njit, prange
from numba.core import config as numba_config
from numba.core.compiler_lock import global_compiler_lock
from numba.core.cpu import ParallelOptions

from ._config import CACHE, FASTMATH, L1D_BYTES, cache_on_disk
from ._vectors import (
    ROWS,
    VECTOR_BYTES,
    WIDE_VECTOR_BYTES,
    address,
    run_grad_input,
    run_grad_input_folded,
    run_normalize,
    run_scale,
    shaped_view,
    store_fence,
    value_grad_input,
    vector_grad_input,
    vector_grad_input_rows,
    vector_normalize,
    vector_normalize_rows,
    vector_scale,
)

# Bytes in one block of the statistics: half of a 512 KiB L2, large enough to amortize
# the merge. Chosen for the former two-pass (whose second pass re-read the block from
# L2): against 16384 values a block, float32 (64 KiB then) 15-27 % faster, float64 (128
# KiB then) 1-6 %; 512 KiB no faster for float32, 5-15 % slower for float64. Measured
# again with the one pass (the report's shapes, medians of 3 alternating processes):
# 64 KiB took 1.0-2.1x the time of 256 KiB, 1 MiB 0.72-1.33x, slower on 6 shapes of 10.
BLOCK_BYTES = 262144
# Features in one block of (N, C) data: with 1024 features, a float32 block is 64
# rows, and the per-block merge costs a sixty-fourth of the data's pass.
FEATURE_TILE = 1024
# Super-features of the backward's sums on arrays of at least GRAD_WIDE_MIN_VALUES values
# (``_grad_super_rows``).
GRAD_SUPER_FEATURES = 4096
GRAD_WIDE_MIN_VALUES = 2**20
# The statistics of (N, C) blocks at least this many features wide take eight rows at a time
# (``_block_stats``), narrower ones four. Kernel level, two threads, against the former four
# rows (medians of 15, two or three runs): 65536x256 (super-rows of 1024 features) 0.78-0.81
# of the time in float32 and 0.86 in float64, 4096x1024 and 512x8192 0.96-1.00; serial, in
# L2, with ``_opaque_one`` both, 0.80-1.00 from 64 to 2048 features. But on blocks of 64 to
# 128 features (arrays too small for super-rows: 32x128, 128x128) eight rows took 1.05-1.09x
# the time, and 32x64 to 64x64 1.04-1.06x; with this limit those took 0.97-0.99x, and
# 256x256 (read as super-rows then, PLAIN_MIN_FEATURES) 0.92-0.98x.
EIGHT_ROWS_MIN_FEATURES = 512
# Fewest super-rows (``_super_rows``) worth reading narrow rows as super-rows, in the
# statistics and in the backward's sums. Serial, float32: with 4 super-rows (64x64) the
# statistics took 3.7 us with them and 1.7 without, the sums 3.3 and 2.0; with 16 (256x64,
# 1024x16) the statistics 5.3-6.1 and 3.8-5.5, the sums 5.3-5.6 and 5.0-8.1; with 64
# (4096x16) super-rows won, 13 against 19 us and 17 against 31.
STATS_SUPER_MIN_ROWS = 32
GRAD_SUPER_MIN_ROWS = 16
# Rows of at least this many features go through the serial reductions of arrays below
# GRAD_WIDE_MIN_VALUES values as they are (``_super_rows``): their loop is long enough, and
# the super-rows' scratch, tiled mean and folding cost more than they saved. Kernel level
# (medians of 25 shuffled rounds), without super-rows against with them: the backward's sums
# of 256x256 0.77x the time in float32 and 0.86x in float64, 64x256 0.64x, 512x256 0.92x,
# 256x128 0.81-0.93x, 1024x128 0.97x, but 2048x64 1.43x (256x64 float64 0.88x); the statistics
# of 256x256 0.83-0.93x, 512x256 0.92-0.94x, 256x128 0.70-0.83x, 1024x128 0.94-0.95x, 128x512
# 0.88-0.89x. Through the API, the backward 0.90-0.94x on 64x256 to 512x256 and the training
# forward 0.89-0.98x on those shapes. Not on two threads: there the backward of 2048x256
# float64 took 1.12x the time and 1024x512 float32 1.04x (1024x256 float32 0.87x).
PLAIN_MIN_FEATURES = 128
# The backward's sums over (N, C, H, W) runs of at most this many values take the runs of
# four images at a time (``_runs_grad_sums``); the statistics take four at a time whatever
# their length (``_block_stats``). Kernel level, two threads, against one run at a time
# (medians of 21, two or three runs): the sums of 4x4 to 16x16 runs took 0.69-0.97 of the
# time (32x256x14x14 float32 0.95-1.00, float64 0.78-0.85). Longer runs went either way:
# 28x28 float32 0.80-1.04 kernel level and 0.94-1.06 through the API, float64 0.80-0.93;
# 32x32 float32 1.00-1.28, float64 0.76; 56x56 float32 1.0-1.23, float64 0.90-1.07. The
# statistics took 0.66-0.97 from 7x7 to 56x56 runs, batches of 1-3 unchanged.
QUAD_RUNS_MAX = 256
# The element-wise passes over (N, C, H, W) runs of at most this many values compute each
# run in explicit vectors (``_vectors.run_normalize``), longer runs in LLVM's loop (unrolled,
# in 64-byte vectors). Kernel level, two threads, the backward's pass against LLVM's loop:
# runs of 4x4 float32 0.66 of the time, 7x7 0.83-0.85 (float64 0.98), 14x14 1.00 (float64
# 0.91); 28x28 1.00, 56x56 0.96, 112x112 1.04. Through the API (A/B in blocks of one
# operation, medians of 21): 64x256x4x4 0.65-0.92 of the time, 32x512x7x7 and 8x64x7x7
# float32 0.89-0.98 and float64 0.93-0.99, 14x14 and longer 0.92-1.04.
RUN_VECTORS_MAX = 256
# Float64 runs up to this many values take the explicit vectors as well (``_run_vectors``):
# LLVM's loop handled them worse than it does float32's. Kernel level, two threads, against
# LLVM's loop (medians of 15, two or three runs): the normalization of 64x64x28x28 0.82-0.84
# of the time, of 64x64x24x24 0.90-0.95, of 32x64x32x32 0.92, the backward's pass 0.92-0.98;
# longer runs went either way (56x56 0.91-0.97 and 0.90-1.05, 112x112 0.97-1.01 and 0.97-1.05).
# Float32 runs of 20x20 to 112x112 stayed at 0.96-1.04 with them, and stay with LLVM's loop.
RUN_VECTORS_MAX_FLOAT64 = 1024
# Row and feature indices that start at zero are passed as ``ZERO``, an int64, and not
# as the literal ``0``: Numba compiles a callee once more for a literal argument
# (``Literal[int](0)``), which made the cold compile seconds longer.
ZERO = np.int64(0)


def _jit(**options):
    """``numba.njit`` with numbanorm's options, and the on-disk cache when ``NUMBANORM_CACHE`` is on.

    The cache is ``_config.cache_on_disk``'s, not ``cache=True``'s: a cache that
    cannot be written is then a warning, not an error from the call that compiled.
    The kernels compile under ``NUMBA_DISABLE_JIT=1`` as well (``_jit_enabled``).
    """
    compile = njit(fastmath=FASTMATH, nogil=True, error_model="numpy", **options)

    def decorate(func):
        with _jit_enabled():
            dispatcher = compile(func)
        _compile_with_jit(dispatcher)
        if CACHE:
            cache_on_disk(dispatcher)
        return dispatcher

    return decorate


@contextlib.contextmanager
def _jit_enabled():
    """Numba's JIT on for the block, whatever ``NUMBA_DISABLE_JIT`` says.

    As Numba's own ufuncs, numbanorm's kernels compile under ``NUMBA_DISABLE_JIT=1``:
    that switch is for debugging one's own functions in Python, and the kernels'
    explicit vectors (``_vectors``) have no Python to fall back to. Numba reads the
    switch where a decorator wraps a function, numbanorm's and those of the NumPy
    functions it compiles in, and reloads it from the environment when that has
    changed since it last looked: hence the reload first, after which the
    compiler's own finds nothing new. Under the compiler's lock, which is
    reentrant and which every compilation takes, so that no other thread's
    compilation sees the switch change. Other threads' code does, meanwhile
    (README, "Embedding and configuration").
    """
    with global_compiler_lock:
        numba_config.reload_config()
        disabled = numba_config.DISABLE_JIT
        numba_config.DISABLE_JIT = 0
        try:
            yield
        finally:
            numba_config.DISABLE_JIT = disabled


def _compile_with_jit(dispatcher):
    """Make ``dispatcher`` compile within ``_jit_enabled``, whenever it compiles.

    Always, not only when ``NUMBA_DISABLE_JIT`` was set at import: it may be set
    later, and a call on types already compiled does not come here.
    """
    compile = dispatcher.compile

    def compile_with_jit(signature):
        with _jit_enabled():
            return compile(signature)

    dispatcher.compile = compile_with_jit


jit = _jit()
# Inlined into each caller in Numba's IR. The element-wise loops over ``inner`` runs are
# written once and called with the output in place of an input when the two are one array:
# LLVM then sees a single array (one value), which it vectorizes as it is. Given two arrays
# it checks at run time whether they overlap, and runs the scalar loop when they do, the
# same array included: an in-place pass was 1.4-4x slower. (The ``(N, C)`` passes' explicit
# vectors load before they store, and need no such care.)
inline_jit = _jit(inline="always")
# Only explicit prange loops run in parallel: Numba would otherwise turn every
# small array expression (``np.zeros``, ``a[:] = 0``) into a parallel region of
# its own, each costing a thread-pool launch. (An options object, not a dict:
# Numba pops the keys of a dict, so only the first compilation would see them.)
_prange_only = dict.fromkeys(("comprehension", "reduction", "inplace_binop", "setitem", "numpy", "stencil", "fusion"), False)
parallel_jit = _jit(parallel=ParallelOptions(dict(_prange_only, prange=True)))


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

    Where ``mean + delta * weight`` is not finite (an infinite mean makes
    ``delta`` inf or NaN, and means of opposite signs near the largest float64
    overflow it) the mean is the weighted sum of the two instead, as NumPy's
    mean of the values would be: ±inf, or NaN for infinities of both signs. A
    select, not a branch: the loop stays vectorized. (The m2 of an infinite
    mean is NaN already, as its block's is.)
    """
    if other_count == 0:
        return count
    total = count + other_count
    weight = other_count / total
    cross = count * weight
    for c in range(mean.shape[0]):
        delta = other_mean[c] - mean[c]
        update = mean[c] + delta * weight
        m2[c] += other_m2[c] + delta * delta * cross
        mean[c] = update if abs(update) < np.inf else mean[c] * (1.0 - weight) + other_mean[c] * weight
    return total


@inline_jit
def _opaque_one(n):
    """1.0, computed at run time from ``n`` so that LLVM cannot see it and fold ``x * one``.

    The statistics write ``x - shift`` as ``x * one - shift``: the same value (the
    product is exact, and the multiply-add rounds once), but computed on the FMA
    pipes. As a subtraction it queued with the float32 -> float64 conversions and the
    additions for the two FP add pipes of the report's machine (a Zen 5; the timings fit
    that count), which bound the loop. On one thread, in L2, the loop over float32 runs
    handled 6.0-6.6 values a cycle as a subtraction and took 0.85-0.92 of that time as a
    multiply-add; on two threads, from L3, the statistics of 64x64x28x28 and
    32x256x14x14 float32 took 0.91-0.93 of it. Float64 data, with no conversions, gained
    nothing, and neither did the backward's sums, tried alike.
    """
    n = max(n, 1)
    return float(n) / float(n)


@jit
def _block_stats(x, rows_start, rows_stop, features_start, features_stop, origin, block_mean, block_m2):
    """Mean (less ``origin``, one value per feature of the block) and m2 of one block: rows
    ``rows_start:rows_stop``, features ``features_start:features_stop``.

    One pass, from each feature's first value in the block (``shift``): the sums
    of the deviations ``d = x - shift`` and of their squares, in float64, give
    ``mean - origin = (shift - origin) + S1 / n`` and ``m2 = S2 - S1**2 / n`` (the corrected two-pass
    algorithm of Chan, Golub and LeVeque, 1983, with the shift as its first pass).
    This is not ``E[x**2] - E[x]**2``: the subtraction magnifies the relative
    rounding error of ``S2 = m2 + n * (shift - mean)**2`` by ``S2 / m2``, and
    since ``shift`` is one of the block's values, ``(shift - mean)**2 <= m2``, so
    that factor is at most ``n + 1`` whatever the data's offset (``E[x**2]``'s
    grows with the offset squared). The tests check the variance at a relative
    1e-9 against float64 NumPy on data at 1e4 with a spread of 1e-3 and an
    outlying first value. An infinite or NaN first value shifts by 0 instead
    (its rows' sums are taken again, ``_column_sums``): the sums then carry the
    infinities as NumPy's would, ±inf, or NaN for both signs, where ``x - inf``
    would have made every sum NaN. A constant feature gives ``S1 = S2 = 0``: its value
    back exactly, and ``m2 = 0``. One pass instead of two halves the float32 ->
    float64 conversions, which bound the statistics of float32 data in cache.
    The loops index from zero (row slices, ``j``): an offset index such as
    ``c - start`` may be negative as far as Numba knows, and its wraparound
    check stops LLVM from vectorizing the loop (4x slower).
    """
    outer, features, inner = x.shape
    width = features_stop - features_start
    block_mean[:] = 0.0
    block_m2[:] = 0.0
    one = _opaque_one(rows_stop - rows_start)
    if inner == 1:
        # Eight rows at a time on wide blocks (``EIGHT_ROWS_MIN_FEATURES``), then four, then
        # one: each float64 accumulator is loaded and stored once per eight or four values
        # instead of once per value.
        rows = x.reshape((outer, features))
        first = rows[rows_start, features_start:features_stop]
        eight_stop = rows_start + (rows_stop - rows_start) // 8 * 8 if width >= EIGHT_ROWS_MIN_FEATURES else rows_start
        quad_stop = rows_start + (rows_stop - rows_start) // 4 * 4
        for n in range(rows_start, eight_stop, 8):
            a, b = rows[n, features_start:features_stop], rows[n + 1, features_start:features_stop]
            c, d = rows[n + 2, features_start:features_stop], rows[n + 3, features_start:features_stop]
            e, f = rows[n + 4, features_start:features_stop], rows[n + 5, features_start:features_stop]
            g, h = rows[n + 6, features_start:features_stop], rows[n + 7, features_start:features_stop]
            for j in range(width):
                shift = np.float64(first[j])
                da, db, dc, dd = a[j] * one - shift, b[j] * one - shift, c[j] * one - shift, d[j] * one - shift
                de, df, dg, dh = e[j] * one - shift, f[j] * one - shift, g[j] * one - shift, h[j] * one - shift
                block_mean[j] += ((da + db) + (dc + dd)) + ((de + df) + (dg + dh))
                block_m2[j] += ((da * da + db * db) + (dc * dc + dd * dd)) + ((de * de + df * df) + (dg * dg + dh * dh))
        for n in range(eight_stop, quad_stop, 4):
            a, b = rows[n, features_start:features_stop], rows[n + 1, features_start:features_stop]
            c, d = rows[n + 2, features_start:features_stop], rows[n + 3, features_start:features_stop]
            for j in range(width):
                shift = np.float64(first[j])
                da, db, dc, dd = a[j] * one - shift, b[j] * one - shift, c[j] * one - shift, d[j] * one - shift
                block_mean[j] += (da + db) + (dc + dd)
                block_m2[j] += (da * da + db * db) + (dc * dc + dd * dd)
        for n in range(quad_stop, rows_stop):
            row = rows[n, features_start:features_stop]
            for j in range(width):
                deviation = row[j] - np.float64(first[j])
                block_mean[j] += deviation
                block_m2[j] += deviation * deviation
        count = rows_stop - rows_start
        for j in range(width):
            block_mean[j], block_m2[j] = _corrected(np.float64(first[j]), origin[j], count, block_mean[j], block_m2[j])
        if not _finite(first):  # rare, and a branch in the loop above would stop its vectors
            for j in range(width):
                if not abs(first[j]) < np.inf:  # the sums again, from 0 (the docstring)
                    total, squares = _column_sums(rows, rows_start, rows_stop, features_start + j)
                    block_mean[j], block_m2[j] = _corrected(0.0, origin[j], count, total, squares)
    else:
        # Runs of four rows at a time, as the rows above: a run is often too short a loop
        # for its set-up and the reduction of its vector accumulators (``QUAD_RUNS_MAX``).
        count = (rows_stop - rows_start) * inner
        quad_stop = rows_start + (rows_stop - rows_start) // 4 * 4
        for j in range(width):
            feature = features_start + j
            shift = _finite_or_zero(np.float64(x[rows_start, feature, 0]))
            total = 0.0
            squares = 0.0
            for n in range(rows_start, quad_stop, 4):
                runs = x[n, feature], x[n + 1, feature], x[n + 2, feature], x[n + 3, feature]
                for i in range(inner):
                    da, db, dc, dd = runs[0][i] * one - shift, runs[1][i] * one - shift, runs[2][i] * one - shift, runs[3][i] * one - shift
                    total += (da + db) + (dc + dd)
                    squares += (da * da + db * db) + (dc * dc + dd * dd)
            for n in range(quad_stop, rows_stop):
                run = x[n, feature]
                for i in range(inner):
                    deviation = run[i] - shift
                    total += deviation
                    squares += deviation * deviation
            block_mean[j], block_m2[j] = _corrected(shift, origin[j], count, total, squares)


@jit
def _column_sums(rows, rows_start, rows_stop, c):
    """The sums of ``rows[rows_start:rows_stop, c]`` and of its squares, in float64."""
    total = 0.0
    squares = 0.0
    for n in range(rows_start, rows_stop):
        value = np.float64(rows[n, c])
        total += value
        squares += value * value
    return total, squares


@inline_jit
def _finite_or_zero(value):
    """``value``, or 0 where it is infinite or NaN: a shift or an origin that leaves NumPy's mean of inf data inf."""
    return value if abs(value) < np.inf else 0.0


@jit
def _corrected(shift, origin, count, total, squares):
    """Mean (less ``origin``) and m2 of ``count`` values from the sums of their deviations from ``shift`` and of their squares."""
    m2 = squares - total * (total / count)
    return (shift - origin) + total / count, (0.0 if m2 < 0.0 else m2)  # m2 < 0: rounding; a NaN stays


@jit
def _super_rows(rows, features, inner, min_supers, chunks):
    """How many narrow ``(N, C)`` rows the reductions read as one "super-row" (1: none).

    A row of few features is too short a loop: its set-up (LLVM's runtime checks
    that the accumulators overlap no input, the remainder) costs as much as the
    row itself. ``k`` consecutive rows of a C-contiguous ``(N, C)`` array are one
    contiguous run of ``k * C`` values, which the reductions take as a single
    row of ``k * C`` "super-features": super-feature ``q * C + c`` is feature
    ``c`` of the ``q``-th row, and folding the ``k`` of them back gives
    feature ``c``. This made the statistics of ``(50176, 64)`` float64 a third
    faster. Not for fewer than ``min_supers`` super-rows in ``rows``: folding
    the ``k * C`` super-features back costs more than it saves on so few. Not
    on one slab (``chunks``) of a small array either, for rows of
    ``PLAIN_MIN_FEATURES`` or more, whose loop is long enough.
    """
    plain = chunks == 1 and features >= PLAIN_MIN_FEATURES and rows * features < GRAD_WIDE_MIN_VALUES
    if inner == 1 and 2 * features <= FEATURE_TILE and not plain:
        k = FEATURE_TILE // features
        if rows >= min_supers * k:
            return k
    return 1


@jit
def _grad_super_rows(outer, features, inner, chunks):
    """``_super_rows`` for the backward's sums: ``GRAD_SUPER_FEATURES`` super-features on large arrays.

    Each group of four super-rows pays a set-up (LLVM's checks that the sums
    overlap no input), and wider super-rows pay it for more values: on the
    report's machine, super-rows four times as wide made the backward of
    ``(N, 64)`` to ``(N, 256)`` arrays of 8-128 MB 3-8 % faster in float32 and
    2-5 % in float64. (The statistics gained nothing: their blocks cut a
    super-row into tiles of ``FEATURE_TILE`` anyway.) Below
    ``GRAD_WIDE_MIN_VALUES`` values the wider sums' zeroing and folding cost
    what they save.
    """
    k = _super_rows(outer, features, inner, GRAD_SUPER_MIN_ROWS, chunks)
    if k > 1 and outer * features >= GRAD_WIDE_MIN_VALUES:
        return GRAD_SUPER_FEATURES // features
    return k


@jit
def _super_view(a, start, supers, k):
    """Rows ``start:start + supers * k`` of the 3-D ``a`` (``inner == 1``) as ``(supers, k * features, 1)``."""
    features = a.shape[1]
    return a.reshape(-1)[start * features : (start + supers * k) * features].reshape((supers, k * features, 1))


@jit
def _tiled(v, k, out):
    """``v`` repeated ``k`` times into ``out`` (at least ``k * len(v)`` long; returns that
    part): a per-feature row for super-rows of ``k`` rows."""
    features = v.shape[0]
    out = out[: k * features]
    for q in range(k):
        for c in range(features):  # not a slice assignment: that compiles for seconds
            out[q * features + c] = v[c]
    return out


@jit
def _slab_stats(x, start, stop, chunks, origin, mean, m2, scratch):
    """Count, mean and m2 of rows ``start:stop`` of ``x``, written into ``mean``/``m2``.

    Narrow rows are read as super-rows (``_super_rows``): the statistics of
    the ``k * features`` super-features, each Chan's update of its own, fold
    into the features' at the end, with the rows left over after the last
    super-row. ``scratch`` is 5 rows of at least ``max(features, FEATURE_TILE)``;
    ``chunks``: how many slabs the call shares the rows among.
    """
    outer, features, inner = x.shape
    k = _super_rows(stop - start, features, inner, STATS_SUPER_MIN_ROWS, chunks)
    if k == 1:
        return _blocked_stats(x, start, stop, ZERO, features, origin, mean, m2, scratch[0], scratch[1])
    width = k * features
    supers = (stop - start) // k
    wide_mean, wide_m2, wide_origin = scratch[2, :width], scratch[3, :width], _tiled(origin, k, scratch[4])
    wide_count = _blocked_stats(_super_view(x, start, supers, k), ZERO, supers, ZERO, width, wide_origin, wide_mean, wide_m2, scratch[0], scratch[1])
    count = 0.0
    mean[:] = 0.0
    m2[:] = 0.0
    for q in range(k):
        part = slice(q * features, (q + 1) * features)
        count = chan_merge(count, mean, m2, wide_count, wide_mean[part], wide_m2[part])
    tail = start + supers * k
    if tail < stop:
        tail_mean, tail_m2 = scratch[0, :features], scratch[1, :features]
        _block_stats(x, tail, stop, ZERO, features, origin, tail_mean, tail_m2)
        count = chan_merge(count, mean, m2, float(stop - tail), tail_mean, tail_m2)
    return count


@jit
def _blocked_stats(x, start, stop, features_start, features_stop, origin, mean, m2, block_mean, block_m2):
    """``_slab_stats`` block by block, for features ``features_start:features_stop`` of ``mean``/``m2``.

    Chan's update folds each block's statistics into the slab's. The slab is cut
    into blocks of at most ``BLOCK_BYTES`` where the shape allows (at least one
    row of one feature): wide ``(N, C)`` rows are cut across the features so
    that a block spans several rows and its merge stays cheap, and long
    ``inner`` runs are cut to a few features a block.
    """
    outer, features, inner = x.shape
    block_elements = BLOCK_BYTES // x.itemsize
    width = features_stop - features_start
    if inner == 1:
        tile = max(1, min(width, FEATURE_TILE))
    else:  # at least four rows a block where they fit: _block_stats reads runs four at a time
        tile = max(1, min(width, block_elements // (min(4, max(1, stop - start)) * inner)))
    rows_per_block = max(1, block_elements // (tile * inner))
    count = 0.0
    for c in range(features_start, features_stop):
        mean[c] = 0.0
        m2[c] = 0.0
    for block_start in range(start, stop, rows_per_block):
        block_stop = min(block_start + rows_per_block, stop)
        block_count = float((block_stop - block_start) * inner)
        for tile_start in range(features_start, features_stop, tile):
            tile_stop = min(tile_start + tile, features_stop)
            tile_mean = block_mean[tile_start:tile_stop]
            tile_m2 = block_m2[tile_start:tile_stop]
            _block_stats(x, block_start, block_stop, tile_start, tile_stop, origin[tile_start:tile_stop], tile_mean, tile_m2)
            chan_merge(count, mean[tile_start:tile_stop], m2[tile_start:tile_stop], block_count, tile_mean, tile_m2)
        count += block_count
    return count


@jit
def _splits_features(outer, features, inner, chunks):
    """Whether a reduction over ``(N, C, H, W)`` data gives each slab features rather than rows.

    Rows are the better split (a slab reads one contiguous range) unless they
    share out less evenly than the features: a batch of one runs on a single
    thread otherwise, and a batch of three on two threads waits for the slab
    of two rows. ``(N, C)`` rows are short: there are always enough of them.
    """
    if inner == 1 or chunks == 1 or outer == 0 or features == 0:
        return False
    rows_share = (outer + chunks - 1) // chunks / outer  # the largest slab's share of the work
    features_share = (features + chunks - 1) // chunks / features
    return features_share < rows_share


@jit
def _units(x):
    """What the element-wise passes share among slabs: rows of ``(N, C)`` data, runs ``x[n, c]`` otherwise.

    Runs are as contiguous as rows (run ``r`` is ``x[r // C, r % C]``), and a
    batch of one has as many of them as features.
    """
    outer, features, inner = x.shape
    return outer if inner == 1 else outer * features


@inline_jit
def _run_vectors(a):
    """Whether the element-wise passes compute the ``(N, C, H, W)`` runs of ``a`` in explicit
    vectors, one call a run (``RUN_VECTORS_MAX``), rather than in LLVM's loop."""
    return 0 < a.shape[2] <= (RUN_VECTORS_MAX_FLOAT64 if a.itemsize == 8 else RUN_VECTORS_MAX)


@jit
def _origin(x, origin):
    """Each feature's first value (zero for a feature with none), in float64, into ``origin[:features]``.

    ``partial_stats``' blocks keep their means less it, and Chan's merges take the
    differences of those: of values at the spread's scale, not at the offset's.
    Merged as absolute means, the blocks of float64 data at 2**33 with a spread of
    about 2 lost eight digits of the variance (their means are rounded at
    2**33's spacing); NumPy's two passes lose three. An infinite or NaN first
    value gives 0, as for the blocks' shifts (``_block_stats``).
    """
    outer, features, inner = x.shape
    for c in range(features):
        origin[c] = _finite_or_zero(np.float64(x[0, c, 0])) if outer and inner else 0.0
    return origin[:features]


@parallel_jit
def partial_stats(x, chunks, mean, m2):
    """Per-feature mean and m2 (sum of squared deviations) of ``x`` into ``mean``/``m2``.

    Returns the number of values per feature.
    """
    outer, features, inner = x.shape
    by_features = _splits_features(outer, features, inner, chunks)  # then each slab fills its own features
    chunks = max(1, min(chunks, features if by_features else outer))
    slab_count = np.zeros(chunks)
    slab_mean = np.empty((chunks, features))
    slab_m2 = np.empty((chunks, features))
    scratch = np.empty((chunks, 6, max(features, FEATURE_TILE)))  # _slab_stats' five rows, and the origin
    origin = _origin(x, scratch[0, 5])
    if chunks == 1:  # skip the thread pool: its start-up dominates small arrays
        slab_count[0] = _slab_stats(x, ZERO, outer, chunks, origin, slab_mean[0], slab_m2[0], scratch[0])
    else:
        for t in prange(chunks):  # one parallel region for both splits: each costs a second of compilation
            if by_features:
                first, last = _bounds(features, chunks, t)
                _blocked_stats(x, ZERO, outer, first, last, origin, mean, m2, scratch[t, 0], scratch[t, 1])
            else:
                start, stop = _bounds(outer, chunks, t)
                slab_count[t] = _slab_stats(x, start, stop, chunks, origin, slab_mean[t], slab_m2[t], scratch[t])
    if by_features:
        count = float(outer * inner)
    else:
        count = 0.0
        mean[:] = 0.0
        m2[:] = 0.0
        for t in range(chunks):
            count = chan_merge(count, mean, m2, slab_count[t], slab_mean[t], slab_m2[t])
    check = 0.0  # NaN once a mean or m2 is not finite, as in ``_finite``: one loop for both
    for c in range(features):
        mean[c] += origin[c]
        check += mean[c] * 0.0 + m2[c] * 0.0
    if x.itemsize == 8 and check != 0.0:
        wanted = _not_finite(mean, m2)
        finite, scaled_mean, scaled_m2 = _rescaled_stats(x, count, wanted)
        for j in range(wanted.shape[0]):
            if finite[j]:  # NaN and inf data keep what the blocks gave
                mean[wanted[j]] = math.ldexp(scaled_mean[j], SCALE_BITS)
                m2[wanted[j]] = math.ldexp(scaled_m2[j], 2 * SCALE_BITS)
    return count


@inline_jit
def _finite(a):
    """Whether every value of the 1-D ``a`` is finite: a sum of ``a * 0``, NaN where one is not.

    One loop LLVM vectorizes, where a test and a branch per feature cost the
    training forward of 256x256 float32 a tenth of its time. (The kernels'
    fast-math flags allow reassociation and contraction only: ``a * 0`` is not
    folded to zero.)
    """
    total = 0.0
    for c in range(a.shape[0]):
        total += a[c] * 0.0
    return total == 0.0


# The statistics of features whose float64 values overflow the blocks' arithmetic
# (``_rescaled_stats``) are computed on the values times ``SCALE_DOWN``, and scaled back
# with ``math.ldexp``: a product by 2**600 twice may be folded into one by inf. 2**-600
# takes the largest float64 to 4e127, whose squares sum without overflow.
SCALE_BITS = 600
SCALE_DOWN = 2.0**-SCALE_BITS


@jit
def _not_finite(mean, m2):
    """The features (an int64 index array) whose ``mean`` or ``m2`` is not finite."""
    wanted = np.empty(mean.shape[0], dtype=np.int64)
    k = 0
    for c in range(mean.shape[0]):
        if not (np.isfinite(mean[c]) and np.isfinite(m2[c])):
            wanted[k] = c
            k += 1
    return wanted[:k]


@jit
def _overflowed(mean, var):
    """The features (an int64 index array) whose ``var`` is not finite while their ``mean`` is."""
    wanted = np.empty(mean.shape[0], dtype=np.int64)
    k = 0
    for c in range(mean.shape[0]):
        if np.isfinite(mean[c]) and not np.isfinite(var[c]):
            wanted[k] = c
            k += 1
    return wanted[:k]


@jit
def _rescaled_stats(x, count, wanted):
    """``(finite, mean * SCALE_DOWN, m2 * SCALE_DOWN**2)`` of the float64 features ``wanted``, from their values times ``SCALE_DOWN``.

    Values whose deviations from a block's first value pass about 1.3e154
    overflow the sums of squares, and values of opposite signs near the
    largest float64 their differences: ``partial_stats`` then had an inf or
    NaN mean or m2 for finite data. (float32 data cannot: their deviations are
    formed and squared in float64.) The scaling is exact but for values below
    about 1e-127, which weigh nothing beside such deviations. Two passes in the
    data's order, over the wanted features only. ``finite``: whether every
    value of the feature is finite; NaN and inf data, which also give a
    non-finite mean or m2, are not taken further (their mean and m2 are left
    unset), and the first pass stops where every wanted feature has shown one.
    """
    k = wanted.shape[0]
    finite = np.ones(k, dtype=np.bool_)
    mean = np.zeros(k)
    m2 = np.zeros(k)
    left = k
    inner = x.shape[2]
    for n in range(x.shape[0]):
        if left == 0:
            break
        for j in range(k):
            if finite[j]:
                c = wanted[j]
                total = 0.0
                check = 0.0  # NaN once a value is not finite (as ``_finite``): a loop LLVM vectorizes
                for i in range(inner):  # x[n, c, i], not a view of the run: a view a value costs more than the value
                    total += x[n, c, i] * SCALE_DOWN
                    check += x[n, c, i] * 0.0
                if check == 0.0:
                    mean[j] += total
                else:
                    finite[j] = False
                    left -= 1
    if left == 0:
        return finite, mean, m2
    for j in range(k):
        mean[j] /= count
    for n in range(x.shape[0]):
        for j in range(k):
            if finite[j]:
                c = wanted[j]
                centre = mean[j]
                squares = 0.0
                for i in range(inner):
                    deviation = x[n, c, i] * SCALE_DOWN - centre
                    squares += deviation * deviation
                m2[j] += squares
    return finite, mean, m2


@inline_jit  # a function of its own cost the forward's cold compile 0.7 s
def batch_stats(x, chunks, eps, mean, var, invstd):
    """Per-feature mean, biased variance and ``invstd = 1 / sqrt(var + eps)`` of ``x`` (at least one
    value a feature) into ``mean``/``var``/``invstd``.

    ``partial_stats``, then ``m2 / count``. Where m2 overflowed (float64
    deviations near 1e154 and up), the variance and ``invstd`` come from
    ``_rescaled_stats``'s scaled m2: the variance may still be beyond float64
    (inf), its ``invstd`` is not. Returns the number of values per feature.
    """
    count = partial_stats(x, chunks, mean, var)
    for c in range(var.shape[0]):  # not ``var /= count``: an array expression compiles for a second
        var[c] /= count
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
    if x.itemsize == 8 and not _finite(var):
        wanted = _overflowed(mean, var)
        finite, _, scaled_m2 = _rescaled_stats(x, count, wanted)
        for j in range(wanted.shape[0]):
            if finite[j]:
                c = wanted[j]
                scaled_var = scaled_m2[j] / count  # var * SCALE_DOWN**2
                var[c] = math.ldexp(scaled_var, 2 * SCALE_BITS)
                invstd[c] = math.ldexp(1.0 / np.sqrt(scaled_var + math.ldexp(eps, -2 * SCALE_BITS)), -SCALE_BITS)
    return count


# --- element-wise passes --------------------------------------------------------------
#
# The element-wise passes compute in the data's dtype, so that float32 data gets
# twice the vector width of float64. What keeps float32 accurate is the mean,
# split in two: ``hi`` (the float64 mean rounded to the dtype) is subtracted
# from each value, and ``lo = mean - hi`` (the rounding error) goes into the
# per-feature constant, computed in float64:
#
#     y = (x - hi) * scale + (shift - lo * scale)
#
# ``x - hi`` loses nothing where it matters: when ``x`` is close to the mean the
# difference is exact (Sterbenz), and elsewhere its rounding is relative to the
# deviation itself, not to the mean. Rounding the mean and stopping there, as
# PyTorch does, would cost ``ulp(mean) / std``: 6e-4 for data whose mean is
# 10**4 standard deviations. (Subtracting ``lo`` from every value instead is as
# accurate, and a load and a subtraction per value dearer: 14 % of the (N, C)
# backward's element-wise pass on data in cache, as measured.)

MEAN_HI, SCALE, SHIFT = 0, 1, 2  # rows of the forward's ``params``
DY_SCALE, INVSTD, XHAT_SCALE, OFFSET, XMU_SCALE = 1, 2, 3, 4, 5  # rows of the backward's ``params`` (after MEAN_HI)
DY_HI, RUN_OFFSET = 6, 7  # the backward's rows for the form of (N, C, H, W) runs (``_grad_column``)
FORWARD_ROWS, BACKWARD_ROWS = 3, 8
# How many per-feature rows the backward's (N, C) pass reads (``_grad_input_vectors``):
# MEAN_HI, DY_SCALE, XMU_SCALE and OFFSET. The forward's pass reads all FORWARD_ROWS.
GRAD_INPUT_ROWS = 4
# Rows of at least this many bytes run ROWS at a time through the element-wise passes of
# the training forward and inference, and of the training backward (``_row_groups``):
# those whose per-feature rows take more than half of one core's L1 data cache.
FORWARD_GROUP_ROW_BYTES = L1D_BYTES // (2 * FORWARD_ROWS) + 1
GRAD_GROUP_ROW_BYTES = L1D_BYTES // (2 * GRAD_INPUT_ROWS) + 1
# Columns of ``params`` past the last feature, repeating the first ones: a vector
# of ``(N, C)`` rows that starts at feature ``c`` reads ``params[:, c:c + lanes]`` whole,
# across the end of the row (``_vector_span``). One wide float32 vector's lanes.
PARAMS_PAD = WIDE_VECTOR_BYTES // 4
# Arrays of fewer bytes go through the flat element-wise loops (``_normalize_vectors``,
# ``_grad_input_vectors``, ``_scale_vectors``) in vectors of WIDE_VECTOR_BYTES (64), larger
# ones in vectors of VECTOR_BYTES (32). A/B through the API against 32-byte vectors
# everywhere (medians of 25 shuffled rounds, two or three processes): the training forward,
# backward and inference of 256x256 float32 0.86-0.88x, 0.89-0.92x and 0.81-0.86x the time,
# 128x512 float32 0.86-0.93x, 0.85-0.98x and 0.80-0.88x, 512x256 float32 0.90x, 0.93x and
# 0.86x, 1024x256 and 1024x512 float32 0.94-0.98x; from 4 MB on within noise (0.95-1.04x),
# but the backward of 4096x1024 float32 1.07-1.09x and of 50176x64 float64 1.02-1.14x. The
# (N, C, H, W) runs and the row groups keep 32-byte vectors (64-byte ones: 0.96-1.06x).
WIDE_VECTORS_MAX_BYTES = 4 * 2**20
# A cache line: the per-feature rows start where ``out``'s values do within one (``new_params``).
LINE_BYTES = 64


@jit
def _pad_params(params, features):
    """Columns ``features:features + PARAMS_PAD`` of ``params`` repeat its columns from the first
    on; the vectors read no further (``new_params`` may leave columns after those unset)."""
    for row in range(params.shape[0] if features else 0):
        source = 0
        for c in range(features, min(features + PARAMS_PAD, params.shape[1])):  # a counter: ``%`` divides
            params[row, c] = params[row, source]
            source = source + 1 if source + 1 < features else 0


@jit
def _vector_span(out, first, last, width):
    """``[body, end)``: the part of the flat ``out[first:last]`` that whole vectors of ``width``
    bytes, aligned on ``width``, cover.

    The vector kernels compute the values before ``body`` and from ``end`` on
    one at a time, and those in between as aligned vectors.
    """
    lanes = width // out.itemsize
    misalignment = (address(out) + first * out.itemsize) % width
    body = min(first + (width - misalignment) % width // out.itemsize, last)
    return body, body + (last - body) // lanes * lanes


@inline_jit
def _wide_vectors(out):
    """Whether the flat element-wise loops write ``out`` in 64-byte vectors (``WIDE_VECTORS_MAX_BYTES``)."""
    return out.size * out.itemsize < WIDE_VECTORS_MAX_BYTES


@jit
def _row_groups(out, start, stop, min_row_bytes):
    """How rows ``start:stop`` of ``out`` run in groups of ``ROWS``: ``(groups_stop, head)``.

    Rows ``start:groups_stop`` run ``ROWS`` at a time (``_normalize_row_groups``,
    ``_grad_input_row_groups``): features ``head:`` in vectors that
    ``vector_normalize_rows`` or ``vector_grad_input_rows`` computes for the
    ``ROWS`` rows from one load of the per-feature rows, the others one value
    at a time. ``groups_stop == start`` when no rows do. Only rows of at least
    ``min_row_bytes`` (``FORWARD_GROUP_ROW_BYTES``, ``GRAD_GROUP_ROW_BYTES``):
    those whose per-feature rows take more than half of the L1 data cache,
    where a flat range would read them from L2 with every vector. Only rows a
    whole number of vectors long, so that feature ``head`` (the first at a
    32-byte boundary of the output) is aligned in each row.

    Measured on two machines, two threads, against one flat range
    (``docs/performance-notes.md``):

    - a Zen 5 (48 KB L1), through the API, groups from rows of 16 KB: the inference of
      512x8192, 2048x4096 and 128x32768 took 0.79-0.97 of its time, the
      training forward 0.91-0.99, the backward of 512x8192 and 256x16384
      float32 0.885-0.95; rows of 8 KB went either way (2048x2048 float32
      inference 1.25x, the backward 0.96-1.03x), rows of 4 KB gained nothing;
    - a Zen 4 (32 KB L1), kernel level: the flat range over rows of 6-12 KB took 1.5-2.1
      copy times for the normalization and 2.7-3.9 for ``dx``. In groups the
      normalization of 2730x1536, 2048x2048 and 1365x3072 float32 took
      0.60-0.79 of that time, of 2048x1024 and 1365x1536 float64 0.65-0.73;
      their ``dx`` 0.63-0.76 and 0.80-0.88 (through the API, two runs: the
      training forward 0.80-0.91x, inference 0.73-0.89x, the backward 0.85-0.96x).
      Rows of 4 KB went either way in groups, 0.81-1.25x over six runs
      (4096x1024 and 8192x1024 float32, 4096x512 float64).

    Half of the L1 draws the line through both machines' measurements. Groups
    of 8 rows were 4-14 % slower than groups of 4 on the Zen 5 and 15-20 % on
    the Zen 4; groups of 2 the same as 4 on the Zen 5, 24-38 % slower on the Zen 4.
    """
    itemsize = out.itemsize
    row_bytes = out.shape[1] * itemsize
    if row_bytes < min_row_bytes or row_bytes % VECTOR_BYTES or address(out) % itemsize:
        return start, 0
    return start + (stop - start) // ROWS * ROWS, -address(out) % VECTOR_BYTES // itemsize


@jit
def normalize_params(mean, invstd, gamma, beta, params):
    """The forward's per-feature rows: ``y = (x - hi) * scale + shift``, the mean's rounding in ``shift``."""
    for c in range(mean.shape[0]):
        params[MEAN_HI, c] = mean[c]
        lo = mean[c] - params[MEAN_HI, c]
        lo = _finite_or_zero(lo)  # hi is ±inf (or NaN): x - hi carries it, as x - mean would
        scale = gamma[c] * invstd[c]
        params[SCALE, c] = scale
        params[SHIFT, c] = beta[c] - lo * scale
    _pad_params(params, mean.shape[0])


@jit
def inference_params(running_mean, running_var, eps, gamma, beta, mean, invstd, params):
    """Inference's statistics, ``mean`` (a float64 copy of ``running_mean``) and
    ``invstd = 1 / sqrt(running_var + eps)``, then the forward's rows (``normalize_params``).

    One call for what four conversions, three array expressions and a call took:
    small arrays feel each. The running statistics and ``gamma``/``beta`` may be
    float32 or float64, each compiled for on first use (the function is small).
    """
    for c in range(mean.shape[0]):
        mean[c] = running_mean[c]
        invstd[c] = 1.0 / np.sqrt(np.float64(running_var[c]) + eps)
    normalize_params(mean, invstd, gamma, beta, params)


@jit
def _slab_normalize(x, start, stop, params, stream, y):
    """``y = (x - hi) * scale + shift`` on units ``start:stop`` (``_units``); ``y`` may be ``x``.

    ``stream``: ``(N, C)`` rows are written with non-temporal stores.
    """
    if x.shape[2] == 1:
        # The groups are a function of their own, not a loop in _normalize_vectors: there
        # the flat loop ran out of registers and reloaded its output's address from the
        # stack with every vector (float64, in the assembly).
        groups_stop, head = _row_groups(y, start, stop, FORWARD_GROUP_ROW_BYTES)
        if groups_stop > start:
            _normalize_row_groups(x, start, groups_stop, head, params, stream, y)
        if _wide_vectors(y):
            _normalize_vectors(x, groups_stop, stop, params, stream, y, WIDE_VECTOR_BYTES)
        else:
            _normalize_vectors(x, groups_stop, stop, params, stream, y, VECTOR_BYTES)
    elif address(x) == address(y):
        _normalize_runs(y, start, stop, params, y)  # in place: one array for LLVM (``inline_jit``)
    else:
        _normalize_runs(x, start, stop, params, y)


@jit
def _normalize_vectors(x, start, stop, params, stream, y, width):
    """``_slab_normalize`` on ``(N, C)`` rows, in explicit vectors (``_vectors.vector_normalize``).

    The rows run as one flat range (``_vector_span``); each vector reads the
    features it covers from the padded ``params`` (``PARAMS_PAD``), in vectors
    of ``width`` bytes (a literal: ``_wide_vectors``).
    """
    features = x.shape[1]
    hi, scale, shift = params[MEAN_HI], params[SCALE], params[SHIFT]
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    lanes = width // y.itemsize
    first, last = start * features, stop * features
    body, end = _vector_span(flat_y, first, last, width)
    for i in range(first, body):
        c = i % features
        flat_y[i] = (flat_x[i] - hi[c]) * scale[c] + shift[c]
    c = body % features
    for i in range(body, end, lanes):
        vector_normalize(flat_y, i, c, stream, flat_x, hi, scale, shift, width)
        c += lanes
        while c >= features:
            c -= features
    for i in range(end, last):
        c = i % features
        flat_y[i] = (flat_x[i] - hi[c]) * scale[c] + shift[c]
    if stream:
        store_fence()


@jit
def _normalize_row_groups(x, start, stop, head, params, stream, y):
    """``_normalize_vectors`` on rows ``start:stop``, ``ROWS`` at a time, aligned from feature ``head`` on.

    ``stop - start`` is a multiple of ``ROWS`` (``_row_groups``). Streamed
    stores are fenced by the ``_normalize_vectors`` call that follows.
    """
    features = x.shape[1]
    hi, scale, shift = params[MEAN_HI], params[SCALE], params[SHIFT]
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    lanes = VECTOR_BYTES // y.itemsize
    vectors_stop = head + (features - head) // lanes * lanes
    for n in range(start, stop, ROWS):
        for row in range(n * features, (n + ROWS) * features, features):
            for c in range(head):
                flat_y[row + c] = (flat_x[row + c] - hi[c]) * scale[c] + shift[c]
            for c in range(vectors_stop, features):
                flat_y[row + c] = (flat_x[row + c] - hi[c]) * scale[c] + shift[c]
        for c in range(head, vectors_stop, lanes):
            vector_normalize_rows(flat_y, n * features + c, features, c, stream, flat_x, hi, scale, shift)


@inline_jit
def _normalize_runs(x, first, last, params, y):
    """``_slab_normalize`` on runs ``first:last`` (``_units``) of ``(N, C, H, W)`` data.

    Short runs (``_run_vectors``) in explicit vectors, one call a run.
    """
    hi, scale, shift = params[MEAN_HI], params[SCALE], params[SHIFT]
    features, inner = x.shape[1], x.shape[2]
    n, c = first // features, first % features
    if _run_vectors(x):
        flat_x, flat_y = x.reshape(-1), y.reshape(-1)
        for start in range(first * inner, last * inner, inner):
            run_normalize(flat_y, start, start + inner, flat_x, hi[c], scale[c], shift[c])
            c = c + 1 if c + 1 < features else 0
        return
    for _ in range(first, last):
        centre, factor, offset = hi[c], scale[c], shift[c]
        run = x[n, c]
        out_run = y[n, c]
        for i in range(x.shape[2]):
            out_run[i] = (run[i] - centre) * factor + offset
        c += 1
        if c == features:
            c = 0
            n += 1


@parallel_jit
def normalize(x, params, chunks, stream, y):
    """``y = (x - hi) * scale + shift`` per feature (``normalize_params``); ``y`` may be ``x``.

    ``stream``: write ``(N, C)`` rows of ``y`` with non-temporal stores.
    """
    units = _units(x)
    chunks = max(1, min(chunks, units))
    if chunks == 1:
        _slab_normalize(x, ZERO, units, params, stream, y)
    else:
        for t in prange(chunks):
            start, stop = _bounds(units, chunks, t)
            _slab_normalize(x, start, stop, params, stream, y)


@jit
def new_params(rows, x, out):
    """Scratch for ``rows`` per-feature rows in ``x``'s dtype, with the ``PARAMS_PAD``
    columns that the explicit vectors read past the last feature.

    Each row starts at the same offset from a 64-byte line as ``out``, the array
    whose vectors the kernels align: a vector of ``(N, C)`` rows a whole number
    of vectors long then reads its per-feature values from within one line, as
    it reads its data. NumPy's arrays start on 16-byte boundaries (the large
    ones 16 bytes past a line), Numba's allocations on 32-byte ones: where the
    two differed by 16 bytes, half the per-feature loads spanned two lines, and
    the inference of 4096x1024 float32 took 1.28x the time (kernel level, two
    threads; ``x``, ``out`` and the rows at each offset).

    The kernels that take the rows from the batch allocate them here, not their
    Python caller: a NumPy call from Python costs small arrays a third of a
    microsecond, as much as the work on a 32x64 batch.
    """
    line = LINE_BYTES // x.itemsize
    columns = (x.shape[1] + PARAMS_PAD + line - 1) // line * line  # every row on out's offset
    return _new_at_offset(out, x, (rows, columns))


@jit
def new_like(x):
    """A new array of ``x``'s shape and dtype that starts at ``x``'s offset from a 64-byte line.

    The vector kernels align their stores on the output: when ``x`` starts
    16 or 48 bytes past where the output does, half of its 32-byte loads span
    two lines (and every 64-byte one, on outputs below ``WIDE_VECTORS_MAX_BYTES``;
    ``api.py`` takes this function from 1 MiB on). ``malloc`` gives 16-byte boundaries, so a new output meets ``x``
    at one offset or another by chance. Where they did not meet, kernel level,
    the ``(N, C)`` backward's pass of 1024x512 and 4096x1024 float32 took
    1.09-1.18x the time, their normalization 1.02-1.09x, and ``(N, C, H, W)``
    runs at most 1.04x.
    """
    return _new_at_offset(x, x, x.shape)


@inline_jit  # a call of its own cost the small batches' kernels 20 ns
def _new_at_offset(anchor, x, shape):
    """A new C-contiguous array of ``shape`` in ``x``'s dtype, ``anchor``'s offset past a 64-byte line."""
    size = 1
    for extent in shape:
        size *= extent
    line = LINE_BYTES // x.itemsize
    flat = np.empty(size + line, dtype=x.dtype)
    offset = (address(anchor) - address(flat)) % LINE_BYTES // x.itemsize
    return shaped_view(flat, offset, shape)


@jit
def forward_train(x, gamma, beta, eps, chunks, stream, y, mean, var, invstd):
    """Batch statistics of ``x`` into ``mean``/``var``/``invstd``, then ``y``.

    ``var`` is the biased variance; ``gamma``/``beta`` may be float32 or float64;
    ``stream``: see ``normalize``.
    Returns the number of values per feature.
    """
    count = batch_stats(x, chunks, eps, mean, var, invstd)
    params = new_params(FORWARD_ROWS, x, y)
    normalize_params(mean, invstd, gamma, beta, params)
    normalize(x, params, chunks, stream, y)
    return count


@jit
def inference(x, running_mean, running_var, eps, gamma, beta, chunks, stream, y, mean, invstd):
    """``y`` normalized with the running statistics; ``mean``/``invstd`` as ``inference_params`` gives them."""
    params = new_params(FORWARD_ROWS, x, y)
    inference_params(running_mean, running_var, eps, gamma, beta, mean, invstd, params)
    normalize(x, params, chunks, stream, y)


@jit
def update_running(running_mean, running_var, mean, var, momentum, var_weight):
    """``running = (1 - momentum) * running + momentum * batch``, in float64 before the store.

    ``var`` is the batch's biased variance; ``running_var`` takes the unbiased one,
    with ``var_weight = momentum * count / (count - 1)`` (computed by the caller:
    given ``momentum`` and ``count`` apart, LLVM's reassociation formed
    ``momentum * count * var`` first, which overflows for a variance near the
    largest float64, ``_rescaled_stats``'s).
    """
    for c in range(mean.shape[0]):
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c]
        running_var[c] = (1.0 - momentum) * running_var[c] + var_weight * var[c]


# --- backward ---------------------------------------------------------------------------


@jit
def _slab_grad_sums(dy, x, start, stop, mean, sum_dy, sum_dy_xmu):
    """Add ``sum(dy)`` and ``sum(dy * (x - mean))`` per feature over rows ``start:stop`` to the float64 sums."""
    outer, features, inner = x.shape
    if inner == 1:
        # Four rows at a time, as in _block_stats.
        rows = x.reshape((outer, features))
        grad_rows = dy.reshape((outer, features))
        quad_stop = start + (stop - start) // 4 * 4
        for n in range(start, quad_stop, 4):
            xa, xb, xc, xd = rows[n], rows[n + 1], rows[n + 2], rows[n + 3]
            ga, gb, gc, gd = grad_rows[n], grad_rows[n + 1], grad_rows[n + 2], grad_rows[n + 3]
            for c in range(features):
                centre = mean[c]
                a, b, g, d = np.float64(ga[c]), np.float64(gb[c]), np.float64(gc[c]), np.float64(gd[c])
                sum_dy[c] += (a + b) + (g + d)
                sum_dy_xmu[c] += (a * (xa[c] - centre) + b * (xb[c] - centre)) + (g * (xc[c] - centre) + d * (xd[c] - centre))
        for n in range(quad_stop, stop):
            for c in range(features):
                grad = np.float64(grad_rows[n, c])
                sum_dy[c] += grad
                sum_dy_xmu[c] += grad * (rows[n, c] - mean[c])
    else:
        _runs_grad_sums(dy, x, start, stop, ZERO, features, mean, sum_dy, sum_dy_xmu)


@jit
def _runs_grad_sums(dy, x, start, stop, features_start, features_stop, mean, sum_dy, sum_dy_xmu):
    """``_slab_grad_sums`` of ``(N, C, H, W)`` data, over features ``features_start:features_stop`` only.

    Short runs (``QUAD_RUNS_MAX``) go four rows at a time, a feature's four runs
    summed together. Each feature's sums add in the same order whichever
    features a call takes (``_channels_backward`` takes one).
    """
    quad_stop = start + (stop - start) // 4 * 4 if x.shape[2] <= QUAD_RUNS_MAX else start
    for n in range(start, quad_stop, 4):
        for c in range(features_start, features_stop):
            centre = mean[c]
            xa, xb, xc, xd = x[n, c], x[n + 1, c], x[n + 2, c], x[n + 3, c]
            ga, gb, gc, gd = dy[n, c], dy[n + 1, c], dy[n + 2, c], dy[n + 3, c]
            total = 0.0
            total_xmu = 0.0
            for i in range(x.shape[2]):
                a, b, g, d = np.float64(ga[i]), np.float64(gb[i]), np.float64(gc[i]), np.float64(gd[i])
                total += (a + b) + (g + d)
                total_xmu += (a * (xa[i] - centre) + b * (xb[i] - centre)) + (g * (xc[i] - centre) + d * (xd[i] - centre))
            sum_dy[c] += total
            sum_dy_xmu[c] += total_xmu
    for n in range(quad_stop, stop):
        for c in range(features_start, features_stop):
            centre = mean[c]
            run = x[n, c]
            grad_run = dy[n, c]
            total = 0.0
            total_xmu = 0.0
            for i in range(x.shape[2]):
                grad = np.float64(grad_run[i])
                total += grad
                total_xmu += grad * (run[i] - centre)
            sum_dy[c] += total
            sum_dy_xmu[c] += total_xmu


@jit
def _slab_grad_input(dy, x, start, stop, params, folded, stream, dx):
    """``dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`` on units ``start:stop`` (``_units``).

    Where ``folded`` (``grad_params``: ``xmu_scale = invstd * xhat_scale``
    stayed in the dtype's range), ``(N, C)`` rows take
    ``dy * dy_scale - (x - hi) * xmu_scale - offset`` (four per-feature rows)
    and ``(N, C, H, W)`` runs ``(dy - dy_hi) * dy_scale - (x - hi) * xmu_scale
    - run_offset`` (one scalar each a run, ``_grad_column``). Otherwise both
    take ``(dy - dy_hi) * dy_scale - ((x - hi) * invstd) * xhat_scale -
    run_offset``, ``(N, C)`` rows one value at a time: ``(x - hi) * invstd``
    (``xhat`` but for the mean's rounding, which is in the offset) is formed
    first so that no factor leaves the range (``invstd**2`` is subnormal in
    float32 for a standard deviation above 1e19). ``dx`` may be ``dy`` or
    ``x``. ``stream``: ``(N, C)`` rows are written with non-temporal stores.
    """
    if x.shape[2] == 1:
        if not folded:
            _grad_input_values(dy, x, start, stop, params, dx)
            return
        groups_stop, head = _row_groups(dx, start, stop, GRAD_GROUP_ROW_BYTES)
        if groups_stop > start:
            _grad_input_row_groups(dy, x, start, groups_stop, head, params, stream, dx)
        if _wide_vectors(dx):
            _grad_input_vectors(dy, x, groups_stop, stop, params, stream, dx, WIDE_VECTOR_BYTES)
        else:
            _grad_input_vectors(dy, x, groups_stop, stop, params, stream, dx, VECTOR_BYTES)
    elif address(dx) == address(dy):
        _grad_input_runs(dx, x, start, stop, params, folded, dx)  # in place: one array for LLVM (``inline_jit``)
    elif address(dx) == address(x):
        _grad_input_runs(dy, dx, start, stop, params, folded, dx)
    else:
        _grad_input_runs(dy, x, start, stop, params, folded, dx)


@jit
def _grad_input_vectors(dy, x, start, stop, params, stream, dx, width):
    """``_slab_grad_input`` on ``(N, C)`` rows, in explicit vectors (``_vectors.vector_grad_input``).

    As ``_normalize_vectors``, with ``dx = dy * dy_scale - (x - hi) * xmu_scale - offset``.
    """
    features = x.shape[1]
    hi, dy_scale, xmu_scale, offset = params[MEAN_HI], params[DY_SCALE], params[XMU_SCALE], params[OFFSET]
    flat_dy, flat_x, flat_dx = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
    lanes = width // dx.itemsize
    first, last = start * features, stop * features
    body, end = _vector_span(flat_dx, first, last, width)
    for i in range(first, body):
        c = i % features
        flat_dx[i] = value_grad_input(flat_dy[i], flat_x[i], hi[c], dy_scale[c], xmu_scale[c], offset[c])
    c = body % features
    for i in range(body, end, lanes):
        vector_grad_input(flat_dx, i, c, stream, flat_dy, flat_x, hi, dy_scale, xmu_scale, offset, width)
        c += lanes
        while c >= features:
            c -= features
    for i in range(end, last):
        c = i % features
        flat_dx[i] = value_grad_input(flat_dy[i], flat_x[i], hi[c], dy_scale[c], xmu_scale[c], offset[c])
    if stream:
        store_fence()


@jit
def _grad_input_row_groups(dy, x, start, stop, head, params, stream, dx):
    """``_grad_input_vectors`` on rows ``start:stop``, ``ROWS`` at a time, as ``_normalize_row_groups``."""
    features = x.shape[1]
    hi, dy_scale, xmu_scale, offset = params[MEAN_HI], params[DY_SCALE], params[XMU_SCALE], params[OFFSET]
    flat_dy, flat_x, flat_dx = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
    lanes = VECTOR_BYTES // dx.itemsize
    vectors_stop = head + (features - head) // lanes * lanes
    for n in range(start, stop, ROWS):
        for row in range(n * features, (n + ROWS) * features, features):
            for c in range(head):
                flat_dx[row + c] = value_grad_input(flat_dy[row + c], flat_x[row + c], hi[c], dy_scale[c], xmu_scale[c], offset[c])
            for c in range(vectors_stop, features):
                flat_dx[row + c] = value_grad_input(flat_dy[row + c], flat_x[row + c], hi[c], dy_scale[c], xmu_scale[c], offset[c])
        for c in range(head, vectors_stop, lanes):
            vector_grad_input_rows(flat_dx, n * features + c, features, c, stream, flat_dy, flat_x, hi, dy_scale, xmu_scale, offset)


@jit
def _grad_input_values(dy, x, start, stop, params, dx):
    """``_slab_grad_input`` on ``(N, C)`` rows one value at a time, in the runs' form (six rows):
    where ``xmu_scale`` would leave the dtype's normal range (``grad_params``)."""
    hi, invstd, dy_hi = params[MEAN_HI], params[INVSTD], params[DY_HI]
    dy_scale, xhat_scale, offset = params[DY_SCALE], params[XHAT_SCALE], params[RUN_OFFSET]
    rows, grad_rows, out_rows = x.reshape(x.shape[:2]), dy.reshape(dy.shape[:2]), dx.reshape(dx.shape[:2])
    for n in range(start, stop):
        for c in range(x.shape[1]):
            xhat = (rows[n, c] - hi[c]) * invstd[c]
            out_rows[n, c] = (grad_rows[n, c] - dy_hi[c]) * dy_scale[c] - xhat * xhat_scale[c] - offset[c]


@inline_jit
def _grad_input_runs(dy, x, first, last, params, folded, dx):
    """``_slab_grad_input`` on runs ``first:last`` (``_units``) of ``(N, C, H, W)`` data.

    ``folded``: ``invstd * xhat_scale`` as one factor, ``xmu_scale``, as the
    ``(N, C)`` rows take it: runs of up to ``RUN_VECTORS_MAX`` values in
    explicit vectors (``run_grad_input_folded``), longer ones in LLVM's loop,
    as ``_normalize_runs``. Otherwise the two factors apart, in explicit
    vectors whatever the run's length (``run_grad_input``): LLVM's loop,
    compiled with ``reassoc``, had hoisted ``invstd * xhat_scale`` out of that
    form, the product that leaves the range, and runs of 4000 float32 values
    at a spread of 1e30 came out 1-3 % off.
    """
    hi, dy_hi = params[MEAN_HI], params[DY_HI]
    dy_scale, xmu_scale, offset = params[DY_SCALE], params[XMU_SCALE], params[RUN_OFFSET]
    features, inner = x.shape[1], x.shape[2]
    if not folded:
        _unfolded_runs(dy, x, first, last, params, dx)
        return
    n, c = first // features, first % features
    if _run_vectors(x):
        flat_dy, flat_x, flat_dx = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
        for start in range(first * inner, last * inner, inner):
            run_grad_input_folded(flat_dx, start, start + inner, flat_dy, flat_x, hi[c], dy_hi[c], dy_scale[c], xmu_scale[c], offset[c])
            c = c + 1 if c + 1 < features else 0
        return
    for _ in range(first, last):
        centre, grad_centre, a, b, d = hi[c], dy_hi[c], dy_scale[c], xmu_scale[c], offset[c]
        run = x[n, c]
        grad_run = dy[n, c]
        out_run = dx[n, c]
        for i in range(inner):
            out_run[i] = (grad_run[i] - grad_centre) * a - (run[i] - centre) * b - d
        c += 1
        if c == features:
            c = 0
            n += 1


@jit
def _unfolded_runs(dy, x, first, last, params, dx):
    """``_grad_input_runs`` where ``xmu_scale`` leaves the range: ``run_grad_input``, with the two factors apart.

    A function of its own: in the same loop as the folded runs' vectors, it cost
    the short runs a tenth of their time (``(32, 64, 16)`` float32, kernel level).
    """
    hi, invstd, dy_hi = params[MEAN_HI], params[INVSTD], params[DY_HI]
    dy_scale, xhat_scale, offset = params[DY_SCALE], params[XHAT_SCALE], params[RUN_OFFSET]
    features, inner = x.shape[1], x.shape[2]
    if inner == 0:
        return
    c = first % features
    flat_dy, flat_x, flat_dx = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
    for start in range(first * inner, last * inner, inner):
        run_grad_input(flat_dx, start, start + inner, flat_dy, flat_x, hi[c], invstd[c], dy_hi[c], dy_scale[c], xhat_scale[c], offset[c])
        c = c + 1 if c + 1 < features else 0


@jit
def _slab_scale(dy, start, stop, params, stream, dx):
    """``dx = dy * dy_scale`` on units ``start:stop`` (the inference backward); ``dx`` may be ``dy``.

    ``stream``: ``(N, C)`` rows are written with non-temporal stores.
    """
    if dy.shape[2] == 1:
        if _wide_vectors(dx):
            _scale_vectors(dy, start, stop, params, stream, dx, WIDE_VECTOR_BYTES)
        else:
            _scale_vectors(dy, start, stop, params, stream, dx, VECTOR_BYTES)
    elif address(dx) == address(dy):
        _scale_runs(dx, start, stop, params, dx)  # in place: one array for LLVM (``inline_jit``)
    else:
        _scale_runs(dy, start, stop, params, dx)


@jit
def _scale_vectors(dy, start, stop, params, stream, dx, width):
    """``_slab_scale`` on ``(N, C)`` rows, in explicit vectors (``_vectors.vector_scale``), as ``_normalize_vectors``."""
    features = dy.shape[1]
    dy_scale = params[DY_SCALE]
    flat_dy, flat_dx = dy.reshape(-1), dx.reshape(-1)
    lanes = width // dx.itemsize
    first, last = start * features, stop * features
    body, end = _vector_span(flat_dx, first, last, width)
    for i in range(first, body):
        flat_dx[i] = flat_dy[i] * dy_scale[i % features]
    c = body % features
    for i in range(body, end, lanes):
        vector_scale(flat_dx, i, c, stream, flat_dy, dy_scale, width)
        c += lanes
        while c >= features:
            c -= features
    for i in range(end, last):
        flat_dx[i] = flat_dy[i] * dy_scale[i % features]
    if stream:
        store_fence()


@inline_jit
def _scale_runs(dy, first, last, params, dx):
    """``_slab_scale`` on runs ``first:last`` (``_units``) of ``(N, C, H, W)`` data, as ``_normalize_runs``."""
    dy_scale = params[DY_SCALE]
    features, inner = dy.shape[1], dy.shape[2]
    n, c = first // features, first % features
    if _run_vectors(dy):
        flat_dy, flat_dx = dy.reshape(-1), dx.reshape(-1)
        for start in range(first * inner, last * inner, inner):
            run_scale(flat_dx, start, start + inner, flat_dy, dy_scale[c])
            c = c + 1 if c + 1 < features else 0
        return
    for _ in range(first, last):
        a = dy_scale[c]
        grad_run = dy[n, c]
        out_run = dx[n, c]
        for i in range(dy.shape[2]):
            out_run[i] = grad_run[i] * a
        c += 1
        if c == features:
            c = 0
            n += 1


@jit
def _slab_grad_sums_super(dy, x, start, stop, k, centre, sum_dy, sum_dy_xmu):
    """``_slab_grad_sums`` with narrow rows read ``k`` at a time as super-rows (``_grad_super_rows``).

    ``centre`` is the mean repeated ``k`` times; the sums are per super-feature
    (``k * features`` of them), and the rows left over at the end go to the
    first ``features``, whose super-feature is their feature.
    """
    features = x.shape[1]
    if k == 1:
        _slab_grad_sums(dy, x, start, stop, centre, sum_dy, sum_dy_xmu)
        return
    supers = (stop - start) // k
    tail = start + supers * k
    _slab_grad_sums(_super_view(dy, start, supers, k), _super_view(x, start, supers, k), ZERO, supers, centre, sum_dy, sum_dy_xmu)
    _slab_grad_sums(dy, x, tail, stop, centre[:features], sum_dy[:features], sum_dy_xmu[:features])


@parallel_jit
def grad_sums(dy, x, mean, chunks, sum_dy, sum_dy_xmu):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per feature, in float64."""
    outer, features, inner = x.shape
    by_features = _splits_features(outer, features, inner, chunks)  # then each slab adds its own features
    chunks = max(1, min(chunks, features if by_features else outer))
    k = _grad_super_rows(outer, features, inner, chunks)
    sum_dy[:] = 0.0
    sum_dy_xmu[:] = 0.0
    if chunks == 1 and k == 1:  # straight into the sums: small arrays feel the slabs' allocations
        _slab_grad_sums(dy, x, ZERO, outer, mean, sum_dy, sum_dy_xmu)
        return
    centre = _tiled(mean, k, np.empty(k * features))
    slab_dy = np.zeros((chunks, k * features))
    slab_dy_xmu = np.zeros((chunks, k * features))
    if chunks == 1:
        _slab_grad_sums_super(dy, x, ZERO, outer, k, centre, slab_dy[0], slab_dy_xmu[0])
    else:
        for t in prange(chunks):  # one parallel region for both splits, as in partial_stats
            if by_features:
                first, last = _bounds(features, chunks, t)
                _runs_grad_sums(dy, x, ZERO, outer, first, last, mean, sum_dy, sum_dy_xmu)
            else:
                start, stop = _bounds(outer, chunks, t)
                _slab_grad_sums_super(dy, x, start, stop, k, centre, slab_dy[t], slab_dy_xmu[t])
    if by_features:
        return
    for t in range(chunks):
        for q in range(k):
            sum_dy += slab_dy[t, q * features : (q + 1) * features]
            sum_dy_xmu += slab_dy_xmu[t, q * features : (q + 1) * features]


@parallel_jit
def grad_input(dy, x, params, folded, training, chunks, stream, dx):
    """``dx`` from the per-feature rows of ``grad_params``, and ``folded``, what it returned.

    Without ``training`` the statistics are constants and ``dx = dy * dy_scale``:
    ``x`` is not read, so a NaN in it cannot reach ``dx``. ``stream``: write
    ``(N, C)`` rows of ``dx`` with non-temporal stores.
    """
    units = _units(x)
    chunks = max(1, min(chunks, units))
    if training:
        if chunks == 1:
            _slab_grad_input(dy, x, ZERO, units, params, folded, stream, dx)
        else:
            for t in prange(chunks):
                start, stop = _bounds(units, chunks, t)
                _slab_grad_input(dy, x, start, stop, params, folded, stream, dx)
    else:
        if chunks == 1:
            _slab_scale(dy, ZERO, units, params, stream, dx)
        else:
            for t in prange(chunks):
                start, stop = _bounds(units, chunks, t)
                _slab_scale(dy, start, stop, params, stream, dx)


@jit
def grad_params(mean, invstd, gamma, sum_dy, sum_dy_xhat, count, params):
    """The backward's per-feature rows (``BACKWARD_ROWS`` rows, ``dx``'s dtype) for ``grad_input``.

    Returns whether every feature's ``xmu_scale`` is in range (``_grad_column``),
    ``grad_input``'s ``folded``. ``params`` may have columns past the features
    (``PARAMS_PAD``): they repeat the first ones.
    """
    folded = True
    for c in range(mean.shape[0]):
        folded &= _grad_column(c, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, params)
    _pad_params(params, mean.shape[0])
    return folded


@inline_jit
def _smallest_normal(a):
    """The smallest positive normal number of ``a``'s dtype (float32 or float64)."""
    return 1.1754943508222875e-38 if a.itemsize == 4 else 2.2250738585072014e-308


@inline_jit
def _largest(a):
    """The largest finite number of ``a``'s dtype (float32 or float64)."""
    return 3.4028234663852886e38 if a.itemsize == 4 else 1.7976931348623157e308


@inline_jit
def _split_limit(a):
    """The largest ``|dy_hi|`` (``_grad_column``): ``dy - dy_hi`` cannot overflow for a finite ``dy`` of
    ``a``'s dtype. Half a unit in the last place of the dtype's largest binade, halved again."""
    return 2.0**102 if a.itemsize == 4 else 2.0**969


@jit
def _grad_column(c, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, params):
    """Column ``c`` of ``grad_params``'s rows.

    ``dx = gamma * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)``,
    with ``xhat = (x - hi) * invstd - lo * invstd`` and the constant part of
    ``xhat * xhat_scale`` in ``offset``, as in ``normalize_params``. The
    ``(N, C)`` rows take ``(x - hi) * xmu_scale``, ``invstd * xhat_scale``
    rounded once to the dtype: one per-feature row fewer for each vector to
    read. On the report's machine (A/B through the API, medians of 30 shuffled
    rounds) the training backward of 512x8192, 2048x4096 and float64 4096x1024
    took 0.88-0.92 of its time, ``batch_norm_backward_elemt`` 0.79-0.91; the
    other ``(N, C)`` shapes 0.95-0.99 and 0.93-1.00. Returns whether that
    product kept to the dtype's normal range, or came from a NaN, an infinity
    or a zero, which the two factors carry the same way.

    The runs of ``(N, C, H, W)`` data (and the ``(N, C)`` values where
    ``xmu_scale`` leaves the range) split ``mean(dy)`` as the mean of ``x`` is
    split: ``(dy - dy_hi) * dy_scale - xhat * xhat_scale - run_offset``, with
    ``dy_hi`` the mean rounded to the dtype and its rounding error in
    ``run_offset``. Their constants are one scalar a run, so the split costs a
    subtraction a value and no load. Without it, a ``dy`` whose mean dwarfs its
    spread (``1e4 + N(0, 1)`` in float32) cancels ``dy * dy_scale`` against an
    offset rounded at the mean's scale: 2.7e-4 of the largest ``|dx|`` (0.7-1.3e-7
    with the split), where PyTorch's float32 ``dy - mean(dy)`` gives 1.9-2.6e-4. (The
    ``(N, C)`` rows keep four rows, a fifth being a load a vector: there the same
    ``dy`` gives 2.1-4.1e-4, PyTorch 0.7e-3 to 3.6e-3.) ``dy_hi`` stops at
    ``_split_limit``, beyond which ``dy - dy_hi`` could overflow.
    """
    params[MEAN_HI, c] = mean[c]
    lo = mean[c] - params[MEAN_HI, c]
    dy_scale = gamma[c] * invstd[c]
    xhat_scale = dy_scale * sum_dy_xhat[c] / count
    mean_dy = sum_dy[c] / count
    params[DY_SCALE, c] = dy_scale
    params[INVSTD, c] = invstd[c]
    params[XHAT_SCALE, c] = xhat_scale
    params[OFFSET, c] = dy_scale * mean_dy - (lo * invstd[c]) * xhat_scale
    params[DY_HI, c] = max(-_split_limit(params), min(mean_dy, _split_limit(params)))  # no branch, as below
    params[RUN_OFFSET, c] = dy_scale * (mean_dy - params[DY_HI, c]) - (lo * invstd[c]) * xhat_scale
    xmu_scale = invstd[c] * xhat_scale
    params[XMU_SCALE, c] = xmu_scale
    # Whether xmu_scale, rounded to the dtype, stands for the two factors: not where
    # their product left the normal range (``invstd**2`` over- or underflows). A NaN,
    # an infinity or a zero among the factors carries through the product the same way.
    # Without branches (``&``, ``|``, not ``and``, ``or``), so that LLVM vectorizes the columns.
    rounded = abs(params[XMU_SCALE, c])
    in_range = (rounded >= _smallest_normal(params)) & (rounded <= _largest(params))
    a, b = abs(invstd[c]), abs(xhat_scale)
    carried = (a == 0.0) | (a == np.inf) | (b == 0.0) | (b == np.inf) | (a != a) | (b != b)
    return in_range | carried


# --- the backward of (N, C, H, W) data, channel by channel -------------------------------


@jit
def _by_channels(outer, features, inner, chunks):
    """Whether the backward of ``(N, C, H, W)`` data runs channel by channel (``channel_backward``).

    Where the reductions give each slab features anyway (``_splits_features``,
    a batch of one or a few), the two passes over the whole array cost two
    parallel regions, and the second reads from L3 what one channel at a time
    still has in L2. Measured on the report's machine, through the API against
    the two passes (A/B in one process, medians of 15): 1x64x112x112 0.85-0.86x
    the time in float32 and 0.88-0.90x in float64, 3x64x56x56 float32 0.85-0.89x,
    1x256x56x56 float64 0.85x. Not elsewhere: on one thread, from 0.85x
    (8x64x7x7 float32) to 1.58x (32x64x4x4 float64: short runs, 8 KB apart in
    a channel), and batches of 32 and 64 on two threads 0.99-1.02x.
    """
    return inner > 1 and chunks > 1 and _splits_features(outer, features, inner, chunks)


@inline_jit
def _channel_runs(dy, x, c, params, training, folded, dx):
    """``_slab_grad_input`` (``training``) or ``_slab_scale`` on the runs ``x[:, c]`` of channel ``c``,
    value for value as ``_grad_input_runs`` (``folded``: this channel's) and ``_scale_runs``."""
    hi, dy_hi = params[MEAN_HI, c], params[DY_HI, c]
    dy_scale, xmu_scale, offset = params[DY_SCALE, c], params[XMU_SCALE, c], params[RUN_OFFSET, c]
    features, inner = x.shape[1], x.shape[2]
    if training and not folded:
        _unfolded_channel_runs(dy, x, c, params, dx)
        return
    if _run_vectors(x):
        flat_dy, flat_x, flat_dx = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
        for start in range(c * inner, x.shape[0] * features * inner, features * inner):
            if training:
                run_grad_input_folded(flat_dx, start, start + inner, flat_dy, flat_x, hi, dy_hi, dy_scale, xmu_scale, offset)
            else:
                run_scale(flat_dx, start, start + inner, flat_dy, dy_scale)
        return
    for n in range(x.shape[0]):
        grad_run = dy[n, c]
        out_run = dx[n, c]
        if training:
            run = x[n, c]
            for i in range(inner):
                out_run[i] = (grad_run[i] - dy_hi) * dy_scale - (run[i] - hi) * xmu_scale - offset
        else:  # x is not read: a NaN in it cannot reach dx
            for i in range(inner):
                out_run[i] = grad_run[i] * dy_scale


@jit
def _unfolded_channel_runs(dy, x, c, params, dx):
    """``_channel_runs`` in training where ``xmu_scale`` leaves the range, as ``_unfolded_runs``."""
    hi, invstd, dy_hi = params[MEAN_HI, c], params[INVSTD, c], params[DY_HI, c]
    dy_scale, xhat_scale, offset = params[DY_SCALE, c], params[XHAT_SCALE, c], params[RUN_OFFSET, c]
    features, inner = x.shape[1], x.shape[2]
    if inner == 0:
        return
    flat_dy, flat_x, flat_dx = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
    for start in range(c * inner, x.shape[0] * features * inner, features * inner):
        run_grad_input(flat_dx, start, start + inner, flat_dy, flat_x, hi, invstd, dy_hi, dy_scale, xhat_scale, offset)


@jit
def _channels_backward(dy, x, first, last, mean, invstd, gamma, training, sum_dy, sum_dy_xhat, params, dx):
    """The backward of channels ``first:last``, one at a time: the channel's sums, its column
    of ``params``, then its ``dx``, which reads the channel's runs again while they are in cache.

    The sums are ``_runs_grad_sums``'s, in the same order. ``dx`` may be ``dy`` or ``x``.
    """
    count = x.shape[0] * x.shape[2]
    for c in range(first, last):
        sum_dy[c] = 0.0
        sum_dy_xhat[c] = 0.0
        _runs_grad_sums(dy, x, ZERO, x.shape[0], c, c + 1, mean, sum_dy, sum_dy_xhat)
        sum_dy_xhat[c] *= invstd[c]
        folded = _grad_column(c, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, params)
        if address(dx) == address(dy):
            _channel_runs(dx, x, c, params, training, folded, dx)  # in place: one array for LLVM (``inline_jit``)
        elif address(dx) == address(x):
            _channel_runs(dy, dx, c, params, training, folded, dx)
        else:
            _channel_runs(dy, x, c, params, training, folded, dx)


@parallel_jit
def channel_backward(dy, x, mean, invstd, gamma, training, chunks, sum_dy, sum_dy_xhat, params, dx):
    """``backward`` of ``(N, C, H, W)`` data in one pass over the channels (``_by_channels``).

    Into ``sum_dy``, ``sum_dy_xhat`` (float64) and ``dx``; ``params`` is scratch.
    One parallel region, where the two passes take two.
    """
    features = x.shape[1]
    chunks = max(1, min(chunks, features))
    if chunks == 1:
        _channels_backward(dy, x, ZERO, features, mean, invstd, gamma, training, sum_dy, sum_dy_xhat, params, dx)
    else:
        for t in prange(chunks):
            first, last = _bounds(features, chunks, t)
            _channels_backward(dy, x, first, last, mean, invstd, gamma, training, sum_dy, sum_dy_xhat, params, dx)


@jit
def backward(dy, x, mean, invstd, gamma, training, chunks, stream, dx, dgamma, dbeta):
    """Gradients of batch normalization into ``dx``, ``dgamma`` and ``dbeta``.

    Training: ``dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``.
    Inference (the statistics are constants): ``dx = gamma * invstd * dy``.
    ``gamma`` may be float32 or float64; ``dgamma``/``dbeta`` take the float64
    sums rounded once to their own dtype; ``stream``: see ``grad_input``.
    """
    outer, features, inner = x.shape
    sum_dy = np.empty(features)
    sum_dy_xhat = np.empty(features)
    params = new_params(BACKWARD_ROWS, x, dx)
    if _by_channels(outer, features, inner, chunks):
        channel_backward(dy, x, mean, invstd, gamma, training, chunks, sum_dy, sum_dy_xhat, params, dx)
    else:
        grad_sums(dy, x, mean, chunks, sum_dy, sum_dy_xhat)
        for c in range(features):
            sum_dy_xhat[c] *= invstd[c]  # sum(dy * (x - mean)) * invstd = sum(dy * xhat)
        folded = grad_params(mean, invstd, gamma, sum_dy, sum_dy_xhat, outer * inner, params)
        grad_input(dy, x, params, folded, training, chunks, stream, dx)
    for c in range(features):
        dgamma[c] = sum_dy_xhat[c]
        dbeta[c] = sum_dy[c]
