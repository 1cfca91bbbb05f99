"""Encoder and decoder layers: attention and feed-forward sublayers with residuals.

Each sublayer is `x + dropout(f(norm(x)))` (pre-LN, default) or `norm(x + dropout(f(x)))`
(post-LN, the original paper). Dropout keys come from the caller: one key per layer, split
here into one per call site, so every mask differs.

`DecoderBlock` is the same code for the full (teacher-forced) pass and for incremental
decoding: given a layer cache it hands it to its attention modules, which read and write it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from model import axes
from model.attention import MultiHeadAttention
from model.config import ModelConfig
from model.layers import FeedForward, Norm, dropout, split_key

# One decoder layer's cache, each entry [batch, len, heads, kv]: self_k/self_v are written
# at the step's index, cross_k/cross_v (the encoder output's keys/values) are only read.
LayerCache = dict[str, jax.Array]


def _sublayer(
    cfg: ModelConfig,
    norm: Norm,
    x: jax.Array,
    fn: Callable[[jax.Array], tuple[jax.Array, Any]],
    rng: jax.Array | None,
    deterministic: bool,
) -> tuple[jax.Array, Any]:
    """Residual wrapper shared by every sublayer (norm placement, residual dropout).

    `fn` returns (output, extra); `extra` (an attention's updated cache) is passed back.
    """
    if cfg.norm_position == "pre":
        out, extra = fn(norm(x))
        y = x + dropout(out, cfg.dropout, rng, deterministic=deterministic)
    else:
        out, extra = fn(x)
        y = norm(x + dropout(out, cfg.dropout, rng, deterministic=deterministic))
    return axes.constrain(y, axes.BLE), extra


class EncoderBlock(nnx.Module):
    """Self-attention + feed-forward."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_norm = Norm(cfg, rngs=rngs)
        self.self_attention = MultiHeadAttention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        *,
        bias: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """x [batch, len, embed]; mask [batch, 1, len, len] or None; bias: the stack's position bias."""
        cfg = self.cfg
        k_attn, k_res1, k_res2 = split_key(dropout_rng, 3)
        x = axes.constrain(x, axes.BLE)
        x, _ = _sublayer(
            cfg,
            self.attention_norm,
            x,
            lambda h: self.self_attention(h, h, mask, bias=bias, deterministic=deterministic, dropout_rng=k_attn),
            k_res1,
            deterministic,
        )
        x, _ = _sublayer(cfg, self.mlp_norm, x, lambda h: (self.mlp(h), None), k_res2, deterministic)
        return x


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
        encoded: jax.Array | None,
        self_mask: jax.Array | None,
        cross_mask: jax.Array | None,
        *,
        cache: LayerCache | None = None,
        cache_index: jax.Array | None = None,
        self_bias: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x [batch, tgt_len, embed]; encoded [batch, src_len, embed]; masks [b, 1, q, kv].
        `self_bias`: the stack's position bias for self-attention (cross-attention has none).

        With `cache` (incremental decoding) x holds the positions from `cache_index` on,
        `encoded` is not read (the cache has its keys/values) and the second result is the
        written part of the cache, {self_k, self_v}; without, it is None.
        """
        cfg = self.cfg
        k_sa, k_ca, k_r1, k_r2, k_r3 = split_key(dropout_rng, 5)
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = (cache["self_k"], cache["self_v"]), (cache["cross_k"], cache["cross_v"])
        x = axes.constrain(x, axes.BLE)
        x, self_cache = _sublayer(
            cfg,
            self.self_attention_norm,
            x,
            lambda h: self.self_attention(
                h,
                h,
                self_mask,
                cache=self_cache,
                cache_index=cache_index,
                bias=self_bias,
                deterministic=deterministic,
                dropout_rng=k_sa,
            ),
            k_r1,
            deterministic,
        )
        x, _ = _sublayer(
            cfg,
            self.cross_attention_norm,
            x,
            lambda h: self.cross_attention(
                h, encoded, cross_mask, cache=cross_cache, deterministic=deterministic, dropout_rng=k_ca
            ),
            k_r2,
            deterministic,
        )
        x, _ = _sublayer(cfg, self.mlp_norm, x, lambda h: (self.mlp(h), None), k_r3, deterministic)
        written = None if self_cache is None else {"self_k": self_cache[0], "self_v": self_cache[1]}
        return x, written
