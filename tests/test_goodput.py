"""Goodput: a launch's wall time by category, and the account across a killed and resumed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, SMALL_DEFAULT, read_metrics, tiny_config
from trainer.goodput import CATEGORIES, read_launches


def test_categories_add_up_to_the_wall_time_in_records_tensorboard_and_the_account(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.train import train

    cfg = tiny_config(tmp_path, "train.steps=6", "train.log_every=2", "train.eval_every=3", "checkpoint.every=3")
    train(cfg)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        parts = sum(r[f"goodput_{c}_s"] for c in CATEGORIES)
        assert abs(parts - r["goodput_wall_s"]) < 1e-6 * max(1.0, r["goodput_wall_s"])
        assert 0 < r["goodput"] < 1 and r["goodput"] == pytest.approx(r["goodput_train_s"] / r["goodput_wall_s"])
    last = records[-1]
    assert last["goodput_compile_s"] > 0 and last["goodput_eval_s"] > 0 and last["goodput_checkpoint_s"] > 0
    assert last["goodput_recompute_s"] == 0
    [account] = read_launches(str(tmp_path))
    assert account["status"] == "finished" and (account["start_step"], account["last_step"]) == (0, 6)
    assert abs(sum(account["seconds"].values()) - account["wall_s"]) < 1e-6 * account["wall_s"]
    assert account["wall_s"] >= last["goodput_wall_s"]  # the final account includes the shutdown
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"goodput/goodput", "goodput/train_s", "goodput/data_wait_s"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_a_killed_run_resumed_reports_the_recomputed_steps_and_goodput_below_one(tmp_path):
    """Default data path (embedded corpus, packing): kill -9 at step 10 with a checkpoint at 6.

    The run is killed while it waits for a batch that never comes (tests/faulty_train.py stalls the
    13th; the loop reads ahead, so the last step logged is 10). Where it dies does not depend on how
    fast the test polls: racing 11 ms steps, CI once saw step 12 first (stop 19).
    """
    workdir = tmp_path / "run"
    common = [*SMALL_DEFAULT, f"workdir={workdir}", "train.steps=16", "checkpoint.every=6",
              "checkpoint.async_save=false", "train.batch_size=16"]
    args = [sys.executable, "-m", "trainer.train", *common]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    stalled = {**env, "STALL_PROCESS": "0", "STALL_AT_BATCH": "13"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.faulty_train", *common], cwd=ROOT, env=stalled,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        steps: list[int] = []
        while time.time() < deadline and proc.poll() is None and not (steps and max(steps) >= 10):
            steps = [r["step"] for r in read_metrics(workdir)] if (workdir / "metrics.jsonl").exists() else []
            time.sleep(0.05)
        time.sleep(1.0)  # nothing more is logged: the run waits for batch 13
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        proc.kill()
    killed_at = max(r["step"] for r in read_metrics(workdir))
    assert killed_at == 10 and (workdir / "checkpoints" / "6").is_dir()

    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step(s) recomputed after resuming" in done.stdout

    first, second = read_launches(str(workdir))
    assert first["status"] == "running"  # killed: its last account, written at its last log
    assert second["status"] == "finished" and second["start_step"] == 6
    assert second["recomputed_steps"] == killed_at - 6
    seconds = second["seconds"]
    assert abs(sum(seconds.values()) - second["wall_s"]) < 1e-6 * second["wall_s"]
    assert seconds["recompute"] > 0 and second["goodput"] < 1
    # Consistent with the timings: the recomputed steps took about as long as the others did (the
    # launch's first step, recomputed too, is its compile step).
    per_step_train = seconds["train"] / (16 - killed_at)
    per_step_recompute = seconds["recompute"] / (second["recomputed_steps"] - 1)
    assert 0.2 < per_step_recompute / per_step_train < 5, (seconds, killed_at)

    report = subprocess.run([sys.executable, "-m", "trainer.goodput", str(workdir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert f"2 launch(es); {killed_at - 6} step(s) recomputed after resuming" in report.stdout
    print(report.stdout)
