"""Model hyper-parameters.

The trainer builds `ModelConfig` field by field from the YAML `model:` section, so the field
names are part of the config contract; `validate()` reports problems as `model.<field>` so the
user can find the key to fix.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

ACTIVATIONS = ("relu", "gelu", "gated_gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("sinusoidal", "learned", "relative")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "minimal", "dots")
ATTENTION_IMPLS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of the encoder-decoder Transformer."""

    # Real vocabulary size. None (the default): the tokenizer's size, filled in by the trainer
    # once the data pipeline's tokenizer is known (the run's config.yaml records the value).
    vocab_size: int | None = None
    vocab_multiple: int = 128  # embedding/logit rows padded up to a multiple of this
    d_model: int = 512
    num_heads: int = 8
    head_dim: int | None = None  # None -> d_model // num_heads
    mlp_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.1  # embedding + residual dropout
    attention_dropout: float = 0.0
    activation: str = "relu"  # relu | gelu | gated_gelu | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post (post = original paper)
    norm_eps: float = 1e-6
    positions: str = "sinusoidal"  # sinusoidal | learned | relative (T5's bucketed bias on attention logits)
    relative_buckets: int = 32  # positions=relative: buckets of the bias table (T5: 32)
    relative_max_distance: int = 128  # positions=relative: distances beyond this share the last bucket
    # Divide attention logits by sqrt(head_dim). T5 does not: it folds the factor into the query
    # projection's initialisation (false here does the same), so pretrained T5 weights need false.
    attention_scaling: bool = True
    max_length: int = 512  # size of the position table
    share_embeddings: bool = True  # one token table for source and target
    tie_output: bool = True  # logits through the (target) embedding table
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # storage dtype of the parameters (and Adam moments)
    scan_layers: bool = False
    remat: str = "none"  # none | full | minimal (save dots without batch dims) | dots
    # xla: our einsum attention (any device, attention dropout); cudnn: cuDNN's fused (flash)
    # kernel through jax.nn.dot_product_attention, NVIDIA GPUs in bfloat16, no attention dropout.
    attention_impl: str = "xla"

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding/logit tables: a multiple of `vocab_multiple` (tensor-shardable)."""
        if self.vocab_size is None:
            raise ValueError("model.vocab_size: unset; it is resolved from the tokenizer before the model is built")
        m = max(int(self.vocab_multiple), 1)
        return -(-int(self.vocab_size) // m) * m

    @property
    def kv_dim(self) -> int:
        """Per-head dimension (`head_dim`, or d_model // num_heads when unset)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def validate(self) -> None:
        """Raise ValueError naming `model.<field>` for any impossible value."""

        def fail(field: str, what: str) -> None:
            raise ValueError(f"model.{field}: {what}")

        def check_int(field: str, minimum: int) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                fail(field, f"must be an integer, got {v!r}")
            if v < minimum:
                fail(field, f"must be >= {minimum}, got {v}")

        if self.vocab_size is not None:
            check_int("vocab_size", 1)
        for field in ("vocab_multiple", "d_model", "num_heads", "mlp_dim", "max_length"):
            check_int(field, 1)
        for field in ("encoder_layers", "decoder_layers"):
            check_int(field, 1)
        check_int("relative_buckets", 4)
        check_int("relative_max_distance", 1)
        if self.relative_max_distance < self.relative_buckets:
            fail("relative_max_distance", f"must be >= model.relative_buckets ({self.relative_buckets}): the "
                 f"buckets up to half of them are exact distances, got {self.relative_max_distance}")
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                fail(
                    "num_heads",
                    f"d_model={self.d_model} is not divisible by num_heads={self.num_heads} "
                    "(set model.head_dim explicitly or change the sizes)",
                )
        else:
            check_int("head_dim", 1)
        for field in ("dropout", "attention_dropout"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                fail(field, f"must be a number in [0, 1), got {v!r}")
        if (isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float))
                or not 0 < self.norm_eps < 1 or not math.isfinite(self.norm_eps)):
            fail("norm_eps", f"must be a number in (0, 1), got {self.norm_eps!r}")
        for field, allowed in (
            ("activation", ACTIVATIONS),
            ("norm", NORMS),
            ("norm_position", NORM_POSITIONS),
            ("positions", POSITIONS),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
            ("remat", REMAT_POLICIES),
            ("attention_impl", ATTENTION_IMPLS),
        ):
            v = getattr(self, field)
            if v not in allowed:
                fail(field, f"must be one of {', '.join(allowed)}; got {v!r}")
        for field in ("share_embeddings", "tie_output", "scan_layers", "attention_scaling"):
            if not isinstance(getattr(self, field), bool):
                fail(field, f"must be true or false, got {getattr(self, field)!r}")
        if self.attention_impl == "cudnn":
            if self.dtype != "bfloat16":
                fail("attention_impl", f"cudnn runs in bfloat16 only: set model.dtype=bfloat16 (got {self.dtype!r})")
            if self.attention_dropout > 0:
                fail("attention_impl", "cudnn has no attention dropout here: set model.attention_dropout=0 or "
                     "model.attention_impl=xla")
            if self.kv_dim % 8 or self.kv_dim > 128:
                fail("attention_impl", f"cudnn needs a head dimension that is a multiple of 8, at most 128 (got "
                     f"{self.kv_dim})")
