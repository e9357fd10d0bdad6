"""Side-by-side report: numbanorm against PyTorch's CPU batch norm and against a parallel copy.

    python benchmarks/report.py                      # the whole grid, then the cold start
    python benchmarks/report.py --quick              # fewer, shorter repeats
    python benchmarks/report.py --shapes 32x64 65536x256 --dtypes float32 --ops backward

Everything is measured in one process and one run. For every operation, shape
and dtype, each repeat times, one after the other and always in this order:
numbanorm on one thread, numbanorm, two copies of the array into a new array,
as the operations produce theirs (a Numba ``prange`` copy and
``ndarray.copy``), PyTorch on one thread, and PyTorch (numbanorm and PyTorch
with the same number of threads). The table gives the medians over the
repeats. Before any timing, numbanorm's results are checked against PyTorch's.

Each contender therefore always follows the same one, and each library's
timed run follows its own one-thread run on the same data. What follows
PyTorch runs on one thread: its OpenMP threads spin for milliseconds after its
last call (``OMP_WAIT_POLICY`` unset) and take a core from whatever runs next on
two threads. Until 2026-11-24 the parallel copy came right after PyTorch: the
roofline of the 6-24 MB arrays now measures 1.4-2.0x what it did (512x8192
float32: 104 GB/s then, 206 now, in two runs of one commit), so the earlier
reports' roofline was too low and numbanorm's "of copy" too high. PyTorch then
followed numbanorm, and measured 0-16 % slower right after it than in calls of
its own in a row, outside the report (32x256x14x14 float32 backward: 223
against 193 µs); in the report, this order and that one gave PyTorch the same
times within the run-to-run noise (two runs each). The rounds also used to
start one contender later each time, which put others after PyTorch at the seams.

Bandwidth is the least traffic an operation needs (``TRAFFIC``: the training
forward reads x twice and writes y, 3x the array; the backward 5x; inference
2x) divided by its time. The copy moves 2x the array; the faster of the two
copies is the roofline, and "of copy" is numbanorm's bandwidth as a fraction
of it. "1->N threads" is numbanorm's time on one thread over its time on N.

Markdown goes to stdout, progress to stderr.
"""

import argparse
import datetime
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numba
import numpy as np

import numbanorm

if __package__:
    from ._cases import CASES, DTYPES, OPS, TRAFFIC, Data, first_call_script, import_torch, prepare
else:  # run as a script: benchmarks/ is on sys.path
    from _cases import CASES, DTYPES, OPS, TRAFFIC, Data, first_call_script, import_torch, prepare

TRAINING_OPS = ("forward_train", "backward")
DEFAULT_OPS = ("forward_train", "backward", "forward_infer")
LARGE_BYTES = 8 * 2**20  # the "large arrays": the roofline targets apply from here
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}  # relative to the norm of PyTorch's result


@numba.njit(parallel=True, cache=True)
def parallel_copy(src, dst, chunks):
    """``dst[:] = src`` for 1-D arrays, in ``chunks`` contiguous slabs (one per thread).

    Slices, not an element loop over ``range(start, stop)``: Numba cannot tell
    that such an index is never negative, and its wraparound check kept LLVM
    from vectorizing the loop. That copy ran 1.2x (32 MiB, from memory) to 4x
    (3 MiB float32, in cache) slower than this one, and the roofline with it.
    """
    n = src.size
    for t in numba.prange(chunks):
        start, stop = t * n // chunks, (t + 1) * n // chunks
        dst[start:stop] = src[start:stop]


# --- measuring -------------------------------------------------------------------------


class Contender:
    """A function to time, the thread count to time it with, and its samples.

    ``library`` is the module whose ``get_num_threads``/``set_num_threads`` the
    thread count goes to: Numba (the default) or PyTorch.
    """

    def __init__(self, name, function, threads, library=numba):
        self.name = name
        self.function = function
        self.threads = threads
        self.library = library
        self.number = 1
        self.samples = []

    def sample(self):
        """Seconds per call, over ``number`` calls in a row."""
        previous = self.library.get_num_threads()
        self.library.set_num_threads(self.threads)
        try:
            function = self.function
            start = time.perf_counter()
            for _ in range(self.number):
                function()
            return (time.perf_counter() - start) / self.number
        finally:
            self.library.set_num_threads(previous)

    def calibrate(self, sample_seconds):
        """Choose ``number`` so that one sample lasts about ``sample_seconds``.

        One call's time is the fastest of three single calls. Taken from one
        call, as it was, a single slow one set ``number`` to 1 for the whole
        row, and every sample then timed one cold call (the thread pool asleep,
        the caches full of the previous contender's data) while the other
        contenders' samples timed many warm ones. The float32 backward of a
        batch of one (1x64x112x112) was measured that way in three of four
        runs, and showed 0.6-0.75x of PyTorch instead of 1.15x or more: its
        first call took 11-19 ms, because a ``free`` in it made glibc give the
        previous row's 24.5 MB back to the system (a ``brk`` of 15.7 ms under
        strace).
        """
        self.number = 1
        one_call = min(self.sample() for _ in range(3))
        self.number = min(100_000, math.ceil(sample_seconds / max(one_call, 1e-7)))

    @property
    def median(self):
        return statistics.median(self.samples)


def contenders_for(mine, theirs, src, threads, torch):
    """The contenders of one row, in the order of their cycle (see the module's docstring).

    Each library runs on one thread, then on ``threads``: each one's timed run
    follows its own, on the same data (its threads asleep, its arrays in cache).
    The copies copy ``src`` into a new array, as the operations write theirs:
    above glibc's mmap threshold every new array costs page faults, the copy's
    included. What follows PyTorch, whose threads still spin then, runs on one thread.
    """
    contenders = [
        Contender("numbanorm_1", mine, 1),
        Contender("numbanorm", mine, threads),
        Contender("copy_numba", lambda: parallel_copy(src, np.empty_like(src), threads), threads),
        Contender("copy_numpy", src.copy, threads),
        Contender("torch_1", theirs, 1, torch),
        Contender("torch", theirs, threads, torch),
    ]
    if threads == 1:
        contenders = [c for c in contenders if c.name not in ("numbanorm_1", "torch_1")]
    return contenders


def interleaved(contenders, repeats, sample_seconds):
    """Calibrate each contender, then take ``repeats`` rounds of one sample each, in their order."""
    for contender in contenders:
        contender.calibrate(sample_seconds)
        contender.samples = []
    for _ in range(repeats):
        for contender in contenders:
            contender.samples.append(contender.sample())
    return {contender.name: contender.median for contender in contenders}


def relative_error(actual, expected):
    """The largest, over the outputs, of ``|actual - expected| / |expected|`` in the 2-norm."""
    worst = 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            return math.inf
        worst = max(worst, float(np.linalg.norm(a - e) / max(np.linalg.norm(e), np.finfo(np.float64).tiny)))
    return worst


def measure(args, torch, progress):
    """One row per (op, shape, dtype), in that order; ``SystemExit`` if numbanorm and PyTorch disagree."""
    rows = []
    mismatches = []
    for case in args.shapes:
        for dtype in args.dtypes:
            data = Data(case, dtype)
            src = data.x.reshape(-1)
            parallel_copy(src, np.empty_like(src), args.threads)
            for op in args.ops:
                progress(f"{op} {case} {dtype}")
                mine = prepare(op, "numbanorm", data)
                theirs = prepare(op, "torch", data)
                error = relative_error(mine.result(), theirs.result())
                if not error <= TOLERANCE[dtype]:
                    mismatches.append(f"{op} {case} {dtype}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}")
                    continue
                contenders = contenders_for(mine.run, theirs.run, src, args.threads, torch)
                times = interleaved(contenders, args.repeats, args.sample_seconds)
                del mine, theirs
                rows.append(dict(op=op, case=case, dtype=dtype, nbytes=data.nbytes, error=error, **times))
            del data, src
    if mismatches:
        raise SystemExit("numbanorm and PyTorch disagree; nothing was timed for:\n  " + "\n  ".join(mismatches))
    return rows


# The row of ``cold_start`` that the target (under 1 second) applies to.
WARM = "warm on-disk cache"
# Numba's first compilation or cache load in a process checks for a BLAS by importing
# scipy.linalg, when SciPy is installed (it is, for scikit-learn's digits): 0.3-0.4 s of
# the first call on the machine of the README's report, paid once per process by any Numba
# code. This row is the first call of a process that has imported SciPy already.
WARM_SCIPY = "warm, SciPy imported first"


def cold_start(warm_runs, cold_runs, progress):
    """Medians of (import seconds, first-call seconds, total, runs) in new processes, by row label.

    The rows: a warm disk cache (``WARM``); a warm cache in a process that imported
    scipy.linalg before (``WARM_SCIPY``, when SciPy is installed); no cache.
    """

    def run(cache, preload=""):
        script = first_call_script(cache, preload)
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
        return tuple(float(v) for v in out.stdout.split())

    progress("cold start: filling the cache")
    run(True)
    configurations = [(WARM, True, "", warm_runs)]
    if importlib.util.find_spec("scipy") is not None:
        configurations.append((WARM_SCIPY, True, "scipy.linalg", warm_runs))
    configurations.append(("no cache (NUMBANORM_CACHE=0)", False, "", cold_runs))
    results = {}
    for label, cache, preload, runs in configurations:
        progress(f"cold start: {label}")
        samples = [run(cache, preload) for _ in range(runs)]
        results[label] = (
            statistics.median(s[0] for s in samples),
            statistics.median(s[1] for s in samples),
            statistics.median(s[0] + s[1] for s in samples),
            runs,
        )
    return results


# --- printing --------------------------------------------------------------------------


def seconds(t):
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} µs"


def megabytes(nbytes):
    return f"{nbytes / 2**20:.3g}"


def derived(row):
    """Speedup, bandwidth, roofline and scaling of a measured row."""
    copy = min(row["copy_numba"], row["copy_numpy"])
    bandwidth = TRAFFIC[row["op"]] * row["nbytes"] / row["numbanorm"]
    roofline = 2 * row["nbytes"] / copy
    return dict(
        speedup=row["torch"] / row["numbanorm"],
        bandwidth=bandwidth,
        roofline=roofline,
        fraction=bandwidth / roofline,
        copy_by="numba" if row["copy_numba"] <= row["copy_numpy"] else "numpy",
        scaling=row["numbanorm_1"] / row["numbanorm"] if "numbanorm_1" in row else None,
    )


def machine(threads, torch):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import llvmlite

    return [
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; numbanorm {numbanorm.__version__} at commit {commit}",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable)",
        f"- Threads: {threads} for both (Numba threading layer: {numba.threading_layer()}, PyTorch: "
        f"{torch.get_num_threads()} with OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, Numba {numba.__version__}, "
        f"llvmlite {llvmlite.__version__}, PyTorch {torch.__version__}",
    ]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if h != "shape" else ":---" for h in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def geometric_mean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def render(rows, threads, cold):
    out = []
    scaling_header = f"1→{threads} threads"
    for op in dict.fromkeys(row["op"] for row in rows):
        out += ["", f"### {op} (traffic {TRAFFIC[op]}x the array)", ""]
        body = []
        for row in (r for r in rows if r["op"] == op):
            d = derived(row)
            body.append([
                row["case"], row["dtype"], megabytes(row["nbytes"]), seconds(row["numbanorm"]), seconds(row["torch"]),
                f"{d['speedup']:.2f}x", f"{d['bandwidth'] / 1e9:.1f}", f"{d['roofline'] / 1e9:.1f} ({d['copy_by']})",
                f"{d['fraction']:.2f}", "—" if d["scaling"] is None else f"{d['scaling']:.2f}x",
            ])
        out += table(
            ["shape", "dtype", "MB", "numbanorm", "torch", "speedup", "GB/s", "copy GB/s", "of copy", scaling_header], body
        )

    out += ["", "### Summary", ""]
    body = []
    for op in dict.fromkeys(row["op"] for row in rows):
        mine = [(row, derived(row)) for row in rows if row["op"] == op]
        large = [d["fraction"] for row, d in mine if row["nbytes"] >= LARGE_BYTES]
        scaling = [d["scaling"] for _, d in mine if d["scaling"] is not None]
        body.append([
            op, f"{geometric_mean(d['speedup'] for _, d in mine):.2f}x", f"{min(d['speedup'] for _, d in mine):.2f}x",
            sum(d["speedup"] < 1 for _, d in mine), f"{min(large):.2f}" if large else "—",
            f"{geometric_mean(scaling):.2f}x" if scaling else "—",
        ])
    out += table(
        ["operation", "geomean speedup", "min speedup", "slower than torch", "min of copy (≥ 8 MB)", f"geomean {scaling_header}"],
        body,
    )

    misses = []
    for op in TRAINING_OPS:
        mine = [(row, derived(row)) for row in rows if row["op"] == op]
        if not mine:
            continue
        mean = geometric_mean(d["speedup"] for _, d in mine)
        if mean < 1.5:
            misses.append(f"{op}: geometric-mean speedup {mean:.2f}x < 1.5x")
        misses += [f"{op} {row['case']} {row['dtype']}: {d['speedup']:.2f}x slower than torch" for row, d in mine if d["speedup"] < 1]
        misses += [
            f"{op} {row['case']} {row['dtype']}: {d['fraction']:.2f} of copy < 0.8"
            for row, d in mine if row["nbytes"] >= LARGE_BYTES and d["fraction"] < 0.8
        ]
    for row in (r for r in rows if r["op"] == "forward_infer"):
        d = derived(row)
        if d["speedup"] < 1:
            misses.append(f"forward_infer {row['case']} {row['dtype']}: {d['speedup']:.2f}x slower than torch")
        if row["nbytes"] >= LARGE_BYTES and d["fraction"] < 1 / 1.1:
            misses.append(f"forward_infer {row['case']} {row['dtype']}: {1 / d['fraction']:.2f}x the copy's time > 1.1x")
    if cold:
        warm = cold[WARM][2]
        if warm >= 1:
            misses.append(f"cold start: import + first call with a warm cache {warm:.2f} s ≥ 1 s")
    out += ["", "### Targets missed", ""]
    out += [f"- {miss}" for miss in misses] or ["- none"]

    if cold:
        out += ["", "### Cold start (new process: `import numbanorm`, then a float32 training forward and backward)", ""]
        out += table(
            ["disk cache", "import", "first calls", "total", "runs"],
            [[label, seconds(i), seconds(f), seconds(t), n] for label, (i, f, t, n) in cold.items()],
        )
        if WARM_SCIPY in cold:
            out += ["", f"\"{WARM_SCIPY}\": Numba imports scipy.linalg at a process's first compilation or cache "
                    "load (its BLAS check) when SciPy is installed; this row leaves that import out, as in a "
                    "program that uses SciPy already."]
    return out


# --- command line ----------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 shorter repeats and a shorter cold start")
    parser.add_argument("--shapes", nargs="+", default=list(CASES), choices=list(CASES), metavar="SHAPE",
                        help=f"from {', '.join(CASES)} (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS), choices=OPS,
                        help=f"default: {' '.join(DEFAULT_OPS)}")
    parser.add_argument("--threads", type=int, default=numba.get_num_threads(),
                        help="threads for numbanorm and PyTorch (default: Numba's, %(default)s)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per row (default 15, 5 with --quick)")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active", "unset"), default="unset",
                        help="OMP_WAIT_POLICY for PyTorch's OpenMP threads, whatever the environment says: "
                        "unset (default: PyTorch as its users run it), passive (slower on small arrays; "
                        "see _cases.import_torch) or active")
    parser.add_argument("--no-cold-start", dest="cold_start", action="store_false", help="skip the cold-start processes")
    args = parser.parse_args(argv)
    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}], got {args.threads}")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    args.sample_seconds = 0.002 if args.quick else 0.01
    return args


def main(argv=None):
    args = parse(argv)
    os.environ.pop("OMP_WAIT_POLICY", None)
    try:
        torch = import_torch(None if args.omp_wait_policy == "unset" else args.omp_wait_policy.upper())
    except NotImplementedError as error:
        raise SystemExit(f"report.py compares against PyTorch: {error}") from None
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    def progress(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    rows = measure(args, torch, progress)
    cold = cold_start(3 if args.quick else 5, 1 if args.quick else 2, progress) if args.cold_start else None
    lines = machine(args.threads, torch)
    lines.append(
        f"- Load average (1 min) before and after: {load_before:.2f}, {os.getloadavg()[0]:.2f} "
        "(anything above 0 is other work sharing the cores)"
    )
    command = " ".join(["python benchmarks/report.py", *(sys.argv[1:] if argv is None else argv)])
    lines.append(f"- Medians of {args.repeats} interleaved repeats; `{command}`")
    print("\n".join(lines + render(rows, args.threads, cold)))
    progress("done")


if __name__ == "__main__":
    if not __package__:
        # Run as a script: run the module the tests and asv import (benchmarks.report)
        # instead of this copy of it named __main__. Numba's disk cache of parallel_copy
        # records the name of the module that defined it, and an entry written under one
        # name fails to load under the other (ModuleNotFoundError: No module named
        # 'benchmarks' after the tests had run).
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from benchmarks.report import main
    main()
