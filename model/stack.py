"""Encoder and decoder stacks: a Python loop over layers, or one `nnx.scan` over stacked layers.

The same stack code runs training, eval and incremental decoding. For decoding, the decoder
takes the cache of every layer stacked on a leading layer axis (with and without
`scan_layers`); under `scan_layers` that axis is scanned together with the stacked
parameters, in the loop layer i reads slice i.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.blocks import DecoderBlock, EncoderBlock, LayerCache
from model.config import ModelConfig
from model.layers import Norm

_REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}

# Logical names of the stacked decoder cache entries [layers, batch, length, heads, kv] (the
# layer axis is never sharded: the scan walks along it).
CACHE_AXES = (None, axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, axes.ACT_KV)

# A block call: (block, x, dropout key, this layer's cache or None) -> (x, written cache or None).
BlockFn = Callable[[Any, jax.Array, jax.Array | None, Any], tuple[jax.Array, Any]]


def make_layers(cfg: ModelConfig, block_cls: type, num_layers: int, rngs: nnx.Rngs) -> Any:
    """A list of blocks, or one block with a leading 'layers' axis when scan_layers is on."""
    if not cfg.scan_layers:
        return nnx.List([block_cls(cfg, rngs=rngs) for _ in range(num_layers)])

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
    def create(r: nnx.Rngs):
        return block_cls(cfg, rngs=r)

    return create(rngs)


def run_layers(
    cfg: ModelConfig,
    layers: Any,
    num_layers: int,
    x: jax.Array,
    apply: BlockFn,
    deterministic: bool,
    dropout_rng: jax.Array | None,
    cache: Any = None,
) -> tuple[jax.Array, Any]:
    """Apply the stack: a Python loop or nnx.scan, each block under nnx.remat if asked.

    Layer i gets dropout key split(dropout_rng, n)[i] either way, so scan and loop agree.
    `cache` (a pytree of [layers, ...] arrays, or None) is sliced per layer; what the blocks
    return is stacked the same way. Decoding does not differentiate, so it skips remat.
    """
    if cfg.remat != "none" and cache is None:
        apply = nnx.remat(apply, policy=_REMAT_POLICIES.get(cfg.remat), prevent_cse=not cfg.scan_layers)

    keys = None
    if not deterministic and dropout_rng is not None:
        keys = jax.random.split(dropout_rng, num_layers)

    if cfg.scan_layers:
        scan = nnx.scan(
            apply,
            in_axes=(0, nnx.Carry, 0 if keys is not None else None, 0 if cache is not None else None),
            out_axes=(nnx.Carry, 0),
            transform_metadata={nnx.PARTITION_NAME: axes.LAYERS},
        )
        return scan(layers, x, keys, cache)
    written = []
    for i, block in enumerate(layers):
        layer_cache = None if cache is None else jax.tree.map(operator.itemgetter(i), cache)
        x, out = apply(block, x, None if keys is None else keys[i], layer_cache)
        written.append(out)
    if cache is None:
        return x, None
    return x, jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *written)


class Encoder(nnx.Module):
    """Stack of EncoderBlocks plus the final norm (pre-LN only)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = make_layers(cfg, EncoderBlock, cfg.encoder_layers, rngs)
        self.final_norm = Norm(cfg, rngs=rngs) if cfg.norm_position == "pre" else None

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        *,
        bias: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """`bias`: the position bias every layer adds to its attention logits (shared, as in T5)."""

        def apply(block, h, key, _):
            return block(h, mask, bias=bias, deterministic=deterministic, dropout_rng=key), None

        x, _ = run_layers(self.cfg, self.layers, self.cfg.encoder_layers, x, apply, deterministic, dropout_rng)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return axes.constrain(x, axes.BLE)


class Decoder(nnx.Module):
    """Stack of DecoderBlocks plus the final norm (pre-LN only)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = make_layers(cfg, DecoderBlock, cfg.decoder_layers, rngs)
        self.final_norm = Norm(cfg, rngs=rngs) if cfg.norm_position == "pre" else None

    def init_cache(self, encoded: jax.Array, max_length: int) -> LayerCache:
        """Every layer's cache, stacked [layers, batch, len, heads, kv]: empty self-attention
        buffers of `max_length` positions, and the cross-attention keys/values of `encoded`
        [batch, src_len, embed], projected here once for the whole decode."""
        cfg = self.cfg

        def project(block: DecoderBlock) -> tuple[jax.Array, jax.Array]:
            return block.cross_attention.project_key_value(encoded)

        if cfg.scan_layers:
            metadata = {nnx.PARTITION_NAME: axes.LAYERS}
            cross_k, cross_v = nnx.vmap(project, in_axes=0, out_axes=0, transform_metadata=metadata)(self.layers)
        else:
            pairs = [project(block) for block in self.layers]
            cross_k, cross_v = jnp.stack([k for k, _ in pairs]), jnp.stack([v for _, v in pairs])
        shape = (cfg.decoder_layers, encoded.shape[0], max_length, cfg.num_heads, cfg.kv_dim)
        zeros = jnp.zeros(shape, cfg.compute_dtype)
        cache = {"self_k": zeros, "self_v": zeros, "cross_k": cross_k, "cross_v": cross_v}
        return {name: axes.constrain(c.astype(cfg.compute_dtype), CACHE_AXES) for name, c in cache.items()}

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
        """Decoder output [batch, len, embed], and with `cache` (from `init_cache`) the cache
        after writing x's positions at `cache_index` (None without a cache)."""

        def apply(block, h, key, layer_cache):
            return block(
                h,
                encoded,
                self_mask,
                cross_mask,
                cache=layer_cache,
                cache_index=cache_index,
                self_bias=self_bias,
                deterministic=deterministic,
                dropout_rng=key,
            )

        x, written = run_layers(
            self.cfg, self.layers, self.cfg.decoder_layers, x, apply, deterministic, dropout_rng, cache
        )
        if self.final_norm is not None:
            x = self.final_norm(x)
        x = axes.constrain(x, axes.BLE)
        if cache is None:
            return x, None
        return x, dict(cache, **{name: axes.constrain(c, CACHE_AXES) for name, c in written.items()})
