"""One run per directory: lock files for output and checkpoint directories.

A second job on the same checkpoint directory would delete the first job's in-flight
checkpoint; a second job on the same output directory would mix artefacts of two runs. Rank 0 of a
job takes ``DIR/.recsys_mtl.lock`` (host, pid, start time, command) for each directory with an
exclusive create and removes it when the job ends. A lock left by a process that is gone
(a killed job, an elastic restart) is recovered when it was taken on this host and its pid is no
longer running; a lock from another host cannot be checked from here, so the error names the file
to delete once that job is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".recsys_mtl.lock"

__all__ = ["DirLock", "LockError", "LOCK_FILE"]


class LockError(RuntimeError):
    """The directory is in use by another run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class DirLock:
    """An exclusive lock on ``directory`` for this process.

    Args:
        directory (str | Path): the directory to lock (created if needed).
        what (str): the flag that named it, for messages (``--output-dir``, ``--checkpoint-dir``).

    Example::

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with DirLock(d, "--output-dir"):
        ...     (Path(d) / LOCK_FILE).exists()
        True
        >>> (Path(d) / LOCK_FILE).exists()
        False
    """

    def __init__(self, directory: str | Path, what: str) -> None:
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK_FILE
        self.held = False

    def holder(self) -> dict | None:
        """The recorded holder of the lock, or None when unlocked (or unreadable)."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def stale(self, info: dict | None) -> bool:
        """Whether a lock recorded as ``info`` belongs to a process of this host that has exited."""
        return info is not None and info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1)))

    def _busy(self, info: dict) -> LockError:
        return LockError(
            f"{self.what} {self.directory} is in use by another run: pid {info.get('pid')} on host "
            f"{info.get('host')} since {info.get('started')} (lock {self.path}). Use another directory, "
            f"or delete the lock file once that job is known to be gone"
        )

    def check_free(self) -> None:
        """Raises :class:`LockError` if a live process holds the lock (without taking it)."""
        info = self.holder()
        if info is not None and not self.stale(info):
            raise self._busy(info)

    def acquire(self) -> "DirLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:500]}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if info is None or self.stale(info):  # half-written, or its process is gone: take it over
                    self.path.unlink(missing_ok=True)
                    continue
                if info.get("host") == me["host"] and int(info.get("pid", -1)) == me["pid"]:
                    self.held = True  # this process already holds it
                    return self
                raise self._busy(info) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise LockError(f"{self.what} {self.directory}: could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            info = self.holder()
            if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
