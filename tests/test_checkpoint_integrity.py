"""Resume tells a changed config from damage; checkpoints move between vocabulary paddings.

- A checkpoint of another model is a ConfigError naming the parameter, both shapes and the
  config keys that changed; nothing in the workdir is renamed, deleted or overwritten.
- Other changed keys resume with a warning; the previous config.yaml is kept as config.STEP.yaml.
- The padded vocabulary depends on the mesh (lcm(model.vocab_multiple, tensor ways)): a
  checkpoint restores onto a mesh with another padding, real rows bit-identical.
"""

import hashlib
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.conftest import read_metrics, state_spec_on_mesh, tiny_config
from trainer.config import ConfigError
from trainer.train import train

COMMON = ("train.log_every=1", "checkpoint.every=5", "mesh.fsdp=1")
# A model that splits over 3 tensor ways: lcm(128, 3) = 384 vocabulary rows instead of 128.
THREE_WAY = ("model.num_heads=3", "model.head_dim=8", "model.mlp_dim=48")


def _snapshot(workdir: Path) -> dict[str, str]:
    """Every file under the workdir (metrics and TensorBoard aside) with a hash of its bytes."""
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(workdir.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


def test_changed_model_is_a_config_error_and_touches_nothing(tmp_path):
    one = jax.devices()[:1]
    train(tiny_config(tmp_path, *COMMON, "train.steps=10"), devices=one)
    before = _snapshot(tmp_path)
    assert "config.yaml" in before and "checkpoints/10/state/_METADATA" in before
    with pytest.raises(ConfigError) as info:
        train(tiny_config(tmp_path, *COMMON, "train.steps=12", "model.mlp_dim=48", "seed=1"), devices=one)
    message = str(info.value)
    assert "\n" not in message
    assert f"checkpoint {tmp_path / 'checkpoints' / '10'}: parameter " in message
    assert "mlp/wi has shape (32, 64) in the checkpoint but (32, 48) in this model" in message
    assert "model.mlp_dim: 64 -> 48" in message and "seed: 0 -> 1" in message
    assert _snapshot(tmp_path) == before  # nothing renamed, deleted or overwritten
    assert not list((tmp_path / "checkpoints").glob("*.damaged*"))


def test_changed_settings_resume_with_a_warning_and_keep_the_old_config(tmp_path, capsys):
    one = jax.devices()[:1]
    train(tiny_config(tmp_path, *COMMON, "train.steps=5"), devices=one)
    old_config = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()
    result = train(tiny_config(tmp_path, *COMMON, "train.steps=6", "seed=7", "train.learning_rate=0.001",
                               "train.schedule=constant"), devices=one)
    err = capsys.readouterr().err
    assert result["train"]["step"] == 6  # resumed at 5, trained one step
    assert "resuming from step 5 with a config that differs from the checkpoint's" in err
    for change in ("seed: 0 -> 7", "train.learning_rate: 0.003 -> 0.001", 'train.schedule: "cosine" -> "constant"',
                   "train.steps: 5 -> 6"):
        assert change in err
    assert f"the previous config is kept as {tmp_path / 'config.5.yaml'}" in err
    assert (tmp_path / "config.5.yaml").read_text() == old_config
    assert "learning_rate: 0.001" in (tmp_path / "config.yaml").read_text()
    assert not list((tmp_path / "checkpoints").glob("*.damaged*"))


def test_resume_on_a_mesh_with_another_vocabulary_padding(tmp_path, capsys):
    """Saved on tensor=1 (vocab 32 padded to 128), resumed on tensor=3 (padded to 384): same next loss."""
    base = (*COMMON, *THREE_WAY, "model.dropout=0.0", "mesh.data=1")
    straight = tmp_path / "straight"
    train(tiny_config(straight, *base, "mesh.tensor=1", "train.steps=6"), devices=jax.devices()[:1])
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    capsys.readouterr()
    result = train(tiny_config(resumed, *base, "mesh.tensor=3", "train.steps=6", "checkpoint.save_final=false"),
                   devices=jax.devices()[:3])
    out = capsys.readouterr().out
    assert "resuming from checkpoint step 5" in out and "128 -> 384 rows" in out
    assert "vocab 32 padded to 384" in out
    reference = {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert result["train"]["step"] == 6
    assert abs(result["train"]["loss"] - reference[6]) <= 1e-5


def _spec(cfg, devices):
    return state_spec_on_mesh(cfg, devices)


def _flat(tree):
    from trainer.checkpoint import _param_name

    return {_param_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_tables_are_repadded_both_ways_and_for_decoding(tmp_path):
    """128 -> 384 rows (zero padding appended) and back (padding dropped); restore_items too."""
    from trainer.checkpoint import CheckpointManager, restore_items
    from trainer.train_state import create_state

    small = tiny_config(tmp_path, *THREE_WAY, "mesh.fsdp=1", "mesh.tensor=1", "checkpoint.keep=10")
    spec1, mesh1, context1 = _spec(small, jax.devices()[:1])
    with context1:
        manager = CheckpointManager(small, spec1, mesh1)
        state = create_state(spec1)
        # Adam moments that are not zero, so that re-padding them is checked too.
        state["opt_state"] = jax.tree.map(lambda x: x + 0.5 if x.ndim else x, state["opt_state"])
        manager.save(1, state, {"position": 1}, force=True)
        manager.close()
    original = {k: np.asarray(v) for k, v in _flat(state).items()}
    tables = [k for k, v in original.items() if 128 in v.shape]
    assert {"params/token_embedding/embedding", "opt_state/1/0/mu/token_embedding/embedding"} <= set(tables)

    wide = tiny_config(tmp_path, *THREE_WAY, "mesh.fsdp=1", "mesh.tensor=3", "checkpoint.keep=10")
    spec3, mesh3, context3 = _spec(wide, jax.devices()[:3])
    with context3:
        manager = CheckpointManager(wide, spec3, mesh3)
        restored, data = manager.restore_or_init(lambda s: pytest.fail("should restore, not init"))
        assert data == [{"position": 1}]
        manager.save(2, restored, {"position": 2}, force=True)
        manager.close()
        target = {"params": spec3.restore_target()["params"]}
        params, step = restore_items(str(tmp_path / "checkpoints"), target, 1)  # the decode/export path
        assert step == 1
    for key, value in _flat(restored).items():
        if key in tables:
            dim = original[key].shape.index(128)
            assert value.shape[dim] == 384 and value.sharding.spec[dim] == "tensor"
            got = np.asarray(value)
            np.testing.assert_array_equal(np.take(got, np.arange(128), axis=dim), original[key], err_msg=key)
            assert not np.take(got, np.arange(128, 384), axis=dim).any(), key  # zero padding rows
        else:
            np.testing.assert_array_equal(np.asarray(value), original[key], err_msg=key)
    for key, value in _flat(params).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(_flat(restored)[key]), err_msg=key)

    # Back onto one device: the step-2 checkpoint's 384 rows are cut to 128, the real ones unchanged.
    with context1:
        manager = CheckpointManager(small, spec1, mesh1)
        back, data = manager.restore_or_init(lambda s: pytest.fail("should restore, not init"))
        manager.close()
    assert data == [{"position": 2}]
    for key, value in _flat(back).items():
        np.testing.assert_array_equal(np.asarray(value), original[key], err_msg=key)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint32", "bool"])
def test_array_hash_is_exact_and_independent_of_the_sharding(dtype):
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from sharding.mesh import make_mesh
    from trainer.checkpoint import array_hashes

    rng = np.random.default_rng(0)
    host = rng.standard_normal((48, 16)).astype(np.float32)
    host = np.asarray(jnp.asarray(host).astype(dtype)) if dtype != "bool" else host > 0
    layouts = [(make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), PartitionSpec()),
               (make_mesh({"data": 1, "fsdp": 8, "tensor": 1}), PartitionSpec("fsdp", None)),
               (make_mesh({"data": 2, "fsdp": 1, "tensor": 4}), PartitionSpec("tensor", "data")),
               (make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), PartitionSpec(None, ("fsdp", "tensor")))]
    hashes = {array_hashes([jax.device_put(host, NamedSharding(mesh, spec))])[0] for mesh, spec in layouts}
    assert len(hashes) == 1
    reference = hashes.pop()
    # Every single-bit change of one element changes the hash (a sample of elements and bits).
    raw = host.view(np.uint8 if host.dtype.itemsize == 1 else np.dtype(f"uint{8 * host.dtype.itemsize}"))
    for element, bit in [(0, 0), (17, 3), (300, 7), (767, 0)] + ([(5, 31), (401, 22)] if raw.itemsize == 4 else []):
        changed = raw.copy().reshape(-1)
        changed[element] ^= np.array(1 << bit).astype(raw.dtype)
        if dtype == "bool" and bit:
            continue  # a bool holds one meaningful bit
        value = changed.reshape(raw.shape).view(host.dtype)
        assert array_hashes([jax.device_put(value, NamedSharding(*layouts[1]))])[0] != reference, (element, bit)
    # Moving values between positions changes it too (positions are part of the hash).
    swapped = host.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    if not np.array_equal(swapped, host):
        assert array_hashes([jax.device_put(swapped, NamedSharding(*layouts[2]))])[0] != reference
