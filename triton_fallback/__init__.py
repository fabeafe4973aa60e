"""Triton FlashAttention-2 kernels for GPUs without the Hopper path (forward and backward).

Contract used by `fa3py.dispatch`: `why_not(req, backward)` says whether these kernels can
serve a request (features only; the dispatcher checks the hardware), `forward(req)` returns
(out, lse) and `backward(req, out, lse, dout)` returns (dq, dk, dv). Semantics: see
`fa3py.request`.
"""

from __future__ import annotations

import torch

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fa3py.request import AttentionRequest

from .ops import backward, forward

__all__ = ["why_not", "forward", "backward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)


def why_not(req: AttentionRequest, backward: bool) -> str | None:
    if req.params.fp8:
        return "internal FP8 quantization (params.fp8) is not implemented in the Triton kernels"
    if req.dtype not in _DTYPES:
        return f"dtype {req.dtype} is not supported (float16, bfloat16, float8_e4m3fn)"
    if req.is_fp8_input and backward:
        return "the Triton kernels have no backward for float8 inputs"
    for name, d in (("headdim", req.headdim), ("headdim_v", req.headdim_v)):
        if d % 8 or not 8 <= d <= 256:
            return f"{name}={d} is not a multiple of 8 in [8, 256]"
    if req.nheads % req.nheads_kv:
        return f"nheads={req.nheads} is not a multiple of nheads_kv={req.nheads_kv}"
    return None
