"""Data on object storage (gs:// and s3:// through the local servers of tests/object_store.py):
TSV sources, prepared ArrayRecord datasets and SentencePiece tokenizers read from (and written to)
a bucket behave exactly like the same files on local disk, with the same one-line errors."""

import json
import os
import re

import numpy as np
import pytest

from tests.object_store import _server_logs, object_store  # noqa: F401  (fixtures)
from tests.test_data_sources import tsv_cfg, write_bad_tsv
from trainer import storage
from trainer.data import DataConfig, build_pipeline, check_sources, load_tokenizer
from trainer.data.vocab import SentencePieceTokenizer, train_sentencepiece


@pytest.fixture(autouse=True)
def _local_cache(tmp_path, monkeypatch):
    """Local copies of remote files go to this test's folder, not ~/.cache."""
    monkeypatch.setenv("SEQ2SEQ_CACHE", str(tmp_path / "remote-cache"))


def upload(local, url):
    storage.write_bytes(url, open(local, "rb").read())
    return url


def batches(cfg, split, n=None, **kw):
    p = build_pipeline(cfg, split=split, global_batch_size=8, seed=3, **kw)
    try:
        out = []
        for b in p:
            out.append(b)
            if n is not None and len(out) == n:
                break
        return out, p.stats, p
    finally:
        p.close()


def assert_same(a, b):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_tsv_in_a_bucket_gives_the_same_batches(object_store, tmp_path):
    local = tmp_path / "bad.tsv"
    write_bad_tsv(local, n_good=60)
    url = upload(local, object_store.url("corpus", "bad.tsv"))
    specs = [  # (local, remote): a file, a glob, a comma-separated list (the same file twice)
        (str(local), url),
        (str(tmp_path / "*.tsv"), object_store.url("corpus", "*.tsv")),
        (f"{local}, {tmp_path / 'b*.tsv'}", f"{url}, {object_store.url('corpus', 'b*.tsv')}"),
    ]
    for local_spec, spec in specs:
        cfg_local = tsv_cfg(local_spec, tmp_path, pack=True, eval_fraction=0.1)
        cfg = tsv_cfg(spec, tmp_path, pack=True, eval_fraction=0.1)
        check_sources(cfg)
        want, want_stats, _ = batches(cfg_local, "train", 5, vocab_size=270)
        got, got_stats, _ = batches(cfg, "train", 5, vocab_size=270)
        assert_same(got, want)
        assert got_stats == want_stats and got_stats["skipped_lines/bad.tsv/no_tab"] == 1
        assert_same(batches(cfg, "eval")[0], batches(cfg_local, "eval")[0])


def test_tsv_in_a_bucket_trains_its_tokenizer_into_a_bucket_url(object_store, tmp_path):
    local = tmp_path / "c.tsv"
    write_bad_tsv(local, n_good=200)
    url = upload(local, object_store.url("c.tsv"))
    tok_url = object_store.url("tok", "spm.model")
    cfg = tsv_cfg(url, tmp_path, tokenizer="sentencepiece", vocab_size=340, tokenizer_path=tok_url)
    check_sources(cfg)  # a missing tokenizer at a URL is fine: it is trained there
    got, _, p = batches(cfg, "train", 3, vocab_size=340)
    assert p.data_config.tokenizer_path == tok_url and storage.isfile(tok_url)
    # the same model, used from local disk, gives the same batches for the same data on local disk
    model = tmp_path / "spm.model"
    model.write_bytes(storage.read_bytes(tok_url))
    want, _, _ = batches(tsv_cfg(local, tmp_path, tokenizer="sentencepiece", vocab_size=340,
                                 tokenizer_path=str(model)), "train", 3, vocab_size=340)
    assert_same(got, want)
    # without data.tokenizer_path, remote data's tokenizer is cached in the local cache_dir
    cfg = tsv_cfg(url, tmp_path, tokenizer="sentencepiece", vocab_size=340)
    _, _, p = batches(cfg, "train", 1, vocab_size=340)
    assert p.data_config.tokenizer_path.startswith(str(tmp_path / "cache"))


def test_sentencepiece_model_at_a_bucket_url_loads_and_encodes_identically(object_store, tmp_path):
    from tests.test_data_text import CORPUS, NON_ASCII

    proto = train_sentencepiece(CORPUS, vocab_size=370, num_sentinels=20)
    path = tmp_path / "t.model"
    path.write_bytes(proto)
    url = object_store.url("models", "t.model")
    storage.write_bytes(url, proto)
    local, remote = SentencePieceTokenizer.load(str(path), 20), SentencePieceTokenizer.load(url, 20)
    assert remote.path == url and remote.vocab_size == local.vocab_size == 370
    for text in [NON_ASCII, *CORPUS[:6]]:
        assert remote.encode(text).tolist() == local.encode(text).tolist()
        assert remote.decode(remote.encode(text)) == text
    tok = load_tokenizer(DataConfig(source="tsv", path="unused.tsv", tokenizer_path=url, vocab_size=370,
                                    num_sentinels=20))
    assert tok.path == url and tok.encode(NON_ASCII).tolist() == local.encode(NON_ASCII).tolist()


def test_prepared_dataset_written_to_and_read_from_a_bucket(object_store, tmp_path, capsys):
    from trainer.prepare import main, prepare

    local_tsv = tmp_path / "c.tsv"
    write_bad_tsv(local_tsv, n_good=60)
    tsv_url = upload(local_tsv, object_store.url("data", "c.tsv"))
    tok_url = object_store.url("tok.model")
    common = dict(tokenizer="sentencepiece", vocab_size=340, eval_fraction=0.1, tokenizer_path=tok_url)
    local_out = tmp_path / "shards"
    m_local = prepare(tsv_cfg(local_tsv, tmp_path, **common), str(local_out), workers=0, records_per_shard=20,
                      progress=False)
    out = object_store.url("prepared")
    assert main(["--out", out, "--workers", "0", "--records-per-shard", "20", "--no-progress",
                 "data.source=tsv", f"data.path={tsv_url}", "data.tokenizer=sentencepiece", "data.vocab_size=340",
                 "data.num_sentinels=10", "data.eval_fraction=0.1", f"data.tokenizer_path={tok_url}",
                 "data.inputs_length=64", "data.targets_length=64"]) == 0
    assert f"wrote {out}: train: 56 records in 3 shard(s), eval: 6 records" in capsys.readouterr().out
    m = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert m["splits"] == m_local["splits"] and m["lengths_histogram"] == m_local["lengths_histogram"]
    assert m["skipped_lines"][tsv_url] == m_local["skipped_lines"][str(local_tsv)]
    assert m["tokenizer"]["trained_from"] == tok_url
    assert storage.listdir(out) == sorted(os.listdir(local_out))
    with pytest.raises(FileExistsError, match="already holds a manifest.json"):
        prepare(tsv_cfg(tsv_url, tmp_path, **common), out, workers=0, progress=False)

    def ar(path):
        return DataConfig(source="arrayrecord", path=path, inputs_length=64, targets_length=64, pack=True)

    for path in (out, storage.join(out, "manifest.json")):
        check_sources(ar(path))
        assert load_tokenizer(ar(path)).encode("river stone").tolist() == \
            load_tokenizer(ar(str(local_out))).encode("river stone").tolist()
        assert_same(batches(ar(path), "train", 4, vocab_size=340)[0],
                    batches(ar(str(local_out)), "train", 4, vocab_size=340)[0])
        assert_same(batches(ar(path), "eval", vocab_size=340)[0], batches(ar(str(local_out)), "eval", vocab_size=340)[0])

    # a shard gone from the bucket: the same error as locally, naming data.path and the shard
    shard = storage.join(out, m["splits"]["train"]["shards"][1])
    storage.remove(shard)
    with pytest.raises(FileNotFoundError, match=rf"^data\.path: shard {re.escape(repr(shard))} listed in .* is missing"):
        check_sources(ar(out))


def test_missing_and_empty_bucket_paths_are_one_line_errors_naming_the_key(object_store, tmp_path):
    def message(cfg):
        with pytest.raises((FileNotFoundError, ValueError)) as e:
            check_sources(cfg)
        text = str(e.value)
        assert "\n" not in text
        return type(e.value), text

    local_root, url_root = str(tmp_path / "b"), object_store.url("b")
    os.makedirs(local_root)
    storage.write_bytes(storage.join(url_root, "empty.tsv"), b"")
    open(os.path.join(local_root, "empty.tsv"), "wb").close()
    storage.write_bytes(storage.join(url_root, "dir", "x.tsv"), b"a\tb\n")
    os.makedirs(os.path.join(local_root, "dir"))
    open(os.path.join(local_root, "dir", "x.tsv"), "wb").write(b"a\tb\n")

    cases = [("path", "nope.tsv"), ("path", "sub/*.tsv"), ("path", "empty.tsv"), ("path", "dir"),
             ("eval_path", "nope.tsv")]
    for key, rel in cases:
        def cfg(root):
            kw = {"eval_path": storage.join(root, rel), "path": storage.join(root, "dir", "x.tsv")} \
                if key == "eval_path" else {"path": storage.join(root, rel)}
            return tsv_cfg(kw.pop("path"), tmp_path, **kw)

        want_type, want = message(cfg(local_root))
        got_type, got = message(cfg(url_root))
        assert got_type is want_type and got == want.replace(local_root, url_root), (got, want)
        assert got.startswith(f"data.{key}: ") and url_root in got

    # an empty glob in a bucket that does not exist either
    missing_bucket = f"{object_store.scheme}://no-such-bucket-{os.getpid()}/x/*.tsv"
    assert message(tsv_cfg(missing_bucket, tmp_path)) == (FileNotFoundError, f"data.path: no files match {missing_bucket!r}")
    # a prepared dataset that is not there
    assert message(DataConfig(source="arrayrecord", path=url_root)) == (
        FileNotFoundError,
        f"data.path: no manifest.json at {storage.join(url_root, 'manifest.json')!r} "
        "(write one with python -m trainer.prepare)")
