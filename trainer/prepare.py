"""Tokenize a corpus once into ArrayRecord shards for `data.source=arrayrecord`.

  python -m trainer.prepare [CONFIG.yaml] --out DIR [--workers N] [--records-per-shard N] \
      [data.source=tsv data.path='corpus/*.tsv' data.vocab_size=8000 ...]

Reads the source named by the config's `data.*` keys (embedded, tsv or jsonl),
trains or loads the tokenizer exactly as training would (cached), tokenizes in
parallel worker processes, and writes to DIR:

  tokenizer.model                     the SentencePiece model (sentencepiece only)
  train-00000-of-0000N.array_record   records: pre-tokenized (inputs, targets), no eos
  eval-00000-of-0000M.array_record    (embedded: token chunks, span-corrupted at load)
  manifest.json                       format, task, tokenizer, counts, skipped lines,
                                      lengths histogram; written last

Then train with `data.source=arrayrecord data.path=DIR`. Records are a small
binary format (trainer.data.sources.encode_record), never pickles.

DIR (and the data it reads) may be a gs://bucket/... or s3://bucket/... URL: the shards are
written to a local temporary folder, uploaded, and the manifest uploaded last, so an output
whose upload was cut short has no manifest and is never taken for a finished one.

Exit codes: 0 on success, 2 for a user error (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from trainer.data import sources as S
from trainer.data.config import DataConfig
from trainer.workdir import unwritable_reason


def _histogram(lengths: list[int]) -> dict[str, int]:
    """Counts per power-of-two bucket: "1-1", "2-3", "4-7", ..."""
    out: dict[str, int] = {}
    for n in lengths:
        lo = 1 << max(int(n).bit_length() - 1, 0)
        key = f"{lo}-{2 * lo - 1}" if n else "0-0"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split("-")[0])))


# Worker-process globals (set by _init_worker).
_W: dict = {}


def _init_worker(kind, keys, tokenizer, index):
    _W.update(kind=kind, keys=keys, tok=tokenizer, index=index)


def _encode_rows(rows: np.ndarray) -> list[bytes]:
    lines = S._Lines(_W["index"], rows)
    out = []
    for i in range(len(lines)):
        src, tgt = S.parse_line(_W["kind"], lines[i], _W["keys"])
        out.append(S.encode_record(_W["tok"].encode(src), _W["tok"].encode(tgt)))
    return out


class _ShardWriter:
    def __init__(self, tmpdir: str, split: str, records_per_shard: int, total: int):
        self.tmpdir, self.split, self.per = tmpdir, split, records_per_shard
        self.num_shards = max(1, -(-total // records_per_shard))
        self.names = [f"{split}-{i:05d}-of-{self.num_shards:05d}.array_record" for i in range(self.num_shards)]
        self.count, self._writer, self._shard = 0, None, -1

    def write(self, rec: bytes):
        from array_record.python.array_record_module import ArrayRecordWriter

        shard = self.count // self.per
        if shard != self._shard:
            if self._writer is not None:
                self._writer.close()
            self._shard = shard
            self._writer = ArrayRecordWriter(os.path.join(self.tmpdir, self.names[shard]), "group_size:1")
        self._writer.write(rec)
        self.count += 1

    def close(self):
        if self._writer is not None:
            self._writer.close()
        self.names = self.names[: self._shard + 1] if self.count else []


def prepare(
    cfg: DataConfig, out: str, *, workers: int = 2, records_per_shard: int = 100_000, progress: bool = True
) -> dict:
    """Writes shards + manifest into `out` (local or a gs:// / s3:// URL; must not hold a manifest
    yet); returns the manifest."""
    from tqdm import tqdm

    from trainer import storage

    cfg.validate()
    if cfg.source not in ("embedded", "tsv", "jsonl"):
        raise ValueError(f"data.source: prepare reads embedded, tsv or jsonl, not {cfg.source!r}")
    remote = storage.is_remote(out)
    storage.check(out)
    if storage.exists(storage.join(out, S.MANIFEST)):
        raise FileExistsError(f"--out: {out} already holds a {S.MANIFEST}; choose a new directory")
    S.check(cfg)
    t0 = time.time()
    source = S.make_source(cfg, vocab_size=None)
    tok = source.tokenizer
    if remote:  # written locally, uploaded at the end (ArrayRecord writers take local paths)
        tmp = tempfile.mkdtemp(prefix="seq2seq-prepare-")
    else:
        os.makedirs(out, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=out, prefix=".prepare-")
    manifest: dict = {
        "format": "seq2seq-arrayrecord-v1",
        "source": cfg.source,
        "path": cfg.path,
        "eval_path": cfg.eval_path,
        "splits": {},
        "lengths_histogram": {},
    }
    try:
        if tok.kind == "sentencepiece":
            storage.copy_file(tok.path, os.path.join(tmp, "tokenizer.model"))  # tok.path may be a URL
            manifest["tokenizer"] = {
                "kind": "sentencepiece",
                "file": "tokenizer.model",
                "trained_from": storage.absolute(tok.path),
            }
        else:
            manifest["tokenizer"] = {"kind": tok.kind}  # bytes | byt5
        manifest["tokenizer"].update(vocab_size=tok.vocab_size, num_sentinels=tok.num_sentinels)

        if cfg.source == "embedded":
            manifest["task"] = "span_corruption"
            manifest["chunk_length"] = source.chunk_length
            manifest["chunked_for"] = {
                "inputs_length": cfg.inputs_length,
                "targets_length": cfg.targets_length,
                "noise_density": cfg.noise_density,
                "mean_noise_span_length": cfg.mean_noise_span_length,
            }
            for split, chunks in source._chunks.items():
                w = _ShardWriter(tmp, split, records_per_shard, len(chunks))
                for c in tqdm(chunks, desc=split, unit="rec", disable=not progress):
                    w.write(S.encode_record(c, np.zeros(0, np.int32)))
                w.close()
                manifest["splits"][split] = {"records": w.count, "shards": w.names}
                manifest["lengths_histogram"][split] = {"inputs": _histogram([len(c) for c in chunks])}
        else:
            manifest["task"] = "pairs"
            manifest["skipped_lines"] = dict(source.index.skipped)
            if source.eval_index is not None:
                manifest["skipped_lines"].update(source.eval_index.skipped)
            keys = (cfg.jsonl_inputs_key, cfg.jsonl_targets_key)
            for split, (index, rows) in source._rows.items():
                w = _ShardWriter(tmp, split, records_per_shard, len(rows))
                hist_i, hist_t = [], []
                step = max(1, min(2000, -(-len(rows) // max(4 * workers, 1))))
                tasks = [rows[a : a + step] for a in range(0, len(rows), step)]
                ctx = multiprocessing.get_context("spawn")
                bar = tqdm(total=len(rows), desc=split, unit="rec", disable=not progress)
                with contextlib.ExitStack() as stack:
                    if workers > 0 and len(tasks) > 1:
                        pool = stack.enter_context(
                            ctx.Pool(workers, initializer=_init_worker, initargs=(cfg.source, keys, tok, index))
                        )
                        batches = pool.imap(_encode_rows, tasks)
                    else:
                        _init_worker(cfg.source, keys, tok, index)
                        batches = map(_encode_rows, tasks)
                    for recs in batches:
                        for r in recs:
                            w.write(r)
                            i, t = S.decode_record(r)
                            hist_i.append(len(i))
                            hist_t.append(len(t))
                        bar.update(len(recs))
                bar.close()
                w.close()
                manifest["splits"][split] = {"records": w.count, "shards": w.names}
                manifest["lengths_histogram"][split] = {"inputs": _histogram(hist_i), "targets": _histogram(hist_t)}
        manifest["seconds"] = round(time.time() - t0, 2)
        # Commit: shards and tokenizer first, the manifest last (atomic rename; on object storage
        # an upload of each file, then the manifest's, which appears whole or not at all).
        if remote:
            storage.copy_tree(tmp, out)
            storage.write_text(storage.join(out, S.MANIFEST), json.dumps(manifest, indent=1))
        else:
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
            mtmp = os.path.join(out, f".{S.MANIFEST}.tmp")
            with open(mtmp, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1)
            os.replace(mtmp, os.path.join(out, S.MANIFEST))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def check_out(out: str) -> None:
    """`--out` must be a directory (new or existing) that can be written; nothing is created here.
    A gs:// / s3:// URL needs its client package and must not name an existing object."""
    from trainer import storage

    if storage.is_remote(out):
        storage.check(out)
        if storage.isfile(out):
            raise ValueError(f"--out: {out} is a file, not a directory")
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out: {out} is a file, not a directory")
    reason = unwritable_reason(out)
    if reason is not None:
        raise ValueError(f"--out: {out} cannot be created: {reason}")


def main(argv: list[str] | None = None) -> int:
    ap = _ArgumentParser(
        prog="python -m trainer.prepare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True, help="output directory (new, or without a manifest.json)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="tokenizer processes")
    ap.add_argument("--records-per-shard", type=int, default=100_000)
    ap.add_argument("--no-progress", action="store_true")
    args, rest = ap.parse_known_args(argv)
    from trainer.config import ConfigError, load_config

    try:
        if args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        if args.records_per_shard < 1:
            raise ValueError(f"--records-per-shard must be >= 1, got {args.records_per_shard}")
        check_out(args.out)
        cfg = load_config(rest).data
        m = prepare(
            cfg, args.out, workers=args.workers, records_per_shard=args.records_per_shard, progress=not args.no_progress
        )
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s}: {v['records']} records in {len(v['shards'])} shard(s)" for s, v in m["splits"].items())
    print(
        f"wrote {args.out}: {counts}; vocab {m['tokenizer']['vocab_size']} ({m['tokenizer']['kind']}); "
        f"train with data.source=arrayrecord data.path={args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
