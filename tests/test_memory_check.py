"""A train state too large for the devices is a config error before anything is allocated (trainer.memory)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import optax
import pytest
from flax import linen as nn

from model import ModelConfig
from sharding.mesh import make_mesh
from sharding.rules import as_flax_rules, load_rules
from tests.conftest import CONFIGS, ROOT
from trainer.config import ConfigError
from trainer.memory import check_state_fits, host_available_bytes, state_bytes_per_device
from trainer.train_state import create_state, make_state_spec

TINY = ModelConfig(vocab_size=50, d_model=64, num_heads=4, mlp_dim=128, encoder_layers=2, decoder_layers=2,
                   dropout=0.0, max_length=32)


def _spec(mesh_shape):
    n = mesh_shape["data"] * mesh_shape["fsdp"] * mesh_shape["tensor"]
    mesh = make_mesh(mesh_shape, jax.devices()[:n])
    rules = load_rules("default")
    with jax.set_mesh(mesh), nn.logical_axis_rules(as_flax_rules(rules)):
        spec = make_state_spec(TINY, optax.adamw(1e-3), mesh, rules, seed=0)
    return spec, mesh, rules


@pytest.mark.parametrize("mesh_shape", [{"data": 1, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 4, "tensor": 2},
                                        {"data": 2, "fsdp": 2, "tensor": 2}], ids=["1", "fsdp4-tp2", "2x2x2"])
def test_bytes_per_device_match_the_allocated_shards(mesh_shape):
    spec, mesh, rules = _spec(mesh_shape)
    parts = state_bytes_per_device(spec)
    with jax.set_mesh(mesh), nn.logical_axis_rules(as_flax_rules(rules)):
        state = create_state(spec)
    per_device = {d: 0 for d in mesh.devices.flat}
    for x in jax.tree.leaves(state):
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert max(per_device.values()) == parts["params"] + parts["opt_state"] + parts["step"] + parts["rng"]
    assert parts["grads"] == parts["params"]


def test_too_large_a_state_names_the_bytes_and_the_keys():
    spec, mesh, _ = _spec({"data": 1, "fsdp": 8, "tensor": 1})
    needed = sum(check_state_fits(spec, mesh, available=(10**12, "plenty")).values())
    with pytest.raises(ConfigError) as e:
        check_state_fits(spec, mesh, available=(needed - 1, "test figure"))
    message = str(e.value)
    assert "\n" not in message
    assert f"{needed:,} bytes per device" in message and f"{needed - 1:,} bytes are available" in message
    for key in ("model.d_model", "mesh.fsdp", "model.param_dtype"):
        assert key in message
    check_state_fits(spec, mesh, available=(needed, "exactly enough"))
    check_state_fits(spec, mesh, available=(None, "unknown"))  # no figure: no check


def test_host_memory_is_read():
    available = host_available_bytes()
    assert available is None or available > 0


@pytest.mark.slow
def test_a_model_too_large_for_memory_exits_2_quickly(tmp_path):
    """Was: idle forever at 0% CPU after the FLOPs line, waiting for an allocation."""
    workdir = tmp_path / "run"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "trainer.train", str(CONFIGS / "tiny.yaml"), f"workdir={workdir}",
                        "model.d_model=131072"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    print(f"refused in {elapsed:.1f}s")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "bytes per device" in errors[0] and "bytes are available" in errors[0]
    assert "mesh.fsdp" in errors[0] and "model.param_dtype" in errors[0] and "model.d_model" in errors[0]
    assert not workdir.exists()
    assert elapsed < 120


def test_accelerator_memory_comes_from_memory_stats():
    from trainer.memory import device_available

    class Fake:
        platform, device_kind = "gpu", "NVIDIA H200"

        def __init__(self, limit, used):
            self.stats = {"bytes_limit": limit, "bytes_in_use": used}

        def memory_stats(self):
            return self.stats

    have, source = device_available([Fake(100, 10), Fake(80, 0)])
    assert have == 80 and "bytes_limit" in source
    Fake.memory_stats = lambda self: None  # a backend without statistics: no figure, no check
    assert device_available([Fake(1, 0)])[0] is None
