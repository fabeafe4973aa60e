"""Helpers shared by the cute_kernels tests (tests/test_cute_*.py)."""

from __future__ import annotations

import pytest
import torch

import cute_kernels
from fa3py.request import AttentionParams, AttentionRequest

gpu = pytest.mark.gpu


def make_req(q, k, v, **kw):
    params = {n: kw.pop(n) for n in list(kw) if n in AttentionParams.__dataclass_fields__}
    params.setdefault("softmax_scale", q.shape[-1] ** -0.5)
    return AttentionRequest(q, k, v, AttentionParams(**params), **kw)


def check_run(req, cfg=None):
    from tests._util import check_forward

    assert cute_kernels.why_not(req, backward=False) is None
    out, lse = cute_kernels.run(req, cfg or cute_kernels.config_for(req))
    torch.cuda.synchronize()
    check_forward(req, out, lse)


def qkv(b, sq, sk, h, hk, d, dv, dtype):
    mk = lambda s, n, e: torch.randn(b, s, n, e, device="cuda", dtype=dtype)
    return mk(sq, h, d), mk(sk, hk, d), mk(sk, hk, dv)


def packed_qkv(lq, lk, h, hk, d, dtype):
    """Packed (varlen) q, k, v of sequence lengths lq / lk and the request fields that go with them."""
    from tests._util import packed

    q, cu_q = packed(lq, h, d, dtype, "cuda")
    k, cu_k = packed(lk, hk, d, dtype, "cuda")
    v, _ = packed(lk, hk, d, dtype, "cuda")
    return q, k, v, dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk))
