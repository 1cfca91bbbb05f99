"""`trainer.train` with a faulty input in one process, for the watchdog, straggler and goodput tests.

Run as `launch.local --module tests.faulty_train -- <trainer.train arguments>`; the environment
picks the fault (injected from outside the trainer, by wrapping the pipeline's `__next__`):

  STALL_PROCESS=I STALL_AT_BATCH=N   process I's Nth training batch never arrives (a hang)
  SLOW_PROCESS=I SLOW_SECONDS=S      process I waits S seconds for every training batch (a straggler)
"""

from __future__ import annotations

import os
import threading
import time

import jax

from trainer.data.pipeline import Pipeline
from trainer.lifecycle import run_main
from trainer.train import main

_next = Pipeline.__next__
_count = {"train": 0}


def _faulty_next(self):
    if self.split == "train":
        _count["train"] += 1
        me = jax.process_index()
        if me == int(os.environ.get("STALL_PROCESS", -1)) and _count["train"] == int(os.environ["STALL_AT_BATCH"]):
            threading.Event().wait()  # blocks forever, as a dead network mount would
        if me == int(os.environ.get("SLOW_PROCESS", -1)):
            time.sleep(float(os.environ["SLOW_SECONDS"]))
    return _next(self)


Pipeline.__next__ = _faulty_next

if __name__ == "__main__":
    run_main(main)
