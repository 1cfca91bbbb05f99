"""The input pipeline is loud about its own errors: only undecodable records are skipped."""

import os
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from tests.conftest import CONFIGS, ROOT
from trainer.data import DataConfig
from trainer.data.pipeline import Pipeline
from trainer.data.stream import DataError, RecordError


class _Source:
    """Records 0..n-1; `bad` ones are undecodable, `broken` ones hit a bug in make_example."""

    tokenizer = None
    vocab_size = 64
    name = "test"

    def __init__(self, n=400, bad=(), broken=()):
        self._n, self._bad, self._broken = n, set(bad), set(broken)

    def records(self, split):
        return grain.MapDataset.source(list(range(self._n)))

    def make_example(self, record, rng):
        if record in self._bad:
            raise RecordError("not a record")
        if record in self._broken:
            raise KeyError("a bug")
        ids = np.full(3, 4 + record % 50, np.int32)
        return {"inputs": ids, "targets": ids}

    def locate(self, split, index):
        return f"test.tsv:{index + 1}"


def _pipeline(source, **data):
    cfg = DataConfig(source="synthetic", inputs_length=16, targets_length=16, **data)
    return Pipeline(cfg, [source], [1.0], split="train", global_batch_size=4, seed=0, process_index=0,
                    process_count=1)


def test_an_error_that_is_not_a_bad_record_stops_naming_the_record():
    p = _pipeline(_Source(broken=range(400)))
    with pytest.raises(DataError, match=r"test\.tsv:\d+: KeyError"):
        next(p)
    p.close()


def test_a_few_bad_records_are_skipped_and_counted():
    p = _pipeline(_Source(bad=range(0, 400, 50)))  # 2%
    for _ in range(40):
        next(p)
    bad, good = p.stats["bad_records"], p.stats["examples"]
    assert 0 < bad < 0.04 * (bad + good)
    p.close()


def test_too_many_bad_records_stop_the_run_naming_the_file():
    p = _pipeline(_Source(bad=range(0, 400, 5)), max_bad_fraction=0.05)  # 20%
    with pytest.raises(DataError, match=r"data\.max_bad_fraction=0\.05.*test\.tsv"):
        for _ in range(100):
            next(p)
    p.close()


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.mark.slow
def test_input_workers_die_with_a_killed_trainer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", str(CONFIGS / "tiny.yaml"), f"workdir={tmp_path}",
                             "train.steps=100000", "train.log_every=1", "data.workers=2", "runtime.cpu_devices=1",
                             "mesh.fsdp=1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        metrics = tmp_path / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.2)
        workers = [c for c in _children(proc.pid) if "input-worker" in open(f"/proc/{c}/cmdline").read()
                   or "multiprocessing" in open(f"/proc/{c}/cmdline").read()]
        assert len(workers) >= 2, _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers)
    finally:
        proc.kill()
