"""Logical-axis rules: from the names the model puts on arrays to mesh PartitionSpecs.

A rule is `(logical_name, mesh_axes)` where mesh_axes is None (replicated), one mesh axis or a
tuple of them. Rules are tried in order; for each dimension of an array the first rule for its
name whose mesh axes are not already used by an earlier dimension of the same array wins (so a
`[batch, embed]` activation with `batch -> (data, fsdp)` and `embed -> fsdp` keeps embed whole),
and with no such rule the dimension is replicated. This is the resolution `flax.linen`'s
`logical_to_mesh_axes` applies to activations, so parameters and activations agree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import CONFIG_DIR
from sharding.mesh import MESH_AXES

Rule = tuple[str, tuple[str, ...] | None]
Rules = tuple[Rule, ...]

PRESET_DIR = CONFIG_DIR / "rules"


class RulesError(ValueError):
    """A rules table that cannot be used: unknown mesh axis, conflicting rules, missing rule."""


def load_rules(raw: Any, mesh_axes: Sequence[str] = MESH_AXES) -> Rules:
    """Parses and checks a rules table: a list of `[name, axes]` pairs, or a preset name/path.

    A preset is a YAML file with a top-level `rules:` list, found as `configs/rules/NAME.yaml`
    or at the given path.
    """
    if isinstance(raw, str):
        raw = _read_preset(raw)
    if not isinstance(raw, (list, tuple)):
        raise RulesError(f"`rules` must be a list of [logical_name, mesh_axes] pairs or a preset name, got {raw!r}")
    rules: list[Rule] = []
    seen: dict[tuple[str, tuple[str, ...] | None], int] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
            raise RulesError(f"rules[{i}]: expected [logical_name, mesh_axes], got {item!r}")
        name, axes = item
        if axes is None:
            parsed: tuple[str, ...] | None = None
        elif isinstance(axes, str):
            parsed = (axes,)
        elif isinstance(axes, (list, tuple)) and all(isinstance(a, str) for a in axes):
            parsed = tuple(axes) or None
        else:
            raise RulesError(f"rules[{i}] ({name}): mesh axes must be null, a name or a list of names, got {axes!r}")
        for axis in parsed or ():
            if axis not in mesh_axes:
                raise RulesError(f"rules[{i}] ({name} -> {axis}): unknown mesh axis `{axis}`; "
                                 f"mesh axes are {', '.join(mesh_axes)}")
        if parsed is not None and len(set(parsed)) != len(parsed):
            raise RulesError(f"rules[{i}] ({name}): conflicting rule, mesh axis repeated in {list(parsed)}")
        key = (name, parsed)
        if key in seen:
            raise RulesError(f"rules[{i}] ({name}): conflicts with rules[{seen[key]}], the same mapping twice")
        if any(n == name and a is None for n, a in rules):
            raise RulesError(f"rules[{i}] ({name}): conflicts with an earlier rule that replicates `{name}` "
                             f"(that rule always applies, so this one never would)")
        seen[key] = i
        rules.append(key)
    return tuple(rules)


def _read_preset(name: str) -> Any:
    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise RulesError(f"rules preset `{name}` not found (looked for {path}); presets: {', '.join(presets)}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or "rules" not in data:
        raise RulesError(f"{path}: a rules preset needs a top-level `rules:` list")
    return data["rules"]


def as_flax_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
    """The same table in the form `flax.linen.logical_axis_rules` takes."""
    return tuple((name, axes if axes is None or len(axes) != 1 else axes[0]) for name, axes in rules)


def logical_to_spec(names: Sequence[str | None], rules: Rules, *, what: str = "array") -> PartitionSpec:
    """Resolves one array's logical axis names to a PartitionSpec (first rule that fits)."""
    used: set[str] = set()
    out: list[Any] = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        candidates = [axes for n, axes in rules if n == name]
        if not candidates:
            raise RulesError(f"{what}: no rule for logical axis `{name}`; add e.g. [{name}, null] to `rules`")
        chosen = None
        for axes in candidates:
            if axes is None or not used.intersection(axes):
                chosen = axes
                break
        if chosen:
            used.update(chosen)
            out.append(chosen if len(chosen) > 1 else chosen[0])
        else:
            out.append(None)
    return PartitionSpec(*out)


def mesh_size(spec_entry: Any, mesh: Mesh) -> int:
    """How many ways a PartitionSpec entry splits its dimension on `mesh`."""
    if spec_entry is None:
        return 1
    axes = (spec_entry,) if isinstance(spec_entry, str) else spec_entry
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, names: Sequence[str | None], what: str) -> None:
    """Errors (naming the array, axis and sizes) when a dimension does not split evenly."""
    for dim, entry, name in zip(shape, tuple(spec) + (None,) * len(shape), names):
        parts = mesh_size(entry, mesh)
        if dim % parts:
            raise RulesError(f"{what}: dimension `{name}` of size {dim} cannot be split {parts} ways over mesh "
                             f"axes {entry}; change the model size or the mesh/rules")


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules, *,
                   shape: Sequence[int] | None = None, what: str = "array") -> NamedSharding:
    spec = logical_to_spec(names, rules, what=what)
    if shape is not None:
        check_divisible(shape, spec, mesh, names, what)
    return NamedSharding(mesh, spec)


def axes_size(name: str, rules: Rules, mesh: Mesh) -> int:
    """How many ways the first rule for `name` splits a dimension (1 when it replicates)."""
    for n, axes in rules:
        if n == name:
            return math.prod(mesh.shape[a] for a in axes) if axes else 1
    return 1
