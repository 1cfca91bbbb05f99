"""SIGTERM and Ctrl-C: save at the next step boundary, wait for the save to commit, exit.

SIGTERM is what Slurm, Kubernetes and TPU maintenance events send before they stop a job. The
first Ctrl-C (SIGINT) does the same; a second one exits at once without saving. With several
processes, JAX's preemption sync point makes them agree on the step: its notifier catches
SIGTERM in every process (and a first Ctrl-C is turned into a SIGTERM to this process, so
the same machinery picks the step).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """Installed for the life of the train loop; `reached(step)` says "save and stop here"."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._multi = jax.process_count() > 1
        self._interrupts = 0
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        if not self._multi:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_term)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_term(self, *_) -> None:
        self._flag.set()

    def _on_interrupt(self, *_) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            print("second Ctrl-C: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(130)
        if jax.process_index() == 0:
            print("Ctrl-C: saving a checkpoint at the next step, then exiting (Ctrl-C again to exit at once)",
                  file=sys.stderr, flush=True)
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier: all processes agree on the step
        else:
            self._flag.set()

    def reached(self, step: int) -> bool:
        if self._multi:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except Exception:  # noqa: BLE001 - no preemption service (e.g. not started by jax.distributed)
                return self._flag.is_set()
        return self._flag.is_set()

    def close(self) -> None:
        """Puts back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
