"""The device mesh `(data, fsdp, tensor)`, built from the config's sizes."""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """The requested mesh does not fit the devices; the message names the mesh keys."""


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fills a single -1 with the remaining devices and checks the product.

    `sizes` maps each of MESH_AXES to a size (or -1). Errors name the `mesh.*` keys.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axis key(s) {sorted('mesh.' + k for k in unknown)}; valid: mesh.data, mesh.fsdp, mesh.tensor")
    sizes = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise MeshError(f"only one mesh size may be -1, got {', '.join('mesh.' + n for n in fill)}")
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise MeshError(f"mesh.{name} must be >= 1 or -1, got {size}")
    known = math.prod(size for size in sizes.values() if size != -1)
    described = ", ".join(f"mesh.{n}={s}" for n, s in sizes.items())
    if fill:
        if num_devices % known:
            raise MeshError(f"cannot fill mesh.{fill[0]}: {num_devices} devices are not divisible by the product "
                            f"of the other sizes ({described})")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise MeshError(f"mesh {described} has {known} devices but {num_devices} are available: "
                        f"make mesh.data * mesh.fsdp * mesh.tensor = {num_devices} (or set one of them to -1)")
    return sizes


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh with `data` outermost, so data-parallel groups span hosts.

    Axes are `Auto` (not JAX's new `Explicit` default): the model is written for sharding by
    constraints, and explicit axes reject the embedding gather.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(sizes, len(devices))
    dims = tuple(shape[name] for name in MESH_AXES)
    return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
