"""numbanorm inside other programs: threads, forked children, memory, lazy compilation."""

import ast
import inspect
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time

import numba
import numpy as np
import pytest

import numbanorm
import reference

# Large enough for the kernels' parallel path (NUMBANORM_PARALLEL_MIN_BYTES).
SHAPE = (20000, 16)


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter; return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def line_of(code, marker):
    """The line of ``code``, as ``run_python`` runs it, that holds ``marker``."""
    return next(number for number, line in enumerate(textwrap.dedent(code).splitlines(), 1) if marker in line)


def forward_backward(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(seed, 2.0, size=SHAPE).astype(np.float32)
    y, mean, invstd = numbanorm.batch_norm_forward(x)
    dx, _, _ = numbanorm.batch_norm_backward(y, x, mean, invstd)
    return x, y, dx


def test_the_threading_layer_is_tbb():
    forward_backward(0)
    assert numba.threading_layer() == "tbb"


def test_concurrent_calls_from_threads_give_the_serial_results():
    expected = {seed: forward_backward(seed) for seed in range(4)}
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = [forward_backward(seed) for _ in range(5)]
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for seed, (x, y, dx) in expected.items():
        for _, y_thread, dx_thread in results[seed]:
            np.testing.assert_array_equal(y_thread, y)
            np.testing.assert_array_equal(dx_thread, dx)


def _child_forward(seed):
    _, y, dx = forward_backward(seed)
    return y, dx


def test_forked_children_can_run_kernels_after_the_parent_did():
    forward_backward(0)  # the parent's thread pool is up before the fork
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_child_forward, range(3))
    for seed, (y, dx) in enumerate(results):
        _, expected_y, expected_dx = forward_backward(seed)
        np.testing.assert_array_equal(y, expected_y)
        np.testing.assert_array_equal(dx, expected_dx)


def test_set_num_threads_is_honoured():
    x = np.random.default_rng(1).normal(size=SHAPE)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        assert numbanorm.api._chunks(x.nbytes) == 1
        y_one, *_ = numbanorm.batch_norm_forward(x)
        numba.set_num_threads(before)
        y_all, *_ = numbanorm.batch_norm_forward(x)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_allclose(y_one, y_all, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y_one, reference.forward(x)[0], rtol=1e-10, atol=1e-10)


def test_set_num_threads_holds_for_the_thread_that_calls_it():
    # As for any Numba code: ``_chunks`` reads the thread count without Numba's public
    # function, and must still read the calling thread's.
    nbytes = numbanorm.api.PARALLEL_MIN_BYTES
    main_threads = numbanorm.api._chunks(nbytes)
    seen = {}

    def worker():
        numba.set_num_threads(1)
        seen["worker"] = numbanorm.api._chunks(nbytes)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["worker"] == 1
    assert numbanorm.api._chunks(nbytes) == main_threads == numba.get_num_threads()


def test_a_threading_layer_other_than_tbb_is_reported_at_the_first_parallel_call():
    # Before the first kernel runs (a workqueue pool's first concurrent calls abort the
    # process), and at the caller's line, not at one inside numbanorm.
    out = run_python(
        """
        import warnings
        import numpy as np, numbanorm
        x = np.ones((40000, 4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            numbanorm.BatchNorm(4, dtype=np.float64).forward(x)
            first = len(caught)
            numbanorm.batch_norm_forward(x)
        print(first, len(caught), caught[0].category.__name__, caught[0].filename)
        print(caught[0].message)
        """,
        NUMBA_THREADING_LAYER="workqueue",
    )
    counts, message = out.splitlines()
    assert counts.split() == ["1", "1", "RuntimeWarning", "<string>"]
    assert "'workqueue'" in message and "NUMBA_THREADING_LAYER=workqueue" in message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tbb wheel's library is preloaded on Linux only")
@pytest.mark.parametrize("found", [True, False])
def test_the_tbb_library_is_found_where_its_package_put_it(found, tmp_path):
    # A --user or --prefix install puts libtbb.so.12 outside sys.prefix: the package's
    # file list says where. Without the library the warning says that it is missing.
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_THREADING_LAYER"}
    code = f"""
        import importlib.metadata, os, sys, warnings
        real = [f.locate() for f in importlib.metadata.files("tbb") if f.name.startswith("libtbb.so.12")][0]
        link = os.path.join({str(tmp_path)!r}, "libtbb.so.12")
        os.symlink(real, link)

        class Entry:
            name = "libtbb.so.12"
            def locate(self):
                return link

        importlib.metadata.files = lambda name: [Entry()] if {found} else []
        sys.prefix = sys.base_prefix = "/nonexistent"  # not where the environment's lib/ is
        import numba, numpy as np, numbanorm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            numbanorm.batch_norm_forward(np.ones((40000, 4)))
        print(numba.threading_layer(), [str(w.message) for w in caught])
        """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    layer, warned = result.stdout.split(" ", 1)
    if found:
        assert (layer, warned.strip()) == ("tbb", "[]")
    else:
        assert layer != "tbb" and "tbb package's library was not found" in warned and "pip install tbb" in warned


def test_a_bad_environment_switch_is_named():
    result = subprocess.run(
        [sys.executable, "-c", "import numbanorm"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "NUMBANORM_PARALLEL_MIN_BYTES": "lots"},
    )
    assert result.returncode != 0 and "NUMBANORM_PARALLEL_MIN_BYTES" in result.stderr


def test_the_old_threshold_switch_is_not_ignored_in_silence():
    result = subprocess.run(
        [sys.executable, "-W", "always::FutureWarning", "-c", "import numbanorm"], capture_output=True, text=True,
        timeout=120, env={**os.environ, "NUMBANORM_PARALLEL_MIN_SIZE": "1000"},
    )
    assert result.returncode == 0
    assert "NUMBANORM_PARALLEL_MIN_SIZE" in result.stderr and "NUMBANORM_PARALLEL_MIN_BYTES" in result.stderr
    assert result.stderr.startswith("<string>:1: FutureWarning"), result.stderr  # the caller's import line


def test_the_l1_data_cache_size_is_read_from_sysfs(tmp_path):
    # The row groups' threshold (_kernels._row_groups) scales with one core's L1 data cache, as
    # Linux lists it: the level-1 Data (or Unified) entry, whichever index it has; 32 KiB where
    # there is none, or none that reads as a size.
    from numbanorm._config import _l1d_bytes

    def cache(index, level, kind, size):
        directory = tmp_path / "cpu0" / "cache" / f"index{index}"
        directory.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (directory / name).write_text(f"{value}\n")

    assert _l1d_bytes(str(tmp_path / "cpu0")) == 32768
    cache(0, 1, "Instruction", "64K")
    cache(2, 2, "Unified", "1024K")
    assert _l1d_bytes(str(tmp_path / "cpu0")) == 32768
    cache(1, 1, "Data", "48K")
    assert _l1d_bytes(str(tmp_path / "cpu0")) == 48 * 1024
    assert _l1d_bytes(str(tmp_path / "cpu0"), default=1) == 48 * 1024
    (tmp_path / "cpu0" / "cache" / "index1" / "size").write_text("lots\n")
    assert _l1d_bytes(str(tmp_path / "cpu0"), default=12345) == 12345


def test_the_kernels_run_under_numba_disable_jit_and_the_callers_functions_stay_python():
    # NUMBA_DISABLE_JIT=1 debugs one's own functions in Python; numbanorm's kernels compile anyway:
    # off the disk cache, so that they do compile here, with the switch set from the environment
    # (and a NUMBA_ variable changed after import, which makes Numba read the environment again
    # when it compiles) or in numba.config after import.
    code = """
        import json, os, sys, numba, numpy as np
        import numbanorm
        if sys.argv[1] == "config":
            numba.config.DISABLE_JIT = 1  # which Numba's reload would undo, were the environment to change
        else:
            os.environ["NUMBA_OPT"] = "3"  # the default, changed from unset
        rng = np.random.default_rng(3)
        results = []
        for shape in ((64, 5), (8, 3, 4, 5)):
            x = rng.normal(1e3, 2.0, size=shape).astype(np.float32)
            # The statistics first: their first compilation needs a compiled NumPy function.
            var = numbanorm.batch_norm_stats(x)[1]
            y, mean, invstd = numbanorm.batch_norm_forward(x)
            dx, dgamma, _ = numbanorm.batch_norm_backward(y * y, x, mean, invstd)
            results.append([var.tolist(), y.tolist(), dx.tolist(), dgamma.tolist()])

        @numba.njit
        def mine(a):
            return a

        print(json.dumps({"results": results, "mine": type(mine).__name__}))
    """

    def run(how, **env):
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), how], capture_output=True, text=True, timeout=600,
            env={**os.environ, "NUMBA_DISABLE_JIT": "0", **env},
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    jitted = run("environment")
    for how, env in (("environment", {"NUMBA_DISABLE_JIT": "1"}), ("config", {})):
        disabled = run(how, NUMBANORM_CACHE="0", **env)
        assert disabled["results"] == jitted["results"], how
        assert (disabled["mine"], jitted["mine"]) == ("function", "CPUDispatcher"), how


def test_fastmath_off_compiles_without_fast_math_flags_and_off_the_disk_cache():
    # Every kernel of the (N, C) element-wise pass, the explicit vectors included: the
    # optimized module of ``normalize`` (which links its callees) has no fast-math flag.
    out = run_python(
        """
        import numpy as np
        from numbanorm import _config, _kernels
        x3 = np.random.default_rng(0).normal(size=(16, 5, 1)).astype(np.float32)
        hi, scale, shift = np.float32(0.5), np.float32(3.0), np.float32(-2.0)
        params = np.empty((3, 5 + _kernels.PARAMS_PAD), np.float32)
        params[_kernels.MEAN_HI], params[_kernels.SCALE], params[_kernels.SHIFT] = hi, scale, shift
        y3 = np.empty_like(x3)
        _kernels.normalize(x3, params, 1, False, y3)
        ir = "".join(_kernels.normalize.inspect_llvm().values())
        print(_config.CACHE, "fmul" in ir, any(flag in ir for flag in ("contract", "reassoc", "fast ")))
        # Rounded after each operation, as NumPy rounds them (a fused multiply-add would not be).
        np.testing.assert_array_equal(y3, (x3 - hi) * scale + shift)
        """,
        NUMBANORM_FASTMATH="0",
    )
    assert out.split() == ["False", "True", "False"]


def test_a_cache_that_cannot_be_written_is_one_warning_and_the_results_are_right(tmp_path):
    # A full disk, as CI once had: Numba's cache cannot write its files. The kernels
    # compiled, so the call returns its result, and the user hears of it once.
    code = """
        import errno, os, warnings
        import numpy as np
        from numba.core import caching

        def full(self, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        caching.IndexDataCacheFile._open_for_write = full
        import numbanorm
        x = np.arange(24.0).reshape(6, 4) ** 1.5
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, mean, invstd = numbanorm.batch_norm_forward(x)  # the call: compiles several kernels
        for w in caught:
            print(w.category.__name__, w.filename, w.lineno, str(w.message).replace(chr(10), " "))
        expected = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
        print("max error", np.abs(y - expected).max())
        entries = [f for _, _, files in os.walk(os.environ["NUMBA_CACHE_DIR"]) for f in files if f.endswith((".nbi", ".nbc"))]
        print("files", sorted(entries))  # (the empty numbanorm.lock is no entry)
    """
    out = run_python(code, NUMBA_CACHE_DIR=str(tmp_path))
    lines = out.splitlines()
    warned = [line for line in lines if line.startswith("RuntimeWarning")]
    assert len(warned) == 1, out
    assert warned[0].startswith(f"RuntimeWarning <string> {line_of(code, '# the call')} numbanorm's compiled kernels are not cached"), out
    assert f"writing to {tmp_path}" in warned[0] and "failed: No space left on device)" in warned[0]
    assert float(lines[-2].split()[-1]) < 1e-12
    assert lines[-1] == "files []"


def test_no_writable_cache_directory_is_one_warning_at_import_and_the_kernels_run_uncached():
    # A read-only install with a read-only home: Numba finds nowhere to cache, which
    # its ``cache=True`` makes an error at import.
    code = """
        import warnings
        import numpy as np
        from numba.core import caching

        def read_only(self):
            raise PermissionError(13, "Permission denied", self.get_cache_path())

        caching._CacheLocator.ensure_cache_path = read_only
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import numbanorm  # warns here
        for w in caught:
            print(w.category.__name__, w.filename, w.lineno, str(w.message).replace(chr(10), " "))
        from numbanorm import _kernels
        print(type(_kernels.chan_merge._cache).__name__)
        y, _, _ = numbanorm.batch_norm_forward(np.array([[1.0], [3.0]]))
        print(y.ravel().round(4).tolist())
    """
    out = run_python(code)
    lines = out.splitlines()
    warned = [line for line in lines if line.startswith("RuntimeWarning")]
    assert len(warned) == 1, out
    assert warned[0].startswith(f"RuntimeWarning <string> {line_of(code, '# warns here')} numbanorm's compiled kernels are not cached"), out
    assert "no writable cache directory" in warned[0]
    assert lines[-2:] == ["NullCache", "[-1.0, 1.0]"]


# A process that compiles one signature of ``_kernels._bounds`` into the cache, its save held
# until a common start time, then slowed between reading the index, writing it, and writing
# the code: the order in which two processes without a lock would corrupt the cache.
RACING_WRITER = """
    import os, sys, time
    from numba.core import caching

    start, index_delay, data_delay, kind = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    files = caching.IndexDataCacheFile
    save, save_index, save_data = files.save, files._save_index, files._save_data

    def held_save(self, key, data):
        time.sleep(max(0.0, start - time.time()))
        save(self, key, data)

    def slow_save_index(self, overloads):
        time.sleep(index_delay)
        save_index(self, overloads)

    def slow_save_data(self, name, data):
        time.sleep(data_delay)
        save_data(self, name, data)

    files.save, files._save_index, files._save_data = held_save, slow_save_index, slow_save_data
    from numbanorm import _kernels
    print(_kernels._bounds(10, 3, 1) if kind == "int" else _kernels._bounds(10.0, 3.0, 1.0))
"""


def test_processes_compiling_into_one_cache_at_once_leave_it_consistent(tmp_path):
    # Without a lock: both read an empty index and take data file 1; the index last written
    # (float's) then names the code last written (int's), which a later process runs for
    # floats. numbanorm's writes take turns (``_config._locked``).
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(RACING_WRITER))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    start = time.time() + 15  # both have compiled by then
    writers = [
        subprocess.Popen([sys.executable, str(script), str(start), *delays], env=env, stdout=subprocess.PIPE, text=True)
        for delays in (("0.2", "1.0", "int"), ("0.6", "0.0", "float"))
    ]
    assert [writer.communicate(timeout=120)[0].split() for writer in writers] == [["(3,", "6)"], ["(3.0,", "6.0)"]]
    out = run_python(
        """
        from numbanorm import _kernels
        print(_kernels._bounds(10, 3, 1), _kernels._bounds(10.0, 3.0, 1.0), sum(_kernels._bounds.stats.cache_hits.values()))
        """,
        NUMBA_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert out.split() == ["(3,", "6)", "(3.0,", "6.0)", "2"]  # both loaded from the cache, each its own code


def test_a_process_that_loads_from_the_cache_waits_for_a_writer(tmp_path):
    # Numba writes an entry's index before its code: a process that loads in between finds
    # the entry named, and runs whatever code file has that name (an earlier source's, left
    # in the directory). Loads take the lock shared (``_config._locked``), and wait here
    # while another process holds it exclusively, as a writer does.
    fcntl = pytest.importorskip("fcntl")  # the lock is POSIX-only
    cache = tmp_path / "cache"
    call = "from numbanorm import _kernels; print(_kernels._bounds(10, 3, 1))"
    assert run_python(call, NUMBA_CACHE_DIR=str(cache)).split() == ["(3,", "6)"]
    [lock_path] = [os.path.join(root, "numbanorm.lock") for root, _, files in os.walk(cache) if "numbanorm.lock" in files]
    code = """
        from numbanorm import _kernels
        print("imported", flush=True)
        print(_kernels._bounds(10, 3, 1), sum(_kernels._bounds.stats.cache_hits.values()), flush=True)
    """
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reader = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env={**os.environ, "NUMBA_CACHE_DIR": str(cache)}, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert reader.stdout.readline().strip() == "imported"
            time.sleep(1.0)
            assert reader.poll() is None  # waiting for the lock
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert reader.communicate(timeout=120)[0].split() == ["(3,", "6)", "1"]  # then loaded from the cache


def test_a_kernel_compiled_against_a_cached_parallel_kernel_runs_from_the_cache(tmp_path):
    # Train in one process, then evaluate twice. The second process compiles ``inference``
    # against the ``normalize`` that the first one cached: Numba then saves ``inference``
    # without the step that starts its thread pool on load (it passes that step on only
    # from callees compiled in the same process). The third process loads ``inference``,
    # and on arrays too small for ``api._chunks`` to start the pool, crashed (SIGSEGV).
    # numbanorm's cache starts the pool before it loads anything (``_config._cache_class``).
    cache = str(tmp_path / "cache")
    shape = "(8, 3)"
    train = f"""
        import numpy as np, numbanorm
        x = np.random.default_rng(0).normal(size={shape}).astype(np.float32)
        numbanorm.batch_norm_forward(x)
    """
    evaluate = f"""
        import numpy as np, numbanorm
        from numbanorm import _kernels
        x = np.random.default_rng(0).normal(size={shape}).astype(np.float32)
        running_mean, running_var = np.array([0.5, -1.0, 2.0]), np.array([4.0, 0.25, 1.0])
        y, _, _ = numbanorm.batch_norm_forward(x, training=False, running_mean=running_mean, running_var=running_var)
        expected = (x - running_mean) / np.sqrt(running_var + 1e-5)
        print(np.abs(y - expected).max() < 1e-6, sum(_kernels.inference.stats.cache_hits.values()))
    """
    run_python(train, NUMBA_CACHE_DIR=cache)
    assert run_python(evaluate, NUMBA_CACHE_DIR=cache).split() == ["True", "0"]  # compiled
    assert run_python(evaluate, NUMBA_CACHE_DIR=cache).split() == ["True", "1"]  # loaded


def test_every_kernel_releases_the_gil():
    # What lets threads (a thread pool, a data loader) run numbanorm side by side.
    kernels = {name: f for name, f in vars(numbanorm._kernels).items() if isinstance(f, numba.core.dispatcher.Dispatcher)}
    assert len(kernels) > 20
    assert [name for name, f in kernels.items() if not f.targetoptions.get("nogil")] == []


def test_import_compiles_nothing():
    out = run_python(
        """
        import numba.core.dispatcher as dispatcher
        import numbanorm
        from numbanorm import _kernels
        compiled = [name for name, f in vars(_kernels).items()
                    if isinstance(f, dispatcher.Dispatcher) and f.signatures]
        print(compiled)
        """
    )
    assert out.strip() == "[]"


def test_kernels_call_each_other_without_literal_arguments():
    # A literal argument in a call from one jitted function to another (``0`` where
    # ``_kernels.ZERO`` belongs) makes Numba compile the callee, and all it calls, once
    # more for the literal's type: 12 of the cold compile's 30 seconds, when it
    # happened. The source is read because a warm on-disk cache would hide the compilation.
    from numbanorm import _kernels

    jitted = {name for name, f in vars(_kernels).items() if isinstance(f, numba.core.dispatcher.Dispatcher)}
    literal_calls = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(ast.parse(inspect.getsource(_kernels)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in jitted
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, (bool, int, str))
    ]
    assert len(jitted) > 10
    assert literal_calls == []


def test_outputs_into_out_or_in_place_allocate_no_array():
    # tracemalloc sees NumPy's allocations (the kernels' own are a few per-feature rows).
    import tracemalloc

    rng = np.random.default_rng(3)
    x = rng.normal(size=(4096, 64)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    out = np.empty_like(x)
    _, mean, invstd = numbanorm.batch_norm_forward(x)
    running = np.zeros(64), np.ones(64)
    calls = {
        "forward into out": lambda: numbanorm.batch_norm_forward(x, out=out),
        "forward in place": lambda: numbanorm.batch_norm_forward(out, out=out),
        "inference into out": lambda: numbanorm.batch_norm_forward(
            x, training=False, running_mean=running[0], running_var=running[1], out=out
        ),
        "backward into out": lambda: numbanorm.batch_norm_backward(dy, x, mean, invstd, out=out),
        "backward in place": lambda: numbanorm.batch_norm_backward(out, x, mean, invstd, out=out),
    }
    peaks = {}
    for name, call in calls.items():
        call()  # compiled, and any lazily built state built
        tracemalloc.start()
        try:
            call()
            peaks[name] = tracemalloc.get_traced_memory()[1] / x.nbytes
        finally:
            tracemalloc.stop()
    assert max(peaks.values()) < 0.1, peaks


def test_forward_then_backward_allocates_no_full_size_temporaries():
    # 256 MB of float32; peak resident memory is read from /proc after resetting it.
    out = run_python(
        """
        import numpy as np, numbanorm

        def rss(field):
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(field):
                        return int(line.split()[1]) * 1024

        small = np.ones((64, 1024), np.float32)
        numbanorm.batch_norm_backward(small, small, *numbanorm.batch_norm_forward(small)[1:])  # compile
        x = np.random.default_rng(0).standard_normal((65536, 1024), dtype=np.float32)
        dy = np.ones_like(x)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak (VmHWM) to the current resident size
        baseline = rss("VmRSS:")
        y, mean, invstd = numbanorm.batch_norm_forward(x)
        del y
        dx, dgamma, dbeta = numbanorm.batch_norm_backward(dy, x, mean, invstd)
        print((rss("VmHWM:") - baseline) / x.nbytes)
        """
    )
    growth = float(out)
    assert growth <= 1.25, f"peak memory grew by {growth:.2f}x the array"


@pytest.mark.parametrize("module, missing, extra", [("numbanorm.dask", "dask.array", "dask"), ("numbanorm.mpi", "mpi4py", "mpi")])
def test_an_extras_module_without_its_dependency_says_which_extra_to_install(module, missing, extra):
    code = f"import sys; sys.modules[{missing!r}] = None; import {module}"  # as if it were not installed
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr and f"pip install 'numbanorm[{extra}]'" in result.stderr, result.stderr
