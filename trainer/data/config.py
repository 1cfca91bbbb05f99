"""`data.*` configuration of the input pipeline."""

from __future__ import annotations

import dataclasses

SOURCES = ("synthetic", "embedded", "tsv", "jsonl", "arrayrecord")
TOKENIZERS = ("sentencepiece", "bytes")
SPM_MODEL_TYPES = ("unigram", "bpe")
SYNTHETIC_TASKS = ("reverse", "copy")
OVERLONG = ("truncate", "drop")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything under `data.` in the run's config.

    Lengths include the end-of-sequence token appended to every inputs and
    targets sequence.
    """

    # Where examples come from.
    source: str = "embedded"  # synthetic | embedded | tsv | jsonl | arrayrecord
    # File sources: a file, a glob, or a comma-separated list of files/globs.
    # For `arrayrecord`: the directory written by `python -m trainer.prepare`
    # (or its manifest.json).
    path: str | None = None
    # Optional held-out files for tsv/jsonl (same syntax as `path`); when unset,
    # a deterministic `eval_fraction` of the lines/documents is held out.
    eval_path: str | None = None
    eval_fraction: float = 0.1
    eval_max_examples: int = 5000  # cap on held-out tsv/jsonl lines taken by eval_fraction

    # Tokenizer (not used by `synthetic`, which emits ids below model.vocab_size).
    tokenizer: str = "sentencepiece"  # sentencepiece | bytes
    # SentencePiece model file. Unset: trained on first use on the source text
    # and cached (next to the data when writable, else in `cache_dir`); the
    # pipeline reports the resolved path so the run's config records it.
    tokenizer_path: str | None = None
    spm_model_type: str = "unigram"  # unigram | bpe
    # Total vocabulary of the tokenizer (SentencePiece pieces + sentinels); the
    # model's vocab_size must equal it. Ignored by the bytes tokenizer, whose
    # size is fixed (260 + num_sentinels).
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

    # Span corruption (embedded text, and arrayrecord shards of plain text).
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
    workers: int = 0  # Grain worker processes (mp_prefetch); 0 = in-process
    prefetch: int = 2  # per-worker buffer (batches) when workers > 0

    def validate(self) -> None:
        def err(field, msg):
            raise ValueError(f"data.{field}: {msg}")

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
        if self.source in ("tsv", "jsonl", "arrayrecord") and not self.path:
            err("path", f"required for data.source={self.source} (a file, glob or comma-separated list)")
        for f in ("inputs_length", "targets_length"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 2:
                err(f, f"must be an integer >= 2 (room for a token and eos), got {v!r}")
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
        if self.tokenizer == "sentencepiece" and self.vocab_size - self.num_sentinels < 300:
            err(
                "vocab_size",
                f"{self.vocab_size} leaves {self.vocab_size - self.num_sentinels} SentencePiece pieces after "
                f"{self.num_sentinels} sentinels; need >= 300 (4 reserved + 256 byte-fallback pieces + text)",
            )
        if not (0.0 < self.noise_density < 1.0):
            err("noise_density", f"must be in (0, 1), got {self.noise_density!r}")
        if not self.mean_noise_span_length >= 1.0:
            err("mean_noise_span_length", f"must be >= 1, got {self.mean_noise_span_length!r}")
        if not (0.0 <= self.eval_fraction < 1.0):
            err("eval_fraction", f"must be in [0, 1), got {self.eval_fraction!r}")
        for f in ("pack", "shuffle"):
            if not isinstance(getattr(self, f), bool):
                err(f, f"must be true or false, got {getattr(self, f)!r}")
        for f in ("jsonl_inputs_key", "jsonl_targets_key"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                err(f, "must be a non-empty string")
