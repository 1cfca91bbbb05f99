"""launch.local: N processes, prefixed output, failure handling, coordinator plumbing, timeouts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's 8 devices are for the test process only
    for k in [k for k in env if k.startswith(("TRAINER_", "SLURM_", "JAX_COORDINATOR"))]:
        env.pop(k)
    return env


def launch(*args, timeout=90):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "launch.local", *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def test_failing_process_stops_the_others_and_is_named():
    r, elapsed = launch("--processes", "3", "--module", "tests.launch_stub", "--grace", "3", "--",
                        "fail_process=1", "sleep=120", timeout=60)
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "[p1] RuntimeError: injected failure in process 1" in out
    assert "FAILED: process 1 exited with exit code 1" in out
    # The sleeping processes were stopped rather than waited for.
    assert elapsed < 30, f"took {elapsed:.1f}s\n{out}"
    assert "p0=-15" in out and "p2=-15" in out, out


def test_output_is_prefixed_and_exit_code_passed_on():
    r, _ = launch("-n", "2", "--module", "tests.launch_stub", "--grace", "3", "--",
                  "fail_process=0", "fail_delay=1", "exit_code=7", "sleep=120", timeout=60)
    assert r.returncode == 7, r.stdout + r.stderr
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert lines and all(l.startswith(("[p0] ", "[p1] ", "[launch.local] ")) for l in lines), r.stdout
    assert any(l.startswith("[p1] stub start pid=1") for l in lines)
    assert "FAILED: process 0 exited with exit code 7" in r.stdout


def test_all_succeed():
    r, _ = launch("-n", "2", "--module", "tests.launch_stub", "--", "sleep=0", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[p0] stub done pid=0" in r.stdout and "[p1] stub done pid=1" in r.stdout
    assert "all 2 processes finished successfully" in r.stdout


def test_sigint_is_forwarded():
    p = subprocess.Popen([sys.executable, "-m", "launch.local", "-n", "2", "--module", "tests.launch_stub",
                          "--grace", "5", "--", "sleep=120"], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline and sum("stub sleeping" in l for l in seen) < 2:
            seen.append(p.stdout.readline())
        assert sum("stub sleeping" in l for l in seen) == 2, "".join(seen)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    out = "".join(seen) + out
    assert p.returncode == 128 + signal.SIGINT, out
    assert "received SIGINT: forwarding" in out
    assert "[p0] KeyboardInterrupt" in out and "[p1] KeyboardInterrupt" in out, out


def test_trainer_overrides_appended_only_for_trainer_modules():
    from launch.local import child_cmd, child_env, parse_args

    args = parse_args(["-n", "2", "-k", "4", "--", "configs/tiny.yaml", "train.steps=3"])
    cmd = child_cmd(args, 1, "127.0.0.1:1234")
    assert cmd[cmd.index("-m") + 1] == "trainer.train"
    assert cmd[-7:] == ["configs/tiny.yaml", "train.steps=3", "distributed.enabled=on",
                        "distributed.coordinator=127.0.0.1:1234", "distributed.num_processes=2",
                        "distributed.process_id=1", "runtime.cpu_devices=4"]
    env = child_env(args, 1, "127.0.0.1:1234")
    assert env["TRAINER_PROCESS_ID"] == "1" and env["TRAINER_NUM_PROCESSES"] == "2"
    assert env["TRAINER_CPU_DEVICES"] == "4" and env["JAX_PLATFORMS"] == "cpu"
    assert env["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:1234"  # loopback only
    stub = parse_args(["-n", "2", "--module", "tests.launch_stub", "--", "x=1"])
    assert child_cmd(stub, 0, "127.0.0.1:1")[-1] == "x=1"


@pytest.mark.slow
def test_two_processes_psum_and_allgather():
    r, elapsed = launch("--processes", "2", "--devices-per-process", "2", "--module", "tests.launch_stub",
                        "--", "collective=1", "timeout=60", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for i in range(2):
        # On a line of process i (a C++ log line of the same process may precede it on that line:
        # glog writes without waiting for Python's newline).
        assert any(line.startswith(f"[p{i}] ") and f"stub collective process={i}/2 devices=2/4 psum=6.0 expect=6 "
                   "allgather=[0, 1]" in line for line in lines), r.stdout
        assert f"[p{i}] [distributed] process {i}/2 on " in r.stdout
    print(f"2-process local start-up + psum: {elapsed:.1f}s")


@pytest.mark.slow
def test_missing_peer_fails_clearly_within_timeout():
    # Process 1 never joins: process 0 must fail with a clear message after ~4 s, and the
    # launcher must stop process 1 and name process 0.
    r, elapsed = launch("-n", "2", "--module", "tests.launch_stub", "--grace", "3", "--",
                        "collective=1", "absent_process=1", "timeout=4", timeout=90)
    out = r.stdout
    assert r.returncode == 3, out + r.stderr
    assert "[p0] [distributed] ERROR: distributed initialisation timed out after 4s" in out, out
    assert "coordinator 127.0.0.1:" in out
    assert "FAILED: process 0 exited with exit code 3" in out
    assert elapsed < 40, f"took {elapsed:.1f}s"


@pytest.mark.slow
def test_missing_coordinator_fails_clearly_within_timeout():
    # A lone process 1 whose coordinator (process 0) never starts.
    env = _env()
    env.update(TRAINER_COORDINATOR="127.0.0.1:9", TRAINER_NUM_PROCESSES="2", TRAINER_PROCESS_ID="1",
               TRAINER_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tests.launch_stub", "collective=1", "timeout=3"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 3, r.stdout + r.stderr
    assert "timed out after 3s (coordinator 127.0.0.1:9, process 1 of 2" in r.stderr, r.stderr
    assert elapsed < 30
