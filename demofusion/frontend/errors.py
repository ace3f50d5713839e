"""The front ends' user-facing error, and what they say when a run runs out of memory."""

from __future__ import annotations

from ..errors import InputError, first_line


class CLIError(InputError):
    """A user-facing error of the command line: printed as one line, exit status 2."""


def oom_message(e: Exception) -> str:
    return (f"out of memory ({first_line(e)[:120]}). Give the GPU's size as --max-memory (e.g. 8GB; "
            "--dry-run shows the plan), or --offload model, --fp8, or a smaller --height/--width")


def is_oom(e: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())
