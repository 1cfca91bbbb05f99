"""Run N trainer processes on this machine, as a multi-process JAX job on simulated CPU devices.

    python -m launch.local --processes 2 --devices-per-process 4 -- [CONFIG.yaml] [key=value ...]

- picks a free TCP port on 127.0.0.1; the coordinator (process 0) binds to the loopback address
  only (JAX's coordination service is unauthenticated);
- starts N `python -m trainer.train ...` processes (`--module` runs another module), each told
  its process id, the process count and the coordinator through the environment
  (TRAINER_COORDINATOR, TRAINER_NUM_PROCESSES, TRAINER_PROCESS_ID, TRAINER_CPU_DEVICES,
  JAX_COORDINATOR_BIND_ADDRESS, JAX_PLATFORMS=cpu) and, for the trainer's entry points, also
  through config overrides (`distributed.coordinator=... distributed.num_processes=N
  distributed.process_id=I runtime.cpu_devices=K`) appended after the user's arguments;
- prefixes every line of a process's output (stdout and stderr) with `[pI] `;
- if a process fails, stops the others (SIGTERM, then SIGKILL after --grace seconds) and exits
  with the failing process's exit code (128+signal when it was killed by a signal), naming it;
- forwards SIGINT / SIGTERM to the processes (a second Ctrl-C kills them at once);
- leaves no orphans: when the launcher itself dies (even by SIGKILL) the kernel sends each
  process SIGTERM (PR_SET_PDEATHSIG), so trainers save at an agreed step as after a preemption
  notice; a trainer still running --grace seconds later exits on its own (code 6, see
  trainer.lifecycle: TRAINER_LAUNCHER_PID / TRAINER_LAUNCHER_GRACE tell it whom to watch).

A mistake in the launcher's options, or (for the trainer's modules) in the trainer's config, is
one line on stderr and exit code 2 before any process starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

TRAINER_MODULES = ("trainer.train", "trainer.bench", "trainer.decode")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        i = argv.index("--")
        own, rest = argv[:i], argv[i + 1:]
    else:
        own, rest = argv, []
    p = _ArgumentParser(
        prog="python -m launch.local",
        description="Start N processes of a multi-process JAX job on this machine.",
        epilog="Everything after `--` is passed to each process (trainer config and overrides).")
    p.add_argument("--processes", "-n", type=int, required=True, help="number of processes (N)")
    p.add_argument("--devices-per-process", "-k", type=int, default=1,
                   help="simulated CPU devices per process (runtime.cpu_devices); default 1")
    p.add_argument("--module", "-m", default="trainer.train", help="module to run (default trainer.train)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free port)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping processes (default 10)")
    p.add_argument("--init-timeout", type=int, default=None,
                   help="seconds to wait for all processes to join (TRAINER_INIT_TIMEOUT)")
    p.add_argument("--platform", default="cpu",
                   help="JAX_PLATFORMS for the processes (default cpu; 'keep' leaves the environment's)")
    p.add_argument("--no-overrides", action="store_true",
                   help="do not append distributed.*/runtime.cpu_devices overrides (environment only)")
    args = p.parse_args(own)
    if args.processes < 1:
        p.error("--processes must be >= 1")
    if args.devices_per_process < 1:
        p.error("--devices-per-process must be >= 1")
    if not args.grace >= 0 or args.grace == float("inf"):
        p.error(f"--grace must be a finite number of seconds >= 0, got {args.grace}")
    if args.port is not None and not 0 < args.port < 65536:
        p.error(f"--port must be in 1..65535, got {args.port}")
    if args.init_timeout is not None and args.init_timeout < 1:
        p.error(f"--init-timeout must be >= 1 second, got {args.init_timeout}")
    if not args.platform.strip():
        p.error("--platform must name a JAX platform (cpu, gpu, tpu) or be 'keep'")
    try:
        import importlib.util

        found = importlib.util.find_spec(args.module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        p.error(f"--module {args.module}: no such module")
    args.rest = rest
    return args


def check_trainer_args(args: argparse.Namespace) -> None:
    """The trainer's own config errors, found once here instead of once per process (ConfigError)."""
    if args.module not in TRAINER_MODULES:
        return
    coordinator = f"127.0.0.1:{args.port or 1}"
    argv = child_cmd(args, 0, coordinator)[4:]  # the arguments process 0 gets
    if args.module == "trainer.decode":
        from trainer.decode import check_paths, parse_args as decode_args

        _, options = decode_args(argv)
        check_paths(options)
        return
    from trainer.config import load_config

    if args.module == "trainer.bench":
        from trainer.bench import _COMMAND_KEYS, parse_options

        parse_options(argv)
        argv = [a for a in argv if a.partition("=")[0] not in _COMMAND_KEYS]
    cfg = load_config(argv)
    if args.module == "trainer.train":
        from trainer.workdir import check_workdir

        check_workdir(cfg.workdir)


def child_env(args: argparse.Namespace, i: int, coordinator: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "TRAINER_DISTRIBUTED": "on",
        "TRAINER_COORDINATOR": coordinator,
        "TRAINER_NUM_PROCESSES": str(args.processes),
        "TRAINER_PROCESS_ID": str(i),
        "TRAINER_CPU_DEVICES": str(args.devices_per_process),
        "JAX_COORDINATOR_BIND_ADDRESS": coordinator,  # loopback only
        "PYTHONUNBUFFERED": "1",
        # The trainers watch us: if we die they save and exit within --grace seconds (no orphans).
        "TRAINER_LAUNCHER_PID": str(os.getpid()),
        "TRAINER_LAUNCHER_GRACE": f"{args.grace:g}",
    })
    if args.init_timeout is not None:
        env["TRAINER_INIT_TIMEOUT"] = str(args.init_timeout)
    if args.platform != "keep":
        env["JAX_PLATFORMS"] = args.platform
    # A cluster environment around us must not be auto-detected instead of our settings.
    for var in ("SLURM_STEP_NODELIST", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_ADDRESS",
                "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "TRAINER_LOCAL_DEVICE_IDS"):
        env.pop(var, None)
    return env


def child_cmd(args: argparse.Namespace, i: int, coordinator: str) -> list[str]:
    cmd = [sys.executable, "-u", "-m", args.module, *args.rest]
    if args.module in TRAINER_MODULES and not args.no_overrides:
        cmd += [
            "distributed.enabled=on",
            f"distributed.coordinator={coordinator}",
            f"distributed.num_processes={args.processes}",
            f"distributed.process_id={i}",
            f"runtime.cpu_devices={args.devices_per_process}",
        ]
    return cmd


class Launcher:
    def __init__(self, args: argparse.Namespace, out=None):
        self.args = args
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        self.stopping = False
        self.signal_count = 0
        self.interrupted_by: int | None = None

    def say(self, msg: str) -> None:
        with self.lock:
            self.out.write(f"[launch.local] {msg}\n")
            self.out.flush()

    def _pump(self, i: int, stream) -> None:
        prefix = f"[p{i}] "
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self.lock:
                self.out.write(prefix + line + "\n")
                self.out.flush()
        stream.close()

    def start(self) -> None:
        from trainer.lifecycle import die_with_parent

        port = self.args.port or free_port()
        coordinator = f"127.0.0.1:{port}"
        self.say(f"starting {self.args.processes} x `{self.args.module}` with {self.args.devices_per_process} "
                 f"device(s) each; coordinator {coordinator}")
        for i in range(self.args.processes):
            p = subprocess.Popen(
                child_cmd(self.args, i, coordinator), env=child_env(self.args, i, coordinator),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: we deliver signals, not the terminal
                preexec_fn=die_with_parent(signal.SIGTERM))  # SIGTERM from the kernel if we die
            self.procs.append(p)
            t = threading.Thread(target=self._pump, args=(i, p.stdout), daemon=True)
            t.start()
            self.readers.append(t)

    def _signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)  # the process and anything it started (data workers)
                except (ProcessLookupError, PermissionError):
                    try:
                        p.send_signal(sig)
                    except ProcessLookupError:
                        pass

    def stop_all(self, first: int = signal.SIGTERM) -> None:
        self.stopping = True
        self._signal_all(first)
        deadline = time.monotonic() + self.args.grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        if any(p.poll() is None for p in self.procs):
            alive = [i for i, p in enumerate(self.procs) if p.poll() is None]
            self.say(f"process(es) {alive} still running after {self.args.grace:g}s: SIGKILL")
            self._signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def on_signal(self, signum, frame) -> None:
        self.signal_count += 1
        self.interrupted_by = signum
        if self.signal_count == 1:
            self.say(f"received {signal.Signals(signum).name}: forwarding to the processes")
            self._signal_all(signum)
        else:
            self.say("second signal: killing the processes")
            self._signal_all(signal.SIGKILL)

    def wait(self) -> int:
        """Returns the launcher's exit code."""
        failed: tuple[int, int] | None = None
        while True:
            codes = [p.poll() for p in self.procs]
            if self.interrupted_by is None:
                bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    failed = bad[0]
                    break
            if all(c is not None for c in codes):
                break
            time.sleep(0.05)
        if failed is not None:
            i, code = failed
            others = [j for j, p in enumerate(self.procs) if p.poll() is None]
            self.say(f"process {i} failed ({describe(code)}); stopping the others {others}")
            self.stop_all()
        if self.interrupted_by is not None:
            # Give the processes the grace period to act on the forwarded signal (checkpoint).
            deadline = time.monotonic() + self.args.grace
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.05)
            if any(p.poll() is None for p in self.procs):
                self.stop_all(signal.SIGKILL)
        for t in self.readers:
            t.join(timeout=5)
        codes = [p.returncode for p in self.procs]
        if failed is not None:
            i, code = failed
            self.say(f"FAILED: process {i} exited with {describe(code)} "
                     f"(all exit codes: {', '.join(f'p{j}={c}' for j, c in enumerate(codes))})")
            return exit_status(code)
        if self.interrupted_by is not None:
            self.say(f"interrupted by {signal.Signals(self.interrupted_by).name}; exit codes: "
                     f"{', '.join(f'p{j}={c}' for j, c in enumerate(codes))}")
            # SIGTERM is a preemption notice: processes that saved and exited 0 make a clean stop.
            if self.interrupted_by == signal.SIGTERM and all(c == 0 for c in codes):
                return 0
            return 128 + self.interrupted_by
        self.say(f"all {len(codes)} processes finished successfully")
        return 0


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def exit_status(code: int) -> int:
    if code < 0:
        return 128 + (-code)
    return code if 0 < code < 256 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.module in TRAINER_MODULES:
        from trainer.config import ConfigError

        try:
            check_trainer_args(args)
        except ConfigError as e:
            print(f"error: {args.module}: {e}", file=sys.stderr)
            return 2
    launcher = Launcher(args)
    old = {s: signal.signal(s, launcher.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launcher.start()
        return launcher.wait()
    except BaseException:
        launcher.stop_all(signal.SIGKILL)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
