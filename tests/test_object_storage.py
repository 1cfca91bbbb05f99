"""A run whose workdir is a bucket (gs:// on a local GCS emulator, s3:// on a local S3 server):
the same guarantees as on a disk, through the real clients (tests/object_store.py).

One chain per store, on the default data path (embedded corpus, SentencePiece, packing) with a
small model: train with a bucket workdir, a second run on it refused by the lock, SIGTERM and
relaunch (every loss equal to an uninterrupted local run's), TensorBoard's reader on the event
files, decode and export on the run; on GCS also a checkpoint restored into a local workdir and back.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import CONFIGS, ROOT
from tests.conftest import SMALL_DEFAULT as BASE_DEFAULT
from tests.object_store import _server_logs, object_store  # noqa: F401  (fixtures)
from trainer import storage

# The default data path with a small model (tests.conftest), rows of 48, no checkpoints, one device.
SMALL_DEFAULT = (*BASE_DEFAULT, "data.inputs_length=48", "data.targets_length=48", "checkpoint.every=0",
                 "runtime.cpu_devices=1")
STEPS = 12


def _env():
    env = dict(os.environ)  # the fixture put the server's endpoint and credentials here
    env.pop("XLA_FLAGS", None)
    return env


def _run(module, *args, expect=0):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(metrics_text):
    records = [json.loads(line) for line in metrics_text.splitlines()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted local run: (its workdir, its losses by step)."""
    work = tmp_path_factory.mktemp("straight")
    _run("trainer.train", *SMALL_DEFAULT, f"train.steps={STEPS}", f"workdir={work}")
    return work, _losses((work / "metrics.jsonl").read_text())


def _train_until_logged(workdir, at_least):
    """A bucket run started in the background, once `at_least` steps are in its metrics.jsonl. Each of
    its batches arrives 2 s late (tests/faulty_train.py: the numbers do not change), so it is still
    running while a second run tries the workdir."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.faulty_train", *SMALL_DEFAULT, f"train.steps={STEPS}",
                             f"workdir={workdir}"], cwd=ROOT, env={**_env(), "SLOW_PROCESS": "0", "SLOW_SECONDS": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = storage.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if storage.exists(metrics) and len(storage.read_text(metrics).splitlines()) >= at_least:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the run did not log {at_least} steps: {proc.communicate()[0][-3000:]}")


@pytest.mark.slow
def test_bucket_workdir_lock_preempt_resume_decode_export(object_store, straight, tmp_path):
    straight_dir, straight_losses = straight
    work = object_store.url("runs", "small")
    proc = _train_until_logged(work, 1)
    try:
        # The lock: a second run on the same bucket workdir is refused and changes nothing.
        refused = _run("trainer.train", *SMALL_DEFAULT, f"workdir={work}", expect=2)
        assert "is in use by another run" in refused.stderr and f"pid {proc.pid}" in refused.stderr, refused.stderr
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "preempted: saved a checkpoint at step" in out, out[-3000:]
    steps_dir = storage.join(work, "checkpoints")
    (saved,) = [int(n) for n in storage.listdir(steps_dir) if n.isdigit()]
    assert storage.isfile(storage.join(steps_dir, str(saved), "commit_success.txt"))
    assert not storage.exists(storage.join(work, ".lock")), "the lock object outlived its run"

    resumed_run = _run("trainer.train", *SMALL_DEFAULT, f"train.steps={STEPS}", f"workdir={work}")
    assert f"resuming from checkpoint step {saved}" in resumed_run.stdout
    resumed = _losses(storage.read_text(storage.join(work, "metrics.jsonl")))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in sorted(resumed)] == [straight_losses[s] for s in sorted(straight_losses)]

    # TensorBoard's own reader on the event files in the bucket (downloaded as a folder).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(storage.local_tree(storage.join(work, "tensorboard")))
    events.Reload()
    assert [e.step for e in events.Scalars("learning/loss")] == list(range(1, STEPS + 1))
    assert [e.value for e in events.Scalars("learning/loss")] == pytest.approx(
        [resumed[s] for s in range(1, STEPS + 1)], rel=1e-6)

    # Decode and export on the bucket run; input and output in the bucket too.
    storage.write_text(object_store.url("in.txt"), "a short sentence\nanother line\n")
    _run("trainer.decode", f"workdir={work}", f"input={object_store.url('in.txt')}",
         f"output={object_store.url('out.txt')}", "decode.max_length=8")
    assert len(storage.read_text(object_store.url("out.txt")).splitlines()) == 2
    exported = _run("trainer.export", f"workdir={work}")
    export_dir = storage.join(work, "export", f"step_{STEPS}")
    assert export_dir in exported.stdout
    assert json.loads(storage.read_text(storage.join(export_dir, "model.json")))["d_model"] == 32
    assert storage.isfile(storage.join(export_dir, "params", "commit_success.txt"))

    if object_store.scheme == "gs":
        # The bucket's final step equals the local uninterrupted run's. Then one more step from each,
        # with the other's storage as the new workdir: bucket -> local and local -> bucket give the
        # same state (a restore that lost or changed anything would not).
        _assert_same_params([storage.join(work, "checkpoints"), str(straight_dir / "checkpoints")])
        local, back = tmp_path / "local", object_store.url("runs", "back")
        for source, target in ((work, local), (straight_dir, back)):
            _run("trainer.train", *SMALL_DEFAULT, f"train.steps={STEPS + 1}", f"workdir={target}",
                 f"checkpoint.restore_from={source}", "checkpoint.restore_params_only=false")
        _assert_same_params([str(local / "checkpoints"), storage.join(back, "checkpoints")])


def _assert_same_params(directories):
    """The parameters of the newest step of each checkpoints folder, equal bit for bit."""
    import jax
    import numpy as np

    from trainer.checkpoint import restore_items
    from trainer.config import load_config
    from trainer.run import Run

    cfg = load_config([a for a in SMALL_DEFAULT if not a.startswith("runtime.")] + ["workdir=unused"])
    run = Run.from_config(cfg, jax.devices()[:1])  # this process's JAX may already be running
    run, _ = run.with_run_tokenizer()
    with run.context():
        target = {"params": run.params_spec().restore_target()}
        trees = [restore_items(d, target)[0]["params"] for d in directories]
    first = jax.tree.leaves(trees[0])
    for other in trees[1:]:
        for a, b in zip(first, jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("object_store", ["gs"], indirect=True)  # the S3 copy-and-delete: tests/test_storage.py
def test_damaged_checkpoint_in_a_bucket_falls_back_to_the_previous_one(object_store, capsys):
    """A step in the bucket whose largest object is gone: reported, set aside as STEP.damaged (copied
    and deleted: buckets cannot rename), and the run resumes from the step before."""
    import jax

    from trainer.config import load_config
    from trainer.train import train

    work = object_store.url("runs", "damaged")
    common = [str(CONFIGS / "tiny.yaml"), f"workdir={work}", "train.log_every=1", "checkpoint.every=5", "mesh.fsdp=1"]
    one = jax.devices()[:1]
    train(load_config([*common, "train.steps=10"]), devices=one)
    state = storage.join(work, "checkpoints", "10", "state")
    victim = max(storage.walk_files(state), key=lambda rel: storage.size(storage.join(state, rel)))
    storage.remove(storage.join(state, victim))
    capsys.readouterr()
    result = train(load_config([*common, "train.steps=12"]), devices=one)
    out = capsys.readouterr()
    assert f"checkpoint {storage.join(work, 'checkpoints', '10')} is damaged" in out.err
    assert f"resuming from checkpoint step 5: {storage.join(work, 'checkpoints', '5')}" in out.out
    assert result["train"]["step"] == 12
    names = storage.listdir(storage.join(work, "checkpoints"))
    assert "10.damaged" in names and "12" in names and "10" not in names
