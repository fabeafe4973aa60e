"""Split-KV's combine: the partial results of a tile's KV splits into one O and LSE.

Each of `splits` splits of a row's keys left its O, normalized by its own row sum, in float32,
and its LSE. The row's LSE is the logsumexp of theirs and its O the sum of theirs weighted by
exp(split LSE - LSE). A row no split saw (every LSE -inf) gets O = 0 and LSE -inf; a NaN LSE
makes the row NaN, as the unsplit kernel would.

Layouts (as `cute_kernels.launch.run` allocates the partials, splits folded into the first index):
batched, o_part (splits * b, rows, h, dv) and lse_part (splits * b, h, rows); packed (varlen),
o_part (splits * total, h, dv) and lse_part (h, splits * total). The results go into `out`
((b, rows, h, dv) or (total, h, dv), any strides with a unit last one) and `lse` ((b, h, rows) or
(h, total), any strides).

On CUDA tensors one Triton kernel (`combine_kernel`); elsewhere `combine_splits_torch`, its
reference in torch ops.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    OP, LP, Out, LO, n_rows, rows, heads, splits, g,
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
    # GQA-packed partials (g > 1) into unpacked outputs: packed row r of KV head h is query row
    # r // g of query head h * g + r % g (launch.pack_rows)
    r_out, h_out = r // g, h * g + r % g
    tl.store(Out + b * out_b + r_out * out_r + h_out * out_h + d, acc.to(Out.dtype.element_ty), mask=d < DV)
    if tl.program_id(1) == 0:
        tl.store(LO + b * lo_b + r_out * lo_r + h_out * lo_h, lse)


def combine_splits_triton(o_part: torch.Tensor, lse_part: torch.Tensor, splits: int, packed_q: bool,
                          out: torch.Tensor, lse: torch.Tensor, g: int = 1) -> None:
    """`combine_splits` by `combine_kernel` (CUDA tensors, or Triton's interpreter)."""
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
    combine_kernel[(m, triton.cdiv(dv, block_d))](
        o_part, lse_part, out, lse, m, rows, h, splits, g, *lp, *so, *slo,
        DV=dv, BLOCK_D=block_d, BLOCK_S=min(32, max(8, triton.next_power_of_2(splits))),
    )


def combine_splits_torch(o_part: torch.Tensor, lse_part: torch.Tensor, splits: int, packed_q: bool,
                         out: torch.Tensor, lse: torch.Tensor, g: int = 1) -> None:
    """`combine_splits` in torch ops: the reference of `combine_kernel`, and the CPU path."""
    if g > 1:  # combined in the packed layout, then unpacked into out / lse
        from cute_kernels.launch import unpack_lse, unpack_rows

        packed = o_part.new_empty(o_part.shape[0] // splits, *o_part.shape[1:])
        lse_packed = lse_part.new_empty((*lse_part.shape[:-1], lse_part.shape[-1] // splits) if packed_q
                                        else (lse_part.shape[0] // splits, *lse_part.shape[1:]))
        combine_splits_torch(o_part, lse_part, splits, packed_q, packed, lse_packed)
        out.copy_(unpack_rows(packed, g))
        lse.copy_(unpack_lse(lse_packed, g))
        return
    o = o_part.view(splits, -1, *o_part.shape[1:])  # (splits, total, h, dv) / (splits, b, rows, h, dv)
    if packed_q:
        lse_s = lse_part.view(lse_part.shape[0], splits, -1).transpose(0, 1)  # (splits, h, total)
    else:
        lse_s = lse_part.view(splits, -1, *lse_part.shape[1:])  # (splits, b, h, rows)
    total = torch.logsumexp(lse_s, dim=0)
    weight = torch.exp(lse_s - total.masked_fill(total == -math.inf, 0.0))  # exp(-inf) = 0 where no split saw a row
    out.copy_((o * weight.transpose(-1, -2).unsqueeze(-1)).sum(0))
    lse.copy_(total)


def combine_splits(o_part: torch.Tensor, lse_part: torch.Tensor, splits: int, packed_q: bool,
                   out: torch.Tensor, lse: torch.Tensor, g: int = 1) -> None:
    """Split-KV's partial results into `out` and `lse` (see the module docstring); with g > 1 the
    partials are GQA-packed (launch.pack_rows: rows * g rows of the KV heads) and out / lse the
    unpacked outputs (the query heads' rows), which the combine writes directly (no unpacking
    copies)."""
    combine = combine_splits_triton if o_part.is_cuda else combine_splits_torch
    combine(o_part, lse_part, splits, packed_q, out, lse, g)
