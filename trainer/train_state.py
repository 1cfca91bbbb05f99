"""The train state, created directly on its shards.

The state is a plain dict pytree (`step`, `params`, `opt_state`, `rng`) so that jit, Orbax and
the tests can all handle it without NNX-specific code; the model's graph definition is kept
beside it and merged with the parameters inside the jitted step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from model import ModelConfig, Transformer
from sharding.pytrees import tree_shardings
from sharding.rules import Rules

TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamsSpec:
    """The parameters alone on a mesh: what decoding and export restore (no optimizer)."""

    graphdef: Any  # the model's NNX graph definition (static)
    abstract: Any  # ShapeDtypeStructs of the parameters
    shardings: Any  # NamedShardings of the parameters

    def restore_target(self) -> Any:
        """ShapeDtypeStructs carrying concrete shardings: the target Orbax restores into."""
        return with_shardings(self.abstract, self.shardings)


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

    def restore_target(self) -> TrainState:
        return with_shardings(self.abstract, self.shardings)


def _abstract_model(model_cfg: ModelConfig, seed: int) -> tuple[Any, Any]:
    """The graph definition and the abstract parameters, nothing allocated."""
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))
        return nnx.split(abstract_model, nnx.Param)


def make_params_spec(model_cfg: ModelConfig, mesh: Mesh, rules: Rules) -> ParamsSpec:
    """The parameters' shapes and shardings (errors name the parameter), for restoring them alone."""
    graphdef, abstract = _abstract_model(model_cfg, seed=0)
    return ParamsSpec(graphdef=graphdef, abstract=abstract, shardings=tree_shardings(abstract, mesh, rules))


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

    graphdef, _ = _abstract_model(model_cfg, seed)
    with nnx.use_eager_sharding(False):
        abstract = jax.eval_shape(init_fn)
    shardings = tree_shardings(abstract, mesh, rules)
    return StateSpec(graphdef=graphdef, abstract=abstract, shardings=shardings, init_fn=init_fn)


def create_state(spec: StateSpec) -> TrainState:
    """Materialises parameters and Adam moments directly on their shards (no host copy)."""
    with nnx.use_eager_sharding(False), _unrolled_threefry_on_cpu():
        lowered = jax.jit(spec.init_fn, out_shardings=spec.shardings).lower()
    return lowered.compile()()


@contextlib.contextmanager
def _unrolled_threefry_on_cpu() -> Iterator[None]:
    """While tracing the initialiser, lower the threefry hash on CPU as on GPU and TPU: unrolled.

    On CPU JAX lowers each hash as a 5-step while loop, which keeps a train step with dropout
    small; XLA:CPU compiles every loop into kernels of its own. The initialiser hashes once per
    parameter and per key, so its compile grew with the parameter count: 7-11 s for the tiny
    test model, longer than its train step. Unrolled, it compiles in about half that and runs
    about twice as fast at the bench size; the values are bitwise the same (the same
    arithmetic). The rule is swapped only here (the train step keeps the loop: unrolled, a
    step with dropout compiles twice as slowly) and left alone if JAX's internals moved.
    """
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32

        rules = mlir._platform_specific_lowerings["cpu"]
        primitive, unrolled = threefry2x32.threefry2x32_p, threefry2x32._threefry2x32_lowering_rule
        saved = rules[primitive]
    except (ImportError, AttributeError, KeyError):
        yield
        return
    mlir.register_lowering(primitive, unrolled, platform="cpu")
    try:
        yield
    finally:
        rules[primitive] = saved


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract` carrying the concrete `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def count_params(params: Any) -> int:
    """Number of parameter values (all leaves' sizes)."""
    return sum(x.size for x in jax.tree.leaves(params))
