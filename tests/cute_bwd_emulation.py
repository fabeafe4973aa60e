"""The sm90 backward kernel (cute_kernels/bwd_sm90.py) emulated by torch ops on the CPU, for tests
of its host side (`cute_kernels.bwd_launch`: preprocess, the padded row layout, dQ's fragment
order, postprocess) and of the dispatch that routes autograd's backward there.

`emulated_bwd_launch` takes exactly what `bwd_launch.launch_kernel` hands the kernel and does what
the kernel's contract (bwd_sm90's module docstring) says, CTA by CTA as the kernel's grid runs:

  - one (key block of tile_n keys, KV head, batch) at a time; key blocks at or past the
    sequence's seqlen_k have no CTA; for each query head of the group and each query block of
    tile_m rows in `KeyBlockMask.m_block_range` (a transcription below), in order;
  - operands as the TMA loads see them: rows from the sequence's offset (cu_seqlens), rows past
    the tensor's end read as zeros, columns past the tensors' head dim as zeros (the kernel's
    padded head dim); LSE_log2 and dPsum of the block's tile_m rows from the padded per-head rows
    at `padded_offset(offset_q, batch, tile_m)` (packed queries) or row 0 (batched);
  - S^T = K Q^T (softcap: tanh(S^T * premul), d tanh rounded to fp16 where the kernel keeps it
    so, fp32 where it takes two passes: `softcap_two_pass`),
    the key mask on the last key block and the window masks (and with cfg.chunk the chunk's
    edges, at the C the host passes) only on the query blocks the kernel masks
    (`m_block_right_masked_end` / `m_block_left_masked_begin`, transcribed), no mask on query
    rows (the LSE_log2 of a padding row is +inf: P = 0),
    P^T = exp2(S^T * scale_log2 - LSE_log2), dS^T = P^T (dP^T - dPsum) (softcap: times d tanh),
    P and dS rounded to the input dtype before their GEMMs (fp32 accumulation);
  - dV += P^T dO, dK += dS^T Q summed over the group's heads; dK * softmax_scale and dV written
    in the tensors' dtype for keys before seqlen_k (other rows untouched);
  - dQ = dS K of each (head, query block) ADDED into its tile_m x hdim chunk of the float32
    accumulator in the consumer threads' order (the inverse of `dq_fragment_order`), unscaled;
  - deterministic: the semaphore protocol of the dQ warp (`_count_key_block`: each add waits for
    its query block to count the key block's index; blocks past a left window or chunk counted
    without adding), asserted in the grid's key-block order.

Nothing here calls the reference: the gradients only come out right if the host's layouts are.
"""

from __future__ import annotations

import math

import pytest
import torch

from cute_kernels import bwd_launch
from cute_kernels.bwd_sm90 import padded_offset


# ----------------------------------------------------------------------------- KeyBlockMask, transcribed
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def chunk_rows(key, chunk, diag):
    """KeyBlockMask.chunk_rows_begin: [first, end) of the query rows whose chunk holds `key`."""
    first = key // chunk * chunk - diag
    return first, first + chunk


def _key_rows(key, diag, wl, wr, has_left, has_right, chunk):
    """KeyBlockMask.lowest_row / rows_end: [first, end) of the query rows that keep `key` (None
    for a side no bound limits)."""
    firsts = ([key - diag - wr] if has_right else []) + ([chunk_rows(key, chunk, diag)[0]] if chunk else [])
    ends = ([key - diag + wl + 1] if has_left else []) + ([chunk_rows(key, chunk, diag)[1]] if chunk else [])
    return (max(firsts) if firsts else None), (min(ends) if ends else None)


def _last_key(tile_n, n_block, seqlen_k, chunk):
    """KeyBlockMask.last_key: the last key before seqlen_k with a chunk, else the block's end."""
    return min((n_block + 1) * tile_n, seqlen_k) - 1 if chunk else (n_block + 1) * tile_n - 1


def m_block_range(tile_m, tile_n, n_block, seqlen_q, seqlen_k, wl, wr, has_left, has_right, chunk):
    """KeyBlockMask.m_block_range: [m_block_min, m_block_max) of the query blocks that keep a key
    of block n_block (its arguments are non-negative where it divides, as in the kernel); chunk:
    C, or 0 for a kernel without the chunk bound."""
    diag = seqlen_k - seqlen_q
    first_key, last_key = n_block * tile_n, _last_key(tile_n, n_block, seqlen_k, chunk)
    lowest = _key_rows(first_key, diag, wl, wr, has_left, has_right, chunk)[0]
    end = _key_rows(last_key, diag, wl, wr, has_left, has_right, chunk)[1]
    m_min = 0 if lowest is None else max(lowest, 0) // tile_m
    m_max = _ceil_div(seqlen_q, tile_m)
    if end is not None:
        m_max = min(m_max, _ceil_div(max(end, 0), tile_m))
    return m_min, m_max


def masked_block_bounds(tile_m, tile_n, n_block, seqlen_q, seqlen_k, wl, wr, has_left, has_right, chunk,
                        m_min, m_max):
    """(m_block_right_masked_end, m_block_left_masked_begin) of KeyBlockMask."""
    diag = seqlen_k - seqlen_q
    first_key, last_key = n_block * tile_n, _last_key(tile_n, n_block, seqlen_k, chunk)
    lowest = _key_rows(last_key, diag, wl, wr, has_left, has_right, chunk)[0]
    end = _key_rows(first_key, diag, wl, wr, has_left, has_right, chunk)[1]
    right_end = m_min if lowest is None else max(m_min, min(_ceil_div(max(lowest, 0), tile_m), m_max))
    left_begin = m_max if end is None else max(right_end, min(max(end, 0) // tile_m, m_max))
    return right_end, left_begin


# ----------------------------------------------------------------------------- the kernel's view
def _rows(x: torch.Tensor, start: int, n: int, head: int) -> torch.Tensor:
    """n rows of `head` from row `start` of x (rows, heads, d), as a TMA box: zeros past the end."""
    out = torch.zeros(n, x.shape[-1], dtype=x.dtype)
    stop = min(start + n, x.shape[0])
    if stop > start:
        out[:stop - start] = x[start:stop, head]
    return out


def _sequence(b, cu, used, static_len):
    """SeqlenInfo: (offset, length) of sequence b; seqused wins over cu_seqlens."""
    offset = int(cu[b]) if cu is not None else 0
    if used is not None:
        return offset, int(used[b])
    if cu is not None:
        return offset, int(cu[b + 1]) - offset
    return offset, static_len


def _check_args(req, cfg, q, k, v, do, dk, dv, lse2, dpsum, dq_acc, sem, splits):
    """What the compiled kernel assumes of its arguments (bwd_sm90's fake_args and TMA)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("do", do), ("dk", dk), ("dv", dv)):
        per16 = 16 // t.element_size()
        want = torch.float32 if cfg.dkv_partial and name in ("dk", "dv") else req.dtype
        assert t.dtype == want, f"{name}: dtype {t.dtype}, the kernel's is {want}"
        assert t.stride(-1) == 1 and all(s % per16 == 0 for s in t.stride()[:-1]), f"{name}: strides {t.stride()}"
    assert do.shape == (*q.shape[:-1], v.shape[-1])
    heads_kv = k.shape[-2] * splits if cfg.dkv_partial else k.shape[-2]
    assert dk.shape == (*k.shape[:-2], heads_kv, k.shape[-1]) and dv.shape == (*v.shape[:-2], heads_kv, v.shape[-1])
    assert splits >= 1 and (q.shape[-2] // k.shape[-2]) % splits == 0 and (splits == 1 or cfg.dkv_partial)
    if cfg.deterministic:
        blocks = lse2.shape[-1] // cfg.tile_m
        assert sem is not None and sem.dtype == torch.int32 and sem.shape == (*lse2.shape[:-1], blocks)
        assert (sem == 0).all(), "the semaphores start at zero"
    else:
        assert sem is None
    lead = (q.shape[-2],) if req.packed_q else (q.shape[0], q.shape[-2])
    for name, t in (("lse2", lse2), ("dpsum", dpsum), ("dq_acc", dq_acc)):
        assert t.dtype == torch.float32 and t.is_contiguous(), f"{name}: {t.dtype}, strides {t.stride()}"
        assert t.shape[:-1] == lead, f"{name}: shape {tuple(t.shape)}, leading dims must be {lead}"
    assert lse2.shape == dpsum.shape and lse2.shape[-1] % cfg.tile_m == 0
    assert dq_acc.shape[-1] == lse2.shape[-1] * cfg.hdim


def _count_key_block(sem, head, block0, m_block, n_block):
    """deterministic: key block n_block adds into query block m_block once its semaphore counts
    n_block (every lower key block done with it: the kernel's dQ warp spins until then, so a
    wrong count is a hang or a reordered sum there; run in the grid's key-block order here,
    it is an assertion), then counts itself."""
    count = int(sem[head, block0 + m_block])
    assert count == n_block, \
        f"deterministic: key block {n_block} waits on query block {m_block} (head {head}) counting {count}"
    sem[head, block0 + m_block] += 1


def emulated_bwd_launch(req, cfg, q, k, v, do, dk, dv, lse2, dpsum, dq_acc, sem=None, splits=1):
    """`bwd_launch.launch_kernel` by torch ops on the CPU (see the module docstring). With
    cfg.dkv_partial, split s of KV head h walks query heads h * group + s * group / splits ...
    and writes float32 dK / dV at head h * splits + s."""
    _check_args(req, cfg, q, k, v, do, dk, dv, lse2, dpsum, dq_acc, sem, splits)
    scale_log2, premul, softmax_scale, wl, wr, attention_chunk, max_seqlen_k = bwd_launch.kernel_scalars(req)
    chunk = attention_chunk if cfg.chunk else 0  # (a kernel without cfg.chunk never reads it)
    assert not cfg.chunk or chunk > 0, "a chunked kernel needs C > 0"
    cu_q, cu_k, used_q, used_k = bwd_launch.sequence_tensors(req)
    tm, tn, hd = cfg.tile_m, cfg.tile_n, cfg.hdim
    # softcap's d tanh: fp16 beside S^T and dP^T, or fp32 where the kernel takes two passes
    from cute_kernels.bwd_sm90 import FlashAttentionBackwardSm90

    dtanh_fp16 = not FlashAttentionBackwardSm90(cfg).softcap_two_pass
    dt = q.dtype
    h, hk = q.shape[-2], k.shape[-2]
    group = h // hk
    # value i of a chunk holds dQ's element inverse[i] (row * hdim + column)
    order = bwd_launch.dq_fragment_order(tm, hd, "cpu", cfg.num_mma_wg)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    pad = lambda x: torch.nn.functional.pad(x.float(), (0, hd - x.shape[-1]))  # TMA: zero columns
    qf, kf, vf, dof = (pad(x) for x in (q, k, v, do))
    batch = q.shape[0] if cu_q is None else cu_q.shape[0] - 1
    rows_pad = lse2.shape[-1]
    for b in range(batch):
        offset_q, seqlen_q = _sequence(b, cu_q, used_q, q.shape[1] if cu_q is None else None)
        offset_k, seqlen_k = _sequence(b, cu_k, used_k, k.shape[1] if cu_k is None else None)
        qb, dob = (x if cu_q is not None else x[b] for x in (qf, dof))
        kb, vb = (x if cu_k is not None else x[b] for x in (kf, vf))
        dkb, dvb = (x if cu_k is not None else x[b] for x in (dk, dv))
        lse_b, dpsum_b, dq_b = (x if cu_q is not None else x[b] for x in (lse2, dpsum, dq_acc))
        sem_b = None if sem is None else sem if cu_q is not None else sem[b]
        row_offset = padded_offset(offset_q, b, tm) if cu_q is not None else 0
        diag = seqlen_k - seqlen_q
        for n_block in range(_ceil_div(max_seqlen_k, tn)):
            if n_block * tn >= seqlen_k:
                continue
            bounds = (tm, tn, n_block, seqlen_q, seqlen_k, wl, wr, cfg.has_left, cfg.has_right, chunk)
            m_min, m_max = m_block_range(*bounds)
            right_end, left_begin = masked_block_bounds(*bounds, m_min, m_max)
            key = n_block * tn + torch.arange(tn)[:, None]
            per_split = group // splits
            for kv_split in range(hk * splits):
                head_kv, split = divmod(kv_split, splits)
                out_head = kv_split if cfg.dkv_partial else head_kv
                K, V = (_rows(x, offset_k + n_block * tn, tn, head_kv) for x in (kb, vb))
                acc_dk = torch.zeros(tn, hd)
                acc_dv = torch.zeros(tn, hd)
                first = head_kv * group + split * per_split
                for head in range(first, first + per_split):
                    for m_block in range(m_min, m_max):
                        r0 = m_block * tm
                        Q, dO = (_rows(x, offset_q + r0, tm, head) for x in (qb, dob))
                        assert row_offset + r0 + tm <= rows_pad, \
                            f"query block {m_block} of sequence {b} reads padded rows past the {rows_pad} allocated"
                        lse = lse_b[head, row_offset + r0:row_offset + r0 + tm]
                        dps = dpsum_b[head, row_offset + r0:row_offset + r0 + tm]
                        St = K @ Q.t()  # S^T: keys x queries
                        dPt = V @ dO.t()
                        if cfg.softcap:
                            St = torch.tanh(St * premul)
                            dtanh = 1.0 - St * St
                            if dtanh_fp16:
                                dtanh = dtanh.half().float()
                        row = r0 + torch.arange(tm)[None, :]
                        drop = ((key >= seqlen_k) & ((n_block + 1) * tn > seqlen_k)).expand(tn, tm).clone()
                        right_masked = m_block < right_end
                        left_masked = m_block < right_end or m_block >= left_begin
                        if cfg.has_right and right_masked:
                            drop |= row < key - diag - wr
                        if cfg.has_left and left_masked:
                            drop |= row > key - diag + wl
                        if chunk:
                            first, end = chunk_rows(key, chunk, diag)
                            drop |= (right_masked & (row < first)) | (left_masked & (row >= end))
                        St = St.masked_fill(drop, -math.inf)
                        Pt = torch.exp2(St * scale_log2 - lse[None, :])
                        dSt = Pt * (dPt - dps[None, :])
                        if cfg.softcap:
                            dSt = dSt * dtanh
                        rP, rdS = Pt.to(dt).float(), dSt.to(dt).float()
                        acc_dv += rP @ dO
                        acc_dk += rdS @ Q
                        dQ = rdS.t() @ K  # tile_m x hdim, unscaled
                        start = (row_offset + r0) * hd
                        dq_b[head, start:start + tm * hd] += dQ.reshape(-1)[inverse]
                        if sem_b is not None:
                            _count_key_block(sem_b, head, row_offset // tm, m_block, n_block)
                    if sem_b is not None and (cfg.has_left or cfg.chunk):
                        # key blocks left of every key a query block sees count without adding
                        for m_block in range(m_max, _ceil_div(seqlen_q, tm)):
                            sem_b[head, row_offset // tm + m_block] += 1
                n = min(tn, seqlen_k - n_block * tn)
                k0 = offset_k + n_block * tn
                d, dv_cols = dk.shape[-1], dv.shape[-1]
                dkb[k0:k0 + n, out_head] = (acc_dk[:n, :d] * softmax_scale).to(dk.dtype)
                dvb[k0:k0 + n, out_head] = acc_dv[:n, :dv_cols].to(dv.dtype)


@pytest.fixture
def emulated_sm90_bwd(emulated_sm90, monkeypatch):
    """`emulated_sm90` with the cute backward enabled and its kernel emulated: autograd's backward
    of what the cute backward serves runs bwd_launch's host code around `emulated_bwd_launch`.
    Returns the list of the requests the emulated kernel ran for."""
    calls = []

    def launch(req, *args):
        calls.append(req)
        return emulated_bwd_launch(req, *args)

    monkeypatch.setattr(bwd_launch, "enabled", True)
    monkeypatch.setattr(bwd_launch, "chunk_enabled", True)
    monkeypatch.setattr(bwd_launch, "launch_kernel", launch)
    return calls
