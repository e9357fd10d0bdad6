"""The benchmark grid, its data, and one ready-to-run call per (operation, library, case).

Shared by the asv suite and ``report.py``, so that both time exactly the same calls.
``prepare`` does every allocation and the first (compiling) call; what it returns
runs the operation once and does nothing else.

Libraries:

``numbanorm``
    The functional API and ``numbanorm.BatchNorm``.
``numpy``
    A plain NumPy implementation in the input's dtype (below): what a user writes
    without numbanorm. It is a speed baseline, not the accuracy reference
    (that is ``tests/reference.py``, in float64).
``torch``
    PyTorch on the CPU: ``torch.nn.functional.batch_norm``, its native backward
    ``torch.ops.aten.native_batch_norm_backward``, and ``torch.nn.BatchNorm1d/2d``
    with autograd for the layer. PyTorch has no statistics-only kernel on the CPU
    (``torch.batch_norm_stats`` is CUDA's): its training forward without
    parameters, ``torch.native_batch_norm``, stands in, although it also writes
    ``y``. (The generic ``torch.var_mean`` took 2-7x as long, which would flatter
    numbanorm.)
    Channels-last data is passed as the channels-last view PyTorch's own kernels
    take, without a copy.
"""

import ctypes
import ctypes.util
import functools
import os

import numpy as np

import numbanorm

EPS = 1e-5
MOMENTUM = 0.1

# name -> (shape, feature axis)
CASES = {
    "32x64": ((32, 64), 1),
    "256x256": ((256, 256), 1),
    "4096x1024": ((4096, 1024), 1),
    "65536x256": ((65536, 256), 1),
    "512x8192": ((512, 8192), 1),
    "64x64x28x28": ((64, 64, 28, 28), 1),
    "32x256x14x14": ((32, 256, 14, 14), 1),
    "64x28x28x64,axis=-1": ((64, 28, 28, 64), 3),
    # Beyond the grid: a batch of one, as inference serves it (and a batch whose
    # rows cannot be shared among threads).
    "1x64x112x112": ((1, 64, 112, 112), 1),
}
DTYPES = ("float32", "float64")
LIBRARIES = ("numbanorm", "numpy", "torch")
OPS = ("forward_train", "backward", "forward_infer", "stats", "layer")

# The least memory traffic of each operation, in multiples of the array's size:
# the statistics read x; inference reads x and writes y; training also reads x
# once more for the statistics; the backward reads dy and x twice (sums, then
# dx) and writes dx; the layer is a training forward and a backward.
TRAFFIC = {"stats": 1, "forward_infer": 2, "forward_train": 3, "backward": 5, "layer": 8}


class Data:
    """The arrays of one case: ``x``, per-feature parameters, and ``dy`` on first use."""

    def __init__(self, case, dtype, seed=0):
        self.case = case
        self.shape, self.axis = CASES[case]
        self.dtype = np.dtype(dtype)
        self.features = self.shape[self.axis]
        self._rng = np.random.default_rng(seed)
        # An offset and a spread unlike 0 and 1, so nothing is accidentally trivial.
        self.x = self._normal(self.shape, 3.0, 2.0)
        self.gamma = self._normal(self.features, 1.0, 0.25)
        self.beta = self._normal(self.features, 0.0, 1.0)
        self.running_mean = self._normal(self.features, 3.0, 0.1)
        self.running_var = np.full(self.features, 4.0, dtype=self.dtype)

    def _normal(self, shape, loc, scale):
        a = self._rng.standard_normal(shape, dtype=self.dtype)
        a *= scale
        a += loc
        return a

    @functools.cached_property
    def dy(self):
        return self._normal(self.shape, 0.0, 1.0)

    @property
    def nbytes(self):
        return self.x.nbytes


class Call:
    """``run()`` does the operation once; ``result()`` runs it and returns NumPy arrays to compare."""

    def __init__(self, run, to_numpy=lambda outputs: outputs):
        self.run = run
        self._to_numpy = to_numpy

    def result(self):
        return tuple(np.asarray(a, dtype=np.float64) for a in self._to_numpy(self.run()))


def prepare(op, library, data):
    """The ``Call`` of ``op`` with ``library`` on ``data``, already run twice (compiled, pages touched).

    Raises ``NotImplementedError`` (asv's way to skip) when ``library`` is torch
    and PyTorch is not installed.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    makers = {"numbanorm": _numbanorm, "numpy": _numpy, "torch": _torch}
    call = makers[library](op, data)
    call.run()
    call.run()
    return call


# --- numbanorm -------------------------------------------------------------------------


def _numbanorm(op, d):
    x, axis = d.x, d.axis
    if op == "stats":
        return Call(lambda: numbanorm.batch_norm_stats(x, axis=axis))
    if op in ("forward_train", "forward_infer"):
        training = op == "forward_train"

        def forward():
            return numbanorm.batch_norm_forward(
                x, d.gamma, d.beta, axis=axis, eps=EPS, training=training,
                running_mean=d.running_mean, running_var=d.running_var, momentum=MOMENTUM,
            )

        return Call(forward, lambda outputs: outputs[:1])
    dy = d.dy
    if op == "backward":
        _, mean, invstd = numbanorm.batch_norm_forward(x, axis=axis, eps=EPS)
        return Call(lambda: numbanorm.batch_norm_backward(dy, x, mean, invstd, d.gamma, axis=axis))
    layer = numbanorm.BatchNorm(d.features, axis=axis, eps=EPS, momentum=MOMENTUM, dtype=d.dtype)

    def forward_backward():
        y = layer.forward(x)
        dx = layer.backward(dy)
        return y, dx, layer.dgamma, layer.dbeta

    return Call(forward_backward)


OUTPUTS = ("new", "out", "in place")
OUTPUT_OPS = ("forward_train", "forward_infer", "backward")


def prepare_output(op, output, data):
    """numbanorm's ``op`` writing its array result into a new array, a reused ``out=``, or in place.

    In place is ``out=x`` for the forwards and ``out=dy`` for the backward, on
    copies of the data. Each call then starts from the previous call's result,
    which must not drift into other work (subnormals, overflow): each settles on
    a fixed point within a few calls. A training forward of its own output gives
    that output back (but for ``eps``'s share); inference contracts each feature
    towards a fixed value; the backward runs with ``gamma = 1 / invstd``, so
    that it projects ``dy`` (``gamma * invstd`` below 1 would shrink ``dy`` into
    subnormals within a few hundred calls).
    """
    if op not in OUTPUT_OPS or output not in OUTPUTS:
        raise ValueError(f"op must be one of {OUTPUT_OPS} and output one of {OUTPUTS}, got {op!r}, {output!r}")
    axis = data.axis
    x = data.x.copy() if output == "in place" and op != "backward" else data.x
    if op == "backward":
        dy = data.dy.copy()
        _, mean, invstd = numbanorm.batch_norm_forward(x, axis=axis, eps=EPS)
        gamma = 1 / invstd
        out = {"new": None, "out": np.empty_like(dy), "in place": dy}[output]
        call = Call(lambda: numbanorm.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis, out=out))
    else:
        training = op == "forward_train"
        running_mean, running_var = data.running_mean.copy(), data.running_var.copy()
        out = {"new": None, "out": np.empty_like(x), "in place": x}[output]

        def forward():
            return numbanorm.batch_norm_forward(
                x, data.gamma, data.beta, axis=axis, eps=EPS, training=training,
                running_mean=running_mean, running_var=running_var, momentum=MOMENTUM, out=out,
            )

        call = Call(forward)
    call.run()
    call.run()
    return call


# --- plain NumPy -----------------------------------------------------------------------


def _reduced_axes(x, axis):
    return tuple(i for i in range(x.ndim) if i != axis)


def _along(v, x, axis):
    """Per-feature ``v`` shaped to broadcast against ``x``."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return v.reshape(shape)


def numpy_stats(x, axis):
    axes = _reduced_axes(x, axis)
    return x.mean(axis=axes), x.var(axis=axes)


def numpy_forward_train(x, gamma, beta, axis, running_mean, running_var):
    axes = _reduced_axes(x, axis)
    count = x.size // x.shape[axis]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    invstd = 1 / np.sqrt(var + EPS)
    y = (x - _along(mean, x, axis)) * _along(gamma * invstd, x, axis) + _along(beta, x, axis)
    running_mean[...] = (1 - MOMENTUM) * running_mean + MOMENTUM * mean
    running_var[...] = (1 - MOMENTUM) * running_var + MOMENTUM * var * count / (count - 1)
    return y, mean, invstd


def numpy_forward_infer(x, gamma, beta, axis, running_mean, running_var):
    scale = gamma / np.sqrt(running_var + EPS)
    return x * _along(scale, x, axis) + _along(beta - running_mean * scale, x, axis)


def numpy_backward(dy, x, mean, invstd, gamma, axis):
    axes = _reduced_axes(x, axis)
    count = x.size // x.shape[axis]
    xhat = (x - _along(mean, x, axis)) * _along(invstd, x, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dx = _along(gamma * invstd, x, axis) * (dy - _along(dbeta / count, x, axis) - xhat * _along(dgamma / count, x, axis))
    return dx, dgamma, dbeta


def _numpy(op, d):
    x, axis = d.x, d.axis
    if op == "stats":
        return Call(lambda: numpy_stats(x, axis))
    if op == "forward_train":
        return Call(
            lambda: numpy_forward_train(x, d.gamma, d.beta, axis, d.running_mean, d.running_var),
            lambda outputs: outputs[:1],
        )
    if op == "forward_infer":
        return Call(lambda: (numpy_forward_infer(x, d.gamma, d.beta, axis, d.running_mean, d.running_var),))
    dy = d.dy
    if op == "backward":
        _, mean, invstd = numpy_forward_train(x, d.gamma, d.beta, axis, d.running_mean.copy(), d.running_var.copy())
        return Call(lambda: numpy_backward(dy, x, mean, invstd, d.gamma, axis))
    # A new layer's state, as numbanorm.BatchNorm and torch.nn.BatchNorm2d start with.
    gamma, beta = np.ones(d.features, d.dtype), np.zeros(d.features, d.dtype)
    running_mean, running_var = np.zeros(d.features, d.dtype), np.ones(d.features, d.dtype)

    def forward_backward():
        y, mean, invstd = numpy_forward_train(x, gamma, beta, axis, running_mean, running_var)
        dx, dgamma, dbeta = numpy_backward(dy, x, mean, invstd, gamma, axis)
        return y, dx, dgamma, dbeta

    return Call(forward_backward)


def peak_increase_mb(run):
    """MB that ``run()`` adds to the process's peak resident memory, over what it held before.

    Linux only (``NotImplementedError``, asv's skip, elsewhere): writing ``5`` to
    ``/proc/self/clear_refs`` resets the peak (``VmHWM``) to the current size.
    Unlike asv's ``peakmem_``, this leaves out the interpreter, the compilers and
    the setup's arrays: it is the call's own outputs and temporaries.

    Freed memory that the allocator keeps resident would hide them: the previous
    call's result, freed when the next replaces it, holds the pages the next
    result reuses, and every library read 0 MB on every shape. glibc's
    ``malloc_trim(0)`` hands that memory back to the system first. (Elsewhere,
    musl say, the figure stays a lower bound.)
    """
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError as error:
        raise NotImplementedError(f"needs Linux's /proc/self/clear_refs ({error})") from None
    before = _status_kb("VmRSS")
    run()
    return (_status_kb("VmHWM") - before) / 1024


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def _release_freed_memory():
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise NotImplementedError(f"/proc/self/status has no {field}")


# --- PyTorch ---------------------------------------------------------------------------


def import_torch(wait_policy=None):
    """``torch``, with as many threads as Numba uses; ``NotImplementedError`` without it.

    ``wait_policy``: unless ``OMP_WAIT_POLICY`` is set already, it is set to this
    (``None``, the default: left unset, PyTorch as its users run it). Like any
    OpenMP setting, it only takes effect before torch's first import. PASSIVE
    makes PyTorch's OpenMP threads sleep rather than spin between parallel
    regions, which costs PyTorch 50-100 µs a call on small arrays (a (32, 64)
    training forward took 106-111 µs with it, 15-21 µs without): the suite
    measured with it before 2026-11-24, and flattered numbanorm there.
    """
    if wait_policy is not None:
        os.environ.setdefault("OMP_WAIT_POLICY", wait_policy)
    try:
        import torch
    except ImportError as error:
        raise NotImplementedError(
            f"PyTorch is not installed ({error}); `pip install torch` to compare against it"
        ) from None
    import numba

    torch.set_num_threads(numba.get_num_threads())
    return torch


def _torch(op, d):
    torch = import_torch()
    axis = d.axis

    def tensor(a):
        """``a`` as PyTorch's ``(N, C, *spatial)`` view of the same memory."""
        return torch.from_numpy(a).movedim(axis, 1)

    def array(t):
        """The inverse of ``tensor``, for checking."""
        return t.detach().movedim(1, axis).numpy()

    x = tensor(d.x)
    gamma, beta = torch.from_numpy(d.gamma), torch.from_numpy(d.beta)
    running_mean, running_var = torch.from_numpy(d.running_mean), torch.from_numpy(d.running_var)
    if op == "stats":

        def stats():
            _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, EPS)
            return mean, invstd

        # The variance back from invstd = 1 / sqrt(var + eps), untimed.
        return Call(stats, lambda outputs: [outputs[0].numpy(), 1.0 / outputs[1].double().numpy() ** 2 - EPS])
    if op in ("forward_train", "forward_infer"):
        training = op == "forward_train"

        def forward():
            return torch.nn.functional.batch_norm(
                x, running_mean, running_var, gamma, beta, training=training, momentum=MOMENTUM, eps=EPS
            )

        return Call(forward, lambda y: [array(y)])
    dy = tensor(d.dy)
    if op == "backward":
        _, save_mean, save_invstd = torch.native_batch_norm(
            x, gamma, beta, running_mean.clone(), running_var.clone(), True, MOMENTUM, EPS
        )
        backward = torch.ops.aten.native_batch_norm_backward

        def grads():
            return backward(dy, x, gamma, running_mean, running_var, save_mean, save_invstd, True, EPS, [True] * 3)

        return Call(grads, lambda outputs: [array(outputs[0]), outputs[1].numpy(), outputs[2].numpy()])
    module_class = torch.nn.BatchNorm1d if x.ndim in (2, 3) else torch.nn.BatchNorm2d
    layer = module_class(d.features, eps=EPS, momentum=MOMENTUM, dtype=getattr(torch, d.dtype.name))
    leaf = x.detach().requires_grad_()

    def forward_backward():
        leaf.grad = layer.weight.grad = layer.bias.grad = None
        y = layer(leaf)
        y.backward(dy)
        return y, leaf.grad, layer.weight.grad, layer.bias.grad

    return Call(
        forward_backward,
        lambda outputs: [array(outputs[0]), array(outputs[1]), outputs[2].detach().numpy(), outputs[3].detach().numpy()],
    )


# --- cold start ------------------------------------------------------------------------

# The first calls a new process makes: a float32 training forward and its backward.
FIRST_CALLS = """\
y, mean, invstd = numbanorm.batch_norm_forward(x)
numbanorm.batch_norm_backward(y, x, mean, invstd)
"""


def first_call_setup(cache, preload=""):
    """Source that makes the data, with ``NUMBANORM_CACHE`` set (before numbanorm is imported).

    ``preload``: a module the process imports first (untimed), as a program that uses it would have.
    """
    return f"""\
import os
os.environ["NUMBANORM_CACHE"] = "{int(bool(cache))}"
import numpy as np
{f"import {preload}" if preload else ""}
x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
"""


def first_call_script(cache, preload=""):
    """A script for a fresh interpreter that prints the seconds ``import numbanorm`` and ``FIRST_CALLS`` took.

    ``cache`` False sets ``NUMBANORM_CACHE=0``: every kernel is compiled afresh.
    ``preload``: as for ``first_call_setup``.
    """
    return (
        first_call_setup(cache, preload)
        + "import time\nstart = time.perf_counter()\nimport numbanorm\nimported = time.perf_counter()\n"
        + FIRST_CALLS
        + "print(imported - start, time.perf_counter() - imported)\n"
    )
