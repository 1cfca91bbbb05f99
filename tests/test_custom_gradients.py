"""The hand-written backward passes give autodiff's gradients.

`model.layers.dense` and `model.output.cross_entropy_sums` replace autodiff's backward pass for
speed (see their docstrings); here each is checked against autodiff of the plain computation,
including the cases the fused loss handles itself: weights (padding), label smoothing, a padded
vocabulary and both kernel layouts (tied [vocab, embed] and untied [embed, vocab]).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.layers import dense
from model.output import cross_entropy_sums, logits


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_dense_gradients_match_autodiff():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, (3, 5, 8)), jax.random.normal(kw, (8, 6))
    g = jax.random.normal(kg, (3, 5, 6))
    ours = jax.vjp(dense, x, w)
    plain = jax.vjp(lambda x, w: jnp.einsum("bld,dm->blm", x, w), x, w)
    _close(ours[0], plain[0])
    for a, b in zip(ours[1](g), plain[1](g)):
        _close(a, b)


@pytest.mark.parametrize("vocab_axis", [0, 1])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("padded_vocab", [11, 16])
def test_fused_loss_gradients_match_autodiff_of_logits_and_cross_entropy(vocab_axis, label_smoothing,
                                                                          padded_vocab):
    vocab_size, d = 11, 8
    ky, kk, kt, kw = jax.random.split(jax.random.key(1), 4)
    y = jax.random.normal(ky, (2, 5, d))
    shape = (padded_vocab, d) if vocab_axis == 0 else (d, padded_vocab)
    kernel = jax.random.normal(kk, shape) * 0.5
    targets = jax.random.randint(kt, (2, 5), 0, vocab_size)
    weights = (jax.random.uniform(kw, (2, 5)) > 0.3).astype(jnp.float32)  # some padding

    def fused(y, kernel):
        return cross_entropy_sums(y, kernel, targets, weights, vocab_axis, vocab_size, label_smoothing)[0]

    def plain(y, kernel):
        z = logits(y, kernel, vocab_axis=vocab_axis, vocab_size=vocab_size)
        logp = jax.nn.log_softmax(z, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        smooth = -jnp.sum(logp[..., :vocab_size], axis=-1) / vocab_size
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
        return jnp.sum(loss * weights)

    _close(fused(y, kernel), plain(y, kernel))
    scale = 0.37  # the loss's cotangent, e.g. 1 / tokens: the backward pass only scales
    ours = jax.grad(lambda y, k: scale * fused(y, k), argnums=(0, 1))(y, kernel)
    reference = jax.grad(lambda y, k: scale * plain(y, k), argnums=(0, 1))(y, kernel)
    for a, b in zip(ours, reference):
        _close(a, b)
