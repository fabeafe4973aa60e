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
        s = torch.einsum("qhd,khd->hqk", qb, kb) * p.softmax_scale
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
