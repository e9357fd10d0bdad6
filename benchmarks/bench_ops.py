"""asv: time and peak memory of each operation, per shape, dtype and library.

Every parameter combination runs in its own process; ``setup`` allocates the
arrays and makes the first (compiling) call, so the timed code is the call alone.
``peakmem_`` is the whole process's peak, setup's arrays included, and for
numbanorm what compiling or loading its kernels took (Numba and LLVM: 75-225 MB
more than NumPy on small shapes, less with a warm on-disk cache). Compare it
across libraries on the large shapes, where the arrays dominate; numbanorm's own
bound (no full-size temporaries) is checked by the tests (``test_embedding.py``).
``track_peak_increase`` leaves all that out: the MB a call adds to the peak.
"""

import sys

from ._cases import (
    CASES,
    DTYPES,
    LIBRARIES,
    OUTPUT_OPS,
    OUTPUTS,
    Data,
    import_torch,
    peak_increase_mb,
    prepare,
    prepare_output,
)

try:  # Once here, in asv's fork server, rather than in each benchmark's process (see asv.conf.json).
    import_torch()
except NotImplementedError as error:  # the torch benchmarks skip, from setup: asv shows them as n/a
    print(f"numbanorm benchmarks: the torch cases are skipped: {error}", file=sys.stderr)


class _Operation:
    params = (list(CASES), list(DTYPES), list(LIBRARIES))
    param_names = ("shape", "dtype", "library")
    op = None
    # One round and at most a few seconds of samples per combination keep the
    # grid (270 combinations, each its own process) affordable on 2 cores.
    rounds = 1
    repeat = (1, 10, 5.0)
    timeout = 300

    def setup(self, shape, dtype, library):
        self.call = prepare(self.op, library, Data(shape, dtype))

    def track_peak_increase(self, shape, dtype, library):
        """MB the call adds to the process's peak resident memory (``_cases.peak_increase_mb``)."""
        return peak_increase_mb(self.call.run)

    track_peak_increase.unit = "MB"


class TimeForwardTrain(_Operation):
    op = "forward_train"

    def time_forward_train(self, shape, dtype, library):
        self.call.run()

    def peakmem_forward_train(self, shape, dtype, library):
        self.call.run()


class TimeForwardInfer(_Operation):
    op = "forward_infer"

    def time_forward_infer(self, shape, dtype, library):
        self.call.run()

    def peakmem_forward_infer(self, shape, dtype, library):
        self.call.run()


class TimeBackward(_Operation):
    op = "backward"

    def time_backward(self, shape, dtype, library):
        self.call.run()

    def peakmem_backward(self, shape, dtype, library):
        self.call.run()


class TimeStats(_Operation):
    op = "stats"

    def time_stats(self, shape, dtype, library):
        self.call.run()

    def peakmem_stats(self, shape, dtype, library):
        self.call.run()


class TimeBatchNorm(_Operation):
    """``BatchNorm`` (``torch.nn.BatchNorm1d/2d`` with autograd): a training forward and its backward."""

    op = "layer"

    def time_forward_backward(self, shape, dtype, library):
        self.call.run()

    def peakmem_forward_backward(self, shape, dtype, library):
        self.call.run()


class TimeOutput:
    """numbanorm's element-wise passes into a new array, a reused ``out=``, and in place.

    Above glibc's mmap threshold (32 MiB) a new array costs page faults on every
    call; in place, a loop that compilers vectorize only for arrays that do not
    overlap would fall back to scalar code (it once made in place 2-4x slower).
    """

    params = (["4096x1024", "65536x256", "64x64x28x28", "64x28x28x64,axis=-1"], list(DTYPES), list(OUTPUT_OPS), list(OUTPUTS))
    param_names = ("shape", "dtype", "op", "output")
    rounds = 1
    repeat = (1, 10, 5.0)
    timeout = 300

    def setup(self, shape, dtype, op, output):
        self.call = prepare_output(op, output, Data(shape, dtype))

    def time_output(self, shape, dtype, op, output):
        self.call.run()
