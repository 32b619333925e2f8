"""host_memory: glibc keeps freed memory for reuse (no page faults on re-allocation), set only
where training runs on CPU."""

import pathlib
import subprocess
import sys

import pytest

from moe_lvlm import host_memory

# Allocates, touches and frees a 64 MB block 6 times; prints whether the settings were applied
# and the minor page faults of the last 5 rounds. Above glibc's default mmap threshold (at most
# 32 MB) the block is mmap'd and unmapped each time, so each round faults its 16,384 pages in.
CHILD = """
import ctypes, resource, sys
from moe_lvlm import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "tuned" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def round_():
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, **env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         check=True, env={"PATH": "", "JAX_PLATFORMS": "cpu", **env}).stdout
    applied, count = out.split()
    return applied == "True", int(count)


def _huge_pages_always() -> bool:
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.exists() and "[always]" in thp.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(_huge_pages_always(), reason="2 MB pages: the fault counts are too small")
def test_freed_memory_is_reused_without_page_faults():
    _, default = faults("default")
    applied, tuned = faults("tuned")
    assert default >= 5 * 16_384 * 0.9  # every round maps its pages in again
    assert applied and tuned < 500
    opted_out, count = faults("tuned", MOE_LVLM_MALLOC_TUNING="0")
    assert not opted_out and count >= 5 * 16_384 * 0.9


@pytest.mark.parametrize("platforms, expected", [
    ("cpu", True), ("cuda", False), ("cpu,cuda", False), ("tpu", False), (" cpu ", True),
])
def test_cpu_only_from_jax_platforms(platforms, expected):
    assert host_memory.cpu_only({"JAX_PLATFORMS": platforms}) is expected


def test_cpu_only_without_jax_platforms_looks_for_accelerator_plugins(monkeypatch):
    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name}

    monkeypatch.setattr(host_memory.importlib.metadata, "distributions",
                        lambda: [Dist("jax"), Dist("jaxlib")])
    assert host_memory.cpu_only({})
    monkeypatch.setattr(host_memory.importlib.metadata, "distributions",
                        lambda: [Dist("jax"), Dist("jax-cuda12-plugin")])
    assert not host_memory.cpu_only({})
