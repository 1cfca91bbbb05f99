"""What the training commands set before JAX loads (trainer/startup.py): the platform, malloc tunables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from trainer.startup import OPT_OUT, TUNABLES, _is_glibc, runs_on_cpu, tunables_with_ours

OURS = ":".join(f"{k}={v}" for k, v in TUNABLES.items())

# Calls the re-exec the way the CLI modules do, then prints what the (re-executed) process sees.
PROBE = ("import os, sys; from trainer.startup import before_jax; before_jax(); "
         "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), os.environ.get('JAX_PLATFORMS'), sys.argv[1:])")


def test_ours_are_added_to_what_the_user_set_and_a_users_own_value_wins():
    assert tunables_with_ours("") == OURS
    assert tunables_with_ours("glibc.malloc.hugetlb=1") == f"glibc.malloc.hugetlb=1:{OURS}"
    mine = "glibc.malloc.arena_max=4:glibc.malloc.mmap_max=65536"
    assert tunables_with_ours(mine) == f"{mine}:glibc.malloc.trim_threshold={TUNABLES['glibc.malloc.trim_threshold']}"
    assert tunables_with_ours(OURS) is None
    assert tunables_with_ours("glibc.malloc.arena_maxx=1").endswith(f":{OURS}")  # a prefix is not the same name


def test_only_where_xla_cpu_runs_the_model():
    assert runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert runs_on_cpu({"JAX_PLATFORMS": "cpu,cuda"})
    assert not runs_on_cpu({"JAX_PLATFORMS": "cuda"})
    assert not runs_on_cpu({"JAX_PLATFORMS": "tpu,cpu"})


def _probe(env_update: dict[str, str]) -> tuple[int, int, str, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT, "JAX_PLATFORMS")}
    env.update(env_update)
    proc = subprocess.Popen([sys.executable, "-c", PROBE, "a b", "--flag"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    pid, seen, platforms, args = out.strip().split(" ", 3)
    return proc.pid, int(pid), seen, platforms, args


@pytest.mark.skipif(not (sys.platform == "linux" and _is_glibc()), reason="needs glibc")
def test_the_process_restarts_once_in_place_with_the_tunables_and_its_arguments():
    spawned, pid, seen, _, args = _probe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "JAX_PLATFORMS": "cpu"})
    assert pid == spawned  # exec, not a child: launchers and signals see the same process
    assert seen == f"glibc.malloc.hugetlb=1:{OURS}" and args == "['a b', '--flag']"
    # Turned off, and left alone where an accelerator computes.
    assert _probe({OPT_OUT: "default", "JAX_PLATFORMS": "cpu"})[2] == "None"
    assert _probe({"JAX_PLATFORMS": "cuda"})[2:4] == ("None", "cuda")


@pytest.mark.skipif(not runs_on_cpu({}), reason="this machine has an accelerator device node")
def test_without_an_accelerator_jax_is_kept_on_the_cpu_unless_the_user_chose():
    assert _probe({})[3] == "cpu"  # JAX_PLATFORMS unset: no libtpu load, no TPU profiler plugin
    assert _probe({"JAX_PLATFORMS": ""})[3] == ""  # set, even empty: the user's
