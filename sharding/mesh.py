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


DCN_KEYS = {"dcn_data": "data", "dcn_fsdp": "fsdp"}  # config key -> the mesh axis it splits across slices


def slice_groups(devices: Sequence[jax.Device]) -> tuple[str, int]:
    """(what a slice is, how many): TPU slices by `slice_index`; elsewhere (GPU nodes, CPU) processes."""
    if all(getattr(d, "slice_index", None) is not None for d in devices):
        return "slice", len({d.slice_index for d in devices})
    return "process", len({d.process_index for d in devices})


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the mesh with `data` outermost, so data-parallel groups span hosts.

    With `dcn_data` / `dcn_fsdp` > 1 (several TPU slices, or GPU nodes) the mesh is hybrid: those
    many ways of `data` / `fsdp` go across the slow data-center network and everything else stays
    inside one slice (JAX's `create_hybrid_device_mesh`), so only the data-parallel gradient
    reduction (and, if asked, the FSDP gather) crosses it.

    Axes are `Auto` (not JAX's new `Explicit` default): the model is written for sharding by
    constraints, and explicit axes reject the embedding gather.
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = dict(sizes)
    dcn = {axis: int(sizes.pop(key, 1) or 1) for key, axis in DCN_KEYS.items()}
    shape = resolve_mesh_shape(sizes, len(devices))
    dims = tuple(shape[name] for name in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    what, count = slice_groups(devices)
    if all(n == 1 for n in dcn.values()):
        if what == "slice" and count > 1:
            raise MeshError(f"the devices form {count} TPU slices: set mesh.dcn_data (or mesh.dcn_fsdp) so that "
                            f"mesh.dcn_data * mesh.dcn_fsdp = {count} (the ways that cross the data-center network)")
        return jax.make_mesh(dims, MESH_AXES, axis_types=axis_types, devices=devices)
    for key, axis in DCN_KEYS.items():
        if dcn[axis] < 1:
            raise MeshError(f"mesh.{key} must be >= 1, got {dcn[axis]}")
        if shape[axis] % dcn[axis]:
            raise MeshError(f"mesh.{key}={dcn[axis]} does not divide mesh.{axis}={shape[axis]}")
    crossing = math.prod(dcn.values())
    if crossing != count:
        raise MeshError(f"mesh.dcn_data * mesh.dcn_fsdp = {crossing} but the devices form {count} {what}(s): "
                        f"make them equal (one way across the network per {what})")
    from jax.experimental import mesh_utils

    dcn_shape = tuple(dcn.get(name, 1) for name in MESH_AXES)
    ici_shape = tuple(d // c for d, c in zip(dims, dcn_shape))
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, process_is_granule=what == "process")
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
