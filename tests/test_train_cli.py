"""`python -m trainer.train` end to end: workdir files, TensorBoard scalars, learning."""


import numpy as np
import pytest
import yaml

from tests.conftest import CONFIGS, read_metrics, run_cli, tiny_config

TRAIN_KEYS = {"step", "split", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time_s", "mfu"}
TB_NAMES = {"loss": "learning/loss", "grad_norm": "learning/grad_norm",
            "learning_rate": "learning/current_learning_rate", "step_time_s": "perf/step_time_seconds",
            "per_device_tokens_per_sec": "perf/per_device_tokens_per_sec", "mfu": "perf/mfu"}


@pytest.mark.slow
def test_cli_writes_config_metrics_and_tensorboard(tmp_path):
    workdir = tmp_path / "run"
    proc = run_cli(["-m", "trainer.train", str(CONFIGS / "tiny.yaml"), f"workdir={workdir}", "train.steps=12",
                    "train.log_every=3", "train.eval_every=6", "runtime.cpu_devices=2", "mesh.fsdp=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 12/12" in proc.stdout and "tensorboard --logdir" in proc.stdout

    resolved = yaml.safe_load((workdir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 12 and resolved["mesh"]["fsdp"] == 2

    train_records = read_metrics(workdir)
    eval_records = read_metrics(workdir, "eval")
    assert [r["step"] for r in train_records] == [3, 6, 9, 12]
    assert [r["step"] for r in eval_records] == [6, 12]
    for r in train_records:
        assert TRAIN_KEYS <= set(r), set(r)
    assert {"loss", "accuracy"} <= set(eval_records[0])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key, tag in TB_NAMES.items():
        assert tag in tags, (tag, tags)
        events = acc.Scalars(tag)
        logged = [r[key] for r in train_records]
        assert [e.step for e in events] == [r["step"] for r in train_records]
        # TensorBoard stores float32: compare at float32 precision.
        np.testing.assert_array_equal(np.float32([e.value for e in events]), np.float32(logged))
    np.testing.assert_array_equal(np.float32([e.value for e in acc.Scalars("eval/loss")]),
                                  np.float32([r["loss"] for r in eval_records]))


def test_cli_config_error_exits_2_naming_the_key(tmp_path):
    proc = run_cli(["-m", "trainer.train", str(CONFIGS / "tiny.yaml"), f"workdir={tmp_path}", "train.stepss=3"])
    assert proc.returncode == 2
    assert "train.stepss" in proc.stderr and "train.steps" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_tiny_model_learns_the_reverse_task(tmp_path):
    import jax

    from trainer.train import train

    cfg = tiny_config(tmp_path, "model.d_model=64", "model.mlp_dim=256", "train.learning_rate=5e-3",
                      "train.batch_size=32", "train.steps=300", "train.warmup_steps=30", "train.eval_every=300",
                      "train.log_every=50", "checkpoint.save_final=false")
    train(cfg, devices=jax.devices()[:1])
    final = read_metrics(tmp_path, "eval")[-1]
    assert final["accuracy"] >= 0.95, final
