"""``BatchNorm``: the parameters and running statistics around the functional API."""

import numbers

import numpy as np

from .api import _as_array, _compute_dtype, _data, _flag, _number, batch_norm_backward, batch_norm_forward

__all__ = ["BatchNorm"]


class BatchNorm:
    """A batch-normalization layer for NumPy networks, with PyTorch's semantics.

    Parameters
    ----------
    num_features : int
        Size of the feature axis.
    axis : int, default 1
        The feature axis of the inputs (-1 for channels-last).
    eps : float, default 1e-5
        Added to the variance.
    momentum : float or None, default 0.1
        Weight of each new batch in the running statistics; ``None`` gives the
        cumulative average of all batches seen (weight ``1 / num_batches_tracked``).
    affine : bool, default True
        Learn a scale ``gamma`` (initially 1) and shift ``beta`` (initially 0).
    track_running_stats : bool, default True
        Keep ``running_mean`` (initially 0) and ``running_var`` (initially 1) for
        inference. Without them the batch statistics are used in both modes.
    dtype : numpy dtype, default float32
        dtype of the parameters and running statistics: float16, float32 or float64.

    Attributes
    ----------
    gamma, beta : ndarray or None
        The parameters (``None`` when not ``affine``).
    dgamma, dbeta : ndarray or None
        Their gradients, filled by :meth:`backward`, in ``dtype`` (float32 for
        float16, whose range a sum over a batch overflows); ``None`` until then,
        and always when not ``affine``.
    running_mean, running_var : ndarray or None
    num_batches_tracked : int
    training : bool
        The mode: :meth:`train` and :meth:`eval` set it.

    Examples
    --------
    >>> import numpy as np, numbanorm
    >>> layer = numbanorm.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    >>> y = layer.forward(x)
    >>> dx = layer.backward(np.ones_like(y))
    >>> layer.dbeta
    array([8., 8., 8.], dtype=float32)
    >>> y_eval = layer.eval().forward(x)  # uses the running statistics
    """

    def __init__(
        self,
        num_features,
        *,
        axis=1,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        dtype=np.float32,
    ):
        if isinstance(num_features, (bool, np.bool_)) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be an integer, got {num_features!r}")
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        if dtype is None:  # np.dtype(None) would be float64
            raise TypeError("dtype must be float16, float32 or float64, got None")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float16, float32 or float64, got {dtype!r}") from None
        if dtype.kind != "f" or dtype.itemsize > 8:
            raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
        self.num_features = int(num_features)
        self.axis = int(axis)
        self.eps = _number(eps, "eps", 0.0, np.inf)
        self.momentum = None if momentum is None else _number(momentum, "momentum", 0.0, 1.0)
        self.affine = _flag(affine, "affine")
        self.track_running_stats = _flag(track_running_stats, "track_running_stats")
        self.dtype = dtype
        self.gamma = np.ones(num_features, dtype) if affine else None
        self.beta = np.zeros(num_features, dtype) if affine else None
        self.dgamma = None
        self.dbeta = None
        self.running_mean = np.zeros(num_features, dtype) if track_running_stats else None
        self.running_var = np.ones(num_features, dtype) if track_running_stats else None
        self.num_batches_tracked = 0
        self.training = True
        self._saved = None

    def __repr__(self):
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, dtype={self.dtype.name})"
        )

    def train(self, mode=True):
        """Set training mode (batch statistics) or, with ``mode=False``, inference mode.

        Parameters
        ----------
        mode : bool, default True

        Returns
        -------
        self : BatchNorm

        Raises
        ------
        TypeError
            ``mode`` is not a bool (``"False"`` would otherwise mean True).
        """
        if not isinstance(mode, (bool, np.bool_)):  # train("False") would otherwise mean True
            raise TypeError(f"mode must be a bool, got {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        """Set inference mode: normalize with the running statistics. Returns self."""
        return self.train(False)

    def forward(self, x, training=None):
        """Normalize ``x`` with the batch's statistics (training) or the running ones (inference).

        In training the running statistics are updated and ``num_batches_tracked``
        grows by one. What the backward needs (a reference to ``x``, not a copy,
        and the statistics) is kept until the next forward, but not in pickles or
        copies of the layer: do not modify ``x`` in place before calling :meth:`backward`.

        Parameters
        ----------
        x : array_like, at least 2-D
            ``num_features`` values on the layer's ``axis``.
        training : bool, optional
            The mode of this call; by default the layer's (:meth:`train`, :meth:`eval`).

        Returns
        -------
        y : ndarray
            Shaped like ``x``, in its dtype (float64 for integers and bools).

        Raises
        ------
        TypeError
            ``x`` does not hold real numbers; ``training`` is neither ``None`` nor a bool.
        ValueError
            ``x`` has fewer than 2 dimensions, another number of features, or
            (in training) fewer than 2 values per feature.

        Examples
        --------
        >>> import numpy as np, numbanorm
        >>> layer = numbanorm.BatchNorm(2, dtype=np.float64)
        >>> layer.forward(np.array([[1.0, 10.0], [3.0, 30.0]])).round(4)  # eps keeps it off 1
        array([[-1., -1.],
               [ 1.,  1.]])
        >>> layer.running_mean
        array([0.2, 2. ])
        """
        self._saved = None  # a forward that raises leaves no earlier batch for the backward
        training = self._mode(training)
        # As in PyTorch: without running statistics the batch statistics serve in both modes.
        use_batch_stats = training or self.running_mean is None
        x = self._checked_input(x, use_batch_stats)
        tracking = use_batch_stats and self.running_mean is not None
        momentum = 0.0
        if tracking:
            momentum = 1.0 / (self.num_batches_tracked + 1) if self.momentum is None else self.momentum
        y, mean, invstd = self._functional_forward(
            x,
            self.gamma,
            self.beta,
            axis=self.axis,
            eps=self.eps,
            training=use_batch_stats,
            running_mean=self.running_mean,
            running_var=self.running_var,
            momentum=momentum,
        )
        if tracking:  # only now: a call that raised has changed nothing
            self.num_batches_tracked += 1
        self._saved = (x, mean, invstd, use_batch_stats)
        return y

    def __call__(self, x, training=None):
        """``self.forward(x, training)``: a subclass's own ``forward`` is what a call runs, as in PyTorch."""
        return self.forward(x, training)

    def __getstate__(self):
        """Pickles and copies leave out what the last forward kept for the backward (its input)."""
        return dict(self.__dict__, _saved=None)

    def backward(self, dy):
        """Gradient with respect to the last forward's input; fills ``dgamma`` and ``dbeta``.

        Parameters
        ----------
        dy : array_like
            Gradient with respect to the last forward's output, shaped like it.

        Returns
        -------
        dx : ndarray
            Gradient with respect to the last forward's input, in its dtype
            (float64 for an integer input), whatever ``dy``'s dtype: the
            functional API's promotion is computed, then rounded to it.

        Raises
        ------
        RuntimeError
            No forward came before, or the last one raised.
        ValueError
            ``dy`` is not shaped like the last forward's input.
        TypeError
            ``dy`` does not hold real numbers.

        Examples
        --------
        >>> import numpy as np, numbanorm
        >>> layer = numbanorm.BatchNorm(2, dtype=np.float64)
        >>> y = layer.forward(np.array([[1.0, 10.0], [3.0, 30.0]]))
        >>> dx = layer.backward(np.ones_like(y))  # a constant gradient: dx is 0
        >>> dx, layer.dbeta
        (array([[0., 0.],
               [0., 0.]]), array([2., 2.]))
        """
        x, mean, invstd, use_batch_stats = self._last_forward()
        dx, dgamma, dbeta = self._functional_backward(
            dy, x, mean, invstd, self.gamma, axis=self.axis, training=use_batch_stats
        )
        if self.affine:  # without parameters there are no gradients to keep (``gradients()`` is empty)
            # In the parameters' dtype, but float32 for float16, whose range a sum over a batch overflows.
            self.dgamma = dgamma.astype(_compute_dtype(self.dtype), copy=False)
            self.dbeta = dbeta.astype(_compute_dtype(self.dtype), copy=False)
        # The functional backward promotes: a float64 dy would give a float32 input a float64 dx.
        return dx if dx.dtype == x.dtype else dx.astype(x.dtype)

    def _scratch(self, **options):
        """A new one-feature layer with these options, on which ``mlp`` runs the kernels once before training.

        A ``BatchNorm``, whatever subclass ``self`` is: a subclass's constructor
        may take other arguments. One that runs kernels of its own
        (``numbanorm.mpi.SyncBatchNorm``) overrides this.
        """
        return BatchNorm(
            1,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
            dtype=self.dtype,
            **options,
        )

    def _mode(self, training):
        """The mode of one forward: ``training`` (a bool), or the layer's when it is ``None``."""
        return self.training if training is None else _flag(training, "training")

    def _checked_input(self, x, use_batch_stats):
        """``x`` as an array, with ``num_features`` on the feature axis (``ValueError`` naming ``x`` otherwise).

        Converted once: the functional forward takes the array as it is.
        ``use_batch_stats``: whether the forward computes the batch's statistics
        (which ``SyncBatchNorm`` gathers from every rank).
        """
        x = _data(x, "x")
        if x.ndim >= 2 and -x.ndim <= self.axis < x.ndim and x.shape[self.axis] != self.num_features:
            # Else gamma's or running_mean's shape check would name an argument the caller never passed.
            raise ValueError(
                f"x must have num_features={self.num_features} features on axis {self.axis}, got shape {x.shape}"
            )
        return x

    def _last_forward(self):
        """What the last forward kept for the backward: ``(x, mean, invstd, use_batch_stats)``."""
        if self._saved is None:
            raise RuntimeError("backward needs a forward first")
        return self._saved

    def _functional_forward(self, x, gamma, beta, **options):
        """The functional forward the layer runs: a subclass (``SyncBatchNorm``) swaps in its own."""
        return batch_norm_forward(x, gamma, beta, **options)

    def _functional_backward(self, dy, x, mean, invstd, gamma, **options):
        """The functional backward the layer runs."""
        return batch_norm_backward(dy, x, mean, invstd, gamma, **options)

    def parameters(self):
        """The learnable parameters by PyTorch name: ``{"weight": gamma, "bias": beta}`` (empty without affine)."""
        return {"weight": self.gamma, "bias": self.beta} if self.affine else {}

    def gradients(self):
        """The gradients of :meth:`parameters`, by the same names."""
        return {"weight": self.dgamma, "bias": self.dbeta} if self.affine else {}

    def state_dict(self):
        """Copies of the parameters and running statistics under PyTorch's BatchNorm key names.

        Returns
        -------
        state : dict of str -> ndarray
            ``weight`` and ``bias`` (with ``affine``), ``running_mean``,
            ``running_var`` and ``num_batches_tracked`` (an int64 scalar array;
            with ``track_running_stats``).
        """
        state = {name: value.copy() for name, value in self.parameters().items()}
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state):
        """Load what :meth:`state_dict` (or PyTorch's ``BatchNorm*d.state_dict()``, as arrays) gives.

        Every key the layer has must be present, the per-feature ones with shape
        ``(num_features,)``; missing or unknown keys raise ``KeyError``. Values
        are copied in the layer's dtype; a finite value that this dtype cannot
        hold (a float16 layer given 1e5) raises ``ValueError`` rather than
        becoming infinite. Every value is checked and converted before any is
        loaded: a state that raises leaves the layer as it was.

        Parameters
        ----------
        state : mapping of str -> array_like
            The keys of :meth:`state_dict`.

        Raises
        ------
        KeyError
            A key is missing or unknown.
        TypeError
            A value does not hold real numbers; ``num_batches_tracked`` is not an integer.
        ValueError
            A per-feature value of the wrong shape, out of the layer dtype's
            range, or that does not convert to an array; ``num_batches_tracked``
            negative or above int64.

        Examples
        --------
        >>> import numpy as np, numbanorm
        >>> trained = numbanorm.BatchNorm(2)
        >>> _ = trained.forward(np.array([[1.0, 10.0], [3.0, 30.0]], np.float32))
        >>> fresh = numbanorm.BatchNorm(2)
        >>> fresh.load_state_dict(trained.state_dict())
        >>> fresh.running_mean, fresh.num_batches_tracked
        (array([0.2, 2. ], dtype=float32), 1)
        """
        self._load_state(state)

    def _load_state(self, state, prefix=""):
        """:meth:`load_state_dict`, its messages naming each key as ``prefix + key`` (an ``MLP``'s ``"1."``)."""
        expected = set(self.state_dict())
        missing = expected - set(state)
        unexpected = set(state) - expected
        if missing or unexpected:
            missing, unexpected = ([prefix + key for key in sorted(keys)] for keys in (missing, unexpected))
            raise KeyError(
                f"state must have keys {[prefix + key for key in sorted(expected)]}; missing {missing}, unexpected {unexpected}"
            )
        arrays = {}
        for name in sorted(expected - {"num_batches_tracked"}):
            arrays[name] = _state_value(state[name], prefix + name, (self.num_features,), self.dtype)
        if "num_batches_tracked" in state:
            key = prefix + "num_batches_tracked"
            batches = state["num_batches_tracked"]
            if not (isinstance(batches, int) and not isinstance(batches, bool)):  # NumPy holds a Python int past int64 as an object
                batches = np.asarray(batches)
                if batches.shape != () or batches.dtype.kind not in "iu":
                    raise TypeError(f"state[{key!r}] must be an integer, got {state['num_batches_tracked']!r}")
                batches = int(batches)
            if not 0 <= batches <= np.iinfo(np.int64).max:  # state_dict() saves it as int64, as PyTorch does
                raise ValueError(f"state[{key!r}] must be in [0, 2**63 - 1], got {batches}")
        for name, value in arrays.items():
            getattr(self, _ATTRIBUTE[name])[...] = value
        if "num_batches_tracked" in state:
            self.num_batches_tracked = batches


def _state_value(value, key, shape, dtype):
    """``state[key]`` checked and converted for loading: an array of ``shape`` in ``dtype``.

    A finite value that ``dtype`` cannot hold raises ``ValueError`` rather than
    becoming infinite; the messages name ``key``.
    """
    value = _as_array(value, f"state[{key!r}]")
    if value.shape != shape:
        raise ValueError(f"state[{key!r}] must have shape {shape}, got {value.shape}")
    if value.dtype.kind not in "biuf":
        raise TypeError(f"state[{key!r}] must hold real numbers, got dtype {value.dtype}")
    with np.errstate(over="ignore"):  # told below, as an error
        converted = value.astype(dtype)
    overflow = np.isinf(converted) & np.isfinite(value)
    if overflow.any():
        raise ValueError(
            f"state[{key!r}] has values outside the range of {np.dtype(dtype).name}: {value[overflow][:3].tolist()}"
        )
    return converted


_ATTRIBUTE = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean", "running_var": "running_var"}
