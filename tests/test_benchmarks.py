"""The benchmarks run, and every library in them computes the same thing.

The asv suite and ``benchmarks/report.py`` both time the calls that
``benchmarks/_cases.py`` prepares. A case that breaks, or a library that times
something other than numbanorm does, would otherwise show only when someone
runs the benchmarks, as a failure or as a speedup that means nothing.
"""

import importlib.util
import mmap
import pathlib
import subprocess
import sys
import time
import types

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a package at the root, not installed

from benchmarks import _cases, bench_ops  # noqa: E402
from benchmarks.report import TOLERANCE, Contender, contenders_for, interleaved, parallel_copy, relative_error  # noqa: E402

# Small, and each layout the kernels see: (N, C) and channels-last.
CASES = [("32x64", "float32"), ("32x64", "float64"), ("64x28x28x64,axis=-1", "float32")]


@pytest.mark.parametrize("library", [lib for lib in _cases.LIBRARIES if lib != "numbanorm"])
@pytest.mark.parametrize("op", _cases.OPS)
@pytest.mark.parametrize("case, dtype", CASES)
def test_every_library_times_the_same_computation(case, dtype, op, library):
    if library == "torch":
        pytest.importorskip("torch", reason="PyTorch is an optional benchmark peer")
    # Fresh data for each library: the training forward updates the running statistics.
    ours = _cases.prepare(op, "numbanorm", _cases.Data(case, dtype)).result()
    theirs = _cases.prepare(op, library, _cases.Data(case, dtype)).result()
    assert len(theirs) == len(ours)
    assert relative_error(theirs, ours) <= TOLERANCE[dtype]


def test_every_asv_benchmark_runs_on_one_case():
    operations = [c for c in vars(bench_ops).values() if isinstance(c, type) and issubclass(c, bench_ops._Operation) and c.op]
    assert sorted(c.op for c in operations) == sorted(_cases.OPS)
    for cls in operations:
        shapes, dtypes, libraries = cls.params
        assert set(shapes) == set(_cases.CASES) and set(dtypes) == set(_cases.DTYPES) and "torch" in libraries
        bench = cls()
        bench.setup("32x64", "float32", "numbanorm")
        methods = [name for name in dir(bench) if name.startswith(("time_", "peakmem_", "track_"))]
        assert len(methods) == 3, (cls.__name__, methods)
        for name in methods:
            getattr(bench, name)("32x64", "float32", "numbanorm")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_the_peak_increase_counts_what_a_call_allocates():
    # 64 MB of fresh pages (an anonymous map: not memory the allocator holds from earlier tests).
    def touch_64_mb():
        with mmap.mmap(-1, 64 * 2**20) as pages:
            np.frombuffer(pages, dtype=np.uint8)[:] = 1

    assert 60 < _cases.peak_increase_mb(touch_64_mb) < 80
    assert _cases.peak_increase_mb(lambda: None) < 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_the_peak_increase_counts_a_result_in_memory_an_earlier_one_freed():
    # A 16 MB result freed and allocated again, as a benchmark's repeats do: glibc keeps the
    # first one's pages resident for the next, which without a trim would read as 0 MB.
    def new_16_mb():
        np.ones(16 * 2**20, dtype=np.uint8)

    for _ in range(3):
        new_16_mb()
    assert 14 < _cases.peak_increase_mb(new_16_mb) < 24


@pytest.mark.parametrize("op", _cases.OUTPUT_OPS)
@pytest.mark.parametrize("case, dtype", CASES)
def test_every_output_times_the_same_computation_without_drifting(case, dtype, op):
    # A new array and a reused out= get the same result. In place, each call starts from
    # the last one's result, which must settle (_cases.prepare_output): the training
    # forward's and the backward's on the new array's result but for eps's share, and
    # every one on normal numbers that the next call gives back.
    expected = _cases.prepare_output(op, "new", _cases.Data(case, dtype)).result()[0]
    np.testing.assert_array_equal(_cases.prepare_output(op, "out", _cases.Data(case, dtype)).result()[0], expected)
    in_place = _cases.prepare_output(op, "in place", _cases.Data(case, dtype))
    for _ in range(300):
        in_place.run()
    settled = in_place.result()[0].copy()
    assert np.all(np.isfinite(settled)) and not np.any((settled != 0) & (np.abs(settled) < np.finfo(dtype).tiny))
    assert relative_error(in_place.result(), (settled,)) <= 10 * np.finfo(dtype).eps
    if op != "forward_infer":
        assert relative_error((settled,), (expected,)) <= 10 * _cases.EPS


def test_every_output_benchmark_runs_on_one_case():
    bench = bench_ops.TimeOutput()
    assert set(bench.params[2]) == set(_cases.OUTPUT_OPS) and set(bench.params[3]) == set(_cases.OUTPUTS)
    for op in _cases.OUTPUT_OPS:
        for output in _cases.OUTPUTS:
            bench.setup("32x64", "float32", op, output)
            bench.time_output("32x64", "float32", op, output)


@pytest.mark.skipif(importlib.util.find_spec("asv") is None, reason="asv comes with the extra 'bench'")
def test_asv_finds_the_suite():
    result = subprocess.run(
        [sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("size", [0, 1, 7, 4099])
@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_the_roofline_copy_copies_every_element_and_nothing_more(size, chunks):
    src = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    dst = np.full(size + 2, np.nan, dtype=np.float32)
    parallel_copy(src, dst[1:-1], chunks)
    np.testing.assert_array_equal(dst[1:-1], src)
    assert np.isnan(dst[0]) and np.isnan(dst[-1])


def test_the_report_runs_as_a_script_after_the_tests_cached_its_copy():
    # This process has compiled parallel_copy as benchmarks.report and cached it on
    # disk; the script must load that entry (it once failed: "No module named
    # 'benchmarks'", because the script ran the module as __main__).
    pytest.importorskip("torch", reason="report.py compares against PyTorch, an optional benchmark peer")
    parallel_copy(np.zeros(3, np.float32), np.empty(3, np.float32), 1)  # the script's signature
    result = subprocess.run(
        [sys.executable, "benchmarks/report.py", "--quick", "--no-cold-start", "--shapes", "32x64",
         "--dtypes", "float32", "--ops", "stats"],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| stats |" in result.stdout


@pytest.mark.parametrize("threads", [1, 2])
def test_only_one_thread_runs_after_pytorch_and_each_library_after_its_own_one_thread_run(threads):
    # PyTorch's OpenMP threads spin for milliseconds after its calls. The parallel copy
    # that followed it in every round measured 1.4-2.0x slower, and so did the roofline.
    # In every round and across rounds, what comes right after PyTorch runs on one thread,
    # and each library's timed run comes right after its own one-thread run.
    order = []
    torch = types.SimpleNamespace(get_num_threads=lambda: threads, set_num_threads=lambda n: None)
    contenders = contenders_for(lambda: None, lambda: None, np.zeros(4, np.float32), threads, torch)
    for contender in contenders:
        contender.calibrate = lambda sample_seconds: None
        contender.sample = lambda name=contender.name: order.append(name) or 0.0
    interleaved(contenders, repeats=3 * len(contenders), sample_seconds=0.01)
    assert len(order) == 3 * len(contenders) ** 2
    threads_of = {contender.name: contender.threads for contender in contenders}
    after = lambda name: {b for a, b in zip(order, order[1:]) if a == name}  # noqa: E731
    assert {threads_of[name] for name in after("torch")} == {1}
    if threads > 1:
        assert after("numbanorm_1") == {"numbanorm"} and after("torch_1") == {"torch"}
    assert all((contender.library is torch) == contender.name.startswith("torch") for contender in contenders)


def test_one_slow_call_does_not_make_a_contender_time_single_calls():
    # The report times samples of `number` calls. A first call far slower than the
    # rest (as the float32 batch-of-one backward's was, when glibc trimmed the heap
    # in it) must not set `number` to 1: every sample would then time one cold call.
    # The later calls sleep 0.5 ms: `number` is 20 at most, and at least 3 unless
    # the machine stretches every one of them past 3.3 ms.
    calls = []

    def function():
        calls.append(None)
        time.sleep(0.1 if len(calls) == 1 else 0.0005)

    contender = Contender("slow first call", function, threads=1)
    contender.calibrate(sample_seconds=0.01)
    assert 3 <= contender.number <= 20


def test_the_cold_start_script_times_numbanorm_and_imports_a_preload_first():
    from benchmarks import report

    script = _cases.first_call_script(True, "json")
    assert script.index("import json") < script.index("start = time.perf_counter()")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    seconds = [float(v) for v in done.stdout.split()]
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    # The 1-second target applies to the plain warm row, whatever the others say.
    cold = {report.WARM: (0.5, 0.6, 1.1, 5), report.WARM_SCIPY: (0.3, 0.3, 0.6, 5)}
    text = "\n".join(report.render([], 2, cold))
    assert "cold start: import + first call with a warm cache 1.10 s ≥ 1 s" in text
    assert "scipy.linalg" in text


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_the_plain_passes_do_the_work_they_stand_for_on_every_value(dtype, chunks):
    # benchmarks/passes.py times each kernel beside a "plain" pass over the same arrays:
    # a plain pass that skipped values would make the kernels look slow.
    from benchmarks import passes

    rng = np.random.default_rng(chunks)
    x = passes.page_array((37, 5), dtype)
    assert x.ctypes.data % 4096 == passes.PAGE_OFFSET and x.shape == (37, 5, 1)
    x[...] = rng.uniform(1.0, 2.0, size=x.shape)
    dy = rng.uniform(1.0, 2.0, size=x.shape).astype(dtype)
    c = dtype(0.5)
    out = np.full(x.shape, np.nan, dtype)
    passes.plain_normalize(x, c, chunks, out)
    np.testing.assert_allclose(out, (x - c) * c + c, rtol=1e-6)
    out[...] = np.nan
    passes.plain_grad_input(dy, x, c, chunks, out)
    np.testing.assert_allclose(out, (dy - c) * c - ((x - c) * c) * c - c, rtol=1e-6, atol=1e-6)
    assert passes.plain_read(x, np.empty((0, 0, 1), dtype), chunks) == pytest.approx(x.sum(dtype=np.float64), rel=1e-5)
    both = x.sum(dtype=np.float64) + dy.sum(dtype=np.float64)
    assert passes.plain_read(x, dy, chunks) == pytest.approx(both, rel=1e-5)


def test_the_passes_script_prints_a_row_for_each_shape_and_dtype():
    result = subprocess.run(
        [sys.executable, "benchmarks/passes.py", "--shapes", "64x32", "8x1000", "--repeats", "1", "--number", "1"],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| 64x32 |", "| 8x1000 |"))]
    assert len(rows) == 4 and all(line.count("|") == 11 for line in rows), result.stdout
