"""A minimal multilayer perceptron trainer that shows what batch normalization does.

Read it top to bottom: the layers (``forward`` keeps what ``backward`` needs;
``backward`` returns the input gradient and fills the layer's gradients), the
loss, the optimizers (a separate ``step``, so gradients can be checked), the
network, the training loop, and the command line::

    python -m numbanorm.mlp --compare --plot compare.png

Parameter names and shapes are those of the equivalent ``torch.nn.Sequential``
(``"0.weight"`` of shape ``(out, in)``, ``"1.running_mean"``, ...), so trained
weights move between numbanorm and PyTorch in both directions.

The command line needs the ``mlp`` extra (scikit-learn, tqdm, matplotlib, threadpoolctl),
imported only where used.
"""

import argparse
import contextlib
import io
import json
import math
import numbers
import os
import sys
import threading
import time

import numba
import numpy as np

from .api import _as_array, _number
from .layer import BatchNorm, _state_value

__all__ = [
    "Linear",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "Dropout",
    "softmax_cross_entropy",
    "SGD",
    "Adam",
    "MLP",
    "batches",
    "train",
    "load_digits_split",
    "plot_histories",
    "to_torch",
    "main",
]


def _integer(value, name, minimum=1):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _finite(x, name):
    """Refuse NaN and infinity in training data: the loss would turn NaN with no word of why."""
    bad = x.size - np.count_nonzero(np.isfinite(x))  # one boolean temporary, not two
    if bad:
        raise ValueError(f"{name} must be finite, got {bad} NaN or infinite values")


# --- layers ----------------------------------------------------------------------------


class _Layer:
    """What every layer has: no parameters unless it says otherwise."""

    def parameters(self):
        return {}

    def gradients(self):
        return {}

    def state_dict(self):
        return {name: value.copy() for name, value in self.parameters().items()}

    def load_state_dict(self, state):
        for name, value in self.parameters().items():
            value[...] = state[name]

    def __repr__(self):
        return f"{type(self).__name__}()"


class Linear(_Layer):
    """``y = x @ weight.T + bias``, initialised like PyTorch's ``nn.Linear``.

    Both ``weight`` (shape ``(out_features, in_features)``) and ``bias`` are drawn
    from ``U(-1/sqrt(in_features), 1/sqrt(in_features))``.

    Parameters
    ----------
    in_features, out_features : int
    rng : numpy.random.Generator
        Source of the initial values.
    dtype : numpy dtype, default float32
    """

    def __init__(self, in_features, out_features, *, rng, dtype=np.float32):
        bound = 1.0 / math.sqrt(in_features)
        self.weight = rng.uniform(-bound, bound, (out_features, in_features)).astype(dtype)
        self.bias = rng.uniform(-bound, bound, out_features).astype(dtype)
        self.dweight = self.dbias = None

    def forward(self, x, training=True):
        self._x = x
        return x @ self.weight.T + self.bias

    def backward(self, dy):
        self.dweight = dy.T @ self._x
        self.dbias = dy.sum(axis=0)
        return dy @ self.weight

    def parameters(self):
        return {"weight": self.weight, "bias": self.bias}

    def gradients(self):
        return {"weight": self.dweight, "bias": self.dbias}

    def __repr__(self):
        return f"Linear({self.weight.shape[1]}, {self.weight.shape[0]})"


class ReLU(_Layer):
    """``max(x, 0)``."""

    def forward(self, x, training=True):
        self._positive = x > 0
        return x * self._positive

    def backward(self, dy):
        return dy * self._positive


class Sigmoid(_Layer):
    """``1 / (1 + exp(-x))``."""

    def forward(self, x, training=True):
        # The tanh form cannot overflow, unlike exp(-x) for very negative x.
        self._y = 0.5 + 0.5 * np.tanh(0.5 * x)
        return self._y

    def backward(self, dy):
        return dy * self._y * (1.0 - self._y)


class Tanh(_Layer):
    """``tanh(x)``."""

    def forward(self, x, training=True):
        self._y = np.tanh(x)
        return self._y

    def backward(self, dy):
        return dy * (1.0 - self._y * self._y)


class Dropout(_Layer):
    """Inverted dropout: in training, zero each value with probability ``p`` and scale the rest by ``1/(1-p)``.

    Parameters
    ----------
    p : float in [0, 1)
    rng : numpy.random.Generator
        Source of the masks.
    """

    def __init__(self, p, *, rng):
        self.p = p
        self._rng = rng
        self._mask = None

    def forward(self, x, training=True):
        if not training or self.p == 0.0:
            self._mask = None
            return x
        self._mask = (self._rng.random(x.shape) >= self.p).astype(x.dtype) / (1.0 - self.p)
        return x * self._mask

    def backward(self, dy):
        return dy if self._mask is None else dy * self._mask

    def __repr__(self):
        return f"Dropout(p={self.p})"


ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}


# --- loss ------------------------------------------------------------------------------


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(``logits``) against integer ``labels``, and its gradient.

    Parameters
    ----------
    logits : ndarray, shape ``(n, classes)``
    labels : ndarray of int, shape ``(n,)``

    Returns
    -------
    loss : float
    dlogits : ndarray
        Gradient of ``loss`` with respect to ``logits``, in their dtype.
    """
    rows = np.arange(len(labels))
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    dlogits = np.exp(log_probs)
    dlogits[rows, labels] -= 1.0
    dlogits /= len(labels)
    return float(-log_probs[rows, labels].mean()), dlogits


# --- optimizers ------------------------------------------------------------------------


def _fraction(value, name):
    """``value`` as a float in ``[0, 1)``."""
    value = _number(value, name, 0.0, 1.0)
    if value == 1.0:
        raise ValueError(f"{name} must be in [0, 1), got 1.0")
    return value


class SGD:
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    ``velocity = momentum * velocity + grad``; ``param -= lr * velocity``.

    Parameters
    ----------
    params : dict of name -> ndarray
        Updated in place by :meth:`step`.
    lr : float
    momentum : float in [0, 1), default 0
    """

    def __init__(self, params, lr, momentum=0.0):
        self.params = params
        self.lr = _number(lr, "lr", 0.0, math.inf)
        self.momentum = _fraction(momentum, "momentum")
        self.velocity = {name: np.zeros_like(p) for name, p in params.items()} if self.momentum else None

    def step(self, grads):
        """Update the parameters with ``grads``, keyed like them."""
        for name, param in self.params.items():
            grad = grads[name]
            if self.velocity is not None:
                grad = self.velocity[name]
                grad *= self.momentum
                grad += grads[name]
            param -= self.lr * grad


class Adam:
    """Adam (Kingma and Ba, 2015), as ``torch.optim.Adam``.

    Parameters
    ----------
    params : dict of name -> ndarray
        Updated in place by :meth:`step`.
    lr : float, default 0.001
    betas : (float, float) in [0, 1), default (0.9, 0.999)
    eps : float, default 1e-8
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params = params
        self.lr = _number(lr, "lr", 0.0, math.inf)
        # Below 1: the bias corrections divide by 1 - beta**steps.
        self.beta1 = _fraction(betas[0], "betas[0]")
        self.beta2 = _fraction(betas[1], "betas[1]")
        self.eps = _number(eps, "eps", 0.0, math.inf)
        self.steps = 0
        self.m = {name: np.zeros_like(p) for name, p in params.items()}
        self.v = {name: np.zeros_like(p) for name, p in params.items()}

    def step(self, grads):
        """Update the parameters with ``grads``, keyed like them."""
        self.steps += 1
        step_size = self.lr / (1.0 - self.beta1**self.steps)
        root_correction = math.sqrt(1.0 - self.beta2**self.steps)
        for name, param in self.params.items():
            grad, m, v = grads[name], self.m[name], self.v[name]
            m *= self.beta1
            m += (1.0 - self.beta1) * grad
            v *= self.beta2
            v += (1.0 - self.beta2) * grad * grad
            param -= step_size * m / (np.sqrt(v) / root_correction + self.eps)


OPTIMIZERS = ("sgd", "adam")


def _make_optimizer(name, params, lr, momentum):
    if name == "sgd":
        return SGD(params, lr, momentum)
    if name == "adam":
        if momentum:
            raise ValueError(f"momentum applies to the sgd optimizer only, got momentum={momentum} with adam")
        return Adam(params, lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


# --- the network -----------------------------------------------------------------------


class MLP:
    """A multilayer perceptron classifier, with batch normalization in every hidden block.

    Each hidden size gives a block Linear -> BatchNorm -> activation (-> Dropout),
    and a final Linear gives the logits: the layers, in order, of the equivalent
    ``torch.nn.Sequential``, whose indices name the entries of :meth:`state_dict`.

    Parameters
    ----------
    sizes : sequence of int
        Input features, the hidden sizes, and the number of classes.
    activation : {"relu", "sigmoid", "tanh"}, default "relu"
    batch_norm : bool, default True
    seed : int, default 0
        Seeds the initial weights and the dropout masks.
    dtype : numpy dtype, default float32
        dtype of the parameters, activations and gradients; inputs are converted to it.
    bn_position : {"before", "after"}, default "before"
        BatchNorm before the activation (as in the paper) or after it.
    dropout : float in [0, 1), default 0
        Probability of a Dropout layer at the end of each hidden block (none when 0).

    Raises
    ------
    TypeError, ValueError
        For an invalid argument, named in the message.

    Examples
    --------
    >>> import numpy as np
    >>> from numbanorm.mlp import MLP
    >>> model = MLP([4, 8, 3], activation="tanh")
    >>> model
    MLP(Linear(4, 8), BatchNorm(8), Tanh(), Linear(8, 3))
    >>> x = np.random.default_rng(0).normal(size=(16, 4))
    >>> loss, grads = model.loss_and_grads(x, np.arange(16) % 3)
    >>> sorted(grads)[:3], grads["0.weight"].shape, grads["0.weight"].dtype
    (['0.bias', '0.weight', '1.bias'], (8, 4), dtype('float32'))
    >>> model.predict(x[:2]).shape
    (2,)
    """

    def __init__(
        self, sizes, activation="relu", batch_norm=True, seed=0, dtype=np.float32, bn_position="before", dropout=0.0
    ):
        sizes = [_integer(size, f"sizes[{i}]") for i, size in enumerate(sizes)]
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least the input and output sizes, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if bn_position not in ("before", "after"):
            raise ValueError(f"bn_position must be 'before' or 'after', got {bn_position!r}")
        dropout = _fraction(dropout, "dropout")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):  # float16 and longdouble too: NumPy has no BLAS for them
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if not isinstance(batch_norm, (bool, np.bool_)):  # "False" would otherwise mean True
            raise TypeError(f"batch_norm must be a bool, got {batch_norm!r}")
        seed = None if seed is None else _integer(seed, "seed", 0)
        self.config = dict(sizes=sizes, activation=activation, batch_norm=bool(batch_norm), seed=seed,
                           dtype=dtype.name, bn_position=bn_position, dropout=dropout)
        self.dtype = dtype
        rng = np.random.default_rng(seed)
        self.layers = []
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
            block = [Linear(fan_in, fan_out, rng=rng, dtype=dtype), ACTIVATIONS[activation]()]
            if batch_norm:
                block.insert(1 if bn_position == "before" else 2, BatchNorm(fan_out, dtype=dtype))
            if dropout:
                block.append(Dropout(dropout, rng=rng))
            self.layers += block
        self.layers.append(Linear(sizes[-2], sizes[-1], rng=rng, dtype=dtype))

    def __repr__(self):
        # BatchNorm's own repr lists every option; the size says enough here.
        names = [f"BatchNorm({x.num_features})" if isinstance(x, BatchNorm) else repr(x) for x in self.layers]
        return f"MLP({', '.join(names)})"

    def _input(self, x):
        try:
            x = np.asarray(x, dtype=self.dtype)
        except (ValueError, TypeError) as error:  # a ragged list, strings: NumPy's message names nothing
            raise type(error)(f"x does not convert to a {self.dtype.name} array: {error}") from None
        features = self.config["sizes"][0]
        if x.ndim != 2 or x.shape[1] != features:
            raise ValueError(f"x must have shape (n, {features}), got {x.shape}")
        return x

    def _labels(self, labels, n):
        labels = _as_array(labels, "labels")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), one per row of x, got {labels.shape}")
        classes = self.config["sizes"][-1]
        if n and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"labels must be in [0, {classes}), got values in [{labels.min()}, {labels.max()}]")
        return labels

    def forward(self, x, training=True):
        """The logits for ``x`` (shape ``(n, sizes[0])``): training mode normalizes with
        batch statistics (and updates the running ones) and applies dropout."""
        x = self._input(x)
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dlogits):
        """Back-propagate the gradient of the logits; fills every layer's gradients and returns ``dx``."""
        for layer in reversed(self.layers):
            dlogits = layer.backward(dlogits)
        return dlogits

    def loss_and_grads(self, x, labels):
        """Mean softmax cross-entropy of one training-mode forward, and the gradients.

        The parameters are not updated, but the forward is a training one: each
        BatchNorm layer's running statistics take in the batch (and Dropout
        draws its masks), as in one step of :func:`train`.

        Returns
        -------
        loss : float
        grads : dict of name -> ndarray
            Keyed like :meth:`parameters` (``"0.weight"``, ``"1.bias"``, ...).
        """
        labels = self._labels(labels, len(x))
        loss, dlogits = softmax_cross_entropy(self.forward(x, training=True), labels)
        self.backward(dlogits)
        return loss, self.gradients()

    def predict(self, x):
        """Class labels for ``x``, in inference mode (BatchNorm uses its running statistics)."""
        return self.forward(x, training=False).argmax(axis=1)

    def score(self, x, labels):
        """Accuracy of :meth:`predict` against ``labels``."""
        labels = self._labels(labels, len(x))
        return float(np.mean(self.predict(x) == labels))

    def parameters(self):
        """The learnable arrays (not copies), by ``state_dict`` name: what an optimizer updates."""
        return {f"{i}.{name}": p for i, layer in enumerate(self.layers) for name, p in layer.parameters().items()}

    def gradients(self):
        """The gradients of the last backward, keyed like :meth:`parameters`."""
        return {f"{i}.{name}": g for i, layer in enumerate(self.layers) for name, g in layer.gradients().items()}

    def state_dict(self):
        """Copies of the parameters and running statistics, named as in the equivalent ``torch.nn.Sequential``."""
        return {f"{i}.{name}": v for i, layer in enumerate(self.layers) for name, v in layer.state_dict().items()}

    def load_state_dict(self, state):
        """Load a :meth:`state_dict`, ours or PyTorch's (tensors are taken as arrays).

        Raises
        ------
        KeyError
            Keys missing or unexpected.
        ValueError, TypeError
            A value of the wrong shape; one that does not convert (a string, a
            complex number, a fractional ``num_batches_tracked``); a finite value
            out of the range of the model's dtype. The message names the key.
            Nothing is changed unless every value fits: a state that raises
            leaves the model as it was.
        """
        expected = self.state_dict()
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or unexpected:
            raise KeyError(
                f"state must have the keys of state_dict(); missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        # Every array converted and checked here, as BatchNorm checks its own: a Linear's too.
        arrays = {
            name: state[name] if name.endswith(".num_batches_tracked") else _state_value(state[name], name, old.shape, old.dtype)
            for name, old in expected.items()
        }
        try:
            self._load_layers(arrays)
        except Exception:
            self._load_layers(expected)  # the copies taken above: back to where the model was
            raise

    def _load_layers(self, arrays):
        for i, layer in enumerate(self.layers):
            prefix = f"{i}."
            state = {name[len(prefix) :]: v for name, v in arrays.items() if name.startswith(prefix)}
            if isinstance(layer, BatchNorm):
                layer._load_state(state, prefix)  # its messages name the MLP's keys
            else:
                layer.load_state_dict(state)

    def save(self, path):
        """Write the configuration and :meth:`state_dict` to ``path`` as .npz (the name is used as given)."""
        with open(path, "wb") as file:
            np.savez(file, config=np.array(json.dumps(self.config)), **self.state_dict())

    @classmethod
    def load(cls, path):
        """The model that :meth:`save` wrote to ``path``."""
        with np.load(path, allow_pickle=False) as data:
            model = cls(**json.loads(str(data["config"])))
            model.load_state_dict({name: data[name] for name in data.files if name != "config"})
        return model


# --- training --------------------------------------------------------------------------


def batches(n, batch_size, rng, smallest=1):
    """Shuffled index arrays covering ``range(n)``, ``batch_size`` at a time.

    A final batch of fewer than ``smallest`` samples is dropped, unless
    ``batch_size`` itself is below ``smallest``: batch normalization
    (``smallest=2``) cannot train on a single sample.
    """
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        batch = order[start : start + batch_size]
        if len(batch) >= min(smallest, batch_size):
            yield batch


def train(model, X, y, *, epochs, batch_size, lr, optimizer="sgd", momentum=0.0, X_test=None, y_test=None, seed=0,
          progress=False):
    """Train ``model`` by minibatch gradient descent on the softmax cross-entropy.

    Parameters
    ----------
    model : MLP
    X : array_like, shape ``(n, features)``
    y : array_like of int, shape ``(n,)``
    epochs, batch_size : int
        ``batch_size`` must be at least 2 when the model has batch normalization.
    lr : float
    optimizer : {"sgd", "adam"}, default "sgd"
    momentum : float, default 0
        SGD's momentum.
    X_test, y_test : array_like, optional
        When given, the test accuracy is measured after every epoch.
    seed : int or None, default 0
        Seeds the shuffling (None: fresh entropy from the system).
    progress : bool or str, default False
        Show a tqdm progress bar (only on a terminal); a string labels it.

    Returns
    -------
    history : dict
        ``train_loss`` (mean over each epoch), ``epoch_test_accuracy`` (empty
        without test data), ``test_accuracy`` (the last, or None), ``epoch_seconds``
        (the wall time from the start of the loop to the end of each epoch, a
        running total) and ``seconds`` (the whole loop's). Both include scoring
        the test data after each epoch and exclude loading the Numba kernels
        (compiled on first use per dtype, or read from the on-disk cache).

    Raises
    ------
    TypeError, ValueError
        For an invalid argument, named in the message.

    Examples
    --------
    >>> import numpy as np
    >>> from numbanorm.mlp import MLP, train
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(100, 4)), rng.integers(0, 3, 100)
    >>> history = train(MLP([4, 16, 3]), X, y, epochs=5, batch_size=20, lr=0.1, X_test=X, y_test=y)
    >>> len(history["train_loss"]), 0 <= history["test_accuracy"] <= 1
    (5, True)
    """
    X = model._input(X)
    y = model._labels(y, len(X))
    _finite(X, "X")
    epochs = _integer(epochs, "epochs")
    has_batch_norm = any(isinstance(layer, BatchNorm) for layer in model.layers)
    # Batch normalization needs two samples in a batch to have a variance.
    smallest = 2 if has_batch_norm else 1
    batch_size = _integer(batch_size, "batch_size", smallest)
    if len(X) < smallest:
        raise ValueError(f"X must have at least {smallest} rows to train on, got {len(X)}")
    if (X_test is None) != (y_test is None):
        raise ValueError("X_test and y_test must be given together, or neither")
    if X_test is not None:
        X_test = model._input(X_test)
        y_test = model._labels(y_test, len(X_test))
        _finite(X_test, "X_test")
    opt = _make_optimizer(optimizer, model.parameters(), lr, momentum)
    rng = np.random.default_rng(None if seed is None else _integer(seed, "seed", 0))
    history = {"train_loss": [], "epoch_test_accuracy": [], "epoch_seconds": []}
    if has_batch_norm:
        _load_kernels(model)
    bar = _progress_bar(epochs, progress if isinstance(progress, str) else None) if progress else None
    start = time.perf_counter()
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in batches(len(X), batch_size, rng, smallest):
            loss, grads = model.loss_and_grads(X[batch], y[batch])
            opt.step(grads)
            total, count = total + loss * len(batch), count + len(batch)
        history["train_loss"].append(total / count)
        if X_test is not None:
            history["epoch_test_accuracy"].append(model.score(X_test, y_test))
        history["epoch_seconds"].append(time.perf_counter() - start)
        if bar is not None:
            postfix = {"loss": f"{total / count:.4f}"}
            if X_test is not None:
                postfix["test_acc"] = f"{history['epoch_test_accuracy'][-1]:.4f}"
            bar.set_postfix(postfix, refresh=False)  # drawn by update(), with this epoch's count
            bar.update()
    if bar is not None:
        bar.close()
    history["seconds"] = time.perf_counter() - start
    history["test_accuracy"] = history["epoch_test_accuracy"][-1] if X_test is not None else None
    return history


def _load_kernels(model):
    """Run the kernels of ``model``'s BatchNorm layers once on scratch layers of their kinds:
    compiling them, or reading them from Numba's on-disk cache, happens once per process
    and is not training time. A synchronized layer (``numbanorm.mpi``) runs kernels of
    its own; its scratch layer runs them on its rank alone."""
    kinds = {type(layer): layer for layer in model.layers if isinstance(layer, BatchNorm)}
    for layer in kinds.values():
        scratch = layer._scratch()
        x = np.zeros((2, 1), model.dtype)
        scratch.backward(scratch.forward(x))
        scratch.forward(x, training=False)


def _load_kernels_telling(model, after=1.0):
    """``_load_kernels``, saying on stderr what the wait is when it takes longer than ``after`` seconds.

    A first run compiles the kernels (tens of seconds); later ones read them from
    the on-disk cache in a fraction of a second, and say nothing.
    """
    told = threading.Event()

    def tell():
        told.set()
        print("numbanorm: compiling the kernels, once (20-40 s); later runs read them from the on-disk cache",
              file=sys.stderr, flush=True)

    start = time.perf_counter()
    timer = threading.Timer(after, tell)
    timer.daemon = True
    timer.start()
    try:
        _load_kernels(model)
    finally:
        timer.cancel()
    if told.is_set():
        print(f"numbanorm: kernels ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _progress_bar(epochs, label):
    from tqdm.auto import tqdm

    # disable=None: hidden when stderr is not a terminal.
    return tqdm(total=epochs, desc=label, unit="epoch", disable=None, file=sys.stderr)


# --- data, plots and PyTorch -----------------------------------------------------------


def load_digits_split(seed=0, dtype=np.float32):
    """scikit-learn's bundled 8x8 digits, pixels scaled to [0, 1], split 75/25 stratified.

    Returns
    -------
    X_train, X_test, y_train, y_test : ndarray
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(dtype)
    return train_test_split(X, digits.target, test_size=0.25, stratify=digits.target, random_state=seed)


def plot_histories(histories, path, *, chance=None, title=None):
    """Draw test accuracy and training loss per epoch of one or more runs to ``path`` (Agg backend).

    Parameters
    ----------
    histories : dict of label -> history
        As :func:`train` returns.
    path : str, path-like or binary file
        Where the figure goes, in the format the suffix names (.png, .pdf,
        .svg, ...): PNG without one, and for a file.
    chance : float, optional
        Accuracy of guessing, drawn as a dotted line.
    title : str, optional
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    accuracy_ax, loss_ax = fig.subplots(1, 2)
    for label, history in histories.items():
        epochs = np.arange(1, len(history["train_loss"]) + 1)
        if history["epoch_test_accuracy"]:
            accuracy_ax.plot(epochs, history["epoch_test_accuracy"], marker="o", markersize=3, label=label)
        loss_ax.plot(epochs, history["train_loss"], marker="o", markersize=3, label=label)
    if chance is not None:
        accuracy_ax.axhline(chance, color="gray", linestyle=":", label="chance")
    accuracy_ax.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1.02))
    loss_ax.set(xlabel="epoch", ylabel="training loss (cross-entropy)")
    for ax in (accuracy_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    # The format the suffix names, PNG without one: without a format, matplotlib would write
    # such a path with ".png" appended.
    fig.savefig(path, dpi=100, format=_suffix(path) or "png")


def _suffix(path):
    """The file format ``path``'s suffix names, lower case (``""``: none, or not a path)."""
    return os.path.splitext(os.fspath(path))[1][1:].lower() if isinstance(path, (str, os.PathLike)) else ""


def to_torch(model):
    """The equivalent ``torch.nn.Sequential``, holding a copy of ``model``'s state (needs PyTorch).

    The result is in training mode and has ``model``'s dtype; the reverse is
    ``model.load_state_dict(sequential.state_dict())``.
    """
    import torch

    def module(layer):
        if isinstance(layer, Linear):
            return torch.nn.Linear(*layer.weight.shape[::-1])
        if isinstance(layer, BatchNorm):
            return torch.nn.BatchNorm1d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        if isinstance(layer, Dropout):
            return torch.nn.Dropout(layer.p)
        return getattr(torch.nn, type(layer).__name__)()  # ReLU, Sigmoid and Tanh share PyTorch's names

    sequential = torch.nn.Sequential(*map(module, model.layers))
    sequential.to(getattr(torch, model.dtype.name))
    sequential.load_state_dict({name: torch.from_numpy(np.asarray(v)) for name, v in model.state_dict().items()})
    return sequential


# --- command line ----------------------------------------------------------------------


def _flag_type(convert, check, requirement):
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


def _parser(prog="numbanorm-train"):
    positive_int = _flag_type(int, lambda v: v >= 1, "a positive integer")
    probability = _flag_type(float, lambda v: 0 <= v < 1, "in [0, 1)")
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a multilayer perceptron on scikit-learn's bundled digits (75/25 stratified split), "
        "with or without batch normalization. The defaults are the experiment that shows the effect of "
        "batch normalization: 3 hidden layers of 100 sigmoid units, SGD with lr 0.1, batches of 60, 30 epochs.",
    )
    add = parser.add_argument
    add("--hidden", nargs="+", type=positive_int, default=[100, 100, 100], metavar="SIZE",
        help="hidden layer sizes (default: 100 100 100)")
    add("--activation", choices=tuple(ACTIVATIONS), default="sigmoid", help="hidden activation (default: sigmoid)")
    add("--epochs", type=positive_int, default=30, help="training epochs (default: 30)")
    add("--lr", type=_flag_type(float, lambda v: 0 < v < math.inf, "a positive number"),
        help="learning rate (default: 0.1 with sgd, 0.001 with adam)")
    add("--momentum", type=probability, default=0.0, help="SGD momentum (default: 0)")
    add("--batch-size", type=positive_int, default=60,
        help="minibatch size, at least 2 with batch normalization (default: 60)")
    add("--seed", type=_flag_type(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"), default=0,
        help="seeds the split, the initial weights, shuffling and dropout (default: 0)")
    add("--optimizer", choices=OPTIMIZERS, default="sgd", help="(default: sgd)")
    add("--no-batch-norm", action="store_true", help="train without batch normalization")
    add("--bn-position", choices=("before", "after"), default="before",
        help="batch normalization before or after the activation (default: before)")
    add("--dropout", type=probability, default=0.0, metavar="P",
        help="dropout probability after each hidden block (default: 0, none)")
    add("--compare", action="store_true",
        help="train with and without batch normalization from the same seed; plot and report both")
    add("--json", metavar="PATH",
        help="write test_accuracy, epoch_test_accuracy, train_loss, seconds (the training loop's wall time, "
        "test scoring included) and epoch_seconds (its running total at each epoch's end) as JSON; "
        "a loss that diverged is null")
    add("--plot", metavar="PATH",
        help="draw test accuracy and training loss per epoch (PNG, or the format the suffix names: .pdf, .svg, ...)")
    add("--save", metavar="PATH", help="save the trained model (.npz; MLP.load reads it)")
    add("--threads", type=positive_int, default=1, metavar="N",
        help="threads for Numba and NumPy's BLAS during training (default: 1: batches this small gain nothing "
        "from more, and on a busy machine waiting threads make training many times slower)")
    add("--quiet", action="store_true", help="no progress bar and no summary")
    add("--mpi", action="store_true",
        help="data-parallel training: run under mpiexec, each rank trains on its slice of every batch with "
        "synchronized batch norm (numbanorm.mpi; needs the extra mpi); rank 0 reports and writes files")
    return parser


def main(argv=None, prog="numbanorm-train"):
    """The command line: ``numbanorm-train --help``, or ``python -m numbanorm.mlp --help``.

    ``prog`` is the command that usage and error messages name.
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.compare and args.no_batch_norm:
        parser.error("--compare trains both with and without batch norm; drop --no-batch-norm")
    if args.compare and args.save:
        parser.error("--save takes one model; drop --compare")
    if args.batch_size < 2 and not args.no_batch_norm:
        parser.error("--batch-size: batch normalization needs at least 2 samples in a batch, got 1 "
                     "(only --no-batch-norm trains on single samples)")
    if args.optimizer == "adam" and args.momentum:
        parser.error("--momentum applies to --optimizer sgd only")
    lr = args.lr if args.lr is not None else {"sgd": 0.1, "adam": 0.001}[args.optimizer]
    written = {}
    for flag in ("json", "save", "plot"):
        path = getattr(args, flag)
        problem = _unwritable(path, plot=flag == "plot")
        if problem:
            parser.error(f"--{flag}: {problem}")
        if path is not None:
            other = written.setdefault(os.path.realpath(path), flag)
            if other != flag:
                parser.error(f"--{other} and --{flag} name the same file, {path!r}: one would replace the other")
    if args.threads > numba.config.NUMBA_NUM_THREADS:
        limit = numba.config.NUMBA_NUM_THREADS
        parser.error(f"--threads: must be at most {limit} (NUMBA_NUM_THREADS), got {args.threads}")
    if args.mpi:
        try:
            from mpi4py import MPI
        except ImportError:
            parser.error("--mpi needs mpi4py and an MPI: pip install 'numbanorm[mpi]'")
        if MPI.COMM_WORLD.rank:  # every rank trains the same replica; one reports
            args.quiet, args.save, args.json, args.plot = True, None, None, None
    with _threads(args.threads):
        _run(args, lr)
    return 0


def _unwritable(path, plot=False):
    """Why ``path`` cannot take an output file (checked before training, which it would waste), or None."""
    if path is None:
        return None
    if not path:
        return "an empty path names no file"
    if os.path.isdir(path) or path.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        return f"{path!r} names a directory, not a file"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"no directory {folder!r}"
    if not os.access(folder, os.W_OK):
        return f"cannot write in {folder!r}"
    if plot:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return "plotting needs matplotlib: pip install 'numbanorm[mlp]'"
        formats = Figure().canvas.get_supported_filetypes()
        suffix = _suffix(path)
        if suffix and suffix not in formats:
            return f"matplotlib cannot write .{suffix} files; use one of {', '.join(sorted(formats))}"
        # A format may need more than matplotlib (.pgf: a LaTeX install): draw some text in it.
        trial = Figure(figsize=(1, 1))
        trial.text(0.5, 0.5, "accuracy")
        try:
            trial.savefig(io.BytesIO(), format=suffix or "png")
        except Exception as error:  # whatever the backend raises: RuntimeError for a missing xelatex
            return f"matplotlib cannot write .{suffix} files here: {error}"
    return None


def _finite_or_null(value):
    """``value`` with every NaN or infinity replaced by None: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextlib.contextmanager
def _threads(count):
    """Numba and the BLAS limited to ``count`` threads while in the block."""
    from threadpoolctl import threadpool_limits

    before = numba.get_num_threads()
    numba.set_num_threads(count)
    try:
        with threadpool_limits(count):
            yield
    finally:
        numba.set_num_threads(before)


def _run(args, lr):
    X_train, X_test, y_train, y_test = load_digits_split(args.seed)
    classes = int(y_train.max()) + 1
    sizes = [X_train.shape[1], *args.hidden, classes]
    if args.compare:
        runs = {"with batch norm": True, "without batch norm": False}
    else:
        runs = {"with batch norm" if not args.no_batch_norm else "without batch norm": not args.no_batch_norm}
    network = MLP
    if args.mpi:
        from .mpi import DataParallelMLP as network
    histories = {}
    for label, batch_norm in runs.items():
        model = network(sizes, activation=args.activation, batch_norm=batch_norm, seed=args.seed,
                    bn_position=args.bn_position, dropout=args.dropout)
        if batch_norm and not args.quiet:
            _load_kernels_telling(model)
        # A diverging run overflows: the line below says so, in place of NumPy's warnings.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            history = train(model, X_train, y_train, epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                            optimizer=args.optimizer, momentum=args.momentum, X_test=X_test, y_test=y_test,
                            seed=args.seed, progress=False if args.quiet else label)
        histories[label] = history
        if not args.quiet:
            accuracy, seconds = history["test_accuracy"], history["seconds"]
            print(f"{label}: test accuracy {accuracy:.4f} after {args.epochs} epochs, trained in {seconds:.2f} s")
        diverged = [epoch for epoch, loss in enumerate(history["train_loss"], 1) if not math.isfinite(loss)]
        if diverged:
            print(f"{label}: training diverged (the loss is not finite from epoch {diverged[0]}): "
                  f"try a lower --lr than {lr}", file=sys.stderr)

    if args.json:  # first: the smallest output, and the one a script reads
        config = {**vars(args), "lr": lr, "sizes": sizes}
        results = {label.replace(" ", "_"): history for label, history in histories.items()}
        with open(args.json, "w") as file:
            json.dump(_finite_or_null({"config": config, **(results if args.compare else history)}), file, indent=2,
                      allow_nan=False)
    if args.save:
        model.save(args.save)
    if args.plot:
        hidden = "-".join(map(str, args.hidden))
        title = f"digits, {args.activation} MLP {hidden}, {args.optimizer} lr {lr}, batch {args.batch_size}"
        plot_histories(histories, args.plot, chance=1.0 / classes, title=title)
    if not args.quiet:
        for flag, what in (("json", "results"), ("save", "model"), ("plot", "plot")):
            if getattr(args, flag):
                print(f"{what} written to {getattr(args, flag)}")


if __name__ == "__main__":
    sys.exit(main(prog="python -m numbanorm.mlp"))
