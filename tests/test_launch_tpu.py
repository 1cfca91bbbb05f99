"""launch/tpu_pod.sh --dry-run prints the gcloud commands it would run."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "tpu_pod.sh"


def dry_run(*args):
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return [l for l in r.stdout.splitlines() if l.startswith("gcloud ")]


def test_full_cycle_single_slice():
    cmds = dry_run("--name", "my-v5e", "--zone", "us-west4-a", "--project", "proj",
                   "--accelerator-type", "v5litepod-32", "--create", "--delete", "up", "--",
                   "configs/hardware/tpu_v5e_32.yaml", "workdir=gs://my-bucket/run1")
    zone = "--zone=us-west4-a --project=proj"
    assert cmds[0] == (f"gcloud compute tpus tpu-vm create my-v5e {zone} --accelerator-type=v5litepod-32 "
                       "--version=v2-alpha-tpuv5-lite --scopes=https://www.googleapis.com/auth/cloud-platform")
    ssh = f"gcloud compute tpus tpu-vm ssh my-v5e {zone} --worker=all"
    assert cmds[1].startswith(ssh) and "pkill" in cmds[1]  # stale processes first
    assert cmds[2].startswith("gcloud compute tpus tpu-vm scp ") and "my-v5e:" in cmds[2] and "--worker=all" in cmds[2]
    assert any(c.startswith(ssh) and "pip install -q -e " in c and ".[gcs]" in c for c in cmds)
    train = [c for c in cmds if "-m trainer.train" in c]
    assert len(train) == 1 and train[0].startswith(ssh)
    assert "trainer.train configs/hardware/tpu_v5e_32.yaml workdir=gs://my-bucket/run1" in train[0]
    logs = [c for c in cmds if c.startswith("gcloud compute tpus tpu-vm scp my-v5e:seq2seq-logs/train.log")]
    assert len(logs) == 8 and logs[-1].endswith("--worker=7")  # v5e-32 = 8 hosts
    assert cmds[-1] == f"gcloud compute tpus tpu-vm delete my-v5e {zone} --quiet"
    # Order: create, stop, copy, install, train, logs, delete.
    assert cmds.index(train[0]) < cmds.index(logs[0])


def test_single_actions_and_no_create_by_default():
    cmds = dry_run("--name", "pod", "--zone", "europe-west4-b", "--accelerator-type", "v4-32")
    assert not any(" create " in c or " delete " in c for c in cmds)
    assert sum(c.startswith("gcloud compute tpus tpu-vm scp pod:") for c in cmds) == 4  # v4-32 = 4 hosts
    assert dry_run("--name", "pod", "--zone", "z", "delete") == ["gcloud compute tpus tpu-vm delete pod --zone=z --quiet"]


def test_multislice_uses_queued_resources():
    cmds = dry_run("--name", "ms", "--zone", "us-east5-b", "--slices", "2", "--spot", "create", "train", "--",
                   "train.steps=10")
    assert cmds[0] == ("gcloud compute tpus queued-resources create ms --zone=us-east5-b "
                       "--accelerator-type=v5litepod-32 --runtime-version=v2-alpha-tpuv5-lite "
                       "--node-count=2 --node-prefix=ms --spot --scopes=https://www.googleapis.com/auth/cloud-platform")
    assert [c.split()[5] for c in cmds[1:]] == ["ms-0", "ms-1"]
    assert all("--worker=all" in c and "trainer.train train.steps=10" in c for c in cmds[1:])


def test_bad_arguments():
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--zone", "z"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--name is required" in r.stderr
