"""The sm90 backward kernel (cute_kernels/bwd_sm90.py) on an sm90 GPU (`-m gpu`): dq, dk and dv of
every feature over ragged sizes against the fp64 reference, tolerance per shared/STYLE.md (at
most twice PyTorch's own error on the same inputs plus a small atol: tests/_util.py's
check_backward). Each test enables the kernel itself (on by default; FA3PY_CUTE_BWD=0 turns it off), poisons dK and
dV with NaN before the launch wherever the kernel must write every row (no seqused_k), and checks
that the kernel ran. tests/run_gpu.sh runs them in its `bwd` partition; on the CPU
tests/test_cute_bwd_emulated.py covers the host side with the kernel emulated."""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cute_kernels  # noqa: E402
from cute_kernels import bwd_launch  # noqa: E402
from fa3py.validation import make_request  # noqa: E402
from tests._cute_bwd import FEATURES, HEADS, force_tile_m, make_inputs, train_step  # noqa: E402
from tests._util import check_backward, check_forward  # noqa: E402

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_SM90, reason="the cute backward needs an sm90 GPU")]
DEVICE = "cuda"

SIZES = [(1, 1), (113, 203), (239, 1), (799, 3), (1023, 1024), (128, 384), (384, 128), (64, 64), (65, 129),
         (1000, 17)]
WINDOWS = [(37, 11), (0, 0), (200, -1), (-1, 64), (5, 130), (130, 5), (-1, 0), (0, -1)]
# packed layouts: per-sequence (query, key) lengths, 0- and 1-token sequences, up to ~1000
VARLEN = {
    "ragged": ([(0, 5), (1, 1), (1000, 997), (65, 130), (7, 0), (130, 64), (513, 1), (1, 800)], None),
    "seqused": ([(300, 400), (5, 9), (129, 60), (64, 64), (0, 3)],
                [(263, 130), (5, 0), (100, 60), (64, 1), (0, 3)]),
}


@pytest.fixture(autouse=True)
def cute_bwd(monkeypatch):
    """The backward kernel enabled; each launch recorded (its config), dK / dV poisoned first."""
    launches = []
    real = bwd_launch.launch_kernel

    def launch(req, cfg, q, k, v, do, dk, dv, *rest):
        if req.seqused_k is None:  # the kernel writes every key row (else rows past seqused_k stay 0)
            dk.fill_(float("nan"))
            dv.fill_(float("nan"))
        launches.append(cfg)
        return real(req, cfg, q, k, v, do, dk, dv, *rest)

    monkeypatch.setattr(bwd_launch, "enabled", True)
    monkeypatch.setattr(bwd_launch, "chunk_enabled", True)
    monkeypatch.setattr(bwd_launch, "launch_kernel", launch)
    return launches


def check_grads(launches, q, k, v, index_kw=None, **features):
    """The cute forward, then the cute backward, against the fp64 reference."""
    req = make_request(q, k, v, **(index_kw or {}), **features)
    assert cute_kernels.why_not(req, backward=True) is None, cute_kernels.why_not(req, backward=True)
    out, lse = cute_kernels.forward(req)
    check_forward(req, out, lse)
    dout = torch.randn_like(out)
    grads = cute_kernels.backward(req, out, lse, dout)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert launches, "the backward kernel did not run"
    assert launches[-1] == bwd_launch.config_for(req)
    check_backward(req, dout, grads)


def batched(sq, sk, heads="mha", d=128, dtype=torch.bfloat16, b=2):
    h, hk = HEADS[heads]
    return make_inputs([(sq, sk)] * b, h, hk, d, dtype, DEVICE, False)[:3]


@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", SIZES)
def test_gpu_bwd_sizes(cute_bwd, sq, sk, causal, d):
    check_grads(cute_bwd, *batched(sq, sk, d=d), causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(113, 203), (799, 1023), (1, 300), (300, 1)])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_bwd_dtypes_heads(cute_bwd, dtype, heads, sq, sk, causal):
    """MHA, GQA and MQA (dK / dV summed over the group in the kernel), fp16 and bf16."""
    check_grads(cute_bwd, *batched(sq, sk, heads, 128, dtype), causal=causal)


@pytest.mark.parametrize("sq,sk", [(113, 203), (239, 1), (1023, 1024), (300, 129), (129, 300)])
@pytest.mark.parametrize("window", WINDOWS, ids=[f"w{wl}_{wr}" for wl, wr in WINDOWS])
def test_gpu_bwd_local(cute_bwd, window, sq, sk):
    """Windows narrower and wider than the tiles, left / right edge only and both (GQA)."""
    check_grads(cute_bwd, *batched(sq, sk, "gqa"), window_size=window)


@pytest.mark.parametrize("d", [64, 96])
@pytest.mark.parametrize("window", [(37, 11), (200, -1), (-1, 64)], ids=["both", "left", "right"])
def test_gpu_bwd_local_hdims(cute_bwd, window, d):
    check_grads(cute_bwd, *batched(333, 517, "mqa", d), window_size=window)


@pytest.mark.parametrize("sq,sk", [(239, 517), (517, 239)])
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [7.5, 30.0])
def test_gpu_bwd_softcap(cute_bwd, softcap, causal, d, sq, sk):
    q, k, v = batched(sq, sk, "gqa", d)
    check_grads(cute_bwd, q * 3, k, v, softcap=softcap, causal=causal)  # scores into tanh's bend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [8, 40, 72, 80, 120, 176, 200, 248])
def test_gpu_bwd_padded_hdims(cute_bwd, d, causal, dtype):
    """Head dims the kernel pads (to 64 / 96 / 128 / 192 / 256): zero columns loaded, dQ / dK / dV
    cut (at 200 and 248 inside the second warpgroup's column half of dK / dV's smem slabs)."""
    check_grads(cute_bwd, *batched(333, 517, "gqa", d, dtype), causal=causal)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", ["gqa", "mqa"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("layout", list(VARLEN))
def test_gpu_bwd_varlen(cute_bwd, layout, feature, heads, d):
    """Packed sequences (cu_seqlens, seqused_q / seqused_k), 0- and 1-token ones, every feature."""
    lens, seqused = VARLEN[layout]
    h, hk = HEADS[heads]
    q, k, v, kw = make_inputs(lens, h, hk, d, torch.bfloat16, DEVICE, True, seqused)
    check_grads(cute_bwd, q, k, v, kw, **FEATURES[feature])


@pytest.mark.parametrize("seed", range(24))
def test_gpu_bwd_random_lengths(cute_bwd, seed):
    """Seeded draws: lengths 1..1000 (batched or packed), head dims, heads, dtype, feature."""
    rng = random.Random(seed)
    heads, d = rng.choice(list(HEADS)), rng.choice([64, 72, 80, 96, 120, 128])
    dtype, feature = rng.choice([torch.bfloat16, torch.float16]), rng.choice(list(FEATURES))
    h, hk = HEADS[heads]
    varlen = rng.random() < 0.5
    lens = [(rng.randint(1, 1000), rng.randint(1, 1000)) for _ in range(rng.randint(1, 4))]
    q, k, v, kw = make_inputs(lens, h, hk, d, dtype, DEVICE, varlen)
    check_grads(cute_bwd, q, k, v, kw, **FEATURES[feature])


@pytest.mark.parametrize("feature", ["causal", "both", "softcap"])
@pytest.mark.parametrize("api", ["attention", "func", "varlen", "grad"])
def test_gpu_bwd_through_autograd(cute_bwd, api, feature):
    """fa3py.attention / flash_attn_func / flash_attn_varlen_func / autograd.grad: the forward and
    the backward both on cute, the backward kernel launched."""
    h, hk = HEADS["gqa"]
    lens = [(300, 517), (1, 40), (129, 129)] if api == "varlen" else [(300, 517)] * 2
    q, k, v, kw = make_inputs(lens, h, hk, 128, torch.bfloat16, DEVICE, api == "varlen")
    assert train_step(api, q, k, v, kw, **FEATURES[feature])[1:] == ("cute", "cute")
    assert len(cute_bwd) == 1


@pytest.mark.parametrize("sq,sk", [(113, 203), (1023, 1024), (1, 300), (300, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,dv", [(192, 192), (256, 256), (192, 128), (160, 160)])
def test_gpu_bwd_wide_hdims(cute_bwd, d, dv, causal, sq, sk):
    """Head dims above 128, their default tiles: hdim 192 (and 160 padded to it) the three-warpgroup
    64 x 96 one (dkv_transposed), hdim 256 and 192 x 128 the 64-key one (S^T / dP^T by query
    halves, P / dS through smem, dK / dV split by columns); GQA."""
    h, hk = HEADS["gqa"]
    q, k, _, _ = make_inputs([(sq, sk)] * 2, h, hk, d, torch.bfloat16, DEVICE, False)
    v = torch.randn(2, sk, hk, dv, device=DEVICE).to(torch.bfloat16)
    check_grads(cute_bwd, q, k, v, causal=causal)
    dkvt = bwd_launch.dkvt and d in (160, 192) and dv == d  # (FA3PY_CUTE_BWD_DKVT=0: 64 x 64)
    assert (cute_bwd[-1].dkv_transposed, cute_bwd[-1].dkv_split_hdim) == (dkvt, not dkvt)


# deterministic mode's features: its semaphores' skipped query blocks come from a left window
# edge or a chunk
DETERMINISTIC_FEATURES = {"plain": {}, "both": FEATURES["both"],
                          "chunk_causal": {"causal": True, "attention_chunk": 48}}


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("heads", ["mha", "mqa"])
@pytest.mark.parametrize("feature", list(DETERMINISTIC_FEATURES))
def test_gpu_bwd_deterministic(cute_bwd, feature, heads, d):
    """deterministic=True: the semaphores order the dQ adds, so two runs give the same bits, and
    the gradients pass the reference check."""
    check_deterministic(cute_bwd, heads, d, DETERMINISTIC_FEATURES[feature])


def check_deterministic(launches, heads, d, features):
    """Ragged sequences with deterministic=True: the reference check, then three more backwards
    of the same inputs giving the same bits."""
    h, hk = HEADS[heads]
    q, k, v, kw = make_inputs([(700, 650), (1, 9), (300, 1000)], h, hk, d, torch.bfloat16, DEVICE, True)
    check_grads(launches, q, k, v, kw, deterministic=True, **features)
    assert launches[-1].deterministic
    req = make_request(q, k, v, **kw, deterministic=True, **features)
    out, lse = cute_kernels.forward(req)
    dout = torch.randn_like(out)
    first = cute_kernels.backward(req, out, lse, dout)
    for _ in range(3):
        again = cute_kernels.backward(req, out, lse, dout)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), "deterministic=True gave other bits"


@pytest.mark.parametrize("split_waves", [0, 64], ids=["group_in_registers", "head_splits"])
@pytest.mark.parametrize("heads", ["gqa", "mqa"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_bwd_group_sum(cute_bwd, monkeypatch, heads, d, split_waves):
    """Both ways of summing dK / dV over a KV head's query heads: one CTA walking the whole group
    (sums in registers), and the group split over CTAs (fp32 partials the host sums)."""
    monkeypatch.setattr(bwd_launch, "SPLIT_WAVES", split_waves)
    h, hk = HEADS[heads]
    q, k, v, kw = make_inputs([(400, 700), (65, 3), (129, 260)], h, hk, d, torch.float16, DEVICE, True)
    check_grads(cute_bwd, q, k, v, kw, causal=True)
    assert cute_bwd[-1].dkv_partial == (split_waves > 0)


# attention_chunk: smaller than the 64-row / 64- or 128-key tiles, equal to them, not dividing
# them, above them
CHUNKS = [1, 40, 64, 128, 192, 1000]


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("feature", ["plain", "causal", "both"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_gpu_bwd_chunk(cute_bwd, chunk, feature, d):
    """attention_chunk alone, with causal and with a window (GQA; Lq < Lk, Lq > Lk): the key
    blocks' query ranges narrowed by the chunk, its edges masked."""
    for sq, sk in [(333, 517), (1023, 300)]:
        check_grads(cute_bwd, *batched(sq, sk, "gqa", d), attention_chunk=chunk, **FEATURES[feature])
        assert cute_bwd[-1].chunk


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("heads", ["gqa", "mqa"])
@pytest.mark.parametrize("feature", ["plain", "causal", "left", "softcap"])
@pytest.mark.parametrize("layout", list(VARLEN))
def test_gpu_bwd_chunk_varlen(cute_bwd, layout, feature, heads, d):
    """attention_chunk on packed sequences (0- and 1-token ones, seqused), GQA / MQA."""
    lens, seqused = VARLEN[layout]
    h, hk = HEADS[heads]
    q, k, v, kw = make_inputs(lens, h, hk, d, torch.float16, DEVICE, True, seqused)
    check_grads(cute_bwd, q, k, v, kw, attention_chunk=100, **FEATURES[feature])
    assert cute_bwd[-1].chunk


@pytest.mark.parametrize("api", ["func", "varlen"])
def test_gpu_bwd_chunk_through_autograd(cute_bwd, api):
    """flash_attn_func / flash_attn_varlen_func with attention_chunk: forward and backward on cute."""
    h, hk = HEADS["gqa"]
    lens = [(300, 517), (1, 40), (129, 129)] if api == "varlen" else [(300, 517)] * 2
    q, k, v, kw = make_inputs(lens, h, hk, 128, torch.bfloat16, DEVICE, api == "varlen")
    assert train_step(api, q, k, v, kw, causal=True, attention_chunk=96)[1:] == ("cute", "cute")
    assert len(cute_bwd) == 1 and cute_bwd[-1].chunk


# ----------------------------------------------------------------------------- variant tiles
# A head dim's other tiles, forced here so the GPU runs each case once per tile: hdim 64's 64-row
# tile (config.BWD_TILE_M_VARIANTS; its default is 128 rows, which the tests above run), hdim 128's
# 80-row tile (dQ^T with the head dim as M; the default from bwd_launch.M80_MIN_SEQLEN_Q rows:
# here with every feature at every size), and hdim 192's 64 x 64 split_hdim tile (the default
# being the three-warpgroup 64 x 96 one, dkv_transposed: bwd_launch.dkvt off brings it back, as
# deterministic does).
# (head dim, the config fields the variant's launches must have)
VARIANT_TILES = [(64, dict(tile_m=64)), (128, dict(tile_m=80)), (192, dict(tile_n=64, dkv_transposed=False))]


@pytest.fixture(params=VARIANT_TILES, ids=["d64_m64", "d128_m80", "d192_n64"])
def variant_tile(cute_bwd, monkeypatch, request):
    """(head dim, a check that a launch ran the variant, the launches' configs) with that head dim
    forced to that tile_m, or (hdim 192) bwd_launch.dkvt off."""
    hdim, want = request.param
    if hdim == 192:
        monkeypatch.setattr(bwd_launch, "dkvt", False)
    else:
        force_tile_m(monkeypatch, hdim, want["tile_m"])

    def ran_variant(cfg, **also):
        fields = dict(want, **also)
        assert all(getattr(cfg, k) == v for k, v in fields.items()), (cfg.short(), fields)

    return hdim, ran_variant, cute_bwd


@pytest.mark.parametrize("pad", [0, 24], ids=["d", "d_padded"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", SIZES + [(128, 128), (129, 257), (2048, 2048)])
def test_gpu_bwd_variant_tile_sizes(variant_tile, sq, sk, causal, pad):
    hdim, ran_variant, launches = variant_tile
    check_grads(launches, *batched(sq, sk, d=hdim - pad), causal=causal)
    ran_variant(launches[-1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_bwd_variant_tile_dtypes_heads(variant_tile, dtype, heads, causal):
    hdim, ran_variant, launches = variant_tile
    for sq, sk in [(113, 203), (799, 1023), (1, 300), (300, 1)]:
        check_grads(launches, *batched(sq, sk, heads, hdim, dtype), causal=causal)
        ran_variant(launches[-1])


@pytest.mark.parametrize("sq,sk", [(113, 203), (239, 1), (1023, 1024), (300, 129)])
@pytest.mark.parametrize("window", WINDOWS, ids=[f"w{wl}_{wr}" for wl, wr in WINDOWS])
def test_gpu_bwd_variant_tile_local(variant_tile, window, sq, sk):
    hdim, ran_variant, launches = variant_tile
    check_grads(launches, *batched(sq, sk, "gqa", hdim), window_size=window)
    ran_variant(launches[-1])


@pytest.mark.parametrize("sq,sk", [(239, 517), (517, 239)])
@pytest.mark.parametrize("feature", ["plain", "causal", "both"])
@pytest.mark.parametrize("softcap", [7.5, 30.0])
def test_gpu_bwd_variant_tile_softcap(variant_tile, softcap, feature, sq, sk):
    """softcap on the variant tiles (d tanh in fp32)."""
    hdim, ran_variant, launches = variant_tile
    q, k, v = batched(sq, sk, "gqa", hdim)
    check_grads(launches, q * 3, k, v, softcap=softcap, **FEATURES[feature])
    ran_variant(launches[-1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ds", [1, 2])
def test_gpu_bwd_m80_rule(cute_bwd, monkeypatch, causal, ds):
    """bwd_launch's rule (M80_BY_DEFAULT) from M80_MIN_SEQLEN_Q query rows: the 80-row tile, with
    one or two sdS buffers, at a ragged length past the threshold (lowered to 2048: at 8192 the
    fp64 reference holds ~20 GB, and the sharded GPU run's processes ran out of memory)."""
    monkeypatch.setattr(bwd_launch, "m80", None)
    monkeypatch.setattr(bwd_launch, "M80_BY_DEFAULT", True)
    monkeypatch.setattr(bwd_launch, "M80_MIN_SEQLEN_Q", 2048)
    monkeypatch.setattr(bwd_launch, "ds_stages", ds)
    s = bwd_launch.M80_MIN_SEQLEN_Q + 77
    check_grads(cute_bwd, *batched(s, s, "gqa", 128, b=1), causal=causal)
    assert (cute_bwd[-1].tile_m, cute_bwd[-1].ds_stages) == (80, ds)


@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("layout", list(VARLEN))
def test_gpu_bwd_variant_tile_varlen(variant_tile, layout, feature, heads):
    hdim, ran_variant, launches = variant_tile
    lens, seqused = VARLEN[layout]
    h, hk = HEADS[heads]
    q, k, v, kw = make_inputs(lens, h, hk, hdim, torch.bfloat16, DEVICE, True, seqused)
    check_grads(launches, q, k, v, kw, **FEATURES[feature])
    ran_variant(launches[-1])


@pytest.mark.parametrize("heads", ["mha", "mqa"])
@pytest.mark.parametrize("feature", list(DETERMINISTIC_FEATURES))
def test_gpu_bwd_variant_tile_deterministic(variant_tile, feature, heads):
    hdim, ran_variant, launches = variant_tile
    check_deterministic(launches, heads, hdim, DETERMINISTIC_FEATURES[feature])
    ran_variant(launches[-1])  # (hdim 192: deterministic takes the 64 x 64 tile with dkvt on too)


@pytest.mark.parametrize("chunk", [40, 128, 192])
@pytest.mark.parametrize("feature", ["plain", "causal", "both"])
def test_gpu_bwd_variant_tile_chunk(variant_tile, chunk, feature):
    hdim, ran_variant, launches = variant_tile
    for sq, sk in [(333, 517), (1023, 300)]:
        check_grads(launches, *batched(sq, sk, "gqa", hdim), attention_chunk=chunk, **FEATURES[feature])
        ran_variant(launches[-1], chunk=True)


# ----------------------------------------------------------------------------- ds_stages 2
# Two sdS buffers (BwdConfig.ds_stages; bwd_launch's default at hdim 64, FA3PY_CUTE_BWD_DS_STAGES=2
# forces it): one PdS barrier a block instead of two, so the warpgroups' order of writes and reads
# of sdS changes: every feature with it on, at the head dims whose tile takes it (64, 96, 128; 64
# not with softcap).
@pytest.fixture
def ds2(cute_bwd, monkeypatch):
    monkeypatch.setattr(bwd_launch, "ds_stages", 2)
    return cute_bwd


@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", SIZES + [(2048, 2048)])
def test_gpu_bwd_ds2_sizes(ds2, sq, sk, causal, d):
    check_grads(ds2, *batched(sq, sk, d=d), causal=causal)
    assert ds2[-1].ds_stages == 2


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("feature", ["both", "left", "softcap"])
def test_gpu_bwd_ds2_features(ds2, feature, heads, d):
    """Windows (both edges, left only) and softcap over MHA / GQA / MQA, fp16, two shapes."""
    for sq, sk in [(333, 517), (1023, 300)]:
        q, k, v = batched(sq, sk, heads, d, torch.float16)
        check_grads(ds2, q * 3, k, v, **FEATURES[feature])
        assert ds2[-1].ds_stages == (1 if d == 64 and feature == "softcap" else 2)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("feature", ["plain", "causal", "both"])
@pytest.mark.parametrize("layout", list(VARLEN))
def test_gpu_bwd_ds2_varlen_chunk(ds2, layout, feature, d):
    """Packed sequences (0- and 1-token ones, seqused) with and without attention_chunk."""
    lens, seqused = VARLEN[layout]
    h, hk = HEADS["gqa"]
    q, k, v, kw = make_inputs(lens, h, hk, d, torch.bfloat16, DEVICE, True, seqused)
    check_grads(ds2, q, k, v, kw, **FEATURES[feature])
    check_grads(ds2, q, k, v, kw, attention_chunk=100, **FEATURES[feature])
    assert ds2[-1].ds_stages == 2 and ds2[-1].chunk


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("feature", list(DETERMINISTIC_FEATURES))
def test_gpu_bwd_ds2_deterministic(ds2, feature, d):
    check_deterministic(ds2, "mqa", d, DETERMINISTIC_FEATURES[feature])
    assert ds2[-1].ds_stages == 2


# ----------------------------------------------------------------------------- dq_red
# dQ added from registers (BwdConfig.dq_red; bwd_launch's default at hdim 96 / 256,
# FA3PY_CUTE_BWD_DQ_RED=1 forces it): no sdQ, no dQ warp, and at hdim 256 two Q / dO stages. Every
# head dim with it, with one sdS buffer and, where the tile takes two (hdim <= 128), with two;
# at hdim 192 on the 64 x 64 tile (the three-warpgroup one adds dQ from registers always: the
# default-tile tests run it).
@pytest.fixture
def dq_red(cute_bwd, monkeypatch):
    monkeypatch.setattr(bwd_launch, "dq_red", True)
    monkeypatch.setattr(bwd_launch, "dkvt", False)
    return cute_bwd


def dq_red_cases(dims):
    """(d, sdS buffers): both counts where the tile takes two, else one (the same kernel twice)."""
    return [pytest.param(d, ds, id=f"d{d}-ds{ds}") for d in dims for ds in ((1, 2) if d <= 128 else (1,))]


def with_ds(monkeypatch, ds):
    monkeypatch.setattr(bwd_launch, "ds_stages", ds)


@pytest.mark.parametrize("d,ds", dq_red_cases([64, 96, 128, 192, 256]))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 1), (113, 203), (239, 1), (1023, 1024), (65, 129), (1000, 17)])
def test_gpu_bwd_dq_red_sizes(dq_red, monkeypatch, sq, sk, causal, d, ds):
    with_ds(monkeypatch, ds)
    check_grads(dq_red, *batched(sq, sk, d=d), causal=causal)
    assert dq_red[-1].dq_red and dq_red[-1].q_stages == 2 and dq_red[-1].ds_stages == ds


@pytest.mark.parametrize("d,ds", dq_red_cases([64, 128, 256]))
@pytest.mark.parametrize("heads", ["gqa", "mqa"])
@pytest.mark.parametrize("feature", ["both", "left", "softcap_causal"])
def test_gpu_bwd_dq_red_features(dq_red, monkeypatch, feature, heads, d, ds):
    with_ds(monkeypatch, ds)
    for sq, sk in [(333, 517), (1023, 300)]:
        q, k, v = batched(sq, sk, heads, d, torch.float16)
        check_grads(dq_red, q * 3, k, v, **FEATURES[feature])
        assert dq_red[-1].dq_red
        assert dq_red[-1].ds_stages == (1 if d == 64 and "softcap" in feature else ds)


@pytest.mark.parametrize("d,ds", dq_red_cases([64, 128, 256]))
@pytest.mark.parametrize("layout", list(VARLEN))
def test_gpu_bwd_dq_red_varlen_chunk_group(dq_red, monkeypatch, layout, d, ds):
    """Packed sequences (0- and 1-token ones, seqused), attention_chunk, and the GQA group split
    over CTAs (float32 dK / dV partials)."""
    with_ds(monkeypatch, ds)
    lens, seqused = VARLEN[layout]
    h, hk = HEADS["gqa"]
    q, k, v, kw = make_inputs(lens, h, hk, d, torch.bfloat16, DEVICE, True, seqused)
    check_grads(dq_red, q, k, v, kw, causal=True)
    check_grads(dq_red, q, k, v, kw, attention_chunk=100, window_size=(200, -1))
    monkeypatch.setattr(bwd_launch, "SPLIT_WAVES", 64)
    check_grads(dq_red, q, k, v, kw, causal=True)
    assert dq_red[-1].dq_red and dq_red[-1].dkv_partial and dq_red[-1].ds_stages == ds


@pytest.mark.parametrize("ds", [1, 2])
def test_gpu_bwd_dq_red_not_deterministic(dq_red, monkeypatch, ds):
    """deterministic=True keeps the dQ warp's ordered adds with dq_red on."""
    with_ds(monkeypatch, ds)
    check_deterministic(dq_red, "mqa", 128, {})
    assert not dq_red[-1].dq_red
