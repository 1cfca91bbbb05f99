"""The global data order: which examples fill which row of which global batch.

Every global batch has B rows (`train.batch_size`). Row r of every batch is a *slot* with a
stream of its own: the positions r, r + B, r + 2B, ... of each source's endless shuffled
stream (a new permutation every epoch, drawn from the run's seed), and, with a mixture, a
weighted choice of source at each of its draws (a counter-based hash of seed, slot and draw).
A slot packs its next examples into one row, first fit over a lookahead of `LOOKAHEAD`
examples that did not fit yet (they go first into its next row, so none starves).

So the content of row r of batch k is a function of the seed, the data, B and r alone: process
p builds only its rows [p*b, (p+1)*b), reads only the examples they hold, and any number of
processes produces the same global batches. A slot's position is a few integers (draws per
source and the examples waiting in its lookahead); the global position is the list of slot
positions, so a run saved on P processes resumes on P' processes at the next global batch
without replaying anything.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from trainer.data.vocab import EOS_ID

LOOKAHEAD = 8  # examples a slot keeps waiting for a row they fit in
MAX_FRUITLESS_DRAWS = 10_000  # consecutive dropped or bad examples before a slot gives up
_MASK64 = (1 << 64) - 1


def _mix64(*values: int) -> int:
    """SplitMix64 over the values: a fast counter-based hash (same on every host)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h


class DataError(RuntimeError):
    """The data cannot produce a batch (every example dropped, too many bad records, ...)."""


class RecordError(ValueError):
    """A record that cannot be decoded (bad bytes, bad JSON, missing field, empty side): skipped, counted."""


@dataclasses.dataclass
class Example:
    inputs: np.ndarray  # int32, eos included
    targets: np.ndarray
    source: int
    truncated: bool


class SourceOrder:
    """One source's endless stream: position j -> record index, a new permutation every epoch."""

    _KEEP = 4  # epochs of permutations kept (slots progress at slightly different rates)

    def __init__(self, n: int, seed: int, source_index: int, shuffle: bool):
        self.n = n
        self._key = (seed, source_index)
        self._shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}

    def index(self, j: int) -> int:
        epoch, i = divmod(j, self.n)
        if not self._shuffle:
            return i
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([*self._key, epoch, 0x0DE5]).permutation(self.n).astype(np.int64)
            self._perms[epoch] = perm
            for old in sorted(self._perms)[: -self._KEEP]:
                del self._perms[old]
        return int(perm[i])


class ExampleMaker:
    """(source, stream position) -> Example fitted to the lengths; None when dropped or bad.

    The example's randomness (span positions) comes from (seed, source, position), never
    from which process or worker builds it.
    """

    def __init__(self, sources: Sequence[Any], split: str, *, seed: int, inputs_length: int, targets_length: int,
                 overlong: str, shuffle: bool, max_bad_fraction: float):
        self._records = [s.records(split) for s in sources]
        self._make: list[Callable] = [s.make_example for s in sources]
        self._locate = [getattr(s, "locate", None) for s in sources]
        self.names = [getattr(s, "name", str(i)) for i, s in enumerate(sources)]
        self.orders = [SourceOrder(len(r), seed, i, shuffle) for i, r in enumerate(self._records)]
        self._seed = seed
        self._split = split
        self._limits = (inputs_length - 1, targets_length - 1)
        self._drop = overlong == "drop"
        self._max_bad = max_bad_fraction
        self.counts = {"seen": 0, "bad_records": 0, "dropped": 0}

    def __len__(self) -> int:
        return sum(o.n for o in self.orders)

    def at(self, s: int, j: int) -> Example | None:
        index = self.orders[s].index(j)
        record = self._records[s][index]
        rng = np.random.default_rng([self._seed, s, j, 0xE8A])
        self.counts["seen"] += 1
        try:
            ex = self._make[s](record, rng)
        except RecordError as e:
            self.counts["bad_records"] += 1
            self._check_bad(s, index, e)
            return None
        except Exception as e:  # not a bad record: a bug or a setting that cannot work; say where
            raise DataError(f"data source {self.names[s]}: {self._where(s, index)}: {type(e).__name__}: {e}") from e
        out, truncated = [], False
        for ids, limit in zip((ex["inputs"], ex["targets"]), self._limits):
            ids = np.asarray(ids, dtype=np.int32)
            if ids.shape[0] > limit:
                truncated = True
                ids = ids[:limit]
            out.append(np.concatenate([ids, np.array([EOS_ID], np.int32)]))
        if truncated and self._drop:
            self.counts["dropped"] += 1
            return None
        return Example(out[0], out[1], s, truncated)

    def _where(self, s: int, index: int) -> str:
        locate = self._locate[s]
        return locate(self._split, index) if locate else f"{self._split} record {index}"

    def _check_bad(self, s: int, index: int, e: Exception) -> None:
        c = self.counts
        if c["seen"] >= 100 and c["bad_records"] / c["seen"] > self._max_bad:
            raise DataError(f"data source {self.names[s]}: {c['bad_records']} of {c['seen']} records could not be "
                            f"decoded (more than data.max_bad_fraction={self._max_bad}); last: "
                            f"{self._where(s, index)}: {e}")


@dataclasses.dataclass
class SlotState:
    """Where one row slot stands: draws so far, draws per source, examples waiting."""

    draws: int
    taken: list[int]  # per source: how many of its positions (r, r+B, ...) this slot has drawn
    pending: list[tuple[int, int]]  # (source, position) drawn, not yet placed in a row

    def to_json(self) -> list:
        return [self.draws, list(self.taken), [list(p) for p in self.pending]]

    @classmethod
    def from_json(cls, v: list) -> "SlotState":
        return cls(int(v[0]), [int(x) for x in v[1]], [(int(s), int(j)) for s, j in v[2]])


class RowBuilder:
    """Builds the rows of some slots, one global batch at a time."""

    def __init__(self, maker: ExampleMaker, *, seed: int, global_rows: int, weights: Sequence[float], pack: bool,
                 lengths: tuple[int, int]):
        self.maker = maker
        self._seed = seed
        self._rows = global_rows
        total = float(sum(weights))
        self._cum = list(np.cumsum([w / total for w in weights]))
        self._pack = pack
        self._lengths = lengths
        self._cache: dict[tuple[int, int, int], Example] = {}  # (slot, source, position) of pending examples

    def initial(self, slot: int) -> SlotState:
        return SlotState(0, [0] * len(self._cum), [])

    def _draw(self, slot: int, st: SlotState) -> tuple[int, int]:
        s = 0
        if len(self._cum) > 1:
            u = _mix64(self._seed, 0x313, slot, st.draws) / 2.0**64
            s = min(bisect.bisect_right(self._cum, u), len(self._cum) - 1)
        j = st.taken[s] * self._rows + slot
        st.taken[s] += 1
        st.draws += 1
        return s, j

    def row(self, slot: int, st: SlotState) -> tuple[list[Example], SlotState]:
        """The next row of `slot` and the slot's state after it (`st` is not modified)."""
        st = SlotState(st.draws, list(st.taken), list(st.pending))
        room = list(self._lengths)
        row: list[Example] = []
        waiting: list[tuple[int, int]] = []

        def place(s: int, j: int, ex: Example) -> None:
            n = (ex.inputs.shape[0], ex.targets.shape[0])
            if n[0] <= room[0] and n[1] <= room[1] and (self._pack or not row):
                row.append(ex)
                room[0] -= n[0]
                room[1] -= n[1]
                self._cache.pop((slot, s, j), None)
            else:
                waiting.append((s, j))
                self._cache[(slot, s, j)] = ex

        for s, j in st.pending:
            ex = self._cache.get((slot, s, j)) or self.maker.at(s, j)
            if ex is not None:
                place(s, j, ex)
        fruitless = 0
        while (not row) or (self._pack and len(waiting) < LOOKAHEAD and room[0] > 0 and room[1] > 0):
            s, j = self._draw(slot, st)
            ex = self.maker.at(s, j)
            if ex is None:
                fruitless += 1
                if fruitless >= MAX_FRUITLESS_DRAWS:
                    raise DataError(f"{fruitless} examples in a row were dropped or undecodable "
                                    f"({self.maker.counts}); check data.overlong and the lengths")
                continue
            fruitless = 0
            place(s, j, ex)
        st.pending = waiting
        return row, st


def layout_row(row: list[Example], lengths: tuple[int, int]) -> dict[str, np.ndarray]:
    """Examples -> one row of tokens, segment ids (1, 2, ...; 0 = padding) and positions."""
    out = {}
    for key, length in zip(("inputs", "targets"), lengths):
        tokens = np.zeros(length, np.int32)
        seg = np.zeros(length, np.int32)
        pos = np.zeros(length, np.int32)
        at = 0
        for i, ex in enumerate(row):
            ids = ex.inputs if key == "inputs" else ex.targets
            n = ids.shape[0]
            tokens[at : at + n] = ids
            seg[at : at + n] = i + 1
            pos[at : at + n] = np.arange(n, dtype=np.int32)
            at += n
        out[key], out[f"{key}_segment_ids"], out[f"{key}_positions"] = tokens, seg, pos
    return out
