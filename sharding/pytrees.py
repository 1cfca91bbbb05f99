"""Shardings for whole pytrees (parameters, optimizer state, batches) from logical names.

Parameters carry their logical axis names as NNX variable metadata (`out_sharding`); optax
keeps Adam moments as the same variable type, so the moments inherit the names and land on the
same shards as their parameters. Leaves without names (step counters, RNG keys) are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.rules import Rules, named_sharding


def _names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = variable.get_metadata()
    names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(names) if names else None


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """A pytree of NamedShardings matching `tree` (abstract or concrete)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path: tuple, leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            names = _names(leaf)
            value = leaf.get_value()
            if names is None:
                if getattr(value, "ndim", 0):
                    raise ValueError(f"parameter {jax.tree_util.keystr(path)} has no logical axis names")
                return leaf.replace(replicated)
            if len(names) != value.ndim:
                raise ValueError(f"parameter {jax.tree_util.keystr(path)}: {len(names)} logical names {names} "
                                 f"for a rank-{value.ndim} array")
            return leaf.replace(named_sharding(mesh, names, rules, shape=value.shape,
                                               what=f"parameter {jax.tree_util.keystr(path)}"))
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a `[batch, length]` input array: batch over the `batch` rule's axes."""
    return named_sharding(mesh, ("batch", None), rules, what="input batch")
