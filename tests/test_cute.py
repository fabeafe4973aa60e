"""cute_kernels: the sm90 CuTe DSL forward kernel.

CPU (no GPU): compile-only for sm_90a against fake tensors over a representative config grid,
with SASS checks (HGMMA, UTMALDG, USETMAXREG, named BAR ids). GPU (`-m gpu`): every feature on
ragged sizes against the fp64 reference, tolerance per shared/STYLE.md (tests/_util.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import tempfile

import numpy as np
import pytest
import torch

from fa3py.request import AttentionParams, AttentionRequest

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cute_kernels  # noqa: E402
from cute_kernels import launch  # noqa: E402
from cute_kernels import sass  # noqa: E402
from cute_kernels.config import (  # noqa: E402
    CANDIDATES, SHORT_TILES, TILES, FwdConfig, TileConfig, tile_from_spec, tile_variant,
)

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


# ----------------------------------------------------------------------------- compile-only
def _compile_and_check(cfg: FwdConfig, text_out: list | None = None):
    """Compile `cfg` for sm_90a, check its SASS, return its opcode counts (the SASS text appended
    to `text_out` when given)."""
    with tempfile.TemporaryDirectory() as d:
        cubin, _ = sass.compile_cubin(cfg, d)
        text = sass.sass_text(cubin)
    if text_out is not None:
        text_out.append(text)
    missing = sass.check(text, cfg)
    assert missing == [], f"{cfg.short()}: missing {missing}"
    ops = sass.opcode_counts(text)
    assert ops["STL"] == 0 and ops["LDL"] == 0, f"{cfg.short()}: register spills"
    assert (ops["UTMASTG"] > 0) == cfg.tile.tma_store, f"{cfg.short()}: TMA store of O"
    return ops


COMPILE_GRID = [
    # (dtype, hdim, hdimv, causal): every head dim causal + non-causal, dtypes alternated.
    ("bf16", 64, 64, False), ("fp16", 64, 64, True),
    ("fp16", 96, 96, False), ("bf16", 96, 96, True),
    ("bf16", 128, 128, False), ("fp16", 128, 128, False), ("bf16", 128, 128, True),
    ("bf16", 192, 192, False), ("fp16", 192, 192, True), ("bf16", 192, 128, True),
    ("fp16", 256, 256, False), ("bf16", 256, 256, True),
]


@pytest.mark.parametrize("dtype,hdim,hdimv,causal", COMPILE_GRID)
def test_compile_sm90a(dtype, hdim, hdimv, causal):
    ops = _compile_and_check(FwdConfig.make(dtype, hdim, hdimv, has_right=causal))
    assert ops["HGMMA"] > 0


@pytest.mark.parametrize(
    "features",
    [
        dict(has_left=True, has_right=True, softcap=True),
        dict(cu_seqlens_q=True, cu_seqlens_k=True, seqused_k=True, has_right=True),
        dict(seqused_q=True, has_left=True),
        dict(intra_wg_overlap=False),
        dict(intra_wg_overlap=False, has_right=True),
        dict(persistent=True, dynamic=False, has_right=True, cu_seqlens_q=True, cu_seqlens_k=True),
        dict(rescale_o_before_pv=True, has_right=True),
        dict(dynamic=False, has_right=True, cu_seqlens_q=True, cu_seqlens_k=True),
        dict(tma_store=True, seqused_q=True, has_right=True),
    ],
    ids=["local-softcap", "varlen-causal", "seqused-left", "no-overlap", "no-overlap-causal",
         "static-persistent-varlen-causal", "rescale-before-pv-causal", "single-tile-varlen-causal",
         "tma-store-seqused-causal"],
)
def test_compile_features(features):
    cfg = FwdConfig.make("bf16", 128, **features)
    assert cfg.tile.dynamic == features.get("dynamic", cfg.has_right or cfg.has_left)  # default when windowed
    ops = _compile_and_check(cfg)
    assert (ops["ATOMG"] == 2) == cfg.tile.dynamic  # the dynamic tile counter + its reset count


def _three_wg(cfg: FwdConfig, tile_n: int = 128, **fields) -> FwdConfig:
    return dataclasses.replace(cfg, tile=tile_variant(cfg.tile, 192, tile_n, **fields))


@pytest.mark.parametrize("features", [dict(), dict(has_left=True, has_right=True)], ids=["noncausal", "local"])
def test_compile_three_wg(features):
    """tile_m 192: 3 consumer WGs at 512 threads, setmaxnreg 24/160, a 3-barrier pingpong ring,
    12-warp pipeline arrive counts (asserted at trace time), no spills at hdim 64; no epilogue
    barrier (O has its own smem)."""
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    cfg = _three_wg(FwdConfig.make("bf16", 64, **features))
    assert FlashAttentionForwardSm90(cfg).separate_o
    with tempfile.TemporaryDirectory() as d:
        cubin, _ = sass.compile_cubin(cfg, d)
        text = sass.sass_text(cubin)
        res = sass.resource_usage(cubin)
    assert sass.check(text, cfg) == []
    ops = sass.opcode_counts(text)
    assert ops["STL"] == 0 and ops["LDL"] == 0 and res["STACK"] == 0 and res["LOCAL"] == 0
    assert res["REG"] <= 128 and sass.max_register(text) < 160
    assert "USETMAXREG.DEALLOC.CTAPOOL 0x18" in text and "0xa0 ;" in text  # 24 / 160
    assert "BAR.SYNC.DEFER_BLOCKING 0x1" not in text  # each warp stores its own rows of O
    assert "BAR.ARV 0x2, 0x100" in text  # WG1 starts the ring
    assert ops["HGMMA"] > 0 and all(l.split()[1].startswith("HGMMA.64x") for l in text.splitlines()
                                    if " HGMMA" in l)


def test_compile_mask_integer_ops():
    """The mask compares thread 0's compile-time columns against per-row limits: few integer ops
    (27 VIADD at hdim 128 causal; 96 with per-element coordinates, CPU SASS, cutlass-dsl 4.8.1)."""
    ops = _compile_and_check(FwdConfig.make("bf16", 128, has_right=True))
    assert ops["VIADD"] < 60


@pytest.mark.parametrize("hdim,causal", [(64, False), (128, False), (128, True)])
def test_compile_q_stages(hdim, causal):
    """Two Q buffers: Q's TMA and WGMMA descriptors take the stage; the dynamic scheduler's tile
    slot is per stage. Where a second Q and a separate sO do not both fit (hdim 256, a wider
    tile, or hdim 192 where sO aliases sQ), the kernel keeps one Q buffer, as it keeps sO in sQ where sO
    does not fit."""
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    cfg = FwdConfig.make("bf16", hdim, has_right=causal, q_stages=2)
    assert FlashAttentionForwardSm90(cfg).q_stages == 2
    _compile_and_check(cfg)
    for d, tile in ((256, {}), (128, dict(tile_n=176)), (192, {})):
        assert FlashAttentionForwardSm90(FwdConfig.make("bf16", d, q_stages=2, **tile)).q_stages == 1


@pytest.mark.parametrize("causal", [False, True])
def test_compile_o_chunks(causal):
    """O staged in two column chunks: at hdim 256 with tile_n 64 a separate sO then fits (224 KB),
    so there is no epilogue barrier across warpgroups (sO no longer aliases sQ); with one chunk
    sO aliases sQ and the epilogue waits for all 256 consumer threads' last QK^T."""
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    cfg = FwdConfig.make("bf16", 256, has_right=causal, tile_n=64, o_chunks=2)
    assert FlashAttentionForwardSm90(cfg).separate_o
    one_chunk = FwdConfig.make("bf16", 256, has_right=causal, tile_n=64, o_chunks=1)
    assert not FlashAttentionForwardSm90(one_chunk).separate_o
    text = []
    ops = _compile_and_check(cfg, text)
    assert ops["STSM"] > 0
    assert "SYNC 0x1" not in sass.named_barrier_ids(text[0])  # NamedBarrierFwd.Epilogue
    _compile_and_check(one_chunk, text)
    assert "BAR.SYNC.DEFER_BLOCKING 0x1, 0x100" in text[1]


@pytest.mark.parametrize("hdim,causal", [(128, False), (64, True), (256, False)])
def test_compile_lazy_rescale(hdim, causal):
    """Lazy O rescaling: a warp vote decides whether O is rescaled (a branch over its FMULs)."""
    cfg = FwdConfig.make("bf16", hdim, has_right=causal, lazy_rescale=8.0)
    ops = _compile_and_check(cfg)
    assert ops["VOTE"] > 0


@pytest.mark.parametrize("hdim,causal", sorted(SHORT_TILES))
def test_compile_short(hdim, causal):
    cfg = FwdConfig.make("bf16", hdim, short=True, medium=not causal, has_right=causal)
    t = SHORT_TILES[hdim, causal]
    assert (cfg.tile.tile_m, cfg.tile.tile_n) == (t.tile_m, t.tile_n)
    _compile_and_check(cfg)


@pytest.mark.parametrize("hdim,tile,features", [
    (64, "128x128", dict(has_right=True)), (64, "192x128", dict(has_left=True, has_right=True)),
    (128, "128x128", dict(has_right=True, cu_seqlens_q=True, cu_seqlens_k=True, pack_gqa=2)),
    (96, "128x64", {})])
def test_compile_diag_half(hdim, tile, features):
    """diag_half: the first block's half-width QK^T (its own N = tile_n / 2 HGMMAs) and half-depth
    PV beside the full ones, pipelined (`sass.check`: ptxas serialized every WGMMA when the half
    QK^T wrote straight into the first half of the full accumulator)."""
    cfg = FwdConfig.make("bf16", hdim, **features)
    plain = dataclasses.replace(cfg, tile=tile_from_spec(cfg.tile, tile, ["intra_wg_overlap=0"]))
    half = dataclasses.replace(plain, tile=dataclasses.replace(plain.tile, diag_half=True))
    ops_plain, ops_half = _compile_and_check(plain), _compile_and_check(half)
    # per consumer warpgroup: one more QK^T of tile_n / 2 keys and one PV of half the k-blocks
    k_qk, k_pv = hdim // 16, plain.tile.tile_n // 32
    assert ops_half["HGMMA"] - ops_plain["HGMMA"] == k_qk + k_pv, (ops_plain["HGMMA"], ops_half["HGMMA"])


@pytest.mark.parametrize("hdim,causal", [(64, True), (128, False), (256, True)])
def test_compile_chain_pv_qk(hdim, causal):
    """chain_pv_qk: the plain schedule's PV stays in flight across the next QK^T's issue (and,
    with diag_half, across its branch): the WGMMAs stay pipelined and nothing spills, and the
    PV's own wait (a WARPGROUP.DEPBAR per KV-loop site) is gone while the GEMMs are the same."""
    cfg = FwdConfig.make("bf16", hdim, has_right=causal, short=hdim == 64)
    plain = dataclasses.replace(cfg, tile=dataclasses.replace(cfg.tile, intra_wg_overlap=False, chain_pv_qk=False))
    chain = dataclasses.replace(plain, tile=dataclasses.replace(plain.tile, chain_pv_qk=True))
    ops_plain, ops_chain = _compile_and_check(plain), _compile_and_check(chain)
    assert ops_chain["HGMMA"] == ops_plain["HGMMA"] > 0
    # WARPGROUP: the ARRIVE before each GEMM group (as many either way) and the DEPBAR waits
    assert ops_chain["WARPGROUP"] < ops_plain["WARPGROUP"], (ops_plain["WARPGROUP"], ops_chain["WARPGROUP"])


def test_serialized_wgmma():
    ok = "/*0010*/ WARPGROUP.ARRIVE ;\n/*0020*/ HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;\n" \
         "/*0030*/ HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;\n"
    bad = ok.replace("/*0030*/", "/*0028*/ WARPGROUP.ARRIVE ;\n/*0030*/")
    assert not sass.serialized_wgmma(ok) and sass.serialized_wgmma(bad)


@pytest.mark.parametrize("g,features", [(4, dict(has_right=True)), (8, {}), (6, dict(has_left=True, has_right=True)),
                                         (4, dict(has_right=True, cu_seqlens_q=True, seqused_q=True))])
def test_compile_pack_gqa(g, features):
    """GQA packing only changes how the masks map a row to its position (row // g; a multiply
    by a constant where g is not a power of 2): compiles spill-free with the masks it needs."""
    _compile_and_check(FwdConfig.make("bf16", 128, pack_gqa=g, short=True, **features))


@pytest.mark.parametrize("hdim,hdimv,features", [
    (128, 128, dict(pack_gqa=8, short=True)), (64, 64, dict(has_right=True)),
    (256, 256, dict(has_left=True, has_right=True)), (192, 128, dict(cu_seqlens_q=True, cu_seqlens_k=True, seqused_k=True)),
    (96, 96, dict(pack_gqa=4, has_right=True, seqused_q=True, cu_seqlens_q=True)),
    (96, 96, dict(hdim_in=80, hdimv_in=80, has_right=True)),
])
def test_compile_split_kv(hdim, hdimv, features):
    """Split-KV: spill-free at every head dim, with windows, varlen and packing; no TMA store (O
    leaves as float32 from registers by 8-byte stores, STG.E.64)."""
    cfg = FwdConfig.make("bf16", hdim, hdimv, split_kv=True, **features)
    assert not cfg.tile.tma_store
    text = []
    _compile_and_check(cfg, text_out=text)
    assert sass.opcode_counts(text[0], True)["STG.E.64"] > 0


@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_split_kv_fake_args(varlen):
    """The TVM-FFI compile's shape checks: split-KV's float32 partials fold the splits into O's
    first dim and LSE's rows, so those are symbols of their own (the same symbol as Q's rows made
    every split launch fail with "Mismatched mO.shape[0]"); unsplit, they are Q's."""
    import cutlass

    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    feats = dict(cu_seqlens_q=True, cu_seqlens_k=True) if varlen else {}
    lse_rows = (lambda lse: lse.shape[1]) if varlen else (lambda lse: lse.shape[0])
    mQ, _, _, mO, mLSE = FlashAttentionForwardSm90.fake_args(FwdConfig.make("bf16", 128, **feats))[:5]
    assert mO.shape[0] is mQ.shape[0] and lse_rows(mLSE) is mQ.shape[0]
    mQ, _, _, mO, mLSE = FlashAttentionForwardSm90.fake_args(FwdConfig.make("bf16", 128, split_kv=True, **feats))[:5]
    assert mO.shape[0] is not mQ.shape[0] and lse_rows(mLSE) is not mQ.shape[0]
    assert all(a is b for a, b in zip(mO.shape[1:-1], mQ.shape[1:-1])) and mO.element_type == cutlass.Float32


@pytest.mark.parametrize("d,dv,features", [
    (80, 80, {}), (80, 80, dict(has_right=True, cu_seqlens_q=True, cu_seqlens_k=True)),
    (32, 32, dict(has_right=True)), (232, 232, dict(has_right=True, seqused_q=True)),
    (144, 128, dict(has_left=True, has_right=True)), (48, 40, dict(pack_gqa=4, short=True)),
])
def test_compile_padded_headdims(d, dv, features):
    """Head dims below a tile's (FA3 rounds them up the same way): compiled for the tensors'
    dims, spill-free, the TMA store where the config has one, the predicated stores stopping at
    the head dim otherwise."""
    from cute_kernels.config import padded_hdim

    cfg = FwdConfig.make("bf16", padded_hdim(d), padded_hdim(dv), hdim_in=d, hdimv_in=dv, **features)
    assert f"tensors_d{d}x{dv}" in cfg.short()
    _compile_and_check(cfg)


def test_padded_headdim_choice():
    """why_not serves every head dim (multiple of 8, <= 256) that rounds up to a served pair;
    config_for compiles the rounded tile for the tensors' dims (0 where they match)."""
    from cute_kernels.config import padded_hdim

    assert [padded_hdim(d) for d in (8, 32, 64, 72, 96, 104, 128, 136, 192, 200, 256, 264, 84)] == \
        [64, 64, 64, 96, 96, 128, 128, 192, 192, 256, 256, None, None]
    for d, dv, served in [(80, 80, True), (32, 32, True), (144, 128, True), (48, 40, True), (232, 232, True),
                          (200, 128, False), (128, 64, False), (84, 84, False), (264, 264, False)]:
        q = torch.randn(1, 8, 4, d, dtype=torch.bfloat16)
        v = torch.randn(1, 8, 4, dv, dtype=torch.bfloat16)
        reason = cute_kernels.why_not(_req(q, q, v), backward=False)
        assert (reason == "cute_kernels: CUDA tensors only") == served, (d, dv, reason)
        if served:
            cfg = cute_kernels.config_for(_req(q, q, v))
            assert (cfg.hdim, cfg.hdimv) == (padded_hdim(d), padded_hdim(dv))
            assert (cfg.hdim_in, cfg.hdimv_in) == (0 if d == cfg.hdim else d, 0 if dv == cfg.hdimv else dv)


def test_pack_rows_layout():
    """pack_rows / pack_lse put query head kh * g + i of row r at row r * g + i of KV head kh,
    batched and packed (varlen) alike; unpack_rows / unpack_lse invert them; MQA (one KV head)
    and one row (decoding, also of strided views: the in-place outputs) pack by view."""
    g = 4
    for lead in ((3, 5), (11,), (3, 1), (1,)):
        t = torch.randn(*lead, 8, 24)[..., 3:19]  # strided rows
        p = cute_kernels.pack_rows(t, g)
        assert p.shape == (*lead[:-1], lead[-1] * g, 2, 16)
        r, i, kh = lead[-1] - 1, 3, 1
        assert torch.equal(p[..., r * g + i, kh, :], t[..., r, kh * g + i, :])
        assert torch.equal(cute_kernels.unpack_rows(p, g), t)
        if lead[-1] == 1:
            assert p.data_ptr() == t.data_ptr()
        lse = torch.randn(*lead[:-1], 8, lead[-1] + 2)[..., 1:-1]
        packed_lse = cute_kernels.pack_lse(lse, g)
        assert packed_lse.shape == (*lead[:-1], 2, lead[-1] * g)
        assert torch.equal(packed_lse[..., kh, r * g + i], lse[..., kh * g + i, r])
        assert torch.equal(cute_kernels.unpack_lse(packed_lse, g), lse)
    mqa = torch.randn(2, 5, 4, 16)
    assert cute_kernels.pack_rows(mqa, 4).data_ptr() == mqa.data_ptr()  # a view


def _block_ranges_fn(g, has_left, has_right, tile_m=128, tile_n=64):
    """AttentionMask's KV-block bounds for every m_block, run on the host by CuTe DSL's JIT."""
    from cutlass import Int32
    from cutlass.cute.runtime import from_dlpack

    from cute_kernels.mask import AttentionMask, SeqlenInfo

    @cutlass.cute.jit  # (annotations are strings here: resolved in this module's globals)
    def ranges(out: cutlass.cute.Tensor, sq: cutlass.Int32, sk: cutlass.Int32, wl: cutlass.Int32,
               wr: cutlass.Int32):
        seqlen = SeqlenInfo(Int32(0), Int32(0), sq, sk)
        for m in cutlass.range(out.shape[0]):
            mask = AttentionMask(tile_m, tile_n, has_left, has_right, wl, wr, seqlen, m, rows_per_pos=g)
            lo, hi = mask.n_block_range()
            out[m, 0] = lo
            out[m, 1] = hi
            out[m, 2] = mask.n_block_min_right_masked(lo)
            out[m, 3] = mask.n_block_max_left_masked(lo)
            out[m, 4] = mask.keys_end(Int32(tile_m // 2))  # (diag_half: first warpgroup's rows)
            out[m, 5] = mask.keys_end(Int32(tile_m))

    def call(rows, sk, wl, wr):
        out = torch.zeros(-(-rows // tile_m), 6, dtype=torch.int32)
        ranges(from_dlpack(out), Int32(rows), Int32(sk), Int32(wl), Int32(wr))
        return out.tolist()

    return call


@pytest.mark.parametrize("g", [1, 3, 4])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (37, 11), (200, -1)])
@pytest.mark.parametrize("half", [False, True], ids=["block", "half"])
def test_mask_apply_on_the_host(g, wl, wr, half):
    """AttentionMask.apply, the kernel's own code run by CuTe DSL's host JIT for every consumer
    thread of a tile (each thread's WGMMA accumulator fragment, scattered back to (row, col)),
    against a brute-force mask: sequence end, causal / local window edges, g rows per position.
    `half`: the accumulator of diag_half's QK^T over the block's first tile_n / 2 keys."""
    from cutlass import Float32, Int32
    from cutlass.cute.runtime import from_dlpack

    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90
    from cute_kernels.mask import AttentionMask, SeqlenInfo

    cute = cutlass.cute
    cfg = FwdConfig.make("bf16", 128, has_left=wl >= 0, has_right=wr >= 0, pack_gqa=g)
    kernel = FlashAttentionForwardSm90(cfg)
    tile_m, tile_n, threads = cfg.tile.tile_m, cfg.tile.tile_n, kernel.num_mma_threads

    @cutlass.cute.jit
    def masked(out: cutlass.cute.Tensor, sq: cutlass.Int32, sk: cutlass.Int32, wl: cutlass.Int32,
               wr: cutlass.Int32, m_block: cutlass.Int32, n_block: cutlass.Int32):
        tiled_mma = kernel._tiled_mma_qk(width)
        mask = AttentionMask(tile_m, tile_n, wl_on, wr_on, wl, wr, SeqlenInfo(Int32(0), Int32(0), sq, sk),
                             m_block, rows_per_pos=g)
        coords = cute.make_identity_tensor((tile_m, width))
        for t in cutlass.range(threads):
            thr = tiled_mma.get_slice(t)
            acc = cute.make_rmem_tensor(tiled_mma.partition_shape_C((tile_m, width)), Float32)
            acc.fill(1.0)
            mask.apply(acc, thr, n_block, True, True, True, tiled_mma.get_slice(0))
            rc = thr.partition_C(coords)
            for i in cutlass.range_constexpr(cute.size(acc)):
                out[rc[i]] = acc[i]

    wl_on, wr_on = wl >= 0, wr >= 0
    width = tile_n // 2 if half else tile_n
    rng = np.random.default_rng()
    for sq, sk in [(10, 100), (77, 300), (300, 77), (64, 165)] + [tuple(rng.integers(1, 700, 2)) for _ in range(2)]:
        rows = int(sq) * g
        m_block = int(rng.integers(0, -(-rows // tile_m)))
        n_block = int(rng.integers(0, -(-int(sk) // tile_n)))
        out = torch.zeros(tile_m, width)
        masked(from_dlpack(out), Int32(rows), Int32(int(sk)), Int32(wl), Int32(wr), Int32(m_block), Int32(n_block))
        pos = (m_block * tile_m + torch.arange(tile_m))[:, None] // g
        col = (n_block * tile_n + torch.arange(width))[None, :]
        keep = (col < sk).expand(tile_m, width)
        if wr >= 0:
            keep = keep & (col <= pos + sk - sq + wr)
        if wl >= 0:
            keep = keep & (col >= pos + sk - sq - wl)
        assert torch.equal(out == 1.0, keep), (sq, sk, m_block, n_block)
        assert torch.equal(out[~keep], torch.full_like(out[~keep], -math.inf))


@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (37, 11), (200, -1), (0, 0)])
def test_mask_block_ranges_on_the_host(g, wl, wr):
    """The KV blocks a tile visits and the ones it masks, against brute force over its rows, with
    g rows per query position (GQA packing; g = 1: none): every kept key's block is visited (all
    of them exactly, for a tile of real rows only); blocks below the right-masked bound hold no
    key right of any row's window, blocks from the left-masked bound none left of it."""
    tile_m, tile_n = 128, 64
    ranges = _block_ranges_fn(g, wl >= 0, wr >= 0, tile_m, tile_n)
    rng = np.random.default_rng()
    # (Window edges that land on a block boundary: Lk - Lq = 1 (mod 64) with the causal edge,
    # = 37 (mod 64) with the left window of 37, so an off-by-one bound drops or adds a block.)
    sizes = [(1, 1), (10, 1000), (77, 300), (300, 77), (129, 129), (256, 321), (512, 577), (100, 137),
             (300, 401), (64, 165)]
    for sq, sk in sizes + [tuple(rng.integers(1, 700, 2)) for _ in range(3)]:
        rows = int(sq) * g
        diag = int(sk) - int(sq)
        for m, (lo, hi, right_masked, left_masked, *keys_end) in enumerate(ranges(rows, int(sk), wl, wr)):
            for r, end in zip((tile_m // 2, tile_m), keys_end):
                # one past the last key any of the tile's first r rows keeps: the right window
                # edge of the furthest of them (brute force: the max over the rows), or sk
                p = np.arange(m * tile_m, m * tile_m + r) // g
                want = min(int(sk), (p + diag + wr + 1).max()) if wr >= 0 else int(sk)
                assert end == want, (sq, sk, m, r)
            pos = np.arange(m * tile_m, min((m + 1) * tile_m, rows)) // g
            first = np.maximum(pos + diag - wl, 0) if wl >= 0 else np.zeros_like(pos)
            last = np.minimum(pos + diag + wr, sk - 1) if wr >= 0 else np.full_like(pos, sk - 1)
            kept = first <= last
            if kept.any():
                blocks = np.concatenate([np.arange(a // tile_n, b // tile_n + 1) for a, b in zip(first[kept], last[kept])])
                assert lo <= blocks.min() and hi >= blocks.max() + 1, (sq, sk, m)
                if (m + 1) * tile_m <= rows and kept.all():
                    assert (lo, hi) == (blocks.min(), blocks.max() + 1), (sq, sk, m)
            if wr >= 0:  # no key right of a window below right_masked
                assert all((b + 1) * tile_n - 1 <= pos.min() + diag + wr for b in range(lo, min(right_masked, hi)))
            if wl >= 0:  # no key left of a window from left_masked on
                assert all(b * tile_n >= pos.max() + diag - wl for b in range(max(left_masked, lo), hi))


def test_split_block_range_on_the_host():
    """mask.split_block_range, run by CuTe DSL's host JIT: the splits of [lo, hi) are consecutive,
    in split order, cover it exactly, differ in length by at most ... one run (all but the last
    non-empty ones have ceil(blocks / splits) blocks), and splits past the blocks are empty."""
    from cutlass import Int32
    from cutlass.cute.runtime import from_dlpack

    from cute_kernels.mask import split_block_range

    @cutlass.cute.jit
    def ranges(out: cutlass.cute.Tensor, lo: cutlass.Int32, hi: cutlass.Int32):
        for s in cutlass.range(out.shape[0]):
            a, b = split_block_range(lo, hi, s, out.shape[0])
            out[s, 0] = a
            out[s, 1] = b

    for lo, hi, splits in [(0, 1, 1), (0, 64, 32), (3, 17, 4), (5, 5, 3), (0, 7, 7), (2, 9, 10), (0, 100, 64)]:
        out = torch.zeros(splits, 2, dtype=torch.int32)
        ranges(from_dlpack(out), Int32(lo), Int32(hi))
        per = -(-(hi - lo) // splits)
        covered = []
        for s, (a, b) in enumerate(out.tolist()):
            assert a == lo + s * per and b == min(hi, a + per), (lo, hi, splits, s)
            covered += list(range(a, b))
        assert covered == list(range(lo, hi)), (lo, hi, splits)


@pytest.mark.parametrize("packed_q", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("splits,dv", [(1, 64), (3, 96), (40, 128), (5, 256)])
def test_combine_splits_triton(packed_q, splits, dv):
    """cute_kernels.combine's Triton kernel (the CUDA path, here under Triton's interpreter)
    against its torch ops and against a float64 recomputation: random split
    LSEs with -inf ones (empty splits), a row no split saw (0 / -inf) and a row with a NaN LSE
    (NaN), written into strided views of the outputs."""
    from cute_kernels.combine import combine_splits_torch, combine_splits_triton

    b, rows, h = (1, 37, 3) if packed_q else (2, 5, 3)
    lead = (splits * rows,) if packed_q else (splits * b, rows)
    o_part = torch.randn(*lead, h, dv)
    lse_part = torch.randn(h, splits * rows) * 3 if packed_q else torch.randn(splits * b, h, rows) * 3
    lse_part[lse_part < -4] = -math.inf  # some empty splits
    lse_s = lse_part.view(h, splits, rows).transpose(0, 1) if packed_q else lse_part.view(splits, b, h, rows)
    lse_s[..., 0, 1] = -math.inf  # (head 0, row 1) seen by no split  [views of lse_part]
    lse_s[0, ..., 2, 3] = math.nan  # (head 2, row 3): a NaN score in split 0
    out_shape = (rows, h, dv) if packed_q else (b, rows, h, dv)
    lse_shape = (h, rows) if packed_q else (b, h, rows)
    results = []
    for combine in (combine_splits_torch, combine_splits_triton):
        out = torch.full((*out_shape[:-1], dv + 8), 7.0)[..., :dv]  # strided: rows of dv + 8
        lse = torch.full(lse_shape[::-1], 7.0).permute(*reversed(range(len(lse_shape))))  # transposed
        combine(o_part, lse_part, splits, packed_q, out, lse)
        results.append((out, lse))
    # float64 reference, (split, ..., head, row) -> (..., row, head)
    ls = lse_s.double()
    total = torch.logsumexp(ls, 0)
    w = torch.exp(ls - total.masked_fill(total == -math.inf, 0.0))
    o = o_part.double().view(splits, *out_shape)
    ref_out = (o * w.transpose(-1, -2).unsqueeze(-1)).sum(0)
    for out, lse in results:
        torch.testing.assert_close(lse.double(), total, equal_nan=True, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.double(), ref_out, equal_nan=True, rtol=1e-5, atol=1e-5)
        assert (out[..., 1, 0, :] == 0).all() if packed_q else (out[:, 1, 0, :] == 0).all()
        assert out[..., 3, 2, :].isnan().all() if packed_q else out[:, 3, 2, :].isnan().all()


def test_num_splits_choice(monkeypatch):
    """Split-KV only for grids under 80% of a wave with >= SPLIT_MIN_BLOCKS KV blocks; the count minimizes
    waves * (blocks per split + overhead) over 1 .. blocks / 2 (brute force), the smallest within
    5%; config_for takes the split_kv config then, and FA3PY_CUTE_NUM_SPLITS overrides."""
    from cute_kernels.config import SPLIT_MIN_BLOCKS, SPLIT_TILE_OVERHEAD_BLOCKS, num_splits_for

    assert num_splits_for(106, 64, 132) == 1 and num_splits_for(0, 64, 132) == 1
    assert num_splits_for(4, SPLIT_MIN_BLOCKS - 1, 132) == 1 < num_splits_for(4, SPLIT_MIN_BLOCKS, 132)
    for tiles, blocks in [(1, 64), (4, 64), (48, 64), (100, 64), (16, 256), (4, SPLIT_MIN_BLOCKS)]:
        s = num_splits_for(tiles, blocks, 132)
        cost = lambda n: -(-tiles * n // 132) * (-(-blocks // n) + SPLIT_TILE_OVERHEAD_BLOCKS)
        best = min(cost(n) for n in range(1, blocks // 2 + 1))
        assert 1 <= s <= blocks // 2 and cost(s) <= 1.05 * best
        assert all(cost(n) > 1.05 * best for n in range(1, s))
    k = torch.randn(1, 8192, 4, 128, dtype=torch.bfloat16)
    decode = _req(torch.randn(1, 1, 32, 128, dtype=torch.bfloat16), k, k)
    cfg = cute_kernels.config_for(decode)  # 4 (batch, KV head) tiles, 64 blocks
    assert cfg.split_kv and cfg.pack_gqa == 8 and cute_kernels.num_splits(decode, cfg) == 32
    long = torch.randn(2, 4096, 16, 128, dtype=torch.bfloat16)
    assert not cute_kernels.config_for(_req(long, long, long)).split_kv
    # FA3's num_splits: 1 never splits, N splits N times (flash_attn_func's default is 1, as in FA3).
    assert not cute_kernels.config_for(_req(decode.q, k, k, num_splits=1)).split_kv
    five = _req(decode.q, k, k, num_splits=5)
    assert cute_kernels.num_splits(five, cute_kernels.config_for(five)) == 5
    many = _req(decode.q, k, k, num_splits=1000)  # capped at the 64 KV blocks a tile has
    assert cute_kernels.num_splits(many, cute_kernels.config_for(many)) == 64
    monkeypatch.setattr(launch, "split_kv_setting", "1")
    assert not cute_kernels.config_for(decode).split_kv and not cute_kernels.config_for(five).split_kv
    monkeypatch.setattr(launch, "split_kv_setting", "3")
    assert cute_kernels.config_for(decode).split_kv and cute_kernels.num_splits(decode, cfg) == 3


def _emulated_launch(req, cfg, q, k, v, out, lse, num_splits=1):
    """What `cute_kernels.launch.launch_kernel` asks of the kernel, in float32 torch ops on the CPU, from the
    arguments it gives the kernel (`sequence_args`): q's rows (per KV head) are query positions
    row // pack_gqa, masks are bottom-right aligned over positions; out and lse are written
    where the kernel writes them (padded rows left as initialized). Split-KV: split s attends to
    its run of the sequence's KV blocks (the kernel splits each m_block's own range:
    test_split_block_range_on_the_host) and writes its normalized O and LSE at batch
    s * batch + b, or rows from s * total_q + offset."""
    g, p = cfg.pack_gqa, req.params
    max_rows, (cu_q, cu_k, used_q, used_k) = launch.sequence_args(req, q, g)  # the kernel's view
    n = len(cu_q) - 1 if cu_q is not None else q.shape[0]
    for b in range(n):
        q0 = int(cu_q[b]) if cu_q is not None else 0
        k0 = int(cu_k[b]) if cu_k is not None else 0
        sq = (int(cu_q[b + 1]) - q0) if cu_q is not None else q.shape[1]
        sk = (int(cu_k[b + 1]) - k0) if cu_k is not None else k.shape[1]
        sq = int(used_q[b]) if used_q is not None else sq
        sk = int(used_k[b]) if used_k is not None else sk
        assert sq <= max_rows
        qb = (q[q0:q0 + sq] if req.packed_q else q[b, :sq]).float()
        kb, vb = ((x[k0:k0 + sk] if req.packed_k else x[b, :sk]).float() for x in (k, v))
        s = torch.einsum("rhd,khd->hrk", qb, kb) * p.softmax_scale
        if p.softcap > 0:
            s = p.softcap * torch.tanh(s / p.softcap)
        pos = torch.arange(sq)[:, None] // g
        col = torch.arange(sk)[None, :]
        keep = torch.ones(sq, sk, dtype=torch.bool)
        if p.window_right >= 0:
            keep &= col <= pos + sk - sq // g + p.window_right
        if p.window_left >= 0:
            keep &= col >= pos + sk - sq // g - p.window_left
        s = s.masked_fill(~keep, -math.inf)
        tile_n = cfg.tile.tile_n
        per_split = -(-(-(-sk // tile_n)) // num_splits) * tile_n  # keys per split
        for split in range(num_splits):
            in_split = (col >= split * per_split) & (col < (split + 1) * per_split)
            s_split = s.masked_fill(~in_split, -math.inf) if cfg.split_kv else s
            row_lse = torch.logsumexp(s_split, -1)  # (heads, rows)
            o = torch.einsum("hrk,khd->rhd", torch.exp(s_split - row_lse[..., None]).nan_to_num(0.0), vb)
            if cu_q is not None:
                r0 = q0 + split * (out.shape[0] // num_splits)
                out[r0:r0 + sq], lse[:, r0:r0 + sq] = o.to(out.dtype), row_lse
            else:
                bo = b + split * (out.shape[0] // num_splits)
                out[bo, :sq], lse[bo, :, :sq] = o.to(out.dtype), row_lse
    return out, lse


@pytest.mark.parametrize("splits", ["1", "3", "8"], ids=["whole", "split_kv3", "split_kv8"])
@pytest.mark.parametrize("layout", ["batched", "decode", "varlen", "seqused"])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (5, 2)])
@pytest.mark.parametrize("h,hk", [(8, 2), (6, 1)])
def test_pack_gqa_host_side(layout, wl, wr, h, hk, splits, monkeypatch):
    """cute_kernels.run's packing of Q and unpacking of out / LSE, with the kernel emulated on the
    CPU (`_emulated_launch`): the answer against the reference, for batched, packed (varlen)
    and seqused queries, GQA and MQA (packing by view), causal and local masks. With one query
    (decode) the kernel writes into views of the returned out and LSE. Split-KV (forced 3 or 8
    splits): float32 partials combined by combine_splits; with 8 splits of up to 6 KV blocks of
    128 some splits are empty, and short sequences leave most of them empty."""
    from tests._util import check_forward, packed

    given = []

    def emulated(req, cfg, q, k, v, out, lse, num_splits=1):
        given.append((out, lse))
        return _emulated_launch(req, cfg, q, k, v, out, lse, num_splits)

    monkeypatch.setattr(launch, "launch_kernel", emulated)
    monkeypatch.setattr(launch, "split_kv_setting", splits)
    if layout in ("batched", "decode"):
        sq = 1 if layout == "decode" else 7
        q, k, v = (torch.randn(2, s, n, 64, dtype=torch.bfloat16) for s, n in ((sq, h), (700, hk), (700, hk)))
        kw = {}
    else:
        q, cu_q = packed([3, 1, 0, 9], h, 64, torch.bfloat16, "cpu")
        k, cu_k = packed([50, 4, 7, 620], hk, 64, torch.bfloat16, "cpu")
        v = torch.randn_like(k)
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=9, max_seqlen_k=620)
        if layout == "seqused":
            kw.update(seqused_q=torch.tensor([2, 1, 0, 9], dtype=torch.int32),
                      seqused_k=torch.tensor([50, 0, 7, 500], dtype=torch.int32))
    req = _req(q, k, v, window_left=wl, window_right=wr, **kw)
    cfg = cute_kernels.config_for(req)
    assert cfg.pack_gqa == h // hk
    out, lse = cute_kernels.run(req, cfg)
    assert out.shape == req.out_shape and lse.shape == req.lse_shape
    (k_out, k_lse), = given
    in_place = (k_out._base is out and k_lse._base is lse)
    assert in_place == (layout == "decode" and splits == "1")
    assert cfg.split_kv == (splits != "1") and (k_out.dtype == torch.float32) == cfg.split_kv
    check_forward(req, out, lse)


def test_pack_gqa_choice(monkeypatch):
    """Packing where it fills the M tile better (few query positions, more than one query head
    per KV head), not for long queries nor MHA; the packed rows decide the short tiles."""
    from cute_kernels.config import pack_gqa_factor

    assert [pack_gqa_factor(8, s, 128) for s in (1, 16, 100, 200, 1000, 4096)] == [8, 8, 8, 8, 1, 1]
    assert pack_gqa_factor(1, 1, 128) == 1 and pack_gqa_factor(3, 128, 128) == 1
    def decode(sq, h, hk, d=128, **kw):
        k = torch.randn(2, 900, hk, d, dtype=torch.bfloat16)
        return cute_kernels.config_for(_req(torch.randn(2, sq, h, d, dtype=torch.bfloat16), k, k, **kw))

    assert decode(1, 32, 8).pack_gqa == 4 and decode(1, 8, 1).pack_gqa == 8 and decode(1, 8, 8).pack_gqa == 1
    assert decode(4096, 32, 8).pack_gqa == 1
    # Causal hdim64: 100 positions x 8 heads = 800 rows take the short tile, 200 x 8 the table's.
    assert [decode(sq, 8, 1, 64, window_right=0).tile.tile_m for sq in (100, 200)] == [128, 192]
    monkeypatch.setattr(launch, "pack_gqa_enabled", False)  # FA3PY_CUTE_PACK_GQA=0
    assert decode(1, 32, 8).pack_gqa == 1


@pytest.mark.parametrize("persistent,lpt", [(True, True), (True, False)])
def test_tile_order_on_the_host(persistent, lpt):
    """TileScheduler.coords, run by CuTe DSL's host JIT over every tile index: a bijection onto the
    (m_block, head, batch) tiles; with `lpt`, sections of l2_heads (batch, head) pairs, then one of
    the last tail_heads pairs, each in m_block-descending order (longest first)."""
    from cutlass.cute.runtime import from_dlpack

    from cute_kernels.scheduler import TileScheduler

    @cutlass.cute.jit
    def order(out: cutlass.cute.Tensor, m_blocks: cutlass.Int32, heads: cutlass.Int32, batch: cutlass.Int32,
              l2_heads: cutlass.Int32, tail_heads: cutlass.Int32):
        sched = TileScheduler(m_blocks, heads, batch, persistent, lpt, l2_heads, tail_heads)
        for t in cutlass.range(out.shape[0]):
            m, h, b = sched.coords(t)
            out[t, 0] = m
            out[t, 1] = h
            out[t, 2] = b

    rng = np.random.default_rng()
    for m_blocks, heads, batch, l2, tail in [(5, 4, 3, 1, 0), (9, 8, 3, 5, 7), (1, 16, 2, 3, 40), (16, 3, 1, 1, 2)] + [
            tuple(int(x) for x in rng.integers(1, 12, 5)) for _ in range(4)]:
        out = torch.zeros(m_blocks * heads * batch, 3, dtype=torch.int32)
        order(from_dlpack(out), *(cutlass.Int32(x) for x in (m_blocks, heads, batch, l2, tail)))
        tiles = [tuple(r) for r in out.tolist()]
        assert sorted(tiles) == sorted(itertools.product(range(m_blocks), range(heads), range(batch)))
        if not lpt:
            assert tiles[:m_blocks] == [(m, 0, 0) for m in range(m_blocks)]  # m_block fastest
            continue
        pairs = heads * batch
        tail = min(tail, pairs)
        bounds = [(s * l2, min((s + 1) * l2, pairs - tail)) for s in range(-(-(pairs - tail) // l2))]
        start = 0
        for lo, hi in bounds + ([(pairs - tail, pairs)] if tail else []):
            section = tiles[start:start + (hi - lo) * m_blocks]
            start += len(section)
            assert {h + heads * b for _, h, b in section} == set(range(lo, hi))
            ms = [m for m, _, _ in section]
            assert ms == sorted(ms, reverse=True)  # longest first within the section


def test_bench_variants():
    """The variants `bench` and `cycles` time: the table config, tile specs that change it, toggles."""
    from cute_kernels.bench import variants

    base = FwdConfig.make("bf16", 128)
    named = variants(base, ["128x128", "128x176s2"], ["tma_store", "k_release_gate=7", "tma_store+pin_desc=0"])
    assert [n for n, _ in named] == ["table 128x128s2", "128x176s2", "tma_store=False", "k_release_gate=7",
                                     "tma_store=False+pin_desc=False"]
    assert not named[4][1].tile.tma_store and not named[4][1].tile.pin_desc
    assert named[1][1].tile.tile_n == 176 and not named[2][1].tile.tma_store and named[0][1] is base
    assert named[3][1].tile.k_release_gate == 7 and named[3][1].tile.tma_store == base.tile.tma_store


def test_short_tile():
    """Few KV blocks per tile: causal with <= SHORT_CAUSAL_SEQLEN query rows, or non-causal with
    <= SHORT_SEQLEN_K keys. Causal hdim64 takes the 2-WG tile there, longer problems the table
    tile; causal goes by the query length, non-causal by the key length."""
    from cute_kernels.config import MEDIUM_SEQLEN_K, SHORT_CAUSAL_SEQLEN, SHORT_SEQLEN_K

    def config(sq, wr, d=64, sk=None):
        q = torch.randn(1, sq, 2, d, dtype=torch.bfloat16)
        k = torch.randn(1, sk or sq, 2, d, dtype=torch.bfloat16)
        return cute_kernels.config_for(_req(q, k, k, window_right=wr)).tile

    def tile(*args, **kw):
        t = config(*args, **kw)
        return t.tile_m, t.tile_n

    d = 64
    short, table = (128, 128), (192, 128)
    assert tile(SHORT_CAUSAL_SEQLEN, 0, d) == short and tile(SHORT_CAUSAL_SEQLEN + 1, 0, d) == table
    assert tile(SHORT_CAUSAL_SEQLEN, 0, d, sk=4096) == short
    assert tile(SHORT_SEQLEN_K, -1, d) == tile(SHORT_SEQLEN_K + 1, -1, d) == table
    assert tile(4096, -1, d, sk=SHORT_SEQLEN_K) == tile(256, -1, d, sk=1024) == table
    assert tile(256, 0, 128) == tile(256, -1, 128) == (128, 128)
    # hdim96: the 2-WG tile when short, causal or not; the table's 3-WG tile otherwise.
    assert tile(256, 0, 96) == tile(SHORT_SEQLEN_K, -1, 96) == (128, 128)
    assert tile(SHORT_CAUSAL_SEQLEN + 1, 0, 96) == tile(SHORT_SEQLEN_K + 1, -1, 96) == (192, 112)
    # hdim256: one tile, short or not, with O staged in two chunks and lazy rescaling.
    for sq, wr in ((512, 0), (4096, 0), (512, -1), (4096, -1)):
        t = config(sq, wr, 256)
        assert (t.tile_m, t.tile_n, t.o_chunks, t.lazy_rescale) == (128, 64, 2, 8.0)
    # Lazy rescaling otherwise only at hdim 64, windowed.
    assert [config(2048, wr, d).lazy_rescale for wr in (-1, 0) for d in (64, 128)] == [0, 0, 8.0, 0]
    # Two Q buffers for short problems up to hdim 128 (hdim 256 has no smem for them), causal
    # ones at hdim 64 only; non-causal hdim64 up to MEDIUM_SEQLEN_K keys.
    assert [config(512, wr, d).q_stages for wr in (-1, 0) for d in (64, 128, 256)] == [2, 2, 1, 2, 1, 1]
    assert config(4096, -1, 128).q_stages == config(2048, 0, 64).q_stages == 1
    assert config(256, -1, 64, sk=MEDIUM_SEQLEN_K).q_stages == 2
    assert config(MEDIUM_SEQLEN_K + 1, -1, 64).q_stages == config(1024, -1, 128).q_stages == 1
    # Short causal hdim64 / 96: the plain schedule (no intra-WG overlap) with diag_half and
    # chain_pv_qk; O by TMA store at hdim 64 only.
    assert [(config(512, wr, d).intra_wg_overlap, config(512, wr, d).tma_store) for wr, d in
            ((0, 64), (0, 96), (0, 128), (-1, 64), (0, 256))] == \
        [(False, True), (False, False), (True, False), (True, True), (True, False)]
    assert [(config(sq, wr, d).diag_half, config(sq, wr, d).chain_pv_qk) for sq, wr, d in
            ((512, 0, 64), (1024, 0, 96), (2048, 0, 64), (512, -1, 64), (512, 0, 128))] == \
        [(True, True)] * 2 + [(False, False)] * 3
    assert config(2048, 0, 64).intra_wg_overlap


def test_tile_config_budget():
    with pytest.raises(AssertionError, match="registers"):
        TileConfig(192, 128, 2, 24, 240)
    t = tile_variant(TileConfig(128, 128, 2, 24, 240), 192, 128)
    assert (t.num_mma_wg, t.num_threads, t.producer_regs, t.consumer_regs) == (3, 512, 24, 160)
    assert all(c.num_mma_wg == 3 for cs in CANDIDATES.values() for c in cs)
    # diag_half needs tile_n / 2 in whole 16-key k-blocks: another shape keeps it only then.
    plain = FwdConfig.make("bf16", 64, has_right=True, short=True).tile
    assert plain.diag_half and tile_variant(plain, 128, 64).diag_half
    assert not tile_variant(plain, 128, 176).diag_half and tile_variant(plain, 128, 176).chain_pv_qk
    with pytest.raises(AssertionError, match="diag_half needs"):  # shapes set directly are checked
        dataclasses.replace(plain, tile_n=176)
    with pytest.raises(AssertionError, match="chain_pv_qk needs the plain schedule"):
        dataclasses.replace(plain, diag_half=False, intra_wg_overlap=True)


def test_compile_tvm_ffi():
    """The TVM-FFI calling path: one compile against symbolic shapes, torch's stream from env."""
    pytest.importorskip("tvm_ffi")
    import cutlass.cute as cute

    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    cfg = FwdConfig.make("fp16", 128, has_right=True, cu_seqlens_q=True, cu_seqlens_k=True)
    fn = cute.compile(FlashAttentionForwardSm90(cfg), *FlashAttentionForwardSm90.fake_args(cfg, env_stream=True),
                      options="--enable-tvm-ffi --gpu-arch=sm_90a")
    assert callable(fn)


def test_sass_cli(capsys):
    assert sass.main(["--hdim", "64", "--causal"]) == 0
    out = capsys.readouterr().out
    assert "HGMMA" in out and "required: ok" in out


# ----------------------------------------------------------------------------- contract
def _req(q, k, v, **kw):
    params = {n: kw.pop(n) for n in list(kw) if n in AttentionParams.__dataclass_fields__}
    params.setdefault("softmax_scale", q.shape[-1] ** -0.5)
    return AttentionRequest(q, k, v, AttentionParams(**params), **kw)


def test_tile_counters_are_bounded(monkeypatch):
    """One counter buffer per (device, stream), the least recently used forgotten past the cap."""
    from types import SimpleNamespace

    stream = SimpleNamespace(cuda_stream=0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    counters = launch.TileCounters(stream_handle=lambda dev: stream.cuda_stream)
    cpu = torch.device("cpu")
    first = counters(cpu)
    assert counters(cpu) is first and first.tolist() == [0, 0]
    for handle in range(1, counters.max_streams + 1):
        stream.cuda_stream = handle
        counters(cpu)
        if handle == 5:  # stream 0 used again: it becomes the most recent
            stream.cuda_stream = 0
            assert counters(cpu) is first
    assert len(counters.buffers) == counters.max_streams == launch.tile_counters.max_streams
    assert (None, 0) in counters.buffers and (None, 1) not in counters.buffers


def test_why_not_reasons():
    x = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)
    assert cute_kernels.why_not(_req(x, x, x), backward=True)
    assert "FP8" in cute_kernels.why_not(_req(x, x, x, fp8=True), backward=False)
    y = torch.randn(1, 8, 2, 84, dtype=torch.bfloat16)  # (80 rounds up to 96; 84 is no multiple of 8)
    assert "headdim" in cute_kernels.why_not(_req(y, y, y), backward=False)
    z = torch.randn(1, 8, 2, 128, dtype=torch.float32)
    assert "dtype" in cute_kernels.why_not(_req(z, z, z), backward=False)
    f8 = x.to(torch.float8_e4m3fn)
    assert cute_kernels.why_not(_req(f8, f8, f8), backward=False)
    for scale in (-0.1, 0.0):  # (0: a masked -inf score times the scale would be NaN)
        assert "softmax_scale" in cute_kernels.why_not(_req(x, x, x, softmax_scale=scale), backward=False)
    for params in (dict(softmax_scale=-0.1, softcap=2.0), dict(softmax_scale=0.0, softcap=2.0),
                   dict(softmax_scale=1e-6)):  # served (on CUDA)
        assert cute_kernels.why_not(_req(x, x, x, **params), backward=False) == "cute_kernels: CUDA tensors only"


def test_config_for_request():
    x = torch.randn(2, 8, 2, 192, dtype=torch.float16)
    v = torch.randn(2, 8, 2, 128, dtype=torch.float16)
    cfg = cute_kernels.config_for(_req(x, x, v, window_right=0, softcap=5.0))
    assert (cfg.dtype, cfg.hdim, cfg.hdimv, cfg.causal, cfg.softcap) == ("fp16", 192, 128, True, True)


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu
SIZES = [(1, 1), (113, 203), (239, 1), (799, 3), (1023, 1024), (128, 384)]


def _check(req, cfg=None):
    from tests._util import check_forward

    assert cute_kernels.why_not(req, backward=False) is None
    out, lse = cute_kernels.run(req, cfg or cute_kernels.config_for(req))
    torch.cuda.synchronize()
    check_forward(req, out, lse)


def _qkv(b, sq, sk, h, hk, d, dv, dtype):
    mk = lambda s, n, e: torch.randn(b, s, n, e, device="cuda", dtype=dtype)
    return mk(sq, h, d), mk(sk, hk, d), mk(sk, hk, dv)


def _packed_qkv(lq, lk, h, hk, d, dtype):
    """Packed (varlen) q, k, v of sequence lengths lq / lk and the request fields that go with them."""
    from tests._util import packed

    q, cu_q = packed(lq, h, d, dtype, "cuda")
    k, cu_k = packed(lk, hk, d, dtype, "cuda")
    v, _ = packed(lk, hk, d, dtype, "cuda")
    return q, k, v, dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk))


@gpu
@pytest.mark.parametrize("gate", [1, 4, 32])
@pytest.mark.parametrize("sq,sk,wl,wr", [(1023, 1024, -1, -1), (300, 700, -1, 0), (113, 203, 37, 11)])
def test_gpu_k_release_gate(gate, sq, sk, wl, wr):
    """The K release gated on one probability (first, 4th, last column of row 0 at tile_n 128)."""
    q, k, v = _qkv(2, sq, sk, 4, 2, 128, 128, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    cfg = cute_kernels.config_for(req)
    _check(req, dataclasses.replace(cfg, tile=dataclasses.replace(cfg.tile, k_release_gate=gate)))


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_nan_propagates(causal):
    from tests._util import check_nan_rows, nan_inputs

    req = nan_inputs(*_qkv(2, 300, 700, 4, 2, 128, 128, torch.bfloat16), causal)
    check_nan_rows(req, *cute_kernels.run(req, cute_kernels.config_for(req)))


@gpu
@pytest.mark.parametrize("sq,sk", SIZES)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_basic(sq, sk, causal):
    q, k, v = _qkv(2, sq, sk, 4, 4, 128, 128, torch.bfloat16)
    _check(_req(q, k, v, window_right=0 if causal else -1))


@gpu
@pytest.mark.parametrize("sq,sk", [(113, 203), (799, 3), (1023, 1024)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_gqa_fp16_hdim64(sq, sk, causal):
    q, k, v = _qkv(2, sq, sk, 6, 2, 64, 64, torch.float16)
    _check(_req(q, k, v, window_right=0 if causal else -1))


@gpu
@pytest.mark.parametrize("sq,sk", [(113, 203), (239, 1), (1023, 1024), (300, 129)])
@pytest.mark.parametrize("wl,wr", [(37, 11), (0, 0), (200, -1), (-1, 64)])
def test_gpu_local(sq, sk, wl, wr):
    q, k, v = _qkv(2, sq, sk, 4, 2, 128, 128, torch.bfloat16)
    _check(_req(q, k, v, window_left=wl, window_right=wr))


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_softcap(causal):
    q, k, v = _qkv(2, 239, 517, 4, 4, 128, 128, torch.bfloat16)
    _check(_req(q * 3, k, v, softcap=7.5, window_right=0 if causal else -1))


@gpu
@pytest.mark.parametrize("hdim,hdimv", [(64, 64), (96, 96), (192, 192), (192, 128), (256, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_headdims(hdim, hdimv, causal):
    q, k, v = _qkv(2, 333, 517, 4, 2, hdim, hdimv, torch.bfloat16)
    _check(_req(q, k, v, window_right=0 if causal else -1))


def _with_tile(req, **tile):
    cfg = cute_kernels.config_for(req)
    return dataclasses.replace(cfg, tile=dataclasses.replace(cfg.tile, **tile))


@gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_gpu_schedules(overlap):
    q, k, v = _qkv(2, 300, 700, 4, 4, 128, 128, torch.bfloat16)
    req = _req(q, k, v, window_right=0)
    _check(req, _with_tile(req, intra_wg_overlap=overlap))


@gpu
@pytest.mark.parametrize("hdim,hdimv", [(128, 128), (192, 128), (192, 192), (256, 256)])
@pytest.mark.parametrize("sq,sk,wl,wr", [(300, 700, -1, 0), (799, 1023, -1, -1), (113, 203, 37, 11)])
def test_gpu_rescale_o_before_pv(hdim, hdimv, sq, sk, wl, wr):
    q, k, v = _qkv(2, sq, sk, 4, 2, hdim, hdimv, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    _check(req, _with_tile(req, rescale_o_before_pv=True))


# Tile shapes swept by `python -m cute_kernels.bench --tiles ...` (CPU-checked: no spills,
# smem fits); checked here so a winner can enter the config table already verified.
TILE_VARIANTS = [(64, 128, 128, 2), (64, 128, 176, 2), (64, 128, 192, 2), (64, 128, 128, 3),
                 (128, 128, 176, 2), (256, 128, 64, 2)]


@gpu
@pytest.mark.parametrize("hdim,tile_m,tile_n,stages", TILE_VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_tile_variants(hdim, tile_m, tile_n, stages, causal):
    q, k, v = _qkv(2, 799, 1023, 4, 2, hdim, hdim, torch.bfloat16)
    req = _req(q, k, v, window_right=0 if causal else -1)
    cfg = cute_kernels.config_for(req)
    _check(req, dataclasses.replace(cfg, tile=tile_variant(cfg.tile, tile_m, tile_n, stages)))


# 3 consumer warpgroups (tile_m 192): the hdim64 table tile and the hdim96 candidate.
THREE_WG = {64: TILES[64], 96: CANDIDATES[96][0]}
assert all(t.num_mma_wg == 3 for t in THREE_WG.values())


def _with_three_wg(req, hdim, **fields):
    cfg = cute_kernels.config_for(req)
    tile = THREE_WG[hdim]
    return dataclasses.replace(cfg, tile=dataclasses.replace(tile, **{"persistent": cfg.tile.persistent, **fields}))


@gpu
@pytest.mark.parametrize("hdim", sorted(THREE_WG))
@pytest.mark.parametrize("sq,sk", [(1, 1), (113, 203), (239, 1), (799, 3), (1023, 1024), (300, 129)])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (37, 11), (200, -1)])
def test_gpu_three_wg(hdim, sq, sk, wl, wr):
    q, k, v = _qkv(2, sq, sk, 6, 2, hdim, hdim, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    _check(req, _with_three_wg(req, hdim))


@gpu
@pytest.mark.parametrize("fields", [dict(persistent=True), dict(intra_wg_overlap=False)], ids=str)
def test_gpu_three_wg_schedules(fields):
    # 3 * 8 * 6 = 144 tiles of 192 rows > 132 SMs: persistent CTAs run several tiles.
    q, k, v = _qkv(3, 1000, 777, 8, 2, 64, 64, torch.float16)
    req = _req(q, k, v, window_right=0)
    _check(req, _with_three_wg(req, 64, **fields))


@gpu
def test_gpu_three_wg_varlen_softcap():
    q, k, v, varlen = _packed_qkv([1, 113, 239, 799, 0, 64, 1500], [3, 203, 1, 1024, 5, 64, 1400], 6, 2, 64,
                                  torch.bfloat16)
    req = _req(q * 3, k, v, window_right=0, softcap=7.5, **varlen,
               seqused_k=torch.tensor([2, 150, 1, 1000, 5, 10, 1400], dtype=torch.int32, device="cuda"))
    _check(req, _with_three_wg(req, 64))


@gpu
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("hdim", [128, 192], ids=["separate_o", "o_in_q"])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (100, 30)])
def test_gpu_persistent(overlap, hdim, wl, wr):
    """Static persistent CTAs (not the dynamic scheduler, the causal/local default):
    3 * 8 * 8 = 192 tiles > #SMs, every CTA runs several tiles (and some rows are empty, so
    with a separate sO, hdim 128, some tiles release Q without reading it; hdim 192 stages O in
    sQ)."""
    q, k, v = _qkv(3, 1000, 777, 8, 2, hdim, hdim, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    _check(req, _with_tile(req, persistent=True, dynamic=False, intra_wg_overlap=overlap))


@gpu
@pytest.mark.parametrize("wl,wr", [(-1, 0), (100, 30)])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("batch,heads", [(3, 8), (12, 16)])  # 24 / 192 pairs: final section all / some
def test_gpu_lpt_order(wl, wr, dynamic, batch, heads):
    """The causal/local longest-first order visits every (m_block, batch, head) once, with a
    final section of all or some pairs (scheduler.TileScheduler.coords), as the single-tile
    grid and as the dynamic scheduler's tile numbering."""
    q, k, v = _qkv(batch, 1000, 1000, heads, 2, 64, 64, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    _check(req, _with_tile(req, dynamic=dynamic))


@gpu
@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (100, 30), (0, 0)])
@pytest.mark.parametrize("dynamic", [True, False])
def test_gpu_dynamic(hdim, wl, wr, dynamic):
    """Dynamic persistent scheduler (the causal/local default): 3 * 8 * 9 = 216 tiles of 128
    rows (144 of hdim 64's 192: 1100 rows is past SHORT_CAUSAL_SEQLEN) on fewer CTAs, taken from
    the atomic counter; some rows see no key (1100 queries, 777 keys). dynamic=False: the
    single-tile grid (static persistent if not windowed)."""
    q, k, v = _qkv(3, 1100, 777, 8, 2, hdim, hdim, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    cfg = _with_tile(req, dynamic=dynamic)
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    assert FlashAttentionForwardSm90(cfg).persistent == (dynamic or (wl, wr) == (-1, -1))
    _check(req, cfg)


@gpu
@pytest.mark.parametrize("hdim,q_stages", [(128, 1), (192, 1), (128, 2)])  # hdim 192: sO in sQ
def test_gpu_dynamic_varlen(hdim, q_stages):
    """Empty sequences and m_blocks past a sequence's end are skipped by the producer: the
    consumers only see the tiles it announces, then the end marker."""
    q, k, v, varlen = _packed_qkv([1, 113, 0, 799, 0, 64, 1500, 300], [3, 203, 7, 1024, 5, 0, 1400, 900],
                                  8, 2, hdim, torch.bfloat16)
    req = _req(q, k, v, window_right=0, **varlen)
    _check(req, _with_tile(req, dynamic=True, q_stages=q_stages))


@gpu
@pytest.mark.parametrize("hdim", [64, 128])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (100, 30)])
@pytest.mark.parametrize("dynamic", [True, False])
def test_gpu_q_stages(hdim, wl, wr, dynamic):
    """Two Q buffers (TileConfig.q_stages): the producer loads tile t+1's Q into the other
    buffer (and, dynamic, announces t+1 in that buffer's slot) while the consumers still read
    tile t's. Every CTA runs many tiles, so both buffers turn over many times; some rows see no
    key (1100 queries, 777 keys), and some tiles have no KV block (window)."""
    q, k, v = _qkv(3, 1100, 777, 8, 2, hdim, hdim, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    _check(req, _with_tile(req, q_stages=2, persistent=True, dynamic=dynamic))


@gpu
@pytest.mark.parametrize("hdim,tile", [(64, "128x128"), (64, "192x128"), (128, "128x128"), (96, "128x64")])
@pytest.mark.parametrize("sq,sk,h,hk,wl,wr", [
    (512, 512, 4, 2, -1, 0), (1023, 1024, 4, 4, -1, 0), (300, 700, 4, 2, -1, 0), (700, 300, 4, 2, -1, 0),
    (64, 517, 8, 2, -1, 0), (113, 203, 4, 2, 37, 11), (799, 3, 4, 4, -1, -1), (239, 64, 4, 2, -1, -1),
    (1000, 1000, 4, 2, -1, 40)])
def test_gpu_diag_half(hdim, tile, sq, sk, h, hk, wl, wr):
    """diag_half: a warpgroup whose rows keep none of the first block's second half (causal
    diagonal, a right window, a last block past seqlen_k) computes only its first half; the
    others the whole block. sq 64 with 4 query heads per KV head packs them (pack_gqa)."""
    q, k, v = _qkv(2, sq, sk, h, hk, hdim, hdim, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    cfg = cute_kernels.config_for(req)
    tile = tile_from_spec(cfg.tile, tile, ["intra_wg_overlap=0", "diag_half=1"])
    _check(req, dataclasses.replace(cfg, tile=tile))


@gpu
@pytest.mark.parametrize("hdim", [64, 128])
@pytest.mark.parametrize("sq,sk,h,hk,wl,wr", [
    (512, 512, 4, 2, -1, 0), (300, 700, 4, 2, -1, 0), (700, 300, 4, 2, -1, 0), (113, 203, 4, 2, 37, 11),
    (799, 3, 4, 4, -1, -1), (1000, 1000, 4, 2, -1, -1), (64, 517, 8, 2, -1, 0)])
def test_gpu_chain_pv_qk(hdim, sq, sk, h, hk, wl, wr):
    """chain_pv_qk: a block's V stage is released one block later (after the next QK^T), the
    last one after the loop; tiles of one block, many blocks, empty rows and windows."""
    q, k, v = _qkv(2, sq, sk, h, hk, hdim, hdim, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    _check(req, _with_tile(req, intra_wg_overlap=False, chain_pv_qk=True))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_diag_half_varlen(dtype):
    q, k, v, varlen = _packed_qkv([1, 113, 0, 799, 64, 1500, 300], [3, 203, 7, 1024, 0, 1400, 300],
                                  8, 2, 64, dtype)
    req = _req(q, k, v, window_right=0, **varlen)
    _check(req, _with_tile(req, intra_wg_overlap=False, diag_half=True))


@gpu
def test_gpu_tile_counter_reuse():
    """The dynamic scheduler's counters are zero again after every launch (its last CTA resets
    them), so back-to-back calls with different grids on one stream share one buffer, and a call
    on another stream gets its own."""
    big = _qkv(3, 1100, 777, 8, 2, 128, 128, torch.bfloat16)  # 216 tiles: more than the SMs
    small = _qkv(1, 300, 300, 2, 2, 128, 128, torch.bfloat16)  # 6 tiles: a 6-CTA grid
    stream = torch.cuda.current_stream()
    for q, k, v in (big, small, big, small):
        req = _req(q, k, v, window_right=0)
        assert cute_kernels.config_for(req).tile.dynamic
        _check(req)
        assert launch.tile_counters.buffers[(q.device.index, stream.cuda_stream)].tolist() == [0, 0]
    side = torch.cuda.Stream()
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        req = _req(*big, window_right=0)
        out, lse = cute_kernels.run(req, cute_kernels.config_for(req))
    side.synchronize()
    from tests._util import check_forward

    check_forward(req, out, lse)
    assert launch.tile_counters.buffers[(out.device.index, side.cuda_stream)].tolist() == [0, 0]


def _epilogue_req(layout, causal, hdim):
    """Row counts that end O's 16-row slabs mid-slab: batched (239 rows), packed sequences of
    ragged lengths (0 and 1 included), or seqused_q cutting batched rows short."""
    kw = {}
    if layout == "packed":
        q, k, v, kw = _packed_qkv([1, 113, 239, 799, 0, 64], [3, 203, 1, 1024, 5, 64], 4, 2, hdim,
                                  torch.bfloat16)
    else:
        q, k, v = _qkv(3, 239, 300, 4, 2, hdim, hdim, torch.bfloat16)
        if layout == "seqused_q":
            kw = dict(seqused_q=torch.tensor([239, 17, 0], dtype=torch.int32, device="cuda"),
                      max_seqlen_q=239)
    return _req(q, k, v, window_right=0 if causal else -1, **kw)


@gpu
@pytest.mark.parametrize("layout", ["batched", "packed", "seqused_q"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_epilogue_variants(layout, causal):
    """The O store the defaults do not use for this masking: predicated 16-byte stores from every
    warp for non-causal (tma_store=False), per-warp TMA stores for causal (tma_store=True, with
    the predicated fallback for slabs crossing a packed / seqused sequence end)."""
    req = _epilogue_req(layout, causal, 128)
    assert cute_kernels.config_for(req).tile.tma_store == (not causal)
    _check(req, _with_tile(req, tma_store=causal))


@gpu
@pytest.mark.parametrize("layout", ["batched", "packed", "seqused_q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tma_store", [False, True])
def test_gpu_o_chunks(layout, causal, tma_store):
    """O staged in two column chunks (TileConfig.o_chunks) at hdim 256, tile 128x64, where sO
    then has its own buffer: by TMA and by predicated stores, ragged sequence ends included."""
    req = _epilogue_req(layout, causal, 256)
    _check(req, _with_tile(req, tile_n=64, o_chunks=2, tma_store=tma_store))


@gpu
@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ramp", ["up", "down", "flat", "softcap"])
def test_gpu_lazy_rescale(hdim, causal, ramp):
    """Lazy rescaling (TileConfig.lazy_rescale): keys scaled by a ramp make the row max grow
    block after block in either processing order (the kernel walks KV blocks last first), so
    references move often ("down": large early keys, met last) or are kept ("up")."""
    q, k, v = _qkv(2, 700, 1500, 4, 2, hdim, hdim, torch.bfloat16)
    r = torch.linspace(0.2, 3.0, k.shape[1], device="cuda")
    if ramp in ("up", "down"):
        k = (k.float() * (r if ramp == "up" else r.flip(0))[None, :, None, None]).to(k.dtype)
    req = _req(q, k, v, window_right=0 if causal else -1, softcap=5.0 if ramp == "softcap" else 0.0)
    _check(req, _with_tile(req, lazy_rescale=8.0))


@gpu
@pytest.mark.parametrize("sq,sk", [(1, 1000), (7, 333), (64, 517), (200, 1024)])
@pytest.mark.parametrize("h,hk", [(8, 1), (8, 2), (12, 2)])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (37, 11)])
def test_gpu_pack_gqa(sq, sk, h, hk, wl, wr):
    """GQA packing (FwdConfig.pack_gqa, chosen by config_for for few query positions): MQA,
    GQA and a group of 6 (not a power of 2), with causal and local masks."""
    q, k, v = _qkv(2, sq, sk, h, hk, 128, 128, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    assert cute_kernels.config_for(req).pack_gqa == h // hk
    _check(req)


@gpu
@pytest.mark.parametrize("splits", ["2", "5", "40"])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (37, 11)])
@pytest.mark.parametrize("d,dv,h,hk,sq", [(128, 128, 8, 2, 1), (64, 64, 4, 4, 77), (256, 256, 6, 2, 3),
                                          (192, 128, 8, 1, 1), (96, 96, 2, 1, 300), (80, 80, 4, 2, 1)])
def test_gpu_split_kv(splits, wl, wr, d, dv, h, hk, sq, monkeypatch):
    """Split-KV forced to 2, 5 and 40 splits of 1000 keys (40: more splits than KV blocks, so
    some are empty), with and without GQA packing, causal / local windows, every head dim:
    float32 partials from the kernel combined on the host, against the reference."""
    monkeypatch.setattr(launch, "split_kv_setting", splits)
    q, k, v = _qkv(2, sq, 1000, h, hk, d, dv, torch.bfloat16)
    req = _req(q, k, v, window_left=wl, window_right=wr)
    assert cute_kernels.config_for(req).split_kv
    _check(req)


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqused", [False, True])
def test_gpu_split_kv_varlen(causal, seqused, monkeypatch):
    """Split-KV with packed (varlen) queries and keys, empty and one-token sequences, seqused."""
    monkeypatch.setattr(launch, "split_kv_setting", "4")
    q, k, v, kw = _packed_qkv([1, 5, 0, 77, 2], [3, 203, 5, 1024, 640], 8, 2, 128, torch.float16)
    if seqused:
        kw.update(seqused_q=torch.tensor([1, 3, 0, 70, 2], dtype=torch.int32, device="cuda"),
                  seqused_k=torch.tensor([3, 100, 0, 1000, 1], dtype=torch.int32, device="cuda"))
    req = _req(q, k, v, window_right=0 if causal else -1, **kw)
    assert cute_kernels.config_for(req).split_kv
    _check(req)


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_split_kv_auto_decode(causal):
    """The automatic choice: decoding one sequence (4 KV heads, 8192 keys) splits the keys."""
    q, k, v = _qkv(1, 1, 8192, 32, 4, 128, 128, torch.bfloat16)
    req = _req(q, k, v, window_right=0 if causal else -1)
    cfg = cute_kernels.config_for(req)
    assert cfg.split_kv and cute_kernels.num_splits(req, cfg) > 1
    _check(req)


@gpu
@pytest.mark.parametrize("d,dv", [(32, 32), (80, 80), (112, 112), (144, 128), (48, 40), (232, 232)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["batched", "varlen"])
def test_gpu_padded_headdims(d, dv, causal, layout):
    """Head dims the tiles do not have, rounded up inside the kernel: zeros past the head dim on
    load (TMA), stores that stop at it (the TMA store's clipping, or the predicated stores'
    column test with varlen), against the reference; the bytes right after each row of out
    (a wider buffer) must stay untouched."""
    if layout == "batched":
        q, k, v = _qkv(2, 333, 517, 4, 2, d, dv, torch.bfloat16)
        kw = {}
    else:
        q, k, v, kw = _packed_qkv([1, 113, 0, 300], [3, 203, 5, 517], 4, 4, d, torch.bfloat16)
        v = torch.randn(*v.shape[:-1], dv, device="cuda", dtype=torch.bfloat16)
    req = _req(q, k, v, window_right=0 if causal else -1, **kw)
    cfg = cute_kernels.config_for(req)
    assert cfg.hdim_in == (0 if d == cfg.hdim else d) and cfg.pack_gqa == 1  # (so launch_kernel takes q as is)
    _check(req)
    # out written through a view with padding after each row: the padding must stay untouched.
    wide = torch.full((*req.out_shape[:-1], dv + 24), 7.0, device="cuda", dtype=torch.bfloat16)
    out = wide[..., :dv]
    lse = torch.empty(req.lse_shape, device="cuda", dtype=torch.float32)
    if kw:  # padded rows are the caller's to initialize
        out.zero_()
        lse.fill_(-math.inf)
    launch.launch_kernel(req, cfg, q, k, v, out, lse)
    torch.cuda.synchronize()
    assert (wide[..., dv:] == 7.0).all()


@gpu
@pytest.mark.parametrize("d,dv", [(64, 64), (96, 96), (192, 128), (256, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_pack_gqa_decode_headdims(d, dv, causal):
    """Decoding (one query) with GQA packing at every head dim: the kernel writes out and LSE in
    place through strided views of the returned tensors (cute_kernels.run), through each head
    dim's epilogue (TMA store or vector stores)."""
    q, k, v = _qkv(3, 1, 777, 16, 4, d, dv, torch.bfloat16)
    req = _req(q, k, v, window_right=0 if causal else -1)
    assert cute_kernels.config_for(req).pack_gqa == 4
    _check(req)


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqused", [False, True])
def test_gpu_pack_gqa_varlen(causal, seqused):
    """GQA packing with packed (varlen) queries and keys, empty and one-token sequences, and
    seqused_q / seqused_k cutting sequences short."""
    q, k, v, kw = _packed_qkv([1, 5, 0, 77, 2], [3, 203, 5, 1024, 64], 8, 2, 64, torch.float16)
    if seqused:
        kw.update(seqused_q=torch.tensor([1, 3, 0, 70, 2], dtype=torch.int32, device="cuda"),
                  seqused_k=torch.tensor([3, 100, 0, 1000, 1], dtype=torch.int32, device="cuda"))
    req = _req(q, k, v, window_right=0 if causal else -1, **kw)
    assert cute_kernels.config_for(req).pack_gqa == 4
    _check(req)


@gpu
def test_gpu_persistent_varlen():
    q, k, v, varlen = _packed_qkv([1, 113, 239, 799, 0, 64, 1500], [3, 203, 1, 1024, 5, 64, 1400], 8, 4, 64,
                                  torch.float16)
    req = _req(q, k, v, window_right=0, **varlen)
    _check(req, _with_tile(req, persistent=True, dynamic=False))


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqused", [False, True])
def test_gpu_varlen(causal, seqused):
    q, k, v, kw = _packed_qkv([1, 113, 239, 799, 0, 64], [3, 203, 1, 1024, 5, 64], 4, 2, 128, torch.bfloat16)
    if seqused:
        kw["seqused_k"] = torch.tensor([2, 150, 1, 1000, 5, 10], dtype=torch.int32, device="cuda")
    _check(_req(q, k, v, window_right=0 if causal else -1, **kw))


@gpu
def test_gpu_batched_seqused_q():
    q, k, v = _qkv(3, 200, 300, 4, 4, 64, 64, torch.bfloat16)
    used_q = torch.tensor([200, 17, 0], dtype=torch.int32, device="cuda")
    used_k = torch.tensor([300, 129, 5], dtype=torch.int32, device="cuda")
    _check(_req(q, k, v, seqused_q=used_q, seqused_k=used_k, max_seqlen_q=200, max_seqlen_k=300))


@gpu
def test_gpu_strided_views():
    base = torch.randn(2, 300, 8, 3, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = base[:, :, :4, 0], base[:, :257, 4:6, 1], base[:, :257, 4:6, 2]
    _check(_req(q, k, v, window_right=0))


@gpu
def test_gpu_current_stream():
    """The kernel runs on torch's current stream: inputs written there after a long sleep must
    be seen (a launch on another stream would read them too early)."""
    q0, k, v = _qkv(2, 333, 517, 4, 4, 128, 128, torch.bfloat16)
    q = torch.zeros_like(q0)
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        q.copy_(q0)
        req = _req(q, k, v, window_right=0)
        out, lse = cute_kernels.forward(req)
    s.synchronize()
    from tests._util import check_forward

    check_forward(req, out, lse)


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_from_dlpack_path(monkeypatch, causal):
    """The fallback calling path (no TVM-FFI): from_dlpack conversions per call."""
    monkeypatch.setattr(launch, "use_tvm_ffi", False)
    q, k, v = _qkv(2, 239, 517, 4, 2, 128, 128, torch.bfloat16)
    _check(_req(q, k, v, window_right=0 if causal else -1))


@gpu
def test_gpu_compile_time_recorded():
    q, k, v = _qkv(1, 64, 64, 2, 2, 128, 128, torch.bfloat16)
    cute_kernels.forward(_req(q, k, v, window_left=5, window_right=3, softcap=3.0))
    assert launch.last_compile_seconds is not None and launch.last_compile_seconds > 0


def test_cycles_markdown():
    """`cycles --md`: the table config (any tile) as one fa3py column beside the peers, and its
    cycles over the best peer's; a point without peers gets no ratio."""
    from cute_kernels.cycles import markdown

    md = markdown([(128, False, 512, "table 128x128s2", 0.2), (128, False, 512, "fa4", 0.25),
                   (128, False, 512, "cudnn", 0.16), (64, False, 512, "table 192x128s2", 0.3),
                   (64, False, 512, "q_stages=1", 0.33), (128, True, 512, "table 128x128s2", 0.1)])
    assert "| hdim | seqlen | fa3py | fa4 | cudnn | q_stages=1 | fa3py / best peer |" in md
    assert "| 128 | 512 | 0.200 | 0.250 | 0.160 |  | 1.250 |" in md
    assert "| 64 | 512 | 0.300 |  |  | 0.330 |  |" in md and "## causal=True" in md


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
    q, k, v = _qkv(2, 300, 517, 4, 2, 128, 128, torch.bfloat16)
    req = _req(q, k, v, window_right=0 if causal else -1)
    monkeypatch.setattr(launch, "kernels", {})
    first = cute_kernels.run(req, cute_kernels.config_for(req))
    assert len(list((tmp_path / "cute").iterdir())) == 1
    monkeypatch.setattr(launch, "kernels", {})  # a new process: load, not compile
    monkeypatch.setattr(launch, "last_compile_seconds", None)
    _check(req)
    assert launch.last_compile_seconds is None
    torch.testing.assert_close(cute_kernels.run(req, cute_kernels.config_for(req)), first, rtol=0, atol=0)
