"""The optimizer: AdamW with warmup + cosine/rsqrt decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from trainer.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    warmup = max(cfg.warmup_steps, 0)
    peak = cfg.learning_rate
    if cfg.schedule == "cosine":
        decay_steps = max(cfg.steps, warmup + 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=decay_steps,
            end_value=peak * cfg.end_learning_rate_ratio)
    if cfg.schedule == "rsqrt":
        # Linear warmup, then peak * sqrt(warmup / step) (the original Transformer's shape).
        w = max(warmup, 1)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, w),
             lambda count: peak * (w / (count + w)) ** 0.5],
            boundaries=[w])
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
                                boundaries=[max(warmup, 1)])


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg)
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts), schedule


def _decay_mask(params):
    """Weight decay on matrices only; norm scales and biases are left alone (as in t5x/MaxText).

    Decided from the logical names, so a norm scale stacked to `[layers, embed]` under scan
    still counts as a vector.
    """
    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            names = leaf.get_metadata().get("out_sharding") or ()
            return leaf.replace(sum(n != "layers" for n in names) >= 2)
        return getattr(leaf, "ndim", 0) >= 2

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
