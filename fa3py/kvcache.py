"""FlashAttention-3's inference entry points: `flash_attn_with_kvcache`, `flash_attn_combine`,
`get_scheduler_metadata`.

`flash_attn_with_kvcache` runs in three steps, all on the device (no host sync, so a decode step
can be captured in a CUDA graph; the value checks read the index tensors on the host only
outside capture): the new k / v (k rotated) are written into the cache in place; then the
attention runs on (rotated q, the cache) with seqused_k.

Paged caches: on Hopper the cute kernel reads the pages itself (the request carries the page
table, rows picked by cache_batch_idx; its producer TMAs each KV block from its page, or from
tile_n / page_size pages) for the page sizes it serves: multiples of its KV tile (128 keys at
hdim 64 / 128, 112 at 96 (128 up to 512 keys), 96 at 192, 64 at 256) and divisors of the tile
that are multiples of 8 (8, 16, 32, 64 at hdim 128), without cache_leftpad. Anything else (other
page sizes, cache_leftpad, other backends, cache_batch_idx or cache_leftpad on a contiguous
cache) gathers each sequence's keys into a contiguous (batch, capacity, ...) K / V first
(`_gather_keys`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from . import dispatch
from .validation import _check_tensor, _fail, check_kvcache, make_request, rotates_q_sequentially


def _rotate(x, cos, sin, interleaved: bool):
    """Rotary embedding of x (..., D) with cos / sin (..., rotary_dim / 2) broadcast against it,
    computed in float32 and rounded to x's dtype once."""
    half = cos.shape[-1]
    xf = x.float()
    cos, sin = cos.float(), sin.float()
    if interleaved:
        x1, x2 = xf[..., 0:2 * half:2], xf[..., 1:2 * half:2]
        rot = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., :half], xf[..., half:2 * half]
        rot = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((rot, xf[..., 2 * half:]), dim=-1).to(x.dtype)


def _token_index(cu: Optional[torch.Tensor], batch: int, length: int, total: int, device):
    """(sequence, position in it) of every token of a batched (batch, length) or packed (total,)
    layout, as int64 device tensors."""
    if cu is None:
        b = torch.arange(batch, device=device).repeat_interleave(length)
        return b, torch.arange(length, device=device).repeat(batch)
    n = torch.arange(total, device=device)
    b = torch.searchsorted(cu[1:].long(), n, right=True)
    return b, n - cu.long()[b]


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    qv=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    rotary_seqlens: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    rotary_interleaved=True,
    scheduler_metadata=None,
    num_splits=0,
    pack_gqa=None,
    sm_margin=0,
    return_softmax_lse=False,
):
    """FlashAttention-3's `flash_attn_with_kvcache` (forward only, as in FA3).

    q: (batch, seqlen_q, nheads, headdim), or (total_q, nheads, headdim) with cu_seqlens_q.
    k_cache / v_cache: (batch_cache, seqlen_cache, nheads_kv, headdim[_v]), or with page_table
    (batch, max_pages) int32 the pages (num_pages, page_size, nheads_kv, headdim[_v]), any
    page_size >= 1. k / v (optional): (batch, seqlen_new, nheads_kv, headdim[_v]), or packed
    (total_new, ...) with cu_seqlens_k_new; written **in place** into the cache at positions
    cache_seqlens[b] + t (the only input fa3py modifies, as FA3 does). cache_seqlens: int or
    (batch,) int32, tokens already in the cache (None: the whole cache). cache_batch_idx:
    (batch,) int32 cache row (or page_table row) of each sequence. cache_leftpad: (batch,) int32
    first valid cache position. Sequence b attends to cache positions [cache_leftpad[b],
    cache_seqlens[b] + new_b), bottom-right aligned for causal / window_size / attention_chunk.

    rotary_cos / rotary_sin (seqlen_ro, rotary_dim / 2), q's dtype, rotary_dim a multiple of 16
    (only with k / v): k is rotated at positions rotary_seqlens[b] + t (rotary_seqlens defaults
    to cache_seqlens); q likewise when causal or local, else every q token at rotary_seqlens[b].
    rotary_interleaved: pairs (2i, 2i+1), else (i, i + rotary_dim / 2) (GPT-NeoX).

    scheduler_metadata, num_splits, pack_gqa are scheduling hints that never change results.
    Returns out (q's layout, headdim_v), or with return_softmax_lse (out, softmax_lse,
    out_accum, softmax_lse_accum) as FA3 does; fa3py's split partials never leave the kernels,
    so the last two are empty tensors. Paged caches are read in place by the Hopper kernel for
    the page sizes it serves; other cases gather the keys (see the module docstring).
    """
    kv = check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                       cache_leftpad, page_table, cu_seqlens_q, cu_seqlens_k_new, max_seqlen_q, rotary_seqlens,
                       causal, window_size, attention_chunk, scheduler_metadata)
    device, dtype, batch, packed_q, paged = q.device, q.dtype, kv.batch, cu_seqlens_q is not None, page_table is not None
    hk, d, dv, capacity = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3], kv.capacity
    cache_seqlens, new_lens = kv.cache_seqlens, kv.new_lens

    # cache rows picked by cache_batch_idx, else sequence b is cache row b (no index tensor: no
    # launch on a decoding step)
    batch_idx = cache_batch_idx.long() if cache_batch_idx is not None else None

    def locate(b, pos):
        """(cache index, position in it) of position pos of sequence b."""
        rows = b if batch_idx is None else batch_idx[b]
        if not paged:
            return rows, pos
        page_size = k_cache.shape[1]
        return page_table[rows, torch.div(pos, page_size, rounding_mode="floor")].long(), pos % page_size

    # every check before the cache is written: the attention's own arguments are validated on
    # stand-ins of the gathered K / V (same shapes, no memory)
    gather = paged or cache_batch_idx is not None or cache_leftpad is not None
    seqused_k = None
    if cache_seqlens is not None:
        seqused_k = cache_seqlens + new_lens if new_lens is not None else cache_seqlens  # (no add launch)
    if cache_leftpad is not None:
        if seqused_k is None:
            seqused_k = torch.full((batch,), capacity, dtype=torch.int32, device=device)
        seqused_k = seqused_k - cache_leftpad
    if seqused_k is not None:
        seqused_k = seqused_k.to(torch.int32)
    kv_shape = (batch, capacity, hk) if gather else tuple(k_cache.shape[:3])
    stand_in = [torch.empty((), dtype=dtype, device=device).expand(*kv_shape, dim) for dim in (d, dv)]
    req = make_request(q, *stand_in, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                       attention_chunk=attention_chunk, softcap=softcap, num_splits=num_splits, sm_margin=sm_margin,
                       cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, seqused_k=seqused_k,
                       max_seqlen_k=capacity if seqused_k is not None else None,
                       q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, qv=qv)

    # 1. rotary and the in-place append
    ro_base = (rotary_seqlens if rotary_seqlens is not None else cache_seqlens)
    if k is not None:
        kb, kt = _token_index(cu_seqlens_k_new, batch, k.shape[1] if k.dim() == 4 else 0, k.shape[0], device)
        k_flat, v_flat = k.reshape(-1, hk, d), v.reshape(-1, hk, dv)
        if rotary_cos is not None:
            pos = ro_base.long()[kb] + kt
            k_flat = _rotate(k_flat, rotary_cos[pos].unsqueeze(1), rotary_sin[pos].unsqueeze(1), rotary_interleaved)
        i, j = locate(kb, cache_seqlens.long()[kb] + kt)
        k_cache[i, j] = k_flat
        v_cache[i, j] = v_flat
    if rotary_cos is not None:
        max_q = req.max_seqlen_q
        qb, qt = _token_index(cu_seqlens_q, batch, q.shape[1] if not packed_q else 0, q.shape[0], device)
        if not rotates_q_sequentially(causal, window_size, attention_chunk, max_q, capacity):
            qt = torch.zeros_like(qt)
        pos = ro_base.long()[qb] + qt
        q = _rotate(q.reshape(-1, *q.shape[-2:]), rotary_cos[pos].unsqueeze(1), rotary_sin[pos].unsqueeze(1),
                    rotary_interleaved).view(q.shape)

    # 2. the keys: the pages, where the backend reads them itself; else each sequence's keys as a
    # (batch, capacity, ...) prefix of K / V
    choice = None
    if paged and cache_leftpad is None:
        table = page_table if batch_idx is None else page_table[batch_idx]
        choice = _page_reader(dataclasses.replace(req, q=q, k=k_cache, v=v_cache, page_table=table))
    if choice is not None:
        req = dataclasses.replace(req, q=q, k=k_cache, v=v_cache, page_table=table)
    else:
        keys, values = (_gather_keys(k_cache, v_cache, locate, batch, capacity, cache_leftpad) if gather
                        else (k_cache, v_cache))
        req = dataclasses.replace(req, q=q, k=keys, v=values)
        choice = dispatch.choose(req, backward=False)

    # 3. attention
    with torch.no_grad():
        out, lse = choice.module.forward(req)
    if not return_softmax_lse:
        return out
    empty = torch.empty(0, dtype=torch.float32, device=device)
    return out, lse, empty, empty


def _page_reader(req) -> Optional[dispatch.Choice]:
    """The backend for paged request `req` when it reads the pages itself (cute_kernels on Hopper,
    for the page sizes it serves), else None: the caller gathers the keys."""
    try:
        choice = dispatch.choose(req, backward=False)
    except dispatch.BackendUnavailable:
        return None
    # (an empty request goes to torch, which reads no pages)
    return choice if choice.module.why_not(req, False) is None else None


def _gather_keys(k_cache, v_cache, locate, batch: int, capacity: int, cache_leftpad):
    """Each sequence's keys and values as a (batch, capacity, ...) prefix of contiguous K / V
    (positions from cache_leftpad[b] on, through `locate`: cache_batch_idx rows, pages)."""
    device = k_cache.device
    pos = torch.arange(capacity, device=device).unsqueeze(0)
    if cache_leftpad is not None:
        pos = (pos + cache_leftpad.long().unsqueeze(1)).clamp_(max=capacity - 1)
    i, j = locate(torch.arange(batch, device=device).unsqueeze(1), pos)
    return k_cache[i, j], v_cache[i, j]


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """FlashAttention-3's `flash_attn_combine`: merges split-KV partials. out_partial
    (num_splits, batch, seqlen, nheads, headdim) float32, each split normalized by its own row
    sum; lse_partial (num_splits, batch, seqlen, nheads) float32. Returns (out (batch, seqlen,
    nheads, headdim) in out_dtype, default float32, written into `out` when given; lse (batch,
    seqlen, nheads)). A row no split saw (every LSE -inf) gets 0 and -inf. Plain PyTorch ops, on
    any device."""
    for name, x in (("out_partial", out_partial), ("lse_partial", lse_partial)):
        _check_tensor(name, x)
        if x.dtype != torch.float32:
            _fail(TypeError, name, f"must have dtype torch.float32, got {x.dtype}")
    if out_partial.dim() != 5:
        _fail(ValueError, "out_partial", f"must be 5-D (num_splits, batch, seqlen, nheads, headdim), got shape "
                                         f"{tuple(out_partial.shape)}")
    if tuple(lse_partial.shape) != tuple(out_partial.shape[:4]):
        _fail(ValueError, "lse_partial", f"must have shape (num_splits, batch, seqlen, nheads) = "
                                         f"{tuple(out_partial.shape[:4])}, got {tuple(lse_partial.shape)}")
    out_dtype = out_dtype or torch.float32
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        _fail(TypeError, "out_dtype", f"must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
    lse = torch.logsumexp(lse_partial, dim=0)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    scale = torch.exp(lse_partial - finite)
    scale = torch.where(torch.isinf(lse_partial) & (lse_partial < 0), torch.zeros_like(scale), scale)
    result = (scale.unsqueeze(-1) * out_partial).sum(0)
    if out is not None:
        _check_tensor("out", out)
        if out.shape != result.shape or out.dtype != out_dtype:
            _fail(ValueError, "out", f"must be {tuple(result.shape)} of dtype {out_dtype}, got {tuple(out.shape)} "
                                     f"{out.dtype}")
        out.copy_(result)
        return out, lse
    return result.to(out_dtype), lse


def get_scheduler_metadata(
    batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
    cache_seqlens: torch.Tensor,
    qkv_dtype=torch.bfloat16,
    headdim_v=None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k_new: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    page_size: Optional[int] = None,
    max_seqlen_k_new=0,
    causal=False,
    window_size=(-1, -1),
    attention_chunk=0,
    has_softcap=False,
    num_splits=0,
    pack_gqa=None,
    sm_margin=0,
):
    """FlashAttention-3's `get_scheduler_metadata`. fa3py schedules inside its kernels, so the
    result is an empty int32 tensor on cache_seqlens' device; `flash_attn_with_kvcache` accepts it
    as `scheduler_metadata` and it never changes results."""
    _check_tensor("cache_seqlens", cache_seqlens)
    return torch.empty(0, dtype=torch.int32, device=cache_seqlens.device)
