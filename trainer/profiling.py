"""`train.profile_steps=START:END`: a jax.profiler trace of those steps, for TensorBoard's profile tab.

The trace goes under WORKDIR/tensorboard/plugins/profile/ (the layout TensorBoard's profile
plugin reads, `pip install tensorboard-plugin-profile`). Tracing starts right before step START
is dispatched and stops once step END's results are on the host, so the trace holds those steps'
device work whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

from trainer import storage
from trainer.config import profile_range


class StepProfiler:
    def __init__(self, spec: str | None, logdir: str, *, all_processes: bool = False):
        span = profile_range(spec) if spec else None
        enabled = span is not None and (all_processes or jax.process_index() == 0)
        self._span = span if enabled else None
        self._logdir = logdir
        self._staging: str | None = None  # the local folder a trace for object storage is written to
        self._active = False

    def before_step(self, step: int) -> None:
        """Called with the number of the step about to be dispatched (1-based)."""
        if self._span and step == self._span[0] and not self._active:
            target = self._logdir
            if storage.is_remote(target):  # the profiler writes local files: uploaded when it stops
                self._staging = target = tempfile.mkdtemp(prefix="seq2seq-trace-")
            os.makedirs(target, exist_ok=True)
            jax.profiler.start_trace(target)
            self._active = True

    def after_step(self, step: int) -> None:
        """Called once step `step`'s numbers are on the host."""
        if self._active and step >= self._span[1]:
            self.stop()

    def stop(self) -> None:
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
            if self._staging is not None:
                storage.copy_tree(self._staging, self._logdir)
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None
