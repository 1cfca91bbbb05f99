"""`data.*` configuration of the input pipeline."""

from __future__ import annotations

import dataclasses
from typing import Any

SOURCES = ("synthetic", "embedded", "tsv", "jsonl", "arrayrecord")
TOKENIZERS = ("sentencepiece", "bytes", "byt5")
SPM_MODEL_TYPES = ("unigram", "bpe")
SYNTHETIC_TASKS = ("reverse", "copy")
OVERLONG = ("truncate", "drop")
MAX_SEED = 2**32 - 1  # what numpy and Grain accept as a seed
MIN_SPM_PIECES = 261  # 4 reserved + 256 byte-fallback pieces + at least one text piece
MAX_LENGTH = 2**20  # tokens per sequence
MAX_VOCAB_SIZE = 2**24  # token ids are int32 and the embedding table must fit in memory
OBJECTIVES = ("span_corruption", "infilling")
# What a `data.mixture` entry may set for its own source (the rest is shared: tokenizer, lengths, packing).
MIXTURE_KEYS = (
    "name",
    "source",
    "path",
    "weight",
    "eval_path",
    "eval_fraction",
    "eval_max_examples",
    "jsonl_inputs_key",
    "jsonl_targets_key",
    "objective",
    "noise_density",
    "mean_noise_span_length",
    "synthetic_task",
    "synthetic_min_length",
    "synthetic_max_length",
    "synthetic_train_examples",
    "synthetic_eval_examples",
    "synthetic_seed",
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything under `data.` in the run's config.

    Lengths include the end-of-sequence token appended to every inputs and
    targets sequence.
    """

    # Where examples come from.
    source: str = "embedded"  # synthetic | embedded | tsv | jsonl | arrayrecord
    # Several sources mixed by weight: a list of {source, path, weight, ...} entries, each
    # overriding the keys in MIXTURE_KEYS for its source. Unset: `source` alone.
    mixture: list[dict[str, Any]] | None = None
    # File sources: a file, a glob, or a comma-separated list of files/globs, each local or a
    # gs://bucket/... or s3://bucket/... URL (remote files read at random are cached locally).
    # For `arrayrecord`: the directory written by `python -m trainer.prepare`
    # (or its manifest.json), local or a URL.
    path: str | None = None
    # Optional held-out files for tsv/jsonl (same syntax as `path`); when unset,
    # a deterministic `eval_fraction` of the lines/documents is held out.
    eval_path: str | None = None
    eval_fraction: float = 0.1
    eval_max_examples: int = 5000  # cap on held-out tsv/jsonl lines taken by eval_fraction

    # Tokenizer (not used by `synthetic`, which emits ids below model.vocab_size).
    tokenizer: str = "sentencepiece"  # sentencepiece | bytes | byt5 (ByT5's byte ids: bytes from 3)
    # SentencePiece model file (local or a gs:// / s3:// URL; trained and uploaded there when
    # missing). Unset: trained on first use on the source text and cached (next to local data
    # when writable, else in the local `cache_dir`); the pipeline reports the resolved path so
    # the run's config records it.
    tokenizer_path: str | None = None
    spm_model_type: str = "unigram"  # unigram | bpe
    # Total vocabulary of the tokenizer (SentencePiece pieces + sentinels); the
    # model's vocab_size defaults to the tokenizer's size. Ignored by the byte
    # tokenizers, whose size is fixed (260 or, byt5, 259 + num_sentinels).
    vocab_size: int = 4096
    num_sentinels: int = 100  # span-corruption sentinel ids, top of the vocab
    cache_dir: str | None = None  # default: $TRAINER_CACHE_DIR or ~/.cache/seq2seq-trainer

    # Sequence lengths (including eos) and what to do with longer examples.
    inputs_length: int = 128
    targets_length: int = 128
    overlong: str = "truncate"  # truncate | drop

    # JSON Lines field names.
    jsonl_inputs_key: str = "source"
    jsonl_targets_key: str = "target"

    # Denoising objective of plain text (embedded, and arrayrecord shards of plain text):
    # span_corruption (T5: targets are the dropped spans after their sentinels) or infilling
    # (BART-style: each noise span becomes one sentinel, targets are the whole original text).
    # Both draw noise spans with the two knobs below.
    objective: str = "span_corruption"  # span_corruption | infilling
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0

    # Synthetic tasks (tests): random ids in [4, model.vocab_size).
    synthetic_task: str = "reverse"  # reverse | copy
    synthetic_min_length: int = 4
    synthetic_max_length: int = 12  # capped at inputs_length - 1
    synthetic_train_examples: int = 20000
    synthetic_eval_examples: int = 512
    synthetic_seed: int = 0  # the data itself; the run's seed sets the order

    # Pipeline mechanics.
    pack: bool = True  # first-fit packing of train batches (eval is padded)
    shuffle: bool = True
    workers: int = 0  # processes building train rows ahead of the step; 0 = a thread in the trainer
    prefetch: int = 2  # batches built ahead (per worker when workers > 0)
    # Records that cannot be decoded (bad bytes, bad JSON, a missing field, an empty side) are
    # skipped and counted; above this fraction of the records read (after 100) the run stops.
    max_bad_fraction: float = 0.05

    def sources(self) -> list[tuple[str, float, "DataConfig"]]:
        """(name, weight, config of that source) for each source mixed into the train stream.

        Without `mixture`: the one configured source, weight 1.
        """
        if not self.mixture:
            return [(self.source, 1.0, self)]
        out = []
        for i, entry in enumerate(self.mixture):
            fields = {k: v for k, v in entry.items() if k not in ("name", "weight")}
            cfg = dataclasses.replace(self, mixture=None, **fields)
            out.append((str(entry.get("name") or f"{i}_{cfg.source}"), float(entry.get("weight", 1.0)), cfg))
        return out

    def validate(self) -> None:
        def err(field, msg):
            raise ValueError(f"data.{field}: {msg}")

        if self.mixture is not None:
            self._validate_mixture()

        if self.source not in SOURCES:
            err("source", f"{self.source!r} is not one of {', '.join(SOURCES)}")
        if self.tokenizer not in TOKENIZERS:
            err("tokenizer", f"{self.tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
        if self.spm_model_type not in SPM_MODEL_TYPES:
            err("spm_model_type", f"{self.spm_model_type!r} is not one of {', '.join(SPM_MODEL_TYPES)}")
        if self.synthetic_task not in SYNTHETIC_TASKS:
            err("synthetic_task", f"{self.synthetic_task!r} is not one of {', '.join(SYNTHETIC_TASKS)}")
        if self.overlong not in OVERLONG:
            err("overlong", f"{self.overlong!r} is not one of {', '.join(OVERLONG)}")
        if self.objective not in OBJECTIVES:
            err("objective", f"{self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.source in ("tsv", "jsonl", "arrayrecord") and not self.path and not self.mixture:
            err("path", f"required for data.source={self.source} (a file, glob or comma-separated list)")
        for f in ("inputs_length", "targets_length"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 2:
                err(f, f"must be an integer >= 2 (room for a token and eos), got {v!r}")
            if v > MAX_LENGTH:
                err(f, f"must be <= {MAX_LENGTH}, got {v}")
        for f in ("workers", "num_sentinels", "synthetic_seed"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                err(f, f"must be an integer >= 0, got {v!r}")
        for f in (
            "prefetch",
            "eval_max_examples",
            "synthetic_min_length",
            "synthetic_max_length",
            "synthetic_train_examples",
            "synthetic_eval_examples",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                err(f, f"must be an integer >= 1, got {v!r}")
        if self.synthetic_min_length > self.synthetic_max_length:
            err(
                "synthetic_min_length",
                f"{self.synthetic_min_length} > data.synthetic_max_length={self.synthetic_max_length}",
            )
        if self.source == "synthetic" and self.synthetic_min_length > self.inputs_length - 1:
            err(
                "synthetic_min_length",
                f"{self.synthetic_min_length} does not fit data.inputs_length={self.inputs_length} (eos included)",
            )
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool):
            err("vocab_size", f"must be an integer, got {self.vocab_size!r}")
        if self.synthetic_seed > MAX_SEED:
            err("synthetic_seed", f"must be <= {MAX_SEED} (2**32 - 1), got {self.synthetic_seed}")
        if self.tokenizer == "sentencepiece" and self.vocab_size - self.num_sentinels < MIN_SPM_PIECES:
            err(
                "vocab_size",
                f"{self.vocab_size} leaves {self.vocab_size - self.num_sentinels} SentencePiece pieces after "
                f"{self.num_sentinels} sentinels; need >= {MIN_SPM_PIECES} (4 reserved + 256 byte-fallback "
                "pieces + text)",
            )
        if self.tokenizer == "sentencepiece" and self.vocab_size > MAX_VOCAB_SIZE:
            err("vocab_size", f"must be <= {MAX_VOCAB_SIZE}, got {self.vocab_size}")
        if not (0.0 < self.noise_density < 1.0):
            err("noise_density", f"must be in (0, 1), got {self.noise_density!r}")
        if not 1.0 <= self.mean_noise_span_length < float("inf"):
            err("mean_noise_span_length", f"must be a finite number >= 1, got {self.mean_noise_span_length!r}")
        if not (0.0 <= self.max_bad_fraction <= 1.0):
            err("max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction!r}")
        if not (0.0 <= self.eval_fraction < 1.0):
            err("eval_fraction", f"must be in [0, 1), got {self.eval_fraction!r}")
        if self.source == "embedded":
            from trainer.data import span_corruption

            try:
                n = span_corruption.chunk_length(
                    self.inputs_length,
                    self.targets_length,
                    self.noise_density,
                    self.mean_noise_span_length,
                    self.objective,
                )
            except ValueError as e:
                err("targets_length", str(e))
            spans = span_corruption._counts(n, self.noise_density, self.mean_noise_span_length)[1]
            if spans > self.num_sentinels:
                err(
                    "num_sentinels",
                    f"{self.num_sentinels} is fewer than the {spans} noise spans of a {n}-token chunk "
                    f"(data.inputs_length={self.inputs_length}, data.noise_density={self.noise_density}, "
                    f"data.mean_noise_span_length={self.mean_noise_span_length}); raise it to >= {spans}",
                )
        for f in ("pack", "shuffle"):
            if not isinstance(getattr(self, f), bool):
                err(f, f"must be true or false, got {getattr(self, f)!r}")
        for f in ("jsonl_inputs_key", "jsonl_targets_key"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                err(f, "must be a non-empty string")

    def _validate_mixture(self) -> None:
        if not isinstance(self.mixture, list) or not self.mixture:
            raise ValueError("data.mixture: must be a non-empty list of {source, path, weight} entries")
        names = set()
        for i, entry in enumerate(self.mixture):
            where = f"data.mixture[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: must be a mapping like {{source: tsv, path: a.tsv, weight: 1}}")
            unknown = sorted(set(entry) - set(MIXTURE_KEYS))
            if unknown:
                raise ValueError(f"{where}.{unknown[0]}: not a per-source key (allowed: {', '.join(MIXTURE_KEYS)})")
            if "source" not in entry:
                raise ValueError(f"{where}.source: required ({', '.join(SOURCES)})")
            w = entry.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0) or w == float("inf"):
                raise ValueError(f"{where}.weight: must be a finite number > 0, got {w!r}")
        for i, (name, _, cfg) in enumerate(self.sources()):
            if name in names:
                raise ValueError(f"data.mixture[{i}].name: {name!r} is used twice")
            names.add(name)
            try:
                cfg.validate()
            except ValueError as e:
                raise ValueError(str(e).replace("data.", f"data.mixture[{i}].", 1)) from None
