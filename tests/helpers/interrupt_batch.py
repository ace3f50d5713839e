"""Runs the `demofusion` command with Ctrl-C arriving as the third image of a --prompts batch is
about to be written (tests/test_parallel.py: an interrupted batch resumes without redoing work)."""

import sys

from demofusion.cli import batch

saved = []
real_save = batch.save_png


def save_png(*args, **kwargs):
    if len(saved) == 2:
        raise KeyboardInterrupt
    saved.append(args[1])
    return real_save(*args, **kwargs)


batch.save_png = save_png

from demofusion.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
