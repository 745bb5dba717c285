"""Transparent huge pages for XLA's host buffers (Linux with glibc >= 2.35).

On the CPU, XLA allocates a step's large temporaries afresh on every run of the step. glibc
serves blocks that large with mmap and unmaps them on free, so each step faults its whole
working set back in, 4 KiB at a time: measured 153,000 page faults per step, about 20% of the
TopK step of benchmarks/throughput.py (RESULTS.md). glibc's tunable `glibc.malloc.hugetlb=1`
makes malloc ask the kernel for transparent huge pages for such blocks (2 MiB pages: about 300x
fewer faults). Tunables are read only when a process starts, so the `jaxsae` command restarts
itself once, at its first line, with the tunable added to GLIBC_TUNABLES (the same arguments,
the same process id). It does nothing when the tunable is already set, when the kernel has
transparent huge pages off, off Linux/glibc, or with JAXSAE_HUGE_PAGES=0 (or off, false, no).

Programs that use jaxsae as a library get the same effect by starting Python with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the environment.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXSAE_HUGE_PAGES"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_at_least(major: int, minor: int) -> bool:
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        return tuple(int(part) for part in version.split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


def _thp_available() -> bool:
    """The kernel's THP mode is `always` or `madvise` (the tunable uses madvise)."""
    try:
        return "[never]" not in _THP_MODE.read_text()
    except OSError:
        return False


def wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether a restart would turn huge pages on for this process."""
    env = os.environ if environ is None else environ
    # (0, off, false or no: fault testing found `off` kept huge pages, unsaid)
    off = env.get(OPT_OUT, "").strip().lower() in ("0", "off", "false", "no")
    if off or "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return False
    return platform.system() == "Linux" and _glibc_at_least(2, 35) and _thp_available()


def restart_with_huge_pages() -> None:
    """Re-executes this process with the tunable set, when `wanted()`; otherwise returns."""
    if not wanted():
        return
    env = dict(os.environ)
    previous = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{previous}:{TUNABLE}" if previous else TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # could not restart (e.g. the interpreter moved): run as we are
