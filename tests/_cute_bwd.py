"""Helpers shared by the tests of the cute backward (tests/test_cute_bwd_*.py) and the tests that
assert its route (test_cross_backend, test_api_random): inputs, one training step through the
public API checked against the fp64 reference, and the backward kernel's scope."""

from __future__ import annotations

import torch

import fa3py
from fa3py import dispatch
from fa3py.validation import make_request
from tests._util import check_backward, check_forward, packed

# Mask / score features of the backward tests (kwargs of the public API): windows with the left
# edge only, the right edge only, both, causal, softcap.
FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "left": {"window_size": (50, -1)},
    "right": {"window_size": (-1, 20)},
    "both": {"window_size": (37, 11)},
    "softcap": {"softcap": 3.0},
    "softcap_causal": {"softcap": 5.0, "causal": True},
}
HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (4, 1)}


def cute_serves_backward(req) -> bool:
    """Whether the cute backward (bwd_launch) should take `req`'s backward on sm90, stated apart
    from its why_not: on (not FA3PY_CUTE_BWD=0), the cute forward's scope, fp16 / bf16, head
    dims up to 256 with hdim_v = hdim, or hdim_v 128 beside a head dim in 136..192 (192 x 128),
    deterministic too, attention_chunk unless turned off (FA3PY_CUTE_BWD_CHUNK=0)."""
    from cute_kernels import bwd_launch

    p = req.params
    return (bwd_launch.enabled and not dispatch.is_empty(req) and req.dtype in (torch.float16, torch.bfloat16)
            and not req.is_fp8_input and not p.fp8 and req.qv is None
            and (req.headdim == req.headdim_v or (136 <= req.headdim <= 192 and req.headdim_v == 128))
            and req.headdim <= 256 and req.headdim % 8 == 0
            and req.nheads % req.nheads_kv == 0 and (not p.attention_chunk or bwd_launch.chunk_enabled)
            and (p.softmax_scale > 0 or p.softcap > 0))


def make_inputs(lens, h, hk, d, dtype, device, varlen, seqused=None):
    """(q, k, v, index kwargs): batched (b = len(lens), every sequence lens[0]) or packed
    sequences of the (query, key) lengths `lens`; seqused: per-sequence (used_q, used_k)."""
    if not varlen:
        (sq, sk), b = lens[0], len(lens)
        mk = lambda s, n: torch.randn(b, s, n, d, device=device).to(dtype)
        return mk(sq, h), mk(sk, hk), mk(sk, hk), {}
    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    q, cu_q = packed(lq, h, d, dtype, device)
    k, cu_k = packed(lk, hk, d, dtype, device)
    v, _ = packed(lk, hk, d, dtype, device)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    if seqused is not None:
        kw["seqused_q"] = torch.tensor([a for a, _ in seqused], dtype=torch.int32, device=device)
        kw["seqused_k"] = torch.tensor([b for _, b in seqused], dtype=torch.int32, device=device)
    return q, k, v, kw


def train_step(api, q, k, v, index_kw, **features):
    """out, LSE and the gradients of one step through `api` ("attention", "func": flash_attn_func,
    "varlen": flash_attn_varlen_func, "grad": torch.autograd.grad of `attention`), checked
    against the fp64 reference (tolerances of shared/STYLE.md); returns the request and the
    backends that served forward and backward."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    if api in ("attention", "grad"):
        out, lse = fa3py.attention(*leaves, return_lse=True, **features)
    elif api == "func":
        out, lse = fa3py.flash_attn_func(*leaves, return_attn_probs=True, **features)
    else:
        out, lse = fa3py.flash_attn_varlen_func(*leaves, **index_kw, return_attn_probs=True, **features)
    req = make_request(q, k, v, **index_kw, **features)
    check_forward(req, out, lse)
    dout = torch.randn_like(out)
    if api == "grad":
        grads = torch.autograd.grad(out, leaves, dout)
    else:
        out.backward(dout)
        grads = [x.grad for x in leaves]
    check_backward(req, dout, grads)
    return req, dispatch.choose(req).name, dispatch.choose(req, backward=True).name


def force_tile_m(monkeypatch, hdim: int, tile_m: int) -> None:
    """bwd_launch.config_for gives head dim `hdim`'s configs `tile_m` (its BWD_TILES entry or
    variant), whatever the table and the defaults say."""
    import dataclasses

    from cute_kernels import bwd_launch

    config_for = bwd_launch.config_for

    def forced(req):
        cfg = config_for(req)
        return dataclasses.replace(cfg, tile_m=tile_m) if cfg.hdim == hdim else cfg

    monkeypatch.setattr(bwd_launch, "config_for", forced)
