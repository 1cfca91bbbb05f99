"""Where numbers go: metrics.jsonl, TensorBoard (MaxText's scalar names) and the console.

Only process 0 writes; other processes get a writer that drops everything, so call sites stay
free of `if process_index == 0` branches.

On object storage (a gs:// or s3:// workdir), where nothing can be appended to, metrics.jsonl is
kept in memory and rewritten whole at each write (once per log interval), and TensorBoard's event
files are rewritten whole at each of its flushes: readers always see a complete file, the same
format as on a disk.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from trainer import storage

# metrics.jsonl key -> TensorBoard scalar name (MaxText's spellings).
TRAIN_SCALARS = {
    "loss": "learning/loss",
    "grad_norm": "learning/grad_norm",
    "learning_rate": "learning/current_learning_rate",
    "step_time_s": "perf/step_time_seconds",
    "per_device_tokens_per_sec": "perf/per_device_tokens_per_sec",
    "nonpad_tokens_per_sec": "perf/nonpad_tokens_per_sec",
    "per_device_tflops_per_sec": "perf/per_device_tflops_per_sec",
    "mfu": "perf/mfu",
    "skipped_steps": "learning/skipped_steps",
    "slowest_process": "perf/slowest_process",
    "straggler_lag_s": "perf/straggler_lag_s",
    "data_wait_s": "perf/data_wait_seconds",
    "dispatch_s": "perf/dispatch_seconds",
    "device_s": "perf/device_wait_seconds",
}


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors the scalars to TensorBoard.

    Opening an existing metrics.jsonl repairs it first (`repair_jsonl`): a partial last line (a
    crash mid-write) is dropped, and with `resume_step=S` (the step the run resumes from) so are
    records of steps after S, which the resumed run logs again; so no step is ever logged twice.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        storage.makedirs(workdir)
        self.jsonl_path = storage.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = storage.join(workdir, "tensorboard")
        repair_jsonl(self.jsonl_path, resume_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8") if not storage.is_remote(workdir) \
            else _RewrittenFile(self.jsonl_path)
        from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

        _register_object_storage_writers()
        # TensorBoard likewise hides the events of steps after the resume point.
        purge = resume_step + 1 if resume_step is not None and storage.isdir(self.tensorboard_dir) else None
        self._tb = SummaryWriter(self.tensorboard_dir, flush_secs=10, purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        """`record` needs `step` and `split`; floats are written at full precision."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        step, split = int(record["step"]), record["split"]
        for key, value in record.items():
            if key in ("step", "split") or not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value):
                continue
            tag = f"{split}/{key}"
            if split == "train":  # goodput_train_s -> goodput/train_s (the clock's keys, trainer/goodput.py)
                tag = TRAIN_SCALARS.get(key) or (f"goodput/{key[8:] or key}" if key.startswith("goodput")
                                                 else f"train/{key}")
            self._tb.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def repair_jsonl(path: str, resume_step: int | None = None) -> int:
    """Makes `path` safe to append to; returns how many lines were dropped.

    Drops a partial last line (no trailing newline: the writer was killed mid-line), and, when
    `resume_step` is given, every record whose `step` is greater (logged after the checkpoint
    the run resumes from: the resumed run logs those steps again). Complete lines that are not
    JSON are kept as they are. The file is rewritten atomically (temporary file + rename).
    """
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return 0
    lines = data.split(b"\n")
    partial = lines.pop()  # b"" when the file ends with a newline
    kept = []
    for line in lines:
        if resume_step is not None and line.strip():
            try:
                record = json.loads(line)
                step = record.get("step") if isinstance(record, dict) else None
            except ValueError:
                step = None
            if isinstance(step, (int, float)) and not isinstance(step, bool) and step > resume_step:
                continue
        kept.append(line)
    dropped = len(lines) - len(kept) + (1 if partial else 0)
    if dropped:
        storage.write_bytes(path, b"".join(line + b"\n" for line in kept))
    return dropped


class _RewrittenFile:
    """An append-only file on object storage (metrics.jsonl, an event file): the whole contents, rewritten at
    each flush."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._data = bytearray(storage.read_bytes(path))
        except FileNotFoundError:
            self._data = bytearray()
        self._dirty = False

    def write(self, data: str | bytes) -> None:  # text from the metrics writer, bytes from tensorboardX
        self._data += data.encode("utf-8") if isinstance(data, str) else data
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            storage.write_bytes(self.path, bytes(self._data))
            self._dirty = False

    def close(self) -> None:
        self.flush()


class _EventFileFactory:
    def open(self, path: str) -> _RewrittenFile:  # tensorboardX's record-writer interface: write/flush/close
        return _RewrittenFile(path)

    def directory_check(self, path: str) -> None:
        storage.check(path)


def _register_object_storage_writers() -> None:
    """TensorBoard event files on gs:// and s3:// through this project's path layer (one set of
    clients and endpoints), in place of tensorboardX's own boto3 / google-cloud-storage writers."""
    from tensorboardX import record_writer

    for scheme in storage.SCHEMES:
        record_writer.register_writer_factory(scheme, _EventFileFactory())


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Console:
    """One progress line per logged step: step, loss, tokens/s, MFU and ETA."""

    def __init__(self, total_steps: int, *, enabled: bool = True, stream=None):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.start = time.time()

    def log(self, message: str) -> None:
        if self.enabled:
            try:
                print(message, file=self.stream, flush=True)
            except BrokenPipeError:  # the reader went away (`| head`): drop console lines, keep training
                self.enabled = False

    def progress(self, step: int, loss: float, tokens_per_sec: float | None, mfu: float | None,
                 step_time: float | None) -> None:
        width = len(str(self.total))
        if step_time is None:  # nothing timed yet: the first step includes compilation
            self.log(f"step {step:>{width}}/{self.total} | loss {loss:.4f} | (first step, includes compilation; "
                     f"{format_duration(time.time() - self.start)} since start)")
            return
        eta = (self.total - step) * step_time
        self.log(f"step {step:>{width}}/{self.total} | loss {loss:.4f} | {tokens_per_sec:,.0f} tok/s | "
                 f"mfu {100 * mfu:.1f}% | {step_time * 1e3:.0f} ms/step | eta {format_duration(eta)}")
