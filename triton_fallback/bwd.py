"""Backward kernels (FlashAttention-2).

1. `attn_bwd_preprocess`: delta = rowsum(dO * O), the LSE in the log2 domain with +inf for
   rows that must contribute nothing (no kept key, padding), so P = exp2(s - lse2) = 0, and
   (default path) zeros in the float32 dQ accumulator.
2. `attn_bwd`: one program per (key block, head or KV head, batch) over the query blocks that
   see its keys. Per tile pair: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q and,
   with ATOMIC_DQ, dQ += dS K with `tl.atomic_add` into the float32 accumulator: five
   matmuls. A program covers `heads_per_program` query heads of one GQA group, in a fixed
   order: the whole group (dK/dV stored directly), or one head (dK/dV stored as float32
   partials per query head, summed by the host).
3. Default: `attn_bwd_dq_epilogue` scales and casts the accumulator into dQ.
   Deterministic (no atomics, bitwise reproducible): `attn_bwd` without ATOMIC_DQ, then
   `attn_bwd_dq`, one program per (query block, head, batch) that recomputes S and dP (seven
   matmuls per tile pair in all).
"""

import triton
import triton.language as tl

from .common import (
    LOG2E, cast, dot, keep_mask, key_block_range, load_tile, query_block, query_block_range, score_scales,
    scores_log2, seq_info, tile_ptrs,
)


@triton.jit
def attn_bwd_preprocess(
    O, DO, LSE, LSE2, DELTA, DQ_ACC, CU_SEQLENS_Q, SEQUSED_Q,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, stride_lm, stride_ab, stride_ah, stride_dqb, stride_dqs, stride_dqh, seqlen_q,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PACKED_Q: tl.constexpr, HAS_SEQUSED_Q: tl.constexpr,
    ZERO_DQ_ACC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, _ = seq_info(b, CU_SEQLENS_Q, SEQUSED_Q, seqlen_q, PACKED_Q, HAS_SEQUSED_Q)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = q_start + offs_m
    EVEN_DV: tl.constexpr = HEADDIM_V == BLOCK_DV
    o = load_tile(tile_ptrs(O, b, stride_ob, h, stride_oh, rows, stride_os, offs_dv),
                  offs_m, offs_dv, q_len, HEADDIM_V, False, EVEN_DV)
    do = load_tile(tile_ptrs(DO, b, stride_dob, h, stride_doh, rows, stride_dos, offs_dv),
                   offs_m, offs_dv, q_len, HEADDIM_V, False, EVEN_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    b64 = b.to(tl.int64)
    lse = tl.load(LSE + b64 * stride_lb + h * stride_lh + rows * stride_lm, mask=offs_m < q_len,
                  other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    aux = b64 * stride_ab + h * stride_ah + offs_m
    tl.store(LSE2 + aux, lse2)
    tl.store(DELTA + aux, delta)
    if ZERO_DQ_ACC:  # the rows that `attn_bwd` accumulates into and the epilogue reads
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(tile_ptrs(DQ_ACC, b, stride_dqb, h, stride_dqh, rows, stride_dqs, offs_d),
                 tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                 mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEADDIM))


@triton.jit
def _bwd_inner(
    dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE2, DELTA, stride_qs, stride_dos, stride_dqs,
    offs_m0, offs_n, offs_d, offs_dv, m_start, m_end, q_len, k_len, window_left, window_right, chunk,
    qk_scale, softcap_log2,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr, SOFTCAP: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One key tile over query blocks [m_start, m_end); everything transposed (keys on rows).

    MASKED: the window edge, diagonal or a sequence end crosses the blocks. Unmasked blocks
    hold only rows < q_len and keys < k_len that every row keeps (`query_block_range`), so
    they load, exponentiate and accumulate without masks."""
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_m0
        q = load_tile(q_ptrs + m0 * stride_qs, offs_m, offs_d, q_len, HEADDIM, not MASKED, EVEN_D)
        do = load_tile(do_ptrs + m0 * stride_dos, offs_m, offs_dv, q_len, HEADDIM_V, not MASKED,
                       EVEN_DV)
        if MASKED:
            lse2 = tl.load(LSE2 + offs_m, mask=offs_m < q_len, other=float("inf"))
            delta = tl.load(DELTA + offs_m, mask=offs_m < q_len, other=0.0)
        else:
            lse2 = tl.load(LSE2 + offs_m)
            delta = tl.load(DELTA + offs_m)
        # S^T = K @ Q^T, P^T = exp2(S^T - lse)
        s, t = scores_log2(dot(k, tl.trans(q)), qk_scale, softcap_log2, SOFTCAP)
        if MASKED:
            keep = keep_mask(offs_m[None, :], offs_n[:, None], q_len, k_len, window_left,
                             window_right, chunk, HAS_WL, HAS_WR, HAS_CHUNK)
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s - lse2[None, :])
        # dV += P^T @ dO
        dv += dot(cast(p, do.dtype), do)
        # dS^T = P^T * (dP^T - delta), dP^T = V @ dO^T; through the softcap: * (1 - tanh^2)
        ds = p * (dot(v, tl.trans(do)) - delta[None, :])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        ds = cast(ds, q.dtype)
        # dK += dS^T @ Q
        dk += dot(ds, q)
        if ATOMIC_DQ:
            # dQ += dS @ K, summed over key blocks in the float32 accumulator
            dq = dot(tl.trans(ds), k)
            if MASKED:
                tl.atomic_add(dq_ptrs + m0 * stride_dqs, dq, sem="relaxed",
                              mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEADDIM))
            elif EVEN_D:
                tl.atomic_add(dq_ptrs + m0 * stride_dqs, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs + m0 * stride_dqs, dq, sem="relaxed",
                              mask=offs_d[None, :] < HEADDIM)
    return dk, dv


@triton.jit
def attn_bwd(
    Q, K, V, DO, DK, DV, DQ_ACC, LSE2, DELTA, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_Q, SEQUSED_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqs, stride_dqh, stride_ab, stride_ah, heads_per_program,
    seqlen_q, seqlen_k, nheads, nheads_kv, softmax_scale, softcap, window_left, window_right, chunk,
    bucket_q, bucket_k,  # autotune key only
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PACKED_Q: tl.constexpr, PACKED_K: tl.constexpr, HAS_SEQUSED_Q: tl.constexpr,
    HAS_SEQUSED_K: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr,
    SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV (head `pid_h` of DK/DV) and, with ATOMIC_DQ, dQ of the query heads
    [pid_h * heads_per_program, +heads_per_program), all of one GQA group."""
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2)
    h_first = pid_h * heads_per_program
    h_kv = h_first // (nheads // nheads_kv)
    q_start, q_len, _ = seq_info(b, CU_SEQLENS_Q, SEQUSED_Q, seqlen_q, PACKED_Q, HAS_SEQUSED_Q)
    k_start, k_len, k_owned = seq_info(b, CU_SEQLENS_K, SEQUSED_K, seqlen_k, PACKED_K, HAS_SEQUSED_K)
    n0 = pid_n * BLOCK_N
    if n0 >= k_owned:
        return

    EVEN_D: tl.constexpr = HEADDIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEADDIM_V == BLOCK_DV
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_rows = k_start + offs_n
    k = load_tile(tile_ptrs(K, b, stride_kb, h_kv, stride_kh, k_rows, stride_ks, offs_d),
                  offs_n, offs_d, k_len, HEADDIM, False, EVEN_D)
    v = load_tile(tile_ptrs(V, b, stride_vb, h_kv, stride_vh, k_rows, stride_vs, offs_dv),
                  offs_n, offs_dv, k_len, HEADDIM_V, False, EVEN_DV)
    qk_scale, softcap_log2 = score_scales(softmax_scale, softcap, SOFTCAP)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    m_lo, u_lo, u_hi, m_hi = query_block_range(
        n0, q_len, k_len, window_left, window_right, chunk, HAS_WL, HAS_WR, HAS_CHUNK, BLOCK_M, BLOCK_N)
    q_rows = q_start + offs_m0
    for h in range(h_first, h_first + heads_per_program):
        q_ptrs = tile_ptrs(Q, b, stride_qb, h, stride_qh, q_rows, stride_qs, offs_d)
        do_ptrs = tile_ptrs(DO, b, stride_dob, h, stride_doh, q_rows, stride_dos, offs_dv)
        dq_ptrs = tile_ptrs(DQ_ACC, b, stride_dqb, h, stride_dqh, q_rows, stride_dqs, offs_d)
        aux = b.to(tl.int64) * stride_ab + h * stride_ah
        # bottom window edge / diagonal (masked), interior (unmasked), left window edge (masked)
        dk, dv = _bwd_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE2 + aux, DELTA + aux, stride_qs,
            stride_dos, stride_dqs, offs_m0, offs_n, offs_d, offs_dv, m_lo, u_lo, q_len, k_len,
            window_left, window_right, chunk, qk_scale, softcap_log2, HEADDIM, HEADDIM_V, EVEN_D,
            EVEN_DV, HAS_WL, HAS_WR, HAS_CHUNK, SOFTCAP, ATOMIC_DQ, True, BLOCK_M)
        dk, dv = _bwd_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE2 + aux, DELTA + aux, stride_qs,
            stride_dos, stride_dqs, offs_m0, offs_n, offs_d, offs_dv, u_lo, u_hi, q_len, k_len,
            window_left, window_right, chunk, qk_scale, softcap_log2, HEADDIM, HEADDIM_V, EVEN_D,
            EVEN_DV, HAS_WL, HAS_WR, HAS_CHUNK, SOFTCAP, ATOMIC_DQ, False, BLOCK_M)
        dk, dv = _bwd_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE2 + aux, DELTA + aux, stride_qs,
            stride_dos, stride_dqs, offs_m0, offs_n, offs_d, offs_dv, u_hi, m_hi, q_len, k_len,
            window_left, window_right, chunk, qk_scale, softcap_log2, HEADDIM, HEADDIM_V, EVEN_D,
            EVEN_DV, HAS_WL, HAS_WR, HAS_CHUNK, SOFTCAP, ATOMIC_DQ, True, BLOCK_M)

    valid = offs_n[:, None] < k_len  # padding keys get zero gradients
    dk = tl.where(valid, dk * softmax_scale, 0.0)
    dv = tl.where(valid, dv, 0.0)
    owned = offs_n[:, None] < k_owned
    tl.store(tile_ptrs(DK, b, stride_dkb, pid_h, stride_dkh, k_rows, stride_dks, offs_d),
             cast(dk, DK.dtype.element_ty), mask=owned & (offs_d[None, :] < HEADDIM))
    tl.store(tile_ptrs(DV, b, stride_dvb, pid_h, stride_dvh, k_rows, stride_dvs, offs_dv),
             cast(dv, DV.dtype.element_ty), mask=owned & (offs_dv[None, :] < HEADDIM_V))


@triton.jit
def attn_bwd_dq_epilogue(
    DQ_ACC, DQ, CU_SEQLENS_Q, SEQUSED_Q, stride_ab, stride_as, stride_ah,
    stride_dqb, stride_dqs, stride_dqh, seqlen_q, softmax_scale,
    HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, PACKED_Q: tl.constexpr,
    HAS_SEQUSED_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dQ = softmax_scale * accumulator, cast; zero on padding rows."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, q_owned = seq_info(b, CU_SEQLENS_Q, SEQUSED_Q, seqlen_q, PACKED_Q, HAS_SEQUSED_Q)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = q_start + offs_m
    acc = load_tile(tile_ptrs(DQ_ACC, b, stride_ab, h, stride_ah, rows, stride_as, offs_d),
                    offs_m, offs_d, q_len, HEADDIM, False, HEADDIM == BLOCK_D)
    tl.store(tile_ptrs(DQ, b, stride_dqb, h, stride_dqh, rows, stride_dqs, offs_d),
             cast(acc * softmax_scale, DQ.dtype.element_ty),
             mask=(offs_m[:, None] < q_owned) & (offs_d[None, :] < HEADDIM))


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n0, offs_d, offs_dv,
    n_start, n_end, q_len, k_len, window_left, window_right, chunk, qk_scale, softcap_log2,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr, SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ of one query tile over key blocks [n_start, n_end) (same split as the forward)."""
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + offs_n0
        k = load_tile(k_ptrs + n0 * stride_ks, offs_n, offs_d, k_len, HEADDIM, not MASKED, EVEN_D)
        v = load_tile(v_ptrs + n0 * stride_vs, offs_n, offs_dv, k_len, HEADDIM_V, not MASKED, EVEN_DV)
        # S = Q @ K^T, P = exp2(S - lse)
        s, t = scores_log2(dot(q, tl.trans(k)), qk_scale, softcap_log2, SOFTCAP)
        if MASKED:
            keep = keep_mask(offs_m[:, None], offs_n[None, :], q_len, k_len, window_left,
                             window_right, chunk, HAS_WL, HAS_WR, HAS_CHUNK)
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        # dS = P * (dO @ V^T - delta), through the softcap
        ds = p * (dot(do, tl.trans(v)) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        # dQ += dS @ K
        dq += dot(cast(ds, k.dtype), k)
    return dq


@triton.jit
def attn_bwd_dq(
    Q, K, V, DO, DQ, LSE2, DELTA, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_Q, SEQUSED_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh, stride_ab, stride_ah,
    seqlen_q, seqlen_k, nheads, nheads_kv, softmax_scale, softcap, window_left, window_right, chunk,
    bucket_q, bucket_k,  # autotune key only
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PACKED_Q: tl.constexpr, PACKED_K: tl.constexpr, HAS_SEQUSED_Q: tl.constexpr,
    HAS_SEQUSED_K: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr,
    SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = query_block(HAS_WR)
    h = tl.program_id(1)
    b = tl.program_id(2)
    h_kv = h // (nheads // nheads_kv)
    q_start, q_len, q_owned = seq_info(b, CU_SEQLENS_Q, SEQUSED_Q, seqlen_q, PACKED_Q, HAS_SEQUSED_Q)
    k_start, k_len, _ = seq_info(b, CU_SEQLENS_K, SEQUSED_K, seqlen_k, PACKED_K, HAS_SEQUSED_K)
    m0 = pid_m * BLOCK_M
    if m0 >= q_owned:
        return

    EVEN_D: tl.constexpr = HEADDIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEADDIM_V == BLOCK_DV
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = q_start + offs_m
    q = load_tile(tile_ptrs(Q, b, stride_qb, h, stride_qh, q_rows, stride_qs, offs_d),
                  offs_m, offs_d, q_len, HEADDIM, False, EVEN_D)
    do = load_tile(tile_ptrs(DO, b, stride_dob, h, stride_doh, q_rows, stride_dos, offs_dv),
                   offs_m, offs_dv, q_len, HEADDIM_V, False, EVEN_DV)
    aux = b.to(tl.int64) * stride_ab + h * stride_ah + offs_m
    lse2 = tl.load(LSE2 + aux, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(DELTA + aux, mask=offs_m < q_len, other=0.0)
    k_ptrs = tile_ptrs(K, b, stride_kb, h_kv, stride_kh, k_start + offs_n0, stride_ks, offs_d)
    v_ptrs = tile_ptrs(V, b, stride_vb, h_kv, stride_vh, k_start + offs_n0, stride_vs, offs_dv)
    qk_scale, softcap_log2 = score_scales(softmax_scale, softcap, SOFTCAP)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_lo, u_lo, u_hi, n_hi = key_block_range(
        m0, q_len, k_len, window_left, window_right, chunk, HAS_WL, HAS_WR, HAS_CHUNK, BLOCK_M, BLOCK_N)
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n0, offs_d,
        offs_dv, n_lo, u_lo, q_len, k_len, window_left, window_right, chunk, qk_scale, softcap_log2,
        HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, HAS_WL, HAS_WR, HAS_CHUNK, SOFTCAP, True, BLOCK_N)
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n0, offs_d,
        offs_dv, u_lo, u_hi, q_len, k_len, window_left, window_right, chunk, qk_scale, softcap_log2,
        HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, HAS_WL, HAS_WR, HAS_CHUNK, SOFTCAP, False, BLOCK_N)
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n0, offs_d,
        offs_dv, u_hi, n_hi, q_len, k_len, window_left, window_right, chunk, qk_scale, softcap_log2,
        HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, HAS_WL, HAS_WR, HAS_CHUNK, SOFTCAP, True, BLOCK_N)

    dq = tl.where(offs_m[:, None] < q_len, dq * softmax_scale, 0.0)
    tl.store(tile_ptrs(DQ, b, stride_dqb, h, stride_dqh, q_rows, stride_dqs, offs_d),
             cast(dq, DQ.dtype.element_ty),
             mask=(offs_m[:, None] < q_owned) & (offs_d[None, :] < HEADDIM))
