import os

import pytest
import torch
from hypothesis import settings

# The suite draws the same hypothesis examples on every run (a CI run must not fail on an example
# no earlier run drew); HYPOTHESIS_PROFILE=explore draws new ones each run to hunt for more.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny convs on a busy 2-core machine: one thread avoids OpenMP barrier stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
