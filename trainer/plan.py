"""`python -m trainer.plan [CONFIG.yaml] target=tpu:v5e:8x8|gpu:h100x16 [memory=GB] [key=value ...]`:
does the configured train step fit on hardware we do not have, and if not, what would?

The step is compiled, never run, with abstract arrays (no parameter is allocated):

- `tpu:GEN:TOPOLOGY` (GEN v4, v5e, v5p, v6e; TOPOLOGY like 8x8 or 4x4x4; `...x2slices` for
  several slices): for that topology through libtpu's description of it (the optional extra
  `pip install -e .[plan]`), so XLA's TPU compiler reports per-device HBM exactly (arguments,
  temporaries, peak) and refuses a step that does not fit (its compile-time OOM, read here).
- `gpu:KIND xN` (`gpu:h100x16`; KIND h100, h200, a100-40, a100-80): no GPU compiler runs on a CPU
  host, so the step is compiled on N simulated CPU devices: the state's bytes per device
  (parameters, optimizer, gradients) are exact, the temporaries are the CPU compiler's and only an
  estimate (they run larger than a GPU's), labelled so.

When the configuration does not fit, a small space is searched in order of cost (activation
rematerialisation, then splitting over `tensor` instead of only `fsdp`, then gradient accumulation
with a smaller per-step batch) and the first configuration that fits is printed as overrides to
paste, after a table of every configuration tried. Exit codes: 0 fits (as given or with the
printed overrides), 1 nothing tried fits, 2 a user error.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any

from trainer.config import Config, ConfigError, load_config, run_command, split_command_options

GIB = 2**30
TPU_HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
GPU_MEMORY_BYTES = {"h100": 80 * 10**9, "h200": 141 * 10**9, "a100-40": 40 * 10**9, "a100-80": 80 * 10**9}
INSTALL_LIBTPU = "pip install -e '.[plan]'  (libtpu, pinned in pyproject.toml)"
_COMMAND_KEYS = ("target", "memory", "search")


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str  # tpu | gpu
    name: str  # as given
    chip: str  # v5e, h100, ...
    topology: str | None  # tpu: "8x8"
    slices: int
    devices: int
    memory_bytes: int

    @property
    def exact(self) -> bool:
        """TPU figures come from the TPU compiler; GPU ones are a CPU compile's estimate."""
        return self.kind == "tpu"


def parse_target(text: str, memory_gb: float | None = None) -> Target:
    match = re.fullmatch(r"tpu:(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2}?)(?:x(\d+)slices)?", text)
    if match:
        chip, topology, slices = match.group(1), match.group(2), int(match.group(3) or 1)
        devices = math.prod(int(n) for n in topology.split("x")) * slices
        memory = TPU_HBM_BYTES[chip]
        kind = "tpu"
    else:
        match = re.fullmatch(r"gpu:(h100|h200|a100-40|a100-80)x(\d+)", text)
        if not match:
            raise ConfigError(f"target={text}: expected tpu:GEN:TOPOLOGY[xNslices] (GEN v4, v5e, v5p, v6e; e.g. "
                              "tpu:v5e:8x8, tpu:v5e:4x4x2slices) or gpu:KINDxN (KIND h100, h200, a100-40, a100-80; "
                              "e.g. gpu:h100x16)")
        chip, topology, slices, devices = match.group(1), None, 1, int(match.group(2))
        memory = GPU_MEMORY_BYTES[chip]
        kind = "gpu"
    if devices < 1:
        raise ConfigError(f"target={text}: no devices")
    if memory_gb is not None:
        memory = int(memory_gb * 10**9)
    return Target(kind, text, chip, topology, slices, devices, memory)


def target_devices(target: Target) -> list[Any]:
    import jax

    if target.kind == "gpu":
        devices = jax.devices("cpu")
        if len(devices) < target.devices:
            raise ConfigError(f"target={target.name}: only {len(devices)} simulated CPU devices (the plan sets "
                              f"runtime.cpu_devices={target.devices}; do not override it)")
        return devices[: target.devices]
    if not _has_libtpu():
        raise ConfigError(f"target={target.name} needs libtpu to compile for TPUs on this host: {INSTALL_LIBTPU}")
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(topology_name=f"{target.chip}:{target.topology}", platform="tpu",
                                            num_slices=target.slices)
    except Exception as e:  # noqa: BLE001 - libtpu refused the topology
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"target={target.name}: libtpu refused the topology ({text[:300]})") from None
    return list(topo.devices)


def _has_libtpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


# --------------------------------------------------------------------------------- one compile


def _abstract_batch(cfg: Config, sharding: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    b, li, lt = cfg.train.batch_size, cfg.data.inputs_length, cfg.data.targets_length
    keys = {"inputs": li, "targets": lt}
    if cfg.data.source != "synthetic" and cfg.data.pack:
        keys.update(inputs_segment_ids=li, targets_segment_ids=lt, inputs_positions=li, targets_positions=lt)
    return {k: jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=sharding) for k, n in keys.items()}


def compile_step(cfg: Config, target: Target, devices: list[Any]) -> dict[str, Any]:
    """Compiles `cfg`'s train step for `devices`; returns the memory figures (or the OOM)."""
    from trainer.memory import state_bytes_per_device
    from trainer.optim import make_optimizer
    from trainer.run import Run, resolve_vocab_size
    from trainer.step import jit_train_step
    from trainer.train_state import with_shardings

    if cfg.model.vocab_size is None:  # no tokenizer training for a plan: the configured size
        cfg = resolve_vocab_size(cfg, cfg.data.vocab_size)
    run = Run.from_config(cfg, devices)
    run.check_train_batch()
    tx, schedule = make_optimizer(cfg.train)
    out: dict[str, Any] = {"mesh": dict(run.mesh.shape)}
    with run.context():
        spec = run.state_spec(tx)
        parts = state_bytes_per_device(spec)
        out["state_bytes"] = {**parts, "total": sum(parts.values())}
        step = jit_train_step(spec.graphdef, tx, schedule, label_smoothing=cfg.train.label_smoothing,
                              grad_accum_steps=cfg.train.grad_accum_steps,
                              skip_nonfinite=False, state_shardings=spec.shardings, batch_sharding=run.batch_sharding)
        start = time.perf_counter()
        try:
            compiled = step.lower(with_shardings(spec.abstract, spec.shardings),
                                  _abstract_batch(cfg, run.batch_sharding)).compile()
        except Exception as e:  # noqa: BLE001 - XLA's compile-time OOM is a plain runtime error
            text = str(e)
            if "RESOURCE_EXHAUSTED" not in text and "exceeds available" not in text:
                raise
            out.update(fits=False, compile_s=time.perf_counter() - start, oom=_oom_line(text))
            return out
        out["compile_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    args = int(getattr(memory, "argument_size_in_bytes", 0))
    temp = int(getattr(memory, "temp_size_in_bytes", 0))
    alias = int(getattr(memory, "alias_size_in_bytes", 0))
    output = int(getattr(memory, "output_size_in_bytes", 0))
    peak = getattr(memory, "peak_memory_in_bytes", None) if target.exact else None
    peak = int(peak) if peak else args + output - alias + temp
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    out.update(arguments=args, temporaries=temp, peak=peak, fits=peak <= target.memory_bytes,
               compiled_flops=float((cost or {}).get("flops", 0.0)))
    return out


def _oom_line(text: str) -> str:
    """XLA's compile-time OOM in a few words: `temporaries 23.46G + ... > HBM 15.75G` when it says so."""
    need = re.search(r"required for (HLO temporaries|[^(]*?)\s*\(([\d.]+\s*[KMGT]i?B?)\)\s*exceeds available HBM "
                     r"\(([\d.]+\s*[KMGT]i?B?)\)", text)
    if need:
        return f"compile-time OOM: {need.group(1)} {need.group(2)} > available HBM {need.group(3)}"
    for line in text.splitlines():
        if "exceeds" in line or "RESOURCE_EXHAUSTED" in line:
            return line.strip()[:300]
    return text.strip().splitlines()[0][:300]


# --------------------------------------------------------------------------------- the search


def candidates(cfg: Config, devices: int) -> list[dict[str, Any]]:
    """Overrides to try, cheapest first: rematerialisation, then tensor parallelism, then gradient
    accumulation (the same global batch in 2 or 4 micro-steps)."""
    remats = [r for r in ("minimal", "dots", "full") if r != cfg.model.remat]
    tensors = [t for t in (2, 4, 8) if t > cfg.mesh.tensor and devices % t == 0 and cfg.model.num_heads % t == 0]
    accums = [a for a in (2, 4) if cfg.train.batch_size % (a * cfg.train.grad_accum_steps) == 0]
    options: list[tuple[tuple[int, int, int], dict[str, Any]]] = []
    for ri, remat in enumerate([None] + remats):
        for ti, tensor in enumerate([None] + tensors):
            for ai, accum in enumerate([None] + accums):
                change: dict[str, Any] = {}
                if remat:
                    change["model.remat"] = remat
                if tensor:
                    change.update({"mesh.tensor": tensor, "mesh.fsdp": -1})
                if accum:
                    change["train.grad_accum_steps"] = accum * cfg.train.grad_accum_steps
                if change:
                    options.append(((ai, ti, ri), change))
    options.sort(key=lambda o: (sum(o[0]), o[0]))
    return [c for _, c in options]


def _fmt_gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.3g}"


def plan(cfg_args: list[str], target: Target, *, search: bool, max_tries: int = 8,
         devices: list[Any] | None = None) -> int:
    """Prints the table and the answer; returns the exit code. `devices`: the target's (else made here)."""
    from trainer.run import init_devices

    base = load_config(cfg_args)
    if devices is None:
        init_devices(base)  # the simulated CPU devices of a gpu target exist from here on
        devices = target_devices(target)
    label = "exact (TPU compiler)" if target.exact else "estimate (CPU compile of the same sharded step)"
    print(f"target {target.name}: {target.devices} devices, {target.memory_bytes / GIB:.1f} GiB each; "
          f"memory figures: {label}", flush=True)
    rows = []
    tried: list[tuple[dict[str, Any], dict[str, Any]]] = []
    todo = [{}] + (candidates(base, target.devices) if search else [])
    for change in todo[: max_tries + 1]:
        args = cfg_args + [f"{k}={v}" for k, v in change.items()]
        try:
            result = compile_step(load_config(args), target, devices)
        except ConfigError as e:  # e.g. a split this model's sizes do not allow
            if not change:
                raise  # the configuration as given is wrong: a user error, not a row of the table
            result = {"fits": False, "error": str(e)}
        tried.append((change, result))
        rows.append(_row(change, result, target))
        print(rows[-1], flush=True)
        if result.get("fits"):
            break
    print()
    print(_header())
    print("\n".join(rows))
    first, result = tried[0]
    if result.get("fits"):
        print(f"\nfits as configured: peak {_fmt_gib(result['peak'])} GiB of {target.memory_bytes / GIB:.1f} GiB "
              f"per device; state {_fmt_gib(result['state_bytes']['total'])} GiB; compile {result['compile_s']:.1f} s; "
              f"compiled step {result.get('compiled_flops', 0) / 1e12:.2f} TFLOP per device (a scanned layer "
              f"body counts once)")
        return 0
    fitting = [(c, r) for c, r in tried if r.get("fits")]
    if fitting:
        change, r = fitting[0]
        print(f"\ndoes not fit as configured; the cheapest configuration tried that fits (peak {_fmt_gib(r['peak'])} "
              f"GiB of {target.memory_bytes / GIB:.1f} GiB):\n  " + " ".join(f"{k}={v}" for k, v in change.items()))
        return 0
    print("\nnothing tried fits: a smaller model or batch, more devices, or model.param_dtype=bfloat16"
          + ("" if search else " (search=true tries remat, tensor splits and gradient accumulation)"))
    return 1


def _header() -> str:
    return (f"{'configuration':<48} {'fits':>5} {'state GiB':>10} {'args GiB':>9} {'temp GiB':>9} {'peak GiB':>9} "
            f"{'compile s':>9}  mesh")


def _row(change: dict[str, Any], r: dict[str, Any], target: Target) -> str:
    name = " ".join(f"{k}={v}" for k, v in change.items()) or "(as configured)"
    if "error" in r:
        return f"{name:<48} {'no':>5}  {r['error'][:100]}"
    state = r.get("state_bytes", {}).get("total")
    if "oom" in r:
        return (f"{name:<48} {'no':>5} {_fmt_gib(state):>10} {'-':>9} {'-':>9} {'OOM':>9} {r['compile_s']:>9.1f}  "
                f"{r['mesh']}  {r['oom'][:120]}")
    return (f"{name:<48} {'yes' if r['fits'] else 'no':>5} {_fmt_gib(state):>10} {_fmt_gib(r['arguments']):>9} "
            f"{_fmt_gib(r['temporaries']):>9} {_fmt_gib(r['peak']):>9} {r['compile_s']:>9.1f}  {r['mesh']}")


def parse_args(argv: list[str]) -> tuple[list[str], Target, bool]:
    options, rest = split_command_options(argv, _COMMAND_KEYS)
    if "target" not in options:
        raise ConfigError("missing target=tpu:GEN:TOPOLOGY or target=gpu:KINDxN (e.g. target=gpu:h100x16)")
    memory = None
    if "memory" in options:
        try:
            memory = float(options["memory"])
        except ValueError:
            memory = -1.0
        if not memory > 0:
            raise ConfigError(f"memory={options['memory']}: device memory in GB, a number > 0")
    if options.get("search", "true") not in ("true", "false"):
        raise ConfigError(f"search must be true or false, got {options['search']!r}")
    target = parse_target(options["target"], memory)
    if target.kind == "gpu":  # N simulated CPU devices, set before JAX starts
        rest = [a for a in rest if not a.startswith(("runtime.cpu_devices=", "runtime.platform="))]
        rest += [f"runtime.cpu_devices={target.devices}", "runtime.platform=cpu"]
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the topology; run nothing on a TPU
        # libtpu locks the (absent) chips for one process; only compiling, plans may run side by side.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return rest, target, options.get("search", "true") == "true"


def main(argv: list[str] | None = None) -> int:
    def command(argv: list[str]) -> int:
        args, target, search = parse_args(argv)
        return plan(args, target, search=search)

    return run_command(command, argv)


if __name__ == "__main__":
    sys.exit(main())
