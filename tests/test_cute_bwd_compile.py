"""cute_kernels, compile-only: the sm90 backward kernel (bwd_sm90.py) built for sm_90a against fake
tensors (no GPU) over its config grid: every head dim and dtype with each feature, padded head
dims, checked for the required SASS (`cute_kernels.sass.check`: HGMMA, TMA loads, setmaxnreg,
dQ's bulk reduce, named barriers, pipelined WGMMAs) and no local memory. One compile per config,
2-5 s each."""

from __future__ import annotations

import collections
import functools
import itertools
import os
import re
import tempfile

import pytest

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

from cute_kernels import sass  # noqa: E402
from cute_kernels.config import BwdConfig  # noqa: E402

FEATURES = {
    "noncausal": {},
    "causal": dict(has_right=True),
    "local": dict(has_left=True, has_right=True),
    "softcap": dict(softcap=True),
    "varlen": dict(cu_seqlens_q=True, cu_seqlens_k=True),
    "seqused": dict(seqused_q=True, seqused_k=True),
}
GRID = [pytest.param(dtype, hdim, name, FEATURES[name], id=f"{dtype}-d{hdim}-{name}")
        for hdim, dtype, name in itertools.product((64, 96, 128), ("bf16", "fp16"), FEATURES)]
# hdim 128 with softcap and a mask kept 16-24 bytes of stack while d tanh lived in fp16 beside S^T
# and dP^T (3 STL, 6-9 LDL); it takes the two-pass softcap (softcap_two_pass) and keeps none.
SOFTCAP_MASKED = {
    "causal-softcap": dict(softcap=True, has_right=True),
    "local-softcap-varlen": dict(softcap=True, has_left=True, has_right=True, cu_seqlens_q=True, cu_seqlens_k=True),
    "chunk-softcap": dict(softcap=True, has_right=True, chunk=True),
}
GRID += [pytest.param("bf16", 128, name, features, id=f"bf16-d128-{name}") for name, features in SOFTCAP_MASKED.items()]


@functools.lru_cache(maxsize=None)
def compiled(cfg: BwdConfig) -> tuple[str, dict]:
    """(SASS, ptxas resources) of `cfg` compiled for sm_90a, once per config."""
    with tempfile.TemporaryDirectory() as d:
        cubin, _ = sass.compile_cubin(cfg, d)
        return sass.sass_text(cubin), sass.resource_usage(cubin)


def check_compiled(cfg: BwdConfig) -> tuple[str, dict]:
    text, res = compiled(cfg)
    missing = sass.check(text, cfg, res)  # with `res`: STACK / LOCAL / STL / LDL must be 0
    assert missing == [], f"{cfg.short()}: missing {missing}"
    return text, res


@pytest.mark.parametrize("dtype,hdim,name,features", GRID)
def test_compile_bwd(dtype, hdim, name, features):
    check_compiled(BwdConfig.make(dtype, hdim, **features))


@pytest.mark.parametrize("dtype,hdim,features", [
    ("bf16", 128, dict(has_right=True, chunk=True)),
    ("fp16", 64, dict(has_left=True, has_right=True, chunk=True, deterministic=True, cu_seqlens_q=True,
                      cu_seqlens_k=True)),
], ids=["bf16-d128-causal-chunk", "fp16-d64-local-chunk-deterministic-varlen"])
def test_compile_bwd_chunk(dtype, hdim, features):
    """attention_chunk (C a launch argument): the chunk's edges on top of causal (the hdim 128
    tile, most registers) and of a window with deterministic mode's semaphores and packed
    sequences; the required SASS, no local memory, registers under setmaxnreg's 240."""
    cfg = BwdConfig.make(dtype, hdim, **features)
    assert cfg.chunk and "chunk" in cfg.short()
    text, _ = check_compiled(cfg)
    assert sass.max_register(text) < cfg.consumer_regs


@pytest.mark.parametrize("dtype,hdim_in,features", [
    ("bf16", 80, dict(has_right=True)),
    ("fp16", 112, dict(cu_seqlens_q=True, cu_seqlens_k=True, seqused_k=True)),
], ids=["bf16-d80-causal", "fp16-d112-varlen-seqused"])
def test_compile_bwd_padded_headdims(dtype, hdim_in, features):
    """Head dims below the tile's run the next one up (as the forward): the tensors are compiled at
    their own head dim, TMA reads zeros past it, dK / dV stores stop at it."""
    from cute_kernels.config import padded_hdim

    cfg = BwdConfig.make(dtype, padded_hdim(hdim_in), hdim_in=hdim_in, **features)
    assert f"tensors_d{hdim_in}" in cfg.short()
    check_compiled(cfg)


DS_STAGES_GRID = [
    pytest.param(hdim, features, id=f"d{hdim}-{name}")
    for hdim in (64, 96, 128)
    for name, features in {"noncausal": {}, "causal": dict(has_right=True),
                           "local-varlen-deterministic": dict(has_left=True, has_right=True, cu_seqlens_q=True,
                                                              cu_seqlens_k=True, deterministic=True),
                           "causal-softcap": dict(has_right=True, softcap=True)}.items()
    if not (hdim == 64 and "softcap" in features)  # (bwd_launch.variants: 1 there, it spills)
]


@pytest.mark.parametrize("hdim,features", DS_STAGES_GRID)
def test_compile_bwd_ds_stages(hdim, features):
    """Two sdS buffers (ds_stages 2): the required SASS, no local memory, and half the PdS barriers
    of the one-buffer kernel (one a block instead of two: none before dS^T is written)."""
    from cute_kernels.utils import NamedBarrierBwd

    one = BwdConfig.make("bf16", hdim, **features)
    two = BwdConfig.make("bf16", hdim, ds_stages=2, **features)
    assert "ds2" in two.short() and "ds2" not in one.short()
    text, _ = check_compiled(two)
    pds = f"SYNC {hex(int(NamedBarrierBwd.PdS))}"
    assert 2 * sass.named_barrier_ids(text)[pds] == sass.named_barrier_ids(compiled(one)[0])[pds]


@pytest.mark.parametrize("hdim,features", [(64, dict(softcap=True)), (192, {}), (256, dict(has_right=True))],
                         ids=["d64-softcap", "d192", "d256-causal"])
def test_ds_stages_where_the_tile_takes_two(monkeypatch, hdim, features):
    """bwd_launch picks FA3PY_CUTE_BWD_DS_STAGES only where the tile takes two buffers: not the
    split_hdim tiles (one Q stage at 256; P^T in smem too), not hdim 64 with softcap (spills);
    BwdConfig refuses them."""
    from cute_kernels import bwd_launch

    monkeypatch.setattr(bwd_launch, "ds_stages", 2)
    assert bwd_launch.variants(hdim, features.get("softcap", False), False)["ds_stages"] == 1
    assert bwd_launch.variants(128, False, False)["ds_stages"] == 2
    if hdim != 64:
        with pytest.raises(AssertionError, match="ds_stages 2"):
            BwdConfig.make("bf16", hdim, ds_stages=2, **features)


DQ_RED_GRID = [
    pytest.param(hdim, features, id=f"d{hdim}-{name}")
    for hdim in (64, 96, 128, 192, 256)
    for name, features in {"noncausal": {}, "causal-varlen": dict(has_right=True, cu_seqlens_q=True,
                                                                 cu_seqlens_k=True)}.items()
] + [pytest.param(128, dict(has_right=True, ds_stages=2), id="d128-causal-ds2"),
     pytest.param(128, dict(has_right=True, softcap=True), id="d128-causal-softcap"),
     pytest.param(256, dict(has_left=True, has_right=True, chunk=True), id="d256-local-chunk")]


@pytest.mark.parametrize("hdim,features", DQ_RED_GRID)
def test_compile_bwd_dq_red(hdim, features):
    """dQ added from registers (dq_red): one red.global.add.v4.f32 (REDG ... ADD.F32) per 4 of a
    thread's dQ values (REDG.E.ADD.F32x4) in each copy of the block step and no bulk reduce (the dQ
    warp idles); no local memory; hdim 256 takes two Q / dO stages in the room sdQ left (64 KB);
    deterministic is refused (its adds are ordered)."""
    cfg = BwdConfig.make("bf16", hdim, dq_red=True, **features)
    assert "dq_red" in cfg.short() and cfg.q_stages == 2
    text, _ = check_compiled(cfg)
    ops = sass.opcode_counts(text, full=True)
    per_thread = cfg.tile_m * hdim // 256  # dQ values a consumer thread holds per block
    reds = text.count("REDG.E.ADD.F32x4")
    assert reds > 0 and reds % (per_thread // 4) == 0  # (per copy of the block step: masked ones, unmasked)
    assert not any(op.startswith("UBLKRED") for op in ops)
    with pytest.raises(AssertionError, match="dq_red"):
        BwdConfig.make("bf16", hdim, dq_red=True, deterministic=True)


def test_bwd_variants_by_default(monkeypatch):
    """The variants bwd_launch picks per head dim as timed on an H100 (env unset): two sdS buffers
    at hdim 64 (not with softcap), dQ from registers at hdim 96 and 256 (there with two Q / dO stages), never
    with deterministic; the environment's explicit choice applies to every head dim."""
    import torch

    from cute_kernels import bwd_launch
    from fa3py.validation import make_request

    monkeypatch.setattr(bwd_launch, "ds_stages", None)
    monkeypatch.setattr(bwd_launch, "dq_red", None)

    def cfg(d, **kw):
        x = torch.randn(1, 300, 2, d, dtype=torch.bfloat16)
        return bwd_launch.config_for(make_request(x, x, x, **kw))

    assert [cfg(d).ds_stages for d in (64, 96, 128, 256)] == [2, 1, 1, 1] and cfg(64, softcap=5.0).ds_stages == 1
    assert [cfg(d).dq_red for d in (64, 96, 128, 192, 256)] == [False, True, False, True, True]  # (192: dkvt's)
    assert cfg(192).dkv_transposed and not cfg(192, deterministic=True).dq_red
    assert cfg(96).q_stages == 2 and not cfg(96, deterministic=True).dq_red
    assert cfg(256).q_stages == 2 and not cfg(256, deterministic=True).dq_red and cfg(256, deterministic=True).q_stages == 1
    monkeypatch.setattr(bwd_launch, "dq_red", True)
    monkeypatch.setattr(bwd_launch, "ds_stages", 1)
    assert cfg(64).dq_red and cfg(64).ds_stages == 1


DKV_SMEM_GRID = {
    "d64-causal-varlen": ("bf16", 64, dict(has_right=True, cu_seqlens_q=True, cu_seqlens_k=True)),
    "d96-fp16-seqused-padded": ("fp16", 96, dict(seqused_q=True, seqused_k=True, hdim_in=80)),
    "d128": ("bf16", 128, {}),
    "d128-local-softcap-deterministic": ("bf16", 128, dict(has_left=True, has_right=True, softcap=True,
                                                           deterministic=True)),
    "d128-chunk-ds2": ("bf16", 128, dict(has_right=True, chunk=True, ds_stages=2)),
    # hdim 192's three-warpgroup tile (dK^T / dV^T: stmatrix.trans, 96 keys x 16-column slabs)
    "d192-dkvt": ("bf16", 192, dict(dkv_transposed=True)),
    "d176-dkvt-causal-varlen": ("bf16", 192, dict(dkv_transposed=True, has_right=True, cu_seqlens_q=True,
                                                  cu_seqlens_k=True, hdim_in=176)),
    # the split_hdim tiles (each warpgroup half of the columns): 256, deterministic's one Q stage, 192 x 128
    "d256-causal": ("bf16", 256, dict(has_right=True, dq_red=True)),
    "d256-fp16-deterministic": ("fp16", 256, dict(deterministic=True)),
    "d192x128": ("bf16", 192, dict(hdimv=128)),
}


@pytest.mark.parametrize("name", list(DKV_SMEM_GRID))
def test_compile_bwd_dkv_smem(name):
    """dK / dV through smem (dkv_smem) on every tile: the required SASS, no local memory (and, at
    trace time, `check_dkv_slabs`: each warp stages only its own slab), and dK / dV leave by
    stmatrix (more STSM than dS^T's / P^T's alone) and 16-byte stores only: each consumer thread's
    equal share of the keys x head dim blocks, tile_n x (hdim + hdimv) / 8 / threads STG.E.128 and
    no narrower store (without it: one 4-byte STG per two values, or with dK^T / dV^T one 2-byte
    STG per value)."""
    dtype, hdim, features = DKV_SMEM_GRID[name]
    cfg = BwdConfig.make(dtype, hdim, dkv_smem=True, **features)
    assert "dkv_smem" in cfg.short()
    text, _ = check_compiled(cfg)
    ops = sass.opcode_counts(text, full=True)
    stores = {op: n for op, n in ops.items() if op.startswith("STG")}
    threads = 128 * cfg.num_mma_wg
    assert stores == {"STG.E.128": cfg.tile_n * (hdim + (cfg.hdimv or hdim)) // 8 // threads}, stores
    plain = sass.opcode_counts(compiled(BwdConfig.make(dtype, hdim, **features))[0], full=True)
    assert sum(n for op, n in ops.items() if op.startswith("STSM")) > \
        sum(n for op, n in plain.items() if op.startswith("STSM"))


def test_dkv_smem_where_timed(monkeypatch):
    """bwd_launch.variants: dkv_smem by default on every tile (hdim 192's three-warpgroup and
    64 x 64 ones, 256's, 192 x 128's included) but the 80-row one non-causal (timed slower), never
    with head splits (float32 partials); the environment's choice on every tile; BwdConfig refuses
    partials."""
    from cute_kernels import bwd_launch

    monkeypatch.setattr(bwd_launch, "dkv_smem", None)
    monkeypatch.setattr(bwd_launch, "m80", None)
    long = bwd_launch.M80_MIN_SEQLEN_Q
    assert all(bwd_launch.variants(d, False, False).get("dkv_smem") for d in (64, 96, 128))
    assert all(bwd_launch.variants(d, True, True, True).get("dkv_smem") for d in (64, 96, 128))
    assert "dkv_smem" not in bwd_launch.variants(128, False, False, max_seqlen_q=long)  # the 80-row tile
    assert bwd_launch.variants(128, False, False, max_seqlen_q=long, has_right=True).get("dkv_smem")  # but causal
    assert all(bwd_launch.variants(d, False, False).get("dkv_smem") for d in (192, 256))
    assert bwd_launch.variants(192, False, False).get("dkv_transposed")
    assert bwd_launch.variants(192, False, True).get("dkv_smem")  # deterministic: the 64 x 64 tile
    assert bwd_launch.variants(192, False, False, hdimv=128).get("dkv_smem")
    assert not any("dkv_smem" in bwd_launch.variants(d, False, False, partial=True) for d in (64, 96, 128, 256))
    monkeypatch.setattr(bwd_launch, "dkv_smem", True)
    assert all(bwd_launch.variants(d, False, False).get("dkv_smem") for d in (64, 96, 128, 192, 256))
    assert bwd_launch.variants(128, False, False, max_seqlen_q=long).get("dkv_smem")
    assert not any("dkv_smem" in bwd_launch.variants(d, False, False, partial=True) for d in (64, 192, 256))
    monkeypatch.setattr(bwd_launch, "dkv_smem", False)
    assert not any("dkv_smem" in bwd_launch.variants(d, False, False) for d in (64, 96, 128))
    for d in (64, 128, 256):
        with pytest.raises(AssertionError, match="dkv_smem"):
            BwdConfig.make("bf16", d, dkv_smem=True, dkv_partial=True)


M80_GRID = {
    "noncausal": {}, "fp16": dict(dtype="fp16"), "causal": dict(has_right=True), "softcap": dict(softcap=True),
    "local-varlen": dict(has_left=True, has_right=True, cu_seqlens_q=True, cu_seqlens_k=True),
    "seqused-deterministic": dict(seqused_q=True, seqused_k=True, deterministic=True),
    "chunk-softcap": dict(has_right=True, chunk=True, softcap=True), "ds2": dict(ds_stages=2),
    "dq_red": dict(dq_red=True), "partial-padded": dict(dkv_partial=True, hdim_in=104),
}


@pytest.mark.parametrize("name", list(M80_GRID))
def test_compile_bwd_tile_m80(name):
    """hdim 128's 80-row tile (dQ^T = K^T dS^T): the required SASS and no local memory with every
    feature (softcap two-pass: one pass kept 224 bytes of stack); S^T / dP^T 64 x 80, dK / dV over
    K = 80 queries and dQ^T 64 x 80 per warpgroup: 34 HGMMAs a block step where 64 rows take 32."""
    features = dict(M80_GRID[name])
    dtype = features.pop("dtype", "bf16")
    cfg = BwdConfig.make(dtype, 128, tile_m=80, **features)
    text, _ = check_compiled(cfg)
    hgmma = [ln.split()[1] for ln in text.splitlines() if " HGMMA" in ln]
    assert {op.split(".")[1] for op in hgmma} <= {"64x80x16", "64x128x16"}
    if name == "noncausal":
        assert len(hgmma) == 34


DKVT_GRID = {
    "noncausal": {}, "fp16-causal": dict(dtype="fp16", has_right=True), "softcap": dict(softcap=True),
    "softcap-causal": dict(softcap=True, has_right=True), "seqused": dict(seqused_q=True, seqused_k=True),
    "chunk-causal": dict(has_right=True, chunk=True), "padded": dict(hdim_in=160),
}


@pytest.mark.parametrize("name", list(DKVT_GRID))
def test_compile_bwd_dkvt(name):
    """hdim 192's three-warpgroup tile (dkv_transposed): the required SASS, no local memory,
    setmaxnreg 24 / 160; per block step 12 + 12 HGMMA 64x32x16 (S, dP over the head dim), 6
    64x64x16 (dQ over 96 keys), 4 + 4 64x96x16 (dV^T, dK^T over 64 queries) in each copy of the
    step, and dQ's 8 REDG.F32x4 (32 values a thread), no bulk reduce. (A window with varlen, and
    dkv_partial, keep 8 bytes of stack in the epilogue: not in this grid.)"""
    features = dict(DKVT_GRID[name])
    dtype = features.pop("dtype", "bf16")
    text, res = check_compiled(BwdConfig.make(dtype, 192, dkv_transposed=True, **features))
    assert "USETMAXREG.DEALLOC.CTAPOOL 0x18" in text and "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xa0" in text
    shapes = collections.Counter(ln.split()[1].split(".")[1] for ln in text.splitlines() if " HGMMA" in ln)
    copies = shapes["64x32x16"] // 24
    assert copies >= 1 and shapes == {"64x32x16": 24 * copies, "64x64x16": 6 * copies, "64x96x16": 8 * copies}, shapes
    assert text.count("REDG.E.ADD.F32x4") == 8 * copies
    assert not any(op.startswith("UBLKRED") for op in sass.opcode_counts(text, full=True))


def test_compile_bwd_roles():
    """The warp roles in the SASS: setmaxnreg 24 for the producer warpgroup and 240 for the two
    consumer warpgroups, the dQ warp's bulk reduce-add of fp32 (one per consumer warpgroup), and
    the HGMMAs of the five GEMMs (S^T, dP^T, dV, dQ, dK) all 64 rows wide (keys or queries as M)."""
    text, res = check_compiled(BwdConfig.make("bf16", 128, has_right=True))  # shared with the grid's compile
    assert "USETMAXREG.DEALLOC.CTAPOOL 0x18" in text and "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xf0" in text
    ops = sass.opcode_counts(text, full=True)
    assert ops["UBLKRED.G.S.ADD.F32.RN"] == 2
    assert all(line.split()[1].startswith("HGMMA.64x") for line in text.splitlines() if " HGMMA" in line)
    assert res["REG"] == 168 and sass.max_register(text) < 240


def test_check_requires_the_dq_reduce_and_no_local_memory():
    """`check` on a backward: a missing dQ reduction and local memory are reported (SASS text made
    up here, no compile)."""
    cfg = BwdConfig.make("bf16", 64)
    body = ("/*0010*/ USETMAXREG.TRY_ALLOC.CTAPOOL 0xf0 ;\n/*0020*/ UTMALDG.2D [UR8], [UR4] ;\n"
            "/*0030*/ BAR.SYNC.DEFER_BLOCKING 0x1, 0x100 ;\n/*0040*/ WARPGROUP.ARRIVE ;\n"
            "/*0050*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;\n/*0060*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;\n")
    reduce = "/*0070*/ UBLKRED.G.S.ADD.F32.RN [UR4], [UR6], UR8 ;\n"
    assert sass.check(body + reduce, cfg, {"STACK": 0, "LOCAL": 0}) == []
    assert sass.check(body, cfg) == ["dQ reduction (UBLKRED or RED or REDG)"]
    atomics = body + "/*0070*/ REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;\n"
    assert sass.check(atomics, cfg) == []
    (spill,) = sass.check(body + reduce, cfg, {"STACK": 16, "LOCAL": 0})
    assert spill.startswith("no local memory (STACK 16")


OPT_IN_GRID = {
    "d128-noncausal": (128, {}), "d128-causal": (128, dict(has_right=True)),
    "d128-softcap-local": (128, dict(softcap=True, has_left=True, has_right=True)),
    "d96-causal-varlen": (96, dict(has_right=True, cu_seqlens_q=True, cu_seqlens_k=True)),
}


@pytest.mark.parametrize("name", list(OPT_IN_GRID))
def test_compile_bwd_stat_regs_dv_early(name):
    """The 64-row tiles with LSE / dPsum read into registers under the GEMMs (stat_regs 16) and dV
    issued before dP's wait (dv_early): the required SASS, pipelined HGMMAs, no local memory; in
    the block step dV's GEMM (the first with a register A operand, P^T) comes after every exp2 and
    before dS^T's stmatrix (without dv_early it follows that store, as in hdim 128's masked
    softcap, whose two-pass step makes P^T with dS^T: dv_early does not apply there)."""
    hdim, features = OPT_IN_GRID[name]
    cfg = BwdConfig.make("bf16", hdim, stat_regs=16, dv_early=True, **features)
    assert "stat_regs16 dv_early" in cfg.short() and cfg.tile_m == 64
    text, _ = check_compiled(cfg)
    start, end, _ = min((lp for lp in sass.hgmma_loops(text) if lp[2]["MUFU"] >= 32), key=lambda lp: lp[1] - lp[0])
    body = [ln for ln in text.splitlines() if (m := re.search(r"/\*([0-9a-f]{4,})\*/", ln))
            and start <= int(m.group(1), 16) <= end]
    exps = [i for i, ln in enumerate(body) if "MUFU.EX2" in ln]
    rs = [i for i, ln in enumerate(body) if re.search(r"HGMMA\.\S+ R\d+, R\d+,", ln)]
    stsm = [i for i, ln in enumerate(body) if "STSM" in ln]
    assert exps and rs and stsm, (len(exps), rs[:2], stsm[:1])
    if features.get("softcap"):  # (two-pass: dV after the store)
        assert stsm[0] < rs[0], (rs[:2], stsm[:1])
    else:
        assert max(exps) < rs[0] < stsm[0], (len(exps), rs[:2], stsm[:1])


def test_bwd_stat_regs_dv_early_where_offered(monkeypatch):
    """By default stat_regs 16 and dv_early on hdim 128's 64-row tile only (not the 80-row one, not
    with softcap; absent from the other configs' keys); set by the environment, stat_regs reaches
    every tile and dv_early the 64-row tiles (hdim 96 / 128: at 80 and 128 rows it spills and
    serializes the WGMMAs) without softcap; dv_early with P^T in smem is refused."""
    import torch

    from cute_kernels import bwd_launch
    from fa3py.validation import make_request

    def cfg(d, s=300, **kw):
        x = torch.randn(1, s, 2, d, dtype=torch.bfloat16)
        return bwd_launch.config_for(make_request(x, x, x, **kw))

    long = bwd_launch.M80_MIN_SEQLEN_Q
    monkeypatch.setattr(bwd_launch, "stat_regs", None)
    monkeypatch.setattr(bwd_launch, "dv_early", None)
    assert [(cfg(d).stat_regs, cfg(d).dv_early) for d in (64, 96, 128, 192, 256)] == \
        [(0, False), (0, False), (16, True), (0, False), (0, False)]
    assert "stat_regs" not in bwd_launch.variants(96, False, False) and cfg(128, softcap=5.0).stat_regs == 0
    assert cfg(128, s=long).tile_m == 80 and (cfg(128, s=long).stat_regs, cfg(128, s=long).dv_early) == (0, False)
    monkeypatch.setattr(bwd_launch, "stat_regs", 16)
    monkeypatch.setattr(bwd_launch, "dv_early", True)
    assert [cfg(d).stat_regs for d in (64, 96, 128, 192, 256)] == [16] * 5
    assert [cfg(d).dv_early for d in (64, 96, 128, 192, 256)] == [False, True, True, False, False]
    assert cfg(128, s=long).tile_m == 80 and not cfg(128, s=long).dv_early and not cfg(128, softcap=5.0).dv_early
    monkeypatch.setattr(bwd_launch, "stat_regs", 0)
    monkeypatch.setattr(bwd_launch, "dv_early", False)
    assert (cfg(128).stat_regs, cfg(128).dv_early) == (0, False)
    with pytest.raises(AssertionError, match="dv_early"):
        BwdConfig.make("bf16", 256, dv_early=True)


@pytest.mark.parametrize("dtype,hdim,features", [
    ("bf16", 128, dict(has_right=True)),
    ("fp16", 64, dict(has_right=True, deterministic=True, cu_seqlens_q=True, cu_seqlens_k=True)),
    ("bf16", 192, dict(has_right=True, dkv_transposed=True)),
    ("bf16", 256, dict(has_left=True, has_right=True, dq_red=True)),
], ids=["bf16-d128-causal", "fp16-d64-causal-deterministic-varlen", "bf16-d192-dkvt-causal", "bf16-d256-local"])
def test_compile_bwd_lpt(dtype, hdim, features):
    """lpt (key blocks in the forward's longest-first order, a 1-D grid): the required SASS, no local
    memory, and the same GEMMs as the plain grid's kernel (the order changes which CTA does what,
    not what a CTA does)."""
    plain = BwdConfig.make(dtype, hdim, **features)
    cfg = BwdConfig.make(dtype, hdim, lpt=True, **features)
    assert "lpt" in cfg.short() and "lpt" not in plain.short()
    text, _ = check_compiled(cfg)
    assert sass.opcode_counts(text)["HGMMA"] == sass.opcode_counts(compiled(plain)[0])["HGMMA"]


def test_lpt_where_asked(monkeypatch):
    """bwd_launch.config_for: lpt (by default; FA3PY_CUTE_BWD_LPT=0 sets `lpt` off) only with a
    right edge (causal, a right window: key blocks shorten with n_block); BwdConfig refuses it
    without one."""
    import torch

    from cute_kernels import bwd_launch
    from fa3py.validation import make_request

    def cfg(**kw):
        x = torch.randn(1, 300, 2, 128, dtype=torch.bfloat16)
        return bwd_launch.config_for(make_request(x, x, x, **kw))

    # the defaults, where the environment leaves them
    assert bwd_launch.lpt or "FA3PY_CUTE_BWD_LPT" in os.environ
    assert bwd_launch.post_dq_smem or "FA3PY_CUTE_BWD_POST_SMEM" in os.environ
    monkeypatch.setattr(bwd_launch, "lpt", False)
    assert not cfg(causal=True).lpt
    monkeypatch.setattr(bwd_launch, "lpt", True)
    assert cfg(causal=True).lpt and cfg(window_size=(64, 0)).lpt and cfg(causal=True, deterministic=True).lpt
    assert not cfg().lpt and not cfg(window_size=(64, -1)).lpt
    with pytest.raises(AssertionError, match="lpt"):
        BwdConfig.make("bf16", 128, lpt=True)


@pytest.mark.parametrize("dtype,hdim,features", [
    ("bf16", 128, dict(has_right=True, dkv_smem=True)),
    ("fp16", 64, dict(deterministic=True, cu_seqlens_q=True, cu_seqlens_k=True)),
    ("bf16", 192, dict(dkv_transposed=True)),
    ("bf16", 256, dict(has_left=True, has_right=True, dq_red=True)),
], ids=["bf16-d128-causal-dkvsmem", "fp16-d64-deterministic-varlen", "bf16-d192-dkvt", "bf16-d256-local-dqred"])
def test_compile_bwd_pdl(dtype, hdim, features):
    """pdl (programmatic dependent launch): griddepcontrol.wait (SASS ACQBULK) in the producer
    before the first block's LSE_log2 / dPsum, at the dQ warp's start (none with dq_red: no dQ
    warp) and before the consumers' dK / dV stores; none in the plain kernel, whose GEMMs and
    loads pdl leaves as they were."""
    plain = BwdConfig.make(dtype, hdim, **features)
    cfg = BwdConfig.make(dtype, hdim, pdl=True, **features)
    assert "pdl" in cfg.short() and "pdl" not in plain.short()
    text, _ = check_compiled(cfg)
    ops, plain_ops = sass.opcode_counts(text), sass.opcode_counts(compiled(plain)[0])
    # the producer's wait sits in load_rows, which Q and dO each inline once
    assert ops["ACQBULK"] == 2 + (0 if cfg.dq_red else 1) + 1 and plain_ops["ACQBULK"] == 0
    for op in ("HGMMA", "UTMALDG", "UBLKCP"):
        assert ops[op] == plain_ops[op], op


def test_pdl_where_asked(monkeypatch):
    """bwd_launch.config_for: pdl only with FA3PY_CUTE_BWD_PDL=1 (`pdl`; timed level, off by default),
    for every feature; the pre- and post-processing's configs follow the main kernel's."""
    import torch

    from cute_kernels import bwd_launch
    from cute_kernels.bwd_prepost import BwdRowsConfig
    from fa3py.validation import make_request

    def cfg(**kw):
        x = torch.randn(1, 300, 2, 128, dtype=torch.bfloat16)
        return bwd_launch.config_for(make_request(x, x, x, **kw))

    monkeypatch.setattr(bwd_launch, "pdl", False)
    assert not cfg().pdl and not cfg(causal=True).pdl
    monkeypatch.setattr(bwd_launch, "pdl", True)
    assert cfg().pdl and cfg(causal=True, deterministic=True).pdl and cfg(window_size=(64, 3)).pdl
    assert all(BwdRowsConfig.of(kind, cfg()).pdl for kind in ("pre", "post"))
    assert not BwdRowsConfig.of("pre", BwdConfig.make("bf16", 128)).pdl


def _hgmma_between_exp2_and_stsm(text: str) -> int:
    """HGMMA instructions from the first MUFU.EX2 (the first query block's P^T) to the next STSM
    (its dS^T into smem): the GEMMs a consumer issues before meeting the other warpgroup at sdS."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if "MUFU.EX2" in line)
    stsm = next(i for i in range(first, len(lines)) if "STSM" in lines[i])
    return sum("HGMMA" in line for line in lines[first:stsm])


@pytest.mark.parametrize("hdim,features", [
    (128, dict(stat_regs=16, dv_early=True)), (64, dict(has_right=True, cu_seqlens_q=True, cu_seqlens_k=True)),
    (96, dict(has_left=True, has_right=True, softcap=True)), (128, dict(softcap=True, has_right=True)),
], ids=["d128-default", "d64-causal-varlen", "d96-local-softcap", "d128-softcap-causal"])
def test_compile_bwd_dk_early(hdim, features):
    """dk_early: dK += dS^T Q issued before dS^T's stmatrix (more HGMMAs between the first exp2 and
    the STSM than in the plain kernel), the required SASS (pipelined WGMMAs, no local memory), and
    the same GEMMs."""
    plain = BwdConfig.make("bf16", hdim, **features)
    cfg = BwdConfig.make("bf16", hdim, dk_early=True, **features)
    assert "dk_early" in cfg.short()
    text, _ = check_compiled(cfg)
    plain_text = compiled(plain)[0]
    assert sass.opcode_counts(text)["HGMMA"] == sass.opcode_counts(plain_text)["HGMMA"]
    assert _hgmma_between_exp2_and_stsm(text) > _hgmma_between_exp2_and_stsm(plain_text)


def test_dk_early_where_asked(monkeypatch):
    """bwd_launch.variants: dk_early only with FA3PY_CUTE_BWD_DK_EARLY=1 (`dk_early`; untimed, off by
    default), on the 64 / 128-row tiles of hdim 64-128 (not the 80-row one: it spills there, nor
    hdim 192 / 256, whose dS^T goes through smem); BwdConfig refuses it where dS^T is in smem."""
    from cute_kernels import bwd_launch

    monkeypatch.setattr(bwd_launch, "m80", None)
    monkeypatch.setattr(bwd_launch, "dk_early", False)
    assert not any("dk_early" in bwd_launch.variants(d, False, False) for d in (64, 96, 128, 192, 256))
    monkeypatch.setattr(bwd_launch, "dk_early", True)
    assert all(bwd_launch.variants(d, False, False).get("dk_early") for d in (64, 96, 128))
    assert all(bwd_launch.variants(d, True, True, True).get("dk_early") for d in (64, 96, 128))
    assert "dk_early" not in bwd_launch.variants(128, False, False, max_seqlen_q=bwd_launch.M80_MIN_SEQLEN_Q)
    assert not any("dk_early" in bwd_launch.variants(d, False, False) for d in (192, 256))
    for d in (192, 256):
        with pytest.raises(AssertionError, match="dk_early"):
            BwdConfig.make("bf16", d, dk_early=True)
