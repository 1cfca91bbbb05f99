"""Transformer-level behaviour: causality, padding, packing, probabilities, options, axes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import PARAM_AXES, ModelConfig, Transformer, shift_right

BASE = ModelConfig(
    vocab_size=50,
    vocab_multiple=16,
    d_model=32,
    num_heads=4,
    mlp_dim=64,
    encoder_layers=2,
    decoder_layers=2,
    max_length=32,
    dropout=0.1,
)
L = 12


@nnx.jit(static_argnames=("deterministic", "return_probs"))
def forward(model, inputs, targets, **kw):
    return model(inputs, targets, **kw)


def make(cfg=BASE, seed=0):
    return Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model():
    return make()


def tokens(seed, shape=(2, L)):
    return jnp.asarray(np.random.default_rng(seed).integers(1, BASE.vocab_size, shape), jnp.int32)


def test_shift_right_segment_aware():
    x = jnp.array([[5, 6, 7, 8, 9, 0]])
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(shift_right(x), [[0, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(shift_right(x, seg), [[0, 5, 0, 7, 8, 0]])


def test_causality(model):
    inputs, targets = tokens(0), tokens(1)
    base = np.asarray(forward(model, inputs, targets))
    assert base.shape == (2, L, BASE.padded_vocab_size) and base.dtype == np.float32
    t = 5  # targets[t] feeds position t+1: changing targets[t:] must leave positions <= t alone
    changed = targets.at[:, t:].set(tokens(2)[:, t:])
    out = np.asarray(forward(model, inputs, changed))
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5)
    assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :], atol=1e-3)


def test_source_padding_is_ignored(model):
    inputs, targets = tokens(3), tokens(4)
    n_real = 7
    seg = jnp.asarray(np.where(np.arange(L) < n_real, 1, 0)[None].repeat(2, 0), jnp.int32)
    tseg = jnp.ones_like(seg)
    kw = dict(inputs_segment_ids=seg, targets_segment_ids=tseg)
    base = np.asarray(forward(model, inputs, targets, **kw))
    garbage = inputs.at[:, n_real:].set(tokens(5)[:, n_real:])
    np.testing.assert_allclose(np.asarray(forward(model, garbage, targets, **kw)), base, atol=1e-5)
    # Without segment ids, padding is id 0: more trailing zeros change nothing either.
    padded = inputs.at[:, n_real:].set(0)
    a = np.asarray(forward(model, padded[:, : n_real + 1], targets))
    b = np.asarray(forward(model, padded, targets))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_packing_matches_separate_examples(model):
    rng = np.random.default_rng(6)
    src_a, tgt_a = rng.integers(1, 50, 5), rng.integers(1, 50, 4)
    src_b, tgt_b = rng.integers(1, 50, 6), rng.integers(1, 50, 7)

    def pack(*parts):
        ids, seg, pos = np.zeros(L, np.int32), np.zeros(L, np.int32), np.zeros(L, np.int32)
        off = 0
        for i, p in enumerate(parts, 1):
            ids[off : off + len(p)], seg[off : off + len(p)], pos[off : off + len(p)] = p, i, np.arange(len(p))
            off += len(p)
        return jnp.asarray(ids[None]), jnp.asarray(seg[None]), jnp.asarray(pos[None])

    inp, iseg, ipos = pack(src_a, src_b)
    tgt, tseg, tpos = pack(tgt_a, tgt_b)
    packed = np.asarray(
        forward(
            model,
            inp,
            tgt,
            inputs_segment_ids=iseg,
            targets_segment_ids=tseg,
            inputs_positions=ipos,
            targets_positions=tpos,
        )
    )
    alone_a = np.asarray(forward(model, pack(src_a)[0], pack(tgt_a)[0]))
    alone_b = np.asarray(forward(model, pack(src_b)[0], pack(tgt_b)[0]))
    np.testing.assert_allclose(packed[0, :4], alone_a[0, :4], atol=1e-5)
    np.testing.assert_allclose(packed[0, 4:11], alone_b[0, :7], atol=1e-5)
    # Default positions are derived from segment ids when none are given.
    derived = np.asarray(forward(model, inp, tgt, inputs_segment_ids=iseg, targets_segment_ids=tseg))
    np.testing.assert_allclose(derived[0, :11], packed[0, :11], atol=1e-6)


def test_return_probs(model):
    probs = np.asarray(forward(model, tokens(7), tokens(8), return_probs=True))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert BASE.padded_vocab_size == 64
    assert probs[..., BASE.vocab_size :].max() < 1e-30


def test_dropout_is_keyed(model):
    inputs, targets = tokens(9), tokens(10)
    a = forward(model, inputs, targets, deterministic=False, dropout_rng=jax.random.key(0))
    b = forward(model, inputs, targets, deterministic=False, dropout_rng=jax.random.key(0))
    c = forward(model, inputs, targets, deterministic=False, dropout_rng=jax.random.key(1))
    d = forward(model, inputs, targets)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(d))
    with pytest.raises(ValueError, match="dropout_rng"):
        model(inputs, targets, deterministic=False)


OPTION_SETS = [
    dict(norm_position="post", norm="rmsnorm", activation="gelu"),
    dict(activation="gated_gelu", positions="learned", tie_output=False),
    dict(activation="swiglu", share_embeddings=False, dtype="bfloat16", head_dim=16),
    dict(scan_layers=True, remat="full"),
    dict(scan_layers=True, remat="minimal", norm_position="post", positions="learned"),
    dict(remat="dots", param_dtype="bfloat16", attention_dropout=0.1),
    dict(positions="relative", norm="rmsnorm", activation="gated_gelu", tie_output=False, attention_scaling=False,
         head_dim=24),
    dict(positions="relative", scan_layers=True, remat="full", relative_buckets=8, relative_max_distance=8),
]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_option_combinations_run(opts):
    cfg = dataclasses.replace(BASE, **opts)
    m = make(cfg)
    out = forward(m, tokens(11, (2, 8)), tokens(12, (2, 8)), deterministic=False, dropout_rng=jax.random.key(0))
    assert out.shape == (2, 8, cfg.padded_vocab_size) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    params = nnx.state(m, nnx.Param)
    assert all(x.dtype == jnp.dtype(cfg.param_dtype) for x in jax.tree.leaves(params))


def _check_names(model, scanned):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    shapes = nnx.state(model, nnx.Param)
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(specs)[0])
    flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
    assert flat_specs.keys() == flat_shapes.keys() and flat_specs
    for path, spec in flat_specs.items():
        arr = flat_shapes[path]
        names = tuple(spec)
        assert len(names) == arr.ndim, (path, names, arr.shape)
        assert all(n in PARAM_AXES for n in names), (path, names)
        in_stack = any(getattr(k, "key", None) == "layers" for k in path)
        assert (names[0] == "layers") == (scanned and in_stack), (path, names)


def test_logical_names(model):
    _check_names(model, scanned=False)


def test_logical_names_scanned_and_scan_matches_loop(model):
    cfg = dataclasses.replace(BASE, scan_layers=True, remat="full")
    scanned = make(cfg)
    _check_names(scanned, scanned=True)
    # Same weights (stacked from the loop model) and same dropout key give the same logits:
    # layer i gets the same key in both layouts.
    loop_state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    scan_state = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    for stack in ("encoder", "decoder"):
        layers = loop_state[stack]["layers"]
        scan_state[stack]["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])
        scan_state[stack]["final_norm"] = loop_state[stack]["final_norm"]
    scan_state["token_embedding"] = loop_state["token_embedding"]
    nnx.update(scanned, scan_state)
    kw = dict(deterministic=False, dropout_rng=jax.random.key(3))
    a = forward(model, tokens(13), tokens(14), **kw)
    b = forward(scanned, tokens(13), tokens(14), **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize(
    "field,value",
    [
        ("activation", "tanh"),
        ("norm", "batchnorm"),
        ("norm_position", "middle"),
        ("positions", "rotary"),
        ("dtype", "float16"),
        ("param_dtype", "int8"),
        ("remat", "some"),
        ("num_heads", 5),
        ("d_model", -4),
        ("vocab_size", 0),
        ("dropout", 1.0),
        ("attention_dropout", -0.1),
        ("encoder_layers", 0),
        ("head_dim", 0),
        ("norm_eps", 0.0),
        ("scan_layers", "yes"),
    ],
)
def test_validate_names_the_key(field, value):
    cfg = dataclasses.replace(BASE, **{field: value})
    with pytest.raises(ValueError, match=rf"^model\.{field}:"):
        cfg.validate()


def test_config_defaults():
    cfg = ModelConfig()
    cfg.validate()
    assert cfg.vocab_size is None  # the tokenizer's size, filled in by the trainer
    cfg = dataclasses.replace(cfg, vocab_size=32128)
    assert cfg.padded_vocab_size == 32128 and cfg.kv_dim == 64
    assert dataclasses.replace(cfg, vocab_size=32000).padded_vocab_size == 32000
    assert dataclasses.replace(cfg, vocab_size=32001).padded_vocab_size == 32128
