"""T5's relative position bias: buckets as in the reference implementation, one table per stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import ModelConfig, Transformer
from model.layers import relative_position_bucket

DISTANCES = [-200, -128, -100, -64, -33, -32, -20, -16, -15, -9, -8, -7, -3, -2, -1, 0, 1, 2, 3, 7, 8, 9, 15, 16,
             20, 32, 33, 64, 100, 128, 200]
# key position - query position -> bucket, 32 buckets, max distance 128, from Hugging Face's
# FlaxT5Attention._relative_position_bucket (transformers 4.57.6).
GOLDEN_BIDIRECTIONAL = [15, 15, 15, 14, 12, 12, 10, 10, 9, 8, 8, 7, 3, 2, 1, 0, 17, 18, 19, 23, 24, 24, 25, 26, 26,
                        28, 28, 30, 31, 31, 31]
GOLDEN_CAUSAL = [31, 31, 30, 26, 21, 21, 17, 16, 15, 9, 8, 7, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("bidirectional,golden", [(True, GOLDEN_BIDIRECTIONAL), (False, GOLDEN_CAUSAL)],
                         ids=["bidirectional", "causal"])
def test_buckets_match_the_reference_implementation(bidirectional, golden):
    got = relative_position_bucket(jnp.asarray(DISTANCES), bidirectional=bidirectional, num_buckets=32,
                                   max_distance=128)
    assert [int(b) for b in got] == golden


def _model(**kw):
    cfg = ModelConfig(vocab_size=20, vocab_multiple=8, d_model=16, num_heads=2, mlp_dim=32, encoder_layers=2,
                      decoder_layers=2, dropout=0.0, max_length=16, positions="relative", **kw)
    return cfg, Transformer(cfg, rngs=nnx.Rngs(params=0))


def test_one_table_per_stack_and_no_absolute_positions():
    cfg, model = _model()
    params = nnx.state(model, nnx.Param)
    tables = {jax.tree_util.keystr(path): leaf.shape
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if "relative" in str(path)}
    assert len(tables) == 2, tables
    assert any("encoder_relative_bias" in k for k in tables) and any("decoder_relative_bias" in k for k in tables)
    assert all(shape == (cfg.relative_buckets, cfg.num_heads) == (32, 2) for shape in tables.values())
    assert model.encoder_positions is None and model.decoder_positions is None


def test_the_bias_depends_on_distance_only_and_moves_the_output():
    """Shifting every position by the same amount changes nothing (only distances count); changing
    the table changes the logits (the bias is applied)."""
    cfg, model = _model()
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.integers(2, 20, (2, 7)), jnp.int32)
    targets = jnp.asarray(rng.integers(2, 20, (2, 5)), jnp.int32)
    base = model(inputs, targets)
    shifted = model(inputs, targets, inputs_positions=jnp.arange(7)[None].repeat(2, 0) + 5,
                    targets_positions=jnp.arange(5)[None].repeat(2, 0) + 9)
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(base), atol=1e-5, rtol=0)
    model.encoder_relative_bias.embedding[...] = model.encoder_relative_bias.embedding[...] + jnp.arange(32.0)[:, None]
    assert not np.allclose(np.asarray(model(inputs, targets)), np.asarray(base), atol=1e-3)


def test_config_checks_the_bucket_settings():
    with pytest.raises(ValueError, match="model.relative_max_distance"):
        ModelConfig(vocab_size=20, positions="relative", relative_buckets=32, relative_max_distance=16).validate()
    with pytest.raises(ValueError, match="model.relative_buckets"):
        ModelConfig(vocab_size=20, positions="relative", relative_buckets=2).validate()


def test_training_with_relative_positions_is_the_same_on_a_sharded_mesh(tmp_path):
    """The table is sharded over `heads` (tensor) and the bias over batch and heads: same losses."""
    from tests.conftest import read_metrics, tiny_config
    from trainer.train import train

    common = ("model.positions=relative", "model.relative_buckets=8", "model.relative_max_distance=16",
              "train.steps=3", "train.log_every=1", "checkpoint.save_final=false")
    train(tiny_config(tmp_path / "one", *common, "mesh.fsdp=1"), devices=jax.devices()[:1])
    train(tiny_config(tmp_path / "mesh", *common, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
          devices=jax.devices())
    one, mesh = ([r["loss"] for r in read_metrics(tmp_path / d)] for d in ("one", "mesh"))
    assert len(one) == 3 and one[-1] < one[0]
    np.testing.assert_allclose(mesh, one, rtol=0, atol=1e-5)


def test_without_logit_scaling_the_query_starts_smaller_and_the_logits_match():
    """T5 folds 1/sqrt(head_dim) into the query's initialisation: same initial logit scale."""
    from model.attention import dot_product_attention

    q = jax.random.normal(jax.random.key(0), (1, 4, 2, 16))
    k = jax.random.normal(jax.random.key(1), (1, 4, 2, 16))
    v = jax.random.normal(jax.random.key(2), (1, 4, 2, 16))
    scaled = dot_product_attention(q, k, v)
    np.testing.assert_allclose(dot_product_attention(q / 4.0, k, v, scale=False), scaled, atol=1e-6, rtol=0)
    _, t5 = _model(attention_scaling=False)
    _, ours = _model()
    ratio = float(jnp.std(t5.encoder.layers[0].self_attention.query[...]) /
                  jnp.std(ours.encoder.layers[0].self_attention.query[...]))
    assert abs(ratio - 8 ** -0.5) < 0.05, ratio  # head_dim 8
