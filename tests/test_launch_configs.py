"""The ready-made hardware configs load, and their meshes fit the hardware they name."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,devices,processes", [("tpu_v5e_32", 32, 8), ("gpu_2x8", 16, 16)])
def test_hardware_config(name, devices, processes):
    from trainer.config import load_config

    cfg = load_config([str(ROOT / "configs" / "hardware" / f"{name}.yaml")])
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    known = 1
    for s in sizes:
        known *= s if s != -1 else 1
    assert devices % known == 0
    assert cfg.train.batch_size % devices == 0  # every device gets whole sequences
    assert cfg.train.batch_size % processes == 0  # every process loads whole rows
    assert cfg.distributed.enabled == "auto"
    assert cfg.model.dtype == "bfloat16"
