"""Encoder and decoder layers: attention and feed-forward sublayers with residuals.

Each sublayer is `x + dropout(f(norm(x)))` (pre-LN, default) or `norm(x + dropout(f(x)))`
(post-LN, the original paper). Dropout keys come from the caller: one key per layer, split
here into one per call site, so every mask differs.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from model import axes
from model.attention import MultiHeadAttention
from model.config import ModelConfig
from model.layers import FeedForward, Norm, dropout, split_key


def _sublayer(
    cfg: ModelConfig,
    norm: Norm,
    x: jax.Array,
    fn: Callable[[jax.Array], jax.Array],
    rng: jax.Array | None,
    deterministic: bool,
) -> jax.Array:
    """Residual wrapper shared by every sublayer (norm placement, residual dropout)."""
    if cfg.norm_position == "pre":
        y = x + dropout(fn(norm(x)), cfg.dropout, rng, deterministic=deterministic)
    else:
        y = norm(x + dropout(fn(x), cfg.dropout, rng, deterministic=deterministic))
    return axes.constrain(y, axes.BLE)


class EncoderBlock(nnx.Module):
    """Self-attention + feed-forward."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_norm = Norm(cfg, rngs=rngs)
        self.self_attention = MultiHeadAttention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(
        self, x: jax.Array, mask: jax.Array | None, *, deterministic: bool = True, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """x [batch, len, embed]; mask [batch, 1, len, len] or None."""
        cfg = self.cfg
        k_attn, k_res1, k_res2 = split_key(dropout_rng, 3)
        x = axes.constrain(x, axes.BLE)
        x = _sublayer(
            cfg,
            self.attention_norm,
            x,
            lambda h: self.self_attention(h, h, mask, deterministic=deterministic, dropout_rng=k_attn),
            k_res1,
            deterministic,
        )
        return _sublayer(cfg, self.mlp_norm, x, self.mlp, k_res2, deterministic)


class DecoderBlock(nnx.Module):
    """Causal self-attention, cross-attention over the encoder output, feed-forward."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.self_attention_norm = Norm(cfg, rngs=rngs)
        self.self_attention = MultiHeadAttention(cfg, rngs=rngs)
        self.cross_attention_norm = Norm(cfg, rngs=rngs)
        self.cross_attention = MultiHeadAttention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array,
        self_mask: jax.Array | None,
        cross_mask: jax.Array | None,
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """x [batch, tgt_len, embed]; encoded [batch, src_len, embed]; masks [b, 1, q, kv]."""
        cfg = self.cfg
        k_sa, k_ca, k_r1, k_r2, k_r3 = split_key(dropout_rng, 5)
        x = axes.constrain(x, axes.BLE)
        x = _sublayer(
            cfg,
            self.self_attention_norm,
            x,
            lambda h: self.self_attention(h, h, self_mask, deterministic=deterministic, dropout_rng=k_sa),
            k_r1,
            deterministic,
        )
        x = _sublayer(
            cfg,
            self.cross_attention_norm,
            x,
            lambda h: self.cross_attention(h, encoded, cross_mask, deterministic=deterministic, dropout_rng=k_ca),
            k_r2,
            deterministic,
        )
        return _sublayer(cfg, self.mlp_norm, x, self.mlp, k_r3, deterministic)
