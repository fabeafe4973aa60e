"""fa3py's forward and backward as `torch.library` custom ops, for `torch.compile`.

``torch.ops.fa3py.fwd`` and ``torch.ops.fa3py.bwd`` take a validated request spelled out as
tensors and scalars, dispatch it as an eager call does, and have fake (meta) implementations
that give the output shapes, so `torch.compile(..., fullgraph=True)` traces a model that calls
`fa3py.attention` or `flash_attn_func` into one graph with the attention as an opaque node
(and, through `register_autograd`, the backward too). Outputs are contiguous, as the fake
implementations say.

Eager calls do not go through these ops: `fa3py.autograd.run` uses them only while
`torch.compile` traces (the dispatcher would add ~10 us a call for nothing). Neither adds a host
sync: index tensors are read on the host only by validation, which skips that while tracing
and while a CUDA graph is captured.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .request import AttentionParams, AttentionRequest

def request_args(req: AttentionRequest) -> tuple:
    """The ops' arguments after q, k, v (and before `backend`), from a request."""
    p = req.params
    return (req.cu_seqlens_q, req.cu_seqlens_k, req.seqused_q, req.seqused_k, req.q_descale, req.k_descale,
            req.v_descale, req.qv, req.max_seqlen_q, req.max_seqlen_k, p.softmax_scale, p.window_left, p.window_right,
            p.softcap, p.attention_chunk, p.deterministic, p.fp8, p.num_splits, p.sm_margin)


def _request(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, q_descale, k_descale, v_descale, qv,
             max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, attention_chunk,
             deterministic, fp8, num_splits, sm_margin) -> AttentionRequest:
    params = AttentionParams(softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
                             softcap=softcap, attention_chunk=attention_chunk, deterministic=deterministic,
                             fp8=fp8, num_splits=num_splits, sm_margin=sm_margin)
    return AttentionRequest(q=q, k=k, v=v, params=params, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                            seqused_q=seqused_q, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
                            max_seqlen_k=max_seqlen_k, q_descale=q_descale, k_descale=k_descale,
                            v_descale=v_descale, qv=qv)


@torch.library.custom_op("fa3py::fwd", mutates_args=())
def fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    seqused_q: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor],
    q_descale: Optional[torch.Tensor], k_descale: Optional[torch.Tensor], v_descale: Optional[torch.Tensor],
    qv: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
    softcap: float, attention_chunk: int, deterministic: bool, fp8: bool, num_splits: int, sm_margin: int,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the request these arguments spell (already validated)."""
    req = _request(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, q_descale, k_descale, v_descale, qv,
                   max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, attention_chunk,
                   deterministic, fp8, num_splits, sm_margin)
    out, lse = dispatch.choose(req, backward=False, backend=backend).module.forward(req)
    return out.contiguous(), lse.contiguous()


@fwd.register_fake
def _(q, k, v, cu_seqlens_q, *args, backend=None):
    out_dtype = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype)
    if cu_seqlens_q is not None:  # packed q: (nheads, total_q)
        lse = q.new_empty((q.shape[-2], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fa3py::bwd", mutates_args=())
def bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    seqused_q: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor],
    q_descale: Optional[torch.Tensor], k_descale: Optional[torch.Tensor], v_descale: Optional[torch.Tensor],
    qv: Optional[torch.Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
    softcap: float, attention_chunk: int, deterministic: bool, fp8: bool, num_splits: int, sm_margin: int,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the saved (out, lse)."""
    req = _request(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, q_descale, k_descale, v_descale, qv,
                   max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, attention_chunk,
                   deterministic, fp8, num_splits, sm_margin)
    req = dispatch.backward_request(req)
    grads = dispatch.choose(req, backward=True, backend=backend).module.backward(req, out, lse, dout)
    return tuple(g.contiguous() for g in grads)


@bwd.register_fake
def _(dout, q, k, v, *args, backend=None):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *rest[:8])
    ctx.scalars = tuple(rest[8:])
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    dq, dk, dv = torch.ops.fa3py.bwd(dout.contiguous(), q, k, v, out, lse, *tensors, *ctx.scalars)
    return (dq, dk, dv) + (None,) * (len(tensors) + len(ctx.scalars))


fwd.register_autograd(_backward, setup_context=_setup_context)


def run(req: AttentionRequest, backend: Optional[str] = None):
    """(out, lse) through the custom op (what `fa3py.autograd.run` calls while tracing)."""
    return torch.ops.fa3py.fwd(req.q, req.k, req.v, *request_args(req), backend)
