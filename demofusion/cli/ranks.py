"""The command line under ``torchrun``: join the process group, one device per rank, and only
rank 0 speaks and writes (docs/distributed.md). Outside torchrun nothing here does anything."""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta

DEFAULT_TIMEOUT_S = 600


def timeout_s() -> int:
    """DEMOFUSION_DIST_TIMEOUT (seconds, default 600): a collective waiting longer fails (a rank that
    died without torchrun noticing). Read when a run joins, not at import, so a bad value is one
    error line of that run and never breaks `demofusion --version`."""
    from .common import CLIError

    text = os.environ.get("DEMOFUSION_DIST_TIMEOUT", "").strip() or str(DEFAULT_TIMEOUT_S)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise CLIError(f"DEMOFUSION_DIST_TIMEOUT={text}: give a whole number of seconds > 0 (default "
                       f"{DEFAULT_TIMEOUT_S}), or unset it")
    return value


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): join the process group — NCCL between GPUs, gloo on the CPU —
    and return this rank's device (``cuda`` → ``cuda:<LOCAL_RANK>``). Ranks other than 0 go quiet:
    no stdout, no warnings (errors still reach stderr)."""
    if world_size() <= 1:
        return device
    import torch
    import torch.distributed as dist

    timeout = timeout_s()  # checked before anything joins
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
    return str(dev)


def is_writer() -> bool:
    """Rank 0 (or no process group) writes files and prints."""
    from ..parallel import rank

    return rank() == 0


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
