"""A throwaway single-node Slurm cluster on localhost, for testing `launch/slurm.sbatch`.

    with SlurmCluster(tmpdir) as cluster:
        job = cluster.submit("launch/slurm.sbatch", ["arg"], sbatch_args=["--ntasks=2"], env={...})
        state, exit_code, output = cluster.wait(job, timeout=120)

Uses Debian's slurm-wlm 22.05 packages (`ensure_slurm_installed` installs them with apt-get when
running as root). No systemd, no munge, no cgroups: `auth/none` + `cred/none`,
`proctrack/linuxproc`, `task/none`; every file lives in the temp dir; ports are picked free; the
daemons are stopped by pid at the end (jobs cancelled first). See ../shared/notes/slurm.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (the message says why)."""


def ensure_slurm_installed(timeout: float = 300) -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmds = [["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]]
    for cmd in cmds:
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` timed out after {timeout}s") from None
        if r.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    if not shutil.which("slurmctld"):
        raise SlurmUnavailable("apt-get install finished but slurmctld is still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_host_resolves(host: str) -> None:
    try:
        socket.gethostbyname(host)
        return
    except OSError:
        pass
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"host name {host!r} does not resolve and /etc/hosts is not writable")
    with open("/etc/hosts", "a") as f:
        f.write(f"\n127.0.0.1 {host}\n")


class SlurmCluster:
    def __init__(self, root: str | os.PathLike, cpus: int = 8, gpus: int = 0):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.gpus = gpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                self.env.pop(var)
        self.started: list[str] = []

    # -- configuration ------------------------------------------------------------------------
    def write_config(self) -> None:
        for d in ("state", "spool", "log", "out"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        gres_node = ""
        lines_gres = []
        if self.gpus:
            devdir = r / "dev"
            devdir.mkdir(exist_ok=True)
            for i in range(self.gpus):
                dev = devdir / f"fakegpu{i}"
                if not dev.exists():
                    os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # char device like /dev/null
                lines_gres.append(f"NodeName={self.host} Name=gpu File={dev}")
            gres_node = f" Gres=gpu:{self.gpus}"
            (r / "gres.conf").write_text("\n".join(lines_gres) + "\n")
        self.conf.write_text(f"""\
ClusterName=testcluster
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,sched_interval=1
SlurmdParameters=config_overrides
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
{"GresTypes=gpu" if self.gpus else ""}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN{gres_node}
PartitionName=test Nodes={self.host} Default=YES MaxTime=30 State=UP OverSubscribe=NO
""")

    # -- daemons ------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        ensure_slurm_installed()
        _ensure_host_resolves(self.host)
        self.write_config()
        for daemon in ("slurmctld", "slurmd"):
            cmd = [daemon, "-f", str(self.conf)]
            if daemon == "slurmctld":
                cmd.append("-c")  # clean start: ignore any saved state
            r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"{daemon} failed to start ({r.returncode}): {r.stderr}\n{self.logs()}")
            self.started.append(daemon)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            r = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = r.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"node not idle after {timeout}s (state {state!r})\n{self.logs()}")

    def _pid(self, daemon: str) -> int | None:
        f = self.root / f"{daemon}.pid"
        try:
            return int(f.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 15) -> None:
        if not self.started:
            return
        self.run(["scancel", "--full", "--partition=test"], check=False)
        for daemon in ("slurmd", "slurmctld"):
            pid = self._pid(daemon)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.started = []

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- jobs ---------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 30, env=None) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr}")
        return r

    def submit(self, script: str | os.PathLike, args: list[str] = (), *, sbatch_args: list[str] = (),
               env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> int:
        out = self.root / "out" / "job-%j.out"
        job_env = dict(self.env)
        job_env.update(env or {})
        cmd = ["sbatch", "--parsable", f"--output={out}", "--time=10", *sbatch_args, str(script), *args]
        r = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=30, cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def job_info(self, job: int) -> dict[str, str]:
        r = self.run(["scontrol", "show", "job", "-o", str(job)], check=False)
        info = {}
        for tok in r.stdout.split():
            k, sep, v = tok.partition("=")
            if sep:
                info[k] = v
        return info

    def wait(self, job: int, timeout: float) -> tuple[str, str, str]:
        """Polls until the job leaves the queue; returns (JobState, ExitCode, output)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.run(["squeue", "-h", "-j", str(job), "-o", "%T"], check=False)
            if r.returncode == 0 and not r.stdout.strip():
                break
            if time.monotonic() > deadline:
                self.run(["scancel", str(job)], check=False)
                raise TimeoutError(f"job {job} still {r.stdout.strip()!r} after {timeout}s\n"
                                   f"{self.output(job)}\n{self.logs()}")
            time.sleep(0.25)
        info = self.job_info(job)
        return info.get("JobState", "?"), info.get("ExitCode", "?"), self.output(job)

    def output(self, job: int) -> str:
        f = self.root / "out" / f"job-{job}.out"
        return f.read_text(errors="replace") if f.exists() else "(no output file)"

    def logs(self, tail: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            f = self.root / "log" / name
            if f.exists():
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {name} (last {tail} lines)\n" + "\n".join(lines))
        return "\n".join(parts)
