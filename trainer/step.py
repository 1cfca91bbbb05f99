"""The jitted functions the commands run: train step, eval step and generation.

Each is a plain function of (params or state, batch) plus static settings, jitted with explicit
in/out shardings so the same code runs on one device or a pod.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from trainer.config import DecodeConfig
from trainer.data.vocab import EOS_ID
from trainer.train_state import TrainState


@jax.custom_vjp
def _token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(-log softmax(logits)[target], whether the target has the top logit) per token.

    The gradient is written out, `softmax - one_hot(target)` in one elementwise pass over the
    logits: autodiff would add the transpose of the target gather (a scatter into a zeroed
    vocabulary-wide buffer) to the softmax term in a second pass.
    """
    return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(logits: jax.Array, targets: jax.Array) -> tuple[tuple[jax.Array, jax.Array], tuple]:
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = target_logit >= jnp.max(logits, axis=-1)
    return (lse - target_logit, correct), (logits, targets, lse)


def _token_nll_bwd(res: tuple, g: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    logits, targets, lse = res
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    d_logits = (jnp.exp(logits - lse[..., None]) - is_target) * g[0][..., None]
    return d_logits, None


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array, *, vocab_size: int,
                  label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed token loss, summed weights and summed correct predictions.

    Written as logsumexp minus the target's logit, so the only vocabulary-wide tensors are the
    float32 logits and (in the backward pass) their gradient: no log-probability tensor, no
    separate argmax pass (a token is correct when its logit is the row's maximum). Label
    smoothing spreads its mass over the real vocabulary only: the padded rows of the logits are
    masked by the model and must not receive any target probability.
    """
    logits = logits.astype(jnp.float32)
    loss, correct = _token_nll(logits, targets.astype(jnp.int32))
    if label_smoothing > 0:
        real = jnp.arange(logits.shape[-1]) < vocab_size
        mean_logit = jnp.sum(jnp.where(real, logits, 0.0), axis=-1) / vocab_size
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (jax.nn.logsumexp(logits, axis=-1) - mean_logit)
    return jnp.sum(loss * weights), jnp.sum(weights), jnp.sum(correct.astype(jnp.float32) * weights)


def _forward(graphdef: Any, params: Any, batch: dict[str, jax.Array], *, deterministic: bool,
             dropout_rng: jax.Array | None) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model(batch["inputs"], batch["targets"],
                 inputs_segment_ids=batch.get("inputs_segment_ids"),
                 targets_segment_ids=batch.get("targets_segment_ids"),
                 inputs_positions=batch.get("inputs_positions"),
                 targets_positions=batch.get("targets_positions"),
                 deterministic=deterministic, dropout_rng=dropout_rng)


def _weights(batch: dict[str, jax.Array]) -> jax.Array:
    seg = batch.get("targets_segment_ids")
    return ((seg > 0) if seg is not None else (batch["targets"] > 0)).astype(jnp.float32)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: Any,
               tx: optax.GradientTransformation, schedule: optax.Schedule, vocab_size: int, label_smoothing: float,
               grad_accum_steps: int, skip_nonfinite: bool) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over the global batch, split into `grad_accum_steps` microbatches.

    Gradients of the summed loss are accumulated and divided by the total number of target
    tokens once, so accumulation gives the same update as one big batch.
    """
    step = state["step"]
    base_rng = jax.random.wrap_key_data(state["rng"])
    step_rng = jax.random.fold_in(base_rng, step)

    def micro_loss(params, micro, rng):
        logits = _forward(graphdef, params, micro, deterministic=False, dropout_rng=rng)
        loss_sum, weight_sum, correct = cross_entropy(logits, micro["targets"], _weights(micro),
                                                      vocab_size=vocab_size, label_smoothing=label_smoothing)
        return loss_sum, (weight_sum, correct)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    params = state["params"]
    if grad_accum_steps == 1:
        (loss_sum, (weight_sum, correct)), grads = grad_fn(params, batch, step_rng)
    else:
        # Row r goes to microbatch r % n: each device keeps its own rows, no data moves.
        micro_batches = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]), 0, 1),
            batch)

        def accumulate(carry, xs):
            micro, index = xs
            (l, (w, c)), g = grad_fn(params, micro, jax.random.fold_in(step_rng, index))
            acc_g, acc_l, acc_w, acc_c = carry
            return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, acc_w + w, acc_c + c), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        (grads, loss_sum, weight_sum, correct), _ = jax.lax.scan(
            accumulate, init, (micro_batches, jnp.arange(grad_accum_steps)))

    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        # Keep the old parameters and moments; the step counter still advances so data moves on.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_params = keep(new_params, params)
        new_opt_state = keep(new_opt_state, state["opt_state"])
    new_state = {**state, "step": step + 1, "params": new_params, "opt_state": new_opt_state}
    metrics = {
        "loss": loss,
        "accuracy": correct / denom,
        "grad_norm": grad_norm,
        # The rate this update used: the optimizer's own count, which skipped updates
        # (train.on_nonfinite=skip) do not advance, unlike `step`.
        "learning_rate": schedule(_schedule_count(state["opt_state"], step)),
        "finite": finite,
    }
    return new_state, metrics


def _schedule_count(opt_state: Any, default: jax.Array) -> jax.Array:
    """The update count the optimizer's learning-rate schedule reads (optax's ScaleByScheduleState)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
             if isinstance(x, optax.ScaleByScheduleState)]
    return found[0].count if found else default


def eval_step(params: Any, batch: dict[str, jax.Array], *, graphdef: Any, vocab_size: int) -> dict[str, jax.Array]:
    """Sums for one eval batch (the loop divides at the end): loss without smoothing, accuracy."""
    logits = _forward(graphdef, params, batch, deterministic=True, dropout_rng=None)
    loss_sum, weight_sum, correct = cross_entropy(logits, batch["targets"], _weights(batch), vocab_size=vocab_size)
    return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct_sum": correct}


def jit_train_step(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, *, vocab_size: int,
                   label_smoothing: float, grad_accum_steps: int, skip_nonfinite: bool, state_shardings: Any,
                   batch_sharding: NamedSharding) -> Any:
    """`(state, batch) -> (state, metrics)`, the state donated and kept on its shardings."""
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, vocab_size=vocab_size,
                           label_smoothing=label_smoothing, grad_accum_steps=grad_accum_steps,
                           skip_nonfinite=skip_nonfinite)
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def jit_eval_step(graphdef: Any, *, vocab_size: int, param_shardings: Any, batch_sharding: NamedSharding) -> Any:
    """`(params, batch) -> sums` of loss, weights and correct tokens."""
    fn = functools.partial(eval_step, graphdef=graphdef, vocab_size=vocab_size)
    return jax.jit(fn, in_shardings=(param_shardings, batch_sharding))


def generate(params: Any, inputs: jax.Array, seed: jax.Array, *, graphdef: Any, decode_cfg: DecodeConfig,
             max_length: int) -> tuple[jax.Array, jax.Array]:
    """The configured search (`decode.*`) for `inputs`; `seed` keys sampling."""
    model = nnx.merge(graphdef, params)
    rng = jax.random.key(seed) if decode_cfg.temperature > 0 else None
    return model.generate(inputs, max_length=max_length, beam_size=decode_cfg.beam_size, alpha=decode_cfg.alpha,
                          temperature=decode_cfg.temperature, top_k=decode_cfg.top_k, top_p=decode_cfg.top_p,
                          rng=rng, eos_id=EOS_ID)


def jit_generate(graphdef: Any, decode_cfg: DecodeConfig, *, max_length: int, param_shardings: Any,
                 batch_sharding: NamedSharding) -> Any:
    """`(params, inputs [batch, src_len], seed) -> (tokens [batch, max_length], scores [batch])`.

    Inputs and outputs are sharded like a batch (rows over the data-parallel axes); the cache
    inside follows the logical-axis rules. Trace it under the run's context (`Run.context()`).
    """
    fn = functools.partial(generate, graphdef=graphdef, decode_cfg=decode_cfg, max_length=max_length)
    rows = NamedSharding(batch_sharding.mesh, PartitionSpec(batch_sharding.spec[0]))
    return jax.jit(fn, in_shardings=(param_shardings, batch_sharding, None), out_shardings=(batch_sharding, rows))
