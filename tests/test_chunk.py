"""attention_chunk (chunked local attention, Llama 4): a query sees only the keys of its own
chunk, intersected with causal / window_size as FlashAttention-3 intersects them. The
reference against a brute-force transcription of FA3's `construct_chunk_mask`, then the torch
backend (with small tiles, so boundaries cross tiles), the public functions, the Triton
kernels in the interpreter, and the cute forward's host path with its kernel emulated on the
CPU (`tests.cute_emulation`; the kernel's own mask code: tests/test_cute_host.py), each against
the reference."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fa3py  # noqa: E402
import triton_fallback  # noqa: E402
from fa3py import reference, torch_backend  # noqa: E402
from fa3py.validation import make_request  # noqa: E402
from triton_fallback import ops  # noqa: E402

from _util import check_backward, check_forward, inputs, packed, ragged_varlen  # noqa: E402

# (attention_chunk, causal, window_size)
CASES = [(16, False, (-1, -1)), (32, True, (-1, -1)), (24, False, (20, 5)), (7, True, (3, -1)),
         (1, False, (-1, -1)), (1000, True, (-1, -1))]
SIZES = [(1, 1), (113, 203), (65, 17), (40, 40), (1, 9)]


def fa3_chunk_keep(lq, lk, chunk, left, right):
    """Keep-mask from FA3's hopper/test_util.py, element by element: its chunk mask drops key j
    of row i unless c <= j < c + chunk for c = (i + lk - lq) - (i + lk - lq) % chunk (Python %,
    a floor), and its local mask (window; -1 unbounded here) is OR-ed into the dropped set."""
    keep = torch.zeros(lq, lk, dtype=torch.bool)
    for i in range(lq):
        pos = i + lk - lq
        c = pos - pos % chunk
        for j in range(lk):
            in_window = (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right)
            keep[i, j] = in_window and c <= j < c + chunk
    return keep


@pytest.mark.parametrize("lq,lk", [(1, 1), (13, 29), (29, 13), (20, 20)])
@pytest.mark.parametrize("chunk,causal,window", CASES)
def test_reference_mask_is_fa3s(lq, lk, chunk, causal, window):
    right = 0 if causal else window[1]
    got = reference.keep_mask(lq, lk, window[0], right, attention_chunk=chunk)
    assert torch.equal(got, fa3_chunk_keep(lq, lk, chunk, window[0], right))


@pytest.mark.parametrize("lq,lk", SIZES)
@pytest.mark.parametrize("chunk,causal,window", CASES)
def test_torch_backend_forward_backward(lq, lk, chunk, causal, window, monkeypatch):
    """Tiles of 16 so chunk edges fall inside tiles, on tile edges, and skip whole tiles."""
    monkeypatch.setattr(torch_backend, "BLOCK_Q", 16)
    monkeypatch.setattr(torch_backend, "BLOCK_K", 16)
    kw = dict(attention_chunk=chunk, causal=causal, window_size=window)
    q, k, v = inputs(2, lq, lk, 4, 2, 32, 48, torch.float16, device="cpu")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fa3py.attention(*leaves, return_lse=True, backend="torch", **kw)
    req = make_request(q, k, v, **kw)
    check_forward(req, out.detach(), lse)
    dout = torch.randn_like(out)
    out.backward(dout)
    check_backward(req, dout, [x.grad for x in leaves])


def test_flash_attn_func_and_varlen():
    q, k, v = inputs(2, 77, 130, 4, 1, 64, 64, torch.bfloat16)
    out, lse = fa3py.flash_attn_func(q, k, v, causal=True, attention_chunk=32, return_attn_probs=True)
    check_forward(make_request(q, k, v, causal=True, attention_chunk=32), out, lse)

    q, k, v, kw = ragged_varlen(torch.float16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fa3py.flash_attn_varlen_func(*leaves, window_size=(30, 10), attention_chunk=24,
                                            return_attn_probs=True, **kw)
    req = make_request(q, k, v, window_size=(30, 10), attention_chunk=24, **kw)
    check_forward(req, out.detach(), lse)
    dout = torch.randn_like(out)
    out.backward(dout)
    check_backward(req, dout, [x.grad for x in leaves])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available(),
                    reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("lq,lk,chunk,causal,window", [
    (77, 130, 24, False, (-1, -1)), (90, 45, 16, True, (-1, -1)), (64, 64, 40, False, (20, 3)),
])
def test_triton_kernels(lq, lk, chunk, causal, window, deterministic, monkeypatch):
    """The Triton forward and both backwards (atomic dQ, deterministic) with the chunk bound on
    their block ranges and masks; outputs poisoned so a skipped row shows."""
    monkeypatch.setattr(ops, "POISON", True)
    device = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"
    q, k, v = inputs(2, lq, lk, 4, 2, 64, 64, torch.bfloat16, device=device)
    req = make_request(q, k, v, causal=causal, window_size=window, attention_chunk=chunk,
                       deterministic=deterministic)
    assert triton_fallback.why_not(req, True) is None
    out, lse = triton_fallback.forward(req)
    check_forward(req, out, lse)
    dout = torch.randn_like(out)
    check_backward(req, dout, triton_fallback.backward(req, out, lse, dout))


def test_cute_serves_chunk(monkeypatch):
    """The cute forward takes attention_chunk (on CUDA tensors): config_for compiles the chunked
    kernel; qv too, where its head dims are in QV_HDIM_PAIRS."""
    import cute_kernels

    q, k, v = inputs(1, 8, 8, 2, 2, 64, 64, torch.bfloat16, device="cpu")
    req = make_request(q, k, v, attention_chunk=8)
    assert cute_kernels.why_not(req, False) == "cute_kernels: CUDA tensors only"
    assert cute_kernels.config_for(req).chunk and not cute_kernels.config_for(make_request(q, k, v)).chunk
    qv = make_request(q, k, v, qv=torch.randn_like(q))
    monkeypatch.setattr(cute_kernels.launch, "qv_enabled", False)
    assert "turned off (FA3PY_CUTE_QV=0)" in cute_kernels.why_not(qv, False)
    monkeypatch.setattr(cute_kernels.launch, "qv_enabled", True)
    assert cute_kernels.why_not(qv, False) == "cute_kernels: CUDA tensors only" and cute_kernels.config_for(qv).qv
    wide = make_request(q, k, torch.randn(1, 8, 2, 128).bfloat16(), qv=torch.randn(1, 8, 2, 128).bfloat16())
    assert "(64, 128) does not round up (multiples of 8) to one of" in cute_kernels.why_not(wide, False)
    assert "(with qv)" in cute_kernels.why_not(wide, False)


try:  # (cute_kernels' host code; its kernels emulated)
    from tests.cute_bwd_emulation import emulated_sm90_bwd  # noqa: F401  (fixture, by name)
    from tests.cute_emulation import emulated_sm90  # noqa: F401  (fixture, by name)
except ImportError:  # pragma: no cover
    emulated_sm90 = emulated_sm90_bwd = None

# (lq, lk, h, hk, chunk, causal, window, splits): chunks below / across / above the emulated
# config's 128-key blocks, Lq > Lk (chunks before key 0), GQA packing (few query positions),
# split-KV forced, a window inside the chunk.
EMULATED = [
    (77, 300, 4, 4, 64, True, (-1, -1), "1"), (300, 77, 4, 2, 24, False, (-1, -1), "1"),
    (1, 700, 8, 2, 128, False, (-1, -1), "1"), (5, 700, 8, 1, 100, True, (-1, -1), "3"),
    (113, 203, 4, 2, 40, False, (20, 5), "1"), (40, 40, 2, 2, 1, True, (3, -1), "1"),
    (200, 900, 4, 4, 300, False, (-1, -1), "4"),
]


@pytest.mark.skipif(emulated_sm90 is None, reason="needs cute_kernels' host code")
@pytest.mark.parametrize("lq,lk,h,hk,chunk,causal,window,splits", EMULATED)
def test_cute_emulated(lq, lk, h, hk, chunk, causal, window, splits, emulated_sm90, monkeypatch):
    """On an (emulated) sm90 the dispatcher sends chunked forwards to cute: its host path (config
    with the chunk flag, GQA packing, split-KV's partials and combine) around the emulated kernel
    gives the reference's out and LSE."""
    import cute_kernels
    from cute_kernels import launch
    from fa3py import dispatch

    monkeypatch.setattr(launch, "split_kv_setting", splits)
    q, k, v = inputs(2, lq, lk, h, hk, 64, 64, torch.bfloat16, device="cpu")
    kw = dict(attention_chunk=chunk, causal=causal, window_size=window)
    req = make_request(q, k, v, **kw)
    assert dispatch.choose(req).name == "cute"
    cfg = cute_kernels.config_for(req)
    assert cfg.chunk and cfg.split_kv == (splits != "1") and (cfg.pack_gqa > 1 or lq > 5 or h == hk)
    out, lse = fa3py.attention(q, k, v, return_lse=True, **kw)
    check_forward(req, out, lse)


@pytest.mark.skipif(emulated_sm90 is None, reason="needs cute_kernels' host code")
def test_cute_emulated_varlen_and_backward(emulated_sm90):
    """Packed sequences with seqused_k through flash_attn_varlen_func: the cute forward (emulated)
    and, with the cute backward off (FA3PY_CUTE_BWD=0, as `emulated_sm90` sets it), the Triton
    backward (interpreted) it hands out and LSE to."""
    q, k, v, kw = _varlen_seqused_case()
    from fa3py import dispatch

    req = make_request(q, k, v, **kw)
    assert (dispatch.choose(req).name, dispatch.choose(req, backward=True).name) == ("cute", "triton")
    _check_train_step(req, q, k, v, kw)


@pytest.mark.skipif(emulated_sm90_bwd is None, reason="needs cute_kernels' host code")
def test_cute_emulated_varlen_cute_backward(emulated_sm90_bwd):
    """The same packed sequences with the cute backward on (its kernel emulated,
    tests/cute_bwd_emulation.py): forward and backward both on cute, the chunked backward config."""
    from cute_kernels import bwd_launch
    from fa3py import dispatch

    q, k, v, kw = _varlen_seqused_case()
    req = make_request(q, k, v, **kw)
    assert (dispatch.choose(req).name, dispatch.choose(req, backward=True).name) == ("cute", "cute")
    _check_train_step(req, q, k, v, kw)
    assert emulated_sm90_bwd and bwd_launch.config_for(req).chunk


def _varlen_seqused_case():
    lens_q, lens_k = [37, 0, 13, 1], [50, 9, 130, 0]
    q, cu_q = packed(lens_q, 4, 64, torch.bfloat16, "cpu")
    k, cu_k = packed(lens_k, 2, 64, torch.bfloat16, "cpu")
    v, _ = packed(lens_k, 2, 64, torch.bfloat16, "cpu")
    used_k = torch.tensor([40, 9, 100, 0], dtype=torch.int32)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=37, max_seqlen_k=130, seqused_k=used_k,
              causal=True, attention_chunk=24)
    return q, k, v, kw


def _check_train_step(req, q, k, v, kw):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fa3py.flash_attn_varlen_func(*leaves, return_attn_probs=True, **kw)
    check_forward(req, out.detach(), lse)
    dout = torch.randn_like(out)
    out.backward(dout)
    check_backward(req, dout, [x.grad for x in leaves])


@pytest.mark.parametrize("value,exc", [(-1, ValueError), (2.5, TypeError), (True, TypeError), ("8", TypeError)])
def test_bad_attention_chunk(value, exc):
    q, k, v = inputs(1, 8, 8, 2, 2, 64, 64, torch.bfloat16)
    before = [x.clone() for x in (q, k, v)]
    for fn in (fa3py.attention, fa3py.flash_attn_func):
        with pytest.raises(exc, match="attention_chunk"):
            fn(q, k, v, attention_chunk=value)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))


@pytest.mark.gpu
def test_gpu_dispatch_and_matches():
    """On a GPU dispatch picks the cute forward and backward on Hopper (the backward with
    unless FA3PY_CUTE_BWD_CHUNK=0; Triton elsewhere), long enough for chunks of whole and partial blocks."""
    from cute_kernels import bwd_launch

    q, k, v = inputs(2, 1000, 1500, 8, 2, 128, 128, torch.bfloat16, device="cuda")
    kw = dict(causal=True, attention_chunk=192)
    hopper = torch.cuda.get_device_capability()[0] == 9
    forward = "cute" if hopper else "triton"
    backward = "cute" if hopper and bwd_launch.enabled and bwd_launch.chunk_enabled else "triton"
    lines = fa3py.explain(q, k, v, **kw).splitlines()
    assert lines[0].startswith(f"forward: {forward}")
    assert any(line.startswith(f"backward: {backward}") for line in lines), lines
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fa3py.attention(*leaves, return_lse=True, **kw)
    req = make_request(q, k, v, **kw)
    check_forward(req, out.detach(), lse)
    dout = torch.randn_like(out)
    out.backward(dout)
    check_backward(req, dout, [x.grad for x in leaves])
