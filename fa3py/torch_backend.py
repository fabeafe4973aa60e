"""The PyTorch backend: blockwise attention with an online softmax, forward and backward.

Runs anywhere PyTorch runs (CPU, any CUDA GPU) and serves every request. Work is done in
float32 over (query block x key block) tiles, so memory grows with the sequence length,
never with its square: a 32k-token call never allocates a 32k x 32k score matrix. Key
blocks that the causal mask or a window hides are skipped; masks are built only for tiles
that straddle a mask boundary.
"""

from __future__ import annotations

import torch

from . import fp8 as fp8_emulation
from .request import AttentionRequest

BLOCK_Q = 512
BLOCK_K = 512


def why_not(req: AttentionRequest, backward: bool) -> str | None:
    if req.paged:  # flash_attn_with_kvcache gathers the pages for this backend
        return "paged K / V (page_table) are read only by the cute kernel; gather the pages first"
    return None  # serves every request the validation admits


# ---- per-sequence views ----------------------------------------------------------------


def _sequences(req: AttentionRequest):
    """Yields (b, q_rows, k_rows, Lq, Lk): row slices of sequence b in q and in k/v."""
    len_q, len_k = req.seqlens()
    start_q, start_k = req.offsets()
    for b in range(req.batch):
        lq, lk = int(len_q[b]), int(len_k[b])
        q_rows = (slice(int(start_q[b]), int(start_q[b]) + lq),) if req.packed_q else (b, slice(0, lq))
        k_rows = (slice(int(start_k[b]), int(start_k[b]) + lk),) if req.packed_k else (b, slice(0, lk))
        yield b, q_rows, k_rows, lq, lk


def _heads_first(x, nheads_kv):
    """(L, H, D) -> (H_kv, group, L, D) in float32; K/V (group 1) broadcast over the group."""
    L, H, D = x.shape
    return x.float().reshape(L, nheads_kv, H // nheads_kv, D).permute(1, 2, 0, 3)


def _rows_first(x):
    """(H_kv, group, L, D) -> (L, H, D)."""
    hk, g, L, D = x.shape
    return x.permute(2, 0, 1, 3).reshape(L, hk * g, D)


def _dequantized(req: AttentionRequest, b, q, k, v):
    if req.q_descale is None and req.k_descale is None and req.v_descale is None:
        return q, k, v
    group = req.nheads // req.nheads_kv

    def scale(x, d, rep):
        if d is None:
            return x.float()
        return x.float() * d[b].repeat_interleave(rep).view(1, -1, 1)

    return scale(q, req.q_descale, group), scale(k, req.k_descale, 1), scale(v, req.v_descale, 1)


# ---- tiles -------------------------------------------------------------------------------


class _Tiles:
    """Score tiles of one sequence: key range per query block, masks on boundary tiles."""

    def __init__(self, req: AttentionRequest, lq: int, lk: int):
        p = req.params
        self.lq, self.lk, self.left, self.right = lq, lk, p.window_left, p.window_right
        self.chunk = p.attention_chunk
        self.scale, self.softcap = p.softmax_scale, p.softcap

    def chunk_start(self, i):
        """First key of the chunk that query row i (its diagonal position) lies in."""
        pos = i + self.lk - self.lq
        return pos - pos % self.chunk  # floor, for a negative diagonal too

    def key_range(self, i0, i1):
        shift = self.lk - self.lq
        lo = max(0, i0 + shift - self.left) if self.left >= 0 else 0
        hi = min(self.lk, i1 - 1 + shift + self.right + 1) if self.right >= 0 else self.lk
        if self.chunk > 0:
            lo = max(lo, self.chunk_start(i0))
            hi = min(hi, self.chunk_start(i1 - 1) + self.chunk)
        return lo, hi

    def mask(self, i0, i1, j0, j1, device):
        """Boolean (i1-i0, j1-j0) keep-mask, or None when the whole tile is kept."""
        shift = self.lk - self.lq
        full = (self.left < 0 or j0 >= (i1 - 1) + shift - self.left) and (
            self.right < 0 or j1 - 1 <= i0 + shift + self.right
        ) and (self.chunk <= 0 or (j0 >= self.chunk_start(i1 - 1) and j1 <= self.chunk_start(i0) + self.chunk))
        if full:
            return None
        i = torch.arange(i0, i1, device=device).unsqueeze(1) + shift
        j = torch.arange(j0, j1, device=device).unsqueeze(0)
        keep = torch.ones(i1 - i0, j1 - j0, dtype=torch.bool, device=device)
        if self.left >= 0:
            keep &= j >= i - self.left
        if self.right >= 0:
            keep &= j <= i + self.right
        if self.chunk > 0:
            start = i - i % self.chunk
            keep &= (j >= start) & (j < start + self.chunk)
        return keep

    def scores(self, q, k, qv=None, v=None):
        """Returns (s, tanh) with s the (softcapped) scores; tanh is kept for the backward.
        With qv (MLA) the scores gain qv . v."""
        s = torch.matmul(q, k.transpose(-1, -2))
        if qv is not None:
            s = s + torch.matmul(qv, v.transpose(-1, -2))
        s = s * self.scale
        if self.softcap > 0:
            t = torch.tanh(s / self.softcap)
            return t * self.softcap, t
        return s, None


# ---- forward -------------------------------------------------------------------------------


def forward(req: AttentionRequest):
    if req.params.fp8 or req.fp8_tensors is not None:
        return fp8_emulation.forward(req)
    out = torch.zeros(req.out_shape, dtype=req.out_dtype, device=req.device)
    lse = torch.full(req.lse_shape, float("-inf"), dtype=torch.float32, device=req.device)
    q_all, k_all, v_all = req.q, req.k, req.v
    hk = req.nheads_kv
    for b, q_rows, k_rows, lq, lk in _sequences(req):
        if lq == 0:
            continue
        qb, kb, vb = _dequantized(req, b, q_all[q_rows], k_all[k_rows], v_all[k_rows])
        q, k, v = _heads_first(qb, hk), _heads_first(kb, hk), _heads_first(vb, hk)
        qv = None if req.qv is None else _heads_first(req.qv[q_rows], hk)
        tiles = _Tiles(req, lq, lk)
        o_seq = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=q.device)
        lse_seq = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        for i0 in range(0, lq, BLOCK_Q):
            i1 = min(i0 + BLOCK_Q, lq)
            qv_i = None if qv is None else qv[:, :, i0:i1]
            o_seq[:, :, i0:i1], lse_seq[:, :, i0:i1] = _forward_query_block(tiles, q[:, :, i0:i1], k, v, i0, i1, qv_i)
        out[q_rows] = _rows_first(o_seq).to(req.out_dtype)
        lse_rows = lse_seq.reshape(req.nheads, lq)
        if req.packed_q:
            lse[:, q_rows[0]] = lse_rows
        else:
            lse[b, :, :lq] = lse_rows
    return out, lse


def _forward_query_block(tiles: _Tiles, q, k, v, i0, i1, qv=None):
    """Online softmax over the key blocks that the mask lets this query block see."""
    shape = q.shape[:3]
    row_max = torch.full(shape, float("-inf"), device=q.device)
    row_sum = torch.zeros(shape, device=q.device)
    acc = torch.zeros(*shape, v.shape[-1], device=q.device)
    lo, hi = tiles.key_range(i0, i1)
    for j0 in range(lo, hi, BLOCK_K):
        j1 = min(j0 + BLOCK_K, hi)
        s, _ = tiles.scores(q, k[:, :, j0:j1], qv, v[:, :, j0:j1])
        keep = tiles.mask(i0, i1, j0, j1, q.device)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        new_max = torch.maximum(row_max, s.amax(dim=-1))
        safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        p = torch.exp(s - safe_max.unsqueeze(-1))
        correction = torch.exp(row_max - safe_max)
        row_sum = row_sum * correction + p.sum(dim=-1)
        acc = acc * correction.unsqueeze(-1) + torch.matmul(p, v[:, :, j0:j1])
        row_max = new_max
    has_keys = row_sum != 0  # NaN (a NaN or inf score) stays NaN in out and lse, as in SDPA
    out = acc / torch.where(has_keys, row_sum, torch.ones_like(row_sum)).unsqueeze(-1)
    safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    lse = torch.where(has_keys, safe_max + torch.log(row_sum), torch.full_like(row_sum, float("-inf")))
    return out, lse


# ---- backward ------------------------------------------------------------------------------


def backward(req: AttentionRequest, out, lse, dout):
    """FlashAttention-2 style backward from the saved (out, lse): recompute P tile by tile.
    (Requests with qv have no backward: `fa3py.dispatch.backward_request` raises first.)"""
    dq = torch.zeros_like(req.q, dtype=torch.float32)
    dk = torch.zeros_like(req.k, dtype=torch.float32)
    dv = torch.zeros_like(req.v, dtype=torch.float32)
    hk = req.nheads_kv
    for b, q_rows, k_rows, lq, lk in _sequences(req):
        if lq == 0 or lk == 0:
            continue
        q, k, v = (_heads_first(x, hk) for x in (req.q[q_rows], req.k[k_rows], req.v[k_rows]))
        o, do = _heads_first(out[q_rows], hk), _heads_first(dout[q_rows], hk)
        lse_b = lse[:, q_rows[0]] if req.packed_q else lse[b, :, :lq]
        lse_b = lse_b.reshape(hk, -1, lq).float()
        lse_b = torch.where(torch.isfinite(lse_b), lse_b, torch.full_like(lse_b, float("inf")))
        delta = (o * do).sum(dim=-1)  # rowsum(dO * O)
        tiles = _Tiles(req, lq, lk)
        dq_s, dk_s, dv_s = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for i0 in range(0, lq, BLOCK_Q):
            i1 = min(i0 + BLOCK_Q, lq)
            lo, hi = tiles.key_range(i0, i1)
            qi, doi = q[:, :, i0:i1], do[:, :, i0:i1]
            for j0 in range(lo, hi, BLOCK_K):
                j1 = min(j0 + BLOCK_K, hi)
                kj, vj = k[:, :, j0:j1], v[:, :, j0:j1]
                s, t = tiles.scores(qi, kj)
                p = torch.exp(s - lse_b[:, :, i0:i1].unsqueeze(-1))
                keep = tiles.mask(i0, i1, j0, j1, q.device)
                if keep is not None:
                    p = p.masked_fill(~keep, 0.0)
                dv_s[:, :, j0:j1] += torch.einsum("hgqk,hgqd->hkd", p, doi).unsqueeze(1)
                ds = p * (torch.matmul(doi, vj.transpose(-1, -2)) - delta[:, :, i0:i1].unsqueeze(-1))
                if t is not None:
                    ds = ds * (1 - t * t)  # d/ds of softcap * tanh(s / softcap)
                ds = ds * tiles.scale
                dq_s[:, :, i0:i1] += torch.matmul(ds, kj)
                dk_s[:, :, j0:j1] += torch.einsum("hgqk,hgqd->hkd", ds, qi).unsqueeze(1)
        dq[q_rows] = _rows_first(dq_s)
        dk[k_rows] = _rows_first(dk_s)
        dv[k_rows] = _rows_first(dv_s)
    return dq.to(req.q.dtype), dk.to(req.k.dtype), dv.to(req.v.dtype)
