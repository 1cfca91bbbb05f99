"""Transparent huge pages for XLA:CPU's per-step buffers, through glibc's `glibc.malloc.hugetlb`.

XLA:CPU takes a step's temporaries (about 0.9 GiB at the reference size of `configs/bench.yaml`)
from malloc, which maps them fresh from the kernel each step and unmaps them after: in 4 KiB pages
that is about 240,000 page faults a step, and the kernel's fault handling and zeroing came to
5-25% of the step on the 2-core development machines. With `glibc.malloc.hugetlb=1`
glibc asks for transparent huge pages (2 MiB) on what it maps (the kernel's THP mode `madvise`,
Debian's default, honours that); the faults drop about 13x (README, Performance).

glibc reads its tunables once, at process start, so `trainer.train` and `trainer.bench` re-exec
themselves with the tunable added before they load JAX (the same PID, arguments and descriptors).
A `glibc.malloc.hugetlb` the user set is kept as it is: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`
turns this off.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP_MODES = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_has_tunable() -> bool:
    """glibc 2.35 added `glibc.malloc.hugetlb`; musl, macOS and older glibc have no such knob."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except (ValueError, OSError, AttributeError):
        return False


def _thp_available() -> bool:
    """The kernel's THP mode (Linux only) is `always` or `madvise`."""
    try:
        with open(_THP_MODES) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def tunables_with_hugepages(current: str) -> str | None:
    """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added, or None where it already names one."""
    if any(item.split("=")[0] == TUNABLE for item in current.split(":") if item):
        return None
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def reexec_with_hugepages() -> None:
    """Restart this process with the tunable set, when glibc and the kernel support it; else return."""
    tunables = tunables_with_hugepages(os.environ.get("GLIBC_TUNABLES", ""))
    if tunables is None or not sys.executable or not _glibc_has_tunable() or not _thp_available():
        return  # the restarted process stops at the first test
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})
