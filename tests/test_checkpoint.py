"""Checkpoints: exact resume, resharding, crash and damage safety, preemption, divergence."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import CONFIGS, ROOT, nonfinite_loss_on_batch, read_metrics, run_cli, tiny_config
from trainer.config import ConfigError
from trainer.train import train

ONE = None  # set per test: jax.devices()[:1]


def _key(path) -> str:
    """A tree path as `a/b/c`, the same whether a node came back as a dict, a tuple or a Variable."""
    tokens = re.findall(r"[A-Za-z0-9_]+", jax.tree_util.keystr(path))
    return "/".join(t for t in tokens if t not in ("value", "raw_value"))


def _flat(tree) -> dict:
    return {_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_arrays(workdir, step):
    """The `state` item of a checkpoint as host arrays, keyed by path."""
    with ocp.CheckpointManager(Path(workdir) / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)) as m:
        state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return {k: np.asarray(x) for k, x in _flat(state).items()}


def _losses(workdir, steps=None):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if steps is None or r["step"] in steps}


def _steps_on_disk(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


COMMON = ("train.log_every=1", "model.dropout=0.1", "checkpoint.every=5", "mesh.fsdp=1")


def test_exact_resume_is_bitwise(tmp_path):
    one = jax.devices()[:1]
    train(tiny_config(tmp_path / "straight", *COMMON, "train.steps=10"), devices=one)
    train(tiny_config(tmp_path / "resumed", *COMMON, "train.steps=5"), devices=one)
    assert _steps_on_disk(tmp_path / "resumed") == [5]
    train(tiny_config(tmp_path / "resumed", *COMMON, "train.steps=10"), devices=one)

    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(6, 11)] == [straight[s] for s in range(6, 11)]  # bitwise equal floats
    a, b = _saved_arrays(tmp_path / "straight", 10), _saved_arrays(tmp_path / "resumed", 10)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_restore_onto_other_meshes(tmp_path):
    """Saved on fsdp=8; restored on data=2,tensor=4 and on 1 device: same values, same next loss."""
    base = ("train.log_every=1", "checkpoint.every=0", "train.batch_size=16", "model.dropout=0.0")
    saved = tmp_path / "fsdp8"
    train(tiny_config(saved, *base, "mesh.fsdp=8", "train.steps=4"), devices=jax.devices())
    reference_arrays = _saved_arrays(saved, 4)

    continuations = {}
    for name, mesh, devices in [("fsdp8", ("mesh.fsdp=8",), jax.devices()),
                                ("data2_tensor4", ("mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4"), jax.devices()),
                                ("one", ("mesh.fsdp=1",), jax.devices()[:1])]:
        workdir = tmp_path / f"resume_{name}"
        shutil.copytree(saved, workdir)
        result = train(tiny_config(workdir, *base, *mesh, "train.steps=5", "checkpoint.save_final=false"),
                       devices=devices)
        continuations[name] = result["train"]["loss"]
        assert result["train"]["step"] == 5

    # The restored arrays themselves: restore through the trainer's manager onto data=2,tensor=4.
    from flax import linen as nn

    from sharding.mesh import make_mesh
    from sharding.rules import as_flax_rules, load_rules
    from trainer.checkpoint import CheckpointManager
    from trainer.optim import make_optimizer
    from trainer.train_state import make_state_spec

    cfg = tiny_config(saved, *base, "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4")
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    rules = load_rules(cfg.rules)
    tx, _ = make_optimizer(cfg.train)
    with jax.set_mesh(mesh), nn.logical_axis_rules(as_flax_rules(rules)):
        spec = make_state_spec(cfg.model, tx, mesh, rules, cfg.seed)
        manager = CheckpointManager(cfg, spec, mesh)
        state, _ = manager.restore_or_init(lambda s: pytest.fail("should restore, not init"))
        manager.close()
    restored = _flat(state)
    assert restored.keys() == reference_arrays.keys()
    for key, value in reference_arrays.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), value, err_msg=key)
    embedding = next(x for k, x in restored.items() if x.ndim == 2 and x.shape[0] == 128)
    assert embedding.sharding.mesh.shape["tensor"] == 4 and embedding.sharding.spec[0] == "tensor"

    assert abs(continuations["data2_tensor4"] - continuations["fsdp8"]) <= 1e-6
    assert abs(continuations["one"] - continuations["fsdp8"]) <= 1e-6


def _largest_file(directory):
    files = [p for p in Path(directory).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    one = jax.devices()[:1]
    train(tiny_config(tmp_path, *COMMON, "train.steps=10"), devices=one)
    victim = _largest_file(tmp_path / "checkpoints" / "10" / "state")
    victim.unlink()
    capsys.readouterr()
    result = train(tiny_config(tmp_path, *COMMON, "train.steps=12"), devices=one)
    out = capsys.readouterr()
    assert f"checkpoint {tmp_path / 'checkpoints' / '10'} is damaged" in out.err
    assert f"resuming from checkpoint step 5: {tmp_path / 'checkpoints' / '5'}" in out.out
    assert result["train"]["step"] == 12
    assert (tmp_path / "checkpoints" / "10.damaged").is_dir()  # kept for inspection, not deleted
    assert 12 in _steps_on_disk(tmp_path)


def test_empty_step_folder_is_skipped(tmp_path, capsys):
    one = jax.devices()[:1]
    train(tiny_config(tmp_path, *COMMON, "train.steps=10"), devices=one)
    step10 = tmp_path / "checkpoints" / "10"
    for child in step10.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    capsys.readouterr()
    train(tiny_config(tmp_path, *COMMON, "train.steps=11"), devices=one)
    out = capsys.readouterr()
    assert "resuming from checkpoint step 5" in out.out


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    one = jax.devices()[:1]
    cfg = tiny_config(tmp_path, *COMMON, "train.steps=10")
    with nonfinite_loss_on_batch(cfg, 7), pytest.raises(FloatingPointError,
                                                        match=r"non-finite loss or gradient at step 7"):
        train(cfg, devices=one)
    assert _steps_on_disk(tmp_path) == [5]  # the last good checkpoint is intact


def test_nonfinite_loss_can_be_skipped(tmp_path):
    one = jax.devices()[:1]
    cfg = tiny_config(tmp_path, *COMMON, "train.steps=10", "train.on_nonfinite=skip")
    with nonfinite_loss_on_batch(cfg, 7):
        train(cfg, devices=one)
    records = read_metrics(tmp_path)
    assert records[-1]["skipped_steps"] == 1
    assert records[5]["skipped_steps"] == 0 and records[6]["skipped_steps"] == 1
    assert np.isfinite(records[-1]["loss"])


def test_restore_from_with_another_shape_names_both_shapes(tmp_path):
    one = jax.devices()[:1]
    train(tiny_config(tmp_path / "a", *COMMON, "train.steps=5"), devices=one)
    cfg = tiny_config(tmp_path / "b", *COMMON, "train.steps=6", "model.mlp_dim=48",
                      f"checkpoint.restore_from={tmp_path / 'a'}")
    with pytest.raises(ConfigError, match=r"parameter \S*mlp/wi has shape \(32, 64\) in the checkpoint but \(32, 48\) in this model"):
        train(cfg, devices=one)


def test_restore_from_initialises_params_only(tmp_path):
    one = jax.devices()[:1]
    train(tiny_config(tmp_path / "a", *COMMON, "train.steps=5"), devices=one)
    result = train(tiny_config(tmp_path / "b", *COMMON, "train.steps=1", "checkpoint.save_final=false",
                               f"checkpoint.restore_from={tmp_path / 'a'}"), devices=one)
    fresh = train(tiny_config(tmp_path / "c", *COMMON, "train.steps=1", "checkpoint.save_final=false"), devices=one)
    assert result["train"]["loss"] < fresh["train"]["loss"]  # starts from the trained weights


def _popen_train(workdir, *overrides):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "trainer.train", str(CONFIGS / "tiny.yaml"), f"workdir={workdir}",
                             *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(predicate, timeout, proc):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    proc = _popen_train(tmp_path, "train.steps=100000", "train.log_every=1", "checkpoint.every=0")
    try:
        assert _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and
                         len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 3, 240, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    saved = _steps_on_disk(tmp_path)
    assert len(saved) == 1 and saved[0] >= 3
    assert f"preempted: saved a checkpoint at step {saved[0]}" in out
    relaunch = run_cli(["-m", "trainer.train", str(CONFIGS / "tiny.yaml"), f"workdir={tmp_path}",
                        f"train.steps={saved[0] + 2}", "train.log_every=1"])
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"resuming from checkpoint step {saved[0]}" in relaunch.stdout


@pytest.mark.slow
def test_kill_9_during_async_save_resumes_from_previous_commit(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"

    def saving_after_first_commit():
        if not ckpt_dir.is_dir():
            return False
        names = [p.name for p in ckpt_dir.iterdir()]
        return any(n.isdigit() for n in names) and any("tmp" in n for n in names)

    proc = _popen_train(tmp_path, "train.steps=100000", "train.log_every=50", "checkpoint.every=3",
                        "checkpoint.keep=100")
    try:
        caught = _wait_for(saving_after_first_commit, 240, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert caught, "never saw a save in flight"
    in_flight = [p.name for p in ckpt_dir.iterdir() if "tmp" in p.name]
    committed = _steps_on_disk(tmp_path)
    assert in_flight and committed
    last = max(committed)
    relaunch = run_cli(["-m", "trainer.train", str(CONFIGS / "tiny.yaml"), f"workdir={tmp_path}",
                        f"train.steps={last + 1}", "train.log_every=1", "checkpoint.every=3", "checkpoint.keep=100"])
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"resuming from checkpoint step {last}" in relaunch.stdout
    assert not [p.name for p in ckpt_dir.iterdir() if "tmp" in p.name]  # interrupted saves cleaned up


@pytest.mark.slow
def test_export_writes_params_only_in_bfloat16(tmp_path):
    import json

    import jax.numpy as jnp

    train(tiny_config(tmp_path / "run", *COMMON, "train.steps=5"), devices=jax.devices()[:1])
    out = tmp_path / "exported"
    proc = run_cli(["-m", "trainer.export", f"workdir={tmp_path / 'run'}", f"output={out}", "dtype=bfloat16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = json.loads((out / "model.json").read_text())
    assert model["d_model"] == 32 and model["param_dtype"] == "bfloat16" and model["padded_vocab_size"] == 128
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(out / "params")
    exported = _flat(params)
    saved = {k[len("params/"):]: v for k, v in _saved_arrays(tmp_path / "run", 5).items() if k.startswith("params/")}
    assert exported.keys() == saved.keys() and len(saved) > 10  # parameters only: no optimizer state
    for key, value in saved.items():
        assert exported[key].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(exported[key]), value.astype(jnp.bfloat16), err_msg=key)
    again = run_cli(["-m", "trainer.export", f"workdir={tmp_path / 'run'}", f"output={out}"])
    assert again.returncode == 2 and "already exists" in again.stderr
