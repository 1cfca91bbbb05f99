"""Incremental decoding: a key/value cache for the decoder and a one-position step.

The decoder runs one target position at a time. Self-attention keys/values of the positions
already decoded live in a fixed-size cache (written in place at `index`); the cross-attention
keys/values of the encoder output are projected once, when the cache is created. The result of
`decode_step` over positions 0..t equals `Transformer.decode` over the same prefix.

The cache is a plain dict pytree (so `jax.lax.while_loop`, jit and the searches in
`model.search` handle it without NNX code):

  self_k, self_v    [layers, batch, max_length, heads, kv]   decoder self-attention cache
  cross_k, cross_v  [layers, batch, src_len, heads, kv]      encoder keys/values, computed once
  source_valid      [batch, src_len] bool                    cross-attention padding mask
  index             int32 scalar                             next position to write

Caches carry logical axis names (`activation_batch`, `activation_heads`, ...) like every other
activation, so the trainer's rules shard them (batch over data/fsdp, heads over tensor). The
layer axis is stacked both with and without `scan_layers`; under `scan_layers` the step is a
`jax.lax.scan` over the stacked decoder block's parameters (plain JAX transforms, so the step
can run inside the searches' `while_loop`, where NNX transforms refuse outer-trace modules).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.attention import make_attention_mask
from model.blocks import DecoderBlock, _sublayer
from model.transformer import PADDED_VOCAB_LOGIT, Transformer

Cache = dict[str, jax.Array]

# Logical names of the stacked cache arrays (the layer axis is never sharded).
CACHE_AXES = (None, axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)
SOURCE_AXES = (axes.ACT_BATCH, axes.ACT_LENGTH)

# Which axis of each cache entry is the batch (None: shared by all rows). The searches use it
# to repeat the cache per beam and to reorder it when beams change parents.
CACHE_BATCH_AXES = {"self_k": 1, "self_v": 1, "cross_k": 1, "cross_v": 1, "source_valid": 0, "index": None}


def cache_batch_axes(cache: Cache) -> dict[str, int | None]:
    """A pytree like `cache` whose leaves are the batch axis of each entry (or None)."""
    return {k: CACHE_BATCH_AXES[k] for k in cache}


def _constrain_cache(x: jax.Array) -> jax.Array:
    return axes.constrain(x, CACHE_AXES)


def _cross_key_value(block: DecoderBlock, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
    return block.cross_attention.project_key_value(encoded)


def init_cache(model: Transformer, inputs: jax.Array, max_length: int, *, encoded: jax.Array | None = None) -> Cache:
    """Encodes `inputs` [batch, src_len] (0 = padding) and returns an empty decoding cache.

    `max_length` is the number of target positions the cache holds (the longest output).
    """
    cfg = model.cfg
    if encoded is None:
        encoded = model.encode(inputs)
    layers = model.decoder.layers
    if cfg.scan_layers:
        graphdef, stacked = nnx.split(layers)
        cross_k, cross_v = jax.vmap(lambda layer_state: _cross_key_value(nnx.merge(graphdef, layer_state), encoded))(
            stacked
        )
    else:
        pairs = [_cross_key_value(block, encoded) for block in layers]
        cross_k = jnp.stack([k for k, _ in pairs])
        cross_v = jnp.stack([v for _, v in pairs])
    batch = inputs.shape[0]
    shape = (cfg.decoder_layers, batch, max_length, cfg.num_heads, cfg.kv_dim)
    zeros = jnp.zeros(shape, cfg.compute_dtype)
    return {
        "self_k": _constrain_cache(zeros),
        "self_v": _constrain_cache(zeros),
        "cross_k": _constrain_cache(cross_k.astype(cfg.compute_dtype)),
        "cross_v": _constrain_cache(cross_v.astype(cfg.compute_dtype)),
        "source_valid": axes.constrain(inputs != 0, SOURCE_AXES),
        "index": jnp.zeros((), jnp.int32),
    }


def _block_step(
    block: DecoderBlock,
    x: jax.Array,
    self_k: jax.Array,
    self_v: jax.Array,
    cross_k: jax.Array,
    cross_v: jax.Array,
    index: jax.Array,
    self_mask: jax.Array,
    cross_mask: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder block on one position: x [batch, 1, embed]; per-layer caches [b, len, h, kv].

    Mirrors `DecoderBlock.__call__` (deterministic): the same sublayers, with self-attention
    keys/values written into the cache at `index` and read back whole.
    """
    cfg = block.cfg
    new: dict[str, jax.Array] = {}

    def self_attention(h):
        attn = block.self_attention
        q = attn.project_query(h)
        k, v = attn.project_key_value(h)
        start = (0, index, 0, 0)
        new["k"] = axes.constrain(jax.lax.dynamic_update_slice(self_k, k.astype(self_k.dtype), start), axes.BLHK)
        new["v"] = axes.constrain(jax.lax.dynamic_update_slice(self_v, v.astype(self_v.dtype), start), axes.BLHK)
        return attn.attend(q, new["k"], new["v"], self_mask)

    def cross_attention(h):
        attn = block.cross_attention
        return attn.attend(attn.project_query(h), cross_k, cross_v, cross_mask)

    x = axes.constrain(x, axes.BLE)
    x = _sublayer(cfg, block.self_attention_norm, x, self_attention, None, True)
    x = _sublayer(cfg, block.cross_attention_norm, x, cross_attention, None, True)
    x = _sublayer(cfg, block.mlp_norm, x, block.mlp, None, True)
    return x, new["k"], new["v"]


def decode_step(model: Transformer, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
    """Feeds `tokens` [batch] at position `cache['index']`; returns logits [batch, vocab], cache.

    The logits (float32, padded vocabulary masked like `Transformer.decode`) predict the token
    at position index + 1. Position 0's input is 0 (the shift-right BOS).
    """
    cfg = model.cfg
    index = cache["index"]
    batch = tokens.shape[0]
    max_length = cache["self_k"].shape[2]
    ids = tokens.reshape(batch, 1).astype(jnp.int32)
    positions = jnp.broadcast_to(index, (batch, 1)).astype(jnp.int32)
    table = model._target_embedding()
    y = model._embed(table, model.decoder_positions, ids, positions, True, None)
    self_mask = (jnp.arange(max_length) <= index)[None, None, None, :]
    cross_mask = make_attention_mask(jnp.ones((batch, 1), bool), cache["source_valid"])

    layers = model.decoder.layers
    if cfg.scan_layers:
        graphdef, stacked = nnx.split(layers)

        def body(h, xs):
            layer_state, sk, sv, ck, cv = xs
            h, sk, sv = _block_step(nnx.merge(graphdef, layer_state), h, sk, sv, ck, cv, index, self_mask, cross_mask)
            return h, (sk, sv)

        y, (self_k, self_v) = jax.lax.scan(
            body, y, (stacked, cache["self_k"], cache["self_v"], cache["cross_k"], cache["cross_v"])
        )
    else:
        self_k, self_v = cache["self_k"], cache["self_v"]
        for i, block in enumerate(layers):
            y, sk, sv = _block_step(
                block, y, self_k[i], self_v[i], cache["cross_k"][i], cache["cross_v"][i], index, self_mask, cross_mask
            )
            self_k = self_k.at[i].set(sk)
            self_v = self_v.at[i].set(sv)
    if model.decoder.final_norm is not None:
        y = model.decoder.final_norm(y)
    y = axes.constrain(y, axes.BLE)
    logits = table.attend(y) if model.logits_dense is None else model.logits_dense(y)
    vocab_ok = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
    logits = jnp.where(vocab_ok, logits, PADDED_VOCAB_LOGIT)
    logits = axes.constrain(logits, axes.BLV)[:, 0]
    new_cache = dict(cache, self_k=_constrain_cache(self_k), self_v=_constrain_cache(self_v), index=index + 1)
    return logits, new_cache


def make_step_fn(model: Transformer):
    """`step(tokens [batch], cache) -> (logits [batch, vocab], cache)`: what the searches call."""

    def step(tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        return decode_step(model, cache, tokens)

    return step


def generate(
    model: Transformer,
    inputs: jax.Array,
    *,
    max_length: int,
    beam_size: int = 1,
    alpha: float = 0.6,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_id: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Outputs for `inputs` [batch, src_len]: (tokens [batch, max_length], scores [batch]).

    beam_size > 1: beam search (score = length-normalised log-probability); otherwise greedy
    when temperature == 0, else sampling (temperature / top_k / top_p) from `rng`. Tokens after
    the first `eos_id` are 0. Jit-able; `max_length` and the search settings are static.
    """
    from model import search  # local: search has no model dependency, decoding re-exports it

    cache = init_cache(model, inputs, max_length)
    step = make_step_fn(model)
    batch_axes = cache_batch_axes(cache)
    if beam_size > 1:
        seqs, scores = search.beam_search(
            step,
            cache,
            batch_axes,
            batch_size=inputs.shape[0],
            beam_size=beam_size,
            max_length=max_length,
            alpha=alpha,
            eos_id=eos_id,
        )
        return seqs[:, 0], scores[:, 0]
    if temperature > 0.0:
        if rng is None:
            raise ValueError("sampling (temperature > 0) needs an rng key")
        return search.sample(
            step,
            cache,
            batch_size=inputs.shape[0],
            max_length=max_length,
            rng=rng,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
        )
    return search.greedy(step, cache, batch_size=inputs.shape[0], max_length=max_length, eos_id=eos_id)


__all__ = ["CACHE_AXES", "Cache", "cache_batch_axes", "decode_step", "generate", "init_cache", "make_step_fn"]
