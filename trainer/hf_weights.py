"""T5 weights in Hugging Face's files <-> our parameter tree, one shard at a time.

Names and layout follow the PyTorch checkpoints (`encoder.block.0.layer.0.SelfAttention.q.weight`,
a Linear's weight [out, in]), the layout of current Hub checkpoints; Flax checkpoints
(`flax_model.msgpack`, or safetensors with `format: flax`: kernels [in, out]) are read through
the same names. Every Linear maps by one rule, ours = weight.T reshaped (q [d, heads, kv] from
[heads * kv, d], o [heads, kv, d] from [d, heads * kv]); norms, the relative-bias tables and the
token table are copied as they are.

Import never builds the whole model on one host: each device's shard of each parameter is read
from the safetensors file(s) by `jax.make_array_from_callback`, slicing the tensor on disk
(msgpack has no random access, so a Flax msgpack checkpoint is read whole). Export gathers one
tensor at a time and writes safetensors files of at most `max_shard_bytes`, with the
`model.safetensors.index.json` of sharded Hub checkpoints when there is more than one.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from model import ModelConfig
from trainer.config import ConfigError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MSGPACK = "flax_model.msgpack"

# Stored by T5 checkpoints next to `shared.weight` (the same table, tied in transformers).
_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "o"}
# Decoder sublayers: which layer.N of a T5 block each of our modules lives in.
_ENCODER_SUBLAYERS = {"attention_norm": (0, None), "self_attention": (0, "SelfAttention"),
                      "mlp_norm": (1, None), "mlp": (1, "DenseReluDense")}
_DECODER_SUBLAYERS = {"self_attention_norm": (0, None), "self_attention": (0, "SelfAttention"),
                      "cross_attention_norm": (1, None), "cross_attention": (1, "EncDecAttention"),
                      "mlp_norm": (2, None), "mlp": (2, "DenseReluDense")}


# ------------------------------------------------------------------------------------- names


def _path_parts(path: tuple) -> list[str]:
    """Tree keys of a parameter, without the Variable attribute (`.value`) that NNX states end in."""
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]


def hf_name(parts: list[str], cfg: ModelConfig) -> tuple[str, bool]:
    """(T5 tensor name with `{layer}` for stacked layers, whether it is a Linear weight) of one of our
    parameters, given its path without the layer index (`encoder/layers/mlp/wi`)."""
    joined = "/".join(parts)
    fixed = {
        "token_embedding/embedding": ("shared.weight", False),
        "logits_dense/kernel": ("lm_head.weight", True),
        "encoder_relative_bias/embedding": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                            False),
        "decoder_relative_bias/embedding": ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                            False),
        "encoder/final_norm/scale": ("encoder.final_layer_norm.weight", False),
        "decoder/final_norm/scale": ("decoder.final_layer_norm.weight", False),
    }
    if joined in fixed:
        return fixed[joined]
    if len(parts) == 4 and parts[1] == "layers":  # stack / layers / module / leaf
        stack, module, leaf = parts[0], parts[-2], parts[-1]
        sublayers = _ENCODER_SUBLAYERS if stack == "encoder" else _DECODER_SUBLAYERS
        if module in sublayers:
            index, block = sublayers[module]
            prefix = f"{stack}.block.{{layer}}.layer.{index}"
            if block is None and leaf == "scale":
                return f"{prefix}.layer_norm.weight", False
            if block in ("SelfAttention", "EncDecAttention") and leaf in _ATTENTION:
                return f"{prefix}.{block}.{_ATTENTION[leaf]}.weight", True
            if block == "DenseReluDense":
                gated = cfg.activation != "relu"
                names = {"wi": "wi_1" if gated else "wi", "wi_gate": "wi_0", "wo": "wo"}
                if leaf in names:
                    return f"{prefix}.DenseReluDense.{names[leaf]}.weight", True
    raise ConfigError(f"parameter {joined} has no T5 equivalent (is this a T5-architecture model?)")


def parameter_map(params: Any, cfg: ModelConfig) -> list[tuple[tuple, str, bool, int | None]]:
    """For each leaf of our parameter tree: (its path, T5 name pattern, is_linear, stacked layers or None)."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = _path_parts(path)
        stacked = None
        if len(parts) > 2 and parts[1] == "layers":
            if parts[2].isdigit():  # a Python list of layers: the index is in the path
                name, linear = hf_name(parts[:2] + parts[3:], cfg)
                out.append((path, name.replace("{layer}", parts[2]), linear, None))
                continue
            stacked = cfg.encoder_layers if parts[0] == "encoder" else cfg.decoder_layers
        name, linear = hf_name(parts, cfg)
        out.append((path, name, linear, stacked))
    return out


# ------------------------------------------------------------------------------------- reading


class WeightFiles:
    """A checkpoint's tensors by T5 (PyTorch-layout) name, readable by slices of that layout."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._msgpack: dict[str, np.ndarray] | None = None
        self._files: dict[str, Path] = {}
        self._flax_layout = False
        self._shapes: dict[str, tuple[int, ...]] = {}
        index = self.directory / SAFETENSORS_INDEX
        single = self.directory / SAFETENSORS
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{index}: not a safetensors index ({e})") from None
            for name, file in weight_map.items():
                self._files[name] = self.directory / file
        elif single.is_file():
            self._files = {name: single for name in self._keys(single)}
        elif (self.directory / MSGPACK).is_file():
            self._msgpack = _read_msgpack(self.directory / MSGPACK)
            self._flax_layout = True
        else:
            raise ConfigError(f"{self.directory}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or {MSGPACK})")
        if self._msgpack is None:
            missing = sorted({str(f) for f in self._files.values() if not f.is_file()})
            if missing:
                raise ConfigError(f"{index}: lists {missing[0]}, which does not exist")
            formats = {self._format(f) for f in set(self._files.values())}
            if len(formats) > 1:
                raise ConfigError(f"{self.directory}: safetensors files of mixed layouts {sorted(formats)}")
            self._flax_layout = formats == {"flax"}
            if self._flax_layout:  # Flax names (kernel/embedding): keep the files, map the names
                self._files = {_pt_name(name): f for name, f in self._files.items()}
        self.names = set(self._files) if self._msgpack is None else set(self._msgpack)

    @staticmethod
    def _keys(path: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "numpy") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None

    @staticmethod
    def _format(path: Path) -> str:
        from safetensors import safe_open

        with safe_open(str(path), "numpy") as f:
            return (f.metadata() or {}).get("format", "pt")

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in PyTorch layout (read once: every shard of every layer asks)."""
        if name not in self._shapes:
            self._shapes[name] = self._read_shape(name)
        return self._shapes[name]

    def _read_shape(self, name: str) -> tuple[int, ...]:
        if self._msgpack is not None:
            return tuple(self._msgpack[name].shape)
        from safetensors import safe_open

        with safe_open(str(self._files[name]), "numpy") as f:
            shape = tuple(f.get_slice(self._stored_name(name)).get_shape())
        return shape[::-1] if self._transposed(name) else shape

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]` (PyTorch layout), float32, reading only that block from a safetensors file."""
        if self._msgpack is not None:
            return np.asarray(self._msgpack[name][index], np.float32)
        stored_index = index[::-1] if self._transposed(name) else index
        block = _read_block(self._files[name], self._stored_name(name), stored_index)
        return block.T if self._transposed(name) else block

    def _transposed(self, name: str) -> bool:
        return self._flax_layout and name.endswith(".weight") and _is_linear(name)

    def _stored_name(self, name: str) -> str:
        return _flax_name(name) if self._flax_layout else name


def _read_block(path: Path, name: str, index: tuple[slice, ...]) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        view = f.get_slice(name)
        if view.get_dtype() != "BF16":
            return np.asarray(view[index], np.float32)
    with safe_open(str(path), "flax") as f:  # numpy has no bfloat16: read through JAX, on the host
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return np.asarray(f.get_slice(name)[index], np.float32)


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
    """A Flax msgpack checkpoint as {PyTorch-layout name: array} (kernels transposed)."""
    from flax import serialization, traverse_util

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack's own error types
        raise ConfigError(f"{path}: not a readable Flax msgpack file ({e})") from None
    out = {}
    for key, value in traverse_util.flatten_dict(tree, sep=".").items():
        name = _pt_name(key)
        array = np.asarray(value)
        out[name] = array.T if key.endswith(".kernel") else array
    return out


def _is_linear(name: str) -> bool:
    return bool(re.search(r"\.(q|k|v|o|wi|wi_0|wi_1|wo)\.weight$", name)) or name == "lm_head.weight"


def _pt_name(flax_name: str) -> str:
    """Flax naming (kernel, embedding) -> PyTorch naming (weight)."""
    return re.sub(r"\.(kernel|embedding)$", ".weight", flax_name)


def _flax_name(pt_name: str) -> str:
    if _is_linear(pt_name):
        return pt_name[: -len("weight")] + "kernel"
    if pt_name == "shared.weight" or pt_name.endswith("relative_attention_bias.weight"):
        return pt_name[: -len("weight")] + "embedding"
    return pt_name


# ------------------------------------------------------------------------------------- import


def check_names(files: WeightFiles, entries: list[tuple[tuple, str, bool, int | None]], cfg: ModelConfig) -> None:
    """Every tensor the model needs is there, and nothing is left over; ConfigError naming the first."""
    wanted = set()
    for _, name, _, stacked in entries:
        wanted.update(name.format(layer=i) for i in range(stacked or 1))
    tolerated = set(_ALIASES) | ({"lm_head.weight"} if cfg.tie_output else set())
    missing = sorted(wanted - files.names)
    if missing:
        raise ConfigError(f"{files.directory}: weight {missing[0]} is missing" +
                          (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                          " for the model its config.json describes")
    unknown = sorted(files.names - wanted - tolerated)
    if unknown:
        raise ConfigError(f"{files.directory}: unexpected weight {unknown[0]}" +
                          (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "") +
                          ": not part of the T5 model its config.json describes")


def _split(name: str) -> int:
    """Where our Linear parameter splits into (in dims | out dims): attention o is [heads, kv | d];
    q/k/v [d | heads, kv], the MLP and the output head [in | out]."""
    return 2 if name.endswith(".o.weight") else 1


def _check_shape(files: WeightFiles, name: str, ours: tuple[int, ...], linear: bool) -> None:
    """The T5 tensor fits one layer of our parameter (`ours`); the vocabulary may be padded on our side."""
    shape = files.shape(name)
    if name == "lm_head.weight":
        ok = len(shape) == 2 and ours[0] == shape[1] and ours[1] >= shape[0]
    elif name == "shared.weight":
        ok = len(shape) == 2 and ours[1] == shape[1] and ours[0] >= shape[0]
    elif linear:
        s = _split(name)
        ok = len(shape) == 2 and (math.prod(ours[:s]), math.prod(ours[s:])) == (shape[1], shape[0])
    else:
        ok = tuple(shape) == tuple(ours)
    if not ok:
        raise ConfigError(f"{files.directory}: weight {name} has shape {list(shape)}, which does not fit the "
                          f"model's parameter of shape {list(ours)} (config.json and the weights disagree)")


def _norm(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(s.start or 0, s.stop if s.stop is not None else n) for s, n in zip(index, shape)]


def _layer_block(files: WeightFiles, name: str, linear: bool, ours: tuple[int, ...],
                 bounds: list[tuple[int, int]]) -> np.ndarray:
    """Our block `bounds` of one layer's parameter (shape `ours`), read from the T5 tensor `name`."""
    shape = files.shape(name)
    if not linear:  # same layout; rows past the tensor (vocab padding) are zeros
        (r0, r1), rest = bounds[0], bounds[1:]
        out = np.zeros([b - a for a, b in bounds], np.float32)
        if r0 < shape[0]:
            data = files.read(name, (slice(r0, min(r1, shape[0])),) + tuple(slice(a, b) for a, b in rest))
            out[: data.shape[0]] = data
        return out
    # ours = weight.T reshaped: dims [0, split) come from the weight's columns, the rest from its rows.
    split = _split(name)
    in_dims, out_dims = ours[:split], ours[split:]

    def flat_range(dims: tuple[int, ...], b: list[tuple[int, int]]) -> tuple[int, int]:
        inner = math.prod(dims[1:])  # a range of the first dim with the inner dims whole
        return b[0][0] * inner, b[0][1] * inner

    c0, c1 = flat_range(in_dims, bounds[:split])
    r0, r1 = flat_range(out_dims, bounds[split:])
    rows_stored = shape[0]
    block = np.zeros((r1 - r0, c1 - c0), np.float32)  # vocab padding (lm_head) stays zero
    if r0 < rows_stored:
        data = files.read(name, (slice(r0, min(r1, rows_stored)), slice(c0, c1)))
        block[: data.shape[0]] = data
    block = block.T.reshape((bounds[0][1] - bounds[0][0],) + in_dims[1:] +
                            (bounds[split][1] - bounds[split][0],) + out_dims[1:])
    inner = tuple(slice(a, b) for a, b in bounds[1:split]) + (slice(None),) + tuple(
        slice(a, b) for a, b in bounds[split + 1:])
    return block[(slice(None),) + inner]


def load_params(files: WeightFiles, target: Any, cfg: ModelConfig) -> Any:
    """Our parameter tree (ShapeDtypeStructs with shardings in `target`), filled from `files` shard by shard."""
    entries = parameter_map(target, cfg)
    check_names(files, entries, cfg)
    leaves = []
    flat = jax.tree_util.tree_flatten_with_path(target)[0]
    treedef = jax.tree_util.tree_structure(target)
    for (path, spec), (_, name, linear, stacked) in zip(flat, entries):
        per_layer = tuple(spec.shape[1:]) if stacked else tuple(spec.shape)
        for i in range(stacked or 1):
            _check_shape(files, name.format(layer=i), per_layer, linear)

        def read(index: tuple, name=name, linear=linear, stacked=stacked, per_layer=per_layer,
                 dtype=spec.dtype, shape=spec.shape) -> np.ndarray:
            bounds = _norm(index, shape)
            if not stacked:
                return _layer_block(files, name, linear, per_layer, bounds).astype(dtype)
            return np.stack([_layer_block(files, name.format(layer=i), linear, per_layer, bounds[1:])
                             for i in range(*bounds[0])]).astype(dtype)

        leaves.append(jax.make_array_from_callback(spec.shape, spec.sharding, read))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------------------------- export


def hf_tensors(params: Any, cfg: ModelConfig, vocab_rows: int) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(T5 name, function giving the tensor in PyTorch layout) for every tensor of the checkpoint.

    The functions gather one parameter at a time (every process takes part; the result is on
    all of them), so the caller never holds more than one tensor.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, array), (_, name, linear, stacked) in zip(flat, parameter_map(params, cfg)):
        def whole(array=array) -> np.ndarray:
            return np.asarray(multihost_utils.process_allgather(array, tiled=True))

        def convert(layer: np.ndarray, name: str, linear: bool) -> np.ndarray:
            if name == "shared.weight":
                layer = layer[:vocab_rows]
            elif name == "lm_head.weight":
                layer = layer[:, :vocab_rows]
            if linear:
                layer = layer.reshape(math.prod(layer.shape[:_split(name)]), -1).T
            return np.ascontiguousarray(layer)

        if stacked:
            cache: dict[str, np.ndarray] = {}
            for i in range(stacked):
                def one(i=i, name=name, linear=linear, whole=whole, cache=cache) -> np.ndarray:
                    if "all" not in cache:
                        cache["all"] = whole()
                    out = convert(cache["all"][i], name.format(layer=i), linear)
                    if i == stacked - 1:
                        cache.clear()
                    return out
                yield name.format(layer=i), one
        else:
            yield name, lambda whole=whole, name=name, linear=linear: convert(whole(), name, linear)


def write_safetensors(tensors: Iterator[tuple[str, Callable[[], np.ndarray]]], out: str | Path, *,
                      max_shard_bytes: int, write: bool) -> list[str]:
    """Writes `model.safetensors`, or numbered shards plus the index above `max_shard_bytes`.

    Every process calls this (the tensors are gathered collectively); only `write` ones write.
    Returns the files written.
    """
    from safetensors.numpy import save_file

    out = Path(out)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    total = 0
    names: list[tuple[str, int]] = []
    tmp_files: list[Path] = []

    def flush() -> None:
        if shards[-1] and write:
            path = out / f".shard-{len(tmp_files):05d}.safetensors"
            save_file(shards[-1], str(path), metadata={"format": "pt"})
            tmp_files.append(path)
        elif shards[-1]:
            tmp_files.append(Path("unused"))
        shards[-1] = {}
        sizes[-1] = 0

    for name, get in tensors:
        tensor = get()
        if sizes[-1] and sizes[-1] + tensor.nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = tensor
        sizes[-1] += tensor.nbytes
        total += tensor.nbytes
        names.append((name, len(tmp_files)))
    flush()
    if not write:
        return []
    if len(tmp_files) == 1:
        final = [out / SAFETENSORS]
    else:
        final = [out / f"model-{i + 1:05d}-of-{len(tmp_files):05d}.safetensors" for i in range(len(tmp_files))]
    for src, dst in zip(tmp_files, final):
        os.replace(src, dst)
    if len(final) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: final[i].name for n, i in names}}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [str(p) for p in final] + [str(out / SAFETENSORS_INDEX)]
    return [str(p) for p in final]
