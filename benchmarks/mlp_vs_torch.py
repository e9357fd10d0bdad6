"""Training speed of ``numbanorm.mlp`` against the equivalent PyTorch CPU loop, in one run.

Both frameworks train the same network (by default the README's experiment: 3 hidden
layers of 100 sigmoid units with batch normalization, SGD lr 0.1, batches of 60, 30
epochs on the digits) from the same initial weights on the same batches, measuring test
accuracy after each epoch. Both get the same thread count (Numba, PyTorch and the BLAS
under NumPy). Each framework first trains one warm-up epoch, so that Numba's kernels
are loaded (from the on-disk cache when warm) and PyTorch's allocator is primed; the
timed runs then alternate between the two frameworks.

    python benchmarks/mlp_vs_torch.py [--threads 1] [--repeats 3] [--epochs 30]

Not an asv benchmark (it needs PyTorch and compares two libraries): a script.
"""

import argparse
import statistics
import time

import numpy as np


def numbanorm_run(model, data, epochs, batch_size, lr, seed):
    """Training seconds and final test accuracy of ``numbanorm.mlp.train``."""
    from numbanorm.mlp import train

    X_train, X_test, y_train, y_test = data
    history = train(model, X_train, y_train, epochs=epochs, batch_size=batch_size, lr=lr,
                    X_test=X_test, y_test=y_test, seed=seed)
    return history["seconds"], history["test_accuracy"]


def torch_run(model, data, epochs, batch_size, lr, seed):
    """The same training as a plain PyTorch loop on the twin of ``model``."""
    import torch
    import torch.nn.functional as F

    from numbanorm.mlp import batches, to_torch

    net = to_torch(model)
    X_train, X_test, y_train, y_test = (torch.from_numpy(np.asarray(a)) for a in data)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        total, count = 0.0, 0
        for batch in batches(len(X_train), batch_size, rng):
            batch = torch.from_numpy(batch)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(X_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
        net.eval()
        with torch.no_grad():
            accuracy = (net(X_test).argmax(dim=1) == y_test).double().mean().item()
    return time.perf_counter() - start, accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for Numba, PyTorch and NumPy's BLAS (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per framework (default: 3)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100, 100])
    parser.add_argument("--activation", default="sigmoid")
    parser.add_argument("--no-batch-norm", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numba
    import torch
    from threadpoolctl import threadpool_limits

    from numbanorm.mlp import MLP, load_digits_split

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    data = load_digits_split(args.seed)
    sizes = [data[0].shape[1], *args.hidden, 10]

    def fresh_model():
        return MLP(sizes, activation=args.activation, batch_norm=not args.no_batch_norm, seed=args.seed)

    runs = {"numbanorm": numbanorm_run, "torch": torch_run}
    seconds = {name: [] for name in runs}
    accuracy = {}
    with threadpool_limits(args.threads):
        for name, run in runs.items():
            run(fresh_model(), data, 1, args.batch_size, args.lr, args.seed)
        for _ in range(args.repeats):
            for name, run in runs.items():
                elapsed, accuracy[name] = run(fresh_model(), data, args.epochs, args.batch_size, args.lr, args.seed)
                seconds[name].append(elapsed)

    print(f"{args.epochs} epochs, batch {args.batch_size}, hidden {args.hidden} {args.activation}, "
          f"batch norm {not args.no_batch_norm}, {args.threads} thread(s), {args.repeats} runs each")
    for name in runs:
        print(f"{name:>10}: median {statistics.median(seconds[name]):.3f} s, best {min(seconds[name]):.3f} s, "
              f"test accuracy {accuracy[name]:.4f}")
    ratio = statistics.median(seconds["torch"]) / statistics.median(seconds["numbanorm"])
    print(f"torch / numbanorm median time: {ratio:.2f} (above 1: numbanorm trains faster)")


if __name__ == "__main__":
    main()
