"""glibc's huge-page tunable for the training commands (trainer/hugepages.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from trainer.hugepages import TUNABLE, _glibc_has_tunable, _thp_available, tunables_with_hugepages

# Calls the re-exec the way the CLI modules do, then prints what the (re-executed) process sees.
PROBE = ("import os, sys; from trainer.hugepages import reexec_with_hugepages; reexec_with_hugepages(); "
         "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")


def test_the_tunable_is_added_to_what_the_user_set_and_a_users_own_setting_is_kept():
    assert tunables_with_hugepages("") == f"{TUNABLE}=1"
    assert tunables_with_hugepages("glibc.malloc.arena_max=2") == f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    assert tunables_with_hugepages(f"{TUNABLE}=0") is None
    assert tunables_with_hugepages(f"glibc.malloc.arena_max=2:{TUNABLE}=2") is None
    assert tunables_with_hugepages(f"{TUNABLE}x=1") == f"{TUNABLE}x=1:{TUNABLE}=1"


def _probe(tunables: str | None) -> tuple[int, int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.Popen([sys.executable, "-c", PROBE, "a b", "--flag"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    pid, seen, args = out.strip().split(" ", 2)
    return proc.pid, int(pid), seen, args


@pytest.mark.skipif(not (sys.platform == "linux" and _glibc_has_tunable() and _thp_available()),
                    reason="needs glibc >= 2.35 and transparent huge pages")
def test_the_process_restarts_once_in_place_with_the_tunable_and_its_arguments():
    spawned, pid, seen, args = _probe("glibc.malloc.arena_max=4")
    assert pid == spawned  # exec, not a child: launchers and signals see the same process
    assert seen == f"glibc.malloc.arena_max=4:{TUNABLE}=1" and args == "['a b', '--flag']"
    _, _, seen, _ = _probe(f"{TUNABLE}=0")
    assert seen == f"{TUNABLE}=0"
