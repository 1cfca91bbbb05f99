"""metrics.jsonl stays one record per line and one record per step across crashes and resumes; the
logged learning rate is the one the optimizer applied."""

import json

import numpy as np
import pytest

from tests.conftest import nonfinite_loss_on_batch, read_metrics, tiny_config
from trainer.metrics import MetricsWriter, repair_jsonl


def _lines(path):
    return path.read_text().splitlines()


def test_a_line_cut_mid_write_is_dropped_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "tra')
    writer = MetricsWriter(str(tmp_path))
    writer.write({"step": 2, "split": "train", "loss": 1.5})
    writer.close()
    records = [json.loads(line) for line in _lines(path)]  # every line parses: nothing glued together
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 1.5)]


def test_resume_drops_the_steps_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logged = [{"step": s, "split": "train", "loss": float(s)} for s in (5, 10, 15, 20)]
    logged.insert(2, {"step": 10, "split": "eval", "loss": 0.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in logged) + "not json but complete\n")
    writer = MetricsWriter(str(tmp_path), resume_step=10)  # the checkpoint was at step 10
    for s in (15, 20):
        writer.write({"step": s, "split": "train", "loss": s + 0.5})
    writer.close()
    lines = _lines(path)
    assert "not json but complete" in lines  # complete lines that are not records are left alone
    records = [json.loads(line) for line in lines if line.startswith("{")]
    steps = [(r["step"], r["split"]) for r in records]
    assert steps == [(5, "train"), (10, "train"), (10, "eval"), (15, "train"), (20, "train")]
    assert len(steps) == len(set(steps))  # no step logged twice
    assert [r["loss"] for r in records][-2:] == [15.5, 20.5]
    assert not list(tmp_path.glob("metrics.jsonl.tmp*"))  # rewritten atomically, no leftovers


def test_repair_leaves_a_good_file_untouched(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train"}\n')
    before = path.stat().st_mtime_ns
    assert repair_jsonl(str(path), resume_step=1) == 0
    assert path.stat().st_mtime_ns == before
    assert repair_jsonl(str(tmp_path / "missing.jsonl")) == 0


@pytest.mark.slow
def test_resumed_training_logs_every_step_once(tmp_path):
    """Crash after step 6 with a checkpoint at 4 (simulated by metrics past it and a cut line):
    the resumed run's metrics.jsonl has each step exactly once."""
    import jax

    from trainer.train import train

    one = jax.devices()[:1]
    common = ("train.log_every=1", "checkpoint.every=4", "checkpoint.async_save=false")
    train(tiny_config(tmp_path, *common, "train.steps=4"), devices=one)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:  # steps 5 and 6 were logged, then the process died mid-line
        f.write('{"step": 5, "split": "train", "loss": 9.0}\n{"step": 6, "split": "train", "loss": 9.0}\n{"st')
    train(tiny_config(tmp_path, *common, "train.steps=6"), devices=one)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] != 9.0 for r in records)


@pytest.mark.slow
def test_logged_learning_rate_is_the_applied_one_after_a_skipped_update(tmp_path):
    """train.on_nonfinite=skip: the skipped update does not advance the optimizer's schedule, so the
    step after it applies (and must log) the same rate as the skipped step, not the next one."""
    import jax

    from trainer.optim import learning_rate_schedule
    from trainer.train import train

    cfg = tiny_config(tmp_path, "train.steps=5", "train.log_every=1", "train.warmup_steps=10",
                      "train.on_nonfinite=skip", "checkpoint.save_final=false")
    with nonfinite_loss_on_batch(cfg, 3):
        train(cfg, devices=jax.devices()[:1])
    records = read_metrics(tmp_path)
    schedule = learning_rate_schedule(cfg.train)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    # updates applied before each step: 0, 1, 2, 2 (step 3 was skipped), 3
    expected = [float(schedule(n)) for n in (0, 1, 2, 2, 3)]
    np.testing.assert_allclose([r["learning_rate"] for r in records], expected, rtol=1e-6)
