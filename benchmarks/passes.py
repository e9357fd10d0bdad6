"""Where the ``(N, C)`` kernels lose to the copy: each pass against the same streams with no per-feature work.

    python benchmarks/passes.py                                   # the report's large (N, C) shapes
    python benchmarks/passes.py --shapes 4096x1024 --dtypes float32 --repeats 9

The training forward is two passes over ``x`` (the statistics, then the
normalization), the training backward two over ``x`` and ``dy`` (the sums,
then ``dx``), inference one. Each kernel is timed beside a "plain" pass that
reads and writes the same arrays in the same order and does no per-feature
work:

- the statistics beside a sum of ``x`` (one read);
- the normalization beside ``(x - a) * b + c`` with scalars ``a, b, c``
  (``_vectors.run_normalize``, the kernels' own vector loop for runs);
- the backward's sums beside the sums of ``x`` and of ``dy`` (two reads);
- ``dx`` beside ``_vectors.run_grad_input`` with scalar constants (the formula of
  the ``(N, C, H, W)`` runs: a multiplication and a subtraction more than the ``(N, C)`` pass's).

"plain" in the last columns puts two plain passes together: what a forward
(or backward) moving the same bytes would reach, as a fraction of the copy, as
``benchmarks/report.py`` reckons it (traffic 3x the array for the forward, 5x
for the backward, 2x for inference, against a copy's 2x). The kernels are
called directly, with no argument checks and with their outputs allocated
beforehand, 16 bytes past a page as NumPy places large arrays. Everything runs
in one process, one pass after the other in each repeat; the table gives
medians. Absolute times vary by 10-30 % between processes (with where the
arrays land); the ratios within one process vary less, so compare those.

Markdown goes to stdout.
"""

import argparse
import os
import statistics
import sys
import time

import numba
import numpy as np

from numbanorm import _kernels
from numbanorm._vectors import run_grad_input, run_normalize

if __package__:
    from .report import parallel_copy
else:  # run as a script: through benchmarks.report, the name its copy's disk cache records
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.report import parallel_copy

DEFAULT_SHAPES = ("4096x1024", "512x8192", "50176x64", "65536x256")
PAGE_OFFSET = 16  # where NumPy's large arrays start: 16 bytes past a page (glibc's mmap chunk header)


@numba.njit(parallel=True, fastmath=True)
def plain_read(a, b, chunks):
    """The sum of ``a`` and, unless ``b`` is empty, of ``b``: one or two arrays read once, in ``chunks`` slabs."""
    n = a.size
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    partial = np.zeros(chunks)
    for t in numba.prange(chunks):
        start, stop = t * n // chunks, (t + 1) * n // chunks
        partial[t] = flat_a[start:stop].sum()
        if flat_b.size:
            partial[t] += flat_b[start:stop].sum()
    return partial.sum()


@numba.njit(parallel=True)
def plain_normalize(x, constant, chunks, y):
    """``y = (x - constant) * constant + constant``, in ``chunks`` slabs."""
    n = x.size
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    for t in numba.prange(chunks):
        start, stop = t * n // chunks, (t + 1) * n // chunks
        run_normalize(flat_y, start, stop, flat_x, constant, constant, constant)


@numba.njit(parallel=True)
def plain_grad_input(dy, x, constant, chunks, dx):
    """``dx = (dy - c) * c - ((x - c) * c) * c - c`` for ``c = constant``, in ``chunks`` slabs."""
    n = x.size
    flat_dy, flat_x, flat_dx = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
    for t in numba.prange(chunks):
        start, stop = t * n // chunks, (t + 1) * n // chunks
        run_grad_input(flat_dx, start, stop, flat_dy, flat_x, constant, constant, constant, constant, constant, constant)


def page_array(shape, dtype):
    """An empty C-contiguous ``(N, C, 1)`` array ``PAGE_OFFSET`` bytes past a 4 KiB page."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buffer = np.empty(nbytes + 2 * 4096, np.uint8)
    start = -buffer.ctypes.data % 4096 + PAGE_OFFSET
    return buffer[start : start + nbytes].view(dtype).reshape(shape[0], shape[1], 1)


def passes(shape, dtype, threads):
    """``{name: zero-argument call}`` for every pass on one ``(N, C)`` shape, their data made here."""
    rng = np.random.default_rng(0)
    x, dy, out = (page_array(shape, dtype) for _ in range(3))
    x[...] = rng.normal(3.0, 2.0, size=x.shape)
    dy[...] = rng.normal(0.0, 1.0, size=dy.shape)
    features = shape[1]
    mean, var, invstd, m2 = (np.empty(features) for _ in range(4))
    gamma, beta = np.ones(features, dtype), np.zeros(features, dtype)
    dgamma, dbeta = np.empty(features, dtype), np.empty(features, dtype)
    sum_dy, sum_dy_xmu = np.empty(features), np.empty(features)
    _kernels.forward_train(x, gamma, beta, 1e-5, threads, False, out, mean, var, invstd)
    forward_params = _kernels.new_params(_kernels.FORWARD_ROWS, x, out)
    _kernels.normalize_params(mean, invstd, gamma, beta, forward_params)
    backward_params = _kernels.new_params(_kernels.BACKWARD_ROWS, x, out)
    _kernels.grad_sums(dy, x, mean, threads, sum_dy, sum_dy_xmu)
    folded = _kernels.grad_params(mean, invstd, gamma, sum_dy, sum_dy_xmu * invstd, shape[0], backward_params)
    constant = np.dtype(dtype).type(0.5)
    nothing = np.empty((0, 0, 1), dtype)
    return {
        "copy": lambda: parallel_copy(x.reshape(-1), out.reshape(-1), threads),
        "stats": lambda: _kernels.partial_stats(x, threads, mean, m2),
        "read": lambda: plain_read(x, nothing, threads),
        "normalize": lambda: _kernels.normalize(x, forward_params, threads, False, out),
        "plain normalize": lambda: plain_normalize(x, constant, threads, out),
        "sums": lambda: _kernels.grad_sums(dy, x, mean, threads, sum_dy, sum_dy_xmu),
        "read two": lambda: plain_read(x, dy, threads),
        "dx": lambda: _kernels.grad_input(dy, x, backward_params, folded, True, threads, False, out),
        "plain dx": lambda: plain_grad_input(dy, x, constant, threads, out),
        "forward": lambda: _kernels.forward_train(x, gamma, beta, 1e-5, threads, False, out, mean, var, invstd),
        "backward": lambda: _kernels.backward(dy, x, mean, invstd, gamma, True, threads, False, out, dgamma, dbeta),
    }


def measure(calls, repeats, number):
    """Median seconds per call of each of ``calls``, the calls interleaved within each repeat."""
    for call in calls.values():
        call()
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(number):
                call()
            samples[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(times) for name, times in samples.items()}


def row(shape_text, dtype, t):
    """One table row from the medians ``t``."""
    copy = t["copy"]
    cells = [
        shape_text,
        dtype,
        f"{copy * 1e6:.0f} µs",
        f"{t['stats'] / t['read']:.2f}x",
        f"{t['normalize'] / t['plain normalize']:.2f}x",
        f"{t['sums'] / t['read two']:.2f}x",
        f"{t['dx'] / t['plain dx']:.2f}x",
        f"{1.5 * copy / t['forward']:.2f} ({1.5 * copy / (t['read'] + t['plain normalize']):.2f})",
        f"{2.5 * copy / t['backward']:.2f} ({2.5 * copy / (t['read two'] + t['plain dx']):.2f})",
        f"{t['normalize'] / copy:.2f}x ({t['plain normalize'] / copy:.2f}x)",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| shape | dtype | copy | stats / read | normalize / plain | sums / read two | dx / plain |"
    " forward of copy (plain) | backward of copy (plain) | inference / copy (plain) |\n"
    "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="(N, C) shapes such as 4096x1024")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=15, help="repeats of every pass (default 15)")
    parser.add_argument("--number", type=int, default=10, help="calls timed together in one repeat (default 10)")
    args = parser.parse_args(argv)
    for text in args.shapes:
        parts = text.split("x")
        if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
            parser.error(f"--shapes: {text!r} is not a shape such as 4096x1024")
    if args.repeats < 1 or args.number < 1:
        parser.error("--repeats and --number must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    threads = numba.get_num_threads()
    print(f"Kernel-level passes on {threads} thread(s); medians of {args.repeats} repeats of {args.number} calls.\n")
    print(HEADER)
    for shape_text in args.shapes:
        shape = tuple(int(part) for part in shape_text.split("x"))
        for dtype in args.dtypes:
            print(row(shape_text, dtype, measure(passes(shape, dtype, threads), args.repeats, args.number)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
