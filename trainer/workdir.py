"""One run per workdir: an exclusive OS lock on `WORKDIR/.lock`, held for the life of the run.

Two runs on one workdir would overwrite each other's checkpoints (and the second one's start-up
clean-up would delete the first one's in-flight save), so `trainer.train` takes this lock before it
writes anything into the workdir or opens its checkpoints. The lock is `flock(2)` on an open file:
the kernel releases it when the process ends, however it ends (SIGKILL, OOM, a crash), so a stale
lock file never blocks the next run. The file records who holds it (host, pid, start time,
command), which is what a refused run prints.

In a multi-process job only process 0 takes the lock; `lock_workdir` then makes every process
agree (one small all-gather), so that when process 0 is refused, all of them stop with the same
config error instead of the others hanging in their first collective.

A run that ends releases the lock and removes the lock file (and the workdir itself when it was
created for the lock and is still empty, so a refused or misconfigured run leaves nothing behind).

A workdir on object storage (`gs://bucket/...`, `s3://bucket/...`) has no file locks; there the
lock is the object `WORKDIR/.lock`, taken with a conditional create and kept alive by a lease (see
`trainer.object_lock`). Nothing there is a folder: no folders are created or removed for it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any

from trainer import storage
from trainer.config import ConfigError

LOCK_NAME = ".lock"


class WorkdirBusy(ConfigError):
    """Another live run holds the workdir's lock."""


class WorkdirLock:
    """`acquire()` takes `WORKDIR/.lock` (or raises WorkdirBusy naming the holder); `release()` frees it.

    `lease_s` only matters for a workdir on object storage (see `trainer.object_lock`).
    """

    def __init__(self, workdir: str, lease_s: float | None = None):
        self._object: Any = None  # trainer.object_lock.ObjectLock on a bucket
        if storage.is_remote(workdir):
            self.workdir = storage.absolute(workdir)
            self.path = storage.join(self.workdir, LOCK_NAME)
            from trainer.object_lock import LEASE_S, ObjectLock

            self._object = ObjectLock(self.workdir, self.path, LEASE_S if lease_s is None else lease_s)
        else:
            self.workdir = os.path.abspath(workdir)
            self.path = os.path.join(self.workdir, LOCK_NAME)
        self._fd: int | None = None
        self._created: list[str] = []  # folders created for the lock, outermost first

    @property
    def held(self) -> bool:
        if self._object is not None:
            return self._object.held
        return self._fd is not None

    def acquire(self) -> None:
        if self._object is not None:
            self._object.acquire()
            return
        if self._fd is not None:
            return
        self._make_workdir()
        try:
            fd = self._lock_file()
        except BaseException:
            self._remove_created()
            raise
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        except OSError:
            self.release()
            raise

    def release(self) -> None:
        if self._object is not None:
            self._object.release()
            return
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlinked while still locked: whoever opened this file meanwhile sees, once it gets the
            # lock, that the path no longer names it, and opens the new one (see `_lock_file`).
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)
        self._remove_created()

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ----------------------------------------------------------------------------------------

    def _make_workdir(self) -> None:
        missing = []
        d = self.workdir
        while not os.path.isdir(d):
            missing.append(d)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
                self._created.append(d)
            except FileExistsError:
                pass

    def _remove_created(self) -> None:
        for d in reversed(self._created):
            try:
                os.rmdir(d)  # only when empty: never removes anything another run put there
            except OSError:
                break
        self._created = []

    def _lock_file(self) -> int:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # a run that created the workdir ended and removed it, still empty
                self._make_workdir()
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise WorkdirBusy(busy_message(self.workdir, self.path, holder)) from None
                raise
            if _same_file(fd, self.path):
                return fd
            os.close(fd)  # the previous holder removed this file while we waited: lock the new one
        raise OSError(f"could not lock {self.path}: the file keeps being replaced")


def holder_info() -> dict[str, Any]:
    """Who holds a lock: what a refused run prints."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:500]}


def busy_message(workdir: str, path: str, holder: str) -> str:
    try:
        info = json.loads(holder)
        who = (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
               f"{info.get('started', '?')}")
    except (ValueError, AttributeError):
        who = "holder not recorded yet" if not holder.strip() else f"holder: {holder.strip()[:200]}"
    return (f"workdir {workdir} is in use by another run ({who}; lock {path}): only one run may use a "
            f"workdir at a time; wait for that run to end or stop it, or set another `workdir`")


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
    except OSError:
        return ""


def existing_ancestor(path: str) -> str:
    """`path` itself or its nearest ancestor that exists: where missing folders would be created."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return probe


def unwritable_reason(path: str) -> str | None:
    """Why files or folders cannot be created at `path` (None when they can), checked on the
    nearest existing ancestor without creating anything.

    For a gs:// or s3:// URL: a StorageError (a ConfigError) when this install has no client for it,
    and the reason when its bucket does not exist (buckets are never created here)."""
    if storage.is_remote(path):
        from trainer.object_lock import bucket_missing

        return bucket_missing(os.fspath(path))
    probe = existing_ancestor(path)
    if not os.path.isdir(probe):
        return f"{probe} is {'a file' if os.path.exists(probe) else 'not a directory'}, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def check_workdir(workdir: str) -> None:
    """A workdir that cannot hold a run (a file, or not writable) is a ConfigError; nothing is created."""
    if not str(workdir).strip():
        raise ConfigError("config key `workdir` must not be empty")
    reason = unwritable_reason(workdir)
    if reason is not None:
        raise ConfigError(f"config key `workdir` is {workdir!r}, but {reason}")


def lock_workdir(workdir: str, lease_s: float | None = None) -> WorkdirLock | None:
    """Process 0 takes the workdir lock; every process raises the same ConfigError when it cannot.

    Returns the held lock on process 0 (release it when the run ends), None on the others.
    Call after `jax.distributed` has started and before anything is written to the workdir.
    """
    import jax

    lock = None
    error: BaseException | None = None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir, lease_s)
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 - shared with the other processes below, then re-raised
            error = e
    if jax.process_count() > 1:
        message = first_error(None if error is None else (str(error) or type(error).__name__))
        if message is not None:
            if error is not None:
                raise error
            raise ConfigError(message)
    elif error is not None:
        raise error
    return lock


def first_error(message: str | None, size: int = 2048) -> str | None:
    """The first process's error message (None when no process has one), known to every process.

    One all-gather of a fixed-size row per process, so processes that found no error stop too.
    """
    import numpy as np
    from jax.experimental import multihost_utils

    row = np.zeros(size + 1, np.uint8)
    if message is not None:
        raw = message.encode("utf-8")[:size]
        row[0] = 1
        row[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, size + 1)
    for r in rows:
        if r[0]:
            return bytes(r[1:]).rstrip(b"\0").decode("utf-8", errors="replace")
    return None
