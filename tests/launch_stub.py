"""A tiny stand-in for `trainer.train`, run by the launch tests (`--module tests.launch_stub`).

Arguments (key=value, any order; unknown ones are ignored like trainer overrides would be used):
  fail_process=I     process I raises after start-up (exit code 1)
  exit_code=C        ... or exits with code C instead of raising
  fail_delay=S       ... after S seconds
  sleep=S            sleep S seconds before finishing (to show the others get stopped)
  collective=1       initialise jax.distributed and check a cross-process psum and allgather
  absent_process=I   with collective=1: process I never joins (sleeps 60 s) -> the others time out
  timeout=T          distributed.initialization_timeout
  on_sigterm=C       on SIGTERM print "stub got SIGTERM" and exit with code C (a checkpointing trainer)
  finish_on_restart=1  under Slurm, exit 0 at once when SLURM_RESTART_COUNT >= 1 (resumed job)
  distributed.*=V / runtime.cpu_devices=K   as passed by launch.local for trainer modules
"""

from __future__ import annotations

import os
import sys
import time


def _args(argv):
    out = {}
    for a in argv:
        k, sep, v = a.partition("=")
        if sep:
            out[k] = v
    return out


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    pid_env = os.environ.get("TRAINER_PROCESS_ID", os.environ.get("SLURM_PROCID", "0"))
    print(f"stub start pid={pid_env} args={sorted(args)}", flush=True)
    if args.get("finish_on_restart") == "1" and int(os.environ.get("SLURM_RESTART_COUNT", "0")) >= 1:
        print(f"stub resumed after requeue pid={pid_env} restart={os.environ['SLURM_RESTART_COUNT']}", flush=True)
        return 0
    if "on_sigterm" in args:
        import signal

        code = int(args["on_sigterm"])

        def handler(signum, frame):
            print(f"stub got SIGTERM pid={pid_env}", flush=True)
            os._exit(code)

        signal.signal(signal.SIGTERM, handler)
    if args.get("fail_process") == pid_env:
        time.sleep(float(args.get("fail_delay", 0)))
    if args.get("fail_process") == pid_env and "exit_code" not in args:
        raise RuntimeError(f"injected failure in process {pid_env}")
    if args.get("fail_process") == pid_env:
        return int(args["exit_code"])
    if args.get("collective") == "1" and args.get("absent_process") == pid_env:
        print(f"stub pid={pid_env} stays away from the coordinator", flush=True)
        time.sleep(60)
        return 0
    if args.get("collective") == "1":
        from trainer.distributed import DistributedConfig, initialize

        cfg = DistributedConfig(initialization_timeout=int(args.get("timeout", 60)))
        initialize(cfg, cpu_devices=None)
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.experimental import multihost_utils

        n = jax.process_count()
        me = jax.process_index()
        # psum over every device of every process: each device contributes its process index + 1.
        mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
        local = np.full((jax.local_device_count(),), me + 1, np.float32)
        x = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, jax.P("d")), local)
        total = float(jax.jit(lambda a: jnp.sum(a), out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(x))
        expect = sum((p + 1) * jax.local_device_count() for p in range(n))
        gathered = multihost_utils.process_allgather(np.array([me], np.int32))
        print(f"stub collective process={me}/{n} devices={jax.local_device_count()}/{jax.device_count()} "
              f"psum={total} expect={expect} allgather={gathered.ravel().tolist()}", flush=True)
        if total != expect or sorted(gathered.ravel().tolist()) != list(range(n)):
            print("stub collective MISMATCH", flush=True)
            return 2
    if "sleep" in args:
        print(f"stub sleeping pid={pid_env}", flush=True)
        time.sleep(float(args["sleep"]))
    print(f"stub done pid={pid_env}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
