"""The trainer: gradients against finite differences, the PyTorch twin, and the command line."""

import io
import json
import re
import subprocess
import sys
import time

import numba
import numpy as np
import pytest

from numbanorm import BatchNorm, mlp
from numbanorm.mlp import (
    MLP,
    SGD,
    Adam,
    Dropout,
    batches,
    load_digits_split,
    main,
    plot_histories,
    softmax_cross_entropy,
    to_torch,
    train,
)

DTYPES = [np.float32, np.float64]
# Relative to the largest value compared: a whole network accumulates more rounding than one kernel.
TOLERANCE = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}
ACTIVATIONS = ["relu", "sigmoid", "tanh"]
# (batch_norm, bn_position)
NORMALIZATION = [(False, "before"), (True, "before"), (True, "after")]


def data(n, features, classes, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype(dtype), rng.integers(0, classes, n)


def assert_network_close(actual, expected, dtype, scale):
    """``actual`` within ``TOLERANCE`` (a network's, not ``checks.TOLERANCE``) of ``expected``, relative to ``scale``."""
    tol = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol * scale)


# --- gradients -------------------------------------------------------------------------


def numerical_gradient(f, array, h=1e-6):
    """Central differences of ``f()`` with respect to every element of ``array``, changed in place."""
    grad = np.empty(array.shape)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + h
        plus = f()
        array[index] = saved - h
        minus = f()
        array[index] = saved
        grad[index] = (plus - minus) / (2 * h)
    return grad


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch_norm, bn_position", NORMALIZATION)
def test_gradients_match_finite_differences(activation, batch_norm, bn_position):
    model = MLP([5, 6, 7, 3], activation=activation, batch_norm=batch_norm, bn_position=bn_position, seed=1, dtype=np.float64)
    x, labels = data(10, 5, 3, seed=2)
    loss, grads = model.loss_and_grads(x, labels)
    grads = {name: g.copy() for name, g in grads.items()}
    _, dlogits = softmax_cross_entropy(model.forward(x), labels)
    dx = model.backward(dlogits)

    def loss_only():
        return model.loss_and_grads(x, labels)[0]

    params = model.parameters()
    assert sorted(grads) == sorted(params)
    assert len(params) == 6 + (4 if batch_norm else 0)
    for name, param in params.items():
        np.testing.assert_allclose(grads[name], numerical_gradient(loss_only, param), rtol=1e-6, atol=1e-8, err_msg=name)
    np.testing.assert_allclose(dx, numerical_gradient(loss_only, x), rtol=1e-6, atol=1e-8, err_msg="dx")


def test_softmax_cross_entropy_matches_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(7, 4))
    labels = rng.integers(0, 4, 7)
    loss, dlogits = softmax_cross_entropy(logits, labels)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(probs[np.arange(7), labels])), rel=1e-12)
    np.testing.assert_allclose(dlogits, (probs - np.eye(4)[labels]) / 7, rtol=1e-12, atol=1e-15)
    # Shifting the logits changes nothing, and large logits do not overflow.
    big_loss, big_dlogits = softmax_cross_entropy(logits + 1000.0, labels)
    assert big_loss == pytest.approx(loss, rel=1e-9)
    np.testing.assert_allclose(big_dlogits, dlogits, atol=1e-12)


def test_dropout_masks_and_scales():
    layer = Dropout(0.25, rng=np.random.default_rng(0))
    x = np.full((400, 250), 2.0, dtype=np.float32)
    y = layer.forward(x, training=True)
    assert y.dtype == np.float32
    assert set(np.unique(y)) == {0.0, np.float32(2.0 / 0.75)}
    assert abs(np.mean(y == 0) - 0.25) < 0.01
    dx = layer.backward(np.ones_like(x))
    np.testing.assert_array_equal(dx == 0, y == 0)
    np.testing.assert_array_equal(layer.forward(x, training=False), x)


# --- optimizers ------------------------------------------------------------------------


def test_sgd_momentum_accumulates_velocity():
    param = np.array([1.0, -2.0])
    optimizer = SGD({"p": param}, lr=0.1, momentum=0.5)
    grad = np.array([1.0, 4.0])
    optimizer.step({"p": grad})
    np.testing.assert_allclose(param, [1.0 - 0.1, -2.0 - 0.4])
    optimizer.step({"p": grad})  # velocity 0.5 * grad + grad
    np.testing.assert_allclose(param, [1.0 - 0.1 - 0.15, -2.0 - 0.4 - 0.6])


def test_adam_first_step_moves_each_parameter_by_lr():
    param = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    Adam({"p": param}, lr=0.01).step({"p": np.array([1e-3, -5.0, 200.0], dtype=np.float32)})
    assert param.dtype == np.float32
    np.testing.assert_allclose(param, [1.0 - 0.01, -2.0 + 0.01, 3.0 - 0.01], rtol=1e-5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda params: SGD(params, lr=0.1, momentum=1.0), r"momentum must be in \[0, 1\)"),
        # Adam's bias correction divides by 1 - beta**steps.
        (lambda params: Adam(params, betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)"),
        (lambda params: Adam(params, betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\)"),
        (lambda params: Adam(params, lr=-1.0), r"lr must be in \[0.0, inf\]"),
    ],
)
def test_optimizers_refuse_factors_outside_their_range(make, match):
    with pytest.raises(ValueError, match=match):
        make({"p": np.zeros(2)})


# --- the network -----------------------------------------------------------------------


def test_layers_follow_the_torch_sequential_order():
    model = MLP([4, 8, 6, 3], activation="tanh", dropout=0.5)
    assert repr(model) == (
        "MLP(Linear(4, 8), BatchNorm(8), Tanh(), Dropout(p=0.5), Linear(8, 6), BatchNorm(6), Tanh(), Dropout(p=0.5), Linear(6, 3))"
    )
    after = MLP([4, 8, 3], activation="relu", bn_position="after")
    assert repr(after) == "MLP(Linear(4, 8), ReLU(), BatchNorm(8), Linear(8, 3))"
    assert repr(MLP([4, 8, 3], batch_norm=False)) == "MLP(Linear(4, 8), ReLU(), Linear(8, 3))"
    assert sorted(after.state_dict()) == [
        "0.bias", "0.weight", "2.bias", "2.num_batches_tracked", "2.running_mean", "2.running_var", "2.weight",
        "3.bias", "3.weight",
    ]
    assert after.state_dict()["0.weight"].shape == (8, 4)


def test_initialisation_is_pytorchs_uniform_bound():
    model = MLP([400, 300, 10], batch_norm=False)
    for name, fan_in in [("0", 400), ("2", 300)]:
        weight = model.parameters()[f"{name}.weight"]
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(weight).max() <= np.float32(bound)  # rounding to float32 is monotonic
        # Uniform on [-bound, bound]: standard deviation bound / sqrt(3).
        assert np.std(weight) == pytest.approx(bound / np.sqrt(3), rel=0.02)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_is_kept(dtype):
    model = MLP([5, 6, 3], dtype=dtype, dropout=0.1)
    x, labels = data(8, 5, 3)  # float64 input: converted to the model's dtype
    assert model.forward(x).dtype == dtype
    loss, grads = model.loss_and_grads(x, labels)
    assert isinstance(loss, float)
    assert all(g.dtype == dtype for g in grads.values())
    train(model, x, labels, epochs=1, batch_size=4, lr=0.1, optimizer="adam")
    assert all(p.dtype == dtype for p in model.parameters().values())
    assert all(v.dtype == dtype for name, v in model.state_dict().items() if not name.endswith("num_batches_tracked"))


def sequential_kinds(config):
    """The kinds of the layers of the Sequential the issue describes, in order."""
    block = ["linear", "batch_norm", "activation"] if config["bn_position"] == "before" else ["linear", "activation", "batch_norm"]
    block = [kind for kind in block if kind != "batch_norm" or config["batch_norm"]] + ["dropout"] * (config["dropout"] > 0)
    return block * (len(config["sizes"]) - 2) + ["linear"]


def reference_inference(model, x):
    """Eval-mode logits from ``model.state_dict()`` and the Sequential's formulas, in float64."""
    state = {name: np.asarray(v, np.float64) for name, v in model.state_dict().items()}
    activation = {"relu": lambda h: np.maximum(h, 0), "sigmoid": lambda h: 1 / (1 + np.exp(-h)), "tanh": np.tanh}
    h = np.asarray(x, np.float64)
    for i, kind in enumerate(sequential_kinds(model.config)):
        if kind == "linear":
            h = h @ state[f"{i}.weight"].T + state[f"{i}.bias"]
        elif kind == "batch_norm":
            invstd = 1 / np.sqrt(state[f"{i}.running_var"] + 1e-5)
            h = (h - state[f"{i}.running_mean"]) * invstd * state[f"{i}.weight"] + state[f"{i}.bias"]
        elif kind == "activation":
            h = activation[model.config["activation"]](h)
    return h


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch_norm, bn_position", NORMALIZATION)
def test_predict_uses_running_statistics(activation, batch_norm, bn_position):
    model = MLP([5, 8, 7, 4], activation=activation, batch_norm=batch_norm, bn_position=bn_position, dropout=0.3, seed=3)
    x, labels = data(64, 5, 4, seed=4)
    train(model, x, labels, epochs=3, batch_size=16, lr=0.5)
    before = model.state_dict()
    if batch_norm:
        assert before["1.num_batches_tracked" if bn_position == "before" else "2.num_batches_tracked"] == 12
    logits = model.forward(x, training=False)
    tol = TOLERANCE[np.dtype(np.float32)]
    expected = reference_inference(model, x)
    np.testing.assert_allclose(logits, expected, rtol=tol, atol=tol * np.abs(expected).max())
    # One sample at a time gives the same answers: nothing depends on the batch.
    np.testing.assert_array_equal(model.predict(x[:1]), model.predict(x)[:1])
    np.testing.assert_array_equal(model.predict(x), expected.argmax(axis=1))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=f"inference changed {name}")


def test_training_mode_normalizes_with_batch_statistics():
    model = MLP([3, 4, 2], activation="relu", seed=0, dtype=np.float64)
    model.layers[1].running_mean[...] = 100.0  # inference with these would zero every ReLU
    x = np.random.default_rng(0).normal(size=(32, 3))
    hidden = model.layers[1].forward(model.layers[0].forward(x), training=True)
    np.testing.assert_allclose(hidden.mean(axis=0), 0.0, atol=1e-12)
    assert np.all(model.layers[2].forward(model.layers[1].forward(model.layers[0].forward(x), training=False)) == 0)


def test_batches_cover_the_data_and_drop_a_final_single_sample_for_batch_norm():
    rng = np.random.default_rng(0)
    seven = list(batches(7, 3, rng, smallest=2))
    assert [len(b) for b in seven] == [3, 3]
    assert len(set(np.concatenate(seven))) == 6
    assert [len(b) for b in batches(7, 3, rng)] == [3, 3, 1]  # without batch norm, a single sample trains
    assert [len(b) for b in batches(7, 1, rng, smallest=2)] == [1] * 7  # as batch_size=1 asks
    eight = list(batches(8, 3, rng))
    assert [len(b) for b in eight] == [3, 3, 2]
    np.testing.assert_array_equal(np.sort(np.concatenate(eight)), np.arange(8))
    assert not np.array_equal(np.concatenate(eight), np.arange(8))


def test_training_lowers_the_loss():
    x, labels = data(120, 6, 3, seed=5)
    x[np.arange(120), labels] += 3.0  # separable enough to learn in a few epochs
    model = MLP([6, 16, 3], activation="tanh")
    history = train(model, x, labels, epochs=8, batch_size=20, lr=0.2, momentum=0.9, X_test=x, y_test=labels)
    assert len(history["train_loss"]) == len(history["epoch_test_accuracy"]) == len(history["epoch_seconds"]) == 8
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history["test_accuracy"] == history["epoch_test_accuracy"][-1] > 0.9
    assert 0 < history["epoch_seconds"][0] <= history["seconds"]
    assert train(model, x, labels, epochs=1, batch_size=20, lr=0.1)["test_accuracy"] is None


def test_seed_makes_training_deterministic():
    x, labels = data(50, 4, 3, seed=6)

    def run(seed):
        model = MLP([4, 9, 3], activation="sigmoid", dropout=0.2, seed=seed)
        history = train(model, x, labels, epochs=2, batch_size=8, lr=0.3, optimizer="adam", seed=seed)
        return model.state_dict(), history["train_loss"]

    (state, losses), (again, losses_again), (other, _) = run(7), run(7), run(8)
    assert losses == losses_again
    for name in state:
        np.testing.assert_array_equal(state[name], again[name], err_msg=name)
    assert not np.array_equal(state["0.weight"], other["0.weight"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_and_load_round_trip(tmp_path, dtype):
    x, labels = data(40, 5, 3, seed=8)
    model = MLP([5, 7, 6, 3], activation="tanh", bn_position="after", dropout=0.1, seed=9, dtype=dtype)
    train(model, x, labels, epochs=2, batch_size=10, lr=0.1)
    path = tmp_path / "model"  # used as given: no .npz appended
    model.save(path)
    loaded = MLP.load(path)
    assert loaded.config == model.config
    assert repr(loaded) == repr(model)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name in state:
        assert loaded_state[name].dtype == state[name].dtype
        np.testing.assert_array_equal(loaded_state[name], state[name], err_msg=name)
    np.testing.assert_array_equal(loaded.forward(x, training=False), model.forward(x, training=False))


def test_load_state_dict_rejects_a_mismatch_and_changes_nothing():
    model = MLP([4, 5, 3])
    state = model.state_dict()
    with pytest.raises(KeyError, match="missing.*1.running_var"):
        model.load_state_dict({k: v for k, v in state.items() if k != "1.running_var"})
    with pytest.raises(KeyError, match="unexpected.*'9.weight'"):
        model.load_state_dict({**state, "9.weight": state["0.weight"]})
    changed = {name: v + 1 if name != "1.num_batches_tracked" else v for name, v in state.items()}
    changed["3.weight"] = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"state\['3.weight'\] must have shape \(3, 5\)"):
        model.load_state_dict(changed)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[name])
    # Values of the right shape that fail in a later layer: the earlier layers are not left loaded.
    # Each message names the model's key; a Linear's values are checked as a BatchNorm's are.
    bad_values = [
        ("1.num_batches_tracked", np.float64(3.5), TypeError),
        ("3.bias", np.array(["a", "b", "c"]), TypeError),
        ("3.bias", np.full(3, 1.5 + 2j), TypeError),
        ("3.weight", np.full((3, 5), 1e39), ValueError),  # beyond float32: it would load as inf
        ("1.running_var", np.full(5, 1e39), ValueError),
    ]
    for key, value, error in bad_values:
        with pytest.raises(error, match=rf"state\['{key}'\]"):
            model.load_state_dict({**changed, "3.weight": np.zeros((3, 5)), key: value})
        for name, old in model.state_dict().items():
            np.testing.assert_array_equal(old, state[name], err_msg=f"{name} after {key}")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sizes=[4]), ValueError, "sizes must list"),
        (dict(sizes=[4, 0, 3]), ValueError, r"sizes\[1\] must be at least 1"),
        (dict(sizes=[4, 2.5, 3]), TypeError, r"sizes\[1\] must be an integer"),
        (dict(activation="gelu"), ValueError, "activation must be one of"),
        (dict(bn_position="middle"), ValueError, "bn_position must be"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), ValueError, "dropout must be in"),
        (dict(dtype=np.int32), TypeError, "dtype must be float32 or float64"),
        (dict(batch_norm="False"), TypeError, "batch_norm must be a bool"),
        (dict(dtype=np.float16), TypeError, "dtype must be float32 or float64"),
        # Refused with or without batch normalization (whose layer would name other dtypes).
        pytest.param(
            dict(dtype=np.longdouble, batch_norm=False), TypeError, "dtype must be float32 or float64",
            marks=pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="longdouble is float64 on this platform"),
        ),
    ],
)
def test_bad_model_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        MLP(**{"sizes": [4, 5, 3], **kwargs})


def test_bad_training_inputs_are_named():
    model = MLP([4, 5, 3])
    x, labels = data(10, 4, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 4\), got \(10, 3\)"):
        model.forward(x[:, :3])
    with pytest.raises(ValueError, match="x does not convert to a float32 array"):
        model.predict([[1.0, 2.0, 3.0, 4.0], [1.0]])
    with pytest.raises(ValueError, match="labels does not convert to an array"):
        model.score(x[:2], [[0], [1, 2]])
    with pytest.raises(TypeError, match="labels must be integers"):
        model.loss_and_grads(x, labels.astype(float))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        model.loss_and_grads(x, labels + 3)
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\)"):
        model.loss_and_grads(x, labels[:5])
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        train(model, x, labels, epochs=1, batch_size=1, lr=0.1)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        train(model, x, labels, epochs=0, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train(model, x, labels, epochs=1, batch_size=4, lr=0.1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr must be in"):
        train(model, x, labels, epochs=1, batch_size=4, lr=-0.1)
    with pytest.raises(ValueError, match="X must have at least 2 rows"):
        train(model, x[:1], labels[:1], epochs=1, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match="X_test and y_test"):
        train(model, x, labels, epochs=1, batch_size=4, lr=0.1, X_test=x)
    with pytest.raises(TypeError, match="seed must be an integer"):
        train(model, x, labels, epochs=1, batch_size=4, lr=0.1, seed=1.5)
    with pytest.raises(ValueError, match="seed must be at least 0"):
        train(model, x, labels, epochs=1, batch_size=4, lr=0.1, seed=-5)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="X must be finite, got 1 NaN"):
        train(model, bad, labels, epochs=1, batch_size=4, lr=0.1)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="X_test must be finite"):
        train(model, x, labels, epochs=1, batch_size=4, lr=0.1, X_test=bad, y_test=labels)
    # Without batch normalization a batch of one is fine.
    train(MLP([4, 5, 3], batch_norm=False), x, labels, epochs=1, batch_size=1, lr=0.1)


# --- PyTorch ---------------------------------------------------------------------------


def torch_sequential(torch, config):
    """The Sequential that the issue describes, built from the configuration alone."""
    activation = {"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh}[config["activation"]]
    sizes = config["sizes"]
    modules = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
        block = [torch.nn.Linear(fan_in, fan_out), activation()]
        if config["batch_norm"]:
            block.insert(1 if config["bn_position"] == "before" else 2, torch.nn.BatchNorm1d(fan_out))
        if config["dropout"]:
            block.append(torch.nn.Dropout(config["dropout"]))
        modules += block
    modules.append(torch.nn.Linear(sizes[-2], sizes[-1]))
    return torch.nn.Sequential(*modules).to(getattr(torch, config["dtype"]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("batch_norm, bn_position", NORMALIZATION)
def test_one_training_step_matches_torch(dtype, activation, batch_norm, bn_position):
    torch = pytest.importorskip("torch", reason="PyTorch is an optional peer; its comparisons need it")
    model = MLP([6, 9, 8, 4], activation=activation, batch_norm=batch_norm, bn_position=bn_position, seed=10, dtype=dtype)
    twin = torch_sequential(torch, model.config)
    twin.load_state_dict({name: torch.from_numpy(v) for name, v in model.state_dict().items()}, strict=True)
    x, labels = data(12, 6, 4, seed=11, dtype=dtype)

    loss, grads = model.loss_and_grads(x, labels)
    torch_loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(labels))
    torch_loss.backward()

    assert_network_close(loss, torch_loss.item(), dtype, scale=1.0)
    torch_grads = {name: p.grad.numpy() for name, p in twin.named_parameters()}
    assert grads.keys() == torch_grads.keys()
    scale = max(np.abs(g).max() for g in torch_grads.values())
    for name, grad in grads.items():
        assert grad.dtype == dtype
        assert_network_close(grad, torch_grads[name], dtype, scale)
    torch_state = twin.state_dict()
    for name, value in model.state_dict().items():
        expected = torch_state[name].numpy()
        assert_network_close(value, expected, dtype, scale=np.abs(expected).max(initial=0.0))
    # After the step the state differs from the initial one (running statistics moved).
    if batch_norm:
        assert any(name.endswith("num_batches_tracked") and v == 1 for name, v in model.state_dict().items())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_steps_match_torch(optimizer):
    torch = pytest.importorskip("torch", reason="PyTorch is an optional peer; its comparisons need it")
    model = MLP([5, 7, 3], activation="tanh", bn_position="after", seed=12, dtype=np.float64)
    twin = to_torch(model)
    x, labels = data(30, 5, 3, seed=13)
    if optimizer == "sgd":
        ours, theirs = SGD(model.parameters(), lr=0.3, momentum=0.9), torch.optim.SGD(twin.parameters(), lr=0.3, momentum=0.9)
    else:
        ours, theirs = Adam(model.parameters(), lr=0.05), torch.optim.Adam(twin.parameters(), lr=0.05)
    for batch in (slice(0, 10), slice(10, 20), slice(20, 30)):
        ours.step(model.loss_and_grads(x[batch], labels[batch])[1])
        theirs.zero_grad()
        torch.nn.functional.cross_entropy(twin(torch.from_numpy(x[batch])), torch.from_numpy(labels[batch])).backward()
        theirs.step()
    initial = MLP([5, 7, 3], activation="tanh", bn_position="after", seed=12, dtype=np.float64).state_dict()
    for name, value in model.state_dict().items():
        expected = twin.state_dict()[name].numpy()
        assert_network_close(value, expected, np.float64, scale=1.0)
        if not name.endswith("num_batches_tracked"):
            assert not np.array_equal(value, initial[name]), f"{name} did not move"


def test_torch_weights_load_into_the_model():
    torch = pytest.importorskip("torch", reason="PyTorch is an optional peer; its comparisons need it")
    torch.manual_seed(0)
    model = MLP([5, 8, 6, 3], activation="sigmoid", bn_position="after")
    twin = torch_sequential(torch, model.config)
    x = torch.randn(40, 5)
    for _ in range(3):  # move the running statistics away from their initial values
        twin(x * 3 + 1)
    twin.eval()
    model.load_state_dict(twin.state_dict())
    expected = twin(x).detach().numpy()
    assert_network_close(model.forward(x.numpy(), training=False), expected, np.float32, scale=np.abs(expected).max())
    assert model.layers[2].num_batches_tracked == 3
    # to_torch builds the same Sequential.
    assert repr(to_torch(model)) == repr(twin)
    assert_network_close(to_torch(model).eval()(x).detach().numpy(), expected, np.float32, scale=np.abs(expected).max())


# --- the paper's effect and the command line -----------------------------------------


def test_digits_split():
    X_train, X_test, y_train, y_test = load_digits_split(0)
    assert X_train.dtype == np.float32 and X_train.min() == 0 and X_train.max() == 1
    per_class = np.bincount(np.concatenate([y_train, y_test]))
    assert len(X_test) == 450 and np.all(np.abs(np.bincount(y_test) - per_class / 4) <= 1)  # 25%, stratified
    assert not np.array_equal(load_digits_split(1)[3], y_test)


def test_cli_defaults_show_that_batch_norm_lets_a_deep_sigmoid_network_learn(tmp_path, capsys):
    # The defaults are the paper's experiment: 3 x 100 sigmoid units, SGD lr 0.1, batches of 60, 30 epochs.
    json_path, png_path = tmp_path / "compare.json", tmp_path / "compare.png"
    assert main(["--compare", "--quiet", "--json", str(json_path), "--plot", str(png_path)]) == 0
    assert capsys.readouterr() == ("", "")
    result = json.loads(json_path.read_text())
    with_bn, without_bn = result["with_batch_norm"], result["without_batch_norm"]
    assert len(with_bn["epoch_test_accuracy"]) == len(without_bn["train_loss"]) == 30
    assert with_bn["test_accuracy"] >= 0.95
    assert without_bn["test_accuracy"] < 0.2  # chance is 0.1
    assert with_bn["train_loss"][-1] < 0.2 < 2.0 < without_bn["train_loss"][-1]
    assert result["config"]["sizes"] == [64, 100, 100, 100, 10] and result["config"]["lr"] == 0.1
    assert_png(png_path)


def test_cli_writes_json_and_png(tmp_path, capsys):
    json_path, png_path, model_path = tmp_path / "run.json", tmp_path / "run.png", tmp_path / "model.npz"
    argv = ["--epochs", "1", "--hidden", "20", "--optimizer", "adam", "--threads", "1"]
    argv += ["--json", str(json_path), "--plot", str(png_path), "--save", str(model_path)]
    threads = numba.get_num_threads()
    assert main(argv) == 0
    assert numba.get_num_threads() == threads  # --threads applies to the run only
    out, err = capsys.readouterr()
    assert "with batch norm: test accuracy" in out
    assert err == ""  # no progress bar when stderr is not a terminal
    result = json.loads(json_path.read_text())
    assert len(result["train_loss"]) == len(result["epoch_test_accuracy"]) == 1
    assert result["test_accuracy"] == result["epoch_test_accuracy"][0]
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert np.isfinite(result["train_loss"][0]) and result["seconds"] > 0
    assert result["config"]["lr"] == 0.001 and result["config"]["sizes"] == [64, 20, 10]
    assert_png(png_path)
    assert MLP.load(model_path).config["sizes"] == [64, 20, 10]
    assert out.splitlines()[-3:] == [f"results written to {json_path}", f"model written to {model_path}", f"plot written to {png_path}"]


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_is_written_at_the_path_given_in_the_format_its_suffix_names(tmp_path):
    history = {"train_loss": [1.0, 0.5], "epoch_test_accuracy": [0.5, 0.8], "epoch_seconds": [0.1, 0.2]}
    plot_histories({"run": history}, tmp_path / "noext")
    assert_png(tmp_path / "noext")  # not noext.png
    plot_histories({"run": history}, str(tmp_path / "run.SVG"))
    assert b"<svg" in (tmp_path / "run.SVG").read_bytes()[:400]
    buffer = io.BytesIO()
    plot_histories({"run": history}, buffer)
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noext", "run.SVG"]


def test_python_dash_m_runs(tmp_path):
    json_path = tmp_path / "run.json"
    command = [sys.executable, "-m", "numbanorm.mlp", "--epochs", "1", "--hidden", "8", "--no-batch-norm", "--json", str(json_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "without batch norm: test accuracy" in done.stdout
    assert len(json.loads(json_path.read_text())["train_loss"]) == 1
    usage = subprocess.run([sys.executable, "-m", "numbanorm.mlp", "--help"], capture_output=True, text=True, timeout=300)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: python -m numbanorm.mlp ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs: must be a positive integer"),
        (["--threads", "100000"], "--threads: must be at most"),
        (["--hidden", "10", "x"], "--hidden: must be a positive integer"),
        (["--lr", "-1"], "--lr: must be a positive number"),
        (["--dropout", "1"], r"--dropout: must be in \[0, 1\)"),
        (["--batch-size", "1"], "--batch-size: batch normalization needs at least 2 samples"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["--activation", "gelu"], "--activation: invalid choice"),
        (["--compare", "--no-batch-norm"], "drop --no-batch-norm"),
        (["--compare", "--save", "m.npz"], "drop --compare"),
        (["--optimizer", "adam", "--momentum", "0.9"], "--momentum applies to --optimizer sgd only"),
        # Output paths are checked before training, which a bad one would otherwise waste.
        (["--plot", "/nonexistent/x.png"], "--plot: no directory '/nonexistent'"),
        (["--save", "/nonexistent/m.npz"], "--save: no directory '/nonexistent'"),
        (["--json", "."], "--json: '.' names a directory, not a file"),
        (["--json", "out/"], "--json: 'out/' names a directory, not a file"),
        (["--save", ""], "--save: an empty path names no file"),
        (["--json", "run.png", "--plot", "./run.png"], "--json and --plot name the same file"),
        (["--plot", "out.txt"], "--plot: matplotlib cannot write .txt files"),
    ],
)
def test_cli_rejects_bad_flags(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("numbanorm.mlp.train", lambda *a, **k: pytest.fail("trained before rejecting the flags"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_plot_format_that_needs_more_than_matplotlib_is_refused_before_training():
    # .pgf is in matplotlib's list, but writing text in it runs LaTeX (xelatex by default).
    from matplotlib.figure import Figure

    figure = Figure()
    figure.text(0.5, 0.5, "text")
    try:
        figure.savefig(io.BytesIO(), format="pgf")  # as the trainer's plot would
    except Exception:  # RuntimeError without xelatex, a LaTeX error with a broken one
        works = False
    else:
        works = True
    problem = mlp._unwritable("run.pgf", plot=True)
    if works:
        assert problem is None
    else:
        assert problem.startswith("matplotlib cannot write .pgf files here:"), problem
    assert mlp._unwritable("run.svg", plot=True) is None


def test_the_kernels_of_every_kind_of_batch_norm_layer_load_before_training():
    # numbanorm.mpi's SyncBatchNorm runs kernels of its own: each kind's scratch layer runs
    # once ahead of the timed loop, in training and in inference.
    ran = []

    class Recording(BatchNorm):
        def forward(self, x, training=None):
            ran.append((self.num_features, x.dtype, self.training if training is None else training))
            return super().forward(x, training)

    class Own(BatchNorm):
        def _scratch(self, **options):
            return Recording(1, dtype=self.dtype)

    model = MLP([4, 5, 5, 3], dtype=np.float64)
    second = [i for i, layer in enumerate(model.layers) if isinstance(layer, BatchNorm)][1]
    model.layers[second] = Own(5, dtype=np.float64)
    mlp._load_kernels(model)
    assert ran == [(1, np.float64, True), (1, np.float64, False)]


def test_a_batch_norm_subclass_with_a_constructor_of_its_own_trains():
    # Its scratch layer is a plain BatchNorm: the subclass's constructor is not called.
    class Scaled(BatchNorm):
        def __init__(self, num_features, scale, **options):
            super().__init__(num_features, **options)
            self.gamma *= scale

    model = MLP([4, 5, 3])
    first = next(i for i, layer in enumerate(model.layers) if isinstance(layer, BatchNorm))
    model.layers[first] = Scaled(5, 2.0)
    x, labels = data(20, 4, 3)
    assert len(train(model, x, labels, epochs=2, batch_size=10, lr=0.1)["train_loss"]) == 2


def test_cli_trains_on_single_samples_without_batch_norm(monkeypatch):
    seen = {}

    def record(model, *args, batch_size, **kwargs):
        seen["batch_size"], seen["batch_norm"] = batch_size, model.config["batch_norm"]
        raise KeyboardInterrupt  # enough: the flags were accepted and reached train()

    monkeypatch.setattr("numbanorm.mlp.train", record)
    with pytest.raises(KeyboardInterrupt):
        main(["--batch-size", "1", "--no-batch-norm", "--quiet"])
    assert seen == {"batch_size": 1, "batch_norm": False}


def test_cli_says_when_training_diverges_without_numpy_s_warnings(recwarn, capsys):
    assert main(["--no-batch-norm", "--activation", "relu", "--lr", "50", "--epochs", "2"]) == 0
    assert "training diverged" in capsys.readouterr().err
    assert [str(w.message) for w in recwarn] == []


def test_the_first_run_says_what_it_waits_for_and_later_runs_do_not(monkeypatch, capsys):
    # The first run compiles the kernels for tens of seconds before the progress bar shows.
    monkeypatch.setattr(mlp, "_load_kernels", lambda model: time.sleep(0.5))
    mlp._load_kernels_telling(mlp.MLP([2, 3]), after=0.05)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("numbanorm: compiling the kernels, once")
    ready = re.fullmatch(r"numbanorm: kernels ready in (\d+\.\d) s", lines[1])
    assert ready and float(ready[1]) >= 0.5, lines
    monkeypatch.setattr(mlp, "_load_kernels", lambda model: None)  # from the cache
    mlp._load_kernels_telling(mlp.MLP([2, 3]), after=0.5)
    time.sleep(0.6)
    assert capsys.readouterr().err == ""


def test_cli_says_when_training_diverges_and_writes_strict_json(tmp_path, capsys):
    json_path = tmp_path / "run.json"
    argv = ["--no-batch-norm", "--activation", "relu", "--lr", "50", "--epochs", "2", "--quiet", "--json", str(json_path)]
    with np.errstate(all="ignore"):
        assert main(argv) == 0
    assert "training diverged" in capsys.readouterr().err
    results = json.loads(json_path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert None in results["train_loss"]
