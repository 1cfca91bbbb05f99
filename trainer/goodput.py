"""Goodput: where every second of a run went, across relaunches.

The train loop is always in exactly one state (`GoodputClock.enter`), so the categories add up to
the launch's wall time by construction:

    init        process start to the first step: jax.distributed, data start-up, state creation
    checkpoint  blocking time of checkpoint restores and saves
    compile     the first step of a launch (XLA compilation plus one step)
    train       steps that advanced the run
    recompute   steps trained again after resuming from a checkpoint older than the last step the
                previous launch completed (derived from the workdir's history)
    data_wait   waiting for the input pipeline's next batch
    eval        evaluation (and its generation metrics)
    shutdown    after the last step: the final save's wait, closing files

goodput = train / wall. Process 0 writes its account to `WORKDIR/goodput/launch-K.json` at every
log interval and at exit (a killed launch keeps its last one), and the `goodput` / `goodput_*_s`
keys of each train record in metrics.jsonl (TensorBoard `goodput/*`).

`python -m trainer.goodput WORKDIR` prints every launch's account and the whole run's, including
the time between launches (the job was down).
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

from trainer import storage

CATEGORIES = ("init", "checkpoint", "compile", "train", "recompute", "data_wait", "eval", "shutdown")


class GoodputClock:
    """Attributes wall time to the state the loop is in; one `time.monotonic()` per switch."""

    def __init__(self, workdir: str, *, enabled: bool):
        self.enabled = enabled
        self.directory = storage.join(workdir, "goodput")
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.state = "init"
        self._since = time.monotonic()  # created as `trainer.train.train` starts
        self.started_at = time.time()
        self.start_step = 0
        self.last_step = 0
        self.recomputed_steps = 0
        self.status = "running"
        self.launch = 0
        self._path: str | None = None

    def enter(self, state: str) -> str:
        """Switches to `state`; returns the previous one (to come back to)."""
        now = time.monotonic()
        self.seconds[self.state] += now - self._since
        previous, self.state, self._since = self.state, state, now
        return previous

    def resumed(self, start_step: int, previous_last_step: int | None) -> None:
        """This launch starts at `start_step`; the previous one had completed `previous_last_step`."""
        self.start_step = self.last_step = start_step
        if previous_last_step is not None and previous_last_step > start_step:
            self.recomputed_steps = previous_last_step - start_step

    def step_state(self, step: int) -> str:
        """`recompute` while re-training steps the previous launch had done, else `train`."""
        return "recompute" if step <= self.start_step + self.recomputed_steps else "train"

    def totals(self) -> dict[str, float]:
        now = time.monotonic()
        out = dict(self.seconds)
        out[self.state] += now - self._since
        return out

    def record_fields(self) -> dict[str, float]:
        """The `goodput` and `goodput_<category>_s` keys of a metrics.jsonl train record."""
        totals = self.totals()
        wall = sum(totals.values())
        fields = {f"goodput_{k}_s": v for k, v in totals.items()}
        fields["goodput_wall_s"] = wall
        fields["goodput"] = totals["train"] / wall if wall > 0 else 0.0
        return fields

    # -- the workdir's history ------------------------------------------------------------------

    def open_launch(self) -> int | None:
        """Numbers this launch after the workdir's earlier ones; returns the last step the previous
        launch completed (None on the first launch)."""
        previous = read_launches(storage.dirname(self.directory))
        self.launch = len(previous)
        self._path = storage.join(self.directory, f"launch-{self.launch}.json")
        return previous[-1].get("last_step") if previous else None

    @property
    def started(self) -> bool:
        """Training began (a run stopped by a config error before that writes no account)."""
        return self.seconds["compile"] > 0 or self.state not in ("init", "checkpoint")

    def save(self) -> None:
        if not self.enabled or self._path is None or not self.started:
            return
        totals = self.totals()
        wall = sum(totals.values())
        account = {"launch": self.launch, "started_at": self.started_at, "updated_at": time.time(),
                   "status": self.status, "start_step": self.start_step, "last_step": self.last_step,
                   "recomputed_steps": self.recomputed_steps, "seconds": totals, "wall_s": wall,
                   "goodput": totals["train"] / wall if wall > 0 else 0.0}
        storage.write_text(self._path, json.dumps(account, indent=1))

    def summary(self) -> str:
        totals = self.totals()
        wall = sum(totals.values())
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in totals.items() if v >= 0.05)
        extra = f"; {self.recomputed_steps} step(s) recomputed after resuming" if self.recomputed_steps else ""
        return f"goodput {totals['train'] / wall:.1%} of {wall:.1f}s: {parts}{extra}" if wall > 0 else "goodput: -"


def read_launches(workdir: str) -> list[dict[str, Any]]:
    """Every launch's account in the workdir, in launch order (unreadable files skipped)."""
    out = []
    numbered = []
    directory = storage.join(workdir, "goodput")
    for name in storage.listdir(directory):
        match = re.fullmatch(r"launch-(\d+)\.json", name)
        if match:
            numbered.append((int(match.group(1)), storage.join(directory, name)))
    for _, path in sorted(numbered):
        try:
            out.append(json.loads(storage.read_text(path)))
        except (OSError, ValueError):
            continue
    return out


def last_logged_step(metrics_path: str) -> int | None:
    """The last train step metrics.jsonl holds (read before a resume drops the steps it redoes)."""
    last = None
    try:
        text = storage.read_text(metrics_path)
    except OSError:
        return None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("split") == "train" and isinstance(record.get("step"), int):
            last = max(last or 0, record["step"])
    return last


def report(workdir: str) -> str:
    """The whole run's account: one line per launch, the time between launches, the totals."""
    launches = read_launches(workdir)
    if not launches:
        raise FileNotFoundError(f"{storage.join(workdir, 'goodput')}: no launch accounts (is this a training run?)")
    lines = [f"{'launch':>6} {'steps':>13} {'wall':>9} {'goodput':>8}  " + " ".join(f"{c:>10}" for c in CATEGORIES)
             + "  status"]
    totals = dict.fromkeys(CATEGORIES, 0.0)
    down = 0.0
    recomputed = 0
    for i, a in enumerate(launches):
        seconds = a.get("seconds", {})
        for c in CATEGORIES:
            totals[c] += float(seconds.get(c, 0.0))
        recomputed += int(a.get("recomputed_steps", 0))
        if i:
            prev = launches[i - 1]
            down += max(0.0, float(a.get("started_at", 0)) - float(prev.get("updated_at", 0)))
        steps = f"{a.get('start_step', 0)}->{a.get('last_step', 0)}"
        lines.append(f"{a.get('launch', i):>6} {steps:>13} {a.get('wall_s', 0.0):>8.1f}s {a.get('goodput', 0.0):>8.1%}  "
                     + " ".join(f"{float(seconds.get(c, 0.0)):>9.1f}s" for c in CATEGORIES) + f"  {a.get('status')}")
    wall = sum(totals.values())
    lines.append(f"{'all':>6} {'':>13} {wall:>8.1f}s {totals['train'] / wall if wall else 0:>8.1%}  "
                 + " ".join(f"{totals[c]:>9.1f}s" for c in CATEGORIES))
    lines.append(f"{len(launches)} launch(es); {recomputed} step(s) recomputed after resuming; {down:.1f}s between "
                 f"launches; goodput counting that downtime: "
                 f"{totals['train'] / (wall + down) if wall + down else 0:.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from trainer.config import ConfigError, run_command

    def command(argv: list[str]) -> None:
        if len(argv) != 1:
            raise ConfigError("usage: python -m trainer.goodput WORKDIR")
        try:
            print(report(argv[0]))
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None

    return run_command(command, argv)


if __name__ == "__main__":
    sys.exit(main())
