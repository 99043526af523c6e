# The tests in this folder import the project's modules (one folder up) and the shared helpers beside them
# (helpers.py): both go on sys.path here, whatever folder pytest runs from. The repository's own conftest.py
# (one torch thread per process) applies here too.
import os
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
for folder in (TESTS, os.path.dirname(TESTS)):
    if folder not in sys.path:
        sys.path.insert(0, folder)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A test may change torch's thread count (bench.main sets it): the next test gets the usual one back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
