"""glibc malloc settings for training on CPU: freed memory is kept for reuse, not unmapped.

XLA:CPU allocates each step's temporaries (93 MB at the demo's stage II) with malloc on its
executor threads. With glibc's defaults such blocks are mmap'd (above M_MMAP_THRESHOLD, or
because a thread's own arena cannot hold them) and unmapped again when freed, so every step
faults all their pages back in: ~17,800 minor faults and 50-70 ms of system time a step at the
demo's stage II on a 2-core box (benchmarks/RESULTS.md, issue 15, eighth session). One arena, no
mmap and no trimming let each step reuse the previous step's pages.

The settings only reach threads that have not allocated yet, so `keep_freed_memory` must run
before JAX starts its backend (first thing in an entry point). They apply to the whole process,
so they are only set where training runs on CPU (JAX_PLATFORMS says cpu, or no accelerator
plugin is installed) and not when MOE_LVLM_MALLOC_TUNING=0.
"""

import ctypes
import importlib.metadata
import os

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30))
_ACCELERATOR_DISTRIBUTIONS = ("jax-cuda", "jax-rocm", "libtpu")


def cpu_only(environ: dict[str, str] | None = None) -> bool:
    """Whether JAX will run on CPU: JAX_PLATFORMS names only cpu or, when unset, no CUDA, ROCm
    or TPU plugin is installed (decided without starting a backend)."""
    platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return not any(n.lower().startswith(_ACCELERATOR_DISTRIBUTIONS) for n in names)


def keep_freed_memory() -> bool:
    """Sets SETTINGS with glibc's mallopt where training runs on CPU (see the module docstring);
    returns whether they were set (False: another platform or C library, or opted out)."""
    if os.environ.get("MOE_LVLM_MALLOC_TUNING", "1") == "0" or not cpu_only():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
