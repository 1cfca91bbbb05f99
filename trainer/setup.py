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

    platform = cfg.runtime.platform
    if platform:
        jax.config.update("jax_platforms", platform)
    try:
        distributed.initialize(cfg.distributed, cpu_devices=cfg.runtime.cpu_devices)
        if platform:
            jax.devices()  # a platform this machine lacks fails here, not at the first compile
    except ValueError as e:  # settings (config or environment) that cannot work
        raise ConfigError(str(e)) from None
    except RuntimeError as e:
        text = str(e)
        if platform and ("backend" in text.lower() or "platform" in text.lower()):
            raise ConfigError(f"config key `runtime.platform` is {platform!r}, which JAX cannot use on this machine "
                              f"({text.splitlines()[0] if text else type(e).__name__})") from None
        raise


def resolve_vocab_size(cfg: Config, tokenizer_vocab_size: int | None) -> Config:
    """`cfg` with model.vocab_size filled in from the tokenizer (when unset), or the mismatch error.

    `tokenizer_vocab_size` is None for data without a tokenizer (synthetic ids), where
    model.vocab_size must be given (the config validation asks for it).
    """
    given = cfg.model.vocab_size
    if tokenizer_vocab_size is None:
        if given is None:
            raise ConfigError("config key `model.vocab_size` must be set: data.source=synthetic has no tokenizer "
                              "to take the vocabulary size from")
        return cfg
    if given is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=int(tokenizer_vocab_size)))
    if given != tokenizer_vocab_size:
        raise ConfigError(f"config key `model.vocab_size` is {given} but the tokenizer (data.tokenizer="
                          f"{cfg.data.tokenizer}) has {tokenizer_vocab_size} ids; remove model.vocab_size (it "
                          f"defaults to the tokenizer's size) or set model.vocab_size={tokenizer_vocab_size}")
    return cfg


def check_workdir(workdir: str) -> None:
    """A workdir that cannot hold a run (a file, or not writable) is a ConfigError; nothing is created."""
    import os

    if not str(workdir).strip():
        raise ConfigError("config key `workdir` must not be empty")
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.lexists(probe):  # the first existing ancestor is where the run's folders get created
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    what = "workdir" if probe == path else f"workdir's parent {probe}"
    if not os.path.isdir(probe):
        raise ConfigError(f"config key `workdir` is {workdir!r}, but {what} is "
                          f"{'a file' if os.path.exists(probe) else 'not a directory'}, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"config key `workdir` is {workdir!r}, but {what} is not writable")


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
