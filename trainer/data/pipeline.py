"""The Grain pipeline: source -> shuffle -> shard -> repeat -> examples -> pack/pad -> batch."""

from __future__ import annotations

import atexit
import dataclasses
import math
import weakref
import os
import sys
from typing import Any

import grain
import numpy as np

from trainer.data import sources as sources_lib
from trainer.data.config import DataConfig
from trainer.data.vocab import EOS_ID, Tokenizer

FEATURES = ("inputs", "targets")
BATCH_KEYS = ("inputs", "targets", "inputs_segment_ids", "targets_segment_ids", "inputs_positions", "targets_positions")
# Per-example bookkeeping carried through packing and batching so the counts are
# right even when the transforms run in Grain worker processes.
_META = ("_n_truncated", "_n_dropped", "_n_bad_records")


class _Examples:
    """record -> {"inputs", "targets"} with eos appended, fitted to the lengths.

    Overlong examples are truncated (eos kept) or marked for dropping; the marks
    become counts in `_CountDropped`.
    """

    def __init__(self, make_example, inputs_length: int, targets_length: int, overlong: str):
        self._make = make_example
        self._lengths = {"inputs": inputs_length, "targets": targets_length}
        self._drop = overlong == "drop"

    def __call__(self, record, rng: np.random.Generator):
        try:
            ex = self._make(record, rng)
        except Exception:  # a corrupt record must not stop a run: skip it and count it
            return {
                "inputs": np.zeros(1, np.int32),
                "targets": np.zeros(1, np.int32),
                "_n_truncated": np.int32(0),
                "_n_dropped": np.int32(0),
                "_n_bad_records": np.int32(1),
            }
        out = {}
        overlong = False
        for k in FEATURES:
            ids = np.asarray(ex[k], dtype=np.int32)
            limit = self._lengths[k] - 1
            if ids.shape[0] > limit:
                overlong = True
                ids = ids[:limit]
            out[k] = np.concatenate([ids, np.array([EOS_ID], np.int32)])
        out["_n_truncated"] = np.int32(overlong and not self._drop)
        out["_n_dropped"] = np.int32(overlong and self._drop)
        out["_n_bad_records"] = np.int32(0)
        return out


class _CountDropped(grain.IterDataset):
    """Skips examples marked dropped (or bad) and adds their counts to the next kept example."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self):
        return _CountDroppedIterator(self._parent.__iter__())

    def __str__(self):
        return "_CountDropped"


class _CountDroppedIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self._pending = {"_n_dropped": 0, "_n_bad_records": 0}

    def __next__(self):
        while True:
            ex = next(self._parent)
            if ex["_n_dropped"] or ex["_n_bad_records"]:
                for k in self._pending:
                    self._pending[k] += int(ex[k])
                continue
            ex = dict(ex)
            for k in self._pending:
                ex[k] = np.int32(self._pending[k])
                self._pending[k] = 0
            return ex

    def get_state(self):
        return {"parent": self._parent.get_state(), "pending": dict(self._pending)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._pending = {k: int(v) for k, v in state["pending"].items()}


def _sum_meta(packed: dict) -> dict:
    """After packing (one row): the list of per-example counts -> their int32 sum."""
    out = dict(packed)
    for k in _META:
        out[k] = np.int32(sum(int(v) for v in packed[k]))
    return out


class _Pad:
    """Unpacked layout: one example per row, padded, segment id 1, positions 0..n-1."""

    def __init__(self, inputs_length: int, targets_length: int):
        self._lengths = {"inputs": inputs_length, "targets": targets_length}

    def __call__(self, ex: dict) -> dict:
        out = {k: ex[k] for k in _META}
        for k in FEATURES:
            n, length = ex[k].shape[0], self._lengths[k]
            v = np.zeros(length, np.int32)
            v[:n] = ex[k]
            seg = np.zeros(length, np.int32)
            seg[:n] = 1
            pos = np.zeros(length, np.int32)
            pos[:n] = np.arange(n, dtype=np.int32)
            out[k], out[f"{k}_segment_ids"], out[f"{k}_positions"] = v, seg, pos
        return out


def _ensure_absl_flags_parsed():
    # Grain's worker processes read absl flags; unparsed flags raise in the workers.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _GlobalBatchRows(grain.MapDataset):
    """Process `index`'s rows of each global batch of `rows * count` consecutive elements.

    An epoch keeps the largest multiple of the global batch (the few left-over elements
    of the shuffled order are dropped; the next epoch reshuffles), so every process sees
    the same number of batches and no row is read by two processes.
    """

    def __init__(self, parent: grain.MapDataset, index: int, count: int, rows: int):
        super().__init__(parent)
        self._parent_length = len(parent)
        self._index, self._count, self._rows = index, count, rows
        self._length = (self._parent_length // (rows * count)) * rows
        if self._length == 0:
            raise ValueError(
                f"{self._parent_length} train examples cannot fill one global batch of "
                f"{rows * count} (train.batch_size)"
            )

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        epoch, offset = divmod(index, self._length)
        block, row = divmod(offset, self._rows)
        return epoch * self._parent_length + block * self._rows * self._count + self._index * self._rows + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"_GlobalBatchRows(process {self._index} of {self._count}, {self._rows} rows)"


class Pipeline:
    """Per-process batches as dicts of int32 numpy arrays [batch // process_count, length].

    `train`: endless, reshuffled every epoch. `eval`: one pass over this process's
    share of the held-out set; every process yields the same number of batches
    (`num_batches`); missing rows are all zeros (segment id 0 = padding, weight 0).
    """

    def __init__(
        self,
        cfg: DataConfig,
        source: sources_lib.Source,
        *,
        split: str,
        global_batch_size: int,
        seed: int,
        process_index: int,
        process_count: int,
    ):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
        if global_batch_size % process_count:
            raise ValueError(f"train.batch_size={global_batch_size} is not divisible by the {process_count} processes")
        self.config = cfg
        self.source = source
        self.split = split
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.batch_size = global_batch_size // process_count
        self.tokenizer: Tokenizer | None = source.tokenizer
        self.vocab_size: int = source.vocab_size
        # The config as run: `tokenizer_path` filled in with the model actually used, so
        # writing this into the run's config.yaml records (and pins) the tokenizer.
        self.data_config = cfg
        if self.tokenizer is not None and self.tokenizer.path and cfg.source != "arrayrecord":
            self.data_config = dataclasses.replace(cfg, tokenizer_path=os.path.abspath(self.tokenizer.path))
        if process_index == 0 and split == "train" and hasattr(source, "summary"):
            for line in source.summary():
                print(f"[data] {line}", file=sys.stderr, flush=True)
        self._lengths = {"inputs": cfg.inputs_length, "targets": cfg.targets_length}
        self.packed = cfg.pack and split == "train"

        records = source.records(split)
        self.num_records = len(records)
        if self.num_records == 0:
            raise ValueError(f"data.source={cfg.source}: the {split} split is empty")
        if split == "train" and self.num_records < process_count:
            raise ValueError(
                f"data.source={cfg.source}: {self.num_records} train examples cannot be "
                f"sharded over {process_count} processes"
            )
        shard_max = math.ceil(self.num_records / process_count)
        self.num_batches: int | None = math.ceil(shard_max / self.batch_size) if split == "eval" else None
        self._dataset = self._build(records)
        self._reset_counters()
        self._it = iter(self._dataset)
        self._batches = 0
        if cfg.workers > 0 and split == "train":
            # Stop the workers before interpreter teardown (else Grain's finalizers print noise).
            ref = weakref.ref(self)
            atexit.register(lambda: ref() is not None and ref().close())

    # ---------------------------------------------------------------- building
    def _build(self, records: grain.MapDataset) -> grain.IterDataset:
        cfg = self.config
        ds = records
        train = self.split == "train"
        if train and cfg.shuffle:
            ds = ds.shuffle(seed=self.seed)
        # Disjoint shards; with repeat, each epoch is a new global order and each process
        # takes its slice of it. Train: process p takes rows [p*b, (p+1)*b) of every global
        # batch, so unpacked global batches are the same rows in the same order whatever
        # the number of processes (same losses, dropout masks included).
        if train:
            ds = _GlobalBatchRows(ds, self.process_index, self.process_count, self.batch_size)
        else:
            ds = ds[self.process_index :: self.process_count]
        if train:
            ds = ds.repeat()  # forever; reseeds the shuffle every epoch
        ds = ds.random_map(
            _Examples(self.source.make_example, cfg.inputs_length, cfg.targets_length, cfg.overlong), seed=self.seed
        )
        # Worker processes already run ahead of the trainer; in-process, a couple of
        # threads overlap tokenization with the train step.
        in_workers = cfg.workers > 0 and train
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=0 if in_workers else 2, prefetch_buffer_size=0 if in_workers else 64)
        )
        it = _CountDropped(it)
        if self.packed:
            import grain.experimental as gx

            it = gx.FirstFitPackIterDataset(
                it,
                length_struct=dict(self._lengths),
                num_packing_bins=self.batch_size,
                seed=self.seed,
                shuffle_bins=True,
                meta_features=_META,
            )
            it = it.map(_sum_meta)
        else:
            it = it.map(_Pad(cfg.inputs_length, cfg.targets_length))
        if train:
            it = it.batch(self.batch_size, drop_remainder=True)
        else:
            import functools

            import grain.experimental as gx

            it = it.batch(self.batch_size, batch_fn=functools.partial(gx.batch_and_pad, batch_size=self.batch_size))
        if cfg.workers > 0 and train:  # eval passes are short: in-process, no worker start-up
            _ensure_absl_flags_parsed()
            it = it.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=cfg.workers, per_worker_buffer_size=cfg.prefetch)
            )
        return it

    def _zero_batch(self) -> dict[str, np.ndarray]:
        b = {}
        for k in FEATURES:
            for suffix in ("", "_segment_ids", "_positions"):
                b[k + suffix] = np.zeros((self.batch_size, self._lengths[k]), np.int32)
        return b

    # ---------------------------------------------------------------- iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._batches >= self.num_batches:
            raise StopIteration
        try:
            raw = next(self._it)
        except StopIteration:
            if self.num_batches is None:
                raise
            raw = self._zero_batch()
        # Copy out of Grain's shared memory (workers) so nothing outlives the pipeline.
        batch = {k: np.array(raw[k], dtype=np.int32, copy=True) for k in BATCH_KEYS}
        for k in _META:
            if k in raw:
                self._counters[k[3:]] += int(np.sum(raw[k]))
        self._batches += 1
        self._count(batch)
        return batch

    def close(self) -> None:
        """Stops Grain worker processes (if any). Call before dropping a pipeline with workers."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def reset(self) -> None:
        """Starts over (one more pass for eval); counters restart too."""
        self.close()
        self._it = iter(self._dataset)
        self._batches = 0
        self._reset_counters()

    # ---------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable; `set_state` on a pipeline built with the same config,
        seed, batch size, process index/count and worker count continues exactly."""
        return {"grain": self._it.get_state(), "batches": self._batches, "counters": dict(self._counters)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state["grain"])
        self._batches = int(state.get("batches", 0))
        self._counters.update({k: int(v) for k, v in state.get("counters", {}).items()})

    # ---------------------------------------------------------------- stats
    def _reset_counters(self):
        self._counters = {
            "batches": 0,
            "examples": 0,
            "truncated": 0,
            "dropped": 0,
            "bad_records": 0,
            "inputs_tokens": 0,
            "targets_tokens": 0,
            "inputs_slots": 0,
            "targets_slots": 0,
        }

    def _count(self, batch):
        c = self._counters
        c["batches"] += 1
        seg = batch["targets_segment_ids"]
        c["examples"] += int(seg.max(axis=1).sum())
        for k in FEATURES:
            c[f"{k}_tokens"] += int(np.count_nonzero(batch[f"{k}_segment_ids"]))
            c[f"{k}_slots"] += batch[k].size

    @property
    def stats(self) -> dict[str, float | int]:
        """Flat counters for logging (prefix them as you like, e.g. `data/`)."""
        c = self._counters
        out: dict[str, float | int] = {
            "batches": c["batches"],
            "examples": c["examples"],
            "truncated": c["truncated"],
            "dropped": c["dropped"],
            "bad_records": c["bad_records"],
        }
        for k in FEATURES:
            out[f"{k}_tokens"] = c[f"{k}_tokens"]
            out[f"{k}_efficiency"] = c[f"{k}_tokens"] / c[f"{k}_slots"] if c[f"{k}_slots"] else 0.0
        slots = c["inputs_slots"] + c["targets_slots"]
        out["packing_efficiency"] = (c["inputs_tokens"] + c["targets_tokens"]) / slots if slots else 0.0
        out.update(self.source.stats)
        return out
