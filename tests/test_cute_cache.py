"""cute_kernels' disk cache of compiled kernels (TVM-FFI path)."""

from __future__ import annotations

import os

import pytest
import torch

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cute_kernels  # noqa: E402
from cute_kernels import launch  # noqa: E402
from cute_kernels.config import FwdConfig  # noqa: E402
from tests._cute import check_run, gpu, make_req, qkv  # noqa: E402


def test_disk_cache_round_trip(tmp_path, monkeypatch, caplog):
    """TVM-FFI kernels written to FA3PY_CACHE_DIR on first compile and loaded by a later
    "process" (empty in-memory cache) without compiling; an unreadable entry is compiled again
    and rewritten; "0" turns the cache off. (Calling the loaded kernel is a GPU test.)"""
    pytest.importorskip("tvm_ffi")
    import cutlass.cute as cute
    import tvm_ffi

    from cute_kernels import disk_cache

    monkeypatch.setenv("FA3PY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(launch, "kernels", {})
    cfg = FwdConfig.make("bf16", 64, has_right=True, short=True)
    launch.compile_kernel(cfg)
    entry = tmp_path / "cute" / f"{disk_cache.entry_name(cfg)}.o"
    assert entry.stat().st_size > 10_000 and list(entry.parent.iterdir()) == [entry]

    real_compile = cute.compile
    monkeypatch.setattr(cute, "compile", lambda *a, **k: pytest.fail("compiled despite a cached entry"))
    monkeypatch.setattr(launch, "kernels", {})
    assert isinstance(launch.compile_kernel(cfg), tvm_ffi.Function)

    entry.write_bytes(b"not an object file")
    monkeypatch.setattr(cute, "compile", real_compile)
    monkeypatch.setattr(launch, "kernels", {})
    launch.compile_kernel(cfg)
    assert "unreadable cached kernel" in caplog.text and entry.stat().st_size > 10_000

    assert disk_cache.entry_name(cfg) != disk_cache.entry_name(FwdConfig.make("bf16", 64, has_right=True))
    monkeypatch.setenv("FA3PY_CACHE_DIR", "0")
    assert disk_cache.cache_dir() is None and disk_cache.load(cfg) is None and disk_cache.store(cfg, None) is None


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_disk_cache_kernel_runs(causal, tmp_path, monkeypatch):
    """A kernel loaded from the disk cache (TVM-FFI path) computes the same attention."""
    if not launch.use_tvm_ffi:
        pytest.skip("the disk cache serves the TVM-FFI path (apache-tvm-ffi not importable)")
    monkeypatch.setenv("FA3PY_CACHE_DIR", str(tmp_path))
    q, k, v = qkv(2, 300, 517, 4, 2, 128, 128, torch.bfloat16)
    req = make_req(q, k, v, window_right=0 if causal else -1)
    monkeypatch.setattr(launch, "kernels", {})
    first = cute_kernels.run(req, cute_kernels.config_for(req))
    assert len(list((tmp_path / "cute").iterdir())) == 1
    monkeypatch.setattr(launch, "kernels", {})  # a new process: load, not compile
    monkeypatch.setattr(launch, "last_compile_seconds", None)
    check_run(req)
    assert launch.last_compile_seconds is None
    torch.testing.assert_close(cute_kernels.run(req, cute_kernels.config_for(req)), first, rtol=0, atol=0)
