"""The output layer: decoder states -> vocabulary logits, and the token loss fused with them.

Both take the same operands (`Transformer.output_operands`): the decoder states [batch, len,
embed], already scaled and in the compute dtype, and the kernel, either the tied token table
[vocab, embed] (`vocab_axis=0`) or an untied kernel [embed, vocab] (`vocab_axis=1`). Logits are
float32, and the padded vocabulary (ids >= vocab_size) gets PADDED_VOCAB_LOGIT, so that no pass
(training, eval, decoding) ever gives it probability.

`cross_entropy_sums` is the summed, weighted token loss of those logits without keeping them for
the backward pass. The loss is a weighted sum, so once the forward pass has the logits, the
gradients of the states and the kernel are known up to one scalar, the loss's cotangent. Under
differentiation its forward pass therefore turns the logits into `weight * (softmax - target)`
in the pass that takes their exponentials, multiplies that into both gradients right away, and
the backward pass only scales them. Autodiff instead kept the [batch, len, vocab] logits, read
them again for the softmax, and XLA:CPU copied their gradient transposed for the kernel's
product: on the reference step (`configs/bench.yaml`) the fused form was 2.6% faster, and its
residual is a [vocab, embed] gradient instead of the logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from model import axes

# Finite so that one-hot * logits in a loss never meets -inf * 0; exp() underflows to 0.
PADDED_VOCAB_LOGIT = -1e9


def _specs(vocab_axis: int) -> tuple[str, str, tuple[str, str]]:
    """einsum specs of the logits and of the states' gradient; the kernel's logical axes."""
    kernel, names = ("vd", (axes.VOCAB, axes.EMBED)) if vocab_axis == 0 else ("dv", (axes.EMBED, axes.VOCAB))
    return f"bld,{kernel}->blv", f"blv,{kernel}->bld", names


def logits(y: jax.Array, kernel: jax.Array, *, vocab_axis: int, vocab_size: int) -> jax.Array:
    """Float32 logits [batch, len, padded_vocab] of states `y` [batch, len, embed]."""
    spec = _specs(vocab_axis)[0]
    out = jnp.einsum(spec, y, kernel, preferred_element_type=jnp.float32).astype(jnp.float32)
    padded = kernel.shape[vocab_axis]
    if padded > vocab_size:  # a pass over the logits only when there are padded rows
        out = jnp.where(jnp.arange(padded) < vocab_size, out, PADDED_VOCAB_LOGIT)
    return axes.constrain(out, axes.BLV)


def _sums(z: jax.Array, targets: jax.Array, weights: jax.Array, vocab_size: int,
          label_smoothing: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed weighted loss and correct predictions of logits `z`, and the rows' logsumexp.

    A token is correct when its target's logit is the row's maximum (no separate argmax pass).
    Label smoothing spreads its mass over the real vocabulary only.
    """
    top = jnp.max(z, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(z - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    loss = lse - target_logit
    if label_smoothing > 0:
        real = jnp.arange(z.shape[-1]) < vocab_size
        mean_logit = jnp.sum(jnp.where(real, z, 0.0), axis=-1) / vocab_size
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - mean_logit)
    correct = (target_logit >= top).astype(jnp.float32)
    return jnp.sum(loss * weights), jnp.sum(correct * weights), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def cross_entropy_sums(y: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, vocab_axis: int,
                       vocab_size: int, label_smoothing: float) -> tuple[jax.Array, jax.Array]:
    """(sum of weights * token loss, sum of weights * correct) for int `targets` [batch, len].

    The same numbers as `logits` followed by a softmax cross-entropy; differentiable in `y` and
    `kernel` (see the module docstring for how).
    """
    z = logits(y, kernel, vocab_axis=vocab_axis, vocab_size=vocab_size)
    loss, correct, _ = _sums(z, targets, weights, vocab_size, label_smoothing)
    return loss, correct


def _fwd(y: jax.Array, kernel: jax.Array, targets: jax.Array, weights: jax.Array, vocab_axis: int, vocab_size: int,
         label_smoothing: float) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    _, states_spec, kernel_names = _specs(vocab_axis)
    z = logits(y, kernel, vocab_axis=vocab_axis, vocab_size=vocab_size)
    loss, correct, lse = _sums(z, targets, weights, vocab_size, label_smoothing)
    vocab = jnp.arange(z.shape[-1])
    target_mass = (vocab == targets[..., None]).astype(jnp.float32)
    if label_smoothing > 0:
        target_mass = (1.0 - label_smoothing) * target_mass + (vocab < vocab_size) * (label_smoothing / vocab_size)
    # d loss / d logits; padded rows have exp(PADDED_VOCAB_LOGIT - lse) = 0 and no target mass.
    d_z = ((jnp.exp(z - lse[..., None]) - target_mass) * weights[..., None]).astype(y.dtype)
    d_z = axes.constrain(d_z, axes.BLV)
    d_y = jnp.einsum(states_spec, d_z, kernel, preferred_element_type=jnp.float32).astype(y.dtype)
    # The kernel's gradient over rows flattened to two dimensions (x^T @ g): contracting batch and
    # length as they are, XLA:CPU first copied the [batch, len, vocab] gradient transposed.
    rows = (((0,), (0,)), ((), ()))
    flat_d_z, flat_y = d_z.reshape(-1, d_z.shape[-1]), y.reshape(-1, y.shape[-1])
    operands = (flat_d_z, flat_y) if vocab_axis == 0 else (flat_y, flat_d_z)
    d_kernel = jax.lax.dot_general(*operands, rows, preferred_element_type=jnp.float32).astype(kernel.dtype)
    return (loss, correct), (axes.constrain(d_y, axes.BLE), axes.constrain(d_kernel, kernel_names))


def _bwd(vocab_axis: int, vocab_size: int, label_smoothing: float, residuals: tuple[jax.Array, jax.Array],
         g: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, None, None]:
    d_y, d_kernel = residuals
    scale = g[0]  # the correct-prediction count has no gradient
    return d_y * scale.astype(d_y.dtype), d_kernel * scale.astype(d_kernel.dtype), None, None


cross_entropy_sums.defvjp(_fwd, _bwd)
