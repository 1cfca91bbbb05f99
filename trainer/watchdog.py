"""Hang detection: a process that completes no step for too long says where it is stuck and exits.

A multi-host job that hangs (a data source that never returns, a peer that never joins a
collective, a wedged device) otherwise burns its allocation in silence. Every process runs a
`HangWatchdog` thread: the train loop reports each completed step (and each eval and save, which
are progress too). When nothing is reported for `train.hang_timeout` seconds, the watchdog writes
every thread's Python stack and the last completed step to `WORKDIR/hang/PROCESS.txt` and to
stderr, and exits the process with EXIT_HANG, so that a Slurm requeue or the TPU script restarts
the job from its last checkpoint. The main thread may be stuck in C code (a collective, a
blocking read) that no exception can interrupt, hence `os._exit` from the watchdog thread: the
workdir lock is an OS lock released by the exit, and an interrupted checkpoint save is never
committed (Orbax removes its temporary folder on the next start).

The timeout is armed when the first step completes (compilation is not a step), and by default is
max(10 x the median step time so far, 5 minutes).
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time

from trainer import storage
from trainer.lifecycle import distributed_client

EXIT_HANG = 7  # no step completed within train.hang_timeout (see README); restart from the last checkpoint
MIN_AUTO_TIMEOUT_S = 300.0
AUTO_FACTOR = 10.0
_WINDOW = 100  # step times kept for the median


class HangWatchdog:
    """Ends the process with EXIT_HANG when `progress()` is not called for the timeout."""

    def __init__(self, workdir: str, process_index: int, timeout_s: float | None, *, poll_s: float = 1.0):
        self._path = storage.join(workdir, "hang", f"{process_index}.txt")
        self._fixed = timeout_s
        self._poll = poll_s
        self._lock = threading.Lock()
        self._last_time: float | None = None  # armed once the first step completes
        self._last_step: int | None = None
        self._what = "nothing yet"
        self._step_times: list[float] = []
        self._interrupted = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout_s != 0:
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()

    def step_done(self, step: int) -> None:
        """Step `step` completed (its numbers are on the host)."""
        now = time.monotonic()
        with self._lock:
            timed = not self._interrupted and self._last_step is not None and step == self._last_step + 1
            if timed and self._last_time is not None:
                self._step_times = (self._step_times + [now - self._last_time])[-_WINDOW:]
            self._last_time, self._last_step, self._what = now, step, f"step {step} completed"
            self._interrupted = False

    def progress(self, what: str) -> None:
        """Work other than a step finished (an eval, a checkpoint save): restarts the clock once armed."""
        with self._lock:
            if self._last_time is not None:
                self._last_time, self._what = time.monotonic(), what
            self._interrupted = True  # the next step's interval includes this work: not a step time

    def timeout(self) -> float | None:
        """The current limit in seconds (None: not armed yet, or disabled)."""
        with self._lock:
            if self._last_time is None or self._fixed == 0:
                return None
            if self._fixed is not None:
                return float(self._fixed)
            median = statistics.median(self._step_times) if self._step_times else 0.0
            return max(AUTO_FACTOR * median, MIN_AUTO_TIMEOUT_S)

    def close(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self._poll):
            limit = self.timeout()
            with self._lock:
                last, step, what = self._last_time, self._last_step, self._what
            peer = _hung_peer()
            if peer is not None and not self._done.is_set():  # a peer hung: this one waits for it forever
                self._fire(f"process {peer[0]} reported a hang ({peer[1]}); last completed step here {step} "
                           f"({what})", announce=False)
            if limit is None or last is None:
                continue
            idle = time.monotonic() - last
            if idle > limit and not self._done.is_set():
                self._fire(f"no step completed for {idle:.0f} s (train.hang_timeout {limit:.0f} s); last completed "
                           f"step {step} ({what})", announce=True)

    def _fire(self, reason: str, *, announce: bool) -> None:
        """Stacks to the file and stderr, the other processes told, then exit with EXIT_HANG."""
        if announce:
            _announce_hang(reason)
        header = (f"hang: {reason}; every thread's stack follows; exiting with code {EXIT_HANG} so the job "
                  f"restarts from its last checkpoint\n")
        try:
            with tempfile.TemporaryFile("w+b") as f:  # faulthandler needs a real file; the workdir may be a bucket
                f.write(header.encode())
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.seek(0)
                storage.write_bytes(self._path, f.read())
        except OSError as e:
            header += f"(could not write {self._path}: {e})\n"
        try:
            sys.stderr.write(header + f"stacks: {self._path}\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except (OSError, ValueError):
            pass
        client, _ = distributed_client(connected=True)
        if client is not None:
            # Leave jax.distributed together (every process learns of the hang within a poll): a
            # process that just vanished would make the coordination service abort the others
            # before their own watchdog could report. Bounded: a peer that never comes is not waited for.
            import jax

            leave = threading.Thread(target=jax.distributed.shutdown, name="hang-shutdown", daemon=True)
            leave.start()
            leave.join(_SHUTDOWN_WAIT_S)
        os._exit(EXIT_HANG)


_HANG_PREFIX = "trainer/hang/"
_SHUTDOWN_WAIT_S = 20.0


def _announce_hang(reason: str) -> None:
    client, me = distributed_client(connected=True)
    if client is None:
        return
    try:
        client.key_value_set(f"{_HANG_PREFIX}{me}", reason[:500], allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the coordinator may be gone already
        pass


def _hung_peer() -> tuple[str, str] | None:
    """(process, reason) of another process that reported a hang, if any (one small request)."""
    client, me = distributed_client(connected=True)
    if client is None:
        return None
    try:
        entries = client.key_value_dir_get(_HANG_PREFIX)
    except Exception:  # noqa: BLE001 - coordinator gone or shutting down
        return None
    others = sorted((k.rsplit("/", 1)[-1], v) for k, v in entries if not k.endswith(f"/{me}"))
    return others[0] if others else None
