"""Sharded Orbax checkpoints: async saves, resume from the latest good step, preemption.

Each checkpoint step folder holds three items: `state` (parameters, Adam moments, step, RNG
key; every process writes its own shards), `data` (the input iterators' states of all
processes, JSON) and `config` (the resolved config, JSON). Restoring targets the current mesh's
shardings, so a checkpoint saved on one mesh restores onto any other.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from trainer.config import Config, ConfigError, to_dict
from trainer.state import StateSpec, TrainState, abstract_with_shardings


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class CheckpointManager:
    """The run's `WORKDIR/checkpoints` directory, wrapped for the train loop."""

    def __init__(self, cfg: Config, spec: StateSpec, mesh: jax.sharding.Mesh):
        self.cfg = cfg
        self.spec = spec
        self.directory = os.path.abspath(os.path.join(cfg.workdir, "checkpoints"))
        policies = [ocp.checkpoint_managers.LatestN(cfg.checkpoint.keep)]
        if cfg.checkpoint.keep_period:
            policies.append(ocp.checkpoint_managers.EveryNSteps(cfg.checkpoint.keep_period))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.checkpoint.async_save,
            # An interrupted save leaves `N.orbax-checkpoint-tmp*`: never used, removed on start.
            cleanup_tmp_directories=True,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ---------------------------------------------------------------------------------- save

    def should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return every > 0 and step % every == 0

    def save(self, step: int, state: TrainState, data_state: dict[str, Any] | None, *, force: bool = False) -> None:
        if step in self._manager.all_steps():
            return
        data = {"process_count": jax.process_count(), "states": _gather_json(data_state),
                "fingerprint": fingerprint(state)}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(to_dict(self.cfg)),
        ), force=force)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # ------------------------------------------------------------------------------- restore

    def restore_or_init(self, create: Callable[[StateSpec], TrainState]) -> tuple[TrainState, Any]:
        """Resumes from the newest checkpoint that restores cleanly, else initialises.

        Returns the state and this process's data-iterator state (None when starting fresh or
        when the checkpoint came from a different number of processes).
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            path = os.path.join(self.directory, str(step))
            restored, problem = self._try_restore(step)
            # Every process must take the same decision, whichever of them saw the damage.
            if not _all_processes_agree(problem is None):
                problem = problem or "another process could not restore it"
            if problem:
                _warn(f"checkpoint {path} is damaged or incomplete ({problem}); moved aside to "
                      f"{path}.damaged, trying the one before")
                self._set_aside(step)
                continue
            _log(f"resuming from checkpoint step {step}: {path}")
            data = restored["data"]
            if data.get("process_count") == jax.process_count():
                data_state = data["states"][jax.process_index()]
            else:
                _warn(f"checkpoint {path} was written by {data.get('process_count')} process(es), this run has "
                      f"{jax.process_count()}: the input pipeline is fast-forwarded by {step} batches instead")
                data_state = {"fast_forward_batches": step}
            return restored["state"], data_state
        state = create(self.spec)
        if self.cfg.checkpoint.restore_from:
            state = self._init_from(self.cfg.checkpoint.restore_from, state)
        return state, None

    def _try_restore(self, step: int) -> tuple[Any, str | None]:
        """Restores one step; returns (items, None) or (None, what is wrong with it)."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_with_shardings(self.spec)),
                data=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
            return None, f"{type(e).__name__}: {_first_line(e)}"
        # A missing chunk file reads back as zeros without any error: compare checksums.
        saved = (restored["data"] or {}).get("fingerprint")
        if saved is None:
            return None, "no fingerprint in its metadata"
        if not np.allclose(fingerprint(restored["state"]), saved, rtol=1e-4, atol=1e-6):
            return None, "its arrays do not match the checksums saved with them (missing or truncated data files)"
        return restored, None

    def _set_aside(self, step: int) -> None:
        """Renames a damaged step folder so that a new save of that step can commit."""
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst = f"{src}.damaged"
            n = 1
            while os.path.exists(dst):
                n += 1
                dst = f"{src}.damaged{n}"
            os.rename(src, dst)
        multihost_utils.sync_global_devices(f"checkpoint-set-aside-{step}")
        self._manager.reload()

    def _init_from(self, path: str, state: TrainState) -> TrainState:
        """Copies parameters (or the whole state) from another run's checkpoint."""
        directory, step = _resolve_checkpoint(path)
        with _read_only_manager(directory) as other:
            _check_shapes(other.item_metadata(step)["state"]["params"], state["params"], path)
        wanted = ["params"] if self.cfg.checkpoint.restore_params_only else list(state)
        restored, _ = restore_items(directory, {k: abstract_with_shardings(self.spec)[k] for k in wanted}, step)
        _log(f"initialised {' and '.join(wanted)} from {os.path.join(directory, str(step))}")
        return {**state, **restored}


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers={"state": ocp.PyTreeCheckpointHandler()})


def committed_steps(directory: str) -> list[int]:
    """Committed step folders of a checkpoints directory, oldest first."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def restore_items(directory: str, target: dict[str, Any], step: int | None = None) -> tuple[dict[str, Any], int]:
    """Restores some top-level entries of the `state` item (e.g. only `params`) onto `target`'s shardings.

    Without `step`, the newest step that restores cleanly; a damaged one is reported and skipped.
    """
    steps = [step] if step is not None else sorted(committed_steps(directory), reverse=True)
    if not steps:
        raise ConfigError(f"no checkpoints in {directory}")
    problems = []
    with _read_only_manager(directory) as manager:
        for candidate in steps:
            try:
                restored = manager.restore(candidate, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True)))["state"]
                return restored, candidate
            except Exception as e:  # noqa: BLE001 - damaged step: report it, try the one before
                problems.append(f"step {candidate}: {type(e).__name__}: {_first_line(e)}")
                _warn(f"checkpoint {os.path.join(directory, str(candidate))} could not be restored ({problems[-1]})")
    raise ConfigError(f"no usable checkpoint in {directory}: " + "; ".join(problems))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _resolve_checkpoint(path: str) -> tuple[str, int]:
    """Accepts a run's workdir, its checkpoints folder, or one step folder."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(path):
        return os.path.dirname(path), int(base)
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint.restore_from: {path} does not exist")
    steps = committed_steps(path)
    if not steps:
        raise ConfigError(f"checkpoint.restore_from: no checkpoints in {path}")
    return path, steps[-1]


def _param_name(path: tuple) -> str:
    """`decoder/layers/mlp/wi`, however the tree nodes (dicts, NNX variables) spell the path."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(p for p in parts if p not in ("value", "raw_value"))


def _check_shapes(saved: Any, current: Any, source: str) -> None:
    """Errors naming the parameter and both shapes when the model shape changed."""
    saved_flat = {_param_name(p): tuple(getattr(v, "shape", ())) for p, v in
                  jax.tree_util.tree_flatten_with_path(saved)[0]}
    current_flat = {_param_name(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(current)[0]}
    for name, shape in current_flat.items():
        if name not in saved_flat:
            raise ConfigError(f"checkpoint.restore_from={source}: parameter {name} (shape {shape}) is not in the "
                              f"checkpoint")
        if saved_flat[name] != shape:
            raise ConfigError(f"checkpoint.restore_from={source}: parameter {name} has shape {saved_flat[name]} "
                              f"in the checkpoint but {shape} in this model")


@jax.jit
def _sums(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
                      for x in leaves])


def fingerprint(state: TrainState) -> list[list[float]]:
    """Sum and sum of squares of every array of the state (global values, same on all hosts)."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return np.asarray(jax.device_get(_sums(leaves)), np.float64).tolist()


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able value, in process order (the iterator states differ per host)."""
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    everything = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(everything, lengths.reshape(-1))]


class PreemptionWatch:
    """Turns SIGTERM into "save at the next step boundary, then exit".

    With several processes, JAX's preemption sync point makes all of them agree on the step;
    alone, a signal handler sets a flag.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    @property
    def requested(self) -> bool:
        return self._flag.is_set()

    def reached(self, step: int) -> bool:
        if self._multi:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except Exception:  # noqa: BLE001 - no preemption service (e.g. not started by jax.distributed)
                return False
        return self._flag.is_set()
