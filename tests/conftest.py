"""Test set-up: 8 simulated CPU devices for the whole session (set before JAX starts)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import tempfile  # noqa: E402

# Most of the suite's time is XLA compiling the same tiny programs again (the same model on the same
# mesh in many tests and subprocesses). A persistent compilation cache shared by this session and its
# subprocesses (they inherit the environment) compiles each program once. It is a fresh directory per
# session, removed at the end, so no test sees another session's executables.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pytest-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

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


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
