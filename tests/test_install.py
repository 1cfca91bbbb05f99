"""`pip install .` (not editable) works from any directory: the configs ship with the package."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_non_editable_install_trains_from_another_directory(tmp_path):
    # The project's own files are installed as a built wheel into a fresh folder; its dependencies
    # come from the test environment (installing JAX again would only test the package index).
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--target", str(site), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (site / "configs" / "tiny.yaml").is_file() and (site / "configs" / "rules" / "default.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(site)
    where = subprocess.run([sys.executable, "-c", "import trainer, configs; print(trainer.__file__, configs.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.count(str(site)) == 2, where.stdout + where.stderr  # the installed copy, not the checkout
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "configs/tiny.yaml", "workdir=run", "train.steps=2",
                           "train.log_every=1"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (elsewhere / "run" / "metrics.jsonl").is_file()
