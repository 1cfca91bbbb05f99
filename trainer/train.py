"""`python -m trainer.train [CONFIG.yaml] [key.path=value ...]`: train an encoder-decoder.

Reads top to bottom: config -> devices and mesh -> rules -> data -> sharded state -> loop.
Every check that can fail on user input runs before the first compile.
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX loads (trainer/startup.py): the platform, glibc's tunables
    from trainer.startup import before_jax

    before_jax()

import contextlib
import dataclasses
import errno
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from trainer import checkpoint as ckpt
from trainer import storage
from trainer.config import Config, ConfigError, dump_yaml, load_config
from trainer.data.pipeline import derive_stats
from trainer.data.stream import DataError
from trainer.generation_eval import GenerationEval, format_samples
from trainer.goodput import GoodputClock, last_logged_step
from trainer.memory import check_state_fits
from trainer.metrics import Console, MetricsWriter
from trainer.optim import make_optimizer
from trainer.preemption import PreemptionWatch
from trainer.profiling import StepProfiler
from trainer.run import Run
from trainer.step import jit_eval_step, jit_train_step
from trainer.stragglers import StepSplit, straggler_fields
from trainer.train_state import count_params, create_state
from trainer.watchdog import HangWatchdog
from trainer.workdir import check_workdir, existing_ancestor, lock_workdir

# Exit codes of `python -m trainer.train` (README, "Exit codes"); 3 is a distributed join timeout
# (trainer.distributed.INIT_TIMEOUT_EXIT_CODE).
EXIT_CONFIG = 2  # a user or configuration error: one line on stderr, before anything compiles
EXIT_NONFINITE = 4  # train.on_nonfinite=stop hit a non-finite loss or gradient
EXIT_DISK_FULL = 5  # no space left on the device while writing the workdir (checkpoint, metrics)


def main(argv: list[str] | None = None) -> int:
    cfg = None
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        check_workdir(cfg.workdir)
        train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Exception as e:
        full = disk_full_message(e, cfg.workdir if cfg is not None else ".")
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return EXIT_DISK_FULL
    return 0


def disk_full_message(error: BaseException, workdir: str) -> str | None:
    """One line naming the path and the free bytes when `error` (or what caused it) is ENOSPC."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            path = os.path.abspath(os.fsdecode(e.filename) if e.filename else workdir)
            probe = existing_ancestor(path)
            try:
                free = f"{shutil.disk_usage(probe).free:,} bytes free"
            except OSError:
                free = "free space unknown"
            return (f"no space left on device writing {path} ({free} on that file system); free some space "
                    f"and rerun: training resumes from the last checkpoint in {storage.absolute(workdir)}")
        e = e.__cause__ or e.__context__
    return None


def train(cfg: Config, *, devices: list | None = None) -> dict[str, Any]:
    """Runs training as configured; returns the last logged train and eval metrics.

    `devices` restricts the mesh to some of the devices (tests compare meshes in one process).
    The workdir is locked for the run (one run per workdir, trainer.workdir) and unlocked at its end;
    everything the run opens (input workers, checkpoint manager, writers, signal handlers) is
    closed on the way out, however it ends.
    """
    clock = GoodputClock(cfg.workdir, enabled=False)  # wall time from here, by category
    with contextlib.ExitStack() as cleanup:
        return _train(cfg, devices=devices, cleanup=cleanup, clock=clock)


def _train(cfg: Config, *, devices: list | None, cleanup: contextlib.ExitStack,
           clock: GoodputClock) -> dict[str, Any]:
    run = Run.from_config(cfg, devices)  # devices first: jax.distributed before any JAX computation
    # One run per workdir: locked before anything is written there or the checkpoints are opened
    # (their start-up clean-up would delete a live run's in-flight save); ConfigError when taken.
    workdir_lock = lock_workdir(cfg.workdir)
    if workdir_lock is not None:
        cleanup.callback(workdir_lock.release)

    is_main = jax.process_index() == 0
    console = Console(cfg.train.steps, enabled=is_main)
    clock.enabled = is_main
    # The goodput account closes last (after the final save's wait): `shutdown` covers that wait.
    cleanup.push(lambda exc_type, *_: _close_clock(clock, console, exc_type))
    previous_last_step = clock.open_launch()  # before the metrics writer drops the steps a resume redoes
    logged = last_logged_step(storage.join(cfg.workdir, "metrics.jsonl"))
    if logged is not None:
        previous_last_step = max(previous_last_step or 0, logged)
    run.check_train_batch()
    console.log(f"mesh: {dict(run.mesh.shape)} over {run.mesh.devices.size} devices "
                f"({jax.process_count()} process(es), {jax.local_device_count()} local)")

    # Data: sources checked before anything compiles. model.vocab_size defaults to the tokenizer's
    # size (an explicit one must equal it); config.yaml records the resolved value.
    run, train_data = run.open_train_data()
    cleanup.callback(train_data.close)
    cfg, model_cfg = run.cfg, run.model_cfg
    flops, peak_total, peak_source = run.flops()
    console.log(f"model FLOPs/step {flops / 1e9:.2f} GFLOP; peak {peak_total / 1e12:.3f} TFLOP/s ({peak_source})")

    # State: shapes and shardings are resolved abstractly (errors name the parameter).
    tx, schedule = make_optimizer(cfg.train)
    with run.context():
        spec = run.state_spec(tx)
        check_state_fits(spec, run.mesh)  # a state too large for the devices: ConfigError before allocating
        # Restore first: a checkpoint of another model is a ConfigError that leaves the workdir
        # untouched; a resume with changed settings keeps the old config.yaml as config.STEP.yaml.
        manager = ckpt.CheckpointManager(cfg, spec, run.mesh)
        cleanup.callback(manager.close)
        previous = clock.enter("checkpoint")
        state, data_state = manager.restore_or_init(create_state)
        clock.enter(previous)
        if data_state is not None:
            try:  # the global position: any number of processes continues at the next global batch
                train_data.set_state(data_state)
            except DataError as e:
                raise ConfigError(f"{manager.directory}: {e}") from None
        if is_main:
            # As run: with the tokenizer the pipeline resolved (trained or cached) filled in.
            storage.write_text(storage.join(cfg.workdir, "config.yaml"),
                               dump_yaml(dataclasses.replace(cfg, data=train_data.data_config)))
        start_step = int(jax.device_get(state["step"]))
        clock.resumed(start_step, previous_last_step)
        console.log(f"model: {count_params(state['params']) / 1e6:.2f}M parameters "
                    f"(vocab {cfg.model.vocab_size} padded to {model_cfg.padded_vocab_size})"
                    + (f"; resumed at step {start_step}" if start_step else ""))

        step_fn = jit_train_step(spec.graphdef, tx, schedule, label_smoothing=cfg.train.label_smoothing,
                                 grad_accum_steps=cfg.train.grad_accum_steps,
                                 skip_nonfinite=cfg.train.on_nonfinite == "skip",
                                 state_shardings=spec.shardings, batch_sharding=run.batch_sharding)
        eval_fn = jit_eval_step(spec.graphdef, param_shardings=spec.param_shardings,
                                batch_sharding=run.batch_sharding)

        writer = MetricsWriter(cfg.workdir, enabled=is_main, resume_step=start_step)
        cleanup.callback(writer.close)
        if is_main:
            console.log(f"workdir: {storage.absolute(cfg.workdir)}\n"
                        f"tensorboard: tensorboard --logdir {storage.absolute(writer.tensorboard_dir)} --host localhost")

        # Generation metrics on a fixed sample of eval examples (decode.eval_samples > 0).
        gen_eval = None
        if cfg.decode.eval_samples > 0 and cfg.train.eval_every:
            gen_eval = GenerationEval(run, spec.graphdef, param_shardings=spec.param_shardings,
                                      tokenizer=train_data.tokenizer)

        def run_eval(step: int) -> dict[str, float]:
            previous = clock.enter("eval")
            try:
                return _eval(step)
            finally:
                clock.enter(previous)

        def _eval(step: int) -> dict[str, float]:
            sums = {"loss_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
            with run.pipeline("eval") as eval_data:
                for i, local in enumerate(eval_data):
                    if cfg.train.eval_batches and i >= cfg.train.eval_batches:
                        break
                    out = jax.device_get(eval_fn(state["params"], run.to_global(local)))
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

        stop = PreemptionWatch()
        cleanup.callback(stop.close)
        watchdog = HangWatchdog(cfg.workdir, jax.process_index(), cfg.train.hang_timeout)
        cleanup.callback(watchdog.close)
        profiler = StepProfiler(cfg.train.profile_steps, storage.join(cfg.workdir, "tensorboard"),
                                all_processes=cfg.train.profile_all_processes)
        cleanup.callback(profiler.stop)
        last: dict[str, Any] = {}
        tokens_per_step = cfg.train.batch_size * (cfg.data.inputs_length + cfg.data.targets_length)
        devices_in_mesh = run.mesh.devices.size
        skipped = 0
        timer = _StepTimer()
        split = StepSplit()  # this process's data wait / dispatch / device time, for straggler logging
        step = start_step

        def fetch() -> tuple[dict[str, jax.Array], dict[str, Any]]:
            """The next batch and the data position right after it (saved with a step that trained it)."""
            previous, since = clock.enter("data_wait"), time.perf_counter()
            local = next(train_data)
            batch = run.to_global(local), train_data.get_state()
            clock.enter(previous)
            split.add("data_wait", since)
            return batch

        def report(done: int, metrics: dict[str, jax.Array]) -> None:
            """Step `done`'s numbers on the host: non-finite handling, logging (MaxText's one-step-late read)."""
            nonlocal skipped
            since = time.perf_counter()
            host = jax.device_get(metrics)
            split.add("device", since)
            split.steps += 1
            if done == start_step + 1:
                split.restart()  # the first step compiles: not a straggler figure
            watchdog.step_done(done)
            clock.last_step = done
            clock.enter(clock.step_state(done + 1))  # until the next report: step done + 1's time
            profiler.after_step(done)
            timer.tick(done)
            if not bool(host["finite"]):
                if cfg.train.on_nonfinite == "stop":
                    raise FloatingPointError(
                        f"non-finite loss or gradient at step {done} (loss {float(host['loss'])}, grad_norm "
                        f"{float(host['grad_norm'])}); the last good checkpoint is kept in {manager.directory}. "
                        f"Set train.on_nonfinite=skip to skip such updates instead.")
                skipped += 1
                console.log(f"step {done}: non-finite loss or gradient, update skipped ({skipped} so far)")
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                step_time = timer.mean()  # None until a step has been timed (the first one compiles)
                tps = tokens_per_step / step_time if step_time else None
                record = {"step": done, "split": "train", "loss": float(host["loss"]),
                          "accuracy": float(host["accuracy"]), "learning_rate": float(host["learning_rate"]),
                          "grad_norm": float(host["grad_norm"]), "tokens_per_sec": tps,
                          "per_device_tokens_per_sec": tps and tps / devices_in_mesh,
                          "per_device_tflops_per_sec": step_time and flops / step_time / devices_in_mesh / 1e12,
                          "step_time_s": step_time, "mfu": step_time and flops / step_time / peak_total,
                          "skipped_steps": skipped}
                record.update(_interval_stats(train_data, split))
                # Useful work: the padded rate times the fraction of batch slots that hold real tokens.
                record["nonpad_tokens_per_sec"] = tps and tps * record["packing_efficiency"]
                record.update(clock.record_fields())
                clock.save()
                writer.write(record)
                console.progress(done, record["loss"], tps, record["mfu"], step_time)
                last["train"] = record

        # `position` always belongs to the last batch trained, whenever a save happens.
        position = train_data.get_state()
        batch, batch_position = fetch() if step < cfg.train.steps else (None, None)
        unread = None  # (step, metrics): dispatched, numbers not read yet
        clock.enter("compile")  # the launch's first step, until its numbers are read
        while step < cfg.train.steps:
            profiler.before_step(step + 1)
            since = time.perf_counter()
            state, metrics = step_fn(state, batch)
            split.add("dispatch", since)
            step += 1
            position = batch_position
            # Load the next batch while the step runs; then read the previous step's numbers, so the
            # device always has the next step queued and the host never stalls it.
            if step < cfg.train.steps:
                batch, batch_position = fetch()
            if unread is not None:
                report(*unread)
            unread = (step, metrics)
            save_now = manager.should_save(step) or (step == cfg.train.steps and cfg.checkpoint.save_final)
            eval_now = bool(cfg.train.eval_every) and (step % cfg.train.eval_every == 0 or step == cfg.train.steps)
            preempted = stop.reached(step)
            if save_now or eval_now or preempted or step == cfg.train.steps:
                report(*unread)  # a boundary waits for its own step: never saves or evaluates unchecked numbers
                unread = None
            if eval_now:
                last["eval"] = run_eval(step)
                timer.pause()
                watchdog.progress(f"eval at step {step}")
            if save_now or preempted:
                previous = clock.enter("checkpoint")
                manager.save(step, state, position, force=True)
                clock.enter(previous)
                timer.pause()  # the blocking part of an async save is not a train step
                watchdog.progress(f"checkpoint save at step {step}")
            if preempted:
                clock.status = "preempted"
                console.log(f"preempted: saved a checkpoint at step {step} in {manager.directory}; exiting")
                return last
        clock.status = "finished"
        console.log(f"done: {step} steps; outputs in {storage.absolute(cfg.workdir)}")
        return last


def _close_clock(clock: GoodputClock, console: Console, exc_type: type | None) -> None:
    """The launch's final account: written to WORKDIR/goodput/ and summarised on the console."""
    if not clock.started:
        return
    if exc_type is not None:
        clock.status = "failed"
    clock.enter("shutdown")
    try:
        clock.save()
    except OSError:
        pass
    console.log(clock.summary())


def _interval_stats(pipeline: Any, split: StepSplit) -> dict[str, Any]:
    """The input pipeline's figures summed over every process, and the straggler figures: one small
    all-gather per log (none on one process)."""
    counters = pipeline.counters
    keys = sorted(counters)
    local = np.concatenate([np.array([counters[k] for k in keys], np.float64), split.local()])
    everyone = multihost_utils.process_allgather(local) if jax.process_count() > 1 else local[None]
    summed = everyone[:, : len(keys)].sum(axis=0)
    stats = derive_stats(dict(zip(keys, (int(round(v)) for v in summed))), pipeline.sources)
    return {**stats, **straggler_fields(everyone[:, len(keys):])}


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



if __name__ == "__main__":
    from trainer.lifecycle import run_main

    run_main(main)  # sys.exit(main()), surviving a closed stdout, with a deadline on the exit
