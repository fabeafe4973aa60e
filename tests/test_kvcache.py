"""flash_attn_with_kvcache, flash_attn_combine, get_scheduler_metadata and
flash_attn_qkvpacked_func against the float64 reference (`reference.attention_with_kvcache`, a
per-sequence loop written from FA3's semantics), on the torch path and in the Triton
interpreter. The KV cache is the one input updated (in place, as FA3 does); every other input
is checked unchanged."""

import dataclasses
import itertools
import math
import os

import pytest
import torch

import fa3py
from fa3py import reference
from fa3py.validation import make_request

from _util import DEVICE, assert_within, check_backward, check_forward

BATCH, HEADS, HEADS_KV, CAP = 3, 4, 2, 37


def _make(*, d=32, dv=32, page_size=None, leftpad=False, batch_idx=False, varlen_q=False, new_kv=True,
          varlen_new=False, rotary_dim=0, dtype=torch.bfloat16, seed=0):
    """Inputs as FA3's test_flash_attn_kvcache builds them (small): returns the kwargs of the call."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    rows = BATCH * 2 if batch_idx else BATCH
    kw = {}
    if varlen_q:
        lens = [3, 0, 5]
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)
        kw.update(q=rand(int(cu[-1]), HEADS, d), cu_seqlens_q=cu, max_seqlen_q=max(lens))
    else:
        kw.update(q=rand(BATCH, 5, HEADS, d))
    new_lens = [0] * BATCH
    if new_kv:
        if varlen_new:
            new_lens = [2, 0, 4]
            cu = torch.tensor([0, *itertools.accumulate(new_lens)], dtype=torch.int32, device=DEVICE)
            kw.update(k=rand(int(cu[-1]), HEADS_KV, d), v=rand(int(cu[-1]), HEADS_KV, dv), cu_seqlens_k_new=cu)
        else:
            new_lens = [3] * BATCH
            kw.update(k=rand(BATCH, 3, HEADS_KV, d), v=rand(BATCH, 3, HEADS_KV, dv))
    lo = 0 if new_kv else 1
    seqlens = [int(torch.randint(lo, CAP - new_lens[b] + 1, (1,), generator=g)) for b in range(BATCH)]
    kw["cache_seqlens"] = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    if leftpad:
        kw["cache_leftpad"] = torch.tensor([int(torch.randint(0, s + 1, (1,), generator=g)) for s in seqlens],
                                           dtype=torch.int32, device=DEVICE)
    if batch_idx:
        kw["cache_batch_idx"] = torch.randperm(rows, generator=g)[:BATCH].to(torch.int32).to(DEVICE)
    if page_size is None:
        kw.update(k_cache=rand(rows, CAP, HEADS_KV, d), v_cache=rand(rows, CAP, HEADS_KV, dv))
    else:
        per_seq = math.ceil(CAP / page_size)
        pages = per_seq * rows + 3
        kw.update(k_cache=rand(pages, page_size, HEADS_KV, d), v_cache=rand(pages, page_size, HEADS_KV, dv),
                  page_table=torch.randperm(pages, generator=g)[:per_seq * rows].view(rows, per_seq)
                  .to(torch.int32).to(DEVICE))
    if rotary_dim:
        angle = torch.rand(CAP + 8, rotary_dim // 2, generator=g) * 2 * math.pi
        kw.update(rotary_cos=angle.cos().to(dtype).to(DEVICE), rotary_sin=angle.sin().to(dtype).to(DEVICE))
    return kw


def run_and_check(kw, **call):
    """Calls fa3py.flash_attn_with_kvcache on copies of the caches, checks out / lse against the
    reference (twice PyTorch's error), the updated caches against the reference's, and that no
    other input changed."""
    kw = dict(kw)
    k_cache, v_cache = kw.pop("k_cache"), kw.pop("v_cache")
    kc, vc = k_cache.clone(), v_cache.clone()
    before = {n: x.clone() for n, x in kw.items() if isinstance(x, torch.Tensor)}
    out, lse, *accum = fa3py.flash_attn_with_kvcache(k_cache=kc, v_cache=vc, **kw, **call, return_softmax_lse=True)
    for n, x in before.items():
        assert torch.equal(x, kw[n]), f"{n} was modified"
    ref_args = {n: x for n, x in kw.items() if n != "max_seqlen_q"}
    ref_args.update({n: x for n, x in call.items() if n not in ("num_splits", "pack_gqa", "scheduler_metadata")})
    ref_out, ref_lse, ref_kc, ref_vc = reference.attention_with_kvcache(k_cache=k_cache, v_cache=v_cache,
                                                                        **ref_args)
    pt_out, pt_lse, _, _ = reference.attention_with_kvcache(k_cache=k_cache, v_cache=v_cache, dtype=kw["q"].dtype,
                                                            **ref_args)
    assert out.dtype == kw["q"].dtype and lse.dtype == torch.float32 and len(accum) == 2
    assert_within("out", out, ref_out, pt_out, 2e-3)
    assert_within("lse", lse, ref_lse, pt_lse, 2e-3)
    assert torch.equal(vc, ref_vc)
    if "rotary_cos" in kw:  # rotated in float32 here, in float64 there: equal up to one rounding
        torch.testing.assert_close(kc.float(), ref_kc.float(), rtol=8e-3, atol=1e-5)
    else:
        assert torch.equal(kc, ref_kc)
    return out, lse


MASKS = {"plain": {}, "causal": dict(causal=True), "local": dict(window_size=(9, 2)),
         "chunk": dict(causal=True, attention_chunk=6), "softcap": dict(softcap=4.0)}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("page_size", [None, 1, 4, 37])
def test_paged_and_contiguous(page_size, mask):
    run_and_check(_make(page_size=page_size), **MASKS[mask])


@pytest.mark.parametrize("leftpad,batch_idx,varlen_q,varlen_new,page_size", [
    (True, False, False, False, None), (False, True, False, False, None), (True, True, True, True, 3),
    (False, True, True, False, 5), (True, False, False, True, 1),
])
def test_leftpad_batch_idx_varlen(leftpad, batch_idx, varlen_q, varlen_new, page_size):
    kw = _make(leftpad=leftpad, batch_idx=batch_idx, varlen_q=varlen_q, varlen_new=varlen_new, page_size=page_size)
    run_and_check(kw, causal=True)
    run_and_check(kw, window_size=(7, 0), attention_chunk=5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 32])
@pytest.mark.parametrize("mask", ["plain", "causal", "chunk"])
def test_rotary(rotary_dim, interleaved, mask):
    kw = _make(rotary_dim=rotary_dim, leftpad=True, page_size=4 if interleaved else None)
    run_and_check(kw, rotary_interleaved=interleaved, **MASKS[mask])


def test_rotary_seqlens_varlen():
    kw = _make(rotary_dim=16, varlen_q=True, varlen_new=True, batch_idx=True)
    kw["rotary_seqlens"] = kw["cache_seqlens"] // 2
    run_and_check(kw, causal=True, rotary_interleaved=False)


def test_no_new_kv_int_seqlens_gqa_dv_and_hints():
    kw = _make(new_kv=False, dv=48, page_size=8)
    kw["cache_seqlens"] = 20
    meta = fa3py.get_scheduler_metadata(BATCH, 5, CAP, HEADS, HEADS_KV, 32, torch.full((BATCH,), 20, dtype=torch.int32),
                                        headdim_v=48, page_size=8, causal=True)
    run_and_check(kw, causal=True, num_splits=3, pack_gqa=True, scheduler_metadata=meta)
    kw.pop("cache_seqlens")  # the whole cache
    run_and_check(kw)


def test_triton_interpreter(monkeypatch):
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("FA3PY_BACKEND", "triton")
    kw = _make(page_size=4, leftpad=True, rotary_dim=16, varlen_q=True, varlen_new=True)
    run_and_check(kw, causal=True, attention_chunk=8)


def test_fp8_descales():
    kw = _make(new_kv=True, page_size=4)
    for n in ("q", "k", "v", "k_cache", "v_cache"):
        kw[n] = kw[n].float().to(torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(3)
    for n in ("q_descale", "k_descale", "v_descale"):
        kw[n] = (torch.rand(BATCH, HEADS_KV, generator=g) + 0.5).to(DEVICE)
    kw_ref = dict(kw)
    k_cache, v_cache = kw.pop("k_cache"), kw.pop("v_cache")
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse, *_ = fa3py.flash_attn_with_kvcache(kw.pop("q"), kc, vc, kw.pop("k"), kw.pop("v"), **kw, causal=True,
                                                 return_softmax_lse=True)
    q = kw_ref.pop("q")
    ref_out, ref_lse, ref_kc, _ = reference.attention_with_kvcache(q, kw_ref.pop("k_cache"), kw_ref.pop("v_cache"),
                                                                   **kw_ref, causal=True)
    assert out.dtype == torch.bfloat16 and torch.equal(kc.view(torch.uint8), ref_kc.view(torch.uint8))
    pt = reference.attention_with_kvcache(q, k_cache, v_cache, **kw_ref, causal=True, dtype=torch.bfloat16)
    assert_within("out", out, ref_out, pt[0], 2e-2)


@pytest.mark.parametrize("call,exc,name", [
    (dict(k_cache=torch.zeros(3, 37, 2, 32)), TypeError, "k_cache"),  # float32
    (dict(cache_seqlens=torch.tensor([40, 0, 0], dtype=torch.int32)), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=None), ValueError, "cache_seqlens"),
    (dict(cache_batch_idx=torch.tensor([0, 1, 9], dtype=torch.int32)), ValueError, "cache_batch_idx"),
    (dict(cache_leftpad=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "cache_leftpad"),
    (dict(page_table=torch.zeros(3, 2)), TypeError, "page_table"),
    (dict(rotary_cos=torch.zeros(50, 4, dtype=torch.bfloat16), rotary_sin=torch.zeros(50, 4, dtype=torch.bfloat16)),
     ValueError, "rotary_cos"),
    (dict(rotary_cos=torch.zeros(50, 8, dtype=torch.bfloat16)), ValueError, "rotary_sin"),
    (dict(k=None), ValueError, "`k`"),
    (dict(qv=torch.zeros(1)), TypeError, "qv"),
    (dict(window_size=(-3, 0)), ValueError, "window_size"),
    (dict(sm_margin=-4), ValueError, "sm_margin"),
])
def test_bad_arguments(call, exc, name):
    kw = _make()
    kw.update({n: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x) for n, x in call.items()})
    if kw.get("cache_seqlens", 0) is None:
        kw.pop("cache_seqlens")
    before = {n: x.clone() for n, x in kw.items() if isinstance(x, torch.Tensor)}
    with pytest.raises(exc, match=name):
        fa3py.flash_attn_with_kvcache(**kw)
    for n, x in before.items():  # validation fails before the cache is touched
        assert torch.equal(x, kw[n]), n


def test_combine_matches_fa3s_reference():
    """FA3's attention_combine_ref: lse = logsumexp over splits; out = sum of exp(lse_s - lse) *
    out_s, NaN / inf weights as 0; rows no split saw give 0 and -inf. Non-contiguous inputs."""
    splits, b, s, h, d = 5, 3, 7, 4, 40
    out_p = torch.randn(splits * 2, b, h, s, d, device=DEVICE).transpose(2, 3)[:splits]
    lse_p = torch.randn(splits, b, h * 2, s, device=DEVICE).transpose(-1, -2)[:, :, :, :h]
    lse_p[splits // 2:, :1] = -float("inf")
    lse_p[:, 2, 3] = -float("inf")  # one row seen by no split
    before = out_p.clone(), lse_p.clone()
    for dtype in (torch.float32, torch.bfloat16):
        out, lse = fa3py.flash_attn_combine(out_p, lse_p, out_dtype=dtype)
        ref_lse = torch.logsumexp(lse_p.double(), dim=0)
        scale = torch.exp(lse_p.double() - ref_lse)
        scale = torch.where(torch.isinf(scale) | torch.isnan(scale), torch.zeros_like(scale), scale)
        ref = (scale.unsqueeze(-1) * out_p.double()).sum(0)
        assert out.dtype == dtype and out.shape == (b, s, h, d) and lse.shape == (b, s, h)
        assert_within("out", out, ref, ref.to(dtype), 1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[2, 3], torch.zeros_like(out[2, 3])) and torch.isinf(lse[2, 3]).all()
    assert torch.equal(before[0], out_p) and torch.equal(before[1], lse_p)
    into = torch.empty(b, s, h, d, device=DEVICE)
    assert fa3py.flash_attn_combine(out_p, lse_p, out=into)[0] is into


@pytest.mark.parametrize("layout", ["3", "gqa"])
def test_qkvpacked(layout):
    b, s, h, d = 2, 33, 4, 32
    if layout == "3":
        qkv = torch.randn(b, s, 3, h, d, device=DEVICE).to(torch.bfloat16)
        q, k, v = qkv.unbind(2)
        kw = {}
    else:
        qkv = torch.randn(b, s, h + 2 * 2, d, device=DEVICE).to(torch.bfloat16)
        q, k, v = qkv.split([h, 2, 2], dim=2)
        kw = dict(num_heads_q=h)
    leaf = qkv.clone().requires_grad_()
    out, lse = fa3py.flash_attn_qkvpacked_func(leaf, causal=True, attention_chunk=8, return_attn_probs=True, **kw)
    req = make_request(q, k, v, causal=True, attention_chunk=8)
    check_forward(req, out.detach(), lse)
    dout = torch.randn_like(out)
    out.backward(dout)
    grads = leaf.grad.unbind(2) if layout == "3" else leaf.grad.split([h, 2, 2], dim=2)
    check_backward(req, dout, grads)


def test_qkvpacked_bad_num_heads_q():
    qkv = torch.randn(1, 8, 7, 32, device=DEVICE).to(torch.bfloat16)
    with pytest.raises(ValueError, match="num_heads_q"):
        fa3py.flash_attn_qkvpacked_func(qkv, num_heads_q=4)


@pytest.mark.gpu
def test_gpu_kvcache_decode_step_in_a_cuda_graph():
    """A decode step (append one token with rotary into a paged cache, attend) captured in a
    CUDA graph and replayed gives the eager result: nothing reads the index tensors on the host
    during capture."""
    kw = _make(page_size=16, rotary_dim=16, leftpad=True)
    kw["q"], kw["k"], kw["v"] = kw["q"][:, :1], kw["k"][:, :1], kw["v"][:, :1]
    saved = kw["k_cache"].clone(), kw["v_cache"].clone()
    eager = fa3py.flash_attn_with_kvcache(**kw, causal=True)
    want_cache = kw["k_cache"].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside capture
        for _ in range(2):
            kw["k_cache"].copy_(saved[0]), kw["v_cache"].copy_(saved[1])
            fa3py.flash_attn_with_kvcache(**kw, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fa3py.flash_attn_with_kvcache(**kw, causal=True)
    kw["k_cache"].copy_(saved[0]), kw["v_cache"].copy_(saved[1])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(kw["k_cache"], want_cache)


def test_rotary_table_only_as_long_as_needed():
    """Not causal nor local: every q token sits at rotary_seqlens, so cos / sin need only cover
    the new keys (FA3's test sizes them so); causal needs room for every q token."""
    kw = _make(rotary_dim=16)
    kw["cache_seqlens"] = torch.full((BATCH,), CAP - 3, dtype=torch.int32, device=DEVICE)
    kw["rotary_cos"], kw["rotary_sin"] = kw["rotary_cos"][:CAP], kw["rotary_sin"][:CAP]  # 3 new keys, 5 queries
    run_and_check(kw)
    with pytest.raises(ValueError, match="rotary_cos"):
        run_and_check(kw, causal=True)


# ---- paged K / V read by the cute kernel (sm90 emulated on the CPU) --------------------------
cute_emulation = pytest.importorskip("tests.cute_emulation") if not torch.cuda.is_available() else None
emulated_sm90 = cute_emulation.emulated_sm90 if cute_emulation is not None else None


def _paged_in_kernel(monkeypatch):
    """The cute kernel reads the pages (cute_kernels.launch.paged_enabled: the default, FA3PY_CUTE_PAGED=0 off)."""
    from cute_kernels import launch

    monkeypatch.setattr(launch, "paged_enabled", True)


def _paged(page_size, *, batch=3, q_len=1, heads=8, heads_kv=2, d=64, cap=700, seqlens=(1, 383, 700), new=1,
           varlen_q=False, batch_idx=False, seed=1, device="cpu"):
    """A decode-shaped paged flash_attn_with_kvcache call (kwargs): pages shuffled in a pool with
    spare pages, ragged cache_seqlens (new tokens appended after them), optionally varlen q and a
    cache_batch_idx over twice the sequences."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).to(device)  # noqa: E731
    rows = 2 * batch if batch_idx else batch
    per_seq = math.ceil(cap / page_size)
    pages = per_seq * rows + 5
    kw = dict(k_cache=rand(pages, page_size, heads_kv, d), v_cache=rand(pages, page_size, heads_kv, d),
              page_table=torch.randperm(pages, generator=g)[:per_seq * rows].view(rows, per_seq).to(torch.int32)
              .to(device),
              cache_seqlens=torch.tensor([min(s, per_seq * page_size - new) for s in seqlens], dtype=torch.int32,
                                         device=device))
    if varlen_q:
        lens = [q_len + i % 3 for i in range(batch)]
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
        kw.update(q=rand(int(cu[-1]), heads, d), cu_seqlens_q=cu, max_seqlen_q=max(lens))
    else:
        kw.update(q=rand(batch, q_len, heads, d))
    if new:
        kw.update(k=rand(batch, new, heads_kv, d), v=rand(batch, new, heads_kv, d))
    if batch_idx:
        kw["cache_batch_idx"] = torch.randperm(rows, generator=g)[:batch].to(torch.int32).to(device)
    return kw


def _no_gather(*args, **kwargs):
    raise AssertionError("the paged cache was gathered")


def _record_launches(monkeypatch):
    """The configs the cute kernel is launched with (wrapping the emulated launch), and their splits."""
    from cute_kernels import launch

    seen, inner = [], launch.launch_kernel

    def recording(req, cfg, *args, **kw):
        seen.append((cfg, req))
        return inner(req, cfg, *args, **kw)

    monkeypatch.setattr(launch, "launch_kernel", recording)
    return seen


PAGED_CASES = {
    "decode_gqa": dict(),
    "split": dict(call=dict(num_splits=3)),
    "queries4_causal": dict(q_len=4, call=dict(causal=True)),
    "varlen_q_causal": dict(varlen_q=True, q_len=2, call=dict(causal=True)),
    "batch_idx_mha": dict(batch_idx=True, heads=2, call=dict(window_size=(300, 0))),
    "no_new_whole_cache": dict(new=0, drop_seqlens=True),
}


@pytest.mark.skipif(cute_emulation is None, reason="emulates sm90 on the CPU")
@pytest.mark.parametrize("case", list(PAGED_CASES))
@pytest.mark.parametrize("page_size", [16, 64, 128, 256])
def test_paged_read_by_the_kernel_emulated_sm90(emulated_sm90, monkeypatch, page_size, case):
    """On sm90 a paged cache goes to the cute kernel as pages (no gather), with the page size in
    its config, GQA packing and split-KV as for contiguous keys; results match the float64
    reference."""
    from fa3py import kvcache

    opts = dict(PAGED_CASES[case])
    call, drop = opts.pop("call", {}), opts.pop("drop_seqlens", False)
    kw = _paged(page_size, **opts)
    if drop:
        kw.pop("cache_seqlens")
    monkeypatch.setattr(kvcache, "_gather_keys", _no_gather)
    _paged_in_kernel(monkeypatch)
    seen = _record_launches(monkeypatch)
    run_and_check(kw, **call)
    assert len(seen) == 1
    cfg, req = seen[0]
    assert cfg.page_size == page_size and req.page_table is not None and req.k.shape[1] == page_size
    heads, heads_kv = kw["q"].shape[-2], kw["k_cache"].shape[-2]
    assert (cfg.pack_gqa > 1) == (heads > heads_kv)
    assert cfg.split_kv == (case == "split")


def _fp8_paged(page_size, d, device="cpu", **kw):
    """`_paged`'s call in FA3's float8 format: float8_e4m3fn q, pages and new tokens, float32
    descales (batch, heads_kv) (kwargs)."""
    call = _paged(page_size, d=d, device=device, **kw)
    for name in ("q", "k_cache", "v_cache", "k", "v"):
        if name in call:
            call[name] = (call[name].float() * 2).to(torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(page_size + d)
    batch, heads_kv = call["q"].shape[0], call["k_cache"].shape[-2]
    for name in ("q_descale", "k_descale", "v_descale"):
        call[name] = (torch.rand(batch, heads_kv, generator=g) + 0.25).to(device)
    return call


@pytest.mark.skipif(cute_emulation is None, reason="emulates sm90 on the CPU")
@pytest.mark.parametrize("page_size,d", [(16, 128), (64, 128), (256, 128), (16, 256), (64, 64), (32, 192)])
def test_fp8_paged_read_by_the_kernel_emulated_sm90(emulated_sm90, monkeypatch, page_size, d):
    """A float8 paged cache with descales (FA3's FP8 decode) with paged K / V and
    FA3PY_CUTE_FP8_DIRECT=1, the kernel emulated: `check_fp8_paged`; without the direct opt-in
    the pages are gathered."""
    from cute_kernels import launch
    from fa3py import kvcache

    check_fp8_paged(monkeypatch, page_size, d, "cpu")
    monkeypatch.setattr(launch, "fp8_direct_enabled", False)
    seen = _record_launches(monkeypatch)
    gathered, gather = [], kvcache._gather_keys
    monkeypatch.setattr(kvcache, "_gather_keys", lambda *a: gathered.append(1) or gather(*a))
    fa3py.flash_attn_with_kvcache(**_fp8_paged(page_size, d, batch=3, cap=400, seqlens=(1, 250, 399)), causal=True)
    assert gathered == [1] and seen[-1][0].page_size == 0


def check_fp8_paged(monkeypatch, page_size: int, d: int, device: str):
    """The FP8 kernel reads the float8 pages itself (no gather; its config has the page size, V
    in rows and the descales; 128 keys a block at hdim 128, 64 at 256) and gives the bits of the
    same call on a contiguous copy of the cache run with the same tile (P is rounded per KV
    block, so another tile rounds elsewhere)."""
    import cute_kernels
    from cute_kernels import launch
    from fa3py import kvcache

    monkeypatch.setattr(launch, "fp8_enabled", True)
    monkeypatch.setattr(launch, "fp8_direct_enabled", True)
    _paged_in_kernel(monkeypatch)
    kw = _fp8_paged(page_size, d, batch=3, q_len=2, heads=8, heads_kv=2, cap=400, seqlens=(1, 250, 399),
                    device=device)
    seen = _record_launches(monkeypatch)
    gather = kvcache._gather_keys
    monkeypatch.setattr(kvcache, "_gather_keys", _no_gather)
    table = kw["page_table"].long()
    contiguous = {name: kw[name][table].flatten(1, 2).contiguous() for name in ("k_cache", "v_cache")}
    out_p, lse_p = fa3py.flash_attn_with_kvcache(**kw, causal=True, return_softmax_lse=True)[:2]
    cfg, req = seen[-1]
    assert cfg.page_size == page_size and cfg.fp8_v_rows and cfg.fp8_descales and req.page_table is not None
    assert cfg.tile.tile_n == {64: 128, 128: 128, 192: 96, 256: 64}[d]
    config_for = launch.fp8_config_for
    same_tile = lambda r: dataclasses.replace(cfg, page_size=0)  # noqa: E731
    for module in (launch, cute_kernels):
        monkeypatch.setattr(module, "fp8_config_for", same_tile)
    out_c, lse_c = fa3py.flash_attn_with_kvcache(**dict(kw, page_table=None, **contiguous), causal=True,
                                                 return_softmax_lse=True)[:2]
    for module in (launch, cute_kernels):
        monkeypatch.setattr(module, "fp8_config_for", config_for)
    monkeypatch.setattr(kvcache, "_gather_keys", gather)
    assert seen[-1][0].page_size == 0
    assert out_p.dtype == torch.bfloat16 and torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)


@pytest.mark.skipif(cute_emulation is None, reason="emulates sm90 on the CPU")
@pytest.mark.parametrize("page_size,extra", [(8, {}), (24, {}), (1, {}), (200, {}), (64, {"leftpad": True})])
def test_paged_gathered_where_the_kernel_does_not_read_pages_emulated_sm90(emulated_sm90, monkeypatch, page_size,
                                                                          extra):
    """Page sizes the kernel does not tile KV blocks with (8 would need 16 boxes a block at hdim
    64: served; 24, 1, 200 not) and cache_leftpad gather the keys, then run contiguous."""
    from fa3py import kvcache

    kw = _paged(page_size, cap=300, seqlens=(5, 150, 299))
    if extra.get("leftpad"):
        kw["cache_leftpad"] = torch.tensor([0, 3, 17], dtype=torch.int32)
    gathered, inner = [], kvcache._gather_keys
    monkeypatch.setattr(kvcache, "_gather_keys", lambda *a: gathered.append(1) or inner(*a))
    _paged_in_kernel(monkeypatch)
    seen = _record_launches(monkeypatch)
    run_and_check(kw, causal=True)
    served = page_size == 8
    assert len(gathered) == (0 if served else 1)
    assert len(seen) == 1 and (seen[0][0].page_size == (page_size if served else 0))


@pytest.mark.skipif(cute_emulation is None, reason="emulates sm90 on the CPU")
def test_paged_gathered_when_turned_off_emulated_sm90(emulated_sm90, monkeypatch):
    """With the kernel's paged path turned off (FA3PY_CUTE_PAGED=0) the pages are gathered and the
    contiguous kernel runs, and explain-style reasons name the switch."""
    from fa3py import kvcache
    from cute_kernels import launch

    monkeypatch.setattr(launch, "paged_enabled", False)
    kw = _paged(64, cap=300, seqlens=(5, 150, 299))
    gathered, inner = [], kvcache._gather_keys
    monkeypatch.setattr(kvcache, "_gather_keys", lambda *a: gathered.append(1) or inner(*a))
    seen = _record_launches(monkeypatch)
    run_and_check(kw, causal=True)
    assert gathered == [1] and len(seen) == 1 and seen[0][0].page_size == 0
    req = dataclasses.replace(seen[0][1], k=kw["k_cache"], v=kw["v_cache"], page_table=kw["page_table"])
    import cute_kernels

    assert "FA3PY_CUTE_PAGED=0" in cute_kernels.why_not(req, False)


def test_paged_requests_are_refused_by_the_contiguous_backends():
    """triton and torch refuse a request with a page table (flash_attn_with_kvcache gathers for
    them); with no backend left the dispatcher says so."""
    import triton_fallback

    from fa3py import dispatch, torch_backend

    kw = _paged(16, cap=64, seqlens=(3, 40, 64), new=0)
    req = make_request(kw["q"], *(torch.empty((), dtype=torch.bfloat16).expand(3, 64, 2, 64),) * 2)
    req = dataclasses.replace(req, k=kw["k_cache"], v=kw["v_cache"], page_table=kw["page_table"])
    assert "page" in torch_backend.why_not(req, False) and "page" in triton_fallback.why_not(req, False)
    with pytest.raises(dispatch.BackendUnavailable, match="no backend serves"):
        dispatch.choose(req)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,d", [(16, 128), (64, 128), (256, 128), (16, 256), (64, 64), (32, 192)])
def test_gpu_fp8_paged_bitwise_equal_to_contiguous(monkeypatch, page_size, d):
    """FA3's FP8 decode from pages on sm90 (paged K / V and FP8 direct on): `check_fp8_paged` on the GPU."""
    check_fp8_paged(monkeypatch, page_size, d, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("batch,q_len,causal,splits", [(1, 1, False, 0), (8, 4, True, 0), (64, 1, False, 1),
                                                       (3, 2, True, 5)])
def test_gpu_paged_bitwise_equal_to_contiguous(monkeypatch, page_size, batch, q_len, causal, splits):
    """hdim 128, 32 / 8 heads, one token appended: the paged cache read by the kernel gives the bits
    of the same keys in a contiguous cache (same tiles, GQA packing and splits: only where the
    producer reads a block from differs), and no gather on sm90."""
    from fa3py import kvcache

    cap = 1000 + 17 * page_size  # not a multiple of the KV tile
    seqlens = [(cap - 1 - 37 * b) % cap for b in range(batch)]  # ragged, in [0, cap - 1] (batch 64 wraps)
    kw = _paged(page_size, batch=batch, q_len=q_len, heads=32, heads_kv=8, d=128, cap=cap, seqlens=seqlens,
                device="cuda")
    table = kw["page_table"].long()
    contiguous = dict(kw, page_table=None)
    for name in ("k_cache", "v_cache"):
        contiguous[name] = kw[name][table].flatten(1, 2).contiguous()  # (batch, pages * page_size, ...)
    if torch.cuda.get_device_capability()[0] == 9:
        monkeypatch.setattr(kvcache, "_gather_keys", _no_gather)
        _paged_in_kernel(monkeypatch)  # (the opt-in these tests decide)
    call = dict(causal=causal, num_splits=splits, return_softmax_lse=True)
    out_p, lse_p, *_ = fa3py.flash_attn_with_kvcache(**kw, **call)
    out_c, lse_c, *_ = fa3py.flash_attn_with_kvcache(**contiguous, **call)
    assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)
    assert torch.equal(kw["k_cache"][table].flatten(1, 2), contiguous["k_cache"])  # the same token appended
    run_and_check(_paged(page_size, batch=batch, q_len=q_len, heads=32, heads_kv=8, d=128, cap=cap,
                         seqlens=seqlens, device="cuda"), causal=causal, num_splits=splits)
