"""FlashAttention-3-style forward attention for sm90 (H100/H200), bf16/fp16, in CuTe DSL.

Warp roles (128 x (1 + W) threads, W = tile_m / 64 consumer warpgroups, 2 or 3):
  WG0 (warps 0-3)  producer. setmaxnreg down to `producer_regs`; warp 0 issues every TMA load
                   (Q once per tile, then K and V per KV block, last block first).
  WG1 .. WG<W>     consumers. setmaxnreg up to `consumer_regs` (24/240 for W = 2, 24/160 for
                   W = 3: config.REG_SPLIT); WG i owns Q rows 64(i-1) .. 64i-1 of the tile.
                   Each runs S = Q K^T (SS WGMMA), masking, online softmax in exp2,
                   O += P V (RS WGMMA, P stays in registers), then the epilogue.

Pipelines (PipelineTmaAsync, mbarriers in smem; counts asserted at trace time by
`pipeline.check_arrive_counts`):
  pipeline_q  q_stages (1, 2).  full: 1 producer arrive + Q tx bytes; empty: 4W consumer warps.
              With 2, the producer loads the next tile's Q while the consumers run this one.
  pipeline_k  num_stages.       full: 1 producer arrive + K tx bytes; empty: 4W consumer warps.
  pipeline_v  num_stages.       full: 1 producer arrive + V tx bytes; empty: 4W consumer warps.
              (fp8_v_rows: v_rows_stages of V's rows (v_rows_keys a stage), emptied by the 3
              transposing warps, and
  pipeline_vt num_stages of V^T,  full: 96 transposing threads; empty: 4W consumer warps.)
  (Consumer release arrives once per warp: lane 0 of each consumer warp.)

Named barriers (NamedBarrierFwd):
  WarpSchedulerWG1..W  pingpong ring: consumer WG i syncs on its own barrier (256 = own 128 +
                      128 arrivals of WG i-1) before issuing GEMMs and arrives on WG i+1's
                      barrier (mod W) right after, so one WG's softmax overlaps the others'
                      GEMMs. W = 2 is FA3's pingpong, W = 3 FA3's 3-WG round robin.
  Epilogue            128W consumer threads, only where sO aliases sQ (no room for sO): every
                      WG's last QK^T is done before any warp stages O. Otherwise each consumer
                      warp stages and stores its own 16 rows of O (TMA store) with no barrier,
                      in o_chunks column chunks (hdim 256: two, so sO fits beside Q).

Intra-warpgroup overlap: the consumer issues QK^T for block n and PV for block n+1 (already
softmaxed) back to back, then does the softmax of block n while PV runs. Without it (the plain
schedule) and with diag_half, a warpgroup whose rows see none of the first block's second half
(the causal diagonal) runs that block over its first tile_n / 2 keys only. With short_first, a
tile whose first block (the sequence's last) holds at most short_first keys runs that block's
QK^T and softmax over short_first keys and zeroes the rest of P (first_block_overlap; its PV, in
the next step, is the whole block's). With lazy_rescale a row keeps its reference max until the
running max outgrows it by 2^lazy_rescale, and a warp skips O's rescale when none of its rows
moved (softmax.OnlineSoftmax).

FP8 (FwdConfig dtype "e4m3", fa3py.fp8's block-scaled format; `self.fp8` const_expr branches, the
16-bit kernels' code unchanged): Q, K e4m3 as above; V arrives transposed, (b, h_kv, dv, s_pad),
and is TMA'd as (hdim_v, tile_n) K-major tiles (FP8 WGMMA reads both operands K-major, QGMMA);
P is packed into e4m3 A registers in place (fp8.convert_p_e4m3: V^T's keys come in
fp8.PV_KEY_ORDER); the score multiplier sq[row] * sk[block] * c changes per block, so the softmax
keeps its row max in scaled log2 units (OnlineSoftmax.step_scaled) with P's 2^8 offset; with
block V scaling each block's PV goes into a fresh accumulator added into O times the block's
V scale after its wait (fp8.Fp8Scales.add_pv), with channel V scaling straight into O and the
columns scaled in the epilogue (their scales read while the last PV runs); a block's K (and
block V) scale is read before its K wait (fp8.Fp8Scales.fetch), not in the softmax; O is bf16.
Softcap puts the block's multiplier inside the tanh (score_mod) and softcap*log2(e) after it;
GQA-packed rows read their own query head's Q scale; split-KV writes the same float32 partials
as 16-bit; packed sequences (cu_seqlens) find their scale columns and their 16-aligned V^T
columns from cu_seqlens and the batch index (fp8.Fp8Scales.create, fp8.vt_column).

FP8 V in rows (FwdConfig fp8_v_rows: FA3's float8 v, (keys, hdim_v)): the producer warp TMAs each
V block into a staging tile of v_rows_stages stages (pipeline_v, whose consumers are the producer
warpgroup's warps 1-3; a stage is a whole block or, with fp8_v_rows_half where two do not fit,
half of one: v_rows_keys); those warps walk the same tiles and blocks (the consumers' walk: a dynamic
scheduler's tiles read after Q's wait, without releasing Q), wait for a free V^T stage, transpose
the block into it part by part with the keys in PV_KEY_ORDER (fp8.transpose_v_block: ldmatrix.trans,
byte permutes, stmatrix; its jobs in a loop, or with fp8_vt_unroll unrolled per warp with
immediate addresses), freeing each staging stage after its part, fence the stores for the async
proxy and arrive on pipeline_vt's full barrier (all 96 threads). The consumers read V^T
from pipeline_vt as they read it from pipeline_v otherwise; no transposing copy of V runs before the kernel.

Paged K / V (FwdConfig page_size > 0, FA3's page_table): K and V are page pools (num_pages,
page_size, h_kv, d) and mPageTable (b, max_pages) int32 maps a sequence's key j to row
j % page_size of page mPageTable[b, j // page_size]. The producer loads a KV block in
pages_per_block = tile_n / kv_rows TMA boxes of kv_rows = min(page_size, tile_n) rows: one page
each into consecutive row slices of the stage (the smem tiles' 8-row swizzle atoms are laid rows
first, so a page_size multiple of 8 keeps every box in phase), or one box from the page holding
the block. Every box of a block arrives on the stage's one full barrier (tx count: the block's
bytes); lane i of the producer warp reads box i's page table entry (`page_of`, a block ahead of
the block's K: K's and V's pages are the same) and the TMAs take the pages by shuffle
(`load_block_paged`). The consumers do not change. FP8 pages are FA3's float8 inputs
read directly (fp8_v_rows: V's pages land in the staging tile; fp8_descales: no per-block scales).

MLA (FwdConfig qv, FA3's qv: scores Q K^T + Qv V^T): the producer loads Qv (tile_m, hdim_v) with
Q, on Q's barrier (one Q stage). S's WGMMA group adds Qv V^T after Q K^T, with sQv as A and the
block's V stage as B read K-major (the PV GEMM reads the same tile MN-major), so the consumers
wait for V(n) before issuing S(n); in the overlapped schedule a warpgroup then holds V(n) and
V(n + 1) (PV's), which two stages cover without a change in the producer's order. The tile is the
wider head dim's (config.QV_HDIM_PAIRS: 64 x 256 takes hdim 256's 128x64). hdim_v 512
(TileConfig.o_split 2, tile 64x64): O of 64 rows x 512 columns does not fit one warpgroup's
registers, so both consumer warpgroups take the same 64 rows: each runs the slab's S and softmax
(the same instructions on the same data: the same P, row max and sum) and accumulates its 256
columns of O from its half of the V tile (`col_part`); the epilogue stages each half's slabs side
by side in sO, which overlays sQv (both 64 x 512), and part 0 writes the LSE.

This module is the kernel's pipeline and main loops (`load`, `mma`, the per-block steps); what
it shares lives beside it: the tile order and the producer-to-consumer tile hand-off in
scheduler.py (`TileScheduler`, `TileWork`), masks and sequence lengths in mask.py, the online
softmax in softmax.py, O / LSE stores and split-KV's partials in epilogue.py, the host side
(config choice, compile caches, launch) in launch.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils as cutlass_utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup

from cute_kernels import fp8
from cute_kernels.config import FP8_VT_UNROLL_MAX_HDIMV, PAGE_ROWS_MULTIPLE, FwdConfig, page_size_ok
from cute_kernels.epilogue import O_SLAB_ROWS, EpilogueSm90, OutputOperands
from cute_kernels.mask import AttentionMask, SeqlenInfo
from cute_kernels.pipeline import WarpgroupRing, check_arrive_counts, release_after, release_previous, tma_pipeline_maker
from cute_kernels.scheduler import TileScheduler, TileWork, lpt_tail_heads
from cute_kernels.softmax import OnlineSoftmax
from cute_kernels.utils import (
    acc_to_frgA,
    acc_to_mn,
    assume_aligned_strides,
    convert_to,
    gemm,
    make_smem_layout,
    lse_shb,
    pin_smem_desc,
    sdhb,
    transpose_view,
)

DTYPES = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16, "e4m3": cutlass.Float8E4M3FN}
NUM_THREADS_PER_WG = 128
SMEM_BYTES = 227 * 1024  # sm90 dynamic shared memory per CTA


def smem_bytes(ctas_per_sm: int) -> int:
    """Dynamic shared memory a CTA may take when `ctas_per_sm` share the SM: its 228 KB less 1 KB
    the hardware reserves per CTA, divided (227 KB alone, 113 KB each for two)."""
    return (SMEM_BYTES + 1024) // ctas_per_sm - 1024
VT_WARPS = 3  # fp8_v_rows: producer warps 1-3 transpose V (warp 0 issues the TMAs)


@dataclass(frozen=True)
class BlockOperands:
    """One KV block's operands in the plain schedule: P's registers, the QK^T MMA's thread slices
    (this thread's and thread 0's, for the mask) and, for diag_half's half block, its QK^T as
    (tiled MMA, K fragment, keys) and PV's k-blocks (None / 0: the whole block's)."""

    tOrP: cute.Tensor
    thr_mma_qk: cute.ThrMma
    thr0_mma_qk: cute.ThrMma
    qk_mma: Optional[tuple] = None
    pv_k_blocks: cutlass.Constexpr[int] = 0


def _fake_fp8_scales(cfg: FwdConfig, b, h, hk, dv) -> tuple:
    """Fake FP8 scale tensors (float32, compact): Q per block_m rows, K per KV block, V per KV
    block or per channel; a packed side's (1, heads, columns) (its own symbols: b is not its
    batch). With GQA packing Q's scales keep every query head while Q is viewed with h / g heads:
    their head counts are separate symbols (the TVM-FFI call checks tied symbols)."""
    sym = cute.sym_int
    t = lambda shape: cute.runtime.make_fake_tensor(Float32, shape, stride=(cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)
    nk = sym()
    bq = sym() if cfg.cu_seqlens_q else b
    bk = sym() if cfg.cu_seqlens_k else b
    if cfg.fp8_descales:  # FA3's descales, (batch, heads, 1), indexed by the sequence
        bd, hq = sym(), sym() if cfg.pack_gqa > 1 else h
        return t((bd, hq, 1)), t((bd, hk, 1)), t((bd, hk, 1))
    if cfg.fp8_v_scaling == "block":
        v = t((bk, hk, nk))
    else:  # per sequence
        v = t((sym() if cfg.cu_seqlens_k else b, hk, dv))
    hq = sym() if cfg.pack_gqa > 1 else h
    return t((bq, hq, sym())), t((bk, hk, nk)), v


class FlashAttentionForwardSm90:
    def __init__(self, cfg: FwdConfig):
        self.cfg = cfg
        self.dtype = DTYPES[cfg.dtype]  # Q, K, V
        # Q and K (fp8_qk_int8: int8, their S accumulated in int32)
        self.qk_dtype, self.acc_s_dtype = (cutlass.Int8, Int32) if cfg.fp8_qk_int8 else (self.dtype, Float32)
        # FP8: e4m3 Q, K and V^T (fa3py.fp8's format), O in bf16.
        self.fp8 = cfg.dtype == "e4m3"
        self.o_dtype = cutlass.BFloat16 if self.fp8 else self.dtype
        t = cfg.tile
        self.num_mma_wg = t.num_mma_wg
        # o_split (qv with hdim_v 512): warpgroups w and w + rows_wg share a slab, each with its
        # part of O's columns
        self.o_split = t.o_split
        self.rows_wg = self.num_mma_wg // self.o_split  # warpgroups along the tile's rows
        assert self.num_mma_wg in (1, 2, 3) and t.tile_m == 64 * self.rows_wg, \
            "one 64-row slab per consumer warpgroup (per o_split of them)"
        self.smem_limit = smem_bytes(t.ctas_per_sm)
        self.ring = WarpgroupRing(self.num_mma_wg)  # the consumer warpgroups' GEMM turns
        assert cfg.hdim % 16 == 0 and cfg.hdimv % 16 == 0 and t.tile_n % 16 == 0
        self.tile_m, self.tile_n, self.num_stages = t.tile_m, t.tile_n, t.num_stages
        self.hdim, self.hdimv = cfg.hdim, cfg.hdimv
        self.num_mma_threads = self.num_mma_wg * NUM_THREADS_PER_WG
        self.num_threads = self.num_mma_threads + NUM_THREADS_PER_WG
        assert self.num_threads == t.num_threads
        # Q, O and the K/V stages (each a multiple of 1 KB) plus 1 KB for the mbarriers before the
        # 1 KB-aligned buffers: __call__ checks the SharedStorage it builds against the same limit.
        elem, o_elem = self.dtype.width // 8, self.o_dtype.width // 8
        assert t.o_chunks == 1 or (t.o_chunks == 2 and self.hdimv % 128 == 0), \
            "o_chunks: 1, or 2 for hdim_v a multiple of 128 (chunks of 64 columns or more)"
        # columns of O one warpgroup accumulates, and stages in smem at a time
        self.o_cols = self.hdimv // self.o_split
        self.o_width = self.o_cols // t.o_chunks
        # qv (MLA): Qv's tile (tile_m, hdim_v), one stage, loaded with Q
        self.qv = cfg.qv
        # (sO overlays sQv where it has no room of its own (o_split: 64 x 512 both), else sQ)
        smem = (elem * (self.tile_m * self.hdim + self.num_stages * self.tile_n * (self.hdim + self.hdimv)
                        + (self.tile_m * self.hdimv if self.qv else 0))
                + o_elem * self.tile_m * self.o_width * self.o_split)
        # fp8_v_rows: V's rows are staged (one stage, two where they fit after Q's) and transposed
        # into the V^T stages by the producer warpgroup's warps 1-3.
        self.v_rows = cfg.fp8_v_rows
        rows_bytes = elem * self.tile_n * self.hdimv if self.v_rows else 0
        smem += rows_bytes
        self.separate_o = smem + 1024 <= self.smem_limit
        self.o_over_qv = self.qv and not self.separate_o
        if self.o_split > 1:
            assert self.qv and not self.fp8 and t.o_chunks == 1 and not cfg.hdimv_in and not self.separate_o, \
                f"{cfg.short()}: o_split is qv's, 16-bit, O staged once over sQv, hdim_v unpadded"
        # A second Q buffer, where asked for and it fits beside a separate sO (the consumers'
        # release of a Q stage must not wait for an epilogue that writes O over it).
        second_q = elem * self.tile_m * self.hdim
        self.q_stages = 2 if (t.q_stages == 2 and not self.qv and self.separate_o
                              and smem + second_q + 1024 <= self.smem_limit) else 1
        if self.q_stages == 2:
            smem += second_q
        self.v_rows_stages = 2 if self.v_rows and smem + rows_bytes + 1024 <= self.smem_limit else 1
        if self.v_rows:
            assert cfg.dtype == "e4m3", f"{cfg.short()}: fp8_v_rows is FP8's"
        assert not cfg.fp8_vt_unroll or (self.v_rows and self.hdimv <= FP8_VT_UNROLL_MAX_HDIMV), \
            f"{cfg.short()}: fp8_vt_unroll is V's rows' up to hdim_v {FP8_VT_UNROLL_MAX_HDIMV} (config.py)"
        if self.qv:
            assert not (cfg.dtype == "e4m3" or t.diag_half or t.chain_pv_qk or t.short_first), \
                f"{cfg.short()}: qv is 16-bit, on the overlapped or plain schedule without diag_half / chain_pv_qk / short_first"
        self.lpt = cfg.has_right  # tiles get shorter with m_block: longest first
        self.persistent = t.persistent or t.dynamic
        if self.fp8:
            k = fp8.K_PER_MMA
            assert self.hdim % k == 0 and self.hdimv % k == 0 and self.tile_n % k == 0 and t.short_first % k == 0, \
                f"FP8 WGMMA: hdim, hdim_v, tile_n and short_first multiples of {k}"
            assert cfg.fp8_v_scaling in ("block", "channel") and cfg.fp8_block_m > 0
            assert not cfg.fp8_descales or cfg.fp8_v_scaling == "channel", "FA3's descales: channel V"
            assert self.separate_o, "FP8: sO (bf16) does not alias the e4m3 sQ"
            assert not (cfg.hdim_in or cfg.hdimv_in), f"{cfg.short()}: FP8 takes unpadded head dims"
            # block V: O and each block's PV accumulator (2 x hdim_v / 2 registers a thread)
            assert cfg.fp8_v_scaling == "channel" or self.hdimv <= 128, \
                f"{cfg.short()}: block V scaling spills above hdim_v 128 (192: 58, 256: 88 STL); channel V"
            assert not (t.lazy_rescale or t.chain_pv_qk or t.diag_half), \
                f"{cfg.short()}: FP8 schedule switches not supported"
        # FP8 block V scaling: each block's PV into a fresh accumulator (two-level accumulation).
        self.fresh_pv = self.fp8 and cfg.fp8_v_scaling == "block"
        self.v_channel = self.fp8 and cfg.fp8_v_scaling == "channel"
        # Paged K / V: a KV block is pages_per_block TMA boxes of kv_rows rows (config.page_size_ok).
        self.paged = cfg.page_size > 0
        self.kv_rows = min(cfg.page_size, self.tile_n) if self.paged else self.tile_n
        self.pages_per_block = self.tile_n // self.kv_rows
        # fp8_v_rows: V's rows staged in parts of v_rows_keys keys. Where two whole blocks do not
        # fit (hdim 256's 128 x 128), with fp8_v_rows_half two stages of half a block each rather
        # than one of a whole: with one, a block's TMA waited for the transpose of the block
        # before and the transpose for that TMA (H100, 16k tokens: 769 / 862 TFLOP/s against
        # 1205 / 1150 with V^T copied ahead); halves let each run under the other, in the same bytes.
        self.v_rows_keys = self.tile_n
        half = self.tile_n // 2
        if (cfg.fp8_v_rows_half and self.v_rows and self.v_rows_stages == 1 and not self.paged
                and half % fp8.VT_JOB_KEYS == 0 and half >= VT_WARPS * fp8.VT_JOB_KEYS):
            self.v_rows_keys, self.v_rows_stages = half, 2
        if self.paged:
            assert page_size_ok(cfg.page_size, self.tile_n), \
                f"{cfg.short()}: page_size {cfg.page_size} neither a multiple of tile_n {self.tile_n} nor a " \
                f"divisor of it that is a multiple of {PAGE_ROWS_MULTIPLE}"
            assert not ((self.fp8 and not cfg.fp8_v_rows) or cfg.cu_seqlens_k), \
                f"{cfg.short()}: paged K / V are 16-bit or FP8 in rows, one page table row a sequence"

    # ------------------------------------------------------------------ host side
    def make_tiled_mma_qk(self, n: int):
        """S = Q K^T over n keys (the KV block; its first half for diag_half), one warpgroup per
        64-row slab (o_split: each of a slab's warpgroups runs the slab's)."""
        return sm90_utils.make_trivial_tiled_mma(
            self.qk_dtype, self.qk_dtype, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K,
            self.acc_s_dtype, atom_layout_mnk=(self.rows_wg, 1, 1), tiler_mn=(64, n),
        )

    def make_tiled_mma_pv(self, n: int):
        """O += P V over n columns of V (the whole hdim_v; a column chunk of O for its layout).
        FP8 WGMMA reads both operands K-major: V^T (hdim_v, keys) from the transposed FP8 V."""
        v_major = warpgroup.OperandMajorMode.K if self.fp8 else warpgroup.OperandMajorMode.MN
        return sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, warpgroup.OperandMajorMode.K, v_major,
            Float32, atom_layout_mnk=(self.rows_wg, 1, 1), tiler_mn=(64, n),
            a_source=warpgroup.OperandSource.RMEM,
        )

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, s_q, h, d) or (total_q, h, d)
        mK: cute.Tensor,  # (b, s_k, h_kv, d) or (total_k, h_kv, d); paged: (num_pages, page_size, h_kv, d)
        mV: cute.Tensor,  # (b, s_k, h_kv, dv) or (total_k, h_kv, dv); FP8: V^T (b, h_kv, dv, s_k padded to 16)
        mO: cute.Tensor,  # like mQ with dv; split_kv: float32, (splits * b, ...) or (splits * total_q, ...)
        mLSE: cute.Tensor,  # (b, h, s_q) or (h, total_q), float32; split_kv: splits * b or splits * total_q
        mCuSeqlensQ: Optional[cute.Tensor],
        mCuSeqlensK: Optional[cute.Tensor],
        mSeqUsedQ: Optional[cute.Tensor],
        mSeqUsedK: Optional[cute.Tensor],
        mPageTable: Optional[cute.Tensor],  # paged: (b, max_pages) int32; mK / mV are the page pools
        mTileCounter: Optional[cute.Tensor],  # dynamic scheduler: 2 int32, zero at launch and exit
        mQScale: Optional[cute.Tensor],  # FP8: (b, h, ceil(s_q / fp8_block_m)) float32; packed q: (1, h, columns)
        mKScale: Optional[cute.Tensor],  # FP8: (b, h_kv, ceil(s_k / tile_n)); packed k: (1, h_kv, columns)
        mVScale: Optional[cute.Tensor],  # FP8: like mKScale (block V), or (b, h_kv, dv) (channel V)
        mQv: Optional[cute.Tensor],  # qv (MLA): like mQ with dv
        scale_log2: Float32,  # softmax_scale*log2(e); with softcap: softcap*log2(e); FP8: that / n (Hadamard)
        softcap_premul: Float32,  # softmax_scale / softcap (unused without softcap)
        window_left: Int32,
        window_right: Int32,
        attention_chunk: Int32,  # chunk: C > 0 (else unused, and not passed to the kernel)
        max_seqlen_q: Int32,
        num_ctas: Int32,  # persistent: CTAs to launch (number of SMs)
        l2_heads: Int32,  # causal/local LPT order: (batch, head) pairs per section (launch passes 1)
        num_splits: Int32,  # split_kv: KV splits per tile (else unused)
        stream: cuda.CUstream,
    ):
        cfg = self.cfg
        divby = 128 // self.dtype.width
        mQ, mK, mV = [assume_aligned_strides(t, divby) for t in (mQ, mK, mV)]
        mO = assume_aligned_strides(mO, 128 // mO.element_type.width)
        mQ, mO = [sdhb(t, cfg.cu_seqlens_q) for t in (mQ, mO)]
        if const_expr(self.qv):
            mQv = sdhb(assume_aligned_strides(mQv, divby), cfg.cu_seqlens_q)
        if const_expr(self.fp8 and not self.v_rows):  # V^T (b, h_kv, dv, s) -> (dv, s, h_kv, b)
            mK = sdhb(mK, cfg.cu_seqlens_k)
            mV = cute.make_tensor(mV.iterator, cute.select(mV.layout, mode=[2, 3, 1, 0]))
        else:
            mK, mV = [sdhb(t, cfg.cu_seqlens_k) for t in (mK, mV)]
        mLSE = lse_shb(mLSE, cfg.cu_seqlens_q)

        tiled_mma_qk, tiled_mma_pv = self.make_tiled_mma_qk(self.tile_n), self.make_tiled_mma_pv(self.o_cols)
        sQ_layout = make_smem_layout(self.qk_dtype, (self.tile_m, self.hdim), self.q_stages)
        sQv_layout = make_smem_layout(self.dtype, (self.tile_m, self.hdimv), 1) if const_expr(self.qv) else None
        sK_layout = make_smem_layout(self.qk_dtype, (self.tile_n, self.hdim), self.num_stages)
        # FP8: V^T tiles (hdim_v, tile_n), keys contiguous (the K-major B operand of PV).
        v_tile = (self.hdimv, self.tile_n) if const_expr(self.fp8) else (self.tile_n, self.hdimv)
        sV_layout = make_smem_layout(self.dtype, v_tile, self.num_stages)
        # fp8_v_rows: the staging tile of V's rows, (v_rows_keys, hdim_v), what the V TMA writes
        sVrows_layout = make_smem_layout(self.dtype, (self.v_rows_keys, self.hdimv), self.v_rows_stages) \
            if const_expr(self.v_rows) else None
        # fp8_v_rows: both tiles' byte layouts in closed form for the transposing warps
        v_byte_tiles = (fp8.byte_tile(sVrows_layout, self.v_rows_keys, self.hdimv, self.v_rows_stages),
                        fp8.byte_tile(sV_layout, self.hdimv, self.tile_n, self.num_stages)) \
            if const_expr(self.v_rows) else None
        # O is staged in 16-row slabs, one per consumer warp (the rows its accumulator holds),
        # each compact in smem, so a warp stores its slab by TMA without waiting for the others.
        # (o_split: the slabs of each part of O's columns side by side, part p at columns p * o_cols)
        sO_slab_layout = make_smem_layout(self.o_dtype, (O_SLAB_ROWS, self.o_width))
        sO_layout = cute.tile_to_shape(sO_slab_layout, (self.tile_m, self.o_width * self.o_split), order=(0, 1))

        # sQ (or sQv, o_over_qv) also holds O unless O has its own buffer (separate_o).
        o_over_q = not self.separate_o and not self.o_over_qv
        sQ_elems = max(cute.cosize(sQ_layout), cute.cosize(sO_layout)) if const_expr(o_over_q) else \
            cute.cosize(sQ_layout)
        sQv_elems = max(cute.cosize(sQv_layout), cute.cosize(sO_layout)) if const_expr(self.o_over_qv) else \
            cute.cosize(sQv_layout) if const_expr(self.qv) else 0

        @cute.struct
        class SharedStorage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2 * self.q_stages]
            mbar_k: cute.struct.MemRange[cutlass.Int64, 2 * self.num_stages]
            mbar_v: cute.struct.MemRange[cutlass.Int64, 2 * (self.v_rows_stages if self.v_rows else self.num_stages)]
            if const_expr(self.v_rows):
                mbar_vt: cute.struct.MemRange[cutlass.Int64, 2 * self.num_stages]
            sQ: cute.struct.Align[cute.struct.MemRange[self.qk_dtype, sQ_elems], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.qk_dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sV_layout)], 1024]
            if const_expr(self.v_rows):
                sVrows: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sVrows_layout)], 1024]
            if const_expr(self.qv):
                sQv: cute.struct.Align[cute.struct.MemRange[self.dtype, sQv_elems], 1024]
            if const_expr(self.separate_o):
                sO: cute.struct.Align[cute.struct.MemRange[self.o_dtype, cute.cosize(sO_layout)], 1024]
            if const_expr(self.cfg.tile.dynamic):
                next_tile: cute.struct.MemRange[Int32, self.q_stages]  # per Q stage, see load_q

        assert SharedStorage.size_in_bytes() <= self.smem_limit, \
            f"{cfg.short()}: {SharedStorage.size_in_bytes()} bytes of shared memory > {self.smem_limit}"

        g2s = cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            g2s, mQ, cute.select(sQ_layout, mode=[0, 1]), (self.tile_m, self.hdim))
        tma_atom_Qv, tma_Qv = cpasync.make_tiled_tma_atom(
            g2s, mQv, cute.select(sQv_layout, mode=[0, 1]), (self.tile_m, self.hdimv)) \
            if const_expr(self.qv) else (None, None)
        if const_expr(self.paged):  # one box: kv_rows rows of a page, the first kv_rows rows of a stage
            tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(
                g2s, mK, self.page_box(sK_layout, self.hdim), (self.kv_rows, self.hdim))
            tma_atom_V, tma_V = cpasync.make_tiled_tma_atom(
                g2s, mV, self.page_box(sVrows_layout if const_expr(self.v_rows) else sV_layout, self.hdimv),
                (self.kv_rows, self.hdimv))
        else:
            tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(
                g2s, mK, cute.select(sK_layout, mode=[0, 1]), (self.tile_n, self.hdim)
            )
            tma_atom_V, tma_V = cpasync.make_tiled_tma_atom(
                g2s, mV, cute.select(sVrows_layout if const_expr(self.v_rows) else sV_layout, mode=[0, 1]),
                (self.v_rows_keys, self.hdimv) if const_expr(self.v_rows) else v_tile
            )
        tma_atom_O, tma_O = (None, None) if const_expr(cfg.split_kv) else cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileS2GOp(), mO, sO_slab_layout, (O_SLAB_ROWS, self.o_width))
        tx_q, tx_k, tx_v = (cute.size_in_bytes(dtype, cute.select(layout, mode=[0, 1])) for dtype, layout in
                            ((self.qk_dtype, sQ_layout), (self.qk_dtype, sK_layout),
                             (self.dtype, sVrows_layout if const_expr(self.v_rows) else sV_layout)))
        if const_expr(self.qv):  # Qv lands on Q's barrier
            tx_q += cute.size_in_bytes(self.dtype, cute.select(sQv_layout, mode=[0, 1]))

        num_m_blocks = cute.ceil_div(max_seqlen_q, self.tile_m)
        # LPT: the last pairs whose tiles make ~LPT_TAIL_WAVES waves on num_ctas SMs.
        tail_heads = lpt_tail_heads(num_ctas, num_m_blocks)
        num_heads = cute.size(mQ.shape[2])
        # Split-KV: the scheduler's heads are (head, split) pairs (`TileWork.coords`).
        sched_heads = num_heads * num_splits if const_expr(cfg.split_kv) else num_heads
        batch = cute.size(mQ.shape[3]) if const_expr(not cfg.cu_seqlens_q) else mCuSeqlensQ.shape[0] - 1
        self.kernel(
            tma_Q, tma_K, tma_V, mO, tma_O, mLSE,
            mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK, mPageTable, mTileCounter, mQScale, mKScale, mVScale,
            tma_Qv, tma_atom_Q, tma_atom_K, tma_atom_V, tma_atom_O, tma_atom_Qv,
            scale_log2, softcap_premul, window_left, window_right,
            # Only a chunked kernel takes C: another kernel's parameters (and SASS) stay as they were.
            attention_chunk if const_expr(cfg.chunk) else None,
            sQ_layout, sK_layout, sV_layout, sO_layout, sVrows_layout, sQv_layout, v_byte_tiles,
            tiled_mma_qk, tiled_mma_pv, tx_q, tx_k, tx_v,
            num_m_blocks, sched_heads, batch, l2_heads, tail_heads, num_splits, SharedStorage,
        ).launch(
            grid=TileScheduler.grid(num_m_blocks, sched_heads, batch, num_ctas, self.persistent,
                                    self.lpt),
            block=[self.num_threads, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
            min_blocks_per_mp=cfg.tile.ctas_per_sm,
            # (two CTAs an SM need the whole carveout; given, the DSL does not ask a device for it)
            **({"preferred_smem_carveout": 100} if cfg.tile.ctas_per_sm > 1 else {}),
        )

    # ------------------------------------------------------------------ device side
    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mO: cute.Tensor, tma_O: cute.Tensor,
        mLSE: cute.Tensor,
        mCuSeqlensQ: Optional[cute.Tensor], mCuSeqlensK: Optional[cute.Tensor],
        mSeqUsedQ: Optional[cute.Tensor], mSeqUsedK: Optional[cute.Tensor],
        mPageTable: Optional[cute.Tensor],
        mTileCounter: Optional[cute.Tensor],
        mQScale: Optional[cute.Tensor], mKScale: Optional[cute.Tensor], mVScale: Optional[cute.Tensor],
        mQv: Optional[cute.Tensor],
        tma_atom_Q: cute.CopyAtom, tma_atom_K: cute.CopyAtom, tma_atom_V: cute.CopyAtom,
        tma_atom_O: cute.CopyAtom, tma_atom_Qv: Optional[cute.CopyAtom],
        scale_log2: Float32, softcap_premul: Float32, window_left: Int32, window_right: Int32,
        attention_chunk: Optional[Int32],
        sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout, sO_layout: cute.ComposedLayout,
        sVrows_layout: Optional[cute.ComposedLayout],
        sQv_layout: Optional[cute.ComposedLayout],
        v_byte_tiles: cutlass.Constexpr,  # fp8_v_rows: (staging tile, V^T tile) as fp8.ByteTile
        tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma,
        tx_q: cutlass.Constexpr[int], tx_k: cutlass.Constexpr[int], tx_v: cutlass.Constexpr[int],
        num_m_blocks: Int32,
        num_heads: Int32,
        num_batch: Int32,
        l2_heads: Int32,
        tail_heads: Int32,
        num_splits: Int32,
        SharedStorage: cutlass.Constexpr,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            for atom in (tma_atom_Q, tma_atom_K, tma_atom_V, tma_atom_O, tma_atom_Qv):
                if const_expr(atom is not None):
                    cpasync.prefetch_descriptor(atom)

        smem = cutlass_utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        make_pipe = tma_pipeline_maker(self.num_mma_threads)
        pipeline_q = make_pipe(barrier_storage=storage.mbar_q.data_ptr(), num_stages=self.q_stages,
                               tx_count=tx_q)
        pipeline_k = make_pipe(barrier_storage=storage.mbar_k.data_ptr(), num_stages=self.num_stages,
                               tx_count=tx_k)
        if const_expr(self.v_rows):
            # V's rows: TMA'd for the transposing warps, which fill V^T's stages (pipeline_vt)
            pipeline_v = tma_pipeline_maker(VT_WARPS * 32)(
                barrier_storage=storage.mbar_v.data_ptr(), num_stages=self.v_rows_stages, tx_count=tx_v)
            check_arrive_counts(pipeline_v, VT_WARPS)
            pipeline_vt = pipeline.PipelineTmaAsync.create(
                barrier_storage=storage.mbar_vt.data_ptr(), num_stages=self.num_stages, tx_count=0,
                producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, VT_WARPS * 32),
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.num_mma_threads // 32),
                defer_sync=True)
            assert pipeline_vt.sync_object_full.arrive_count == VT_WARPS * 32, "every transposing thread arrives"
            assert pipeline_vt.sync_object_empty.arrive_count == self.num_mma_threads // 32
        else:
            pipeline_v = make_pipe(barrier_storage=storage.mbar_v.data_ptr(), num_stages=self.num_stages,
                                   tx_count=tx_v)
            pipeline_vt = pipeline_v  # what the consumers read V from
        for pipe in (pipeline_q, pipeline_k) + (() if const_expr(self.v_rows) else (pipeline_v,)):
            check_arrive_counts(pipe, self.num_mma_threads // 32)
        cute.arch.mbarrier_init_fence()
        cute.arch.barrier()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sO = (storage.sO if const_expr(self.separate_o) else storage.sQv if const_expr(self.o_over_qv)
              else storage.sQ).get_tensor(sO_layout.outer, swizzle=sO_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sVrows = storage.sVrows.get_tensor(sVrows_layout.outer, swizzle=sVrows_layout.inner) \
            if const_expr(self.v_rows) else None
        sQv = storage.sQv.get_tensor(sQv_layout.outer, swizzle=sQv_layout.inner) if const_expr(self.qv) else None

        scheduler = TileScheduler(num_m_blocks, num_heads, num_batch, self.persistent,
                                  lpt=self.lpt, l2_heads=l2_heads, tail_heads=tail_heads,
                                  dynamic=self.cfg.tile.dynamic,
                                  counter=mTileCounter)
        # paged: a sequence holds up to max_pages pages (its length without seqused_k)
        seqlen_k_static = mPageTable.shape[1] * self.cfg.page_size if const_expr(self.paged) else mK.shape[0]
        seqlen_fn = partial(SeqlenInfo.create, seqlen_q_static=mQ.shape[0], seqlen_k_static=seqlen_k_static,
                            mCuSeqlensQ=mCuSeqlensQ, mCuSeqlensK=mCuSeqlensK, mSeqUsedQ=mSeqUsedQ,
                            mSeqUsedK=mSeqUsedK)
        mask_fn = partial(AttentionMask, self.tile_m, self.tile_n, self.cfg.has_left, self.cfg.has_right,
                          window_left, window_right, rows_per_pos=self.cfg.pack_gqa, chunk=attention_chunk)
        # dynamic: the next tile's index, written by the producer before it issues that tile's Q
        # (one slot per Q stage: a slot is rewritten only once its Q stage has been released)
        next_tile = storage.next_tile.get_tensor(cute.make_layout(self.q_stages)) \
            if const_expr(self.cfg.tile.dynamic) else None
        tiles = TileWork(scheduler, seqlen_fn, mask_fn, next_tile, num_splits, self.cfg.split_kv)

        producer_args = (mQ, mK, mV, sQ, sK, sVrows if const_expr(self.v_rows) else sV, tma_atom_Q, tma_atom_K,
                         tma_atom_V, pipeline_q, pipeline_k, pipeline_v, pipeline_vt, tiles, mPageTable,
                         (mQv, sQv, tma_atom_Qv), v_byte_tiles, storage, warp_idx)
        consumer_args = (mO, tma_O, tma_atom_O, mLSE, sO, sQ, sK, sV, sQv, tiled_mma_qk, tiled_mma_pv,
                         pipeline_q, pipeline_k, pipeline_vt, scale_log2, softcap_premul, tiles,
                         (mQScale, mKScale, mVScale) if const_expr(self.fp8) else None)
        if const_expr(self.v_rows):
            # The consumers' code first: ptxas's allocation of the consumers (within 3 registers
            # of the 240 they get at FP8's 128 x 224) moved with whatever code preceded theirs and
            # spilled 8-56 bytes for transposer changes that touched no consumer instruction (the
            # consumers' PTX identical but for register numbers); placed first, it no longer moves.
            if warp_idx >= 4:
                self.consumers(*consumer_args)
            else:
                self.producers(*producer_args)
        else:
            if warp_idx < 4:
                self.producers(*producer_args)
            else:
                self.consumers(*consumer_args)

    @cute.jit
    def producers(self, mQ, mK, mV, sQ, sK, sV_load, tma_atom_Q, tma_atom_K, tma_atom_V, pipeline_q, pipeline_k,
                  pipeline_v, pipeline_vt, tiles: TileWork, mPageTable, qv_operands, v_byte_tiles: cutlass.Constexpr,
                  storage, warp_idx):
        """The producer warpgroup: warp 0 loads (`load`); with fp8_v_rows warps 1-3 transpose V."""
        cute.arch.setmaxregister_decrease(self.cfg.tile.producer_regs)
        if warp_idx == 0:
            self.load(mQ, mK, mV, sQ, sK, sV_load, tma_atom_Q, tma_atom_K, tma_atom_V, pipeline_q, pipeline_k,
                      pipeline_v, tiles, mPageTable, qv_operands)
        if const_expr(self.v_rows):
            if warp_idx > 0:
                rows_tile, vt_tile = v_byte_tiles
                self.transpose_v(pipeline_q, pipeline_v, pipeline_vt, tiles, storage.sVrows.data_ptr().toint(),
                                 rows_tile, storage.sV.data_ptr().toint(), vt_tile, warp_idx - 1)

    @cute.jit
    def consumers(self, mO, tma_O, tma_atom_O, mLSE, sO, sQ, sK, sV, sQv, tiled_mma_qk, tiled_mma_pv, pipeline_q,
                  pipeline_k, pipeline_vt, scale_log2, softcap_premul, tiles: TileWork, scales):
        """The consumer warpgroups (`mma`)."""
        cute.arch.setmaxregister_increase(self.cfg.tile.consumer_regs)
        # O's MMA over one column chunk: how the epilogue stages O (o_chunks).
        tiled_mma_o = tiled_mma_pv if const_expr(self.cfg.tile.o_chunks == 1) else self.make_tiled_mma_pv(self.o_width)
        out = OutputOperands(mO, tma_O, tma_atom_O, mLSE, sO, tiled_mma_o)
        self.mma(out, sQ, sK, sV, tiled_mma_qk, tiled_mma_pv,
                 pipeline_q, pipeline_k, pipeline_vt, scale_log2, softcap_premul, tiles, scales, sQv)

    @cute.jit
    def load(
        self, mQ, mK, mV, sQ, sK, sV, tma_atom_Q, tma_atom_K, tma_atom_V,
        pipeline_q, pipeline_k, pipeline_v, tiles: TileWork, mPageTable: Optional[cute.Tensor] = None,
        qv_operands: tuple = (None, None, None),
    ):
        """Producer warp: per tile, K of the last KV block, then Q (qv: and Qv, on Q's barrier)
        (with two Q stages: Q first,
        its slot freed a tile ago), then K(n-1) and V(n) for the remaining blocks right to left
        (V lags K by one block, as the overlapped consumer uses them). Q is loaded for every tile with rows (even one with no KV block) because the
        consumers release sQ only once their epilogue no longer reads sO."""
        q_first = self.q_stages > 1
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, pipeline_q.num_stages)
        k_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, pipeline_k.num_stages)
        v_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, pipeline_v.num_stages)
        one = cute.make_layout(1)
        scheduler = tiles.scheduler
        tile = scheduler.initial()
        while scheduler.valid(tile):
            m_block, head, batch, split = tiles.coords(tile)
            seqlen = tiles.seqlen_fn(batch)
            n_block_min, n_block_max = tiles.kv_block_range(tiles.mask_fn(seqlen, m_block), split)
            if m_block * self.tile_m < seqlen.seqlen_q:
                head_kv = head // (mQ.shape[2] // mK.shape[2])
                b_q = batch if const_expr(not self.cfg.cu_seqlens_q) else 0
                mQ_cur = cute.domain_offset((seqlen.offset_q, 0), mQ[None, None, head, b_q])
                gQ = cute.local_tile(mQ_cur, (self.tile_m, self.hdim), (m_block, 0))
                tQsQ, tQgQ = cpasync.tma_partition(tma_atom_Q, 0, one, cute.group_modes(sQ, 0, 2),
                                                   cute.group_modes(gQ, 0, 2))
                qv_copy = None
                if const_expr(self.qv):
                    mQv, sQv, tma_atom_Qv = qv_operands
                    gQv = cute.local_tile(cute.domain_offset((seqlen.offset_q, 0), mQv[None, None, head, b_q]),
                                          (self.tile_m, self.hdimv), (m_block, 0))
                    tQvsQv, tQvgQv = cpasync.tma_partition(tma_atom_Qv, 0, one, cute.group_modes(sQv, 0, 2),
                                                           cute.group_modes(gQv, 0, 2))
                    qv_copy = (tma_atom_Qv, tQvgQv, tQvsQv)
                load_k, load_v, page_of = self.kv_loaders(mK, mV, sK, sV, tma_atom_K, tma_atom_V, pipeline_k, pipeline_v,
                                                 head_kv, batch, seqlen, mPageTable)
                load_q = partial(self.load_q, pipeline_q=pipeline_q, tma_atom_Q=tma_atom_Q, tQgQ=tQgQ, tQsQ=tQsQ,
                                 tiles=tiles, tile=tile, qv_copy=qv_copy)

                # Q first where its stage was freed a tile ago (two Q stages); else after the last
                # block's K (and V), which then need not wait for the previous tile's epilogue.
                # Paged: a block's pages (page_of, K's and V's the same) are read a block ahead of
                # its K, so the page table's latency is not on the TMAs' path (the first block's
                # before Q's TMA); unpaged, page_of is a constant the loaders ignore.
                page_k = page_of(n_block_max - 1, n_block_min)
                if const_expr(q_first):
                    load_q(q_state)
                    q_state.advance()
                if n_block_min < n_block_max:
                    load_k(n_block_max - 1, k_state, page_k)
                    k_state.advance()
                if const_expr(not q_first):
                    load_q(q_state)
                    q_state.advance()
                page_v = page_k
                page_k = page_of(n_block_max - 2, n_block_min)
                # K leads V by one block, as the consumers need them: QK^T(n) is issued together
                # with PV(n + 1).
                for i in cutlass.range(n_block_max - 1 - n_block_min, unroll=1):
                    page_next = page_of(n_block_max - 3 - i, n_block_min)
                    load_k(n_block_max - 2 - i, k_state, page_k)
                    k_state.advance()
                    load_v(n_block_max - 1 - i, v_state, page_v)
                    v_state.advance()
                    page_v = page_k
                    page_k = page_next
                if n_block_min < n_block_max:
                    load_v(n_block_min, v_state, page_v)
                    v_state.advance()
            tile = scheduler.fetch_next(tile)
        if const_expr(tiles.next_tile is not None):
            # No more tiles: announce one past the last, completing Q's phase without a TMA.
            pipeline_q.sync_object_empty.wait(q_state.index, q_state.phase)
            tiles.announce(q_state.index, scheduler.num_tiles(), pipeline_q.producer_get_barrier(q_state))
            scheduler.retire()

    @cute.jit
    def load_block(self, n_block, state, page, pipe, tma_atom, tXgX, tXsX):
        """TMA of K or V block `n_block` into pipeline stage `state` (`page`: unpaged, unused)."""
        pipe.producer_acquire(state)
        cute.copy(tma_atom, tXgX[None, n_block], tXsX[None, state.index],
                  tma_bar_ptr=pipe.producer_get_barrier(state))

    @cute.jit
    def load_block_parts(self, n_block, state, page, pipe, tma_atom, tXgX, tXsX):
        """fp8_v_rows in parts: V block `n_block` as tile_n / v_rows_keys TMAs of v_rows_keys rows,
        each into its own staging stage from `state` on; `state` is left at the last part's (the
        caller advances past it, as after `load_block`)."""
        parts = self.tile_n // self.v_rows_keys
        for p in cutlass.range_constexpr(parts):
            if const_expr(p > 0):
                state.advance()
            self.load_block(n_block * parts + p, state, page, pipe, tma_atom, tXgX, tXsX)

    def kv_loaders(self, mK, mV, sK, sV, tma_atom_K, tma_atom_V, pipeline_k, pipeline_v, head_kv, batch,
                   seqlen: SeqlenInfo, mPageTable):
        """`load_block` (paged: `load_block_paged`) for K and for V of sequence `batch`, KV head
        `head_kv`: their TMA partitions (paged: of the KV head's pages), and `page_of(n_block,
        n_block_min)`, the page a lane's TMA of block max(n_block, n_block_min) reads (paged: from
        the sequence's page table row; else a constant)."""
        one = cute.make_layout(1)
        if const_expr(self.paged):
            # (box, boxes in a block, 1, stage) in smem; (box, boxes in a page, 1, page) in gmem
            tKsK, tKgK = self.partition_pages(tma_atom_K, sK, mK[None, None, head_kv, None], self.hdim)
            tVsV, tVgV = self.partition_pages(tma_atom_V, sV, mV[None, None, head_kv, None], self.hdimv)
            # Pages past the sequence's last (in its last block) are loaded as its last: their
            # keys are masked, and the page table's row may end there.
            page_of = partial(self.page_of, page_row=mPageTable[batch, None],
                              last_page=(seqlen.seqlen_k - 1) // self.cfg.page_size)
            return (partial(self.load_block_paged, pipe=pipeline_k, tma_atom=tma_atom_K, tXgX=tKgK, tXsX=tKsK),
                    partial(self.load_block_paged, pipe=pipeline_v, tma_atom=tma_atom_V, tXgX=tVgV, tXsX=tVsV),
                    page_of)
        b_k = batch if const_expr(not self.cfg.cu_seqlens_k) else 0
        mK_cur = cute.domain_offset((seqlen.offset_k, 0), mK[None, None, head_kv, b_k])
        gK = cute.local_tile(mK_cur, (self.tile_n, self.hdim), (None, 0))
        if const_expr(self.fp8 and not self.v_rows):  # V^T (dv, s): (hdim_v, tile_n) tiles along the keys
            mVt = mV[None, None, head_kv, b_k]
            if const_expr(self.cfg.cu_seqlens_k):  # packed: the sequence's 16-aligned columns
                mVt = cute.domain_offset((0, fp8.vt_column(seqlen.offset_k, batch)), mVt)
            gV = cute.local_tile(mVt, (self.hdimv, self.tile_n), (0, None))
        else:
            mV_cur = cute.domain_offset((seqlen.offset_k, 0), mV[None, None, head_kv, b_k])
            gV = cute.local_tile(mV_cur, (self.v_rows_keys if const_expr(self.v_rows) else self.tile_n, self.hdimv),
                                 (None, 0))
        tKsK, tKgK = cpasync.tma_partition(tma_atom_K, 0, one, cute.group_modes(sK, 0, 2),
                                           cute.group_modes(gK, 0, 2))
        tVsV, tVgV = cpasync.tma_partition(tma_atom_V, 0, one, cute.group_modes(sV, 0, 2),
                                           cute.group_modes(gV, 0, 2))
        return (partial(self.load_block, pipe=pipeline_k, tma_atom=tma_atom_K, tXgX=tKgK, tXsX=tKsK),
                partial(self.load_block if const_expr(self.v_rows_keys == self.tile_n) else self.load_block_parts,
                        pipe=pipeline_v, tma_atom=tma_atom_V, tXgX=tVgV, tXsX=tVsV),
                lambda n_block, n_block_min: Int32(0))

    def page_box(self, s_layout, cols: int):
        """The smem layout a paged TMA box fills: the first kv_rows rows of a stage's (tile_n, cols)
        tile (its swizzle atoms are 8 rows, tiled rows first: box i of a block lands at row
        i * kv_rows, the same swizzle phase)."""
        stage = cute.select(s_layout, mode=[0, 1])
        if const_expr(self.kv_rows == self.tile_n):
            return stage
        return cute.composition(stage, cute.make_layout((self.kv_rows, cols), stride=(1, self.tile_n)))

    def partition_pages(self, tma_atom, sX, mX_head, cols: int):
        """TMA partitions of the stages' smem tiles into kv_rows-row boxes (box, box in block, 1,
        stage) and of one KV head's pages (page_size, cols, pages) into boxes (box, box in page, 1,
        page)."""
        sX_boxes = cute.flat_divide(sX, (self.kv_rows, cols))
        gX_boxes = cute.flat_divide(mX_head, (self.kv_rows, cols))
        return cpasync.tma_partition(tma_atom, 0, cute.make_layout(1), cute.group_modes(sX_boxes, 0, 2),
                                     cute.group_modes(gX_boxes, 0, 2))

    @cute.jit
    def page_of(self, n_block, n_block_min, page_row, last_page):
        """The page of block max(n_block, n_block_min) that this lane's TMA reads: lane i box i's
        (pages_per_block > 1; lanes past the block's boxes repeat its last) or the block's one.
        Pages past the sequence's last (in its last block) are read as its last: their keys are
        masked, and the page table's row may end there. A tile with no KV block (an empty
        sequence) reads entry 0, unused: the host launches no paged kernel on a table without
        columns (`launch.q_empty_or_no_keys`)."""
        n = cutlass.max(n_block, n_block_min)
        if const_expr(self.pages_per_block > 1):
            box = cutlass.min(cute.arch.lane_idx(), self.pages_per_block - 1)
            index = n * self.pages_per_block + box
        else:
            index = n // (self.cfg.page_size // self.tile_n)
        return page_row[cutlass.max(cutlass.min(index, last_page), 0)]

    @cute.jit
    def load_block_paged(self, n_block, state, page, pipe, tma_atom, tXgX, tXsX):
        """K or V block `n_block` from its pages into stage `state`: pages_per_block TMAs (one page
        each, into consecutive kv_rows-row slices of the stage; box i's page from lane i's `page`)
        or one from the page holding the block (`page`, `page_of`'s), all on the stage's one full
        barrier (whose tx count is the whole block's)."""
        pipe.producer_acquire(state)
        bar = pipe.producer_get_barrier(state)
        if const_expr(self.pages_per_block > 1):
            for i in cutlass.range_constexpr(self.pages_per_block):
                cute.copy(tma_atom, tXgX[None, 0, 0, cute.arch.shuffle_sync(page, i)], tXsX[None, i, 0, state.index],
                          tma_bar_ptr=bar)
        else:
            blocks_per_page = self.cfg.page_size // self.tile_n
            cute.copy(tma_atom, tXgX[None, n_block % blocks_per_page, 0, page], tXsX[None, 0, 0, state.index],
                      tma_bar_ptr=bar)

    @cute.jit
    def transpose_v(self, pipeline_q, pipeline_v, pipeline_vt, tiles: TileWork, rows_addr, rows_tile, vt_addr,
                    vt_tile, warp):
        """fp8_v_rows, producer warps 1-3: for every KV block the producer loads (the same tiles
        and blocks, in its order), wait for V's rows, transpose them into the next V^T stage once
        the consumers freed it (fp8.transpose_v_block), make the stores visible to the WGMMAs
        (async proxy) and arrive on its full barrier (every thread), then free the rows. The tile
        walk is the consumers' (a dynamic scheduler's tiles read as they are announced, after
        Q's wait; the Q stages are not released here)."""
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, pipeline_q.num_stages)
        rows_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, pipeline_v.num_stages)
        vt_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, pipeline_vt.num_stages)
        parts = self.tile_n // self.v_rows_keys
        tile = tiles.follow(None, pipeline_q, q_state)
        while tiles.scheduler.valid(tile):
            m_block, head, batch, split = tiles.coords(tile)
            seqlen = tiles.seqlen_fn(batch)
            n_block_min, n_block_max = tiles.kv_block_range(tiles.mask_fn(seqlen, m_block), split)
            if m_block * self.tile_m < seqlen.seqlen_q:
                for _ in cutlass.range(n_block_max - n_block_min, unroll=1):
                    for p in cutlass.range_constexpr(parts):  # (the block's staging parts)
                        pipeline_v.consumer_wait(rows_state)
                        if const_expr(p == 0):
                            pipeline_vt.sync_object_empty.wait(vt_state.index, vt_state.phase)
                        fp8.transpose_v_block(rows_addr, rows_tile, rows_state.index, vt_addr, vt_tile, vt_state.index,
                                              warp, VT_WARPS, self.hdimv, self.v_rows_keys,
                                              p * self.v_rows_keys // fp8.VT_JOB_KEYS, self.cfg.fp8_vt_pairs,
                                              self.cfg.fp8_vt_unroll)
                        if const_expr(p == parts - 1):
                            cute.arch.fence_view_async_shared()
                            cute.arch.mbarrier_arrive(pipeline_vt.sync_object_full.get_barrier(vt_state.index))
                        cute.arch.sync_warp()  # every lane's loads of the rows are done
                        pipeline_v.consumer_release(rows_state)
                        rows_state.advance()
                    vt_state.advance()
                q_state.advance()
            tile = tiles.follow(tile, pipeline_q, q_state)

    @cute.jit
    def load_q(self, q_state, pipeline_q, tma_atom_Q, tQgQ, tQsQ, tiles: TileWork, tile, qv_copy=None):
        if const_expr(tiles.next_tile is not None):
            # The tile index is stored after every consumer warp released the previous Q (each
            # reads the slot right after that Q landed, before releasing it) and before the
            # arrive on Q's full barrier, whose release the consumers' wait on Q acquires.
            pipeline_q.sync_object_empty.wait(q_state.index, q_state.phase)
            tiles.announce(q_state.index, tile, pipeline_q.producer_get_barrier(q_state),
                           pipeline_q.sync_object_full.tx_count)
        else:
            pipeline_q.producer_acquire(q_state)
        cute.copy(tma_atom_Q, tQgQ, tQsQ[None, q_state.index],
                  tma_bar_ptr=pipeline_q.producer_get_barrier(q_state))
        if const_expr(qv_copy is not None):  # (one Q stage with qv)
            tma_atom_Qv, tQvgQv, tQvsQv = qv_copy
            cute.copy(tma_atom_Qv, tQvgQv, tQvsQv[None, 0], tma_bar_ptr=pipeline_q.producer_get_barrier(q_state))

    # ------------------------------------------------------------------ consumers
    @cute.jit
    def mma(
        self, out: OutputOperands, sQ, sK, sV, tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma,
        pipeline_q, pipeline_k, pipeline_v, scale_log2: Float32, softcap_premul: Float32,
        tiles: TileWork, scales: Optional[tuple] = None, sQv: Optional[cute.Tensor] = None,
    ):
        """`scales`: FP8's (mQScale, mKScale, mVScale), else None. `sQv`: qv's tile."""
        tidx = cute.arch.thread_idx()[0] - NUM_THREADS_PER_WG
        wg_idx = cute.arch.make_warp_uniform(tidx // NUM_THREADS_PER_WG)
        epilogue = EpilogueSm90.create(self.cfg, self.o_dtype, self.separate_o, self.num_mma_threads)
        # o_split: this thread's place in its slab's MMAs, and its warpgroup's part of O's columns
        col_part = wg_idx // self.rows_wg if const_expr(self.o_split > 1) else 0
        tidx_mma = tidx % (self.rows_wg * NUM_THREADS_PER_WG) if const_expr(self.o_split > 1) else tidx
        wg_mma_idx = wg_idx % self.rows_wg if const_expr(self.o_split > 1) else wg_idx
        thr_mma_qk = tiled_mma_qk.get_slice(tidx_mma)
        thr0_mma_qk = tiled_mma_qk.get_slice(0)
        wg_mma_qk = tiled_mma_qk.get_slice(wg_mma_idx * NUM_THREADS_PER_WG)
        wg_mma_pv = tiled_mma_pv.get_slice(wg_mma_idx * NUM_THREADS_PER_WG)
        tSrQ = wg_mma_qk.make_fragment_A(wg_mma_qk.partition_A(sQ))  # (MMA, M, K, q stage)
        if const_expr(self.q_stages == 1):
            tSrQ = self.pin_q(tSrQ[None, None, None, 0])
        tSrK = wg_mma_qk.make_fragment_B(wg_mma_qk.partition_B(sK))
        sV_pv = sV
        if const_expr(self.o_split > 1):  # this warpgroup's columns of V
            sV_pv = cute.logical_divide(sV, (None, self.o_cols))[None, (None, col_part), None]
        tOrVt = wg_mma_pv.make_fragment_B(wg_mma_pv.partition_B(sV_pv if const_expr(self.fp8) else transpose_view(sV_pv)))
        if const_expr(self.cfg.tile.pin_desc):
            tSrK, tOrVt = pin_smem_desc(tSrK), pin_smem_desc(tOrVt)
        # qv: S += Qv V^T, A = sQv, B = the V stage read K-major (keys x hdim_v, as K's tile)
        qv_frags = None
        if const_expr(self.qv):
            tSrQv = wg_mma_qk.make_fragment_A(wg_mma_qk.partition_A(sQv))[None, None, None, 0]
            tSrVk = wg_mma_qk.make_fragment_B(wg_mma_qk.partition_B(sV))
            if const_expr(self.cfg.tile.pin_desc):
                tSrQv, tSrVk = pin_smem_desc(tSrQv), pin_smem_desc(tSrVk)
            qv_frags = (tSrQv, tSrVk)
        tOrP = cute.make_rmem_tensor(wg_mma_pv.partition_shape_A((self.tile_m, self.tile_n)), self.dtype)
        acc_O = cute.make_rmem_tensor(tiled_mma_pv.partition_shape_C((self.tile_m, self.o_cols)), Float32)
        softmax = OnlineSoftmax.create(scale_log2, cute.size(acc_to_mn(acc_O).shape[0]),
                                       lazy=self.cfg.tile.lazy_rescale, p_offset=fp8.P_OFFSET if self.fp8 else 0.0)
        # FP8 block V scaling: each block's PV accumulator, added into O times its V scale.
        acc_PV = cute.make_rmem_tensor_like(acc_O, Float32) if const_expr(self.fresh_pv) else None
        # rescale_o_before_pv: the row factors of the last softmax wait here for the next PV issue.
        o_scale = cute.make_rmem_tensor_like(softmax.row_max, Float32)

        def qk_gemm(tSrQ_cur, stage, wg_wait, mma=None):
            """S = Q K^T of the K block in `stage`; `mma`: (tiled MMA, K fragment, keys) of
            diag_half's half-width GEMM instead of the whole block's."""
            tiled_mma, tSrK_cur, n = mma if const_expr(mma is not None) else (tiled_mma_qk, tSrK, self.tile_n)
            acc_S = cute.make_rmem_tensor(tiled_mma.partition_shape_C((self.tile_m, n)), self.acc_s_dtype)
            # qv: + Qv V^T of the same block (its V stage is K's), in the same WGMMA group
            more = ((qv_frags[0], qv_frags[1][None, None, None, stage]),) if const_expr(self.qv) else ()
            gemm(tiled_mma, acc_S, tSrQ_cur, tSrK_cur[None, None, None, stage], zero_init=True, wg_wait=wg_wait,
                 more=more)
            # fp8_qk_int8: the int32 sums seen as float32 registers, converted by score_mod after
            # the GEMM's wait (every path calls it first)
            return cute.recast_tensor(acc_S, Float32) if const_expr(self.cfg.fp8_qk_int8) else acc_S

        def pv_gemm(stage, wg_wait, k_blocks: cutlass.Constexpr[int] = 0):
            acc = acc_PV if const_expr(self.fresh_pv) else acc_O
            gemm(tiled_mma_pv, acc, tOrP, tOrVt[None, None, None, stage], zero_init=self.fresh_pv, wg_wait=wg_wait,
                 k_blocks=k_blocks)

        def narrow_block(n: int) -> BlockOperands:
            """The same per-block code over the block's first n keys: an N = n QK^T, its own
            accumulator and masks' coordinates, the first n columns of P (its first k-blocks:
            P's registers are k-block major) and of PV's k-blocks."""
            tiled_mma_qk_n = self.make_tiled_mma_qk(n)
            wg_mma_qk_n = tiled_mma_qk_n.get_slice(wg_idx * NUM_THREADS_PER_WG)
            tSrK_n = wg_mma_qk_n.make_fragment_B(wg_mma_qk_n.partition_B(cute.logical_divide(sK, (n,))[(None, 0), None, None]))
            if const_expr(self.cfg.tile.pin_desc):
                tSrK_n = pin_smem_desc(tSrK_n)
            return BlockOperands(
                tOrP=cute.make_tensor(tOrP.iterator, cute.make_layout(wg_mma_pv.partition_shape_A((self.tile_m, n)))),
                thr_mma_qk=tiled_mma_qk_n.get_slice(tidx),
                thr0_mma_qk=tiled_mma_qk_n.get_slice(0),
                qk_mma=(tiled_mma_qk_n, tSrK_n, n),
                pv_k_blocks=n // 16,
            )

        # diag_half: the tile's first block over its first tile_n / 2 keys (step_plain's `half`)
        half = narrow_block(self.tile_n // 2) if const_expr(self.cfg.tile.diag_half) else None
        # short_first: the tile's first block over its first short_first keys where the sequence
        # ends there (first_block_overlap's `short`)
        short = narrow_block(self.cfg.tile.short_first) if const_expr(self.cfg.tile.short_first) else None

        overlap = self.cfg.tile.intra_wg_overlap
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, pipeline_q.num_stages)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, pipeline_k.num_stages)
        self.ring.init(wg_idx)
        scheduler = tiles.scheduler
        tile = tiles.follow(None, pipeline_q, q_state)  # dynamic: the producer says which tile is next
        while scheduler.valid(tile):
            m_block, head, batch, split = tiles.coords(tile)
            seqlen = tiles.seqlen_fn(batch)
            mask = tiles.mask_fn(seqlen, m_block)
            fp8_scales = None
            if const_expr(self.fp8):
                fp8_scales = fp8.Fp8Scales.create(
                    *scales, scale_log2, self.cfg.fp8_block_m, self.tile_m, self.tile_n, thr_mma_qk, m_block, head,
                    batch, seqlen, self.cfg.pack_gqa, packed_q=self.cfg.cu_seqlens_q,
                    packed_k=self.cfg.cu_seqlens_k, ragged_q=self.cfg.cu_seqlens_q or self.cfg.seqused_q,
                    v_channel=self.v_channel, descales=self.cfg.fp8_descales)
            qk_gemm_tile = partial(qk_gemm, self.q_stage_frag(tSrQ, q_state))
            step = partial(
                self.step_overlap if const_expr(overlap) else self.step_plain,
                qk_gemm=qk_gemm_tile, pv_gemm=pv_gemm, pipeline_k=pipeline_k, pipeline_v=pipeline_v,
                softmax=softmax, acc_O=acc_O, tOrP=tOrP, thr_mma_qk=thr_mma_qk, thr0_mma_qk=thr0_mma_qk,
                mask=mask, softcap_premul=softcap_premul, wg_idx=wg_idx, o_scale=o_scale, fp8_scales=fp8_scales,
                acc_PV=acc_PV,
            )
            n_block_min, n_block_max = tiles.kv_block_range(mask, split)
            if m_block * self.tile_m < seqlen.seqlen_q:
                acc_O.fill(0.0)
                softmax.reset()
                if const_expr(self.cfg.tile.rescale_o_before_pv):
                    o_scale.fill(1.0)
                pipeline_q.consumer_wait(q_state)
                if n_block_min < n_block_max:
                    # 1) the last KV block: seqlen + window masks.
                    n_block = n_block_max - 1
                    if const_expr(overlap):
                        first = partial(
                            self.first_block_overlap, kv_state, n_block, qk_gemm=qk_gemm_tile, pipeline_k=pipeline_k,
                            softmax=softmax, mask=mask, softcap_premul=softcap_premul, fp8_scales=fp8_scales,
                            pipeline_v=pipeline_v)
                        full = BlockOperands(tOrP, thr_mma_qk, thr0_mma_qk)
                        if const_expr(short is not None):
                            if seqlen.seqlen_k - n_block * self.tile_n <= self.cfg.tile.short_first:
                                kv_state = first(ops=short, p_full=tOrP)
                            else:
                                kv_state = first(ops=full)
                        else:
                            kv_state = first(ops=full)
                    else:
                        self.ring.sync(wg_idx)
                        kv_state = step(kv_state, n_block, is_first=True, mask_seqlen=True,
                                        mask_right=True, mask_left=True, half=half)
                    # 2) blocks that cross the right edge of the window (causal diagonal) or a
                    #    row's chunk.
                    n_hi = n_block_max - 1
                    if const_expr(self.cfg.has_right or self.cfg.chunk):
                        n_lo = cutlass.min(mask.n_block_min_right_masked(n_block_min), n_hi)
                        for i in cutlass.range(n_hi - n_lo, unroll=1):
                            kv_state = step(kv_state, n_hi - 1 - i, mask_right=True, mask_left=True)
                        n_hi = n_lo
                    # 3) interior blocks: no mask.
                    n_lo = cutlass.min(mask.n_block_max_left_masked(n_block_min), n_hi)
                    for i in cutlass.range(n_hi - n_lo, unroll=1):
                        kv_state = step(kv_state, n_hi - 1 - i)
                    # 4) blocks that cross the left edge of the window or a row's chunk.
                    if const_expr(self.cfg.has_left or self.cfg.chunk):
                        for i in cutlass.range(n_lo - n_block_min, unroll=1):
                            kv_state = step(kv_state, n_lo - 1 - i, mask_left=True)
                    # channel V: O's columns times V's channel scales (no KV block: O is 0)
                    channel_scales = partial(fp8_scales.channel_scales, tiled_mma_pv, tidx, self.tile_m,
                                             self.hdimv) if const_expr(self.v_channel) else None
                    if const_expr(overlap):
                        if const_expr(self.separate_o):
                            pipeline_q.consumer_release(q_state)  # every QK^T of the tile is done
                        kv_state, sv = self.last_block_overlap(kv_state, pv_gemm=pv_gemm,
                                                               pipeline_v=pipeline_v, softmax=softmax,
                                                               acc_O=acc_O, o_scale=o_scale, fp8_scales=fp8_scales,
                                                               acc_PV=acc_PV, channel_scales=channel_scales)
                    else:
                        # (chain_pv_qk: read while the last PV runs; else it has been waited for)
                        sv = channel_scales() if const_expr(self.v_channel) else None
                        if const_expr(self.cfg.tile.chain_pv_qk):
                            warpgroup.wait_group(0)  # the last PV
                            release_previous(pipeline_v, kv_state)
                        self.ring.arrive(wg_idx)
                        if const_expr(self.separate_o):
                            pipeline_q.consumer_release(q_state)
                    if const_expr(self.v_channel):
                        fp8_scales.scale_channels(acc_O, sv)
                elif const_expr(self.separate_o):
                    pipeline_q.consumer_release(q_state)  # no KV block: Q is never read
                release_q = None if const_expr(self.separate_o) else partial(pipeline_q.consumer_release, q_state)
                if const_expr(self.cfg.split_kv):
                    epilogue.store_split(acc_O, softmax, out, tiled_mma_pv, tidx_mma, m_block, head, batch, split,
                                         tiles.num_splits, scheduler.num_batch, seqlen, release_q, col_part)
                else:
                    epilogue.store(acc_O, softmax, out, tiled_mma_pv, tidx_mma, m_block, head, batch, seqlen,
                                   release_q, col_part)
                q_state.advance()
            tile = tiles.follow(tile, pipeline_q, q_state)  # (dynamic: the tile's own Q wait then returns at once)
        if const_expr(self.cfg.tile.tma_store):
            # The last TMA stores of O must have read sO before the CTA's smem goes away.
            cute.arch.cp_async_bulk_wait_group(0, read=True)

    def q_stage_frag(self, tSrQ, q_state):
        """Q's WGMMA operand for the tile. One Q stage: `tSrQ`, pinned once in mma. Two: the
        tile's stage, pinned here, once per tile (pinned once for both stages, every QK^T would
        add the stage offset to each k-block's descriptor again)."""
        if const_expr(self.q_stages > 1):
            return self.pin_q(tSrQ[None, None, None, q_state.index])
        return tSrQ

    def pin_q(self, frag):
        """With pin_desc: Q's descriptor per k-block in (uniform) registers (a tuple per k-block;
        at hdim 256 the 16 spill, so one there)."""
        if const_expr(self.cfg.tile.pin_desc):
            return pin_smem_desc(frag, per_k=self.hdim <= 192)
        return frag

    @cute.jit
    def score_mod(self, acc_S: cute.Tensor, softcap_premul: Float32, n_block=None, fp8_scales=None):
        """softcap: s = softcap * tanh(scale * qk / softcap); softcap*log2(e) is in scale_log2.
        FP8: tanh(S * sq[row] * sk[n_block] * c), c = softmax_scale / (n softcap) (the block
        scales go inside the tanh); softcap*log2(e), in softcap_premul, multiplies it in
        softmax_step. fp8_qk_int8: first S's int32 sums (in acc_S's registers) to float32, exactly,
        by the magic-number conversion (an integer add and a float subtract, where I2F would take
        the conversion unit): |S| <= hdim * 127^2 < 2^22 up to hdim 256, where the bits of
        i + 0x4B400000 are the float 2^23 + 2^22 + i."""
        if const_expr(self.cfg.fp8_qk_int8):
            assert self.hdim * 127 * 127 < 1 << 22, "int8 Q K^T sums past 2^22"
            acc_i = cute.recast_tensor(acc_S, Int32)
            for i in cutlass.range_constexpr(cute.size(acc_S)):
                acc_i[i] = acc_i[i] + Int32(0x4B400000)
                acc_S[i] = acc_S[i] - Float32(12582912.0)
        if const_expr(self.cfg.softcap):
            if const_expr(self.fp8):
                s_mn = acc_to_mn(acc_S)
                mult = fp8_scales.row_mult()
                for r in cutlass.range_constexpr(cute.size(s_mn.shape[0])):
                    for j in cutlass.range_constexpr(cute.size(s_mn.shape[1])):
                        s_mn[r, j] = cute.math.tanh(s_mn[r, j] * mult[r])
            else:
                for i in cutlass.range_constexpr(cute.size(acc_S)):
                    acc_S[i] = cute.math.tanh(acc_S[i] * softcap_premul)

    @cute.jit
    def softmax_block(self, acc_S, n_block, softmax: OnlineSoftmax, tOrP, thr_mma_qk, thr0_mma_qk, mask,
                      softcap_premul, is_first: cutlass.Constexpr[bool], mask_seqlen: cutlass.Constexpr[bool],
                      mask_right: cutlass.Constexpr[bool], mask_left: cutlass.Constexpr[bool], fp8_scales=None):
        """Scores -> P (in tOrP); returns the O row rescale factors and step's `moved`."""
        self.score_mod(acc_S, softcap_premul, n_block, fp8_scales)
        if const_expr(mask_seqlen or mask_right or mask_left):
            mask.apply(acc_S, thr_mma_qk, n_block, mask_seqlen, mask_right, mask_left, thr0_mma_qk)
        row_scale, moved = self.softmax_step(softmax, acc_S, n_block, is_first, fp8_scales, softcap_premul)
        if const_expr(self.fresh_pv):
            fp8_scales.set_pending_v()
        self.convert_p(acc_S, tOrP)
        return row_scale, moved

    def softmax_step(self, softmax: OnlineSoftmax, acc_S, n_block, is_first: cutlass.Constexpr[bool], fp8_scales,
                     softcap_premul=None):
        """OnlineSoftmax's step; FP8: with the block's score multiplier (row max in scaled log2
        units, no lazy rescaling); with softcap the scores are tanh values (score_mod) and the
        multiplier softcap*log2(e), the same for every row."""
        if const_expr(self.fp8):
            if const_expr(self.cfg.softcap):
                return softmax.step_scaled(acc_S, fp8_scales.uniform_mult(softcap_premul), is_first), None
            return softmax.step_scaled(acc_S, fp8_scales.row_mult(), is_first), None
        return softmax.step(acc_S, is_first=is_first)

    def convert_p(self, acc_S, tOrP):
        """P (fp32, in the QK^T accumulator) into the PV WGMMA's register A operand. FP8: packed
        in fp8.REGISTER_ORDER, which V^T's PV_KEY_ORDER key order matches."""
        if const_expr(self.fp8):
            fp8.convert_p_e4m3(acc_S, tOrP)
        else:
            convert_to(acc_to_frgA(acc_S), tOrP)

    @cute.jit
    def step_plain(
        self, kv_state, n_block, qk_gemm, pv_gemm, pipeline_k, pipeline_v, softmax, acc_O, tOrP,
        thr_mma_qk, thr0_mma_qk, mask, softcap_premul, wg_idx, o_scale, is_first: cutlass.Constexpr[bool] = False,
        mask_seqlen: cutlass.Constexpr[bool] = False, mask_right: cutlass.Constexpr[bool] = False,
        mask_left: cutlass.Constexpr[bool] = False, half: Optional[BlockOperands] = None, fp8_scales=None,
        acc_PV=None,
    ):
        """One KV block without intra-WG overlap: S = QK^T, softmax, O = O*scale + PV.
        `half` (TileConfig.diag_half, given for the tile's first block, every mask on): where none
        of this warpgroup's rows keeps a key in the block's second half, the block runs over its
        first half only, with `half`'s GEMM, coordinates and P (a branch on a warp-uniform value)."""
        block = partial(self.block_plain, kv_state, n_block, qk_gemm, pv_gemm, pipeline_k, pipeline_v, softmax,
                        acc_O, mask=mask, softcap_premul=softcap_premul, wg_idx=wg_idx, is_first=is_first,
                        mask_seqlen=mask_seqlen, mask_right=mask_right, mask_left=mask_left,
                        fp8_scales=fp8_scales, acc_PV=acc_PV)
        full = BlockOperands(tOrP, thr_mma_qk, thr0_mma_qk)
        if const_expr(half is not None):
            wg_rows = self.tile_m // self.num_mma_wg  # this warpgroup's rows end at wg_rows * (wg_idx + 1)
            if mask.keys_end(wg_rows * (wg_idx + 1)) <= (2 * n_block + 1) * (self.tile_n // 2):
                block(ops=half)
            else:
                block(ops=full)
        else:
            block(ops=full)
        kv_state.advance()
        return kv_state

    @cute.jit
    def block_plain(
        self, kv_state, n_block, qk_gemm, pv_gemm, pipeline_k, pipeline_v, softmax, acc_O, ops: "BlockOperands",
        mask, softcap_premul, wg_idx, is_first: cutlass.Constexpr[bool], mask_seqlen: cutlass.Constexpr[bool],
        mask_right: cutlass.Constexpr[bool], mask_left: cutlass.Constexpr[bool], fp8_scales=None, acc_PV=None,
    ):
        chain = self.cfg.tile.chain_pv_qk
        if const_expr(self.fp8):
            fp8_scales.fetch(n_block)  # (before the wait: Fp8Scales)
        pipeline_k.consumer_wait(kv_state)
        if const_expr(self.qv):
            pipeline_v.consumer_wait(kv_state)  # S reads V too
        acc_S = qk_gemm(kv_state.index, wg_wait=-1, mma=ops.qk_mma)  # S = Q @ K^T
        self.ring.arrive(wg_idx)
        warpgroup.wait_group(0)  # (chain_pv_qk: and the previous block's PV)
        pipeline_k.consumer_release(kv_state)
        if const_expr(chain and not is_first):
            release_previous(pipeline_v, kv_state)
        row_scale, moved = self.softmax_block(acc_S, n_block, softmax, ops.tOrP, ops.thr_mma_qk, ops.thr0_mma_qk,
                                              mask, softcap_premul, is_first, mask_seqlen, mask_right, mask_left,
                                              fp8_scales)
        softmax.rescale_O(acc_O, row_scale, moved, lazy=not is_first)
        pipeline_v.consumer_wait(kv_state)
        self.ring.sync(wg_idx)
        pv_gemm(kv_state.index, wg_wait=-1 if const_expr(chain) else 0, k_blocks=ops.pv_k_blocks)  # O += P @ V
        if const_expr(not chain):
            pipeline_v.consumer_release(kv_state)
        if const_expr(self.fresh_pv):
            fp8_scales.add_pv(acc_O, acc_PV)

    @cute.jit
    def first_block_overlap(self, kv_state, n_block, qk_gemm, pipeline_k, softmax, ops: "BlockOperands", mask,
                            softcap_premul, fp8_scales=None, pipeline_v=None,
                            p_full=None):
        """Overlapped schedule, first block: S = QK^T and softmax only; its PV comes later, over
        the whole block. `ops` a narrow block's (short_first): the rest of P (`p_full`, the whole
        block's: its keys past the narrow block's, beyond the sequence) is set to zero for that PV."""
        if const_expr(self.fp8):
            fp8_scales.fetch(n_block)  # (before the wait: Fp8Scales)
        pipeline_k.consumer_wait(kv_state)
        if const_expr(self.qv):
            pipeline_v.consumer_wait(kv_state)  # S reads V too
        acc_S = qk_gemm(kv_state.index, wg_wait=0, mma=ops.qk_mma)
        pipeline_k.consumer_release(kv_state)
        self.softmax_block(acc_S, n_block, softmax, ops.tOrP, ops.thr_mma_qk, ops.thr0_mma_qk, mask, softcap_premul,
                           True, True, True, True, fp8_scales)
        if const_expr(p_full is not None):
            words = cute.recast_tensor(p_full, Int32)  # (P's registers are k-block major)
            for i in cutlass.range_constexpr(cute.size(ops.tOrP) * p_full.element_type.width // 32, cute.size(words)):
                words[i] = Int32(0)
        return kv_state

    @cute.jit
    def step_overlap(
        self, kv_state, n_block, qk_gemm, pv_gemm, pipeline_k, pipeline_v, softmax, acc_O, tOrP,
        thr_mma_qk, thr0_mma_qk, mask, softcap_premul, wg_idx, o_scale, is_first: cutlass.Constexpr[bool] = False,
        mask_seqlen: cutlass.Constexpr[bool] = False, mask_right: cutlass.Constexpr[bool] = False,
        mask_left: cutlass.Constexpr[bool] = False, fp8_scales=None, acc_PV=None,
    ):
        """Overlapped schedule: issue S = QK^T(n_block) and O += P V(previous block) together,
        then the softmax of n_block runs while PV is in flight."""
        v_state = kv_state.clone()
        kv_state.advance()
        if const_expr(self.fp8):
            fp8_scales.fetch(n_block)  # (before the wait: the previous block's are used already)
        pipeline_k.consumer_wait(kv_state)
        if const_expr(self.qv):
            pipeline_v.consumer_wait(kv_state)  # S reads this block's V too (PV reads the previous one's)
        self.ring.sync(wg_idx)
        acc_S = qk_gemm(kv_state.index, wg_wait=-1)  # S = Q @ K^T
        if const_expr(self.cfg.tile.rescale_o_before_pv):
            softmax.rescale_O(acc_O, o_scale)  # the previous block's factors, under QK^T
        pipeline_v.consumer_wait(v_state)
        pv_gemm(v_state.index, wg_wait=-1)  # O += P @ V (previous block)
        self.ring.arrive(wg_idx)
        warpgroup.wait_group(1)
        gate = self.cfg.tile.k_release_gate
        if const_expr(gate == 0):
            pipeline_k.consumer_release(kv_state)
        self.score_mod(acc_S, softcap_premul, n_block, fp8_scales)
        if const_expr(mask_seqlen or mask_right or mask_left):
            mask.apply(acc_S, thr_mma_qk, n_block, mask_seqlen, mask_right, mask_left, thr0_mma_qk)
        row_scale, moved = self.softmax_step(softmax, acc_S, n_block, False, fp8_scales, softcap_premul)
        if const_expr(gate > 0):
            release_after(pipeline_k, kv_state, acc_to_mn(acc_S), gate - 1)
        warpgroup.wait_group(0)
        pipeline_v.consumer_release(v_state)
        if const_expr(self.fresh_pv):
            # the previous block's PV (at its own max, like O) in, before O moves to this block's
            fp8_scales.add_pv(acc_O, acc_PV)
            fp8_scales.set_pending_v()
        self.convert_p(acc_S, tOrP)
        if const_expr(self.cfg.tile.rescale_o_before_pv):
            o_scale.store(row_scale.load())
        else:
            softmax.rescale_O(acc_O, row_scale, moved)
        return kv_state

    @cute.jit
    def last_block_overlap(self, kv_state, pv_gemm, pipeline_v, softmax, acc_O, o_scale, fp8_scales=None,
                           acc_PV=None, channel_scales=None):
        """Overlapped schedule, the tile's last PV. `channel_scales` (channel V: a function
        returning this thread's V channel scales) is read while the PV runs; returns
        (kv_state, its result or None)."""
        if const_expr(self.cfg.tile.rescale_o_before_pv):
            softmax.rescale_O(acc_O, o_scale)
        pipeline_v.consumer_wait(kv_state)
        pv_gemm(kv_state.index, wg_wait=-1)
        sv = channel_scales() if const_expr(channel_scales is not None) else None
        warpgroup.wait_group(0)
        pipeline_v.consumer_release(kv_state)
        if const_expr(self.fresh_pv):
            fp8_scales.add_pv(acc_O, acc_PV)
        kv_state.advance()
        return kv_state, sv

    # ------------------------------------------------------------------ compile
    @staticmethod
    def fake_args(cfg: FwdConfig, env_stream: bool = False):
        """Fake tensors/scalars matching `forward`'s call: symbolic shapes and 16-byte-divisible
        strides, so one compile serves every size (CPU compile-only, and the TVM-FFI path with
        `env_stream`: the kernel then runs on the caller's current torch stream)."""
        sym, sym64 = cute.sym_int, cute.sym_int64
        dt = DTYPES[cfg.dtype]
        div = 128 // dt.width

        def t(shape, dtype=dt, d=div):
            stride = tuple(1 if i == len(shape) - 1 else sym64(divisibility=d) for i in range(len(shape)))
            return cute.runtime.make_fake_tensor(dtype, shape, stride=stride, assumed_align=16 if d > 1 else 4)

        b, sq, sk, h, hk = sym(), sym(), sym(), sym(), sym()
        tq, tk = sym(), sym()
        q_rows = (tq,) if cfg.cu_seqlens_q else (b, sq)
        # paged: K / V are page pools (num_pages, page_size, h_kv, d): their rows are not Q's batch
        k_rows = (tk,) if cfg.cu_seqlens_k else (sym(), sym()) if cfg.page_size else (b, sk)
        d, dv = cfg.hdim_in or cfg.hdim, cfg.hdimv_in or cfg.hdimv  # the tensors' head dims
        qk_dt = cutlass.Int8 if cfg.fp8_qk_int8 else dt
        mQ = t((*q_rows, h, d), qk_dt)
        mK = t((*k_rows, hk, d), qk_dt)
        # FP8: V^T (b, h_kv, dv, s_k padded to 16), packed: (1, h_kv, dv, columns); fp8_v_rows: V as K
        if cfg.dtype == "e4m3" and not cfg.fp8_v_rows:
            mV = t((sym() if cfg.cu_seqlens_k else b, hk, dv, sym(divisibility=16)))
        else:
            mV = t((*k_rows, hk, dv))
        o_dt = cutlass.BFloat16 if cfg.dtype == "e4m3" else dt
        if cfg.split_kv:  # float32 partials, the splits folded into O's first dim / LSE's rows
            o_rows, lse_rows = sym(), sym()
            mO = t((o_rows, *q_rows[1:], h, dv), Float32, 4)
            mLSE = t((h, lse_rows) if cfg.cu_seqlens_q else (o_rows, h, sq), Float32, 1)
        else:
            mO = t((*q_rows, h, dv), o_dt, 128 // o_dt.width)
            mLSE = t((h, tq) if cfg.cu_seqlens_q else (b, h, sq), Float32, 1)
        bp1 = sym()
        vec = lambda n: cute.runtime.make_fake_tensor(Int32, (n,), stride=(1,), assumed_align=4)
        return (
            mQ, mK, mV, mO, mLSE,
            vec(bp1) if cfg.cu_seqlens_q else None,
            vec(bp1) if cfg.cu_seqlens_k else None,
            vec(b) if cfg.seqused_q else None,
            vec(b) if cfg.seqused_k else None,
            t((b, sym()), Int32, 1) if cfg.page_size else None,
            vec(2) if cfg.tile.dynamic else None,
            *(_fake_fp8_scales(cfg, b, h, hk, dv) if cfg.dtype == "e4m3" else (None, None, None)),
            t((*q_rows, h, dv)) if cfg.qv else None,
            Float32(1.0), Float32(1.0), Int32(-1), Int32(-1), Int32(0), Int32(1), Int32(132), Int32(1), Int32(1),
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=env_stream),
        )
