"""Sharded Orbax checkpoints: async saves, verified resume from the latest good step.

Each checkpoint step folder holds three items: `state` (parameters, Adam moments, step, RNG
key; every process writes its own shards), `data` (the input iterators' states of all
processes, plus every array's shape, dtype and exact checksum, sealed by a sha256; JSON) and
`config` (the resolved config, JSON; its sha256 is in `data`). Restoring targets the current
mesh's shardings, so a checkpoint saved on one mesh restores onto any other.

Resuming tells damage from a changed config: a step whose files cannot be read or whose
contents do not match their checksums is set aside (`STEP.damaged`) and the one before is used;
a checkpoint of another model (tree, shapes, dtypes) is a ConfigError and nothing is touched.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import inspect
import json
import logging
import os
import sys
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from model import axes
from trainer import storage
from trainer.config import Config, ConfigError, to_dict
from trainer.train_state import StateSpec, TrainState

# The `data` item's layout: 2 = exact per-array checksums (`arrays`) and a sha256 over the item;
# checkpoints without `sha256` carry the older float `fingerprint` (still accepted).
CHECKSUM_FORMAT = 2
# On object storage Orbax marks a finished step folder with this file (no rename there).
COMMIT_FILE = "commit_success.txt"


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


# Config keys that say where and on what a run executes, not what it trains: resuming with
# another value is routine (another mesh, a copied workdir) and only logged.
PLACEMENT_KEYS = ("workdir", "mesh", "runtime", "distributed", "rules")


class CheckpointManager:
    """The run's `WORKDIR/checkpoints` directory, wrapped for the train loop."""

    def __init__(self, cfg: Config, spec: StateSpec, mesh: jax.sharding.Mesh):
        self.cfg = cfg
        self.spec = spec
        self.mesh = mesh
        self.directory = orbax_directory(storage.join(cfg.workdir, "checkpoints"))
        policies = [ocp.checkpoint_managers.LatestN(cfg.checkpoint.keep)]
        if cfg.checkpoint.keep_period:
            policies.append(ocp.checkpoint_managers.EveryNSteps(cfg.checkpoint.keep_period))
        options = manager_options(
            self.directory,
            enable_async_checkpointing=cfg.checkpoint.async_save,
            # An interrupted save leaves `N.orbax-checkpoint-tmp*`: never used, removed on start.
            cleanup_tmp_directories=True,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=_item_handlers(ocp.StandardCheckpointHandler()))

    # ---------------------------------------------------------------------------------- save

    def should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return every > 0 and step % every == 0

    def save(self, step: int, state: TrainState, data_state: dict[str, Any] | None, *, force: bool = False) -> None:
        if step in self._manager.all_steps():
            return
        config = _json_normal(to_dict(self.cfg))
        # `arrays`: every array's shape, dtype and exact hash; `sha256` seals the whole item
        # (the iterator states included) and `config_sha256` the config item beside it.
        data = _sealed({"format": CHECKSUM_FORMAT, "process_count": jax.process_count(),
                        "states": _gather_json(data_state), "arrays": array_records(state),
                        "config_sha256": _sha256_json(config)})
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config),
        ), force=force)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # ------------------------------------------------------------------------------- restore

    def restore_or_init(self, create: Callable[[StateSpec], TrainState]) -> tuple[TrainState, Any]:
        """Resumes from the newest checkpoint that restores cleanly, else initialises.

        Returns the state and the data-iterator states of every process that saved it (None when
        starting fresh); `Pipeline.set_state` accepts that list on any number of processes.

        A checkpoint of another model (tree, shapes or dtypes differ from this config's state) is
        a ConfigError naming the first differing parameter and the config keys that changed;
        nothing in the workdir is touched then. Only an unreadable file or a checksum mismatch
        is damage: that step is renamed `STEP.damaged` and the one before is tried.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            path = storage.join(self.directory, str(step))
            if self._params_only(step):  # an imported model: start training from its parameters
                state = create(self.spec)
                params, _ = restore_items(self.directory, {"params": self.spec.restore_target()["params"]}, step,
                                          source=f"checkpoint {path}", config=to_dict(self.cfg))
                _log(f"starting from the parameters of checkpoint {path} (parameters only: a fresh optimizer)")
                return {**state, **params}, None
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
            self._report_config_changes(step, restored["config"])
            # Every process's iterator state: the pipeline takes its own rows of the global
            # position, whatever number of processes wrote it.
            return restored["state"], restored["data"]["states"]
        state = create(self.spec)
        if self.cfg.checkpoint.restore_from:
            state = self._init_from(self.cfg.checkpoint.restore_from, state)
        return state, None

    def _params_only(self, step: int) -> bool:
        try:
            data = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
        except Exception:  # unreadable: `_try_restore` reports the damage
            return False
        return isinstance(data, dict) and data.get("params_only") is True

    def _try_restore(self, step: int) -> tuple[Any, str | None]:
        """Restores and verifies one step; returns (items, None) or (None, what is damaged).

        Raises ConfigError when the step is intact but holds another model.
        """
        path = storage.join(self.directory, str(step))
        try:
            restored = _restore_verified(
                self._manager, step, self.spec.restore_target(), partial=False,
                source=f"checkpoint {path}", config=to_dict(self.cfg),
                advice=f"nothing in {storage.absolute(self.cfg.workdir)} was changed: resume with the checkpoint's "
                       f"settings, or train this model in another workdir (checkpoint.restore_from=... starts "
                       f"from this run's parameters when their shapes match)")
        except _Damaged as e:
            return None, str(e)
        return restored, None

    def _report_config_changes(self, step: int, saved_config: Any) -> None:
        """Warns about every changed key; keeps the config.yaml being replaced as config.STEP.yaml."""
        if not isinstance(saved_config, dict):  # an old checkpoint without a readable config: nothing to compare
            return
        changes = config_changes(saved_config, to_dict(self.cfg))
        placement = [c for c in changes if _is_placement(c[0])]
        run = [c for c in changes if not _is_placement(c[0])]
        if placement:
            _log(f"resuming with another placement than the checkpoint's: {_format_changes(placement)}")
        if not [c for c in changes if c[0] != "workdir"]:
            return
        kept = _keep_previous_config(self.cfg.workdir, step, saved_config) if jax.process_index() == 0 else None
        if run:
            _warn(f"resuming from step {step} with a config that differs from the checkpoint's: "
                  f"{_format_changes(run)}" + (f"; the previous config is kept as {kept}" if kept else ""))

    def _set_aside(self, step: int) -> None:
        """Renames a damaged step folder so that a new save of that step can commit."""
        if jax.process_index() == 0:
            src = storage.join(self.directory, str(step))
            dst = f"{src}.damaged"
            n = 1
            while storage.exists(dst):
                n += 1
                dst = f"{src}.damaged{n}"
            storage.move(src, dst)
        multihost_utils.sync_global_devices(f"checkpoint-set-aside-{step}")
        self._manager.reload()

    def _init_from(self, path: str, state: TrainState) -> TrainState:
        """Copies parameters (or the whole state) from another run's checkpoint, or a Hugging Face
        T5 checkpoint directory (`hf:PATH`, parameters only)."""
        if path.startswith("hf:"):
            from trainer.import_hf import load_hf_params

            params = load_hf_params(path[3:], self.spec.restore_target()["params"], self.cfg.model)
            _log(f"initialised params from the Hugging Face checkpoint {path[3:]}")
            return {**state, "params": params}
        directory, step = _resolve_checkpoint(path)
        wanted = ["params"] if self.cfg.checkpoint.restore_params_only else list(state)
        restored, _ = restore_items(directory, {k: self.spec.restore_target()[k] for k in wanted}, step,
                                    source=f"checkpoint.restore_from={path}", config=to_dict(self.cfg))
        _log(f"initialised {' and '.join(wanted)} from {storage.join(directory, str(step))}")
        return {**state, **restored}


def save_params_checkpoint(directory: str, step: int, params: Any, cfg: Config) -> None:
    """A checkpoint of parameters alone (an imported model), in the layout of the run's checkpoints:
    decode and export restore it as they do any step; `restore_or_init` starts training from it."""
    config = _json_normal(to_dict(cfg))
    data = _sealed({"format": CHECKSUM_FORMAT, "process_count": jax.process_count(), "states": [],
                    "params_only": True, "arrays": array_records({"params": params}),
                    "config_sha256": _sha256_json(config)})
    directory = orbax_directory(directory)
    with ocp.CheckpointManager(directory, options=manager_options(directory),
                               item_handlers=_item_handlers(ocp.StandardCheckpointHandler())) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                                   data=ocp.args.JsonSave(data), config=ocp.args.JsonSave(config)))
        manager.wait_until_finished()


def _item_handlers(state_handler: Any) -> dict[str, Any]:
    return {"state": state_handler, "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}


def orbax_directory(directory: str) -> str:
    """`directory` as Orbax takes it: an absolute local path, or a gs:// / s3:// URL it can write."""
    storage.check(directory)
    if storage.scheme(directory) == "s3":
        storage.orbax_s3()
    return storage.absolute(directory)


def temporary_path_class(directory: str) -> Any:
    """Object storage has no atomic folder rename: a save is finished once its `commit_success.txt`
    exists (Orbax's default on gs://, used on s3:// too); locally (None: Orbax's default) a folder
    written under a temporary name is renamed into place."""
    return ocp.path.atomicity.CommitFileTemporaryPath if storage.is_remote(directory) else None


def manager_options(directory: str, **kwargs: Any) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(temporary_path_class=temporary_path_class(directory), **kwargs)


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    directory = orbax_directory(directory)
    return ocp.CheckpointManager(directory, options=manager_options(directory, read_only=True),
                                 item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler()))


def committed_steps(directory: str) -> list[int]:
    """Committed step folders of a checkpoints directory, oldest first."""
    if storage.is_remote(directory):
        return sorted(int(d) for d in storage.listdir(directory)
                      if d.isdigit() and storage.isfile(storage.join(directory, d, COMMIT_FILE)))
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def restore_items(directory: str, target: dict[str, Any], step: int | None = None, *, source: str | None = None,
                  config: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    """Restores some top-level entries of the `state` item (e.g. only `params`) onto `target`'s shardings.

    Without `step`, the newest step that restores cleanly; a damaged one (unreadable, or not
    matching its checksums) is reported and skipped. A checkpoint of another model is a
    ConfigError naming the parameter and both shapes (and, given this run's `config`, the
    model keys that differ).
    """
    steps = [step] if step is not None else sorted(committed_steps(directory), reverse=True)
    if not steps:
        raise ConfigError(f"no checkpoints in {directory}")
    problems = []
    with _read_only_manager(directory) as manager:
        for candidate in steps:
            path = storage.join(directory, str(candidate))
            try:
                restored = _restore_verified(manager, candidate, target, partial=True, source=source or
                                             f"checkpoint {path}", config=config, config_prefix="model.")
                return restored["state"], candidate
            except _Damaged as e:  # damaged step: report it, try the one before
                problems.append(f"step {candidate}: {e}")
                _warn(f"checkpoint {path} could not be restored ({e})")
    raise ConfigError(f"no usable checkpoint in {directory}: " + "; ".join(problems))


# ------------------------------------------------------------------------- verified restore


class _Damaged(Exception):
    """A step that cannot be read back as it was written (unreadable file, checksum mismatch)."""


def _restore_verified(manager: ocp.CheckpointManager, step: int, target: Any, *, partial: bool, source: str,
                      config: dict[str, Any] | None, config_prefix: str = "",
                      advice: str = "") -> dict[str, Any]:
    """Restores `target` (the whole state, or some top-level entries when `partial`) from one step.

    1. The `data` and `config` items are read and checked against their sha256 (damage).
    2. The saved arrays' tree, shapes and dtypes are compared with `target`: a difference is
       a ConfigError; an embedding/logit table whose padded vocabulary differs (the padding
       depends on the mesh) is restored at its saved size and re-padded afterwards.
    3. The arrays are restored and hashed exactly; any difference is damage.
    Returns {"state", "data", "config"}; raises _Damaged or ConfigError.
    """
    items = _guarded("reading its data and config items", lambda: manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())))
    data, saved_config = items["data"], items["config"]
    legacy = _check_sealed(data, saved_config)
    if legacy:  # written before exact checksums: shapes from Orbax's own metadata
        metadata = _guarded("reading its array metadata", lambda: manager.item_metadata(step)["state"])
        saved = {_param_name(p): (tuple(int(n) for n in m.shape), str(np.dtype(m.dtype)))
                 for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0] if hasattr(m, "shape")}
    else:
        saved = {name: (tuple(r["shape"]), r["dtype"]) for name, r in data["arrays"].items()}

    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    names = [_param_name(p) for p, _ in flat]
    wanted = {n: (tuple(x.shape), str(np.dtype(x.dtype))) for n, (_, x) in zip(names, flat)}
    vocab_dims = _vocab_dims(target)
    saved_model = saved_config.get("model") if isinstance(saved_config, dict) else None
    vocab_size = saved_model.get("vocab_size") if isinstance(saved_model, dict) else None
    current_vocab = ((config or {}).get("model") or {}).get("vocab_size")
    if current_vocab is not None and current_vocab != vocab_size:
        vocab_size = None  # another vocabulary: its tables are not padding-compatible
    changes = None
    if config is not None:  # the keys that may explain a difference (not where the run executes)
        changes = [c for c in config_changes(saved_config, config, prefix=config_prefix) if not _is_placement(c[0])]
    resize = _match_arrays(saved, wanted, vocab_dims, vocab_size, partial=partial, source=source, changes=changes,
                           advice=advice)

    # Tables with another padded vocabulary are read at their saved size (vocab dim unsplit).
    leaves = []
    for name, (_, x) in zip(names, flat):
        if name in resize:
            shape = saved[name][0]
            leaves.append(jax.ShapeDtypeStruct(shape, x.dtype, sharding=_unsplit(x.sharding, vocab_dims[name],
                                                                                  len(shape))))
        else:
            leaves.append(x)
    read_target = jax.tree_util.tree_unflatten(treedef, leaves)
    if partial:
        args = ocp.args.PyTreeRestore(item=read_target, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(read_target))
    else:
        args = ocp.args.StandardRestore(read_target)
    state = _guarded("reading its arrays", lambda: manager.restore(step, args=ocp.args.Composite(state=args))["state"])

    restored_flat, restored_def = jax.tree_util.tree_flatten_with_path(state)
    restored_names = [_param_name(p) for p, _ in restored_flat]
    if restored_names != names:
        raise _Damaged("its arrays came back as another tree")
    arrays = [x for _, x in restored_flat]
    if legacy:
        saved_sums = data.get("fingerprint") if isinstance(data, dict) else None
        if not partial and (saved_sums is None or not np.allclose(fingerprint(state), saved_sums, rtol=1e-4,
                                                                  atol=1e-6)):
            raise _Damaged("its arrays do not match the checksums saved with them")
    else:
        got = array_hashes(arrays)
        for name, x, digest in zip(names, arrays, got):
            record = data["arrays"][name]
            if tuple(x.shape) != tuple(record["shape"]) or digest != record["hash"]:
                raise _Damaged(f"array {name} does not match the checksum saved with it")
    if resize:
        padded = sorted({(saved[n][0][vocab_dims[n]], wanted[n][0][vocab_dims[n]]) for n in resize})
        _log(f"{source}: embedding/logit tables padded to another vocabulary multiple on this mesh: "
             + ", ".join(f"{a} -> {b} rows" for a, b in padded) + f" (vocabulary {vocab_size}; only padding rows "
             f"differ)")
        arrays = [_resize(a, vocab_dims[n], wanted[n][0][vocab_dims[n]], x.sharding) if n in resize else a
                  for n, a, (_, x) in zip(names, arrays, flat)]
    return {"state": jax.tree_util.tree_unflatten(restored_def, arrays), "data": data, "config": saved_config}


def _guarded(what: str, fn: Callable[[], Any]) -> Any:
    """Runs a read; a failure is damage, except running out of memory (not the checkpoint's fault)."""
    try:
        return fn()
    except (ConfigError, _Damaged):
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable step, whatever the library raises
        text = str(e)
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
            raise
        problem = f"{what}: {type(e).__name__}: {_first_line(e)}"
    _drop_failed_reads()  # outside the `except`: its traceback no longer holds the reads
    raise _Damaged(problem)


def _drop_failed_reads() -> None:
    """Collects the library's other failed reads now, without a page of asyncio tracebacks each."""
    logger = logging.getLogger("asyncio")
    disabled, logger.disabled = logger.disabled, True
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (inspect.iscoroutine(unraisable.object) or isinstance(unraisable.object, asyncio.Future)):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... was never awaited"
            gc.collect()
    finally:
        sys.unraisablehook = previous
        logger.disabled = disabled


def _check_sealed(data: Any, config: Any) -> bool:
    """Verifies the data item's sha256 (and the config's); returns True for a pre-checksum checkpoint."""
    if not isinstance(data, dict):
        raise _Damaged("its data item is not a JSON object")
    if "sha256" not in data:
        if "fingerprint" in data and "arrays" not in data and "format" not in data:
            return True
        raise _Damaged("its data item has no checksum")
    body = {k: v for k, v in data.items() if k != "sha256"}
    if _sha256_json(body) != data["sha256"]:
        raise _Damaged("its data item (iterator states and array checksums) does not match its sha256")
    if _sha256_json(config) != data.get("config_sha256"):
        raise _Damaged("its config item does not match the sha256 saved with it")
    if not isinstance(data.get("arrays"), dict) or not isinstance(data.get("states"), list):
        raise _Damaged("its data item lacks the array checksums or the iterator states")
    return False


def _match_arrays(saved: dict[str, tuple], wanted: dict[str, tuple], vocab_dims: dict[str, int],
                  vocab_size: Any, *, partial: bool, source: str, changes: list[tuple] | None,
                  advice: str) -> set[str]:
    """Names whose vocab dimension only differs (to re-pad); a ConfigError for any other difference."""
    resize = set()

    def problem(text: str) -> ConfigError:
        if changes is None:
            keys = ""
        elif changes:
            keys = f"; config keys that differ from the checkpoint's: {_format_changes(changes)}"
        else:
            keys = "; no config key differs from the checkpoint's (was the model code changed?)"
        return ConfigError(f"{source}: {text}{keys}" + (f"; {advice}" if advice else ""))

    # Parameters first: the first difference named is a parameter, not its Adam moment.
    order = [n for n in wanted if n.startswith("params/")] + [n for n in wanted if not n.startswith("params/")]
    for name in order:
        shape, dtype = wanted[name]
        label = name[len("params/"):] if name.startswith("params/") else name
        if name not in saved:
            raise problem(f"parameter {label} (shape {shape}) is not in the checkpoint")
        saved_shape, saved_dtype = saved[name]
        if saved_shape != shape:
            dim = vocab_dims.get(name)
            if (dim is None or len(saved_shape) != len(shape) or isinstance(vocab_size, bool)
                    or not isinstance(vocab_size, int)
                    or any(a != b for i, (a, b) in enumerate(zip(saved_shape, shape)) if i != dim)
                    or min(saved_shape[dim], shape[dim]) < vocab_size):
                raise problem(f"parameter {label} has shape {saved_shape} in the checkpoint but {shape} in this model")
            resize.add(name)
        if saved_dtype != dtype:
            raise problem(f"parameter {label} has dtype {saved_dtype} in the checkpoint but {dtype} in this model")
    if not partial:
        extra = [n for n in saved if n not in wanted]
        if extra:
            label = extra[0][len("params/"):] if extra[0].startswith("params/") else extra[0]
            raise problem(f"the checkpoint's parameter {label} (shape {saved[extra[0]][0]}) is not in this model")
    return resize


def _vocab_dims(tree: Any) -> dict[str, int]:
    """Which dimension of each array is the (padded) vocabulary, from the parameters' logical axis names."""
    out = {}
    for path, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        if isinstance(v, nnx.Variable):
            names = v.get_metadata().get("out_sharding") or v.get_metadata().get("sharding_names") or ()
            if axes.VOCAB in tuple(names):
                out[_param_name(path)] = tuple(names).index(axes.VOCAB)
    return out


def _unsplit(sharding: Any, dim: int, ndim: int) -> Any:
    """`sharding` with dimension `dim` not split (a saved size need not divide the mesh axes)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    spec[dim] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)


def _resize(x: jax.Array, dim: int, size: int, sharding: Any) -> jax.Array:
    """Drops or appends (zero) padding rows along `dim`; rows below the real vocabulary are kept as they are."""
    return _resize_fn(dim, size, sharding)(x)


@functools.lru_cache(maxsize=None)
def _resize_fn(dim: int, size: int, sharding: Any) -> Callable[[jax.Array], jax.Array]:
    def f(a):
        if a.shape[dim] >= size:
            return jax.lax.slice_in_dim(a, 0, size, axis=dim)
        pad = [(0, 0)] * a.ndim
        pad[dim] = (0, size - a.shape[dim])
        return jnp.pad(a, pad)

    return jax.jit(f, out_shardings=sharding)


# --------------------------------------------------------------------------------- checksums


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
    """The array's bit pattern as uint32 words (8-byte types: two words per element)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise TypeError(f"no checksum for dtype {x.dtype}")


def _leaf_hash(x: jax.Array) -> jax.Array:
    """Two 32-bit sums over all elements of mix(bits, position): exact, order-free, so mesh-independent.

    For a fixed position the mix is a bijection of the bits, so any change of a single element
    (one flipped bit, a zeroed chunk of one element) changes both sums; more changes go
    unnoticed only with probability about 2**-64.
    """
    bits = _bits(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * np.uint32(stride % 2**32)
        stride *= bits.shape[d]
    a = _fmix32(bits ^ _fmix32(index ^ np.uint32(0x9E3779B9)))
    b = _fmix32((bits + _fmix32(index + np.uint32(0x7F4A7C15))) * np.uint32(0x27D4EB2F))
    return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


def array_hashes(arrays: list[jax.Array]) -> list[str]:
    """An exact 64-bit checksum of each array's bit pattern, the same on any mesh and process count."""
    # One small compiled function per distinct shape, dtype and sharding (the layers and the
    # Adam moments repeat the same few): quick to compile, unlike one function over everything.
    # Each result is awaited before the next launch: many small programs with collectives in
    # flight at once can starve the CPU backend's collective rendezvous.
    out = []
    for x in arrays:
        a, b = np.asarray(jax.device_get(_hash_fn(_replicated(x))(x)))
        out.append(f"{int(a):08x}{int(b):08x}")
    return out


def _replicated(x: jax.Array) -> Any:
    sharding = getattr(x, "sharding", None)
    return NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None


@functools.lru_cache(maxsize=None)
def _hash_fn(out_sharding: Any) -> Callable[[jax.Array], jax.Array]:
    """The hash, compiled per result sharding (a replicated pair, readable on every process)."""
    return jax.jit(_leaf_hash, out_shardings=out_sharding)


def array_records(state: Any) -> dict[str, dict[str, Any]]:
    """Every array of the state by name: shape, dtype and exact checksum (saved with a checkpoint)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    hashes = array_hashes([x for _, x in flat])
    return {_param_name(p): {"shape": [int(n) for n in x.shape], "dtype": str(np.dtype(x.dtype)), "hash": h}
            for (p, x), h in zip(flat, hashes)}


def _json_normal(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value))


def _sha256_json(value: Any) -> str:
    text = json.dumps(_json_normal(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _sealed(item: dict[str, Any]) -> dict[str, Any]:
    item = _json_normal(item)
    return {**item, "sha256": _sha256_json(item)}


# ----------------------------------------------------------------------------- config changes


_ABSENT = object()


def _flatten_config(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def config_changes(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every dotted key that differs."""
    old = _flatten_config(_json_normal(saved)) if isinstance(saved, dict) else {}
    new = _flatten_config(_json_normal(current)) if isinstance(current, dict) else {}
    keys = list(new) + [k for k in old if k not in new]
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys
            if k.startswith(prefix) and old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _is_placement(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in PLACEMENT_KEYS)


def _format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    def show(v: Any) -> str:
        return "(unset)" if v is _ABSENT else json.dumps(v)

    return ", ".join(f"{k}: {show(a)} -> {show(b)}" for k, a, b in changes)


def _keep_previous_config(workdir: str, step: int, saved_config: Any) -> str | None:
    """Copies WORKDIR/config.yaml (or, without one, the checkpoint's config) to config.STEP.yaml."""
    current = storage.join(workdir, "config.yaml")
    if storage.isfile(current):
        text = storage.read_text(current)
    elif isinstance(saved_config, dict):
        text = yaml.safe_dump(saved_config, sort_keys=False, default_flow_style=None)
    else:
        return None
    base = storage.join(workdir, f"config.{step}")
    dst, n = f"{base}.yaml", 1
    while storage.exists(dst):  # never overwritten: an identical copy is already there, or another name
        if storage.read_text(dst) == text:
            return dst
        n += 1
        dst = f"{base}.{n}.yaml"
    storage.write_text(dst, text)
    return dst


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _resolve_checkpoint(path: str) -> tuple[str, int]:
    """Accepts a run's workdir, its checkpoints folder, or one step folder."""
    path = storage.absolute(path)
    if storage.isdir(storage.join(path, "checkpoints")):
        path = storage.join(path, "checkpoints")
    base = storage.basename(path)
    if base.isdigit() and storage.isdir(path):
        return storage.dirname(path), int(base)
    if not storage.isdir(path):
        raise ConfigError(f"checkpoint.restore_from: {path} does not exist")
    steps = committed_steps(path)
    if not steps:
        raise ConfigError(f"checkpoint.restore_from: no checkpoints in {path}")
    return path, steps[-1]


def _param_name(path: tuple) -> str:
    """`decoder/layers/mlp/wi`, however the tree nodes (dicts, NNX variables) spell the path."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(p for p in parts if p not in ("value", "raw_value"))


@jax.jit
def _sums(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
                      for x in leaves])


def fingerprint(state: TrainState) -> list[list[float]]:
    """Sum and sum of squares of every float array (the checksum of checkpoints written before `arrays`)."""
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
