"""Hang detection: a process whose input blocks forever, in a 2-process job, on the default data path."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, SMALL_DEFAULT, read_metrics
from trainer.watchdog import EXIT_HANG, HangWatchdog


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_timeout_is_armed_by_the_first_step_and_follows_the_median():
    dog = HangWatchdog("unused", 0, None, poll_s=3600)
    try:
        assert dog.timeout() is None  # compiling: not armed
        dog.step_done(1)
        assert dog.timeout() == 300.0  # no step time yet: the 5-minute floor
        dog._step_times = [40.0, 50.0, 60.0]
        assert dog.timeout() == 500.0  # 10 x the median
    finally:
        dog.close()
    fixed = HangWatchdog("unused", 0, 12.5, poll_s=3600)
    fixed.step_done(3)
    assert fixed.timeout() == 12.5
    fixed.close()
    assert HangWatchdog("unused", 0, 0).timeout() is None  # 0: off (no thread)


@pytest.mark.slow
def test_a_blocked_input_ends_both_processes_with_the_hang_code_and_a_relaunch_resumes(tmp_path):
    workdir = tmp_path / "run"
    args = [*SMALL_DEFAULT, f"workdir={workdir}", "train.steps=12", "checkpoint.every=4", "train.hang_timeout=20"]
    cmd = [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "2", "--grace", "60",
           "--module", "tests.faulty_train", "--", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(STALL_PROCESS="1", STALL_AT_BATCH="7"), capture_output=True,
                          text=True, timeout=600)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_HANG, out[-4000:]
    assert f"p0={EXIT_HANG}" in out and f"p1={EXIT_HANG}" in out, out[-3000:]  # both processes, by the watchdog
    assert elapsed < 300, elapsed
    stacks = {p: (workdir / "hang" / f"{p}.txt").read_text() for p in (0, 1)}
    # Process 1 names the frame it is stuck in; process 0 waits for it in the step after.
    assert "_faulty_next" in stacks[1] and "faulty_train.py" in stacks[1], stacks[1][:3000]
    assert "no step completed for" in stacks[0] and "last completed step" in stacks[0]
    trained = [r["step"] for r in read_metrics(workdir)]
    assert max(trained) < 12 and (workdir / "checkpoints" / "4").is_dir()

    # Relaunch without the fault: resumes from the last checkpoint and finishes.
    relaunch = [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "2", "--",
                *args]
    proc = subprocess.run(relaunch, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "resuming from checkpoint step 4" in out
    assert (workdir / "checkpoints" / "12").is_dir()


@pytest.mark.slow
def test_a_slowed_process_is_named_the_straggler_with_its_lag(tmp_path):
    """2 processes on the default data; process 1 waits 0.3 s more for every batch."""
    workdir = tmp_path / "run"
    args = [*SMALL_DEFAULT, f"workdir={workdir}", "train.steps=8", "train.log_every=4", "checkpoint.every=0",
            "checkpoint.save_final=false"]
    cmd = [sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "2", "--module",
           "tests.faulty_train", "--", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(SLOW_PROCESS="1", SLOW_SECONDS="0.3"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [4, 8]
    for r in records:
        assert r["slowest_process"] == 1
        assert 0.1 < r["straggler_lag_s"] < 1.0, r  # the others wait for its 0.3 s per batch
        # Process 0 waits for process 1 (in the step's collectives, or in dispatch once the queue is full).
        assert r["device_s"] + r["dispatch_s"] > 0.1 and r["data_wait_s"] < 0.1
