"""The public API against the float64 reference, on DEVICE (the torch backend on a CPU machine,
the GPU backends on a GPU machine)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fa3py
from fa3py import reference
from fa3py.validation import make_request

from _util import (
    DEVICE, FEATURES, check_backward, check_forward, check_nan_rows, inputs, max_err, nan_inputs, ragged_varlen,
)

SIZES = [(1, 1), (113, 203), (239, 1), (799, 3), (64, 128), (1023, 1024)]


@pytest.mark.parametrize("lq,lk", SIZES)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_forward_features(lq, lk, feature):
    q, k, v = inputs(1, lq, lk, 2, 1, 64, 64, torch.bfloat16)
    kw = FEATURES[feature]
    out, lse = fa3py.attention(q, k, v, return_lse=True, **kw)
    check_forward(make_request(q, k, v, **kw), out, lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,dv", [(8, 8), (40, 40), (96, 64), (256, 256), (64, 128)])
def test_forward_dtypes_headdims_gqa(dtype, d, dv):
    q, k, v = inputs(2, 77, 130, 6, 2, d, dv, dtype)
    out, lse = fa3py.attention(q, k, v, causal=True, return_lse=True)
    check_forward(make_request(q, k, v, causal=True), out, lse)


@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap"])
@pytest.mark.parametrize("lq,lk", [(113, 203), (65, 17), (1, 9)])
def test_backward(feature, lq, lk):
    q, k, v = inputs(2, lq, lk, 4, 2, 32, 48, torch.bfloat16)
    kw = FEATURES[feature]
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fa3py.attention(*leaves, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    check_backward(make_request(q, k, v, **kw), dout, [x.grad for x in leaves])


@pytest.mark.parametrize("scale,softcap", [(-0.2, 0.0), (-0.2, 3.0), (0.0, 0.0)])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_scale_sign(scale, softcap, causal):
    """A negative softmax_scale flips which key scores highest and zero makes every kept key equal:
    a kernel that takes the row max before scaling (the cute one) must not serve a negative scale
    without softcap. Forward and backward against the reference."""
    q, k, v = inputs(2, 113, 203, 4, 2, 64, 64, torch.bfloat16)
    kw = dict(causal=causal, softmax_scale=scale, softcap=softcap)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fa3py.attention(*leaves, return_lse=True, **kw)
    check_forward(make_request(q, k, v, **kw), out.detach(), lse)
    dout = torch.randn_like(out)
    out.backward(dout)
    check_backward(make_request(q, k, v, **kw), dout, [x.grad for x in leaves])


def test_varlen_packed_and_seqused_forward_backward():
    q, k, v, kw = ragged_varlen(torch.float16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fa3py.flash_attn_varlen_func(*leaves, causal=True, return_attn_probs=True, **kw)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    req = make_request(q, k, v, causal=True, **kw)
    check_forward(req, out, lse)
    dout = torch.randn_like(out)
    out.backward(dout)
    check_backward(req, dout, [x.grad for x in leaves])


def test_batched_with_seqused_q():
    q, k, v = inputs(3, 40, 60, 2, 2, 32, 32, torch.bfloat16)
    used_q = torch.tensor([40, 7, 0], dtype=torch.int32, device=DEVICE)
    used_k = torch.tensor([1, 60, 33], dtype=torch.int32, device=DEVICE)
    out, lse = fa3py.flash_attn_varlen_func(q, k, v, None, None, None, None, seqused_q=used_q,
                                            seqused_k=used_k, return_attn_probs=True)
    check_forward(make_request(q, k, v, seqused_q=used_q, seqused_k=used_k), out, lse)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_cuda_graph_replay(backend, layout, monkeypatch):
    """A forward captured in a CUDA graph (what users do for many small calls) and replayed on
    new values copied into the captured inputs gives the attention of those new values. Under
    capture validation cannot read cu_seqlens on the host, so max_seqlen_* come from the caller."""
    if backend is not None:
        monkeypatch.setenv("FA3PY_BACKEND", backend)
    if layout == "packed":
        q, k, v, kw = ragged_varlen(torch.bfloat16, lens_k=(50, 9, 130, 3), seqused_k=False)
        kw["causal"] = True
        call = lambda: fa3py.flash_attn_varlen_func(q, k, v, return_attn_probs=True, **kw)
    else:
        q, k, v = inputs(2, 239, 300, 4, 2, 128, 128, torch.bfloat16)
        kw = dict(causal=True)
        call = lambda: fa3py.attention(q, k, v, return_lse=True, **kw)
    with torch.no_grad():
        call()  # compile and warm outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, lse = call()
        for x in (q, k, v):
            x.copy_(torch.randn_like(x, dtype=torch.float32).to(x.dtype))
        graph.replay()
        torch.cuda.synchronize()
    check_forward(make_request(q, k, v, **kw), out, lse)


def test_strided_views_without_copy():
    # SDPA layout (b, h, s, d) transposed to (b, s, h, d); v with a padded last-dim storage
    qs = torch.randn(2, 4, 100, 64, dtype=torch.bfloat16, device=DEVICE)
    ks = torch.randn(2, 4, 90, 64, dtype=torch.bfloat16, device=DEVICE)
    vbig = torch.randn(2, 90, 4, 96, dtype=torch.bfloat16, device=DEVICE)
    q, k, v = qs.transpose(1, 2), ks.transpose(1, 2), vbig[..., :64]
    assert not q.is_contiguous() and not v.is_contiguous()
    out, lse = fa3py.attention(q, k, v, causal=True, return_lse=True)
    check_forward(make_request(q, k, v, causal=True), out, lse)


def test_inputs_not_modified():
    q, k, v = inputs(1, 50, 70, 2, 1, 32, 32, torch.bfloat16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    before = [x.detach().clone() for x in leaves]
    out = fa3py.attention(*leaves, causal=True, softcap=2.0)
    out.backward(torch.randn_like(out))
    for x, y in zip(leaves, before):
        assert torch.equal(x.detach(), y)


def test_fp8_inputs_with_descales():
    q, k, v = inputs(2, 70, 90, 4, 2, 64, 64, torch.float32)
    q8, k8, v8 = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
    descales = [torch.rand(2, 2, device=DEVICE) + 0.5 for _ in range(3)]
    out, lse = fa3py.flash_attn_func(q8, k8, v8, causal=True, q_descale=descales[0], k_descale=descales[1],
                                     v_descale=descales[2], return_attn_probs=True)
    assert out.dtype == torch.bfloat16
    req = make_request(q8, k8, v8, causal=True, q_descale=descales[0], k_descale=descales[1],
                       v_descale=descales[2])
    check_forward(req, out, lse)


def test_fp8_quantized_path_beats_per_tensor_quantization():
    # FA3 paper setup: N(0,1) plus rare large outliers in q and k.
    b, s, h, d = 1, 512, 4, 128

    def outliers():
        x = torch.randn(b, s, h, d, device=DEVICE)
        return x + torch.randn_like(x) * 10 * (torch.rand_like(x) < 0.001)

    q, k, v = outliers().bfloat16(), outliers().bfloat16(), torch.randn(b, s, h, d, device=DEVICE).bfloat16()
    with torch.no_grad():
        out = fa3py.attention(q, k, v, fp8=True)
    ref, _ = reference.attention(make_request(q, k, v))

    def per_tensor(x):
        scale = x.float().abs().amax() / 448
        return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).bfloat16()

    naive, _ = reference.attention(make_request(per_tensor(q), per_tensor(k), per_tensor(v)))
    rmse = lambda a: float((a.double() - ref).pow(2).mean().sqrt())
    assert out.dtype == torch.bfloat16
    assert rmse(out) < rmse(naive), (rmse(out), rmse(naive))
    assert rmse(out) < 0.02 * float(ref.pow(2).mean().sqrt()) + 1e-2


def test_fp8_backward_is_16_bit():
    """fp8=True: FP8 forward, straight-through 16-bit backward (tests/test_fp8.py checks it)."""
    q, k, v = inputs(1, 8, 8, 1, 1, 16, 16, torch.bfloat16)
    out = fa3py.attention(q.requires_grad_(), k, v, fp8=True)
    out.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16


def test_fp8_inputs_with_grad_run_forward_and_backward_raises():
    """float8_e4m3fn inputs with descales that require grad: the forward is the no-grad forward;
    only backward raises, naming what has no backward."""
    q8, k8, v8 = (x.float().to(torch.float8_e4m3fn) for x in inputs(2, 9, 13, 4, 2, 32, 32, torch.bfloat16))
    descales = [torch.rand(2, 2, device=DEVICE) + 0.5 for _ in range(3)]
    with torch.no_grad():
        want = fa3py.flash_attn_func(q8, k8, v8, causal=True, q_descale=descales[0], k_descale=descales[1],
                                     v_descale=descales[2])
    leaves = [x.clone().requires_grad_() for x in (q8, k8, v8)]
    out = fa3py.flash_attn_func(*leaves, causal=True, q_descale=descales[0], k_descale=descales[1],
                                v_descale=descales[2])
    assert torch.equal(out.detach(), want) and out.dtype == torch.bfloat16
    with pytest.raises(NotImplementedError, match="float8_e4m3fn `q`/`k`/`v` have no backward"):
        out.backward(torch.randn_like(out))


@pytest.mark.parametrize("shape", [(0, 5, 2, 16), (2, 0, 2, 16)])
def test_empty_batch_or_queries(shape):
    q = torch.randn(shape, dtype=torch.float16, device=DEVICE)
    k = torch.randn(shape[0], 5, 2, 16, dtype=torch.float16, device=DEVICE)
    out, lse = fa3py.attention(q, k, k, return_lse=True)
    assert out.shape == shape and lse.shape == (shape[0], 2, shape[1])


@pytest.mark.parametrize("causal", [False, True])
def test_nan_inputs_give_nan_rows(causal):
    req = nan_inputs(*inputs(2, 130, 300, 4, 2, 64, 64, torch.bfloat16), causal)
    check_nan_rows(req, *fa3py.attention(req.q, req.k, req.v, causal=causal, return_lse=True))


def test_zero_length_keys_give_zero_output():
    q = torch.randn(2, 5, 2, 16, dtype=torch.float16, device=DEVICE)
    k = torch.randn(2, 0, 2, 16, dtype=torch.float16, device=DEVICE)
    out, lse = fa3py.attention(q, k, k, return_lse=True)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all()


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for r in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(r, torch.Tensor):
                self.largest = max(self.largest, r.numel())
        return result


def test_32k_tokens_never_allocate_the_score_matrix():
    s, d = 32768, 32
    q, k, v = (torch.randn(1, s, 1, d, dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad(), _LargestTensor() as mode:
        out = fa3py.attention(q, k, v, causal=True, window_size=(4096, 0), backend="torch")
    assert mode.largest <= 4 * 1024 * 1024, f"largest intermediate has {mode.largest} elements"
    # spot-check a few rows against the reference
    rows = torch.tensor([0, 5000, s - 1])
    ref = torch.stack([
        reference.attention(make_request(q[:, r:r + 1], k[:, max(0, r - 4096):r + 1], v[:, max(0, r - 4096):r + 1],
                                         causal=True))[0][0, 0]
        for r in rows.tolist()])
    assert max_err(out[0, rows], ref) < 1e-2


def test_num_splits_is_a_hint():
    """FA3's num_splits only schedules: every value gives the reference's answer (bit for bit on
    the CPU path, which ignores it; within tolerance on the Hopper kernel, where split partials
    round differently: its splits are checked in tests/test_cute_gpu.py)."""
    q, k, v = inputs(2, 1, 300, 4, 2, 64, 64, torch.bfloat16)
    results = [fa3py.flash_attn_func(q, k, v, num_splits=n, return_attn_probs=True) for n in (0, 1, 3)]
    for o, lse in results:
        check_forward(make_request(q, k, v), o, lse)
    if q.device.type == "cpu":
        assert all(torch.equal(results[0][0], o) and torch.equal(results[0][1], l) for o, l in results[1:])
