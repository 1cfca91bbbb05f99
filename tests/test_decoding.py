"""Incremental decoding (KV cache) and the searches: greedy, sampling, beam search."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from model import ModelConfig, Transformer, attention, search, shift_right
from model.transformer import cache_batch_axes

EOS = 1


def _model(scan=False, **overrides):
    fields = dict(
        vocab_size=13,
        vocab_multiple=8,
        d_model=16,
        num_heads=2,
        mlp_dim=32,
        encoder_layers=2,
        decoder_layers=2,
        dropout=0.0,
        max_length=32,
        scan_layers=scan,
    )
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    return cfg, graphdef, params


def _data(batch=4, src=7, tgt=6, vocab=13, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab, (batch, src)).astype(np.int32)
    inputs[1, 4:] = 0  # a padded source
    targets = rng.integers(2, vocab, (batch, tgt)).astype(np.int32)
    return inputs, targets


def _incremental_and_full(graphdef, params, inputs, targets):
    model = nnx.merge(graphdef, params)
    full = model(inputs, targets)
    decoder_inputs = shift_right(targets)
    cache = model.init_cache(inputs, targets.shape[1])
    steps = []
    for t in range(targets.shape[1]):
        logits, cache = model.decode_step(cache, decoder_inputs[:, t])
        steps.append(logits)
    return jnp.stack(steps, axis=1), full, cache


@pytest.mark.parametrize("scan,positions", [(False, "sinusoidal"), (True, "sinusoidal"), (False, "relative"),
                                            (True, "relative")],
                         ids=["loop", "scan", "loop-relative", "scan-relative"])
def test_cached_decoding_equals_full_forward(scan, positions):
    cfg, graphdef, params = _model(scan, positions=positions, relative_buckets=8, relative_max_distance=16)
    inputs, targets = _data()
    incremental, full, cache = jax.jit(_incremental_and_full, static_argnums=0)(graphdef, params, inputs, targets)
    assert incremental.shape == full.shape == (4, 6, cfg.padded_vocab_size)
    np.testing.assert_allclose(np.asarray(incremental), np.asarray(full), atol=1e-5, rtol=0)
    assert int(cache["index"]) == 6
    assert cache["self_k"].shape == (2, 4, 6, 2, 8)


def _mesh_and_rules():
    from sharding.mesh import make_mesh
    from sharding.rules import as_flax_rules, load_rules

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    rules = load_rules("default")
    return mesh, rules, as_flax_rules(rules)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_cached_decoding_on_a_data_fsdp_tensor_mesh(scan):
    """On data=2,fsdp=2,tensor=2 the cache is sharded (batch over data+fsdp, heads over tensor) and
    the logits still equal the single-device full forward pass; so do greedy and beam outputs."""
    from sharding.pytrees import batch_sharding, tree_shardings

    cfg, graphdef, params = _model(scan)
    inputs, targets = _data()
    reference = jax.jit(_incremental_and_full, static_argnums=0)(graphdef, params, inputs, targets)[1]
    ref_greedy = jax.jit(lambda p, x: nnx.merge(graphdef, p).generate(x, max_length=6))(params, inputs)
    ref_beam = jax.jit(lambda p, x: nnx.merge(graphdef, p).generate(x, max_length=6, beam_size=3))(
        params, inputs
    )

    mesh, rules, flax_rules = _mesh_and_rules()
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules):
        p_shard = tree_shardings(params, mesh, rules)
        b_shard = batch_sharding(mesh, rules)
        fn = jax.jit(_incremental_and_full, static_argnums=0, in_shardings=(p_shard, b_shard, b_shard))
        incremental, full, cache = fn(graphdef, params, inputs, targets)
        greedy = jax.jit(
            lambda p, x: nnx.merge(graphdef, p).generate(x, max_length=6), in_shardings=(p_shard, b_shard)
        )(params, inputs)
        beam = jax.jit(
            lambda p, x: nnx.merge(graphdef, p).generate(x, max_length=6, beam_size=3),
            in_shardings=(p_shard, b_shard),
        )(params, inputs)
    full_spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    assert full_spec(cache["self_k"]) == (None, ("data", "fsdp"), None, "tensor", None)
    assert full_spec(cache["cross_v"]) == (None, ("data", "fsdp"), None, "tensor", None)
    np.testing.assert_allclose(np.asarray(incremental), np.asarray(reference), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(full), np.asarray(reference), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(greedy[0]), np.asarray(ref_greedy[0]))
    np.testing.assert_array_equal(np.asarray(beam[0]), np.asarray(ref_beam[0]))


def _sharpened(scan=False, scale=3.0, **overrides):
    """A random model with peaked output distributions that sometimes end (EOS) and sometimes not.

    Untied output logits (tied ones make an untrained model repeat its input token 0); the EOS
    column copies token 3's, slightly larger, so EOS wins wherever 3 would.
    """
    cfg, graphdef, params = _model(scan, tie_output=False, **overrides)
    kernel = params["logits_dense"]["kernel"]
    value = np.array(kernel.get_value()) * scale
    value[:, EOS] = value[:, 3] * 1.05
    kernel.set_value(jnp.asarray(value))
    return cfg, graphdef, params


def _generate(graphdef, params, inputs, **kw):
    fn = jax.jit(lambda p, x: nnx.merge(graphdef, p).generate(x, **kw))
    tokens, scores = fn(params, inputs)
    return np.asarray(tokens), np.asarray(scores)


def _beam(model, inputs, beam_size, max_length, alpha):
    cache = model.init_cache(inputs, max_length)
    return search.beam_search(
        model.search_step(),
        cache,
        cache_batch_axes(cache),
        batch_size=inputs.shape[0],
        beam_size=beam_size,
        max_length=max_length,
        alpha=alpha,
        eos_id=EOS,
    )


def _all_finished_sequences(graphdef, params, source, vocab, max_length):
    """Every sequence that ends with EOS within max_length tokens, its length and log-probability
    under the full (teacher-forced) forward pass."""
    candidates = []
    for n in range(1, max_length + 1):
        for prefix in itertools.product([t for t in range(vocab) if t != EOS], repeat=n - 1):
            candidates.append(list(prefix) + [EOS])
    targets = np.zeros((len(candidates), max_length), np.int32)
    lengths = np.array([len(c) for c in candidates])
    for i, c in enumerate(candidates):
        targets[i, : len(c)] = c
    inputs = np.repeat(source[None], len(candidates), axis=0)
    logits = jax.jit(lambda p, x, y: nnx.merge(graphdef, p)(x, y))(params, inputs, targets)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    token_logp = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = np.arange(max_length)[None] < lengths[:, None]
    return targets, lengths, (token_logp * mask).sum(axis=1)


def test_large_beam_finds_the_exhaustive_best():
    """vocab 6, max length 4: a beam that can hold every live prefix's extensions is exact, for
    several length penalties (alpha 3 makes longer outputs win)."""
    vocab, max_length = 6, 4
    cfg, graphdef, params = _sharpened(vocab_size=vocab, vocab_multiple=1, scale=2.0)
    inputs, _ = _data(batch=3, vocab=vocab, seed=1)
    # Live prefixes after 3 steps: 5**3 = 125, each with 6 extensions: a beam of 750 keeps them all.
    beam = jax.jit(lambda p, x, a: _beam(nnx.merge(graphdef, p), x, 750, max_length, a))
    exhaustive = [_all_finished_sequences(graphdef, params, row, vocab, max_length) for row in inputs]
    best_lengths = set()
    for alpha in (0.0, 0.6, 3.0):
        seqs, scores = (np.asarray(a) for a in beam(params, inputs, alpha))
        for row, (targets, lengths, logprob) in enumerate(exhaustive):
            penalised = logprob / ((5.0 + lengths) / 6.0) ** alpha
            order = np.argsort(-penalised)
            assert penalised[order[0]] - penalised[order[1]] > 1e-4, "a tie: the input does not pin one best"
            np.testing.assert_array_equal(seqs[row, 0], targets[order[0]], err_msg=f"alpha={alpha} row={row}")
            np.testing.assert_allclose(scores[row, 0], penalised[order[0]], atol=1e-4)
            assert np.all(np.diff(scores[row]) <= 1e-6), "beams come best first"
            best_lengths.add(int(lengths[order[0]]))
    assert len(best_lengths) > 1, f"the cases should pick outputs of different lengths, got {best_lengths}"


def test_beam_search_prefers_longer_outputs_with_larger_alpha():
    cfg, graphdef, params = _sharpened()
    inputs, _ = _data(batch=8, seed=2)
    short, _ = _generate(graphdef, params, inputs, max_length=8, beam_size=4, alpha=0.0)
    long, _ = _generate(graphdef, params, inputs, max_length=8, beam_size=4, alpha=4.0)
    length = lambda t: np.where((t == EOS).any(1), (t == EOS).argmax(1) + 1, t.shape[1])
    assert np.all(length(long) >= length(short))


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    cfg, graphdef, params = _sharpened(scale=1.0, encoder_layers=1, decoder_layers=1)
    inputs, _ = _data(batch=8, seed=4)
    greedy, _ = _generate(graphdef, params, inputs, max_length=8)

    def sample(seed, **kw):
        fn = jax.jit(
            lambda p, x, s: nnx.merge(graphdef, p).generate(x, max_length=8, rng=jax.random.key(s), **kw)
        )
        return np.asarray(fn(params, inputs, seed)[0])

    a, b, c = sample(7, temperature=1.0), sample(7, temperature=1.0), sample(8, temperature=1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "different seeds should give different samples"
    assert not np.array_equal(a, greedy), "sampling at temperature 1 should differ from greedy"
    np.testing.assert_array_equal(sample(7, temperature=1.0, top_k=1), greedy)
    np.testing.assert_array_equal(sample(3, temperature=0.7, top_p=1e-6), greedy)
    with pytest.raises(ValueError, match="rng"):
        nnx.merge(graphdef, params).generate(inputs, max_length=4, temperature=1.0)


def test_filter_logits_top_k_and_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda x: (np.asarray(x) > -1e29).astype(int).tolist()
    assert keep(search.filter_logits(logits, top_k=2)) == [[1, 1, 0, 0]]
    assert keep(search.filter_logits(logits, top_p=0.5)) == [[1, 0, 0, 0]]
    assert keep(search.filter_logits(logits, top_p=0.7)) == [[1, 1, 0, 0]]
    assert keep(search.filter_logits(logits, top_p=0.9)) == [[1, 1, 1, 0]]
    np.testing.assert_allclose(np.asarray(search.filter_logits(logits, temperature=2.0)), np.asarray(logits) / 2)


def test_outputs_stop_at_eos_and_pad_after():
    cfg, graphdef, params = _sharpened(encoder_layers=1, decoder_layers=1)
    inputs, _ = _data(batch=8, seed=5)
    for kw in ({}, {"beam_size": 3}):
        tokens, _ = _generate(graphdef, params, inputs, max_length=10, **kw)
        for row in tokens:
            if (row == EOS).any():
                first = int(np.argmax(row == EOS))
                assert np.all(row[first + 1 :] == 0), row


def test_length_penalty_matches_gnmt():
    np.testing.assert_allclose(float(search.length_penalty(7, 0.6)), ((5 + 7) / 6) ** 0.6, rtol=1e-6)
    assert float(search.length_penalty(3, 0.0)) == 1.0


def _qk_normalised_attention(query, key, value, mask=None, **kw):
    """An attention variant (query/key RMS normalisation, as in OLMo 2), written once."""
    norm = lambda x: x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6)
    return _PLAIN_ATTENTION(norm(query).astype(query.dtype), norm(key).astype(key.dtype), value, mask, **kw)


_PLAIN_ATTENTION = attention.dot_product_attention


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_full_and_cached_passes_share_the_modules_so_a_variant_goes_in_one_place(scan, monkeypatch):
    """One model object runs the teacher-forced pass and the cached step-by-step pass. An attention
    variant patched into one function (the one MultiHeadAttention calls) changes both passes,
    and they still agree: incremental decoding has no copy of the decoder to keep in step."""
    _, graphdef, params = _model(scan)
    inputs, targets = _data()

    def both_passes(model):
        full = model(inputs, targets)
        cache = model.init_cache(inputs, targets.shape[1])
        steps = []
        for t, token in enumerate(shift_right(targets).T):
            logits, cache = model.decode_step(cache, token)
            steps.append(logits)
        return full, jnp.stack(steps, axis=1)

    # A fresh jitted function per run: the patched variant must be traced, not a cached trace.
    run = lambda: [np.asarray(a) for a in nnx.jit(lambda m: both_passes(m))(nnx.merge(graphdef, params))]
    plain_full, plain_steps = run()
    np.testing.assert_allclose(plain_steps, plain_full, atol=1e-5, rtol=0)

    monkeypatch.setattr(attention, "dot_product_attention", _qk_normalised_attention)
    full, steps = run()
    np.testing.assert_allclose(steps, full, atol=1e-5, rtol=0)
    assert np.abs(full - plain_full).max() > 1e-2, "the variant should change the full pass"
    assert np.abs(steps - plain_steps).max() > 1e-2, "the variant should change the cached pass"
