"""The input pipeline (Grain): sources, tokenizers, span corruption, packing, sharding.

Public API:
  DataConfig                          the `data.*` config (config.py; validate() names data.<field>)
  check_sources(cfg)                  early checks: paths exist, files non-empty and not entirely bad
  build_pipeline(cfg, *, split, global_batch_size, seed, process_index, process_count,
                 vocab_size) -> Pipeline
  Pipeline                            iterator of per-process batches {inputs, targets,
                                      *_segment_ids, *_positions} int32 [B/P, length];
                                      get_state()/set_state() (JSON), stats (flat dict),
                                      vocab_size, tokenizer, data_config (tokenizer_path resolved),
                                      num_batches (eval), reset(), close()
  load_tokenizer(cfg, workdir=None)   Tokenizer (encode/decode) or None for synthetic
  PAD_ID, EOS_ID, UNK_ID, BOS_ID, NUM_RESERVED   reserved ids (the table is in vocab.py)
  trainer.data.bench.pipeline_batches_per_sec(cfg, global_batch_size, seed, n_batches)
  python -m trainer.prepare           ArrayRecord shards + manifest (trainer/prepare.py)
"""

from __future__ import annotations

from trainer.data.config import DataConfig
from trainer.data.pipeline import BATCH_KEYS, Pipeline
from trainer.data.vocab import BOS_ID, EOS_ID, NUM_RESERVED, PAD_ID, UNK_ID, Tokenizer
from trainer.data import sources as _sources

__all__ = [
    "DataConfig",
    "Pipeline",
    "Tokenizer",
    "BATCH_KEYS",
    "build_pipeline",
    "check_sources",
    "load_tokenizer",
    "PAD_ID",
    "EOS_ID",
    "UNK_ID",
    "BOS_ID",
    "NUM_RESERVED",
]


def check_sources(cfg: DataConfig) -> None:
    """Validates the config and the files it names; raises ValueError naming the key/path.

    Cheap for synthetic/embedded; reads (and caches the index of) tsv/jsonl files once.
    """
    cfg.validate()
    for _, _, c in cfg.sources():
        _sources.check(c)


def load_tokenizer(cfg: DataConfig, workdir: str | None = None) -> Tokenizer | None:
    """The tokenizer the pipeline uses for `cfg` (trained and cached on first use)."""
    cfg.validate()
    return _sources.get_tokenizer(cfg, workdir)


def build_pipeline(
    cfg: DataConfig,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    vocab_size: int | None = None,
    sources: tuple[list, list[float]] | None = None,
) -> Pipeline:
    """Builds the `split` ("train" | "eval") pipeline for this process.

    `vocab_size` is the model's: synthetic data draws ids below it; for the other
    sources it must equal the tokenizer's vocab size (ValueError naming both). `sources`: the
    (sources, weights) of another pipeline of the same run (`Pipeline.source_set`), reused.
    """
    cfg.validate()
    sources, weights = sources or _sources.make_sources(cfg, vocab_size=vocab_size)
    source = sources[0]
    if vocab_size is not None and source.vocab_size != vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab_size} does not match the tokenizer's vocab size "
            f"{source.vocab_size} (data.tokenizer={cfg.tokenizer}"
            + (f", {source.tokenizer.path}" if source.tokenizer is not None and source.tokenizer.path else "")
            + "); leave model.vocab_size unset (it defaults to the tokenizer's size) or set it to "
            + f"{source.vocab_size}"
        )
    return Pipeline(
        cfg,
        sources,
        weights,
        split=split,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
