"""One run per workdir on object storage (trainer.object_lock), against the local GCS and S3
servers of tests/object_store.py: a lock object created conditionally, kept alive by a lease.

gcp-storage-emulator ignores `ifGenerationMatch` (on uploads and deletes alike), so on gs:// only the
behaviour the lock gets from reading the object first is checked here; what rests on the server
refusing a stale condition (a race between two writers) is checked where the server honours it
(moto's S3), and skipped, with that reason, where it does not.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.object_store import _server_logs, object_store  # noqa: F401  (fixtures)
from trainer import storage
from trainer.config import ConfigError
from trainer.object_lock import _Conflict, object_client
from trainer.workdir import WorkdirBusy, WorkdirLock, check_workdir

LEASE = 1.5


def _lock_info(url: str) -> dict:
    return json.loads(storage.read_text(storage.join(url, ".lock")))


def _honours_preconditions(url: str) -> bool:
    """Whether the server refuses a conditional write whose condition does not hold."""
    probe = object_client(storage.join(url, ".precondition-probe"))
    first = probe.write(b"1", None)
    try:
        probe.write(b"2", None)  # must not exist: it does
        return False
    except _Conflict:
        return True
    finally:
        probe.delete(first)
        storage.remove(storage.join(url, ".precondition-probe"))


def _write_stale_lock(url: str, pid: int = 4242, ago: float = 30.0) -> None:
    storage.write_text(storage.join(url, ".lock"), json.dumps(
        {"host": "gone-host", "pid": pid, "started": "2020-01-01T00:00:00+00:00", "command": "python x",
         "token": "someone-else", "lease_s": 60, "expires": time.time() - ago}))


def test_second_lock_is_refused_naming_the_holder_then_acquires_after_release(object_store):
    url = object_store.url("run")
    first = WorkdirLock(url, lease_s=LEASE)
    first.acquire()
    try:
        info = _lock_info(url)
        assert info["pid"] == os.getpid() and info["host"] and info["started"] and info["lease_s"] == LEASE
        assert time.time() < info["expires"] <= time.time() + LEASE
        with pytest.raises(WorkdirBusy) as e:
            WorkdirLock(url, lease_s=LEASE).acquire()
        message = str(e.value)
        assert "\n" not in message and "in use by another run" in message
        assert f"pid {os.getpid()} " in message and info["started"] in message and storage.join(url, ".lock") in message
    finally:
        first.release()
    assert not storage.exists(storage.join(url, ".lock"))  # released: the object is gone
    with WorkdirLock(url, lease_s=LEASE) as second:
        assert second.held and _lock_info(url)["pid"] == os.getpid()
    assert storage.listdir(url) == []  # nothing left behind


def test_a_renewed_lock_stays_held_past_its_lease(object_store):
    url = object_store.url("run")
    with WorkdirLock(url, lease_s=LEASE):
        first_expiry = _lock_info(url)["expires"]
        time.sleep(2.5 * LEASE)
        assert _lock_info(url)["expires"] > first_expiry  # renewed meanwhile
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()} "):
            WorkdirLock(url, lease_s=LEASE).acquire()


def test_a_stale_lock_is_taken_over_and_reported(object_store, capsys):
    url = object_store.url("run")
    _write_stale_lock(url, pid=4242)
    with WorkdirLock(url, lease_s=LEASE) as lock:
        assert lock.held and _lock_info(url)["pid"] == os.getpid()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "took over a stale lock" in line]
    assert len(lines) == 1 and "pid 4242 on host gone-host" in lines[0], err
    assert not storage.exists(storage.join(url, ".lock"))


def test_release_does_not_delete_a_lock_taken_over_meanwhile(object_store, capsys):
    url = object_store.url("run")
    a = WorkdirLock(url, lease_s=1.0)
    a.acquire()
    a._object.stop_renewing()  # a run that hangs: its lease runs out while it still thinks it holds the lock
    time.sleep(1.2)
    b = WorkdirLock(url, lease_s=LEASE)
    b.acquire()
    assert "took over a stale lock" in capsys.readouterr().err
    a.release()
    assert storage.exists(storage.join(url, ".lock")) and _lock_info(url)["token"] == b._object._token
    with pytest.raises(WorkdirBusy):
        WorkdirLock(url, lease_s=LEASE).acquire()
    b.release()
    assert not storage.exists(storage.join(url, ".lock"))


def test_a_renewal_that_finds_the_lock_taken_warns_once(object_store, capsys):
    url = object_store.url("run")
    lock = WorkdirLock(url, lease_s=0.6)
    lock.acquire()
    try:
        # someone else's lock where ours was (a run that judged ours stale, say with a skewed clock)
        storage.write_text(storage.join(url, ".lock"), json.dumps(
            {"host": "other-host", "pid": 777, "started": "now", "token": "other", "lease_s": 60,
             "expires": time.time() + 60}))
        time.sleep(1.0)  # > 2 renewal periods
    finally:
        lock.release()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "lost the lock" in line]
    assert len(warnings) == 1 and "pid 777 on host other-host" in warnings[0], warnings
    assert _lock_info(url)["pid"] == 777  # not ours: release left it alone


def test_two_runs_stealing_a_stale_lock_cannot_both_win(object_store, monkeypatch):
    """B read the stale lock; C takes it over before B writes: B's write, conditional on the version
    it read, is refused, and B then finds C's live lock."""
    url = object_store.url("run")
    if not _honours_preconditions(url):
        pytest.skip(f"the local {object_store.scheme}:// server ignores write preconditions "
                    f"(gcp-storage-emulator ignores ifGenerationMatch)")
    _write_stale_lock(url)
    b, c = WorkdirLock(url, lease_s=LEASE), WorkdirLock(url, lease_s=LEASE)
    stale = b._object.store.read()
    real_read, reads = b._object.store.read, []

    def read_then_lose_the_race():
        reads.append(1)
        if len(reads) == 1:
            c.acquire()  # C steals the lock between B's read and B's write
            return stale
        return real_read()

    monkeypatch.setattr(b._object.store, "read", read_then_lose_the_race)
    try:
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()} "):
            b.acquire()
        assert len(reads) == 2 and not b.held
        assert _lock_info(url)["token"] == c._object._token
        # the conditional delete is refused too once the object is not the version it names
        with pytest.raises(_Conflict):
            c._object.store.delete(stale[1])
        assert storage.exists(storage.join(url, ".lock"))
    finally:
        c.release()
    assert not storage.exists(storage.join(url, ".lock"))


def test_check_workdir_on_a_missing_bucket_is_one_line(object_store):
    check_workdir(object_store.url("run"))  # an existing bucket: fine, and nothing is created
    assert storage.listdir(object_store.url()) == []
    missing = f"{object_store.scheme}://no-such-bucket-{os.getpid()}/run"
    with pytest.raises(ConfigError) as e:
        check_workdir(missing)
    assert str(e.value) == (f"config key `workdir` is {missing!r}, but bucket no-such-bucket-{os.getpid()} "
                            f"does not exist")
