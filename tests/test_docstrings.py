"""The examples in the docstrings run and print what they say."""

import doctest
import importlib
import subprocess
import sys
import textwrap

import pytest

MODULES = ["numbanorm.api", "numbanorm.layer", "numbanorm.mlp", "numbanorm.dask"]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "numbanorm.dask":
        pytest.importorskip("dask.array", reason="numbanorm.dask needs the extra 'dask'")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


def test_mpi_docstring_examples_on_one_rank():
    # In a child process: importing mpi4py.MPI initializes MPI, which this pytest process
    # (it forks children in other tests) should not carry. Run alone, the child is one rank.
    pytest.importorskip("mpi4py", reason="numbanorm.mpi needs the extra 'mpi'")
    program = textwrap.dedent(f"""
        import doctest, numbanorm.mpi
        result = doctest.testmod(numbanorm.mpi, optionflags={FLAGS})
        print(result.attempted, result.failed)
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    attempted, failed = map(int, done.stdout.split()[-2:])
    assert attempted > 0, "numbanorm.mpi has no examples"
    assert failed == 0, done.stdout
