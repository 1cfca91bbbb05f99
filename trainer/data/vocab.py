"""Reserved token ids and the tokenizers.

THE one place that defines the reserved ids (every tokenizer and task follows it):

  id 0                 PAD   padding; segment id 0 marks padding too
  id 1                 EOS   appended to every inputs and targets sequence
  id 2                 UNK   (SentencePiece's unknown piece; byte fallback makes it rare)
  id 3                 BOS   reserved, not emitted by the pipeline (T5's own SentencePiece
                             models have no BOS: there id 3 is an ordinary piece)
  ids 4 ..             ordinary tokens (SentencePiece pieces incl. 256 byte-fallback
                       pieces, or the 256 bytes of the byte tokenizer at 4..259)
  top num_sentinels    span-corruption sentinels, T5 order: sentinel i has id
                       vocab_size - 1 - i (so sentinel 0 is the last id)

The synthetic tasks draw ids from [NUM_RESERVED, model.vocab_size) and use no sentinels.

Nothing here unpickles: SentencePiece models are protobuf files; tokenizers
pickle themselves (for Grain workers) as the model's serialized bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BOS_ID = 3
NUM_RESERVED = 4
BYTE_OFFSET = NUM_RESERVED  # byte b has id b + 4 in the byte tokenizer
BYTE_LAYOUTS = {"bytes": BYTE_OFFSET, "byt5": 3}  # byte tokenizer kind -> id of byte 0


class Tokenizer:
    """Interface: text <-> ids (no eos added by encode; decode stops at eos)."""

    vocab_size: int
    num_sentinels: int
    kind: str
    path: str | None = None
    skipped_ids: frozenset[int] = frozenset((PAD_ID, BOS_ID))  # never rendered by decode

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def _decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel {i} out of range (num_sentinels={self.num_sentinels})")
        return self.vocab_size - 1 - i

    @property
    def first_sentinel_id(self) -> int:
        """The smallest sentinel id (ids >= this are sentinels)."""
        return self.vocab_size - self.num_sentinels

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text: stops at the first EOS, skips PAD/BOS, renders sentinels as <extra_id_i>."""
        out: list[str] = []
        run: list[int] = []
        for t in ids:
            t = int(t)
            if t == EOS_ID:
                break
            if t in self.skipped_ids:
                continue
            if t >= self.first_sentinel_id:
                out.append(self._decode(run))
                run = []
                out.append(f"<extra_id_{self.vocab_size - 1 - t}>")
                continue
            run.append(t)
        out.append(self._decode(run))
        return "".join(out)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes, then sentinels. Needs no training.

    kind `bytes`: bytes at ids 4..259 (after the reserved ids above). kind `byt5`: ByT5's layout,
    pad 0, eos 1, unk 2 and bytes at 3..258 (no BOS), so pretrained ByT5 checkpoints read the
    same ids; ByT5 has 125 sentinels (384 ids).
    """

    def __init__(self, num_sentinels: int = 100, kind: str = "bytes"):
        if kind not in BYTE_LAYOUTS:
            raise ValueError(f"byte tokenizer kind must be one of {', '.join(BYTE_LAYOUTS)}, got {kind!r}")
        self.kind = kind
        self.offset = BYTE_LAYOUTS[kind]
        if kind == "byt5":
            self.skipped_ids = frozenset((PAD_ID,))
        self.num_sentinels = num_sentinels
        self.vocab_size = self.offset + 256 + num_sentinels

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

    def _decode(self, ids):
        b = bytes(int(t) - self.offset for t in ids if self.offset <= int(t) < self.offset + 256)
        return b.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (pad 0, eos 1, unk 2, bos 3 or none) plus sentinels above its pieces.

    Models without a BOS piece (T5's `spiece.model`) are accepted: id 3 is then a piece like any other.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, num_sentinels: int, path: str | None = None):
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.num_sentinels = num_sentinels
        self.vocab_size = self._sp.get_piece_size() + num_sentinels
        self.path = path
        ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
        if ids[:3] != (PAD_ID, EOS_ID, UNK_ID) or ids[3] not in (BOS_ID, -1):
            raise ValueError(
                f"SentencePiece model {path or '<bytes>'} does not use the reserved ids pad=0 eos=1 unk=2 bos=3 "
                f"(or no bos, as T5's) (has pad={ids[0]} eos={ids[1]} unk={ids[2]} bos={ids[3]})"
            )
        if ids[3] == -1:
            self.skipped_ids = frozenset((PAD_ID,))

    @classmethod
    def load(cls, path: str, num_sentinels: int) -> "SentencePieceTokenizer":
        """A model file, local or at a gs:// / s3:// URL (read as bytes: SentencePiece loads protos)."""
        from trainer import storage  # not at import: trainer.storage -> trainer.config -> trainer.data

        return cls(storage.read_bytes(path), num_sentinels, path=path)

    def __getstate__(self):
        return {"proto": self._proto, "num_sentinels": self.num_sentinels, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["num_sentinels"], state["path"])

    @property
    def piece_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def _decode(self, ids):
        return self._sp.decode([int(t) for t in ids])


def train_sentencepiece(
    sentences: Iterable[str],
    *,
    vocab_size: int,
    num_sentinels: int,
    model_type: str = "unigram",
    num_threads: int | None = None,
    input_sentence_size: int = 2_000_000,
) -> bytes:
    """Trains a SentencePiece model whose pieces + sentinels == vocab_size; returns its bytes.

    Byte fallback, identity normalisation and kept whitespace make decode(encode(x)) == x for
    any text (non-ASCII, newlines and indentation included).
    """
    import sentencepiece as spm

    pieces = vocab_size - num_sentinels

    def lines():
        for s in sentences:
            for line in s.split("\n"):
                line = line.strip("\r")
                if line.strip():
                    yield line

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_writer=buf,
        vocab_size=pieces,
        model_type=model_type,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=200_000,
        max_sentence_length=16384,
        train_extremely_large_corpus=False,
        num_threads=num_threads or min(4, os.cpu_count() or 1),
        minloglevel=2,
        # A small corpus may not support the requested size: that is an error, not a smaller vocab.
        hard_vocab_limit=True,
    )
    return buf.getvalue()


def default_cache_dir(cfg_cache_dir: str | None) -> str:
    return (
        cfg_cache_dir
        or os.environ.get("TRAINER_CACHE_DIR")
        or os.path.join(os.path.expanduser("~"), ".cache", "seq2seq-trainer")
    )


def spm_cache_name(fingerprint: str, vocab_size: int, num_sentinels: int, model_type: str) -> str:
    h = hashlib.sha256(f"{fingerprint}|{vocab_size}|{num_sentinels}|{model_type}".encode()).hexdigest()[:12]
    return f"spm-{model_type}-{vocab_size}-{h}.model"


def write_once(path: str, data: bytes) -> str:
    """Atomically creates `path` with `data` unless it already exists; returns `path`.

    Several processes that train the same tokenizer at once all end up loading the
    one file that was committed first, so they never disagree. On object storage (gs://, s3://)
    the object is uploaded whole (`storage.write_bytes`) when it does not exist yet; processes
    racing to create it may each upload, the last upload wins, so train a shared tokenizer once
    (or on one process) before starting many.
    """
    from trainer import storage

    if storage.is_remote(path):
        if not storage.exists(path):
            storage.write_bytes(path, data)
        return path
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".model")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if path exists: first writer wins
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return path
