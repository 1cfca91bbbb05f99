"""Typed run configuration: YAML files plus dotted `key=value` overrides.

Each section of the YAML is a frozen dataclass owned by the package that uses it (the model's
sizes live in `model.config`, the input pipeline's in `trainer.data.config`, ...). This module
only composes them and turns mistakes into errors that name the key at fault, before anything
is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from configs import CONFIG_DIR
from model.config import ModelConfig
from trainer.data.config import DataConfig
from trainer.distributed import DistributedConfig

DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class _Loader(yaml.SafeLoader):
    """YAML's safe loader without YAML 1.1's base-60 numbers: `10:15` stays the string "10:15"."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if ":[0-5]" not in rx.pattern]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern in (
    ("tag:yaml.org,2002:int", r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
):
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list("-+0123456789."))


class ConfigError(ValueError):
    """A configuration mistake; the message names the key (and file) at fault."""


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    cpu_devices: int | None = None  # simulate this many CPU devices per process
    platform: str | None = None  # force a JAX platform (cpu, gpu, tpu); None = JAX's choice


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1 fills with the remaining devices
    tensor: int = 1
    # Several TPU slices (or GPU nodes): how many ways of `data` / `fsdp` cross the data-center
    # network; their product must be the number of slices (nodes). The rest stays inside a slice.
    dcn_data: int = 1
    dcn_fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global, in sequences (packed rows)
    grad_accum_steps: int = 1
    learning_rate: float = 1e-3
    schedule: str = "cosine"  # cosine | rsqrt | constant
    warmup_steps: int = 100
    end_learning_rate_ratio: float = 0.1  # cosine floor as a fraction of the peak
    weight_decay: float = 0.01
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-9
    grad_clip_norm: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.0
    log_every: int = 10
    eval_every: int = 100  # 0 disables eval
    eval_batches: int = 0  # 0 = the whole held-out split
    on_nonfinite: str = "stop"  # stop | skip
    # A jax.profiler trace of steps START..END (e.g. "10:15") under WORKDIR/tensorboard/ (the
    # TensorBoard profile tab); process 0 only unless profile_all_processes.
    profile_steps: str | None = None
    profile_all_processes: bool = False
    # Seconds without a completed step before a process dumps its stacks to WORKDIR/hang/ and exits
    # with code 7 (trainer/watchdog.py). None: max(10 x the median step time, 300 s); 0: off.
    hang_timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # steps; 0 disables periodic saves
    keep: int = 3
    keep_period: int = 0  # also keep every Nth step forever; 0 disables
    save_final: bool = True  # also save when training ends
    async_save: bool = True
    restore_from: str | None = None  # initialise from another run's checkpoint
    restore_params_only: bool = True


MAX_SEED = 2**32 - 1  # numpy, Grain and the sampling keys take seeds in [0, 2**32)
MAX_BEAM_SIZE = 256


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """The `decode:` section: search settings of the decode command and of eval generation."""

    beam_size: int = 1  # 1 = greedy or sampling; > 1 = beam search
    max_length: int | None = None  # generated tokens incl. EOS; None = data.targets_length
    alpha: float = 0.6  # beam search length penalty ((5 + len) / 6) ** alpha
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples (beam_size must be 1)
    top_k: int = 0  # sampling: keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # sampling: nucleus probability mass (1 = all)
    seed: int = 0  # sampling: the same seed gives the same outputs
    batch_size: int = 32  # decode command: global batch (rounded up to the data-parallel size)
    eval_samples: int = 0  # eval examples that get generation metrics during training; 0 = off
    eval_text_samples: int = 4  # of those, how many go to TensorBoard as text

    def validate(self) -> None:
        def fail(field: str, what: str) -> None:
            raise ValueError(f"decode.{field}: {what}")

        def integer(field: str, minimum: int) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                fail(field, f"must be an integer, got {v!r}")
            if v < minimum:
                fail(field, f"must be >= {minimum}, got {v}")

        for field, minimum in (("beam_size", 1), ("top_k", 0), ("seed", 0), ("batch_size", 1),
                               ("eval_samples", 0), ("eval_text_samples", 0)):
            integer(field, minimum)
        if self.max_length is not None:
            integer("max_length", 1)
        if self.seed > MAX_SEED:
            fail("seed", f"must be <= {MAX_SEED} (2**32 - 1), got {self.seed}")
        if self.beam_size > MAX_BEAM_SIZE:
            fail("beam_size", f"must be <= {MAX_BEAM_SIZE}, got {self.beam_size}")
        if not 0 <= self.alpha < float("inf"):
            fail("alpha", f"must be a finite number >= 0, got {self.alpha!r}")
        if not 0 <= self.temperature < float("inf"):
            fail("temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.beam_size > 1 and self.temperature > 0:
            fail("temperature", f"sampling (temperature={self.temperature}) cannot be combined with beam "
                 f"search (decode.beam_size={self.beam_size}); set one of them back to its default")
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            fail("temperature", "top_k / top_p only apply to sampling: set decode.temperature > 0 (e.g. 1.0)")

    @property
    def mode(self) -> str:
        if self.beam_size > 1:
            return f"beam search (beam {self.beam_size}, alpha {self.alpha})"
        if self.temperature > 0:
            return (f"sampling (temperature {self.temperature}, top_k {self.top_k}, top_p {self.top_p}, "
                    f"seed {self.seed})")
        return "greedy"


def max_length_limit(data_cfg: Any, model_cfg: Any) -> int:
    """The longest decode.max_length allowed: the learned position table's size, or (sinusoidal
    positions, which have no table) the longer of model.max_length and data.targets_length."""
    if model_cfg.positions == "learned":
        return model_cfg.max_length
    return max(model_cfg.max_length, data_cfg.targets_length)


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/default"
    seed: int = 0
    rules: Any = "default"  # a preset in configs/rules/ (docs/sharding.md) or a list of [name, axes] pairs
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)


# --------------------------------------------------------------------------------------------
# Loading


def _as_path(path: str | os.PathLike) -> Path | str:
    """A local config path as a Path; a gs:// or s3:// URL stays a string (trainer.storage reads it)."""
    from trainer import storage

    return os.fspath(path) if storage.is_remote(path) else Path(path)


def _read_yaml(path: Path | str, seen: tuple[Path | str, ...] = ()) -> dict[str, Any]:
    """Reads a YAML file (safe loader); a `base:` key names a file it extends."""
    from trainer import storage

    if storage.isdir(str(path)):
        raise ConfigError(f"config file {path} is a directory; give a YAML file")
    if not storage.isfile(str(path)):
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(storage.read_text(str(path)), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty: give it config keys (e.g. `base: default.yaml`), "
                          f"or leave it out to use {DEFAULT_CONFIG}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if isinstance(path, str):  # a URL: `base` is another URL, or relative to this one's folder
        base_path: Path | str = base if storage.is_remote(base) else storage.join(storage.dirname(path), base)
        here: Path | str = path
    else:
        base_path, here = _as_path(path.parent / base), path.resolve()
        base_path = base_path.resolve() if isinstance(base_path, Path) else base_path
    if base_path in seen:
        raise ConfigError(f"{path}: `base` chain loops back to {base_path}")
    merged = _read_yaml(base_path, seen + (here,))
    _deep_merge(merged, raw)
    return merged


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _resolved_types(cls: type) -> dict[str, Any]:
    module = __import__(cls.__module__, fromlist=["_"])
    return typing.get_type_hints(cls, vars(module))


def _unknown_key(key: str, choices: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], choices, n=1, cutoff=0.5)
    hint = f"; did you mean `{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}`?" if close else ""
    return ConfigError(f"unknown config key `{key}`{where}{hint} (valid: {', '.join(sorted(choices))})")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against a field's type; returns it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key `{key}` expects {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return list(value) if origin is list else tuple(value)
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"config key `{key}` expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, raw: dict[str, Any], prefix: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key `{prefix.rstrip('.')}` must be a mapping{where}")
    fields = _fields(cls)
    hints = _resolved_types(cls)
    kwargs = {}
    for key, value in raw.items():
        full = prefix + str(key)
        if key not in fields:
            raise _unknown_key(full, list(fields), where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, full + ".", where)
        else:
            kwargs[key] = _check_value(full, value, tp)
    return cls(**kwargs)


def parse_overrides(args: list[str]) -> tuple[Path | str | None, dict[str, Any]]:
    """Splits CLI arguments into an optional config path and a nested dict of overrides."""
    path = None
    nested: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            if path is not None or arg.startswith("-"):
                raise ConfigError(f"unexpected argument `{arg}`: expected CONFIG.yaml then key.path=value overrides")
            path = _as_path(arg)
            continue
        key, _, text = arg.partition("=")
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"malformed override `{arg}`: expected key.path=value")
        try:
            value = yaml.load(text, Loader=_Loader) if text else None
        except yaml.YAMLError:
            value = text
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override `{arg}` conflicts with an earlier override of `{part}`")
        node[parts[-1]] = value
    return path, nested


def _find_config(path: Path | str) -> Path | str:
    """A config path as given, else the shipped config of that name (`configs/tiny.yaml` works from any
    directory, also with the package installed)."""
    if isinstance(path, str) or path.exists() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    shipped = CONFIG_DIR.joinpath(*parts) if parts else CONFIG_DIR
    return shipped if shipped.is_file() else path


def run_command(fn: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """A command's exit code: `fn(argv)`'s when it returns an int (else 0), or 2 with one line for a
    ConfigError."""
    try:
        code = fn(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def split_command_options(argv: list[str], keys: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """A command's own `key=value` options (e.g. export's `output=`), and the rest (config + overrides)."""
    options: dict[str, str] = {}
    rest = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in keys:
            options[key] = value
        else:
            rest.append(arg)
    return options, rest


def load_config(args: list[str] | None = None, *, path: str | os.PathLike | None = None) -> Config:
    """Builds the Config from `[CONFIG.yaml] [key=value ...]` (CONFIG defaults to default.yaml)."""
    cli_path, overrides = parse_overrides(list(args or []))
    config_path = _find_config(_as_path(path) if path is not None else (cli_path or DEFAULT_CONFIG))
    raw = _read_yaml(config_path)
    cfg = _build(Config, raw, "", f" in {config_path}")
    if overrides:
        merged = to_dict(cfg)
        _deep_merge(merged, overrides)  # rebuilt from the merged dict, so unknown override keys are reported
        cfg = _build(Config, merged, "", " (command-line override)")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)




def profile_range(spec: str) -> tuple[int, int] | None:
    """`"START:END"` -> (START, END), or None when it is not a valid range of steps."""
    start, sep, end = str(spec).partition(":")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit():
        return None
    a, b = int(start), int(end)
    return (a, b) if 1 <= a <= b else None


def validate(cfg: Config) -> None:
    """Checks values that the types alone cannot (mesh fit is checked once devices are known).

    Every numeric key is checked against its real domain here or in its section's `validate()`
    (model, data, distributed, decode); tests/test_config.py holds the table of bad values.
    """
    _check_finite(cfg, "")
    _require(bool(str(cfg.workdir).strip()), "workdir", "must not be empty")
    _require(0 <= cfg.seed <= MAX_SEED, "seed", f"must be in [0, {MAX_SEED}] (2**32 - 1), got {cfg.seed}")
    t = cfg.train
    _require(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    _require(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    _require(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    _require(t.batch_size % t.grad_accum_steps == 0, "train.batch_size",
             f"({t.batch_size}) must be divisible by train.grad_accum_steps ({t.grad_accum_steps})")
    _require(t.schedule in ("cosine", "rsqrt", "constant"), "train.schedule",
             f"must be cosine, rsqrt or constant, got {t.schedule!r}")
    _require(t.on_nonfinite in ("stop", "skip"), "train.on_nonfinite", f"must be stop or skip, got {t.on_nonfinite!r}")
    _require(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    _require(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    if t.profile_steps is not None:
        _require(profile_range(t.profile_steps) is not None, "train.profile_steps",
                 f"must be START:END with 1 <= START <= END (steps to trace), got {t.profile_steps!r}")
    if t.hang_timeout is not None:
        _require(t.hang_timeout >= 0, "train.hang_timeout",
                 f"must be >= 0 seconds (0 turns the watchdog off; unset = automatic), got {t.hang_timeout}")
    _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 disables eval), got {t.eval_every}")
    _require(t.eval_batches >= 0, "train.eval_batches",
             f"must be >= 0 (0 = the whole held-out split), got {t.eval_batches}")
    _require(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _require(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
    _require(0.0 <= t.end_learning_rate_ratio <= 1.0, "train.end_learning_rate_ratio",
             f"must be in [0, 1] (a fraction of the peak), got {t.end_learning_rate_ratio}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(0.0 <= t.adam_b1 < 1.0, "train.adam_b1", f"must be in [0, 1), got {t.adam_b1}")
    _require(0.0 <= t.adam_b2 < 1.0, "train.adam_b2", f"must be in [0, 1), got {t.adam_b2}")
    _require(t.adam_eps > 0, "train.adam_eps", f"must be > 0 (it keeps Adam's division finite), got {t.adam_eps}")
    _require(t.grad_clip_norm >= 0, "train.grad_clip_norm",
             f"must be >= 0 (0 disables clipping), got {t.grad_clip_norm}")
    for name in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, name)
        _require(size == -1 or size >= 1, f"mesh.{name}", f"must be -1 (fill) or >= 1, got {size}")
    _require(sum(getattr(cfg.mesh, n) == -1 for n in ("data", "fsdp", "tensor")) <= 1, "mesh",
             "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    for name in ("dcn_data", "dcn_fsdp"):
        size = getattr(cfg.mesh, name)
        _require(size >= 1, f"mesh.{name}", f"must be >= 1 (ways across slices; 1 = within one), got {size}")
    c = cfg.checkpoint
    _require(c.every >= 0, "checkpoint.every", f"must be >= 0 (0 disables), got {c.every}")
    _require(c.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.keep}")
    _require(c.keep_period >= 0, "checkpoint.keep_period", f"must be >= 0 (0 disables), got {c.keep_period}")
    rc = cfg.runtime.cpu_devices
    _require(rc is None or 1 <= rc <= MAX_CPU_DEVICES, "runtime.cpu_devices",
             f"must be in [1, {MAX_CPU_DEVICES}], got {rc}")
    p = cfg.runtime.platform
    _require(p is None or bool(p.strip()), "runtime.platform", "must be a JAX platform (cpu, gpu, tpu) or null")
    for section in (cfg.model, cfg.data, cfg.distributed, cfg.decode):
        try:
            section.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _validate_across_sections(cfg)


MAX_CPU_DEVICES = 4096


def _validate_across_sections(cfg: Config) -> None:
    """Keys that are only wrong together (lengths vs positions, vocabulary vs data, eval data)."""
    m, d = cfg.model, cfg.data
    longest = max(d.inputs_length, d.targets_length)
    if m.positions == "learned":
        _require(m.max_length >= longest, "model.max_length",
                 f"({m.max_length}) must be >= the longest sequence, max(data.inputs_length, data.targets_length) "
                 f"= {longest}, with model.positions=learned (the position table has model.max_length rows)")
    sources = [c.source for _, _, c in d.sources()] if d.mixture else [d.source]
    if "synthetic" in sources:
        _require(m.vocab_size is not None, "model.vocab_size",
                 "must be set for data.source=synthetic (there is no tokenizer to take it from)")
        _require(m.vocab_size > 5, "model.vocab_size",
                 f"must be > 5 for data.source=synthetic (4 reserved ids + at least 2 tokens), got {m.vocab_size}")
    if cfg.train.eval_every > 0 and not d.mixture and d.source in ("embedded", "tsv", "jsonl") \
            and not d.eval_path and d.eval_fraction == 0:
        _require(False, "data.eval_fraction", f"is 0 and data.eval_path is unset, so there is no held-out data "
                 f"for train.eval_every={cfg.train.eval_every}: set data.eval_fraction > 0, data.eval_path, "
                 "or train.eval_every=0")
    if cfg.decode.max_length is not None:
        limit = max_length_limit(d, m)
        _require(cfg.decode.max_length <= limit, "decode.max_length",
                 f"({cfg.decode.max_length}) must be <= {limit}: " + (
                     f"the learned position table has model.max_length={m.max_length} rows"
                     if m.positions == "learned" else
                     f"the longer of model.max_length ({m.max_length}) and data.targets_length ({d.targets_length})"))


def _check_finite(node: Any, prefix: str) -> None:
    """Every float key must be a finite number (YAML reads `.inf` and `.nan`)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key `{key}` must be a finite number, got {value}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key `{key}` {message}")
