"""The command line under ``torchrun``: join the process group, one device per rank, and only
rank 0 speaks and writes (docs/distributed.md). Outside torchrun nothing here does anything."""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta

# a collective waiting longer than this fails (a rank that died without torchrun noticing)
TIMEOUT_S = int(os.environ.get("DEMOFUSION_DIST_TIMEOUT", "600"))


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

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=TIMEOUT_S))
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
