"""MLA's qv (scores = q k^T + qv v^T) and wide V head dims (headdim_v up to 512 with headdim <=
64), FlashAttention-3's rules, on the torch path (qv also in the Triton forward): the reference
against a direct einsum, then fa3py.attention, the FA3 functions and flash_attn_with_kvcache
against the reference."""

import os

import pytest
import torch

import fa3py
from fa3py import reference
from fa3py.validation import make_request

from _util import DEVICE, assert_within, check_backward, check_forward, inputs, packed


def test_reference_qv_is_the_einsum():
    q, k, v = inputs(2, 7, 11, 4, 2, 16, 32, torch.float64)
    qv = torch.randn(2, 7, 4, 32, dtype=torch.float64, device=DEVICE)
    out, lse = reference.attention(make_request(q.bfloat16(), k.bfloat16(), v.bfloat16(), qv=qv.bfloat16()))
    q, k, v, qv = (x.bfloat16().double() for x in (q, k, v, qv))
    kk, vv = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    s = (torch.einsum("bqhd,bkhd->bhqk", q, kk) + torch.einsum("bqhd,bkhd->bhqk", qv, vv)) / (16 + 32) ** 0.5
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vv))


@pytest.mark.parametrize("lq,lk", [(1, 1), (113, 203), (65, 17)])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(20, 3), softcap=5.0), dict(attention_chunk=16)])
def test_attention_qv_wide_v(lq, lk, kw):
    q, k, v = inputs(2, lq, lk, 4, 1, 64, 512, torch.bfloat16)
    qv = torch.randn(2, lq, 4, 512, device=DEVICE).to(torch.bfloat16)
    out, lse = fa3py.attention(q, k, v, qv=qv, return_lse=True, **kw)
    check_forward(make_request(q, k, v, qv=qv, **kw), out, lse)
    assert "forward: torch" in fa3py.explain(q, k, v, qv=qv, **kw)


def test_varlen_qv():
    lens_q, lens_k = [37, 0, 13], [50, 9, 0]
    q, cu_q = packed(lens_q, 4, 64, torch.float16)
    qv, _ = packed(lens_q, 4, 256, torch.float16)
    k, cu_k = packed(lens_k, 2, 64, torch.float16)
    v, _ = packed(lens_k, 2, 256, torch.float16)
    out, lse = fa3py.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 37, 50, causal=True, qv=qv, return_attn_probs=True)
    check_forward(make_request(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, qv=qv), out, lse)


def test_kvcache_qv():
    q = torch.randn(2, 3, 4, 64, device=DEVICE).bfloat16()
    qv = torch.randn(2, 3, 4, 256, device=DEVICE).bfloat16()
    k_cache = torch.randn(2, 40, 1, 64, device=DEVICE).bfloat16()
    v_cache = torch.randn(2, 40, 1, 256, device=DEVICE).bfloat16()
    k, v = torch.randn(2, 3, 1, 64, device=DEVICE).bfloat16(), torch.randn(2, 3, 1, 256, device=DEVICE).bfloat16()
    seqlens = torch.tensor([10, 30], dtype=torch.int32, device=DEVICE)
    kw = dict(cache_seqlens=seqlens, causal=True, qv=qv)
    ref = reference.attention_with_kvcache(q, k_cache, v_cache, k, v, **kw)
    pt = reference.attention_with_kvcache(q, k_cache, v_cache, k, v, **kw, dtype=torch.bfloat16)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse, *_ = fa3py.flash_attn_with_kvcache(q, kc, vc, k, v, **kw, return_softmax_lse=True)
    assert_within("out", out, ref[0], pt[0], 2e-3)
    assert_within("lse", lse, ref[1], pt[1], 2e-3)
    assert torch.equal(kc, ref[2]) and torch.equal(vc, ref[3])


def test_wide_v_backward_and_qv_backward_raises():
    q, k, v = inputs(1, 33, 47, 2, 1, 32, 384, torch.bfloat16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fa3py.attention(*leaves, causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    check_backward(make_request(q, k, v, causal=True), dout, [x.grad for x in leaves])

    qv = torch.randn(1, 33, 2, 384, device=DEVICE).bfloat16().requires_grad_()
    with torch.no_grad():
        want = fa3py.attention(q, k, v, qv=qv)
    out = fa3py.attention(q, k, v, qv=qv)  # only qv requires grad
    assert out.requires_grad and torch.equal(out.detach(), want)
    with pytest.raises(NotImplementedError, match="`qv`"):
        out.sum().backward()


@pytest.mark.parametrize("make,exc,match", [
    (lambda q, k, v: dict(qv=torch.randn(1, 5, 2, 64, device=DEVICE).bfloat16()), ValueError, "`qv` must have shape"),
    (lambda q, k, v: dict(qv=torch.randn(1, 5, 2, 512, device=DEVICE).half()), TypeError, "`qv` must have q's dtype"),
])
def test_bad_qv(make, exc, match):
    q, k, v = inputs(1, 5, 6, 2, 1, 64, 512, torch.bfloat16)
    with pytest.raises(exc, match=match):
        fa3py.flash_attn_func(q, k, v, **make(q, k, v))


def test_wide_v_needs_small_qk_headdim():
    q, k, v = inputs(1, 5, 6, 2, 1, 128, 512, torch.bfloat16)
    with pytest.raises(ValueError, match="`v` head dimension 512 > 256 needs q/k's head dimension <= 64"):
        fa3py.attention(q, k, v)
    q, k, v = inputs(1, 5, 6, 2, 1, 64, 520, torch.bfloat16)
    with pytest.raises(ValueError, match="at most 512"):
        fa3py.attention(q, k, v)


def test_qv_compiles():
    torch._dynamo.reset()
    q, k, v = inputs(1, 9, 9, 2, 1, 32, 256, torch.bfloat16)
    qv = torch.randn(1, 9, 2, 256, device=DEVICE).bfloat16()
    fn = lambda q, k, v, qv: fa3py.flash_attn_func(q, k, v, qv=qv, causal=True)  # noqa: E731
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, qv), fn(q, k, v, qv))


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"),
                    reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("lq,lk,kw", [(77, 130, dict(causal=True)), (40, 23, dict(attention_chunk=16, softcap=4.0))])
def test_triton_forward_qv(lq, lk, kw, monkeypatch):
    """The Triton forward adds qv . v from the V tile it loads anyway; poisoned outputs."""
    import triton_fallback
    from triton_fallback import ops as triton_ops

    monkeypatch.setattr(triton_ops, "POISON", True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = inputs(2, lq, lk, 4, 2, 32, 64, torch.bfloat16, device=device)
    qv = torch.randn(2, lq, 4, 64, device=device).to(torch.bfloat16)
    req = make_request(q, k, v, qv=qv, **kw)
    assert triton_fallback.why_not(req, False) is None and triton_fallback.why_not(req, True) is not None
    check_forward(req, *triton_fallback.forward(req))
    out = fa3py.attention(q, k, v, qv=qv, backend="triton", **kw)
    assert torch.equal(out, triton_fallback.forward(req)[0])


try:  # (cute_kernels' host code; its kernel emulated)
    from tests.cute_emulation import emulated_sm90  # noqa: F401  (fixture, by name)
except ImportError:  # pragma: no cover
    emulated_sm90 = None

# (batch, lq, lk, h, hk, d, dv, call, splits): FA3's 64 x 256 and the equal pairs the cute kernel
# takes with qv (cute_kernels.config.QV_HDIM_PAIRS); MQA decoding (GQA packing: qv packed with q)
# split three ways; windows, softcap and a chunk; hdim 56 padded to the kernel's 64.
CUTE_QV = [
    (2, 77, 130, 4, 2, 64, 256, dict(causal=True), "1"),
    (2, 1, 700, 16, 1, 64, 256, dict(causal=True), "3"),
    (2, 1, 300, 128, 1, 64, 512, dict(causal=True), "1"), (2, 70, 200, 4, 1, 64, 512, dict(softcap=3.0), "2"),
    (1, 130, 130, 2, 2, 48, 512, dict(window_size=(40, 0)), "1"),
    (1, 40, 23, 2, 2, 128, 128, dict(softcap=4.0, window_size=(8, 3)), "1"),
    (2, 33, 300, 6, 2, 96, 96, dict(attention_chunk=64), "2"),
    (1, 19, 19, 4, 4, 56, 56, {}, "1"),
]


@pytest.mark.skipif(emulated_sm90 is None, reason="needs cute_kernels' host code")
@pytest.mark.parametrize("b,lq,lk,h,hk,d,dv,call,splits", CUTE_QV)
def test_cute_qv_emulated(b, lq, lk, h, hk, d, dv, call, splits, emulated_sm90, monkeypatch):
    """On an (emulated) sm90 the dispatcher sends qv to the cute forward: a config with qv and the
    wider head dim's tile, qv packed with q where GQA packs rows, split-KV's partials and combine;
    the emulated kernel adds qv . v from the operands launch_kernel hands it, and the result is
    the reference's."""
    import cute_kernels
    from cute_kernels import launch
    from fa3py import dispatch

    monkeypatch.setattr(launch, "split_kv_setting", splits)
    monkeypatch.setattr(launch, "qv_enabled", True)
    q, k, v = inputs(b, lq, lk, h, hk, d, dv, torch.bfloat16, device="cpu")
    qv = torch.randn(b, lq, h, dv).bfloat16()
    req = make_request(q, k, v, qv=qv, **call)
    assert dispatch.choose(req).name == "cute"
    cfg = cute_kernels.config_for(req)
    assert cfg.qv and cfg.split_kv == (splits != "1") and (lq > 1 or cfg.pack_gqa == h // hk)
    # the wider head dim's tile_n (hdim 256's 64 for 64 x 256; QV_WIDE_TILE's 64 for 512), one Q stage
    from cute_kernels.config import TILES, padded_hdim
    assert cfg.tile.tile_n == (64 if dv == 512 else TILES[max(padded_hdim(d), dv)].tile_n)
    assert cfg.tile.q_stages == 1 and cfg.tile.o_split == (2 if dv == 512 else 1)
    before = qv.clone()
    out, lse = fa3py.attention(q, k, v, qv=qv, return_lse=True, **call)
    check_forward(req, out, lse)
    assert torch.equal(qv, before)
    assert "sm90 forward" in fa3py.explain(q, k, v, qv=qv, **call) and " qv" in cute_kernels.describe(req, False)


@pytest.mark.skipif(emulated_sm90 is None, reason="needs cute_kernels' host code")
def test_cute_qv_emulated_varlen_and_paged(emulated_sm90, monkeypatch):
    """qv through flash_attn_varlen_func (packed sequences, an empty one) and through
    flash_attn_with_kvcache from a paged cache the kernel reads (MQA decoding, new keys appended)
    on the (emulated) cute forward: the reference's results, no gather of the pages."""
    from fa3py import kvcache

    monkeypatch.setattr(kvcache, "_gather_keys", lambda *a, **k: pytest.fail("the paged cache was gathered"))
    check_qv_varlen_and_paged(monkeypatch, "cpu", [37, 0, 13], [50, 9, 70], seqlens=[130, 300], q_len=1)


def check_qv_varlen_and_paged(monkeypatch, device, lens_q, lens_k, seqlens, q_len):
    """qv (hdim 64 x 256, GQA 4 / 2) with packed sequences of lens_q / lens_k queries / keys; then
    decoding q_len queries (MQA, 16 heads) per sequence from a paged cache (64-row pages) holding
    `seqlens` keys, with the kernel reading the pages (FA3PY_CUTE_PAGED)."""
    from cute_kernels import launch

    from test_kvcache import run_and_check

    monkeypatch.setattr(launch, "qv_enabled", True)
    q, cu_q = packed(lens_q, 4, 64, torch.bfloat16, device)
    qv, _ = packed(lens_q, 4, 256, torch.bfloat16, device)
    k, cu_k = packed(lens_k, 2, 64, torch.bfloat16, device)
    v, _ = packed(lens_k, 2, 256, torch.bfloat16, device)
    mq, mk = max(lens_q), max(lens_k)
    out, lse = fa3py.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=True, qv=qv, return_attn_probs=True)
    check_forward(make_request(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk,
                               causal=True, qv=qv), out, lse)

    monkeypatch.setattr(launch, "paged_enabled", True)
    g = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=g).bfloat16().to(device)  # noqa: E731
    b, page_size = len(seqlens), 64
    per_seq = -(-(max(seqlens) + q_len) // page_size)
    pages = b * per_seq + 3
    call = dict(q=rand(b, q_len, 16, 64), qv=rand(b, q_len, 16, 256), k_cache=rand(pages, page_size, 1, 64),
                v_cache=rand(pages, page_size, 1, 256), k=rand(b, q_len, 1, 64), v=rand(b, q_len, 1, 256),
                page_table=torch.randperm(pages, generator=g)[:b * per_seq].view(b, per_seq).int().to(device),
                cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device))
    run_and_check(call, causal=True)


GPU_QV = [  # (b, lq, lk, h, hk, d, dv, call)
    (2, 113, 203, 4, 2, 64, 256, dict(causal=True)), (1, 1023, 1024, 4, 4, 64, 256, {}),
    (3, 1, 4000, 16, 1, 64, 256, dict(causal=True)), (2, 300, 129, 8, 1, 64, 256, dict(window_size=(37, 11))),
    (2, 239, 1, 2, 2, 128, 128, dict(softcap=5.0)), (1, 700, 900, 4, 2, 128, 128, dict(causal=True)),
    (2, 77, 300, 6, 2, 96, 96, dict(attention_chunk=64)), (1, 799, 3, 2, 1, 64, 64, dict(causal=True)),
    (4, 1, 5000, 128, 1, 64, 512, dict(causal=True)), (2, 4, 777, 128, 1, 64, 512, dict(causal=True)),
    (2, 300, 700, 8, 1, 64, 512, dict(causal=True, softcap=10.0)), (1, 1023, 1023, 2, 2, 64, 512, {}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,lq,lk,h,hk,d,dv,call", GPU_QV)
def test_gpu_cute_qv(b, lq, lk, h, hk, d, dv, call, monkeypatch):
    """qv on the Hopper kernel against the float64 reference (twice PyTorch's error), ragged sizes,
    GQA / MQA decoding (packed), windows, softcap, a chunk."""
    from cute_kernels import launch
    from fa3py import dispatch

    monkeypatch.setattr(launch, "qv_enabled", True)

    q, k, v = inputs(b, lq, lk, h, hk, d, dv, torch.bfloat16, device="cuda")
    qv = torch.randn(b, lq, h, dv, device="cuda").bfloat16()
    req = make_request(q, k, v, qv=qv, **call)
    assert dispatch.choose(req).name == "cute"
    out, lse = fa3py.attention(q, k, v, qv=qv, return_lse=True, **call)
    check_forward(req, out, lse)


@pytest.mark.gpu
def test_gpu_cute_qv_varlen_and_paged(monkeypatch):
    """qv with packed sequences, and decoding from a paged cache the kernel reads (FA3PY_CUTE_PAGED)."""
    check_qv_varlen_and_paged(monkeypatch, "cuda", [37, 0, 130, 1], [50, 9, 700, 300], seqlens=[130, 700, 5], q_len=2)


def test_explain_says_qv_has_no_backward():
    """fa3py.explain names the forward's backend and, for qv (forward only, as in FA3), no backward
    backend but the reason."""
    q, k, v = inputs(1, 5, 6, 2, 1, 64, 256, torch.bfloat16)
    text = fa3py.explain(q, k, v, qv=torch.randn(1, 5, 2, 256, device=DEVICE).bfloat16())
    assert text.splitlines()[0].startswith("forward: ")
    assert text.splitlines()[1].startswith("backward: none (fa3py: `qv` (MLA) has no backward pass")
    assert not fa3py.explain(q, k, v).splitlines()[1].startswith("backward: none")
