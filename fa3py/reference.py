"""Exact attention in float64 (or float32): the yardstick for every backend and test.

Supports every feature of `fa3py.request` (causal, windows, chunked attention, softcap, GQA, varlen, seqused,
float8 descales, headdim_v != headdim, LSE). It materializes the full score matrix per
sequence, so it is for tests and spot checks, not for long sequences.
"""

from __future__ import annotations

import torch

from .request import AttentionRequest


def keep_mask(len_q: int, len_k: int, window_left: int, window_right: int, device=None,
              attention_chunk: int = 0):
    """Boolean (len_q, len_k) mask of kept (query, key) pairs, bottom-right aligned."""
    i = torch.arange(len_q, device=device).unsqueeze(1)
    j = torch.arange(len_k, device=device).unsqueeze(0)
    diag = i + (len_k - len_q)
    keep = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        keep &= j >= diag - window_left
    if window_right >= 0:
        keep &= j <= diag + window_right
    if attention_chunk > 0:  # the key lies in the chunk of the query's diagonal position
        start = torch.div(diag, attention_chunk, rounding_mode="floor") * attention_chunk
        keep &= (j >= start) & (j < start + attention_chunk)
    return keep


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor):
    """Softmax over the last dim restricted to `keep`; rows with nothing kept give p = 0 and
    lse = -inf. Differentiable (no NaN leaks into gradients)."""
    if scores.shape[-1] == 0:  # no keys at all
        return scores, torch.full(scores.shape[:-1], float("-inf"), dtype=scores.dtype, device=scores.device)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    masked = torch.where(keep, scores, neg_inf)
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(masked - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return p, lse


def _dequant(x, descale, b, group):
    """x: (L, H, D) slice of sequence b; descale: (batch, nheads_kv) or None."""
    if descale is None:
        return x
    s = descale[b].to(x.dtype)  # (nheads_kv,)
    if group > 1:
        s = s.repeat_interleave(group)
    return x * s.view(1, -1, 1)


def attention(req: AttentionRequest, dtype: torch.dtype = torch.float64, q=None, k=None, v=None):
    """Returns (out, lse) in `dtype`, shaped as `req.out_shape` / `req.lse_shape`.

    Pass q, k, v (e.g. upcast leaves that require grad) to differentiate through it;
    by default the request's own tensors are upcast.
    """
    p = req.params
    qv = None if req.qv is None else req.qv.to(dtype)
    q = (req.q if q is None else q).to(dtype)
    k = (req.k if k is None else k).to(dtype)
    v = (req.v if v is None else v).to(dtype)
    group = req.nheads // req.nheads_kv
    len_q, len_k = req.seqlens()
    start_q, start_k = req.offsets()
    out = torch.zeros(req.out_shape, dtype=dtype, device=q.device)
    lse = torch.full(req.lse_shape, float("-inf"), dtype=dtype, device=q.device)
    outs, lses = [], []
    for b in range(req.batch):
        lq, lk = int(len_q[b]), int(len_k[b])
        qb = q[start_q[b] : start_q[b] + lq] if req.packed_q else q[b, :lq]
        kb = k[start_k[b] : start_k[b] + lk] if req.packed_k else k[b, :lk]
        vb = v[start_k[b] : start_k[b] + lk] if req.packed_k else v[b, :lk]
        qb = _dequant(qb, req.q_descale, b, group)
        kb = _dequant(kb, req.k_descale, b, 1)
        vb = _dequant(vb, req.v_descale, b, 1)
        kb = kb.repeat_interleave(group, dim=1)
        vb = vb.repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", qb, kb)
        if qv is not None:
            qvb = qv[start_q[b] : start_q[b] + lq] if req.packed_q else qv[b, :lq]
            s = s + torch.einsum("qhd,khd->hqk", qvb, vb)
        s = s * p.softmax_scale
        if p.softcap > 0:
            s = p.softcap * torch.tanh(s / p.softcap)
        keep = keep_mask(lq, lk, p.window_left, p.window_right, device=q.device,
                         attention_chunk=p.attention_chunk)
        prob, lse_b = masked_softmax(s, keep)
        outs.append(torch.einsum("hqk,khd->qhd", prob, vb))
        lses.append(lse_b)
    # Scatter into padded outputs without in-place ops on tensors that need grad.
    for b in range(req.batch):
        lq = int(len_q[b])
        if req.packed_q:
            s0 = int(start_q[b])
            out = torch.cat([out[:s0], outs[b], out[s0 + lq :]], dim=0)
            lse = torch.cat([lse[:, :s0], lses[b], lse[:, s0 + lq :]], dim=1)
        else:
            ob = torch.cat([outs[b], out[b, lq:]], dim=0)
            lb = torch.cat([lses[b], lse[b, :, lq:]], dim=1)
            out = torch.cat([out[:b], ob.unsqueeze(0), out[b + 1 :]], dim=0)
            lse = torch.cat([lse[:b], lb.unsqueeze(0), lse[b + 1 :]], dim=0)
    return out, lse


# ---- flash_attn_with_kvcache ------------------------------------------------------------


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions, interleaved: bool):
    """Rotary embedding of x (L, H, D) at integer `positions` (L,), in x's dtype: the first
    rotary_dim = 2 * cos.shape[1] dims rotate, pairs (2i, 2i + 1) when interleaved, else
    (i, i + rotary_dim / 2) (GPT-NeoX); the rest pass through."""
    half = cos.shape[1]
    out = x.clone()
    for n, pos in enumerate(positions):
        c, s = cos[int(pos)].to(x.dtype), sin[int(pos)].to(x.dtype)
        idx = torch.arange(half)
        a, b = (2 * idx, 2 * idx + 1) if interleaved else (idx, idx + half)
        x1, x2 = x[n][:, a], x[n][:, b]
        out[n][:, a] = x1 * c - x2 * s
        out[n][:, b] = x1 * s + x2 * c
    return out


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, cache_batch_idx=None,
                           cache_leftpad=None, page_table=None, cu_seqlens_q=None, cu_seqlens_k_new=None,
                           rotary_cos=None, rotary_sin=None, rotary_seqlens=None, rotary_interleaved=True,
                           q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                           window_size=(-1, -1), attention_chunk=0, softcap=0.0, qv=None, dtype=torch.float64):
    """FlashAttention-3's `flash_attn_with_kvcache`, one sequence at a time with plain loops: the
    new k (rotated) and v are written at cache positions cache_seqlens[b] + t of cache row
    cache_batch_idx[b] (through page_table when paged); sequence b then attends to the cache
    positions [cache_leftpad[b], cache_seqlens[b] + new_b), bottom-right aligned. q is rotated
    at rotary_seqlens[b] + t when causal or local, else every token at rotary_seqlens[b].

    Returns (out, lse, k_cache_after, v_cache_after): out and lse in `dtype`, shaped as the
    function returns them; the caches in their own dtype (new copies; the inputs are kept)."""
    from .validation import make_request

    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    packed_q = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if packed_q else q.shape[0]
    cpu = lambda t: None if t is None else t.to("cpu", torch.int64).tolist()  # noqa: E731
    cu_q, cu_new, rows = cpu(cu_seqlens_q), cpu(cu_seqlens_k_new), cpu(cache_batch_idx) or list(range(batch))
    pages = cpu(page_table)
    page_size = k_cache.shape[1]
    if isinstance(cache_seqlens, int):
        cache_seqlens = [cache_seqlens] * batch
    cap = page_size * page_table.shape[1] if page_table is not None else k_cache.shape[1]
    seqlens = cpu(cache_seqlens) if not isinstance(cache_seqlens, list) else cache_seqlens
    if seqlens is None:
        seqlens = [cap] * batch
    leftpad = cpu(cache_leftpad) or [0] * batch
    ro_lens = cpu(rotary_seqlens) if rotary_seqlens is not None else seqlens
    # FA3 drops a window side that covers the whole cache / query before deciding "local"
    max_q = q.shape[1] if not packed_q else max(cu_q[b + 1] - cu_q[b] for b in range(batch))
    local = ((0 <= window_size[0] < cap - 1) or (0 <= window_size[1] < max_q - 1) or attention_chunk > 0)
    sequential = causal or local

    def slot(b, pos):  # (cache index, row index) of position pos of sequence b
        if pages is None:
            return rows[b], pos
        return pages[rows[b]][pos // page_size], pos % page_size

    outs, lses = [], []
    for b in range(batch):
        qb = q[cu_q[b]:cu_q[b + 1]] if packed_q else q[b]
        qvb = None if qv is None else (qv[cu_q[b]:cu_q[b + 1]] if packed_q else qv[b]).unsqueeze(0)
        if k is not None:
            kb = k[cu_new[b]:cu_new[b + 1]] if cu_new is not None else k[b]
            vb = v[cu_new[b]:cu_new[b + 1]] if cu_new is not None else v[b]
            if rotary_cos is not None:
                kb = rotary(kb.double(), rotary_cos.double(), rotary_sin.double(),
                            [ro_lens[b] + t for t in range(kb.shape[0])], rotary_interleaved).to(k.dtype)
            for t in range(kb.shape[0]):
                i, j = slot(b, seqlens[b] + t)
                k_cache[i, j], v_cache[i, j] = kb[t], vb[t]
            new = kb.shape[0]
        else:
            new = 0
        if rotary_cos is not None:
            pos = [ro_lens[b] + (t if sequential else 0) for t in range(qb.shape[0])]
            qb = rotary(qb.double(), rotary_cos.double(), rotary_sin.double(), pos, rotary_interleaved).to(q.dtype)
        end = seqlens[b] + new
        keys = [slot(b, p) for p in range(leftpad[b], end)]
        kb = torch.stack([k_cache[i, j] for i, j in keys]) if keys else k_cache.new_zeros(0, *k_cache.shape[2:])
        vb = torch.stack([v_cache[i, j] for i, j in keys]) if keys else v_cache.new_zeros(0, *v_cache.shape[2:])
        descales = {n: None if d is None else d[b:b + 1] for n, d in
                    (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale))}
        req = make_request(qb.unsqueeze(0), kb.unsqueeze(0), vb.unsqueeze(0), softmax_scale=softmax_scale,
                           causal=causal, window_size=window_size, attention_chunk=attention_chunk,
                           softcap=softcap, qv=qvb, **descales)
        o, lse = attention(req, dtype)
        outs.append(o[0])
        lses.append(lse[0])
    if packed_q:
        return torch.cat(outs), torch.cat(lses, dim=1), k_cache, v_cache
    return torch.stack(outs), torch.stack(lses), k_cache, v_cache
