"""cute_kernels on an sm90 GPU (`-m gpu`): every feature on ragged sizes against the fp64
reference, tolerance per shared/STYLE.md (tests/_util.py)."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cute_kernels  # noqa: E402
from cute_kernels import launch  # noqa: E402
from cute_kernels.config import CANDIDATES, TILES, tile_from_spec, tile_variant  # noqa: E402
from tests._cute import check_run, gpu, make_req, packed_qkv, qkv  # noqa: E402

SIZES = [(1, 1), (113, 203), (239, 1), (799, 3), (1023, 1024), (128, 384)]


@gpu
@pytest.mark.parametrize("gate", [1, 4, 32])
@pytest.mark.parametrize("sq,sk,wl,wr", [(1023, 1024, -1, -1), (300, 700, -1, 0), (113, 203, 37, 11)])
def test_gpu_k_release_gate(gate, sq, sk, wl, wr):
    """The K release gated on one probability (first, 4th, last column of row 0 at tile_n 128)."""
    q, k, v = qkv(2, sq, sk, 4, 2, 128, 128, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    cfg = cute_kernels.config_for(req)
    check_run(req, dataclasses.replace(cfg, tile=dataclasses.replace(cfg.tile, k_release_gate=gate)))


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_nan_propagates(causal):
    from tests._util import check_nan_rows, nan_inputs

    req = nan_inputs(*qkv(2, 300, 700, 4, 2, 128, 128, torch.bfloat16), causal)
    check_nan_rows(req, *cute_kernels.run(req, cute_kernels.config_for(req)))


@gpu
@pytest.mark.parametrize("sq,sk", SIZES)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_basic(sq, sk, causal):
    q, k, v = qkv(2, sq, sk, 4, 4, 128, 128, torch.bfloat16)
    check_run(make_req(q, k, v, window_right=0 if causal else -1))


@gpu
@pytest.mark.parametrize("sq,sk", [(113, 203), (799, 3), (1023, 1024)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_gqa_fp16_hdim64(sq, sk, causal):
    q, k, v = qkv(2, sq, sk, 6, 2, 64, 64, torch.float16)
    check_run(make_req(q, k, v, window_right=0 if causal else -1))


@gpu
@pytest.mark.parametrize("sq,sk", [(113, 203), (239, 1), (1023, 1024), (300, 129)])
@pytest.mark.parametrize("wl,wr", [(37, 11), (0, 0), (200, -1), (-1, 64)])
def test_gpu_local(sq, sk, wl, wr):
    q, k, v = qkv(2, sq, sk, 4, 2, 128, 128, torch.bfloat16)
    check_run(make_req(q, k, v, window_left=wl, window_right=wr))


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_softcap(causal):
    q, k, v = qkv(2, 239, 517, 4, 4, 128, 128, torch.bfloat16)
    check_run(make_req(q * 3, k, v, softcap=7.5, window_right=0 if causal else -1))


@gpu
@pytest.mark.parametrize("hdim,hdimv", [(64, 64), (96, 96), (192, 192), (192, 128), (256, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_headdims(hdim, hdimv, causal):
    q, k, v = qkv(2, 333, 517, 4, 2, hdim, hdimv, torch.bfloat16)
    check_run(make_req(q, k, v, window_right=0 if causal else -1))


def _with_tile(req, **tile):
    cfg = cute_kernels.config_for(req)
    return dataclasses.replace(cfg, tile=dataclasses.replace(cfg.tile, **tile))


@gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_gpu_schedules(overlap):
    q, k, v = qkv(2, 300, 700, 4, 4, 128, 128, torch.bfloat16)
    req = make_req(q, k, v, window_right=0)
    check_run(req, _with_tile(req, intra_wg_overlap=overlap))


@gpu
@pytest.mark.parametrize("hdim,hdimv", [(128, 128), (192, 128), (192, 192), (256, 256)])
@pytest.mark.parametrize("sq,sk,wl,wr", [(300, 700, -1, 0), (799, 1023, -1, -1), (113, 203, 37, 11)])
def test_gpu_rescale_o_before_pv(hdim, hdimv, sq, sk, wl, wr):
    q, k, v = qkv(2, sq, sk, 4, 2, hdim, hdimv, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    check_run(req, _with_tile(req, rescale_o_before_pv=True))


# Tile shapes swept by `python -m benchmarks.cute_bench --tiles ...` (CPU-checked: no spills,
# smem fits); checked here so a winner can enter the config table already verified.
TILE_VARIANTS = [(64, 128, 128, 2), (64, 128, 176, 2), (64, 128, 192, 2), (64, 128, 128, 3),
                 (128, 128, 176, 2), (256, 128, 64, 2)]


@gpu
@pytest.mark.parametrize("hdim,tile_m,tile_n,stages", TILE_VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_tile_variants(hdim, tile_m, tile_n, stages, causal):
    q, k, v = qkv(2, 799, 1023, 4, 2, hdim, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_right=0 if causal else -1)
    cfg = cute_kernels.config_for(req)
    check_run(req, dataclasses.replace(cfg, tile=tile_variant(cfg.tile, tile_m, tile_n, stages)))


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
    q, k, v = qkv(2, sq, sk, 6, 2, hdim, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    check_run(req, _with_three_wg(req, hdim))


@gpu
@pytest.mark.parametrize("fields", [dict(persistent=True), dict(intra_wg_overlap=False)], ids=str)
def test_gpu_three_wg_schedules(fields):
    # 3 * 8 * 6 = 144 tiles of 192 rows > 132 SMs: persistent CTAs run several tiles.
    q, k, v = qkv(3, 1000, 777, 8, 2, 64, 64, torch.float16)
    req = make_req(q, k, v, window_right=0)
    check_run(req, _with_three_wg(req, 64, **fields))


@gpu
def test_gpu_three_wg_varlen_softcap():
    q, k, v, varlen = packed_qkv([1, 113, 239, 799, 0, 64, 1500], [3, 203, 1, 1024, 5, 64, 1400], 6, 2, 64,
                                  torch.bfloat16)
    req = make_req(q * 3, k, v, window_right=0, softcap=7.5, **varlen,
               seqused_k=torch.tensor([2, 150, 1, 1000, 5, 10, 1400], dtype=torch.int32, device="cuda"))
    check_run(req, _with_three_wg(req, 64))


@gpu
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("hdim", [128, 192], ids=["separate_o", "o_in_q"])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (100, 30)])
def test_gpu_persistent(overlap, hdim, wl, wr):
    """Static persistent CTAs (not the dynamic scheduler, the causal/local default):
    3 * 8 * 8 = 192 tiles > #SMs, every CTA runs several tiles (and some rows are empty, so
    with a separate sO, hdim 128, some tiles release Q without reading it; hdim 192 stages O in
    sQ)."""
    q, k, v = qkv(3, 1000, 777, 8, 2, hdim, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    check_run(req, _with_tile(req, persistent=True, dynamic=False, intra_wg_overlap=overlap))


@gpu
@pytest.mark.parametrize("wl,wr", [(-1, 0), (100, 30)])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("batch,heads", [(3, 8), (12, 16)])  # 24 / 192 pairs: final section all / some
def test_gpu_lpt_order(wl, wr, dynamic, batch, heads):
    """The causal/local longest-first order visits every (m_block, batch, head) once, with a
    final section of all or some pairs (scheduler.TileScheduler.coords), as the single-tile
    grid and as the dynamic scheduler's tile numbering."""
    q, k, v = qkv(batch, 1000, 1000, heads, 2, 64, 64, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    check_run(req, _with_tile(req, dynamic=dynamic))


@gpu
@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (100, 30), (0, 0)])
@pytest.mark.parametrize("dynamic", [True, False])
def test_gpu_dynamic(hdim, wl, wr, dynamic):
    """Dynamic persistent scheduler (the causal/local default): 3 * 8 * 9 = 216 tiles of 128
    rows (144 of hdim 64's 192: 1100 rows is past SHORT_CAUSAL_SEQLEN) on fewer CTAs, taken from
    the atomic counter; some rows see no key (1100 queries, 777 keys). dynamic=False: the
    single-tile grid (static persistent if not windowed)."""
    q, k, v = qkv(3, 1100, 777, 8, 2, hdim, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    cfg = _with_tile(req, dynamic=dynamic)
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    assert FlashAttentionForwardSm90(cfg).persistent == (dynamic or (wl, wr) == (-1, -1))
    check_run(req, cfg)


@gpu
@pytest.mark.parametrize("hdim,q_stages", [(128, 1), (192, 1), (128, 2)])  # hdim 192: sO in sQ
def test_gpu_dynamic_varlen(hdim, q_stages):
    """Empty sequences and m_blocks past a sequence's end are skipped by the producer: the
    consumers only see the tiles it announces, then the end marker."""
    q, k, v, varlen = packed_qkv([1, 113, 0, 799, 0, 64, 1500, 300], [3, 203, 7, 1024, 5, 0, 1400, 900],
                                  8, 2, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_right=0, **varlen)
    check_run(req, _with_tile(req, dynamic=True, q_stages=q_stages))


@gpu
@pytest.mark.parametrize("hdim", [64, 128])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (100, 30)])
@pytest.mark.parametrize("dynamic", [True, False])
def test_gpu_q_stages(hdim, wl, wr, dynamic):
    """Two Q buffers (TileConfig.q_stages): the producer loads tile t+1's Q into the other
    buffer (and, dynamic, announces t+1 in that buffer's slot) while the consumers still read
    tile t's. Every CTA runs many tiles, so both buffers turn over many times; some rows see no
    key (1100 queries, 777 keys), and some tiles have no KV block (window)."""
    q, k, v = qkv(3, 1100, 777, 8, 2, hdim, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    check_run(req, _with_tile(req, q_stages=2, persistent=True, dynamic=dynamic))


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
    q, k, v = qkv(2, sq, sk, h, hk, hdim, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    cfg = cute_kernels.config_for(req)
    tile = tile_from_spec(cfg.tile, tile, ["intra_wg_overlap=0", "diag_half=1"])
    check_run(req, dataclasses.replace(cfg, tile=tile))


@gpu
@pytest.mark.parametrize("hdim", [64, 128])
@pytest.mark.parametrize("sq,sk,h,hk,wl,wr", [
    (512, 512, 4, 2, -1, 0), (300, 700, 4, 2, -1, 0), (700, 300, 4, 2, -1, 0), (113, 203, 4, 2, 37, 11),
    (799, 3, 4, 4, -1, -1), (1000, 1000, 4, 2, -1, -1), (64, 517, 8, 2, -1, 0)])
def test_gpu_chain_pv_qk(hdim, sq, sk, h, hk, wl, wr):
    """chain_pv_qk: a block's V stage is released one block later (after the next QK^T), the
    last one after the loop; tiles of one block, many blocks, empty rows and windows."""
    q, k, v = qkv(2, sq, sk, h, hk, hdim, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    check_run(req, _with_tile(req, intra_wg_overlap=False, chain_pv_qk=True))


@gpu
@pytest.mark.parametrize("hdim", [64, 128])
@pytest.mark.parametrize("sq,sk,h,hk,wl,wr", [
    (512, 520, 4, 2, -1, -1), (300, 700, 4, 2, -1, 0), (700, 130, 4, 2, -1, -1), (113, 203, 4, 2, 37, 11),
    (799, 3, 4, 4, -1, -1), (64, 577, 8, 2, -1, 0), (1000, 1000, 4, 2, -1, 40)])
def test_gpu_short_first(hdim, sq, sk, h, hk, wl, wr):
    """short_first on the 16-bit kernel (FP8's 224-key tile takes it by default): where the tile's
    first block holds at most 64 keys of the sequence, its QK^T and softmax run over 64 keys and
    the rest of P is zero; one block, many, windows, a first block cut by a window instead."""
    q, k, v = qkv(2, sq, sk, h, hk, hdim, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    check_run(req, _with_tile(req, short_first=64, intra_wg_overlap=True, diag_half=False, chain_pv_qk=False))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_diag_half_varlen(dtype):
    q, k, v, varlen = packed_qkv([1, 113, 0, 799, 64, 1500, 300], [3, 203, 7, 1024, 0, 1400, 300],
                                  8, 2, 64, dtype)
    req = make_req(q, k, v, window_right=0, **varlen)
    check_run(req, _with_tile(req, intra_wg_overlap=False, diag_half=True))


@gpu
def test_gpu_short_first_varlen():
    q, k, v, varlen = packed_qkv([1, 113, 0, 799, 64, 1500, 300], [3, 203, 7, 1024, 0, 1400, 300],
                                  8, 2, 128, torch.bfloat16)
    req = make_req(q, k, v, **varlen)
    check_run(req, _with_tile(req, short_first=64, intra_wg_overlap=True, diag_half=False, chain_pv_qk=False))


@gpu
def test_gpu_tile_counter_reuse():
    """The dynamic scheduler's counters are zero again after every launch (its last CTA resets
    them), so back-to-back calls with different grids on one stream share one buffer, and a call
    on another stream gets its own."""
    big = qkv(3, 1100, 777, 8, 2, 128, 128, torch.bfloat16)  # 216 tiles: more than the SMs
    small = qkv(1, 300, 300, 2, 2, 128, 128, torch.bfloat16)  # 6 tiles: a 6-CTA grid
    stream = torch.cuda.current_stream()
    for q, k, v in (big, small, big, small):
        req = make_req(q, k, v, window_right=0)
        assert cute_kernels.config_for(req).tile.dynamic
        check_run(req)
        assert launch.tile_counters.buffers[(q.device.index, stream.cuda_stream)].tolist() == [0, 0]
    side = torch.cuda.Stream()
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        req = make_req(*big, window_right=0)
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
        q, k, v, kw = packed_qkv([1, 113, 239, 799, 0, 64], [3, 203, 1, 1024, 5, 64], 4, 2, hdim,
                                  torch.bfloat16)
    else:
        q, k, v = qkv(3, 239, 300, 4, 2, hdim, hdim, torch.bfloat16)
        if layout == "seqused_q":
            kw = dict(seqused_q=torch.tensor([239, 17, 0], dtype=torch.int32, device="cuda"),
                      max_seqlen_q=239)
    return make_req(q, k, v, window_right=0 if causal else -1, **kw)


@gpu
@pytest.mark.parametrize("layout", ["batched", "packed", "seqused_q"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_epilogue_variants(layout, causal):
    """The O store the defaults do not use for this masking: predicated 16-byte stores from every
    warp for non-causal (tma_store=False), per-warp TMA stores for causal (tma_store=True, with
    the predicated fallback for slabs crossing a packed / seqused sequence end)."""
    req = _epilogue_req(layout, causal, 128)
    assert cute_kernels.config_for(req).tile.tma_store == (not causal)
    check_run(req, _with_tile(req, tma_store=causal))


@gpu
@pytest.mark.parametrize("layout", ["batched", "packed", "seqused_q"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tma_store", [False, True])
def test_gpu_o_chunks(layout, causal, tma_store):
    """O staged in two column chunks (TileConfig.o_chunks) at hdim 256, tile 128x64, where sO
    then has its own buffer: by TMA and by predicated stores, ragged sequence ends included."""
    req = _epilogue_req(layout, causal, 256)
    check_run(req, _with_tile(req, tile_n=64, o_chunks=2, tma_store=tma_store))


@gpu
@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ramp", ["up", "down", "flat", "softcap"])
def test_gpu_lazy_rescale(hdim, causal, ramp):
    """Lazy rescaling (TileConfig.lazy_rescale): keys scaled by a ramp make the row max grow
    block after block in either processing order (the kernel walks KV blocks last first), so
    references move often ("down": large early keys, met last) or are kept ("up")."""
    q, k, v = qkv(2, 700, 1500, 4, 2, hdim, hdim, torch.bfloat16)
    r = torch.linspace(0.2, 3.0, k.shape[1], device="cuda")
    if ramp in ("up", "down"):
        k = (k.float() * (r if ramp == "up" else r.flip(0))[None, :, None, None]).to(k.dtype)
    req = make_req(q, k, v, window_right=0 if causal else -1, softcap=5.0 if ramp == "softcap" else 0.0)
    check_run(req, _with_tile(req, lazy_rescale=8.0))


@gpu
@pytest.mark.parametrize("sq,sk", [(1, 1000), (7, 333), (64, 517), (200, 1024)])
@pytest.mark.parametrize("h,hk", [(8, 1), (8, 2), (12, 2)])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (37, 11)])
def test_gpu_pack_gqa(sq, sk, h, hk, wl, wr):
    """GQA packing (FwdConfig.pack_gqa, chosen by config_for for few query positions): MQA,
    GQA and a group of 6 (not a power of 2), with causal and local masks."""
    q, k, v = qkv(2, sq, sk, h, hk, 128, 128, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    assert cute_kernels.config_for(req).pack_gqa == h // hk
    check_run(req)


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
    q, k, v = qkv(2, sq, 1000, h, hk, d, dv, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr)
    assert cute_kernels.config_for(req).split_kv
    check_run(req)


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqused", [False, True])
def test_gpu_split_kv_varlen(causal, seqused, monkeypatch):
    """Split-KV with packed (varlen) queries and keys, empty and one-token sequences, seqused."""
    monkeypatch.setattr(launch, "split_kv_setting", "4")
    q, k, v, kw = packed_qkv([1, 5, 0, 77, 2], [3, 203, 5, 1024, 640], 8, 2, 128, torch.float16)
    if seqused:
        kw.update(seqused_q=torch.tensor([1, 3, 0, 70, 2], dtype=torch.int32, device="cuda"),
                  seqused_k=torch.tensor([3, 100, 0, 1000, 1], dtype=torch.int32, device="cuda"))
    req = make_req(q, k, v, window_right=0 if causal else -1, **kw)
    assert cute_kernels.config_for(req).split_kv
    check_run(req)


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_split_kv_auto_decode(causal):
    """The automatic choice: decoding one sequence (4 KV heads, 8192 keys) splits the keys."""
    q, k, v = qkv(1, 1, 8192, 32, 4, 128, 128, torch.bfloat16)
    req = make_req(q, k, v, window_right=0 if causal else -1)
    cfg = cute_kernels.config_for(req)
    assert cfg.split_kv and cute_kernels.num_splits(req, cfg) > 1
    check_run(req)


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
        q, k, v = qkv(2, 333, 517, 4, 2, d, dv, torch.bfloat16)
        kw = {}
    else:
        q, k, v, kw = packed_qkv([1, 113, 0, 300], [3, 203, 5, 517], 4, 4, d, torch.bfloat16)
        v = torch.randn(*v.shape[:-1], dv, device="cuda", dtype=torch.bfloat16)
    req = make_req(q, k, v, window_right=0 if causal else -1, **kw)
    cfg = cute_kernels.config_for(req)
    assert cfg.hdim_in == (0 if d == cfg.hdim else d) and cfg.pack_gqa == 1  # (so launch_kernel takes q as is)
    check_run(req)
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
    q, k, v = qkv(3, 1, 777, 16, 4, d, dv, torch.bfloat16)
    req = make_req(q, k, v, window_right=0 if causal else -1)
    assert cute_kernels.config_for(req).pack_gqa == 4
    check_run(req)


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqused", [False, True])
def test_gpu_pack_gqa_varlen(causal, seqused):
    """GQA packing with packed (varlen) queries and keys, empty and one-token sequences, and
    seqused_q / seqused_k cutting sequences short."""
    q, k, v, kw = packed_qkv([1, 5, 0, 77, 2], [3, 203, 5, 1024, 64], 8, 2, 64, torch.float16)
    if seqused:
        kw.update(seqused_q=torch.tensor([1, 3, 0, 70, 2], dtype=torch.int32, device="cuda"),
                  seqused_k=torch.tensor([3, 100, 0, 1000, 1], dtype=torch.int32, device="cuda"))
    req = make_req(q, k, v, window_right=0 if causal else -1, **kw)
    assert cute_kernels.config_for(req).pack_gqa == 4
    check_run(req)


@gpu
def test_gpu_persistent_varlen():
    q, k, v, varlen = packed_qkv([1, 113, 239, 799, 0, 64, 1500], [3, 203, 1, 1024, 5, 64, 1400], 8, 4, 64,
                                  torch.float16)
    req = make_req(q, k, v, window_right=0, **varlen)
    check_run(req, _with_tile(req, persistent=True, dynamic=False))


@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqused", [False, True])
def test_gpu_varlen(causal, seqused):
    q, k, v, kw = packed_qkv([1, 113, 239, 799, 0, 64], [3, 203, 1, 1024, 5, 64], 4, 2, 128, torch.bfloat16)
    if seqused:
        kw["seqused_k"] = torch.tensor([2, 150, 1, 1000, 5, 10], dtype=torch.int32, device="cuda")
    check_run(make_req(q, k, v, window_right=0 if causal else -1, **kw))


@gpu
def test_gpu_batched_seqused_q():
    q, k, v = qkv(3, 200, 300, 4, 4, 64, 64, torch.bfloat16)
    used_q = torch.tensor([200, 17, 0], dtype=torch.int32, device="cuda")
    used_k = torch.tensor([300, 129, 5], dtype=torch.int32, device="cuda")
    check_run(make_req(q, k, v, seqused_q=used_q, seqused_k=used_k, max_seqlen_q=200, max_seqlen_k=300))


@gpu
def test_gpu_strided_views():
    base = torch.randn(2, 300, 8, 3, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = base[:, :, :4, 0], base[:, :257, 4:6, 1], base[:, :257, 4:6, 2]
    check_run(make_req(q, k, v, window_right=0))


@gpu
def test_gpu_current_stream():
    """The kernel runs on torch's current stream: inputs written there after a long sleep must
    be seen (a launch on another stream would read them too early)."""
    q0, k, v = qkv(2, 333, 517, 4, 4, 128, 128, torch.bfloat16)
    q = torch.zeros_like(q0)
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)
        q.copy_(q0)
        req = make_req(q, k, v, window_right=0)
        out, lse = cute_kernels.forward(req)
    s.synchronize()
    from tests._util import check_forward

    check_forward(req, out, lse)


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_from_dlpack_path(monkeypatch, causal):
    """The fallback calling path (no TVM-FFI): from_dlpack conversions per call."""
    monkeypatch.setattr(launch, "use_tvm_ffi", False)
    q, k, v = qkv(2, 239, 517, 4, 2, 128, 128, torch.bfloat16)
    check_run(make_req(q, k, v, window_right=0 if causal else -1))


@gpu
def test_gpu_compile_time_recorded():
    q, k, v = qkv(1, 64, 64, 2, 2, 128, 128, torch.bfloat16)
    cute_kernels.forward(make_req(q, k, v, window_left=5, window_right=3, softcap=3.0))
    assert launch.last_compile_seconds is not None and launch.last_compile_seconds > 0


# attention_chunk (chunked local attention): (chunk, window_left, window_right); chunks below,
# across and above the KV tiles (64-128 keys), alone, causal, with a window on either side.
CHUNKS = [(16, -1, -1), (100, -1, 0), (128, -1, 0), (300, -1, -1), (40, 20, 5), (1, -1, 0), (256, 5, 300)]


@gpu
@pytest.mark.parametrize("chunk,wl,wr", CHUNKS)
@pytest.mark.parametrize("sq,sk", SIZES + [(300, 129)])
@pytest.mark.parametrize("hdim", [64, 128])
def test_gpu_chunk(hdim, sq, sk, chunk, wl, wr):
    """attention_chunk in the KV-block range and the boundary masks, on ragged sizes (Lq > Lk:
    chunks that start before key 0), GQA, the default config (3 WGs at hdim 64 unless short)."""
    q, k, v = qkv(2, sq, sk, 6, 2, hdim, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr, attention_chunk=chunk)
    assert cute_kernels.config_for(req).chunk
    check_run(req)


@gpu
@pytest.mark.parametrize("chunk,wl,wr", [(100, -1, 0), (300, -1, -1), (40, 20, 5)])
@pytest.mark.parametrize("hdim,tile,fields", [
    (64, "128x128", dict(intra_wg_overlap=False, diag_half=True, chain_pv_qk=True)),
    (64, "192x128", dict(dynamic=True)), (128, "128x128", dict(dynamic=False)),
    (96, "128x64", dict(intra_wg_overlap=False)), (256, "128x64", {}), (192, "128x96", dict(persistent=True)),
])
def test_gpu_chunk_schedules(hdim, tile, fields, chunk, wl, wr):
    """Chunked masks through every schedule: the plain one with diag_half, the dynamic counter on
    3 WGs, single tiles, static persistent, and the head dims' tiles."""
    q, k, v = qkv(2, 799, 1023, 4, 2, hdim, hdim, torch.bfloat16)
    req = make_req(q, k, v, window_left=wl, window_right=wr, attention_chunk=chunk)
    cfg = cute_kernels.config_for(req)
    tile_cfg = tile_from_spec(cfg.tile, tile)
    check_run(req, dataclasses.replace(cfg, tile=dataclasses.replace(tile_cfg, **fields)))


@gpu
@pytest.mark.parametrize("splits", ["auto", "3", "40"])
@pytest.mark.parametrize("chunk,wr", [(256, 0), (1000, -1), (64, -1)])
@pytest.mark.parametrize("d,h,hk,sq", [(128, 8, 2, 1), (64, 4, 4, 77), (128, 32, 4, 3), (64, 8, 1, 1)])
def test_gpu_chunk_split_kv_pack_gqa(splits, chunk, wr, d, h, hk, sq, monkeypatch):
    """Chunked decoding: GQA packing and split-KV (forced, or chosen: the chunk bounds a tile's
    blocks) over 4000 keys, the splits of each tile's chunk-narrowed range combined on the host."""
    monkeypatch.setattr(launch, "split_kv_setting", splits)
    q, k, v = qkv(2, sq, 4000, h, hk, d, d, torch.bfloat16)
    req = make_req(q, k, v, window_right=wr, attention_chunk=chunk)
    cfg = cute_kernels.config_for(req)
    assert cfg.chunk and (splits == "auto" or cfg.split_kv)
    check_run(req)


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_chunk_varlen(causal):
    """Packed sequences with seqused: each sequence's own diagonal and chunks."""
    q, k, v, kw = packed_qkv([37, 0, 513, 1, 200], [50, 9, 700, 0, 129], 4, 2, 128, torch.bfloat16)
    kw["seqused_k"] = torch.tensor([40, 9, 650, 0, 129], dtype=torch.int32, device="cuda")
    check_run(make_req(q, k, v, window_right=0 if causal else -1, attention_chunk=96, **kw))


@gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_sm_margin(causal):
    """sm_margin through flash_attn_func: the persistent (causal: dynamic) grid of SMs - margin CTAs
    gives the same bits as all SMs (each tile's work is the same, only its CTA changes), down to one
    SM; a margin of every SM is refused naming the argument."""
    import fa3py

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    q, k, v = qkv(2, 2048, 2048, 16, 4, 128, 128, torch.bfloat16)
    cfg = cute_kernels.config_for(make_req(q, k, v, window_right=0 if causal else -1))
    assert cfg.tile.persistent or cfg.tile.dynamic
    ref = fa3py.flash_attn_func(q, k, v, causal=causal)
    for margin in (8, sms - 1):
        assert torch.equal(fa3py.flash_attn_func(q, k, v, causal=causal, sm_margin=margin), ref), margin
    with pytest.raises(ValueError, match="sm_margin"):
        fa3py.flash_attn_func(q, k, v, causal=causal, sm_margin=sms)
