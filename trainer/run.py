"""The run, assembled once: devices, mesh, rules, sized model, shardings and data.

Every command starts with `Run.from_config(cfg)` (as MaxText's `setup_train_loop`): train and
bench build the train state from it (`state_spec`), decode and export only the parameters
(`params_spec`). Each step turns a user mistake into a ConfigError naming the key, before
anything compiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import linen
from jax.sharding import Mesh, NamedSharding

from model import ModelConfig
from sharding.mesh import MeshError, make_mesh
from sharding.pytrees import batch_sharding
from sharding.rules import Rules, RulesError, as_flax_rules, axes_size, load_rules
from trainer import distributed
from trainer.config import Config, ConfigError
from trainer.data import Pipeline, Tokenizer, build_pipeline, check_sources, load_tokenizer
from trainer.flops import model_flops_per_step, peak_flops_per_device
from trainer.train_state import ParamsSpec, StateSpec, make_params_spec, make_state_spec


@dataclasses.dataclass(frozen=True)
class Run:
    """A config placed on this job's devices. Immutable: steps that learn more return a new Run."""

    cfg: Config  # model.vocab_size resolved once the data or the tokenizer is known
    mesh: Mesh
    rules: Rules
    sources: Any = None  # the train data's sources (tokenizer, indexes), reused by the eval pipelines

    @classmethod
    def from_config(cls, cfg: Config, devices: Sequence[Any] | None = None) -> Run:
        """Devices (simulated CPU devices, jax.distributed), then the mesh and the rules table.

        `devices` restricts the mesh to some of the devices (tests compare meshes in one process).
        """
        init_devices(cfg)
        try:
            mesh = make_mesh(dataclasses.asdict(cfg.mesh), devices)
            rules = load_rules(cfg.rules)
        except (MeshError, RulesError) as e:
            raise ConfigError(str(e)) from None
        platform = mesh.devices.flat[0].platform
        if cfg.model.attention_impl == "cudnn" and platform != "gpu":
            raise ConfigError(f"config key `model.attention_impl` is 'cudnn', which needs NVIDIA GPUs; this run's "
                              f"devices are {platform}: use model.attention_impl=xla")
        return cls(cfg, mesh, rules)

    # -- sizes and shardings ----------------------------------------------------------------------

    @property
    def batch_ways(self) -> int:
        """How many ways the batch is split (the mesh axes the `batch` rule maps to)."""
        return axes_size("batch", self.rules, self.mesh)

    @functools.cached_property
    def model_cfg(self) -> ModelConfig:
        """The model config with the vocabulary padded so it splits over the axes `vocab` maps to."""
        if self.cfg.model.vocab_size is None:
            raise ConfigError("config key `model.vocab_size` is unset and no tokenizer gave it")
        multiple = math.lcm(self.cfg.model.vocab_multiple, axes_size("vocab", self.rules, self.mesh))
        return dataclasses.replace(self.cfg.model, vocab_multiple=multiple)

    @functools.cached_property
    def batch_sharding(self) -> NamedSharding:
        """Resolved once per Run: `to_global` uses it for every array of every step."""
        return batch_sharding(self.mesh, self.rules)

    def to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a train.batch_size batch -> global arrays sharded like a batch."""
        rows = self.cfg.train.batch_size
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (rows,) + v.shape[1:])
                for k, v in local.items()}

    def context(self) -> contextlib.ExitStack:
        """`with` this while tracing: the mesh plus the rules the model's activation names use."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(linen.logical_axis_rules(as_flax_rules(self.rules)))
        return stack

    def state_spec(self, tx: optax.GradientTransformation) -> StateSpec:
        """Shapes and shardings of the train state (parameters, optimizer, step, key); call in `context()`."""
        try:
            return make_state_spec(self.model_cfg, tx, self.mesh, self.rules, self.cfg.seed)
        except RulesError as e:
            raise ConfigError(str(e)) from None

    def params_spec(self) -> ParamsSpec:
        """Shapes and shardings of the parameters alone (decode, export); call in `context()`."""
        try:
            return make_params_spec(self.model_cfg, self.mesh, self.rules)
        except RulesError as e:
            raise ConfigError(str(e)) from None

    def flops(self) -> tuple[float, float, str]:
        """(model FLOPs per train step, peak FLOP/s of the mesh, where the peak comes from).

        Simulated CPU devices share the host's cores, so on CPU the peak is per process.
        """
        cfg = self.cfg
        flops = model_flops_per_step(self.model_cfg, cfg.train.batch_size, cfg.data.inputs_length,
                                     cfg.data.targets_length)
        peak, source = peak_flops_per_device(self.model_cfg.dtype)
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        return flops, peak * (jax.process_count() if on_cpu else self.mesh.devices.size), source

    # -- data ---------------------------------------------------------------------------------------

    def check_train_batch(self) -> None:
        """train.batch_size must split over the processes and (per microbatch) the data-parallel axes."""
        b, accum = self.cfg.train.batch_size, self.cfg.train.grad_accum_steps
        if b % jax.process_count():
            raise ConfigError(f"train.batch_size ({b}) must be divisible by the number of processes "
                              f"({jax.process_count()})")
        if (b // accum) % self.batch_ways:
            raise ConfigError(f"train.batch_size ({b}) / train.grad_accum_steps ({accum}) must be divisible by the "
                              f"data-parallel size {self.batch_ways} (mesh.data * mesh.fsdp under the `batch` rule)")

    def open_train_data(self) -> tuple[Run, Pipeline]:
        """The train pipeline (sources checked first), and this run with the vocabulary resolved from it."""
        try:
            check_sources(self.cfg.data)
            data = build_pipeline(self.cfg.data, split="train", **self._pipeline_args())
        except (ValueError, FileNotFoundError) as e:  # e.g. a vocabulary the corpus cannot support
            raise ConfigError(str(e)) from None
        cfg = resolve_vocab_size(self.cfg, data.vocab_size if data.tokenizer is not None else None)
        return dataclasses.replace(self, cfg=cfg, sources=data.source_set), data

    def pipeline(self, split: str) -> Pipeline:
        """A fresh pipeline of `split` sharing the train data's tokenizer and indexes."""
        return build_pipeline(self.cfg.data, split=split, sources=self.sources, **self._pipeline_args())

    def with_run_tokenizer(self) -> tuple[Run, Tokenizer | None]:
        """For commands on a finished run: its (cached) tokenizer, and the vocabulary resolved from it."""
        try:
            tokenizer = load_tokenizer(self.cfg.data, self.cfg.workdir)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"cannot load the run's tokenizer: {e}") from None
        cfg = resolve_vocab_size(self.cfg, tokenizer.vocab_size if tokenizer is not None else None)
        return dataclasses.replace(self, cfg=cfg), tokenizer

    def _pipeline_args(self) -> dict[str, Any]:
        return dict(global_batch_size=self.cfg.train.batch_size, seed=self.cfg.seed,
                    process_index=jax.process_index(), process_count=jax.process_count(),
                    vocab_size=self.cfg.model.vocab_size)


def init_devices(cfg: Config) -> None:
    """Platform choice, simulated CPU devices and jax.distributed: before any JAX device use."""
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
