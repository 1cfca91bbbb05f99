"""Several processes (through launch.local) against one process: same losses, same data."""

import shutil

import jax
import numpy as np
import pytest

from tests.conftest import CONFIGS, read_metrics, run_cli, tiny_config
from trainer.data import build_pipeline
from trainer.train import train

MESH = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
# The default config (embedded corpus, SentencePiece, packing on) with a small model and short rows.
DEFAULTS = ("model.d_model=32", "model.num_heads=2", "model.mlp_dim=64", "model.encoder_layers=1",
            "model.decoder_layers=1", "data.inputs_length=48", "data.targets_length=48", "train.eval_every=0",
            "decode.eval_samples=0", "train.warmup_steps=2", "train.log_every=1", "train.batch_size=16",
            "model.dropout=0.1")


def _config(workdir, *overrides):
    from trainer.config import load_config

    return load_config([str(CONFIGS / "default.yaml"), f"workdir={workdir}", *DEFAULTS, *overrides])


def _launch(workdir, *overrides, processes=2, devices=4):
    proc = run_cli(["-m", "launch.local", "--processes", str(processes), "--devices-per-process", str(devices),
                    "--", str(CONFIGS / "default.yaml"), f"workdir={workdir}", *DEFAULTS, *overrides], timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def _crossover(tmp_path, *overrides, four=True):
    """1x8 straight; 2x4 for 3 steps; its checkpoint resumed in 1 process and (four) in 4 x 2."""
    run = (*MESH, "checkpoint.every=3", *overrides)
    train(_config(tmp_path / "one", *run, "train.steps=6"), devices=jax.devices())
    reference = _losses(tmp_path / "one")

    two = tmp_path / "two"
    _launch(two, *run, "train.steps=3")
    losses = _losses(two)
    assert sorted(losses) == [1, 2, 3]
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)], atol=1e-5, rtol=0)

    legs = [("two_to_one", None)] + ([("two_to_four", 4)] if four else [])
    for name, processes in legs:
        work = tmp_path / name
        shutil.copytree(two, work)
        (work / "metrics.jsonl").unlink()
        if processes is None:
            train(_config(work, *run, "train.steps=6"), devices=jax.devices())
        else:
            proc = _launch(work, *run, "train.steps=6", processes=processes, devices=8 // processes)
            assert "resuming from checkpoint step 3" in proc.stdout
        resumed = _losses(work)
        assert sorted(resumed) == [4, 5, 6], name
        np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [reference[s] for s in (4, 5, 6)], atol=1e-5,
                                   rtol=0, err_msg=name)


@pytest.mark.slow
def test_process_counts_give_the_same_losses_and_checkpoints_cross_over(tmp_path):
    """1x8 = 2x4 = 4x2 with packing on the embedded corpus; a 2-process checkpoint resumes in 1 and 4."""
    _crossover(tmp_path)


@pytest.mark.slow
def test_a_two_source_mixture_crosses_process_counts(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"source line {i} of the tsv\ttarget {i}\n" for i in range(300)))
    mixture = (f"data.mixture=[{{source: embedded, weight: 2}}, {{name: pairs, source: tsv, path: '{tsv}', weight: 1}}]",
               f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=1000", "model.vocab_size=1000")
    _crossover(tmp_path, *mixture, four=False)
    records = read_metrics(tmp_path / "one")
    assert records[-1]["examples/pairs"] > 0 and records[-1]["examples/0_embedded"] > records[-1]["examples/pairs"]


def test_each_example_is_consumed_once_per_epoch_across_two_processes(tmp_path):
    """The two processes' shards of an epoch are disjoint and together are the whole epoch."""
    cfg = tiny_config(tmp_path, "data.synthetic_train_examples=64", "data.pack=false").data
    batch, steps = 16, 64 // 16

    def rows(process_index, process_count):
        pipeline = build_pipeline(cfg, split="train", global_batch_size=batch, seed=0, process_index=process_index,
                                  process_count=process_count, vocab_size=32)
        out = [tuple(r[r > 0]) for _ in range(steps) for r in next(pipeline)["inputs"]]
        pipeline.close()
        return out

    p0, p1 = rows(0, 2), rows(1, 2)
    assert len(p0) == len(p1) == 32
    assert not set(p0) & set(p1)
    assert sorted(p0 + p1) == sorted(rows(0, 1))  # the same epoch a single process sees
    assert len(set(p0 + p1)) == 64
