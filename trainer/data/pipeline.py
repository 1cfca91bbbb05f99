"""The input pipeline: this process's rows of every global batch, as numpy arrays.

Train: endless, packed (or padded) rows in the global order of `trainer.data.stream`, built
ahead of the train step by a thread (or by `data.workers` processes, each owning some rows);
every batch carries the position after it, so a checkpoint saves exactly where training is.
Eval: one pass over the held-out examples in order, one example per row, padded at the end.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
from typing import Any, Sequence

import numpy as np

from trainer.data.config import DataConfig
from trainer.data.stream import DataError, ExampleMaker, RowBuilder, SlotState, layout_row
from trainer.data.vocab import Tokenizer

FEATURES = ("inputs", "targets")
BATCH_KEYS = ("inputs", "targets", "inputs_segment_ids", "targets_segment_ids", "inputs_positions", "targets_positions")
STATE_VERSION = 2


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def _build_rows(builder: RowBuilder, slots: dict[int, SlotState], lengths: tuple[int, int]):
    """One batch's rows for `slots` (in row order), the slots' states after it, and its counts."""
    before = dict(builder.maker.counts)
    rows, after, per_source, truncated = [], {}, {}, 0
    for r in sorted(slots):
        examples, after[r] = builder.row(r, slots[r])
        rows.append(layout_row(examples, lengths))
        for ex in examples:
            per_source[ex.source] = per_source.get(ex.source, 0) + 1
            truncated += ex.truncated
    counts = {k: builder.maker.counts[k] - before[k] for k in ("dropped", "bad_records")}
    counts["truncated"] = truncated
    return rows, after, per_source, counts


class _ThreadProducer:
    """Builds batches ahead in a thread; each item is (rows, slot states after them, counts)."""

    def __init__(self, builder: RowBuilder, slots: dict[int, SlotState], lengths: tuple[int, int], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(builder, dict(slots), lengths), daemon=True,
                                        name="input-pipeline")
        self._thread.start()

    def _run(self, builder, slots, lengths):
        try:
            while not self._stop.is_set():
                item = _build_rows(builder, slots, lengths)
                slots = item[1]
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._queue.put(e)

    def get(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the trainer that started it dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(builder, slots, lengths, out, stop, parent_pid) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    try:
        while not stop.is_set():
            item = _build_rows(builder, slots, lengths)
            slots = item[1]
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except BaseException as e:  # noqa: BLE001
        out.put(DataError(f"input worker: {type(e).__name__}: {e}"))


class _WorkerProducer:
    """`workers` processes, worker w building the rows of every w-th local slot."""

    def __init__(self, builder: RowBuilder, slots: dict[int, SlotState], lengths: tuple[int, int], workers: int,
                 depth: int):
        ctx = multiprocessing.get_context("spawn")
        order = sorted(slots)
        self._parts = [order[w::workers] for w in range(workers) if order[w::workers]]
        self._stop = ctx.Event()
        self._queues = [ctx.Queue(maxsize=depth) for _ in self._parts]
        self._procs = [ctx.Process(target=_worker_main, daemon=True, name=f"input-worker-{w}",
                                   args=(builder, {r: slots[r] for r in part}, lengths, q, self._stop, os.getpid()))
                       for w, (part, q) in enumerate(zip(self._parts, self._queues))]
        for p in self._procs:
            p.start()

    def get(self):
        rows, after, per_source, counts = {}, {}, {}, {}
        for part, q in zip(self._parts, self._queues):
            while True:
                try:
                    item = q.get(timeout=5)
                    break
                except queue.Empty:
                    dead = [p.name for p in self._procs if not p.is_alive()]
                    if dead:
                        raise DataError(f"input worker process(es) {', '.join(dead)} died")
            if isinstance(item, BaseException):
                raise item
            part_rows, part_after, part_sources, part_counts = item
            rows.update(zip(part, part_rows))
            after.update(part_after)
            for k, v in part_sources.items():
                per_source[k] = per_source.get(k, 0) + v
            for k, v in part_counts.items():
                counts[k] = counts.get(k, 0) + v
        return [rows[r] for r in sorted(rows)], after, per_source, counts

    def close(self) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for q in self._queues:
            q.cancel_join_thread()
            q.close()


class Pipeline:
    """Per-process batches: dicts of int32 arrays [train.batch_size // process_count, length].

    `get_state()` is the position after the last batch returned (JSON); `set_state` takes it,
    or the list of every process's states from a checkpoint written by any number of processes.
    """

    def __init__(self, cfg: DataConfig, sources: Sequence[Any], weights: Sequence[float], *, split: str,
                 global_batch_size: int, seed: int, process_index: int, process_count: int):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
        if global_batch_size % process_count:
            raise ValueError(f"train.batch_size={global_batch_size} is not divisible by the {process_count} processes")
        self.config = cfg
        self.sources = list(sources)
        self.source_set = (self.sources, list(weights))  # for the run's other pipelines (eval)
        self.split = split
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // process_count
        self.first_row = process_index * self.batch_size
        self.tokenizer: Tokenizer | None = self.sources[0].tokenizer
        self.vocab_size: int = self.sources[0].vocab_size
        self.data_config = cfg  # the config as run: tokenizer_path filled in (recorded in config.yaml)
        tok = self.tokenizer
        if tok is not None and tok.path and "arrayrecord" not in {c.source for _, _, c in cfg.sources()}:
            import dataclasses

            from trainer import storage  # local absolute path, or the gs:// / s3:// URL as it is

            self.data_config = dataclasses.replace(cfg, tokenizer_path=storage.absolute(tok.path))
        if process_index == 0 and split == "train":
            for source in self.sources:
                for line in source.summary() if hasattr(source, "summary") else []:
                    print(f"[data] {line}", file=sys.stderr, flush=True)
        self._lengths = (cfg.inputs_length, cfg.targets_length)
        self.packed = cfg.pack and split == "train"
        train = split == "train"
        self._maker = ExampleMaker(self.sources, split, seed=seed, inputs_length=cfg.inputs_length,
                                   targets_length=cfg.targets_length, overlong=cfg.overlong, shuffle=train and
                                   cfg.shuffle, max_bad_fraction=cfg.max_bad_fraction)
        self.num_records = len(self._maker)
        for name, order in zip(self._maker.names, self._maker.orders):
            if order.n == 0 and (train or len(self.sources) == 1):
                raise ValueError(f"data source {name}: the {split} split is empty")
        self.num_batches: int | None = math.ceil(self.num_records / global_batch_size) if not train else None
        self._builder = RowBuilder(self._maker, seed=seed, global_rows=global_batch_size, weights=weights,
                                   pack=self.packed, lengths=self._lengths) if train else None
        self._slots = {r: self._builder.initial(r) for r in self._rows()} if train else {}
        self._producer = None
        self._batches = 0
        self._reset_counters()

    @property
    def source(self) -> Any:
        """The first (or only) source."""
        return self.sources[0]

    def _rows(self) -> range:
        return range(self.first_row, self.first_row + self.batch_size)

    # ---------------------------------------------------------------- iteration
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.split == "eval":
            return self._next_eval()
        if self._producer is None:
            workers = self.config.workers
            depth = max(1, self.config.prefetch)
            self._producer = (_WorkerProducer(self._builder, self._slots, self._lengths, workers, depth) if workers
                              else _ThreadProducer(self._builder, self._slots, self._lengths, depth))
        rows, self._slots, per_source, counts = self._producer.get()
        batch = _stack(rows)
        self._batches += 1
        for k, v in counts.items():
            self._counters[k] += v
        for s, n in per_source.items():
            self._per_source[s] += n
        self._count(batch)
        return batch

    def _next_eval(self) -> dict[str, np.ndarray]:
        """Batch k, row r: held-out example k*B + r (sources in order); rows past the end are padding."""
        if self._batches >= self.num_batches:
            raise StopIteration
        rows = []
        before = dict(self._maker.counts)
        for r in self._rows():
            g = self._batches * self.global_batch_size + r
            ex = None
            for s, order in enumerate(self._maker.orders):
                if g < order.n:
                    ex = self._maker.at(s, g)
                    break
                g -= order.n
            rows.append(layout_row([ex] if ex is not None else [], self._lengths))
        self._batches += 1
        for k in ("dropped", "bad_records"):
            self._counters[k] += self._maker.counts[k] - before[k]
        batch = _stack(rows)
        self._count(batch)
        return batch

    def close(self) -> None:
        """Stops the thread or worker processes building batches ahead."""
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def reset(self) -> None:
        """Starts over (one more pass for eval); counters restart too."""
        self.close()
        self._batches = 0
        if self._builder is not None:
            self._slots = {r: self._builder.initial(r) for r in self._rows()}
        self._reset_counters()

    # ---------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        """This process's rows' positions after the last batch returned (JSON-serialisable)."""
        return {"version": STATE_VERSION, "global_rows": self.global_batch_size,
                "slots": {str(r): st.to_json() for r, st in self._slots.items()},
                "batches": self._batches, "counters": dict(self._counters),
                "per_source": [int(n) for n in self._per_source]}

    def set_state(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continues at a saved position: this process's state, or every process's (any count)."""
        states = state if isinstance(state, list) else [state]
        slots: dict[int, SlotState] = {}
        for i, st in enumerate(states):
            if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
                raise DataError("the checkpoint's data position is from an older pipeline version; start a "
                                "new workdir or restore parameters only (checkpoint.restore_from)")
            slots.update({int(r): SlotState.from_json(v) for r, v in st["slots"].items()})
        saved_rows = {st["global_rows"] for st in states}
        if saved_rows != {self.global_batch_size}:
            slots = self._continue_after(slots, max(saved_rows))
        missing = [r for r in self._rows() if r not in slots]
        if missing:
            raise DataError(f"the saved data position has no row {missing[0]}")
        self.close()
        self._slots = {r: slots[r] for r in self._rows()}
        # Counters are sums over processes: this process takes the saved totals' share of one.
        self._reset_counters()
        if self.process_index == 0 or len(states) == 1:
            for st in states:
                for k, v in st.get("counters", {}).items():
                    if k in self._counters:
                        self._counters[k] += int(v)
                for s, n in enumerate(st.get("per_source", [])[: len(self._per_source)]):
                    self._per_source[s] += int(n)
        self._batches = int(states[0].get("batches", 0))

    def _continue_after(self, saved: dict[int, SlotState], saved_rows: int) -> dict[int, SlotState]:
        """Another train.batch_size: the rows are other rows, so each source continues after the
        furthest position any saved row had read (examples that slower rows had not reached yet,
        and the ones waiting in their lookahead, are skipped this epoch)."""
        n = len(self.sources)
        furthest = [max((st.taken[s] - 1) * saved_rows + r for r, st in saved.items()) for s in range(n)]
        draws = max(st.draws for st in saved.values())
        if self.process_index == 0:
            print(f"warning: the checkpoint's data position is for train.batch_size={saved_rows}, this run has "
                  f"{self.global_batch_size}: the data continues after the furthest example read", file=sys.stderr,
                  flush=True)
        b = self.global_batch_size
        return {r: SlotState(draws, [max(0, (f - r) // b + 1) for f in furthest], []) for r in self._rows()}

    # ---------------------------------------------------------------- stats
    def _reset_counters(self):
        self._counters = {k: 0 for k in ("batches", "examples", "truncated", "dropped", "bad_records",
                                         "inputs_tokens", "targets_tokens", "inputs_slots", "targets_slots")}
        self._per_source = [0] * len(self.sources)

    def _count(self, batch):
        c = self._counters
        c["batches"] += 1
        c["examples"] += int(batch["targets_segment_ids"].max(axis=1).sum())
        for k in FEATURES:
            c[f"{k}_tokens"] += int(np.count_nonzero(batch[f"{k}_segment_ids"]))
            c[f"{k}_slots"] += batch[k].size

    @property
    def counters(self) -> dict[str, int]:
        """Raw counts (add them up across processes for global figures); `stats` derives rates."""
        out = dict(self._counters)
        if len(self.sources) > 1:
            out.update({f"examples/{name}": n for name, n in zip(self._maker.names, self._per_source)})
        return out

    @property
    def stats(self) -> dict[str, float | int]:
        return derive_stats(self.counters, self.sources)


def derive_stats(c: dict[str, int], sources: Sequence[Any] = ()) -> dict[str, float | int]:
    """Flat metrics from (possibly summed over processes) counters."""
    out: dict[str, float | int] = {k: v for k, v in c.items() if not k.endswith(("_slots",))}
    for k in FEATURES:
        out[f"{k}_efficiency"] = c[f"{k}_tokens"] / c[f"{k}_slots"] if c[f"{k}_slots"] else 0.0
    slots = c["inputs_slots"] + c["targets_slots"]
    out["packing_efficiency"] = (c["inputs_tokens"] + c["targets_tokens"]) / slots if slots else 0.0
    for s in sources:
        out.update(getattr(s, "stats", {}) or {})
    return out
