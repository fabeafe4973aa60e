"""Tile schedulers: which (m_block, head, batch) tiles a CTA computes, in which order.

Single-tile: one tile per CTA, the hardware hands CTAs to SMs greedily in launch order.
  Plain: grid (num_m_blocks, nheads, batch).
  `lpt` (causal/local: tile m_block has ~m_block + 1 KV blocks): a 1-D grid in
  longest-processing-time-first order, in sections of (batch, head) pairs: inside a section the
  order is m_block descending, pairs fastest. A section is `l2_heads` pairs (launch passes 1:
  head-major, each head's m_blocks descending, so the CTAs in flight share few heads' K/V in L2),
  except the last `tail_heads` pairs, which form one final section of about LPT_TAIL_WAVES
  waves of tiles: without it the last head's longest tile starts near the very end and runs
  alone while the other SMs idle (hdim256 causal 8k, 16 heads: 8% of the kernel's cycles).
Persistent: grid = min(tiles, #SMs) CTAs stride over a linear tile index (static round robin,
m_block fastest; with `lpt` the single-tile grid's numbering, which a static stride balances
badly: causal/local use the dynamic scheduler).
Dynamic (persistent): the first tile of a CTA is its block index, every later one comes from an
atomic counter (`grid + atomicAdd(counter, 1)`), taken by the producer warp; tiles are numbered
as in the single-tile grid (longest first in L2 sections with `lpt`), so handing them out in
counter order is greedy longest-first scheduling. The producer tells the consumers which tile
comes next through shared memory, ahead of that tile's Q (`TileWork.announce` / `read`), and
ends with a tile index past the last one. The last CTA to finish taking tiles zeroes the counter again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr

from cute_kernels.mask import AttentionMask, split_block_range

# The longest-first order's final section: the last (batch, head) pairs whose tiles make about
# this many waves on the SMs. H100 SM cycles, causal, against none: 16k tokens, 512 / 2k / 8k:
# hdim128 -0.5 / -4.9 / -4.0%, hdim256 -3.5 / -7.8 / -7.7%; 4 waves similar but hdim256 512 +13%
# (log §5: `git show ff8d2aa:cute_kernels/NOTES.md`).
LPT_TAIL_WAVES = 2


def lpt_tail_heads(ctas, blocks):
    """The final section's pairs: as many as make about LPT_TAIL_WAVES waves of `ctas` CTAs with
    `blocks` tiles each (ints or Int32: the forward's and the backward's launches, the host tests)."""
    return (LPT_TAIL_WAVES * ctas + blocks - 1) // blocks

@dataclass(frozen=True)
class TileScheduler:
    num_m_blocks: Int32
    num_heads: Int32
    num_batch: Int32
    persistent: cutlass.Constexpr[bool]
    lpt: cutlass.Constexpr[bool]
    l2_heads: Int32  # lpt (single-tile or dynamic): (batch, head) pairs per section (launch: 1)
    tail_heads: Int32  # lpt: the last pairs, one longest-first section of their own (0: none)
    dynamic: cutlass.Constexpr[bool] = False
    counter: Optional[cute.Tensor] = None  # dynamic: (tiles taken, CTAs done), zero at launch

    @staticmethod
    def grid(num_m_blocks, num_heads, num_batch, num_ctas, persistent: bool, lpt: bool):
        if const_expr(persistent):
            return [cutlass.min(num_m_blocks * num_heads * num_batch, num_ctas), 1, 1]
        if const_expr(lpt):
            return [num_m_blocks * num_heads * num_batch, 1, 1]
        return [num_m_blocks, num_heads, num_batch]

    def initial(self) -> Int32:
        return Int32(cute.arch.block_idx()[0]) if const_expr(self.persistent) else Int32(0)

    def next(self, tile: Int32) -> Int32:
        return tile + Int32(cute.arch.grid_dim()[0]) if const_expr(self.persistent) else Int32(1)

    @cute.jit
    def fetch_next(self, tile: Int32) -> Int32:
        """The producer warp's next tile (all its lanes call this; one takes from the counter)."""
        if const_expr(not self.dynamic):
            return self.next(tile)
        taken = Int32(0)
        if cute.arch.lane_idx() == 0:
            taken = cute.arch.atomic_add(self.counter.iterator, Int32(1), sem="relaxed", scope="gpu")
        return Int32(cute.arch.grid_dim()[0]) + cute.arch.shuffle_sync(taken, 0)

    @cute.jit
    def retire(self):
        """Dynamic, the producer warp after its last fetch: count this CTA done; the last one
        zeroes both counters (tiles taken, CTAs done) for the next launch on the stream, so the
        host keeps one counter buffer instead of zeroing one per call. Every other CTA has taken
        its last tile by then (its done-increment follows its last fetch, release / acquire)."""
        if cute.arch.lane_idx() == 0:
            done = cute.arch.atomic_add(self.counter.iterator + 1, Int32(1), sem="acq_rel", scope="gpu")
            if done == Int32(cute.arch.grid_dim()[0]) - 1:
                self.counter[0] = Int32(0)
                self.counter[1] = Int32(0)

    def num_tiles(self) -> Int32:
        return self.num_m_blocks * self.num_heads * self.num_batch

    def valid(self, tile: Int32):
        if const_expr(self.persistent):
            return tile < self.num_tiles()
        return tile == 0

    def coords(self, tile: Int32):
        """(m_block, head, batch) of `tile`."""
        if const_expr(not self.persistent and not self.lpt):
            bidx, head, batch = cute.arch.block_idx()
            return Int32(bidx), Int32(head), Int32(batch)
        if const_expr(self.lpt):
            # One numbering for the single-tile grid (tile = block index) and both persistent
            # schedulers (tile = the index they stride over / take from the counter).
            return self.lpt_coords(tile if const_expr(self.persistent) else Int32(cute.arch.block_idx()[0]))
        m_block = tile % self.num_m_blocks
        rest = tile // self.num_m_blocks
        return m_block, rest % self.num_heads, rest // self.num_heads

    def lpt_coords(self, bid: Int32):
        """(m_block, head, batch) of index `bid` in the longest-first order: L2 sections of
        `l2_heads` (batch, head) pairs, m_block descending, pairs fastest; the last `tail_heads`
        pairs form one final section."""
        hb_total = self.num_heads * self.num_batch
        tail = cutlass.min(self.tail_heads, hb_total)
        first = hb_total - tail  # pairs in the L2 sections before the final one
        in_tail = Int32(bid >= first * self.num_m_blocks)  # 0 / 1, branch-free
        bid = bid - in_tail * first * self.num_m_blocks
        base = in_tail * first
        sec = self.l2_heads + in_tail * (tail - self.l2_heads)
        pairs = first + in_tail * (tail - first)
        section = bid // (sec * self.num_m_blocks)
        r = bid - section * sec * self.num_m_blocks
        heads_here = cutlass.min(sec, pairs - section * sec)
        hb = base + section * sec + r % heads_here
        return self.num_m_blocks - 1 - r // heads_here, hb % self.num_heads, hb // self.num_heads


@dataclass(frozen=True)
class TileWork:
    """What the producer and consumer warps walk their CTA's tiles with: the scheduler, each
    batch entry's sequence lengths (`seqlen_fn(batch)` -> SeqlenInfo), the tile's mask
    (`mask_fn(seqlen, m_block)` -> AttentionMask), the dynamic scheduler's hand-off slots in
    smem (`next_tile`, one tile index per Q stage; None otherwise) and split-KV's splits."""

    scheduler: TileScheduler
    seqlen_fn: Callable
    mask_fn: Callable
    next_tile: Optional[cute.Tensor]
    num_splits: Int32
    split_kv: cutlass.Constexpr[bool]

    def coords(self, tile: Int32):
        """(m_block, head, batch, split) of `tile`: with split_kv the scheduler's heads are
        (head, split) pairs, a head's splits next to each other."""
        m_block, head, batch = self.scheduler.coords(tile)
        if const_expr(self.split_kv):
            return m_block, head // self.num_splits, batch, head % self.num_splits
        return m_block, head, batch, Int32(0)

    def kv_block_range(self, mask: AttentionMask, split: Int32):
        """[n_block_min, n_block_max): the KV blocks this tile visits (its split's share)."""
        n_block_min, n_block_max = mask.n_block_range()
        if const_expr(self.split_kv):
            n_block_min, n_block_max = split_block_range(n_block_min, n_block_max, split, self.num_splits)
        return n_block_min, n_block_max

    @cute.jit
    def announce(self, slot, tile, q_full, tx_bytes: cutlass.Constexpr[int] = 0):
        """Producer warp, Q's stage `slot` free: one thread stores the next tile index there and
        then arrives on Q's full barrier (expecting `tx_bytes` of Q's TMA; 0: the end marker, no
        TMA follows), so the store is ordered before the arrive that publishes it. (Every lane
        storing it and an elected lane arriving raced under compute-sanitizer racecheck.)"""
        with cute.arch.elect_one():
            self.next_tile[slot] = tile
            if const_expr(tx_bytes > 0):
                cute.arch.mbarrier_arrive_and_expect_tx(q_full, tx_bytes)
            else:
                cute.arch.mbarrier_arrive(q_full)

    @cute.jit
    def follow(self, tile, pipeline_q, q_state) -> Int32:
        """The next tile of a warp that follows the producer's walk (the consumers, fp8_v_rows'
        transposing warps): a dynamic scheduler's tile as announced in Q stage `q_state`'s slot,
        read after that stage's wait; else the static order's next (`tile` None: the first)."""
        if const_expr(self.next_tile is not None):
            pipeline_q.consumer_wait(q_state)
            return self.read(q_state.index)
        if const_expr(tile is None):
            return self.scheduler.initial()
        return self.scheduler.next(tile)

    @cute.jit
    def read(self, slot) -> Int32:
        """Consumer warp, after its wait on Q stage `slot`: the announced tile index, read by
        lane 0 (the lane that later releases that stage, after which the producer may overwrite
        the slot) and passed to the warp by shuffle."""
        tile = Int32(0)
        if cute.arch.lane_idx() == 0:
            tile = self.next_tile[slot]
        return cute.arch.shuffle_sync(tile, 0)
