"""File sources: bad input counting, clear errors, jsonl, arrayrecord via trainer.prepare."""

import json
import os

import numpy as np
import pytest

from trainer.data import DataConfig, build_pipeline, check_sources, load_tokenizer
from trainer.data.sources import decode_record

WORDS = (
    "river stone light north garden paper window silver morning winter city bridge "
    "Grüße café naïve 東京 größe über señor"
).split()


def good_lines(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(WORDS, size=rng.integers(2, 6)))
        out.append((s, s.upper()))
    return out


def write_bad_tsv(path, n_good=40):
    good = good_lines(n_good)
    lines = [f"{a}\t{b}\n".encode() for a, b in good[:10]]
    lines += [
        b"no tab in this line\n",  # no_tab
        b"bad \xff\xfe bytes\tcaf\xc3\xa9\n",  # invalid_utf8
        "crlf ends\tare fine\r\n".encode(),  # valid (CR stripped)
        b"\n",  # empty_line
        b"   \r\n",  # empty_line
        ("long " * 200 + "\tshort\n").encode(),  # valid but over-long
        b"\tempty source\n",  # empty_field
        b"a\tb\tc\n",  # extra_fields
    ]
    lines += [f"{a}\t{b}\n".encode() for a, b in good[10:]]
    path.write_bytes(b"".join(lines))
    return n_good + 2  # valid lines: the good ones, the CRLF one and the long one


def tsv_cfg(path, tmp_path, **kw):
    base = dict(
        source="tsv",
        path=str(path),
        tokenizer="bytes",
        num_sentinels=10,
        inputs_length=64,
        targets_length=64,
        pack=False,
        eval_fraction=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return DataConfig(**base)


EXPECTED_SKIPS = {"no_tab": 1, "invalid_utf8": 1, "empty_line": 2, "empty_field": 1, "extra_fields": 1}


def test_bad_tsv_counts_truncated(tmp_path, capsys):
    f = tmp_path / "bad.tsv"
    n_valid = write_bad_tsv(f)
    cfg = tsv_cfg(f, tmp_path)
    check_sources(cfg)
    # one epoch exactly: unpacked, one batch of all valid lines
    p = build_pipeline(cfg, split="train", global_batch_size=n_valid, seed=0, vocab_size=270)
    b = next(p)
    st = p.stats
    assert st["skipped_lines"] == 6
    for reason, n in EXPECTED_SKIPS.items():
        assert st[f"skipped_lines/bad.tsv/{reason}"] == n
    assert st["truncated"] == 1 and st["dropped"] == 0 and st["examples"] == n_valid
    assert "bad.tsv: 48 lines, 42 used, 6 skipped" in capsys.readouterr().err
    texts = {p.tokenizer.decode(r) for r in b["inputs"]}
    assert "crlf ends" in texts  # CR stripped from the target only, source unaffected
    assert "are fine" in {p.tokenizer.decode(r) for r in b["targets"]}
    assert any(t.startswith("long long") and len(t) == 63 for t in texts)  # truncated, eos kept


def test_bad_tsv_drop_counts_and_eval_pass(tmp_path):
    f = tmp_path / "bad.tsv"
    n_valid = write_bad_tsv(f)
    cfg = tsv_cfg(f, tmp_path, overlong="drop", eval_path=str(f))
    p = build_pipeline(cfg, split="eval", global_batch_size=8, seed=0, vocab_size=270)
    rows = sum(int(b["inputs_segment_ids"].any(axis=1).sum()) for b in p)
    assert rows == n_valid - 1
    assert p.stats["dropped"] == 1 and p.stats["examples"] == n_valid - 1


def test_packed_tsv_trains_with_sentencepiece(tmp_path):
    f = tmp_path / "bad.tsv"
    write_bad_tsv(f, n_good=300)
    cfg = tsv_cfg(f, tmp_path, tokenizer="sentencepiece", vocab_size=340, pack=True, eval_fraction=0.1)
    p = build_pipeline(cfg, split="train", global_batch_size=4, seed=0, vocab_size=340)
    next(p)
    # trained on first use and cached next to the data, recorded in the resolved config
    assert p.data_config.tokenizer_path.startswith(str(tmp_path)) and os.path.exists(p.data_config.tokenizer_path)
    assert p.stats["packing_efficiency"] > 0.5
    e = build_pipeline(cfg, split="eval", global_batch_size=4, seed=0, vocab_size=340)
    assert e.num_batches == 8  # 30 held-out lines of 302
    with pytest.raises(ValueError, match=r"model.vocab_size=512 does not match the tokenizer's vocab size 340"):
        build_pipeline(cfg, split="train", global_batch_size=4, seed=0, vocab_size=512)


def test_missing_empty_and_all_bad_files_are_errors_naming_the_path(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        check_sources(tsv_cfg(missing, tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no files match .*\*\.tsv"):
        check_sources(tsv_cfg(tmp_path / "sub" / "*.tsv", tmp_path))
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data\.path: .*empty\.tsv is empty"):
        check_sources(tsv_cfg(empty, tmp_path))
    # Reading the lines happens once, when the sources are built (before anything compiles).
    def read_sources(cfg):
        build_pipeline(cfg, split="train", global_batch_size=4, seed=0)

    blank = tmp_path / "blank.tsv"
    blank.write_bytes(b"\n  \r\n\n")
    with pytest.raises(ValueError, match=r"blank\.tsv is empty"):
        read_sources(tsv_cfg(blank, tmp_path))
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"no tabs\nat all\n\xff\xff\n")
    with pytest.raises(ValueError, match=r"bad\.tsv has no valid tsv lines \(3 lines: 1 invalid_utf8, 2 no_tab\)"):
        read_sources(tsv_cfg(bad, tmp_path))
    # one bad file among good ones is still an error
    good = tmp_path / "good.tsv"
    write_bad_tsv(good)
    with pytest.raises(ValueError, match=r"bad\.tsv"):
        read_sources(tsv_cfg(f"{good},{bad}", tmp_path))


def test_jsonl_fields_and_counts(tmp_path):
    f = tmp_path / "d.jsonl"
    good = good_lines(20)
    lines = [json.dumps({"en": a, "de": b}, ensure_ascii=False) for a, b in good]
    lines[3:3] = ["{not json", "[1, 2]", json.dumps({"en": "x"}), json.dumps({"en": "", "de": "y"}), ""]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = DataConfig(
        source="jsonl",
        path=str(tmp_path / "*.jsonl"),
        jsonl_inputs_key="en",
        jsonl_targets_key="de",
        tokenizer="bytes",
        num_sentinels=10,
        inputs_length=64,
        targets_length=64,
        pack=False,
        eval_fraction=0.0,
    )
    p = build_pipeline(cfg, split="train", global_batch_size=20, seed=0)
    b = next(p)
    st = p.stats
    assert st["skipped_lines"] == 5
    for reason in ("invalid_json", "not_an_object", "missing_field", "empty_field", "empty_line"):
        assert st[f"skipped_lines/d.jsonl/{reason}"] == 1
    pairs = {(p.tokenizer.decode(i), p.tokenizer.decode(t)) for i, t in zip(b["inputs"], b["targets"])}
    assert pairs == set(good)


@pytest.mark.parametrize("workers", [0, 2])
def test_prepare_arrayrecord_round_trip(tmp_path, workers):
    from trainer.prepare import prepare

    f = tmp_path / "c.tsv"
    write_bad_tsv(f, n_good=60)
    cfg = tsv_cfg(f, tmp_path, tokenizer="sentencepiece", vocab_size=340, eval_fraction=0.1)
    out = tmp_path / "shards"
    m = prepare(cfg, str(out), workers=workers, records_per_shard=20, progress=False)
    assert m["splits"]["train"]["records"] == 56 and m["splits"]["eval"]["records"] == 6
    assert len(m["splits"]["train"]["shards"]) == 3
    assert m["skipped_lines"][str(f)]["no_tab"] == 1
    assert sum(m["lengths_histogram"]["train"]["inputs"].values()) == 56
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["tokenizer"]["vocab_size"] == 340
    with pytest.raises(FileExistsError):
        prepare(cfg, str(out), workers=0, progress=False)

    ar = DataConfig(source="arrayrecord", path=str(out), inputs_length=64, targets_length=64, pack=False)
    check_sources(ar)
    tok = load_tokenizer(ar)
    p = build_pipeline(ar, split="eval", global_batch_size=8, seed=0, vocab_size=340)
    got = set()
    for b in p:
        for i, t, s in zip(b["inputs"], b["targets"], b["inputs_segment_ids"]):
            if s.any():
                got.add((tok.decode(i), tok.decode(t)))
    src = build_pipeline(cfg, split="eval", global_batch_size=8, seed=0, vocab_size=340)
    want = set()
    for b in src:
        for i, t, s in zip(b["inputs"], b["targets"], b["inputs_segment_ids"]):
            if s.any():
                want.add((src.tokenizer.decode(i), src.tokenizer.decode(t)))
    assert got == want and len(got) == 6


def test_prepare_embedded_span_corruption_shards(tmp_path):
    from trainer.prepare import prepare

    cfg = DataConfig(source="embedded", tokenizer="bytes", inputs_length=64, targets_length=16)
    out = tmp_path / "emb"
    m = prepare(cfg, str(out), workers=0, progress=False)
    assert m["task"] == "span_corruption"
    ar = DataConfig(source="arrayrecord", path=str(out), inputs_length=64, targets_length=16)
    p = build_pipeline(ar, split="train", global_batch_size=4, seed=0, vocab_size=260 + 100)
    b = next(p)
    assert (b["inputs"] >= 260).any() and (b["targets"] >= 260).any()  # sentinels
    assert p.stats["truncated"] == 0
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        check_sources(DataConfig(source="arrayrecord", path=str(tmp_path)))


def test_record_format_is_not_pickle():
    from trainer.data.sources import encode_record

    r = encode_record(np.array([5, 6, 7]), np.array([9]))
    assert r[:4] == b"S2S1"
    i, t = decode_record(r)
    assert i.tolist() == [5, 6, 7] and t.tolist() == [9]


def test_tsv_state_restore_with_workers(tmp_path):
    """File records are read in Grain worker processes (fresh descriptors) and resume exactly."""
    f = tmp_path / "w.tsv"
    write_bad_tsv(f, n_good=80)
    cfg = tsv_cfg(f, tmp_path, pack=True, workers=2, inputs_length=32, targets_length=32)
    with build_pipeline(cfg, split="train", global_batch_size=4, seed=7, vocab_size=270) as p:
        for _ in range(3):
            next(p)
        state = json.loads(json.dumps(p.get_state()))
        expected = [next(p) for _ in range(3)]
    with build_pipeline(cfg, split="train", global_batch_size=4, seed=7, vocab_size=270) as q:
        q.set_state(state)
        for e in expected:
            got = next(q)
            for k in e:
                np.testing.assert_array_equal(got[k], e[k])


def test_corrupt_arrayrecord_record_is_skipped_and_counted(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    from trainer.data.sources import encode_record

    w = ArrayRecordWriter(str(tmp_path / "eval-0.array_record"), "group_size:1")
    for k in range(6):
        w.write(b"garbage, not a record" if k == 2 else encode_record(np.arange(5, 9), np.arange(10, 10 + k + 1)))
    w.close()
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "format": "seq2seq-arrayrecord-v1",
                "task": "pairs",
                "tokenizer": {"kind": "bytes", "vocab_size": 270, "num_sentinels": 10},
                "splits": {
                    "train": {"records": 6, "shards": ["eval-0.array_record"]},
                    "eval": {"records": 6, "shards": ["eval-0.array_record"]},
                },
            }
        )
    )
    cfg = DataConfig(source="arrayrecord", path=str(tmp_path), inputs_length=16, targets_length=16)
    p = build_pipeline(cfg, split="eval", global_batch_size=8, seed=0, vocab_size=270)
    (b,) = list(p)
    assert int(b["inputs_segment_ids"].any(axis=1).sum()) == 5
    assert p.stats["bad_records"] == 1
