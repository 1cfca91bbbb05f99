"""`train.profile_steps=START:END` writes a jax.profiler trace for TensorBoard, and only when asked."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from tests.conftest import ROOT, SMALL_DEFAULT, tiny_config
from trainer.config import ConfigError
from trainer.train import train


def _traces(workdir):
    return sorted(Path(workdir, "tensorboard").glob("plugins/profile/*/*.xplane.pb"))


def test_profile_steps_write_a_trace_and_nothing_otherwise(tmp_path):
    one = jax.devices()[:1]
    train(tiny_config(tmp_path / "profiled", "train.steps=6", "train.profile_steps=3:4", "mesh.fsdp=1"), devices=one)
    traces = _traces(tmp_path / "profiled")
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    train(tiny_config(tmp_path / "plain", "train.steps=6", "mesh.fsdp=1"), devices=one)
    assert _traces(tmp_path / "plain") == []


@pytest.mark.parametrize("spec", ["4:3", "0:2", "3", "a:b"])
def test_a_bad_profile_range_names_the_key(tmp_path, spec):
    with pytest.raises(ConfigError, match=r"train\.profile_steps"):
        tiny_config(tmp_path, f"train.profile_steps={spec}")


@pytest.mark.slow
def test_the_command_writes_a_trace_as_a_user_runs_it(tmp_path):
    """`python -m trainer.train` with JAX_PLATFORMS unset, as a user runs it, on the default data
    path (a small model): this test install has libtpu (the plan extra), whose profiler plugin
    crashed the trace before trainer/startup.py."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = subprocess.run([sys.executable, "-m", "trainer.train", *SMALL_DEFAULT,
                           f"workdir={tmp_path}", "train.steps=4", "train.profile_steps=2:3", "mesh.fsdp=1",
                           "runtime.cpu_devices=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_traces(tmp_path)) == 1
