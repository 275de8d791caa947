"""One run per output folder: an OS-level lock on ``<output_dir>/.imgcls.lock``.

Two runs writing into the same output folder would overwrite each other's
checkpoints, history and model. ``lock_output_dir`` takes an exclusive,
non-blocking ``flock`` on a lock file in the folder for as long as the run
lives; a second run fails at once with ``OutputDirInUse``, naming the run that
holds it. The operating system releases the lock when the holder exits, however
it exits (a crash, SIGKILL, the OOM killer), so a stale lock never blocks the
next run. The lock file itself stays; its content (pid, host, start time) is
only there to say who holds the lock.

On network filesystems ``flock`` is as good as the filesystem's lock support
(Linux NFS clients map it to NFS locks); where the filesystem has none, the run
goes ahead with a warning.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go unlocked
    fcntl = None

LOCK_FILE = ".imgcls.lock"


class OutputDirInUse(RuntimeError):
    """Another live process holds the output folder's lock."""


class RunLock:
    """A held output folder lock; ``release()`` it, or use it as a context manager (released on exit).

    Neither done, it is held until the process exits (dropping the object does not release it)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up (idempotent). The lock file stays: deleting it would let a run that opened it just
        before lock a file no longer in the folder while a third run locks a new one."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no stale "in use by" information
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder(file: Path) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        info = json.loads(file.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:  # it has just taken the lock and not yet written
        return "another process"
    return f"pid {info['pid']} on host {info.get('host', '?')}, since {info.get('started', '?')}"


def lock_output_dir(path: str | Path, setting: str = "train.output_dir") -> RunLock:
    """Lock the output folder ``path`` (created if missing) for this process; OutputDirInUse at once when another
    live process holds it. ``setting`` is the option that names the folder, for the message."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    file = path / LOCK_FILE
    if fcntl is None:
        return RunLock(file, None)
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputDirInUse(
                f"{setting} {path} is in use by another run ({_holder(file)}); wait for it to finish, "
                f"or set {setting} to another folder"
            ) from None
        warnings.warn(f"cannot lock {file} ({exc}): its filesystem has no file locks, so nothing stops another "
                      f"run from writing into {path} at the same time", stacklevel=2)
        return RunLock(file, None)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return RunLock(file, fd)
