"""The same 3 steps from the same seed give the same losses on every mesh."""

import jax
import numpy as np
import pytest

from tests.conftest import read_metrics, tiny_config
from trainer.train import train

MESHES = {
    "data=8": ("mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"),
    "fsdp=8": ("mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"),
    "data=2,fsdp=2,tensor=2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
    "fsdp=4,tensor=2": ("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"),
}
COMMON = ("train.steps=3", "train.log_every=1", "train.eval_every=0", "checkpoint.save_final=false",
          # dropout on: its masks must not depend on the mesh either
          "model.dropout=0.1", "train.batch_size=16", "train.warmup_steps=1")


def _losses(workdir, *overrides, devices):
    train(tiny_config(workdir, *COMMON, *overrides), devices=devices)
    return np.array([r["loss"] for r in read_metrics(workdir)])


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_losses_match_single_device(tmp_path, scan):
    flags = (f"model.scan_layers={str(scan).lower()}",)
    reference = _losses(tmp_path / "single", "mesh.fsdp=1", *flags, devices=jax.devices()[:1])
    assert reference.shape == (3,) and np.all(np.isfinite(reference))
    assert reference[2] < reference[0]  # it trains
    # The scanned stack shares every sharding rule with the loop; two meshes cover all three axes
    # for it (each mesh costs a compile), the loop runs all four.
    meshes = {k: MESHES[k] for k in ("fsdp=8", "data=2,fsdp=2,tensor=2")} if scan else MESHES
    for name, mesh in meshes.items():
        losses = _losses(tmp_path / name, *mesh, *flags, devices=jax.devices())
        np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5, err_msg=name)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    one = _losses(tmp_path / "one", "mesh.fsdp=2", "model.dropout=0.0", devices=jax.devices()[:2])
    accum = _losses(tmp_path / "accum", "mesh.fsdp=2", "model.dropout=0.0", "train.grad_accum_steps=2",
                    devices=jax.devices()[:2])
    np.testing.assert_allclose(accum, one, rtol=0, atol=1e-5)
