"""Forward kernel on the block-scaled FP8 format of `fa3py.fp8` (sm89+ FP8 tensor cores).

The arithmetic of `fa3py.fp8.emulate.attention` with the keys visited first to last
(`descending=False`): S = Q8 K8^T (float32, or int32 for qk_int8) times the row's q scale, the
tile's k scale and c; P = exp2(s - m + 8) rounded to e4m3; each tile's P V8 in a fresh
accumulator, scaled by the tile's v scale (block V) or by the channel scales at the end.
BLOCK_N divides the format's block_n, so the k (and block-V) scale is one scalar per tile.

Opt-in (`FA3PY_TRITON_FP8=1`, or `ENABLED = True`) until it has been run and timed on a GPU:
the CPU tests run it in Triton's interpreter only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import LN2, cast, dot, keep_mask, key_block_range, load_tile, tanh, tile_ptrs

ENABLED = os.environ.get("FA3PY_TRITON_FP8", "0") == "1"
P_OFFSET = tl.constexpr(8.0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tiles(fmt, device) -> tuple[int, int] | None:
    """(BLOCK_M, BLOCK_N) for a format, or None: BLOCK_N must divide block_n and be >= 32 on a
    GPU (FP8 MMA's K for P V), >= 16 in the interpreter."""
    least = 16 if device.type != "cuda" else 32
    for n in (64, 32, 16):
        if n >= least and fmt.block_n % n == 0:
            return (64 if device.type == "cuda" else 16), n
    return None


def why_not(req, backward: bool) -> str | None:
    from fa3py.fp8 import Fp8Format

    if backward:
        return "pre-quantized FP8 operands have no backward"
    if not ENABLED:
        return "fp8: the Triton FP8 kernel is opt-in until timed on a GPU (FA3PY_TRITON_FP8=1)"
    if req.device.type == "cuda" and torch.cuda.get_device_capability(req.device) < (8, 9):
        return "no FP8 tensor cores before sm89 (the float32 emulation runs instead)"
    if req.is_varlen:
        return "the FP8 kernel takes batched q, k, v only"
    if req.params.attention_chunk:
        return "attention_chunk: not in the Triton FP8 kernel"
    fmt = req.fp8_tensors.fmt if req.fp8_tensors is not None else Fp8Format()
    if fmt.v_pv_order:
        return "V in the Hopper kernel's PV key order (v_pv_order): the Triton FP8 kernel reads keys in order"
    if tiles(fmt, req.device) is None:
        return f"block_n={fmt.block_n} has no divisor among the kernel's tiles (64, 32{', 16' if _interpreting() else ''})"
    return None


@triton.jit
def _fp8_inner(
    acc, l_i, m_i, q, sq, k_ptrs, vt_ptrs, KS, VS, stride_ks, offs_m, offs_n, offs_d, offs_dv,
    n_start, n_end, q_len, k_len, window_left, window_right, c, softcap_scale, softcap_log2,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, V_BLOCK: tl.constexpr,
    SCALE_N: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + offs_n
        k = load_tile(k_ptrs + n0 * stride_ks, rows, offs_d, k_len, HEADDIM, not MASKED, EVEN_D)
        vt_mask = (offs_dv[:, None] < HEADDIM_V) & (rows[None, :] < k_len)
        vt = tl.load(vt_ptrs + n0, mask=vt_mask, other=0.0)  # (BLOCK_DV, BLOCK_N): V k-major
        # S = Q8 K8^T, then s2 = S * ((sq * sk) * c) in log2 units
        mult = sq * tl.load(KS + n0 // SCALE_N)
        qk = dot(q, tl.trans(k)).to(tl.float32)
        if SOFTCAP:
            s = tanh(qk * (mult * softcap_scale)[:, None]) * softcap_log2
        else:
            s = qk * (mult * c)[:, None]
        if MASKED:
            keep = keep_mask(offs_m[:, None], rows[None, :], q_len, k_len, window_left, window_right, 0,
                             HAS_WL, HAS_WR, False)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None] + P_OFFSET)  # in [0, 256]
        l_i = l_i * alpha + tl.sum(p, 1)  # P before its rounding
        # O_j = e4m3(P) V8_j in a fresh accumulator, promoted into O
        pv = dot(cast(p, tl.float8e4nv), tl.trans(vt))
        if V_BLOCK:
            pv = pv * tl.load(VS + n0 // SCALE_N)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd_fp8(
    Q, K, VT, QS, KS, VS, O, LSE,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vh, stride_vd, stride_vs,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh, stride_vsb, stride_vsh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    q_len, k_len, nheads, nheads_kv, c, softcap_scale, softcap_log2, window_left, window_right,
    HEADDIM: tl.constexpr, HEADDIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, SOFTCAP: tl.constexpr, V_BLOCK: tl.constexpr,
    SCALE_M: tl.constexpr, SCALE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h_kv = h // (nheads // nheads_kv)
    m0 = pid_m * BLOCK_M
    EVEN_D: tl.constexpr = HEADDIM == BLOCK_D
    EVEN_DV: tl.constexpr = HEADDIM_V == BLOCK_DV
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = tile_ptrs(Q, b, stride_qb, h, stride_qh, offs_m, stride_qs, offs_d)
    k_ptrs = tile_ptrs(K, b, stride_kb, h_kv, stride_kh, offs_n, stride_ks, offs_d)
    vt_ptrs = (VT + b.to(tl.int64) * stride_vb + h_kv * stride_vh + offs_dv[:, None] * stride_vd
               + offs_n[None, :] * stride_vs)
    q = load_tile(q_ptrs, offs_m, offs_d, q_len, HEADDIM, False, EVEN_D)
    sq = tl.load(QS + b * stride_qsb + h * stride_qsh + offs_m // SCALE_M, mask=offs_m < q_len, other=1.0)
    KS += b * stride_ksb + h_kv * stride_ksh
    VS += b * stride_vsb + h_kv * stride_vsh
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    n_lo, u_lo, u_hi, n_hi = key_block_range(
        m0, q_len, k_len, window_left, window_right, 0, HAS_WL, HAS_WR, False, BLOCK_M, BLOCK_N)
    # left window edge (masked), interior (unmasked), causal diagonal / right edge / tail (masked)
    acc, l_i, m_i = _fp8_inner(
        acc, l_i, m_i, q, sq, k_ptrs, vt_ptrs, KS, VS, stride_ks, offs_m, offs_n, offs_d, offs_dv,
        n_lo, u_lo, q_len, k_len, window_left, window_right, c, softcap_scale, softcap_log2,
        HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, HAS_WL, HAS_WR, SOFTCAP, V_BLOCK, SCALE_N, True, BLOCK_N)
    acc, l_i, m_i = _fp8_inner(
        acc, l_i, m_i, q, sq, k_ptrs, vt_ptrs, KS, VS, stride_ks, offs_m, offs_n, offs_d, offs_dv,
        u_lo, u_hi, q_len, k_len, window_left, window_right, c, softcap_scale, softcap_log2,
        HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, HAS_WL, HAS_WR, SOFTCAP, V_BLOCK, SCALE_N, False, BLOCK_N)
    acc, l_i, m_i = _fp8_inner(
        acc, l_i, m_i, q, sq, k_ptrs, vt_ptrs, KS, VS, stride_ks, offs_m, offs_n, offs_d, offs_dv,
        u_hi, n_hi, q_len, k_len, window_left, window_right, c, softcap_scale, softcap_log2,
        HEADDIM, HEADDIM_V, EVEN_D, EVEN_DV, HAS_WL, HAS_WR, SOFTCAP, V_BLOCK, SCALE_N, True, BLOCK_N)

    valid = (offs_m < q_len) & (l_i != 0.0)  # NaN l stays NaN
    l_safe = tl.where(valid, l_i, 1.0)
    out = acc / l_safe[:, None]
    if not V_BLOCK:  # channel scales in the epilogue
        out = out * tl.load(VS + offs_dv, mask=offs_dv < HEADDIM_V, other=0.0)[None, :]
    out = tl.where(valid[:, None], out, 0.0)
    lse = tl.where(valid, (m_i + tl.log2(l_safe) - P_OFFSET) * LN2, float("-inf"))
    o_ptrs = tile_ptrs(O, b, stride_ob, h, stride_oh, offs_m, stride_os, offs_dv)
    tl.store(o_ptrs, cast(out, O.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < HEADDIM_V))
    tl.store(LSE + b.to(tl.int64) * stride_lb + h * stride_lh + offs_m, lse, mask=offs_m < q_len)


def forward(req):
    """(out, lse) of an fp8=True request or one on quantized operands."""
    from fa3py.fp8 import quantize_fp8
    from fa3py.fp8.format import rotation_factor, score_constants

    qkv = req.fp8_tensors if req.fp8_tensors is not None else quantize_fp8(req.q, req.k, req.v)
    q, k, v = qkv
    fmt, p = qkv.fmt, req.params
    b, lq, h, d = q.shape
    lk, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    block_m, block_n = tiles(fmt, req.device)
    out = torch.empty(b, lq, h, dv, dtype=req.out_dtype, device=req.device)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=req.device)
    qd, kd = q.data, k.data
    vt = v.data if fmt.v_transposed else v.data.permute(0, 2, 3, 1)  # (b, hk, dv, s) either way
    c, cap = score_constants(p.softmax_scale, p.softcap, rotation_factor(fmt, d))  # float32, as the spec
    softcap_scale, softcap_log2 = (c, cap) if p.softcap > 0 else (0.0, 0.0)
    grid = (triton.cdiv(lq, block_m), h, b)
    attn_fwd_fp8[grid](
        qd, kd, vt, q.scale, k.scale, v.scale, out, lse,
        qd.stride(0), qd.stride(1), qd.stride(2), kd.stride(0), kd.stride(1), kd.stride(2),
        vt.stride(0), vt.stride(1), vt.stride(2), vt.stride(3),
        q.scale.stride(0), q.scale.stride(1), k.scale.stride(0), k.scale.stride(1),
        v.scale.stride(0), v.scale.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        lq, lk, h, hk, c, softcap_scale, softcap_log2,
        p.window_left, p.window_right,
        HEADDIM=d, HEADDIM_V=dv, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), HAS_WL=p.window_left >= 0, HAS_WR=p.window_right >= 0,
        SOFTCAP=p.softcap > 0, V_BLOCK=fmt.v_scaling == "block", SCALE_M=fmt.block_m, SCALE_N=fmt.block_n,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2,
    )
    return out, lse
