"""BatchNorm: modes, running statistics, gradients and state_dict, against the reference (and PyTorch when present)."""

import copy
import pickle

import numpy as np
import pytest

import numbanorm
import reference


def batch(seed=0, shape=(16, 5), dtype=np.float32):
    return np.random.default_rng(seed).normal(2.0, 3.0, size=shape).astype(dtype)


def test_new_layer_has_pytorch_initial_state():
    layer = numbanorm.BatchNorm(5)
    np.testing.assert_array_equal(layer.gamma, 1.0)
    np.testing.assert_array_equal(layer.beta, 0.0)
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)
    assert layer.num_batches_tracked == 0 and layer.training
    assert layer.gamma.dtype == layer.running_var.dtype == np.float32


def test_training_forward_updates_running_statistics_like_the_reference():
    layer = numbanorm.BatchNorm(5, momentum=0.3)
    running_mean, running_var = np.zeros(5), np.ones(5)
    for seed in range(3):
        x = batch(seed)
        y = layer.forward(x)
        ref_y, _, _, running_mean, running_var = reference.forward(
            x, axis=1, running_mean=running_mean, running_var=running_var, momentum=0.3
        )
        np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.running_mean, running_mean, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, running_var, rtol=1e-6)
    assert layer.num_batches_tracked == 3


def test_momentum_none_is_the_cumulative_average():
    layer = numbanorm.BatchNorm(5, momentum=None, dtype=np.float64)
    batches = [batch(seed, dtype=np.float64) for seed in range(4)]
    for x in batches:
        layer.forward(x)
    means = [reference.stats(x)[0] for x in batches]
    variances = [reference.stats(x)[1] * 16 / 15 for x in batches]
    np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, np.mean(variances, axis=0), rtol=1e-12)


def test_eval_mode_uses_running_statistics_and_leaves_them_alone():
    layer = numbanorm.BatchNorm(5)
    layer.forward(batch(0))
    layer.eval()
    assert not layer.training
    state = layer.state_dict()
    x = batch(1)
    y = layer.forward(x)
    ref_y, *_ = reference.forward(x, layer.gamma, layer.beta, training=False,
                                  running_mean=layer.running_mean, running_var=layer.running_var)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    assert layer.train().training


def test_training_argument_overrides_the_mode_for_one_call():
    layer = numbanorm.BatchNorm(5).eval()
    layer.forward(batch(0), training=True)
    assert layer.num_batches_tracked == 1 and not layer.training


def test_without_running_statistics_eval_uses_the_batch():
    layer = numbanorm.BatchNorm(5, track_running_stats=False).eval()
    x = batch(2)
    np.testing.assert_allclose(layer.forward(x), reference.forward(x)[0], rtol=1e-5, atol=1e-5)
    assert layer.running_mean is None and "running_mean" not in layer.state_dict()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape, axis", [((16, 5), 1), ((4, 5, 3, 3), 1), ((4, 3, 3, 5), -1)])
def test_backward_matches_the_reference_and_fills_gradients(training, shape, axis):
    rng = np.random.default_rng(3)
    layer = numbanorm.BatchNorm(5, axis=axis, dtype=np.float64)
    layer.gamma[:] = rng.uniform(0.5, 2, 5)
    layer.beta[:] = rng.normal(size=5)
    layer.running_mean[:] = rng.normal(size=5)
    x = batch(4, shape, np.float64)
    layer.train(training)
    _, mean, invstd, _, _ = reference.forward(
        x, layer.gamma, layer.beta, axis=axis, training=training,
        running_mean=layer.running_mean.copy(), running_var=layer.running_var.copy(),
    )
    layer.forward(x)
    dy = rng.normal(size=shape)
    dx = layer.backward(dy)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean, invstd, layer.gamma, axis=axis, training=training)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.dgamma, ref_dgamma, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.dbeta, ref_dbeta, rtol=1e-9, atol=1e-12)
    assert layer.gradients()["weight"] is layer.dgamma


def test_a_layer_without_parameters_has_no_parameter_gradients():
    layer = numbanorm.BatchNorm(5, affine=False, dtype=np.float64)
    x = batch(2, dtype=np.float64)
    dy = np.random.default_rng(2).normal(size=x.shape)
    layer.forward(x)
    dx = layer.backward(dy)
    _, mean, invstd, _, _ = reference.forward(x)
    ref_dx, _, _ = reference.backward(dy, x, mean, invstd)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-9, atol=1e-12)
    assert layer.dgamma is None and layer.dbeta is None and layer.gradients() == {}


def test_backward_without_running_statistics_in_eval_mode_goes_through_the_batch_statistics():
    # Such a layer normalizes with the batch's statistics in either mode, so its backward
    # is the training one, whose dx depends on those statistics (not dy * gamma * invstd).
    rng = np.random.default_rng(5)
    layer = numbanorm.BatchNorm(5, track_running_stats=False, dtype=np.float64).eval()
    layer.gamma[:] = rng.uniform(0.5, 2, 5)
    x = batch(6, (16, 5), np.float64)
    layer.forward(x)
    dy = rng.normal(size=x.shape)
    dx = layer.backward(dy)
    _, mean, invstd, _, _ = reference.forward(x, layer.gamma, layer.beta)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean, invstd, layer.gamma, training=True)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.dgamma, ref_dgamma, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.dbeta, ref_dbeta, rtol=1e-9, atol=1e-12)


def test_calling_the_layer_runs_a_subclass_forward():
    # As a PyTorch module's call does: a subclass that overrides forward gets it called.
    class Scaled(numbanorm.BatchNorm):
        def forward(self, x, training=None):
            return 2 * super().forward(x, training)

    x = batch(1)
    np.testing.assert_array_equal(Scaled(5)(x), 2 * numbanorm.BatchNorm(5)(x))
    np.testing.assert_array_equal(Scaled(5)(x, training=False), 2 * numbanorm.BatchNorm(5).forward(x, training=False))


def test_backward_before_forward_raises():
    with pytest.raises(RuntimeError, match="forward"):
        numbanorm.BatchNorm(3).backward(np.ones((4, 3)))


def test_state_dict_round_trip():
    layer = numbanorm.BatchNorm(5)
    for seed in range(2):
        layer.forward(batch(seed))
    layer.gamma[:] = np.arange(5)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    state["weight"][0] = 99.0  # a copy: changing it leaves the layer alone
    assert layer.gamma[0] == 0.0
    other = numbanorm.BatchNorm(5)
    other.load_state_dict(layer.state_dict())
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[key], value)
    x = batch(7)
    np.testing.assert_array_equal(other.eval().forward(x), layer.eval().forward(x))


def test_load_state_dict_rejects_wrong_keys_and_shapes():
    layer = numbanorm.BatchNorm(5)
    state = layer.state_dict()
    with pytest.raises(KeyError, match="running_var"):
        layer.load_state_dict({k: v for k, v in state.items() if k != "running_var"})
    with pytest.raises(ValueError, match="weight"):
        layer.load_state_dict({**state, "weight": np.ones(4)})
    np.testing.assert_array_equal(layer.gamma, 1.0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_value_out_of_the_layers_range_raises_instead_of_becoming_inf(dtype):
    # float16 holds up to 65504, float32 up to 3.4e38: a larger finite value would load
    # as inf, and inference would then give NaN or 0 for that feature without a word.
    # An infinite value stays what it is.
    layer = numbanorm.BatchNorm(5, dtype=dtype)
    before = layer.state_dict()
    big = float(np.finfo(dtype).max) * 4
    running_var = np.array([1.0, 2.0, big, 3.0, 4.0])
    with pytest.raises(ValueError, match=f"running_var.*{np.dtype(dtype).name}"):
        layer.load_state_dict({**before, "weight": np.full(5, 2.0), "running_var": running_var})
    for name, array in layer.state_dict().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)
    layer.load_state_dict({**before, "running_var": np.array([1.0, 2.0, np.inf, 3.0, float(np.finfo(dtype).max)])})
    assert np.isinf(layer.running_var[2]) and layer.running_var[4] == np.finfo(dtype).max


@pytest.mark.parametrize(
    "key, value, exception",
    [
        ("running_mean", np.array(["a"] * 5), TypeError),
        ("running_var", np.full(5, None), TypeError),
        ("num_batches_tracked", np.array(2.5), TypeError),
        ("num_batches_tracked", "3", TypeError),
        ("num_batches_tracked", np.array(-1), ValueError),  # momentum=None would divide by 0
        ("num_batches_tracked", np.uint64(2**63), ValueError),  # state_dict() could not save it as int64
        ("num_batches_tracked", 2**64, ValueError),  # a Python int NumPy holds as an object
        ("num_batches_tracked", -(2**63) - 1, ValueError),
        ("num_batches_tracked", True, TypeError),
        ("bias", [[1.0], [2.0, 3.0], [4.0], [5.0], [6.0]], ValueError),  # ragged: NumPy's message names nothing
    ],
)
def test_a_state_that_raises_loads_nothing(key, value, exception):
    # Every value is checked before any is loaded: "weight" (5.0 everywhere) must not
    # be half-loaded when another key fails, whatever order the keys come in.
    layer = numbanorm.BatchNorm(5)
    layer.forward(batch(1))
    before = layer.state_dict()
    state = {**before, "weight": np.full(5, 5.0), "bias": np.full(5, -1.0), key: value}
    with pytest.raises(exception, match=key):
        layer.load_state_dict(state)
    for name, array in layer.state_dict().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


@pytest.mark.parametrize(
    "dtype, dy_dtype",
    [(np.float32, np.float64), (np.float16, np.float32), (np.float16, np.float64), (np.float64, np.float32), (np.float32, np.int64)],
)
def test_dx_takes_the_forward_inputs_dtype_whatever_dys(dtype, dy_dtype):
    # As PyTorch's: the functional API promotes (float32 x, float64 dy -> float64 dx); the layer
    # rounds that dx to its input's dtype, the same values as the promoted backward's rounded.
    layer = numbanorm.BatchNorm(5, dtype=dtype)
    x = batch(3, dtype=dtype)
    y = layer.forward(x)
    dy = (np.random.default_rng(4).normal(size=y.shape) * 8).astype(dy_dtype)
    dx = layer.backward(dy)
    assert dx.dtype == dtype
    promoted, _, _ = numbanorm.batch_norm_backward(dy, x, *layer._last_forward()[1:3], layer.gamma)
    np.testing.assert_array_equal(dx, promoted.astype(dtype))


def test_a_forward_that_raises_leaves_no_batch_for_the_backward():
    layer = numbanorm.BatchNorm(3)
    layer.forward(batch(0, (8, 3)))
    with pytest.raises(ValueError, match="x"):
        layer.forward(batch(1, (8, 4)))
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones((8, 3), np.float32))  # not the gradient of the batch before


def test_float16_parameter_gradients_are_float32_and_do_not_overflow():
    layer = numbanorm.BatchNorm(2, dtype=np.float16)
    x = np.random.default_rng(3).normal(size=(70000, 2)).astype(np.float16)
    layer.forward(x)
    layer.backward(np.ones_like(x))
    assert layer.dgamma.dtype == layer.dbeta.dtype == np.float32
    np.testing.assert_array_equal(layer.dbeta, 70000.0)  # float16's largest is 65504
    # float64 data through a float32 layer: the gradients are in the parameters' dtype.
    layer = numbanorm.BatchNorm(2, dtype=np.float32)
    layer.forward(x.astype(np.float64))
    layer.backward(np.ones(x.shape))
    assert layer.dgamma.dtype == layer.dbeta.dtype == np.float32


def test_train_takes_a_bool_only():
    layer = numbanorm.BatchNorm(3).eval()
    with pytest.raises(TypeError, match="mode"):
        layer.train("False")  # a non-empty string: bool() of it would switch training on
    assert not layer.training
    assert layer.train(np.bool_(True)).training


def test_forward_takes_a_bool_or_none_for_training():
    layer = numbanorm.BatchNorm(3).eval()
    x = batch(0, (8, 3))
    with pytest.raises(TypeError, match="training"):
        layer.forward(x, training="no")  # bool("no") is True: it would update the running statistics
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3, np.float32))
    layer.forward(x, training=np.bool_(True))
    assert layer.num_batches_tracked == 1


def test_pickles_and_copies_leave_out_the_saved_input():
    layer = numbanorm.BatchNorm(64)
    x = batch(2, (4096, 64))
    layer.forward(x)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), copy.copy(layer)):
        with pytest.raises(RuntimeError, match="forward"):
            clone.backward(np.ones_like(x))
        for name, array in layer.state_dict().items():
            np.testing.assert_array_equal(clone.state_dict()[name], array, err_msg=name)
    assert len(pickle.dumps(layer)) < x.nbytes // 10
    layer.backward(np.ones_like(x))  # the layer itself still has what its backward needs


@pytest.mark.parametrize(
    "kwargs, exception, name",
    [
        (dict(num_features=0), ValueError, "num_features"),
        (dict(num_features=2.5), TypeError, "num_features"),
        (dict(num_features=3, eps=-1.0), ValueError, "eps"),
        (dict(num_features=3, momentum=2.0), ValueError, "momentum"),
        (dict(num_features=3, dtype=np.int32), TypeError, "dtype"),
        (dict(num_features=3, dtype=np.complex64), TypeError, "dtype"),
        # float128 where longdouble is wider than float64 (x86-64 Linux); float64 elsewhere.
        *([(dict(num_features=3, dtype=np.longdouble), TypeError, "dtype")] if np.dtype(np.longdouble).itemsize > 8 else []),
        (dict(num_features=3, axis="1"), TypeError, "axis"),
        (dict(num_features=3, dtype=None), TypeError, "dtype"),  # np.dtype(None) is float64
        (dict(num_features=3, dtype="foo"), TypeError, "dtype must be float16, float32 or float64, got .foo."),
        (dict(num_features=3, affine="no"), TypeError, "affine"),  # bool("no") is True
        (dict(num_features=3, track_running_stats=0), TypeError, "track_running_stats"),
    ],
)
def test_bad_constructor_arguments(kwargs, exception, name):
    with pytest.raises(exception, match=name):
        numbanorm.BatchNorm(**kwargs)


def test_a_failed_forward_changes_nothing():
    layer = numbanorm.BatchNorm(4, momentum=None)
    state = layer.state_dict()
    with pytest.raises(ValueError, match=r"x must have num_features=4 features on axis 1, got shape \(\d+, 5\)"):
        layer.forward(batch(0))  # 5 features
    with pytest.raises(ValueError, match="x"):
        layer.forward(np.ones((1, 4)))  # one value per feature
    assert layer.num_batches_tracked == 0
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


@pytest.mark.parametrize("affine, track_running_stats", [(True, True), (False, True), (False, False)])
def test_a_batch_with_other_features_is_refused_naming_x(affine, track_running_stats):
    # Without gamma or running statistics, nothing else has the layer's feature count to
    # check against: such a layer would normalize any width.
    layer = numbanorm.BatchNorm(3, axis=-1, affine=affine, track_running_stats=track_running_stats)
    with pytest.raises(ValueError, match=r"x must have num_features=3 features on axis -1, got shape \(2, 4, 5\)"):
        layer.forward(np.ones((2, 4, 5), np.float32))
    with pytest.raises(ValueError, match="num_features=3"):
        layer.forward([[1.0, 2.0], [3.0, 4.0]])
    assert layer.forward(np.ones((2, 4, 3), np.float32)).shape == (2, 4, 3)


def test_matches_torch_batchnorm():
    torch = pytest.importorskip("torch", reason="PyTorch is an optional test peer")
    rng = np.random.default_rng(8)
    layer = numbanorm.BatchNorm(6, momentum=0.2, dtype=np.float64)
    twin = torch.nn.BatchNorm2d(6, momentum=0.2, dtype=torch.float64)
    layer.gamma[:] = rng.uniform(0.5, 2, 6)
    layer.beta[:] = rng.normal(size=6)
    twin.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in layer.state_dict().items()})
    for seed in range(2):
        x = rng.normal(1, 2, size=(4, 6, 5, 5))
        dy = rng.normal(size=x.shape)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = twin(xt)
        yt.backward(torch.from_numpy(dy))
        y = layer.forward(x)
        dx = layer.backward(dy)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(layer.dgamma, twin.weight.grad.numpy(), rtol=1e-9, atol=1e-10)
        twin.weight.grad = None
        twin.bias.grad = None
    for key, value in twin.state_dict().items():
        np.testing.assert_allclose(layer.state_dict()[key], value.numpy(), rtol=1e-12)
    twin.eval()
    layer.eval()
    x = rng.normal(size=(3, 6, 2, 2))
    np.testing.assert_allclose(layer.forward(x), twin(torch.from_numpy(x)).detach().numpy(), rtol=1e-9, atol=1e-10)
