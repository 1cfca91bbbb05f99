"""Logical axis names and the helpers that attach them.

The model only names logical axes; the trainer maps them to mesh axes with its rules table.
Parameter and activation axes have distinct names so a rule like `embed -> fsdp` (ZeRO-3
parameter sharding) never shards activations' embed dim over the axis that already splits the
batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen, nnx

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV = "kv"
MLP = "mlp"
LENGTH = "length"
LAYERS = "layers"  # stacked-layer axis under scan_layers (prepended by nnx.vmap)
PARAM_AXES = (VOCAB, EMBED, HEADS, KV, MLP, LENGTH, LAYERS)

# Activation axes.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV = "activation_kv"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
ACTIVATION_AXES = (ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV, ACT_MLP, ACT_VOCAB)

ALL_AXES = PARAM_AXES + ACTIVATION_AXES

# Common activation layouts.
BLE = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)
BLHK = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, ACT_KV)
BLM = (ACT_BATCH, ACT_LENGTH, ACT_MLP)
BLV = (ACT_BATCH, ACT_LENGTH, ACT_VOCAB)


class MissingRulesError(RuntimeError):
    """A mesh is set but no logical-axis rules: every activation constraint would silently vanish."""


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names.

    Resolved through the rules context the trainer sets (`Run.context()`: the mesh plus
    `flax.linen.logical_axis_rules`). With neither (the model run unsharded) it does nothing;
    a mesh without rules is an error, never a silent no-op.
    """
    if not linen.get_logical_axis_rules():
        if not jax.sharding.get_abstract_mesh().empty:
            raise MissingRulesError(
                f"activation {tuple(names)} is traced under a mesh but without logical-axis rules; trace "
                "the model inside the run's context (trainer.run.Run.context())")
        return x
    return linen.with_logical_constraint(x, tuple(names))


Initializer = Callable[..., jax.Array]


def make_param(
    rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Sequence[str], dtype: jnp.dtype
) -> nnx.Param:
    """Create a parameter tagged with its logical axis names.

    `eager_sharding=False` keeps NNX from sharding at creation: the trainer creates the state
    under jax.jit with out_shardings from its own resolver, and construction must work with no
    mesh at all.
    """
    if len(names) != len(shape):
        raise ValueError(f"parameter of shape {tuple(shape)} needs {len(shape)} axis names, got {names}")
    value = init(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)
