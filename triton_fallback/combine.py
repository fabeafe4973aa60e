"""Split-KV's combine in one Triton kernel (used by `cute_kernels` on CUDA tensors).

Each of `splits` splits of a row's keys left its O, normalized by its own row sum, in float32,
and its LSE. The row's LSE is the logsumexp of theirs and its O the sum of theirs weighted by
exp(split LSE - LSE). A row no split saw (every LSE -inf) gets O = 0 and LSE -inf; a NaN LSE
makes the row NaN, as the unsplit kernel would.

Layouts (as `cute_kernels.run` allocates the partials, splits folded into the first index):
batched, o_part (splits * b, rows, h, dv) and lse_part (splits * b, h, rows); packed (varlen),
o_part (splits * total, h, dv) and lse_part (h, splits * total). The results go into `out`
((b, rows, h, dv) or (total, h, dv), any strides with a unit last one) and `lse` ((b, h, rows) or
(h, total), any strides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine(
    OP, LP, Out, LO, n_rows, rows, heads, splits,
    lp_s, lp_b, lp_r, lp_h,  # LP strides: split, batch, row, head
    out_b, out_r, out_h,  # Out strides (dv contiguous)
    lo_b, lo_r, lo_h,  # LO strides
    DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per (row, BLOCK_D columns of it); each loop visits BLOCK_S splits at once, so a
    # decode's few rows with many splits load in parallel (not one dependent load per split).
    m = tl.program_id(0)  # (batch, row, head), head fastest
    h = m % heads
    r = (m // heads) % rows
    b = m // (heads * rows)
    lp_row = b * lp_b + r * lp_r + h * lp_h
    s = tl.arange(0, BLOCK_S)
    top = tl.full((), float("-inf"), tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        lse_s = tl.load(LP + (s0 + s) * lp_s + lp_row, mask=s0 + s < splits, other=float("-inf"))
        top = tl.maximum(top, tl.max(lse_s, 0))
    top = tl.where(top == float("-inf"), 0.0, top)  # no split saw the row: every weight exp(-inf) = 0
    total = tl.zeros((), tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        lse_s = tl.load(LP + (s0 + s) * lp_s + lp_row, mask=s0 + s < splits, other=float("-inf"))
        total += tl.sum(tl.exp(lse_s - top), 0)
    lse = top + tl.log(total)  # -inf for total 0, NaN for a NaN split LSE
    lse_w = tl.where(total == 0.0, 0.0, lse)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        in_split = s0 + s < splits
        w = tl.exp(tl.load(LP + (s0 + s) * lp_s + lp_row, mask=in_split, other=float("-inf")) - lse_w)
        o = tl.load(OP + ((s0 + s)[:, None] * n_rows + m) * DV + d[None, :],
                    mask=in_split[:, None] & (d[None, :] < DV), other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    tl.store(Out + b * out_b + r * out_r + h * out_h + d, acc.to(Out.dtype.element_ty), mask=d < DV)
    if tl.program_id(1) == 0:
        tl.store(LO + b * lo_b + r * lo_r + h * lo_h, lse)


def combine_splits(o_part: torch.Tensor, lse_part: torch.Tensor, splits: int, packed_q: bool,
                   out: torch.Tensor, lse: torch.Tensor) -> None:
    """Combine the partials into `out` and `lse` (see the module docstring)."""
    dv = o_part.shape[-1]
    assert o_part.is_contiguous() and lse_part.is_contiguous() and out.stride(-1) == 1
    if packed_q:
        total, h = o_part.shape[0] // splits, o_part.shape[1]
        batch, rows = 1, total
        lp = (total, 0, 1, splits * total)
        so = (0, out.stride(0), out.stride(1))
        slo = (0, lse.stride(1), lse.stride(0))
    else:
        batch, rows, h = o_part.shape[0] // splits, o_part.shape[1], o_part.shape[2]
        lp = (batch * h * rows, h * rows, 1, rows)
        so = out.stride()[:3]
        slo = (lse.stride(0), lse.stride(2), lse.stride(1))
    m = batch * rows * h
    block_d = min(64, triton.next_power_of_2(dv))
    _combine[(m, triton.cdiv(dv, block_d))](
        o_part, lse_part, out, lse, m, rows, h, splits, *lp, *so, *slo,
        DV=dv, BLOCK_D=block_d, BLOCK_S=min(32, max(8, triton.next_power_of_2(splits))),
    )
