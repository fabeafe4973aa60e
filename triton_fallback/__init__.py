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

from . import fp8_fwd
from .ops import backward, forward

__all__ = ["why_not", "forward", "backward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)


def why_not(req: AttentionRequest, backward: bool) -> str | None:
    if req.paged:  # flash_attn_with_kvcache gathers the pages for this backend
        return "paged K / V (page_table): the Triton kernels read contiguous keys; gather the pages first"
    # the block-scaled FP8 format (fa3py.fp8); fp8=True's backward is the 16-bit one (checked below)
    if req.fp8_tensors is not None or (req.params.fp8 and not backward):
        return fp8_fwd.why_not(req, backward)
    if req.dtype not in _DTYPES:
        return f"dtype {req.dtype} is not supported (float16, bfloat16, float8_e4m3fn)"
    if req.is_fp8_input and backward:
        return "the Triton kernels have no backward for float8 inputs"
    if req.qv is not None and backward:
        return "the Triton kernels have no backward for qv (MLA)"
    for name, d in (("headdim", req.headdim), ("headdim_v", req.headdim_v)):
        if d % 8 or not 8 <= d <= 256:
            return f"{name}={d} is not a multiple of 8 in [8, 256]"
    if req.nheads % req.nheads_kv:
        return f"nheads={req.nheads} is not a multiple of nheads_kv={req.nheads_kv}"
    if _row_offset_bound(req) >= 2**31:
        return ("a sequence spans 2^31 elements or more; the kernels index rows inside a sequence "
                "with 32-bit offsets")
    return None


def _row_offset_bound(req: AttentionRequest) -> int:
    """Largest (row in a sequence) x (row stride) the kernels form in int32, for q, k, v and the
    row-contiguous out / dout / dq they allocate or receive."""
    rows = max(req.max_seqlen_q, req.max_seqlen_k)
    stride = max(abs(x.stride(-3)) for x in (req.q, req.k, req.v))
    stride = max(stride, req.nheads * max(req.headdim, req.headdim_v))
    return rows * stride
