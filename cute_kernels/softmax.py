"""Online softmax over WGMMA accumulators, in exp2 with the softmax scale folded in.

State per thread: the running max (unscaled scores) and the running sum of exp2 terms of its
rows. Each accumulator row is shared by the 4 lanes of a quad: the max is quad-reduced every
block; the sum stays per-lane and is quad-reduced once in `finalize`. The same code serves
bf16/fp16 and (later) FP8, which only differ in how P is converted afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, const_expr

from cute_kernels.utils import acc_to_mn, quad_allreduce

LN2 = math.log(2.0)


def row_max(s_mn: cute.Tensor, r: int, init) -> Float32:
    """max(init, s_mn[r, :]) as a tree of `fmax` (FMNMX, which drops NaN operands: a NaN score
    still makes its own probability NaN). TensorSSA's MAX reduction lowers to the NaN-propagating
    FMNMX.NAN, which issues slower (ncu, hdim128 8k: 1.7x the dispatch stalls)."""
    vals = [s_mn[r, j] for j in range(cute.size(s_mn.shape[1]))]
    while len(vals) > 1:
        vals = [cute.arch.fmax(a, b) for a, b in zip(vals[0::2], vals[1::2])] + vals[len(vals) & ~1:]
    return vals[0] if init is None else cute.arch.fmax(vals[0], init)


@dataclass(frozen=True)
class OnlineSoftmax:
    scale_log2: Float32  # softmax_scale * log2(e), or softcap * log2(e) with softcap
    row_max: cute.Tensor  # the reference max of each row: with `lazy`, possibly below the true max
    row_sum: cute.Tensor
    # > 0: lazy rescaling. A row keeps its reference max while its running max exceeds it by at
    # most `lazy` (log2 units; its probabilities then stay <= 2^lazy); a kept reference gives a
    # factor of exactly exp2(0) = 1, and `rescale_O` skips O's rescale when no row of a warp moved.
    lazy: float = 0.0
    # FP8 (> 0): the score multiplier changes per block (`step`'s row_mult), so row_max is kept
    # in scaled log2 units, and P = exp2(s2 - max + p_offset) (fa3py.fp8's 2^8 offset: P in
    # [0, 256] before its e4m3 rounding; the LSE takes it back out).
    p_offset: float = 0.0

    @staticmethod
    def create(scale_log2: Float32, num_rows: cutlass.Constexpr[int], lazy: float = 0.0,
               p_offset: float = 0.0) -> "OnlineSoftmax":
        row_max = cute.make_rmem_tensor(num_rows, Float32)
        row_sum = cute.make_rmem_tensor(num_rows, Float32)
        state = OnlineSoftmax(scale_log2, row_max, row_sum, lazy, p_offset)
        state.reset()
        return state

    def reset(self):
        self.row_max.fill(-Float32.inf)
        self.row_sum.fill(0.0)

    @cute.jit
    def step(self, acc_S: cute.Tensor, is_first: cutlass.Constexpr[bool]):
        """Turn scores into unnormalized probabilities in place; return the factor by which
        each row of O must be rescaled and, with lazy rescaling (else None), whether a row of the
        warp moved its reference (for `rescale_O`)."""
        s_mn = acc_to_mn(acc_S)
        row_scale = cute.make_rmem_tensor_like(self.row_max, Float32)
        lazy = const_expr(self.lazy > 0 and not is_first)
        moved = cutlass.Boolean(False)
        for r in cutlass.range_constexpr(cute.size(self.row_max)):
            row = s_mn[r, None].load()
            m_prev = self.row_max[r]
            m_cur = row_max(s_mn, r, None if const_expr(is_first) else m_prev)
            m_cur = quad_allreduce(m_cur, cute.arch.fmax)
            if const_expr(lazy):
                # Keep the reference while the max grew by <= lazy (False for -inf - -inf = NaN:
                # the reference then "moves" to -inf, a no-op).
                keep = (m_cur - m_prev) * self.scale_log2 <= Float32(self.lazy)
                m_cur = m_prev if keep else m_cur
                moved = moved | (not keep)
            self.row_max[r] = m_cur
            # A row with every key masked so far keeps max -inf: use 0 so exp2 gives 0, not NaN.
            m_safe = m_cur if m_cur != -Float32.inf else Float32(0.0)
            p = cute.math.exp2(row * self.scale_log2 - m_safe * self.scale_log2, fastmath=True)
            s_mn[r, None].store(p)
            self._add_row(r, p, (m_prev - m_safe) * self.scale_log2, row_scale, is_first)
        # The vote on `keep` is ready before the factors' exp2: voting on the factors instead
        # (as rescale_O does for factors kept from an earlier block) puts MUFU's latency in front
        # of the branch, +2.5% SM cycles at hdim 64 causal 16k (H200).
        return row_scale, (cute.arch.vote_any_sync(moved) if const_expr(lazy) else None)

    @cute.jit
    def step_scaled(self, acc_S: cute.Tensor, row_mult: cute.Tensor, is_first: cutlass.Constexpr[bool]):
        """`step` for FP8: row r's scores in log2 units are S * row_mult[r] (the block's
        multiplier); row_max is kept in those units. row_mult > 0, so max(S) * mult is
        max(S * mult) exactly. No lazy rescaling. Returns the O row rescale factors."""
        s_mn = acc_to_mn(acc_S)
        row_scale = cute.make_rmem_tensor_like(self.row_max, Float32)
        for r in cutlass.range_constexpr(cute.size(self.row_max)):
            row = s_mn[r, None].load()
            mult = row_mult[r]
            m_prev = self.row_max[r]
            m_cur = quad_allreduce(row_max(s_mn, r, None), cute.arch.fmax) * mult
            if const_expr(not is_first):
                m_cur = cute.arch.fmax(m_cur, m_prev)
            self.row_max[r] = m_cur
            m_safe = m_cur if m_cur != -Float32.inf else Float32(0.0)
            p = cute.math.exp2(row * mult + (Float32(self.p_offset) - m_safe), fastmath=True)
            s_mn[r, None].store(p)
            self._add_row(r, p, m_prev - m_safe, row_scale, is_first)
        return row_scale

    @cute.jit
    def _add_row(self, r: cutlass.Constexpr[int], p, log2_factor, row_scale: cute.Tensor,
                 is_first: cutlass.Constexpr[bool]):
        """Row r's probabilities `p` into its running sum, after rescaling the sum (and, through
        row_scale[r], O) by exp2(log2_factor), the move of the row's max in log2 units."""
        if const_expr(is_first):
            row_scale[r] = Float32(1.0)
            self.row_sum[r] = p.reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
        else:
            scale = cute.math.exp2(log2_factor, fastmath=True)
            row_scale[r] = scale
            self.row_sum[r] = p.reduce(cute.ReductionOp.ADD, self.row_sum[r] * scale, 0)

    @cute.jit
    def finalize(self) -> cute.Tensor:
        """Return 1/rowsum (0 for an empty row) and leave the natural-log LSE in row_sum."""
        inv = cute.make_rmem_tensor_like(self.row_sum, Float32)
        for r in cutlass.range_constexpr(cute.size(self.row_sum)):
            total = quad_allreduce(self.row_sum[r], lambda a, b: a + b)
            # 0: every key masked (exp2(-inf) terms). A NaN total (a NaN or inf score) is left to
            # make the row NaN, as PyTorch's attention does.
            empty = total == 0.0
            inv[r] = Float32(0.0) if empty else cute.arch.rcp_approx(total)
            if const_expr(self.p_offset > 0):  # row_max in scaled log2 units (step_scaled)
                lse = (self.row_max[r] + cute.math.log2(total, fastmath=True) - Float32(self.p_offset)) * LN2
            else:
                lse = (self.row_max[r] * self.scale_log2 + cute.math.log2(total, fastmath=True)) * LN2
            self.row_sum[r] = -Float32.inf if empty else lse
        return inv

    @cute.jit
    def rescale_O(self, acc_O: cute.Tensor, row_scale: cute.Tensor, moved=None,
                  lazy: cutlass.Constexpr[bool] = True):
        """O's rows times row_scale. With `lazy` (and lazy rescaling on), only if a row of the
        warp moved its reference: `moved` from `step`, or, for factors kept past it (None), a
        factor other than 1. Both are warp votes, so the branch is warp-uniform."""
        if const_expr(lazy and self.lazy > 0):
            if const_expr(moved is None):
                factor_not_1 = cutlass.Boolean(False)
                for r in cutlass.range_constexpr(cute.size(row_scale)):
                    factor_not_1 = factor_not_1 | (row_scale[r] != Float32(1.0))
                moved = cute.arch.vote_any_sync(factor_not_1)
            if moved:
                self._scale_rows(acc_O, row_scale)
        else:
            self._scale_rows(acc_O, row_scale)

    @cute.jit
    def _scale_rows(self, acc_O: cute.Tensor, row_scale: cute.Tensor):
        o_mn = acc_to_mn(acc_O)
        for r in cutlass.range_constexpr(cute.size(row_scale)):
            o_mn[r, None].store(o_mn[r, None].load() * row_scale[r])
