"""Mergeable statistics and backward reductions against the float64 reference, over any split."""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbanorm
import reference
from checks import assert_close, assert_gradient_close, feature_sums, gradient_scale
from strategies import DTYPES, arrays, shapes_and_axes

property_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

# Statistics and sums accumulate in float64 whatever the input dtype (float16 and
# float32 convert to float64 exactly), so they meet float64 rounding for every dtype.
STATS_TOLERANCE = 1e-10


@st.composite
def split_cases(draw, min_per_feature=2):
    """``(x, axis, split_axis, cuts)``: where to cut ``x`` into pieces along a non-feature axis.

    Repeated cuts and cuts at the ends make empty pieces; no cut leaves one piece.
    """
    shape, axis = draw(shapes_and_axes(min_per_feature=min_per_feature))
    axis %= len(shape)
    dtype = draw(st.sampled_from(DTYPES))
    bound = 100.0 if dtype == np.float16 else 1000.0
    x = draw(arrays(shape, dtype, -bound, bound))
    split_axis = draw(st.sampled_from([i for i in range(x.ndim) if i != axis]))
    cuts = sorted(draw(st.lists(st.integers(0, shape[split_axis]), min_size=0, max_size=6)))
    return x, axis, split_axis, cuts


def assert_stats_match(stats, x, axis):
    count, mean, m2 = stats
    features = x.shape[axis]
    expected_mean, expected_var = reference.stats(x, axis)
    assert count.dtype == mean.dtype == m2.dtype == np.float64
    assert count.shape == mean.shape == m2.shape == (features,)
    np.testing.assert_array_equal(count, x.size // max(features, 1))
    scale = float(np.max(np.abs(x.astype(np.float64)), initial=0.0))
    np.testing.assert_allclose(mean, expected_mean, rtol=STATS_TOLERANCE, atol=STATS_TOLERANCE * scale)
    np.testing.assert_allclose(m2 / count, expected_var, rtol=STATS_TOLERANCE, atol=STATS_TOLERANCE * scale**2)


# --- statistics ------------------------------------------------------------------------


@property_settings
@given(split_cases())
def test_merged_pieces_give_the_whole_batch_statistics(case):
    x, axis, split_axis, cuts = case
    pieces = np.split(x, cuts, axis=split_axis)
    parts = [numbanorm.batch_norm_partial_stats(piece, axis=axis) for piece in pieces]
    assert_stats_match(numbanorm.merge_stats(parts), x, axis)


@property_settings
@given(split_cases(), st.randoms(use_true_random=False))
def test_merging_is_independent_of_order_and_grouping(case, random):
    x, axis, split_axis, cuts = case
    pieces = np.split(x, cuts, axis=split_axis)
    parts = [numbanorm.batch_norm_partial_stats(piece, axis=axis) for piece in pieces]
    random.shuffle(parts)
    # A tree of merges, as a dask reduction or a chain of MPI ranks would build.
    middle = random.randint(0, len(parts))
    groups = [part for part in (parts[:middle], parts[middle:]) if part]
    merged = numbanorm.merge_stats([numbanorm.merge_stats(group) for group in groups])
    assert_stats_match(merged, x, axis)


@property_settings
@given(split_cases())
def test_partial_stats_of_the_whole_batch_match_the_reference(case):
    x, axis, _, _ = case
    assert_stats_match(numbanorm.batch_norm_partial_stats(x, axis=axis), x, axis)


@property_settings
@given(split_cases())
def test_a_single_part_merges_to_itself(case):
    x, axis, _, _ = case
    part = numbanorm.batch_norm_partial_stats(x, axis=axis)
    for merged, original in zip(numbanorm.merge_stats([part]), part):
        np.testing.assert_array_equal(merged, original)
        assert not np.shares_memory(merged, original)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("empty_first", [True, False])
def test_an_empty_part_changes_nothing(dtype, empty_first):
    x = np.random.default_rng(1).normal(5.0, 3.0, size=(37, 4, 3)).astype(dtype)
    empty = numbanorm.batch_norm_partial_stats(x[:0], axis=1)
    np.testing.assert_array_equal(empty[0], 0.0)
    part = numbanorm.batch_norm_partial_stats(x, axis=1)
    parts = [empty, part, empty] if empty_first else [part, empty, empty]
    for merged, original in zip(numbanorm.merge_stats(parts), part):
        np.testing.assert_array_equal(merged, original)


def test_only_empty_parts_merge_to_count_zero():
    empty = numbanorm.batch_norm_partial_stats(np.empty((0, 3)), axis=1)
    count, mean, m2 = numbanorm.merge_stats([empty, empty, empty])
    np.testing.assert_array_equal(count, 0.0)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(m2))


def test_merge_stays_accurate_when_the_mean_dwarfs_the_spread():
    # Sums of squares would lose every digit here; Chan's update keeps them.
    rng = np.random.default_rng(2)
    x = (1e8 + rng.normal(0.0, 1e-3, size=(10_000, 2))).astype(np.float64)
    parts = [numbanorm.batch_norm_partial_stats(piece) for piece in np.array_split(x, 7)]
    count, mean, m2 = numbanorm.merge_stats(parts)
    # x - 1e8 is exact, so the reference of the shifted data is accurate. The mean is within
    # a few of its spacing at 1e8 (1.5e-8: 5.5e-9 measured); the variance loses a little to
    # the merges' differences of means rounded near 1e8 (1.3e-7 of it, measured).
    expected_mean, expected_var = reference.stats(x - 1e8)
    np.testing.assert_allclose(mean - 1e8, expected_mean, rtol=0, atol=1e-7)
    np.testing.assert_allclose(m2 / count, expected_var, rtol=1e-6)


def test_merge_stats_rejects_no_parts_and_mismatched_parts():
    part = numbanorm.batch_norm_partial_stats(np.ones((4, 3)))
    other = numbanorm.batch_norm_partial_stats(np.ones((4, 2)))
    with pytest.raises(ValueError, match="parts"):
        numbanorm.merge_stats([])
    with pytest.raises(ValueError, match=r"parts\[1\]"):
        numbanorm.merge_stats([part, other])
    with pytest.raises(ValueError, match=r"parts\[0\] must be a \(count, mean, m2\) triple, got 2 items"):
        numbanorm.merge_stats([part[:2]])
    with pytest.raises(ValueError, match=r"parts\[0\]'s count, mean and m2 must have one shape, got \(3,\), \(3,\) and \(2,\)"):
        numbanorm.merge_stats([(part[0], part[1], part[2][:2])])
    with pytest.raises(ValueError, match=r"parts\[1\]'s count must be finite and >= 0, got -4.0"):
        numbanorm.merge_stats([part, (-part[0], part[1], part[2])])
    with pytest.raises(ValueError, match=r"parts\[1\]'s count must be finite and >= 0, got inf"):
        numbanorm.merge_stats([part, (part[0] * np.inf, part[1], part[2])])
    with pytest.raises(ValueError, match=r"parts\[0\]'s m2 \(a sum of squared deviations\) must be >= 0, got -1.0"):
        numbanorm.merge_stats([(part[0], part[1], part[2] - 1.0), part])
    # A NaN m2 is data, not a mistake: it stays in its feature.
    nan_m2 = numbanorm.merge_stats([part, (part[0], part[1], np.array([0.0, np.nan, 0.0]))])[2]
    np.testing.assert_array_equal(np.isnan(nan_m2), [False, True, False])


def test_merge_stats_refuses_masked_values_as_the_rest_of_the_api_does():
    part = numbanorm.batch_norm_partial_stats(np.array([[1.0, 1.0], [3.0, 3.0]]))
    count, mean, m2 = numbanorm.batch_norm_partial_stats(np.array([[5.0, 1e9], [7.0, 1e9]]))
    with pytest.raises(TypeError, match=r"parts\[1\]'s mean is a masked array with masked values"):
        numbanorm.merge_stats([part, (count, np.ma.masked_array(mean, mask=[False, True]), m2)])
    unmasked = numbanorm.merge_stats([part, (count, np.ma.masked_array(mean, mask=False), m2)])
    for got, expected in zip(unmasked, numbanorm.merge_stats([part, (count, mean, m2)])):
        np.testing.assert_array_equal(got, expected)


def test_merge_stats_refuses_one_triple_in_place_of_a_list_of_them():
    # With three features, a triple's three arrays would each pass for a triple of scalars.
    part = numbanorm.batch_norm_partial_stats(np.arange(12.0).reshape(4, 3))
    with pytest.raises(TypeError, match=r"parts\[0\] must be a \(count, mean, m2\) triple, got a 1-D array: pass a list"):
        numbanorm.merge_stats(part)
    with pytest.raises(ValueError, match=r"parts\[0\]'s count, mean and m2 must be 1-D arrays"):
        numbanorm.merge_stats([(4.0, 1.5, 5.0)])
    with pytest.raises(TypeError, match=r"^parts must be an iterable of \(count, mean, m2\) triples, got int$"):
        numbanorm.merge_stats(5)
    with pytest.raises(TypeError, match=r"parts\[0\]'s count must hold real numbers, got dtype <U1"):
        numbanorm.merge_stats([("a", "b", "c")])
    np.testing.assert_array_equal(numbanorm.merge_stats([np.stack(part)])[1], part[1])  # a (3, C) array is a triple


# --- the distributed forward and backward, piece by piece --------------------------------


@st.composite
def backward_cases(draw):
    x, axis, split_axis, cuts = draw(split_cases())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    features = x.shape[axis]
    dy = rng.uniform(-2, 2, size=x.shape).astype(x.dtype)
    gamma = rng.uniform(-3, 3, features) if draw(st.booleans()) else None
    beta = rng.uniform(-3, 3, features)
    return x, dy, axis, split_axis, cuts, gamma, beta


@property_settings
@given(backward_cases())
def test_pieces_normalized_with_merged_stats_give_the_whole_forward(case):
    x, _, axis, split_axis, cuts, gamma, beta = case
    eps = 1e-3
    pieces = np.split(x, cuts, axis=split_axis)
    count, mean, m2 = numbanorm.merge_stats([numbanorm.batch_norm_partial_stats(p, axis=axis) for p in pieces])
    outputs = [
        numbanorm.batch_norm_forward(
            p, gamma, beta, axis=axis, eps=eps, training=False, running_mean=mean, running_var=m2 / count
        )[0]
        for p in pieces
    ]
    assert all(y.dtype == x.dtype for y in outputs)
    expected, *_ = reference.forward(x, gamma, beta, axis=axis, eps=eps)
    assert_close(np.concatenate(outputs, axis=split_axis), expected, x.dtype)


@property_settings
@given(backward_cases())
def test_summed_backward_reductions_give_the_whole_backward(case):
    x, dy, axis, split_axis, cuts, gamma, _ = case
    pieces = np.split(x, cuts, axis=split_axis)
    dy_pieces = np.split(dy, cuts, axis=split_axis)
    eps = 1e-3
    _, mean, invstd, _, _ = reference.forward(x, gamma, None, axis=axis, eps=eps)
    expected_dx, expected_dgamma, expected_dbeta = reference.backward(dy, x, mean, invstd, gamma, axis=axis)

    sums = [numbanorm.batch_norm_backward_reduce(d, p, mean, invstd, axis=axis) for d, p in zip(dy_pieces, pieces)]
    for s in sums:
        assert s[0].dtype == s[1].dtype == np.float64
    sum_dy = np.sum([s[0] for s in sums], axis=0)
    sum_dy_xhat = np.sum([s[1] for s in sums], axis=0)
    # float64 sums of float64-converted data: float64 rounding, relative to sum(|terms|).
    scale_dy = feature_sums(dy, axis)
    scale_dy_xhat = feature_sums(dy * reference.xhat(x, mean, invstd, axis), axis)
    assert (np.abs(sum_dy - expected_dbeta) <= 1e-12 * scale_dy).all(), (sum_dy, expected_dbeta)
    assert (np.abs(sum_dy_xhat - expected_dgamma) <= 1e-12 * scale_dy_xhat).all(), (sum_dy_xhat, expected_dgamma)

    count = x.size // x.shape[axis]
    dx_pieces = [
        numbanorm.batch_norm_backward_elemt(d, p, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis=axis)
        for d, p in zip(dy_pieces, pieces)
    ]
    assert all(dx.dtype == x.dtype and dx.shape == p.shape for dx, p in zip(dx_pieces, pieces))
    scale = gradient_scale(dy, x, mean, invstd, gamma, axis)
    assert_gradient_close(np.concatenate(dx_pieces, axis=split_axis), expected_dx, x.dtype, scale)


def test_backward_elemt_rejects_a_nonpositive_count():
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match="count"):
        numbanorm.batch_norm_backward_elemt(x, x, np.zeros(2), np.ones(2), None, np.zeros(2), np.zeros(2), 0)


def test_the_reductions_of_a_constant_feature_with_eps_0_are_quiet_as_the_backward_is():
    # invstd is inf there: sum(dy * (x - mean)) * invstd is 0 * inf, NaN in both
    # functions, and neither may warn (NumPy's multiply did, in backward_reduce).
    x = np.array([[1.0, 2.0], [1.0, 5.0], [1.0, -1.0]])
    dy = np.arange(6.0).reshape(3, 2)
    _, mean, invstd = numbanorm.batch_norm_forward(x, eps=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sum_dy, sum_dy_xhat = numbanorm.batch_norm_backward_reduce(dy, x, mean, invstd)
        _, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd)
    np.testing.assert_array_equal(sum_dy, dbeta)
    assert np.isnan(sum_dy_xhat[0]) and np.isnan(dgamma[0])
    np.testing.assert_allclose(sum_dy_xhat[1], dgamma[1], rtol=1e-12)
