"""A run's output folder (docs/images.md, Output folders): held under an exclusive lock for the whole
run, and written so that a failure leaves it as it was.

- The lock: ``fcntl.flock`` on the hidden file ``.demofusion.lock`` in the folder, holding the
  holder's PID; a second run into the same folder is refused with one line naming that PID. The
  kernel drops the lock when the holder dies (SIGKILL too), so a stale file never blocks anyone.
- Nothing is written before the first phase has ended: ``run.json``, that phase's latents and its
  picture are written as one step (``atomic_replace``), and only then are an ``--overwrite``-n
  older run's files removed. A run that fails before (a late check, NaN, Ctrl-C, a full disk)
  leaves the folder byte-identical, and a folder it created is removed again.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..outputs import RUN_FILE, atomic_replace
from ..frontend.errors import CLIError

LOCK_FILE = ".demofusion.lock"


def run_files(out: Path) -> list[Path]:
    """The files a run writes (what ``--overwrite`` replaces; other files are left alone)."""
    return [*out.glob("phase_*.png"), *out.glob("phase_*.safetensors"), out / RUN_FILE]


class RunFolder:
    """``out`` locked for this process; ``committed`` once it holds this run's ``run.json``."""

    def __init__(self, out: Path, option: str = "--out", committed: bool = False, made: Path | None = None):
        self.out, self.option, self.committed = Path(out), option, committed
        self._fd, self._created, self._made = None, [], made  # made: a new folder its caller just created

    # ---- the lock ------------------------------------------------------------------------------
    def __enter__(self) -> "RunFolder":
        try:
            self._make_folder()
            self._lock()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make_folder(self) -> None:
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made was refused before
        self._created = [self._made] if self._made else missing  # innermost first: removed if nothing is written

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not on POSIX (Windows): no lock
            return
        path = self.out / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise CLIError(f"{self.option} {self.out} is in use by another demofusion run (PID {holder}); "
                               f"wait for it to end, or give another {self.option}") from None
            try:  # the holder before us may have removed the file after we opened it: lock the one there now
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            (self.out / LOCK_FILE).unlink(missing_ok=True)  # before unlocking: a waiter re-checks the inode
            os.close(self._fd)
            self._fd = None
        for folder in self._created:  # a run that wrote nothing leaves no folder behind
            try:
                folder.rmdir()
            except OSError:
                break

    # ---- writing -------------------------------------------------------------------------------
    def write(self, files: list, phase: int) -> None:
        """Write ``files`` ((path, write) pairs) of phase ``phase``; the first phase of a new run
        also writes ``run.json`` (among ``files``) and then removes the older run's files."""
        try:
            if self.committed:
                atomic_replace(files)
            else:
                atomic_replace(files, remove=run_files(self.out))
                self.committed, self._created = True, []
        except OSError as e:
            raise CLIError(self.write_failed(e, phase)) from None

    def write_failed(self, e: OSError, phase: int) -> str:
        why = e.strerror or str(e)
        if not self.committed:
            return (f"cannot write to {self.out} ({why}); nothing of this run was written there and any files "
                    f"it held are as they were — free space there or give another {self.option}, then run again")
        done = {1: "run.json is saved", 2: "phase 1 is saved"}.get(phase, f"phases 1–{phase - 1} are saved")
        return (f"cannot write phase {phase} to {self.out} ({why}); {done} — free space there, then "
                f"`demofusion generate --resume {self.out}` finishes the run")
