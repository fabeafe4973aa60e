"""Autograd glue: one Function for every backend; forward and backward dispatched apart."""

from __future__ import annotations

import dataclasses

import torch

from . import dispatch
from .request import AttentionRequest


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, req: AttentionRequest, backend, q, k, v):
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
        if req.params.fp8:  # straight-through: the 16-bit backward at the original inputs
            req = dataclasses.replace(req, params=dataclasses.replace(req.params, fp8=False))
        choice = dispatch.choose(req, backward=True, backend=ctx.backend)
        dq, dk, dv = choice.module.backward(req, out, lse, dout)
        return None, None, dq, dk, dv


def run(req: AttentionRequest, backend=None):
    """(out, lse) for a validated request, differentiable in q, k and v."""
    if torch.is_grad_enabled() and (req.q.requires_grad or req.k.requires_grad or req.v.requires_grad):
        return _Attention.apply(req, backend, req.q, req.k, req.v)
    # Inference: no graph to record, so skip autograd.Function's per-call cost.
    return dispatch.choose(req, backward=False, backend=backend).module.forward(req)
