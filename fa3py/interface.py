"""Drop-in replacements for FlashAttention-3's `flash_attn_interface` functions.

Signatures, defaults, layouts and return values follow FlashAttention-3's
``hopper/flash_attn_interface.py``, so switching is one import:

    from fa3py import flash_attn_func, flash_attn_varlen_func

Arguments that no fa3py backend serves raise NotImplementedError naming them: ``qv``,
``sm_margin != 0``. ``num_splits`` and ``pack_gqa`` are scheduling hints that never change
results: the Hopper kernel splits the keys as ``num_splits`` says (0:
its own choice, 1: never, as in FA3 and its default; at most one split per KV block), other
backends ignore it; fa3py packs GQA heads by itself. ``return_attn_probs=True`` returns
``(out, softmax_lse)`` as FA3 does.
"""

from __future__ import annotations

from .autograd import run
from .validation import make_request


def _unsupported(qv, sm_margin):
    if qv is not None:
        raise NotImplementedError("fa3py: `qv` (extra query component for MLA) is not supported yet")
    if sm_margin != 0:
        raise NotImplementedError(f"fa3py: `sm_margin` must be 0 (reserving SMs is not supported yet), got {sm_margin}")


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
    return_attn_probs; softmax_lse is (batch, nheads, seqlen_q)."""
    _unsupported(qv, sm_margin)
    req = make_request(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                       attention_chunk=attention_chunk, softcap=softcap, deterministic=deterministic,
                       num_splits=num_splits,
                       q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
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
    return_attn_probs; softmax_lse is (nheads, total_q)."""
    _unsupported(qv, sm_margin)
    req = make_request(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                       attention_chunk=attention_chunk, softcap=softcap, deterministic=deterministic,
                       num_splits=num_splits,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                       seqused_q=seqused_q, seqused_k=seqused_k,
                       q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    out, lse = run(req)
    return (out, lse) if return_attn_probs else out
