"""Hugging Face T5 `config.json` <-> our `model.*` options.

T5, T5 v1.1, Flan-T5, mT5 and ByT5 are one architecture in `transformers` (`T5Config`): pre-norm
RMSNorm without bias, relative position bias, no 1/sqrt(d) in attention, shared input embeddings.
What varies between them is a handful of fields, each mapped to one of our keys below. A field
whose value we cannot reproduce exactly is an error that names it: importing a model that would
compute something else is worse than refusing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model import ModelConfig
from trainer.config import ConfigError

# feed_forward_proj -> model.activation. Plain "gelu" is refused: transformers uses the exact
# (erf) GELU there and we the tanh form; the gated variant uses the tanh form ("gelu_new") in both.
_ACTIVATIONS = {"relu": "relu", "gated-gelu": "gated_gelu", "gated-silu": "swiglu"}
_DENSE_ACT = {"relu": "relu", "gated_gelu": "gelu_new", "swiglu": "silu"}

# Every T5 checkpoint has these ids; our tokenizers and searches assume them.
_FIXED_IDS = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def model_options(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """`model.*` values reproducing a T5Config exactly (vocab_size is the checkpoint's table rows).

    Raises ConfigError naming the first field we do not support.
    """

    def fail(field: str, what: str) -> None:
        raise ConfigError(f"{source}: field `{field}` {what}")

    model_type = config.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        fail("model_type", f"is {model_type!r}; only T5-family checkpoints (t5, mt5) can be imported")
    if config.get("is_encoder_decoder", True) is not True:
        fail("is_encoder_decoder", "must be true (an encoder-decoder T5)")
    for field, value in _FIXED_IDS.items():
        got = config.get(field, 0 if field == "decoder_start_token_id" else value)
        if got != value:
            fail(field, f"is {got!r}; T5-family models here use {value}")
    proj = config.get("feed_forward_proj", "relu")
    if proj not in _ACTIVATIONS:
        fail("feed_forward_proj", f"is {proj!r}; supported: {', '.join(_ACTIVATIONS)}")
    activation = _ACTIVATIONS[proj]
    dense_act = config.get("dense_act_fn")
    if dense_act is not None and dense_act != _DENSE_ACT[activation]:
        fail("dense_act_fn", f"is {dense_act!r}; with feed_forward_proj={proj!r} only {_DENSE_ACT[activation]!r} "
                             "is supported")
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        if not isinstance(config.get(field), int) or isinstance(config.get(field), bool):
            fail(field, f"must be an integer, got {config.get(field)!r}")
    decoder_layers = config.get("num_decoder_layers")
    options = {
        "vocab_size": config["vocab_size"],
        "vocab_multiple": 1,
        "d_model": config["d_model"],
        "num_heads": config["num_heads"],
        "head_dim": config["d_kv"],
        "mlp_dim": config["d_ff"],
        "encoder_layers": config["num_layers"],
        "decoder_layers": config["num_layers"] if decoder_layers is None else decoder_layers,
        "activation": activation,
        "norm": "rmsnorm",
        "norm_position": "pre",
        "norm_eps": float(config.get("layer_norm_epsilon", 1e-6)),
        "positions": "relative",
        "relative_buckets": config.get("relative_attention_num_buckets", 32),
        "relative_max_distance": config.get("relative_attention_max_distance", 128),
        "attention_scaling": False,
        "share_embeddings": True,
        "tie_output": bool(config.get("tie_word_embeddings", True)),
        "dropout": float(config.get("dropout_rate", 0.1)),
        "attention_dropout": 0.0,
    }
    try:
        ModelConfig(**options).validate()
    except ValueError as e:  # e.g. relative_max_distance < relative_buckets
        raise ConfigError(f"{source}: unsupported values: {e}") from None
    return options


def hf_config(model: ModelConfig, vocab_rows: int) -> dict[str, Any]:
    """The `config.json` of our model in T5's format (`vocab_rows` embedding rows are written)."""
    if (model.norm, model.norm_position, model.positions, model.attention_scaling, model.share_embeddings) != (
            "rmsnorm", "pre", "relative", False, True):
        raise ConfigError(
            "format=hf needs a T5-architecture model: model.norm=rmsnorm, model.norm_position=pre, "
            "model.positions=relative, model.attention_scaling=false, model.share_embeddings=true (this run has "
            f"{model.norm}, {model.norm_position}, {model.positions}, {str(model.attention_scaling).lower()}, "
            f"{str(model.share_embeddings).lower()})")
    proj = {v: k for k, v in _ACTIVATIONS.items()}.get(model.activation)
    if proj is None:
        raise ConfigError(f"format=hf: model.activation={model.activation} has no T5 equivalent "
                          f"(supported: {', '.join(_ACTIVATIONS.values())})")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": vocab_rows,
        "d_model": model.d_model,
        "d_kv": model.kv_dim,
        "d_ff": model.mlp_dim,
        "num_layers": model.encoder_layers,
        "num_decoder_layers": model.decoder_layers,
        "num_heads": model.num_heads,
        "relative_attention_num_buckets": model.relative_buckets,
        "relative_attention_max_distance": model.relative_max_distance,
        "dropout_rate": model.dropout,
        "layer_norm_epsilon": model.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": proj,
        "dense_act_fn": _DENSE_ACT[model.activation],
        "is_gated_act": model.activation != "relu",
        "tie_word_embeddings": model.tie_output,
        "use_cache": True,
        **_FIXED_IDS,
    }
