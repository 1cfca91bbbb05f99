"""dot_product_attention and the mask helpers against a plain NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import combine_masks, dot_product_attention, make_attention_mask, make_causal_mask, make_segment_mask

B, L, H, K = 2, 6, 2, 4


def ref_attention(q, k, v, mask):
    """Textbook softmax attention; fully masked query rows give zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = np.broadcast_to(np.asarray(mask), logits.shape)
    logits = np.where(mask, logits, -np.inf)
    mx = np.max(np.where(mask, logits, -1e300), axis=-1, keepdims=True)
    e = np.where(mask, np.exp(logits - mx), 0.0)
    denom = e.sum(-1, keepdims=True)
    probs = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((B, L, H, K)).astype(np.float32) for _ in range(3))


def _masks():
    valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    pad = make_attention_mask(jnp.asarray(valid), jnp.asarray(valid))
    causal = make_causal_mask(L)
    segm = make_segment_mask(jnp.asarray(seg), jnp.asarray(seg))
    return {
        "padding": pad,
        "causal": causal,
        "padding_causal": combine_masks(pad, causal),
        "segments_causal": combine_masks(segm, causal),
    }


@pytest.mark.parametrize("name", ["padding", "causal", "padding_causal", "segments_causal"])
def test_matches_numpy(qkv, name):
    mask = _masks()[name]
    q, k, v = qkv
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
    np.testing.assert_allclose(np.asarray(out), ref_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_mask_helpers_match_numpy():
    seg_q = np.array([[1, 1, 2, 0]], np.int32)
    seg_k = np.array([[1, 2, 2, 0, 0]], np.int32)
    m = np.asarray(make_segment_mask(jnp.asarray(seg_q), jnp.asarray(seg_k)))
    expect = (seg_q[0][:, None] == seg_k[0][None, :]) & (seg_q[0][:, None] > 0) & (seg_k[0] > 0)
    assert m.shape == (1, 1, 4, 5)
    np.testing.assert_array_equal(m[0, 0], expect)
    np.testing.assert_array_equal(np.asarray(make_causal_mask(3))[0, 0], np.tril(np.ones((3, 3), bool)))
    pad = np.asarray(make_attention_mask(jnp.array([[True, False]]), jnp.array([[True, True, False]])))
    np.testing.assert_array_equal(pad[0, 0], [[True, True, False], [False, False, False]])
    assert combine_masks(None, None) is None


def test_fully_masked_rows_are_zero_not_nan(qkv):
    q, k, v = qkv
    mask = np.ones((B, 1, L, L), bool)
    mask[0, :, 3:, :] = False  # padding queries see nothing
    out = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0, 3:], 0.0)
    np.testing.assert_allclose(out, ref_attention(q, k, v, mask), atol=1e-5)


def test_bf16_keeps_softmax_in_f32(qkv):
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv)
    mask = _masks()["padding_causal"]
    jaxpr = jax.make_jaxpr(lambda a, b, c: dot_product_attention(a, b, c, mask))(q, k, v)
    exp_dtypes = [e.outvars[0].aval.dtype for e in jaxpr.jaxpr.eqns if e.primitive.name == "exp"]
    assert exp_dtypes and all(d == jnp.float32 for d in exp_dtypes), exp_dtypes
    out = dot_product_attention(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    ref = ref_attention(*(np.asarray(a, np.float32) for a in (q, k, v)), mask)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_attention_dropout_needs_key_and_is_keyed(qkv):
    q, k, v = (jnp.asarray(a) for a in qkv)
    kw = dict(dropout_rate=0.5, deterministic=False)
    a = dot_product_attention(q, k, v, dropout_rng=jax.random.key(0), **kw)
    b = dot_product_attention(q, k, v, dropout_rng=jax.random.key(0), **kw)
    c = dot_product_attention(q, k, v, dropout_rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError):
        dot_product_attention(q, k, v, **kw)


def test_cudnn_attention_is_the_same_function(qkv, monkeypatch):
    """model.attention_impl=cudnn: jax.nn.dot_product_attention with our masks, bias, scaling and
    zero rows. CPUs have no cuDNN, so its XLA implementation stands in for the kernel here (the
    kernel itself ran on an H200: README, Performance)."""
    from model.attention import cudnn_attention

    calls = []
    real = jax.nn.dot_product_attention

    def on_cpu(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
    q, k, v = (jnp.asarray(a) for a in qkv)
    rows_masked = np.ones((B, 1, L, L), bool)
    rows_masked[0, :, 3:, :] = False
    bias = jnp.asarray(np.random.default_rng(1).standard_normal((1, H, L, L)).astype(np.float32))
    for mask in [*_masks().values(), jnp.asarray(rows_masked), None]:
        for b in (None, bias):
            for scale in (True, False):
                want = dot_product_attention(q, k, v, mask, bias=b, scale=scale)
                got = cudnn_attention(q, k, v, mask, bias=b, scale=scale)
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert set(calls) == {"cudnn"}
    np.testing.assert_array_equal(np.asarray(cudnn_attention(q, k, v, jnp.asarray(rows_masked)))[0, 3:], 0.0)


def test_cudnn_attention_config_errors(tmp_path):
    from trainer.config import ConfigError
    from trainer.run import Run
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match=r"model\.attention_impl.*bfloat16"):
        tiny_config(tmp_path, "model.attention_impl=cudnn")
    with pytest.raises(ConfigError, match=r"model\.attention_impl.*attention_dropout"):
        tiny_config(tmp_path, "model.attention_impl=cudnn", "model.dtype=bfloat16", "model.attention_dropout=0.1")
    with pytest.raises(ConfigError, match=r"model\.attention_impl"):
        tiny_config(tmp_path, "model.attention_impl=flash")
    cfg = tiny_config(tmp_path, "model.attention_impl=cudnn", "model.dtype=bfloat16")
    with pytest.raises(ConfigError, match=r"`model\.attention_impl` is 'cudnn', which needs NVIDIA GPUs; .* cpu"):
        Run.from_config(cfg, jax.devices())
