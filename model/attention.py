"""Scaled dot-product attention, attention masks and multi-head attention (with a KV cache).

Masks are boolean, shaped [batch, 1 or heads, q_len, kv_len], True = may attend. They are
built from padding, causality and packed segments and combined with a logical and.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.config import ModelConfig
from model.layers import dense, dropout

# Finite, so masked logits never make inf - inf = NaN; exp() of it is exactly 0 in float32.
_MASK_VALUE = -1e10


def make_attention_mask(query_valid: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Padding mask [batch, 1, q_len, kv_len] from per-position validity [batch, len]."""
    return jnp.logical_and(query_valid[:, None, :, None].astype(bool), key_valid[:, None, None, :].astype(bool))


def make_causal_mask(length: int, key_length: int | None = None, offset: int = 0) -> jax.Array:
    """Causal mask [1, 1, length, key_length]: query i sees keys j <= i + offset.

    `offset` lets an incremental decoder place a block of queries after cached keys.
    """
    key_length = length if key_length is None else key_length
    q = jnp.arange(length)[:, None] + offset
    k = jnp.arange(key_length)[None, :]
    return (k <= q)[None, None]


def make_segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Packed-example mask [batch, 1, q_len, kv_len]: same segment and neither is padding (id 0)."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    valid = jnp.logical_and(q_segment_ids[:, :, None] != 0, kv_segment_ids[:, None, :] != 0)
    return jnp.logical_and(same, valid)[:, None]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical and of the given masks (None entries ignored; None if all are None)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    dtype: jnp.dtype | None = None,
    bias: jax.Array | None = None,
    scale: bool = True,
) -> jax.Array:
    """Softmax(q k^T / sqrt(kv) + bias) v over [batch, len, heads, kv] arrays (no 1/sqrt(kv) when
    `scale` is False: T5's convention, which folds it into the query's initialisation).

    `bias` [batch or 1, heads, q_len, kv_len] (a relative position bias) is added to the scaled
    logits before masking.

    The logits and the softmax are float32 whatever the compute dtype (bf16 softmax loses too much
    precision); probabilities are cast back to `dtype` for the value product. Rows whose mask is
    all False (padding queries) return zeros instead of NaN.
    """
    dtype = query.dtype if dtype is None else dtype
    logits = jnp.einsum("bqhk,bthk->bhqt", query, key, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32)
    if scale:
        logits = logits * (1.0 / float(query.shape[-1]) ** 0.5)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(mask, probs, 0.0)  # fully masked rows: uniform -> zeros
    if not deterministic and dropout_rate > 0.0:
        probs = dropout(probs, dropout_rate, dropout_rng, deterministic=False)
    out = jnp.einsum("bhqt,bthk->bqhk", probs.astype(dtype), value.astype(dtype))
    return out


def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None, *,
                    bias: jax.Array | None = None, scale: bool = True) -> jax.Array:
    """`dot_product_attention` through cuDNN's fused kernel (`model.attention_impl=cudnn`).

    The same function without the [batch, heads, q_len, kv_len] logits in memory: cuDNN folds the
    mask into its bias and never writes the probabilities. bfloat16 inputs, no attention dropout
    (the config checks both); fully masked query rows give zeros, as in the XLA path.
    """
    factor = 1.0 / float(query.shape[-1]) ** 0.5 if scale else 1.0
    bias = None if bias is None else bias.astype(query.dtype)
    out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=factor,
                                       implementation="cudnn")
    if mask is not None:
        out = out * jnp.any(mask, axis=-1)[:, 0, :, None, None].astype(out.dtype)
    return out


# A layer's key/value cache: (keys, values), each [batch, cache_length, heads, kv].
KVCache = tuple[jax.Array, jax.Array]


def _write(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """`new` [batch, n, heads, kv] written into `buffer` at positions index..index+n-1."""
    updated = jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, index, 0, 0))
    return axes.constrain(updated, axes.BLHK)


class MultiHeadAttention(nnx.Module):
    """Q/K/V/O projections (no biases, t5x style) around `dot_product_attention`.

    One module for training, eval and incremental decoding: `__call__` takes an optional
    key/value cache, so an attention variant (a position bias, another score function) is
    written once and every pass uses it. Modes:

    - no cache: keys/values are projected from `inputs_kv` (training, eval, the full pass);
    - `cache` and `cache_index`: the keys/values of `inputs_kv` are written into the cache
      buffers at `cache_index` and the queries attend over the whole buffers (decoder
      self-attention, one step at a time; `mask` hides the positions not yet written);
    - `cache` without `cache_index`: the cached keys/values are used as they are and
      `inputs_kv` is ignored (cross-attention over an encoder output projected once, by
      `project_key_value`, when the decoding cache was made).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, k = cfg.d_model, cfg.num_heads, cfg.kv_dim
        pd = jnp.dtype(cfg.param_dtype)
        qkv_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        names = (axes.EMBED, axes.HEADS, axes.KV)
        # Without logit scaling the query starts 1/sqrt(kv) smaller, so the initial logits match.
        q_init = qkv_init if cfg.attention_scaling else nnx.initializers.variance_scaling(
            1.0 / k, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        self.query = axes.make_param(rngs, q_init, (d, h, k), names, pd)
        self.key = axes.make_param(rngs, qkv_init, (d, h, k), names, pd)
        self.value = axes.make_param(rngs, qkv_init, (d, h, k), names, pd)
        self.out = axes.make_param(rngs, out_init, (h, k, d), (axes.HEADS, axes.KV, axes.EMBED), pd)

    def _project(self, x: jax.Array, kernel: nnx.Param) -> jax.Array:
        dt = self.cfg.compute_dtype
        w = kernel[...].astype(dt)
        y = dense(x.astype(dt), w.reshape(w.shape[0], -1)).reshape(*x.shape[:-1], *w.shape[1:])
        return axes.constrain(y, axes.BLHK)

    def project_key_value(self, x: jax.Array) -> KVCache:
        """Keys and values [batch, len, heads, kv] of `x`: a read-only cache for cross-attention."""
        return self._project(x, self.key), self._project(x, self.value)

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None,
        mask: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
        bias: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attention output [batch, q_len, embed] and the cache after this call (None without one).

        `bias` [batch or 1, heads, q_len, kv_len] is added to the attention logits (the stack's
        relative position bias; with a cache, kv_len is the cache length).

        Self-attention when inputs_kv is inputs_q, cross-attention otherwise; see the class
        docstring for the cache modes.
        """
        dt = self.cfg.compute_dtype
        q = self._project(inputs_q, self.query)
        if cache is None:
            k, v = self.project_key_value(inputs_kv)
        elif cache_index is None:
            k, v = cache
        else:
            new_k, new_v = self.project_key_value(inputs_kv)
            k, v = _write(cache[0], new_k, cache_index), _write(cache[1], new_v, cache_index)
            cache = (k, v)
        if self.cfg.attention_impl == "cudnn" and cache is None:  # cached steps: one query row, XLA's path
            y = cudnn_attention(q, k, v, mask, bias=bias, scale=self.cfg.attention_scaling)
        else:
            y = dot_product_attention(q, k, v, mask, dropout_rate=self.cfg.attention_dropout, dropout_rng=dropout_rng,
                                      deterministic=deterministic, dtype=dt, bias=bias,
                                      scale=self.cfg.attention_scaling)
        y = axes.constrain(y, axes.BLHK)
        w = self.out[...].astype(dt)
        out = dense(y.reshape(*y.shape[:-2], -1), w.reshape(-1, w.shape[-1]))
        return axes.constrain(out, axes.BLE), cache
