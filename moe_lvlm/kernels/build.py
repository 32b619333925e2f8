"""Compiles a kernel's C++ source with the system g++ on first use and caches the shared library.

The library lands in `$MOE_LVLM_KERNEL_CACHE` (default `$XDG_CACHE_HOME/moe_lvlm/kernels`, i.e.
`~/.cache/moe_lvlm/kernels`) under a name keyed by the source and this package's headers, the
flags, jaxlib's version and the host CPU (it is built with -march=native), so a changed source or
a different machine builds anew. Concurrent builders (pytest-xdist workers) each compile to a
private temporary file and rename it into place atomically. `MOE_LVLM_NATIVE_KERNELS=0` turns
native kernels off.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w")
_SOURCES = Path(__file__).parent


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if "MOE_LVLM_KERNEL_CACHE" in os.environ:
        return Path(os.environ["MOE_LVLM_KERNEL_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "moe_lvlm" / "kernels"


def _cpu_key() -> str:
    """The machine and its CPU flags (what -march=native compiles for)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


def library_path(source: str) -> Path:
    """The cached library of `source` (a file name in this package)."""
    key = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(_SOURCES.glob("*.h"))]  # what sources include
    for part in ((_SOURCES / source).read_bytes(), *headers, " ".join(FLAGS).encode(),
                 jaxlib.__version__.encode(), _cpu_key().encode()):
        key.update(part)
    return cache_dir() / f"{Path(source).stem}-{key.hexdigest()[:16]}.so"


def _compile(source: str, target: Path) -> None:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCES / source), "-o", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(source: str) -> ctypes.CDLL | None:
    """The library built from `source`, compiled first if not cached; None (with one warning)
    if native kernels are turned off or the build fails."""
    if os.environ.get("MOE_LVLM_NATIVE_KERNELS", "1") == "0":
        return None
    path = library_path(source)
    try:
        if not path.exists():
            _compile(source, path)
        return ctypes.cdll.LoadLibrary(str(path))
    except (OSError, RuntimeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        warnings.warn(f"native kernel {source} unavailable ({first}); using the JAX kernels",
                      stacklevel=2)
        return None


def register(source: str, targets: dict[str, str]) -> bool:
    """Loads `source`'s library (`load`) and registers each of its handler symbols with XLA:CPU
    as the FFI target named by `targets` {target: symbol}; False if the library is unavailable."""
    library = load(source)
    if library is None:
        return False
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return True
