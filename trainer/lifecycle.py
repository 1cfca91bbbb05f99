"""How a training process ends: nothing lost, nothing hung.

- `guard_streams()`: a closed stdout or stderr (`trainer.train ... | head`, a launcher that died)
  no longer kills the run with BrokenPipeError. The stream is pointed at /dev/null from then on:
  console lines are dropped, `metrics.jsonl` and the checkpoints are still written, the run goes
  on to its end (or its next signal) and exits as it would have.
- `arm_exit_deadline(seconds)`: once a process is on its way out (after a failure, a signal or
  the end of the run), it has `seconds` to finish; a process still stuck then (in
  `jax.distributed`'s shutdown barrier, waiting in a collective for a peer that died) prints one
  line and exits with EXIT_DEADLINE. If even Python cannot run any more, SIGALRM ends it a little
  later (exit status 128+14).
- `watch_parent()`: a process started by `launch.local` (which sets TRAINER_LAUNCHER_PID) notices
  its launcher dying, even by SIGKILL. The launcher also asks the kernel for a SIGTERM then
  (`die_with_parent`, PR_SET_PDEATHSIG), which makes the trainers save a checkpoint at an agreed
  step as after any preemption notice; the watch gives them TRAINER_LAUNCHER_GRACE seconds for that
  (the launcher's --grace) before the exit deadline ends them. No orphan outlives its launcher.
- `announce_failure` / `watch_peers`: a process that fails writes `trainer/failed/ID` into
  jax.distributed's key-value store; the others see it within seconds and arm their deadline.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Callable

EXIT_DEADLINE = 6  # the process did not finish shutting down within its deadline (see README)
DEFAULT_DEADLINE_S = 60.0  # TRAINER_SHUTDOWN_DEADLINE overrides
_ALARM_MARGIN_S = 10  # SIGALRM (which needs no Python) fires this much after the deadline
_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2


# ------------------------------------------------------------------------------------------
# Closed stdout / stderr


class _PipeSafe:
    """A text stream whose writes survive the reader going away (EPIPE): they are dropped."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def _drop(self) -> None:
        """Points the file descriptor at /dev/null: later writes (also from C code and from the
        buffer flushed at exit) succeed and go nowhere."""
        self.broken = True
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text: str) -> int:
        if self.broken:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            self._discard_buffer()
            return len(text)

    def flush(self) -> None:
        if self.broken:
            self._discard_buffer()
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()
            self._discard_buffer()

    def _discard_buffer(self) -> None:
        try:  # now backed by /dev/null: a flush empties the buffer
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def guard_streams() -> None:
    """Makes sys.stdout and sys.stderr drop output once their reader is gone (idempotent)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _PipeSafe):
            setattr(sys, name, _PipeSafe(stream))


# ------------------------------------------------------------------------------------------
# Exit deadline


_deadline_lock = threading.Lock()
_deadline_at: float | None = None


def deadline_seconds(default: float = DEFAULT_DEADLINE_S) -> float | None:
    """TRAINER_SHUTDOWN_DEADLINE (seconds; 0 = no deadline), else `default`."""
    value = os.environ.get("TRAINER_SHUTDOWN_DEADLINE", "").strip()
    try:
        seconds = float(value) if value else default
    except ValueError:
        return default
    return seconds if seconds > 0 else None


def arm_exit_deadline(seconds: float | None = None, why: str = "shutting down") -> None:
    """From now on the process has `seconds` (TRAINER_SHUTDOWN_DEADLINE, default 60; 0 = none) to exit.

    Past that, one line on stderr and `os._exit(EXIT_DEADLINE)`. Arming again can only make the
    deadline earlier.
    """
    global _deadline_at
    seconds = deadline_seconds() if seconds is None else max(0.0, float(seconds))
    if seconds is None:  # TRAINER_SHUTDOWN_DEADLINE=0: no deadline
        return
    at = time.monotonic() + seconds
    with _deadline_lock:
        if _deadline_at is not None and _deadline_at <= at:
            return
        _deadline_at = at
    # The last resort when no Python thread can run: SIGALRM's default action ends the process.
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(seconds) + _ALARM_MARGIN_S)
    except (ValueError, OSError):
        pass
    threading.Thread(target=_expire, args=(at, seconds, why), name="exit-deadline", daemon=True).start()


def _expire(at: float, seconds: float, why: str) -> None:
    while True:
        left = at - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(left, 1.0))
    with _deadline_lock:
        if _deadline_at is not None and _deadline_at < at:
            return  # an earlier deadline took over
    try:
        os.write(2, (f"error: still running {seconds:g}s after {why} (stuck in jax.distributed's shutdown or "
                     f"in a collective waiting for a process that is gone?); exiting with code "
                     f"{EXIT_DEADLINE}\n").encode())
    except OSError:
        pass
    os._exit(EXIT_DEADLINE)


def run_main(main: Callable[[], int]) -> None:
    """`sys.exit(main())` for a training command, with closed streams survived and an exit deadline.

    Whatever way `main` ends (a return code, an exception, a signal turned into an exception),
    the rest of the exit, `jax.distributed`'s shutdown barrier included, gets a deadline. In a
    multi-process job a process that fails says so through the coordination service, and the
    others, which may be waiting for it in a collective that never completes, arm their deadline.
    """
    guard_streams()
    watch_parent()
    done = threading.Event()
    watch_peers(done)
    outcome, failure = "the run ended", "an unknown failure"
    try:
        code = main()
        outcome, failure = f"the run ended (exit code {code})", (f"exit code {code}" if code else None)
    except SystemExit as e:
        ok = e.code in (None, 0)
        outcome, failure = f"the run ended (exit code {e.code})", (None if ok else f"exit code {e.code}")
        raise
    except BaseException as e:
        first = str(e).splitlines()[0][:300] if str(e) else ""
        failure = f"{type(e).__name__}: {first}" if first else type(e).__name__
        outcome = f"the run failed ({failure})"
        raise
    finally:
        done.set()
        arm_exit_deadline(why=outcome)
        if failure is not None:
            announce_failure(failure)
    sys.exit(code)


# ------------------------------------------------------------------------------------------
# A failed peer

_FAILED_PREFIX = "trainer/failed/"


def distributed_client(connected: bool = False) -> tuple[object | None, int]:
    """JAX's coordination-service client (None before jax.distributed starts) and our process id.

    `connected`: None until the client has joined (JAX sets `client` before it connects, and a
    request from a client that has not joined yet is a fatal error); the preemption sync manager,
    created right after the join, tells.
    """
    module = sys.modules.get("jax._src.distributed")
    state = getattr(module, "global_state", None)
    client = getattr(state, "client", None)
    if connected and getattr(state, "preemption_sync_manager", None) is None:
        client = None
    return client, int(getattr(state, "process_id", 0) or 0)


def announce_failure(what: str, timeout_s: float = 5.0) -> None:
    """Tells the other processes of a multi-process job that this one failed (at most `timeout_s`)."""
    client, me = distributed_client(connected=True)
    if client is None:
        return

    def put() -> None:
        try:
            client.key_value_set(f"{_FAILED_PREFIX}{me}", what[:1000], allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already
            pass

    t = threading.Thread(target=put, name="announce-failure", daemon=True)
    t.start()
    t.join(timeout_s)


def watch_peers(done: threading.Event, poll_s: float = 2.0) -> None:
    """Until `done`: once jax.distributed has joined, polls the coordination service for a failed peer.

    On one, prints a line and arms the exit deadline: this process may be waiting for that peer in
    a collective that never completes (a GPU collective does not notice a dead peer).
    """

    def run() -> None:
        while not done.wait(poll_s):
            client, me = distributed_client(connected=True)
            if client is None:
                continue
            try:
                entries = client.key_value_dir_get(_FAILED_PREFIX)
            except Exception:  # noqa: BLE001 - coordinator gone or shutting down: stop watching
                return
            others = sorted((k, v) for k, v in entries if not k.endswith(f"/{me}"))
            if others:
                key, what = others[0]
                seconds = deadline_seconds()
                within = f"within {seconds:g}s" if seconds is not None else "when it can"
                try:
                    os.write(2, (f"process {key.rsplit('/', 1)[-1]} failed ({what}): stopping; this process "
                                 f"exits {within}\n").encode())
                except OSError:
                    pass
                arm_exit_deadline(seconds, why=f"process {key.rsplit('/', 1)[-1]} failed")
                return

    threading.Thread(target=run, name="peer-watch", daemon=True).start()


# ------------------------------------------------------------------------------------------
# Parent death


def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets `sig` when the calling thread dies.

    Linux only (a no-op elsewhere). The libc function is looked up here, in the parent, so the
    child does nothing between fork and exec but one system call.
    """
    prctl = _libc_prctl() if sys.platform.startswith("linux") else None
    parent = os.getpid()

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the request took effect
                os.kill(os.getpid(), int(sig))

    return preexec


def _pdeathsig_set() -> bool:
    prctl = _libc_prctl()
    if prctl is None:
        return False
    value = ctypes.c_int(0)
    try:
        return prctl(_PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0) == 0 and value.value != 0
    except (OSError, ctypes.ArgumentError):
        return False


def watch_parent(poll_s: float = 0.5) -> bool:
    """When TRAINER_LAUNCHER_PID names our parent: on its death, SIGTERM ourselves (unless the kernel
    does, PR_SET_PDEATHSIG) and arm the exit deadline of TRAINER_LAUNCHER_GRACE seconds (default 10).

    Returns whether a watch was started.
    """
    try:
        launcher = int(os.environ.get("TRAINER_LAUNCHER_PID", ""))
    except ValueError:
        return False
    try:
        grace = max(0.0, float(os.environ.get("TRAINER_LAUNCHER_GRACE", "10")))
    except ValueError:
        grace = 10.0
    if os.getppid() != launcher:  # inherited by something the launcher did not start itself
        return False
    kernel_signals = _pdeathsig_set()

    def run() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        try:
            os.write(2, (f"launcher (pid {launcher}) is gone: saving at the next step and exiting "
                         f"(at most {grace:g}s)\n").encode())
        except OSError:
            pass
        arm_exit_deadline(grace, why=f"the launcher (pid {launcher}) died")
        if not kernel_signals:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=run, name="parent-watch", daemon=True).start()
    return True
