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

import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# The default config (embedded corpus, SentencePiece, packing on) with a small model and short rows.
SMALL_DEFAULT = (str(CONFIGS / "default.yaml"), "model.d_model=32", "model.num_heads=2", "model.mlp_dim=64",
                 "model.encoder_layers=1", "model.decoder_layers=1", "data.inputs_length=32",
                 "data.targets_length=32", "train.batch_size=8", "train.log_every=1", "train.eval_every=0",
                 "decode.eval_samples=0", "train.warmup_steps=2")


def read_metrics(workdir, split="train"):
    path = Path(workdir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def tiny_config(tmp_path, *overrides):
    """The tiny synthetic config with a fresh workdir and the given `key=value` overrides."""
    from trainer.config import load_config

    return load_config([str(CONFIGS / "tiny.yaml"), f"workdir={tmp_path}", *overrides])


def state_spec_on_mesh(cfg, devices=None):
    """(train-state spec, mesh, the run's tracing context) for `cfg` on `devices`, as train builds them."""
    from trainer.optim import make_optimizer
    from trainer.run import Run

    run = Run.from_config(cfg, devices)
    with run.context():
        spec = run.state_spec(make_optimizer(cfg.train)[0])
    return spec, run.mesh, run.context()


@contextlib.contextmanager
def nonfinite_loss_on_batch(cfg, step):
    """Within this block, the train step's loss is non-finite on the batch that `cfg` trains at `step`.

    Fault injection from outside the trainer: the batch is found by reading `cfg`'s own input
    pipeline (one process), and `trainer.step.loss_sums` is wrapped to return an infinite loss
    (so infinite gradients) for exactly that batch's targets. Steps are traced after this
    patch, so use it around a `train(...)` call in this process.
    """
    import jax.numpy as jnp

    from trainer import step as step_module
    from trainer.data import build_pipeline

    def fingerprint(targets):  # a position-weighted sum: distinct for distinct batches in practice
        weights = jnp.arange(1, targets.size + 1, dtype=jnp.uint32).reshape(targets.shape)
        return jnp.sum(targets.astype(jnp.uint32) * weights)

    with build_pipeline(cfg.data, split="train", global_batch_size=cfg.train.batch_size, seed=cfg.seed,
                        vocab_size=cfg.model.vocab_size) as data:
        prints = [int(fingerprint(jnp.asarray(next(data)["targets"]))) for _ in range(step)]
    assert prints.count(prints[-1]) == 1, "the fingerprint must single out the batch"
    real = step_module.loss_sums

    def poisoned(graphdef, params, batch, **kw):
        loss_sum, weight_sum, correct = real(graphdef, params, batch, **kw)
        return loss_sum * jnp.where(fingerprint(batch["targets"]) == prints[-1], jnp.inf, 1.0), weight_sum, correct

    step_module.loss_sums = poisoned
    try:
        yield
    finally:
        step_module.loss_sums = real


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

