"""Search over a one-position decoder step: greedy, sampling and beam search.

Everything here is jit-able with a fixed maximum length (`jax.lax.while_loop` that stops early
once every row is done) and knows nothing about the model: it calls

  step_fn(tokens [rows], cache) -> (logits [rows, vocab] float32, cache)

where `cache` is any pytree whose arrays have a batch axis given by `batch_axes` (a pytree of
ints, or None for leaves shared by all rows); beam search repeats the cache per beam and
reorders it along that axis. The first input token is 0 (the shift-right BOS); outputs are
[batch, max_length] token ids, 0 after the first EOS.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]

# Scores of dead beams / empty finished slots (finite: arithmetic on it never makes NaN).
NEG_INF = -1.0e7
_DROP = -1.0e30  # logits removed by top-k / top-p


def length_penalty(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT / t5x brevity penalty ((5 + length) / 6) ** alpha; scores are logprob / penalty."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ---------------------------------------------------------------------------- greedy, sampling


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Temperature-scaled logits with everything outside the top-k / top-p (nucleus) set removed.

    top_k = 0 and top_p = 1 disable the filters. The nucleus keeps the smallest set of the most
    likely tokens whose probability reaches top_p (always at least the most likely one).
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, _DROP, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the better tokens
        keep = before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, _DROP, logits)
    return logits


def _token_loop(
    step_fn: StepFn,
    cache: Any,
    *,
    batch_size: int,
    max_length: int,
    eos_id: int,
    choose: Callable[[jax.Array, jax.Array], jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Shared loop of greedy and sampling: one token per row per step until EOS everywhere."""

    def cond(state):
        i, _, _, done, _, _ = state
        return jnp.logical_and(i < max_length, jnp.logical_not(jnp.all(done)))

    def body(state):
        i, tokens, last, done, score, cache = state
        logits, cache = step_fn(last, cache)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nxt = choose(logits, i).astype(jnp.int32)
        token_logp = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
        score = score + jnp.where(done, 0.0, token_logp)
        nxt = jnp.where(done, 0, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i))
        done = jnp.logical_or(done, nxt == eos_id)
        return i + 1, tokens, nxt, done, score, cache

    state = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((batch_size, max_length), jnp.int32),
        jnp.zeros((batch_size,), jnp.int32),
        jnp.zeros((batch_size,), bool),
        jnp.zeros((batch_size,), jnp.float32),
        cache,
    )
    _, tokens, _, _, score, _ = jax.lax.while_loop(cond, body, state)
    return tokens, score


def greedy(
    step_fn: StepFn, cache: Any, *, batch_size: int, max_length: int, eos_id: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Argmax decoding: (tokens [batch, max_length], summed log-probabilities [batch])."""
    return _token_loop(
        step_fn,
        cache,
        batch_size=batch_size,
        max_length=max_length,
        eos_id=eos_id,
        choose=lambda logits, i: jnp.argmax(logits, axis=-1),
    )


def sample(
    step_fn: StepFn,
    cache: Any,
    *,
    batch_size: int,
    max_length: int,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Ancestral sampling from the filtered distribution; position i uses fold_in(rng, i).

    The same key gives the same tokens (JAX's partitionable threefry: whatever the mesh).
    Returns (tokens, summed log-probabilities under the unfiltered model).
    """
    if temperature <= 0.0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature} (use greedy)")

    def choose(logits, i):
        filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(jax.random.fold_in(rng, i), filtered, axis=-1)

    return _token_loop(step_fn, cache, batch_size=batch_size, max_length=max_length, eos_id=eos_id, choose=choose)


# ---------------------------------------------------------------------------------- beam search


def _repeat_rows(x: jax.Array, axis: int | None, n: int) -> jax.Array:
    """[.., batch, ..] -> [.., batch * n, ..], each row repeated n times in a row."""
    return x if axis is None else jnp.repeat(x, n, axis=axis)


def _gather_beams(x: jax.Array, axis: int | None, parents: jax.Array) -> jax.Array:
    """Reorders the [batch * beam] axis: new beam j of row b takes old beam parents[b, j].

    Beams are gathered within their batch row ([batch, beam, ...] then a per-row take), so a
    batch-sharded cache stays on its shards.
    """
    if axis is None:
        return x
    batch, beam = parents.shape
    moved = jnp.moveaxis(x, axis, 0)
    grouped = moved.reshape((batch, beam) + moved.shape[1:])
    picked = jax.vmap(lambda rows, idx: rows[idx])(grouped, parents)
    return jnp.moveaxis(picked.reshape(moved.shape), 0, axis)


def beam_search(
    step_fn: StepFn,
    cache: Any,
    batch_axes: Any,
    *,
    batch_size: int,
    beam_size: int,
    max_length: int,
    alpha: float = 0.6,
    eos_id: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with a GNMT length penalty; returns (seqs [batch, beam, max_length], scores).

    Sequences are sorted best first; a sequence's score is its log-probability divided by
    `length_penalty(length, alpha)`, its length counting the EOS. Each step extends every live
    beam by every token; the `beam_size` best extensions that do not end in EOS stay live, and
    the EOS extensions that rank among the 2 * `beam_size` best of all extensions become finished
    (kept in a separate set of the `beam_size` best finished, never dropped for live ones), the
    pool of t5x and of transformers' Flax beam search. The loop stops when, in every row,
    the best finished score is at least what the best live beam could still reach (its
    log-probability over the largest penalty, at max_length): then no live beam can win. Rows
    that finish nothing by max_length return their live beams (scored at max_length).

    `cache` holds `batch_size` rows; it is repeated per beam here.
    """
    B, K, T = batch_size, beam_size, max_length
    cache = jax.tree.map(lambda x, a: _repeat_rows(x, a, K), cache, batch_axes)
    max_penalty = length_penalty(T, alpha)

    def cond(state):
        i, _, live_lp, _, fin_scores, fin_flags, _, _ = state
        best_live = live_lp[:, 0] / max_penalty
        done = jnp.logical_and(jnp.any(fin_flags, axis=1), fin_scores[:, 0] >= best_live)
        return jnp.logical_and(i < T, jnp.logical_not(jnp.all(done)))

    def body(state):
        i, live_seqs, live_lp, fin_seqs, fin_scores, fin_flags, last, cache = state
        logits, cache = step_fn(last.reshape(B * K), cache)
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(B, K, vocab)
        cand = (live_lp[:, :, None] + logp).reshape(B, K * vocab)

        # Finished: EOS extensions among the 2K best extensions overall (t5x's and transformers'
        # pool: K of them could end in EOS and K live ones would still remain).
        top_vals, top_idx = jax.lax.top_k(cand, 2 * K)
        top_tok, top_parent = top_idx % vocab, top_idx // vocab
        new_fin = jnp.logical_and(top_tok == eos_id, top_vals > NEG_INF / 2)
        new_fin_seqs = jnp.take_along_axis(live_seqs, top_parent[:, :, None], axis=1)
        new_fin_seqs = jax.lax.dynamic_update_slice(new_fin_seqs, jnp.full((B, 2 * K, 1), eos_id, jnp.int32),
                                                    (0, 0, i))
        new_fin_scores = jnp.where(new_fin, top_vals / length_penalty(i + 1, alpha), NEG_INF)
        all_scores = jnp.concatenate([fin_scores, new_fin_scores], axis=1)
        all_seqs = jnp.concatenate([fin_seqs, new_fin_seqs], axis=1)
        all_flags = jnp.concatenate([fin_flags, new_fin], axis=1)
        fin_scores, keep = jax.lax.top_k(all_scores, K)  # ties keep the earlier finished
        fin_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)
        fin_flags = jnp.take_along_axis(all_flags, keep, axis=1)

        # Live: the K best extensions that do not end in EOS.
        is_eos = (jnp.arange(K * vocab) % vocab == eos_id)[None, :]
        live_vals, live_idx = jax.lax.top_k(jnp.where(is_eos, NEG_INF * 10, cand), K)
        tok, parent = (live_idx % vocab).astype(jnp.int32), live_idx // vocab
        live_lp = jnp.where(live_vals > NEG_INF / 2, live_vals, NEG_INF)
        live_seqs = jnp.take_along_axis(live_seqs, parent[:, :, None], axis=1)
        live_seqs = jax.lax.dynamic_update_slice(live_seqs, tok[:, :, None], (0, 0, i))
        cache = jax.tree.map(lambda x, a: _gather_beams(x, a, parent), cache, batch_axes)
        return i + 1, live_seqs, live_lp, fin_seqs, fin_scores, fin_flags, tok, cache

    live_lp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (K - 1), jnp.float32), (B, 1))
    state = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((B, K, T), jnp.int32),
        live_lp,
        jnp.zeros((B, K, T), jnp.int32),
        jnp.full((B, K), NEG_INF, jnp.float32),
        jnp.zeros((B, K), bool),
        jnp.zeros((B, K), jnp.int32),
        cache,
    )
    _, live_seqs, live_lp, fin_seqs, fin_scores, fin_flags, _, _ = jax.lax.while_loop(cond, body, state)
    any_fin = jnp.any(fin_flags, axis=1)
    seqs = jnp.where(any_fin[:, None, None], fin_seqs, live_seqs)
    scores = jnp.where(any_fin[:, None], fin_scores, live_lp / max_penalty)
    return seqs, scores
