"""The train state, created directly on its shards.

The state is a plain dict pytree (`step`, `params`, `opt_state`, `rng`) so that jit, Orbax and
the tests can all handle it without NNX-specific code; the model's graph definition is kept
beside it and merged with the parameters inside the jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from model import ModelConfig, Transformer
from sharding.rules import Rules
from sharding.state import tree_shardings

TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """What is needed to (re)build and run a train state on a mesh."""

    graphdef: Any  # the model's NNX graph definition (static)
    abstract: TrainState  # ShapeDtypeStructs of the state
    shardings: TrainState  # NamedShardings of the state
    init_fn: Callable[[], TrainState]

    @property
    def param_shardings(self) -> Any:
        return self.shardings["params"]


def make_state_spec(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules,
                    seed: int) -> StateSpec:
    """Traces model + optimizer creation abstractly and resolves every leaf's sharding.

    Nothing is allocated here; bad rules or sizes that do not split over the mesh fail now,
    naming the parameter, before any compile.
    """

    def init_fn() -> TrainState:
        model = Transformer(model_cfg, rngs=nnx.Rngs(params=seed))
        params = nnx.state(model, nnx.Param)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            # The base key of all per-step randomness (dropout); saved with checkpoints.
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
        }

    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))
        graphdef, _ = nnx.split(abstract_model, nnx.Param)
        abstract = jax.eval_shape(init_fn)
    shardings = tree_shardings(abstract, mesh, rules)
    return StateSpec(graphdef=graphdef, abstract=abstract, shardings=shardings, init_fn=init_fn)


def create_state(spec: StateSpec) -> TrainState:
    """Materialises parameters and Adam moments directly on their shards (no host copy)."""
    with nnx.use_eager_sharding(False):
        return jax.jit(spec.init_fn, out_shardings=spec.shardings)()


def abstract_with_shardings(spec: StateSpec) -> TrainState:
    """ShapeDtypeStructs carrying concrete shardings: the target Orbax restores into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        spec.abstract, spec.shardings)


def count_params(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
