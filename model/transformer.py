"""The encoder-decoder Transformer: teacher-forced training/eval and incremental decoding.

Everything is a pure function of (params, inputs, dropout key): dropout keys are split
deterministically per stage, per layer and per call site, so a jitted step gives the same
result whatever the mesh the inputs are sharded over.

Decoding one position at a time (`init_cache`, `decode_step`) runs the same embedding,
decoder stack and logits as the full pass (`__call__`); only the masks and the cache differ.
`generate` drives that step with the searches of `model.search` (greedy, sampling, beam).
Training and eval read the loss of the same logits through `loss_sums` (`model.output`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model import axes, output, search
from model.attention import combine_masks, make_attention_mask, make_causal_mask, make_segment_mask
from model.config import ModelConfig
from model.layers import (Embed, LearnedPositions, Logits, RelativePositionBias, dropout, sinusoidal_positions,
                          split_key)
from model.stack import Decoder, Encoder

# The decoding cache (`Transformer.init_cache`) is a plain dict pytree, so jit,
# `jax.lax.while_loop` and the searches in `model.search` carry it without NNX code:
#
#   self_k, self_v    [layers, batch, max_length, heads, kv]   decoder self-attention keys/values
#   cross_k, cross_v  [layers, batch, src_len, heads, kv]      encoder keys/values, computed once
#   source_valid      [batch, src_len] bool                    cross-attention padding mask
#   index             int32 scalar                             next position to write
#
# The arrays carry logical axis names (`model.stack.CACHE_AXES`, SOURCE_AXES) like every other
# activation, so the trainer's rules shard them (batch over data/fsdp, heads over tensor).
Cache = dict[str, jax.Array]
SOURCE_AXES = (axes.ACT_BATCH, axes.ACT_LENGTH)

# Which axis of each cache entry is the batch (None: shared by all rows). The searches use it
# to repeat the cache per beam and to reorder it when beams change parents.
CACHE_BATCH_AXES = {"self_k": 1, "self_v": 1, "cross_k": 1, "cross_v": 1, "source_valid": 0, "index": None}


def cache_batch_axes(cache: Cache) -> dict[str, int | None]:
    """A pytree like `cache` whose leaves are the batch axis of each entry (or None)."""
    return {k: CACHE_BATCH_AXES[k] for k in cache}


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


def _check_rng(deterministic: bool, dropout_rng: jax.Array | None) -> None:
    if not deterministic and dropout_rng is None:
        raise ValueError("deterministic=False needs dropout_rng (the trainer passes the step's key)")


class Transformer(nnx.Module):
    """Encoder-decoder Transformer (Vaswani et al.) with t5x-style logical axes.

    Token ids are int32 with 0 = padding (and BOS after the shift). Logits cover the padded
    vocabulary; ids >= vocab_size get PADDED_VOCAB_LOGIT so they never get probability.
    `__call__`/`encode`/`decode_states` are the full passes (`loss_sums` their loss);
    `init_cache` and `decode_step` decode one position at a time through the same modules,
    which `generate` drives.
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
        # Created last, so the other parameters draw the same initial values with any `positions`.
        relative = cfg.positions == "relative"
        self.encoder_relative_bias = RelativePositionBias(cfg, bidirectional=True, rngs=rngs) if relative else None
        self.decoder_relative_bias = RelativePositionBias(cfg, bidirectional=False, rngs=rngs) if relative else None

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
        elif self.cfg.positions == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.cfg.d_model).astype(x.dtype)
        # positions=relative: no absolute positions; the attention logits get the stack's bias.
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
        bias = None
        if self.encoder_relative_bias is not None:
            bias = self.encoder_relative_bias(inputs_positions, inputs_positions)
        return self.encoder(x, mask, bias=bias, deterministic=deterministic, dropout_rng=k_layers)

    def decode_states(
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
    ) -> jax.Array:
        """The decoder's output states [batch, tgt_len, d_model], before the logits.

        `inputs` (source ids) only give the cross-attention padding mask when
        `inputs_segment_ids` is None. Decoder self-attention is causal, and also segment-masked
        when `targets_segment_ids` is given; without segment ids, right padding of the targets
        needs no mask (causality keeps real positions from seeing it).
        """
        _check_rng(deterministic, dropout_rng)
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
        y, _ = self._decoder_states(
            decoder_input_tokens,
            targets_positions,
            encoded,
            self_mask,
            cross_mask,
            deterministic=deterministic,
            dropout_rng=dropout_rng,
        )
        return y

    def _decoder_states(
        self,
        ids: jax.Array,
        positions: jax.Array,
        encoded: jax.Array | None,
        self_mask: jax.Array | None,
        cross_mask: jax.Array | None,
        *,
        cache: Cache | None = None,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """Target embedding and decoder stack: the one path of `decode_states` and `decode_step`.

        Without `cache`: the output states of every position of `ids`. With one: `ids` sit at positions
        `cache['index']`.., the decoder reads and writes the cache, and the updated cache (index
        moved past `ids`) comes back.
        """
        k_embed, k_layers = split_key(dropout_rng if not deterministic else None, 2)
        y = self._embed(self._target_embedding(), self.decoder_positions, ids, positions, deterministic, k_embed)
        layer_cache = None if cache is None else {k: cache[k] for k in ("self_k", "self_v", "cross_k", "cross_v")}
        self_bias = None
        if self.decoder_relative_bias is not None:
            # Keys are the positions of `ids` in the full pass, every cache slot when decoding.
            keys = positions if cache is None else jnp.arange(cache["self_k"].shape[2])[None]
            self_bias = self.decoder_relative_bias(positions, keys)
        y, layer_cache = self.decoder(
            y,
            encoded,
            self_mask,
            cross_mask,
            cache=layer_cache,
            cache_index=None if cache is None else cache["index"],
            self_bias=self_bias,
            deterministic=deterministic,
            dropout_rng=k_layers,
        )
        if cache is not None:
            cache = dict(cache, **layer_cache, index=cache["index"] + ids.shape[1])
        return y, cache

    def output_operands(self, y: jax.Array) -> tuple[jax.Array, jax.Array, int]:
        """(states, kernel, vocab axis) of the output layer for decoder states `y` (`model.output`)."""
        if self.logits_dense is None:
            return (*self._target_embedding().output_operands(y), 0)
        return (*self.logits_dense.output_operands(y), 1)

    def logits(self, y: jax.Array) -> jax.Array:
        """Logits [batch, len, padded_vocab] (float32) of decoder outputs `y`.

        Ids >= vocab_size get PADDED_VOCAB_LOGIT (in `model.output`, for every pass, the loss's
        included), so no pass ever gives them probability.
        """
        states, kernel, vocab_axis = self.output_operands(y)
        return output.logits(states, kernel, vocab_axis=vocab_axis, vocab_size=self.cfg.vocab_size)

    # -- incremental decoding --------------------------------------------------------------------

    def init_cache(self, inputs: jax.Array, max_length: int, *, encoded: jax.Array | None = None) -> Cache:
        """Encodes `inputs` [batch, src_len] (0 = padding) and returns an empty decoding cache.

        `max_length` is the number of target positions the cache holds (the longest output);
        `encoded` skips the encoder when the caller already has its output.
        """
        if encoded is None:
            encoded = self.encode(inputs)
        cache = self.decoder.init_cache(encoded, max_length)
        cache["source_valid"] = axes.constrain(inputs != 0, SOURCE_AXES)
        cache["index"] = jnp.zeros((), jnp.int32)
        return cache

    def decode_step(self, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
        """Feeds `tokens` [batch] at position `cache['index']`; returns logits [batch, vocab], cache.

        The logits (float32, padded vocabulary masked) predict the token at position index + 1
        and equal `__call__`'s at that position. Position 0's input is 0 (the shift-right BOS).
        """
        index = cache["index"]
        batch = tokens.shape[0]
        ids = tokens.reshape(batch, 1).astype(jnp.int32)
        positions = jnp.broadcast_to(index, (batch, 1)).astype(jnp.int32)
        self_mask = make_causal_mask(1, cache["self_k"].shape[2], offset=index)
        cross_mask = make_attention_mask(jnp.ones((batch, 1), bool), cache["source_valid"])
        y, cache = self._decoder_states(ids, positions, None, self_mask, cross_mask, cache=cache)
        return self.logits(y)[:, 0], cache

    def search_step(self) -> Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]:
        """`step(tokens [batch], cache) -> (logits [batch, vocab], cache)`: what the searches call.

        The step runs inside the searches' `jax.lax.while_loop`, and NNX transforms (the layer
        scan of `scan_layers`) refuse Variables of an outer trace: so the model is split here and
        merged inside the step into new Variables (`copy=True`) holding the same arrays.
        """
        graphdef, state = nnx.split(self)

        def step(tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
            return nnx.merge(graphdef, state, copy=True).decode_step(cache, tokens)

        return step

    def generate(
        self,
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
        cache = self.init_cache(inputs, max_length)
        step = self.search_step()
        batch_size = inputs.shape[0]
        if beam_size > 1:
            seqs, scores = search.beam_search(step, cache, cache_batch_axes(cache), batch_size=batch_size,
                                              beam_size=beam_size, max_length=max_length, alpha=alpha, eos_id=eos_id)
            return seqs[:, 0], scores[:, 0]
        if temperature > 0.0:
            if rng is None:
                raise ValueError("sampling (temperature > 0) needs an rng key")
            return search.sample(step, cache, batch_size=batch_size, max_length=max_length, rng=rng,
                                 temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)
        return search.greedy(step, cache, batch_size=batch_size, max_length=max_length, eos_id=eos_id)

    def teacher_forced_states(
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
    ) -> jax.Array:
        """Encoder, then decoder on shift_right(targets): output states [batch, tgt_len, d_model].

        The shift is segment-aware, so position t sees targets[:t] of its own example.
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
        return self.decode_states(
            encoded,
            inputs,
            decoder_inputs,
            inputs_segment_ids=inputs_segment_ids,
            targets_segment_ids=targets_segment_ids,
            targets_positions=targets_positions,
            deterministic=deterministic,
            dropout_rng=k_dec,
        )

    def __call__(
        self,
        inputs: jax.Array,
        targets: jax.Array,
        *,
        return_probs: bool = False,
        **kwargs,
    ) -> jax.Array:
        """Teacher forcing: logits [batch, tgt_len, padded_vocab] (float32) predicting `targets`.

        Keyword arguments as for `teacher_forced_states` (segment ids, positions, dropout).
        """
        logits = self.logits(self.teacher_forced_states(inputs, targets, **kwargs))
        return jax.nn.softmax(logits, axis=-1) if return_probs else logits

    def loss_sums(
        self,
        inputs: jax.Array,
        targets: jax.Array,
        weights: jax.Array,
        *,
        label_smoothing: float = 0.0,
        **kwargs,
    ) -> tuple[jax.Array, jax.Array]:
        """Teacher forcing: (sum of weights * token cross-entropy, sum of weights * correct).

        The loss of `__call__`'s logits against `targets`, computed without keeping them
        (`model.output.cross_entropy_sums`); a token is correct when its target has the top logit.
        Keyword arguments as for `teacher_forced_states`.
        """
        y = self.teacher_forced_states(inputs, targets, **kwargs)
        states, kernel, vocab_axis = self.output_operands(y)
        return output.cross_entropy_sums(states, kernel, targets.astype(jnp.int32), weights.astype(jnp.float32),
                                         vocab_axis, self.cfg.vocab_size, label_smoothing)
