"""The sm90 backward's pre- / post-processing kernels (cute_kernels/bwd_prepost.py): compiled
for sm_90a on the CPU (vectorized loads and stores, no local memory), and on a GPU compared with
their torch form in bwd_launch (`preprocess` / `postprocess`) on batched, packed and seqused
queries and padded head dims."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import pytest
import torch

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

from cute_kernels import sass  # noqa: E402
from cute_kernels import bwd_launch  # noqa: E402
from cute_kernels.bwd_prepost import BwdPostprocessSm90, BwdPreprocessSm90, BwdRowsConfig  # noqa: E402
from cute_kernels.config import BwdConfig  # noqa: E402
from tests._cute import gpu, make_req  # noqa: E402


def _compile(cfg: BwdRowsConfig) -> dict:
    import glob

    import cutlass.cute as cute

    kernel = BwdPreprocessSm90 if cfg.kind == "pre" else BwdPostprocessSm90
    with tempfile.TemporaryDirectory() as d:
        cute.compile(kernel(cfg), *kernel.fake_args(cfg), options=f"--gpu-arch=sm_90a --keep-cubin --dump-dir={d}")
        cubin = glob.glob(os.path.join(d, "*.cubin"))[0]
        text, res = sass.sass_text(cubin), sass.resource_usage(cubin)
    assert res.get("STACK", 0) == 0 and res.get("LOCAL", 0) == 0, f"{cfg.short()}: local memory {res}"
    return sass.opcode_counts(text, full=True)


@pytest.mark.parametrize("hdim,hdim_in,packed,seqused", [(128, 0, False, False), (64, 0, True, True),
                                                         (96, 80, True, False)])
def test_compile_preprocess(hdim, hdim_in, packed, seqused):
    ops = _compile(BwdRowsConfig("pre", "bf16", hdim, 64, hdim_in, packed, seqused))
    # O and dO in 16-byte vectors, the dQ accumulator zeroed in 16-byte stores, rows reduced by shuffles
    assert ops["LDG.E.128"] >= 16 and ops["STG.E.128"] > 0 and ops["SHFL.BFLY"] > 0


@pytest.mark.parametrize("hdim,hdim_in,packed,seqused", [(128, 0, False, False), (64, 0, True, True),
                                                         (96, 80, False, True)])
def test_compile_postprocess(hdim, hdim_in, packed, seqused):
    ops = _compile(BwdRowsConfig("post", "fp16", hdim, 64, hdim_in, packed, seqused))
    per_thread = 64 * hdim // 256
    assert ops["LDG.E.128"] == per_thread // 4, "the accumulator read in 16-byte vectors"
    assert ops["STG.E"] > 0


@pytest.mark.parametrize("hdim,tile_m", [(64, 128), (128, 80)])
@pytest.mark.parametrize("kind", ["pre", "post"])
@pytest.mark.parametrize("packed,seqused", [(False, False), (True, True)])
def test_compile_prepost_wide_tiles(kind, packed, seqused, hdim, tile_m):
    """hdim 64's 128-row blocks (postprocess through the main kernel's row-split dQ MMA, 32 values
    a thread) and hdim 128's 80-row blocks (through its dQ^T MMA, 40 values a thread)."""
    ops = _compile(BwdRowsConfig(kind, "bf16", hdim, tile_m, 0, packed, seqused))
    if kind == "post":
        assert ops["LDG.E.128"] == tile_m * hdim // 256 // 4, "the accumulator read in 16-byte vectors"
    else:
        assert ops["LDG.E.128"] >= 16 and ops["STG.E.128"] > 0


@pytest.mark.parametrize("packed,seqused", [(False, False), (True, True)])
def test_compile_postprocess_dkvt(packed, seqused):
    """hdim 192's three-warpgroup tile (dkv_transposed): the postprocessing runs 384 threads
    through its dQ MMA (thirds of the head dim), 32 values a thread."""
    ops = _compile(BwdRowsConfig("post", "bf16", 192, 64, 0, packed, seqused, dkv_transposed=True))
    assert ops["LDG.E.128"] == 64 * 192 // 384 // 4, "the accumulator read in 16-byte vectors"


# ----------------------------------------------------------------------------- GPU
def _request(case, d, dtype=torch.bfloat16):
    torch.manual_seed(0)
    h = 3
    if case == "batched":
        q = torch.randn(2, 77, h, d, device="cuda", dtype=dtype)
        return make_req(q, q, q)
    lengths = [0, 1, 64, 130, 37]
    total = sum(lengths)
    q = torch.randn(total, h, d, device="cuda", dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    if case == "seqused":
        kw["seqused_q"] = torch.tensor([0, 1, 50, 129, 10], dtype=torch.int32, device="cuda")
    return make_req(q, q, q, **kw)


@pytest.mark.parametrize("kind", ["pre", "post"])
def test_compile_prepost_pdl(kind):
    """pdl: each waits for the kernel before it (griddepcontrol.wait, SASS ACQBULK) before reading;
    the preprocessing then lets the main kernel launch (launch_dependents, SASS PREEXIT); the
    loads and stores stay as they were."""
    plain = BwdRowsConfig(kind, "bf16", 128, 64, 0, True, True)
    ops, plain_ops = _compile(dataclasses.replace(plain, pdl=True)), _compile(plain)
    assert ops["ACQBULK"] == 1 and ops["PREEXIT"] == (kind == "pre")
    assert plain_ops["ACQBULK"] == plain_ops["PREEXIT"] == 0
    for op in ("LDG.E.128", "STG.E.128", "STG.E"):
        assert ops[op] == plain_ops[op], op


@pytest.mark.parametrize("cfg", [
    BwdConfig.make("bf16", 128), BwdConfig.make("fp16", 64), BwdConfig.make("bf16", 128, tile_m=80, ds_stages=2),
    BwdConfig.make("bf16", 192, dkv_transposed=True), BwdConfig.make("bf16", 256, dq_red=True),
    BwdConfig.make("bf16", 96, hdim_in=80, cu_seqlens_q=True, cu_seqlens_k=True, seqused_q=True),
    BwdConfig.make("bf16", 192, hdimv=128)], ids=lambda c: c.short().replace(" ", "-"))
def test_compile_postprocess_dq_smem(cfg):
    """dq_smem: dQ leaves the postprocessing by stmatrix (stmatrix.trans from the 80-row tile's dQ^T)
    into smem, one CTA barrier, and 16-byte stores only: tile_m x hdim / 8 / threads each thread
    (element-wise from registers without it: 4-byte stores, 2-byte from dQ^T)."""
    rc = BwdRowsConfig.of("post", cfg, dq_smem=True)
    assert rc.dq_smem and not BwdRowsConfig.of("pre", cfg, dq_smem=True).dq_smem
    ops = _compile(rc)
    threads = 128 * cfg.num_mma_wg
    assert {op: n for op, n in ops.items() if op.startswith("STG")} == {"STG.E.128": cfg.tile_m * cfg.hdim // 8 // threads}
    assert any(op.startswith("STSM") for op in ops) and ops["BAR.SYNC.DEFER_BLOCKING"] == 1


@pytest.fixture(params=[False, True], ids=["dq_regs", "dq_smem"])
def post_dq_smem(request, monkeypatch):
    """The postprocessing's dQ stores: element-wise from registers, or through smem."""
    monkeypatch.setattr(bwd_launch, "post_dq_smem", request.param)


@gpu
@pytest.mark.parametrize("case", ["batched", "packed", "seqused"])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_prepost_kernels_match_torch(post_dq_smem, case, d):
    req = _request(case, d)
    _prepost_kernels_match_torch(req, bwd_launch.config_for(req))


@gpu
@pytest.mark.parametrize("case", ["batched", "packed", "seqused"])
@pytest.mark.parametrize("hdim,tile_m,d", [(64, 128, 64), (64, 128, 40), (128, 80, 128), (128, 80, 104)])
def test_prepost_kernels_match_torch_wide_tiles(post_dq_smem, case, hdim, tile_m, d):
    """hdim 64's 128-row blocks (the dQ MMA split by rows) and hdim 128's 80-row blocks (dQ^T)."""
    import dataclasses

    req = _request(case, d)
    _prepost_kernels_match_torch(req, dataclasses.replace(bwd_launch.config_for(req), tile_m=tile_m))


def _prepost_kernels_match_torch(req, cfg):
    out, dout = torch.randn_like(req.q), torch.randn_like(req.q)
    lse = torch.randn(req.lse_shape, device="cuda")
    lse[..., ::7] = -math.inf  # rows without keys
    row_index = bwd_launch.packed_row_index(req, cfg.tile_m) if req.packed_q else None
    want = bwd_launch.preprocess(req, cfg, out, lse, dout, row_index)
    got = bwd_launch.launch_preprocess(req, cfg, out, dout, lse)
    # compare the rows the main kernel reads: every block of every sequence
    lq = (req.seqused_q if req.seqused_q is not None else
          (req.cu_seqlens_q.diff() if req.packed_q else torch.full((req.batch,), req.q.shape[1], device="cuda")))
    for b, n in enumerate(lq.tolist()):
        blocks = -(-n // cfg.tile_m)
        start = (int(req.cu_seqlens_q[b]) + b * cfg.tile_m) // cfg.tile_m * cfg.tile_m if req.packed_q else 0
        rows = slice(start, start + blocks * cfg.tile_m)
        sel = (lambda t: t[:, rows]) if req.packed_q else (lambda t: t[b, :, rows])
        torch.testing.assert_close(sel(got[0]), sel(want[0]), rtol=0, atol=0)  # LSE_log2: same float ops
        torch.testing.assert_close(sel(got[1]), sel(want[1]), rtol=1e-5, atol=1e-5)  # dPsum: another sum order
        acc_rows = slice(rows.start * cfg.hdim, rows.stop * cfg.hdim)
        sel_acc = (lambda t: t[:, acc_rows]) if req.packed_q else (lambda t: t[b, :, acc_rows])
        assert (sel_acc(got[2]) == 0).all()
    # postprocess: random accumulator contents, both paths
    acc = torch.randn_like(want[2])
    torch.testing.assert_close(bwd_launch.launch_postprocess(req, cfg, acc),
                               bwd_launch.postprocess(req, cfg, acc, row_index), rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("case", ["batched", "packed", "seqused"])
@pytest.mark.parametrize("d", [192, 160])
def test_prepost_kernels_match_torch_dkvt(post_dq_smem, monkeypatch, case, d):
    """The three-warpgroup hdim 192 tile's dQ order (dkv_transposed, bwd_launch.dkvt)."""
    monkeypatch.setattr(bwd_launch, "dkvt", True)
    req = _request(case, d)
    cfg = bwd_launch.config_for(req)
    assert cfg.dkv_transposed
    _prepost_kernels_match_torch(req, cfg)


def test_kernel_class_per_config():
    """launch.compile_kernel compiles each config type with its own kernel class, and refuses
    anything else (the caches key on the config, so a wrong class would be a wrong kernel)."""
    from cute_kernels import launch
    from cute_kernels.bwd_sm90 import FlashAttentionBackwardSm90
    from cute_kernels.config import BwdConfig, FwdConfig
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    assert launch.kernel_class(FwdConfig.make("bf16", 128)) is FlashAttentionForwardSm90
    assert launch.kernel_class(BwdConfig.make("bf16", 128)) is FlashAttentionBackwardSm90
    assert launch.kernel_class(BwdRowsConfig("pre", "bf16", 128, 64)) is BwdPreprocessSm90
    assert launch.kernel_class(BwdRowsConfig("post", "bf16", 128, 64)) is BwdPostprocessSm90
    with pytest.raises(TypeError, match="no kernel compiles a dict"):
        launch.kernel_class({})
