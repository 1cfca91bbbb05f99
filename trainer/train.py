"""`python -m trainer.train [CONFIG.yaml] [key.path=value ...]`: train an encoder-decoder.

Reads top to bottom: config -> devices and mesh -> rules -> data -> sharded state -> loop.
Every check that can fail on user input runs before the first compile.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from trainer.config import Config, ConfigError, dump_yaml, load_config


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


def train(cfg: Config, *, devices: list | None = None) -> dict[str, Any]:
    """Runs training as configured; returns the last logged train and eval metrics.

    `devices` restricts the mesh to some of the devices (tests compare meshes in one process).
    """
    # Devices first: simulated CPU devices and jax.distributed must be set before JAX starts.
    from trainer.setup import init_devices, logical_context, mesh_and_rules, sized_model_config

    init_devices(cfg)

    import jax
    import numpy as np

    from sharding.rules import RulesError, axes_size
    from sharding.state import batch_sharding
    from trainer import checkpoint as ckpt
    from trainer.data import build_pipeline, check_sources
    from trainer.flops import model_flops_per_step, peak_flops_per_device
    from trainer.metrics import Console, MetricsWriter
    from trainer.optim import make_optimizer
    from trainer.state import count_params, create_state, make_state_spec
    from trainer.step import jit_eval_step, jit_train_step

    is_main = jax.process_index() == 0
    console = Console(cfg.train.steps, enabled=is_main)

    # Mesh and rules; the vocabulary padded so it splits over whatever `vocab` maps to.
    mesh, rules = mesh_and_rules(cfg, devices)
    check_batch(cfg, axes_size("batch", rules, mesh), jax.process_count())
    console.log(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} devices "
                f"({jax.process_count()} process(es), {jax.local_device_count()} local)")
    model_cfg = sized_model_config(cfg, mesh, rules)

    # Data: sources are checked before anything is compiled.
    try:
        check_sources(cfg.data)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    pipeline_args = dict(global_batch_size=cfg.train.batch_size, seed=cfg.seed, process_index=jax.process_index(),
                         process_count=jax.process_count(), vocab_size=cfg.model.vocab_size, workdir=cfg.workdir)
    train_data = build_pipeline(cfg.data, split="train", **pipeline_args)
    if train_data.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) does not match the tokenizer's vocabulary "
                          f"size ({train_data.vocab_size}); set model.vocab_size={train_data.vocab_size}")

    # MFU's denominator. Simulated CPU devices share the host's cores: the peak is per host.
    flops = model_flops_per_step(model_cfg, cfg.train.batch_size, cfg.data.inputs_length, cfg.data.targets_length)
    peak, peak_source = peak_flops_per_device(model_cfg.dtype)
    peak_total = peak * (jax.process_count() if mesh.devices.flat[0].platform == "cpu" else mesh.devices.size)
    console.log(f"model FLOPs/step {flops / 1e9:.2f} GFLOP; peak {peak_total / 1e12:.3f} TFLOP/s ({peak_source})")

    # State: shapes and shardings are resolved abstractly (errors name the parameter).
    tx, schedule = make_optimizer(cfg.train)
    with logical_context(mesh, rules):
        try:
            spec = make_state_spec(model_cfg, tx, mesh, rules, cfg.seed)
        except RulesError as e:
            raise ConfigError(str(e)) from None
        if is_main:
            os.makedirs(cfg.workdir, exist_ok=True)
            # As run: with the tokenizer the pipeline resolved (trained or cached) filled in.
            _write_atomic(os.path.join(cfg.workdir, "config.yaml"),
                          dump_yaml(dataclasses.replace(cfg, data=train_data.data_config)))
        manager = ckpt.CheckpointManager(cfg, spec, mesh)
        state, data_state = manager.restore_or_init(create_state)
        _restore_data_state(train_data, data_state)
        start_step = int(jax.device_get(state["step"]))
        console.log(f"model: {count_params(state['params']) / 1e6:.2f}M parameters "
                    f"(vocab {cfg.model.vocab_size} padded to {model_cfg.padded_vocab_size})"
                    + (f"; resumed at step {start_step}" if start_step else ""))

        inputs_sharding = batch_sharding(mesh, rules)
        step_fn = jit_train_step(spec.graphdef, tx, schedule, vocab_size=cfg.model.vocab_size,
                                 label_smoothing=cfg.train.label_smoothing,
                                 grad_accum_steps=cfg.train.grad_accum_steps,
                                 skip_nonfinite=cfg.train.on_nonfinite == "skip",
                                 state_shardings=spec.shardings, batch_sharding=inputs_sharding)
        eval_fn = jit_eval_step(spec.graphdef, vocab_size=cfg.model.vocab_size,
                                param_shardings=spec.param_shardings, batch_sharding=inputs_sharding)

        writer = MetricsWriter(cfg.workdir, enabled=is_main)
        if is_main:
            console.log(f"workdir: {os.path.abspath(cfg.workdir)}\n"
                        f"tensorboard: tensorboard --logdir {os.path.abspath(writer.tensorboard_dir)} --host localhost")

        def to_global(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
            return {k: jax.make_array_from_process_local_data(
                inputs_sharding, v, (cfg.train.batch_size,) + v.shape[1:]) for k, v in local.items()}

        # Generation metrics on a fixed sample of eval examples (decode.eval_samples > 0).
        gen_eval = None
        if cfg.decode.eval_samples > 0 and cfg.train.eval_every:
            from trainer.generate import GenerationEval, format_samples

            gen_eval = GenerationEval(cfg, spec.graphdef, model_cfg, param_shardings=spec.param_shardings,
                                      batch_sharding=inputs_sharding, to_global=to_global,
                                      pipeline_args=pipeline_args, tokenizer=train_data.tokenizer)

        def run_eval(step: int) -> dict[str, float]:
            eval_data = build_pipeline(cfg.data, split="eval", **pipeline_args)
            sums = {"loss_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
            for i, local in enumerate(eval_data):
                if cfg.train.eval_batches and i >= cfg.train.eval_batches:
                    break
                out = jax.device_get(eval_fn(state["params"], to_global(local)))
                for k in sums:
                    sums[k] += float(out[k])
            denom = max(sums["weight_sum"], 1.0)
            record = {"step": step, "split": "eval", "loss": sums["loss_sum"] / denom,
                      "accuracy": sums["correct_sum"] / denom, "tokens": sums["weight_sum"]}
            if gen_eval is not None:  # eval/exact_match, eval/bleu, eval/chrf; samples as text
                gen_metrics, samples = gen_eval(state["params"])
                record.update(gen_metrics)
                writer.text("eval/samples", format_samples(samples), step)
            writer.write(record)
            console.log(f"eval at step {step}: loss {record['loss']:.4f} | accuracy {record['accuracy']:.4f}"
                        + (f" | exact match {record['exact_match']:.4f} | bleu {record['bleu']:.2f} | chrf "
                           f"{record['chrf']:.2f}" if gen_eval is not None else ""))
            return record

        stop = ckpt.PreemptionWatch()
        last: dict[str, Any] = {}
        tokens_per_step = cfg.train.batch_size * (cfg.data.inputs_length + cfg.data.targets_length)
        skipped = 0
        timer = _StepTimer()
        step = start_step
        data_iter = iter(train_data)
        next_batch = to_global(next(data_iter)) if step < cfg.train.steps else None
        while step < cfg.train.steps:
            loss_scale = np.float32(np.inf if step + 1 == cfg.train.debug_nonfinite_step else 1.0)
            state, metrics = step_fn(state, next_batch, loss_scale)
            step += 1
            save_now = manager.should_save(step) or (step == cfg.train.steps and cfg.checkpoint.save_final)
            data_state = train_data.get_state() if save_now or stop.requested else None
            # Load the next batch while the step runs, then wait for this step's numbers.
            next_batch = to_global(next(data_iter)) if step < cfg.train.steps else None
            host = jax.device_get(metrics)
            timer.tick(step)
            if not bool(host["finite"]):
                if cfg.train.on_nonfinite == "stop":
                    manager.close()
                    raise FloatingPointError(
                        f"non-finite loss or gradient at step {step} (loss {float(host['loss'])}, grad_norm "
                        f"{float(host['grad_norm'])}); the last good checkpoint is kept in {manager.directory}. "
                        f"Set train.on_nonfinite=skip to skip such updates instead.")
                skipped += 1
                console.log(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                step_time = timer.mean()  # None until a step has been timed (the first one compiles)
                tps = tokens_per_step / step_time if step_time else None
                record = {"step": step, "split": "train", "loss": float(host["loss"]),
                          "accuracy": float(host["accuracy"]), "learning_rate": float(host["learning_rate"]),
                          "grad_norm": float(host["grad_norm"]), "tokens_per_sec": tps,
                          "per_device_tokens_per_sec": tps and tps / mesh.devices.size,
                          "per_device_tflops_per_sec": step_time and flops / step_time / mesh.devices.size / 1e12,
                          "step_time_s": step_time, "mfu": step_time and flops / step_time / peak_total,
                          "skipped_steps": skipped}
                record.update(train_data.stats)
                writer.write(record)
                console.progress(step, record["loss"], tps, record["mfu"], step_time)
                last["train"] = record
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                last["eval"] = run_eval(step)
                timer.pause()
            preempted = stop.reached(step)
            if save_now or preempted:
                manager.save(step, state, data_state if data_state is not None else train_data.get_state(),
                             force=True)
                timer.pause()  # the blocking part of an async save is not a train step
            if preempted:
                manager.close()
                writer.close()
                train_data.close()
                console.log(f"preempted: saved a checkpoint at step {step} in {manager.directory}; exiting")
                return last
        manager.close()
        writer.close()
        train_data.close()
        console.log(f"done: {step} steps; outputs in {os.path.abspath(cfg.workdir)}")
        return last


def _restore_data_state(pipeline: Any, data_state: dict[str, Any] | None) -> None:
    """Puts the input pipeline where the checkpoint left it.

    A checkpoint from a different number of processes carries no usable per-process state; the
    pipeline is then replayed for the number of steps already trained, which yields exactly
    the batches an uninterrupted run with this process count would see next.
    """
    if data_state is None:
        return
    if "fast_forward_batches" in data_state:
        for _ in range(int(data_state["fast_forward_batches"])):
            next(pipeline)
        return
    pipeline.set_state(data_state)


class _StepTimer:
    """Mean step time over the steps since the last log, leaving out compilation and eval."""

    def __init__(self):
        self._start: float | None = None
        self._steps = 0
        self._last_mean: float | None = None

    def tick(self, step: int) -> None:
        if self._start is None:  # the first step compiled: start timing after it
            self._start, self._steps = time.perf_counter(), 0
        else:
            self._steps += 1

    def pause(self) -> None:
        self._start, self._steps = time.perf_counter(), 0

    def mean(self) -> float | None:
        if self._steps:
            self._last_mean = (time.perf_counter() - self._start) / self._steps
        self._start, self._steps = time.perf_counter(), 0
        return self._last_mean


def check_batch(cfg: Config, batch_ways: int, process_count: int) -> None:
    b, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    if b % process_count:
        raise ConfigError(f"train.batch_size ({b}) must be divisible by the number of processes ({process_count})")
    if (b // accum) % batch_ways:
        raise ConfigError(f"train.batch_size ({b}) / train.grad_accum_steps ({accum}) must be divisible by the "
                          f"data-parallel size {batch_ways} (mesh.data * mesh.fsdp under the `batch` rule)")


def _write_atomic(path: str, text: str) -> None:
    """Writes via a temporary file and rename, so a crash never leaves half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
