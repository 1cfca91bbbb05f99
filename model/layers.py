"""Building blocks: dropout, norms, feed-forward, token embedding and positions.

Every block takes its compute dtype from the config and casts its float32-stored (or
`param_dtype`) parameters at use; norms and softmax-like reductions run in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import axes
from model.config import ModelConfig


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, *, deterministic: bool) -> jax.Array:
    """Inverted dropout driven by an explicit key (the trainer owns the randomness).

    A pure function of (x, rng): the same key gives the same mask whatever the mesh.
    """
    if deterministic or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout with deterministic=False needs a dropout_rng key")
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x)).astype(x.dtype)


def split_key(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """n independent keys from `rng`, or n Nones when there is no key (deterministic runs)."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))


class Norm(nnx.Module):
    """LayerNorm (scale + bias) or RMSNorm (scale only), computed in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.dtype = cfg.compute_dtype
        d, pd = cfg.d_model, jnp.dtype(cfg.param_dtype)
        self.scale = axes.make_param(rngs, nnx.initializers.ones, (d,), (axes.EMBED,), pd)
        if cfg.norm == "layernorm":
            self.bias = axes.make_param(rngs, nnx.initializers.zeros, (d,), (axes.EMBED,), pd)
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = scaled_norm(x.astype(jnp.float32), self.scale[...].astype(jnp.float32), self.eps,
                        self.kind == "layernorm")
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def _normalized(x: jax.Array, eps: float, center: bool) -> tuple[jax.Array, jax.Array]:
    if center:
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return x * rstd, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def scaled_norm(x: jax.Array, scale: jax.Array, eps: float, center: bool) -> jax.Array:
    """`normalize(x) * scale` over the last axis: LayerNorm without bias (`center`) or RMSNorm.

    The backward pass is written out (two row reductions and one elementwise pass) instead of
    left to autodiff, whose mean-subtraction terms XLA fuses along the residual stream into
    long chains that it recomputes in every consumer (the profile of the reference step showed
    about 10% of the step there).
    """
    return _normalized(x, eps, center)[0] * scale


def _scaled_norm_fwd(x: jax.Array, scale: jax.Array, eps: float, center: bool) -> tuple[jax.Array, tuple]:
    xhat, rstd = _normalized(x, eps, center)
    return xhat * scale, (xhat, rstd, scale)


def _scaled_norm_bwd(eps: float, center: bool, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    xhat, rstd, scale = res
    gs = g * scale
    dx = gs - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True)
    if center:
        dx = dx - jnp.mean(gs, axis=-1, keepdims=True)
    dscale = jnp.sum(g * xhat, axis=tuple(range(g.ndim - 1)))
    return dx * rstd, dscale


scaled_norm.defvjp(_scaled_norm_fwd, _scaled_norm_bwd)


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x [..., n] @ kernel [n, m]`: a projection whose backward pass is written out.

    The kernel's gradient is `x^T @ g` over rows flattened to two dimensions. From autodiff's
    own form XLA:CPU built the feed-forward kernels' gradients with both operands transposed and
    ran them on its generic matmul at about half the speed of the others (108 against 200
    GFLOP/s); contracting the leading axes without flattening made it copy activations
    transposed instead. This form needs neither (the reference step, configs/bench.yaml, 3.6%
    faster).
    """
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return dense(x, kernel), (x, kernel)


def _dense_bwd(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    d_x = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    rows = (((0,), (0,)), ((), ()))
    d_kernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), rows)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "gated_gelu": jax.nn.gelu,
    "swiglu": jax.nn.silu,
}


class FeedForward(nnx.Module):
    """Position-wise MLP; the gated variants (gated_gelu, swiglu) have two input kernels."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.activation = cfg.activation
        self.gated = cfg.activation in ("gated_gelu", "swiglu")
        self.dtype = cfg.compute_dtype
        d, m, pd = cfg.d_model, cfg.mlp_dim, jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.wi = axes.make_param(rngs, init, (d, m), (axes.EMBED, axes.MLP), pd)
        self.wi_gate = axes.make_param(rngs, init, (d, m), (axes.EMBED, axes.MLP), pd) if self.gated else None
        self.wo = axes.make_param(rngs, init, (m, d), (axes.MLP, axes.EMBED), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        h = dense(x, self.wi[...].astype(dt))
        if self.gated:
            gate = dense(x, self.wi_gate[...].astype(dt))
            h = _ACTIVATIONS[self.activation](gate) * h
        else:
            h = _ACTIVATIONS[self.activation](h)
        h = axes.constrain(h, axes.BLM)
        out = dense(h, self.wo[...].astype(dt))
        return axes.constrain(out, axes.BLE)


class Embed(nnx.Module):
    """Token table [padded_vocab, embed]; `output_operands` feeds the tied logits.

    Flax WMT style: table initialised N(0, 1), no input scaling, tied logits divided by
    sqrt(d_model) so they start at unit scale.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        self.embedding = axes.make_param(
            rngs,
            nnx.initializers.normal(1.0),
            (cfg.padded_vocab_size, cfg.d_model),
            (axes.VOCAB, axes.EMBED),
            jnp.dtype(cfg.param_dtype),
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather from the whole table (all-gathered like any FSDP weight): a lookup into a table
        # split over vocab and embed with batch-split ids makes XLA rematerialise it anyway,
        # with a warning, and reshard the result.
        table = axes.constrain(self.embedding[...], (None, None))
        x = jnp.take(table, ids, axis=0, mode="clip").astype(self.dtype)
        return axes.constrain(x, axes.BLE)

    def output_operands(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(scaled states, table [vocab, embed]) for the tied logits of `model.output` (vocab_axis 0).

        The states are scaled, not the vocabulary-wide logits: the same logits for one
        elementwise pass over embed-sized data instead of vocabulary-sized data.
        """
        scale = jnp.asarray(1.0 / np.sqrt(x.shape[-1]), self.dtype)
        return x.astype(self.dtype) * scale, self.embedding[...].astype(self.dtype)


class Logits(nnx.Module):
    """Untied output projection [embed, padded_vocab] (tie_output=False)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = axes.make_param(
            rngs, init, (cfg.d_model, cfg.padded_vocab_size), (axes.EMBED, axes.VOCAB), jnp.dtype(cfg.param_dtype)
        )

    def output_operands(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(states, kernel [embed, vocab]) for the logits of `model.output` (vocab_axis 1)."""
        return x.astype(self.dtype), self.kernel[...].astype(self.dtype)


def sinusoidal_positions(positions: jax.Array, d_model: int, max_timescale: float = 10_000.0) -> jax.Array:
    """Fixed sin/cos encoding [batch, len, d_model] of explicit integer positions.

    Computed from the positions themselves (not gathered from a table), so packed examples
    that restart at 0 get the same encoding as when alone. Layout: sin in the first half,
    cos in the second (Flax WMT / tensor2tensor).
    """
    half = d_model // 2
    inv = np.exp(-np.log(max_timescale) * np.arange(half) / max(half - 1, 1)).astype(np.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv
    enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if d_model % 2:
        enc = jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, 1)])
    return enc


class LearnedPositions(nnx.Module):
    """Trainable position table [max_length, embed] gathered by explicit positions."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        self.embedding = axes.make_param(
            rngs,
            nnx.initializers.normal(0.02),
            (cfg.max_length, cfg.d_model),
            (axes.LENGTH, axes.EMBED),
            jnp.dtype(cfg.param_dtype),
        )

    def __call__(self, positions: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], positions, axis=0, mode="clip").astype(self.dtype)


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucket of each `key position - query position` (Raffel et al., 2020; as in t5x/HF).

    Half the buckets (all of them when not bidirectional) hold exact distances up to
    num_buckets / 2 (/ 4 bidirectional); the rest grow logarithmically up to max_distance, beyond
    which distances share the last bucket. Bidirectional: keys after the query use the upper half.
    Causal: only keys at or before the query are distinguished (later ones are masked anyway).
    """
    bucket = jnp.zeros_like(relative_position)
    n = -relative_position  # distance back from the query
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(relative_position.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(safe / max_exact) / np.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nnx.Module):
    """T5's learned bias on attention logits, one value per (distance bucket, head).

    One table per stack (bidirectional for the encoder, causal for the decoder's self-attention),
    computed once and added in every layer; sharded over `heads` like the attention.
    """

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_buckets
        self.max_distance = cfg.relative_max_distance
        self.embedding = axes.make_param(
            rngs,
            nnx.initializers.normal(cfg.d_model ** -0.5),
            (cfg.relative_buckets, cfg.num_heads),
            (axes.LENGTH, axes.HEADS),
            jnp.dtype(cfg.param_dtype),
        )

    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """Bias [batch or 1, heads, q_len, kv_len] (float32) from positions [batch or 1, len]."""
        relative = key_positions[:, None, :].astype(jnp.int32) - query_positions[:, :, None].astype(jnp.int32)
        buckets = relative_position_bucket(relative, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)
        values = jnp.take(self.embedding[...].astype(jnp.float32), buckets, axis=0)  # [b, q, k, heads]
        return axes.constrain(jnp.transpose(values, (0, 3, 1, 2)), (axes.ACT_BATCH, axes.ACT_HEADS, None, None))

