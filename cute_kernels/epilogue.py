"""The forward's epilogue: O and LSE out of the consumer warpgroups, and split-KV's partials.

`EpilogueSm90.store`: O = acc_O / rowsum, converted, staged in smem per consumer warp (its 16
rows, O_SLAB_ROWS) and stored by TMA or by predicated 16-byte stores; `store_split`: split-KV's
float32 partial O straight from registers; `store_lse`: the rows' LSE from the lanes that hold
column 0. The kernel builds one with `EpilogueSm90.create` and hands it the output operands as
an `OutputOperands`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Type

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync
from cutlass.utils import LayoutEnum

from cute_kernels.config import FwdConfig
from cute_kernels.mask import SeqlenInfo
from cute_kernels.softmax import OnlineSoftmax
from cute_kernels.utils import NamedBarrierFwd, acc_to_mn, convert_to, store_acc_predicated, store_slab_predicated

O_SLAB_ROWS = 16  # rows of O one warp holds (WGMMA: warp w of a warpgroup owns rows 16w .. 16w+15)


@dataclass(frozen=True)
class OutputOperands:
    """Where the epilogue writes: O in global memory (`mO`; its TMA view `tma_O` and atom, None
    for split-KV), LSE, O's smem staging buffer and O's MMA over one column chunk."""

    mO: cute.Tensor
    tma_O: Optional[cute.Tensor]
    tma_atom_O: Optional[cute.CopyAtom]
    mLSE: cute.Tensor
    sO: cute.Tensor
    tiled_mma_o: cute.TiledMma


@dataclass(frozen=True)
class EpilogueSm90:
    """The epilogue's compile-time shape: O's element type and tile, how O is staged (o_chunks
    column chunks; in its own smem or in sQ's) and stored (TMA or predicated stores), and the
    query layout (packed sequences, seqused_q; hdimv_in: O's head dim where below the tile's)."""

    dtype: Type[cutlass.Numeric]
    tile_m: int
    hdimv: int
    o_chunks: int
    tma_store: bool
    separate_o: bool
    packed_q: bool
    seqused_q: bool
    hdimv_in: int
    num_mma_threads: int
    o_split: int = 1  # warpgroups sharing each slab's rows, each with hdimv / o_split of O's columns

    @staticmethod
    def create(cfg: FwdConfig, dtype: Type[cutlass.Numeric], separate_o: bool, num_mma_threads: int) -> "EpilogueSm90":
        t = cfg.tile
        return EpilogueSm90(dtype, t.tile_m, cfg.hdimv, t.o_chunks, t.tma_store, separate_o, cfg.cu_seqlens_q,
                            cfg.seqused_q, cfg.hdimv_in, num_mma_threads, t.o_split)

    @property
    def o_cols(self) -> int:
        """Columns of O one warpgroup holds (all of them unless o_split)."""
        return self.hdimv // self.o_split

    @property
    def o_width(self) -> int:
        """Columns of O a warp stages in smem at a time."""
        return self.o_cols // self.o_chunks

    @cute.jit
    def store(self, acc_O, softmax: OnlineSoftmax, out: OutputOperands, tiled_mma_pv, tidx, m_block, head, batch,
              seqlen: SeqlenInfo, release_q, col_part=0):
        """O = acc_O / rowsum -> bf16 -> smem (stmatrix) -> global, each consumer warp on its own:
        it stages the 16 rows its accumulator holds in its own sO slab and stores them with one
        TMA (the box clips at the tensor's last row), or, where the slab runs past the end of a
        packed / seqused sequence (TMA would write the next sequence's rows), with predicated
        16-byte stores. With o_chunks 2 the slab is half as wide and O goes through it in two
        column chunks. No barrier across warps except, when sO aliases sQ, one that waits for
        every warpgroup's last QK^T. LSE from the lanes that own column 0. o_split: `tidx` is the
        thread's place in its slab's MMA, `col_part` its warpgroup's part of O's columns (slabs
        and chunk `col_part` of that width; the LSE from part 0)."""
        inv_sum = softmax.finalize()
        softmax.rescale_O(acc_O, inv_sum, lazy=False)
        rO = cute.make_rmem_tensor_like(acc_O, self.dtype)
        convert_to(acc_O, rO)
        b_q = batch if const_expr(not self.packed_q) else 0
        rows_left = seqlen.seqlen_q - m_block * self.tile_m

        if const_expr(not self.separate_o):
            # sO overlays sQ, whose rows every warpgroup reads: wait for all last QK^Ts.
            cute.arch.barrier(barrier_id=int(NamedBarrierFwd.Epilogue), number_of_threads=self.num_mma_threads)
        tma = self.tma_store
        if const_expr(tma):
            # This warp's previous TMA store has read its slab (only the issuing lane has one).
            cute.arch.cp_async_bulk_wait_group(0, read=True)
        cute.arch.sync_warp()  # and every lane's loads of its previous predicated store are done
        store_atom = sm90_utils.sm90_get_smem_store_op(LayoutEnum.ROW_MAJOR, self.dtype, Float32)
        chunks = self.o_chunks
        # The stmatrix copy of one chunk-wide tile of O. With one MMA tile per thread in M and N,
        # a chunk of the accumulator's columns is a contiguous run of its (column-major)
        # registers: chunk c starts at c * size(rO_chunk).
        mma_chunk = tiled_mma_pv if const_expr(chunks == 1) else out.tiled_mma_o
        thr_copy_O = cute.make_tiled_copy_C(store_atom, mma_chunk).get_slice(tidx)
        rO_chunk = cute.make_layout(mma_chunk.partition_shape_C((self.tile_m, self.o_width)))
        assert chunks == 1 or cute.size(rO.shape[1]) * cute.size(rO.shape[2]) == 1
        warp = tidx // 32  # rows O_SLAB_ROWS * warp .. of the tile: this warp's accumulator rows
        sO_part = out.sO
        if const_expr(self.o_split > 1):
            sO_part = cute.local_tile(out.sO, (self.tile_m, self.o_width), (0, col_part))
        sO_w = cute.local_tile(sO_part, (O_SLAB_ROWS, self.o_width), (warp, 0))
        rows_w = rows_left - warp * O_SLAB_ROWS
        m_slab = m_block * (self.tile_m // O_SLAB_ROWS) + warp
        # By TMA: a full slab, or any slab of an unpacked tensor without seqused_q (the box clips
        # at the tensor's last row); otherwise the rows there are, by predicated stores.
        ragged = self.packed_q or self.seqused_q
        by_tma = (rows_w >= O_SLAB_ROWS if const_expr(ragged) else rows_w > 0) if const_expr(tma) else False
        for c in cutlass.range_constexpr(chunks):
            if const_expr(c > 0):
                # The previous chunk has been read out of this warp's slab.
                if const_expr(tma):
                    cute.arch.cp_async_bulk_wait_group(0, read=True)
                cute.arch.sync_warp()
            rO_c = rO if const_expr(chunks == 1) else cute.make_tensor(
                rO.iterator + c * cute.size(rO_chunk), rO_chunk)
            cute.copy(thr_copy_O, thr_copy_O.retile(rO_c), thr_copy_O.partition_D(sO_part))
            if const_expr(tma):
                cute.arch.fence_view_async_shared()  # stmatrix writes -> the TMA's async-proxy reads
            cute.arch.sync_warp()
            chunk = c if const_expr(self.o_split == 1) else col_part
            if by_tma:
                self.store_slab_tma(out.tma_O, out.tma_atom_O, sO_w, m_slab, chunk, head, b_q, seqlen)
            elif rows_w > 0:
                self.store_slab_predicated(out.mO, sO_w, rows_w, m_slab, chunk, head, b_q, seqlen)
        # LSE (after the fence: its global stores need not complete before the TMA store issues).
        if col_part == 0:
            self.store_lse(softmax, out.mLSE, tiled_mma_pv, tidx, m_block, head, b_q, seqlen.offset_q, rows_left)
        if const_expr(release_q is not None):
            # sO (= sQ) read back by this warp's TMA / loads: the next tile's Q may land there.
            if const_expr(tma):
                cute.arch.cp_async_bulk_wait_group(0, read=True)
            cute.arch.sync_warp()
            release_q()

    @cute.jit
    def store_lse(self, softmax: OnlineSoftmax, mLSE, tiled_mma_pv, tidx, m_block, head, b, offset, rows_left):
        """The lanes holding column 0 write their rows' LSE (rows of sequence `b` from `offset`)."""
        tOcO = acc_to_mn(tiled_mma_pv.get_slice(tidx).partition_C(
            cute.make_identity_tensor((self.tile_m, self.o_cols))))
        mLSE_cur = cute.domain_offset((offset,), mLSE[None, head, b])
        if tOcO[0, 0][1] == 0:
            for r in cutlass.range_constexpr(cute.size(softmax.row_sum)):
                row = tOcO[r, 0][0]
                if row < rows_left:
                    mLSE_cur[m_block * self.tile_m + row] = softmax.row_sum[r]

    @cute.jit
    def store_split(self, acc_O, softmax: OnlineSoftmax, out: OutputOperands, tiled_mma_pv, tidx, m_block, head,
                    batch, split, num_splits, num_batch, seqlen: SeqlenInfo, release_q, col_part=0):
        """Split-KV: this split's O, normalized by its own row sums, in float32 straight from the
        accumulator registers to global memory (no smem), and its LSE. Split s of sequence b is
        batch s * num_batch + b of the partial tensors, or, with packed queries, its rows start at
        s * total_q + offset_q. An empty split writes O = 0 and LSE = -inf."""
        inv_sum = softmax.finalize()
        softmax.rescale_O(acc_O, inv_sum, lazy=False)
        rows_left = seqlen.seqlen_q - m_block * self.tile_m
        if const_expr(self.packed_q):
            b_o, offset = Int32(0), seqlen.offset_q + split * (out.mO.shape[0] // num_splits)
        else:
            b_o, offset = batch + split * num_batch, seqlen.offset_q
        mO_cur = cute.domain_offset((offset, 0), out.mO[None, None, head, b_o])
        gO = cute.local_tile(mO_cur, (self.tile_m, self.o_cols), (m_block, col_part))
        store_acc_predicated(acc_O, tiled_mma_pv.get_slice(tidx), gO, (self.tile_m, self.o_cols), rows_left,
                             self.hdimv_in)
        if col_part == 0:
            self.store_lse(softmax, out.mLSE, tiled_mma_pv, tidx, m_block, head, b_o, offset, rows_left)
        if const_expr(release_q is not None):
            cute.arch.sync_warp()
            release_q()

    @cute.jit
    def store_slab_tma(self, tma_O, tma_atom_O, sO_w, m_slab, chunk, head, b_q, seqlen: SeqlenInfo):
        mO_cur = cute.domain_offset((seqlen.offset_q, 0), tma_O[None, None, head, b_q])
        gO_w = cute.local_tile(mO_cur, (O_SLAB_ROWS, self.o_width), (m_slab, chunk))
        tOsO, tOgO = cpasync.tma_partition(tma_atom_O, 0, cute.make_layout(1),
                                           cute.group_modes(sO_w, 0, 2), cute.group_modes(gO_w, 0, 2))
        cute.copy(tma_atom_O, tOsO, tOgO)  # issued by one elected lane
        cute.arch.cp_async_bulk_commit_group()

    @cute.jit
    def store_slab_predicated(self, mO, sO_w, rows_w, m_slab, chunk, head, b_q, seqlen: SeqlenInfo):
        """The warp's first `rows_w` slab rows (column chunk `chunk`) by 16-byte stores."""
        mO_cur = cute.domain_offset((seqlen.offset_q, 0), mO[None, None, head, b_q])
        gO_w = cute.local_tile(mO_cur, (O_SLAB_ROWS, self.o_width), (m_slab, chunk))
        store_slab_predicated(sO_w, gO_w, rows_w, self.hdimv_in, chunk * self.o_width)
