"""cute_kernels' FP8 forward, compile-only: the e4m3 configs of the sm90 kernel built for sm_90a
against fake tensors (no GPU), with their SASS checked: FP8 WGMMAs (QGMMA) and no 16-bit ones
(HGMMA), TMA loads, setmaxnreg, a named barrier, pipelined WGMMAs, no local-memory spills, and
P converted without shuffles in the KV loop."""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import tempfile

import pytest
import torch

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

from cute_kernels import sass  # noqa: E402
from cute_kernels.config import SHORT_FIRST_FP8, FwdConfig  # noqa: E402
from tests._util import fp8_emulated_pair, p_flip_bound  # noqa: E402
from tests.cute_emulation import emulated_sm90  # noqa: E402,F401  (a fixture, by name)


def _compile(cfg: FwdConfig):
    with tempfile.TemporaryDirectory() as d:
        cubin, _ = sass.compile_cubin(cfg, d)
        text = sass.sass_text(cubin)
        res = sass.resource_usage(cubin)
    return text, res


# (hdim, v_scaling, features): block V scaling (a second accumulator) up to hdim 128, channel V
# at every head dim (FwdConfig.make's FP8 lines pick the tiles).
FP8_GRID = [
    (128, "block", dict()),
    (128, "block", dict(has_right=True)),
    (128, "channel", dict()),
    (128, "block", dict(has_left=True, has_right=True)),
    (64, "block", dict()),
    (64, "block", dict(has_right=True)),
    (96, "block", dict()),
    (96, "channel", dict(has_right=True)),
    (192, "channel", dict()),
    (256, "channel", dict(has_right=True)),
    (128, "block", dict(short=True, medium=True)),  # two Q stages
    (64, "block", dict(has_right=True, short=True)),
    (192, "block", dict(hdimv=128, has_right=True)),
    # softcap (tanh of the scaled score, then softcap * log2(e)), GQA packing, split-KV's float32
    # partials, and channel V with softcap and a window (FA3's float8 inputs take channel V)
    (128, "block", dict(softcap=True, has_right=True)),
    (128, "block", dict(pack_gqa=4)),
    (128, "block", dict(split_kv=True, has_right=True)),
    (256, "channel", dict(split_kv=True, pack_gqa=4, softcap=True)),
    (64, "block", dict(pack_gqa=8, has_right=True, short=True)),
    (128, "channel", dict(softcap=True, has_left=True, has_right=True)),
    # varlen: packed operands' scales from each sequence's columns, packed V^T from its 16-aligned
    # column; seqused
    (128, "block", dict(cu_seqlens_q=True, cu_seqlens_k=True, has_right=True)),
    (128, "block", dict(seqused_q=True, seqused_k=True)),
    (64, "block", dict(cu_seqlens_q=True, cu_seqlens_k=True, pack_gqa=4, short=True, has_right=True)),
    (256, "channel", dict(cu_seqlens_q=True, cu_seqlens_k=True, seqused_k=True, split_kv=True)),
    # channel V's FA3 tiles (config.fp8_tile): hdim 128 128x224, hdim 64 three WGs
    (64, "channel", dict()),
    (128, "channel", dict(softcap=True)),
    (128, "channel", dict(cu_seqlens_q=True, cu_seqlens_k=True, pack_gqa=4, has_right=True)),
    (128, "channel", dict(split_kv=True, seqused_k=True)),
    # softcap + split-KV + GQA packing on the 224-key tile: unpinned descriptors (72 bytes of stack pinned)
    (128, "channel", dict(softcap=True, split_kv=True, pack_gqa=4)),
    # attention_chunk: one more bound on the KV-block range and the masks (mask.AttentionMask)
    (128, "channel", dict(chunk=True, has_right=True)),
    (64, "block", dict(chunk=True, has_left=True, has_right=True, split_kv=True)),
    (256, "channel", dict(chunk=True, has_right=True, cu_seqlens_q=True, cu_seqlens_k=True, softcap=True)),
    # long causal hdim 256: one tile a CTA with TMA stores (FwdConfig.make's fp8_grid); 192's TMA stores
    (256, "channel", dict(has_right=True, long_causal=True)),
    (192, "channel", dict(has_right=True, cu_seqlens_q=True, cu_seqlens_k=True)),
]


@pytest.mark.parametrize("hdim", [192, 256])
def test_fp8_block_v_above_128_is_refused(hdim):
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    with pytest.raises(AssertionError, match="block V scaling spills"):
        FlashAttentionForwardSm90(FwdConfig.make("e4m3", hdim, fp8_v_scaling="block"))


@pytest.mark.parametrize("hdim,v_scaling,features", FP8_GRID)
def test_fp8_compiles_to_qgmma_without_spills(hdim, v_scaling, features):
    features = dict(features)
    cfg = FwdConfig.make("e4m3", hdim, features.pop("hdimv", hdim), fp8_v_scaling=v_scaling, **features)
    text, res = _compile(cfg)
    assert sass.check(text, cfg, res) == [], cfg.short()
    ops = sass.opcode_counts(text)
    assert ops["QGMMA"] > 0 and ops["HGMMA"] == 0, ops
    assert ops["STL"] == 0 and ops["LDL"] == 0 and not res.get("LOCAL"), f"{cfg.short()}: spills {res}"
    assert sass.max_register(text) < cfg.tile.consumer_regs
    # the interior KV loop: QK^T's hdim / 32 and PV's tile_n / 32 QGMMAs; P stays in its lanes
    loops = sass.hgmma_loops(text)
    assert loops, "no KV loop with a WGMMA"
    # the smallest of the loops that run both GEMMs (the tile loop's last-PV loop runs one)
    interior = min((l[2] for l in loops if l[2]["QGMMA"] > cfg.tile.tile_n // 32), key=lambda c: sum(c.values()))
    assert interior["QGMMA"] == hdim // 32 + cfg.tile.tile_n // 32, interior
    assert interior["SHFL"] <= 4, f"P moved between lanes: {interior['SHFL']} SHFL (the row max takes 4)"


@pytest.mark.parametrize("width,features", [(64, dict()), (64, dict(has_right=True, cu_seqlens_q=True, cu_seqlens_k=True)),
                                            (64, dict(softcap=True, split_kv=True, pack_gqa=4)),
                                            (128, dict()), (128, dict(has_right=True, split_kv=True))])
def test_fp8_short_first_compiles(width, features):
    """short_first (hdim 128's 224-key tile): the tile's first block has a second
    QK^T of N = width (hdim / 32 QGMMAs of 64 x width x 32) beside the whole block's; the KV
    loops are the whole block's (the interior one unchanged), nothing spills."""
    cfg = FwdConfig.make("e4m3", 128, short_first=width, **features)
    assert cfg.tile.tile_n == 224
    text, res = _compile(cfg)
    assert sass.check(text, cfg, res) == [], cfg.short()
    shapes = lambda t: collections.Counter(m.split(".")[1] for m in re.findall(r"QGMMA\.[0-9x]+", t))  # noqa: E731
    whole = dataclasses.replace(cfg, tile=dataclasses.replace(cfg.tile, short_first=0))
    text0, _ = _compile(whole)
    extra = shapes(text) - shapes(text0)  # (64 x 128 x 32 is PV's shape too)
    assert extra == collections.Counter({f"64x{width}x32": 128 // 32}), (extra, shapes(text))
    interior = lambda t: min((c for _, _, c in sass.hgmma_loops(t) if c["QGMMA"] > 224 // 32),  # noqa: E731
                             key=lambda c: sum(c.values()))
    main = lambda c: {op: c[op] for op in ("QGMMA", "MUFU", "FFMA", "FADD", "FMNMX", "F2FP", "LDG", "STL")}  # noqa: E731
    assert main(interior(text)) == main(interior(text0))
    assert abs(sum(interior(text).values()) - sum(interior(text0).values())) <= 8  # (uniform-register moves)


def test_short_first_is_refused_where_it_cannot_run():
    from cute_kernels.config import TileConfig
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    tile = FwdConfig.make("bf16", 128).tile
    for bad in (dict(short_first=40), dict(short_first=tile.tile_n), dict(short_first=64, intra_wg_overlap=False)):
        with pytest.raises(AssertionError, match="short_first"):
            TileConfig(**{**dataclasses.asdict(tile), **bad})
    fp8 = FwdConfig.make("e4m3", 128)
    with pytest.raises(AssertionError, match="short_first multiples of 32"):
        FlashAttentionForwardSm90(dataclasses.replace(fp8, tile=dataclasses.replace(fp8.tile, short_first=48)))
    # only FP8's 224-key tile in the table: the 16-bit tiles (and FP8's others) divide 2^k keys
    assert all(FwdConfig.make("bf16", d).tile.short_first == 0 for d in (64, 128, 256))
    assert [FwdConfig.make("e4m3", d).tile.short_first for d in (64, 128, 256)] == [0, SHORT_FIRST_FP8, 0]
    assert FwdConfig.make("e4m3", 128, chunk=True, has_right=True).tile.short_first == 0
    assert FwdConfig.make("e4m3", 128, fp8_v_rows=True, fp8_descales=True).tile.short_first == 0  # (slower there)


@pytest.mark.skipif(SHORT_FIRST_FP8 != 64, reason="FA3PY_CUTE_SHORT_FIRST changes the table's width")
def test_short_first_width_follows_the_last_block():
    """launch.config_for widens short_first to 128 keys where every sequence's last 224-key
    block holds 65-128 keys (1k / 8k keys), keeps 64 elsewhere, and where lengths vary (varlen,
    seqused_k) or the sequence ends on a block."""
    from cute_kernels import launch
    from cute_kernels.config import short_first_width

    for sk, width in [(512, 64), (1024, 128), (2048, 64), (8192, 128), (300, 128), (288, 64), (289, 128),
                      (352, 128), (353, 64), (448, 64), (450, 64), (16384, 64)]:
        req = _fp8_request(1, 64, sk, 2, 2, 128, block_n=224, v_scaling="channel")
        assert launch.fp8_config_for(req).tile.short_first == width, sk
    ragged = _fp8_request(1, 64, 1024, 2, 2, 128, block_n=224, v_scaling="channel",
                          seqused_k=torch.tensor([1000], dtype=torch.int32))
    assert launch.fp8_config_for(ragged).tile.short_first == 64
    tile = FwdConfig.make("e4m3", 128).tile
    assert short_first_width(tile, 0) == 64 and short_first_width(dataclasses.replace(tile, short_first=0), 1024) == 0
    assert short_first_width(FwdConfig.make("bf16", 128).tile, 1000) == 0


INT8_QK_COMPILE = [(128, dict(has_right=True)), (128, dict(fp8_block_m=1)), (64, dict(pack_gqa=4, split_kv=True)),
                   (256, dict(softcap=True)), (192, dict(hdimv=128, has_left=True, has_right=True))]


@pytest.mark.parametrize("hdim,features", INT8_QK_COMPILE, ids=[f"d{d}-" + "-".join(f) for d, f in INT8_QK_COMPILE])
def test_fp8_qk_int8_compiles_to_igmma_and_qgmma(hdim, features):
    """fp8_qk_int8: S = Q8 K8^T on the s8 WGMMA (IGMMA, hdim / 32 a block), P V on the FP8 one
    (QGMMA, tile_n / 32), no HGMMA, no local memory; the int32 sums become float32 by an integer
    add and a float subtract, not by I2F per score."""
    features = dict(features)
    cfg = FwdConfig.make("e4m3", hdim, features.pop("hdimv", hdim), fp8_qk_int8=True, **features)
    text, res = _compile(cfg)
    assert sass.check(text, cfg, res) == [], cfg.short()
    ops = sass.opcode_counts(text)
    assert ops["IGMMA"] > 0 and ops["HGMMA"] == 0 and ops["STL"] == 0
    loops = sass.hgmma_loops(text)
    interior = min((l[2] for l in loops if l[2]["IGMMA"] and l[2]["QGMMA"]), key=lambda c: sum(c.values()))
    assert interior["IGMMA"] == hdim // 32 and interior["QGMMA"] == cfg.tile.tile_n // 32, interior
    assert ops["I2FP"] + ops["I2F"] < 16, "int32 sums converted one I2F a score"


def test_fp8_check_rejects_hgmma():
    """check() for an e4m3 config asks for QGMMA and refuses HGMMA."""
    cfg = FwdConfig.make("e4m3", 128)
    fake = "/*0010*/ HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;\n/*0020*/ UTMALDG.2D [UR8], [UR4] ;"
    missing = sass.check(fake, cfg)
    assert any("QGMMA" in m for m in missing) and any("HGMMA" in m for m in missing), missing


def test_fp8_config_fields():
    cfg = FwdConfig.make("e4m3", 128, has_right=True)
    assert (cfg.fp8_block_m, cfg.fp8_v_scaling, cfg.tile.tile_n) == (128, "channel", 224)
    assert FwdConfig.make("e4m3", 128, fp8_v_scaling="block").tile.tile_n == 128
    # the tile does not depend on the sequence lengths (operands quantized ahead fit every call)
    shape = lambda t: (t.tile_m, t.tile_n)  # noqa: E731
    assert shape(FwdConfig.make("e4m3", 64, has_right=True, short=True).tile) == shape(FwdConfig.make("e4m3", 64, has_right=True).tile)
    assert cfg.tile.tile_n % 32 == 0 and cfg.tile.lazy_rescale == 0 and not cfg.tile.chain_pv_qk
    assert FwdConfig.make("e4m3", 96).tile.tile_n % 32 == 0
    bf16 = FwdConfig.make("bf16", 128)
    assert (bf16.fp8_block_m, bf16.fp8_v_scaling) == (0, "")


@pytest.mark.parametrize("hdim", [128, 192, 256])
def test_fp8_causal_epilogue_and_grid(hdim):
    """FP8 causal: TMA stores above hdim_v 128; hdim 256 from 4k query rows (is_long_causal) one
    tile a CTA (neither persistent nor the tile counter); below, and at other head dims, the
    counter. The 16-bit configs keep theirs."""
    from cute_kernels.config import LONG_CAUSAL_SEQLEN, is_long_causal

    assert is_long_causal(True, LONG_CAUSAL_SEQLEN) and not is_long_causal(True, LONG_CAUSAL_SEQLEN - 1)
    assert not is_long_causal(False, 10**6)
    short, long = (FwdConfig.make("e4m3", hdim, has_right=True, long_causal=lc).tile for lc in (False, True))
    assert short.tma_store == long.tma_store == (hdim > 128)
    assert short.dynamic and long.dynamic == (hdim != 256) and not long.persistent
    split = FwdConfig.make("e4m3", hdim, has_right=True, long_causal=True, split_kv=True).tile
    assert not split.tma_store and split.dynamic  # (split-KV: float32 partials, the counter)
    local = FwdConfig.make("e4m3", hdim, has_left=True, has_right=True, long_causal=True).tile
    assert local.dynamic  # (timed causal only)
    for d in (128, 256):
        assert FwdConfig.make("bf16", d, has_right=True, long_causal=True) == FwdConfig.make("bf16", d, has_right=True)


@pytest.mark.parametrize("d,causal", [(256, False), (128, True)])
def test_p_flip_bound_covers_flipped_codes(d, causal):
    """p_flip_bound against the emulation with every P that sits within P_REL_DRIFT of an e4m3
    rounding boundary rounded to its other code (what a kernel may do to any of them): the
    output moves by no more than the bound (up to float32 sums), and by something (the bound is
    not vacuous on these sizes)."""
    from fa3py.fp8 import emulate
    from tests._util import P_REL_DRIFT

    req = _fp8_request(2, 130, 450, 4, 2, d, causal=causal, block_n=224 if d == 128 else 128, v_scaling="channel")
    qkv, params = req.fp8_tensors, req.params
    out, _ = emulate.attention(qkv, params, torch.float32)
    round_p = emulate.round_p

    def flipped(p):
        lo, hi, mid = round_p(p * (1 - P_REL_DRIFT)), round_p(p * (1 + P_REL_DRIFT)), round_p(p)
        return torch.where(lo != hi, torch.where(mid == lo, hi, lo), mid)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(emulate, "round_p", flipped)
        out_f, _ = emulate.attention(qkv, params, torch.float32)
    moved = (out_f - out).abs()
    bound = p_flip_bound(qkv, params)
    assert float(moved.max()) > 0
    assert bool((moved <= bound * (1 + 1e-4) + 1e-7).all()), float((moved - bound).max())


def test_p_offset_matches_the_format():
    from cute_kernels import fp8
    from fa3py.fp8 import P_OFFSET

    assert fp8.P_OFFSET == P_OFFSET


def test_cute_sass_accepts_fp8(capsys):
    assert sass.main(["--dtype", "fp8", "--hdim", "128"]) == 0
    out = capsys.readouterr().out
    assert "QGMMA" in out and "e4m3" in out


def test_cute_sass_set_goes_through_make(capsys):
    """--set of a FwdConfig field is a feature given to FwdConfig.make, so the choices that follow
    from it are the shipped ones: V's rows at hdim 256 take the transposer's pairs (a tile field
    is set on the table's tile after)."""
    assert sass.main(["--dtype", "fp8", "--fp8-v", "channel", "--hdim", "256", "--set", "fp8_v_rows=1",
                     "--set", "fp8_descales=1"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("# e4m3"))
    assert " fp8_v_rows fp8_vt_pairs fp8_descales" in header


# ---- host glue: dispatch refusal, configs (CPU) ---------------------------------------------------

def _fp8_request(b, sq, sk, h, hk, d, device="cpu", quantized=True, **kw):
    import fa3py
    from fa3py import fp8 as fa3py_fp8

    torch.manual_seed(sq * 7 + sk)
    q = torch.randn(b, sq, h, d, dtype=torch.bfloat16, device=device)
    k = torch.randn(b, sk, hk, d, dtype=torch.bfloat16, device=device)
    v = torch.randn(b, sk, hk, d, dtype=torch.bfloat16, device=device)
    if kw.pop("spread", False):  # scales that differ by head and by block of rows / keys
        for x, blk in ((q, 8), (k, 128), (v, 128)):
            rows, heads = torch.arange(x.shape[1], device=device), torch.arange(x.shape[2], device=device)
            x *= (2.0 ** ((rows[:, None] // blk + 3 * heads[None, :]) % 5 - 2))[..., None].to(x.dtype)
    if quantized:
        qkv = fa3py.quantize_fp8(q, k, v, block_n=kw.pop("block_n", 128), v_scaling=kw.pop("v_scaling", "block"),
                                 v_pv_order=kw.pop("v_pv_order", True), qk_int8=kw.pop("qk_int8", False))
        return fa3py_fp8.make_request(*qkv, **kw)
    from fa3py.validation import make_request

    return make_request(q, k, v, fp8=True, **kw)



def test_fp8_requests_are_refused_when_turned_off(monkeypatch):
    import cute_kernels
    from cute_kernels import launch

    monkeypatch.setattr(launch, "fp8_enabled", False)
    for req in (_fp8_request(1, 64, 64, 2, 2, 128), _fp8_request(1, 64, 64, 2, 2, 128, quantized=False)):
        assert "FA3PY_CUTE_FP8=0" in cute_kernels.why_not(req, backward=False)


def test_fp8_kernel_is_on_by_default():
    """FA3PY_CUTE_FP8 unset: the FP8 kernel serves (it passed its GPU tests); =0 turns it off."""
    import subprocess
    import sys

    code = "from cute_kernels import launch; print(launch.fp8_enabled)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "FA3PY_CUTE_FP8"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    off = subprocess.run([sys.executable, "-c", code], env={**env, "FA3PY_CUTE_FP8": "0"}, capture_output=True,
                         text=True)
    assert (on.stdout.strip(), off.stdout.strip()) == ("True", "False"), (on.stderr, off.stderr)


def test_fp8_why_not_with_opt_in(monkeypatch):
    import cute_kernels
    from cute_kernels import launch

    monkeypatch.setattr(launch, "fp8_enabled", True)
    why = lambda req: cute_kernels.why_not(req, backward=False)
    assert "CUDA" in why(_fp8_request(2, 65, 130, 4, 2, 128, causal=True))  # served but for the device
    assert "block_n" in why(_fp8_request(1, 64, 64, 2, 2, 128, block_n=64))
    assert "CUDA" in why(_fp8_request(1, 64, 64, 2, 2, 128, softcap=5.0))
    assert "CUDA" in why(_fp8_request(1, 64, 64, 2, 2, 128, seqused_k=torch.tensor([40], dtype=torch.int32)))
    assert "CUDA" in why(_fa3_request(2, 65, 130, 4, 2, 128, causal=True))  # FA3's format: served
    assert "head dims" in why(_fa3_request(1, 8, 8, 2, 2, 32))
    assert "block V" in why(_fp8_request(1, 64, 64, 2, 2, 256, block_n=64))
    assert "CUDA" in why(_fp8_request(1, 64, 64, 2, 2, 256, block_n=128, v_scaling="channel"))
    cfg = launch.fp8_config_for(_fp8_request(2, 65, 130, 4, 2, 128, causal=True))
    assert (cfg.dtype, cfg.fp8_block_m, cfg.fp8_v_scaling, cfg.has_right) == ("e4m3", 128, "block", True)


# ---- host path on the CPU: run_fp8 with the kernel emulated (tests/cute_emulation.py) ------------

def _fa3_request(b, sq, sk, h, hk, d, device="cpu", descales=True, **kw):
    """FA3's format: float8_e4m3fn q, k, v with float32 descales (batch, nheads_kv)."""
    from fa3py.validation import make_request

    gen = torch.Generator().manual_seed(sq * 5 + sk)
    q, k, v = (torch.randn(b, s, n, d, generator=gen).mul(3).to(torch.float8_e4m3fn).to(device)
               for s, n in ((sq, h), (sk, hk), (sk, hk)))
    ds = [torch.rand(b, hk, generator=gen).add(0.25).to(device) if descales else None for _ in range(3)]
    return make_request(q, k, v, q_descale=ds[0], k_descale=ds[1], v_descale=ds[2], **kw)


VARLEN_Q, VARLEN_K = [5, 130, 1, 0, 77], [40, 300, 3, 9, 129]


def _cu(lens, device):
    return torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)


def _varlen_fp8_request(h, hk, d, device="cpu", packed=(True, True), seqused=(False, False), fa3=False,
                        v_scaling="block", **kw):
    """Sequences of VARLEN_Q / VARLEN_K tokens, packed (cu_seqlens) on the sides `packed` says
    (else batched, padded to the longest, with seqused), quantized with the kernel's block_n, or
    FA3's float8 with descales (`fa3`); seqused also on packed sides where `seqused` says (each
    sequence's first ~2/3)."""
    import fa3py
    from cute_kernels import launch
    from fa3py import fp8 as fa3py_fp8
    from fa3py.validation import make_request

    gen = torch.Generator().manual_seed(11)
    b = len(VARLEN_Q)
    side = {}
    for name, lens, heads, pk, used in (("q", VARLEN_Q, h, packed[0], seqused[0]),
                                        ("k", VARLEN_K, hk, packed[1], seqused[1])):
        shape = (sum(lens),) if pk else (b, max(lens))
        xs = [torch.randn(*shape, heads, d, generator=gen) * (3.0 if fa3 else 1.0) for _ in range(1 if name == "q" else 2)]
        cu = _cu(lens, device) if pk else None
        use = (torch.tensor([(2 * n + 2) // 3 for n in lens], dtype=torch.int32) if pk and used
               else torch.tensor(lens, dtype=torch.int32) if not pk else None)
        side[name] = (xs, cu, None if use is None else use.to(device), max(lens))
    (qs, cu_q, used_q, max_q), (kvs, cu_k, used_k, max_k) = side["q"], side["k"]
    seq = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_q=used_q, seqused_k=used_k, max_seqlen_q=max_q,
               max_seqlen_k=max_k, **kw)
    if fa3:
        q, k, v = (x.to(torch.float8_e4m3fn).to(device) for x in (*qs, *kvs))
        ds = [torch.rand(b, hk, generator=gen).add(0.25).to(device) for _ in range(3)]
        return make_request(q, k, v, q_descale=ds[0], k_descale=ds[1], v_descale=ds[2], **seq)
    q, k, v = (x.to(torch.bfloat16).to(device) for x in (*qs, *kvs))
    block_n = launch.FwdConfig.make("e4m3", d, fp8_v_scaling=v_scaling).tile.tile_n
    qkv = fa3py.quantize_fp8(q, k, v, block_n=block_n, v_scaling=v_scaling, v_pv_order=True, cu_seqlens_q=cu_q,
                             cu_seqlens_k=cu_k)
    return fa3py_fp8.make_request(*qkv, **seq)


def _host_reference(req):
    """(fp64 reference out, lse) of the dequantized operands, and fa3py.fp8.emulate's (out, lse)
    twice: with exact GEMMs and with the FP8 tensor cores' accumulation modelled
    (tests/_util.py's fp8_emulated_pair)."""
    from fa3py import reference
    from fa3py.fp8 import from_descales
    from fa3py.validation import make_request

    seq = dict(cu_seqlens_q=req.cu_seqlens_q, cu_seqlens_k=req.cu_seqlens_k, seqused_q=req.seqused_q,
               seqused_k=req.seqused_k)
    if req.fp8_tensors is not None:
        qkv = req.fp8_tensors
        qf, kf, vf = (t.dequantize() for t in qkv)
        deq = make_request(*(x.to(torch.bfloat16) for x in (qf, kf, vf)), softmax_scale=req.params.softmax_scale,
                           window_size=(req.params.window_left, req.params.window_right),
                           softcap=req.params.softcap, max_seqlen_q=req.max_seqlen_q, max_seqlen_k=req.max_seqlen_k,
                           **seq)
        ref = reference.attention(deq, q=qf, k=kf, v=vf)
    else:
        qkv = from_descales(req.q, req.k, req.v, req.q_descale, req.k_descale, req.v_descale,
                            cu_seqlens_q=req.cu_seqlens_q, cu_seqlens_k=req.cu_seqlens_k)
        ref = reference.attention(req)
    return ref, fp8_emulated_pair(qkv, req.params, torch.bfloat16, seqused_q=req.seqused_q,
                                  seqused_k=req.seqused_k)


def _check_against_reference(out, lse, req):
    """The host path's result is at most twice as far from the fp64 reference as the emulation
    (the repo's rule, the emulation in the role of the same math in PyTorch; of its two forms,
    exact and with the FP8 tensor cores' accumulation, the farther), plus one bf16 rounding of
    the output; LSEs within 1e-4 beyond twice the emulation's error."""
    (ref_out, ref_lse), emulations = _host_reference(req)
    assert out.shape == ref_out.shape and out.dtype == req.out_dtype and lse.shape == ref_lse.shape
    err = lambda a, b: float((a.double() - b.double()).abs().amax()) if a.numel() else 0.0
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)), "empty rows differ"
    atol = 2.0**-8 * float(ref_out.abs().max())
    emu_err = max(err(o, ref_out) for o, _ in emulations)
    emu_lse_err = max(err(x[finite], ref_lse[finite]) for _, x in emulations)
    assert err(out, ref_out) <= 2 * emu_err + atol, (err(out, ref_out), emu_err)
    assert err(lse[finite], ref_lse[finite]) <= 2 * emu_lse_err + 1e-4, (err(lse[finite], ref_lse[finite]), emu_lse_err)


FP8_HOST_CASES = {  # name: (request maker args, kwargs, splits setting, cfg facts)
    "softcap": ((2, 113, 203, 4, 2, 128), dict(softcap=5.0), "1", dict(softcap=True)),
    "softcap_causal_channel": ((1, 239, 300, 2, 2, 64), dict(softcap=3.0, causal=True, v_scaling="channel"), "1",
                               dict(softcap=True)),
    "pack_gqa_decode": ((3, 1, 500, 8, 2, 128), dict(), "1", dict(pack_gqa=4)),
    "pack_gqa_causal": ((2, 17, 130, 8, 1, 64), dict(causal=True, block_m=8), "1", dict(pack_gqa=8)),
    "split": ((2, 70, 700, 4, 2, 128), dict(causal=True), "3", dict(split_kv=True)),
    "split_pack_softcap": ((2, 1, 900, 8, 2, 128), dict(softcap=4.0), "4", dict(split_kv=True, pack_gqa=4)),
    "split_local": ((1, 300, 600, 2, 1, 128), dict(window_size=(100, 30)), "2", dict(split_kv=True)),
    "fa3": ((2, 113, 203, 4, 2, 128), dict(), "1", dict(fp8_v_scaling="channel")),
    "fa3_causal_hdim256": ((1, 150, 150, 2, 1, 256), dict(causal=True), "1", dict()),
    "fa3_softcap_pack_split": ((2, 1, 700, 8, 2, 64), dict(softcap=6.0, descales=False), "3",
                               dict(pack_gqa=4, split_kv=True)),
    "fa3_gqa_window": ((1, 200, 257, 6, 2, 96), dict(window_size=(64, 0)), "1", dict()),
    # varlen: (h, hk, d) and _varlen_fp8_request's keywords
    "varlen_causal": ((4, 2, 128), dict(causal=True), "1", dict(cu_seqlens_q=True, cu_seqlens_k=True)),
    "varlen_seqused_channel": ((2, 2, 64), dict(seqused=(True, True), v_scaling="channel"), "1",
                               dict(seqused_q=True, seqused_k=True)),
    "varlen_packed_q_batched_k": ((4, 4, 128), dict(packed=(True, False), window_size=(50, 10)), "1",
                                  dict(cu_seqlens_q=True, seqused_k=True)),
    "varlen_split_softcap": ((4, 2, 128), dict(softcap=5.0), "3", dict(split_kv=True, cu_seqlens_k=True)),
    "varlen_batched_seqused": ((4, 2, 128), dict(packed=(False, False), causal=True), "1",
                               dict(seqused_q=True, seqused_k=True)),
    "varlen_fa3": ((8, 2, 128), dict(fa3=True, causal=True), "1", dict(cu_seqlens_q=True)),
    "varlen_fa3_seqused_split": ((4, 1, 64), dict(fa3=True, seqused=(False, True)), "2",
                                 dict(split_kv=True, seqused_k=True)),
    # attention_chunk (Llama 4): causal within chunks that are not multiples of the tiles
    "chunk_causal_channel": ((2, 300, 500, 4, 2, 128), dict(causal=True, attention_chunk=96, v_scaling="channel"),
                             "1", dict(chunk=True)),
    "chunk_window_block": ((1, 257, 300, 2, 2, 64), dict(attention_chunk=100, window_size=(40, 7)), "1",
                           dict(chunk=True, has_left=True)),
    "fa3_chunk_pack_split": ((2, 3, 700, 8, 2, 128), dict(causal=True, attention_chunk=160), "2",
                             dict(chunk=True, split_kv=True, pack_gqa=4)),
    "varlen_chunk": ((4, 2, 128), dict(causal=True, attention_chunk=50), "1",
                     dict(chunk=True, cu_seqlens_q=True, cu_seqlens_k=True)),
    # qk_int8 (the higher-accuracy mode): int8 Q K^T, scales amax / 127 (not powers of two)
    "qk_int8_rows": ((2, 113, 203, 4, 2, 128), dict(qk_int8=True, block_m=1, v_scaling="channel"), "1",
                     dict(fp8_qk_int8=True, fp8_block_m=1)),
    "qk_int8_causal_gqa_split": ((1, 300, 700, 8, 2, 64), dict(qk_int8=True, causal=True, v_scaling="channel"), "2",
                                 dict(fp8_qk_int8=True, split_kv=True)),
    "qk_int8_softcap_256": ((1, 150, 260, 2, 1, 256), dict(qk_int8=True, softcap=20.0, v_scaling="channel"), "1",
                            dict(fp8_qk_int8=True, softcap=True)),
}


def _feature_request(case: str, device: str, monkeypatch):
    """FP8_HOST_CASES[case]'s request on `device`, with FA3PY_CUTE_FP8 (and the opt-ins
    FA3PY_CUTE_FP8_INT8, FA3PY_CUTE_FP8_CHUNK) on and its split setting; checks that
    fp8_config_for picks the case's features."""
    from cute_kernels import launch

    args, kw, splits, facts = FP8_HOST_CASES[case]
    kw = dict(kw)
    monkeypatch.setattr(launch, "fp8_enabled", True)
    monkeypatch.setattr(launch, "fp8_qk_int8_enabled", True)
    monkeypatch.setattr(launch, "fp8_chunk_enabled", True)
    monkeypatch.setattr(launch, "split_kv_setting", splits)
    if case.startswith("varlen"):
        req = _varlen_fp8_request(*args, device=device, **kw)
    elif case.startswith("fa3"):
        req = _fa3_request(*args, device=device, **kw)
    else:
        b, sq, sk, h, hk, d = args
        block_m = kw.pop("block_m", 128)
        v_scaling = kw.pop("v_scaling", "block")
        qk_int8 = kw.pop("qk_int8", False)
        block_n = launch.FwdConfig.make("e4m3", d, fp8_v_scaling=v_scaling).tile.tile_n
        req = _fp8_request(b, sq, sk, h, hk, d, device=device, block_n=block_n, v_scaling=v_scaling, spread=True,
                           qk_int8=qk_int8, **kw)
        if block_m != 128:  # re-quantized with that Q block
            import fa3py
            from fa3py import fp8 as fa3py_fp8

            q, k, v = (t.dequantize().to(torch.bfloat16) for t in req.fp8_tensors)
            req = fa3py_fp8.make_request(*fa3py.quantize_fp8(q, k, v, block_m=block_m, block_n=block_n,
                                                             v_scaling=v_scaling, v_pv_order=True, qk_int8=qk_int8),
                                         **kw)
    cfg = launch.fp8_config_for(req)
    assert all(getattr(cfg, f) == want for f, want in facts.items()), cfg.short()
    return req, cfg


@pytest.mark.parametrize("case", list(FP8_HOST_CASES))
def test_fp8_host_path_on_the_emulated_kernel(case, monkeypatch):
    """run_fp8's host work (quantized / FA3 operands, GQA packing of e4m3 rows with unpacked
    scales, split-KV partials and the shared combine, the softcap constants) around the kernel
    emulated from its own arguments, against the fp64 reference."""
    from cute_kernels import launch
    from tests.cute_emulation import emulated_fp8_launch

    req, cfg = _feature_request(case, "cpu", monkeypatch)
    monkeypatch.setattr(launch, "launch_kernel", emulated_fp8_launch)
    assert launch.fp8_why_not(req) == "cute_kernels: CUDA tensors only"
    out, lse = launch.run_fp8(req, cfg)
    _check_against_reference(out, lse, req)


def test_fa3_format_through_the_api_on_the_emulated_sm90(emulated_sm90, monkeypatch):
    """flash_attn_func on float8 q, k, v with descales, dispatched as on an H100 with the FP8 kernel
    opted in: served by cute (run_fp8 around the emulated kernel), bf16, close to the reference."""
    import fa3py
    from cute_kernels import launch
    from fa3py import dispatch

    monkeypatch.setattr(launch, "fp8_enabled", True)
    req = _fa3_request(2, 77, 150, 4, 2, 64, causal=True, softcap=8.0)
    assert dispatch.choose(req).name == "cute"
    out, lse = fa3py.flash_attn_func(req.q, req.k, req.v, causal=True, softcap=8.0, q_descale=req.q_descale,
                                     k_descale=req.k_descale, v_descale=req.v_descale, return_attn_probs=True)
    _check_against_reference(out, lse, req)


FA3_CASES = [c for c in FP8_HOST_CASES if "fa3" in c]


def _run_fp8_recording_v(req, cfg, monkeypatch) -> tuple:
    """run_fp8 around the emulated kernel; (out, lse, the (q, k, v, scales) the kernel was
    given, per launch)."""
    from cute_kernels import launch
    from tests.cute_emulation import emulated_fp8_launch

    seen = []

    def recording(req_, cfg_, q, k, v, *args, **kw):
        seen.append((q, k, v, kw["fp8_scales"]))
        return emulated_fp8_launch(req_, cfg_, q, k, v, *args, **kw)

    monkeypatch.setattr(launch, "launch_kernel", recording)
    return (*launch.run_fp8(req, cfg), seen)


def test_fa3_inputs_take_v_rows_where_few_queries_read_v(monkeypatch):
    """FA3's float8 inputs by default: V's rows in the kernel up to FP8_V_ROWS_MAX_QUERIES query
    rows per KV head (seqlen_q times the GQA group, halved when causal; any head dim), a copy of
    V^T above; FA3PY_CUTE_FP8_DIRECT=1 / 0 (True / False) always / never; half-block
    staging on every V-rows config (it changes only the kernels it applies to)."""
    from cute_kernels import launch
    from fa3py.validation import make_request

    monkeypatch.setattr(launch, "fp8_enabled", True)

    def cfg(sq, h, hk, d=64, direct=None, **kw):
        monkeypatch.setattr(launch, "fp8_direct_enabled", direct)
        q, k, v = (torch.randn(1, s, n, d).to(torch.float8_e4m3fn) for s, n in ((sq, h), (300, hk), (300, hk)))
        return launch.fp8_config_for(make_request(q, k, v, **kw))

    rows = lambda *a, **kw: cfg(*a, **kw).fp8_v_rows  # noqa: E731
    limit = launch.FP8_V_ROWS_MAX_QUERIES
    assert rows(limit, 2, 2) and not rows(limit + 1, 2, 2)
    assert rows(limit // 4, 8, 2) and not rows(limit // 4 + 1, 8, 2)  # GQA: 4 query heads read each V
    assert rows(2 * limit, 2, 2, causal=True) and not rows(2 * limit + 2, 2, 2, causal=True)
    assert rows(limit, 2, 2, d=256) and not rows(limit + 1, 2, 2, d=256)
    assert rows(limit + 1, 2, 2, direct=True) and not rows(1, 2, 2, direct=False)
    assert cfg(1, 2, 2).fp8_v_rows_half
    monkeypatch.setattr(launch, "fp8_v_half_enabled", False)  # FA3PY_CUTE_FP8_V_HALF=0
    assert not cfg(1, 2, 2).fp8_v_rows_half and cfg(1, 2, 2, direct=False).fp8_v_rows_half  # (only V rows' configs)


@pytest.mark.parametrize("case", FA3_CASES)
def test_fa3_direct_host_path_on_the_emulated_kernel(case, monkeypatch):
    """FA3PY_CUTE_FP8_DIRECT=1: FA3's float8 v reaches the kernel as it is (the request's own
    tensor, no transposing copy: fp8_v_rows transposes each block in smem) and so do the
    descales ((batch, heads, 1) views: fp8_descales; Q's repeated per query head under GQA);
    the emulated kernel gives the bits of the copy-and-fill path and the reference's accuracy."""
    from cute_kernels import launch

    monkeypatch.setattr(launch, "fp8_direct_enabled", False)
    req, cfg = _feature_request(case, "cpu", monkeypatch)
    assert not cfg.fp8_v_rows
    out_t, lse_t, _ = _run_fp8_recording_v(req, cfg, monkeypatch)
    monkeypatch.setattr(launch, "fp8_direct_enabled", True)
    cfg_rows = launch.fp8_config_for(req)
    assert cfg_rows.fp8_v_rows and cfg_rows.fp8_descales
    # the same kernel config but for V's path (and short_first, off with V in rows: config.py)
    assert cfg_rows.tile.short_first == 0
    assert dataclasses.replace(cfg_rows, fp8_v_rows=False, fp8_descales=False, fp8_vt_pairs=False,
                               tile=dataclasses.replace(cfg_rows.tile, short_first=cfg.tile.short_first)) == cfg
    assert cfg_rows.fp8_vt_pairs == (req.headdim_v > 128)  # the transposer's pairs: the default rule
    out, lse, seen = _run_fp8_recording_v(req, cfg_rows, monkeypatch)
    assert seen
    for q, k, v, (sq, sk, sv) in seen:
        assert v.data_ptr() == req.v.data_ptr() and v.shape == req.v.shape
        if req.k_descale is not None:
            assert sk.data_ptr() == req.k_descale.data_ptr() and sk.shape == (*req.k_descale.shape, 1)
            assert sv.data_ptr() == req.v_descale.data_ptr()
        assert sq.shape[1:] == (req.nheads, 1)
    assert torch.equal(out, out_t) and torch.equal(lse, lse_t)
    _check_against_reference(out, lse, req)


def test_quantized_v_in_rows_needs_the_opt_in(monkeypatch):
    """Quantized operands whose V is not transposed (quantize_fp8(v_transposed=False)): refused by
    the FP8 kernel unless V in rows is opted in, then served with fp8_v_rows (the emulated
    kernel's result equals the transposed-V operands')."""
    import fa3py
    from cute_kernels import launch
    from fa3py import fp8 as fa3py_fp8

    monkeypatch.setattr(launch, "fp8_enabled", True)
    q, k, v = (torch.randn(1, n, 2, 64, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
               for n in (70, 150, 150))
    block_n = launch.FwdConfig.make("e4m3", 64).tile.tile_n
    rows = fa3py_fp8.make_request(*fa3py.quantize_fp8(q, k, v, block_n=block_n, v_transposed=False, seed=3))
    vt = fa3py_fp8.make_request(*fa3py.quantize_fp8(q, k, v, block_n=block_n, v_pv_order=True, seed=3))
    monkeypatch.setattr(launch, "fp8_direct_enabled", False)
    assert "FA3PY_CUTE_FP8_DIRECT=0" in launch.fp8_why_not(rows)
    monkeypatch.setattr(launch, "fp8_direct_enabled", None)  # the default: V's rows in the kernel
    assert launch.fp8_why_not(rows) == "cute_kernels: CUDA tensors only"
    cfg_rows, cfg_vt = launch.fp8_config_for(rows), launch.fp8_config_for(vt)
    assert cfg_rows.fp8_v_rows and not cfg_vt.fp8_v_rows
    assert not cfg_rows.fp8_descales  # the format's own scales
    out, lse, seen = _run_fp8_recording_v(rows, cfg_rows, monkeypatch)
    out_t, lse_t, _ = _run_fp8_recording_v(vt, cfg_vt, monkeypatch)
    assert seen[0][2].shape == v.shape and torch.equal(out, out_t) and torch.equal(lse, lse_t)


@pytest.mark.parametrize("hdim", [64, 128, 192, 256])
def test_fp8_vt_pairs_where(hdim, monkeypatch):
    """fp8_vt_pairs by default where V's rows are wider than 128 (timed faster there), on V's
    rows only; FA3PY_CUTE_FP8_VT_PAIRS=1 / 0 (fp8_vt_pairs_enabled True / False) always / never."""
    from cute_kernels import launch
    from fa3py.validation import make_request

    q, k, v = (torch.randn(2, 300, 4, hdim).to(torch.float8_e4m3fn) for _ in range(3))
    ds = torch.rand(2, 4) + 0.5
    req = make_request(q, k, v, q_descale=ds, k_descale=ds, v_descale=ds)
    for direct, enabled, expect in [(True, None, hdim > 128), (True, True, True), (True, False, False),
                                    (False, True, False)]:
        monkeypatch.setattr(launch, "fp8_direct_enabled", direct)
        monkeypatch.setattr(launch, "fp8_vt_pairs_enabled", enabled)
        cfg = launch.fp8_config_for(req)
        assert cfg.fp8_v_rows == direct and cfg.fp8_vt_pairs == expect, (direct, enabled)


@pytest.mark.parametrize("hdim", [64, 128, 256])
def test_fp8_vt_unroll_where(hdim, monkeypatch):
    """fp8_vt_unroll only where FA3PY_CUTE_FP8_VT_UNROLL=1 (fp8_vt_unroll_enabled), on V's rows,
    up to hdim_v 128 (FP8_VT_UNROLL_MAX_HDIMV: above, the kernel refuses it)."""
    from cute_kernels import launch
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90
    from fa3py.validation import make_request

    if hdim > 128:
        with pytest.raises(AssertionError, match="fp8_vt_unroll"):
            FlashAttentionForwardSm90(FwdConfig.make("e4m3", hdim, fp8_v_rows=True, fp8_descales=True,
                                                     fp8_vt_unroll=True))

    q, k, v = (torch.randn(2, 300, 4, hdim).to(torch.float8_e4m3fn) for _ in range(3))
    ds = torch.rand(2, 4) + 0.5
    req = make_request(q, k, v, q_descale=ds, k_descale=ds, v_descale=ds)
    for direct, enabled, expect in [(True, False, False), (True, True, hdim <= 128), (False, True, False)]:
        monkeypatch.setattr(launch, "fp8_direct_enabled", direct)
        monkeypatch.setattr(launch, "fp8_vt_unroll_enabled", enabled)
        cfg = launch.fp8_config_for(req)
        assert cfg.fp8_v_rows == direct and cfg.fp8_vt_unroll == expect, (direct, enabled)


# FA3's inputs read directly (fp8_v_rows with fp8_descales), and quantized V rows (without)
V_ROWS_COMPILE = [
    (128, dict(has_right=True, fp8_descales=True)),  # 128 x 224, the dynamic scheduler's tile walk
    (64, dict(fp8_descales=True)),  # 3 consumer warpgroups (512 threads, 24 / 160)
    (256, dict(cu_seqlens_q=True, cu_seqlens_k=True, fp8_descales=True)),  # packed V rows, O in two chunks
    (256, dict(has_right=True, fp8_descales=True, fp8_v_rows_half=False)),  # one whole-block stage (V_HALF=0)
    (128, dict(pack_gqa=4, split_kv=True, seqused_k=True, fp8_descales=True)),  # decoding
    (128, dict(pack_gqa=4, split_kv=True, seqused_k=True)),  # decoding, quantized V rows
    (128, dict(has_right=True, chunk=True, fp8_descales=True)),  # a chunk: the static tile order at 128 x 224
    # FP8 decode from pages: 16-row pages, 8 boxes a 128-key block, paged split 32 / 232
    (128, dict(page_size=16, split_kv=True, pack_gqa=8, seqused_k=True, fp8_descales=True)),
    (256, dict(page_size=64, seqused_k=True, has_right=True, fp8_descales=True)),  # 64 keys a block
]


@pytest.mark.parametrize("hdim,features", [(128, dict(has_right=True, fp8_descales=True)), (256, dict(fp8_descales=True)),
                                           (192, dict(fp8_descales=True)), (64, dict(fp8_descales=True))],
                         ids=["d128-causal", "d256", "d192", "d64"])
def test_fp8_vt_pairs_compiles(hdim, features):
    """fp8_vt_pairs: the transposer's jobs two at a time compile without local memory, with the
    same QGMMAs; the pair loop issues both ldmatrix before the first permute (at hdim 192 / 256
    causal ptxas puts the first job's permutes between them). On by default above hdim_v 128."""
    plain = FwdConfig.make("e4m3", hdim, fp8_v_rows=True, fp8_vt_pairs=False, **features)
    cfg = FwdConfig.make("e4m3", hdim, fp8_v_rows=True, fp8_vt_pairs=True, **features)
    assert FwdConfig.make("e4m3", hdim, fp8_v_rows=True, **features).fp8_vt_pairs == (hdim > 128)  # make's rule
    text, res = _compile(cfg)
    assert sass.check(text, cfg, res) == [], cfg.short()
    ops, plain_ops = sass.opcode_counts(text), sass.opcode_counts(_compile(plain)[0])
    assert ops["STL"] == ops["LDL"] == 0 and ops["QGMMA"] == plain_ops["QGMMA"]
    lines = [line for line in text.splitlines() if "LDSM" in line or "PRMT" in line or "STSM" in line]
    assert any("LDSM" in a and "LDSM" in b for a, b in zip(lines, lines[1:])), \
        "a pair's second ldmatrix before the first's permutes"


@pytest.mark.parametrize("hdim,features", V_ROWS_COMPILE, ids=[f"d{d}-" + "-".join(f) for d, f in V_ROWS_COMPILE])
def test_fp8_v_rows_compiles(hdim, features):
    """fp8_v_rows: the FP8 kernel with V's rows staged and transposed by producer warps 1-3
    compiles for sm_90a without local memory, within the launch's registers, with its job loop:
    one ldmatrix.x4.trans, four PRMT and one stmatrix.x4 a 512-byte job, their addresses an XOR
    and an add each over warp-uniform job terms (fp8.vt_plan): at most 40 instructions a job
    (where 4-byte loads and stores took 52-62); one such loop a staging part (two where
    fp8_v_rows_half stages half blocks). The one-at-a-time loop (above hdim_v 128 the default is
    fp8_vt_pairs: test_fp8_vt_pairs_compiles)."""
    cfg = FwdConfig.make("e4m3", hdim, fp8_v_rows=True, fp8_vt_pairs=False, **features)
    text, res = _compile(cfg)
    assert sass.check(text, cfg, res) == [], cfg.short()
    ops = sass.opcode_counts(text)
    assert ops["QGMMA"] > 0 and ops["STL"] == ops["LDL"] == 0
    job_loops = sass.innermost_loops(text, lambda c: c["LDSM"] == 1 and c["STSM"] == 1)
    # one loop a staging part: hdim 256's 128 x 128 stages half blocks unless paged or turned off
    halves = hdim == 256 and features.get("fp8_v_rows_half", True) and not features.get("page_size")
    assert len(job_loops) == (2 if halves else 1)
    for _, _, ops in job_loops:
        assert ops["PRMT"] == 4 and ops["LDS"] == ops["STS"] == 0 and sum(ops.values()) <= 40, ops


# (hdim 128's 224-key blocks causal, 3 consumer warpgroups, decoding's split and packed rows, pages)
VT_UNROLL_COMPILE = [V_ROWS_COMPILE[i] for i in (0, 1, 4, 7)]


@pytest.mark.parametrize("hdim,features", VT_UNROLL_COMPILE, ids=[f"d{d}-" + "-".join(f) for d, f in VT_UNROLL_COMPILE])
def test_fp8_vt_unroll_compiles(hdim, features):
    """fp8_vt_unroll: each transposing warp's jobs unrolled (one copy per warp: every job of a
    block's parts has its ldmatrix, four permutes and stmatrix, in no loop), their address terms
    immediates: at most 8 instructions a job more than the looped kernel's one job loop costs,
    no local memory at the producer's 24 registers, the consumers' code unchanged (QGMMAs)."""
    from cute_kernels import fp8
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    cfg = FwdConfig.make("e4m3", hdim, fp8_v_rows=True, fp8_vt_unroll=True, **features)
    assert not cfg.fp8_vt_pairs  # (the looped kernel's one job body: 4 PRMT)
    looped = dataclasses.replace(cfg, fp8_vt_unroll=False)
    text, res = _compile(cfg)
    assert sass.check(text, cfg, res) == [], cfg.short()
    ops, looped_ops = sass.opcode_counts(text), sass.opcode_counts(_compile(looped)[0])
    kernel = FlashAttentionForwardSm90(cfg)
    parts = kernel.tile_n // kernel.v_rows_keys
    jobs = parts * fp8.vt_jobs(kernel.hdimv, kernel.v_rows_keys)
    assert ops["STL"] == ops["LDL"] == 0 and ops["QGMMA"] == looped_ops["QGMMA"]
    assert ops["LDSM"] == jobs and ops["PRMT"] - looped_ops["PRMT"] == 4 * jobs - 4
    assert all(c["LDSM"] == jobs for _, _, c in sass.innermost_loops(text, lambda c: c["LDSM"] > 0)), "a job loop"
    assert sum(ops.values()) - sum(looped_ops.values()) <= 8 * jobs, (sum(ops.values()), sum(looped_ops.values()))


def test_transpose_v_is_one_copy_in_the_pv_key_order():
    """FA3's V (b, s, h_kv, dv) -> V^T (b, h_kv, dv, s_pad): the format's transposed V with
    v_pv_order, zero-padded; ragged lengths take the tail group's index copy."""
    from fa3py.fp8.format import pv_key_order, transpose_v

    for s in (1, 15, 16, 17, 203):
        v = torch.randn(2, s, 3, 32).to(torch.float8_e4m3fn)
        vt = transpose_v(v)
        pad = -(-s // 16) * 16
        want = torch.zeros(2, 3, 32, pad, dtype=torch.uint8)
        want[..., :s] = v.view(torch.uint8).permute(0, 2, 3, 1)
        assert vt.shape == (2, 3, 32, pad) and vt.dtype == torch.float8_e4m3fn
        assert torch.equal(vt.view(torch.uint8), want.index_select(-1, pv_key_order(pad)))


# ---- on an sm90 GPU: the kernel against fa3py.fp8.emulate on the same quantized inputs -------------

def fp8_tolerance(qkv, params, **seqused):
    """(emulated out, lse, out tolerance, lse tolerance). The kernel computes the emulation's
    arithmetic except in how the tensor cores accumulate (order and, for FP8, precision) and in
    exp2 / log2 (MUFU approximations, ~2^-22 relative; its exp2 argument one FMA). The bound:
    twice the difference between the emulation and the emulation with its GEMMs accumulated as
    the FP8 tensor cores do (tests/_util.py's fp8_mma_model), plus one bf16 rounding of the
    output (both round to bf16), plus what P's e4m3 codes that sit at a rounding boundary may
    move (tests/_util.py's p_flip_bound: hdim 256 with 450 keys took one such code, 0.0156
    against a bound of 0.0126 without it), plus 1e-5 on the LSE for the approximations."""
    (out, lse), (out_m, lse_m) = fp8_emulated_pair(qkv, params, torch.bfloat16, **seqused)
    finite = torch.isfinite(lse)
    flips = p_flip_bound(qkv, params, **seqused)
    tol_out = 2 * float((out_m.float() - out.float()).abs().max()) + 2.0**-8 * float(out.float().abs().max()) \
        + float(flips.nan_to_num().max())
    tol_lse = 2 * float((lse_m - lse)[finite].abs().max()) + 1e-5
    return out, lse, tol_out, tol_lse


@pytest.mark.gpu
# (130, 450), (257, 2080): hdim 128's 224-key tile ends in a block of 2 / 64 keys (short_first)
@pytest.mark.parametrize("sq,sk", [(1, 1), (113, 203), (239, 1), (799, 3), (1023, 1024), (128, 384), (4100, 4100),
                                   (130, 450), (257, 2080)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("v_scaling,d", [("block", 128), ("block", 64), ("channel", 128), ("channel", 256)])
def test_gpu_fp8_kernel_is_the_emulation(sq, sk, causal, v_scaling, d, monkeypatch):
    import fa3py
    from cute_kernels import launch

    from cute_kernels.config import fp8_block_n

    monkeypatch.setattr(launch, "fp8_enabled", True)
    block_n = fp8_block_n(d, v_scaling)  # the kernel's tile for this format (FA3's FP8 tiles with channel V)
    req = _fp8_request(2, sq, sk, 4, 2, d, device="cuda", causal=causal, block_n=block_n, v_scaling=v_scaling)
    cfg = launch.fp8_config_for(req)
    assert cfg.tile.tile_n == block_n
    out_ref, lse_ref, tol_out, tol_lse = fp8_tolerance(req.fp8_tensors, req.params)
    out, lse = launch.run_fp8(req, cfg)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(finite, torch.isfinite(lse)), "empty rows differ"
    assert float((out.float() - out_ref.float()).abs().max()) <= tol_out
    assert float((lse - lse_ref)[finite].abs().amax()) <= tol_lse if finite.any() else True
    # through the API (fp8=True on 16-bit tensors quantizes with the kernel's key order first)
    q, k, v = (t.dequantize().to(torch.bfloat16) for t in req.fp8_tensors)
    assert fa3py.attention(q, k, v, fp8=True, causal=causal).isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("sq,sk,causal,width", [
    (1, 1, False, 64), (130, 450, False, 64), (300, 2080, True, 64), (64, 2017, False, 64), (2048, 2048, False, 64),
    (700, 4096, True, 64), (1, 1, False, 128), (130, 300, False, 128), (1024, 1024, True, 128),
    (257, 2115, False, 128), (2, 8192, False, 128)])
def test_gpu_fp8_short_first_equals_the_whole_block(sq, sk, causal, width, monkeypatch):
    """short_first (the last KV block's QK^T and softmax over its first `width` keys where the
    sequence ends there) against the whole block's: the same scores, P and row sums (the whole
    block's other columns are exact zeros added last), so bitwise the same out and LSE (as the
    H100 A/B of results/2026-12-06_h100_short_first found for out at every grid point). sk 2017,
    2048, 4096: 1, 32 and 64 keys in the last block; 450: 2; 2080: 64; 300: 76; 1024, 8192: 128;
    2115: 99. Split-KV where the grid is small (2 x 8192: the last split holds the short block);
    against the emulation without splits (each split rounds its P against its own running max,
    which the emulation does not model)."""
    from cute_kernels import launch

    monkeypatch.setattr(launch, "fp8_enabled", True)
    req = _fp8_request(2, sq, sk, 4, 2, 128, device="cuda", causal=causal, block_n=224, v_scaling="channel")
    cfg = launch.fp8_config_for(req)
    assert cfg.tile.tile_n == 224

    def run(width):
        return launch.run_fp8(req, dataclasses.replace(cfg, tile=dataclasses.replace(cfg.tile, short_first=width)))

    (out, lse), (out0, lse0) = run(width), run(0)
    assert torch.equal(lse, lse0) and torch.equal(out, out0)
    monkeypatch.setattr(launch, "split_kv_setting", "1")
    cfg = launch.fp8_config_for(req)
    assert not cfg.split_kv and cfg.tile.short_first == (width if sk % 224 > 64 else 64)
    out, _ = run(width)
    out_ref, _, tol_out, _ = fp8_tolerance(req.fp8_tensors, req.params)
    assert float((out.float() - out_ref.float()).abs().max()) <= tol_out


@pytest.mark.gpu
def test_gpu_fp8_natural_key_order_is_permuted_on_the_host(monkeypatch):
    from cute_kernels import launch

    monkeypatch.setattr(launch, "fp8_enabled", True)
    a = _fp8_request(1, 300, 500, 4, 4, 128, device="cuda", v_pv_order=False)
    b = _fp8_request(1, 300, 500, 4, 4, 128, device="cuda", v_pv_order=True)
    out_a, lse_a = launch.run_fp8(a, launch.fp8_config_for(a))
    out_b, lse_b = launch.run_fp8(b, launch.fp8_config_for(b))
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(FP8_HOST_CASES))
def test_gpu_fp8_features(case, monkeypatch):
    """Softcap, GQA packing, split-KV and FA3's float8 inputs on the kernel: at most twice as far
    from the fp64 reference as the emulation (the host tests' rule); unsplit, also within the
    emulation's tolerance (a split rounds P against its own running max, so not there)."""
    from cute_kernels import launch

    req, cfg = _feature_request(case, "cuda", monkeypatch)
    assert launch.fp8_why_not(req) is None
    out, lse = launch.run_fp8(req, cfg)
    _check_against_reference(out, lse, req)
    if not cfg.split_kv:
        from fa3py.fp8 import from_descales

        qkv = req.fp8_tensors or from_descales(req.q, req.k, req.v, req.q_descale, req.k_descale, req.v_descale,
                                               cu_seqlens_q=req.cu_seqlens_q, cu_seqlens_k=req.cu_seqlens_k)
        out_ref, lse_ref, tol_out, tol_lse = fp8_tolerance(qkv, req.params, seqused_q=req.seqused_q,
                                                           seqused_k=req.seqused_k)
        finite = torch.isfinite(lse_ref)
        assert float((out.float() - out_ref.float()).abs().max()) <= tol_out
        assert float((lse - lse_ref)[finite].abs().amax()) <= tol_lse if finite.any() else True


@pytest.mark.gpu
@pytest.mark.parametrize("unroll", [False, True])
@pytest.mark.parametrize("case", FA3_CASES)
def test_gpu_fa3_direct_bitwise_equal_to_the_copy_path(case, unroll, monkeypatch):
    """FA3PY_CUTE_FP8_DIRECT=1 on the GPU: V transposed in smem by the producer warps feeds the
    WGMMAs the bytes the transposing copy feeds them, and the descales read in the kernel are the
    values the filled scale tensors hold, so out and LSE are bit for bit those of the copy path
    (same tiles), run twice (a stale or racing V^T stage would differ), and within the reference
    rule. `unroll`: the transposer's jobs unrolled (fp8_vt_unroll, up to hdim_v 128)."""
    from cute_kernels import launch

    req, cfg = _feature_request(case, "cuda", monkeypatch)
    out_t, lse_t = launch.run_fp8(req, cfg)
    monkeypatch.setattr(launch, "fp8_direct_enabled", True)
    monkeypatch.setattr(launch, "fp8_vt_unroll_enabled", unroll)
    cfg_rows = launch.fp8_config_for(req)
    assert cfg_rows.fp8_v_rows and cfg_rows.fp8_descales and cfg_rows.fp8_vt_unroll == (unroll and cfg.hdimv <= 128)
    for _ in range(2):
        out, lse = launch.run_fp8(req, cfg_rows)
        assert torch.equal(out, out_t) and torch.equal(lse, lse_t)
    _check_against_reference(out, lse, req)


@pytest.mark.gpu
def test_gpu_fa3_format_goes_to_cute_with_opt_in(monkeypatch):
    """flash_attn_func on float8 q, k, v with descales runs the cute FP8 kernel (opted in) and
    returns bf16 close to the fp64 reference."""
    import fa3py
    from cute_kernels import launch
    from fa3py import dispatch

    monkeypatch.setattr(launch, "fp8_enabled", True)
    req = _fa3_request(2, 300, 500, 8, 2, 128, device="cuda", causal=True)
    assert dispatch.choose(req).name == "cute"
    out = fa3py.flash_attn_func(req.q, req.k, req.v, causal=True, q_descale=req.q_descale,
                                k_descale=req.k_descale, v_descale=req.v_descale)
    assert out.dtype == torch.bfloat16
    out_k, lse_k = launch.run_fp8(req, launch.fp8_config_for(req))
    assert torch.equal(out, out_k)
    _check_against_reference(out_k, lse_k, req)


@pytest.mark.parametrize("case", list(FP8_HOST_CASES))
def test_fp8_tvm_ffi_call_matches_the_compiled_signature(case, monkeypatch):
    """run_fp8's kernel call (GQA-packed Q beside its unpacked scales, packed sequences, split
    partials) binds every symbol of the compiled signature to one size: on an H200 the packed
    cases failed with "Mismatched mQScale.shape[1]" until Q's scales got a head symbol of their own."""
    from cute_kernels import launch
    from tests.cute_emulation import tvm_ffi_signature_check

    req, cfg = _feature_request(case, "cpu", monkeypatch)
    checked = tvm_ffi_signature_check(monkeypatch)
    launch.run_fp8(req, cfg)
    assert checked and checked[0].dtype == "e4m3"


@pytest.mark.parametrize("case", ["fa3_softcap_pack_split", "varlen_fa3"])
def test_fp8_v_rows_tvm_ffi_call_matches_the_compiled_signature(case, monkeypatch):
    """The same with FA3's V in rows (fp8_v_rows): V binds K's row symbols, not V^T's."""
    from cute_kernels import launch
    from tests.cute_emulation import tvm_ffi_signature_check

    monkeypatch.setattr(launch, "fp8_direct_enabled", True)
    req, cfg = _feature_request(case, "cpu", monkeypatch)
    assert cfg.fp8_v_rows
    checked = tvm_ffi_signature_check(monkeypatch)
    launch.run_fp8(req, cfg)
    assert checked and checked[0].fp8_v_rows


def test_default_block_n_is_the_kernel_tile():
    """quantize_fp8's default block_n: the Hopper FP8 kernel's tile_n for the head dim on sm90
    (config.fp8_block_n; padded head dims too), 128 off sm90 (here: CPU tensors)."""
    import fa3py
    from cute_kernels.config import fp8_block_n

    assert [fp8_block_n(d) for d in (64, 80, 96, 128, 192, 256, 264)] == [128, 96, 96, 224, 96, 128, None]
    assert fp8_block_n(128, "block") == 128
    q = torch.randn(1, 300, 2, 128, dtype=torch.bfloat16)
    assert fa3py.quantize_fp8(q, q, q).q.fmt.block_n == 128
    assert fa3py.quantize_fp8(q, q, q).q.fmt.v_scaling == "channel"


def test_explain_names_the_kernel_config_emulated_sm90(emulated_sm90, monkeypatch):
    """fa3py.explain on an (emulated) H100 names the cute kernel's config: the 16-bit forward's
    tile, and for FA3's float8 inputs whether V and the descales are read directly."""
    import fa3py
    from cute_kernels import launch
    from cute_kernels.config import FwdConfig

    monkeypatch.setattr(launch, "fp8_enabled", True)
    monkeypatch.setattr(launch, "fp8_why_not", lambda req: None)  # (CPU tensors)
    q = torch.randn(1, 300, 4, 128, dtype=torch.bfloat16)
    text = fa3py.explain(q, q, q, causal=True)
    assert "forward: cute [sm90 forward bf16 d128x128 tile" in text and "has_right" in text
    req = _fa3_request(1, 300, 300, 4, 4, 128)
    kw = dict(q_descale=req.q_descale, k_descale=req.k_descale, v_descale=req.v_descale)
    tile = FwdConfig.make("e4m3", 128).tile
    assert f"[sm90 FP8 forward e4m3 d128x128 tile{tile.tile_m}x{tile.tile_n}" in fa3py.explain(req.q, req.k, req.v, **kw)
    monkeypatch.setattr(launch, "fp8_direct_enabled", False)
    assert "fp8_descales" not in fa3py.explain(req.q, req.k, req.v, **kw)
    monkeypatch.setattr(launch, "fp8_direct_enabled", True)
    assert all(f" {flag}" in fa3py.explain(req.q, req.k, req.v, **kw) for flag in ("fp8_v_rows", "fp8_descales"))


def test_fp8_chunk_follows_its_switch(monkeypatch):
    """FP8 with attention_chunk goes to the Hopper kernel unless FA3PY_CUTE_FP8_CHUNK=0, and the
    refusal names the switch."""
    from cute_kernels import launch

    monkeypatch.setattr(launch, "fp8_enabled", True)
    req = _fp8_request(1, 70, 90, 2, 1, 64, causal=True, attention_chunk=32)
    monkeypatch.setattr(launch, "fp8_chunk_enabled", False)
    assert "FA3PY_CUTE_FP8_CHUNK=0" in launch.fp8_why_not(req)
    monkeypatch.setattr(launch, "fp8_chunk_enabled", True)
    assert launch.fp8_why_not(req) == "cute_kernels: CUDA tensors only"
    assert launch.fp8_config_for(req).chunk


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_fa3_direct_replays_from_a_cuda_graph(paged, monkeypatch):
    """FP8 decoding the way a server runs it: FA3's float8 inputs read directly (contiguous, or
    paged with FA3PY_CUTE_PAGED too) captured in a CUDA graph and replayed on new values copied
    into the captured tensors gives the eager call's bits on those values (no host read of the
    inputs, nothing allocated outside the graph that it depends on)."""
    import fa3py
    from cute_kernels import launch

    monkeypatch.setattr(launch, "fp8_enabled", True)
    monkeypatch.setattr(launch, "fp8_direct_enabled", True)
    monkeypatch.setattr(launch, "paged_enabled", paged)
    b, h, hk, d, page = 4, 32, 8, 128, 64
    g = torch.Generator(device="cuda").manual_seed(3)
    f8 = lambda *shape: torch.randn(*shape, device="cuda", generator=g).to(torch.float8_e4m3fn)  # noqa: E731
    q = f8(b, 1, h, d)
    seqlens = torch.tensor([700, 1, 4000, 2048], dtype=torch.int32, device="cuda")
    if paged:
        table = torch.randperm(b * 64, device="cuda", generator=g).view(b, 64).to(torch.int32)
        k_cache, v_cache = f8(b * 64, page, hk, d), f8(b * 64, page, hk, d)
    else:
        table, k_cache, v_cache = None, f8(b, 4096, hk, d), f8(b, 4096, hk, d)
    ds = [torch.rand(b, hk, device="cuda", generator=g) + 0.5 for _ in range(3)]
    call = lambda: fa3py.flash_attn_with_kvcache(  # noqa: E731
        q, k_cache, v_cache, cache_seqlens=seqlens, page_table=table, causal=True,
        q_descale=ds[0], k_descale=ds[1], v_descale=ds[2])
    with torch.no_grad():
        call()  # compile and warm outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        for x in (q, k_cache, v_cache):
            x.copy_(torch.randn(x.shape, device="cuda", generator=g).to(x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, call())
