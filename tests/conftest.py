import fcntl
import os
import tempfile

import pytest
import torch

# Two cores here and in CI, and two pytest-xdist workers (pyproject's addopts): one thread each;
# more threads only thrash. One process (-n 0): both cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow (full-size SDXL; on by default when CI=true)")


def pytest_collection_modifyitems(config, items):
    # CI (CI=true) runs the full-size SDXL tests too: ~2 min and ~11 GB of RAM on 2 cores.
    if config.getoption("--runslow") or os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow: full-size SDXL; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_full_size_test_at_a_time(request):
    """The full-size tests (marked slow) hold ~7–11 GB each: the two xdist workers take turns
    (a file lock), so two of them never add up beyond the machine's RAM."""
    if "slow" not in request.keywords:
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "demofusion-tests-bigmem.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
