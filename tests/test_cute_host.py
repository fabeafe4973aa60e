"""cute_kernels on the CPU: the config table and its choices (tiles, GQA packing, split-KV), the
host-side layout work of `launch.run` with the kernel emulated in torch (`launch.launch_kernel`
replaced), split-KV's combine, and the kernel's own mask and tile-scheduler code run by CuTe
DSL's host JIT against brute force (`-k on_the_host`)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import numpy as np
import pytest
import torch

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cute_kernels  # noqa: E402
from cute_kernels import launch  # noqa: E402
from cute_kernels.config import CANDIDATES, FwdConfig, TileConfig, tile_variant  # noqa: E402
from tests._cute import make_req  # noqa: E402
from tests.cute_emulation import emulated_launch  # noqa: E402


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
        reason = cute_kernels.why_not(make_req(q, q, v), backward=False)
        assert (reason == "cute_kernels: CUDA tensors only") == served, (d, dv, reason)
        if served:
            cfg = cute_kernels.config_for(make_req(q, q, v))
            assert (cfg.hdim, cfg.hdimv) == (padded_hdim(d), padded_hdim(dv))
            assert (cfg.hdim_in, cfg.hdimv_in) == (0 if d == cfg.hdim else d, 0 if dv == cfg.hdimv else dv)


def test_warpgroup_ring_barriers():
    """The consumer warpgroups' GEMM ring: one named barrier per warpgroup after the epilogue's,
    checked where the ring is made (a wrong count should fail the compile, not hang the GPU); one
    warpgroup (DECODE_TILE) has a ring that waits for no one."""
    from cute_kernels.pipeline import WarpgroupRing
    from cute_kernels.utils import NamedBarrierFwd

    for w in (2, 3):
        ring = WarpgroupRing(w)
        ids = [ring.barrier_id(i) for i in range(w)]
        assert ids == list(range(int(NamedBarrierFwd.WarpSchedulerWG1), int(NamedBarrierFwd.WarpSchedulerWG1) + w))
        assert int(NamedBarrierFwd.Epilogue) not in ids
    WarpgroupRing(1)
    for w in (0, 4):
        with pytest.raises(AssertionError, match="one named barrier per consumer warpgroup"):
            WarpgroupRing(w)


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
    # o_split (qv with hdim_v 512): two consumer warpgroups on one 64-row slab, 240 registers each
    from cute_kernels.config import QV_WIDE_TILE

    assert (QV_WIDE_TILE.tile_m, QV_WIDE_TILE.num_mma_wg, QV_WIDE_TILE.num_threads) == (64, 2, 384)
    assert FwdConfig.make("bf16", 64, 512, qv=True, has_right=True).tile.o_split == 2
    # one consumer warpgroup (DECODE_TILE): two CTAs an SM launch at 128 registers a thread, so
    # setmaxnreg's 24 + 232 is the whole pool and 240 would hang; alone on the SM 240 fits
    from cute_kernels.config import DECODE_TILE, launch_regs

    assert (DECODE_TILE.num_mma_wg, DECODE_TILE.num_threads, DECODE_TILE.ctas_per_sm) == (1, 256, 2)
    assert launch_regs(256, 2) == 128 and launch_regs(384) == 168 and launch_regs(128) == 248
    with pytest.raises(AssertionError, match="registers"):
        TileConfig(64, 64, 2, 24, 240, ctas_per_sm=2)
    TileConfig(64, 64, 2, 24, 240)
    with pytest.raises(AssertionError, match="two CTAs an SM: one consumer warpgroup"):
        TileConfig(128, 128, 2, 24, 240, ctas_per_sm=2)


def test_short_tile():
    """Few KV blocks per tile: causal with <= SHORT_CAUSAL_SEQLEN query rows, or non-causal with
    <= SHORT_SEQLEN_K keys. Causal hdim64 takes the 2-WG tile there, longer problems the table
    tile; causal goes by the query length, non-causal by the key length."""
    from cute_kernels.config import MEDIUM_SEQLEN_K, SHORT_CAUSAL_SEQLEN, SHORT_SEQLEN_K

    def config(sq, wr, d=64, sk=None):
        q = torch.randn(1, sq, 2, d, dtype=torch.bfloat16)
        k = torch.randn(1, sk or sq, 2, d, dtype=torch.bfloat16)
        return cute_kernels.config_for(make_req(q, k, k, window_right=wr)).tile

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


def test_pack_gqa_choice(monkeypatch):
    """Packing where it fills the M tile better (few query positions, more than one query head
    per KV head), not for long queries nor MHA; the packed rows decide the short tiles."""
    from cute_kernels.config import pack_gqa_factor

    assert [pack_gqa_factor(8, s, 128) for s in (1, 16, 100, 200, 1000, 4096)] == [8, 8, 8, 8, 1, 1]
    assert pack_gqa_factor(1, 1, 128) == 1 and pack_gqa_factor(3, 128, 128) == 1
    def decode(sq, h, hk, d=128, **kw):
        k = torch.randn(2, 900, hk, d, dtype=torch.bfloat16)
        return cute_kernels.config_for(make_req(torch.randn(2, sq, h, d, dtype=torch.bfloat16), k, k, **kw))

    assert decode(1, 32, 8).pack_gqa == 4 and decode(1, 8, 1).pack_gqa == 8 and decode(1, 8, 8).pack_gqa == 1
    assert decode(4096, 32, 8).pack_gqa == 1
    # Causal hdim64: 100 positions x 8 heads = 800 rows take the short tile, 200 x 8 the table's.
    assert [decode(sq, 8, 1, 64, window_right=0).tile.tile_m for sq in (100, 200)] == [128, 192]
    monkeypatch.setattr(launch, "pack_gqa_enabled", False)  # FA3PY_CUTE_PACK_GQA=0
    assert decode(1, 32, 8).pack_gqa == 1


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
    decode = make_req(torch.randn(1, 1, 32, 128, dtype=torch.bfloat16), k, k)
    cfg = cute_kernels.config_for(decode)  # 4 (batch, KV head) tiles of 128 64-key blocks (decoding's tile)
    assert cfg.split_kv and cfg.pack_gqa == 8 and cfg.tile.tile_n == 64
    assert cute_kernels.num_splits(decode, cfg) == num_splits_for(4, 128, 132) == 32
    long = torch.randn(2, 4096, 16, 128, dtype=torch.bfloat16)
    assert not cute_kernels.config_for(make_req(long, long, long)).split_kv
    # FA3's num_splits: 1 never splits, N splits N times (flash_attn_func's default is 1, as in FA3).
    assert not cute_kernels.config_for(make_req(decode.q, k, k, num_splits=1)).split_kv
    five = make_req(decode.q, k, k, num_splits=5)
    assert cute_kernels.num_splits(five, cute_kernels.config_for(five)) == 5
    many = make_req(decode.q, k, k, num_splits=1000)  # capped at the 128 KV blocks a tile has
    assert cute_kernels.num_splits(many, cute_kernels.config_for(many)) == 128
    monkeypatch.setattr(launch, "split_kv_setting", "1")
    assert not cute_kernels.config_for(decode).split_kv and not cute_kernels.config_for(five).split_kv
    monkeypatch.setattr(launch, "split_kv_setting", "3")
    assert cute_kernels.config_for(decode).split_kv and cute_kernels.num_splits(decode, cfg) == 3


def test_sm_margin_counts_out_of_the_heuristics():
    """FA3's sm_margin: the SMs the persistent grid (the kernel's num_ctas scalar) and the split-KV /
    backward head-split heuristics count are the device's less the margin, so a margin that leaves
    few SMs stops the decode split that 132 of them call for (4 tiles of 128 64-key blocks:
    num_splits_for on 132; on 8 SMs its choice for 8); the backward splits GQA groups for fewer SMs."""
    from cute_kernels import bwd_launch
    from cute_kernels.config import num_splits_for

    k = torch.randn(1, 8192, 4, 128, dtype=torch.bfloat16)
    q = torch.randn(1, 1, 32, 128, dtype=torch.bfloat16)
    splits = {}
    for margin in (0, 124, 131):
        req = make_req(q, k, k, sm_margin=margin)
        assert launch.usable_sms(req) == 132 - margin
        cfg = cute_kernels.config_for(req)
        splits[margin] = cute_kernels.num_splits(req, cfg) if cfg.split_kv else 1
    # (decoding's tile: 128 64-key blocks a tile; the SMs counted once)
    assert splits == {0: num_splits_for(4, 128, 132), 124: num_splits_for(4, 128, 8), 131: 1}
    assert splits[124] < splits[0]
    long = torch.randn(1, 2048, 2, 128, dtype=torch.bfloat16)
    gqa = lambda margin: bwd_launch.head_splits(make_req(torch.randn(1, 2048, 16, 128, dtype=torch.bfloat16),
                                                         long, long, sm_margin=margin))
    assert gqa(0) > gqa(120) >= 1


def test_config_for_request():
    x = torch.randn(2, 8, 2, 192, dtype=torch.float16)
    v = torch.randn(2, 8, 2, 128, dtype=torch.float16)
    cfg = cute_kernels.config_for(make_req(x, x, v, window_right=0, softcap=5.0))
    assert (cfg.dtype, cfg.hdim, cfg.hdimv, cfg.causal, cfg.softcap) == ("fp16", 192, 128, True, True)


def test_why_not_reasons(monkeypatch):
    x = torch.randn(1, 8, 2, 128, dtype=torch.bfloat16)
    assert cute_kernels.why_not(make_req(x, x, x), backward=True)
    # fp8=True: served (on sm90: here only the device is refused), unless turned off
    assert cute_kernels.why_not(make_req(x, x, x, fp8=True), backward=False) == "cute_kernels: CUDA tensors only"
    monkeypatch.setattr(launch, "fp8_enabled", False)
    assert "FA3PY_CUTE_FP8=0" in cute_kernels.why_not(make_req(x, x, x, fp8=True), backward=False)
    y = torch.randn(1, 8, 2, 84, dtype=torch.bfloat16)  # (80 rounds up to 96; 84 is no multiple of 8)
    assert "headdim" in cute_kernels.why_not(make_req(y, y, y), backward=False)
    z = torch.randn(1, 8, 2, 128, dtype=torch.float32)
    assert "dtype" in cute_kernels.why_not(make_req(z, z, z), backward=False)
    f8 = x.to(torch.float8_e4m3fn)
    assert cute_kernels.why_not(make_req(f8, f8, f8), backward=False)
    for scale in (-0.1, 0.0):  # (0: a masked -inf score times the scale would be NaN)
        assert "softmax_scale" in cute_kernels.why_not(make_req(x, x, x, softmax_scale=scale), backward=False)
    for params in (dict(softmax_scale=-0.1, softcap=2.0), dict(softmax_scale=0.0, softcap=2.0),
                   dict(softmax_scale=1e-6)):  # served (on CUDA)
        assert cute_kernels.why_not(make_req(x, x, x, **params), backward=False) == "cute_kernels: CUDA tensors only"


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


@pytest.mark.parametrize("splits", ["1", "3", "8"], ids=["whole", "split_kv3", "split_kv8"])
@pytest.mark.parametrize("layout", ["batched", "decode", "varlen", "seqused"])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (5, 2)])
@pytest.mark.parametrize("h,hk", [(8, 2), (6, 1)])
def test_pack_gqa_host_side(layout, wl, wr, h, hk, splits, monkeypatch):
    """cute_kernels.run's packing of Q and unpacking of out / LSE, with the kernel emulated on the
    CPU (`tests.cute_emulation`): the answer against the reference, for batched, packed (varlen)
    and seqused queries, GQA and MQA (packing by view), causal and local masks. With one query
    (decode) the kernel writes into views of the returned out and LSE. Split-KV (forced 3 or 8
    splits): float32 partials combined by combine_splits; with 8 splits of up to 6 KV blocks of
    128 some splits are empty, and short sequences leave most of them empty."""
    from tests._util import check_forward, packed

    given = []

    def emulated(req, cfg, q, k, v, out, lse, num_splits=1):
        given.append((out, lse))
        return emulated_launch(req, cfg, q, k, v, out, lse, num_splits)

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
    req = make_req(q, k, v, window_left=wl, window_right=wr, **kw)
    cfg = cute_kernels.config_for(req)
    assert cfg.pack_gqa == h // hk
    out, lse = cute_kernels.run(req, cfg)
    assert out.shape == req.out_shape and lse.shape == req.lse_shape
    (k_out, k_lse), = given
    in_place = (k_out._base is out and k_lse._base is lse)
    assert in_place == (layout == "decode" and splits == "1")
    assert cfg.split_kv == (splits != "1") and (k_out.dtype == torch.float32) == cfg.split_kv
    check_forward(req, out, lse)


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


@pytest.mark.parametrize("packed_q", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("g,splits", [(4, 3), (2, 40), (3, 1)])
def test_combine_splits_into_unpacked_outputs(packed_q, g, splits):
    """With GQA-packed partials (g > 1: rows * g rows of each KV head) both combines write the
    unpacked outputs (query heads, strided views): the packed combine's values at the query
    rows and heads they belong to (the Triton kernel under the interpreter)."""
    from cute_kernels.combine import combine_splits_torch, combine_splits_triton

    b, rows, hk, dv = (1, 13, 2, 96) if packed_q else (2, 5, 3, 64)
    rows_g = rows * g
    o_part = torch.randn(splits * rows_g, hk, dv) if packed_q else torch.randn(splits * b, rows_g, hk, dv)
    lse_part = torch.randn(hk, splits * rows_g) * 3 if packed_q else torch.randn(splits * b, hk, rows_g) * 3
    lse_part[lse_part < -4] = -math.inf
    packed = torch.empty(o_part.shape[0] // splits, *o_part.shape[1:])
    lse_packed = torch.empty(hk, rows_g) if packed_q else torch.empty(b, hk, rows_g)
    combine_splits_torch(o_part, lse_part, splits, packed_q, packed, lse_packed)
    # packed row r * g + i of KV head kh -> query row r, query head kh * g + i, written out here
    # element by element (combine_splits_torch itself unpacks through launch.unpack_rows / _lse)
    lead = () if packed_q else (b,)
    want_out = torch.empty(*lead, rows, hk * g, dv)
    want_lse = torch.empty(*lead, hk * g, rows)
    for r, i, kh in itertools.product(range(rows), range(g), range(hk)):
        want_out[..., r, kh * g + i, :] = packed[..., r * g + i, kh, :]
        want_lse[..., kh * g + i, r] = lse_packed[..., kh, r * g + i]
    for combine in (combine_splits_torch, combine_splits_triton):
        out = torch.full((*want_out.shape[:-1], dv + 8), 7.0)[..., :dv]  # strided: rows of dv + 8
        lse = torch.full(want_lse.shape[::-1], 7.0).permute(*reversed(range(want_lse.dim())))  # transposed
        combine(o_part, lse_part, splits, packed_q, out, lse, g)
        torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)


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


def _block_ranges_fn(g, has_left, has_right, tile_m=128, tile_n=64, chunk=False):
    """AttentionMask's KV-block bounds for every m_block, run on the host by CuTe DSL's JIT
    (`chunk`: with an attention_chunk, its size the call's last argument)."""
    from cutlass import Int32
    from cutlass.cute.runtime import from_dlpack

    from cute_kernels.mask import AttentionMask, SeqlenInfo

    @cutlass.cute.jit  # (annotations are strings here: resolved in this module's globals)
    def ranges(out: cutlass.cute.Tensor, sq: cutlass.Int32, sk: cutlass.Int32, wl: cutlass.Int32,
               wr: cutlass.Int32, c: cutlass.Int32):
        seqlen = SeqlenInfo(Int32(0), Int32(0), sq, sk)
        for m in cutlass.range(out.shape[0]):
            mask = AttentionMask(tile_m, tile_n, has_left, has_right, wl, wr, seqlen, m, rows_per_pos=g,
                                 chunk=c if chunk else None)
            lo, hi = mask.n_block_range()
            out[m, 0] = lo
            out[m, 1] = hi
            out[m, 2] = mask.n_block_min_right_masked(lo)
            out[m, 3] = mask.n_block_max_left_masked(lo)
            out[m, 4] = mask.keys_end(Int32(tile_m // 2))  # (diag_half: first warpgroup's rows)
            out[m, 5] = mask.keys_end(Int32(tile_m))

    def call(rows, sk, wl, wr, c=0):
        out = torch.zeros(-(-rows // tile_m), 6, dtype=torch.int32)
        ranges(from_dlpack(out), Int32(rows), Int32(sk), Int32(wl), Int32(wr), Int32(c))
        return out.tolist()

    return call


def _key_limits(pos, lq, lk, wl, wr, chunk=0):
    """(first, last): the keys query position(s) `pos` may keep by the window and the chunk, as
    fa3py.request states them (not clipped to 0 .. lk - 1; +-2^40 where unbounded)."""
    diag = pos + lk - lq
    first, last = np.full_like(diag, -2**40), np.full_like(diag, 2**40)
    if wl >= 0:
        first = np.maximum(first, diag - wl)
    if wr >= 0:
        last = np.minimum(last, diag + wr)
    if chunk:
        start = diag // chunk * chunk  # (numpy's // floors, as the chunk's floor division)
        first, last = np.maximum(first, start), np.minimum(last, start + chunk - 1)
    return first, last


def _check_key_limits(lq, lk, wl, wr, chunk):
    """_key_limits is fa3py.reference's mask on the sequence's rows."""
    from fa3py import reference

    first, last = _key_limits(np.arange(lq)[:, None], lq, lk, wl, wr, chunk)
    j = np.arange(lk)[None, :]
    want = reference.keep_mask(lq, lk, wl, wr, attention_chunk=chunk).numpy()
    assert np.array_equal((j >= first) & (j <= last), want), (lq, lk, wl, wr, chunk)


def _check_mask_apply(g, wl, wr, half, chunk=0):
    """AttentionMask.apply, the kernel's own code run by CuTe DSL's host JIT for every consumer
    thread of a tile (each thread's WGMMA accumulator fragment, scattered back to (row, col)),
    against a brute-force mask (_key_limits): sequence end, window edges, attention_chunk `chunk`
    (0: none), g rows per position. `half`: the accumulator of diag_half's QK^T over the block's
    first tile_n / 2 keys."""
    from cutlass import Float32, Int32
    from cutlass.cute.runtime import from_dlpack

    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90
    from cute_kernels.mask import AttentionMask, SeqlenInfo

    cute = cutlass.cute
    cfg = FwdConfig.make("bf16", 128, has_left=wl >= 0, has_right=wr >= 0, chunk=chunk > 0, pack_gqa=g)
    kernel = FlashAttentionForwardSm90(cfg)
    tile_m, tile_n, threads = cfg.tile.tile_m, cfg.tile.tile_n, kernel.num_mma_threads

    @cutlass.cute.jit
    def masked(out: cutlass.cute.Tensor, sq: cutlass.Int32, sk: cutlass.Int32, wl: cutlass.Int32,
               wr: cutlass.Int32, c: cutlass.Int32, m_block: cutlass.Int32, n_block: cutlass.Int32):
        tiled_mma = kernel.make_tiled_mma_qk(width)
        mask = AttentionMask(tile_m, tile_n, wl_on, wr_on, wl, wr, SeqlenInfo(Int32(0), Int32(0), sq, sk),
                             m_block, rows_per_pos=g, chunk=c if chunk_on else None)
        coords = cute.make_identity_tensor((tile_m, width))
        for t in cutlass.range(threads):
            thr = tiled_mma.get_slice(t)
            acc = cute.make_rmem_tensor(tiled_mma.partition_shape_C((tile_m, width)), Float32)
            acc.fill(1.0)
            mask.apply(acc, thr, n_block, True, True, True, tiled_mma.get_slice(0))
            rc = thr.partition_C(coords)
            for i in cutlass.range_constexpr(cute.size(acc)):
                out[rc[i]] = acc[i]

    wl_on, wr_on, chunk_on = wl >= 0, wr >= 0, chunk > 0
    width = tile_n // 2 if half else tile_n
    rng = np.random.default_rng()
    for sq, sk in [(10, 100), (77, 300), (300, 77), (64, 165)] + [tuple(rng.integers(1, 700, 2)) for _ in range(2)]:
        sq, sk = int(sq), int(sk)
        rows = sq * g
        if chunk:
            _check_key_limits(sq, sk, wl, wr, chunk)
        # chunked: more blocks per size, one of them where the tile's rows keep keys (chunk edges)
        for trial in range(4 if chunk else 1):
            m_block = int(rng.integers(0, -(-rows // tile_m)))
            first, last = _key_limits(np.arange(m_block * tile_m, (m_block + 1) * tile_m) // g, sq, sk, wl, wr, chunk)
            lo, hi = max(int(first.min()), 0) // tile_n, min(int(last.max()), sk - 1) // tile_n
            n_block = int(rng.integers(lo, hi + 1)) if trial and lo <= hi else int(rng.integers(0, -(-sk // tile_n)))
            out = torch.zeros(tile_m, width)
            masked(from_dlpack(out), Int32(rows), Int32(sk), Int32(wl), Int32(wr), Int32(chunk), Int32(m_block),
                   Int32(n_block))
            col = (n_block * tile_n + np.arange(width))[None, :]
            keep = torch.from_numpy((col < sk) & (col >= first[:, None]) & (col <= last[:, None]))
            assert torch.equal(out == 1.0, keep), (sq, sk, m_block, n_block)
            assert torch.equal(out[~keep], torch.full_like(out[~keep], -math.inf))


@pytest.mark.parametrize("g", [1, 3, 4])
@pytest.mark.parametrize("wl,wr", [(-1, -1), (-1, 0), (37, 11), (200, -1)])
@pytest.mark.parametrize("half", [False, True], ids=["block", "half"])
def test_mask_apply_on_the_host(g, wl, wr, half):
    _check_mask_apply(g, wl, wr, half)


# (g, window_left, window_right, attention_chunk): chunks below, across and above a 128-key
# block, alone, with causal, with a window on either side, GQA-packed rows.
CHUNK_CASES = [(1, -1, -1, 16), (1, -1, 0, 40), (3, -1, -1, 100), (4, 37, 11, 64), (1, 200, -1, 24),
               (8, -1, 0, 1), (3, -1, 0, 130), (1, 5, 300, 256)]


@pytest.mark.parametrize("g,wl,wr,chunk", CHUNK_CASES)
@pytest.mark.parametrize("half", [False, True], ids=["block", "half"])
def test_mask_apply_chunk_on_the_host(g, wl, wr, chunk, half):
    """apply with attention_chunk: a row keeps only its diagonal's chunk of keys, intersected with
    the window; positions before key 0 (Lq > Lk) have chunks that start below 0."""
    _check_mask_apply(g, wl, wr, half, chunk)


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


@pytest.mark.parametrize("g,wl,wr,chunk", CHUNK_CASES)
def test_mask_block_ranges_chunk_on_the_host(g, wl, wr, chunk):
    """The block bounds with attention_chunk, against brute force over the tile's rows
    (_key_limits, checked against fa3py.reference's mask): every kept key's block is visited, a
    tile of real rows that all keep keys visits exactly their blocks; blocks outside
    [left_masked, right_masked) are the only ones that hold a key outside some row's window and
    chunk; keys_end is the furthest kept key's end; launch.chunk_blocks bounds the range. Sizes with Lq > Lk (chunks starting below
    key 0), with chunk edges on block edges, and tiles that straddle a chunk edge."""
    tile_m, tile_n = 128, 64
    ranges = _block_ranges_fn(g, wl >= 0, wr >= 0, tile_m, tile_n, chunk=True)
    rng = np.random.default_rng()
    sizes = [(1, 1), (10, 1000), (77, 300), (300, 77), (129, 129), (256, 321), (512, 577), (100, 137),
             (300, 401), (64, 165), (700, 64), (1000, 1000)]
    for sq, sk in sizes + [tuple(int(x) for x in rng.integers(1, 700, 2)) for _ in range(3)]:
        _check_key_limits(sq, sk, wl, wr, chunk)
        rows = sq * g
        for m, (lo, hi, right_masked, left_masked, *keys_end) in enumerate(ranges(rows, sk, wl, wr, chunk)):
            assert hi - lo <= launch.chunk_blocks(chunk, tile_m, g, tile_n)  # (split-KV's tile length)
            for r, end in zip((tile_m // 2, tile_m), keys_end):
                _, last = _key_limits(np.arange(m * tile_m, m * tile_m + r) // g, sq, sk, wl, wr, chunk)
                assert end == min(sk, int(last.max()) + 1), (sq, sk, m, r)
            pos = np.arange(m * tile_m, min((m + 1) * tile_m, rows)) // g
            first, last = _key_limits(pos, sq, sk, wl, wr, chunk)
            first, last_in = np.maximum(first, 0), np.minimum(last, sk - 1)
            kept = first <= last_in
            if kept.any():
                blocks = np.concatenate([np.arange(a // tile_n, b // tile_n + 1)
                                         for a, b in zip(first[kept], last_in[kept])])
                assert lo <= blocks.min() and hi >= blocks.max() + 1, (sq, sk, m)
                if (m + 1) * tile_m <= rows and kept.all():
                    assert (lo, hi) == (blocks.min(), blocks.max() + 1), (sq, sk, m, lo, hi)
            # no key right of any row's limit below right_masked, none left of it from left_masked
            assert all((b + 1) * tile_n - 1 <= last.min() for b in range(lo, min(right_masked, hi))), (sq, sk, m)
            assert all(b * tile_n >= first.max() for b in range(max(left_masked, lo), hi)), (sq, sk, m)


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


def test_backward_lpt_order_on_the_host():
    """bwd_sm90.lpt_key_block (the backward's lpt grid), run by CuTe DSL's host JIT over every
    block index: a bijection onto the (n_block, KV pair, batch) CTAs; each pair's key blocks ascend
    with the block index (deterministic's waits are on lower n_blocks of the same pair, which must
    launch first); pairs outside the final section run their key blocks back to back from n_block
    0 (the longest causal ones); the final section takes key block by key block across its pairs."""
    from cutlass.cute.runtime import from_dlpack

    from cute_kernels.bwd_sm90 import lpt_key_block
    from cute_kernels.scheduler import lpt_tail_heads

    @cutlass.cute.jit
    def order(out: cutlass.cute.Tensor, blocks: cutlass.Int32, pairs: cutlass.Int32, batch: cutlass.Int32,
              tail: cutlass.Int32):
        for t in cutlass.range(out.shape[0]):
            n, p, b = lpt_key_block(t, blocks, pairs, batch, tail)
            out[t, 0] = n
            out[t, 1] = p
            out[t, 2] = b

    sms = 132
    for blocks, pairs, batch in [(16, 16, 8), (8, 4, 3), (1, 5, 2), (64, 16, 1), (5, 7, 3)]:
        tail = lpt_tail_heads(sms, blocks)  # bwd_sm90's __call__
        out = torch.zeros(blocks * pairs * batch, 3, dtype=torch.int32)
        order(from_dlpack(out), *(cutlass.Int32(x) for x in (blocks, pairs, batch, tail)))
        ctas = [tuple(r) for r in out.tolist()]
        assert sorted(ctas) == sorted(itertools.product(range(blocks), range(pairs), range(batch)))
        by_pair = {}
        for n, p, b in ctas:
            by_pair.setdefault((p, b), []).append(n)
        assert all(ns == sorted(ns) for ns in by_pair.values()), (blocks, pairs, batch)
        in_tail = min(tail, pairs * batch)
        first = (pairs * batch - in_tail) * blocks
        for i in range(0, first, blocks):  # the sections of one pair: its blocks 0 .. blocks - 1
            assert [n for n, _, _ in ctas[i:i + blocks]] == list(range(blocks)), (blocks, pairs, batch, i)
        final = [n for n, _, _ in ctas[first:]]
        assert final == sorted(final) and final[:in_tail] == [0] * in_tail  # key block by key block


@pytest.mark.parametrize("hdim,page_sizes", [
    (128, {8: True, 16: True, 32: True, 64: True, 128: True, 256: True, 384: True, 24: False, 4: False, 1: False,
           192: False, 200: False}),
    (256, {16: True, 64: True, 192: True, 48: False, 96: False}),  # tile_n 64
    (96, {8: True, 16: True, 56: True, 112: True, 224: True, 32: False, 128: False}),  # tile_n 112
])
def test_paged_page_sizes_served(hdim, page_sizes, monkeypatch):
    """why_not serves paged K / V whose pages tile the config's KV blocks (config.page_size_ok)
    and names the rule otherwise; never the backward, fp8=True or cu_seqlens_k. (With the opt-in on:
    launch.paged_enabled, FA3PY_CUTE_PAGED=1. The table's tiles: decoding's own, DECODE_TILE, is
    test_decode_tile_choice's.)"""
    monkeypatch.setattr(launch, "paged_enabled", True)
    monkeypatch.setattr(launch, "decode_tile_enabled", False)
    for page_size, served in page_sizes.items():
        q = torch.randn(2, 1, 8, hdim, dtype=torch.bfloat16)
        width = -(-1024 // page_size)  # > SHORT_SEQLEN_K keys: the table's tiles (hdim 96: 128 when short)
        pages = torch.randn(2 * width, page_size, 2, hdim, dtype=torch.bfloat16)
        table = torch.arange(2 * width, dtype=torch.int32).view(2, width)
        req = make_req(q, pages, pages, page_table=table, max_seqlen_k=width * page_size)
        reason = cute_kernels.why_not(req, backward=False)
        assert (reason == "cute_kernels: CUDA tensors only") == served, (page_size, reason)
        if not served:
            assert f"page_size {page_size}" in reason
        assert "forward only" in cute_kernels.why_not(req, backward=True)
        cfg = launch.config_for(req)
        assert cfg.page_size == page_size and launch._seqlens(req) == (1, width * page_size)


_SIGNATURE_CASES = {  # (batch or sequence lengths, sq, sk, h, hk, d, kwargs)
    "plain": ((2, 300, 500, 4, 4, 128), {}),
    "pack_gqa_decode": ((3, 1, 700, 8, 2, 128), {}),
    "pack_gqa_causal": ((2, 17, 130, 8, 1, 64), dict(causal=True)),
    "split_decode": ((1, 1, 9000, 8, 1, 128), {}),
    "padded_192x128": ((2, 100, 200, 4, 2, 160), dict(causal=True)),
}


@pytest.mark.parametrize("case", list(_SIGNATURE_CASES) + ["varlen", "varlen_seqused", "paged"]
                         + [f"qv_{c}" for c in _SIGNATURE_CASES if c != "padded_192x128"] + ["qv_varlen", "qv_paged"])
def test_tvm_ffi_call_matches_the_compiled_signature(case, monkeypatch):
    """`run`'s kernel call binds every symbol of the compiled signature (fake_args) to one size,
    as the TVM-FFI call checks on the GPU (tests/cute_emulation.py's tvm_ffi_signature_check)."""
    from cute_kernels import launch
    from fa3py.validation import make_request
    from tests._util import packed
    from tests.cute_emulation import tvm_ffi_signature_check

    dt = torch.bfloat16
    qv_dv = None
    if case.startswith("qv_"):  # MLA's qv beside q (hdim 64 x 512, or q's own head dim)
        monkeypatch.setattr(launch, "qv_enabled", True)
        monkeypatch.setattr(launch, "paged_enabled", True)
        case, qv_dv = case[3:], 512
    if case.startswith("varlen"):
        q, cu_q = packed([5, 300, 1, 0], 6, 64, dt, "cpu")
        k, cu_k = packed([9, 200, 700, 3], 2, 64, dt, "cpu")
        v, _ = packed([9, 200, 700, 3], 2, 64, dt, "cpu")
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=300, max_seqlen_k=700, causal=True)
        if case == "varlen_seqused":
            kw.update(seqused_q=torch.tensor([5, 200, 1, 0], dtype=torch.int32),
                      seqused_k=torch.tensor([9, 150, 600, 3], dtype=torch.int32))
        req = make_request(q, k, v, **kw)
    elif case == "paged":
        q = torch.randn(2, 1, 8, 128).to(dt)
        k, v = (torch.randn(12, 64, 2, 128).to(dt) for _ in range(2))
        req = make_req(q, k, v, page_table=torch.randperm(12)[:10].view(2, 5).to(torch.int32),
                       seqused_k=torch.tensor([300, 17], dtype=torch.int32), max_seqlen_k=320)
    else:
        (b, sq, sk, h, hk, d), kw = _SIGNATURE_CASES[case]
        dv = 128 if d == 160 else d
        q, k = torch.randn(b, sq, h, d).to(dt), torch.randn(b, sk, hk, d).to(dt)
        req = make_request(q, k, torch.randn(b, sk, hk, dv).to(dt), **kw)
    if qv_dv is not None:  # hdim 64 cases take V (and qv) 512 wide (o_split); the others keep V's width
        v = torch.randn(*req.v.shape[:-1], qv_dv).to(dt) if req.q.shape[-1] == 64 else req.v
        req = dataclasses.replace(req, v=v, qv=torch.randn(*req.q.shape[:-1], v.shape[-1]).to(dt))
        assert launch.config_for(req).qv and cute_kernels.why_not(req, False) == "cute_kernels: CUDA tensors only"
    checked = tvm_ffi_signature_check(monkeypatch)
    launch.run(req, launch.config_for(req))
    assert checked


@pytest.mark.parametrize("sq,dynamic", [(1, False), (4, False), (32, False), (33, True), (2048, True)])
def test_decoding_without_the_dynamic_scheduler(monkeypatch, sq, dynamic):
    """Causal GQA (32 / 8 heads, packed 4 rows a query): with one query tile per (batch, head)
    (sq * 4 <= 128 rows) every CTA takes one tile, and the config leaves the dynamic scheduler
    (its counter's memset node in a CUDA graph) out; FA3PY_CUTE_DECODE_STATIC=0 keeps it."""
    from fa3py.validation import make_request

    monkeypatch.setattr(launch, "decode_tile_enabled", False)  # (DECODE_TILE never takes the counter)
    q = torch.empty(2, sq, 32, 128, dtype=torch.bfloat16)
    k = torch.empty(2, 4096, 8, 128, dtype=torch.bfloat16)
    cfg = launch.config_for(make_request(q, k, k, causal=True))
    assert cfg.tile.dynamic == dynamic and (sq > 32 or cfg.pack_gqa == 4)
    monkeypatch.setattr(launch, "decode_static", False)
    assert launch.config_for(make_request(q, k, k, causal=True)).tile.dynamic


def test_decode_tile_choice(monkeypatch):
    """With launch.decode_tile_enabled (FA3PY_CUTE_DECODE_TILE, the default) a call whose GQA-packed
    query rows fit 64 and whose keys it splits takes config.DECODE_TILE (16-bit, hdim <= 128, pages
    that tile 64 keys); others keep their tiles (a batch that fills the GPU unsplit too); split-KV
    counts each SM once."""
    from cute_kernels.config import DECODE_TILE, num_splits_for
    from fa3py.validation import make_request

    monkeypatch.setattr(launch, "decode_tile_enabled", True)
    k = torch.empty(1, 8192, 4, 128, dtype=torch.bfloat16)

    def cfg(sq, heads=32, d=128, **kw):
        q = torch.empty(1, sq, heads, d, dtype=torch.bfloat16)
        kk = k if d == 128 else torch.empty(1, 8192, 4, d, dtype=torch.bfloat16)
        req = make_request(q, kk, kk, causal=True, **kw)
        return req, launch.config_for(req)

    req, c = cfg(1)
    t = c.tile
    assert (t.tile_m, t.tile_n, t.ctas_per_sm) == (DECODE_TILE.tile_m, DECODE_TILE.tile_n, 2) and c.pack_gqa == 8
    assert c.split_kv and not t.dynamic and not t.persistent
    assert launch.num_splits(req, c) == num_splits_for(4, 128, 132)  # (SMs counted once: timed so)
    assert cfg(8)[1].tile.tile_m == 64 and cfg(9)[1].tile.tile_m != 64  # 8 x 8 packed rows fit 64, 9 x 8 not
    assert cfg(1, d=256)[1].tile.tile_m != 64
    q64 = torch.empty(64, 1, 32, 128, dtype=torch.bfloat16)  # 256 tiles fill the GPU unsplit: the table tile
    assert launch.config_for(make_request(q64, k.expand(64, -1, -1, -1), k.expand(64, -1, -1, -1), causal=True)).tile.tile_m == 128
    # pages that tile its 64-key blocks (32, 192: not hdim 128's 128-key table tile's; 24: neither)
    for page, served in ((16, True), (32, True), (192, True), (256, True), (24, False)):
        width = -(-8192 // page)  # (keys enough to split)
        pool = torch.empty(2 * width, page, 4, 128, dtype=torch.bfloat16)
        table = torch.arange(2 * width, dtype=torch.int32).view(2, width)
        paged = make_req(torch.empty(2, 1, 32, 128, dtype=torch.bfloat16), pool, pool, window_right=0,
                         page_table=table, max_seqlen_k=width * page)
        c = launch.config_for(paged)
        assert (c.tile.tile_m == 64 and c.page_size == page) == served, (page, c.short())
    monkeypatch.setattr(launch, "decode_tile_enabled", False)
    assert cfg(1)[1].tile.tile_m == 128
