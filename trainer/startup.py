"""What the training commands set before JAX loads, where XLA:CPU runs the model.

`before_jax()` is the first call of `trainer.train` and `trainer.bench`. On a machine without an
accelerator (no GPU or TPU device node) and with `JAX_PLATFORMS` unset it does two things:

1. `JAX_PLATFORMS=cpu`. JAX would end up on the CPU anyway, but first it loads libtpu when that
   is installed (the `plan` and `test` extras install it, for `trainer.plan`), prints libtpu's
   start-up warnings, and registers libtpu's profiler: with the pinned libtpu that profiler's
   interface does not match jaxlib's, and `train.profile_steps` crashed the process (SIGSEGV).

2. glibc malloc tunables that keep freed memory for the next step. XLA:CPU takes a step's
   temporaries (about 0.9 GiB at the reference size of `configs/bench.yaml`) from malloc. glibc
   serves blocks that large with a fresh mmap and unmaps them on free, so every step faults its
   working set in again: the kernel zeroes (and, in a VM, the hypervisor backs) about a
   gigabyte a step. On the 2-core development VM that was 0.8-1.0 s of system time a step and
   every other step 40-60% slower than the one before. Three tunables keep that memory:

   - `glibc.malloc.mmap_max=0`: no block gets its own mapping; everything comes from the heap;
   - `glibc.malloc.trim_threshold` (64 GiB): a free never hands the heap's top back;
   - `glibc.malloc.arena_max=1`: one heap for every thread (XLA's workers included), so the
     buffer a step frees is found by the next step's allocation, whichever thread makes it.

   The price is that resident memory stays at its high-water mark, which fragmentation raises.
   The measured gain and cost are in the README's Performance section. (Transparent huge pages,
   tried before this, fault 13x less but still zero every page each step, and on top of the
   kept heap they made some steps 2x slower through the kernel's compaction.)

   glibc reads its tunables once, at process start, so the command re-execs itself with them
   (the same PID, arguments and descriptors). A tunable the user already set in GLIBC_TUNABLES
   wins over ours; `SEQ2SEQ_MALLOC=default` leaves malloc as it is.
"""

from __future__ import annotations

import glob
import os
import sys

TUNABLES = {
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(64 << 30),
    "glibc.malloc.arena_max": "1",
}
OPT_OUT = "SEQ2SEQ_MALLOC"
# Device nodes of the accelerators JAX drives (NVIDIA GPUs; TPU VMs' accel/vfio nodes).
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def _is_glibc() -> bool:
    """glibc 2.26+ reads GLIBC_TUNABLES; musl and macOS have no such knob."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 26)
    except (ValueError, OSError, AttributeError):
        return False


def runs_on_cpu(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether JAX will compute on the CPU here: no accelerator device node, or JAX_PLATFORMS=cpu."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def tunables_with_ours(current: str) -> str | None:
    """GLIBC_TUNABLES with ours added where the user set no value of their own; None if nothing to add."""
    named = {item.split("=")[0] for item in current.split(":") if item}
    missing = [f"{key}={value}" for key, value in TUNABLES.items() if key not in named]
    if not missing:
        return None
    return ":".join([current] * bool(current) + missing)


def before_jax() -> None:
    """Both settings of the module docstring, where they apply; may restart the process."""
    if not runs_on_cpu():
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if os.environ.get(OPT_OUT) == "default":
        return
    tunables = tunables_with_ours(os.environ.get("GLIBC_TUNABLES", ""))
    if tunables is None or not sys.executable or not _is_glibc():
        return  # the restarted process stops here: all of ours are set
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})
