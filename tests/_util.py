"""Shared test helpers: the tolerance rule (a kernel may be at most twice as wrong as PyTorch in the
test's own precision) and input builders."""

from __future__ import annotations

import os

import torch

from fa3py import reference
from fa3py.request import FP8_DTYPES
from fa3py.validation import make_request


# Tests of the public API run on this device: the GPU when there is one (then they exercise
# the GPU backends), else the CPU (the torch backend).
DEVICE = os.environ.get("FA3PY_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


# Mask / score features every backend's tests run through (kwargs of `attention`).
FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_size": (37, 11)},
    "causal_window": {"causal": True, "window_size": (50, -1)},
    "softcap": {"softcap": 3.0},
}


def inputs(b, lq, lk, h, hk, d, dv, dtype=torch.bfloat16, device=DEVICE):
    """Fresh random q (b, lq, h, d), k (b, lk, hk, d), v (b, lk, hk, dv) in `dtype`."""
    q = torch.randn(b, lq, h, d, device=device).to(dtype)
    k = torch.randn(b, lk, hk, d, device=device).to(dtype)
    v = torch.randn(b, lk, hk, dv, device=device).to(dtype)
    return q, k, v


def low_precision(dtype):
    """The precision in which PyTorch itself computes the comparison baseline."""
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


def max_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(d.max()) if d.numel() else 0.0


def assert_within(name, got, ref, baseline, atol):
    """`got` may be at most twice as wrong as PyTorch's own low-precision `baseline`, plus atol."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in output"
    err, err_pt = max_err(got, ref), max_err(baseline, ref)
    assert err <= 2 * err_pt + atol, f"{name}: max error {err:.3e} > 2 * {err_pt:.3e} (PyTorch) + {atol:g}"


def check_forward(req, out, lse, atol=2e-3, lse_atol=2e-3):
    """out and lse against the float64 reference, within twice PyTorch's own error. Rows the
    reference makes NaN (their scores see a NaN or inf input) must be NaN too, every element of
    them, as in PyTorch's attention: never a silent 0 or a finite row; the others are compared.
    Returns the reference's NaN rows of out."""
    ref_out, ref_lse = reference.attention(req, torch.float64)
    pt_out, pt_lse = reference.attention(req, low_precision(req.dtype))
    assert out.dtype == req.out_dtype, f"out dtype {out.dtype} != {req.out_dtype}"
    assert lse.dtype == torch.float32
    nan_out, nan_lse = ref_out.isnan().any(-1, keepdim=True), ref_lse.isnan()
    if nan_out.any() or nan_lse.any():
        assert torch.equal(out.isnan().any(-1, keepdim=True), nan_out), "NaN rows of out differ from the reference's"
        assert torch.equal(out.isnan().all(-1, keepdim=True), nan_out), "a NaN row of out is only partly NaN"
        assert torch.equal(lse.isnan(), nan_lse), "NaN rows of lse differ from the reference's"
        out, ref_out, pt_out = (x.masked_fill(nan_out, 0) for x in (out, ref_out, pt_out))
        lse, ref_lse, pt_lse = (x.masked_fill(nan_lse, 0) for x in (lse, ref_lse, pt_lse))
    assert_within("out", out, ref_out, pt_out, atol)
    assert_within("lse", lse, ref_lse, pt_lse, lse_atol)
    return nan_out[..., 0]


def nan_inputs(q, k, v, causal):
    """A NaN in one q element and one k element: q row 17 (batch 0, head 1) and key len_k - 50
    (batch 1, kv head 0). With `causal` (bottom-right) only the rows that reach that key see it."""
    q[0, 17, 1, 3] = float("nan")
    k[1, k.shape[1] - 50, 0, 5] = float("nan")
    return make_request(q, k, v, causal=causal)


def check_nan_rows(req, out, lse):
    """check_forward on nan_inputs, which must poison some rows but not all."""
    rows = check_forward(req, out, lse)
    assert rows.any() and not rows.all(), "the inputs must poison some rows, not all"


def reference_grads(req, dout, dtype):
    """Gradients of reference attention in `dtype` w.r.t. q, k, v (autograd)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (req.q, req.k, req.v)]
    out, _ = reference.attention(req, dtype, *leaves)
    out.backward(dout.to(dtype))
    return [x.grad for x in leaves]


def check_backward(req, dout, grads, atol=2e-3):
    ref = reference_grads(req, dout, torch.float64)
    pt = reference_grads(req, dout, low_precision(req.dtype))
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref, pt):
        assert g.dtype == req.dtype, f"{name} dtype {g.dtype} != {req.dtype}"
        assert_within(name, g, r, p, atol)


def packed(lengths, nheads, headdim, dtype, device=DEVICE):
    """A packed (total, nheads, headdim) tensor and its int32 cu_seqlens."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    x = torch.randn(int(cu[-1]), nheads, headdim, device=device).to(dtype)
    return x, cu.to(device)


def ragged_varlen(dtype, device=DEVICE, lens_k=(50, 9, 130, 0), seqused_k=True):
    """The ragged packed case the varlen tests share: query lengths 37 / 0 / 130 / 1 against key
    lengths `lens_k`, GQA 4 / 2 heads, hdim 64; (q, k, v, index kwargs), the kwargs with
    seqused_k 40 / 9 / 100 / 0 unless `seqused_k` is False."""
    lens_q = [37, 0, 130, 1]
    q, cu_q = packed(lens_q, 4, 64, dtype, device)
    k, cu_k = packed(lens_k, 2, 64, dtype, device)
    v, _ = packed(lens_k, 2, 64, dtype, device)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    if seqused_k:
        kw["seqused_k"] = torch.tensor([40, 9, 100, 0], dtype=torch.int32, device=device)
    return q, k, v, kw


# Hopper's FP8 tensor cores do not accumulate in full fp32: measured on an H200 (benchmarks/
# results/gpu_tests.md, 2026-12-05), the LSE errors of the cute FP8 kernel against fp64 match an
# accumulator truncated to 13 mantissa bits after each 32-product k-step (a rounding one
# predicts half of them; DeepSeek-V3 §3.3.2 reports ~14 bits on H800).
FP8_ACC_BITS = 13


def fp8_mma_model(a, b):
    """a @ b summed 32 products (one FP8 WGMMA k-step) at a time, the running sum truncated to
    FP8_ACC_BITS mantissa bits after each step: the FP8 tensor core's accumulation, modelled."""
    acc = None
    for c in range(0, a.shape[-1], 32):
        part = a[..., c:c + 32] @ b[..., c:c + 32, :]
        acc = part if acc is None else acc + part
        m, e = torch.frexp(acc)
        acc = torch.ldexp(torch.trunc(m * 2.0**FP8_ACC_BITS) / 2.0**FP8_ACC_BITS, e)
    return acc


# How far (relative) a kernel's P may stand from the emulation's before its e4m3 rounding: the
# kernel's exp2 argument is one FMA of the raw score (the emulation rounds the scaled score, then
# subtracts the max), and MUFU.EX2 approximates: a few float32 ulps of arguments up to ~2^7,
# times ln 2; 2^-16 covers them with room.
P_REL_DRIFT = 2.0**-16


def p_flip_bound(qkv, params, **kw):
    """A bound on how far a kernel's output may move because some P lies so close to an e4m3
    rounding boundary that the kernel rounds it to the neighbouring code (its P within
    P_REL_DRIFT of the emulation's): fa3py.fp8.emulate.attention with each such P replaced by
    the gap between its two codes (others by 0) and V by |V|, so that its output is, per element,
    the sum of those gaps times |v| over the row sum, scaled as O is. float32."""
    import pytest

    from fa3py.fp8 import emulate

    round_p = emulate.round_p

    def gaps(p):
        return round_p(p * (1 + P_REL_DRIFT)) - round_p(p * (1 - P_REL_DRIFT))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(emulate, "round_p", gaps)
        m.setattr(emulate, "gemm_pv", lambda p, v: torch.matmul(p, v.abs()))
        out, _ = emulate.attention(qkv, params, torch.float32, **kw)
    return out


def fp8_emulated_pair(qkv, params, out_dtype, **kw):
    """fa3py.fp8.emulate.attention of `qkv` twice: exact fp32 GEMMs, and the FP8 GEMMs accumulated
    as `fp8_mma_model` (int8 Q K^T, qk_int8, accumulates exactly in int32: kept exact). Their
    difference is how far a kernel on FP8 tensor cores may drift from the exact emulation.
    Returns ((out, lse), (out_model, lse_model))."""
    import pytest

    from fa3py.fp8 import emulate

    exact = emulate.attention(qkv, params, out_dtype, **kw)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(emulate, "gemm_pv", fp8_mma_model)
        if not qkv.fmt.qk_int8:
            m.setattr(emulate, "gemm_qk", fp8_mma_model)
        model = emulate.attention(qkv, params, out_dtype, **kw)
    return exact, model
