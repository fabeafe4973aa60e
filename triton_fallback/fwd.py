"""Forward kernel (FlashAttention-2): one program per (query block, head, batch)."""

import triton
import triton.language as tl

from .common import (
    LN2, cast, dot, e4m3_to_f16, keep_mask, key_block_range, load_tile, query_block, score_scales,
    scores_log2, seq_info, tile_ptrs,
)


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, qv, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d, offs_dv,
    n_start, n_end, q_len, k_len, window_left, window_right, chunk, qk_scale, softcap_log2,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr, SOFTCAP: tl.constexpr,
    FP8_DEQUANT: tl.constexpr, HAS_QV: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax over key blocks [n_start, n_end). MASKED: some score of each block may be
    dropped (sequence end, causal diagonal, window edge); else every key is in range and kept.
    HAS_QV (MLA): the scores gain qv . v, from the V tile already loaded for P @ V."""
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + offs_n
        k = load_tile(k_ptrs + n0 * stride_ks, rows, offs_d, k_len, HEADDIM, not MASKED, EVEN_D)
        v = load_tile(v_ptrs + n0 * stride_vs, rows, offs_dv, k_len, HEADDIM_V, not MASKED, EVEN_DV)
        if FP8_DEQUANT:
            k = e4m3_to_f16(k)
            v = e4m3_to_f16(v)
        # S = Q @ K^T (+ QV @ V^T), in the log2 domain
        qk = dot(q, tl.trans(k))
        if HAS_QV:
            qk += dot(qv, tl.trans(v))
        s, _ = scores_log2(qk, qk_scale, softcap_log2, SOFTCAP)
        if MASKED:
            keep = keep_mask(offs_m[:, None], rows[None, :], q_len, k_len, window_left,
                             window_right, chunk, HAS_WL, HAS_WR, HAS_CHUNK)
            s = tl.where(keep, s, float("-inf"))
        # online softmax; a row with nothing kept yet has max -inf: subtract 0 instead
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # O = O * alpha + P @ V
        acc = acc * alpha[:, None] + dot(cast(p, v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(
    Q, K, V, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K, SEQUSED_Q, SEQUSED_K,
    Q_DESCALE, K_DESCALE, V_DESCALE, QV,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_lm,
    stride_qvb, stride_qvs, stride_qvh,
    seqlen_q, seqlen_k, nheads, nheads_kv, softmax_scale, softcap, window_left, window_right, chunk,
    bucket_q, bucket_k,  # autotune key only: rounded max seqlens
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PACKED_Q: tl.constexpr, PACKED_K: tl.constexpr, HAS_SEQUSED_Q: tl.constexpr,
    HAS_SEQUSED_K: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_DESCALE: tl.constexpr, FP8_DEQUANT: tl.constexpr, HAS_QV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = tile_ptrs(Q, b, stride_qb, h, stride_qh, q_start + offs_m, stride_qs, offs_d)
    k_ptrs = tile_ptrs(K, b, stride_kb, h_kv, stride_kh, k_start + offs_n, stride_ks, offs_d)
    v_ptrs = tile_ptrs(V, b, stride_vb, h_kv, stride_vh, k_start + offs_n, stride_vs, offs_dv)
    qk_scale, softcap_log2 = score_scales(softmax_scale, softcap, SOFTCAP)
    if HAS_DESCALE:
        descale = b * nheads_kv + h_kv
        qk_scale *= tl.load(Q_DESCALE + descale) * tl.load(K_DESCALE + descale)

    q = load_tile(q_ptrs, offs_m, offs_d, q_len, HEADDIM, False, EVEN_D)
    if FP8_DEQUANT:  # q, k, v hold float8 bit patterns as uint8
        q = e4m3_to_f16(q)
    qv = q  # unused without HAS_QV
    if HAS_QV:
        qv_ptrs = tile_ptrs(QV, b, stride_qvb, h, stride_qvh, q_start + offs_m, stride_qvs, offs_dv)
        qv = load_tile(qv_ptrs, offs_m, offs_dv, q_len, HEADDIM_V, False, EVEN_DV)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    n_lo, u_lo, u_hi, n_hi = key_block_range(
        m0, q_len, k_len, window_left, window_right, chunk, HAS_WL, HAS_WR, HAS_CHUNK, BLOCK_M, BLOCK_N)
    # left window edge (masked), interior (unmasked), causal diagonal / right edge / tail (masked)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, qv, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d, offs_dv,
        n_lo, u_lo, q_len, k_len, window_left, window_right, chunk,
        qk_scale, softcap_log2, HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, HAS_WL, HAS_WR, HAS_CHUNK, SOFTCAP,
        FP8_DEQUANT, HAS_QV, True, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, qv, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d, offs_dv,
        u_lo, u_hi, q_len, k_len, window_left, window_right, chunk,
        qk_scale, softcap_log2, HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, HAS_WL, HAS_WR, HAS_CHUNK, SOFTCAP,
        FP8_DEQUANT, HAS_QV, False, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, qv, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_n, offs_d, offs_dv,
        u_hi, n_hi, q_len, k_len, window_left, window_right, chunk,
        qk_scale, softcap_log2, HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, HAS_WL, HAS_WR, HAS_CHUNK, SOFTCAP,
        FP8_DEQUANT, HAS_QV, True, BLOCK_N)

    # epilogue: rows with no kept key (l = 0) and padding rows give out 0, lse -inf; a NaN l (a
    # NaN or inf score) leaves the row NaN, as PyTorch does
    valid = (offs_m < q_len) & (l_i != 0.0)
    l_safe = tl.where(valid, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_DESCALE:
        out = out * tl.load(V_DESCALE + descale)
    out = tl.where(valid[:, None], out, 0.0)
    lse = tl.where(valid, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))

    o_ptrs = tile_ptrs(O, b, stride_ob, h, stride_oh, q_start + offs_m, stride_os, offs_dv)
    tl.store(o_ptrs, cast(out, O.dtype.element_ty),
             mask=(offs_m[:, None] < q_owned) & (offs_dv[None, :] < HEADDIM_V))
    lse_ptrs = LSE + b.to(tl.int64) * stride_lb + h * stride_lh + (q_start + offs_m) * stride_lm
    tl.store(lse_ptrs, lse, mask=offs_m < q_owned)
