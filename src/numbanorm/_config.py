"""Switches read once from the environment, and the threading-layer set-up.

``NUMBANORM_CACHE``
    ``1`` (default) caches compiled kernels on disk (Numba's ``cache=True``);
    ``0`` compiles afresh in every process.
``NUMBANORM_FASTMATH``
    ``1`` (default) lets LLVM reassociate floating-point sums so that the
    reductions vectorize, and fuse multiply-adds. Nothing else: NaN and inf
    keep their IEEE meaning, so a NaN in one feature stays in that feature.
    ``0`` turns it off (and the on-disk cache with it, which holds the default
    build).
``NUMBANORM_PARALLEL_MIN_BYTES``
    Arrays smaller than this many bytes (default 1048576, 1 MiB) run on one
    thread: waking the thread pool costs more than it saves on them. On the
    2-core machines the benchmarks ran on, a TBB parallel region whose work
    takes microseconds cost about 8 us more than on one thread (an empty one
    2.6 us), and the training forward and the backward have two regions each.
    On the latest, 512 KiB arrays took 0.63-0.85 times as long on one thread
    as on two, and 1 MiB arrays 0.88-1.73 times; on an earlier machine 512 KiB
    arrays were 5-30 % faster on two, and 384 KiB was the default (``docs/performance-notes.md``,
    "In the session of commit df1e44c").
    ``NUMBANORM_PARALLEL_MIN_SIZE``, its former name (a count of values), is not
    read; setting it gives a ``FutureWarning``.
``NUMBANORM_STREAM_MIN_BYTES``
    Outputs of at least this many bytes (default 33554432, 32 MiB) whose
    feature axis is the last one, or ``(N, C)``'s, are written with
    non-temporal stores, which bypass the cache: so large an output would not
    be read back from cache anyway, and a plain store reads every line before
    writing it. (Not an output in place of an input, nor a forward's new output
    above 32 MiB: ``api._stream``.) On the 2-core machine (32 MB of L3) the
    benchmarks ran on, streaming from 10 MiB made the backward of 10-134 MB
    arrays up to 47 % faster on the first day it was measured, and the forward
    of 10-32 MB ones up to 27 %; on the three days after, outputs of 10-32 MB
    were as fast or faster with plain stores (up to 15 %), and the default
    moved from 10 MiB to 32 MiB: README, "Streaming stores".

Threads: the kernels use ``numba.get_num_threads()``, so ``NUMBA_NUM_THREADS``
and ``numba.set_num_threads`` (which holds for the thread that calls it) apply as
for any Numba code.

One fact of the machine is read here too: ``L1D_BYTES``, one core's L1 data
cache (``_l1d_bytes``), from which the element-wise passes decide which rows
they read in groups. Kernels loaded from the disk cache keep the value they were
compiled with; Numba keys that cache on the CPU's name and features.
"""

import contextlib
import ctypes
import functools
import glob
import os
import sys
import warnings

try:
    import fcntl
except ImportError:  # not POSIX: Numba's cache writes as it does (see ``_locked``)
    fcntl = None


def _env_flag(name, default):
    value = os.environ.get(name, default).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be 0 or 1 (or false/true, no/yes, off/on), got {value!r}")


CACHE = _env_flag("NUMBANORM_CACHE", "1")
FASTMATH = {"reassoc", "contract"} if _env_flag("NUMBANORM_FASTMATH", "1") else False
if not FASTMATH:
    # Numba's cache does not key on compiler flags: a cached fastmath build would be loaded.
    CACHE = False


def _count(name, default):
    value = os.environ.get(name, default).strip()
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"environment variable {name} must be a non-negative integer, got {value!r}")
    return count


PARALLEL_MIN_BYTES = _count("NUMBANORM_PARALLEL_MIN_BYTES", "1048576")
STREAM_MIN_BYTES = _count("NUMBANORM_STREAM_MIN_BYTES", "33554432")


def _l1d_bytes(cpu="/sys/devices/system/cpu/cpu0", default=32768):
    """One core's L1 data cache in bytes, as Linux's sysfs gives it under ``cpu``; ``default`` where it does not.

    The element-wise passes read wide ``(N, C)`` rows in groups once their
    per-feature rows take more than half of it (``_kernels._row_groups``).
    """
    for index in sorted(glob.glob(os.path.join(cpu, "cache", "index*"))):
        try:
            fields = {}
            for name in ("level", "type", "size"):
                with open(os.path.join(index, name)) as file:
                    fields[name] = file.read().strip()
        except OSError:
            continue
        size = fields["size"].upper()
        scale = {"K": 2**10, "M": 2**20}.get(size[-1:], 1)
        digits = size[:-1] if scale > 1 else size
        if fields["level"] == "1" and fields["type"] in ("Data", "Unified") and digits.isdigit() and int(digits):
            return int(digits) * scale
    return default


L1D_BYTES = _l1d_bytes()

# Whether this process has warned that its kernels are not cached: once is enough.
_CACHE_WARNED = False


def _warn_not_cached(problem):
    global _CACHE_WARNED
    if _CACHE_WARNED:
        return
    _CACHE_WARNED = True
    warnings.warn(
        f"numbanorm's compiled kernels are not cached on disk ({problem}): they run, but every new process "
        "compiles them again, tens of seconds per dtype. Free some space, or set NUMBA_CACHE_DIR to a "
        "writable directory; NUMBANORM_CACHE=0 turns the cache, and this warning, off.",
        RuntimeWarning,
        stacklevel=_outside_package_stacklevel(),
    )


@contextlib.contextmanager
def _locked(directory, shared=False):
    """A lock on ``directory``'s lock file (POSIX only): exclusive, for one process at a
    time, or ``shared`` among processes that read.

    Numba writes a function's cache entry as a read-modify-write of its index
    (which numbers the data files) and then the data file, without a lock: two
    processes that compile different signatures at once can both take number 1,
    and the index of one then names the other's code, which a later process
    loads and runs (numba#4807; a SIGSEGV here, after the MPI tests' two ranks
    compiled into one cold cache). A process that loads between the writer's
    index and its data file finds the entry named and reads whatever file has
    that name: none yet (it compiles), or one an earlier version of the source
    left there, whose code it runs. Writers take the
    lock exclusively, readers shared. A directory where the lock file cannot be
    created is read unlocked: it holds no entry, or nobody can write it.
    """
    lock = None
    if fcntl is not None:
        try:
            lock = open(os.path.join(directory, "numbanorm.lock"), "a")
        except OSError:
            if not shared:
                raise
    if lock is None:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.cache
def _cache_class():
    from numba.core.caching import FunctionCache

    class Cache(FunctionCache):
        """Numba's per-function cache: writes take turns, never beside a read; a failed write is a
        warning; Numba's thread pool runs before anything loads.

        An entry's parallel code needs the pool. Numba saves, with each entry,
        the steps that start it on load, but a function passes those steps on
        only from callees compiled in the same process: ``inference``,
        compiled in a process that loaded the parallel ``normalize`` from this
        cache, was saved without them, and a later process that loaded it and
        ran it on an array too small for ``api._chunks`` to start the pool
        crashed (SIGSEGV). Starting the pool first, as a complete entry's load
        would, makes every entry safe to load.
        """

        def load_overload(self, sig, target_context):
            import numba

            numba.get_num_threads()  # starts the pool, once per process
            with _locked(self.cache_path, shared=True):
                return super().load_overload(sig, target_context)

        def save_overload(self, sig, data):
            try:
                with _locked(self.cache_path):
                    super().save_overload(sig, data)
            except OSError as error:
                _warn_not_cached(f"writing to {self.cache_path} failed: {error.strerror or error}")

    return Cache


def cache_on_disk(dispatcher):
    """Give a Numba dispatcher the on-disk cache of ``cache=True``, safe across processes, with failures as a warning.

    Writes from several processes into one cache directory take turns
    (``_locked``).

    Numba's own cache raises ``OSError`` from the call that compiled when it
    cannot write the file (a full disk, a quota), and ``RuntimeError`` from the
    decorator, at import, when it finds no writable directory (a read-only
    install and a read-only home). The kernel itself is fine in both cases, and
    the cache only spares the next process the compile, so here each is one
    ``RuntimeWarning`` per process, and the kernels run uncached.
    """
    try:
        dispatcher._cache = _cache_class()(dispatcher.py_func)
    except RuntimeError as error:  # Numba: "cannot cache function ...: no locator available ..."
        _warn_not_cached(f"no writable cache directory: {error}")
    return dispatcher


def _tbb_libraries():
    """Candidate paths of the ``tbb`` wheel's ``libtbb.so.12``, most likely first.

    The wheel installs it two levels above its ``site-packages`` (the ``lib/``
    of whatever scheme installed it: a venv, ``--user``, ``--prefix``), so its
    own file list says where; the environment's prefixes are the fallback.
    """
    paths = []
    try:
        from importlib import metadata

        files = metadata.files("tbb") or []
        paths += [str(f.locate()) for f in files if f.name.startswith("libtbb.so.12")]
    except Exception:  # noqa: BLE001 - not installed, or a broken record: try the prefixes
        pass
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        paths += sorted(glob.glob(os.path.join(prefix, "lib", "libtbb.so.12*")))
    return list(dict.fromkeys(paths))


# Whether ``preload_tbb`` loaded the library: what the warning of ``check_threading_layer`` says.
TBB_LOADED = False


def preload_tbb():
    """Make Numba's TBB threading layer findable, without choosing it for the user.

    The ``tbb`` wheel puts ``libtbb.so.12`` in a ``lib/`` where the dynamic
    loader does not look; once it is loaded, Numba's default layer order (tbb,
    omp, workqueue) picks TBB, the one layer that is safe both with concurrent
    calls from several threads and in children forked after a parallel region
    ran. An explicit ``NUMBA_THREADING_LAYER`` still wins. Sets ``TBB_LOADED``.
    """
    global TBB_LOADED
    if not sys.platform.startswith("linux"):
        return
    for path in _tbb_libraries():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        TBB_LOADED = True
        return


def _importlib_frame(frame):
    """Whether ``warnings`` leaves ``frame`` out when it counts a ``stacklevel``."""
    filename = frame.f_code.co_filename
    return "importlib" in filename and "_bootstrap" in filename


def _outside_package_stacklevel():
    """The ``stacklevel`` of the first frame outside numbanorm and Numba: a warning names the caller's line.

    Counted as ``warnings`` counts, without the import machinery's frames, so
    that a warning given while ``import numbanorm`` runs names the import.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        _importlib_frame(frame) or frame.f_globals.get("__name__", "").partition(".")[0] in ("numbanorm", "numba")
    ):
        frame = frame.f_back
        if frame is not None and not _importlib_frame(frame):
            level += 1
    return level


if "NUMBANORM_PARALLEL_MIN_SIZE" in os.environ:
    # The threshold was a count of values before 0.1.0 settled on bytes; a count means
    # nothing without the dtype, so the old setting is not translated, but it is not
    # ignored in silence either.
    warnings.warn(
        "NUMBANORM_PARALLEL_MIN_SIZE is no longer read: set NUMBANORM_PARALLEL_MIN_BYTES (a size in bytes, "
        f"now {PARALLEL_MIN_BYTES}) instead",
        FutureWarning,
        stacklevel=_outside_package_stacklevel(),  # the user's import line
    )


def check_threading_layer():
    """Warn when Numba's threading layer is not TBB, before the first parallel kernel runs.

    Numba picks its layer once per process, when its thread pool starts:
    ``numba.get_num_threads()`` starts it, so the layer is known here, before
    any of numbanorm's kernels runs. If other code ran a parallel region before
    ``import numbanorm`` (or ``NUMBA_THREADING_LAYER`` says so, or the ``tbb``
    package is missing), it may be OpenMP, which kills children forked
    afterwards, or workqueue, which aborts on concurrent calls.
    """
    import numba

    numba.get_num_threads()  # starts the pool: the layer is chosen now, if it was not already
    layer = numba.threading_layer()
    if layer == "tbb":
        return
    if os.environ.get("NUMBA_THREADING_LAYER"):
        cause = f"NUMBA_THREADING_LAYER={os.environ['NUMBA_THREADING_LAYER']} chose it"
        advice = "unset it, or set it to tbb"
    elif not TBB_LOADED:
        cause = "the tbb package's library was not found"
        advice = "pip install tbb (a wheel for x86_64 only)"
    else:
        cause = "other parallel Numba code started Numba's threads before numbanorm was imported"
        advice = "import numbanorm first"
    warnings.warn(
        f"Numba's threading layer is {layer!r}, not 'tbb' ({cause}): numbanorm's parallel kernels are then not "
        f"safe both in forked children and from several threads at once; {advice}.",
        RuntimeWarning,
        stacklevel=_outside_package_stacklevel(),
    )
