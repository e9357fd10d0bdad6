"""The examples in the docstrings run and print what they say."""

import doctest
import importlib

import pytest

# numbanorm.mpi's example needs mpiexec: tests/test_mpi.py runs the same calls on 2 ranks.
MODULES = ["numbanorm.api", "numbanorm.layer", "numbanorm.mlp", "numbanorm.dask"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "numbanorm.dask":
        pytest.importorskip("dask.array", reason="numbanorm.dask needs the extra 'dask'")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
