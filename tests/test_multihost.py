"""Several processes (through launch.local) against one process: same losses, same data."""

import shutil

import jax
import numpy as np
import pytest

from tests.conftest import CONFIGS, read_metrics, run_cli, tiny_config
from trainer.data import build_pipeline
from trainer.train import train

MESH = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
COMMON = ("train.log_every=1", "train.batch_size=16", "model.dropout=0.1")


def _launch(workdir, *overrides, processes=2, devices=4):
    proc = run_cli(["-m", "launch.local", "--processes", str(processes), "--devices-per-process", str(devices),
                    "--", str(CONFIGS / "tiny.yaml"), f"workdir={workdir}", *COMMON, *overrides], timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


@pytest.mark.slow
def test_two_processes_match_one_process_and_checkpoints_cross_over(tmp_path):
    # 1 process x 8 devices, 5 steps straight: the reference.
    train(tiny_config(tmp_path / "one", *COMMON, *MESH, "train.steps=5", "checkpoint.every=3"), devices=jax.devices())
    reference = _losses(tmp_path / "one")

    # 2 processes x 4 devices, first 3 steps: the same losses.
    two = tmp_path / "two"
    _launch(two, *MESH, "train.steps=3", "checkpoint.every=3")
    losses = _losses(two)
    assert sorted(losses) == [1, 2, 3]
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)], atol=1e-5, rtol=0)

    # The 2-process checkpoint resumes in 1 process...
    two_to_one = tmp_path / "two_to_one"
    shutil.copytree(two, two_to_one)
    train(tiny_config(two_to_one, *COMMON, *MESH, "train.steps=5", "checkpoint.every=3"), devices=jax.devices())
    resumed = _losses(two_to_one)
    np.testing.assert_allclose([resumed[4], resumed[5]], [reference[4], reference[5]], atol=1e-5, rtol=0)

    # ...and the 1-process checkpoint (step 3) resumes in 2 processes.
    one_to_two = tmp_path / "one_to_two"
    shutil.copytree(tmp_path / "one", one_to_two)
    shutil.rmtree(one_to_two / "checkpoints" / "5")
    (one_to_two / "metrics.jsonl").unlink()
    proc = _launch(one_to_two, *MESH, "train.steps=5", "checkpoint.every=3")
    assert "resuming from checkpoint step 3" in proc.stdout
    resumed = _losses(one_to_two)
    assert sorted(resumed) == [4, 5]
    np.testing.assert_allclose([resumed[4], resumed[5]], [reference[4], reference[5]], atol=1e-5, rtol=0)


def test_each_example_is_consumed_once_per_epoch_across_two_processes(tmp_path):
    """The two processes' shards of an epoch are disjoint and together are the whole epoch."""
    cfg = tiny_config(tmp_path, "data.synthetic_train_examples=64", "data.pack=false").data
    batch, steps = 16, 64 // 16

    def rows(process_index, process_count):
        pipeline = build_pipeline(cfg, split="train", global_batch_size=batch, seed=0, process_index=process_index,
                                  process_count=process_count, vocab_size=32)
        out = [tuple(r[r > 0]) for _ in range(steps) for r in next(pipeline)["inputs"]]
        pipeline.close()
        return out

    p0, p1 = rows(0, 2), rows(1, 2)
    assert len(p0) == len(p1) == 32
    assert not set(p0) & set(p1)
    assert sorted(p0 + p1) == sorted(rows(0, 1))  # the same epoch a single process sees
    assert len(set(p0 + p1)) == 64


@pytest.mark.slow
def test_sigterm_to_two_processes_saves_at_one_agreed_step(tmp_path):
    """SIGTERM (as Slurm or a TPU maintenance event sends it) reaches both processes; they agree on
    a step through JAX's preemption sync point, save there together and exit 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "1",
                             "--", str(CONFIGS / "tiny.yaml"), f"workdir={tmp_path}", "train.steps=100000",
                             "train.log_every=1", "checkpoint.every=0", "mesh.fsdp=2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] >= 3, out[-4000:]
    assert f"preempted: saved a checkpoint at step {saved[0]}" in out
    assert "p0=0, p1=0" in out  # both processes exited cleanly
