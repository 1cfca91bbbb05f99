"""Test set-up: 8 simulated CPU devices for the whole session (set before JAX starts)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def read_metrics(workdir, split="train"):
    path = Path(workdir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def tiny_config(tmp_path, *overrides):
    """The tiny synthetic config with a fresh workdir and the given `key=value` overrides."""
    from trainer.config import load_config

    return load_config([str(CONFIGS / "tiny.yaml"), f"workdir={tmp_path}", *overrides])


def run_cli(args, cwd=ROOT, timeout=600, env=None):
    """Runs `python -m trainer.train ...` (or another module) as a subprocess."""
    import subprocess

    full_env = dict(os.environ)
    full_env.pop("XLA_FLAGS", None)  # the subprocess sets its own devices
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def workdir(tmp_path):
    return tmp_path / "run"
