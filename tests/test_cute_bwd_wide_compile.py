"""The sm90 backward at head dims 192 / 256 and 192 x 128 (bwd_sm90.py's `dkv_split_hdim` layout:
64 keys per CTA, S^T / dP^T split by queries and dK / dV by head-dim columns over the two
consumer warpgroups, P^T and dS^T through smem), compile-only: built for sm_90a against fake tensors
(no GPU) with SASS checks (HGMMA of the variant's shapes, UTMALDG, USETMAXREG, UBLKRED,
pipelined WGMMA, no local memory, registers under setmaxnreg's 240), its pre / post kernels,
and the host's choice of config for these head dims."""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile

import pytest
import torch

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

from cute_kernels import sass  # noqa: E402
from cute_kernels import bwd_launch  # noqa: E402
from cute_kernels.bwd_prepost import BwdPostprocessSm90, BwdPreprocessSm90, BwdRowsConfig  # noqa: E402
from cute_kernels.bwd_sm90 import FlashAttentionBackwardSm90  # noqa: E402
from cute_kernels.config import BwdConfig  # noqa: E402
from tests._cute import make_req  # noqa: E402


def _compile(kernel, cfg) -> tuple[str, dict]:
    import cutlass.cute as cute

    with tempfile.TemporaryDirectory() as d:
        cute.compile(kernel(cfg), *kernel.fake_args(cfg), options=f"--gpu-arch=sm_90a --keep-cubin --dump-dir={d}")
        cubin = glob.glob(os.path.join(d, "**", "*.cubin"), recursive=True)[0]
        return sass.sass_text(cubin), sass.resource_usage(cubin)


# One config per feature the kernel branches on, both head dims and dtypes spread over them.
GRID = [
    ("bf16", 256, dict()),
    ("fp16", 192, dict()),
    ("bf16", 192, dict(has_right=True)),
    ("fp16", 256, dict(has_right=True)),
    ("bf16", 256, dict(has_left=True, has_right=True, softcap=True)),
    ("fp16", 192, dict(has_left=True, has_right=True, softcap=True)),
    ("bf16", 256, dict(cu_seqlens_q=True, cu_seqlens_k=True, seqused_q=True, seqused_k=True, has_right=True)),
    ("bf16", 192, dict(seqused_q=True, seqused_k=True)),
    ("fp16", 256, dict(deterministic=True, has_right=True)),
    ("bf16", 192, dict(dkv_partial=True, has_right=True)),
    ("bf16", 256, dict(hdim_in=200, dkv_partial=True)),
    ("bf16", 192, dict(hdimv=128)),
    ("fp16", 192, dict(hdimv=128, has_right=True, softcap=True)),
    ("bf16", 192, dict(hdimv=128, hdim_in=160, cu_seqlens_q=True, cu_seqlens_k=True, dkv_partial=True)),
    ("bf16", 256, dict(chunk=True, has_right=True, cu_seqlens_q=True, cu_seqlens_k=True, deterministic=True)),
]


@pytest.mark.parametrize("dtype,hdim,features", GRID)
def test_compile_wide_bwd(dtype, hdim, features):
    cfg = BwdConfig.make(dtype, hdim, **features)
    assert cfg.dkv_split_hdim and (cfg.tile_m, cfg.tile_n) == (64, 64)
    text, res = _compile(FlashAttentionBackwardSm90, cfg)
    ops = sass.opcode_counts(text)
    for op in ("HGMMA", "UTMALDG", "USETMAXREG", "UBLKRED"):
        assert ops[op] > 0, f"{cfg.short()}: no {op}"
    assert not sass.serialized_wgmma(text), f"{cfg.short()}: ptxas serialized the WGMMAs"
    assert ops["STL"] == ops["LDL"] == 0 and res.get("STACK", 0) == res.get("LOCAL", 0) == 0, \
        f"{cfg.short()}: local memory (spills) {res}"
    assert sass.max_register(text) < cfg.consumer_regs, f"{cfg.short()}: registers past setmaxnreg's"
    assert sass.register_pool_overdrawn(text, res, cfg) is None
    # S^T and dP^T: 64 keys x 32 queries per warpgroup; dK, dQ: hdim / 2 columns per warpgroup,
    # dV hdimv / 2; each of these 64-query GEMMs is 4 k-blocks a step
    hdimv = cfg.hdimv or hdim
    shapes = collections.Counter(re.findall(r"\bHGMMA\.(\d+x\d+x\d+)\.F32\b", text))
    n_sdp, n_dkq = shapes.pop("64x32x16", 0), shapes.pop(f"64x{hdim // 2}x16", 0)
    n_dv = shapes.pop(f"64x{hdimv // 2}x16", 0) if hdimv != hdim else n_dkq // 3
    assert not shapes, f"{cfg.short()}: other WGMMA shapes {shapes}"
    steps = n_sdp // ((hdim + hdimv) // 16)  # per step: hdim / 16 k-blocks of S^T, hdimv / 16 of dP^T
    assert steps >= 1 and n_sdp == steps * (hdim + hdimv) // 16, f"{cfg.short()}: {n_sdp} S^T / dP^T WGMMAs"
    assert (n_dkq, n_dv) == ((3 if hdimv == hdim else 2) * 4 * steps, 4 * steps), \
        f"{cfg.short()}: {n_dkq} dK / dQ and {n_dv} dV WGMMAs for {steps} steps"


def test_wide_tiles_and_smem():
    c256, c192 = BwdConfig.make("bf16", 256), BwdConfig.make("fp16", 192)
    assert (c256.tile_n, c256.q_stages, c256.dkv_split_hdim) == (64, 1, True)
    assert (c192.tile_n, c192.q_stages, c192.dkv_split_hdim) == (64, 2, True)
    assert not BwdConfig.make("bf16", 128).dkv_split_hdim
    # two Q / dO stages at hdim 256 overflow 227 KB: the trace-time budget check says so
    with pytest.raises(Exception, match="shared memory"):
        _compile(FlashAttentionBackwardSm90, BwdConfig("bf16", 256, 64, 64, q_stages=2, dkv_split_hdim=True))


@pytest.mark.parametrize("kind,hdim,hdim_in,packed,seqused,hdimv", [
    ("pre", 256, 0, False, False, 0), ("post", 256, 0, True, True, 0), ("post", 192, 160, False, False, 0),
    ("pre", 192, 160, True, False, 128), ("post", 192, 0, False, True, 128)])
def test_compile_wide_prepost(kind, hdim, hdim_in, packed, seqused, hdimv):
    cfg = BwdRowsConfig(kind, "bf16", hdim, 64, hdim_in, packed, seqused, hdimv)
    assert cfg.bwd_config().dkv_split_hdim  # the postprocessing reads dQ through this config's MMA
    text, res = _compile(BwdPreprocessSm90 if kind == "pre" else BwdPostprocessSm90, cfg)
    assert res.get("STACK", 0) == 0 and res.get("LOCAL", 0) == 0, f"{cfg.short()}: local memory {res}"
    assert sass.opcode_counts(text, full=True)["LDG.E.128"] > 0


def test_wide_host(monkeypatch):
    from cute_kernels import launch

    monkeypatch.setattr(bwd_launch, "enabled", True)
    monkeypatch.setattr(launch, "use_tvm_ffi", True)
    for d, kernel_d in ((256, 256), (200, 256), (192, 192), (160, 192)):
        x = torch.randn(1, 8, 2, d, dtype=torch.bfloat16)
        req = make_req(x, x, x)
        assert bwd_launch.why_not(req) is None
        cfg = bwd_launch.config_for(req)
        hdim_in = 0 if d == kernel_d else d
        # (hdim 192 with hdim_v 192: the three-warpgroup 96-key tile, bwd_launch.dkvt)
        tile = (96, False, True) if kernel_d == 192 else (64, True, False)
        assert (cfg.hdim, cfg.hdim_in, cfg.tile_n, cfg.dkv_split_hdim, cfg.dkv_transposed) == (kernel_d, hdim_in, *tile)
    v = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)
    for d in (192, 160):
        q = torch.randn(1, 8, 2, d, dtype=torch.bfloat16)
        assert bwd_launch.why_not(make_req(q, q, v)) is None
        cfg = bwd_launch.config_for(make_req(q, q, v))
        assert (cfg.hdim, cfg.hdimv, cfg.hdim_in, cfg.dkv_split_hdim) == (192, 128, 0 if d == 192 else d, True)
    q, v = torch.randn(1, 8, 2, 256, dtype=torch.bfloat16), torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)
    assert "hdim_v = hdim" in bwd_launch.why_not(make_req(q, q, v))
    q, v = torch.randn(1, 8, 2, 192, dtype=torch.bfloat16), torch.randn(1, 8, 2, 120, dtype=torch.bfloat16)
    assert "hdim_v = hdim" in bwd_launch.why_not(make_req(q, q, v))
    # GQA: head_splits counts CTAs of the head dim's key tile, 64 keys at 256 and 128 at 128: at
    # 264 * 64 keys one KV head makes two waves of 132 SMs at hdim 256 (no split) and one at 128
    for d, splits in ((256, 1), (128, 2)):
        q, k = torch.empty(1, 264 * 64, 2, d, dtype=torch.bfloat16), torch.empty(1, 264 * 64, 1, d, dtype=torch.bfloat16)
        req = make_req(q, k, k)
        assert bwd_launch.head_splits(req) == splits and bwd_launch.config_for(req).dkv_partial == (splits > 1)
