"""Does the train state fit? Checked from the abstract state, before anything is allocated.

A model too large for its devices otherwise fails late and badly: an allocation error deep in
XLA, or (on CPU) a process that waits forever for an array that is never produced. Here the
bytes one device must hold for the parameters, the optimizer state and one gradient of every
parameter (a lower bound: activations come on top) are summed from the state's shapes, dtypes and
shardings and compared with what the device has:

- GPU / TPU: `device.memory_stats()["bytes_limit"]` (what the allocator may use);
- CPU: the host's available memory (MemAvailable, and the cgroup limit when lower) shared by the
  processes on this host and the devices of each process.

All processes agree on the outcome (one small all-gather), so a model too large for one host
stops every process with the same config error.
"""

from __future__ import annotations

import math
import os
import socket
import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from trainer.config import ConfigError

FIX_KEYS = ("a smaller model (model.d_model, model.mlp_dim, model.num_heads, model.encoder_layers, "
            "model.decoder_layers, model.vocab_size), more devices to shard the state over (mesh.fsdp) or "
            "smaller parameters (model.param_dtype=bfloat16)")


def _shard_shape(shape: tuple[int, ...], sharding: Any) -> tuple[int, ...]:
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if spec is None or mesh is None:
        try:
            return tuple(sharding.shard_shape(shape))
        except Exception:  # noqa: BLE001 - unknown sharding: count the whole array
            return tuple(shape)
    out = list(shape)
    for i, axes in enumerate(tuple(spec)[:len(shape)]):
        if axes is None:
            continue
        ways = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        out[i] = -(-shape[i] // ways)
    return tuple(out)


def _nbytes(abstract: Any, shardings: Any) -> int:

    leaves, shards = jax.tree.leaves(abstract), jax.tree.leaves(shardings)
    if len(leaves) != len(shards):
        raise ValueError("state and shardings do not match")
    total = 0
    for a, s in zip(leaves, shards):
        try:
            itemsize = np.dtype(a.dtype).itemsize
        except TypeError:
            itemsize = 4
        total += math.prod(_shard_shape(tuple(a.shape), s)) * itemsize
    return total


def state_bytes_per_device(spec: Any) -> dict[str, int]:
    """Bytes one device holds for `params`, `opt_state` and the rest of the state, and `grads`."""
    parts = {key: _nbytes(spec.abstract[key], spec.shardings[key]) for key in spec.abstract}
    parts["grads"] = parts.get("params", 0)  # one gradient per parameter, sharded like it
    return parts


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """What the cgroup (v2, else v1) still lets this process allocate; None when unlimited."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_path, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def host_available_bytes() -> int | None:
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(values) if values else None


def _processes_on_this_host() -> int:

    if jax.process_count() == 1:
        return 1
    me = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
    hosts = np.asarray(multihost_utils.process_allgather(np.array([me], np.int64))).reshape(-1)
    return int((hosts == me).sum())


def device_available(devices: list[Any]) -> tuple[int | None, str]:
    """Bytes each of this process's `devices` may use for the state, and where that figure comes from."""
    if not devices:
        return None, "no local devices"
    if devices[0].platform == "cpu":
        host = host_available_bytes()
        procs = _processes_on_this_host()
        if host is None:
            return None, "host memory unknown"
        share = host // (procs * len(devices))
        return share, (f"cpu: {host:,} bytes available on host {socket.gethostname()} shared by {procs} "
                       f"process(es) x {len(devices)} device(s)")
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - a backend without memory statistics
            stats = {}
        if "bytes_limit" in stats:
            limits.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    if not limits:
        return None, f"{devices[0].platform}: memory statistics unavailable"
    return min(limits), f"{devices[0].platform} {devices[0].device_kind}: memory_stats bytes_limit"


def check_state_fits(spec: Any, mesh: Any, *, available: tuple[int | None, str] | None = None) -> dict[str, int]:
    """Raises ConfigError (on every process) when the state cannot fit on the devices; returns the byte counts.

    `available` (bytes per device, source) replaces the measurement (tests).
    """

    parts = state_bytes_per_device(spec)
    needed = sum(parts.values())
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if available is None:
        off = os.environ.get("TRAINER_MEMORY_CHECK", "").strip().lower() in ("0", "off", "false")
        available = (None, "check off") if off else device_available(local)
    have, source = available
    message = None
    if have is not None and needed > have:
        message = (f"the train state needs {needed:,} bytes per device (parameters {parts['params']:,} + "
                   f"optimizer state {parts.get('opt_state', 0):,} + gradients {parts['grads']:,}; activations "
                   f"come on top) but only {have:,} bytes are available per device ({source}) on "
                   f"{mesh.devices.size} device(s) with mesh {dict(mesh.shape)}; choose {FIX_KEYS}")
    if jax.process_count() > 1:
        from trainer.workdir import first_error

        message = first_error(message)
    if message is not None:
        raise ConfigError(message)
    return parts
