"""Synchronized batch normalization for data-parallel training over MPI.

Needs the optional extra ``mpi`` (``pip install "numbanorm[mpi]"``: mpi4py and
the MPICH wheel, whose ``mpiexec`` lands in the environment's ``bin/``).

Every rank holds a replica of the model and a part of the global batch. The
forward gathers every rank's ``(count, mean, m2)`` and merges them in rank order
(:func:`numbanorm.merge_stats`), so each rank normalizes its part with the
statistics of the whole batch; the backward gathers the two per-feature sums of
:func:`numbanorm.batch_norm_backward_reduce`, so each rank gets its part of the
whole batch's ``dx`` and the whole batch's ``dgamma`` and ``dbeta``. Ranks may
hold batches of different sizes, or none. Because every rank combines the same
gathered values in the same order, the results agree bit for bit on all ranks:
replicas stay identical.

All ranks of ``comm`` must call these functions together. An argument error on
one rank is raised on every rank (as ``RuntimeError`` on the others) instead of
leaving them waiting in a collective. The exception is the forward's
``training``, which decides whether there is a collective at all: ranks that
disagree on it (``True`` on one, ``False`` on another) leave the training ones
waiting. (A ``training`` that is not a bool raises on every rank when it looks
true, ``1`` or ``"yes"``, and on its own rank when it looks false.)

Example, run with ``mpiexec -n 2 python script.py``::

    import numpy as np
    from mpi4py import MPI
    import numbanorm.mpi

    rank = MPI.COMM_WORLD.rank
    x = np.random.default_rng(rank).normal(size=(16 + 8 * rank, 4)).astype(np.float32)
    layer = numbanorm.mpi.SyncBatchNorm(4)
    y = layer.forward(x)                 # normalized with the statistics of all 40 rows
    dx = layer.backward(np.ones_like(y))  # layer.dbeta == 40 on every rank
"""

import functools
import math

import numpy as np

try:
    from mpi4py import MPI
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        f"numbanorm.mpi needs mpi4py ({error}): pip install 'numbanorm[mpi]'", name=error.name
    ) from error

from . import api
from .api import _number
from .layer import BatchNorm
from .mlp import MLP, softmax_cross_entropy

__all__ = [
    "allgather_checked",
    "allreduce_stats",
    "allreduce_sum",
    "batch_norm_forward",
    "batch_norm_backward",
    "SyncBatchNorm",
    "DataParallelMLP",
]


def _communicator(comm):
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
    return comm


def allgather_checked(compute, comm=None):
    """Every rank's ``compute()``, in rank order, on every rank; an error anywhere raises everywhere.

    Parameters
    ----------
    compute : callable
        Called with no arguments on this rank; its result must be picklable.
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    list
        ``compute()`` of rank 0, 1, ...

    Raises
    ------
    Exception
        What ``compute`` raised on this rank; ``RuntimeError`` naming the rank
        when it raised on another rank only.

    Examples
    --------
    Run by itself, a script is one rank of ``MPI.COMM_WORLD``; under
    ``mpiexec -n 2`` the list would be ``[0, 1]`` on both ranks.

    >>> from mpi4py import MPI
    >>> import numbanorm.mpi
    >>> numbanorm.mpi.allgather_checked(lambda: MPI.COMM_WORLD.rank)
    [0]
    """
    comm = _communicator(comm)
    try:
        payload = (None, compute())
    except Exception as error:  # noqa: BLE001 - re-raised below, after the collective
        payload = (error, None)
    gathered = comm.allgather(payload)
    own_error = payload[0]
    if own_error is not None:
        raise own_error
    for rank, (error, _) in enumerate(gathered):
        if error is not None:
            raise RuntimeError(f"rank {rank} of {comm.size} failed: {type(error).__name__}: {error}") from error
    return [value for _, value in gathered]


def _checked_on_every_rank(check, comm):
    """This rank's ``check()``, once every rank has run its own: an error on any rank raises on all of them.

    Only whether each rank raised crosses the network (:func:`allgather_checked`
    of nothing), not what ``check`` returns.
    """
    result = []
    allgather_checked(lambda: result.append(check()), comm)
    return result[0]


def _means_training(training):
    """Whether ``training`` asks for the batch statistics' collective: its truth value, when it has one.

    A ``training`` that is not a bool raises (``api._flag``), but on one rank
    only, it must raise where the other ranks are: in the collective when it
    looks true (``1``, ``"yes"``), as they most likely pass ``True``.
    """
    try:
        return bool(training)
    except Exception:  # noqa: BLE001 - an array of several values, say: the collective reports it
        return True


def _same_features(parts, comm):
    """Check that every rank's per-feature arrays have one shape (the ranks all raise together)."""
    shapes = [np.shape(part[0]) for part in parts]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"every rank must have the same number of features; got shapes {shapes} on ranks 0..{comm.size - 1}"
        )


def allreduce_stats(stats, comm=None):
    """Merge every rank's ``(count, mean, m2)`` into the statistics of the global batch.

    Parameters
    ----------
    stats : (count, mean, m2)
        This rank's statistics, from :func:`numbanorm.batch_norm_partial_stats`
        (count 0 for an empty part).
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    count, mean, m2 : ndarray of float64
        The same on every rank: the ranks' statistics merged in rank order.

    Examples
    --------
    On one rank (``MPI.COMM_SELF``) the global statistics are the local ones:

    >>> import numpy as np, numbanorm, numbanorm.mpi
    >>> from mpi4py import MPI
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])
    >>> numbanorm.mpi.allreduce_stats(numbanorm.batch_norm_partial_stats(x), comm=MPI.COMM_SELF)
    (array([3., 3.]), array([ 3., 30.]), array([  8., 800.]))
    """
    comm = _communicator(comm)
    parts = allgather_checked(lambda: api._stats_triple(stats, "stats"), comm)  # checked on its own rank
    _same_features(parts, comm)
    return api.merge_stats(parts)


def allreduce_sum(arrays, comm=None):
    """Sum each of ``arrays`` over the ranks, in rank order, so that every rank gets the same bits.

    Parameters
    ----------
    arrays : sequence of array_like
        This rank's terms; shapes must agree across ranks.
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    list of ndarray
        The sums, in the dtypes of the terms promoted together across ranks.

    Examples
    --------
    >>> import numpy as np, numbanorm.mpi
    >>> from mpi4py import MPI
    >>> numbanorm.mpi.allreduce_sum([np.array([1.0, 2.0]), np.array(3)], comm=MPI.COMM_SELF)
    [array([1., 2.]), array(3)]
    """
    comm = _communicator(comm)
    parts = allgather_checked(lambda: [api._unmasked_array(a, f"arrays[{i}]") for i, a in enumerate(arrays)], comm)
    shapes = [[np.shape(a) for a in part] for part in parts]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"arrays must have the same shapes on every rank; got {shapes} on ranks 0..{comm.size - 1}")
    totals = [np.array(a, copy=True) for a in parts[0]]
    for part in parts[1:]:
        totals = [total + a for total, a in zip(totals, part)]
    return totals


def batch_norm_forward(
    x,
    gamma=None,
    beta=None,
    *,
    comm=None,
    axis=1,
    eps=1e-5,
    training=True,
    running_mean=None,
    running_var=None,
    momentum=0.1,
):
    """Batch normalization of this rank's part with the statistics of the global batch.

    In training every rank of ``comm`` must call it together; in inference it
    needs no communication and equals :func:`numbanorm.batch_norm_forward`.

    Parameters
    ----------
    x : array_like, at least 2-D
        This rank's part of the batch; it may be empty (0 along a batch axis).
    gamma, beta : array_like, shape ``(x.shape[axis],)``, optional
        Scale and shift, the same on every rank; ``None`` means 1 and 0.
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    axis, eps, training, running_mean, running_var, momentum
        As in :func:`numbanorm.batch_norm_forward`. The running statistics are
        updated with the global batch's mean and unbiased variance, the same on
        every rank.

    Returns
    -------
    y : ndarray
        Shape and dtype of ``x``.
    mean, invstd : ndarray of float64, shape ``(x.shape[axis],)``
        The global batch's statistics, the same on every rank.

    Raises
    ------
    As :func:`numbanorm.batch_norm_forward`, on every rank; ``ValueError`` when
    the global batch has fewer than 2 values per feature in training or the
    ranks disagree on the number of features.

    Examples
    --------
    On one rank it gives what :func:`numbanorm.batch_norm_forward` gives; under
    ``mpiexec -n 2`` each rank's ``y`` would use the mean of both ranks' rows.

    >>> import numpy as np, numbanorm.mpi
    >>> from mpi4py import MPI
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, mean, invstd = numbanorm.mpi.batch_norm_forward(x, comm=MPI.COMM_SELF)
    >>> mean
    array([ 2., 20.])
    >>> y.round(4)
    array([[-1., -1.],
           [ 1.,  1.]])
    """
    if not _means_training(training):  # inference: no collective, so the functional API's checks suffice
        return api.batch_norm_forward(
            x, gamma, beta, axis=axis, eps=eps, training=training, running_mean=running_mean, running_var=running_var,
            momentum=momentum,
        )
    comm = _communicator(comm)

    def local_stats():
        # Every check that could fail on one rank only runs before the collective.
        api._flag(training, "training")
        _number(eps, "eps", 0.0, math.inf)
        _number(momentum, "momentum", 0.0, 1.0)
        if (running_mean is None) != (running_var is None):
            raise ValueError("running_mean and running_var must be given together, or neither")
        stats = api.batch_norm_partial_stats(x, axis=axis)
        features = stats[0].shape[0]
        for value, name in ((gamma, "gamma"), (beta, "beta")):
            if value is not None:
                api._per_feature(value, name, features)
        if running_mean is not None:
            api._running_pair(running_mean, running_var, features)
        return stats

    parts = allgather_checked(local_stats, comm)
    _same_features(parts, comm)
    count, mean, m2 = api.merge_stats(parts)
    total = count[0] if count.size else 0.0
    if total < 2:
        raise ValueError(f"the global batch must have more than 1 value per feature in training, got {total:g}")
    var = m2 / count
    y, _, invstd = api.batch_norm_forward(
        x, gamma, beta, axis=axis, eps=eps, training=False, running_mean=mean, running_var=var
    )
    if running_mean is not None:  # as the in-memory forward updates them
        api._update_running(running_mean, running_var, mean, var, float(momentum), total)
    return y, mean, invstd


def batch_norm_backward(dy, x, mean, invstd, gamma=None, *, comm=None, axis=1, training=True):
    """Gradients of :func:`batch_norm_forward`: this rank's ``dx``, the global batch's ``dgamma``, ``dbeta``.

    Every rank of ``comm`` must call it together.

    Parameters
    ----------
    dy, x : array_like
        This rank's gradient and input (possibly empty).
    mean, invstd : array_like, shape ``(features,)``
        What :func:`batch_norm_forward` returned.
    gamma : array_like, optional
        The forward's scale; ``None`` means 1.
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    axis, training
        As in :func:`numbanorm.batch_norm_backward`.

    Returns
    -------
    dx : ndarray
        This rank's part of the gradient of the loss over the global batch.
    dgamma, dbeta : ndarray, shape ``(features,)``
        Summed over the global batch, in the dtype of ``dx`` (float32 for
        float16, whose range a sum over a batch overflows), as
        :func:`numbanorm.batch_norm_backward` returns them: the same on every
        rank whose ``dx`` has the same dtype (ranks with float16 and float64
        data get the same float64 sums, rounded differently).

    Raises
    ------
    As :func:`numbanorm.batch_norm_backward`, on every rank.

    Examples
    --------
    >>> import numpy as np, numbanorm.mpi
    >>> from mpi4py import MPI
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, mean, invstd = numbanorm.mpi.batch_norm_forward(x, comm=MPI.COMM_SELF)
    >>> dx, dgamma, dbeta = numbanorm.mpi.batch_norm_backward(np.ones_like(y), x, mean, invstd, comm=MPI.COMM_SELF)
    >>> dbeta  # the sum of dy over the global batch: here, this rank's two rows
    array([2., 2.])
    """
    comm = _communicator(comm)

    def local_sums():
        api._flag(training, "training")
        sum_dy, sum_dy_xhat = api.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
        features = sum_dy.shape[0]
        if gamma is not None:
            api._per_feature(gamma, "gamma", features)
        count = np.full(features, math.prod(np.shape(x)) / features if features else 0.0)
        return [sum_dy, sum_dy_xhat, count]

    parts = allgather_checked(local_sums, comm)
    _same_features(parts, comm)
    sum_dy, sum_dy_xhat, count = (np.sum([part[i] for part in parts], axis=0) for i in range(3))
    if training:
        # No values on any rank (or no features): dx is empty, and any count will do.
        total = count[0] if count.size and count[0] > 0 else 1
        dx = api.batch_norm_backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, total, axis=axis)
    else:
        dx, _, _ = api.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis, training=False)
    sums_dtype = api._compute_dtype(dx.dtype)
    return dx, sum_dy_xhat.astype(sums_dtype), sum_dy.astype(sums_dtype)


class SyncBatchNorm(BatchNorm):
    """:class:`numbanorm.BatchNorm` whose training statistics span every rank of ``comm``.

    PyTorch's ``SyncBatchNorm``: in training the forward normalizes with the
    global batch's statistics and the backward returns this rank's part of the
    global ``dx``, and fills ``dgamma``/``dbeta`` with the global batch's
    gradients, the same on every rank (so they need no further all-reduce).
    All ranks must call :meth:`forward` and :meth:`backward` together.

    Parameters
    ----------
    num_features : int
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    **kwargs
        As :class:`numbanorm.BatchNorm`.
    """

    def __init__(self, num_features, *, comm=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.comm = _communicator(comm)

    def _scratch(self, **options):
        # On this rank alone: the same kernels, and no collective that the other ranks must join.
        layer = super()._scratch(**options)
        return SyncBatchNorm.from_batch_norm(layer, comm=MPI.COMM_SELF)

    @classmethod
    def from_batch_norm(cls, layer, comm=None):
        """A synchronized copy of the :class:`numbanorm.BatchNorm` ``layer``: same options and state.

        Parameters
        ----------
        layer : numbanorm.BatchNorm
            Left unchanged; the copy shares none of its arrays.
        comm : mpi4py.MPI.Comm, optional
            Default ``MPI.COMM_WORLD``.

        Returns
        -------
        SyncBatchNorm

        Raises
        ------
        TypeError
            ``layer`` is not a :class:`numbanorm.BatchNorm`, or ``comm`` not a communicator.

        Examples
        --------
        >>> import numpy as np, numbanorm, numbanorm.mpi
        >>> layer = numbanorm.BatchNorm(3, momentum=0.2)
        >>> numbanorm.mpi.SyncBatchNorm.from_batch_norm(layer)
        SyncBatchNorm(3, axis=1, eps=1e-05, momentum=0.2, affine=True, track_running_stats=True, dtype=float32)
        """
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"layer must be a numbanorm.BatchNorm, got {type(layer).__name__}")
        sync = cls(
            layer.num_features,
            comm=comm,
            axis=layer.axis,
            eps=layer.eps,
            momentum=layer.momentum,
            affine=layer.affine,
            track_running_stats=layer.track_running_stats,
            dtype=layer.dtype,
        )
        sync.load_state_dict(layer.state_dict())
        sync.training = layer.training
        return sync

    def __repr__(self):
        return "Sync" + super().__repr__()

    # The layer checks its mode, its input, and that a forward came first, before the functional
    # forward and backward: a rank that raised there would leave the others waiting in their
    # collective. The checks run on every rank together when a collective follows (the forward
    # with the batch statistics; every backward).

    def _mode(self, training):
        # A bad ``training`` raises where the other ranks are: in the collective of
        # ``_checked_input`` when it asks for the batch statistics (it looks true, or the layer
        # has no running statistics), on this rank alone otherwise.
        bad = training is not None and not isinstance(training, (bool, np.bool_))
        if bad and (_means_training(training) or self.running_mean is None):
            return _checked_on_every_rank(functools.partial(super()._mode, training), self.comm)
        return super()._mode(training)

    def _checked_input(self, x, use_batch_stats):
        check = functools.partial(super()._checked_input, x, use_batch_stats)
        return _checked_on_every_rank(check, self.comm) if use_batch_stats else check()

    def _last_forward(self):
        return _checked_on_every_rank(super()._last_forward, self.comm)

    def _functional_forward(self, x, gamma, beta, **options):
        """In training, normalize with the global batch's statistics."""
        return batch_norm_forward(x, gamma, beta, comm=self.comm, **options)

    def _functional_backward(self, dy, x, mean, invstd, gamma, **options):
        """This rank's part of ``dx``, and the global batch's ``dgamma``/``dbeta``."""
        return batch_norm_backward(dy, x, mean, invstd, gamma, comm=self.comm, **options)


class DataParallelMLP(MLP):
    """:class:`numbanorm.mlp.MLP` trained data-parallel: each rank of ``comm`` takes a slice of every batch.

    Every rank holds a replica (rank 0's initial weights, broadcast) and is
    given the same global batch; :meth:`loss_and_grads` runs the forward and
    backward on this rank's contiguous slice of it, with :class:`SyncBatchNorm`
    in place of every BatchNorm, and sums the other layers' gradients over the
    ranks. The loss and every gradient are those of the global batch, the same
    bits on every rank, so an optimizer step keeps the replicas identical and
    training follows one process on the whole batch (to float rounding; dropout
    masks excepted, as each rank draws its own).

    Parameters
    ----------
    sizes, *args, **kwargs
        As :class:`numbanorm.mlp.MLP`.
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    """

    def __init__(self, sizes, *args, comm=None, **kwargs):
        super().__init__(sizes, *args, **kwargs)
        self.comm = _communicator(comm)
        self.layers = [
            SyncBatchNorm.from_batch_norm(layer, self.comm) if isinstance(layer, BatchNorm) else layer
            for layer in self.layers
        ]
        # Identical replicas from the start, even when the ranks' seeds differ (or are None).
        self.load_state_dict(self.comm.bcast(self.state_dict(), root=0))

    def local_rows(self, n):
        """The rows of a global batch of ``n`` that this rank trains on: a contiguous slice."""
        return slice(self.comm.rank * n // self.comm.size, (self.comm.rank + 1) * n // self.comm.size)

    def loss_and_grads(self, x, labels):
        """Mean cross-entropy of the global batch ``x`` and its gradients, computed on this rank's slice.

        Every rank must call it together, with the same ``x`` and ``labels``.
        """
        x = self._input(x)
        labels = self._labels(labels, len(x))
        rows = self.local_rows(len(x))
        logits = self.forward(x[rows], training=True)
        local = len(logits)
        if local:
            loss, dlogits = softmax_cross_entropy(logits, labels[rows])
        else:
            loss, dlogits = 0.0, np.zeros_like(logits)
        # The gradient of the global mean: this slice's mean weighted by its share of the batch.
        dlogits *= local / len(x)
        self.backward(dlogits)
        # SyncBatchNorm's gradients are already the global batch's; the others are this slice's.
        grads, local_grads = {}, {}
        for i, layer in enumerate(self.layers):
            for name, grad in layer.gradients().items():
                (grads if isinstance(layer, SyncBatchNorm) else local_grads)[f"{i}.{name}"] = grad
        *sums, loss_sum = allreduce_sum([*local_grads.values(), np.float64(loss * local)], self.comm)
        grads.update(zip(local_grads, sums))
        return float(loss_sum) / len(x), grads
