"""Preemption under the defaults (embedded corpus, packing on): SIGTERM or Ctrl-C at a random
step, relaunch, and every logged loss equals an uninterrupted run's."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, read_metrics
from tests.conftest import SMALL_DEFAULT as BASE_DEFAULT

# The default data path with a small model (tests.conftest), rows of 48, dropout on, no checkpoints.
SMALL_DEFAULT = (*BASE_DEFAULT, "data.inputs_length=48", "data.targets_length=48", "model.dropout=0.1",
                 "checkpoint.every=0")
STEPS = 40  # the signal lands within the first 20; JAX's sync point may pick a later step


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # each trainer sets its own devices
    return env


def _train(args, *, launch=None):
    cmd = [sys.executable, "-m", "trainer.train", *args]
    if launch:
        cmd = [sys.executable, "-m", "launch.local", "--processes", str(launch), "--devices-per-process", "1", "--",
               *args]
    return cmd


def _run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _interrupt(cmd, workdir, sig, at_least):
    """Starts `cmd`, waits for `at_least` logged steps, sends `sig`; returns the output."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = workdir / "metrics.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= at_least:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    return out


def _losses(workdir):
    records = read_metrics(workdir)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_one_process_then_resume_is_bitwise(tmp_path, sig):
    args = [*SMALL_DEFAULT, f"train.steps={STEPS}", "runtime.cpu_devices=1"]
    _run(_train([*args, f"workdir={tmp_path / 'straight'}"]))
    straight = _losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, STEPS + 1))

    at = random.Random().randint(2, STEPS // 2)  # a random step; the signal lands anywhere in the loop
    work = tmp_path / "interrupted"
    out = _interrupt(_train([*args, f"workdir={work}"]), work, sig, at)
    (saved,) = _saved_steps(work)
    assert at <= saved < STEPS, out[-2000:]
    assert f"saved a checkpoint at step {saved}" in out
    _run(_train([*args, f"workdir={work}"]))
    resumed = _losses(work)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in sorted(resumed)] == [straight[s] for s in sorted(straight)], f"interrupted at {at}"


@pytest.mark.slow
def test_sigterm_two_processes_then_resume_matches_one_process(tmp_path):
    args = [*SMALL_DEFAULT, f"train.steps={STEPS}", "mesh.fsdp=2"]
    _run(_train([*args, "runtime.cpu_devices=2", f"workdir={tmp_path / 'straight'}"]))
    straight = _losses(tmp_path / "straight")

    at = random.Random().randint(2, STEPS // 2)
    work = tmp_path / "two"
    out = _interrupt(_train([*args, f"workdir={work}"], launch=2), work, signal.SIGTERM, at)
    (saved,) = _saved_steps(work)
    assert at <= saved < STEPS and "p0=0, p1=0" in out, out[-3000:]
    _run(_train([*args, f"workdir={work}"], launch=2))
    resumed = _losses(work)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [straight[s] for s in sorted(straight)],
                               atol=1e-6, rtol=0, err_msg=f"interrupted at {at}")
