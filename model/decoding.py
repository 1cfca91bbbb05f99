"""Generation: the searches of `model.search` driven by the model's one-position decoder step.

The model decodes incrementally through its own modules: `Transformer.init_cache` encodes the
source and projects the cross-attention keys/values once, `Transformer.decode_step` feeds one
token through the same embedding, decoder stack and logits as the full pass, its attention
layers writing and reading the key/value cache (layout in `model.transformer`). This module
only adapts that step to the searches' `step_fn(tokens, cache)` interface.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from model.stack import CACHE_AXES
from model.transformer import CACHE_BATCH_AXES, Cache, Transformer


def cache_batch_axes(cache: Cache) -> dict[str, int | None]:
    """A pytree like `cache` whose leaves are the batch axis of each entry (or None)."""
    return {k: CACHE_BATCH_AXES[k] for k in cache}


def make_step_fn(model: Transformer) -> Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]:
    """`step(tokens [batch], cache) -> (logits [batch, vocab], cache)`: what the searches call.

    The step runs inside the searches' `jax.lax.while_loop`, and NNX transforms (the layer
    scan of `scan_layers`) refuse Variables of an outer trace: so the model is split here and
    merged inside the step into new Variables (`copy=True`) holding the same arrays.
    """
    graphdef, state = nnx.split(model)

    def step(tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        return nnx.merge(graphdef, state, copy=True).decode_step(cache, tokens)

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

    cache = model.init_cache(inputs, max_length)
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


__all__ = ["CACHE_AXES", "Cache", "cache_batch_axes", "generate", "make_step_fn"]
