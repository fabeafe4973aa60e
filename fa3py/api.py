"""The public entry points of fa3py."""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, fp8 as _fp8
from .autograd import run
from .validation import make_request


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple = (-1, -1),
    softcap: float = 0.0,
    attention_chunk: int = 0,
    qv: Optional[torch.Tensor] = None,
    fp8: bool = False,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """Exact attention ``softmax(scale * q k^T) v``, dispatched to the fastest backend.

    q: (batch, seqlen_q, nheads, headdim); k: (batch, seqlen_k, nheads_kv, headdim);
    v: (batch, seqlen_k, nheads_kv, headdim_v). fp16, bf16, or float8_e4m3fn (use
    `flash_attn_func` with descales for that). nheads_kv must divide nheads (MQA/GQA).
    Any strides are accepted.

    causal: bottom-right aligned mask, as FlashAttention. window_size=(left, right): query i
    sees keys in [i + sk - sq - left, i + sk - sq + right]; -1 is unbounded; with causal=True the
    right bound is 0 whatever window_size says (as FlashAttention-3). attention_chunk=C > 0
    (chunked local attention, Llama 4): query i also sees only keys j with
    floor(j / C) == floor((i + sk - sq) / C), on top of causal / window_size. qv (MLA; shape of
    the output, fp16/bf16): scores gain qv . v, softmax_scale defaults to 1 / sqrt(headdim +
    headdim_v); forward only (torch path, Triton forward). softcap > 0: scores become
    softcap * tanh(scores / softcap). fp8=True: quantize q, k, v to FP8 with a random-sign
    Hadamard rotation of q and k and per-block scales (fa3py.fp8; the backward is the 16-bit one
    at the original inputs, straight-through); where no FP8 kernel serves the call, the torch
    backend emulates it in float32 and warns once.
    backend: "cute", "triton" or "torch" forces one (also via FA3PY_BACKEND).

    Returns out (batch, seqlen_q, nheads, headdim_v) in q's dtype, and with return_lse also
    the float32 log-sum-exp (batch, nheads, seqlen_q) of the scaled scores (-inf for a
    query that sees no key; its output row is 0).
    """
    build = _fp8.make_request if _fp8.is_quantized(q, k, v) else make_request
    req = build(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                softcap=softcap, attention_chunk=attention_chunk, fp8=fp8, qv=qv)
    out, lse = run(req, backend)
    return (out, lse) if return_lse else out


def explain(q, k=None, v=None, *, backend: Optional[str] = None, **kwargs) -> str:
    """Which backend `attention(q, k, v, **kwargs)` would use for forward and backward, and why.

    Accepts the keyword arguments of `attention` and of the FlashAttention-3 functions
    (cu_seqlens_q, seqused_k, q_descale, ...). `explain("cuda")` (a device alone) says which
    backends can run there and why the others cannot."""
    if k is None and v is None and isinstance(q, (str, torch.device)):
        return dispatch.explain_device(q)
    kwargs.pop("return_lse", None)
    req = (_fp8.make_request if _fp8.is_quantized(q, k, v) else make_request)(q, k, v, **kwargs)
    text = dispatch.explain_choice(req, backend)
    return text + _fp8.explain(req, backend) if req.params.fp8 or req.fp8_tensors is not None else text


def available_backends(device="cpu") -> list:
    """Backends that can run on `device` ("cpu", "cuda", torch.device), in priority order."""
    return dispatch.available_backends(device)
