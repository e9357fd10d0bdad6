"""numbanorm.mpi on 2 ranks (the test launches mpiexec) against the float64 reference on the whole batch."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="numbanorm.mpi needs the extra 'mpi'")

import numbanorm  # noqa: E402
import reference  # noqa: E402
from checks import assert_backward_close, assert_close, assert_gradient_close, gradient_scale  # noqa: E402

RANKS = 2


def mpiexec():
    """The mpiexec of this environment (the mpich wheel puts it beside python), else the one on PATH."""
    here = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    return here or shutil.which("mpiexec")


def run_ranks(program, cwd, timeout=90):
    """Run ``python -m mpi4py *program`` on RANKS ranks; fail with its output if it fails.

    ``python -m mpi4py`` aborts every rank when one raises, instead of leaving
    the others waiting in a collective.
    """
    launcher = mpiexec()
    # The mpi extra's mpich wheel puts mpiexec beside python: its absence is a broken install.
    assert launcher is not None, "mpi4py is installed but no mpiexec was found beside python or on PATH"
    command = [launcher, "-n", str(RANKS), sys.executable, "-m", "mpi4py", *map(str, program)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as timeout_error:
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s (a rank waiting in a collective?):\n"
                    f"{timeout_error.stdout}\n{timeout_error.stderr}")
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done


# Global batches, cut along axis 0 into the ranks' parts: unequal parts, an empty rank,
# channels-last and spatial layouts, each dtype.
CASES = {
    "unequal-float32": dict(rows=(7, 3), tail=(5,), axis=1, dtype="float32"),
    "empty-rank-float64": dict(rows=(6, 0), tail=(3, 2, 2), axis=1, dtype="float64"),
    "channels-last-float16": dict(rows=(4, 5), tail=(3, 4), axis=-1, dtype="float16"),
}


def global_batch(case, seed):
    """The same global ``(x, dy, gamma, beta)`` in the test and on every rank."""
    rng = np.random.default_rng(seed)
    shape = (sum(case["rows"]), *case["tail"])
    features = shape[case["axis"]]
    x = (rng.normal(size=shape) * 3 + rng.uniform(-5, 5, features if case["axis"] == -1 else 1)).astype(case["dtype"])
    dy = rng.uniform(-1, 1, size=shape).astype(case["dtype"])
    return x, dy, rng.uniform(0.5, 2, features), rng.uniform(-1, 1, features)


FUNCTIONAL_SCRIPT = """
    import json, sys
    import numpy as np
    from mpi4py import MPI
    import numbanorm.mpi

    out = sys.argv[1]
    cases = json.loads(sys.argv[2])
    comm = MPI.COMM_WORLD
    rank = comm.rank

    def global_batch(name):
        batch = np.load(f"{out}/{name}.npz")
        return batch["x"], batch["dy"], batch["gamma"], batch["beta"]

    def part(a, case):
        start = sum(case["rows"][:rank])
        return a[start:start + case["rows"][rank]]

    for name, case in cases.items():
        x, dy, gamma, beta = global_batch(name)
        features = gamma.shape[0]
        running_mean, running_var = np.zeros(features, case["dtype"]), np.ones(features, case["dtype"])
        y, mean, invstd = numbanorm.mpi.batch_norm_forward(
            part(x, case), gamma, beta, axis=case["axis"], running_mean=running_mean, running_var=running_var,
            momentum=0.25,
        )
        dx, dgamma, dbeta = numbanorm.mpi.batch_norm_backward(
            part(dy, case), part(x, case), mean, invstd, gamma, axis=case["axis"]
        )
        np.savez(f"{out}/{name}-{rank}.npz", y=y, mean=mean, invstd=invstd, dx=dx, dgamma=dgamma, dbeta=dbeta,
                 running_mean=running_mean, running_var=running_var)

    # Three SGD steps of a SyncBatchNorm layer, each on a new global batch.
    case = cases["unequal-float32"]
    layer = numbanorm.mpi.SyncBatchNorm(5, momentum=None)
    for step in range(3):
        x, dy, _, _ = global_batch(f"step-{step}")
        y = layer.forward(part(x, case))
        dx = layer.backward(part(dy, case))
        layer.gamma -= 0.5 * layer.dgamma
        layer.beta -= 0.5 * layer.dbeta
    np.savez(f"{out}/layer-{rank}.npz", y=y, dx=dx, **layer.state_dict())

    # Data-parallel training: each rank starts from its own seed (rank 0's weights are broadcast).
    from numbanorm.mlp import train
    batch = np.load(f"{out}/digits.npz")
    model = numbanorm.mpi.DataParallelMLP([6, 8, 7, 3], activation="tanh", seed=rank)
    history = train(model, batch["x"], batch["labels"], epochs=2, batch_size=13, lr=0.3, seed=5)
    np.savez(f"{out}/data-parallel-{rank}.npz", train_loss=history["train_loss"], **model.state_dict())

    # Errors: a wrong argument on one rank raises on both; so does a global batch too small.
    errors = {}
    try:
        numbanorm.mpi.batch_norm_forward(np.ones((4, 3)), np.ones(3 if rank == 0 else 2))
    except Exception as error:
        errors["gamma"] = [type(error).__name__, str(error)]
    try:
        numbanorm.mpi.batch_norm_forward(np.ones((4, 3 + rank)))
    except Exception as error:
        errors["features"] = [type(error).__name__, str(error)]
    try:
        numbanorm.mpi.batch_norm_forward(np.ones((1 - rank, 3)))
    except Exception as error:
        errors["count"] = [type(error).__name__, str(error)]
    try:  # on rank 0 the running statistics share one buffer: its variance update would overwrite the mean
        shared = np.zeros(6)
        numbanorm.mpi.batch_norm_forward(np.ones((4, 3)), running_mean=shared[:3], running_var=shared[2:5] if rank == 0 else np.ones(3))
    except Exception as error:
        errors["shared"] = [type(error).__name__, str(error)]
    # The layer's own checks of x, and that a forward came first, raise on both ranks too.
    layer = numbanorm.mpi.SyncBatchNorm(3)
    try:
        layer.forward(np.ones((4, 3 if rank == 0 else 4)))
    except Exception as error:
        errors["layer-features"] = [type(error).__name__, str(error)]
    try:
        layer.forward(np.ones((4, 3), dtype=np.complex64 if rank == 1 else np.float64))
    except Exception as error:
        errors["layer-dtype"] = [type(error).__name__, str(error)]
    layer.eval()
    if rank == 0:
        layer.forward(np.ones((4, 3)))  # inference: no collective, and rank 1 has no forward to go back through
    try:
        layer.backward(np.ones((4, 3)))
    except Exception as error:
        errors["layer-backward"] = [type(error).__name__, str(error)]
    # A training flag that is not a bool, on rank 1 only: it looks true, so it raises where rank 0
    # waits, in the training collective.
    try:
        numbanorm.mpi.batch_norm_forward(np.ones((4, 3)), training=True if rank == 0 else "yes")
    except Exception as error:
        errors["training-forward"] = [type(error).__name__, str(error)]
    try:
        numbanorm.mpi.batch_norm_backward(np.ones((4, 3)), np.ones((4, 3)), np.zeros(3), np.ones(3),
                                          training=True if rank == 0 else 1)
    except Exception as error:
        errors["training-backward"] = [type(error).__name__, str(error)]
    try:
        numbanorm.mpi.SyncBatchNorm(3).forward(np.ones((4, 3)), training=True if rank == 0 else "yes")
    except Exception as error:
        errors["training-layer"] = [type(error).__name__, str(error)]
    with open(f"{out}/errors-{rank}.json", "w") as f:
        json.dump(errors, f)

    # No values on any rank: the backward gives what the in-memory one does.
    empty = np.ones((0, 3))
    dx0, dgamma0, dbeta0 = numbanorm.mpi.batch_norm_backward(empty, empty, np.zeros(3), np.ones(3))
    np.savez(f"{out}/empty-backward-{rank}.npz", dx=dx0, dgamma=dgamma0, dbeta=dbeta0)

    # float16: the global batch's sums (80000 values a feature, dy = 1) pass float16's largest value, 65504.
    x16 = np.random.default_rng(rank).normal(size=(40000, 2)).astype(np.float16)
    _, mean16, invstd16 = numbanorm.mpi.batch_norm_forward(x16)
    _, dgamma16, dbeta16 = numbanorm.mpi.batch_norm_backward(np.ones_like(x16), x16, mean16, invstd16)
    np.savez(f"{out}/float16-sums-{rank}.npz", x=x16, mean=mean16, invstd=invstd16, dgamma=dgamma16, dbeta=dbeta16)
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One mpiexec run of the script above, on global batches the test wrote; each rank saves its results."""
    out = tmp_path_factory.mktemp("mpi")
    for name, case in CASES.items():
        x, dy, gamma, beta = global_batch(case, 0)
        np.savez(out / f"{name}.npz", x=x, dy=dy, gamma=gamma, beta=beta)
    for step in range(3):
        x, dy, gamma, beta = global_batch(CASES["unequal-float32"], 10 + step)
        np.savez(out / f"step-{step}.npz", x=x, dy=dy, gamma=gamma, beta=beta)
    x, _, _, _ = global_batch(dict(rows=(40,), tail=(6,), axis=1, dtype="float32"), 20)
    np.savez(out / "digits.npz", x=x, labels=np.arange(40) % 3)
    script = out / "script.py"
    script.write_text(textwrap.dedent(FUNCTIONAL_SCRIPT))
    run_ranks([script, out, json.dumps(CASES)], out)
    return out


def load(out, name):
    return [dict(np.load(out / f"{name}-{rank}.npz")) for rank in range(RANKS)]


@pytest.mark.parametrize("name", CASES)
def test_forward_and_backward_match_the_whole_batch(results, name):
    case = CASES[name]
    ranks = load(results, name)
    x, dy, gamma, beta = global_batch(case, 0)
    axis = case["axis"]
    expected_y, mean, invstd, running_mean, running_var = reference.forward(
        x, gamma, beta, axis=axis, running_mean=np.zeros(gamma.shape), running_var=np.ones(gamma.shape), momentum=0.25
    )
    expected_dx, expected_dgamma, expected_dbeta = reference.backward(dy, x, mean, invstd, gamma, axis=axis)
    dtype = np.dtype(case["dtype"])

    sums_dtype = np.float32 if dtype == np.float16 else dtype  # as numbanorm.batch_norm_backward
    for rank, saved in enumerate(ranks):
        assert saved["y"].shape[0] == saved["dx"].shape[0] == case["rows"][rank]
        assert saved["y"].dtype == saved["dx"].dtype == dtype
        assert saved["dgamma"].dtype == saved["dbeta"].dtype == sums_dtype
    assert_close(np.concatenate([r["y"] for r in ranks]), expected_y, dtype)
    for key, expected in [("mean", mean), ("invstd", invstd)]:
        np.testing.assert_allclose(ranks[0][key], expected, rtol=1e-10, atol=1e-12)
    gradients = np.concatenate([r["dx"] for r in ranks]), ranks[0]["dgamma"], ranks[0]["dbeta"]
    expected = expected_dx, expected_dgamma, expected_dbeta
    assert_backward_close(gradients, expected, dtype, dy, x, mean, invstd, gamma, axis)
    for key, expected in [("running_mean", running_mean), ("running_var", running_var)]:
        assert_close(ranks[0][key], expected, dtype)
    # Identical replicas: what every rank shares agrees bit for bit.
    for key in ("mean", "invstd", "dgamma", "dbeta", "running_mean", "running_var"):
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])


def test_sync_layer_trains_like_one_process_on_the_whole_batch(results):
    case = CASES["unequal-float32"]
    ranks = load(results, "layer")
    layer = numbanorm.BatchNorm(5, momentum=None)
    for step in range(3):
        x, dy, _, _ = global_batch(case, 10 + step)
        y = layer.forward(x)
        gamma = layer.gamma.copy()
        dx = layer.backward(dy)
        layer.gamma -= 0.5 * layer.dgamma
        layer.beta -= 0.5 * layer.dbeta
    for key, expected in layer.state_dict().items():
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
        assert_close(ranks[0][key], expected, np.float32)
    assert int(ranks[0]["num_batches_tracked"]) == 3
    assert_close(np.concatenate([r["y"] for r in ranks]), y, np.float32)
    _, mean, invstd, _, _ = reference.forward(x, eps=layer.eps)
    scale = gradient_scale(dy, x, mean, invstd, gamma)
    assert_gradient_close(np.concatenate([r["dx"] for r in ranks]), dx, np.float32, scale)


def test_data_parallel_training_matches_one_process_on_the_whole_batch(results):
    from numbanorm.mlp import MLP, train

    ranks = load(results, "data-parallel")
    batch = np.load(results / "digits.npz")
    model = MLP([6, 8, 7, 3], activation="tanh", seed=0)
    initial = model.state_dict()
    history = train(model, batch["x"], batch["labels"], epochs=2, batch_size=13, lr=0.3, seed=5)
    # 40 rows in batches of 13: 3 steps per epoch on slices of 6 and 7 rows (the single row left over is dropped).
    for name, expected in model.state_dict().items():
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=f"replicas differ in {name}")
        np.testing.assert_allclose(ranks[0][name], expected, rtol=1e-4, atol=1e-5, err_msg=name)
        if name.endswith("weight"):
            assert not np.allclose(ranks[0][name], initial[name]), f"{name} did not train"
    np.testing.assert_allclose(ranks[0]["train_loss"], history["train_loss"], rtol=1e-5)


def test_an_error_on_one_rank_raises_on_every_rank(results):
    errors = [json.loads((results / f"errors-{rank}.json").read_text()) for rank in range(RANKS)]
    assert errors[1]["gamma"][0] == "ValueError" and "gamma must have shape (3,)" in errors[1]["gamma"][1]
    assert errors[0]["gamma"][0] == "RuntimeError" and "rank 1" in errors[0]["gamma"][1]
    for rank in range(RANKS):
        assert errors[rank]["features"][0] == "ValueError" and "same number of features" in errors[rank]["features"][1]
        assert errors[rank]["count"][0] == "ValueError" and "more than 1 value" in errors[rank]["count"][1]
    assert errors[0]["shared"][0] == "ValueError" and "must not share memory" in errors[0]["shared"][1]
    assert errors[1]["shared"][0] == "RuntimeError" and "rank 0" in errors[1]["shared"][1]
    assert errors[1]["layer-features"][0] == "ValueError" and "num_features=3" in errors[1]["layer-features"][1]
    assert errors[1]["layer-dtype"][0] == "TypeError" and "x must" in errors[1]["layer-dtype"][1]
    assert errors[1]["layer-backward"] == ["RuntimeError", "backward needs a forward first"]
    for check in ("layer-features", "layer-dtype", "layer-backward", "training-forward", "training-backward",
                  "training-layer"):
        assert errors[0][check][0] == "RuntimeError" and "rank 1 of 2 failed" in errors[0][check][1]
    for check in ("training-forward", "training-backward", "training-layer"):
        assert errors[1][check][0] == "TypeError" and "training must be a bool" in errors[1][check][1]


def test_a_backward_with_no_values_on_any_rank_gives_what_in_memory_does(results):
    empty = np.ones((0, 3))
    wanted = numbanorm.batch_norm_backward(empty, empty, np.zeros(3), np.ones(3))
    for rank_results in load(results, "empty-backward"):
        for actual, expected in zip((rank_results["dx"], rank_results["dgamma"], rank_results["dbeta"]), wanted):
            assert actual.shape == expected.shape and actual.dtype == expected.dtype
            np.testing.assert_array_equal(actual, expected)


def test_float16_parameter_gradients_over_the_global_batch_do_not_overflow(results):
    ranks = load(results, "float16-sums")
    x = np.concatenate([r["x"] for r in ranks])
    ones = np.ones_like(x)
    _, expected_dgamma, _ = reference.backward(ones, x, ranks[0]["mean"], ranks[0]["invstd"])
    xhat = (x.astype(np.float64) - ranks[0]["mean"]) * ranks[0]["invstd"]
    for saved in ranks:
        assert saved["dgamma"].dtype == saved["dbeta"].dtype == np.float32
        np.testing.assert_array_equal(saved["dbeta"], 80000.0)
        np.testing.assert_allclose(saved["dgamma"], expected_dgamma, atol=1e-5 * np.abs(xhat).sum(axis=0).max())


TRAINER_SCRIPT = """
    import json, sys
    from mpi4py import MPI
    import numbanorm.mlp, numbanorm.mpi

    # Record the rows each rank trains on, then run the command line as python -m numbanorm.mlp does.
    rows = []
    forward = numbanorm.mpi.DataParallelMLP.forward

    def counting_forward(self, x, training=True):
        if training:
            rows.append(len(x))
        return forward(self, x, training)

    numbanorm.mpi.DataParallelMLP.forward = counting_forward
    status = numbanorm.mlp.main(sys.argv[1:])
    with open(f"rows-{MPI.COMM_WORLD.rank}.json", "w") as f:
        json.dump(rows, f)
    sys.exit(status)
"""


def test_trainer_command_line_with_mpi_matches_one_process(tmp_path):
    pytest.importorskip("sklearn", reason="the trainer's data need the extra 'mlp'")
    from numbanorm.mlp import MLP, main

    options = ["--epochs", "1", "--hidden", "16", "16", "--batch-size", "50", "--quiet"]
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(TRAINER_SCRIPT))
    done = run_ranks([script, "--mpi", *options, "--save", "data-parallel.npz", "--json", "data-parallel.json"],
                     tmp_path)
    assert done.stdout == ""
    # Only rank 0 writes the model and the JSON.
    assert {"data-parallel.json", "data-parallel.npz"} <= {p.name for p in tmp_path.iterdir()}
    assert main([*options, "--save", str(tmp_path / "one-process.npz")]) == 0

    # 1347 training digits in batches of 50: 27 steps, each batch split in halves over the ranks.
    rows = [json.loads((tmp_path / f"rows-{rank}.json").read_text()) for rank in range(RANKS)]
    assert len(rows[0]) == len(rows[1]) == 27
    assert sum(rows[0]) + sum(rows[1]) == 1347
    assert all(abs(a - b) <= 1 for a, b in zip(*rows))

    data_parallel, one_process = MLP.load(tmp_path / "data-parallel.npz"), MLP.load(tmp_path / "one-process.npz")
    for name, expected in one_process.state_dict().items():
        np.testing.assert_allclose(data_parallel.state_dict()[name], expected, rtol=1e-4, atol=1e-5, err_msg=name)
    assert int(data_parallel.state_dict()["1.num_batches_tracked"]) == 27
    history = json.loads((tmp_path / "data-parallel.json").read_text())
    assert history["config"]["mpi"] is True and 0 < history["test_accuracy"] <= 1


def test_mpi_flag_without_mpi4py_says_what_to_install(monkeypatch, capsys):
    from numbanorm.mlp import main

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["--mpi", "--epochs", "1"])
    assert exit_info.value.code == 2
    assert "numbanorm[mpi]" in capsys.readouterr().err


def test_sync_layer_from_something_other_than_a_layer_names_the_argument():
    # One rank, in a child process (see test_docstrings.py: MPI stays out of the pytest process).
    program = textwrap.dedent("""
        import numbanorm.mpi
        try:
            numbanorm.mpi.SyncBatchNorm.from_batch_norm("x")
        except TypeError as error:
            print(error)
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "layer must be a numbanorm.BatchNorm, got str"


def test_the_sync_layers_scratch_layer_runs_on_its_rank_alone():
    # The trainer runs each kind of layer's kernels once before training, on some ranks twice
    # (rank 0 says what it waits for): a scratch layer that talked to the others would hang them.
    program = textwrap.dedent("""
        import numpy as np, numbanorm.mpi
        from mpi4py import MPI
        scratch = numbanorm.mpi.SyncBatchNorm(3, momentum=0.2, dtype=np.float64)._scratch()
        print(type(scratch).__name__, scratch.comm == MPI.COMM_SELF, scratch.num_features, scratch.momentum, scratch.dtype)
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SyncBatchNorm", "True", "1", "0.2", "float64"]


def test_the_trainer_on_ranks_that_report_and_ranks_that_do_not(tmp_path):
    # Rank 0 reports (and loads the kernels once more, telling the wait); the others are quiet.
    pytest.importorskip("sklearn", reason="the trainer's data need the extra 'mlp'")
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(TRAINER_SCRIPT))
    done = run_ranks([script, "--mpi", "--epochs", "1", "--hidden", "8", "--batch-size", "100"], tmp_path)
    assert "with batch norm: test accuracy" in done.stdout


def test_the_allreduces_check_their_input_on_its_rank_as_the_in_memory_functions_do():
    program = textwrap.dedent("""
        import numpy as np, numbanorm, numbanorm.mpi
        from mpi4py import MPI
        count, mean, m2 = numbanorm.batch_norm_partial_stats(np.array([[5.0, 1e9], [7.0, 1e9]]))
        calls = [
            lambda: numbanorm.mpi.allreduce_stats((count, np.ma.masked_array(mean, mask=[False, True]), m2), comm=MPI.COMM_SELF),
            lambda: numbanorm.mpi.allreduce_sum([np.ones(2), np.ma.masked_array([1.0, 2.0], mask=[True, False])], comm=MPI.COMM_SELF),
            lambda: numbanorm.mpi.allreduce_sum([[[1.0], [1.0, 2.0]]], comm=MPI.COMM_SELF),
        ]
        for call in calls:
            try:
                call()
                print("no error")
            except (TypeError, ValueError) as error:
                print(type(error).__name__, str(error).split(":")[0])
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "TypeError stats's mean is a masked array with masked values, which would be used as they are",
        "TypeError arrays[1] is a masked array with masked values, which would be used as they are",
        "ValueError arrays[0] does not convert to an array",
    ]
