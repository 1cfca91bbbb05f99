"""The global data order under the defaults (embedded corpus, packing on): the same global batches
on any number of processes, exact resumption on another process count, weighted mixtures."""

import json
import time

import numpy as np
import pytest

from trainer.config import load_config
from trainer.data import BATCH_KEYS, build_pipeline
from trainer.data.stream import DataError

# The default data path at short lengths (a small slice of the default run's data).
DEFAULT_DATA = ("data.inputs_length=48", "data.targets_length=48")


def default_data(*overrides):
    cfg = load_config([*DEFAULT_DATA, *overrides]).data
    assert cfg.pack or "data.pack=false" in overrides
    assert cfg.source == "embedded"  # the default source; packing is on unless a test turns it off
    return cfg


def pipelines(cfg, batch, processes, vocab_size=None):
    return [build_pipeline(cfg, split="train", global_batch_size=batch, seed=0, process_index=p,
                           process_count=processes, vocab_size=vocab_size) for p in range(processes)]


def global_batches(ps, n):
    return [{k: np.concatenate([b[k] for b in local]) for k in BATCH_KEYS}
            for local in ([next(p) for p in ps] for _ in range(n))]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def close(ps):
    for p in ps:
        p.close()


@pytest.mark.parametrize("objective", ["default", "span_corruption"])
def test_packed_global_batches_do_not_depend_on_the_process_count(objective):
    # The default objective (infilling) fills rows with one chunk; document tails pack together.
    # T5 span corruption (128/32-like shapes) packs most rows: both must be invariant.
    cfg = default_data() if objective == "default" else default_data(
        "data.objective=span_corruption", "data.inputs_length=64", "data.targets_length=32")
    reference = global_batches(one := pipelines(cfg, 16, 1), 8)
    close(one)
    if objective != "default":
        assert max(int(b["inputs_segment_ids"].max()) for b in reference) >= 2, "no row was packed"
    for processes in (2, 4):
        ps = pipelines(cfg, 16, processes)
        assert_same(global_batches(ps, 8), reference)
        close(ps)


def test_position_saved_on_two_processes_resumes_on_one_and_four():
    cfg = default_data()
    one = pipelines(cfg, 16, 1)
    straight = global_batches(one, 6)
    close(one)
    two = pipelines(cfg, 16, 2)
    assert_same(global_batches(two, 3), straight[:3])
    saved = json.loads(json.dumps([p.get_state() for p in two]))  # as the checkpoint stores it
    close(two)
    for processes in (1, 2, 4):
        ps = pipelines(cfg, 16, processes)
        for p in ps:
            p.set_state(saved)
        assert_same(global_batches(ps, 3), straight[3:])
        close(ps)


def test_resume_time_does_not_grow_with_the_steps_trained():
    """Restoring a position reads a few integers per row; nothing is replayed."""
    cfg = default_data()
    (p,) = pipelines(cfg, 16, 1)
    for _ in range(3):
        next(p)
    early = p.get_state()
    for _ in range(200):
        next(p)
    late = p.get_state()
    expected = next(p)
    p.close()
    timings = []
    for state in (early, late):
        (q,) = pipelines(cfg, 16, 1)
        t = time.perf_counter()
        q.set_state(state)
        first = next(q)
        timings.append(time.perf_counter() - t)
        q.close()
    for k in BATCH_KEYS:
        np.testing.assert_array_equal(first[k], expected[k])
    assert len(json.dumps(late)) < 4 * len(json.dumps(early)) + 2000  # the position does not grow with steps


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_give_the_same_batches(workers):
    cfg = default_data(f"data.workers={workers}")
    reference = pipelines(default_data(), 8, 1)
    ref = global_batches(reference, 3)
    close(reference)
    ps = pipelines(cfg, 8, 2)
    assert_same(global_batches(ps, 3), ref)
    close(ps)


def _mixture(tmp_path, weights=(3, 1)):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"source line {i} of the tsv\ttarget {i}\n" for i in range(300)))
    return default_data(
        f"data.mixture=[{{source: embedded, weight: {weights[0]}}}, "
        f"{{name: pairs, source: tsv, path: '{tsv}', weight: {weights[1]}}}]",
        f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=1000")


def test_weighted_mixture_is_invariant_resumable_and_counted(tmp_path):
    cfg = _mixture(tmp_path)
    one = pipelines(cfg, 16, 1)
    straight = global_batches(one, 8)
    counts = one[0].counters
    close(one)
    embedded, pairs = counts["examples/0_embedded"], counts["examples/pairs"]
    assert embedded + pairs == counts["examples"]
    assert 0.6 < embedded / (embedded + pairs) < 0.9  # weight 3:1 by examples
    stats = one[0].stats
    assert stats["examples/pairs"] == pairs
    two = pipelines(cfg, 16, 2)
    assert_same(global_batches(two, 5), straight[:5])
    saved = [p.get_state() for p in two]
    close(two)
    for processes in (1, 4):
        ps = pipelines(cfg, 16, processes)
        for p in ps:
            p.set_state(saved)
        assert_same(global_batches(ps, 3), straight[5:])
        close(ps)


def test_mixture_config_errors_name_the_entry(tmp_path):
    with pytest.raises(ValueError, match=r"data\.mixture\[1\]\.weight"):
        default_data("data.mixture=[{source: embedded}, {source: embedded, weight: -1}]").validate()
    with pytest.raises(ValueError, match=r"data\.mixture\[0\]\.bogus"):
        default_data("data.mixture=[{source: embedded, bogus: 1}]").validate()
    with pytest.raises(ValueError, match=r"data\.mixture\[0\]\.path"):
        default_data("data.mixture=[{source: tsv}]").validate()


def test_another_batch_size_continues_after_the_furthest_example_read(capsys):
    cfg = default_data("data.pack=false")
    (p,) = pipelines(cfg, 16, 1)
    seen = {tuple(r) for _ in range(3) for r in next(p)["inputs"]}
    state = p.get_state()
    p.close()
    (q,) = pipelines(cfg, 8, 1)
    q.set_state(state)
    after = {tuple(r) for _ in range(3) for r in next(q)["inputs"]}
    q.close()
    assert not seen & after  # nothing trained twice
    assert "train.batch_size=16" in capsys.readouterr().err


def test_next_never_spins_when_every_example_is_dropped(tmp_path):
    tsv = tmp_path / "long.tsv"
    tsv.write_text("".join(f"{'word ' * 40}{i}\t{'more ' * 40}\n" for i in range(50)))
    cfg = load_config(["data.source=tsv", f"data.path={tsv}", "data.tokenizer=bytes", "data.overlong=drop",
                       "data.inputs_length=16", "data.targets_length=16", "train.eval_every=0"]).data
    (p,) = pipelines(cfg, 4, 1)
    t = time.perf_counter()
    with pytest.raises(DataError, match="dropped"):
        next(p)
    assert time.perf_counter() - t < 60
    p.close()
