"""Multi-process start-up: `jax.distributed.initialize` before any device use.

`initialize(cfg, cpu_devices=...)` is the first thing the entry points call. It

1. asks for `cpu_devices` simulated CPU devices per process (before the backends exist);
2. resolves the distributed settings: the `distributed:` config section, then environment
   variables (which win, because launchers set them per process), then JAX's own cluster
   auto-detection (Slurm, Open MPI, Cloud TPU VMs and GKE TPU pods);
3. decides whether this is a multi-process run (`enabled: auto` = when a cluster is detected)
   and, if so, calls `jax.distributed.initialize` under a watchdog, so that a peer that never
   arrives ends the process with a clear error (exit code 3) instead of a hang or a bare
   SIGABRT;
4. prints one line per process: process index/count, local and global device counts.

Environment variables (all optional; a set variable overrides the config field):

  TRAINER_DISTRIBUTED                  auto | on | off             (distributed.enabled)
  TRAINER_COORDINATOR, JAX_COORDINATOR_ADDRESS   host:port         (distributed.coordinator)
  TRAINER_NUM_PROCESSES, JAX_NUM_PROCESSES       int               (distributed.num_processes)
  TRAINER_PROCESS_ID, JAX_PROCESS_ID             int               (distributed.process_id)
  TRAINER_LOCAL_DEVICE_IDS, JAX_LOCAL_DEVICE_IDS "0,1,2" | all     (distributed.local_device_ids)
  TRAINER_INIT_TIMEOUT                 seconds                     (distributed.initialization_timeout)
  TRAINER_CPU_DEVICES                  int                         (runtime.cpu_devices)
  JAX_COORDINATOR_PORT                 port used by JAX's auto-detection (Slurm, TPU)
  JAX_COORDINATOR_BIND_ADDRESS         where process 0's coordinator listens (JAX; default [::]:port)

GPU layouts under Slurm: one process per GPU (JAX's default: device `SLURM_LOCALID`) and one
process per node with all its GPUs (`local_device_ids` from `CUDA_VISIBLE_DEVICES` /
`SLURM_STEP_GPUS` / the node's GPU count). When `local_device_ids` is not given, the ids are
derived from how many GPUs the step can see and how many tasks share the node, see
`_slurm_local_device_ids`.

The coordination service is unauthenticated: keep the coordinator port inside the cluster
network.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import socket
import sys
import threading
import time
from typing import Sequence

ENABLED_CHOICES = ("auto", "on", "off")
INIT_TIMEOUT_EXIT_CODE = 3
_WATCHDOG_MARGIN_S = 5.0  # JAX's own timeout is set this much later than ours


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """The `distributed:` config section."""

    # auto | on | off (auto: when a cluster or a coordinator is detected). YAML reads a bare
    # on/off as true/false, so booleans are accepted too.
    enabled: str | bool = "auto"
    coordinator: str | None = None  # host:port of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    # Device ids this process uses ("0,1,2", "all", or an int / list); None = derived.
    local_device_ids: str | int | list[int] | None = None
    initialization_timeout: int = 300  # seconds to wait for all processes to arrive

    def validate(self) -> None:
        if _enabled_word(self.enabled) not in ENABLED_CHOICES:
            raise ValueError(f"distributed.enabled: must be auto, on or off, got {self.enabled!r}")
        if self.coordinator is not None:
            _check_coordinator(self.coordinator, "distributed.coordinator")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"distributed.num_processes: must be >= 1, got {self.num_processes}")
        if self.process_id is not None:
            if self.process_id < 0:
                raise ValueError(f"distributed.process_id: must be >= 0, got {self.process_id}")
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise ValueError(
                    f"distributed.process_id: must be < distributed.num_processes ({self.num_processes}),"
                    f" got {self.process_id}")
        if self.local_device_ids is not None:
            try:
                parse_device_ids(self.local_device_ids)
            except ValueError as e:
                raise ValueError(f"distributed.local_device_ids: {e}") from None
        if self.initialization_timeout < 1:
            raise ValueError(
                f"distributed.initialization_timeout: must be >= 1 second, got {self.initialization_timeout}")


def _enabled_word(value: str | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).strip().lower()


def _check_coordinator(value: str, key: str) -> None:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{key}: expected host:port, got {value!r}")


def parse_device_ids(value: str | int | Sequence[int]) -> list[int] | str:
    """"0,1,2" / 3 / [0, 1] -> a list of ints; "all" stays "all" (every GPU this process sees)."""
    if isinstance(value, bool):
        raise ValueError(f"expected comma-separated device ids or 'all', got {value!r}")
    if isinstance(value, int):
        ids = [value]
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() == "all":
            return "all"
        try:
            ids = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated device ids or 'all', got {value!r}") from None
        if not ids:
            raise ValueError(f"expected comma-separated device ids or 'all', got {value!r}")
    else:
        ids = [int(x) for x in value]
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"device ids must be distinct and >= 0, got {value!r}")
    return ids


# ------------------------------------------------------------------------------------------
# Settings resolution


@dataclasses.dataclass
class Resolved:
    """What `initialize` will do; `source` explains where the decision came from."""

    enabled: bool
    source: str
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: list[int] | None
    timeout: int
    cpu_devices: int | None
    join_seconds: float | None = None


def _env(*names: str) -> tuple[str, str] | tuple[None, None]:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip() != "":
            return name, value.strip()
    return None, None


def _env_int(names: Sequence[str], current: int | None) -> int | None:
    name, value = _env(*names)
    if name is None:
        return current
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, got {value!r}") from None


def slurm_step_present() -> bool:
    """Inside an `srun` step (what JAX's Slurm auto-detection needs)."""
    return all(v in os.environ for v in
               ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"))


def _slurm_num_tasks() -> int:
    return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)


def _ompi_present() -> bool:
    return "OMPI_MCA_orte_hnp_uri" in os.environ and int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def _platforms() -> set[str]:
    value = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME") or ""
    return {p.strip().lower() for p in value.split(",") if p.strip()}


def _tpu_vm_present() -> bool:
    platforms = _platforms()
    if platforms and "tpu" not in platforms:
        return False
    try:
        from jax._src import cloud_tpu_init  # set when `import jax` found TPU chips + libtpu
    except ImportError:  # pragma: no cover - JAX internals moved
        return False
    if not getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
        return False
    # A multi-host slice (GKE sets TPU_WORKER_HOSTNAMES; TPU VMs answer the metadata server).
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES")
    if hosts is not None:
        return len([h for h in hosts.split(",") if h.strip()]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    return True  # a Cloud TPU VM: JAX asks the metadata server (also right for one host)


def _tasks_on_this_node() -> int | None:
    """Tasks of this Slurm step on this node, from SLURM_STEP_TASKS_PER_NODE ('8(x2),4')."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    node_id = os.environ.get("SLURM_NODEID")
    if not spec:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    idx = int(node_id) if node_id is not None and node_id.isdigit() else 0
    return counts[idx] if idx < len(counts) else counts[-1]


def _visible_gpu_count() -> int | None:
    """GPUs this process can see: CUDA_VISIBLE_DEVICES, else SLURM_STEP_GPUS, else /dev/nvidiaN."""
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = os.environ.get(name)
        if value is not None and value.strip() not in ("", "NoDevFiles"):
            return len([x for x in value.split(",") if x.strip()])
    n = len(glob.glob("/dev/nvidia[0-9]*"))
    return n or None


def _all_visible_gpus() -> list[int] | None:
    n = _visible_gpu_count()
    return list(range(n)) if n else None


def _slurm_local_device_ids() -> list[int] | None:
    """GPU ids for this task in a Slurm step (ids count from 0 within CUDA_VISIBLE_DEVICES).

    - one task on the node                         -> every visible GPU (one process per node)
    - each task sees fewer GPUs than tasks share it -> Slurm bound GPUs per task: all it sees
    - every task sees all the node's GPUs           -> an equal slice by SLURM_LOCALID
    None leaves JAX's default ([SLURM_LOCALID]).
    """
    n_visible = _visible_gpu_count()
    tasks = _tasks_on_this_node()
    local_id = int(os.environ.get("SLURM_LOCALID", "0"))
    if not n_visible or not tasks:
        return None
    if tasks == 1 or n_visible < tasks:
        return list(range(n_visible))
    if n_visible % tasks == 0:
        per = n_visible // tasks
        return list(range(local_id * per, (local_id + 1) * per))
    return None


def _on_cpu(cpu_devices: int | None) -> bool:
    platforms = _platforms()
    return platforms == {"cpu"} or (cpu_devices is not None and not platforms - {"cpu"})


def resolve(cfg: DistributedConfig, *, cpu_devices: int | None = None) -> Resolved:
    """Merges config, environment and cluster detection into what `initialize` will do."""
    enabled = _enabled_word(cfg.enabled)
    name, value = _env("TRAINER_DISTRIBUTED")
    if name is not None:
        enabled = {"true": "on", "1": "on", "false": "off", "0": "off"}.get(value.lower(), value.lower())
        if enabled not in ENABLED_CHOICES:
            raise ValueError(f"environment variable TRAINER_DISTRIBUTED: must be auto, on or off, got {value!r}")

    coordinator = cfg.coordinator
    name, value = _env("TRAINER_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
    if name is not None:
        _check_coordinator(value, f"environment variable {name}")
        coordinator = value
    num_processes = _env_int(("TRAINER_NUM_PROCESSES", "JAX_NUM_PROCESSES"), cfg.num_processes)
    process_id = _env_int(("TRAINER_PROCESS_ID", "JAX_PROCESS_ID"), cfg.process_id)
    timeout = _env_int(("TRAINER_INIT_TIMEOUT",), cfg.initialization_timeout)
    cpu_devices = _env_int(("TRAINER_CPU_DEVICES",), cpu_devices)
    if cpu_devices is not None and cpu_devices < 1:
        raise ValueError(f"TRAINER_CPU_DEVICES / runtime.cpu_devices: must be >= 1, got {cpu_devices}")

    ids_value: str | int | list[int] | None = cfg.local_device_ids
    name, value = _env("TRAINER_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS")
    if name is not None:
        ids_value = value
    try:
        ids = parse_device_ids(ids_value) if ids_value is not None else None
    except ValueError as e:
        raise ValueError(f"{name or 'distributed.local_device_ids'}: {e}") from None
    if ids == "all":
        ids = _all_visible_gpus()

    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1} "
                         "(distributed.process_id / TRAINER_PROCESS_ID vs num_processes)")

    if enabled == "off":
        on, source = False, "distributed.enabled=off"
    elif enabled == "on":
        on, source = True, "distributed.enabled=on"
    elif coordinator is not None:
        on, source = True, "a coordinator address is set"
    elif num_processes is not None and num_processes > 1:
        on, source = True, f"num_processes={num_processes}"
    elif slurm_step_present() and _slurm_num_tasks() > 1:
        on, source = True, f"Slurm step with {_slurm_num_tasks()} tasks"
    elif _ompi_present():
        on, source = True, "Open MPI job"
    elif _tpu_vm_present():
        on, source = True, "Cloud TPU VM"
    else:
        on, source = False, "no cluster detected"

    # Slurm: derive GPU ids for both layouts (one process per GPU / per node) unless given.
    if on and ids is None and slurm_step_present() and not _on_cpu(cpu_devices):
        ids = _slurm_local_device_ids()

    return Resolved(on, source, coordinator, num_processes, process_id, ids, timeout, cpu_devices)


# ------------------------------------------------------------------------------------------
# Start-up


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _set_cpu_devices(n: int) -> None:
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError as e:  # backends already initialised
        raise RuntimeError(
            f"runtime.cpu_devices={n} must be set before JAX initialises its backends ({e}); "
            "call trainer.distributed.initialize before any device use") from None


class _Watchdog:
    """Ends the process with a clear message if initialisation outlives the timeout.

    JAX itself aborts (SIGABRT, a C++ stack) after its own timeout; we give JAX a slightly longer
    timeout and exit first with a message that names the coordinator, the process and the cause.
    """

    def __init__(self, timeout: float, message: str):
        self._done = threading.Event()
        self._timeout = timeout
        self._message = message
        self._thread = threading.Thread(target=self._run, name="distributed-init-watchdog", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        return False

    def _run(self):
        if self._done.wait(self._timeout):
            return
        _log(self._message)
        sys.stdout.flush()
        os._exit(INIT_TIMEOUT_EXIT_CODE)


def _describe_target(r: Resolved) -> str:
    parts = []
    parts.append(f"coordinator {r.coordinator}" if r.coordinator else "coordinator auto-detected")
    if r.process_id is not None and r.num_processes is not None:
        parts.append(f"process {r.process_id} of {r.num_processes}")
    elif r.num_processes is not None:
        parts.append(f"{r.num_processes} processes")
    return ", ".join(parts)


def initialize(cfg: DistributedConfig, *, cpu_devices: int | None = None) -> Resolved:
    """Sets up devices and (when appropriate) the multi-process runtime; logs one line.

    Must run before anything touches a JAX device. Returns the resolved settings.
    """
    cfg.validate()
    r = resolve(cfg, cpu_devices=cpu_devices)
    if r.cpu_devices is not None:
        _set_cpu_devices(r.cpu_devices)


    if r.enabled:
        from jax._src import distributed as jax_distributed

        if getattr(jax_distributed.global_state, "client", None) is None:
            missing = [k for k, v in (("distributed.coordinator", r.coordinator),
                                      ("distributed.num_processes", r.num_processes),
                                      ("distributed.process_id", r.process_id)) if v is None]
            if missing and _jax_detects_cluster() is False:  # JAX could not fill them in: fail before joining
                raise ValueError(f"{r.source}, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                 f"unset and no cluster is detected; {_MISSING_HINT}")
            r.join_seconds = _connect(r)
    _log(startup_line(r))
    return r


_MISSING_HINT = ("set distributed.coordinator=HOST:PORT, distributed.num_processes and distributed.process_id "
                 "(or TRAINER_COORDINATOR, TRAINER_NUM_PROCESSES, TRAINER_PROCESS_ID), or run inside a cluster JAX "
                 "detects (Slurm step, Open MPI, Cloud TPU)")


def _jax_detects_cluster() -> bool | None:
    """Whether JAX's own cluster auto-detection finds an environment; None when that cannot be asked."""
    try:
        import jax._src.clusters  # noqa: F401 - registers the cluster environments
        from jax._src.clusters.cluster import ClusterEnv

        return any(not getattr(env, "opt_in_only_method", False) and env.is_env_present()
                   for env in ClusterEnv._cluster_types)
    except Exception:  # noqa: BLE001 - JAX internals moved: let jax.distributed.initialize decide
        return None


def _connect(r: Resolved) -> float:
    import jax

    target = _describe_target(r)
    _log(f"[distributed] host {socket.gethostname()}: joining ({r.source}; {target}); "
         f"waiting up to {r.timeout}s for all processes")
    kwargs = dict(
        coordinator_address=r.coordinator,
        num_processes=r.num_processes,
        process_id=r.process_id,
        local_device_ids=r.local_device_ids,
        initialization_timeout=int(r.timeout + _WATCHDOG_MARGIN_S) + 1,
    )
    message = (
        f"[distributed] ERROR: distributed initialisation timed out after {r.timeout}s "
        f"({target}, host {socket.gethostname()}): not every process reached the coordinator. "
        "Check that all processes were started with the same coordinator address and process count, "
        "that process 0 is running, and that the coordinator port is reachable; "
        "raise distributed.initialization_timeout (TRAINER_INIT_TIMEOUT) if start-up is just slow.")
    t0 = time.monotonic()
    with _Watchdog(r.timeout, message):
        try:
            jax.distributed.initialize(**kwargs)
        except (ValueError, TypeError) as e:  # settings JAX cannot use: a configuration error
            hint = (f"; {_MISSING_HINT}"
                    if r.coordinator is None or r.num_processes is None or r.process_id is None else "")
            raise ValueError(f"{r.source}: jax.distributed.initialize failed ({target}): "
                             f"{str(e).strip().rstrip('.')}{hint}") from None
        except RuntimeError as e:
            raise RuntimeError(f"[distributed] jax.distributed.initialize failed ({target}): {e}") from e
    return time.monotonic() - t0


def startup_line(r: Resolved | None = None) -> str:
    import jax

    local = jax.local_devices()
    platform = local[0].platform if local else "?"
    mode = "multi-process" if jax.process_count() > 1 or (r is not None and r.enabled) else "single-process"
    why = f" ({r.source})" if r is not None else ""
    if r is not None and r.join_seconds is not None:
        why += f", joined in {r.join_seconds:.1f}s"
    return (f"[distributed] process {jax.process_index()}/{jax.process_count()} on {socket.gethostname()}: "
            f"{jax.local_device_count()} local / {jax.device_count()} global {platform} devices; "
            f"{mode}{why}")
