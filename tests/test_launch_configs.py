"""The ready-made hardware configs load, and their meshes fit the hardware they name."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,devices,processes,expected_mesh", [
    ("tpu_v5e_32", 32, 8, {"data": 1, "fsdp": 32, "tensor": 1}),
    ("gpu_2x8", 16, 16, {"data": 2, "fsdp": 8, "tensor": 1}),
])
def test_hardware_config(name, devices, processes, expected_mesh):
    from trainer.config import load_config

    from sharding.mesh import resolve_mesh_shape

    cfg = load_config([str(ROOT / "configs" / "hardware" / f"{name}.yaml")])
    # The mesh fills exactly the hardware's devices (a -1 axis takes the rest) and no other count.
    shape = resolve_mesh_shape({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}, devices)
    assert shape["data"] * shape["fsdp"] * shape["tensor"] == devices, shape
    assert shape == expected_mesh, shape
    assert cfg.train.batch_size % devices == 0  # every device gets whole sequences
    assert cfg.train.batch_size % processes == 0  # every process loads whole rows
    assert cfg.distributed.enabled == "auto"
    assert cfg.model.dtype == "bfloat16"
