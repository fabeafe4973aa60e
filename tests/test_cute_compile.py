"""cute_kernels, compile-only: the sm90 forward kernel built for sm_90a against fake tensors (no
GPU) over a representative config grid, with SASS checks (HGMMA, UTMALDG, USETMAXREG, named BAR
ids, no spills, the schedule's waits) and resource checks."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

from cute_kernels import sass  # noqa: E402
from cute_kernels.config import SHORT_TILES, FwdConfig, tile_from_spec, tile_variant  # noqa: E402


def _compile_and_check(cfg: FwdConfig, text_out: list | None = None, res_out: list | None = None):
    """Compile `cfg` for sm_90a, check its SASS, return its opcode counts (the SASS text appended
    to `text_out`, ptxas's resource usage to `res_out`, when given)."""
    with tempfile.TemporaryDirectory() as d:
        cubin, _ = sass.compile_cubin(cfg, d)
        text = sass.sass_text(cubin)
        res = sass.resource_usage(cubin)
    if text_out is not None:
        text_out.append(text)
    if res_out is not None:
        res_out.append(res)
    missing = sass.check(text, cfg, res)  # with `res`: the setmaxnreg split fits, no local memory
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
    assert sass.check(text, cfg, res) == []
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


@pytest.mark.parametrize("hdim,hdimv,features", [
    (64, 256, {}), (64, 256, dict(has_right=True, softcap=True, split_kv=True, pack_gqa=4)),
    (64, 256, dict(page_size=64, has_right=True, seqused_k=True)), (64, 256, dict(intra_wg_overlap=False, has_left=True,
                                                                                  has_right=True)),
    (128, 128, dict(has_right=True, softcap=True)), (128, 128, dict(chunk=True, cu_seqlens_q=True, cu_seqlens_k=True)),
    (96, 96, dict(has_right=True, softcap=True)), (64, 64, dict(has_right=True, cu_seqlens_q=True, cu_seqlens_k=True)),
    (64, 512, {}), (64, 512, dict(has_right=True, softcap=True, split_kv=True, pack_gqa=8)),
    (64, 512, dict(page_size=64, has_right=True, seqused_k=True)),
])
def test_compile_qv(hdim, hdimv, features):
    """MLA's qv: S's WGMMA group gains Qv V^T's hdim_v / 16 k-blocks wherever S is issued (the
    overlapped schedule's first block and its steps, one inlined step per mask kind), against the
    same config without qv (hdim_v 512, o_split: against 64 x 256); spill-free over QV_HDIM_PAIRS
    with causal / local / softcap / split / paged / varlen; one more TMA load (Qv)."""
    cfg = FwdConfig.make("bf16", hdim, hdimv, qv=True, **features)
    ops = _compile_and_check(cfg)
    if cfg.tile.o_split > 1:
        # hdim_v 512 (two warpgroups per slab, 256 columns of O each): against 64 x 256 with qv,
        # whose PV has the same 256-wide WGMMAs, S has 16 k-blocks more wherever it is issued
        without, per_site = sass.opcode_counts(_sass_of(FwdConfig.make("bf16", 64, 256, qv=True, **features))), 16
    else:
        without, per_site = sass.opcode_counts(_sass_of(dataclasses.replace(cfg, qv=False))), hdimv // 16
    added = ops["HGMMA"] - without["HGMMA"]
    s_sites, rest = divmod(added, per_site)
    assert rest == 0 and s_sites >= (2 if cfg.tile.intra_wg_overlap else 1), (cfg.short(), added)
    assert ops["UTMALDG"] > without["UTMALDG"], cfg.short()


def _sass_of(cfg: FwdConfig) -> str:
    with tempfile.TemporaryDirectory() as d:
        return sass.sass_text(sass.compile_cubin(cfg, d)[0])


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


@pytest.mark.parametrize("hdim,features", [
    (128, dict(has_right=True)), (128, {}), (64, {}), (64, dict(has_right=True)),
    (128, dict(has_left=True, has_right=True)), (64, dict(has_right=True, short=True)),
    (128, dict(has_right=True, short=True, pack_gqa=4)), (128, dict(split_kv=True, pack_gqa=8)),
    (64, dict(split_kv=True, has_right=True)), (256, dict(has_right=True)),
    (96, dict(cu_seqlens_q=True, cu_seqlens_k=True, seqused_k=True)),
], ids=["causal128", "chunk128", "chunk64", "causal64", "local128", "causal64_short_plain", "causal128_pack4",
        "split128_pack8", "split64_causal", "causal256", "varlen96"])
def test_compile_chunk(hdim, features):
    """attention_chunk: spill-free with causal, alone, with a window, GQA packing, split-KV, the
    plain schedule with diag_half, varlen; the chunk's edges are a window's two edges, so the KV
    loops are a local kernel's (last block, right-edge blocks, interior, left-edge blocks)."""
    cfg = FwdConfig.make("bf16", hdim, chunk=True, **features)
    assert cfg.tile.dynamic == (cfg.tile.num_mma_wg == 2)  # (3 WGs with a left edge: single tiles)
    text = []
    _compile_and_check(cfg, text)
    local = dataclasses.replace(cfg, chunk=False, has_left=True, has_right=True)
    _compile_and_check(local, text)
    assert len(sass.hgmma_loops(text[0])) == len(sass.hgmma_loops(text[1])), cfg.short()


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


def test_compile_tvm_ffi():
    """The TVM-FFI calling path: one compile against symbolic shapes, torch's stream from env."""
    pytest.importorskip("tvm_ffi")
    import cutlass.cute as cute

    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    cfg = FwdConfig.make("fp16", 128, has_right=True, cu_seqlens_q=True, cu_seqlens_k=True)
    fn = cute.compile(FlashAttentionForwardSm90(cfg), *FlashAttentionForwardSm90.fake_args(cfg, env_stream=True),
                      options="--enable-tvm-ffi --gpu-arch=sm_90a")
    assert callable(fn)


PAGED = [
    # (hdim, tensors' hdim, page_size, features): boxes per block = tile_n / page_size
    (128, 128, 16, dict(split_kv=True, pack_gqa=8)),  # 8 boxes, flash_attn_with_kvcache's decode
    (128, 128, 64, dict(pack_gqa=4, has_right=True, cu_seqlens_q=True)),  # 2 boxes, varlen q, causal
    (128, 128, 256, dict(split_kv=True, pack_gqa=8)),  # one box, two blocks a page
    (64, 64, 128, dict(has_right=True)),  # one box a block (tile 192x128, 3 consumer WGs)
    (256, 256, 16, dict(split_kv=True)),  # 4 boxes of 16 rows (tile_n 64, O in two chunks)
    (96, 80, 56, dict(pack_gqa=2)),  # tile_n 112: 2 boxes; head dim padded (TMA zero fill)
]


@pytest.mark.parametrize("hdim,d,page_size,features", PAGED,
                         ids=[f"d{d}-page{p}-" + "-".join(f) for _, d, p, f in PAGED])
def test_compile_paged(hdim, d, page_size, features):
    """Paged K / V: the producer's TMAs, one per page box (two 64-column boxes per row tile at
    hdim >= 128), its page table reads (one LDG per load site, lane-parallel) and shuffles, no spills
    at 32 producer registers, and a setmaxnreg split the launch's registers hold (32 + 2 x 240
    did not: the consumers' TRY_ALLOC loop waited forever, the paged tests' stall on H100 / H200)."""
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    cfg = FwdConfig.make("bf16", hdim, seqused_k=True, page_size=page_size, hdim_in=0 if d == hdim else d,
                         hdimv_in=0 if d == hdim else d, **features)
    kernel = FlashAttentionForwardSm90(cfg)
    assert kernel.pages_per_block == max(1, cfg.tile.tile_n // page_size) and cfg.tile.producer_regs == 32
    text = []
    ops = _compile_and_check(cfg, text)  # with the register pool: 32 + 2 x 232 or 32 + 3 x 160
    assert "USETMAXREG.DEALLOC.CTAPOOL 0x20" in text[0]
    contiguous = _compile_and_check(dataclasses.replace(cfg, page_size=0))
    # K and V each load at two sites (the tile's first block and the loop), unrolled per box
    assert ops["UTMALDG"] > contiguous["UTMALDG"] or kernel.pages_per_block == 1
    assert (ops["SHFL"] > contiguous["SHFL"]) == (kernel.pages_per_block > 1)
    # the page table is read a block ahead, not between a stage's wait and its TMA (page_of)
    assert sass.loads_after_waits(text[0]) == []


def test_loads_after_waits_finds_a_load_between_a_wait_and_its_use():
    """`sass.loads_after_waits` on made-up SASS: an LDG between a stage wait and its TMA, or
    between a GEMM's wait and the exp2s, is reported; one before the wait, or one after the
    wait whose window closes at the next GEMMs, is not."""
    def text(*ops):
        return "".join(f"/*{16 * (i + 1):04x}*/ {op} ;\n" for i, op in enumerate(ops))

    wait, tma = "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2", "UTMALDG.4D [UR8], [UR16], desc[URZ]"
    ldg, depbar, ex2 = "LDG.E R3, desc[UR6][R2.64]", "WARPGROUP.DEPBAR.LE gsb0, 0x1", "MUFU.EX2 R4, R4"
    assert sass.loads_after_waits(text(wait, ldg, tma)) == ["SYNCS.PHASECHK.TRANS64.TRYWAIT@0x10: LDG@0x20"]
    assert sass.loads_after_waits(text(ldg, wait, tma)) == []
    assert sass.loads_after_waits(text(depbar, "FMNMX R1, R2, R3, !PT", ldg, ex2)) == \
        ["WARPGROUP.DEPBAR.LE@0x10: LDG@0x30"]
    assert sass.loads_after_waits(text(depbar, ldg, "WARPGROUP.ARRIVE", ex2)) == []
    assert sass.loads_after_waits(text(depbar, "@!P0 LDG.E R5, desc[UR6][R2.64]", "STSM.16.M88.4 [R1], R4")) == \
        ["WARPGROUP.DEPBAR.LE@0x10: LDG@0x20"]


def test_check_rejects_a_setmaxnreg_split_past_the_launch_registers():
    """`check` with ptxas's resources: a split whose consumers ask for more than the producer
    frees of the launch's REG x threads is reported (it hangs on the GPU); FA3's splits pass.
    The config refuses such a split before any compile (SASS made up here)."""
    from cute_kernels.config import TileConfig, check_reg_split, launch_regs

    cfg = FwdConfig.make("bf16", 128)  # 2 consumer warpgroups, 384 threads
    assert cfg.tile.num_threads == 384 and launch_regs(384) == 168 and launch_regs(512) == 128

    def sass_with(dealloc: int, alloc: int) -> str:
        return (f"/*0010*/ USETMAXREG.DEALLOC.CTAPOOL {dealloc:#x} ;\n"
                f"/*0020*/ USETMAXREG.TRY_ALLOC.CTAPOOL UP0, {alloc:#x} ;\n")

    assert sass.register_pool_overdrawn(sass_with(24, 240), {"REG": 168}, cfg) is None
    assert sass.register_pool_overdrawn(sass_with(32, 232), {"REG": 168}, cfg) is None
    found = sass.register_pool_overdrawn(sass_with(32, 240), {"REG": 168}, cfg)
    assert found and "512 > 3 x REG 168 = 504" in found
    assert sass.register_pool_overdrawn(sass_with(24, 240), {"REG": 160}, cfg)  # a smaller launch
    assert any("hangs" in m for m in sass.check(sass_with(32, 240), cfg, {"REG": 168}))
    with pytest.raises(AssertionError, match="wait forever"):
        dataclasses.replace(cfg.tile, producer_regs=32)
    with pytest.raises(AssertionError, match="wait forever"):
        check_reg_split(32, 168, 3, "tile_m 192")
    check_reg_split(32, 160, 3, "tile_m 192")
    assert isinstance(dataclasses.replace(cfg.tile, producer_regs=32, consumer_regs=232), TileConfig)


DECODE_GRID = {
    "d128-causal-split-pack4": (128, dict(has_right=True, split_kv=True, pack_gqa=4, seqused_q=True, seqused_k=True)),
    "d128-paged16": (128, dict(has_right=True, split_kv=True, pack_gqa=4, seqused_k=True, page_size=16)),
    "d128-paged256-nosplit": (128, dict(has_right=True, pack_gqa=4, seqused_k=True, page_size=256)),
    "d64-pack8-local": (64, dict(has_left=True, has_right=True, split_kv=True, pack_gqa=8, seqused_k=True)),
    "d96-softcap-varlen": (96, dict(has_right=True, softcap=True, split_kv=True, cu_seqlens_q=True, cu_seqlens_k=True)),
}


@pytest.mark.parametrize("name", list(DECODE_GRID))
def test_compile_decode_tile(name):
    """config.DECODE_TILE (one consumer warpgroup of 64 rows, 64-key blocks, two CTAs an SM): the
    required SASS without the ring's named barriers, no local memory, ptxas's launch allocation
    128 registers a thread (the min-blocks-per-SM of two) and setmaxnreg 24 / 232 (paged: 32 / 224),
    the whole pool of 2 x 128; the consumer's code within its 232."""
    hdim, features = DECODE_GRID[name]
    cfg = FwdConfig.make("bf16", hdim, decode=True, **features)
    t = cfg.tile
    assert (t.tile_m, t.tile_n, t.num_mma_wg, t.ctas_per_sm, t.persistent, t.dynamic) == (64, 64, 1, 2, False, False)
    texts, res = [], []
    _compile_and_check(cfg, texts, res)
    assert res[0]["REG"] == 128 and sass.max_register(texts[0]) < t.consumer_regs
    producer, consumer = (32, 224) if cfg.page_size else (24, 232)
    assert (t.producer_regs, t.consumer_regs) == (producer, consumer)
    assert f"USETMAXREG.DEALLOC.CTAPOOL {producer:#x}" in texts[0]
    assert f"USETMAXREG.TRY_ALLOC.CTAPOOL UP0, {consumer:#x}" in texts[0]
    assert sass.loads_after_waits(texts[0]) == []  # paged: page-table reads a block ahead
    with pytest.raises(AssertionError, match="DECODE_TILE"):
        FwdConfig.make("bf16", 256, decode=True)
