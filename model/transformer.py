"""Encoder, decoder and the encoder-decoder Transformer.

Everything is a pure function of (params, inputs, dropout key): dropout keys are split
deterministically per stage, per layer and per call site, so a jitted step gives the same
result whatever the mesh the inputs are sharded over.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes
from model.attention import combine_masks, make_attention_mask, make_causal_mask, make_segment_mask
from model.blocks import DecoderBlock, EncoderBlock
from model.config import ModelConfig
from model.layers import Embed, LearnedPositions, Logits, Norm, dropout, sinusoidal_positions, split_key

# Finite so that one-hot * logits in a loss never meets -inf * 0; exp() underflows to 0.
PADDED_VOCAB_LOGIT = -1e9

_REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
}


def shift_right(x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Teacher-forcing decoder inputs: targets moved one step right, 0 (BOS) in front.

    With packed segment ids, every segment starts with 0 instead of the previous segment's
    last token, so packed examples stay independent.
    """
    shifted = jnp.pad(x[:, :-1], ((0, 0), (1, 0)))
    if segment_ids is not None:
        prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
        shifted = jnp.where(segment_ids == prev, shifted, 0)
    return shifted.astype(x.dtype)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 at each segment start (used when none are given)."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts = jnp.where(segment_ids != prev, idx, 0)
    return idx - jax.lax.cummax(starts, axis=1)


def _default_positions(ids: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    if segment_ids is not None:
        return positions_from_segments(segment_ids)
    return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


def _make_layers(cfg: ModelConfig, block_cls: type, num_layers: int, rngs: nnx.Rngs) -> Any:
    """A list of blocks, or one block with a leading 'layers' axis when scan_layers is on."""
    if not cfg.scan_layers:
        return nnx.List([block_cls(cfg, rngs=rngs) for _ in range(num_layers)])

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
    def create(r: nnx.Rngs):
        return block_cls(cfg, rngs=r)

    return create(rngs)


def _run_layers(
    cfg: ModelConfig,
    layers: Any,
    num_layers: int,
    x: jax.Array,
    args: tuple,
    deterministic: bool,
    dropout_rng: jax.Array | None,
) -> jax.Array:
    """Apply the stack: a Python loop or nnx.scan, each block under nnx.remat if asked.

    Layer i gets dropout key split(dropout_rng, n)[i] either way, so scan and loop agree.
    """

    def apply(block, h, key):
        return block(h, *args, deterministic=deterministic, dropout_rng=key)

    policy = _REMAT_POLICIES.get(cfg.remat)
    if cfg.remat != "none":
        apply = nnx.remat(apply, policy=policy, prevent_cse=not cfg.scan_layers)

    keys = None
    if not deterministic and dropout_rng is not None:
        keys = jax.random.split(dropout_rng, num_layers)

    if cfg.scan_layers:
        scan = nnx.scan(
            apply,
            in_axes=(0, nnx.Carry, 0 if keys is not None else None),
            out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: axes.LAYERS},
        )
        return scan(layers, x, keys)
    for i, block in enumerate(layers):
        x = apply(block, x, None if keys is None else keys[i])
    return x


class Encoder(nnx.Module):
    """Stack of EncoderBlocks plus the final norm (pre-LN only)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = _make_layers(cfg, EncoderBlock, cfg.encoder_layers, rngs)
        self.final_norm = Norm(cfg, rngs=rngs) if cfg.norm_position == "pre" else None

    def __call__(
        self, x: jax.Array, mask: jax.Array | None, *, deterministic: bool = True, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        x = _run_layers(self.cfg, self.layers, self.cfg.encoder_layers, x, (mask,), deterministic, dropout_rng)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return axes.constrain(x, axes.BLE)


class Decoder(nnx.Module):
    """Stack of DecoderBlocks plus the final norm (pre-LN only)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = _make_layers(cfg, DecoderBlock, cfg.decoder_layers, rngs)
        self.final_norm = Norm(cfg, rngs=rngs) if cfg.norm_position == "pre" else None

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
        x = _run_layers(
            self.cfg,
            self.layers,
            self.cfg.decoder_layers,
            x,
            (encoded, self_mask, cross_mask),
            deterministic,
            dropout_rng,
        )
        if self.final_norm is not None:
            x = self.final_norm(x)
        return axes.constrain(x, axes.BLE)


def _check_rng(deterministic: bool, dropout_rng: jax.Array | None) -> None:
    if not deterministic and dropout_rng is None:
        raise ValueError("deterministic=False needs dropout_rng (the trainer passes the step's key)")


class Transformer(nnx.Module):
    """Encoder-decoder Transformer (Vaswani et al.) with t5x-style logical axes.

    Token ids are int32 with 0 = padding (and BOS after the shift). Logits cover the padded
    vocabulary; ids >= vocab_size get PADDED_VOCAB_LOGIT so they never get probability.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        if cfg.share_embeddings:
            self.token_embedding = Embed(cfg, rngs=rngs)
            self.encoder_embedding = None
            self.decoder_embedding = None
        else:
            self.token_embedding = None
            self.encoder_embedding = Embed(cfg, rngs=rngs)
            self.decoder_embedding = Embed(cfg, rngs=rngs)
        if cfg.positions == "learned":
            self.encoder_positions = LearnedPositions(cfg, rngs=rngs)
            self.decoder_positions = LearnedPositions(cfg, rngs=rngs)
        else:
            self.encoder_positions = None
            self.decoder_positions = None
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.logits_dense = None if cfg.tie_output else Logits(cfg, rngs=rngs)

    # -- embeddings ------------------------------------------------------------------------------

    def _source_embedding(self) -> Embed:
        return self.token_embedding if self.cfg.share_embeddings else self.encoder_embedding

    def _target_embedding(self) -> Embed:
        return self.token_embedding if self.cfg.share_embeddings else self.decoder_embedding

    def _embed(
        self,
        table: Embed,
        pos_table: LearnedPositions | None,
        ids: jax.Array,
        positions: jax.Array,
        deterministic: bool,
        rng: jax.Array | None,
    ) -> jax.Array:
        x = table(ids)
        if pos_table is not None:
            x = x + pos_table(positions)
        else:
            x = x + sinusoidal_positions(positions, self.cfg.d_model).astype(x.dtype)
        x = dropout(x, self.cfg.dropout, rng, deterministic=deterministic)
        return axes.constrain(x, axes.BLE)

    # -- public API ------------------------------------------------------------------------------

    def encode(
        self,
        inputs: jax.Array,
        *,
        inputs_segment_ids: jax.Array | None = None,
        inputs_positions: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Encoder output [batch, src_len, d_model] in the compute dtype.

        Padding comes from `inputs_segment_ids != 0` when given, else from `inputs != 0`.
        Positions default to 0.. per segment.
        """
        _check_rng(deterministic, dropout_rng)
        k_embed, k_layers = split_key(dropout_rng if not deterministic else None, 2)
        if inputs_positions is None:
            inputs_positions = _default_positions(inputs, inputs_segment_ids)
        if inputs_segment_ids is not None:
            mask = make_segment_mask(inputs_segment_ids, inputs_segment_ids)
        else:
            valid = inputs != 0
            mask = make_attention_mask(valid, valid)
        x = self._embed(
            self._source_embedding(), self.encoder_positions, inputs, inputs_positions, deterministic, k_embed
        )
        return self.encoder(x, mask, deterministic=deterministic, dropout_rng=k_layers)

    def decode(
        self,
        encoded: jax.Array,
        inputs: jax.Array,
        decoder_input_tokens: jax.Array,
        *,
        inputs_segment_ids: jax.Array | None = None,
        targets_segment_ids: jax.Array | None = None,
        targets_positions: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
        return_probs: bool = False,
    ) -> jax.Array:
        """Decoder logits (or probabilities) [batch, tgt_len, padded_vocab], float32.

        `inputs` (source ids) only give the cross-attention padding mask when
        `inputs_segment_ids` is None. Decoder self-attention is causal, and also segment-masked
        when `targets_segment_ids` is given; without segment ids, right padding of the targets
        needs no mask (causality keeps real positions from seeing it).
        """
        _check_rng(deterministic, dropout_rng)
        k_embed, k_layers = split_key(dropout_rng if not deterministic else None, 2)
        tgt_len = decoder_input_tokens.shape[1]
        if targets_positions is None:
            targets_positions = _default_positions(decoder_input_tokens, targets_segment_ids)
        self_mask = make_causal_mask(tgt_len)
        if targets_segment_ids is not None:
            self_mask = combine_masks(self_mask, make_segment_mask(targets_segment_ids, targets_segment_ids))
        if targets_segment_ids is not None and inputs_segment_ids is not None:
            cross_mask = make_segment_mask(targets_segment_ids, inputs_segment_ids)
        else:
            key_valid = inputs != 0 if inputs_segment_ids is None else inputs_segment_ids != 0
            query_valid = (
                jnp.ones(decoder_input_tokens.shape, bool) if targets_segment_ids is None else targets_segment_ids != 0
            )
            cross_mask = make_attention_mask(query_valid, key_valid)

        table = self._target_embedding()
        y = self._embed(table, self.decoder_positions, decoder_input_tokens, targets_positions, deterministic, k_embed)
        y = self.decoder(y, encoded, self_mask, cross_mask, deterministic=deterministic, dropout_rng=k_layers)
        logits = table.attend(y) if self.logits_dense is None else self.logits_dense(y)
        vocab_ok = jnp.arange(self.cfg.padded_vocab_size) < self.cfg.vocab_size
        logits = jnp.where(vocab_ok, logits, PADDED_VOCAB_LOGIT)
        logits = axes.constrain(logits, axes.BLV)
        if return_probs:
            return jax.nn.softmax(logits, axis=-1)
        return logits

    def __call__(
        self,
        inputs: jax.Array,
        targets: jax.Array,
        *,
        inputs_segment_ids: jax.Array | None = None,
        targets_segment_ids: jax.Array | None = None,
        inputs_positions: jax.Array | None = None,
        targets_positions: jax.Array | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
        return_probs: bool = False,
    ) -> jax.Array:
        """Teacher forcing: logits [batch, tgt_len, padded_vocab] (float32) predicting `targets`.

        The decoder reads shift_right(targets) (segment-aware), so position t sees targets[:t].
        """
        _check_rng(deterministic, dropout_rng)
        k_enc, k_dec = split_key(dropout_rng if not deterministic else None, 2)
        encoded = self.encode(
            inputs,
            inputs_segment_ids=inputs_segment_ids,
            inputs_positions=inputs_positions,
            deterministic=deterministic,
            dropout_rng=k_enc,
        )
        decoder_inputs = shift_right(targets, targets_segment_ids)
        return self.decode(
            encoded,
            inputs,
            decoder_inputs,
            inputs_segment_ids=inputs_segment_ids,
            targets_segment_ids=targets_segment_ids,
            targets_positions=targets_positions,
            deterministic=deterministic,
            dropout_rng=k_dec,
            return_probs=return_probs,
        )
