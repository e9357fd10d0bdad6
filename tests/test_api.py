"""The functional API against the float64 reference, over shapes, dtypes, layouts and values."""

import contextlib
from fractions import Fraction

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from numpy.exceptions import AxisError

import numbanorm
import numbanorm.api as api
from numbanorm import _config, _kernels, _vectors
import reference
from checks import assert_backward_close, assert_close, assert_gradient_close, feature_sums, gradient_scale
from strategies import DTYPES, LAYOUTS, arrays, shapes_and_axes, with_layout

property_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def per_feature(rng, features, low, high):
    return rng.uniform(low, high, size=features)


@contextlib.contextmanager
def kernel_path(path):
    """Run the kernels' ``"serial"`` path, their ``"parallel"`` one (slabs, merged), or the
    parallel one writing ``(N, C)`` outputs with non-temporal stores (``"streamed"``),
    whatever the array's size. ``"parallel"`` cuts the work into 3 slabs, ``"streamed"``
    into one per thread: uneven splits, and more slabs than threads, on any machine
    (with one thread, one slab per thread would be the serial path again)."""
    saved = api.PARALLEL_MIN_BYTES, api.STREAM_MIN_BYTES, api._chunks
    api.PARALLEL_MIN_BYTES = 1 << 62 if path == "serial" else 0
    api.STREAM_MIN_BYTES = 0 if path == "streamed" else 1 << 62
    if path == "parallel":
        api._chunks = lambda nbytes: 3
    try:
        yield
    finally:
        api.PARALLEL_MIN_BYTES, api.STREAM_MIN_BYTES, api._chunks = saved


@st.composite
def forward_cases(draw, training=None):
    shape, axis = draw(shapes_and_axes())
    dtype = draw(st.sampled_from(DTYPES))
    bound = 100.0 if dtype == np.float16 else 1000.0  # float16 variances must stay below 65504
    x = draw(arrays(shape, dtype, -bound, bound))
    features = shape[axis]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype != np.float16 and draw(st.booleans()):
        # Per-feature offsets up to 10 or to 10**4 times the spread: the case that breaks
        # E[x**2] - E[x]**2, and in float32 the one that needs the mean's rounding (its
        # low part ``lo``) carried through the element-wise passes.
        reach = draw(st.sampled_from([1e4, 1e7]))
        offsets = rng.uniform(-reach, reach, features).reshape([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)])
        x = (x + offsets).astype(dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    affine = draw(st.booleans())
    # float32 parameters reach the kernels unconverted, a compilation of their own.
    parameter_dtype = draw(st.sampled_from([np.float64, np.float32]))
    gamma = rng.uniform(-3, 3, features).astype(parameter_dtype) if affine else None
    beta = rng.uniform(-3, 3, features).astype(parameter_dtype) if affine else None
    training = draw(st.booleans()) if training is None else training
    return x, with_layout(x, layout), axis, gamma, beta, training, rng


PATHS = ("serial", "parallel", "streamed")
paths = st.sampled_from(PATHS)


# --- equality with the reference ----------------------------------------------------------


def offset_float32_case():
    """A ``forward_cases`` case that always needs the float32 mean's low part (offsets of 1e7,
    a spacing of 1 there, beside a spread of about 600), which the strategy draws one time
    in 24."""
    rng = np.random.default_rng(0)
    x = (rng.uniform(-1e3, 1e3, (300, 4)) + rng.uniform(-1e7, 1e7, 4)).astype(np.float32)
    return x, x, 1, None, None, True, rng


@property_settings
@given(forward_cases(), paths)
@example(offset_float32_case(), "serial")
def test_forward_matches_reference(case, path):
    x, x_laid_out, axis, gamma, beta, training, rng = case
    features = x.shape[axis]
    running_mean = rng.uniform(-50, 50, features).astype(x.dtype)
    running_var = rng.uniform(0.5, 1e4, features).astype(x.dtype)
    before = x_laid_out.copy()
    rm, rv = running_mean.copy(), running_var.copy()

    with kernel_path(path):
        y, mean, invstd = numbanorm.batch_norm_forward(
            x_laid_out, gamma, beta, axis=axis, training=training, running_mean=rm, running_var=rv
        )
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(
        x, gamma, beta, axis=axis, training=training, running_mean=running_mean, running_var=running_var
    )

    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.dtype == invstd.dtype == np.float64
    assert_close(y, ref_y, x.dtype)
    # The scale as a Python float: a float16 one would round 1e-9 (and the tolerance) to zero.
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-9, atol=1e-9 * float(np.abs(x).max(initial=0)))
    np.testing.assert_allclose(invstd, ref_invstd, rtol=1e-11)  # from float64 statistics
    assert rm.dtype == rv.dtype == x.dtype
    assert_close(rm, ref_rm, x.dtype)
    assert_close(rv, ref_rv, x.dtype)
    np.testing.assert_array_equal(x_laid_out, before)


@property_settings
@given(forward_cases(), paths, st.sampled_from(LAYOUTS))
def test_backward_matches_reference(case, path, dy_layout):
    x, x_laid_out, axis, gamma, _, training, rng = case
    features = x.shape[axis]
    dy = rng.normal(size=x.shape).astype(x.dtype)
    dy_laid_out = with_layout(dy, dy_layout)  # a layout of its own: x's is not dy's
    if training:
        mean, var = reference.stats(x, axis)
    else:
        mean, var = rng.uniform(-500, 500, features), rng.uniform(0.5, 1e5, features)
    invstd = 1 / np.sqrt(var + 1e-5)
    inputs = (dy_laid_out, x_laid_out, mean, invstd) + (() if gamma is None else (gamma,))
    before = [a.copy() for a in inputs]

    with kernel_path(path):
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy_laid_out, x_laid_out, mean, invstd, gamma, axis=axis, training=training)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean, invstd, gamma, axis=axis, training=training)

    assert dx.dtype == x.dtype
    assert dgamma.dtype == dbeta.dtype == (np.float32 if x.dtype == np.float16 else x.dtype)
    assert dx.shape == x.shape and dgamma.shape == dbeta.shape == (features,)
    expected = ref_dx, ref_dgamma, ref_dbeta
    assert_backward_close((dx, dgamma, dbeta), expected, x.dtype, dy, x, mean, invstd, gamma, axis, training)
    for array, copy in zip(inputs, before):  # nothing the caller passed is modified
        np.testing.assert_array_equal(array, copy)


@property_settings
@given(forward_cases(training=True), paths)
def test_stats_match_reference(case, path):
    x, x_laid_out, axis, *_ = case
    with kernel_path(path):
        mean, var = numbanorm.batch_norm_stats(x_laid_out, axis=axis)
    ref_mean, ref_var = reference.stats(x, axis)
    scale = np.abs(x.astype(np.float64)).max(initial=0)
    assert mean.dtype == var.dtype == np.float64
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-9, atol=1e-12 * scale)
    # The variance's error bound scales with each feature's own spread, not with its offset:
    # E[x^2] - E[x]^2 would lose (offset / spread)^2 of it.
    moved = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    spread = np.abs(moved - ref_mean).max(axis=0, initial=0.0)
    error = np.abs(var - ref_var)
    assert (error <= 1e-9 * ref_var + 1e-12 * spread**2).all(), (error, ref_var, spread)


@property_settings
@given(forward_cases(), st.booleans(), paths)
def test_out_receives_the_result(case, in_place, path):
    x, x_laid_out, axis, gamma, beta, _, _ = case
    if not x_laid_out.flags.writeable:
        x_laid_out = x_laid_out.copy()
    out = x_laid_out if in_place else np.full_like(x_laid_out, np.nan)
    with kernel_path(path):
        expected, *_ = numbanorm.batch_norm_forward(x_laid_out, gamma, beta, axis=axis)
        y, _, _ = numbanorm.batch_norm_forward(x_laid_out, gamma, beta, axis=axis, out=out)
    assert y is out
    np.testing.assert_array_equal(out, expected)


@property_settings
@given(forward_cases(), st.sampled_from(["new", "dy", "x", "overlapping dy"]), st.booleans(), paths)
def test_backward_out_receives_dx(case, target, elemt, path):
    x, x_laid_out, axis, gamma, _, training, rng = case
    if not x_laid_out.flags.writeable:
        x_laid_out = x_laid_out.copy()
    # dy in a buffer one value longer, so that an ``out`` one value into it overlaps it in part.
    buffer = np.empty(x.size + 1, dtype=x.dtype)
    dy = buffer[:-1].reshape(x.shape)
    dy[...] = rng.normal(size=x.shape)
    _, mean, invstd = numbanorm.batch_norm_forward(x, gamma, axis=axis)
    sum_dy, sum_dy_xhat = numbanorm.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)

    def backward(out=None):
        if elemt:
            count = x.size // x.shape[axis]
            return numbanorm.batch_norm_backward_elemt(
                dy, x_laid_out, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis=axis, out=out
            )
        return numbanorm.batch_norm_backward(dy, x_laid_out, mean, invstd, gamma, axis=axis, training=training, out=out)[0]

    with kernel_path(path):
        expected = backward()
        out = {
            "new": np.full_like(x_laid_out, np.nan),
            "dy": dy,
            "x": x_laid_out,
            "overlapping dy": buffer[1:].reshape(x.shape),
        }[target]
        dx = backward(out)
    assert dx is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((300, 5), 1), ((6, 3, 50), 1), ((6, 50, 3), -1)])
@pytest.mark.parametrize("path", PATHS)
def test_every_pass_in_place_matches_one_into_a_new_array(shape, axis, dtype, path):
    # Each element-wise pass has its own code for an output that is one of its inputs
    # ((N, C) vectors; inline_jit loops over NCHW runs): forward and inference in place of
    # x, training and inference backward in place of dy, training backward in place of x.
    rng = np.random.default_rng(3)
    x = (rng.normal(size=shape) * 3 + 5).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    features = shape[axis]
    gamma = rng.uniform(0.5, 2, features)
    running = dict(running_mean=rng.normal(size=features), running_var=rng.uniform(0.5, 2, features))
    _, mean, invstd = numbanorm.batch_norm_forward(x, axis=axis)
    calls = {
        "forward": lambda x, dy, out=None: numbanorm.batch_norm_forward(x, gamma, axis=axis, out=out)[0],
        "inference": lambda x, dy, out=None: numbanorm.batch_norm_forward(x, gamma, axis=axis, training=False, out=out, **running)[0],
        "backward": lambda x, dy, out=None: numbanorm.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis, out=out)[0],
        "inference backward": lambda x, dy, out=None: numbanorm.batch_norm_backward(
            dy, x, mean, invstd, gamma, axis=axis, training=False, out=out
        )[0],
    }
    targets = {"forward": ["x"], "inference": ["x"], "backward": ["dy", "x"], "inference backward": ["dy"]}
    with kernel_path(path):
        for name, call in calls.items():
            expected = call(x, dy)
            for target in targets[name]:
                x_copy, dy_copy = x.copy(), dy.copy()
                out = x_copy if target == "x" else dy_copy
                assert call(x_copy, dy_copy, out=out) is out
                np.testing.assert_array_equal(out, expected, err_msg=f"{name} in place of {target}")


@pytest.mark.parametrize(
    "dtype, inner",
    [
        (np.float32, _kernels.RUN_VECTORS_MAX),
        (np.float32, _kernels.RUN_VECTORS_MAX + 1),
        (np.float64, _kernels.RUN_VECTORS_MAX_FLOAT64),
        (np.float64, _kernels.RUN_VECTORS_MAX_FLOAT64 + 1),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_runs_on_either_side_of_the_explicit_vectors_limit(dtype, inner, path):
    # (N, C, H, W) runs up to a dtype's limit (_kernels._run_vectors) take explicit vectors, one
    # call a run, longer ones LLVM's loop: every element-wise pass on both sides, into a new
    # array and in place, against the float64 reference.
    rng = np.random.default_rng(11)
    shape = (3, 5, inner)
    x = (rng.normal(size=shape) * 3 + 5).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, 5), rng.normal(size=5)
    running_mean, running_var = rng.normal(size=5), rng.uniform(0.5, 2, 5)
    with kernel_path(path):
        y, mean, invstd = numbanorm.batch_norm_forward(x, gamma, beta)
        y_infer, _, _ = numbanorm.batch_norm_forward(x, gamma, beta, training=False, running_mean=running_mean, running_var=running_var)
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd, gamma)
        dx_infer, _, _ = numbanorm.batch_norm_backward(dy, x, mean, invstd, gamma, training=False)
        in_place = x.copy(), dy.copy()
        numbanorm.batch_norm_forward(in_place[0], gamma, beta, out=in_place[0])
        numbanorm.batch_norm_backward(in_place[1], x, mean, invstd, gamma, out=in_place[1])
    ref_y, ref_mean, ref_invstd, _, _ = reference.forward(x, gamma, beta)
    assert_close(y, ref_y, dtype)
    assert_close(mean, ref_mean, dtype)
    assert_close(invstd, ref_invstd, dtype)
    assert_close(y_infer, reference.forward(x, gamma, beta, training=False, running_mean=running_mean, running_var=running_var)[0], dtype)
    assert_backward_close((dx, dgamma, dbeta), reference.backward(dy, x, mean, invstd, gamma), dtype, dy, x, mean, invstd, gamma)
    assert_gradient_close(
        dx_infer, reference.backward(dy, x, mean, invstd, gamma, training=False)[0], dtype,
        gradient_scale(dy, x, mean, invstd, gamma, training=False),
    )
    np.testing.assert_array_equal(in_place[0], y)
    np.testing.assert_array_equal(in_place[1], dx)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((300, 17), 1), ((6, 3, 50), 1), ((6, 50, 3), -1)])
@pytest.mark.parametrize("path", PATHS)
def test_unaligned_arrays_give_what_aligned_ones_give(shape, axis, dtype, path):
    # Arrays one byte into their buffer (np.frombuffer at an odd offset, a memory map past an
    # odd-sized header): the vector kernels' stores need a 32-byte boundary that whole values
    # from such an address never reach, and writing into one as ``out`` crashed the process.
    rng = np.random.default_rng(8)
    x = (rng.normal(size=shape) * 3 + 5).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    features = shape[axis]
    gamma, beta = rng.uniform(0.5, 2, features), rng.normal(size=features)
    running = rng.normal(size=features).astype(dtype), rng.uniform(0.5, 2, features).astype(dtype)
    _, mean, invstd = numbanorm.batch_norm_forward(x, axis=axis)
    calls = {
        "forward": lambda x, dy, out=None, rm=None, rv=None: numbanorm.batch_norm_forward(
            x, gamma, beta, axis=axis, out=out, running_mean=rm, running_var=rv
        )[0],
        "inference": lambda x, dy, out=None, rm=None, rv=None: numbanorm.batch_norm_forward(
            x, gamma, beta, axis=axis, training=False, out=out, running_mean=running[0], running_var=running[1]
        )[0],
        "backward": lambda x, dy, out=None, rm=None, rv=None: numbanorm.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis, out=out)[0],
    }
    with kernel_path(path):
        for name, call in calls.items():
            rm, rv = running[0].copy(), running[1].copy()
            expected = call(x, dy, rm=rm, rv=rv)
            for target in ("new", "x", "dy"):
                ux, udy = with_layout(x, "unaligned"), with_layout(dy, "unaligned")
                urm, urv = with_layout(running[0], "unaligned"), with_layout(running[1], "unaligned")
                out = {"new": with_layout(np.full_like(x, np.nan), "unaligned"), "x": ux, "dy": udy}[target]
                assert call(ux, udy, out=out, rm=urm, rv=urv) is out
                np.testing.assert_array_equal(out, expected, err_msg=f"{name} into {target}")
                if name == "forward":  # unaligned running statistics, updated in place (by NumPy)
                    assert_close(urm, rm, dtype)
                    assert_close(urv, rv, dtype)


# --- gradients against finite differences ----------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(shapes_and_axes(max_dims=4, max_size=60), st.booleans(), st.integers(0, 2**32 - 1))
def test_backward_is_the_gradient_of_forward(shape_axis, training, seed):
    shape, axis = shape_axis
    rng = np.random.default_rng(seed)
    features = shape[axis]
    x = rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.uniform(-2, 2)
    gamma, beta = rng.uniform(-2, 2, features), rng.uniform(-2, 2, features)
    running_mean, running_var = rng.normal(size=features), rng.uniform(0.5, 2, features)
    weights = rng.normal(size=shape)  # loss = sum(weights * y): dy = weights

    def loss(x, gamma, beta):
        y, _, _ = numbanorm.batch_norm_forward(
            x, gamma, beta, axis=axis, eps=1e-3, training=training,
            running_mean=None if training else running_mean, running_var=None if training else running_var,
        )
        return np.sum(weights * y)

    _, mean, invstd = numbanorm.batch_norm_forward(
        x, gamma, beta, axis=axis, eps=1e-3, training=training,
        running_mean=None if training else running_mean, running_var=None if training else running_var,
    )
    dx, dgamma, dbeta = numbanorm.batch_norm_backward(weights, x, mean, invstd, gamma, axis=axis, training=training)

    def numeric(f, v):
        grad = np.zeros_like(v)
        step = 1e-6
        for i in np.ndindex(v.shape):
            plus, minus = v.copy(), v.copy()
            plus[i] += step
            minus[i] -= step
            grad[i] = (f(plus) - f(minus)) / (2 * step)
        return grad

    np.testing.assert_allclose(dx, numeric(lambda v: loss(v, gamma, beta), x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dgamma, numeric(lambda v: loss(x, v, beta), gamma), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dbeta, numeric(lambda v: loss(x, gamma, v), beta), rtol=1e-5, atol=1e-6)


# --- invariants ------------------------------------------------------------------------------


@property_settings
@given(forward_cases(training=True))
def test_training_output_has_mean_beta_and_std_abs_gamma(case):
    x, x_laid_out, axis, gamma, beta, _, _ = case
    features = x.shape[axis]
    gamma = np.ones(features) if gamma is None else gamma
    beta = np.zeros(features) if beta is None else beta
    y, _, _ = numbanorm.batch_norm_forward(x_laid_out, gamma, beta, axis=axis, eps=0.0)
    y = np.moveaxis(y.astype(np.float64), axis, -1).reshape(-1, features)
    _, var = reference.stats(x, axis)
    varying = var > 1e-6 * np.abs(x.astype(np.float64)).max() ** 2
    assume(varying.any())  # else nothing below is checked
    # Each output value is within ten times the dtype's tolerance of its largest one in the
    # feature, and so are their mean and standard deviation.
    scale = 10 * np.abs(y).max(axis=0, initial=0)[varying]
    assert_close(y.mean(axis=0)[varying], beta[varying], x.dtype, scale=scale)
    assert_close(y.std(axis=0)[varying], np.abs(gamma)[varying], x.dtype, scale=scale)


@property_settings
@given(forward_cases(), st.integers(0, 2**32 - 1))
def test_permuting_the_batch_permutes_the_output(case, seed):
    x, _, axis, gamma, beta, training, rng = case
    batch = 1 if axis % x.ndim == 0 else 0
    order = np.random.default_rng(seed).permutation(x.shape[batch])
    features = x.shape[axis]
    stats = dict(running_mean=rng.normal(size=features), running_var=rng.uniform(1, 2, features)) if not training else {}
    y, *_ = numbanorm.batch_norm_forward(x, gamma, beta, axis=axis, training=training, **stats)
    y_permuted, *_ = numbanorm.batch_norm_forward(np.take(x, order, axis=batch), gamma, beta, axis=axis, training=training, **stats)
    assert_close(y_permuted, np.take(y, order, axis=batch), x.dtype)


@property_settings
@given(forward_cases())
def test_moving_the_feature_axis_commutes(case):
    x, x_laid_out, axis, gamma, beta, training, rng = case
    features = x.shape[axis]
    stats = dict(running_mean=rng.normal(size=features), running_var=rng.uniform(1, 2, features)) if not training else {}
    y, mean, invstd = numbanorm.batch_norm_forward(x_laid_out, gamma, beta, axis=axis, training=training, **stats)
    target = 0 if axis % x.ndim == x.ndim - 1 else -1  # never where it is already
    moved = np.moveaxis(x_laid_out, axis, target)
    y_moved, mean_moved, invstd_moved = numbanorm.batch_norm_forward(
        moved, gamma, beta, axis=target, training=training, **stats
    )
    assert_close(y_moved, np.moveaxis(y, axis, target), x.dtype)
    np.testing.assert_allclose(mean_moved, mean, rtol=1e-12, atol=1e-12 * float(np.abs(x).max(initial=0)))
    np.testing.assert_allclose(invstd_moved, invstd, rtol=1e-9)


# --- dtypes and array-likes ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint16, np.bool_])
def test_integer_and_bool_input_is_computed_in_float64(dtype):
    x = (np.arange(24).reshape(6, 4) % 3).astype(dtype)
    y, mean, invstd = numbanorm.batch_norm_forward(x)
    assert y.dtype == np.float64
    assert_close(y, reference.forward(x)[0], np.float64)
    dx, dgamma, dbeta = numbanorm.batch_norm_backward(x, x, mean, invstd)
    assert dx.dtype == dgamma.dtype == dbeta.dtype == np.float64
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(x, x, mean, invstd)
    assert_gradient_close(dx, ref_dx, np.float64, gradient_scale(x, x, mean, invstd))
    assert_close(dgamma, ref_dgamma, np.float64)
    assert_close(dbeta, ref_dbeta, np.float64)


def test_lists_are_accepted():
    x = [[1.0, 2.0], [3.0, 5.0], [4.0, 1.0]]
    y, mean, invstd = numbanorm.batch_norm_forward(x, [1.0, 2.0], [0.0, 1.0])
    assert_close(y, reference.forward(x, [1.0, 2.0], [0.0, 1.0])[0], np.float64)
    mean_, var_ = numbanorm.batch_norm_stats(x)
    np.testing.assert_allclose(var_, np.var(x, axis=0))


UNSUPPORTED = [np.complex64, np.complex128, object, "U3", "datetime64[s]"]
if np.dtype(np.longdouble).itemsize > 8:  # elsewhere longdouble is float64, which is supported
    UNSUPPORTED.append(np.longdouble)


@pytest.mark.parametrize("dtype", UNSUPPORTED)
def test_unsupported_dtypes_raise_type_error(dtype):
    x = np.ones((4, 3)).astype(dtype) if dtype != "datetime64[s]" else np.zeros((4, 3), dtype=dtype)
    with pytest.raises(TypeError, match="x"):
        numbanorm.batch_norm_forward(x)
    with pytest.raises(TypeError, match="x"):
        numbanorm.batch_norm_stats(x)
    with pytest.raises(TypeError, match="dy"):
        numbanorm.batch_norm_backward(x, np.ones((4, 3)), np.zeros(3), np.ones(3))


def test_non_native_byte_order_is_accepted():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(30, 4)).astype(">f8")
    running_mean, running_var = np.zeros(4, ">f4"), np.ones(4, ">f4")
    y, mean, invstd = numbanorm.batch_norm_forward(x, running_mean=running_mean, running_var=running_var)
    ref_y, _, _, ref_rm, ref_rv = reference.forward(x, running_mean=np.zeros(4), running_var=np.ones(4))
    assert_close(y, ref_y, np.float64)
    assert_close(running_mean, ref_rm, np.float32)
    assert_close(running_var, ref_rv, np.float32)
    dx, _, _ = numbanorm.batch_norm_backward(x, x, mean, invstd)
    assert_gradient_close(dx, reference.backward(x, x, mean, invstd)[0], np.float64, gradient_scale(x, x, mean, invstd))


def test_a_non_native_x_is_normalized_and_differentiated_in_place():
    x = np.random.default_rng(11).normal(size=(30, 4)).astype(">f4")
    dy = np.random.default_rng(12).normal(size=(30, 4)).astype(">f4")
    ref_y, mean, invstd, _, _ = reference.forward(x)
    ref_dx = reference.backward(dy, x, mean, invstd)[0]
    x_before = x.copy()
    y, mean, invstd = numbanorm.batch_norm_forward(x, out=x)
    assert y is x and x.dtype == ">f4"
    assert_close(x, ref_y, np.float32)
    dy_before = dy.copy()
    dx, _, _ = numbanorm.batch_norm_backward(dy, x_before, mean, invstd, out=dy)
    assert dx is dy
    assert_gradient_close(dy, ref_dx, np.float32, gradient_scale(dy_before, x_before, mean, invstd))


def test_converted_copies_keep_the_memory_order_the_kernels_give():
    # Neither C nor Fortran: outputs are C-ordered, whether x needs a new dtype or not.
    fortran = np.asfortranarray(np.arange(120).reshape(6, 4, 5))
    for x in (fortran[:, ::2], fortran.astype(">f8")[:, ::2], fortran.astype(np.float32)[:, ::2]):
        y, mean, invstd = numbanorm.batch_norm_forward(x)
        assert y.flags.c_contiguous, x.dtype
        assert numbanorm.batch_norm_backward(x, x, mean, invstd)[0].flags.c_contiguous, x.dtype
    # Fortran-ordered in, Fortran-ordered out, converted or not.
    for x in (fortran, fortran.astype(">f8"), fortran.astype(np.float32)):
        y, mean, invstd = numbanorm.batch_norm_forward(x)
        assert y.flags.f_contiguous, x.dtype
        assert numbanorm.batch_norm_backward(x, x, mean, invstd)[0].flags.f_contiguous, x.dtype


def test_interleaved_running_statistics_are_updated():
    # Two columns of one array: their memory bounds overlap, their values do not.
    x = np.random.default_rng(13).normal(size=(30, 4))
    running = np.zeros((4, 2))
    running[:, 1] = 1.0
    numbanorm.batch_norm_forward(x, running_mean=running[:, 0], running_var=running[:, 1])
    _, _, _, ref_rm, ref_rv = reference.forward(x, running_mean=np.zeros(4), running_var=np.ones(4))
    assert_close(running[:, 0], ref_rm, np.float64)
    assert_close(running[:, 1], ref_rv, np.float64)


def test_float16_parameter_gradients_do_not_overflow():
    x = np.random.default_rng(10).normal(size=(70000, 2)).astype(np.float16)
    _, mean, invstd = numbanorm.batch_norm_forward(x)
    # dy = 1 + xhat: dbeta = 70000 and dgamma = sum(xhat + xhat**2), about 70000 too; float16
    # holds neither (its largest value is 65504).
    xhat = (x.astype(np.float64) - mean) * invstd
    dy = (1 + xhat).astype(np.float16)
    _, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd)
    assert dgamma.dtype == dbeta.dtype == np.float32
    _, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean, invstd)
    assert (ref_dgamma > 65504).all() and (ref_dbeta > 65504).all()
    assert_close(dgamma, ref_dgamma, np.float32)
    assert_close(dbeta, ref_dbeta, np.float32)


def test_mixed_precision_backward_promotes():
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    _, mean, invstd = numbanorm.batch_norm_forward(x)
    dy = np.random.default_rng(1).normal(size=(8, 3))
    dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd)
    assert dx.dtype == dgamma.dtype == np.float64
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean, invstd)
    assert_gradient_close(dx, ref_dx, np.float64, gradient_scale(dy, x, mean, invstd))
    assert_close(dgamma, ref_dgamma, np.float64)
    assert_close(dbeta, ref_dbeta, np.float64)


# --- empty and degenerate inputs -------------------------------------------------------------


def test_inference_on_an_empty_batch_returns_an_empty_result():
    y, mean, invstd = numbanorm.batch_norm_forward(
        np.empty((0, 3), np.float32), training=False, running_mean=np.ones(3), running_var=np.full(3, 4.0), eps=0.0
    )
    assert y.shape == (0, 3) and y.dtype == np.float32
    np.testing.assert_array_equal(mean, 1.0)
    np.testing.assert_array_equal(invstd, 0.5)


@pytest.mark.parametrize("path", ["serial", "parallel", "streamed"])
@pytest.mark.parametrize("shape", [(4, 0), (4, 0, 2), (1, 0, 3, 3)])
def test_every_operation_on_zero_features_returns_empty_results(shape, path):
    # With no features the (N, C) vector passes still compute ``body % features``, a modulo
    # by zero: Numba's numpy error model makes it 0 (its python one raises), and no loop runs.
    x = np.empty(shape, np.float32)
    features = shape[1]
    ones, zeros = np.ones(features), np.zeros(features)
    with kernel_path(path):
        y, mean, invstd = numbanorm.batch_norm_forward(x, out=np.empty_like(x))
        y_infer, _, _ = numbanorm.batch_norm_forward(x, training=False, running_mean=zeros, running_var=ones)
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(x, x, zeros, ones, out=x)
        dx_infer, _, _ = numbanorm.batch_norm_backward(x, x, zeros, ones, training=False)
        stats = numbanorm.batch_norm_stats(x)
    for array in (y, y_infer, dx, dx_infer):
        assert array.shape == shape and array.dtype == np.float32
    assert mean.shape == invstd.shape == dgamma.shape == dbeta.shape == (features,)
    assert all(s.shape == (features,) for s in stats[:2])
    np.testing.assert_array_equal(dbeta, 0.0)
    np.testing.assert_array_equal(dgamma, 0.0)


@pytest.mark.parametrize("path", ["serial", "parallel", "streamed"])
@pytest.mark.parametrize("shape", [(4, 3, 0), (2, 3, 0, 5)])
def test_empty_runs_give_empty_results(shape, path):
    # Features, but no values in each run x[n, c]: the element-wise passes step through the
    # runs ``inner`` values at a time (_kernels.RUN_VECTORS_MAX), here by zero.
    x = np.empty(shape, np.float32)
    zeros, ones = np.zeros(3), np.ones(3)
    with kernel_path(path):
        y, mean, invstd = numbanorm.batch_norm_forward(x, training=False, running_mean=zeros, running_var=ones)
        results = [numbanorm.batch_norm_backward(x, x, zeros, ones, training=training) for training in (True, False)]
    assert y.shape == shape and y.dtype == np.float32
    np.testing.assert_array_equal(mean, 0.0)
    for dx, dgamma, dbeta in results:
        assert dx.shape == shape and dx.dtype == np.float32
        np.testing.assert_array_equal(dgamma, 0.0)
        np.testing.assert_array_equal(dbeta, 0.0)


# --- numerics --------------------------------------------------------------------------------


@pytest.mark.parametrize("std", [1.0, 1e-3])
def test_float32_is_accurate_when_the_mean_dwarfs_the_spread(std):
    rng = np.random.default_rng(1)
    # A feature's mean is 10**4 times its standard deviation.
    x = (1e4 * std + std * rng.normal(size=(4096, 16))).astype(np.float32)
    y, _, _ = numbanorm.batch_norm_forward(x)
    error = np.abs(y - reference.forward(x)[0]).max()
    assert error <= 1e-5, error
    x4 = (1e4 * std + std * rng.normal(size=(64, 8, 7, 9))).astype(np.float32)
    y4, _, _ = numbanorm.batch_norm_forward(x4)
    assert np.abs(y4 - reference.forward(x4)[0]).max() <= 1e-5


# (N, C), NCHW and channels-last: the three kernel layouts the offset tests below run on.
OFFSET_LAYOUTS = [((4096, 16), 1), ((64, 8, 7, 9), 1), ((64, 7, 9, 8), -1)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape, axis", OFFSET_LAYOUTS)
def test_float32_backward_is_accurate_when_the_mean_dwarfs_the_spread(shape, axis, path):
    # The backward's offset carries the mean's rounding (lo * invstd * xhat_scale), a term
    # that matters only when mean(dy * xhat) does: dy as a loss near its minimum gives it,
    # dy = y + noise. (With dy independent of x, mean(dy * xhat) ~ 1/sqrt(N) hides it.)
    rng = np.random.default_rng(12)
    x = (1e4 + rng.normal(size=shape)).astype(np.float32)
    features = shape[axis]
    gamma = rng.uniform(0.5, 2, features)
    with kernel_path(path):
        y, mean, invstd = numbanorm.batch_norm_forward(x, gamma, axis=axis)
        dy = (y + 0.1 * rng.normal(size=shape)).astype(np.float32)
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean, invstd, gamma, axis=axis)
    error = np.abs(dx - ref_dx).max()
    assert error <= 1e-5 * np.abs(ref_dx).max(), error  # the core issue's target, as it is worded
    assert_gradient_close(dx, ref_dx, np.float32, gradient_scale(dy, x, mean, invstd, gamma, axis=axis))
    assert_close(dgamma, ref_dgamma, np.float32)
    assert_close(dbeta, ref_dbeta, np.float32)


# (N, C, H, W) runs in explicit vectors and in LLVM's loop (runs of more than RUN_VECTORS_MAX
# values), each through the two passes ("serial") and channel by channel (a batch of one or
# two on the parallel paths: ``_kernels._by_channels``).
RUN_LAYOUTS = [(64, 8, 7, 9), (2, 8, 300), (1, 8, 7, 9)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", RUN_LAYOUTS)
def test_float32_backward_of_runs_is_accurate_when_the_mean_of_dy_dwarfs_its_spread(shape, path):
    # dy = 1e4 + N(0, 1): dy * dy_scale against an offset rounded at 1e4's scale cancelled to
    # 2.7e-4 of the largest |dx| (PyTorch: 2.5e-4). The runs split mean(dy) as they split the
    # mean of x (``_kernels._grad_column``).
    rng = np.random.default_rng(15)
    x = rng.normal(size=shape).astype(np.float32)
    dy = (1e4 + rng.normal(size=shape)).astype(np.float32)
    gamma = rng.uniform(0.5, 2, shape[1])
    with kernel_path(path):
        _, mean, invstd = numbanorm.batch_norm_forward(x, gamma)
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd, gamma)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean, invstd, gamma)
    error = np.abs(dx - ref_dx).max()
    assert error <= 1e-5 * np.abs(ref_dx).max(), error
    assert_close(dgamma, ref_dgamma, np.float32)
    assert_close(dbeta, ref_dbeta, np.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape, axis", OFFSET_LAYOUTS)
def test_float32_inference_keeps_the_digits_of_float64_running_statistics(shape, axis, path):
    # A float64 running mean near 1e4 has digits float32 cannot hold (its spacing there is
    # 1e-3): inference carries them in the shift, as training does with the batch mean.
    rng = np.random.default_rng(14)
    x = (1e4 + rng.normal(size=shape)).astype(np.float32)
    features = shape[axis]
    running_mean = 1e4 + rng.uniform(-0.5, 0.5, features)
    running_var = rng.uniform(0.5, 2.0, features)
    with kernel_path(path):
        y, _, _ = numbanorm.batch_norm_forward(
            x, axis=axis, training=False, running_mean=running_mean, running_var=running_var
        )
    ref_y = reference.forward(x, axis=axis, training=False, running_mean=running_mean, running_var=running_var)[0]
    error = np.abs(y - ref_y).max()
    assert error <= 1e-5, error


def test_a_constant_feature_with_eps_zero_gives_nan_as_in_pytorch():
    x = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]], np.float32)
    y, mean, invstd = numbanorm.batch_norm_forward(x, eps=0.0)
    assert np.isinf(invstd[1]) and np.isnan(y[:, 1]).all()
    assert_close(y[:, 0], reference.forward(x[:, :1], eps=0.0)[0][:, 0], np.float32)


def test_float32_is_more_accurate_than_torch_when_the_mean_dwarfs_the_spread():
    torch = pytest.importorskip("torch", reason="PyTorch is an optional test peer")
    x = (1e4 + np.random.default_rng(7).normal(size=(4096, 16))).astype(np.float32)
    expected = reference.forward(x)[0]
    ours = np.abs(numbanorm.batch_norm_forward(x)[0] - expected).max()
    theirs = np.abs(torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True).numpy() - expected).max()
    assert ours <= 1e-5 and ours < theirs / 10, (ours, theirs)


def test_float32_whose_squares_overflow_still_normalizes():
    rng = np.random.default_rng(2)
    x = (3e19 * rng.normal(size=(1000, 4))).astype(np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.sum(x * x, dtype=np.float32))
    y, mean, invstd = numbanorm.batch_norm_forward(x)
    assert np.all(np.isfinite(y))
    assert np.abs(y - reference.forward(x)[0]).max() <= 1e-5
    dy = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd)
    ref_dx, ref_dgamma, _ = reference.backward(dy, x, mean, invstd)
    assert_gradient_close(dx, ref_dx, np.float32, gradient_scale(dy, x, mean, invstd))
    assert_close(dgamma, ref_dgamma, np.float32, scale=np.abs(dy).sum())


# float64 data whose squares overflow: the oracle runs on x * 2**-600, where nothing does. y
# does not depend on the scale (with eps scaled alike); the mean scales by 2**600, the
# variance by 2**1200, invstd by 2**-600. (1, 3, 4000): a batch of one, whose statistics
# split the features among slabs.
HUGE_SHAPES = [(1000, 4), (1, 3, 4000)]
SCALE_DOWN = 2.0**-600


def huge_float64(spread, shape):
    rng = np.random.default_rng(4)
    with np.errstate(over="ignore"):
        return np.clip(spread * rng.normal(size=shape), -1.7e308, 1.7e308), rng


@pytest.mark.parametrize("path", ["serial", "parallel"])
@pytest.mark.parametrize("shape", HUGE_SHAPES)
# 1e154: squares overflow, the variance does not; 1e200: the variance overflows too, invstd
# does not; 1e308: values of both signs near the largest float64, whose differences overflow.
@pytest.mark.parametrize("spread", [1e154, 1e200, 1e308])
def test_float64_whose_squares_overflow_still_normalizes(spread, shape, path):
    x, _ = huge_float64(spread, shape)
    eps = 1e-5
    ref_mean, ref_var = reference.stats(x * SCALE_DOWN)
    ref_y = reference.forward(x * SCALE_DOWN, eps=eps * SCALE_DOWN**2)[0]
    features = shape[1]
    running_mean, running_var = np.zeros(features), np.ones(features)
    nan_x = x.copy()
    nan_x[-1, 0] = np.nan  # the last row: the features beside it are taken again all the way
    with kernel_path(path):
        mean, var = numbanorm.batch_norm_stats(x)
        y, forward_mean, invstd = numbanorm.batch_norm_forward(
            x, eps=eps, running_mean=running_mean, running_var=running_var
        )
        nan_y = numbanorm.batch_norm_forward(nan_x, eps=eps)[0]
    assert np.all(np.abs(mean * SCALE_DOWN - ref_mean) <= 1e-12 * np.sqrt(ref_var)), (mean, ref_mean)
    np.testing.assert_array_equal(forward_mean, mean)
    count = x.size // features
    with np.errstate(over="ignore"):
        expected_var = ref_var / SCALE_DOWN / SCALE_DOWN
        # The unbiased variance's running average, near the largest float64 for a spread of 1e154.
        expected_running_var = 0.9 + 0.1 * count / (count - 1) * ref_var / SCALE_DOWN / SCALE_DOWN
    np.testing.assert_allclose(var, expected_var, rtol=1e-12)  # inf where the variance is beyond float64
    np.testing.assert_allclose(invstd, SCALE_DOWN / np.sqrt(ref_var + eps * SCALE_DOWN**2), rtol=1e-12)
    assert_close(y, ref_y, np.float64)
    np.testing.assert_allclose(running_mean * SCALE_DOWN, 0.1 * ref_mean, rtol=1e-12, atol=1e-12 * np.sqrt(ref_var).max())
    np.testing.assert_allclose(running_var, expected_running_var, rtol=1e-12)
    assert np.isnan(nan_y[:, 0]).all()
    assert_close(nan_y[:, 1:], ref_y[:, 1:], np.float64)  # the NaN stays in its feature


@pytest.mark.parametrize("path", ["serial", "parallel"])
@pytest.mark.parametrize("shape", HUGE_SHAPES)
@pytest.mark.parametrize("spread", [1e154, 1e200])
def test_float64_gradients_where_the_squares_overflow(spread, shape, path):
    # dx is invstd times a function of xhat, which the scaled data give alike. (Near the
    # largest float64 the sum of dy * (x - mean) overflows: the README's limits.)
    x, rng = huge_float64(spread, shape)
    dy = rng.normal(size=shape)
    ref_mean, ref_var = reference.stats(x * SCALE_DOWN)
    mean, invstd = ref_mean / SCALE_DOWN, SCALE_DOWN / np.sqrt(ref_var + 1e-5 * SCALE_DOWN**2)
    with kernel_path(path):
        dx = numbanorm.batch_norm_backward(dy, x, mean, invstd)[0]
    scaled = (x * SCALE_DOWN, mean * SCALE_DOWN, invstd / SCALE_DOWN)
    ref_dx = reference.backward(dy, *scaled)[0] * SCALE_DOWN
    assert_gradient_close(dx, ref_dx, np.float64, gradient_scale(dy, *scaled) * SCALE_DOWN)


@pytest.mark.parametrize("path", ["serial", "parallel"])
# (N, C) rows; (N, C, H, W) runs in explicit vectors and longer than RUN_VECTORS_MAX, which
# LLVM's loop had computed with invstd * xhat_scale hoisted (1-3 % off); a batch of one
# runs channel by channel on the parallel path.
@pytest.mark.parametrize("shape", [(1000, 3), (64, 3, 20), (4, 3, 4000), (1, 3, 4000)])
def test_float32_gradients_stay_accurate_at_extreme_scales(shape, path):
    # invstd**2 would be subnormal in float32 here: the kernels never form it.
    rng = np.random.default_rng(11)
    x = (1e30 * rng.normal(size=shape)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    with kernel_path(path):
        _, mean, invstd = numbanorm.batch_norm_forward(x)
        dx, _, _ = numbanorm.batch_norm_backward(dy, x, mean, invstd)
    assert_gradient_close(dx, reference.backward(dy, x, mean, invstd)[0], np.float32, gradient_scale(dy, x, mean, invstd))


# The (N, C) backward reads invstd * xhat_scale as one factor where it stays in the dtype's
# normal range (_kernels.grad_params); here it does not: in float32 it is subnormal at a
# spread of 1e21 (a few bits left) and zero at 1e30, and it overflows with eps=0 at a spread
# of 1e-25 (float32) or 1e-160 (float64). (65536, 8) runs on two threads.
@pytest.mark.parametrize(
    "dtype, spread, eps",
    [(np.float32, 1e21, 1e-5), (np.float32, 1e30, 1e-5), (np.float32, 1e-25, 0.0), (np.float64, 1e-160, 0.0)],
)
@pytest.mark.parametrize("shape", [(1000, 3), (65536, 8)])
def test_gradients_stay_accurate_where_the_folded_factor_leaves_the_range(dtype, spread, eps, shape):
    rng = np.random.default_rng(12)
    x = (spread * rng.normal(size=shape)).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    _, mean, invstd = numbanorm.batch_norm_forward(x, eps=eps)
    sum_dy, sum_dy_xhat = numbanorm.batch_norm_backward_reduce(dy, x, mean, invstd)
    params = _kernels.new_params(_kernels.BACKWARD_ROWS, x[:, :, None], x[:, :, None])
    assert not _kernels.grad_params(mean, invstd, np.ones(shape[1]), sum_dy, sum_dy_xhat, shape[0], params)
    expected, scale = reference.backward(dy, x, mean, invstd)[0], gradient_scale(dy, x, mean, invstd)
    assert_gradient_close(numbanorm.batch_norm_backward(dy, x, mean, invstd)[0], expected, dtype, scale)
    elemt = numbanorm.batch_norm_backward_elemt(dy, x, mean, invstd, None, sum_dy, sum_dy_xhat, shape[0])
    assert_gradient_close(elemt, expected, dtype, scale)


@pytest.mark.parametrize("dtype", DTYPES)
# (5000, 3) reads its rows as super-rows of 341 rows (_kernels._super_rows).
@pytest.mark.parametrize("shape, axis", [((50, 3), 1), ((5000, 3), 1), ((6, 3, 5, 5), 1), ((6, 5, 3), -1)])
def test_a_constant_feature_gives_beta(dtype, shape, axis):
    x = np.random.default_rng(3).normal(size=shape).astype(dtype)
    index = [slice(None)] * x.ndim
    index[axis] = 1
    # 1e10 + 0.3 is not summed exactly in float64: the statistics must not depend on that.
    x[tuple(index)] = 1e10 + 0.3 if dtype == np.float64 else 7.25
    beta = np.array([0.5, -2.0, 3.0])
    y, _, _ = numbanorm.batch_norm_forward(x, np.array([2.0, 3.0, 4.0]), beta, axis=axis)
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y[tuple(index)], np.asarray(beta[1], dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# (1, 2, 256, 256): one block holds 65536 values of a feature (_kernels.BLOCK_BYTES).
# (10, 2, 64, 64): float32 blocks of 8 rows, their runs four at a time, then 2 rows one at a time.
@pytest.mark.parametrize("shape, axis", [((4096, 2), 1), ((1, 2, 256, 256), 1), ((10, 2, 64, 64), 1), ((64, 8, 8, 2), -1)])
@pytest.mark.parametrize("path", ["serial", "parallel"])
def test_an_outlying_first_value_keeps_the_statistics_exact(dtype, shape, axis, path):
    # The worst case of the one-pass block statistics (_kernels._block_stats): they
    # subtract each block's first value, and the cancellation in m2 is largest when
    # that value lies far from all the others, which sit at 10**4 with a spread of
    # 10**-3. (E[x**2] - E[x]**2 would lose every digit of their variance.)
    x = np.random.default_rng(5).normal(1e4, 1e-3, size=shape).astype(dtype)
    first = [0] * x.ndim  # each feature's first value
    first[axis] = slice(None)
    x[tuple(first)] = [1e4 + 1e3, 1e4 - 7.0]
    with kernel_path(path):
        mean, var = numbanorm.batch_norm_stats(x, axis=axis)
    ref_mean, ref_var = reference.stats(x, axis)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(var, ref_var, rtol=1e-9)


# (70000, 4): nine blocks a slab; (8, 3, 64, 64): a block of a few rows' runs; (64, 8, 8, 3): super-rows.
@pytest.mark.parametrize("shape, axis", [((70000, 4), 1), ((8, 3, 64, 64), 1), ((64, 8, 8, 3), -1)])
@pytest.mark.parametrize("path", ["serial", "parallel"])
def test_float64_statistics_keep_their_digits_far_from_zero(shape, axis, path):
    # float64 values at 2**33 (8.6e9) with a spread of about 2: their blocks' means are
    # rounded at 2**33's spacing, 1.9e-6, and Chan's merge takes their differences, so a
    # merge of absolute means lost eight digits of the variance (1e-8 relative, where NumPy
    # loses three). The values are exact quarters, whose mean and variance are exact
    # fractions: the oracle is exact, where float64 NumPy would not be.
    quarters = np.random.default_rng(6).integers(-8, 9, size=shape)
    x = 2.0**33 + quarters / 4
    features = x.shape[axis]
    per_feature = np.moveaxis(quarters, axis, -1).reshape(-1, features)
    with kernel_path(path):
        mean, var = numbanorm.batch_norm_stats(x, axis=axis)
        count, partial_mean, m2 = numbanorm.batch_norm_partial_stats(x, axis=axis)
    for c in range(features):
        k = [int(v) for v in per_feature[:, c]]
        n = len(k)
        exact_mean = 2**33 + Fraction(sum(k), 4 * n)
        exact_var = (Fraction(sum(v * v for v in k), n) - Fraction(sum(k), n) ** 2) / 16
        assert mean[c] == partial_mean[c] == float(exact_mean)
        assert count[c] == n
        np.testing.assert_allclose([var[c], m2[c] / n], float(exact_var), rtol=1e-14)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("position", ["first", "middle"])  # "first": the block statistics' shift
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape, axis", [((200, 4), 1), ((9, 4, 6, 6), 1), ((9, 6, 4), -1), ((70000, 4), 1)])
def test_nan_or_inf_stays_in_its_feature(bad, position, dtype, path, shape, axis):
    rng = np.random.default_rng(4)
    x = (3 + rng.normal(size=shape)).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    poisoned = [slice(None)] * x.ndim
    poisoned[axis] = 2
    x[tuple(poisoned)].flat[0 if position == "first" else 5] = bad
    running_mean, running_var = np.zeros(4, dtype), np.ones(4, dtype)
    with kernel_path(path):
        y, mean, invstd = numbanorm.batch_norm_forward(x, axis=axis, running_mean=running_mean, running_var=running_var)
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd, axis=axis)
    clean = [0, 1, 3]
    x_clean, dy_clean = np.delete(x, 2, axis=axis), np.delete(dy, 2, axis=axis)
    ref_y, ref_mean, ref_invstd, ref_rm, ref_rv = reference.forward(
        x_clean, axis=axis, running_mean=np.zeros(3), running_var=np.ones(3)
    )
    assert_close(np.delete(y, 2, axis=axis), ref_y, dtype)
    np.testing.assert_allclose(mean[clean], ref_mean, rtol=1e-9)
    np.testing.assert_allclose(invstd[clean], ref_invstd, rtol=1e-11)
    assert_close(running_mean[clean], ref_rm, dtype)
    assert_close(running_var[clean], ref_rv, dtype)
    # The poisoned feature: its variance is NaN (a NaN, or inf - inf), and so is all of its y.
    assert np.isnan(invstd[2]) and np.isnan(y[tuple(poisoned)]).all()
    assert np.isnan(running_var[2])
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(dy_clean, x_clean, mean[clean], invstd[clean], axis=axis)
    assert_gradient_close(np.delete(dx, 2, axis=axis), ref_dx, dtype, gradient_scale(dy_clean, x_clean, mean[clean], invstd[clean], axis=axis))
    assert_close(dgamma[clean], ref_dgamma, dtype, scale=feature_sums(dy_clean, axis))
    assert_close(dbeta[clean], ref_dbeta, dtype, scale=feature_sums(dy_clean, axis))


@pytest.mark.parametrize("bad", [(np.inf,), (-np.inf, -np.inf), (np.inf, -np.inf), (np.inf, np.nan)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", ["serial", "parallel"])
@pytest.mark.parametrize("shape, axis", [((200, 4), 1), ((9, 4, 6, 6), 1), ((9, 6, 4), -1), ((70000, 4), 1)])
def test_the_mean_of_a_feature_with_infinities_is_numpys(bad, dtype, path, shape, axis):
    # ±inf, or NaN for infinities of both signs, wherever they lie: a block's first value
    # (the blocks' shift), a slab's, or elsewhere. The blocks and Chan's merge gave NaN
    # for some places of one inf (inf - inf), and merge_stats depended on the parts' order.
    rng = np.random.default_rng(len(bad))
    x = (3 + rng.normal(size=shape)).astype(dtype)
    feature = np.moveaxis(x, axis, 0)[2]  # a view
    for value in bad:
        feature.flat[rng.integers(feature.size)] = value
    feature.flat[0] = bad[0]
    with np.errstate(invalid="ignore"):  # inf - inf
        expected = np.asarray(feature, np.float64).mean()
    running_mean, running_var = np.zeros(4), np.ones(4)
    with kernel_path(path):
        mean, var = numbanorm.batch_norm_stats(x, axis=axis)
        numbanorm.batch_norm_forward(x, axis=axis, running_mean=running_mean, running_var=running_var)
        halves = np.array_split(x, 2, axis=0)
        parts = [numbanorm.batch_norm_partial_stats(half, axis=axis) for half in halves]
    np.testing.assert_array_equal(mean[2], expected)
    assert np.isnan(var[2]) and np.isnan(running_var[2])
    np.testing.assert_array_equal(running_mean[2], 0.1 * expected)
    for ordered in (parts, parts[::-1]):
        _, merged_mean, merged_m2 = numbanorm.merge_stats(ordered)
        np.testing.assert_array_equal(merged_mean[2], expected)
        assert np.isnan(merged_m2[2])
    ref_mean, ref_var = reference.stats(np.delete(x, 2, axis=axis), axis)
    np.testing.assert_allclose(mean[[0, 1, 3]], ref_mean, rtol=1e-9)
    np.testing.assert_allclose(var[[0, 1, 3]], ref_var, rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mean", [np.inf, -np.inf, 1e39])
def test_an_infinite_running_mean_gives_infinite_values(dtype, mean):
    # x - mean is ∓inf, as in the float64 reference and PyTorch: the split of the mean into
    # hi and lo gave inf - inf (1e39 is inf in float32, and beyond float32's range x - 1e39 is too).
    x = np.array([[1.0, 2.0], [2.0, 5.0], [-3.0, 0.5]], dtype)
    running_mean, running_var = np.array([mean, 0.5]), np.array([4.0, 2.0])
    gamma, beta = np.array([2.0, 1.0]), np.array([0.5, -1.0])
    y, _, _ = numbanorm.batch_norm_forward(x, gamma, beta, training=False, running_mean=running_mean, running_var=running_var)
    ref_y = reference.forward(x, gamma, beta, training=False, running_mean=running_mean, running_var=running_var)[0]
    with np.errstate(over="ignore"):
        expected = ref_y[:, 0].astype(dtype)
    if np.isinf(expected).all():
        np.testing.assert_array_equal(y[:, 0], expected)
    else:  # 1e39 is a float64: x - 1e39 is finite there
        assert dtype is np.float64 and mean == 1e39
        assert_close(y[:, 0], ref_y[:, 0], dtype)
    assert_close(y[:, 1], ref_y[:, 1], dtype)


@st.composite
def poisoned_cases(draw):
    """``(x, x laid out, axis, feature)``: ``x`` with one NaN or inf, drawn anywhere in ``feature``.

    At least 2 features, so that there is always a clean one to check.
    """
    shape, axis = draw(shapes_and_axes())
    shape = shape[:axis % len(shape)] + (max(2, shape[axis]),) + shape[axis % len(shape) + 1 :]
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(arrays(shape, dtype, -100.0, 100.0))
    feature = draw(st.integers(0, shape[axis] - 1))
    values = np.moveaxis(x, axis, 0)[feature]  # a view of the feature's values
    values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return x, with_layout(x, draw(st.sampled_from(LAYOUTS))), axis, feature


@property_settings
@given(poisoned_cases(), paths, st.integers(0, 2**32 - 1))
def test_a_nan_or_inf_anywhere_stays_in_its_feature(case, path, seed):
    x, x_laid_out, axis, feature = case
    dy = np.random.default_rng(seed).normal(size=x.shape).astype(x.dtype)
    with kernel_path(path):
        y, mean, invstd = numbanorm.batch_norm_forward(x_laid_out, axis=axis)
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x_laid_out, mean, invstd, axis=axis)
    poisoned = [slice(None)] * x.ndim
    poisoned[axis] = feature
    poisoned = tuple(poisoned)
    assert np.isnan(invstd[feature]) and np.isnan(dgamma[feature])
    assert np.isnan(y[poisoned]).all() and np.isnan(dx[poisoned]).all()
    # dbeta = sum(dy) does not involve x: the poisoned feature's is a number like the others.
    assert_close(dbeta, dy.astype(np.float64).sum(axis=reference._reduced_axes(x, axis)), x.dtype, scale=feature_sums(dy, axis))
    clean = np.delete(np.arange(x.shape[axis]), feature)
    x_clean, dy_clean = np.delete(x, feature, axis=axis), np.delete(dy, feature, axis=axis)
    ref_y = reference.forward(x_clean, axis=axis)[0]
    assert_close(np.delete(y, feature, axis=axis), ref_y, x.dtype)
    ref_dx, ref_dgamma, _ = reference.backward(dy_clean, x_clean, mean[clean], invstd[clean], axis=axis)
    scale = gradient_scale(dy_clean, x_clean, mean[clean], invstd[clean], axis=axis)
    assert_gradient_close(np.delete(dx, feature, axis=axis), ref_dx, x.dtype, scale)
    assert_close(dgamma[clean], ref_dgamma, x.dtype, scale=feature_sums(dy_clean, axis))


def test_a_masked_array_with_nothing_masked_is_taken_as_its_data():
    x = np.ma.masked_array(X, mask=np.zeros(X.shape, bool))
    for got, want in zip(numbanorm.batch_norm_forward(x), numbanorm.batch_norm_forward(X)):
        assert type(got) is np.ndarray
        np.testing.assert_array_equal(got, want)


@pytest.fixture
def plain_kernels(monkeypatch):
    """Every kernel the API calls, made to fail on an ndarray subclass.

    Numba compiles for no subclass, but once a function is compiled for plain arrays
    its dispatcher takes a subclass with the same dtype and shape as one: without this,
    whether a subclass reached a kernel would depend on what the process ran before.
    The check wraps ``api``'s view of the module, not the module: a kernel compiled
    during the test must find Numba functions among its globals, not these wrappers.
    """

    def plain_only(kernel):
        def checked(*args):
            subclassed = [type(a).__name__ for a in args if isinstance(a, np.ndarray) and type(a) is not np.ndarray]
            assert not subclassed, f"{kernel.__name__} was given {subclassed}"
            return kernel(*args)

        return checked

    class Checked:
        def __getattr__(self, name):
            value = getattr(_kernels, name)
            return plain_only(value) if callable(value) else value

    monkeypatch.setattr(api, "_kernels", Checked())


def _subclass(kind, a, tmp_path):
    """A new array of ``kind`` holding ``a``'s values."""
    if kind == "memmap":
        m = np.memmap(tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}", dtype=a.dtype, mode="w+", shape=a.shape)
        m[...] = a
        return m
    if kind == "matrix":
        return np.asmatrix(a.copy())
    return np.ma.masked_array(a.copy(), mask=np.zeros(a.shape, bool))


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("kind", ["memmap", "matrix", "masked, nothing masked"])
def test_out_may_be_an_ndarray_subclass(kind, tmp_path, plain_kernels):
    rng = np.random.default_rng(13)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    running_mean, running_var = rng.normal(size=5), rng.uniform(1, 2, 5)
    want_y, mean, invstd = numbanorm.batch_norm_forward(x)
    want_infer, _, _ = numbanorm.batch_norm_forward(x, training=False, running_mean=running_mean, running_var=running_var)
    want_dx, _, _ = numbanorm.batch_norm_backward(dy, x, mean, invstd)
    sums = numbanorm.batch_norm_backward_reduce(dy, x, mean, invstd)
    calls = [
        (want_y, lambda out: numbanorm.batch_norm_forward(x, out=out)[0]),
        (want_infer, lambda out: numbanorm.batch_norm_forward(x, training=False, running_mean=running_mean, running_var=running_var, out=out)[0]),
        (want_dx, lambda out: numbanorm.batch_norm_backward(dy, x, mean, invstd, out=out)[0]),
        (want_dx, lambda out: numbanorm.batch_norm_backward_elemt(dy, x, mean, invstd, None, *sums, 40, out=out)),
    ]
    for want, call in calls:
        out = _subclass(kind, np.full_like(x, np.nan), tmp_path)
        kind_before = type(out)
        assert call(out) is out
        assert type(out) is kind_before and not np.ma.is_masked(out)
        np.testing.assert_array_equal(np.asarray(out), want)


@pytest.mark.parametrize("kind", ["memmap", "masked, nothing masked"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_running_statistics_may_be_an_ndarray_subclass(kind, dtype, tmp_path, plain_kernels):
    rng = np.random.default_rng(14)
    x = rng.normal(size=(40, 5))
    start_mean, start_var = rng.normal(size=5).astype(dtype), rng.uniform(1, 2, 5).astype(dtype)
    want_mean, want_var = start_mean.copy(), start_var.copy()
    numbanorm.batch_norm_forward(x, running_mean=want_mean, running_var=want_var)
    running_mean, running_var = _subclass(kind, start_mean, tmp_path), _subclass(kind, start_var, tmp_path)
    numbanorm.batch_norm_forward(x, running_mean=running_mean, running_var=running_var)
    np.testing.assert_array_equal(np.asarray(running_mean), want_mean)
    np.testing.assert_array_equal(np.asarray(running_var), want_var)
    assert not np.array_equal(want_mean, start_mean)


def test_masked_targets_are_refused_before_anything_is_written():
    # Values written under a mask would stay hidden by it; nothing the call would write is
    # touched (x in BAD_CALLS).
    mask = np.zeros(X.shape, bool)
    mask[2, 1] = True
    out = np.ma.masked_array(np.zeros_like(X), mask=mask)
    running_mean = np.ma.masked_array(np.zeros(4), mask=[False, True, False, False])
    running_var = np.ones(4)
    sums = numbanorm.batch_norm_backward_reduce(X, X, ZEROS, ONES)
    with pytest.raises(TypeError, match=r"\bout is a masked array with masked values"):
        numbanorm.batch_norm_forward(X, running_mean=np.zeros(4), running_var=running_var, out=out)
    with pytest.raises(TypeError, match=r"\brunning_mean is a masked array with masked values"):
        numbanorm.batch_norm_forward(X, running_mean=running_mean, running_var=running_var, out=np.zeros_like(X))
    with pytest.raises(TypeError, match=r"\bout is a masked array with masked values"):
        numbanorm.batch_norm_backward(X, X, ZEROS, ONES, out=out)
    with pytest.raises(TypeError, match=r"\bout is a masked array with masked values"):
        numbanorm.batch_norm_backward_elemt(X, X, ZEROS, ONES, None, *sums, 6, out=out)
    np.testing.assert_array_equal(out.data, 0.0)
    np.testing.assert_array_equal(out.mask, mask)
    np.testing.assert_array_equal(running_mean.data, 0.0)
    np.testing.assert_array_equal(running_var, 1.0)


def test_inference_backward_does_not_read_x():
    x = np.ones((4, 2))
    x[0, 0] = np.nan
    dx, _, _ = numbanorm.batch_norm_backward(np.ones((4, 2)), x, np.zeros(2), np.ones(2), training=False)
    np.testing.assert_array_equal(dx, 1.0)


def test_large_arrays_take_the_parallel_path_and_match():
    rng = np.random.default_rng(5)
    # Also rows wider than the kernels' feature tile, with a ragged last tile.
    for shape, axis in [((40000, 7), 1), ((30, 5, 2000), 1), ((40, 30, 30, 9), -1), ((120, 2500), 1), ((260, 1030), 1)]:
        x = rng.normal(3, 2, size=shape).astype(np.float32)
        assert api._chunks(x.nbytes) == numba.get_num_threads()
        y, mean, invstd = numbanorm.batch_norm_forward(x, axis=axis)
        assert_close(y, reference.forward(x, axis=axis)[0], np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd, axis=axis)
        expected = reference.backward(dy, x, mean, invstd, axis=axis)
        assert_backward_close((dx, dgamma, dbeta), expected, np.float32, dy, x, mean, invstd, axis=axis)


@pytest.mark.parametrize(
    "shape, chunks, by_features",
    [
        ((1, 64, 100), 2, True),  # a batch of one
        ((3, 64, 100), 2, True),  # rows 2 + 1, features 32 + 32
        ((4, 64, 100), 2, False),
        ((64, 64, 100), 2, False),
        ((2, 5, 9), 3, True),  # rows 1 + 1 + 0, features 2 + 2 + 1
        ((1, 1, 100), 2, False),  # one feature: nothing to share
        ((1, 64, 100), 1, False),  # one slab
        ((5, 64, 1), 2, False),  # (N, C): rows
        ((0, 64, 100), 2, False),  # empty
    ],
)
def test_small_nchw_batches_split_their_reductions_by_features(shape, chunks, by_features):
    assert _kernels._splits_features(*shape, chunks) == by_features


@pytest.mark.parametrize("chunks", [2, 3, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# (5, 16, 9) and (9, 4, 6): split by features, with runs four rows at a time (_kernels.QUAD_RUNS_MAX).
@pytest.mark.parametrize("shape", [(1, 7, 50), (2, 5, 9), (3, 6, 20), (1, 1, 40), (5, 2, 3), (5, 16, 9), (9, 4, 6)])
def test_kernels_split_small_batches_by_features_and_runs(shape, dtype, chunks):
    # (N, C, H, W) data with few rows: the reductions give each slab features
    # (_kernels._splits_features), the element-wise passes runs x[n, c] (_kernels._units),
    # for any number of slabs, more than the features included. On one slab, neither.
    outer, features, inner = shape
    rng = np.random.default_rng(outer * 100 + features)
    x = (rng.normal(0, 3, size=shape) + rng.uniform(-1e4, 1e4, (1, features, 1))).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    mean, m2 = np.empty(features), np.empty(features)
    count = _kernels.partial_stats(x, chunks, mean, m2)
    ref_mean, ref_var = reference.stats(x, 1)
    assert count == outer * inner
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(m2 / count, ref_var, rtol=1e-9)
    sums = [np.empty(features) for _ in range(4)]
    _kernels.grad_sums(dy, x, mean, 1, sums[0], sums[1])
    _kernels.grad_sums(dy, x, mean, chunks, sums[2], sums[3])
    np.testing.assert_allclose(sums[2], sums[0], rtol=1e-12, atol=1e-12 * np.abs(dy).sum())
    np.testing.assert_allclose(sums[3], sums[1], rtol=1e-12, atol=1e-12 * np.abs(dy * x).sum())
    invstd = 1 / np.sqrt(m2 / count + 1e-5)
    forward = _kernels.new_params(_kernels.FORWARD_ROWS, x, x)
    _kernels.normalize_params(mean, invstd, np.ones(features), np.zeros(features), forward)
    backward = _kernels.new_params(_kernels.BACKWARD_ROWS, x, x)
    folded = _kernels.grad_params(mean, invstd, np.ones(features), sums[0], sums[1] * invstd, float(count), backward)
    assert folded
    expected = {
        "normalize": reference.forward(x, eps=1e-5)[0],
        "grad_input": reference.backward(dy, x, mean, invstd)[0],
        "scale": reference.backward(dy, x, mean, invstd, training=False)[0],
    }
    for name, run in {
        "normalize": lambda c, out: _kernels.normalize(x, forward, c, False, out),
        "grad_input": lambda c, out: _kernels.grad_input(dy, x, backward, folded, True, c, False, out),
        "scale": lambda c, out: _kernels.grad_input(dy, x, backward, folded, False, c, False, out),
    }.items():
        serial, split = np.full_like(x, np.nan), np.full_like(x, np.nan)
        run(1, serial)
        run(chunks, split)
        np.testing.assert_array_equal(split, serial, err_msg=name)
        if name == "normalize":
            assert_close(serial, expected[name], dtype)
        else:
            assert_gradient_close(serial, expected[name], dtype, gradient_scale(dy, x, mean, invstd, training=name == "grad_input"))
    # The whole backward, into a new dx and in place of dy or x. Where the sums split by
    # features it runs channel by channel in one pass (_kernels.channel_backward): its sums
    # add in the serial order, and every value is the serial path's.
    by_channels = _kernels._by_channels(outer, features, inner, chunks)
    assert by_channels == _kernels._splits_features(outer, features, inner, chunks)
    gamma = rng.uniform(-3, 3, features).astype(dtype)
    for training in (True, False):
        results = {}
        for c in (1, chunks):
            for into in ("new", "dy", "x"):
                dy_c, x_c = dy.copy(), x.copy()
                dx = {"new": np.full_like(x, np.nan), "dy": dy_c, "x": x_c}[into]
                dgamma, dbeta = np.empty(features, dtype), np.empty(features, dtype)
                _kernels.backward(dy_c, x_c, mean, invstd, gamma, training, c, False, dx, dgamma, dbeta)
                results[c, into] = (dx, dgamma, dbeta)
        for (c, into), result in results.items():
            for got, want in zip(result, results[c if not by_channels else 1, "new"]):
                np.testing.assert_array_equal(got, want, err_msg=f"training={training}, chunks={c}, into {into}")
        ref_dx = reference.backward(dy, x, mean, invstd, gamma, training=training)[0]
        for c in (1, chunks):
            assert_gradient_close(results[c, "new"][0], ref_dx, dtype, gradient_scale(dy, x, mean, invstd, gamma, training=training))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("features", [_kernels.EIGHT_ROWS_MIN_FEATURES - 1, _kernels.EIGHT_ROWS_MIN_FEATURES])
@pytest.mark.parametrize("rows", [2, 4, 7, 8, 12, 13, 19])
def test_statistics_of_a_block_of_any_number_of_rows(rows, features, dtype):
    # One block (the serial path, too few rows for super-rows): _kernels._block_stats reads
    # eight rows at a time from EIGHT_ROWS_MIN_FEATURES features on, four below, then the
    # rows left over one at a time. Data at 1e4 with a spread of 1e-3 and an outlying first
    # row, whose values are the block's shift.
    rng = np.random.default_rng(rows * features)
    x = 1e4 + 1e-3 * rng.normal(size=(rows, features))
    x[0] += 5e-3
    x = x.astype(dtype)
    with kernel_path("serial"):
        mean, var = numbanorm.batch_norm_stats(x)
    ref_mean, ref_var = reference.stats(x, 1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(var, ref_var, rtol=1e-9)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("features", [1, 5, 64, 300, 512])
def test_narrow_rows_read_as_super_rows_match(features, dtype, path):
    # The reductions read rows of at most 512 features k = 1024 // features at a time
    # (_kernels._super_rows; on one slab only rows of fewer than PLAIN_MIN_FEATURES), in
    # blocks of BLOCK_BYTES: three blocks, then one more super-row and a row left over,
    # split between the slabs of the parallel path.
    k = _kernels.FEATURE_TILE // features
    supers_per_block = _kernels.BLOCK_BYTES // np.dtype(dtype).itemsize // _kernels.FEATURE_TILE
    rows = 3 * supers_per_block * k + k + 1
    # Enough rows for each of 3 slabs (the parallel path) to read them as super-rows.
    min_supers = max(_kernels.STATS_SUPER_MIN_ROWS, _kernels.GRAD_SUPER_MIN_ROWS)
    assert _kernels._super_rows(rows // 3, features, 1, min_supers, 3) == k
    # On one slab, rows of PLAIN_MIN_FEATURES or more are read as they are.
    plain = features >= _kernels.PLAIN_MIN_FEATURES
    assert _kernels._super_rows(rows, features, 1, min_supers, 1) == (1 if plain else k)
    assert _kernels._grad_super_rows(rows, features, 1, 1) == (1 if plain else k)
    rng = np.random.default_rng(features)
    offsets = rng.uniform(-1e4, 1e4, features)
    x = (rng.normal(0, 3, size=(rows, features)) + offsets).astype(dtype)
    dy = rng.normal(size=(rows, features)).astype(dtype)
    with kernel_path(path):
        mean, var = numbanorm.batch_norm_stats(x)
        y, mean, invstd = numbanorm.batch_norm_forward(x)
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd)
    ref_mean, ref_var = reference.stats(x, 1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(var, ref_var, rtol=1e-9)
    assert_close(y, reference.forward(x)[0], dtype)
    assert_backward_close((dx, dgamma, dbeta), reference.backward(dy, x, mean, invstd), dtype, dy, x, mean, invstd)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("features", [3, 64, 300])
def test_large_narrow_rows_give_the_backward_sums_wider_super_rows(features, dtype, path):
    # From GRAD_WIDE_MIN_VALUES values on, the backward's sums read rows of at most 512
    # features GRAD_SUPER_FEATURES // features at a time (_kernels._grad_super_rows), with
    # rows left over after the last super-row of each slab.
    k = _kernels.GRAD_SUPER_FEATURES // features
    rows = -(-_kernels.GRAD_WIDE_MIN_VALUES // features) + k + 1
    assert _kernels._grad_super_rows(rows, features, 1, 1) == k > _kernels._super_rows(rows, features, 1, 1, 1)
    rng = np.random.default_rng(features)
    x = (rng.normal(0, 3, size=(rows, features)) + rng.uniform(-1e4, 1e4, features)).astype(dtype)
    dy = rng.normal(size=(rows, features)).astype(dtype)
    mean, var = reference.stats(x, 1)
    invstd = 1.0 / np.sqrt(var + 1e-5)
    with kernel_path(path):
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd)
    assert_backward_close((dx, dgamma, dbeta), reference.backward(dy, x, mean, invstd), dtype, dy, x, mean, invstd)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_wide_rows_run_in_groups_and_match(dtype, path):
    # (N, C) rows whose per-feature rows take more than half of the L1 (FORWARD_GROUP_ROW_BYTES
    # for the forward's three, GRAD_GROUP_ROW_BYTES for the backward's four), a whole number of
    # vectors long, run ROWS at a time through the element-wise passes (_kernels._row_groups),
    # in vectors from the first feature that is aligned in every row: each offset of the output
    # from a vector boundary moves that feature. Rows one feature wider or one vector narrower,
    # and an output whose address is not a multiple of its itemsize, run as one flat range.
    # The slabs of the parallel paths have rows left over after their last group. All give the
    # reference, and the same values.
    itemsize = np.dtype(dtype).itemsize
    lanes = _vectors.VECTOR_BYTES // itemsize
    rows = 4 * _vectors.ROWS + 3
    rng = np.random.default_rng(itemsize)
    thresholds = (_kernels.FORWARD_GROUP_ROW_BYTES, _kernels.GRAD_GROUP_ROW_BYTES)
    assert thresholds == (_config.L1D_BYTES // 6 + 1, _config.L1D_BYTES // 8 + 1)
    widths = set()
    for min_row_bytes in thresholds:
        grouped = -(-min_row_bytes // _vectors.VECTOR_BYTES) * lanes  # the narrowest grouped row, in features
        widths |= {grouped, grouped + 1, grouped - lanes}
    for features in sorted(widths):
        x = (rng.normal(0, 3, size=(rows, features)) + rng.uniform(-1e4, 1e4, features)).astype(dtype)
        gamma, beta = rng.uniform(0.5, 2, features), rng.normal(size=features)
        running = dict(running_mean=rng.normal(size=features), running_var=rng.uniform(0.5, 2, features))
        buffer = np.empty(x.size + lanes, dtype=dtype)
        whole_vectors = features * itemsize % _vectors.VECTOR_BYTES == 0
        outs = []
        for misalignment in range(lanes):  # the output's address, in values past a vector boundary
            start = (misalignment * itemsize - buffer.ctypes.data) % _vectors.VECTOR_BYTES // itemsize
            out = buffer[start : start + x.size].reshape(x.shape)
            for min_row_bytes in thresholds:
                grouped = whole_vectors and features * itemsize >= min_row_bytes
                expected_groups = (rows // _vectors.ROWS * _vectors.ROWS, -misalignment % lanes) if grouped else (0, 0)
                assert _kernels._row_groups(out.reshape(rows, features, 1), 0, rows, min_row_bytes) == expected_groups
            outs.append(out)
        for training in (True, False):
            kwargs = dict(training=training) if training else dict(training=False, **running)
            expected = reference.forward(x, gamma, beta, **kwargs)[0]
            with kernel_path(path):
                y = numbanorm.batch_norm_forward(x, gamma, beta, **kwargs)[0]
                assert_close(y, expected, dtype)
                for out in outs:
                    out[...] = np.nan
                    numbanorm.batch_norm_forward(x, gamma, beta, out=out, **kwargs)
                    np.testing.assert_array_equal(out, y)
                unaligned = with_layout(np.full_like(x, np.nan), "unaligned")
                for min_row_bytes in thresholds:
                    assert _kernels._row_groups(unaligned.reshape(rows, features, 1), 0, rows, min_row_bytes) == (0, 0)
                numbanorm.batch_norm_forward(x, gamma, beta, out=unaligned, **kwargs)
                np.testing.assert_array_equal(unaligned, y)
                in_place = x.copy()
                numbanorm.batch_norm_forward(in_place, gamma, beta, out=in_place, **kwargs)
                np.testing.assert_array_equal(in_place, y)
        dy = rng.normal(size=x.shape).astype(dtype)
        mean, var = reference.stats(x)
        invstd = 1.0 / np.sqrt(var + 1e-5)
        with kernel_path(path):
            dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd)
            assert_backward_close((dx, dgamma, dbeta), reference.backward(dy, x, mean, invstd), dtype, dy, x, mean, invstd)
            for out in [*outs, with_layout(np.full_like(x, np.nan), "unaligned")]:
                out[...] = np.nan
                numbanorm.batch_norm_backward(dy, x, mean, invstd, out=out)
                np.testing.assert_array_equal(out, dx)
            in_dy, in_x = dy.copy(), x.copy()  # in place of an input: one array read and written
            numbanorm.batch_norm_backward(in_dy, x, mean, invstd, out=in_dy)
            np.testing.assert_array_equal(in_dy, dx)
            numbanorm.batch_norm_backward(dy, in_x, mean, invstd, out=in_x)
            np.testing.assert_array_equal(in_x, dx)


def at_line_offset(values, dtype, offset):
    """A new 1-D array of ``values`` values that starts ``offset`` bytes past a 64-byte line."""
    buffer = np.empty(values + 64, dtype=dtype)
    start = (offset - buffer.ctypes.data) % _kernels.LINE_BYTES // buffer.itemsize
    return buffer[start : start + values]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_outputs_take_wide_vectors_with_the_same_values(dtype):
    # (N, C) outputs below WIDE_VECTORS_MAX_BYTES go through the flat element-wise loops in
    # 64-byte vectors, larger ones in 32-byte vectors (_kernels._wide_vectors). Each value
    # takes the same operations either way: the first rows of a large array's inference and
    # dx are bit for bit those of the same rows alone, whatever the output's offset from a
    # 64-byte boundary.
    itemsize = np.dtype(dtype).itemsize
    features, small = 37, 50
    rows = _kernels.WIDE_VECTORS_MAX_BYTES // (features * itemsize) + 1
    rng = np.random.default_rng(itemsize)
    x = (rng.normal(0, 3, size=(rows, features)) + rng.uniform(-1e4, 1e4, features)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    assert _kernels._wide_vectors(x[:small]) and not _kernels._wide_vectors(x)
    gamma, beta = rng.uniform(0.5, 2, features), rng.normal(size=features)
    running_mean, running_var = rng.normal(size=features), rng.uniform(0.5, 2, features)
    _, mean, invstd = numbanorm.batch_norm_forward(x)
    sum_dy, sum_dy_xhat = numbanorm.batch_norm_backward_reduce(dy, x, mean, invstd)
    ops = {
        "inference": lambda x, dy, out=None: numbanorm.batch_norm_forward(
            x, gamma, beta, training=False, running_mean=running_mean, running_var=running_var, out=out
        )[0],
        "dx": lambda x, dy, out=None: numbanorm.batch_norm_backward_elemt(
            dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, rows, out=out
        ),
        "dx with constant statistics": lambda x, dy, out=None: numbanorm.batch_norm_backward(
            dy, x, mean, invstd, gamma, training=False, out=out
        )[0],
    }
    for name, op in ops.items():
        part = op(x[:small], dy[:small])
        np.testing.assert_array_equal(part, op(x, dy)[:small], err_msg=name)
        for offset in range(0, _kernels.LINE_BYTES, itemsize):
            out = at_line_offset(small * features, dtype, offset).reshape(small, features)
            out[...] = np.nan
            op(x[:small], dy[:small], out)
            np.testing.assert_array_equal(out, part, err_msg=f"{name}, the output {offset} bytes past a line")
    expected = reference.forward(x[:small], gamma, beta, training=False, running_mean=running_mean, running_var=running_var)[0]
    assert_close(ops["inference"](x[:small], dy[:small]), expected, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_feature_rows_start_where_the_output_does_in_a_line(dtype):
    # _kernels.new_params: the vectors align on the output, and read the per-feature rows at
    # the same features; each row starts at the output's offset within a 64-byte line, so
    # that they read within one line too. The columns past the features repeat the first ones.
    itemsize = np.dtype(dtype).itemsize
    rng = np.random.default_rng(itemsize)
    for features in (1, 5, 64, 1000):
        x = rng.normal(size=(3, features, 1)).astype(dtype)
        mean, invstd = rng.normal(size=features), rng.uniform(0.5, 2, features)
        for offset in range(0, _kernels.LINE_BYTES, itemsize):
            out = at_line_offset(x.size, dtype, offset).reshape(x.shape)
            for rows in (_kernels.FORWARD_ROWS, _kernels.BACKWARD_ROWS):
                params = _kernels.new_params(rows, x, out)
                assert params.dtype == dtype and params.flags.c_contiguous and params.flags.writeable
                assert params.shape[0] == rows and params.shape[1] >= features + _kernels.PARAMS_PAD
                for row in params:
                    assert row.ctypes.data % _kernels.LINE_BYTES == offset
            params = _kernels.new_params(_kernels.FORWARD_ROWS, x, out)
            _kernels.normalize_params(mean, invstd, np.ones(features), np.zeros(features), params)
            pad = np.arange(features, features + _kernels.PARAMS_PAD) % features
            np.testing.assert_array_equal(params[:, features : features + _kernels.PARAMS_PAD], params[:, pad])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 3, 1), (5, 3, 1), (4, 7, 9), (600, 512, 1)])
def test_new_outputs_start_where_their_input_does_in_a_line(shape, dtype):
    # _kernels.new_like: x's shape and dtype, C-contiguous, its own memory, at x's offset
    # within a 64-byte line (the vector kernels align on the output and read x at the same
    # index). The API takes it for new outputs from ALIGNED_OUTPUT_MIN_BYTES on.
    itemsize = np.dtype(dtype).itemsize
    size = int(np.prod(shape))
    for offset in range(0, _kernels.LINE_BYTES, itemsize):
        x = at_line_offset(size, dtype, offset).reshape(shape)
        x[...] = 1.0
        y = _kernels.new_like(x)
        assert y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous and y.flags.writeable
        assert y.ctypes.data % _kernels.LINE_BYTES == offset or not size  # an empty array's address is NumPy's
        assert not np.shares_memory(y, x)
        y[...] = 2.0
        assert (x == 1.0).all()
        new = api._new_output(x)
        assert new.shape == x.shape and new.dtype == x.dtype and not np.shares_memory(new, x)
        if x.nbytes >= api.ALIGNED_OUTPUT_MIN_BYTES:
            assert new.ctypes.data % _kernels.LINE_BYTES == offset


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_new_results_start_where_x_does_in_a_line(dtype):
    # Through the API: a new result from ALIGNED_OUTPUT_MIN_BYTES on starts where x does,
    # with the values an output at any other offset receives.
    itemsize = np.dtype(dtype).itemsize
    rows, features = api.ALIGNED_OUTPUT_MIN_BYTES // (64 * itemsize) + 3, 64
    rng = np.random.default_rng(rows)
    for offset in (0, 16, 32):
        x = at_line_offset(rows * features, dtype, offset).reshape(rows, features)
        x[...] = rng.normal(size=x.shape)
        y, mean, invstd = numbanorm.batch_norm_forward(x)
        dx = numbanorm.batch_norm_backward(x, x, mean, invstd)[0]
        for result in (y, dx):
            assert result.ctypes.data % _kernels.LINE_BYTES == offset
        out = at_line_offset(x.size, dtype, offset + itemsize).reshape(x.shape)
        numbanorm.batch_norm_forward(x, out=out)
        np.testing.assert_array_equal(out, y)
        numbanorm.batch_norm_backward(x, x, mean, invstd, out=out)
        np.testing.assert_array_equal(out, dx)


def test_new_outputs_near_the_mmap_threshold_come_from_numpy():
    # One line more would take a 32 MiB output past glibc's mmap threshold: fresh pages at
    # each call, without the huge pages NumPy asks for (api._new_output).
    x = np.empty((api.FRESH_PAGES_BYTES // (64 * 8), 64, 1))
    new = api._new_output(x)
    assert new.shape == x.shape and new.flags.owndata
    assert not api._new_output(x[: x.shape[0] // 2]).flags.owndata  # from Numba's allocator


def test_only_large_rows_are_streamed(monkeypatch):
    # NUMBANORM_STREAM_MIN_BYTES (set to 10 MiB here): (N, C) and channels-last outputs from
    # there on, but neither an output in place of an input nor a forward's new output above
    # 32 MiB (api._stream says why).
    mib = 2**20
    monkeypatch.setattr(api, "STREAM_MIN_BYTES", 10 * mib)
    source = np.empty((3 * mib, 1, 1), np.float32)
    assert api._stream(np.empty((3 * mib, 1, 1), np.float32), (source,))  # 12 MiB
    assert not api._stream(source, (np.empty(0), source))  # in place
    assert not api._stream(np.empty((2 * mib, 1, 1), np.float32), (source,))  # 8 MiB
    assert not api._stream(np.empty((3 * mib // 4, 4, 1), np.float32)[:, :, :0], (source,))  # empty
    assert not api._stream(np.empty((mib // 2, 4, 6), np.float32), (source,))  # (N, C, H, W)
    large = np.empty((9 * mib, 1, 1), np.float32)  # 36 MiB, pages never touched
    assert api._stream(large, (source,)) and not api._stream(large, (source,), forward_into_new=True)


# --- bad input -------------------------------------------------------------------------------

X = np.arange(24, dtype=np.float32).reshape(6, 4)
ONES, ZEROS = np.ones(4), np.zeros(4)
_SHARED = np.ones(4)

BAD_CALLS = [
    # (id, call, exception, name the message must contain)
    ("gamma shape", lambda x: numbanorm.batch_norm_forward(x, np.ones(3)), ValueError, "gamma"),
    ("beta shape", lambda x: numbanorm.batch_norm_forward(x, None, np.ones((4, 1))), ValueError, "beta"),
    ("running_mean shape", lambda x: numbanorm.batch_norm_forward(x, running_mean=np.zeros(5, np.float32), running_var=np.ones(4, np.float32)), ValueError, "running_mean"),
    ("running_var shape", lambda x: numbanorm.batch_norm_forward(x, running_mean=np.zeros(4, np.float32), running_var=np.ones(2, np.float32)), ValueError, "running_var"),
    ("running_var shape in inference", lambda x: numbanorm.batch_norm_forward(x, training=False, running_mean=ZEROS, running_var=np.ones(3)), ValueError, "running_var"),
    ("running_mean not an array", lambda x: numbanorm.batch_norm_forward(x, running_mean=[0.0] * 4, running_var=np.ones(4)), TypeError, "running_mean"),
    ("running_var read-only", lambda x: numbanorm.batch_norm_forward(x, running_mean=np.zeros(4), running_var=_readonly(np.ones(4))), ValueError, "running_var"),
    ("running_mean integer", lambda x: numbanorm.batch_norm_forward(x, running_mean=np.zeros(4, int), running_var=np.ones(4)), TypeError, "running_mean"),
    ("only running_mean", lambda x: numbanorm.batch_norm_forward(x, running_mean=np.zeros(4)), ValueError, "running_var"),
    ("running stats sharing memory", lambda x: numbanorm.batch_norm_forward(x, running_mean=_SHARED, running_var=_SHARED), ValueError, "running_mean"),
    ("dy shape", lambda x: numbanorm.batch_norm_backward(np.ones((6, 5)), x, ZEROS, ONES), ValueError, "dy"),
    ("mean shape", lambda x: numbanorm.batch_norm_backward(np.ones((6, 4)), x, np.zeros(3), ONES), ValueError, "mean"),
    ("invstd shape", lambda x: numbanorm.batch_norm_backward(np.ones((6, 4)), x, ZEROS, np.ones(5)), ValueError, "invstd"),
    ("backward gamma shape", lambda x: numbanorm.batch_norm_backward(np.ones((6, 4)), x, ZEROS, ONES, np.ones(2)), ValueError, "gamma"),
    ("1-D x", lambda x: numbanorm.batch_norm_forward(x[0]), ValueError, "x"),
    ("0-D x", lambda x: numbanorm.batch_norm_stats(np.float32(3)), ValueError, "x"),
    ("1-D x backward", lambda x: numbanorm.batch_norm_backward(x[0], x[0], ZEROS, ONES), ValueError, "x"),
    ("axis too large", lambda x: numbanorm.batch_norm_forward(x, axis=2), AxisError, "axis"),
    ("axis too small", lambda x: numbanorm.batch_norm_stats(x, axis=-3), AxisError, "axis"),
    ("axis backward", lambda x: numbanorm.batch_norm_backward(x, x, ZEROS, ONES, axis=5), AxisError, "axis"),
    ("axis float", lambda x: numbanorm.batch_norm_forward(x, axis=1.0), TypeError, "axis"),
    ("negative eps", lambda x: numbanorm.batch_norm_forward(x, eps=-1e-5), ValueError, "eps"),
    ("nan eps", lambda x: numbanorm.batch_norm_forward(x, eps=float("nan")), ValueError, "eps"),
    ("string eps", lambda x: numbanorm.batch_norm_forward(x, eps="0.1"), TypeError, "eps"),
    # bool("no") is True: a string would silently mean training.
    ("string training", lambda x: numbanorm.batch_norm_forward(x, training="no"), TypeError, "training"),
    ("None training", lambda x: numbanorm.batch_norm_forward(x, training=None), TypeError, "training"),
    ("backward string training", lambda x: numbanorm.batch_norm_backward(x, x, ZEROS, ONES, training="False"), TypeError, "training"),
    ("momentum above 1", lambda x: numbanorm.batch_norm_forward(x, momentum=1.5), ValueError, "momentum"),
    ("negative momentum", lambda x: numbanorm.batch_norm_forward(x, momentum=-0.1), ValueError, "momentum"),
    ("momentum above 1 in inference", lambda x: numbanorm.batch_norm_forward(x, training=False, running_mean=ZEROS, running_var=ONES, momentum=5), ValueError, "momentum"),
    ("None momentum", lambda x: numbanorm.batch_norm_forward(x, momentum=None), TypeError, "momentum"),
    ("one value per feature", lambda x: numbanorm.batch_norm_forward(x[:1]), ValueError, "x"),
    ("one value per channel", lambda x: numbanorm.batch_norm_forward(x.reshape(1, 24, 1)), ValueError, "x"),
    ("empty batch in training", lambda x: numbanorm.batch_norm_forward(x[:0]), ValueError, "x"),
    ("empty batch in stats", lambda x: numbanorm.batch_norm_stats(x[:0]), ValueError, "x"),
    ("inference without running stats", lambda x: numbanorm.batch_norm_forward(x, training=False), ValueError, "running_mean"),
    ("inference without running_var", lambda x: numbanorm.batch_norm_forward(x, training=False, running_mean=ZEROS), ValueError, "running_var"),
    ("out shape", lambda x: numbanorm.batch_norm_forward(x, out=np.empty((4, 6), np.float32)), ValueError, "out"),
    ("out dtype", lambda x: numbanorm.batch_norm_forward(x, out=np.empty((6, 4), np.float64)), TypeError, "out"),
    ("out not an array", lambda x: numbanorm.batch_norm_forward(x, out=[[0.0] * 4] * 6), TypeError, "out"),
    ("out read-only", lambda x: numbanorm.batch_norm_forward(x, out=_readonly(np.empty((6, 4), np.float32))), ValueError, "out"),
    ("complex gamma", lambda x: numbanorm.batch_norm_forward(x, np.ones(4, complex)), TypeError, "gamma"),
    ("backward out shape", lambda x: numbanorm.batch_norm_backward(x, x, ZEROS, ONES, out=np.empty((4, 6), np.float32)), ValueError, "out"),
    ("backward out dtype", lambda x: numbanorm.batch_norm_backward(x, x, ZEROS, ONES, out=np.empty((6, 4))), TypeError, "out"),
    ("backward out not an array", lambda x: numbanorm.batch_norm_backward(x, x, ZEROS, ONES, out=x.tolist()), TypeError, "out"),
    ("backward out read-only", lambda x: numbanorm.batch_norm_backward(x, x, ZEROS, ONES, out=_readonly(x.copy())), ValueError, "out"),
    ("elemt count not whole", lambda x: numbanorm.batch_norm_backward_elemt(x, x, ZEROS, ONES, None, ZEROS, ZEROS, 2.5), ValueError, "count"),
    # y is written first, and the update would read it, then write over it.
    ("running_mean in out", lambda x: numbanorm.batch_norm_forward(x, out=_OUT, running_mean=_OUT[0], running_var=np.ones(4)), ValueError, "running_mean"),
    ("running_var in out=x", lambda x: numbanorm.batch_norm_forward(x, out=x, running_mean=np.zeros(4), running_var=x[2]), ValueError, "running_var"),
    ("elemt out dtype", lambda x: numbanorm.batch_norm_backward_elemt(x, x, ZEROS, ONES, None, ZEROS, ZEROS, 6, out=np.empty((6, 4))), TypeError, "out"),
    # np.asarray keeps the values under a mask: the statistics would silently include them.
    ("masked x", lambda x: numbanorm.batch_norm_forward(np.ma.masked_greater(x, 20)), TypeError, "x is a masked array"),
    ("masked x in stats", lambda x: numbanorm.batch_norm_stats(np.ma.masked_equal(x, 3)), TypeError, "x is a masked array"),
    ("masked dy", lambda x: numbanorm.batch_norm_backward(np.ma.masked_less(x, 1), x, ZEROS, ONES), TypeError, "dy is a masked array"),
    ("masked gamma", lambda x: numbanorm.batch_norm_forward(x, np.ma.masked_equal(ONES, 1.0)), TypeError, "gamma is a masked array"),
    # NumPy's own messages for these name nothing.
    ("ragged x", lambda x: numbanorm.batch_norm_forward([[1.0, 2.0], [3.0]]), ValueError, "x does not convert"),
    ("ragged gamma", lambda x: numbanorm.batch_norm_forward(x, [[1.0], [1.0, 2.0], [1.0], [1.0]]), ValueError, "gamma does not convert"),
    ("ragged dy", lambda x: numbanorm.batch_norm_backward([[1.0] * 4] * 5 + [[1.0]], x, ZEROS, ONES), ValueError, "dy does not convert"),
    ("eps beyond float", lambda x: numbanorm.batch_norm_forward(x, eps=10**400), ValueError, "eps"),
    ("elemt count beyond float", lambda x: numbanorm.batch_norm_backward_elemt(x, x, ZEROS, ONES, None, ZEROS, ZEROS, 10**400), ValueError, "count"),
]


_OUT = np.zeros((6, 4), np.float32)


def _readonly(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name, call, exception, argument", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_naming_the_argument_and_modifies_nothing(name, call, exception, argument):
    x = X.copy()
    with pytest.raises(exception, match=rf"\b{argument}\b"):
        call(x)
    np.testing.assert_array_equal(x, X)
    # The shared arguments too: running statistics and outputs that a refused call must not touch.
    for array, value in ((ZEROS, 0.0), (ONES, 1.0), (_SHARED, 1.0), (_OUT, 0.0)):
        np.testing.assert_array_equal(array, value)


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="longdouble is float64 on this platform")
def test_float128_running_statistics_are_refused_before_anything_is_written():
    out = np.zeros_like(X)
    running_mean, running_var = np.zeros(4, np.longdouble), np.ones(4, np.longdouble)
    with pytest.raises(TypeError, match="running_mean"):
        numbanorm.batch_norm_forward(X, running_mean=running_mean, running_var=running_var, out=out)
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(running_mean, 0.0)


def test_failed_training_call_leaves_running_statistics_alone():
    running_mean, running_var = np.full(4, 0.5), np.full(4, 2.0)
    with pytest.raises(ValueError, match="gamma"):
        numbanorm.batch_norm_forward(X, np.ones(3), running_mean=running_mean, running_var=running_var)
    with pytest.raises(ValueError, match="x"):
        numbanorm.batch_norm_forward(X[:1], running_mean=running_mean, running_var=running_var)
    np.testing.assert_array_equal(running_mean, 0.5)
    np.testing.assert_array_equal(running_var, 2.0)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    gamma, beta = rng.normal(size=5), rng.normal(size=5)
    copies = [a.copy() for a in (x, gamma, beta)]
    y, mean, invstd = numbanorm.batch_norm_forward(x, gamma, beta)
    saved = [mean.copy(), invstd.copy()]
    numbanorm.batch_norm_backward(y, x, mean, invstd, gamma)
    for a, b in zip((x, gamma, beta, mean, invstd), copies + saved):
        np.testing.assert_array_equal(a, b)


class _Subclass(np.ndarray):
    """An ndarray subclass, as np.memmap is: NumPy's conversions give plain views of it."""


@pytest.mark.parametrize("make", [np.array, lambda a: np.array(a).view(_Subclass), lambda a: np.array(a, np.float32)])
def test_inference_returns_statistics_that_do_not_alias_the_running_ones(make):
    running_mean, running_var = make(np.zeros(4)), make(np.ones(4))
    _, mean, _ = numbanorm.batch_norm_forward(X, training=False, running_mean=running_mean, running_var=running_var)
    assert not np.shares_memory(mean, running_mean)
