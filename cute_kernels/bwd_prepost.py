"""The sm90 backward's pre- and post-processing kernels, in CuTe DSL, around bwd_sm90's main
kernel; one CTA per (query block of tile_m rows, head, batch) in both.

  preprocess   dPsum = rowsum(dO * O) in float32 and LSE_log2 = LSE * log2(e) (+inf where LSE
               is -inf and on the padding rows of the sequence's last block) into the padded
               per-sequence rows (bwd_sm90.padded_offset), and the block's chunk of the dQ
               accumulator zeroed. 16 threads per row, one 16-byte vector each per 128 columns.
  postprocess  dQ = softmax_scale * the accumulator's chunk, read in the consumer threads'
               order and written through the main kernel's own dQ MMA partition (the same
               tiled MMA: no permutation table to keep in step), converted to the tensors'
               dtype, rows before seqlen_q and columns before the tensors' head dim; with
               `dq_smem` staged in smem by that partition (stmatrix) and stored by 16-byte
               row-contiguous stores, a slab a warp (`dq_slab`).

`bwd_launch.preprocess` / `postprocess` are the same steps in torch ops: the CPU path and the
reference the GPU tests compare these kernels with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
import cutlass.utils as cutlass_utils
from cutlass import Float32, Int32, const_expr

from cute_kernels.bwd_sm90 import DTYPES, THREADS_PER_WG, FlashAttentionBackwardSm90, padded_offset
from cute_kernels.config import BwdConfig
from cute_kernels.mask import SeqlenInfo
from cute_kernels.utils import (
    assume_aligned_strides,
    convert_to,
    lse_shb,
    make_smem_layout,
    sdhb,
    stage_acc,
    store_acc_predicated,
    store_slab_predicated,
)

LOG2E = 1.4426950408889634
VEC = 8  # 16-bit elements per 16-byte vector
ROW_THREADS = 16  # preprocess: threads per row
PRE_THREADS = 128


@dataclass(frozen=True)
class BwdRowsConfig:
    """The compile key of a pre- or post-processing kernel: what of the backward's BwdConfig
    their code depends on."""

    kind: str  # "pre" | "post"
    dtype: str
    hdim: int
    tile_m: int
    hdim_in: int = 0
    cu_seqlens_q: bool = False
    seqused_q: bool = False
    hdimv: int = 0  # O / dO's head dim where below hdim (192 x 128; the tensors' own, unpadded)
    dkv_transposed: bool = False  # the main kernel's three-warpgroup hdim 192 tile (its dQ order)
    # post: dQ staged in smem (stmatrix, through the dQ MMA's partition) and written by 16-byte
    # row-contiguous stores, a slab of rows (x columns) per warp; otherwise element-wise from the
    # registers (4-byte stores, each 32-byte sector written twice, as dK / dV were)
    dq_smem: bool = False
    # launched with programmatic dependent launch, as the main kernel (BwdConfig.pdl): both wait
    # (griddepcontrol.wait) before reading what the kernel before them wrote; the preprocessing
    # then lets the main kernel launch at once (it reads nothing of ours before its own wait)
    pdl: bool = False

    @staticmethod
    def of(kind: str, cfg: BwdConfig, dq_smem: bool = False) -> "BwdRowsConfig":
        return BwdRowsConfig(kind, cfg.dtype, cfg.hdim, cfg.tile_m, cfg.hdim_in, cfg.cu_seqlens_q, cfg.seqused_q,
                             cfg.hdimv, cfg.dkv_transposed, dq_smem and kind == "post", cfg.pdl)

    @property
    def o_cols(self) -> tuple[int, int]:
        """O / dO's columns: (in the kernel's vectors, in the tensors)."""
        return (self.hdimv, self.hdimv) if self.hdimv else (self.hdim, self.hdim_in or self.hdim)

    def short(self) -> str:
        dv = f"x{self.hdimv}" if self.hdimv else ""
        return f"bwd-{self.kind} {self.dtype} d{self.hdim}{dv} m{self.tile_m} {self.hdim_in or ''} " \
               f"{'varlen' if self.cu_seqlens_q else ''} {'seqused' if self.seqused_q else ''}" \
               f"{' dkv_transposed' if self.dkv_transposed else ''}{' dq_smem' if self.dq_smem else ''}" \
               f"{' pdl' if self.pdl else ''}"

    def bwd_config(self) -> BwdConfig:
        """The main kernel's config (BWD_TILES' entry of this head dim, at this tile_m: a
        BWD_TILE_M_VARIANTS one too), whose dQ MMA the postprocessing reads the accumulator
        through."""
        cfg = BwdConfig.make(self.dtype, self.hdim, tile_m=self.tile_m, hdim_in=self.hdim_in,
                             cu_seqlens_q=self.cu_seqlens_q, seqused_q=self.seqused_q, hdimv=self.hdimv,
                             dkv_transposed=self.dkv_transposed)
        assert cfg.tile_m == self.tile_m, f"{self.short()}: the main kernel's tile_m is {cfg.tile_m}"
        return cfg


def _query_block(cfg: BwdRowsConfig, mX, mCuSeqlensQ, mSeqUsedQ):
    """This CTA's (m_block, head, batch), its sequence's SeqlenInfo, the batch index of mX
    (0 when packed) and the sequence's first padded row."""
    m_block, head, batch = cute.arch.block_idx()
    seqlen = SeqlenInfo.create(batch, seqlen_q_static=mX.shape[0], seqlen_k_static=0, mCuSeqlensQ=mCuSeqlensQ,
                               mSeqUsedQ=mSeqUsedQ)
    b = batch if const_expr(not cfg.cu_seqlens_q) else 0
    row_offset = padded_offset(seqlen.offset_q, batch, cfg.tile_m) if const_expr(cfg.cu_seqlens_q) else 0
    return m_block, head, batch, seqlen, b, row_offset


class BwdPreprocessSm90:
    def __init__(self, cfg: BwdRowsConfig):
        self.cfg = cfg
        self.dtype = DTYPES[cfg.dtype]
        self.vecs = -(-cfg.o_cols[0] // (ROW_THREADS * VEC))  # 16-byte vectors per thread per row

    @cute.jit
    def __call__(self, mO: cute.Tensor, mdO: cute.Tensor, mLSE: cute.Tensor, mLSE2: cute.Tensor,
                 mdPsum: cute.Tensor, mdQacc: cute.Tensor, mCuSeqlensQ: Optional[cute.Tensor],
                 mSeqUsedQ: Optional[cute.Tensor], max_seqlen_q: Int32, stream: cuda.CUstream):
        cfg = self.cfg
        mO, mdO = [sdhb(assume_aligned_strides(t, VEC), cfg.cu_seqlens_q) for t in (mO, mdO)]
        mLSE, mLSE2, mdPsum, mdQacc = [lse_shb(t, cfg.cu_seqlens_q) for t in (mLSE, mLSE2, mdPsum, mdQacc)]
        batch = cute.size(mO.shape[3]) if const_expr(not cfg.cu_seqlens_q) else mCuSeqlensQ.shape[0] - 1
        self.kernel(mO, mdO, mLSE, mLSE2, mdPsum, mdQacc, mCuSeqlensQ, mSeqUsedQ).launch(
            grid=[cute.ceil_div(max_seqlen_q, cfg.tile_m), cute.size(mO.shape[2]), batch],
            block=[PRE_THREADS, 1, 1], stream=stream, use_pdl=cfg.pdl)

    @cute.kernel
    def kernel(self, mO: cute.Tensor, mdO: cute.Tensor, mLSE: cute.Tensor, mLSE2: cute.Tensor,
               mdPsum: cute.Tensor, mdQacc: cute.Tensor, mCuSeqlensQ: Optional[cute.Tensor],
               mSeqUsedQ: Optional[cute.Tensor]):
        cfg = self.cfg
        tidx = cute.arch.thread_idx()[0]
        m_block, head, batch, seqlen, b, row_offset = _query_block(cfg, mO, mCuSeqlensQ, mSeqUsedQ)
        if const_expr(cfg.pdl):
            cute.arch.griddepcontrol_wait()  # O / dO / LSE: the kernels before this one wrote them
            # the main kernel may launch: it reads nothing of ours before its own wait
            cute.arch.griddepcontrol_launch_dependents()
        if m_block * cfg.tile_m < seqlen.seqlen_q:
            d_in = cfg.o_cols[1]
            mO_cur = cute.domain_offset((seqlen.offset_q, 0), mO[None, None, head, b])
            mdO_cur = cute.domain_offset((seqlen.offset_q, 0), mdO[None, None, head, b])
            mLSE_cur = cute.domain_offset((seqlen.offset_q,), mLSE[None, head, b])
            mLSE2_cur = cute.domain_offset((row_offset,), mLSE2[None, head, b])
            mdPsum_cur = cute.domain_offset((row_offset,), mdPsum[None, head, b])
            col = (tidx % ROW_THREADS) * VEC
            rows_per_pass = PRE_THREADS // ROW_THREADS
            for p in cutlass.range_constexpr(cfg.tile_m // rows_per_pass):
                r = p * rows_per_pass + tidx // ROW_THREADS
                pos = m_block * cfg.tile_m + r
                acc = Float32(0.0)
                if pos < seqlen.seqlen_q:
                    for v in cutlass.range_constexpr(self.vecs):
                        c = col + v * ROW_THREADS * VEC
                        if c < d_in:
                            o = cute.make_rmem_tensor((VEC,), self.dtype)
                            do = cute.make_rmem_tensor((VEC,), self.dtype)
                            cute.autovec_copy(cute.local_tile(mO_cur[pos, None], (VEC,), (c // VEC,)), o)
                            cute.autovec_copy(cute.local_tile(mdO_cur[pos, None], (VEC,), (c // VEC,)), do)
                            for i in cutlass.range_constexpr(VEC):
                                acc += o[i].to(Float32) * do[i].to(Float32)
                for off in (8, 4, 2, 1):  # the row's 16 lanes
                    acc += cute.arch.shuffle_sync_bfly(acc, offset=off)
                if tidx % ROW_THREADS == 0:
                    lse2 = Float32.inf
                    if pos < seqlen.seqlen_q:
                        lse = mLSE_cur[pos]
                        lse2 = Float32.inf if lse == -Float32.inf else lse * LOG2E
                    mLSE2_cur[pos] = lse2
                    mdPsum_cur[pos] = acc
            # the block's dQ accumulator chunk
            chunk = cfg.tile_m * cfg.hdim
            mdQ_cur = cute.domain_offset((row_offset * cfg.hdim,), mdQacc[None, head, b])
            gdQ = cute.local_tile(mdQ_cur, (chunk,), (m_block,))
            for i in cutlass.range_constexpr(chunk // (4 * PRE_THREADS)):
                zero = cute.make_rmem_tensor((4,), Float32)
                zero.fill(0.0)
                dst = (gdQ.iterator + 4 * (i * PRE_THREADS + tidx)).align(16)  # chunks start at 64-row multiples
                cute.autovec_copy(zero, cute.make_tensor(dst, cute.make_layout(4)))

    @staticmethod
    def fake_args(cfg: BwdRowsConfig, env_stream: bool = False):
        sym, sym64 = cute.sym_int, cute.sym_int64
        dt = DTYPES[cfg.dtype]
        b, sq, h = sym(), sym(), sym()
        q_rows = (sym(),) if cfg.cu_seqlens_q else (b, sq)
        d = cfg.o_cols[1]

        def t(shape, dtype, div, align):
            stride = tuple(1 if i == len(shape) - 1 else sym64(divisibility=div) for i in range(len(shape)))
            return cute.runtime.make_fake_tensor(dtype, shape, stride=stride, assumed_align=align)

        rows = lambda n: (h, n) if cfg.cu_seqlens_q else (b, h, n)
        vec = lambda n: cute.runtime.make_fake_tensor(Int32, (n,), stride=(1,), assumed_align=4)
        return (t((*q_rows, h, d), dt, VEC, 16), t((*q_rows, h, d), dt, VEC, 16),
                t(rows(q_rows[0] if cfg.cu_seqlens_q else sq), Float32, 1, 4),
                t(rows(sym(divisibility=cfg.tile_m)), Float32, 4, 16), t(rows(sym(divisibility=cfg.tile_m)), Float32, 4, 16),
                t(rows(sym(divisibility=cfg.tile_m * cfg.hdim)), Float32, 4, 16),
                vec(sym()) if cfg.cu_seqlens_q else None, vec(b) if cfg.seqused_q else None,
                Int32(1), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=env_stream))


class BwdPostprocessSm90:
    def __init__(self, cfg: BwdRowsConfig):
        self.cfg = cfg
        self.dtype = DTYPES[cfg.dtype]
        self.main = FlashAttentionBackwardSm90(cfg.bwd_config())

    @cute.jit
    def __call__(self, mdQacc: cute.Tensor, mdQ: cute.Tensor, mCuSeqlensQ: Optional[cute.Tensor],
                 mSeqUsedQ: Optional[cute.Tensor], softmax_scale: Float32, max_seqlen_q: Int32,
                 stream: cuda.CUstream):
        cfg = self.cfg
        mdQ = sdhb(assume_aligned_strides(mdQ, VEC), cfg.cu_seqlens_q)
        mdQacc = lse_shb(mdQacc, cfg.cu_seqlens_q)
        _, _, tiled_mma_dq = self.main.make_tiled_mmas()
        batch = cute.size(mdQ.shape[3]) if const_expr(not cfg.cu_seqlens_q) else mCuSeqlensQ.shape[0] - 1
        # dq_smem: the block of dQ in smem, rows x head dim, its swizzle atom within a warpgroup's
        # columns where the warpgroups split them (hdim 96: 48 each)
        main = self.main
        wg_cols = None if const_expr(main.dq_split_rows or main.dq_swap_ab) else cfg.hdim // main.num_wg
        sdQ_layout = make_smem_layout(self.dtype, (cfg.tile_m, cfg.hdim), atom_cols=wg_cols) \
            if const_expr(cfg.dq_smem) else None

        @cute.struct
        class SharedStorage:
            sdQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sdQ_layout) if const_expr(
                cfg.dq_smem) else 0], 1024]

        self.kernel(mdQacc, mdQ, mCuSeqlensQ, mSeqUsedQ, softmax_scale, tiled_mma_dq, sdQ_layout,
                    SharedStorage).launch(
            grid=[cute.ceil_div(max_seqlen_q, cfg.tile_m), cute.size(mdQ.shape[2]), batch],
            block=[self.main.num_wg * THREADS_PER_WG, 1, 1], smem=SharedStorage.size_in_bytes(), stream=stream,
            use_pdl=cfg.pdl)

    def dq_slab(self) -> tuple[int, int]:
        """dq_smem: the (rows, columns) of the block one warp stores: tile_m / warps rows of every
        column, or where the warps do not divide tile_m (three warpgroups, 64 rows) 16 rows of
        hdim / (warps / (tile_m / 16)) columns."""
        warps, tile_m, hdim = self.main.num_wg * 4, self.cfg.tile_m, self.cfg.hdim
        if tile_m % warps == 0:
            return tile_m // warps, hdim
        assert tile_m % 16 == 0 and warps % (tile_m // 16) == 0 and hdim % (warps // (tile_m // 16) * 8) == 0
        return 16, hdim // (warps // (tile_m // 16))

    @cute.kernel
    def kernel(self, mdQacc: cute.Tensor, mdQ: cute.Tensor, mCuSeqlensQ: Optional[cute.Tensor],
               mSeqUsedQ: Optional[cute.Tensor], softmax_scale: Float32, tiled_mma_dq: cute.TiledMma,
               sdQ_layout: Optional[cute.ComposedLayout], SharedStorage: cutlass.Constexpr):
        cfg = self.cfg
        tidx = cute.arch.thread_idx()[0]
        m_block, head, batch, seqlen, b, row_offset = _query_block(cfg, mdQ, mCuSeqlensQ, mSeqUsedQ)
        if const_expr(cfg.pdl):
            cute.arch.griddepcontrol_wait()  # the main kernel's dQ accumulator
        rows_left = seqlen.seqlen_q - m_block * cfg.tile_m
        if rows_left > 0:
            main = self.main
            # this thread's values, as the main kernel's consumer thread `tidx` wrote them to sdQ
            mdQ_acc = cute.domain_offset((row_offset * cfg.hdim,), mdQacc[None, head, b])
            chunk = cute.local_tile(mdQ_acc, (cfg.tile_m * cfg.hdim,), (m_block,))
            per_thread = main.dq_per_thread
            wg, t = tidx // THREADS_PER_WG, tidx % THREADS_PER_WG
            base = (chunk.iterator + wg * THREADS_PER_WG * per_thread + 4 * t).align(16)
            src = cute.make_tensor(base, cute.make_layout((4, per_thread // 4), stride=(1, 4 * THREADS_PER_WG)))
            thr = tiled_mma_dq.get_slice(tidx)
            acc = cute.make_rmem_tensor(tiled_mma_dq.partition_shape_C(main.dq_tile), Float32)
            cute.autovec_copy(src, cute.make_tensor(acc.iterator, cute.make_layout(src.shape)))
            for i in cutlass.range_constexpr(cute.size(acc)):
                acc[i] = acc[i] * softmax_scale
            r16 = cute.make_rmem_tensor_like(acc, self.dtype)
            convert_to(acc, r16)
            mdQ_cur = cute.domain_offset((seqlen.offset_q, 0), mdQ[None, None, head, b])
            gdQ = cute.local_tile(mdQ_cur, (cfg.tile_m, cfg.hdim), (m_block, 0))
            if const_expr(cfg.dq_smem):
                storage = cutlass_utils.SmemAllocator().allocate(SharedStorage)
                sdQ = storage.sdQ.get_tensor(sdQ_layout.outer, swizzle=sdQ_layout.inner)
                stage_acc(r16, tiled_mma_dq, tidx, sdQ, transposed=main.dq_swap_ab)  # (dq_swap_ab: dQ^T's)
                cute.arch.barrier()
                slab = self.dq_slab()
                warp, col_slabs = tidx // 32, cfg.hdim // slab[1]
                rb, cb = warp // col_slabs, warp % col_slabs
                store_slab_predicated(cute.local_tile(sdQ, slab, (rb, cb)), cute.local_tile(gdQ, slab, (rb, cb)),
                                      rows_left - rb * slab[0], cfg.hdim_in, cb * slab[1])
            else:
                store_acc_predicated(r16, thr, gdQ, (cfg.tile_m, cfg.hdim), rows_left, cfg.hdim_in,
                                     transposed=main.dq_swap_ab)

    @staticmethod
    def fake_args(cfg: BwdRowsConfig, env_stream: bool = False):
        sym, sym64 = cute.sym_int, cute.sym_int64
        dt = DTYPES[cfg.dtype]
        b, sq, h = sym(), sym(), sym()
        q_rows = (sym(),) if cfg.cu_seqlens_q else (b, sq)
        d = cfg.hdim_in or cfg.hdim
        stride = lambda n: tuple(1 if i == n - 1 else sym64(divisibility=VEC) for i in range(n))
        dq = cute.runtime.make_fake_tensor(dt, (*q_rows, h, d), stride=stride(len(q_rows) + 2), assumed_align=16)
        acc_shape = (h, sym(divisibility=cfg.tile_m * cfg.hdim)) if cfg.cu_seqlens_q else \
            (b, h, sym(divisibility=cfg.tile_m * cfg.hdim))
        acc = cute.runtime.make_fake_tensor(Float32, acc_shape, stride=tuple(
            1 if i == len(acc_shape) - 1 else sym64(divisibility=4) for i in range(len(acc_shape))), assumed_align=16)
        vec = lambda n: cute.runtime.make_fake_tensor(Int32, (n,), stride=(1,), assumed_align=4)
        return (acc, dq, vec(sym()) if cfg.cu_seqlens_q else None, vec(b) if cfg.seqused_q else None,
                Float32(1.0), Int32(1), cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=env_stream))
