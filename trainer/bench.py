"""`python -m trainer.bench [CONFIG.yaml] [key=value ...] [bench.steps=N]`: speed and memory.

Measures, for the configured model, mesh and batch, on this machine:
- compile time of the train step (ahead-of-time lower + compile);
- step time (the median over `bench.steps` timed steps, after at least 2 warm-up steps: more
  while a step still maps new host memory, at most 10; also their mean and minimum), tokens/s,
  model TFLOP/s and MFU at the median, the peak FLOP/s (published for GPU/TPU, measured by a
  jitted matmul on CPU);
- memory per device: parameters + optimizer state actually held, and XLA's compiled-step
  figures (arguments, temporaries);
- the input pipeline alone: batches/s against the train steps/s it has to feed.

Prints a table and one JSON line (`bench: {...}`) for scripts. Nothing is written to the
workdir, and no checkpoint is read: the state is freshly initialised.

Exit codes: 0 on success, 2 for a user error (one line on stderr).
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX loads (trainer/startup.py): the platform, glibc's tunables
    from trainer.startup import before_jax

    before_jax()

import itertools
import json
import resource
import statistics
import sys
import time
from typing import Any

import jax

from trainer.config import Config, ConfigError, load_config
from trainer.data.bench import pipeline_batches_per_sec
from trainer.optim import make_optimizer
from trainer.run import Run
from trainer.step import jit_train_step
from trainer.train_state import count_params, create_state

_COMMAND_KEYS = ("bench.steps", "bench.pipeline_batches")
_MAX_WARMUP_STEPS = 10
_SETTLED_FAULTS = 1000


def run(cfg: Config, *, steps: int = 10, pipeline_batches: int = 50) -> dict[str, Any]:
    setup = Run.from_config(cfg)
    setup.check_train_batch()
    setup, pipeline = setup.open_train_data()
    cfg, model_cfg = setup.cfg, setup.model_cfg
    flops, peak_total, peak_source = setup.flops()
    tx, schedule = make_optimizer(cfg.train)
    with setup.context():
        spec = setup.state_spec(tx)
        state = create_state(spec)
        step_fn = jit_train_step(spec.graphdef, tx, schedule, label_smoothing=cfg.train.label_smoothing,
                                 grad_accum_steps=cfg.train.grad_accum_steps, skip_nonfinite=False,
                                 state_shardings=spec.shardings, batch_sharding=setup.batch_sharding)
        batches = [setup.to_global(next(pipeline)) for _ in range(steps)]
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        step_times, warmup_steps, state = _timed_steps(compiled, state, batches, steps)
        step_s = statistics.median(step_times)

    mesh = setup.mesh
    device0 = mesh.devices.flat[0]
    held = sum(shard.data.nbytes for x in jax.tree.leaves({"p": state["params"], "o": state["opt_state"]})
               for shard in x.addressable_shards if shard.device == device0)
    memory = compiled.memory_analysis()
    stats = device0.memory_stats() or {}
    pipeline.close()
    batches_per_s = pipeline_batches_per_sec(cfg.data, cfg.train.batch_size, cfg.seed, pipeline_batches,
                                             vocab_size=cfg.model.vocab_size, process_count=jax.process_count())
    tokens = cfg.train.batch_size * (cfg.data.inputs_length + cfg.data.targets_length)
    return {
        "device": device0.device_kind, "devices": int(mesh.devices.size), "mesh": dict(mesh.shape),
        "params_m": count_params(state["params"]) / 1e6, "dtype": model_cfg.dtype,
        "batch_size": cfg.train.batch_size, "lengths": [cfg.data.inputs_length, cfg.data.targets_length],
        "compile_s": compile_s, "warmup_steps": warmup_steps, "step_time_s": step_s, "step_time_mean_s": statistics.mean(step_times),
        "step_time_min_s": min(step_times), "step_times_s": step_times, "steps_per_s": 1.0 / step_s,
        "tokens_per_s": tokens / step_s, "per_device_tokens_per_s": tokens / step_s / mesh.devices.size,
        "model_gflop_per_step": flops / 1e9, "model_tflops_per_s": flops / step_s / 1e12,
        "peak_tflops": peak_total / 1e12, "peak_source": peak_source, "mfu": flops / step_s / peak_total,
        "state_bytes_per_device": held,
        "compiled_argument_bytes": getattr(memory, "argument_size_in_bytes", None),
        "compiled_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "pipeline_batches_per_s": batches_per_s,
        "pipeline_over_train": batches_per_s * step_s,
    }


def _timed_steps(compiled: Any, state: Any, batches: list[Any], steps: int) -> tuple[list[float], int, Any]:
    """Step times after a warm-up, the number of warm-up steps, and the final state.

    The host dispatches step n+1 before it waits for step n (as the train loop does), so a step's
    time is the interval between the ends of consecutive steps, without its dispatch. The warm-up
    is at least 2 steps, then lasts while a step still maps 1,000 or more new pages of host memory
    (minor faults), at most 10 steps: on CPU the first steps fault in the heap that glibc keeps
    for every later one (`trainer.startup`), and how many steps that takes depends on how the heap
    fragments.
    """
    times: list[float] = []
    warmup, pending = 0, None
    faults, last = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for i in itertools.count():
        state, metrics = compiled(state, batches[i % len(batches)])
        if pending is None:
            pending = metrics["loss"]
            continue
        jax.block_until_ready(pending)
        pending = metrics["loss"]
        now, now_faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        settled = warmup >= 2 and now_faults - faults < _SETTLED_FAULTS
        if times or settled or warmup == _MAX_WARMUP_STEPS:
            times.append(now - last)
        else:
            warmup += 1
        last, faults = now, now_faults
        if len(times) == steps:
            jax.block_until_ready(pending)  # the step queued last is not timed
            return times, warmup, state
    raise AssertionError("unreachable")


def _table(r: dict[str, Any]) -> str:
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f} MiB"  # noqa: E731
    rows = [
        ("device", f"{r['devices']} x {r['device']}, mesh {r['mesh']}"),
        ("model", f"{r['params_m']:.2f}M params, {r['dtype']}, batch {r['batch_size']} x {r['lengths']}"),
        ("compile", f"{r['compile_s']:.1f} s"),
        ("step time", f"{r['step_time_s'] * 1e3:.1f} ms median ({r['steps_per_s']:.2f} steps/s), mean "
                      f"{r['step_time_mean_s'] * 1e3:.1f} ms, min {r['step_time_min_s'] * 1e3:.1f} ms"),
        ("throughput", f"{r['tokens_per_s']:,.0f} tokens/s ({r['per_device_tokens_per_s']:,.0f} per device)"),
        ("model FLOP/s", f"{r['model_tflops_per_s']:.3f} TFLOP/s of {r['peak_tflops']:.3f} peak ({r['peak_source']})"),
        ("MFU", f"{100 * r['mfu']:.1f}%"),
        ("state per device", mib(r["state_bytes_per_device"])),
        ("compiled step", f"arguments {mib(r['compiled_argument_bytes'])}, temporaries {mib(r['compiled_temp_bytes'])}"),
        ("peak in use", mib(r["peak_bytes_in_use"])),
        ("input pipeline", f"{r['pipeline_batches_per_s']:.1f} batches/s = {r['pipeline_over_train']:.1f}x the "
                           f"train step's need"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_options(argv: list[str]) -> dict[str, int]:
    """This command's own `bench.*` keys: whole numbers >= 1."""
    options = {}
    for arg in argv:
        key, _, text = arg.partition("=")
        if key in _COMMAND_KEYS:
            try:
                value = int(text)
            except ValueError:
                raise ConfigError(f"`{key}` must be a whole number >= 1, got {text!r}") from None
            if value < 1:
                raise ConfigError(f"`{key}` must be >= 1, got {value}")
            options[key] = value
    return options


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest = [a for a in argv if a.partition("=")[0] not in _COMMAND_KEYS]
    try:
        options = parse_options(argv)
        result = run(load_config(rest), steps=options.get("bench.steps", 10),
                     pipeline_batches=options.get("bench.pipeline_batches", 50))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(_table(result))
        print("bench: " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
