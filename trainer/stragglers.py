"""Stragglers: which process holds the others back, measured per log interval.

In a synchronous SPMD job every process takes the same wall time per step; a slow one shows as
the process that waits least, while the others wait for it (on the device, or in dispatch once
the device queue is full). Each process sums three parts of its step
time over the log interval (`perf_counter` calls only, nothing per step crosses processes):

    data_wait  waiting for the input pipeline's next batch
    dispatch   the host's call that enqueues the jitted step
    device     waiting for the step's numbers (the device, and peers in collectives)

At each log, one small all-gather (shared with the input pipeline's counters) brings every
process's split to all; process 0 logs the slowest process (least waiting per step) and its lag
(how much longer the median other process waits) (`perf/slowest_process`, `perf/straggler_lag_s`). The launch's
first step (compilation) is left out.
"""

from __future__ import annotations

import time

import numpy as np

PARTS = ("data_wait", "dispatch", "device")


class StepSplit:
    """This process's step-time split since the last log."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        """Forgets the interval so far (the launch's first step, which compiles)."""
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.steps = 0

    def add(self, part: str, since: float) -> None:
        """Adds the time from `since` (a `time.perf_counter()` value) to now to `part`."""
        self.seconds[part] += time.perf_counter() - since

    def local(self) -> np.ndarray:
        """[data_wait, dispatch, device] per step over the interval; the counters restart."""
        steps = max(self.steps, 1)
        out = np.array([self.seconds[p] / steps for p in PARTS], np.float64)
        self.restart()
        return out


def straggler_fields(per_process: np.ndarray) -> dict[str, float | int]:
    """From every process's split [processes, parts]: the slowest process and its lag (s per step);
    process 0's own split as `<part>_s`.

    The steps are in lockstep, so the straggler is the process that waits least for the others
    (dispatch can block too, once the device queue is full); its lag is how much longer the median
    other process waits per step (0 on one process).
    """
    waiting = per_process[:, 1] + per_process[:, 2]  # dispatch + device
    slowest = int(np.argmin(waiting))
    others = np.delete(waiting, slowest)
    fields: dict[str, float | int] = {f"{p}_s": float(per_process[0, i]) for i, p in enumerate(PARTS)}
    fields["slowest_process"] = slowest
    fields["straggler_lag_s"] = float(np.median(others) - waiting[slowest]) if others.size else 0.0
    return fields
