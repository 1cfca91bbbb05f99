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


def loss_sums(graphdef: Any, params: Any, batch: dict[str, jax.Array], *, label_smoothing: float = 0.0,
              deterministic: bool, dropout_rng: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed token loss, summed weights and summed correct predictions of one batch.

    The model's fused output layer and cross-entropy (`model.output`): the vocabulary-wide
    logits exist only inside it. Weights are 1 for real target tokens, 0 for padding.
    """
    model = nnx.merge(graphdef, params)
    weights = _weights(batch)
    loss_sum, correct = model.loss_sums(
        batch["inputs"], batch["targets"], weights, label_smoothing=label_smoothing,
        inputs_segment_ids=batch.get("inputs_segment_ids"), targets_segment_ids=batch.get("targets_segment_ids"),
        inputs_positions=batch.get("inputs_positions"), targets_positions=batch.get("targets_positions"),
        deterministic=deterministic, dropout_rng=dropout_rng)
    return loss_sum, jnp.sum(weights), correct


def _weights(batch: dict[str, jax.Array]) -> jax.Array:
    seg = batch.get("targets_segment_ids")
    return ((seg > 0) if seg is not None else (batch["targets"] > 0)).astype(jnp.float32)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: Any,
               tx: optax.GradientTransformation, schedule: optax.Schedule, label_smoothing: float,
               grad_accum_steps: int, skip_nonfinite: bool) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over the global batch, split into `grad_accum_steps` microbatches.

    Gradients of the summed loss are accumulated and divided by the total number of target
    tokens once, so accumulation gives the same update as one big batch.
    """
    step = state["step"]
    base_rng = jax.random.wrap_key_data(state["rng"])
    step_rng = jax.random.fold_in(base_rng, step)

    def micro_loss(params, micro, rng):
        loss_sum, weight_sum, correct = loss_sums(graphdef, params, micro, label_smoothing=label_smoothing,
                                                  deterministic=False, dropout_rng=rng)
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


def eval_step(params: Any, batch: dict[str, jax.Array], *, graphdef: Any) -> dict[str, jax.Array]:
    """Sums for one eval batch (the loop divides at the end): loss without smoothing, accuracy."""
    loss_sum, weight_sum, correct = loss_sums(graphdef, params, batch, deterministic=True, dropout_rng=None)
    return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct_sum": correct}


def jit_train_step(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                   label_smoothing: float, grad_accum_steps: int, skip_nonfinite: bool, state_shardings: Any,
                   batch_sharding: NamedSharding) -> Any:
    """`(state, batch) -> (state, metrics)`, the state donated and kept on its shardings."""
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                           label_smoothing=label_smoothing, grad_accum_steps=grad_accum_steps,
                           skip_nonfinite=skip_nonfinite)
    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def jit_eval_step(graphdef: Any, *, param_shardings: Any, batch_sharding: NamedSharding) -> Any:
    """`(params, batch) -> sums` of loss, weights and correct tokens."""
    fn = functools.partial(eval_step, graphdef=graphdef)
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
