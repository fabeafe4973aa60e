"""Where backends meet: the forward of one backend feeds the backward of another, and tensors
cross between them with whatever strides the producer gave them.

On Hopper a training step runs the cute forward and the Triton backward: the backward gets the
cute kernel's out and LSE. With one KV head the LSE came back from GQA packing as a view whose
rows had stride g, and the Triton backward, which assumed unit row stride, read other rows'
LSE: outputs right, gradients off by up to 650x PyTorch's own error. These tests check every
such hand-over: on the CPU with the cute kernel emulated (`tests.cute_emulation`) and the
Triton kernels interpreted; on an sm90 GPU (`-m gpu`) with the real kernels. The cute backward
(on by default; FA3PY_CUTE_BWD=0 turns it off) takes the backward where it serves the request:
on the CPU with its kernel emulated too (`tests.cute_bwd_emulation`), on the GPU unless turned off
(the `bwd_api` partition of tests/run_gpu.sh runs these tests with it off: the Triton hand-over). Tolerances follow shared/STYLE.md (`tests._util`).
"""

from __future__ import annotations

import pytest
import torch

import fa3py
from fa3py import dispatch
from fa3py.validation import make_request
from tests._cute_bwd import cute_serves_backward
from tests._util import check_backward, check_forward, packed

cute_emulation = pytest.importorskip("tests.cute_emulation")  # needs cutlass (cute_kernels' config)
emulated_sm90 = cute_emulation.emulated_sm90
emulated_sm90_bwd = pytest.importorskip("tests.cute_bwd_emulation").emulated_sm90_bwd

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9

# (nheads, nheads_kv): MHA, GQA, MQA
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
# layout -> per-sequence (query, key) lengths; batched layouts use the first pair for all
LAYOUTS = {
    "batched_decode": [(1, 2), (1, 2)],  # one query: GQA packing by view, out / LSE in place
    "batched": [(3, 37), (3, 37)],  # a few queries: packed (copied) rows
    "varlen": [(1, 2), (1, 3), (5, 17)],  # the case: one query and 2-3 keys
    "varlen_empty": [(0, 4), (1, 1), (7, 0), (2, 9)],  # sequences of 0 and 1 tokens
    "seqused": [(4, 12), (3, 20), (6, 5)],  # seqused_q / seqused_k below the packed lengths
    "long": [(150, 150), (150, 150)],  # too many rows to pack
}


def _inputs(layout, h, hk, d, dv, dtype, device):
    """(q, k, v, kwargs of flash_attn_varlen_func or None for flash_attn_func)."""
    lengths = LAYOUTS[layout]
    if layout.startswith("batched") or layout == "long":
        sq, sk = lengths[0]
        b = len(lengths)
        mk = lambda s, n, e: torch.randn(b, s, n, e, device=device).to(dtype)
        return mk(sq, h, d), mk(sk, hk, d), mk(sk, hk, dv), None
    lq, lk = [a for a, _ in lengths], [b for _, b in lengths]
    q, cu_q = packed(lq, h, d, dtype, device)
    k, cu_k = packed(lk, hk, d, dtype, device)
    v, _ = packed(lk, hk, dv, dtype, device)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    if layout == "seqused":
        kw["seqused_q"] = torch.tensor([max(a - 2, 0) for a in lq], dtype=torch.int32, device=device)
        kw["seqused_k"] = torch.tensor([max(b - 3, 1) for b in lk], dtype=torch.int32, device=device)
    return q, k, v, kw


def _train_step(q, k, v, kw, **features):
    """out, LSE and (dq, dk, dv) through the FA3 drop-ins and auto-dispatch, checked against the
    fp64 reference; returns the request and the backends that ran forward and backward."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    if kw is None:
        out, lse = fa3py.flash_attn_func(*leaves, return_attn_probs=True, **features)
        req = make_request(q, k, v, **features)
    else:
        out, lse = fa3py.flash_attn_varlen_func(*leaves, **kw, return_attn_probs=True, **features)
        req = make_request(q, k, v, **kw, **features)
    assert lse.is_contiguous(), f"softmax_lse strides {lse.stride()} (FA3 returns it contiguous)"
    check_forward(req, out, lse)
    dout = torch.randn_like(out)
    torch.autograd.backward(out, dout)
    check_backward(req, dout, [x.grad for x in leaves])
    return req, dispatch.choose(req).name, dispatch.choose(req, backward=True).name


def _cases(head_dims):
    return [pytest.param(layout, heads, d, dv, id=f"{layout}-{heads}-d{d}" + (f"v{dv}" if dv != d else ""))
            for layout in LAYOUTS for heads in HEADS for d, dv in head_dims]


# Every head-dim pair of the cute forward on the GPU (80 pads to 96, 192 x 128 is FA3's);
# on the CPU the interpreter's cost keeps it to the smallest and the one the issue hit.
GPU_HEAD_DIMS = [(64, 64), (80, 80), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256)]
CPU_HEAD_DIMS = [(64, 64), (96, 96)]


@pytest.mark.parametrize("layout,heads,d,dv", _cases(CPU_HEAD_DIMS))
def test_cute_forward_triton_backward_emulated(emulated_sm90, layout, heads, d, dv):
    """The cute host code (GQA packing, unpacking, split-KV off) with its kernel emulated on the
    CPU, then the Triton backward in the interpreter, through autograd and auto-dispatch."""
    h, hk = HEADS[heads]
    q, k, v, kw = _inputs(layout, h, hk, d, dv, torch.bfloat16, "cpu")
    _, fwd, bwd = _train_step(q, k, v, kw, causal=layout != "long")
    assert (fwd, bwd) == ("cute", "triton")


@pytest.mark.parametrize("layout,heads,d,dv", _cases(CPU_HEAD_DIMS))
def test_cute_forward_cute_backward_emulated(emulated_sm90_bwd, layout, heads, d, dv):
    """The same hand-overs with the cute backward enabled and its kernel emulated: the forward's
    out / LSE (GQA-packed, in place for one query, padded rows) into bwd_launch's pre- and
    post-processing."""
    h, hk = HEADS[heads]
    q, k, v, kw = _inputs(layout, h, hk, d, dv, torch.bfloat16, "cpu")
    _, fwd, bwd = _train_step(q, k, v, kw, causal=layout != "long")
    assert (fwd, bwd) == ("cute", "cute") and len(emulated_sm90_bwd) == 1


def _assert_gpu_backward(req, bwd):
    """The cute backward where it serves `req` (unless FA3PY_CUTE_BWD=0), else another GPU backend."""
    if cute_serves_backward(req):
        assert bwd == "cute", f"backward on {bwd}, not the cute backward"
    else:
        assert bwd == "triton", bwd


@pytest.mark.parametrize("heads", ["gqa", "mqa"])
@pytest.mark.parametrize("layout", ["batched_decode", "varlen"])
def test_split_kv_forward_triton_backward_emulated(emulated_sm90, monkeypatch, layout, heads):
    """Split-KV forced to 3 splits over up to 3 KV blocks of keys: the float32 partials combined
    into out / LSE (for one query, into views of the returned tensors), then the Triton backward."""
    import cute_kernels
    from cute_kernels import launch

    monkeypatch.setattr(launch, "split_kv_setting", "3")
    monkeypatch.setitem(LAYOUTS, "batched_decode", [(1, 300), (1, 300)])
    monkeypatch.setitem(LAYOUTS, "varlen", [(1, 300), (2, 5), (1, 260)])
    h, hk = HEADS[heads]
    q, k, v, kw = _inputs(layout, h, hk, 64, 64, torch.bfloat16, "cpu")
    req, fwd, bwd = _train_step(q, k, v, kw, causal=True)
    assert (fwd, bwd) == ("cute", "triton") and cute_kernels.config_for(req).split_kv


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM90, reason="the cute forward needs an sm90 GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,heads,d,dv", _cases(GPU_HEAD_DIMS))
def test_gpu_grads_auto_dispatch(layout, heads, d, dv, dtype):
    """The real cute forward and the backward it hands to (the cute backward with
    where it serves the head dims, else Triton), causal, on the GPU."""
    h, hk = HEADS[heads]
    q, k, v, kw = _inputs(layout, h, hk, d, dv, dtype, "cuda")
    req, fwd, bwd = _train_step(q, k, v, kw, causal=True)
    assert fwd == "cute"
    _assert_gpu_backward(req, bwd)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM90, reason="the cute forward needs an sm90 GPU")
@pytest.mark.parametrize("features", [dict(window_size=(5, 1)), dict(softcap=4.0), dict(causal=False),
                                      dict(causal=True, attention_chunk=48)],
                         ids=["window", "softcap", "plain", "chunk"])
@pytest.mark.parametrize("layout,heads", [("varlen", "mqa"), ("batched_decode", "mqa"), ("seqused", "gqa")])
def test_gpu_grads_auto_dispatch_features(layout, heads, features):
    """The issue's MQA cases with windows and softcap, and attention_chunk (hdim 128, bf16)."""
    h, hk = HEADS[heads]
    q, k, v, kw = _inputs(layout, h, hk, 128, 128, torch.bfloat16, "cuda")
    req, fwd, bwd = _train_step(q, k, v, kw, **features)
    assert fwd == "cute"
    _assert_gpu_backward(req, bwd)


# ----------------------------------------------------------------------------- strides
def _strided_like(x: torch.Tensor, perm) -> torch.Tensor:
    """x's values in storage laid out in the dimension order `perm` (a non-contiguous view)."""
    return x.permute(*perm).contiguous().permute(*sorted(range(x.ndim), key=lambda i: perm[i]))


@pytest.mark.parametrize("packed_q", [False, True], ids=["batched", "varlen"])
def test_triton_backward_takes_the_strides_it_is_given(packed_q, monkeypatch):
    """The Triton backward fed out, dout and LSE in layouts other than the ones it allocates (LSE
    rows strided as GQA packing leaves them, out / dout head-major): the same gradients."""
    import triton_fallback

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if packed_q:
        q, cu_q = packed([1, 4, 9], 4, 64, torch.bfloat16, "cpu")
        k, cu_k = packed([3, 8, 20], 1, 64, torch.bfloat16, "cpu")
        v = torch.randn_like(k)
        req = make_request(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                           max_seqlen_q=9, max_seqlen_k=20)
    else:
        q = torch.randn(2, 7, 4, 64).to(torch.bfloat16)
        k, v = (torch.randn(2, 19, 1, 64).to(torch.bfloat16) for _ in range(2))
        req = make_request(q, k, v, causal=True)
    out, lse = fa3py.reference.attention(req, torch.float32)
    out = out.to(torch.bfloat16)
    dout = torch.randn_like(out)
    expected = triton_fallback.backward(req, out, lse, dout)
    lse_perm = (1, 0) if packed_q else (0, 2, 1)  # rows outer, heads inner
    o_perm = (1, 0, 2) if packed_q else (0, 2, 1, 3)  # heads outer
    strided = [_strided_like(lse, lse_perm), _strided_like(out, o_perm), _strided_like(dout, o_perm)]
    assert not any(t.is_contiguous() for t in strided)
    got = triton_fallback.backward(req, strided[1], strided[0], strided[2])
    for name, a, b in zip(("dq", "dk", "dv"), got, expected):
        assert torch.equal(a, b), f"{name} changed with the strides of out / dout / LSE"
    check_backward(req, dout, got)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("layout", ["batched_decode", "batched", "varlen"])
def test_returned_lse_is_contiguous(emulated_sm90, layout, heads):
    """softmax_lse from the cute path (packed GQA / MQA, in place for one query) is contiguous."""
    h, hk = HEADS[heads]
    q, k, v, kw = _inputs(layout, h, hk, 64, 64, torch.bfloat16, "cpu")
    if kw is None:
        out, lse = fa3py.flash_attn_func(q, k, v, return_attn_probs=True)
    else:
        out, lse = fa3py.flash_attn_varlen_func(q, k, v, **kw, return_attn_probs=True)
    assert lse.is_contiguous() and out.is_contiguous(), (lse.stride(), out.stride())

