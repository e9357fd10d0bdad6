"""In-memory numbanorm against numbanorm.dask on one large array, in one run.

The same float32 ``(rows, features)`` array (``--gigabytes`` of it) is normalized

1. in memory: ``numbanorm.batch_norm_stats`` and ``numbanorm.batch_norm_forward``
   on a NumPy array, with Numba's threads on every core (the forward a second
   time into the first one's output, to show what allocating it costs);
2. by ``numbanorm.dask`` with dask's threaded scheduler in this process, on the
   same array cut into chunks of ``--chunk-mb``;
3. by ``numbanorm.dask`` on a ``LocalCluster`` of ``--workers`` worker processes
   (one thread each, ``NUMBA_NUM_THREADS=1``, so the same cores as 1 and 2), the
   array generated on the workers and kept there (persisted).

Each operation runs once after a small warm-up call that loads the compiled
kernels. Peak memory is about twice the array (the input and its output), first
in this process and then spread over the workers, never both at once.

On a virtual machine whose memory the host backs lazily, the first write to
memory the machine has not used before costs far more than the computation:
the first in-memory forward pays it for its whole output, which is why it is
also timed into that output (``out=``) once the memory is backed.

    python benchmarks/scale_out.py [--gigabytes 4] [--features 64] [--chunk-mb 64] [--workers 2]

Needs the extra ``dask``. Not an asv benchmark (it runs a cluster): a script.
"""

import argparse
import gc
import logging
import os
import time


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def persisted(array):
    """``array`` computed and kept on the workers, once every chunk is there."""
    import distributed

    array = array.persist()
    distributed.wait(array)
    return array


def rss_gb(pid=None):
    import psutil

    return psutil.Process(pid).memory_info().rss / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=4.0, help="size of the float32 array (default 4)")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--chunk-mb", type=float, default=64.0, help="dask chunk size in MB (default 64)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    import dask
    import dask.array as da
    import distributed
    import numba
    import numpy as np

    import numbanorm
    import numbanorm.dask as nd

    rows = int(args.gigabytes * 1e9 / 4 / args.features)
    chunk_rows = max(1, int(args.chunk_mb * 1e6 / 4 / args.features))
    shape, chunks = (rows, args.features), (chunk_rows, args.features)
    nbytes = rows * args.features * 4
    print(f"array {shape} float32, {nbytes / 1e9:.2f} GB; chunks {chunks} ({chunk_rows * args.features * 4 / 1e6:.0f} MB, "
          f"{-(-rows // chunk_rows)} chunks); {os.cpu_count()} cores, Numba threads {numba.get_num_threads()}")
    table = []

    # Warm-up: load the kernels for float32 in this process.
    small = np.ones((4096, args.features), np.float32)  # large enough for the parallel path
    numbanorm.batch_norm_forward(small)
    nd.batch_norm_forward(da.from_array(small, chunks=(1024, args.features)))[0].compute(scheduler="threads")

    # 1. In memory.
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    seconds, _ = timed(lambda: numbanorm.batch_norm_stats(x))
    table.append(("in-memory (NumPy + Numba)", "stats", seconds))
    seconds, (y, _, _) = timed(lambda: numbanorm.batch_norm_forward(x))
    table.append(("in-memory (NumPy + Numba)", "forward", seconds))
    # Again into the output of the first call: without the first touch of fresh memory.
    seconds = timed(lambda: numbanorm.batch_norm_forward(x, out=y))[0]  # keep no reference to y
    table.append(("in-memory (NumPy + Numba)", "forward, out= reused", seconds))
    print(f"in-memory done; process RSS {rss_gb():.1f} GB")
    del y
    gc.collect()

    # 2. dask, threaded scheduler, same process.
    lazy = da.from_array(x, chunks=chunks)
    with dask.config.set(scheduler="threads"):
        seconds, _ = timed(lambda: dask.compute(nd.batch_norm_stats(lazy)))
        table.append(("dask, threads in this process", "stats", seconds))
        seconds, y = timed(lambda: nd.batch_norm_forward(lazy)[0].persist())
        table.append(("dask, threads in this process", "forward", seconds))
    print(f"dask threads done; process RSS {rss_gb():.1f} GB")
    del y, lazy, x
    gc.collect()

    # 3. dask on a LocalCluster: the data live on the workers.
    with distributed.LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit=0,  # no spilling to disk: the comparison is of computing, not of disks
        env={"NUMBA_NUM_THREADS": "1"},
        silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster) as client:
        client.run(lambda: nd.batch_norm_forward(da.from_array(small, chunks=(1024, small.shape[1])))[0].compute(
            scheduler="sync"))
        x = persisted(da.random.default_rng(0).standard_normal(shape, chunks=chunks, dtype=np.float32))
        seconds, _ = timed(lambda: dask.compute(nd.batch_norm_stats(x)))
        table.append((f"dask, LocalCluster of {args.workers} processes", "stats", seconds))
        seconds, y = timed(lambda: persisted(nd.batch_norm_forward(x)[0]))
        table.append((f"dask, LocalCluster of {args.workers} processes", "forward", seconds))
        worker_rss = client.run(lambda: __import__("psutil").Process().memory_info().rss / 1e9)
        print(f"cluster done; worker RSS {', '.join(f'{gb:.1f}' for gb in worker_rss.values())} GB")
        del y, x

    print()
    print(f"| {nbytes / 1e9:.1f} GB float32 {shape} | operation | seconds | GB/s |")
    print("| --- | --- | ---: | ---: |")
    for engine, operation, seconds in table:
        print(f"| {engine} | {operation} | {seconds:.2f} | {nbytes / 1e9 / seconds:.2f} |")


if __name__ == "__main__":
    main()
