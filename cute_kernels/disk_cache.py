"""Compiled kernels kept on disk across processes (TVM-FFI path).

Compiling one forward configuration takes seconds (CuTe DSL -> PTX -> ptxas); a process that
meets a new configuration (causal or not, short or long sequences, a head dim) pays that on its
first call with it. This cache writes each compiled kernel, host code and embedded cubin, as an
object file (CuTe DSL's `export_to_c`) and later processes load it in milliseconds
(`cute.runtime.load_module`, linked in memory: no system compiler needed).

    FA3PY_CACHE_DIR   the directory (default: $XDG_CACHE_HOME/fa3py or ~/.cache/fa3py),
                      kernels under its `cute/` subfolder; "0" / "off" turns the cache off.

An entry is named by a digest of everything that decides the code: the FwdConfig, the kernel
sources (cute_kernels/*.py), the CuTe DSL and TVM-FFI versions and the target arch. A stale or
unreadable entry is never used: a failed load falls back to compiling (and rewrites the entry).
Writes go through a temporary file and an atomic rename, so concurrent processes are safe.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

OFF = ("0", "off", "")


def cache_dir() -> Optional[Path]:
    """Where compiled kernels live, or None when the cache is turned off."""
    root = os.environ.get("FA3PY_CACHE_DIR")
    if root is not None and root.strip().lower() in OFF:
        return None
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fa3py")
    return Path(root) / "cute"


@functools.lru_cache(maxsize=None)
def _environment_digest() -> str:
    """The kernel sources and the toolchain: what every entry's name depends on besides its config.
    Every module of the package counts (tools too: a list of the kernel's own modules would go
    stale the day one is added, and a stale entry is a wrong kernel)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for dist in ("nvidia-cutlass-dsl", "apache-tvm-ffi"):
        try:
            h.update(f"{dist}=={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{dist} missing".encode())
    import torch

    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    h.update(f"{os.environ.get('CUTE_DSL_ARCH', '')} {cap}".encode())
    return h.hexdigest()


def entry_name(cfg) -> str:
    """A C identifier naming `cfg`'s compiled kernel (its exported symbol and file stem)."""
    digest = hashlib.sha256((_environment_digest() + repr(cfg)).encode()).hexdigest()
    return f"fa3py_fwd_{digest[:32]}"


def load(cfg):
    """The cached TVM-FFI function for `cfg`, or None (no cache, no entry, or a failed load)."""
    root = cache_dir()
    if root is None:
        return None
    name = entry_name(cfg)
    path = root / f"{name}.o"
    if not path.exists():
        return None
    try:
        import cutlass.cute as cute

        return getattr(cute.runtime.load_module(str(path), enable_tvm_ffi=True), name)
    except Exception as e:  # a truncated or incompatible file: compile instead
        log.warning("fa3py: ignoring unreadable cached kernel %s (%s)", path, e)
        return None


def store(cfg, fn) -> Optional[Path]:
    """Write `fn` (compiled with --enable-tvm-ffi) for `cfg`; the path, or None if not written."""
    root = cache_dir()
    if root is None:
        return None
    name = entry_name(cfg)
    path = root / f"{name}.o"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".o", dir=root)
        os.close(fd)
        try:
            fn.export_to_c(tmp, function_name=name)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except Exception as e:  # a read-only home, a full disk: the kernel still runs
        log.warning("fa3py: could not cache the compiled kernel in %s (%s)", root, e)
        return None
    return path
