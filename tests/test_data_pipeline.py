"""Input pipeline on the synthetic source: layout, packing, sharding, determinism, resumption."""

import json

import numpy as np
import pytest

from trainer.data import BATCH_KEYS, EOS_ID, NUM_RESERVED, DataConfig, build_pipeline


def synth(**kw):
    base = dict(
        source="synthetic", inputs_length=16, targets_length=16, synthetic_train_examples=64, synthetic_eval_examples=20
    )
    base.update(kw)
    return DataConfig(**base)


def segments(batch, feature):
    """Yields (row, segment id, tokens) of every packed example."""
    for r in range(batch[feature].shape[0]):
        seg = batch[f"{feature}_segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            yield r, int(s), batch[feature][r][seg == s]


def check_layout(batch):
    for k in BATCH_KEYS:
        assert batch[k].dtype == np.int32, k
    for f in ("inputs", "targets"):
        tok, seg, pos = batch[f], batch[f"{f}_segment_ids"], batch[f"{f}_positions"]
        # padding: token 0 exactly where segment 0, position 0 there too
        assert ((tok == 0) == (seg == 0)).all()
        assert (pos[seg == 0] == 0).all()
        for r in range(tok.shape[0]):
            s = seg[r]
            # segments are contiguous, numbered 1..k in order, padding only at the end
            nz = s[s > 0]
            assert (np.diff(nz) >= 0).all() and (np.diff(nz) <= 1).all()
            if nz.size:
                assert nz[0] == 1 and (s[: nz.size] > 0).all()
            for sid in np.unique(nz):
                m = s == sid
                # positions restart at 0 for each packed example and count up by one
                np.testing.assert_array_equal(pos[r][m], np.arange(m.sum()))
                # every example ends with eos, and contains no other eos
                ex = tok[r][m]
                assert ex[-1] == EOS_ID and (ex[:-1] != EOS_ID).all()
    # inputs and targets of a row hold the same examples (segment ids align)
    for r in range(batch["inputs"].shape[0]):
        assert set(np.unique(batch["inputs_segment_ids"][r])) == set(np.unique(batch["targets_segment_ids"][r]))


def attention_mask(seg_q, seg_k):
    """What the model builds from segment ids: attend only within the same non-pad segment."""
    return (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] > 0)


def test_packed_layout_and_reverse_task():
    p = build_pipeline(synth(), split="train", global_batch_size=4, seed=0, vocab_size=32)
    assert p.vocab_size == 32 and p.tokenizer is None
    packed_rows = 0
    for _ in range(6):
        b = next(p)
        assert b["inputs"].shape == (4, 16) and b["targets"].shape == (4, 16)
        assert set(b) == set(BATCH_KEYS)
        check_layout(b)
        packed_rows += int((b["inputs_segment_ids"].max(axis=1) >= 2).sum())
        ins = {(r, s): t for r, s, t in segments(b, "inputs")}
        for r, s, t in segments(b, "targets"):
            np.testing.assert_array_equal(t[:-1], ins[(r, s)][:-1][::-1])
            assert (t[:-1] >= NUM_RESERVED).all() and (t[:-1] < 32).all()
        # attention never crosses segments: every allowed (q, k) pair shares a segment
        for a, b_ in (("inputs", "inputs"), ("targets", "targets"), ("targets", "inputs")):
            m = attention_mask(b[f"{a}_segment_ids"], b[f"{b_}_segment_ids"])
            same = b[f"{a}_segment_ids"][:, :, None] == b[f"{b_}_segment_ids"][:, None, :]
            assert not (m & ~same).any()
    assert packed_rows > 0, "nothing was packed"
    st = p.stats
    assert 0.5 < st["packing_efficiency"] <= 1.0 and st["examples"] > 12
    assert st["truncated"] == 0 and st["dropped"] == 0


def test_unpacked_layout():
    p = build_pipeline(synth(pack=False), split="train", global_batch_size=4, seed=0, vocab_size=32)
    b = next(p)
    check_layout(b)
    assert b["inputs_segment_ids"].max() == 1


def test_same_seed_same_batches_other_seed_differs():
    def take(seed, n=4):
        p = build_pipeline(synth(), split="train", global_batch_size=4, seed=seed, vocab_size=32)
        return [next(p) for _ in range(n)]

    a, b, c = take(1), take(1), take(2)
    for x, y in zip(a, b):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    assert any((x["inputs"] != z["inputs"]).any() for x, z in zip(a, c))


def _epoch_examples(cfg, process_index, process_count, n, seed=3):
    p = build_pipeline(
        cfg,
        split="train",
        global_batch_size=process_count,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        vocab_size=32,
    )
    return [tuple(next(p)["inputs"][0]) for _ in range(n)]


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_disjoint_and_cover_each_epoch(count):
    cfg = synth(pack=False, synthetic_train_examples=40)
    everything = sorted(_epoch_examples(cfg, 0, 1, 40))
    assert len(set(everything)) == 40
    shards = [_epoch_examples(cfg, i, count, 2 * 40 // count) for i in range(count)]
    per = 40 // count
    for epoch in range(2):
        parts = [s[epoch * per : (epoch + 1) * per] for s in shards]
        union = sorted(x for part in parts for x in part)
        assert union == everything, f"epoch {epoch}: shards are not an exact cover"
    # a new order each epoch
    assert shards[0][:per] != shards[0][per:]


def test_eval_is_one_padded_pass_same_count_on_every_process():
    cfg = synth(synthetic_eval_examples=21)
    seen = []
    counts = []
    for i in range(2):
        p = build_pipeline(
            cfg, split="eval", global_batch_size=8, seed=0, process_index=i, process_count=2, vocab_size=32
        )
        batches = list(p)
        counts.append(len(batches))
        assert len(batches) == p.num_batches == 3  # ceil(21 / 8) global batches
        for b in batches:
            check_layout(b)
            assert b["inputs"].shape == (4, 16)
            seen += [tuple(r) for r, s in zip(b["inputs"], b["inputs_segment_ids"]) if s.any()]
        # Global rows 21..23 of the last batch are past the end: process 1's last three rows are padding.
        padded = [not s.any() for s in batches[-1]["targets_segment_ids"]]
        assert padded == ([False] * 4 if i == 0 else [False, True, True, True])
        assert (batches[-1]["inputs"][np.array(padded, bool)] == 0).all()  # padded rows are all zero
    assert len(seen) == len(set(seen)) == 21
    train = build_pipeline(cfg, split="train", global_batch_size=64, seed=0, vocab_size=32)
    tr = {tuple(t) for b in (next(train) for _ in range(4)) for _, _, t in segments(b, "inputs")}
    ev = {tuple(np.asarray(x)[np.asarray(x) > 0]) for x in seen}
    assert not (tr & ev), "eval examples leak into train"
    p.reset()
    assert len(list(p)) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restore_continues_exactly(workers):
    cfg = synth(workers=workers)
    k = 3
    with build_pipeline(cfg, split="train", global_batch_size=4, seed=5, vocab_size=32) as p:
        for _ in range(k):
            next(p)
        state = json.loads(json.dumps(p.get_state()))  # JSON round trip
        expected = [next(p) for _ in range(4)]
    with build_pipeline(cfg, split="train", global_batch_size=4, seed=5, vocab_size=32) as q:
        q.set_state(state)
        for e in expected:
            got = next(q)
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(got[key], e[key])
        assert q.stats["batches"] == k + 4


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"data\.source"):
        DataConfig(source="nope").validate()
    with pytest.raises(ValueError, match=r"data\.inputs_length"):
        DataConfig(inputs_length=1).validate()
    with pytest.raises(ValueError, match=r"data\.path"):
        DataConfig(source="tsv").validate()
    with pytest.raises(ValueError, match="not divisible"):
        build_pipeline(synth(), split="train", global_batch_size=3, seed=0, process_count=2, vocab_size=32)
