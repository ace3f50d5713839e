import os

import pytest
import torch

# Two cores here and in CI; more threads only thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
