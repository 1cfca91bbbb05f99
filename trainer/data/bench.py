"""Throughput of the input pipeline alone (no model): batches per second."""

from __future__ import annotations

import time

from trainer.data import build_pipeline
from trainer.data.config import DataConfig


def pipeline_batches_per_sec(
    cfg: DataConfig,
    global_batch_size: int,
    seed: int,
    n_batches: int,
    *,
    vocab_size: int | None = None,
    process_count: int = 1,
    warmup_batches: int = 2,
) -> float:
    """Train-split batches/s of this process's pipeline after `warmup_batches`.

    Building the pipeline (tokenizer training on first use, file indexing) and the
    warm-up batches (worker start-up, first fills) are not timed. `vocab_size` is
    only needed for `source: synthetic` (default 64).
    """
    if cfg.source == "synthetic" and vocab_size is None:
        vocab_size = 64
    with build_pipeline(
        cfg,
        split="train",
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=0,
        process_count=process_count,
        vocab_size=vocab_size,
    ) as p:
        for _ in range(warmup_batches):
            next(p)
        t = time.perf_counter()
        for _ in range(n_batches):
            next(p)
        return n_batches / (time.perf_counter() - t)


if __name__ == "__main__":
    import sys

    from trainer.config import load_config

    c = load_config(sys.argv[1:])
    bps = pipeline_batches_per_sec(c.data, c.train.batch_size, c.seed, 100)
    print(
        f"input pipeline: {bps:.1f} batches/s at batch {c.train.batch_size}, "
        f"lengths {c.data.inputs_length}/{c.data.targets_length}"
    )
