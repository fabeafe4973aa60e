"""Drop-in replacements for FlashAttention-3's `flash_attn_interface` functions.

Signatures, defaults, layouts and return values follow FlashAttention-3's
``hopper/flash_attn_interface.py``, so switching is one import:

    from fa3py import flash_attn_func, flash_attn_varlen_func, flash_attn_qkvpacked_func
    from fa3py import flash_attn_with_kvcache, flash_attn_combine, get_scheduler_metadata

``qv`` (MLA) is forward only. ``num_splits``, ``pack_gqa`` and ``sm_margin`` are scheduling
hints that never change results: the Hopper kernel splits the keys as ``num_splits`` says (0:
its own choice, 1: never, as in FA3 and its default; at most one split per KV block), other
backends ignore it; fa3py packs GQA heads by itself; ``sm_margin`` SMs are left free by the
Hopper forward's persistent grid and counted out of its heuristics (as in FA3).
``return_attn_probs=True`` returns ``(out, softmax_lse)`` as FA3 does.
"""

from __future__ import annotations

from .autograd import run
from .validation import make_request


def flash_attn_func(
    q,
    k,
    v,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
):
    """FlashAttention-3's `flash_attn_func`: q (batch, seqlen_q, nheads, headdim), k/v (batch,
    seqlen_k, nheads_kv, headdim[_v]). float8_e4m3fn inputs take float32 descales of shape
    (batch, nheads_kv) and give a bf16 output. Returns out, or (out, softmax_lse) with
    return_attn_probs; softmax_lse is (batch, nheads, seqlen_q). q, k, v may also be fa3py.fp8
    block-scaled operands (`quantize_fp8(q, k, v)`), as `attention` and `flash_attn_varlen_func`
    take them."""
    from . import fp8 as _fp8

    build = _fp8.make_request if _fp8.is_quantized(q, k, v) else make_request
    req = build(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                       attention_chunk=attention_chunk, softcap=softcap, deterministic=deterministic,
                       num_splits=num_splits, sm_margin=sm_margin,
                       q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, qv=qv)
    out, lse = run(req)
    return (out, lse) if return_attn_probs else out


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    seqused_q=None,
    seqused_k=None,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
):
    """FlashAttention-3's `flash_attn_varlen_func`: q (total_q, nheads, headdim) packed by
    int32 `cu_seqlens_q` (batch + 1,); k/v (total_k, nheads_kv, headdim[_v]) packed by
    `cu_seqlens_k`. Either cu_seqlens may be None, the tensor then being batched (batch,
    seqlen, nheads, headdim). `seqused_q/k` (batch,) int32 limit each sequence to its first
    tokens. Returns out (total_q, nheads, headdim_v), or (out, softmax_lse) with
    return_attn_probs; softmax_lse is (nheads, total_q). q, k, v may also be fa3py.fp8 block-scaled
    operands quantized with the same cu_seqlens (`quantize_fp8(..., cu_seqlens_q=, cu_seqlens_k=)`)."""
    from . import fp8 as _fp8

    build = _fp8.make_request if _fp8.is_quantized(q, k, v) else make_request
    req = build(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                       attention_chunk=attention_chunk, softcap=softcap, deterministic=deterministic,
                       num_splits=num_splits, sm_margin=sm_margin,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                       seqused_q=seqused_q, seqused_k=seqused_k,
                       q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, qv=qv)
    out, lse = run(req)
    return (out, lse) if return_attn_probs else out


def flash_attn_qkvpacked_func(
    qkv,
    softmax_scale=None,
    causal=False,
    q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    deterministic=False,
    num_heads_q=None,
    sm_margin=0,
    return_attn_probs=False,
):
    """FlashAttention-3's `flash_attn_qkvpacked_func`: qkv (batch, seqlen, 3, nheads, headdim),
    or (batch, seqlen, num_heads_q + 2 * nheads_kv, headdim) with `num_heads_q` (GQA). Views of
    qkv go to `flash_attn_func` (no copy); the gradient of qkv is assembled by autograd."""
    from .validation import _check_tensor, _fail

    _check_tensor("qkv", qkv)
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            _fail(ValueError, "qkv", f"5-D qkv must be (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
        q, k, v = qkv.unbind(dim=2)
    elif qkv.dim() == 4:
        if isinstance(num_heads_q, bool) or not isinstance(num_heads_q, int) or num_heads_q <= 0:
            _fail(ValueError, "num_heads_q", f"must be a positive int for 4-D qkv (batch, seqlen, num_heads_q + "
                                             f"2 * nheads_kv, headdim), got {num_heads_q!r}")
        num_heads_k = (qkv.shape[2] - num_heads_q) // 2
        if num_heads_k <= 0 or num_heads_q + 2 * num_heads_k != qkv.shape[2]:
            _fail(ValueError, "num_heads_q", f"({num_heads_q}) leaves {qkv.shape[2] - num_heads_q} heads of qkv, "
                                             "not a positive even count for k and v")
        q, k, v = qkv.split([num_heads_q, num_heads_k, num_heads_k], dim=2)
    else:
        _fail(ValueError, "qkv", f"must be 5-D (batch, seqlen, 3, nheads, headdim) or 4-D with num_heads_q, got "
                                 f"shape {tuple(qkv.shape)}")
    return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, q_descale=q_descale,
                           k_descale=k_descale, v_descale=v_descale, window_size=window_size,
                           attention_chunk=attention_chunk, softcap=softcap, deterministic=deterministic,
                           sm_margin=sm_margin, return_attn_probs=return_attn_probs)
