"""The command line under ``torchrun``: join the process group, one device per rank, and only
rank 0 speaks and writes (docs/big-images.md). Outside torchrun nothing here does anything."""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta

from .. import parallel
from ..frontend.errors import CLIError

DEFAULT_TIMEOUT_S = 600


def timeout_s() -> int:
    """DEMOFUSION_DIST_TIMEOUT (seconds, default 600): a collective waiting longer fails (a rank that
    died without torchrun noticing). Read when a run joins, not at import, so a bad value is one
    error line of that run and never breaks `demofusion --version`."""
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
    return parallel.rank() == 0


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- one message per job: a failure is said by rank 0 alone ---------------------------------------
# How long a rank waits for another's word after a failure: ranks failing alike (the same arguments,
# the same latents after every gather, the same Ctrl-C) reach their handlers within a step of each other.
SETTLE_S = 10.0


def _store():
    """A client of torchrun's own key-value store (its agent hosts it at MASTER_ADDR:MASTER_PORT), usable
    before or after the process group is joined; None outside torchrun."""
    if world_size() <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=SETTLE_S))
        prefix = f"demofusion/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        return dist.PrefixStore(prefix, store)
    except Exception:  # no store to agree through: every rank speaks for itself
        return None


def _wait(store, keys: list[str]) -> bool:
    try:
        store.wait(keys, timedelta(seconds=SETTLE_S))
        return True
    except Exception:  # not there in time: that rank is not failing alike
        return False


def _ask(call, default=None):
    """A store call that cannot fail the error path (torchrun may be stopping and its store with it)."""
    try:
        return call()
    except Exception:
        return default


def _named(rank: int, line: str) -> str:
    head, sep, rest = line.partition("error: ")
    return f"error: rank {rank}: {rest}" if sep and not head else f"rank {rank}: {line}"


def _same(store, code: int, line: str) -> bool:
    return _wait(store, ["0"]) and store.get("0").decode() == f"{code}\n{line}"


def _exit(code: int, signum, frame) -> None:
    raise SystemExit(code)


def _keep_code(code: int) -> None:
    """torchrun stops the remaining ranks with SIGTERM as soon as one exits; a rank already failing with
    ``code`` then still exits with it (its summary shows each rank's code)."""
    import signal
    from functools import partial

    try:
        signal.signal(signal.SIGTERM, partial(_exit, code))
    except ValueError:  # not the main thread: torchrun's own code stands
        pass


def fail(code: int, line: str) -> int:
    """Say a failure's one line and return the exit code ``code``. Under torchrun only rank 0 says it; a rank
    whose failure is rank 0's too (same line) exits with the same code quietly; one that fails alone says
    its line naming its rank (torchrun stops rank 0 before rank 0 could), and a failure that follows
    from one already said (a peer's connection closing) is not said again."""
    rank = int(os.environ.get("RANK", "0"))
    store = _store()
    if store is None:
        print(line, file=sys.stderr, flush=True)
        return code
    _keep_code(code)
    if _ask(lambda: store.check(["said"]), False):
        return code
    if rank == 0:  # say it, then let the others exit with this code before torchrun stops them
        print(line, file=sys.stderr, flush=True)
        _ask(lambda: (store.set("said", line), store.set("0", f"{code}\n{line}")))
        _wait(store, [f"seen{r}" for r in range(1, world_size())])
        return code
    if not _ask(lambda: _same(store, code, line), False) and \
            not _ask(lambda: store.check(["said"]), False):
        print(_named(rank, line), file=sys.stderr, flush=True)
        _ask(lambda: store.set("said", line))
    _ask(lambda: store.set(f"seen{rank}", "1"))
    return code
