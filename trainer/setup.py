"""Start-up shared by the commands (train, decode, export, bench): devices, mesh, rules, sizes.

Each step turns a user mistake into a ConfigError naming the key, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from model import ModelConfig
from trainer.config import Config, ConfigError


def init_devices(cfg: Config) -> None:
    """Platform choice, simulated CPU devices and jax.distributed: before any JAX device use."""
    import jax

    from trainer import distributed

    if cfg.runtime.platform:
        jax.config.update("jax_platforms", cfg.runtime.platform)
    distributed.initialize(cfg.distributed, cpu_devices=cfg.runtime.cpu_devices)


def mesh_and_rules(cfg: Config, devices: Sequence[Any] | None = None) -> tuple[Any, Any]:
    """The `(data, fsdp, tensor)` mesh and the checked rules table."""
    from sharding.mesh import MeshError, make_mesh
    from sharding.rules import RulesError, load_rules

    try:
        return make_mesh(dataclasses.asdict(cfg.mesh), devices), load_rules(cfg.rules)
    except (MeshError, RulesError) as e:
        raise ConfigError(str(e)) from None


def sized_model_config(cfg: Config, mesh: Any, rules: Any) -> ModelConfig:
    """The model config with the vocabulary padded so it splits over the axes `vocab` maps to."""
    from sharding.rules import axes_size

    multiple = math.lcm(cfg.model.vocab_multiple, axes_size("vocab", rules, mesh))
    return dataclasses.replace(cfg.model, vocab_multiple=multiple)


def logical_context(mesh: Any, rules: Any):
    """`with` this while tracing: the mesh plus the rules the model's activation names use."""
    import contextlib

    import jax
    from flax import linen as nn

    from sharding.rules import as_flax_rules

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(as_flax_rules(rules)))
    return stack
