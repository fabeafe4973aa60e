"""The FP8 attention kernel's arithmetic, in PyTorch float32: the executable form of the spec
in `fa3py.fp8` ("Attention"). Runs on any device; the one-time warning says it is no faster
than 16-bit attention."""

from __future__ import annotations

import math
import warnings

import torch

from ..reference import keep_mask
from ..request import AttentionParams
from .format import E4M3, P_OFFSET, Fp8QKV, rotation_factor, score_constants

LN2 = math.log(2.0)
_warned = False


def warn_emulated(device: torch.device) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"fa3py: fp8=True on {device.type} runs the float32 emulation of the FP8 kernel in "
                      "PyTorch: FP8 numerics, but slower than 16-bit attention there "
                      "(fa3py.explain says what runs).", stacklevel=6)


def _heads_first(x: torch.Tensor, group: int) -> torch.Tensor:
    """(b, s, hk, d) float8 -> (b, hk * group, s, d) float32."""
    return x.float().permute(0, 2, 1, 3).repeat_interleave(group, dim=1)


def attention(qkv: Fp8QKV, params: AttentionParams, out_dtype: torch.dtype, descending: bool = True,
              seqused_q=None, seqused_k=None):
    """(out (b, sq, h, dv) in out_dtype, lse (b, h, sq) float32) of the quantized q, k, v;
    packed q: out (total_q, h, dv), lse (h, total_q). seqused_q / seqused_k: (batch,) lengths
    used of each sequence (rows past them: out 0, lse -inf).

    Keys are taken block_n at a time, last block first (`descending`, as the Hopper kernel
    iterates; the Triton kernel goes first to last): the order decides which running max each
    P block is rounded against, nothing else. Sequences of their own lengths (packed operands,
    seqused) are computed one at a time, each as a batch of one (`Fp8Tensor.sequence`)."""
    q, k, v = qkv
    if not (q.packed or k.packed or seqused_q is not None or seqused_k is not None):
        return _attention(qkv, params, out_dtype, descending)
    batch, h, dv = q.batch, q.data.shape[-2], v.shape[-1]
    used_q, used_k = ([None] * batch if u is None else u.tolist() for u in (seqused_q, seqused_k))
    if q.packed:
        out = torch.zeros(q.data.shape[0], h, dv, dtype=out_dtype, device=q.device)
        lse = torch.full((h, q.data.shape[0]), float("-inf"), device=q.device)
        starts = q.cu_seqlens.tolist()
    else:
        out = torch.zeros(*q.data.shape[:-1], dv, dtype=out_dtype, device=q.device)
        lse = torch.full((batch, h, q.seqlen), float("-inf"), device=q.device)
    for b in range(batch):
        one = Fp8QKV(q.sequence(b, used_q[b]), k.sequence(b, used_k[b]), v.sequence(b, used_k[b]))
        n = one.q.seqlen
        o, l = _attention(one, params, out_dtype, descending)
        if q.packed:
            out[starts[b]:starts[b] + n], lse[:, starts[b]:starts[b] + n] = o[0], l[0]
        else:
            out[b, :n], lse[b, :, :n] = o[0], l[0]
    return out, lse


# The emulation's two GEMMs (float32 sums of exact products; int8 Q K^T is exact too, its sums
# staying below 2^24), named apart so that tests can put a model of the FP8 tensor cores'
# accumulation in place of either (tests/_util.py fp8_emulated_pair).
gemm_qk = torch.matmul
gemm_pv = torch.matmul


def round_p(p: torch.Tensor) -> torch.Tensor:
    """P (float32, in [0, 2^8]) to its e4m3 values, the PV GEMM's operand; named apart so that tests
    can model where a kernel's P rounds to the neighbouring code (tests/_util.py p_flip_bound)."""
    return p.to(E4M3).float()


def _attention(qkv: Fp8QKV, params: AttentionParams, out_dtype: torch.dtype, descending: bool):
    """`attention` of batched operands, every sequence its whole length."""
    q, k, v = qkv
    fmt = q.fmt
    b, lq, h, d = q.shape
    lk, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    group, bn = h // hk, fmt.block_n
    dev = q.device
    qf = _heads_first(q.tokens(), 1)
    kf, vf = _heads_first(k.tokens(), group), _heads_first(v.tokens(), group)
    sq = q.scale.repeat_interleave(fmt.block_m, dim=2)[:, :, :lq].unsqueeze(-1)  # (b, h, lq, 1)
    sk = k.scale.repeat_interleave(group, dim=1)  # (b, h, nblk)
    sv = v.scale.repeat_interleave(group, dim=1)  # (b, h, nblk) or (b, h, dv)
    # scores in log2 units: s2 = (q8 . k8) * ((sq * sk) * c), c rounded to float32 once on the host;
    # softcap: s2 = tanh((q8 . k8) * ((sq * sk) * c)) * cap (score_constants)
    c, cap = (torch.tensor(x, dtype=torch.float32, device=dev)
              for x in score_constants(params.softmax_scale, params.softcap, rotation_factor(fmt, d)))
    m = torch.full((b, h, lq), float("-inf"), device=dev)
    row_sum = torch.zeros(b, h, lq, device=dev)
    acc = torch.zeros(b, h, lq, dv, device=dev)
    nblk = -(-lk // bn)
    windowed = params.window_left >= 0 or params.window_right >= 0 or params.attention_chunk > 0
    keep_all = keep_mask(lq, lk, params.window_left, params.window_right, device=dev,
                         attention_chunk=params.attention_chunk) if windowed else None
    for j in (reversed(range(nblk)) if descending else range(nblk)):
        j0, j1 = j * bn, min(lk, (j + 1) * bn)
        keep = None if keep_all is None else keep_all[:, j0:j1]
        if keep is not None and not keep.any():
            continue  # a tile the kernel skips
        acc_s = gemm_qk(qf, kf[:, :, j0:j1].transpose(-1, -2))  # S = Q8 K8^T, float32
        mult = sq * sk[:, :, j, None, None]  # a power of two: exact (rotated formats)
        s2 = acc_s * (mult * c)
        if params.softcap > 0:
            s2 = torch.tanh(s2) * cap
        if keep is not None:
            s2 = s2.masked_fill(~keep, float("-inf"))
        m_new = torch.maximum(m, s2.amax(dim=-1))
        m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s2 - m_safe.unsqueeze(-1) + P_OFFSET)  # in [0, 2^8]
        corr = torch.exp2(m - m_safe)
        row_sum = row_sum * corr + p.sum(dim=-1)  # of P before its rounding, as FA3
        pv = gemm_pv(round_p(p), vf[:, :, j0:j1])  # O_j = P8 V8, a fresh accumulator
        if fmt.v_scaling == "block":
            acc = acc * corr.unsqueeze(-1) + pv * sv[:, :, j, None, None]
        else:
            acc = acc * corr.unsqueeze(-1) + pv
        m = m_new
    has_keys = row_sum != 0  # NaN rows stay NaN
    out = acc / torch.where(has_keys, row_sum, torch.ones_like(row_sum)).unsqueeze(-1)
    if fmt.v_scaling == "channel":
        out = out * sv.unsqueeze(2)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    lse = torch.where(has_keys, (m_safe + torch.log2(row_sum) - P_OFFSET) * LN2,
                      torch.full_like(row_sum, float("-inf")))
    return out.permute(0, 2, 1, 3).to(out_dtype), lse
