"""Autograd glue: one Function for every backend; forward and backward dispatched apart."""

from __future__ import annotations

import dataclasses

import torch

from . import dispatch, ops
from .request import AttentionRequest


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, req: AttentionRequest, backend, q, k, v, qv):
        choice = dispatch.choose(req, backward=False, backend=backend)
        out, lse = choice.module.forward(req)
        ctx.req = dataclasses.replace(req, q=None, k=None, v=None)
        ctx.backend = backend
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        req = dataclasses.replace(ctx.req, q=q, k=k, v=v)
        req = dispatch.backward_request(req)
        choice = dispatch.choose(req, backward=True, backend=ctx.backend)
        dq, dk, dv = choice.module.backward(req, out, lse, dout)
        return None, None, dq, dk, dv, None


def run(req: AttentionRequest, backend=None):
    """(out, lse) for a validated request, differentiable in q, k and v (FP8 requests: the
    forward runs, a backward raises). While `torch.compile` traces, through the custom op."""
    if torch.compiler.is_compiling():
        if req.fp8_tensors is not None:  # the custom op's arguments carry no block scales
            raise NotImplementedError("fa3py: torch.compile of attention on pre-quantized FP8 operands "
                                      "(fa3py.quantize_fp8) is not supported yet; use fp8=True on 16-bit tensors")
        return ops.run(req, backend)
    qv = req.qv
    if torch.is_grad_enabled() and (req.q.requires_grad or req.k.requires_grad or req.v.requires_grad
                                    or (qv is not None and qv.requires_grad)):
        return _Attention.apply(req, backend, req.q, req.k, req.v, qv)
    # Inference: no graph to record, so skip autograd.Function's per-call cost.
    return dispatch.choose(req, backward=False, backend=backend).module.forward(req)
