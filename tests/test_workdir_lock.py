"""One run per workdir (trainer.workdir): an OS lock taken before anything is written, naming its holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import CONFIGS, ROOT

TINY = str(CONFIGS / "tiny.yaml")

# A stand-in for a live run: holds the workdir lock (as trainer.train does) until killed.
HOLDER = r"""
import sys, time
from trainer.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    for k in [k for k in env if k.startswith(("TRAINER_", "SLURM_", "JAX_COORDINATOR"))]:
        env.pop(k)
    env.update(extra)
    return env


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of `tmp_path / "run"`."""
    workdir = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    yield workdir, p
    if p.poll() is None:
        p.kill()
    p.wait()


def test_lock_is_exclusive_records_its_holder_and_cleans_up(tmp_path):
    from trainer.workdir import WorkdirBusy, WorkdirLock

    workdir = tmp_path / "a" / "b"
    first = WorkdirLock(str(workdir))
    first.acquire()
    info = json.loads((workdir / ".lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] and info["started"]
    with pytest.raises(WorkdirBusy) as e:
        WorkdirLock(str(workdir)).acquire()
    message = str(e.value)
    assert "\n" not in message
    assert str(workdir) in message and f"pid {os.getpid()}" in message and info["started"] in message
    first.release()
    # The folders created for the lock are gone again (a refused run leaves nothing behind) ...
    assert not (tmp_path / "a").exists()
    # ... and the workdir is free.
    with WorkdirLock(str(workdir)):
        assert (workdir / ".lock").exists()
    # A workdir that existed is kept; only the lock file goes.
    workdir.mkdir(parents=True)
    (workdir / "keep.txt").write_text("x")
    with WorkdirLock(str(workdir)):
        pass
    assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]


def test_a_killed_holder_frees_the_lock(holder):
    from trainer.workdir import WorkdirBusy, WorkdirLock

    workdir, p = holder
    with pytest.raises(WorkdirBusy, match=f"pid {p.pid} "):
        WorkdirLock(str(workdir)).acquire()
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (workdir / ".lock").exists()  # a stale file: the kernel released the lock itself
    with WorkdirLock(str(workdir)) as lock:
        assert lock.held
        assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()


def test_lock_file_replaced_while_waiting_is_not_trusted(tmp_path, monkeypatch):
    """A run that ends unlinks the lock file. A newcomer that opened the old file just before gets
    the lock of an unlinked file; it must notice and lock the file now at the path instead."""
    import fcntl

    import trainer.workdir as wd

    workdir = tmp_path / "run"
    a = wd.WorkdirLock(str(workdir))
    a.acquire()
    real_flock, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:
            a.release()  # the holder ends between the newcomer's open() and its flock()
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(wd.fcntl, "flock", flock)
    b = wd.WorkdirLock(str(workdir))
    b.acquire()
    monkeypatch.undo()
    assert len(calls) == 2  # the first, unlinked file was not trusted: the new one was locked
    assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(wd.WorkdirBusy):
        wd.WorkdirLock(str(workdir)).acquire()
    b.release()


@pytest.mark.slow
def test_second_trainer_on_a_busy_workdir_exits_2_at_once_touching_nothing(holder):
    workdir, p = holder
    # What the live run has in flight: the second run's start-up clean-up must not delete it.
    inflight = workdir / "checkpoints" / "5.orbax-checkpoint-tmp-1234"
    inflight.mkdir(parents=True)
    before = sorted(str(x.relative_to(workdir)) for x in workdir.rglob("*"))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "trainer.train", TINY, f"workdir={workdir}"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    print(f"refused in {elapsed:.1f}s")
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "in use by another run" in errors[0] and f"pid {p.pid} " in errors[0] and str(workdir) in errors[0]
    assert inflight.is_dir()
    assert sorted(str(x.relative_to(workdir)) for x in workdir.rglob("*")) == before
    assert "step " not in r.stdout  # refused before training


@pytest.mark.slow
def test_every_process_of_a_job_stops_when_process_0_is_refused(holder):
    workdir, p = holder
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "launch.local", "-n", "2", "--grace", "5", "--", TINY,
                        f"workdir={workdir}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    elapsed = time.monotonic() - t0
    print(f"2-process job refused in {elapsed:.1f}s")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    for i in range(2):
        assert any(line.startswith(f"[p{i}] config error:") and "in use by another run" in line
                   and f"pid {p.pid} " in line for line in out.splitlines()), out
    assert "p0=2, p1=2" in out, out  # both stopped with the config error, neither was killed
