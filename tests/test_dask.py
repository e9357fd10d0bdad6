"""numbanorm.dask against the float64 reference and the in-memory API, locally and on a LocalCluster."""

import logging
import os

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="numbanorm.dask needs the extra 'dask'")
distributed = pytest.importorskip("distributed", reason="the cluster tests need the extra 'dask'")

import dask  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from numpy.exceptions import AxisError  # noqa: E402

import numbanorm  # noqa: E402
import numbanorm.dask as nd  # noqa: E402
import reference  # noqa: E402
from checks import assert_backward_close, assert_close  # noqa: E402
from strategies import DTYPES  # noqa: E402


def compute(*arrays):
    """Compute on the calling thread, whatever cluster the module has started."""
    return dask.compute(*arrays, scheduler="sync")


def data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    # Per-feature offsets and scales, so that the statistics differ between features.
    return (rng.normal(size=shape) * rng.uniform(0.5, 20) + rng.uniform(-50, 50)).astype(dtype)


# (shape, axis, chunks): batch-only chunking, several axes chunked, uneven and empty chunks.
CASES = [
    ((40, 3), 1, (7, 3)),
    ((40, 3), -1, ((0, 13, 0, 20, 7), (3,))),
    ((12, 4, 5, 6), 1, (5, 4, 2, 4)),
    ((6, 5, 7, 3), -1, (4, 3, 2, 3)),
    ((3, 9, 4), 0, (3, 2, 3)),
]


# --- equality with the reference and the in-memory API ------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, chunks", CASES)
def test_forward_matches_reference_and_in_memory(shape, axis, chunks, dtype):
    x = data(shape, dtype)
    features = shape[axis]
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(-3, 3, features), rng.uniform(-3, 3, features)
    y, mean, invstd = nd.batch_norm_forward(da.from_array(x, chunks=chunks), gamma, beta, axis=axis)
    assert isinstance(y, da.Array) and y.chunks == da.from_array(x, chunks=chunks).chunks
    y, mean, invstd = compute(y, mean, invstd)
    assert y.dtype == x.dtype and mean.dtype == invstd.dtype == np.float64

    expected_y, expected_mean, expected_invstd, _, _ = reference.forward(x, gamma, beta, axis=axis)
    assert_close(y, expected_y, dtype)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-10, atol=1e-10 * np.abs(x).max())
    np.testing.assert_allclose(invstd, expected_invstd, rtol=1e-10)

    in_memory_y, in_memory_mean, in_memory_invstd = numbanorm.batch_norm_forward(x, gamma, beta, axis=axis)
    assert_close(y, in_memory_y, dtype)
    np.testing.assert_allclose(invstd, in_memory_invstd, rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, chunks", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_reference_and_in_memory(shape, axis, chunks, dtype, training):
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=2)
    features = shape[axis]
    gamma = np.random.default_rng(3).uniform(-3, 3, features)
    _, mean, invstd, _, _ = reference.forward(x, gamma, None, axis=axis)
    # dy chunked differently from x: the backward aligns them.
    dx, dgamma, dbeta = nd.batch_norm_backward(
        da.from_array(dy, chunks=1 + np.array(shape) // 2), da.from_array(x, chunks=chunks),
        mean, invstd, gamma, axis=axis, training=training,
    )
    dx, dgamma, dbeta = compute(dx, dgamma, dbeta)
    in_memory = numbanorm.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis, training=training)
    # dx in x's dtype; dgamma and dbeta too, but float32 for float16 (a sum over a batch overflows it).
    assert [a.dtype for a in (dx, dgamma, dbeta)] == [a.dtype for a in in_memory]
    assert dx.dtype == x.dtype

    expected = reference.backward(dy, x, mean, invstd, gamma, axis=axis, training=training)
    for wanted in (expected, in_memory):
        assert_backward_close((dx, dgamma, dbeta), wanted, dtype, dy, x, mean, invstd, gamma, axis, training)


def test_float16_parameter_gradients_do_not_overflow():
    x = data((70000, 2), np.float16)
    lazy_x = da.from_array(x, chunks=(9000, 2))
    _, mean, invstd = nd.batch_norm_forward(lazy_x)
    mean, invstd = compute(mean, invstd)
    # dy = 1 + xhat: dbeta and dgamma = sum(xhat + xhat**2) both pass float16's largest value, 65504.
    dy = (1 + (x.astype(np.float64) - mean) * invstd).astype(np.float16)
    dgamma, dbeta = compute(*nd.batch_norm_backward(da.from_array(dy, chunks=(9000, 2)), lazy_x, mean, invstd)[1:])
    _, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean, invstd)
    assert dgamma.dtype == dbeta.dtype == np.float32
    assert (ref_dgamma > 65504).all() and (ref_dbeta > 65504).all()
    assert_close(dgamma, ref_dgamma, np.float32)
    assert_close(dbeta, ref_dbeta, np.float32)


@pytest.mark.parametrize("chunks", [(700, 16), (1000, 16)])
def test_float32_training_is_accurate_when_the_mean_dwarfs_the_spread(chunks):
    # The chunks are normalized with the merged float64 statistics, whose mean has digits
    # float32 cannot hold near 1e4: they must reach y (the in-memory inference's shift).
    x = (1e4 + np.random.default_rng(15).normal(size=(4096, 16))).astype(np.float32)
    y, _, _ = nd.batch_norm_forward(da.from_array(x, chunks=chunks))
    error = np.abs(compute(y)[0] - reference.forward(x)[0]).max()
    assert error <= 1e-5, error


@pytest.mark.parametrize("x_dtype, dy_dtype", [(np.float16, np.bool_), (np.float32, np.int16), (np.int32, np.float32)])
def test_mixed_dtypes_promote_as_in_memory(x_dtype, dy_dtype):
    # Integers and bools count as float64, as numbanorm.batch_norm_backward takes them.
    x = (data((12, 3), np.float64) > 0).astype(x_dtype) + np.arange(3).astype(x_dtype)
    dy = (data((12, 3), np.float64, seed=1) > 0).astype(dy_dtype)
    _, mean, invstd = numbanorm.batch_norm_forward(x)
    lazy = compute(*nd.batch_norm_backward(da.from_array(dy, chunks=(5, 3)), da.from_array(x, chunks=(5, 3)), mean, invstd))
    in_memory = numbanorm.batch_norm_backward(dy, x, mean, invstd)
    assert [a.dtype for a in lazy] == [a.dtype for a in in_memory]
    assert_backward_close(lazy, in_memory, np.float64, dy, x, mean, invstd)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(2, 60),
    features=st.integers(1, 4),
    chunk_sizes=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    split_every=st.integers(2, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_batch_chunking_gives_the_whole_batch_statistics(batch, features, chunk_sizes, split_every, seed):
    x = data((batch, features), np.float64, seed)
    chunks = []
    while sum(chunks) < batch:
        chunks.append(min(chunk_sizes[len(chunks) % len(chunk_sizes)], batch - sum(chunks)))
    count, mean, m2 = compute(*nd.batch_norm_partial_stats(da.from_array(x, chunks=(tuple(chunks), features)),
                                                           split_every=split_every))
    expected_mean, expected_var = reference.stats(x)
    np.testing.assert_array_equal(count, batch)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12, atol=1e-12 * np.abs(x).max())
    np.testing.assert_allclose(m2 / count, expected_var, rtol=1e-10)


def test_stats_merge_with_in_memory_stats():
    x = data((50, 3), np.float32)
    on_dask = compute(*nd.batch_norm_partial_stats(da.from_array(x[:30], chunks=(4, 3))))
    merged = numbanorm.merge_stats([on_dask, numbanorm.batch_norm_partial_stats(x[30:])])
    mean, var = compute(*nd.batch_norm_stats(da.from_array(x, chunks=(9, 3))))
    expected_mean, expected_var = reference.stats(x)
    np.testing.assert_allclose(merged[1], expected_mean, rtol=1e-10)
    np.testing.assert_allclose(merged[2] / merged[0], expected_var, rtol=1e-10)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-10)
    np.testing.assert_allclose(var, expected_var, rtol=1e-10)


def test_inference_uses_the_running_statistics():
    x = data((30, 4), np.float32)
    running_mean, running_var = np.array([1.0, -2.0, 0.5, 3.0]), np.array([4.0, 0.25, 1.0, 9.0])
    y, mean, invstd = nd.batch_norm_forward(
        da.from_array(x, chunks=(7, 4)), training=False, running_mean=running_mean, running_var=da.from_array(running_var)
    )
    y, mean, invstd = compute(y, mean, invstd)
    expected_y, _, expected_invstd, _, _ = reference.forward(
        x, training=False, running_mean=running_mean, running_var=running_var
    )
    assert_close(y, expected_y, np.float32)
    np.testing.assert_array_equal(mean, running_mean)
    np.testing.assert_allclose(invstd, expected_invstd, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_integer_and_bool_input_give_float64(dtype):
    x = (np.arange(24).reshape(8, 3) % 5).astype(dtype)
    y, _, _ = compute(*nd.batch_norm_forward(da.from_array(x, chunks=(3, 3))))
    assert y.dtype == np.float64
    assert_close(y, reference.forward(x)[0], np.float64)


def test_unknown_chunk_sizes_are_handled():
    x = data((60, 3), np.float64)
    keep = x[:, 0] > np.median(x[:, 0])
    lazy_x = da.from_array(x, chunks=(7, 3))
    lazy_x = lazy_x[da.from_array(keep, chunks=7)]
    assert np.isnan(lazy_x.shape[0])
    y, mean, invstd = nd.batch_norm_forward(lazy_x)
    dy = da.ones_like(lazy_x)  # shares the unknown chunks
    dx, dgamma, dbeta = nd.batch_norm_backward(dy * lazy_x, lazy_x, mean, invstd)
    y, dx, dgamma, dbeta = compute(y, dx, dgamma, dbeta)
    kept = x[keep]
    expected_y, expected_mean, expected_invstd, _, _ = reference.forward(kept)
    assert_close(y, expected_y, np.float64)
    expected = reference.backward(kept, kept, expected_mean, expected_invstd)
    assert_backward_close((dx, dgamma, dbeta), expected, np.float64, kept, kept, expected_mean, expected_invstd)


def test_unknown_chunk_sizes_with_too_few_values_raise_when_computed():
    # Unknown sizes pass the check at graph construction; the computation makes it.
    x = data((20, 3), np.float64)
    lazy_x = da.from_array(x, chunks=(7, 3))
    for keep in (np.arange(20) == 4, np.zeros(20, bool)):  # one row, no row
        selected = lazy_x[da.from_array(keep, chunks=7)]
        assert np.isnan(selected.shape[0])
        y, mean, invstd = nd.batch_norm_forward(selected)
        for result in (y, mean, invstd):
            with pytest.raises(ValueError, match="x must have more than 1 value per feature"):
                compute(result)


def test_statistics_of_no_values_raise_as_in_memory():
    with pytest.raises(ValueError, match="x must have at least 1 value per feature"):
        numbanorm.batch_norm_stats(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="x must have at least 1 value per feature"):
        nd.batch_norm_stats(da.zeros((0, 3), chunks=(1, 3)))
    # With unknown chunk sizes, when computed.
    x = da.from_array(data((20, 3), np.float64), chunks=(7, 3))
    selected = x[da.from_array(np.zeros(20, bool), chunks=7)]
    mean, var = nd.batch_norm_stats(selected)
    for result in (mean, var):  # the mean of no values is not 0
        with pytest.raises(ValueError, match="x must have at least 1 value per feature"):
            compute(result)


def test_no_features_give_what_in_memory_does():
    x = np.zeros((4, 0, 2))
    lazy_x = da.from_array(x, chunks=(2, 0, 1))
    mean, invstd = np.zeros(0), np.ones(0)
    pairs = [
        (nd.batch_norm_forward(lazy_x), numbanorm.batch_norm_forward(x)),
        (nd.batch_norm_stats(lazy_x), numbanorm.batch_norm_stats(x)),
        (nd.batch_norm_backward(lazy_x, lazy_x, mean, invstd), numbanorm.batch_norm_backward(x, x, mean, invstd)),
    ]
    for lazy, in_memory in pairs:
        for actual, wanted in zip(compute(*lazy), in_memory):
            assert actual.shape == wanted.shape and actual.dtype == wanted.dtype


def test_an_unknown_size_along_the_feature_axis_is_refused_with_the_fix():
    x = da.from_array(data((20, 4), np.float64), chunks=(7, 4))
    columns = x[:, da.from_array(np.array([True, False, True, True]), chunks=4)]
    assert np.isnan(columns.shape[1])
    for call in (nd.batch_norm_forward, nd.batch_norm_stats, nd.batch_norm_partial_stats):
        with pytest.raises(ValueError, match=r"known size along the feature axis 1.*compute_chunk_sizes"):
            call(columns)
    with pytest.raises(ValueError, match=r"known size along the feature axis 1.*compute_chunk_sizes"):
        nd.batch_norm_backward(columns, columns, np.zeros(3), np.ones(3))
    y, _, _ = nd.batch_norm_forward(columns.compute_chunk_sizes())
    assert_close(compute(y)[0], reference.forward(x.compute()[:, [0, 2, 3]])[0], np.float64)


def test_any_number_of_dimensions_as_in_memory():
    x = data((4, 3) + (1,) * 25 + (2,), np.float32)  # 28-D
    lazy = compute(*nd.batch_norm_forward(da.from_array(x, chunks={0: 2, 27: 1})))
    for actual, wanted in zip(lazy, numbanorm.batch_norm_forward(x)):
        assert_close(actual, wanted, np.float32)


def test_an_empty_batch_backward_gives_what_in_memory_does():
    x = np.zeros((0, 3))
    mean, invstd = np.zeros(3), np.ones(3)
    for training in (True, False):
        lazy = compute(*nd.batch_norm_backward(da.from_array(x), da.from_array(x), mean, invstd, training=training))
        in_memory = numbanorm.batch_norm_backward(x, x, mean, invstd, training=training)
        for actual, wanted in zip(lazy, in_memory):
            assert actual.shape == wanted.shape and actual.dtype == wanted.dtype
            np.testing.assert_array_equal(actual, wanted)


def test_numpy_input_is_one_chunk():
    # Not dask's automatic chunking, which cuts a large array with many features along the
    # feature axis, an error for the caller who passed a plain NumPy array.
    x = data((500, 64), np.float32)
    with dask.config.set({"array.chunk-size": "16KiB"}):  # 128 KiB: auto chunks of 64x64 values
        y, _, _ = nd.batch_norm_forward(x)
    assert y.chunks == ((500,), (64,))
    assert_close(compute(y)[0], numbanorm.batch_norm_forward(x)[0], np.float32)


def test_a_shape_mismatch_from_unknown_sizes_says_so():
    x = da.from_array(data((20, 3), np.float64), chunks=(7, 3))
    unknown = x[da.from_array(np.arange(20) % 2 == 0, chunks=7)]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        nd.batch_norm_backward(np.ones((10, 3)), unknown, np.zeros(3), np.ones(3))


# --- laziness ----------------------------------------------------------------------------


def test_nothing_is_computed_until_asked():
    calls = []

    def load(block):
        calls.append(block.shape)
        return block

    x = da.from_array(data((40, 3), np.float32), chunks=(8, 3)).map_blocks(load, meta=np.empty((0, 0), np.float32))
    y, mean, invstd = nd.batch_norm_forward(x)
    dx, dgamma, dbeta = nd.batch_norm_backward(y, x, mean, invstd)
    stats = nd.batch_norm_partial_stats(x)
    assert calls == []
    assert all(isinstance(a, da.Array) for a in (y, mean, invstd, dx, dgamma, dbeta, *stats))
    compute(dx)
    assert len(calls) > 0


def test_the_inference_backward_reads_no_x_and_each_dx_block_one_dy_block():
    # dx = dy * gamma * invstd: each block of dx is ready with its block of dy, as the
    # inference forward's y blocks are with x's; the sums wait for the whole array.
    dy_blocks = []

    def load_dy(block, block_info=None):
        dy_blocks.append(block_info[None]["chunk-location"][0])
        return block

    def load_x(block):
        pytest.fail("the inference backward read x")

    meta = np.empty((0, 0))
    x = da.ones((40, 3), chunks=(4, 3)).map_blocks(load_x, meta=meta)
    dy = da.from_array(data((40, 3), np.float64), chunks=(4, 3)).map_blocks(load_dy, meta=meta)
    mean, invstd, gamma = np.zeros(3), np.full(3, 0.5), np.array([1.0, 2.0, 3.0])
    dx, _, _ = nd.batch_norm_backward(dy, x, mean, invstd, gamma, training=False)
    first = compute(dx.blocks[0])[0]
    assert dy_blocks == [0]
    np.testing.assert_array_equal(first, dy.blocks[0].compute() * gamma * 0.5)


def test_the_graph_grows_with_the_blocks_in_tasks_not_in_layers():
    # Building a graph of one dask.delayed call per block took time that grew with the
    # square of the blocks: each call merged every earlier layer into its own.
    def layers(blocks):
        x = da.zeros((blocks, 4), chunks=(1, 4))
        y, mean, invstd = nd.batch_norm_forward(x)
        dx, dgamma, dbeta = nd.batch_norm_backward(da.ones_like(x), x, mean, invstd)
        return len(set().union(*(a.__dask_graph__().layers for a in (dx, dgamma, dbeta))))

    # Each of the two reductions has one layer for each level of its tree of fan-in 16:
    # 1000 blocks take two levels more than 10.
    assert layers(1000) <= layers(10) + 2 * 2


# --- errors -------------------------------------------------------------------------------


def test_a_chunked_feature_axis_is_refused_with_the_fix():
    x = da.ones((10, 6), chunks=(5, 3))
    with pytest.raises(ValueError, match=r"feature axis 1.*rechunk"):
        nd.batch_norm_forward(x)
    with pytest.raises(ValueError, match="feature axis"):
        nd.batch_norm_backward(x, x, np.zeros(6), np.ones(6))
    y, _, _ = nd.batch_norm_forward(x.rechunk({1: -1}))
    assert y.shape == (10, 6)


def test_running_statistics_in_training_are_refused():
    x = da.ones((10, 2), chunks=(5, 2))
    with pytest.raises(ValueError, match="running_mean and running_var"):
        nd.batch_norm_forward(x, running_mean=np.zeros(2), running_var=np.ones(2))
    with pytest.raises(ValueError, match="running_mean and running_var"):
        nd.batch_norm_forward(x, training=False)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x: nd.batch_norm_forward(x.astype(np.complex128)), TypeError, "x must hold real numbers"),
        (lambda x: nd.batch_norm_forward(x[:, 0]), ValueError, "at least 2 dimensions"),
        (lambda x: nd.batch_norm_forward(x, axis=2), AxisError, "axis"),
        (lambda x: nd.batch_norm_forward(x, axis=1.0), TypeError, "axis must be an integer"),
        (lambda x: nd.batch_norm_forward(x, np.ones(3)), ValueError, r"gamma must have shape \(2,\)"),
        (lambda x: nd.batch_norm_forward(x, beta=da.ones(3)), ValueError, r"beta must have shape \(2,\)"),
        (lambda x: nd.batch_norm_forward(x, eps=-1.0), ValueError, "eps"),
        (lambda x: nd.batch_norm_forward(x[:1]), ValueError, "more than 1 value per feature"),
        (lambda x: nd.batch_norm_forward(x, split_every=1), ValueError, "split_every"),
        (lambda x: nd.batch_norm_forward(x, training=False, running_mean=np.zeros(2), running_var=np.ones(2),
                                         split_every="a"), TypeError, "split_every must be an integer"),
        (lambda x: nd.batch_norm_partial_stats(x, split_every=2.0), TypeError, "split_every"),
        (lambda x: nd.batch_norm_forward(x, training="no"), TypeError, "training must be a bool"),
        (lambda x: nd.batch_norm_backward(x, x, np.zeros(2), np.ones(2), training=0), TypeError, "training must be a bool"),
        (lambda x: nd.batch_norm_backward(x[:5], x, np.zeros(2), np.ones(2)), ValueError, "dy must have the shape"),
        (lambda x: nd.batch_norm_backward(x, x, np.zeros(3), np.ones(2)), ValueError, r"mean must have shape"),
        (lambda x: nd.batch_norm_backward(x, x, np.zeros(2), np.ones(3)), ValueError, r"invstd must have shape"),
        # A NumPy masked array: its masked values would enter the statistics (as in memory).
        (lambda x: nd.batch_norm_forward(np.ma.masked_equal(x.compute(), 1.0)), TypeError, "x is a masked array"),
        (lambda x: nd.batch_norm_backward(np.ma.masked_equal(x.compute(), 1.0), x, np.zeros(2), np.ones(2)), TypeError,
         "dy is a masked array"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(da.ones((10, 2), chunks=(5, 2)))


# --- a LocalCluster with 2 worker processes ---------------------------------------------------


@pytest.fixture(scope="module")
def client():
    """Two worker processes on loopback, shared by the module's cluster tests."""
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster, set_as_default=False) as client:
        yield client


def test_cluster_has_two_worker_processes(client):
    pids = client.run(os.getpid)
    assert len(pids) == 2
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()


def test_array_100x_larger_than_a_chunk_on_the_cluster(client):
    dtype = np.float32  # the other dtypes are covered above, on the local scheduler
    shape, chunks = (101_000, 6), (1_000, 6)
    x = da.random.default_rng(4).normal(3.0, 2.0, size=shape, chunks=chunks).astype(dtype)
    x = client.persist(x)
    with client.as_current():
        distributed.wait(x)
    assert x.npartitions >= 100 and x.nbytes >= 100 * x.blocks[0].nbytes
    holders = {worker for workers in client.who_has(x).values() for worker in workers}
    assert len(holders) == 2, "the chunks should be spread over both workers"
    dy = x * 0.5 - 1.0
    features = shape[1]
    gamma = np.linspace(0.5, 2.0, features)
    beta = np.linspace(-1.0, 1.0, features)

    y, mean, invstd = nd.batch_norm_forward(x, gamma, beta, split_every=8)
    dx, dgamma, dbeta = nd.batch_norm_backward(dy, x, mean, invstd, gamma, split_every=8)
    futures = client.compute([x, dy, y, mean, invstd, dx, dgamma, dbeta])
    x, dy, y, mean, invstd, dx, dgamma, dbeta = client.gather(futures)
    assert y.dtype == dx.dtype == dtype

    expected_y, expected_mean, expected_invstd, _, _ = reference.forward(x, gamma, beta)
    assert_close(y, expected_y, dtype)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-10)
    np.testing.assert_allclose(invstd, expected_invstd, rtol=1e-10)
    assert_backward_close((dx, dgamma, dbeta), reference.backward(dy, x, mean, invstd, gamma), dtype, dy, x, mean, invstd, gamma)
    in_memory_y, _, in_memory_invstd = numbanorm.batch_norm_forward(x, gamma, beta)
    assert_close(y, in_memory_y, dtype)
    np.testing.assert_allclose(invstd, in_memory_invstd, rtol=1e-10)


@given(split_every=st.integers(2, 10**6), axes=st.integers(0, 4))
def test_the_fan_in_is_the_integer_root_of_split_every(split_every, axes):
    # Shared among the reduced axes that have several blocks: the largest r with
    # r ** axes <= split_every (2 at least, 1 axis when none). The float root rounded
    # down: 64 over 3 axes gave 3, not 4.
    fan_in = nd._fan_in(split_every, axes)
    power = max(1, axes)
    assert fan_in >= 2
    assert fan_in == 2 or fan_in**power <= split_every
    assert (fan_in + 1) ** power > split_every
