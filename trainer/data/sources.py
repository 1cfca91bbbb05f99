"""Data sources: records per split, and how a record becomes an (inputs, targets) example."""

from __future__ import annotations

import numpy as np
import grain

from trainer.data.config import DataConfig
from trainer.data.vocab import NUM_RESERVED, Tokenizer


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
    return self._tokens[i, :self._lengths[i]]


class SyntheticSource(Source):
  """`copy` / `reverse` of random ids in [NUM_RESERVED, vocab_size).

  Train and eval sets are fixed by `data.synthetic_seed` (the run's seed only sets
  the order); eval sequences never occur in the train set.
  """

  def __init__(self, cfg: DataConfig, vocab_size: int):
    if vocab_size is None or vocab_size <= NUM_RESERVED + 1:
      raise ValueError(f"data.source=synthetic needs model.vocab_size > {NUM_RESERVED + 1}, "
                       f"got {vocab_size}")
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
      raise ValueError(f"data.synthetic_eval_examples: cannot draw {n_eval} sequences disjoint "
                       f"from the train set with vocab_size={vocab_size} and lengths {lo}..{hi}")
    self._rows = {"train": _Rows(train_tokens, train_lengths),
                  "eval": _Rows(np.stack(eval_tokens), np.asarray(eval_lengths))}

  def records(self, split):
    return grain.MapDataset.source(self._rows[split])

  def make_example(self, record, rng):
    targets = record[::-1] if self.task == "reverse" else record
    return {"inputs": record, "targets": targets.copy()}


def check(cfg: DataConfig) -> None:
  if cfg.source == "synthetic":
    return
  raise NotImplementedError(f"data.source={cfg.source}: not implemented yet")


def get_tokenizer(cfg: DataConfig, workdir: str | None = None) -> Tokenizer | None:
  if cfg.source == "synthetic":
    return None
  raise NotImplementedError(f"data.source={cfg.source}: not implemented yet")


def make_source(cfg: DataConfig, *, vocab_size: int | None, workdir: str | None) -> Source:
  check(cfg)
  if cfg.source == "synthetic":
    return SyntheticSource(cfg, vocab_size)
  raise NotImplementedError(f"data.source={cfg.source}: not implemented yet")
