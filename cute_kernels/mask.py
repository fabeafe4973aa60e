"""Sequence lengths, KV-block ranges and score masking for one (batch, head, m_block) tile.

Mask semantics (fa3py/request.py, bottom-right aligned): query row i keeps key j iff
    (no left window  or j >= i + Lk - Lq - window_left) and
    (no right window or j <= i + Lk - Lq + window_right);  causal is window_right = 0;
and with attention_chunk C (chunked local attention) c <= j < c + C for the chunk start
c = C * floor((i + Lk - Lq) / C) of i's diagonal position. Each bound gives a row a key range
[lo(i), hi(i)) whose ends never decrease with i, so the chunk is one more left and right edge:
it narrows the KV-block range and the boundary blocks mask it with the window's edges.
Only blocks that straddle a boundary are masked; blocks outside the window are never loaded.

With GQA packing (`rows_per_pos` g > 1) the tile's rows are (query position, query head of the
KV head) pairs, row = position * g + head: i above is row // g and Lq the rows / g.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from cute_kernels.utils import acc_to_mn, mn_transposed


@dataclass(frozen=True)
class SeqlenInfo:
    """Where sequence `batch` starts in packed tensors and how long it is."""

    offset_q: Int32
    offset_k: Int32
    seqlen_q: Int32
    seqlen_k: Int32

    @staticmethod
    def create(batch, seqlen_q_static, seqlen_k_static, mCuSeqlensQ=None, mCuSeqlensK=None,
               mSeqUsedQ=None, mSeqUsedK=None) -> "SeqlenInfo":
        offset_q, seqlen_q = _offset_and_length(batch, seqlen_q_static, mCuSeqlensQ, mSeqUsedQ)
        offset_k, seqlen_k = _offset_and_length(batch, seqlen_k_static, mCuSeqlensK, mSeqUsedK)
        return SeqlenInfo(offset_q, offset_k, seqlen_q, seqlen_k)


def _offset_and_length(batch, static_len, mCuSeqlens, mSeqUsed):
    """(first row, length) of sequence `batch` on one side: seqused wins over cu_seqlens, which
    wins over the static (batched) length. Branches are resolved at trace time."""
    offset = Int32(0) if const_expr(mCuSeqlens is None) else mCuSeqlens[batch]
    if const_expr(mSeqUsed is not None):
        length = mSeqUsed[batch]
    elif const_expr(mCuSeqlens is not None):
        length = mCuSeqlens[batch + 1] - offset
    else:
        length = static_len
    return offset, Int32(length)


@cute.jit
def split_block_range(n_block_min: Int32, n_block_max: Int32, split: Int32, num_splits: Int32):
    """Split-KV: split `split`'s share of the KV blocks [n_block_min, n_block_max): consecutive
    runs of ceil(blocks / num_splits) blocks, from the left; the last ones may be shorter or
    empty (then the range it returns has n_block_min >= n_block_max)."""
    per_split = (cutlass.max(n_block_max - n_block_min, 0) + num_splits - 1) // num_splits
    lo = n_block_min + split * per_split
    return lo, cutlass.min(n_block_max, lo + per_split)


def chunk_floor(col, chunk, shift=None):
    """First column of the attention chunk (`chunk` columns, chunks from column 0) that holds
    column `col`: chunk * floor(col / chunk). `//` floors on plain Int32 but truncates on values
    derived from layout coordinates, so a `col` that may be negative comes with `shift`, a
    multiple of `chunk` that makes col + shift >= 0 (where both agree)."""
    if shift is None:
        return col // chunk * chunk
    return (col + shift) // chunk * chunk - shift


@dataclass(frozen=True)
class AttentionMask:
    """Window bounds of one m_block, and the masking of its boundary KV blocks."""

    tile_m: cutlass.Constexpr[int]
    tile_n: cutlass.Constexpr[int]
    has_left: cutlass.Constexpr[bool]  # window_left >= 0
    has_right: cutlass.Constexpr[bool]  # window_right >= 0 (causal: 0)
    window_left: Int32
    window_right: Int32
    seqlen: SeqlenInfo
    m_block: Int32
    rows_per_pos: cutlass.Constexpr[int] = 1  # GQA packing: query heads per KV head in the tile
    # attention_chunk C > 0 (FwdConfig.chunk); None: no chunk bound (decided at trace time).
    chunk: Optional[Int32] = None

    @property
    def has_chunk(self) -> bool:
        return self.chunk is not None

    def chunk_start(self, pos):
        """First key of the chunk of query position `pos` (>= 0): C * floor((pos + diag) / C).
        pos + diag < 0 for the first Lq - Lk positions (apply's rows come from layout
        coordinates): shifted up by a multiple of C."""
        shift = cute.ceil_div(cutlass.max(-self.diag, 0), self.chunk) * self.chunk
        return chunk_floor(pos + self.diag, self.chunk, shift)

    def pos(self, row):
        """The query position of tile row `row` (its index in the sequence's rows)."""
        return row if const_expr(self.rows_per_pos == 1) else row // self.rows_per_pos

    @property
    def pos_begin(self):
        """The first query position of this m_block."""
        return self.pos(self.m_block * self.tile_m)

    @property
    def pos_end(self):
        """One past the last query position of this m_block."""
        if const_expr(self.rows_per_pos == 1):
            return (self.m_block + 1) * self.tile_m
        return self.pos((self.m_block + 1) * self.tile_m - 1) + 1

    @property
    def diag(self):
        """Column of the diagonal for query position 0 (bottom-right alignment)."""
        return self.seqlen.seqlen_k - self.pos(self.seqlen.seqlen_q)

    @cute.jit
    def n_block_range(self):
        """[n_block_min, n_block_max): KV blocks with at least one kept key for this m_block."""
        n_block_max = cute.ceil_div(self.seqlen.seqlen_k, self.tile_n)
        if const_expr(self.has_right):
            col_max = self.pos_end + self.diag + self.window_right  # exclusive
            n_block_max = cutlass.min(n_block_max, cute.ceil_div(cutlass.max(col_max, 0), self.tile_n))
        n_block_min = Int32(0)
        if const_expr(self.has_left):
            col_min = self.pos_begin + self.diag - self.window_left
            n_block_min = cutlass.max(col_min, 0) // self.tile_n
        if const_expr(self.has_chunk):
            # from the first row's chunk to the end of the last row's
            first = self.chunk_start(self.pos_begin)
            end = self.chunk_start(self.pos_end - 1) + self.chunk  # exclusive
            n_block_min = cutlass.max(n_block_min, cutlass.max(first, 0) // self.tile_n)
            n_block_max = cutlass.min(n_block_max, cute.ceil_div(cutlass.max(end, 0), self.tile_n))
        return n_block_min, n_block_max

    @cute.jit
    def keys_end(self, rows) -> Int32:
        """One past the last key that any of the tile's first `rows` rows keeps (seqlen_k, or the
        right window / chunk edge of row rows - 1)."""
        end = Int32(self.seqlen.seqlen_k)
        last = self.pos(self.m_block * self.tile_m + rows - 1)
        if const_expr(self.has_right):
            end = cutlass.min(end, last + self.diag + self.window_right + 1)
        if const_expr(self.has_chunk):
            end = cutlass.min(end, self.chunk_start(last) + self.chunk)
        return end

    @cute.jit
    def n_block_min_right_masked(self, n_block_min: Int32) -> Int32:
        """Blocks >= this may contain keys right of the window (or chunk) for some row of the
        m_block: from the block of the first row's last kept key (the lowest right edge)."""
        if const_expr(not self.has_right and not self.has_chunk):
            return Int32(1 << 30)
        if const_expr(self.has_right):
            col = self.pos_begin + self.diag + self.window_right
            if const_expr(self.has_chunk):
                col = cutlass.min(col, self.chunk_start(self.pos_begin) + self.chunk - 1)
        else:
            col = self.chunk_start(self.pos_begin) + self.chunk - 1
        return cutlass.max(n_block_min, cutlass.max(col, 0) // self.tile_n)

    @cute.jit
    def n_block_max_left_masked(self, n_block_min: Int32) -> Int32:
        """Blocks < this may contain keys left of the window (or chunk) for some row of the
        m_block: up to the block of the last row's left edge (the highest)."""
        if const_expr(not self.has_left and not self.has_chunk):
            return n_block_min
        if const_expr(self.has_left):
            col = self.pos_end + self.diag - self.window_left
            if const_expr(self.has_chunk):
                col = cutlass.max(col, self.chunk_start(self.pos_end - 1))
        else:
            col = self.chunk_start(self.pos_end - 1)
        return cutlass.max(n_block_min, cute.ceil_div(cutlass.max(col, 0), self.tile_n))

    @cute.jit
    def apply(
        self,
        acc_S: cute.Tensor,
        thr_mma: cute.ThrMma,
        n_block: Int32,
        mask_seqlen: cutlass.Constexpr[bool],
        mask_right: cutlass.Constexpr[bool],
        mask_left: cutlass.Constexpr[bool],
        thr0_mma: cute.ThrMma,
    ):
        """Set masked scores of block `n_block` to -inf.

        `thr0_mma` is the MMA slice of thread 0: a thread's (row, col) is its own offset
        (tScS[0, 0]) plus thread 0's coordinates, which are compile-time constants, so the column
        limits are shifted once per row and every element compares a constant against them
        (no per-element address arithmetic, fewer live registers)."""
        s_mn = acc_to_mn(acc_S)
        cS = cute.make_identity_tensor((self.tile_m, self.tile_n))
        tScS = acc_to_mn(thr_mma.partition_C(cS))
        use_left = const_expr(mask_left and (self.has_left or self.has_chunk))
        use_right = const_expr(mask_right and (self.has_right or self.has_chunk))
        t0ScS = acc_to_mn(thr0_mma.partition_C(cS))
        row0 = self.m_block * self.tile_m + tScS[0, 0][0]
        col0 = n_block * self.tile_n + tScS[0, 0][1]
        for r in cutlass.range_constexpr(cute.size(s_mn.shape[0])):
            row = self.pos(row0 + t0ScS[r, 0][0])
            # Keep columns c (thread-0 coordinates) with lo <= c < hi.
            hi = Int32(self.seqlen.seqlen_k) - col0
            if const_expr(self.has_chunk):
                start = self.chunk_start(row) - col0  # the row's chunk is [start, start + C)
            if const_expr(use_right):
                if const_expr(self.has_right):
                    right = row + self.diag + self.window_right + 1 - col0
                    if const_expr(self.has_chunk):
                        right = cutlass.min(right, start + self.chunk)
                else:
                    right = start + self.chunk
                hi = cutlass.min(hi, right) if const_expr(mask_seqlen) else right
            if const_expr(not self.has_chunk):
                lo = row + self.diag - self.window_left - col0
            elif const_expr(self.has_left):
                lo = cutlass.max(row + self.diag - self.window_left - col0, start)
            else:
                lo = start
            # Selects, not branches: with `if` the compiler chains the monotone conditions
            # into a cascade of FSELs (10x the instructions, CPU SASS).
            for c in cutlass.range_constexpr(cute.size(s_mn.shape[1])):
                col = t0ScS[r, c][1]
                if const_expr(mask_seqlen or use_right):
                    s_mn[r, c] = -Float32.inf if col >= hi else s_mn[r, c]
                if const_expr(use_left):
                    s_mn[r, c] = -Float32.inf if col < lo else s_mn[r, c]


@dataclass(frozen=True)
class KeyBlockMask:
    """The backward's view of the same mask: one block of tile_n keys (`n_block`) against the
    query blocks of tile_m rows that see it, with scores transposed (S^T: keys are the rows of
    the accumulator, queries its columns). No GQA packing: rows are query positions.

    Each bound gives a key j a row range whose ends never decrease with j: rows
    [j - diag - window_right, j - diag + window_left] of the window, and with attention_chunk
    the rows [lo_C(j), hi_C(j)) whose chunk holds j, i.e. whose diagonal position i + diag lies
    in j's chunk: lo_C(j) = chunk_floor(j) - diag, hi_C(j) = lo_C(j) + C. So the chunk is one
    more lower and upper row edge, like the window's."""

    tile_m: cutlass.Constexpr[int]
    tile_n: cutlass.Constexpr[int]
    has_left: cutlass.Constexpr[bool]
    has_right: cutlass.Constexpr[bool]
    window_left: Int32
    window_right: Int32
    seqlen: SeqlenInfo
    n_block: Int32
    # attention_chunk C > 0 (BwdConfig.chunk); None: no chunk bound (decided at trace time).
    chunk: Optional[Int32] = None

    @property
    def has_chunk(self) -> bool:
        return self.chunk is not None

    @property
    def diag(self):
        return self.seqlen.seqlen_k - self.seqlen.seqlen_q

    @property
    def first_key(self):
        return self.n_block * self.tile_n

    @property
    def last_key(self):
        """The block's last key for the row bounds. Keys past seqlen_k are kept by no row, so any
        key from the last real one to the block's end bounds correctly: with a chunk the last
        real one (a phantom key's chunk may reach many query blocks further), else the block's
        end (the clamp costs at most one query block there, and a register: 8 bytes of stack at
        hdim 64 local, CPU SASS)."""
        if const_expr(self.has_chunk):
            return cutlass.min((self.n_block + 1) * self.tile_n, self.seqlen.seqlen_k) - 1
        return (self.n_block + 1) * self.tile_n - 1

    def chunk_rows_begin(self, key):
        """The first query row whose chunk holds `key` (>= 0): lo_C(key); hi_C(key) is C more."""
        return chunk_floor(key, self.chunk) - self.diag

    def lowest_row(self, key):
        """The first query row that keeps `key` (window's right edge, chunk start: the larger);
        with has_right or has_chunk only."""
        if const_expr(self.has_right):
            row = key - self.diag - self.window_right
            if const_expr(self.has_chunk):
                row = cutlass.max(row, self.chunk_rows_begin(key))
            return row
        return self.chunk_rows_begin(key)

    def rows_end(self, key):
        """One past the last query row that keeps `key` (window's left edge, chunk end: the
        smaller); with has_left or has_chunk only."""
        if const_expr(self.has_left):
            end = key - self.diag + self.window_left + 1
            if const_expr(self.has_chunk):
                end = cutlass.min(end, self.chunk_rows_begin(key) + self.chunk)
            return end
        return self.chunk_rows_begin(key) + self.chunk

    @cute.jit
    def m_block_range(self):
        """[m_block_min, m_block_max): query blocks with a row that keeps a key of this block:
        from the first key's lowest row to the end of the last key's rows (keys past seqlen_k
        are kept by no row)."""
        m_block_max = cute.ceil_div(self.seqlen.seqlen_q, self.tile_m)
        m_block_min = Int32(0)
        if const_expr(self.has_right or self.has_chunk):
            m_block_min = cutlass.max(self.lowest_row(self.first_key), 0) // self.tile_m
        if const_expr(self.has_left or self.has_chunk):
            end = cute.ceil_div(cutlass.max(self.rows_end(self.last_key), 0), self.tile_m)
            m_block_max = cutlass.min(m_block_max, end)
        return m_block_min, m_block_max

    @cute.jit
    def m_block_right_masked_end(self, m_block_min: Int32, m_block_max: Int32) -> Int32:
        """Blocks in [m_block_min, this) may hold a row below some key's lowest row (a row that
        drops a key of this block on the right side of its window, or before its chunk): they
        take the right mask. (The first row that keeps every key: the last key's lowest.)"""
        if const_expr(not self.has_right and not self.has_chunk):
            return m_block_min
        end = cute.ceil_div(cutlass.max(self.lowest_row(self.last_key), 0), self.tile_m)
        return cutlass.max(m_block_min, cutlass.min(end, m_block_max))

    @cute.jit
    def m_block_left_masked_begin(self, m_block_lo: Int32, m_block_max: Int32) -> Int32:
        """Blocks in [this, m_block_max) may hold a row past some key's highest row (past the
        left window edge, or past the key's chunk): they take the left mask. (The first row that
        drops a key: past the first key's highest.)"""
        if const_expr(not self.has_left and not self.has_chunk):
            return m_block_max
        begin = cutlass.max(self.rows_end(self.first_key), 0) // self.tile_m
        return cutlass.max(m_block_lo, cutlass.min(begin, m_block_max))

    @cute.jit
    def apply(
        self,
        acc_St: cute.Tensor,
        thr_mma: cute.ThrMma,
        thr0_mma: cute.ThrMma,
        m_block: Int32,
        mask_keys: cutlass.Boolean,
        mask_right: cutlass.Constexpr[bool],
        mask_left: cutlass.Constexpr[bool],
        keys_as_columns: cutlass.Constexpr[bool] = False,
    ):
        """Set masked entries of S^T (rows: this block's keys, columns: block m_block's rows) to
        -inf: keys at or past seqlen_k where `mask_keys` (the last key block; a runtime branch per
        row), and the window's and chunk's edges. Query rows past seqlen_q are not masked here:
        the backward's LSE is +inf there, so their probabilities are 0. Column limits per row as
        in AttentionMask.apply (thread 0's coordinates are compile-time constants).
        keys_as_columns: the accumulator is S (rows: queries, columns: keys; the backward's
        dkv_transposed), walked through a transposed view the same way."""
        tile = (self.tile_m, self.tile_n) if const_expr(keys_as_columns) else (self.tile_n, self.tile_m)
        ki, qi = (1, 0) if const_expr(keys_as_columns) else (0, 1)  # which coordinate is the key
        cS = cute.make_identity_tensor(tile)
        s_mn, tScS, t0ScS = (acc_to_mn(t) for t in (acc_St, thr_mma.partition_C(cS), thr0_mma.partition_C(cS)))
        if const_expr(keys_as_columns):
            s_mn, tScS, t0ScS = (mn_transposed(t) for t in (s_mn, tScS, t0ScS))
        key0 = self.n_block * self.tile_n + tScS[0, 0][ki]
        col0 = m_block * self.tile_m + tScS[0, 0][qi]
        use_right = const_expr(mask_right and (self.has_right or self.has_chunk))
        use_left = const_expr(mask_left and (self.has_left or self.has_chunk))
        for r in cutlass.range_constexpr(cute.size(s_mn.shape[0])):
            key = key0 + t0ScS[r, 0][ki]
            if mask_keys:
                if key >= self.seqlen.seqlen_k:
                    for c in cutlass.range_constexpr(cute.size(s_mn.shape[1])):
                        s_mn[r, c] = -Float32.inf
            if const_expr(use_right or use_left):
                # Keep columns c (thread-0 coordinates) with lo <= c <= hi.
                if const_expr(use_right):
                    lo = self.lowest_row(key) - col0
                if const_expr(use_left):
                    hi = self.rows_end(key) - 1 - col0
                for c in cutlass.range_constexpr(cute.size(s_mn.shape[1])):
                    col = t0ScS[r, c][qi]
                    if const_expr(use_right):
                        s_mn[r, c] = -Float32.inf if col < lo else s_mn[r, c]
                    if const_expr(use_left):
                        s_mn[r, c] = -Float32.inf if col > hi else s_mn[r, c]
