"""Tile schedulers: which (m_block, head, batch) tiles a CTA computes, in which order.

Single-tile: grid (num_m_blocks, nheads, batch), one tile per CTA; causal/local tiles are
launched longest-first (highest m_block first). Persistent: grid = min(tiles, #SMs) CTAs
stride over a linear tile index; with `lpt` the index is m-block-major from the last m_block
(longest-processing-time first, all heads/batches of one m_block together), otherwise
batch-major with m_block fastest (static round robin).
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr


@dataclass(frozen=True)
class TileScheduler:
    num_m_blocks: Int32
    num_heads: Int32
    num_batch: Int32
    persistent: cutlass.Constexpr[bool]
    lpt: cutlass.Constexpr[bool]

    @staticmethod
    def grid(num_m_blocks, num_heads, num_batch, num_ctas, persistent: bool):
        if const_expr(persistent):
            return [cutlass.min(num_m_blocks * num_heads * num_batch, num_ctas), 1, 1]
        return [num_m_blocks, num_heads, num_batch]

    def initial(self) -> Int32:
        return Int32(cute.arch.block_idx()[0]) if const_expr(self.persistent) else Int32(0)

    def next(self, tile: Int32) -> Int32:
        return tile + Int32(cute.arch.grid_dim()[0]) if const_expr(self.persistent) else Int32(1)

    def valid(self, tile: Int32):
        if const_expr(self.persistent):
            return tile < self.num_m_blocks * self.num_heads * self.num_batch
        return tile == 0

    def coords(self, tile: Int32):
        """(m_block, head, batch) of `tile`."""
        if const_expr(not self.persistent):
            bidx, head, batch = cute.arch.block_idx()
            m_block = Int32(bidx)
            if const_expr(self.lpt):
                m_block = self.num_m_blocks - 1 - m_block
            return m_block, Int32(head), Int32(batch)
        if const_expr(self.lpt):
            hb = self.num_heads * self.num_batch
            m_block = self.num_m_blocks - 1 - tile // hb
            rest = tile % hb
            return m_block, rest % self.num_heads, rest // self.num_heads
        m_block = tile % self.num_m_blocks
        rest = tile // self.num_m_blocks
        return m_block, rest % self.num_heads, rest // self.num_heads
