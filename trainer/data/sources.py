"""Data sources: records per split, and how a record becomes an (inputs, targets) example.

Every data path (`data.path`, `data.eval_path`, `data.tokenizer_path`, a prepared dataset) may be
local or a gs:// / s3:// URL; all file access goes through `trainer.storage` (imported in the
functions that use it: importing it here would be circular, trainer.storage -> trainer.config ->
trainer.data). Local paths keep plain `os` calls (os.pread for random access).

Remote files that are read at random (TSV/JSONL lines, ArrayRecord shards) are read from a local
copy (`storage.local_copy`: downloaded once per machine and object version, then cached): a
ranged GET per record would be far too slow for a shuffled pipeline, and array_record's readers
open local files only (their Python API takes paths, not file objects).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import sys
from typing import Callable, Iterable

import grain
import numpy as np

from trainer.data import span_corruption
from trainer.data.config import MIN_SPM_PIECES, DataConfig
from trainer.data.stream import RecordError
from trainer.data.vocab import (
    NUM_RESERVED,
    BYTE_LAYOUTS,
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    default_cache_dir,
    spm_cache_name,
    train_sentencepiece,
    write_once,
)


class Source:
    """A split's records (a Grain MapDataset) plus `make_example(record, rng)`.

    `make_example` returns {"inputs": ids, "targets": ids} without eos; it must be
    picklable (it runs in Grain workers) and deterministic given `rng`.
    """

    tokenizer: Tokenizer | None = None
    vocab_size: int
    stats: dict[str, int] = {}

    def records(self, split: str) -> grain.MapDataset:
        raise NotImplementedError

    def make_example(self, record, rng: np.random.Generator) -> dict:
        raise NotImplementedError


class _Rows:
    """Random-access rows of a [n, max_len] int32 array with per-row lengths."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray):
        self._tokens, self._lengths = tokens, lengths

    def __len__(self):
        return len(self._lengths)

    def __getitem__(self, i):
        return self._tokens[i, : self._lengths[i]]


class SyntheticSource(Source):
    """`copy` / `reverse` of random ids in [NUM_RESERVED, vocab_size).

    Train and eval sets are fixed by `data.synthetic_seed` (the run's seed only sets
    the order); eval sequences never occur in the train set.
    """

    def __init__(self, cfg: DataConfig, vocab_size: int):
        if vocab_size is None or vocab_size <= NUM_RESERVED + 1:
            raise ValueError(f"data.source=synthetic needs model.vocab_size > {NUM_RESERVED + 1}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.task = cfg.synthetic_task
        self.stats = {}
        hi = min(cfg.synthetic_max_length, cfg.inputs_length - 1, cfg.targets_length - 1)
        lo = min(cfg.synthetic_min_length, hi)
        rng = np.random.default_rng([cfg.synthetic_seed, 0x5EED])
        n_train, n_eval = cfg.synthetic_train_examples, cfg.synthetic_eval_examples

        def draw(n):
            lengths = rng.integers(lo, hi + 1, size=n)
            tokens = rng.integers(NUM_RESERVED, vocab_size, size=(n, hi)).astype(np.int32)
            tokens[np.arange(hi)[None, :] >= lengths[:, None]] = 0
            return tokens, lengths

        train_tokens, train_lengths = draw(n_train)
        seen = {row.tobytes() for row in train_tokens}
        eval_tokens, eval_lengths, got = [], [], 0
        for _ in range(100):
            t, l = draw(n_eval)
            for row, length in zip(t, l):
                key = row.tobytes()
                if key not in seen and got < n_eval:
                    seen.add(key)
                    eval_tokens.append(row)
                    eval_lengths.append(length)
                    got += 1
            if got == n_eval:
                break
        if got < n_eval:
            raise ValueError(
                f"data.synthetic_eval_examples: cannot draw {n_eval} sequences disjoint "
                f"from the train set with vocab_size={vocab_size} and lengths {lo}..{hi}"
            )
        self._rows = {
            "train": _Rows(train_tokens, train_lengths),
            "eval": _Rows(np.stack(eval_tokens), np.asarray(eval_lengths)),
        }

    def records(self, split):
        return grain.MapDataset.source(self._rows[split])

    def make_example(self, record, rng):
        targets = record[::-1] if self.task == "reverse" else record
        return {"inputs": record, "targets": targets.copy()}


# --------------------------------------------------------------------------- tokenizers


def _fingerprint(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def _writable_dir(d: str) -> bool:
    """A local folder this process may write (a URL never is: trained tokenizers of remote data are
    cached locally unless `data.tokenizer_path` names where they go)."""
    from trainer import storage

    return not storage.is_remote(d) and os.path.isdir(d) and os.access(d, os.W_OK)


def spm_size_error(cfg: DataConfig, message: str) -> str:
    """One line for a SentencePiece size the corpus cannot support, naming the data.vocab_size that works.

    SentencePiece says `Vocabulary size too high (N). Please set it to a value <= M.` (too few
    distinct pieces in the text) or `Vocabulary size is smaller than required_chars. N vs M.`
    (more distinct characters than pieces); M counts pieces, data.vocab_size adds the sentinels.
    """
    s = cfg.num_sentinels
    first = " ".join(message.split())
    high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if high:
        most = int(high.group(2))
        if most < MIN_SPM_PIECES:
            return (
                f"data.vocab_size: {cfg.vocab_size} is too large for this corpus, which supports at most {most} "
                f"SentencePiece pieces (fewer than the {MIN_SPM_PIECES} a vocabulary needs); use "
                f"data.tokenizer=bytes or more text"
            )
        return (
            f"data.vocab_size: {cfg.vocab_size} is too large for this corpus: SentencePiece can make at most "
            f"{most} pieces, so the largest data.vocab_size that works is {most + s} ({most} pieces + {s} "
            f"sentinels); set data.vocab_size={most + s} (or use data.tokenizer=bytes)"
        )
    low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if low:
        least = int(low.group(2))
        return (
            f"data.vocab_size: {cfg.vocab_size} is too small for this corpus: its {least} distinct characters "
            f"and reserved pieces need at least {least} SentencePiece pieces, so data.vocab_size must be >= "
            f"{least + s} ({least} pieces + {s} sentinels)"
        )
    return (
        f"data.vocab_size: cannot train a SentencePiece model of {cfg.vocab_size} entries on this corpus "
        f"({first}); change data.vocab_size or use data.tokenizer=bytes"
    )


def resolve_tokenizer(
    cfg: DataConfig, *, fingerprint: str, texts: Callable[[], Iterable[str]], data_dir: str | None
) -> Tokenizer:
    """Loads `data.tokenizer_path`, or the cached model for this corpus, or trains and caches one.

    Cache location: `tokenizer_path` if set (trained there when missing), else next
    to the data (`data_dir`) when writable, else `cache_dir`. The file name carries a
    hash of the corpus fingerprint and the settings, so a changed corpus retrains.
    """
    from trainer import storage

    if cfg.tokenizer in BYTE_LAYOUTS:
        return ByteTokenizer(cfg.num_sentinels, cfg.tokenizer)
    if cfg.tokenizer_path and storage.exists(cfg.tokenizer_path):
        path = cfg.tokenizer_path
    else:
        if cfg.tokenizer_path:
            path = cfg.tokenizer_path
        else:
            name = spm_cache_name(fingerprint, cfg.vocab_size, cfg.num_sentinels, cfg.spm_model_type)
            d = data_dir if data_dir and _writable_dir(data_dir) else default_cache_dir(cfg.cache_dir)
            path = os.path.join(d, name)
        if not storage.exists(path):
            print(
                f"[data] training a SentencePiece {cfg.spm_model_type} tokenizer "
                f"({cfg.vocab_size - cfg.num_sentinels} pieces + {cfg.num_sentinels} sentinels) -> {path}",
                file=sys.stderr,
                flush=True,
            )
            try:
                proto = train_sentencepiece(
                    texts(), vocab_size=cfg.vocab_size, num_sentinels=cfg.num_sentinels, model_type=cfg.spm_model_type
                )
            except RuntimeError as e:
                raise ValueError(spm_size_error(cfg, str(e))) from None
            write_once(path, proto)
    tok = SentencePieceTokenizer.load(path, cfg.num_sentinels)
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"data.vocab_size={cfg.vocab_size} does not match the tokenizer {path} "
            f"({tok.piece_size} pieces + {cfg.num_sentinels} sentinels = {tok.vocab_size})"
        )
    return tok


# --------------------------------------------------------------------------- embedded corpus

_DOC_CHARS = 4000


def embedded_documents() -> list[tuple[str, str]]:
    """(key, text) documents of `pydoc_data.topics`: one per topic, long topics cut at
    paragraph boundaries into pieces of about 4000 characters."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        paras = [p for p in topics[name].split("\n\n") if p.strip()]
        piece, k = [], 0
        for para in paras:
            piece.append(para)
            if sum(len(x) for x in piece) >= _DOC_CHARS:
                docs.append((f"{name}#{k}", "\n\n".join(piece)))
                piece, k = [], k + 1
        if piece:
            docs.append((f"{name}#{k}", "\n\n".join(piece)))
    return docs


def _held_out(key: str, fraction: float) -> bool:
    """Deterministic split by a hash of the document key (independent of the run's seed)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


class _SpanCorruption:
    """Picklable example maker for token chunks: the denoising objective `data.objective`
    (T5 span corruption, or BART-style infilling whose targets are the whole chunk)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer):
        self._fn = span_corruption.infill if cfg.objective == "infilling" else span_corruption.corrupt
        self._density = cfg.noise_density
        self._mean = cfg.mean_noise_span_length
        self._sentinels = np.asarray([tokenizer.sentinel_id(i) for i in range(tokenizer.num_sentinels)], dtype=np.int32)

    def __call__(self, tokens, rng):
        return self._fn(tokens, self._density, self._mean, rng, self._sentinels)


class EmbeddedSource(Source):
    """The Python documentation topics as a span-corruption task.

    Documents are split into train/eval by a hash of their key; each document is
    tokenized and cut into chunks whose corruption fits inputs/targets_length.
    """

    def __init__(self, cfg: DataConfig):
        docs = embedded_documents()
        split = {"train": [], "eval": []}
        for key, text in docs:
            split["eval" if _held_out(key, cfg.eval_fraction) else "train"].append(text)
        if cfg.eval_fraction > 0 and not split["eval"]:
            split["eval"].append(split["train"].pop())
        self._cfg, self._split = cfg, split
        self.fingerprint = _fingerprint(["embedded", sys.version_info[:2], cfg.eval_fraction] + split["train"])
        self.data_dir = None

    def texts(self) -> Iterable[str]:
        return list(self._split["train"])

    def attach(self, tokenizer: Tokenizer) -> None:
        cfg, split = self._cfg, self._split
        self.tokenizer = tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        self.chunk_length = span_corruption.chunk_length(
            cfg.inputs_length, cfg.targets_length, cfg.noise_density, cfg.mean_noise_span_length, cfg.objective
        )
        self._chunks = {s: self._chunk(texts) for s, texts in split.items()}
        self.stats = {}
        self.make_example = _SpanCorruption(cfg, self.tokenizer)

    def _chunk(self, texts):
        chunks = []
        for text in texts:
            ids = self.tokenizer.encode(text)
            for a in range(0, len(ids), self.chunk_length):
                c = ids[a : a + self.chunk_length]
                if len(c) >= 2:
                    chunks.append(np.ascontiguousarray(c))
        return chunks

    def records(self, split):
        return grain.MapDataset.source(self._chunks[split])


# --------------------------------------------------------------------------- tsv / jsonl

def _glob_files(pattern: str) -> list[str]:
    """Files (not folders) matching a local or gs:// / s3:// glob, sorted."""
    from trainer import storage

    if not storage.is_remote(pattern):
        return sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
    # One listing with each match's type (not a request per match); a missing bucket matches nothing.
    try:
        found = storage.filesystem(pattern).glob(pattern.partition("://")[2], detail=True)
    except FileNotFoundError:
        return []
    return sorted(f"{storage.scheme(pattern)}://{k}" for k, info in found.items() if info.get("type") == "file")


def expand_paths(spec: str, key: str = "data.path") -> list[str]:
    """Files named by a path, glob, or comma-separated list of them (local or gs:// / s3://);
    errors name the pattern."""
    from trainer import storage

    files: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if storage.is_remote(part):
            storage.check(part)  # a missing client package: one line naming the path
        else:
            part = os.path.expanduser(part)
        if glob.has_magic(part):
            matched = _glob_files(part)
            if not matched:
                raise FileNotFoundError(f"{key}: no files match {part!r}")
            files += matched
        elif storage.isdir(part):
            raise ValueError(f"{key}: {part!r} is a directory; name files or a glob")
        elif not storage.isfile(part):
            raise FileNotFoundError(f"{key}: no such file: {part!r}")
        else:
            files.append(part)
    if not files:
        raise FileNotFoundError(f"{key}: no files in {spec!r}")
    return files


def parse_line(kind: str, raw: bytes, keys: tuple[str, str]) -> tuple[str, str] | str:
    """-> (inputs, targets) text, or the reason the line is skipped."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if not raw.strip():
        return "empty_line"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    if kind == "tsv":
        fields = line.split("\t")
        if len(fields) < 2:
            return "no_tab"
        if len(fields) > 2:
            return "extra_fields"
        src, tgt = fields
    else:
        try:
            obj = json.loads(line)
        except ValueError:
            return "invalid_json"
        if not isinstance(obj, dict):
            return "not_an_object"
        src, tgt = obj.get(keys[0]), obj.get(keys[1])
        if not isinstance(src, str) or not isinstance(tgt, str):
            return "missing_field"
    if not src.strip() or not tgt.strip():
        return "empty_field"
    return src, tgt


@dataclasses.dataclass
class LineIndex:
    """Valid lines of some files: where they are, plus per-file skip counts."""

    files: list[str]  # as named (local paths or URLs): what messages and stats show
    file_idx: np.ndarray  # int32 [n]
    offset: np.ndarray  # int64 [n]
    length: np.ndarray  # int32 [n]
    skipped: dict[str, dict[str, int]]  # file -> reason -> count
    lines: dict[str, int]  # file -> total lines
    local: list[str] | None = None  # what is read: `files`, remote ones replaced by their local copies

    def __len__(self):
        return len(self.offset)

    @property
    def readable(self) -> list[str]:
        return self.local if self.local is not None else self.files


def index_files(kind: str, files: list[str], keys: tuple[str, str], key: str = "data.path") -> LineIndex:
    """Scans the files once: where each valid line is, and why the others are skipped.

    A remote file is checked for emptiness where it is, then downloaded once (`storage.local_copy`)
    and scanned and read from that local copy: records are read at random (see the module doc)."""
    from trainer import storage

    fi, off, ln = [], [], []
    skipped, lines = {}, {}
    local = []
    for i, path in enumerate(files):
        if storage.size(path) == 0:
            raise ValueError(f"{key}: {path} is empty")
        local.append(storage.local_copy(path))
        counts: dict[str, int] = {}
        n = good = 0
        pos = 0
        with open(local[-1], "rb") as f:
            for raw in f:
                n += 1
                r = parse_line(kind, raw, keys)
                if isinstance(r, str):
                    counts[r] = counts.get(r, 0) + 1
                else:
                    fi.append(i)
                    off.append(pos)
                    ln.append(len(raw))
                    good += 1
                pos += len(raw)
        skipped[path], lines[path] = counts, n
        if good == 0:
            if counts.keys() <= {"empty_line"}:
                raise ValueError(f"{key}: {path} is empty (no non-blank lines)")
            detail = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            raise ValueError(f"{key}: {path} has no valid {kind} lines ({n} lines: {detail})")
    idx = LineIndex(
        files, np.asarray(fi, np.int32), np.asarray(off, np.int64), np.asarray(ln, np.int32), skipped, lines,
        local if local != list(files) else None,
    )
    return idx


class _Lines:
    """Random access to indexed lines (os.pread: thread-safe, no shared file position)."""

    def __init__(self, index: LineIndex, rows: np.ndarray):
        self._files = index.readable  # local files (remote ones' local copies)
        self._fi, self._off, self._ln = index.file_idx[rows], index.offset[rows], index.length[rows]
        self._fds: dict[int, int] = {}
        self._pid = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fds"], d["_pid"] = {}, None
        return d

    def __len__(self):
        return len(self._off)

    def __getitem__(self, i):
        if self._pid != os.getpid():  # fresh handles in each (worker) process
            self._fds, self._pid = {}, os.getpid()
        f = int(self._fi[i])
        fd = self._fds.get(f)
        if fd is None:  # two reader threads may race here: keep one descriptor, close the other
            mine = os.open(self._files[f], os.O_RDONLY)
            fd = self._fds.setdefault(f, mine)
            if fd != mine:
                os.close(mine)
        return os.pread(fd, int(self._ln[i]), int(self._off[i]))

    def __del__(self):
        try:
            for fd in self._fds.values():
                os.close(fd)
        except Exception:  # interpreter shutdown, already closed
            pass


class _TokenizePair:
    def __init__(self, kind: str, keys: tuple[str, str], tokenizer: Tokenizer):
        self._kind, self._keys, self._tok = kind, keys, tokenizer

    def __call__(self, raw: bytes, rng):
        parsed = parse_line(self._kind, raw, self._keys)  # validated when indexed; the file may have changed
        if isinstance(parsed, str):
            raise RecordError(parsed)
        src, tgt = parsed
        return {"inputs": self._tok.encode(src), "targets": self._tok.encode(tgt)}


def _split_rows(n: int, fraction: float, cap: int) -> dict[str, np.ndarray]:
    """Deterministic held-out rows (independent of the run's seed)."""
    if fraction <= 0 or n < 2:
        return {"train": np.arange(n), "eval": np.arange(0)}
    k = min(max(1, int(round(n * fraction))), cap, n - 1)
    perm = np.random.default_rng(0x5A17).permutation(n)
    ev = np.sort(perm[:k])
    mask = np.ones(n, bool)
    mask[ev] = False
    return {"train": np.flatnonzero(mask), "eval": ev}


def _identity(f: str):
    """What the corpus fingerprint records of a file: where it is and its version. Local files keep
    their (absolute path, size, mtime) form, so tokenizers cached before remote paths existed are
    still found; a URL gives (URL, size:generation or ETag)."""
    from trainer import storage

    if not storage.is_remote(f):
        st = os.stat(f)
        return (os.path.abspath(f), st.st_size, st.st_mtime_ns)
    return (storage.absolute(f), storage.version(f))


class TextPairSource(Source):
    """Parallel text from TSV (`source<TAB>target`) or JSON Lines files."""

    def __init__(self, cfg: DataConfig):
        from trainer import storage

        kind, keys = cfg.source, (cfg.jsonl_inputs_key, cfg.jsonl_targets_key)
        self.index = index_files(kind, expand_paths(cfg.path), keys)
        if cfg.eval_path:
            self.eval_index = index_files(kind, expand_paths(cfg.eval_path, "data.eval_path"), keys, "data.eval_path")
            self._rows = {
                "train": (self.index, np.arange(len(self.index))),
                "eval": (self.eval_index, np.arange(len(self.eval_index))),
            }
        else:
            self.eval_index = None
            rows = _split_rows(len(self.index), cfg.eval_fraction, cfg.eval_max_examples)
            self._rows = {s: (self.index, r) for s, r in rows.items()}
        files = self.index.files
        self.fingerprint = _fingerprint([kind, keys, cfg.eval_path, cfg.eval_fraction] + [_identity(f) for f in files])
        self.data_dir = storage.dirname(storage.absolute(files[0]))
        self._kind, self._keys = kind, keys

    def texts(self) -> Iterable[str]:
        """Both sides of (up to 2M) train lines: what the SentencePiece model is trained on."""
        train_index, train_rows = self._rows["train"]
        lines = _Lines(train_index, train_rows[:2_000_000])
        for i in range(len(lines)):
            src, tgt = parse_line(self._kind, lines[i], self._keys)
            yield src
            yield tgt

    def locate(self, split: str, index: int) -> str:
        """`file:line` of a record (for error messages)."""
        idx, rows = self._rows[split]
        row = int(rows[index])
        path = idx.files[int(idx.file_idx[row])]
        with open(idx.readable[int(idx.file_idx[row])], "rb") as f:
            line = f.read(int(idx.offset[row])).count(b"\n") + 1
        return f"{path}:{line}"

    def attach(self, tokenizer: Tokenizer) -> None:
        from trainer import storage

        self.tokenizer = tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        self.make_example = _TokenizePair(self._kind, self._keys, self.tokenizer)
        self.stats = {"skipped_lines": 0}
        indexes = [self.index] + ([self.eval_index] if self.eval_index else [])
        paths = [p for idx in indexes for p in idx.skipped]
        names = [storage.basename(p) for p in paths]
        short = len(set(names)) == len(names)  # file names when unique, else the paths
        for idx in indexes:
            for path, counts in idx.skipped.items():
                name = storage.basename(path) if short else path
                total = sum(counts.values())
                self.stats["skipped_lines"] += total
                self.stats[f"skipped_lines/{name}"] = total
                for reason, c in counts.items():
                    self.stats[f"skipped_lines/{name}/{reason}"] = c

    def summary(self) -> list[str]:
        out = []
        for idx in [self.index] + ([self.eval_index] if self.eval_index else []):
            for path, counts in idx.skipped.items():
                skipped = sum(counts.values())
                detail = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"
                out.append(
                    f"{path}: {idx.lines[path]} lines, {idx.lines[path] - skipped} used, {skipped} skipped ({detail})"
                )
        return out

    def records(self, split):
        index, rows = self._rows[split]
        return grain.MapDataset.source(_Lines(index, rows))


# --------------------------------------------------------------------------- arrayrecord

MANIFEST = "manifest.json"
RECORD_MAGIC = b"S2S1"


def encode_record(inputs: np.ndarray, targets: np.ndarray) -> bytes:
    """Binary record: magic, uint32 lengths, int32 ids (little endian). Never pickled."""
    i = np.asarray(inputs, "<i4")
    t = np.asarray(targets, "<i4")
    return RECORD_MAGIC + np.asarray([len(i), len(t)], "<u4").tobytes() + i.tobytes() + t.tobytes()


def decode_record(b: bytes) -> tuple[np.ndarray, np.ndarray]:
    if len(b) < 12 or b[:4] != RECORD_MAGIC:
        raise RecordError("not a seq2seq record")
    n_i, n_t = np.frombuffer(b, "<u4", 2, 4)
    if len(b) != 12 + 4 * (int(n_i) + int(n_t)):
        raise RecordError(f"record of {len(b)} bytes does not hold {int(n_i)} + {int(n_t)} ids")
    i = np.frombuffer(b, "<i4", int(n_i), 12).astype(np.int32)
    t = np.frombuffer(b, "<i4", int(n_t), 12 + 4 * int(n_i)).astype(np.int32)
    return i, t


def _nonempty_file(path: str) -> bool:
    from trainer import storage

    if not storage.is_remote(path):
        return os.path.isfile(path) and os.path.getsize(path) > 0
    try:  # one request: a missing object raises, a "folder" has size 0
        return storage.size(path) > 0
    except FileNotFoundError:
        return False


def read_manifest(path: str) -> tuple[str, dict]:
    """(the prepared dataset's folder, its manifest); `path` is that folder or its manifest.json,
    local or gs:// / s3://."""
    from trainer import storage

    storage.check(path)
    mpath = path if storage.basename(path) == MANIFEST else storage.join(path, MANIFEST)
    if not storage.isfile(mpath):
        raise FileNotFoundError(f"data.path: no {MANIFEST} at {mpath!r} (write one with python -m trainer.prepare)")
    text = storage.read_bytes(mpath).decode("utf-8")
    try:
        m = json.loads(text)
    except ValueError as e:
        raise ValueError(f"data.path: {mpath} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != "seq2seq-arrayrecord-v1":
        raise ValueError(f"data.path: {mpath} is not a trainer.prepare manifest")
    root = storage.dirname(mpath)
    for split in ("train", "eval"):
        for shard in m["splits"].get(split, {}).get("shards", []):
            p = storage.join(root, shard)
            if not _nonempty_file(p):
                raise FileNotFoundError(f"data.path: shard {p!r} listed in {mpath} is missing or empty")
    return root, m


class _DecodeRecord:
    def __init__(self, task: str, corrupt: _SpanCorruption | None):
        self._task, self._corrupt = task, corrupt

    def __call__(self, record: bytes, rng):
        inputs, targets = decode_record(record)
        if self._task == "span_corruption":
            return self._corrupt(inputs, rng)
        return {"inputs": inputs, "targets": targets}


class ArrayRecordSource(Source):
    """Pre-tokenized shards written by `python -m trainer.prepare` (random access)."""

    def __init__(self, cfg: DataConfig):
        from trainer import storage

        self.root, self.manifest = read_manifest(cfg.path)
        t = self.manifest["tokenizer"]
        if t["kind"] in BYTE_LAYOUTS:
            self.own_tokenizer = ByteTokenizer(int(t["num_sentinels"]), t["kind"])
        else:
            self.own_tokenizer = SentencePieceTokenizer.load(storage.join(self.root, t["file"]), int(t["num_sentinels"]))
        self._cfg = cfg

    def attach(self, tokenizer: Tokenizer) -> None:
        cfg = self._cfg
        if tokenizer is not self.own_tokenizer and (tokenizer.vocab_size, tokenizer.kind) != (
                self.own_tokenizer.vocab_size, self.own_tokenizer.kind):
            raise ValueError(f"data.path: {self.root} was prepared with another tokenizer "
                             f"({self.own_tokenizer.kind}, {self.own_tokenizer.vocab_size} ids) than the mixture's")
        self.tokenizer = tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        task = self.manifest["task"]
        self.make_example = _DecodeRecord(
            task, _SpanCorruption(cfg, self.tokenizer) if task == "span_corruption" else None
        )
        self.stats = {}

    def records(self, split):
        from trainer import storage

        shards = [storage.join(self.root, s) for s in self.manifest["splits"].get(split, {}).get("shards", [])]
        if not shards:
            return grain.MapDataset.source([])
        # array_record's readers open local paths only: remote shards are read from local copies
        # (downloaded here, once per machine and object version; the split's shards only).
        shards = [storage.local_copy(s) for s in shards]
        return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shards))


# --------------------------------------------------------------------------- entry points


def check(cfg: DataConfig) -> None:
    """Cheap checks before any source is read: files exist and are not empty."""
    from trainer import storage

    if cfg.source in ("tsv", "jsonl"):
        for spec, key in ((cfg.path, "data.path"), (cfg.eval_path, "data.eval_path")):
            for f in expand_paths(spec, key) if spec else []:
                if storage.size(f) == 0:
                    raise ValueError(f"{key}: {f} is empty")
    elif cfg.source == "arrayrecord":
        read_manifest(cfg.path)
    if cfg.tokenizer_path and cfg.tokenizer == "sentencepiece" and cfg.source != "arrayrecord":
        if storage.is_remote(cfg.tokenizer_path):
            storage.check(cfg.tokenizer_path)  # object storage has no folders to check
            return
        d = os.path.dirname(os.path.abspath(cfg.tokenizer_path))
        if not os.path.exists(cfg.tokenizer_path) and not os.path.isdir(d):
            raise FileNotFoundError(
                f"data.tokenizer_path: {cfg.tokenizer_path!r} does not exist and its directory {d!r} does not either"
            )


_CLASSES = {"embedded": EmbeddedSource, "tsv": TextPairSource, "jsonl": TextPairSource, "arrayrecord": ArrayRecordSource}


def make_sources(cfg: DataConfig, *, vocab_size: int | None) -> tuple[list[Source], list[float]]:
    """The sources of `data.source` or `data.mixture`, sharing one tokenizer, and their weights.

    The caller owns them: build them once per run and hand them to every pipeline of the run
    (`build_pipeline(..., sources=...)`), so the tokenizer and file indexes are made once.
    A mixture's SentencePiece model is trained on the text of all its sources; an arrayrecord
    entry brings its prepared tokenizer, which the others then use.
    """
    entries = cfg.sources()
    for _, _, c in entries:
        check(c)
    kinds = {c.source for _, _, c in entries}
    if "synthetic" in kinds:
        if kinds != {"synthetic"}:
            raise ValueError("data.mixture: synthetic sources cannot be mixed with text sources")
        out = [SyntheticSource(c, vocab_size) for _, _, c in entries]
    else:
        out = [_CLASSES[c.source](c) for _, _, c in entries]
        prepared = [s.own_tokenizer for s in out if isinstance(s, ArrayRecordSource)]
        if prepared:
            tokenizer = prepared[0]
        else:
            tokenizer = resolve_tokenizer(
                cfg,
                fingerprint=_fingerprint([s.fingerprint for s in out]) if len(out) > 1 else out[0].fingerprint,
                texts=lambda: (t for s in out for t in s.texts()),
                data_dir=out[0].data_dir,
            )
        for s in out:
            s.attach(tokenizer)
    for (name, _, _), s in zip(entries, out):
        s.name = name
    return out, [w for _, w, _ in entries]


def make_source(cfg: DataConfig, *, vocab_size: int | None) -> Source:
    """The one source of a config without a mixture."""
    return make_sources(dataclasses.replace(cfg, mixture=None), vocab_size=vocab_size)[0][0]


def get_tokenizer(cfg: DataConfig, workdir: str | None = None) -> Tokenizer | None:
    from trainer import storage

    kinds = {c.source for _, _, c in cfg.sources()}
    if kinds == {"synthetic"}:
        return None
    if "arrayrecord" not in kinds:
        if cfg.tokenizer in BYTE_LAYOUTS:
            return ByteTokenizer(cfg.num_sentinels, cfg.tokenizer)
        if cfg.tokenizer_path and storage.exists(cfg.tokenizer_path):  # as recorded in a run's config
            tok = SentencePieceTokenizer.load(cfg.tokenizer_path, cfg.num_sentinels)
            if tok.vocab_size != cfg.vocab_size:
                raise ValueError(
                    f"data.vocab_size={cfg.vocab_size} does not match the tokenizer "
                    f"{cfg.tokenizer_path} ({tok.vocab_size})"
                )
            return tok
    return make_sources(cfg, vocab_size=None)[0][0].tokenizer
