"""A torchrun worker that runs the `demofusion` command with a failure injected on rank 1 (as its
first upscaling phase starts), for the test that a failing rank stops the whole job (tests/test_parallel.py)."""

import os
import sys

from demofusion.pipeline import algorithm as module

if os.environ.get("RANK") == "1":
    def fail(*args, **kwargs):
        raise RuntimeError("injected failure on rank 1")

    module.upscale_phase = fail

from demofusion.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
