"""Nothing lost, nothing hung (trainer.lifecycle): closed stdout, orphans, deadlines on the way out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, ROOT, read_metrics

TINY = str(CONFIGS / "tiny.yaml")


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    for k in [k for k in env if k.startswith(("TRAINER_", "SLURM_", "JAX_COORDINATOR"))]:
        env.pop(k)
    env.update(extra)
    return env


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(") ", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return kids


def _wait_gone(pids, timeout):
    t0 = time.monotonic()
    while any(_alive(p) for p in pids) and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    return time.monotonic() - t0


def _saved_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


# ----------------------------------------------------------------------------------- units


def test_pipe_safe_stream_drops_output_once_the_reader_is_gone():
    from trainer.lifecycle import _PipeSafe

    r, w = os.pipe()
    stream = _PipeSafe(os.fdopen(w, "w", buffering=1))
    stream.write("first\n")
    assert os.read(r, 100) == b"first\n"
    os.close(r)
    stream.write("lost\n")  # EPIPE: dropped, not raised
    stream.flush()
    assert stream.broken
    print("more", file=stream, flush=True)
    stream.close()


def test_exit_deadline_ends_a_stuck_process_with_code_6():
    code = ("import time; from trainer.lifecycle import arm_exit_deadline\n"
            "arm_exit_deadline(1, why='a test')\n"
            "time.sleep(60)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 6, r.stderr
    assert "still running 1s after a test" in r.stderr and "code 6" in r.stderr
    assert elapsed < 20


def test_child_dies_with_its_parent():
    """die_with_parent (launch.local's preexec_fn): SIGKILL the parent, the child gets SIGTERM."""
    parent = ("import subprocess, sys, time\n"
              "from trainer.lifecycle import die_with_parent\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
              " preexec_fn=die_with_parent())\n"
              "print(p.pid, flush=True)\n"
              "time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        child = int(p.stdout.readline())
        assert _alive(child)
        p.kill()
        p.wait()
        assert _wait_gone([child], 10) < 10, "the child outlived its parent"
    finally:
        if p.poll() is None:
            p.kill()


# ----------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_closed_stdout_does_not_kill_the_run(tmp_path):
    """`trainer.train ... | head -1`: the run goes on to its end, saves, logs, exits 0."""
    workdir = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "trainer.train", TINY, f"workdir={workdir}", "train.log_every=1"],
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = p.stdout.readline()
        assert first, "no output"
        p.stdout.close()  # like `head -1`: the reader is gone
        _, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    err = err.decode(errors="replace")
    assert p.returncode == 0, err[-3000:]
    assert "BrokenPipeError" not in err and "Traceback" not in err, err[-3000:]
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, 21))
    assert _saved_steps(workdir) == [20]


@pytest.mark.slow
def test_killing_the_launcher_leaves_no_orphans(tmp_path):
    """SIGKILL to launch.local running 2 trainers: they save at an agreed step and are gone in
    bounded time (at most --grace seconds after the launcher died, plus the poll)."""
    workdir = tmp_path / "run"
    grace = 30
    p = subprocess.Popen([sys.executable, "-m", "launch.local", "-n", "2", "--grace", str(grace), "--", TINY,
                          f"workdir={workdir}", "train.steps=100000", "train.log_every=5"],
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("[p0] step "):
                break
        assert seen and seen[-1].startswith("[p0] step "), "".join(seen)
        trainers = _children(p.pid)
        assert len(trainers) == 2, trainers
        p.send_signal(signal.SIGKILL)
        p.wait()
        gone_after = _wait_gone(trainers, 120)
    finally:
        if p.poll() is None:
            p.kill()
        for pid in _children(p.pid) if p.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
    leftover = [pid for pid in trainers if _alive(pid)]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    print(f"trainers gone {gone_after:.1f}s after the launcher was killed; saved {_saved_steps(workdir)}")
    assert not leftover, f"orphans still running {gone_after:.0f}s after the launcher died: {leftover}"
    assert gone_after < grace + 15
    assert _saved_steps(workdir), "the trainers did not save before exiting"
    assert _lock_free(workdir)  # the kernel released it with the trainers


def _lock_free(workdir: Path) -> bool:
    from trainer.workdir import WorkdirLock

    with WorkdirLock(str(workdir)):
        return True


# Process 1 fails at its first log step (inside the per-log all-gather of the data and straggler figures, where
# process 0 then waits for it): the job must not hang.
FAIL_IN_PROCESS_1 = r"""
import sys
import trainer.train as t
real = t._interval_stats
def failing(pipeline, split):
    import jax
    if jax.process_index() == 1:
        raise RuntimeError("injected failure in process 1")
    return real(pipeline, split)
t._interval_stats = failing
from trainer.lifecycle import run_main
sys.argv = ["trainer.train", *sys.argv[1:]]
run_main(t.main)
"""


@pytest.mark.slow
def test_a_failed_peer_does_not_hang_the_job(tmp_path):
    from launch.local import free_port

    deadline = 10
    coordinator = f"127.0.0.1:{free_port()}"
    workdir = tmp_path / "run"
    procs, logs = [], []
    for i in range(2):
        args = [TINY, f"workdir={workdir}", "train.steps=100000", "train.log_every=5", "distributed.enabled=on",
                f"distributed.coordinator={coordinator}", "distributed.num_processes=2",
                f"distributed.process_id={i}", "runtime.cpu_devices=1"]
        cmd = [sys.executable, "-u", *(["-c", FAIL_IN_PROCESS_1] if i == 1 else ["-m", "trainer.train"]), *args]
        log = tmp_path / f"p{i}.log"
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                      env=_env(JAX_PLATFORMS="cpu", JAX_COORDINATOR_BIND_ADDRESS=coordinator,
                                               TRAINER_SHUTDOWN_DEADLINE=str(deadline))))
    try:
        failed_at = None
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600 and any(p.poll() is None for p in procs):
            if failed_at is None and "injected failure in process 1" in logs[1].read_text():
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > deadline + 60:
                break
            time.sleep(0.1)
        ended = time.monotonic()
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = [log.read_text() for log in logs]
    assert failed_at is not None, text[1][-3000:]
    print(f"both processes gone {ended - failed_at:.1f}s after process 1 failed; exit codes {codes}")
    assert None not in codes, f"a process hung: exit codes {codes}\n" + text[0][-2000:] + text[1][-2000:]
    assert ended - failed_at < deadline + 30
    assert codes[1] != 0 and codes[0] != 0, codes
    # Process 1 failed, then waited for process 0 in jax.distributed's shutdown: the deadline ended it.
    assert codes[1] == 6 and "exiting with code 6" in text[1], text[1][-2000:]
