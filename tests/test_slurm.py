"""launch/slurm.sbatch on a real single-node Slurm cluster (Debian slurm-wlm), CPU test mode.

The cluster (tests/slurm_cluster.py) is installed if missing (apt-get, root), started in a temp
dir and stopped by pid afterwards. Where Slurm cannot be installed the tests are skipped with the
reason; with CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_slurm_installed

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "launch" / "slurm.sbatch"
# Two tasks on the one test node; the script's GPU defaults are overridden from the command line.
CPU_JOB = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]


def _job_env(**extra):
    env = {"LAUNCH_DEVICE": "cpu", "LAUNCH_CPU_DEVICES": "1", "LAUNCH_PYTHON": sys.executable,
           "LAUNCH_MODULE": "tests.launch_stub"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Slurm is required in CI but unavailable: {e}")
        pytest.skip(f"Slurm unavailable: {e}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.env.pop("XLA_FLAGS", None)  # conftest's simulated devices are for the test process only
    t0 = time.monotonic()
    with c:
        print(f"\nSlurm cluster up in {time.monotonic() - t0:.1f}s")
        yield c
    print(f"Slurm cluster stopped; {time.monotonic() - t0:.1f}s in all")


def test_two_tasks_jax_distributed_autodetect(cluster):
    t0 = time.monotonic()
    job = cluster.submit(SBATCH, ["collective=1", "timeout=60"], sbatch_args=CPU_JOB,
                         env=_job_env(LAUNCH_CPU_DEVICES="2"), cwd=ROOT)
    state, code, out = cluster.wait(job, timeout=120)
    assert (state, code) == ("COMPLETED", "0:0"), out
    for i in range(2):
        # `srun --label` prefixes the task id; process ids come from Slurm auto-detection.
        assert f"{i}: stub collective process={i}/2 devices=2/4 psum=6.0 expect=6 allgather=[0, 1]" in out, out
        assert f"{i}: [distributed] process {i}/2" in out and "(Slurm step with 2 tasks" in out
    assert "coordinator port" in out
    print(f"2-task stub job: {time.monotonic() - t0:.1f}s")


def test_failed_task_fails_the_job(cluster):
    job = cluster.submit(SBATCH, ["fail_process=1", "exit_code=7", "sleep=60"], sbatch_args=CPU_JOB,
                         env=_job_env(), cwd=ROOT)
    state, code, out = cluster.wait(job, timeout=60)
    assert state == "FAILED" and code != "0:0", (state, code, out)
    assert "task 1: Exited with exit code 7" in out, out
    assert "stub done" not in out  # the sleeping task was stopped, not waited for


def test_time_limit_signal_checkpoints_and_requeues(cluster):
    # Simulate `--signal=B:USR1@180` firing: the tasks get SIGTERM (the trainer checkpoints),
    # the script requeues the job, and the restarted job resumes.
    job = cluster.submit(SBATCH, ["sleep=120", "on_sigterm=0", "finish_on_restart=1"], sbatch_args=CPU_JOB,
                         env=_job_env(), cwd=ROOT)
    deadline = time.monotonic() + 60
    while cluster.output(job).count("stub sleeping") < 2:
        assert time.monotonic() < deadline, cluster.output(job)
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    state, code, out = cluster.wait(job, timeout=90)
    assert (state, code) == ("COMPLETED", "0:0"), out
    assert "0: stub got SIGTERM pid=0" in out and "1: stub got SIGTERM pid=1" in out, out
    assert f"requeueing job {job}" in out
    assert "0: stub resumed after requeue pid=0 restart=1" in out, out
    assert cluster.job_info(job).get("Restarts") == "1"


def _losses(workdir):
    path = Path(workdir) / "metrics.jsonl"
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]


@pytest.mark.slow
def test_trains_tiny_config_like_one_process(cluster, tmp_path):
    args = ["configs/tiny.yaml", "train.steps=4", "train.log_every=1", "checkpoint.every=2"]
    t0 = time.monotonic()
    # Reference: one process with 2 devices (same mesh as 2 tasks x 1 device), run meanwhile.
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    for k in [k for k in env if k.startswith(("SLURM_", "TRAINER_"))]:
        env.pop(k)
    ref = subprocess.Popen([sys.executable, "-m", "trainer.train", *args, f"workdir={tmp_path / 'ref'}",
                            "runtime.cpu_devices=2"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job = cluster.submit(SBATCH, [*args, f"workdir={tmp_path / 'slurm'}"], sbatch_args=CPU_JOB,
                             env=_job_env(LAUNCH_MODULE="trainer.train"), cwd=ROOT)
        state, code, out = cluster.wait(job, timeout=400)
        ref_out, _ = ref.communicate(timeout=400)
    finally:
        if ref.poll() is None:
            ref.kill()
    assert (state, code) == ("COMPLETED", "0:0"), out
    assert ref.returncode == 0, ref_out
    assert "(Slurm step with 2 tasks" in out and "1 local / 2 global cpu devices" in out, out
    slurm_losses, ref_losses = _losses(tmp_path / "slurm"), _losses(tmp_path / "ref")
    assert len(slurm_losses) == len(ref_losses) == 4
    assert slurm_losses == pytest.approx(ref_losses, abs=1e-5), (slurm_losses, ref_losses)
    ckpts = sorted(p.name for p in (tmp_path / "slurm" / "checkpoints").iterdir())
    assert any(name.isdigit() for name in ckpts), ckpts
    print(f"Slurm tiny-config job + 1-process reference: {time.monotonic() - t0:.1f}s; losses {slurm_losses}")
