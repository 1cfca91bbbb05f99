"""`trainer.train` whose input blocks forever in one process: a hang for the watchdog to catch.

Run as `launch.local --module tests.stall_train -- <trainer.train arguments>` with the environment
STALL_PROCESS=I and STALL_AT_BATCH=N: process I's Nth training batch never arrives (the fault is
injected from outside the trainer, by wrapping the pipeline's `__next__`).
"""

from __future__ import annotations

import os
import threading

import jax

from trainer.data.pipeline import Pipeline
from trainer.lifecycle import run_main
from trainer.train import main

_next = Pipeline.__next__
_count = {"train": 0}


def _stalling_next(self):
    if self.split == "train":
        _count["train"] += 1
        if (jax.process_index() == int(os.environ["STALL_PROCESS"])
                and _count["train"] == int(os.environ["STALL_AT_BATCH"])):
            threading.Event().wait()  # blocks forever, as a dead network mount would
    return _next(self)


Pipeline.__next__ = _stalling_next

if __name__ == "__main__":
    run_main(main)
