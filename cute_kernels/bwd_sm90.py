"""FlashAttention-3-style backward attention for sm90 (H100/H200), bf16/fp16, in CuTe DSL.

One CTA per (key block of tile_n keys, KV head, batch). It holds K, V and the dK, dV
accumulators of its keys and walks the query blocks of tile_m rows that see them, for every
query head of its KV head (GQA / MQA: dK and dV summed over the group in registers, no second
pass), in increasing m_block order. Where that grid is small (few KV heads, short keys),
`dkv_partial` splits each group over `head_splits` CTAs that write float32 dK / dV partials
(split s of KV head h at head index h * head_splits + s), which the host sums.

Warp roles (384 threads):
  WG0 warp 0   producer: K and V once (pipeline_kv), then per (head, m_block) Q + LSE
               (pipeline_q) and dO + dPsum (pipeline_do) by TMA / bulk copies.
  WG0 warp 1   dQ writer: per (head, m_block) and consumer warpgroup, one bulk reduce-add
               (cp.reduce.async.bulk .add.f32) of that warpgroup's fp32 dQ from smem into the
               dQ accumulator in global memory, overlapped with the next block's GEMMs.
  WG1, WG2     consumers (setmaxnreg 240; the producer warpgroup 24), in one of two layouts.

hdim <= 128 (tile_n = 128): each consumer warpgroup owns 64 keys. Per m_block:
    S^T  = K Q^T          SS WGMMA, keys as M: P^T stays in this thread's registers
    dP^T = V dO^T         SS WGMMA
    P^T  = exp2(S^T * scale_log2 - LSE_log2[query])   (masked entries -inf -> 0)
    dS^T = P^T * (dP^T - dPsum[query])  (softcap: times 1 - tanh^2)
    dS^T -> sdS (stmatrix), shared by both warpgroups
    dV  += P^T dO         RS WGMMA
    dQ   = dS K           SS WGMMA from sdS (each warpgroup: half of dQ's columns, or of its
                          rows at tile_m 128), -> sdQ in fragment order
    dK  += dS^T Q         RS WGMMA
  then dK * softmax_scale and dV to global memory: `dkv_smem` (the default on every tile but the
  non-causal 80-row one) stages each warp's 16 keys of both in smem over sQ / sdO (one barrier: both warpgroups'
  last GEMMs done) and writes them by 16-byte row-contiguous stores; otherwise element-wise from
  the registers (each 32-byte sector written twice: ncu at hdim 128, 2k). On the tiles below,
  dkv_smem's slab of a warp is 16 keys x hdim / 2 (split_hdim) or, from dK^T / dV^T by
  stmatrix.trans, 96 keys x 16 columns (dkvt); `dkv_slab`, checked at trace time.
  tile_m 128 (hdim 64 only, its default: FA3's 128 x 128 tile; 64 stays a variant,
  `BwdConfig.make(..., tile_m=64)`): S^T / dP^T of 64 keys x 128
  queries (64 registers each a thread), LSE_log2 / dPsum / sQ / sdO / sdS of 128 rows, and dQ
  split by rows (`dq_split_rows`: warpgroup w computes dQ rows 64w .. 64w + 63, all hdim columns,
  from sdS's query columns 64w ..; sK's swizzle atom then spans hdim). sdQ and the bulk reduce keep
  their per-warpgroup chunks (32 values a thread), the host's order follows (dq_value_coords).
  dK / dV start from an opaque zero (as with split_hdim, below: from a literal 64 of them spill),
  and with softcap d tanh is not kept in fp16 beside S^T and dP^T (it spills): tanh before the dP^T
  wait, then (dP^T - dPsum) * (1 - tanh^2) (clamped at 0: a masked -inf gives 0) and P^T = exp2(..)
  in two passes once dP^T is in (d tanh in fp32); so does hdim 128 with softcap and a mask, whose
  fp16 d tanh spilled 16-24 bytes. CPU SASS: max register R231 .. R237 of 240, no local memory,
  except hdim 64's softcap with a window and varlen together (8-24 bytes of stack).
  tile_m 80 (hdim 128 from bwd_launch.M80_MIN_SEQLEN_Q rows; FA3's non-causal tile): S^T /
  dP^T of 64 keys x 80 queries (40 registers each a thread), sdS of 128 x 80 (a 32-byte swizzle:
  80 columns), and since WGMMA's M cannot be 80, dQ^T = K^T dS^T (`dq_swap_ab`: warpgroup w
  computes head-dim rows 64w .. 64w + 63 of dQ^T, all 80 queries; the host's order and the
  post-processing read it transposed).

hdim 192 / 256 (`dkv_split_hdim`, tile_n = 64): dK and dV of 128 keys do not fit two
warpgroups' registers, so the warpgroups split the work by queries for S^T / dP^T and by head-dim
columns for dK / dV (FA3's 64 x 64 tile at hdim 256):
    S^T, dP^T             SS WGMMA, the 64 keys as M, warpgroup w's queries 32w .. 32w + 31 as N
    P^T, dS^T             as above, for those queries, in registers
    P^T -> sP, dS^T -> sdS  (stmatrix; both warpgroups' halves make the 64 x 64 tiles)
    dV[:, cols_w] += P^T dO[:, cols_w]   SS WGMMA, A = sP, cols_w = warpgroup w's hdim / 2 columns
    dQ   = dS K           as above (the same dQ MMA, sdQ layout and host order)
    dK[:, cols_w] += dS^T Q[:, cols_w]   SS WGMMA, A = sdS
  dK / dV: 64 keys x hdim / 2 per warpgroup (64 + 64 registers a thread at hdim 256). Q / dO
  have one stage at hdim 256 (smem: 4 x 32 KB of Q, dO, K, V, 2 x 8 KB of sP / sdS and the
  64 KB fp32 sdQ), two at 192. hdim 192 with hdim_v 128 (`hdimv`): V, dO and dV are 128 wide
  (dP^T's K dimension, dV's hdimv / 2 = 64 columns per warpgroup, its own tiled MMA).
  dK / dV start from an opaque zero (utils.opaque_f32): from a literal, LLVM materializes the
  zeros before the warp-role branch and ptxas, holding them under that region's 168-register
  budget, spilled dV and serialized the WGMMAs.

hdim 192, FA3's layout (`dkv_transposed`, the default: bwd_launch.dkvt): 96 keys a CTA over three
consumer warpgroups (512 threads, setmaxnreg 24 / 160), so each query block's dQ adds serve 96
keys, not 64:
    S = Q K^T, dP = dO V^T   SS WGMMA, the 64 queries as M, warpgroup w's keys 32w .. 32w + 31 as N
    P, dS                    in registers (LSE_log2 / dPsum per row; masks through a keys x queries
                             view, KeyBlockMask.apply(keys_as_columns=True)), -> sP / sdS (stmatrix)
    dV^T[rows_w] += dO^T P   SS WGMMA, A = dO read transposed, B = sP read transposed; rows_w =
                             head-dim rows 64w .. 64w + 63, all 96 keys
    dQ[:, cols_w] = dS K     SS WGMMA, A = sdS, B = K read transposed; added from registers (dq_red:
                             no room for sdQ beside two Q / dO stages)
    dK^T[rows_w] += Q^T dS   SS WGMMA
  dK^T / dV^T: 48 + 48 registers a thread; stored transposed. No deterministic mode (its ordered
  adds are the dQ warp's); hdim_v 128 keeps the split_hdim tile. CPU SASS: max R157 of 160, no
  local memory but with a window and varlen, or dkv_partial (8 bytes in the epilogue).

Masks (mask.KeyBlockMask): a key block walks only the query blocks whose rows keep one of its
keys (window; attention_chunk C, a launch argument of `chunk` configs: the rows whose chunk
holds the key), and masks only those that straddle an edge: the first ones (rows before some
key's diagonal or chunk) both edges, the last ones (rows past some key's left window edge or
chunk) the left edge.

Layouts the host prepares (bwd_launch.py): LSE_log2 = LSE * log2(e) (+inf where LSE is -inf
or the row is padding, so P = 0 there) and dPsum = rowsum(dO * O), float32, per head in
query rows padded per sequence to whole tile_m blocks (`padded_offset`); the dQ accumulator,
float32, zeroed, with each (head, m_block) chunk of tile_m x hdim values in the order the
consumer threads hold them (`dq_fragment_order`), which the host permutes back while it scales
and converts dQ.

Variants (bwd_launch picks them per head dim as timed on an H100): `ds_stages` 2 (hdim <= 128) gives sdS one buffer per Q
stage, so only the barrier after dS^T is written remains (a warpgroup may write block m's dS^T while
the other still reads block m - 1's in its dQ GEMM); `dq_red` adds dQ from the consumers' registers
with red.global.add.v4.f32 at the bulk reduce's addresses (no sdQ, no dQ warp: at hdim 256 the room
takes a second Q / dO stage; not with deterministic, whose ordered adds are the dQ warp's);
`stat_regs` reads the LSE_log2 / dPsum values into registers under the GEMMs (ptxas does not move a
shared load across a wgmma wait, so read where used they put their latency between the S^T wait and
the first exp2); `dv_early` (P^T in registers) issues dV += P^T dO right after P^T is converted, so
every exp2 precedes dP^T's wait and dV's GEMM runs under dS^T's math; `dk_early` (P^T / dS^T in
registers; opt-in, untimed) issues dK += dS^T Q before dS^T's stmatrix and the PdS barrier, so it
runs while the warpgroups meet there, and dQ's result waits for it; `dkv_smem` (above) 1.8-6.7%
less time at 2k tokens x 8 (H100 / H200, hdim 64-256), +1.4-1.9% on the 80-row tile non-causal (off
there), -1% causal; `lpt` (causal / right windows; the default) launches the key blocks in the
forward's longest-first order (scheduler.TileScheduler, a 1-D grid: a pair's key blocks ascending,
the final section's key block by key block across pairs), where the plain grid leaves the last
pairs' longest blocks for the end: 2.1-4.0% less time causal at 2k / 4k (H100); `pdl` (opt-in,
timed level) launches the three kernels with programmatic dependent launch.

Pipelines (PipelineTmaAsync, counts checked at trace time): pipeline_kv 1 stage (K + V bytes),
pipeline_q / pipeline_do q_stages (Q + LSE / dO + dPsum bytes); consumer release from lane 0
of each of the 8 consumer warps. Named barriers (utils.NamedBarrierBwd): PdS over both consumer
warpgroups around sdS (and sP); dQFull / dQEmpty per consumer warpgroup with the dQ warp around
sdQ.
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
from cutlass.utils import LayoutEnum

from cute_kernels.config import BwdConfig
from cute_kernels.mask import KeyBlockMask, SeqlenInfo
from cute_kernels.pipeline import check_arrive_counts, tma_pipeline_maker
from cute_kernels.scheduler import TileScheduler, lpt_tail_heads
from cute_kernels.utils import (
    NamedBarrierBwd,
    acc_to_frgA,
    acc_to_mn,
    mn_transposed,
    assume_aligned_strides,
    bulk_load,
    bulk_reduce_add_f32,
    convert_to,
    gemm,
    load_acquire_i32,
    lse_shb,
    make_smem_layout,
    opaque_f32,
    red_add_v4_f32,
    red_release_add_i32,
    sdhb,
    store_acc_predicated,
    stage_acc,
    stmatrix_op,
    store_slab_predicated,
    transpose_view,
)

DTYPES = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16}
THREADS_PER_WG = 128
NUM_MMA_WG = 2
SMEM_BYTES = 227 * 1024
DQ_VEC = 4  # fp32 values per 16-byte store of dQ into sdQ
DKV_WARP_ROWS = 16  # rows of dK / dV (dkvt: of dK^T / dV^T) one consumer warp holds (WGMMA: warp w, rows 16w ..)


def padded_offset(offset_q, batch, tile_m: int):
    """First row of sequence `batch` in the padded per-head rows (LSE_log2, dPsum, dQ
    accumulator) of packed queries: rows offset_q .. offset_q + L - 1 move to start at a
    multiple of tile_m, and every sequence's whole blocks stay apart (FA3's layout:
    (offset_q + batch * tile_m) rounded down to tile_m; total rows <= total_q + batch * tile_m)."""
    return (offset_q + batch * tile_m) // tile_m * tile_m


def lpt_key_block(bid, num_n_blocks, pairs, batch, tail_heads):
    """lpt: (n_block, kv_split, batch) of block index `bid`: scheduler.TileScheduler's
    longest-first numbering (sections of one (KV head, split) pair, then a final section of the
    last `tail_heads` pairs), its blocks longest first as descending, reversed here (causal key
    blocks are longest first ascending). Each pair's key blocks ascend with `bid`: deterministic's
    waits are on earlier-launched CTAs."""
    sched = TileScheduler(num_n_blocks, pairs, batch, persistent=False, lpt=True, l2_heads=Int32(1),
                          tail_heads=tail_heads)
    longest_first, kv_split, b = sched.lpt_coords(bid)
    return num_n_blocks - 1 - longest_first, kv_split, b


class FlashAttentionBackwardSm90:
    def __init__(self, cfg: BwdConfig):
        self.cfg = cfg
        self.dtype = DTYPES[cfg.dtype]
        self.tile_m, self.tile_n, self.hdim = cfg.tile_m, cfg.tile_n, cfg.hdim
        self.hdimv = cfg.hdimv or cfg.hdim  # V, dO, dV (split_hdim: may be below hdim, 192 x 128)
        self.q_stages = cfg.q_stages
        self.split_hdim = cfg.dkv_split_hdim
        # hdim 192, FA3's layout: S / dP with the queries as M, dK^T / dV^T, three warpgroups
        self.dkvt = cfg.dkv_transposed
        self.num_wg = cfg.num_mma_wg
        # tile_m 128 (hdim 64): dQ = dS K split by rows, 64 per warpgroup (tile_m 64: by columns)
        self.dq_split_rows = self.tile_m == 128
        # tile_m 80 (hdim 128): dQ^T = K^T dS^T, the head dim as M (64 rows per warpgroup), since
        # WGMMA's M is 64 per warpgroup and 80 is not a multiple of it (FA3's dQ_swapAB)
        self.dq_swap_ab = self.tile_m % 64 != 0
        # dQ's accumulator tile as its MMA computes it: (rows, columns) of dQ, or dQ^T's
        self.dq_tile = (self.hdim, self.tile_m) if self.dq_swap_ab else (self.tile_m, self.hdim)
        # S's (dP's, P's, dS's) tile as the sdp MMA computes it: S^T (keys x queries), or with dkvt S
        self.s_tile = (self.tile_m, self.tile_n) if self.dkvt else (self.tile_n, self.tile_m)
        # dK's (dV's) tile as its MMA computes it: keys x head dim, or with dkvt dK^T (dV^T)
        self.dkv_tile = (lambda cols: (cols, self.tile_n)) if self.dkvt else (lambda cols: (self.tile_n, cols))
        # which coordinate of S's tile is the query (the other is the key)
        self.qi = 0 if self.dkvt else 1
        # softcap's d tanh recomputed in fp32 from the tanh kept in S^T once dP^T is in (two passes)
        # instead of kept in fp16 beside S^T and dP^T: where keeping it spills (tile_m 128; hdim 128
        # with a mask: 16 / 24 bytes of stack causal / local + varlen; tile_m 80: 224 bytes; dkvt:
        # 16-24; none two-pass; CPU SASS)
        masked = cfg.has_left or cfg.has_right or cfg.chunk
        spills = self.dq_split_rows or self.dkvt or (self.hdim == 128 and (masked or self.tile_m == 80))
        self.softcap_two_pass = cfg.softcap and spills
        self.dv_early = cfg.dv_early and not self.softcap_two_pass  # (two-pass: P^T comes with dS^T)
        self.num_mma_threads = self.num_wg * THREADS_PER_WG
        self.num_threads = self.num_mma_threads + THREADS_PER_WG
        # fp32 dQ values one consumer thread holds per m_block
        self.dq_per_thread = self.tile_m * self.hdim // self.num_mma_threads
        assert self.dq_per_thread % DQ_VEC == 0

    # ------------------------------------------------------------------ host side
    def _mma(self, a_major, b_major, atoms, n, a_source=warpgroup.OperandSource.SMEM):
        return sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, a_major, b_major, Float32, atom_layout_mnk=atoms, tiler_mn=(64, n),
            a_source=a_source)

    def make_tiled_mmas(self):
        K, MN = warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.MN
        if self.dkvt:
            # S = Q K^T and dP = dO V^T: M = the 64 queries, N = the keys, tile_n / 3 per warpgroup
            sdp = self._mma(K, K, (1, self.num_wg, 1), self.tile_n // self.num_wg)
            # dV^T += dO^T P, dK^T += Q^T dS: M = the head dim (64 rows per warpgroup), N = all the
            # keys; A = dO / Q read transposed, B = sP / sdS read transposed (both MN-major)
            dkv = self._mma(MN, MN, (self.num_wg, 1, 1), self.tile_n)
            # dQ = dS K: A = sdS (queries x keys, K-major), B = K read transposed; 64 columns each
            dq = self._mma(K, MN, (1, self.num_wg, 1), self.hdim // self.num_wg)
            return sdp, dkv, dq
        if self.split_hdim:
            # S^T = K Q^T and dP^T = V dO^T: M = the 64 keys, N = the queries, 32 per warpgroup
            sdp = self._mma(K, K, (1, NUM_MMA_WG, 1), self.tile_m // NUM_MMA_WG)
            # dV += P^T dO, dK += dS^T Q: A = sP / sdS (keys x queries, K-major), B = dO / Q read
            # transposed (MN-major); each warpgroup holds hdim / 2 columns of dK (hdimv / 2 of dV:
            # make_tiled_mma_dv)
            dkv = self._mma(K, MN, (1, NUM_MMA_WG, 1), self.hdim // NUM_MMA_WG)
            dq = self._mma(MN, MN, (1, NUM_MMA_WG, 1), self.hdim // NUM_MMA_WG)
            return sdp, dkv, dq
        # S^T = K Q^T and dP^T = V dO^T: M = the 128 keys (64 per warpgroup), N = tile_m queries
        sdp = self._mma(K, K, (NUM_MMA_WG, 1, 1), self.tile_m)
        # dV += P^T dO, dK += dS^T Q: A in registers, B = dO / Q read transposed (MN-major)
        dkv = self._mma(K, MN, (NUM_MMA_WG, 1, 1), self.hdim, a_source=warpgroup.OperandSource.RMEM)
        # dQ = dS K: A = dS from sdS (stored keys x queries: MN-major), B = K transposed; each
        # warpgroup computes hdim / 2 of dQ's columns, or at tile_m 128 64 of its rows; swapped
        # (tile_m 80), dQ^T = K^T dS^T: A = K^T, B = dS (both MN-major), 64 head-dim rows each
        if self.dq_swap_ab:
            dq = self._mma(MN, MN, (NUM_MMA_WG, 1, 1), self.tile_m)
        elif self.dq_split_rows:
            dq = self._mma(MN, MN, (NUM_MMA_WG, 1, 1), self.hdim)
        else:
            dq = self._mma(MN, MN, (1, NUM_MMA_WG, 1), self.hdim // NUM_MMA_WG)
        return sdp, dkv, dq

    def make_tiled_mma_dv(self, tiled_mma_dkv):
        """dV's MMA: dK's, or with a narrower V (hdimv < hdim) the same layout at hdimv / 2
        columns per warpgroup."""
        if self.hdimv == self.hdim:
            return tiled_mma_dkv
        K, MN = warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.MN
        return self._mma(K, MN, (1, NUM_MMA_WG, 1), self.hdimv // NUM_MMA_WG)

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, s_q, h, d) or (total_q, h, d)
        mK: cute.Tensor,  # (b, s_k, h_kv, d) or (total_k, h_kv, d)
        mV: cute.Tensor,  # like mK
        mdO: cute.Tensor,  # like mQ
        mdK: cute.Tensor,  # like mK
        mdV: cute.Tensor,  # like mV
        mLSE2: cute.Tensor,  # (b, h, rows_pad) or (h, total_pad) float32
        mdPsum: cute.Tensor,  # like mLSE2
        mdQacc: cute.Tensor,  # (b, h, rows_pad * hdim) or (h, total_pad * hdim) float32, zeroed
        mSemaphore: Optional[cute.Tensor],  # deterministic: (b, h, rows_pad / tile_m) or (h, total_pad / tile_m) int32, zeroed
        mCuSeqlensQ: Optional[cute.Tensor],
        mCuSeqlensK: Optional[cute.Tensor],
        mSeqUsedQ: Optional[cute.Tensor],
        mSeqUsedK: Optional[cute.Tensor],
        scale_log2: Float32,  # softmax_scale * log2(e); softcap: softcap * log2(e)
        softcap_premul: Float32,  # softmax_scale / softcap (unused without softcap)
        softmax_scale: Float32,
        window_left: Int32,
        window_right: Int32,
        attention_chunk: Int32,  # chunk: C > 0 (else unused, and not passed to the kernel)
        max_seqlen_k: Int32,
        head_splits: Int32,  # CTAs per KV head, each over group / head_splits query heads (dkv_partial)
        num_sms: Int32,  # lpt: the SMs the final longest-first section is sized for
        stream: cuda.CUstream,
    ):
        cfg = self.cfg
        divby = 128 // self.dtype.width
        mQ, mK, mV, mdO = [assume_aligned_strides(t, divby) for t in (mQ, mK, mV, mdO)]
        mdK, mdV = [assume_aligned_strides(t, 128 // t.element_type.width) for t in (mdK, mdV)]
        mQ, mdO = [sdhb(t, cfg.cu_seqlens_q) for t in (mQ, mdO)]
        mK, mV, mdK, mdV = [sdhb(t, cfg.cu_seqlens_k) for t in (mK, mV, mdK, mdV)]
        mLSE2, mdPsum, mdQacc = [lse_shb(t, cfg.cu_seqlens_q) for t in (mLSE2, mdPsum, mdQacc)]
        if const_expr(cfg.deterministic):
            mSemaphore = lse_shb(mSemaphore, cfg.cu_seqlens_q)

        tiled_mma_sdp, tiled_mma_dkv, tiled_mma_dq = self.make_tiled_mmas()
        tiled_mma_dv = self.make_tiled_mma_dv(tiled_mma_dkv)
        self.check_dq_fragment_order(tiled_mma_dq)
        if const_expr(self.split_hdim):
            self.check_split_partitions(tiled_mma_sdp, tiled_mma_dkv, tiled_mma_dv)
        if const_expr(cfg.dkv_smem):
            self.check_dkv_slabs((tiled_mma_dkv, tiled_mma_dv))
        # (split_hdim: dK += dS^T Q and dV += P^T dO read Q and dO transposed in hdim / 2-column halves)
        q_cols = self.hdim // self.num_wg if const_expr(self.split_hdim) else None
        do_cols = self.hdimv // self.num_wg if const_expr(self.split_hdim) else None
        sQ_layout = make_smem_layout(self.dtype, (self.tile_m, self.hdim), self.q_stages, atom_cols=q_cols)
        sdO_layout = make_smem_layout(self.dtype, (self.tile_m, self.hdimv), self.q_stages, atom_cols=do_cols)
        # (dQ = dS K reads K transposed in hdim / num_wg-column slices: a swizzle atom that divides
        # them; split by dQ's rows, every column)
        k_cols = None if self.dq_split_rows else self.hdim // self.num_wg
        sK_layout = make_smem_layout(self.dtype, (self.tile_n, self.hdim), atom_cols=k_cols)
        sV_layout = make_smem_layout(self.dtype, (self.tile_n, self.hdimv))
        # dS^T as the S^T accumulator holds it: keys x queries, queries contiguous (dkvt: dS, queries
        # x keys); ds_stages buffers
        sdS_layout = make_smem_layout(self.dtype, self.s_tile, self.cfg.ds_stages)
        # split_hdim / dkvt: P^T (P) in smem like dS^T (dS) (empty otherwise: sdQ's offset as without it)
        p_elems = cute.cosize(sdS_layout) if const_expr(self.split_hdim or self.dkvt) else 0
        dq_chunk = THREADS_PER_WG * self.dq_per_thread  # one warpgroup's share of a dQ block
        # (vector, thread, vectors, warpgroup): each thread's 16-byte vectors THREADS_PER_WG apart
        sdQ_layout = cute.make_layout(
            (DQ_VEC, THREADS_PER_WG, self.dq_per_thread // DQ_VEC, self.num_wg),
            stride=(1, DQ_VEC, DQ_VEC * THREADS_PER_WG, dq_chunk))
        sRow_layout = cute.make_layout((self.tile_m, self.q_stages))  # LSE_log2 / dPsum
        # dkv_smem: dK over sQ and dV over sdO, keys x head dim, in compact slabs, one per consumer warp
        sdK_layout, sdV_layout = None, None
        if const_expr(cfg.dkv_smem):
            sdK_layout, sdV_layout = (
                cute.tile_to_shape(make_smem_layout(self.dtype, self.dkv_slab(cols)[0]), (self.tile_n, cols),
                                   order=(0, 1)) for cols in (self.hdim, self.hdimv))
            assert cute.cosize(sdK_layout) <= cute.cosize(sQ_layout)
            assert cute.cosize(sdV_layout) <= cute.cosize(sdO_layout)

        @cute.struct
        class SharedStorage:
            mbar_kv: cute.struct.MemRange[cutlass.Int64, 2]
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2 * self.q_stages]
            mbar_do: cute.struct.MemRange[cutlass.Int64, 2 * self.q_stages]
            sLSE: cute.struct.Align[cute.struct.MemRange[Float32, cute.cosize(sRow_layout)], 128]
            sdPsum: cute.struct.Align[cute.struct.MemRange[Float32, cute.cosize(sRow_layout)], 128]
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024]
            sdO: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sdO_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sV_layout)], 1024]
            sdS: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sdS_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[self.dtype, p_elems], 1024]
            sdQ: cute.struct.Align[cute.struct.MemRange[Float32, 0 if self.cfg.dq_red else cute.cosize(sdQ_layout)], 128]

        assert SharedStorage.size_in_bytes() <= SMEM_BYTES, \
            f"{cfg.short()}: {SharedStorage.size_in_bytes()} bytes of shared memory > {SMEM_BYTES}"

        g2s = cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            g2s, mQ, cute.select(sQ_layout, mode=[0, 1]), (self.tile_m, self.hdim))
        tma_atom_dO, tma_dO = cpasync.make_tiled_tma_atom(
            g2s, mdO, cute.select(sdO_layout, mode=[0, 1]), (self.tile_m, self.hdimv))
        tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(g2s, mK, sK_layout, (self.tile_n, self.hdim))
        tma_atom_V, tma_V = cpasync.make_tiled_tma_atom(g2s, mV, sV_layout, (self.tile_n, self.hdimv))
        row_bytes = self.tile_m * 4
        tx_q = cute.size_in_bytes(self.dtype, cute.select(sQ_layout, mode=[0, 1])) + row_bytes
        tx_do = cute.size_in_bytes(self.dtype, cute.select(sdO_layout, mode=[0, 1])) + row_bytes
        tx_kv = cute.size_in_bytes(self.dtype, sK_layout) + cute.size_in_bytes(self.dtype, sV_layout)

        batch = cute.size(mQ.shape[3]) if const_expr(not cfg.cu_seqlens_q) else mCuSeqlensQ.shape[0] - 1
        num_n_blocks = cute.ceil_div(max_seqlen_k, self.tile_n)
        kv_heads = cute.size(mK.shape[2]) * head_splits  # (KV head, split) pairs
        # lpt: the forward's longest-first order (scheduler.TileScheduler) over (key block, pair,
        # batch): a 1-D grid, each pair's key blocks in turn but the final section of the last
        # pairs (about LPT_TAIL_WAVES waves), there key block by key block with pairs fastest. The
        # scheduler counts its blocks longest first as descending; causal key blocks are longest
        # first ascending (`kernel` reverses). Only an lpt kernel takes the three.
        lpt_args = (None, None, None)
        if const_expr(cfg.lpt):
            lpt_args = (num_n_blocks, batch, lpt_tail_heads(num_sms, num_n_blocks))
        self.kernel(
            tma_Q, tma_K, tma_V, tma_dO, mdK, mdV, mLSE2, mdPsum, mdQacc, mSemaphore,
            mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK,
            tma_atom_Q, tma_atom_K, tma_atom_V, tma_atom_dO,
            scale_log2, softcap_premul, softmax_scale, window_left, window_right,
            # Only a chunked kernel takes C: another kernel's parameters (and SASS) stay as they were.
            attention_chunk if const_expr(cfg.chunk) else None, head_splits, *lpt_args,
            sQ_layout, sdO_layout, sK_layout, sV_layout, sdS_layout, sdQ_layout, sRow_layout, sdK_layout,
            sdV_layout, tiled_mma_sdp, tiled_mma_dkv, tiled_mma_dv, tiled_mma_dq, tx_q, tx_do, tx_kv, SharedStorage,
        ).launch(
            grid=TileScheduler.grid(num_n_blocks, kv_heads, batch, 0, persistent=False, lpt=cfg.lpt),
            block=[self.num_threads, 1, 1],
            smem=SharedStorage.size_in_bytes(),
            stream=stream,
            min_blocks_per_mp=1,
            use_pdl=cfg.pdl,
        )

    def check_dq_fragment_order(self, tiled_mma_dq):
        """Trace time: the (row, column) of every dQ value of a few threads, read from the tiled
        MMA's layout, is what `dq_value_coords` (the host's permutation) says it is."""
        from cute_kernels.bwd_launch import dq_value_coords

        cdQ = cute.make_identity_tensor(self.dq_tile)
        for t in (0, 1, 5, 37, 100, 128, 133, 255, 256, 300, 383)[:8 + 3 * (self.num_wg - 2)]:
            coords = tiled_mma_dq.get_slice(t).partition_C(cdQ)
            assert cute.size(coords) == self.dq_per_thread
            for r in range(self.dq_per_thread):
                got = tuple(int(x) for x in coords[r])
                got = got[::-1] if self.dq_swap_ab else got  # (head-dim column, row) of dQ^T
                want = dq_value_coords(self.tile_m, self.hdim, t, r, self.num_wg)
                assert got == want, f"dQ value {r} of thread {t}: MMA layout {got}, host order {want}"

    def check_split_partitions(self, tiled_mma_sdp, tiled_mma_dkv, tiled_mma_dv):
        """split_hdim, trace time: consumer thread t's S^T / dP^T values are this block's keys
        x queries 32 (t // 128) .. 32 (t // 128) + 31 (the coordinates the mask, LSE_log2 and
        dPsum are read at), and its dK / dV values all keys x head-dim columns
        hdim / 2 * (t // 128) .. + hdim / 2 - 1 (dV: hdimv / 2)."""
        cS = cute.make_identity_tensor((self.tile_n, self.tile_m))
        cK = cute.make_identity_tensor((self.tile_n, self.hdim))
        cV = cute.make_identity_tensor((self.tile_n, self.hdimv))
        q_half, d_half, dv_half = self.tile_m // NUM_MMA_WG, self.hdim // NUM_MMA_WG, self.hdimv // NUM_MMA_WG
        for t in (0, 1, 5, 37, 100, 127, 128, 133, 200, 255):
            wg = t // THREADS_PER_WG
            for tiled, c, half in ((tiled_mma_sdp, cS, q_half), (tiled_mma_dkv, cK, d_half),
                                   (tiled_mma_dv, cV, dv_half)):
                coords = tiled.get_slice(t).partition_C(c)
                assert cute.size(coords) == self.tile_n * half // THREADS_PER_WG
                for r in range(cute.size(coords)):
                    row, col = (int(x) for x in coords[r])
                    assert 0 <= row < self.tile_n and wg * half <= col < (wg + 1) * half, \
                        f"thread {t} value {r} at ({row}, {col}): not warpgroup {wg}'s columns"

    def check_dkv_slabs(self, tiled_mmas):
        """dkv_smem, trace time: every dK / dV value a consumer thread stages lies in its warp's
        slab (`dkv_slab`), so a warp stores its slab after its own stmatrix with no wider sync,
        and the warps' slabs tile the block."""
        num_warps = self.num_mma_threads // 32
        for tiled_mma, cols in zip(tiled_mmas, (self.hdim, self.hdimv)):
            slab, coord = self.dkv_slab(cols)
            assert num_warps * slab[0] * slab[1] == self.tile_n * cols, f"{num_warps} slabs {slab}: not {cols} columns"
            assert sorted(coord(w) for w in range(num_warps)) == sorted(
                (r, c) for r in range(self.tile_n // slab[0]) for c in range(cols // slab[1]))
            tiled_copy = cute.make_tiled_copy_C(stmatrix_op(self.dtype, self.dkvt), tiled_mma)
            cI = cute.make_identity_tensor((cols, self.tile_n) if self.dkvt else (self.tile_n, cols))
            for t in (0, 1, 31, 32, 77, 127, 128, 161, 255, 256, 300, 383)[:8 + 4 * (self.num_wg - 2)]:
                rb, cb = coord(t // 32)
                coords = tiled_copy.get_slice(t).partition_D(cI)
                for i in range(cute.size(coords)):
                    a, b = (int(x) for x in coords[i])
                    key, col = (b, a) if self.dkvt else (a, b)
                    assert key // slab[0] == rb and col // slab[1] == cb, \
                        f"thread {t}: value {i} at key {key}, column {col} outside slab {(rb, cb)} of {slab}"

    def kq(self, t_mn: cute.Tensor) -> cute.Tensor:
        """An (m, n) view of S's tile as keys x queries: as it is (S^T), or transposed (dkvt's S)."""
        return mn_transposed(t_mn) if const_expr(self.dkvt) else t_mn

    @staticmethod
    def frags(wg, x: cute.Tensor, y: cute.Tensor, swap: bool = False):
        """The fragments of smem tensors x and y for a GEMM that reads x as A and y as B, or with
        `swap` y as A and x as B; returned as (x's, y's). gemm_xy issues it."""
        if swap:
            return wg.make_fragment_B(wg.partition_B(x)), wg.make_fragment_A(wg.partition_A(y))
        return wg.make_fragment_A(wg.partition_A(x)), wg.make_fragment_B(wg.partition_B(y))

    @staticmethod
    def gemm_xy(tiled_mma, acc, x, y, swap: bool = False, **kwargs):
        """gemm with x as A and y as B, or with `swap` (the operands `frags` swapped) y as A."""
        a, b = (y, x) if const_expr(swap) else (x, y)
        gemm(tiled_mma, acc, a, b, **kwargs)

    # ------------------------------------------------------------------ device side
    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mdO: cute.Tensor,
        mdK: cute.Tensor, mdV: cute.Tensor, mLSE2: cute.Tensor, mdPsum: cute.Tensor, mdQacc: cute.Tensor,
        mSemaphore: Optional[cute.Tensor],
        mCuSeqlensQ: Optional[cute.Tensor], mCuSeqlensK: Optional[cute.Tensor],
        mSeqUsedQ: Optional[cute.Tensor], mSeqUsedK: Optional[cute.Tensor],
        tma_atom_Q: cute.CopyAtom, tma_atom_K: cute.CopyAtom, tma_atom_V: cute.CopyAtom,
        tma_atom_dO: cute.CopyAtom,
        scale_log2: Float32, softcap_premul: Float32, softmax_scale: Float32,
        window_left: Int32, window_right: Int32, attention_chunk: Optional[Int32], head_splits: Int32,
        lpt_blocks: Optional[Int32], lpt_batch: Optional[Int32], lpt_tail: Optional[Int32],
        sQ_layout: cute.ComposedLayout, sdO_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout, sdS_layout: cute.ComposedLayout, sdQ_layout: cute.Layout,
        sRow_layout: cute.Layout, sdK_layout: Optional[cute.ComposedLayout],
        sdV_layout: Optional[cute.ComposedLayout],
        tiled_mma_sdp: cute.TiledMma, tiled_mma_dkv: cute.TiledMma, tiled_mma_dv: cute.TiledMma,
        tiled_mma_dq: cute.TiledMma,
        tx_q: cutlass.Constexpr[int], tx_do: cutlass.Constexpr[int], tx_kv: cutlass.Constexpr[int],
        SharedStorage: cutlass.Constexpr,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        if warp_idx == 0:
            for atom in (tma_atom_Q, tma_atom_K, tma_atom_V, tma_atom_dO):
                cpasync.prefetch_descriptor(atom)

        smem = cutlass_utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        make_pipe = tma_pipeline_maker(self.num_mma_threads)
        pipeline_kv = make_pipe(barrier_storage=storage.mbar_kv.data_ptr(), num_stages=1, tx_count=tx_kv)
        pipeline_q = make_pipe(barrier_storage=storage.mbar_q.data_ptr(), num_stages=self.q_stages, tx_count=tx_q)
        pipeline_do = make_pipe(barrier_storage=storage.mbar_do.data_ptr(), num_stages=self.q_stages,
                                tx_count=tx_do)
        for pipe in (pipeline_kv, pipeline_q, pipeline_do):
            check_arrive_counts(pipe, self.num_mma_threads // 32)
        cute.arch.mbarrier_init_fence()
        cute.arch.barrier()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sdO = storage.sdO.get_tensor(sdO_layout.outer, swizzle=sdO_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sdS = storage.sdS.get_tensor(sdS_layout.outer, swizzle=sdS_layout.inner)
        sP = None
        if const_expr(self.split_hdim or self.dkvt):
            sP = storage.sP.get_tensor(sdS_layout.outer, swizzle=sdS_layout.inner)[None, None, 0]
        sdQ = None if const_expr(self.cfg.dq_red) else storage.sdQ.get_tensor(sdQ_layout)
        sLSE = storage.sLSE.get_tensor(sRow_layout)
        # dkv_smem: dK's and dV's staging over sQ and sdO (written after the last query block)
        sdKV = None
        if const_expr(self.cfg.dkv_smem):
            sdKV = (storage.sQ.get_tensor(sdK_layout.outer, swizzle=sdK_layout.inner),
                    storage.sdO.get_tensor(sdV_layout.outer, swizzle=sdV_layout.inner))
        sdPsum = storage.sdPsum.get_tensor(sRow_layout)

        # kv_split = head_kv * head_splits + split
        if const_expr(self.cfg.lpt):
            n_block, kv_split, batch = lpt_key_block(Int32(cute.arch.block_idx()[0]), lpt_blocks,
                                                     cute.size(mK.shape[2]) * head_splits, lpt_batch, lpt_tail)
        else:
            n_block, kv_split, batch = cute.arch.block_idx()
        seqlen = SeqlenInfo.create(batch, seqlen_q_static=mQ.shape[0], seqlen_k_static=mK.shape[0],
                                   mCuSeqlensQ=mCuSeqlensQ, mCuSeqlensK=mCuSeqlensK, mSeqUsedQ=mSeqUsedQ,
                                   mSeqUsedK=mSeqUsedK)
        mask = KeyBlockMask(self.tile_m, self.tile_n, self.cfg.has_left, self.cfg.has_right, window_left,
                            window_right, seqlen, n_block, chunk=attention_chunk)
        group = cute.size(mQ.shape[2]) // cute.size(mK.shape[2])
        heads = group // head_splits
        head_kv = kv_split // head_splits
        work = _Work(n_block, head_kv, kv_split if const_expr(self.cfg.dkv_partial) else head_kv, batch,
                     head_kv * group + (kv_split - head_kv * head_splits) * heads, heads, seqlen, mask,
                     padded_offset(seqlen.offset_q, batch, self.tile_m) if const_expr(self.cfg.cu_seqlens_q) else 0)

        if n_block * self.tile_n < seqlen.seqlen_k:  # (varlen: a key block past this sequence has no work)
            if warp_idx < 4:
                cute.arch.setmaxregister_decrease(self.cfg.producer_regs)
                if warp_idx == 0:
                    self.load(mQ, mK, mV, mdO, mLSE2, mdPsum, sQ, sK, sV, sdO, sLSE, sdPsum,
                              tma_atom_Q, tma_atom_K, tma_atom_V, tma_atom_dO,
                              pipeline_kv, pipeline_q, pipeline_do, work)
                elif warp_idx == 1:
                    if const_expr(not self.cfg.dq_red):  # (dq_red: the consumers add dQ themselves)
                        self.store_dq(mdQacc, mSemaphore, sdQ, work)
            else:
                cute.arch.setmaxregister_increase(self.cfg.consumer_regs)
                self.mma(mdK, mdV, mdQacc, sQ, sK, sV, sdO, sP, sdS, sdQ, sLSE, sdPsum, sdKV, tiled_mma_sdp, tiled_mma_dkv,
                         tiled_mma_dv, tiled_mma_dq, pipeline_kv, pipeline_q, pipeline_do, scale_log2,
                         softcap_premul, softmax_scale, work)

    # ------------------------------------------------------------------ producer
    @cute.jit
    def load(self, mQ, mK, mV, mdO, mLSE2, mdPsum, sQ, sK, sV, sdO, sLSE, sdPsum,
             tma_atom_Q, tma_atom_K, tma_atom_V, tma_atom_dO, pipeline_kv, pipeline_q, pipeline_do, work):
        """Producer warp: K and V of the key block, then Q + LSE_log2 and dO + dPsum per
        (query head of the group, m_block), in the consumers' order."""
        cfg, seqlen = self.cfg, work.seqlen
        m_block_min, m_block_max = work.mask.m_block_range()
        if m_block_min < m_block_max:
            one = cute.make_layout(1)
            b_q = work.batch if const_expr(not cfg.cu_seqlens_q) else 0
            b_k = work.batch if const_expr(not cfg.cu_seqlens_k) else 0
            kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
            pipeline_kv.producer_acquire(kv_state)
            for atom, mX, sX, cols in ((tma_atom_K, mK, sK, self.hdim), (tma_atom_V, mV, sV, self.hdimv)):
                mX_cur = cute.domain_offset((seqlen.offset_k, 0), mX[None, None, work.head_kv, b_k])
                gX = cute.local_tile(mX_cur, (self.tile_n, cols), (work.n_block, 0))
                tXsX, tXgX = cpasync.tma_partition(atom, 0, one, cute.group_modes(sX, 0, 2),
                                                   cute.group_modes(gX, 0, 2))
                cute.copy(atom, tXgX, tXsX, tma_bar_ptr=pipeline_kv.producer_get_barrier(kv_state))

            q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.q_stages)
            for h in cutlass.range(work.heads, unroll=1):
                head = work.first_head + h
                rows = (work.row_offset, b_q, head)
                load_q = partial(self.load_rows, mX=mQ, mRow=mLSE2, sX=sQ, sRow=sLSE, atom=tma_atom_Q,
                                 pipe=pipeline_q, rows=rows, cols=self.hdim)
                load_do = partial(self.load_rows, mX=mdO, mRow=mdPsum, sX=sdO, sRow=sdPsum, atom=tma_atom_dO,
                                  pipe=pipeline_do, rows=rows, cols=self.hdimv)
                for m_block in cutlass.range(m_block_min, m_block_max, unroll=1):
                    load_q(m_block, q_state, seqlen)
                    load_do(m_block, q_state, seqlen)
                    q_state.advance()

    @cute.jit
    def load_rows(self, m_block, state, seqlen: SeqlenInfo, mX, mRow, sX, sRow, atom, pipe, rows,
                  cols: cutlass.Constexpr[int]):
        """Stage `state`: block m_block of Q (dO) by TMA and its LSE_log2 (dPsum) by a bulk copy,
        on the stage's one full barrier."""
        row_offset, b, head = rows
        pipe.producer_acquire(state)
        mX_cur = cute.domain_offset((seqlen.offset_q, 0), mX[None, None, head, b])
        gX = cute.local_tile(mX_cur, (self.tile_m, cols), (m_block, 0))
        tXsX, tXgX = cpasync.tma_partition(atom, 0, cute.make_layout(1), cute.group_modes(sX, 0, 2),
                                           cute.group_modes(gX, 0, 2))
        cute.copy(atom, tXgX, tXsX[None, state.index], tma_bar_ptr=pipe.producer_get_barrier(state))
        if const_expr(self.cfg.pdl):
            if state.count == 0:  # (the first block's rows: K, V and this Q / dO are in flight)
                cute.arch.griddepcontrol_wait()  # the preprocessing's LSE_log2 / dPsum
        gRow = cute.local_tile(cute.domain_offset((row_offset,), mRow[None, head, b]), (self.tile_m,), (m_block,))
        with cute.arch.elect_one():
            bulk_load(gRow.iterator, sRow[None, state.index].iterator, pipe.producer_get_barrier(state),
                      self.tile_m * 4)

    @cute.jit
    def dq_head(self, mdQacc, work, head):
        """Head `head`'s float32 dQ accumulator over this CTA's sequence (rows from work.row_offset):
        chunks of tile_m x hdim values, one per m_block, in the consumers' register order."""
        b_q = work.batch if const_expr(not self.cfg.cu_seqlens_q) else 0
        return cute.domain_offset((work.row_offset * self.hdim,), mdQacc[None, head, b_q])

    @cute.jit
    def store_dq(self, mdQacc, mSemaphore, sdQ, work):
        """dQ warp: per (head, m_block), each consumer warpgroup's dQ from sdQ added into the
        accumulator's chunk by one bulk reduce; the warpgroup may write sdQ again once the
        reduce has read it.
        deterministic: the key blocks add into an m_block in increasing n_block order. The
        block's semaphore counts the key blocks done with it: this CTA waits for it to reach
        n_block, adds, waits for its adds to complete and increments it. Key blocks left of every
        key a query block sees (a left window or chunk) count without adding, so the count stays
        the n_block index (a query block's key blocks are a run whose ends never decrease with
        it: the key blocks before the run are those whose m_block_max it is at or past); waits
        are on lower n_blocks only, launched earlier (the grid's x; with lpt, each pair's key
        blocks ascend in launch order too), so resident or done: no deadlock."""
        det = self.cfg.deterministic
        if const_expr(self.cfg.pdl):
            cute.arch.griddepcontrol_wait()  # the preprocessing zeroes the accumulator
        m_block_min, m_block_max = work.mask.m_block_range()
        b_q = work.batch if const_expr(not self.cfg.cu_seqlens_q) else 0
        chunk = THREADS_PER_WG * self.dq_per_thread
        for h in cutlass.range(work.heads, unroll=1):
            head = work.first_head + h
            mdQ_cur = self.dq_head(mdQacc, work, head)
            sem = None
            if const_expr(det):
                sem = cute.domain_offset((work.row_offset // self.tile_m,), mSemaphore[None, head, b_q])
            for m_block in cutlass.range(m_block_min, m_block_max, unroll=1):
                gdQ = cute.local_tile(mdQ_cur, (self.tile_m * self.hdim,), (m_block,))
                for wg in cutlass.range_constexpr(self.num_wg):
                    # this warpgroup's previous reduce has read sdQ[wg] (the later ones may run on)
                    cute.arch.cp_async_bulk_wait_group(self.num_wg - 1 - wg, read=True)
                    cute.arch.barrier_arrive(barrier_id=int(NamedBarrierBwd.dQEmptyWG0) + wg,
                                             number_of_threads=THREADS_PER_WG + 32)
                if const_expr(det):
                    while load_acquire_i32(sem.iterator + m_block) != work.n_block:
                        pass
                    cute.arch.fence_proxy("async.global")  # the earlier adds -> this one's reads
                for wg in cutlass.range_constexpr(self.num_wg):
                    cute.arch.barrier(barrier_id=int(NamedBarrierBwd.dQFullWG0) + wg,
                                      number_of_threads=THREADS_PER_WG + 32)
                    with cute.arch.elect_one():
                        bulk_reduce_add_f32(sdQ[None, None, None, wg].iterator, (gdQ.iterator + wg * chunk),
                                            chunk * 4)
                    cute.arch.cp_async_bulk_commit_group()
                if const_expr(det):
                    cute.arch.cp_async_bulk_wait_group(0, read=False)  # the adds are done
                    if cute.arch.lane_idx() == 0:
                        red_release_add_i32(sem.iterator + m_block, 1)
            if const_expr(det and (self.cfg.has_left or self.cfg.chunk)):
                m_block_end = cute.ceil_div(work.seqlen.seqlen_q, self.tile_m)
                if cute.arch.lane_idx() == 0:
                    for m_block in cutlass.range(m_block_max, m_block_end, unroll=1):
                        red_release_add_i32(sem.iterator + m_block, 1)
        cute.arch.cp_async_bulk_wait_group(0, read=True)

    # ------------------------------------------------------------------ consumers
    @cute.jit
    def mma(self, mdK, mdV, mdQacc, sQ, sK, sV, sdO, sP, sdS, sdQ, sLSE, sdPsum, sdKV, tiled_mma_sdp, tiled_mma_dkv,
            tiled_mma_dv, tiled_mma_dq, pipeline_kv, pipeline_q, pipeline_do, scale_log2, softcap_premul,
            softmax_scale, work):
        tidx = cute.arch.thread_idx()[0] - THREADS_PER_WG
        wg_idx = cute.arch.make_warp_uniform(tidx // THREADS_PER_WG)
        wg_sdp = tiled_mma_sdp.get_slice(wg_idx * THREADS_PER_WG)
        wg_dkv = tiled_mma_dkv.get_slice(wg_idx * THREADS_PER_WG)
        wg_dv = tiled_mma_dv.get_slice(wg_idx * THREADS_PER_WG)
        wg_dq = tiled_mma_dq.get_slice(wg_idx * THREADS_PER_WG)
        # operands: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q, dQ = dS K, each pair
        # (x, y) read as (A, B); with dkvt the first four swapped (S = Q K^T, dV^T = dO^T P, ...),
        # with dq_swap_ab dQ's (dQ^T = K^T dS^T). P^T / dS^T: registers, or (split_hdim, dkvt) sP /
        # sdS seen as keys x queries; Q / dO carry the Q stage, dS the ds stage.
        T = transpose_view
        tSrK, tSrQ = self.frags(wg_sdp, sK, sQ, swap=self.dkvt)
        tdPrV, tdPrdO = self.frags(wg_sdp, sV, sdO, swap=self.dkvt)
        if const_expr(self.split_hdim or self.dkvt):
            tdVrP, tdVrdOt = self.frags(wg_dv, T(sP) if const_expr(self.dkvt) else sP, T(sdO), swap=self.dkvt)
            tdKrdS, tdKrQt = self.frags(wg_dkv, T(sdS) if const_expr(self.dkvt) else sdS, T(sQ), swap=self.dkvt)
        else:
            tdVrP, tdKrdS = None, None
            tdVrdOt = wg_dv.make_fragment_B(wg_dv.partition_B(T(sdO)))
            tdKrQt = wg_dkv.make_fragment_B(wg_dkv.partition_B(T(sQ)))
        tdQrdS, tdQrKt = self.frags(wg_dq, sdS if const_expr(self.dkvt) else T(sdS), T(sK), swap=self.dq_swap_ab)
        acc_dK = cute.make_rmem_tensor(tiled_mma_dkv.partition_shape_C(self.dkv_tile(self.hdim)), Float32)
        acc_dV = cute.make_rmem_tensor(tiled_mma_dv.partition_shape_C(self.dkv_tile(self.hdimv)), Float32)
        if const_expr(self.split_hdim or self.dq_split_rows or self.dkvt):
            # zeros made here, not before the warp-role branch (where LLVM puts a literal's
            # materialization): there they would hold dK / dV to the first 168 registers
            # (tile_m 128: 64 of them spilled, the WGMMAs serialized)
            zero = opaque_f32(0.0)
            acc_dK.fill(zero)
            acc_dV.fill(zero)
        else:
            acc_dK.fill(0.0)
            acc_dV.fill(0.0)
        thr_sdp = tiled_mma_sdp.get_slice(tidx)
        thr0_sdp = tiled_mma_sdp.get_slice(0)
        # dS^T registers -> sdS (stmatrix, as the forward stages O)
        store_atom = sm90_utils.sm90_get_smem_store_op(LayoutEnum.ROW_MAJOR, self.dtype, Float32)
        thr_copy_dS = cute.make_tiled_copy_C(store_atom, tiled_mma_sdp).get_slice(tidx)
        tdSsdS = thr_copy_dS.partition_D(sdS)
        tPsP = thr_copy_dS.partition_D(sP) if const_expr(self.split_hdim or self.dkvt) else None
        # this thread's queries (columns of S^T, rows of S): its own offset plus thread 0's
        # constant ones (coordinate qi of a keys x queries view)
        cS = cute.make_identity_tensor(self.s_tile)
        col0 = self.kq(acc_to_mn(thr_sdp.partition_C(cS)))[0, 0][self.qi]
        t0_cols = self.kq(acc_to_mn(thr0_sdp.partition_C(cS)))
        # this thread's dQ vectors in sdQ, or (dq_red) its offset in a block's accumulator chunk: the
        # bulk reduce's layout, vectors THREADS_PER_WG apart in its warpgroup's part
        tdQsdQ = None if const_expr(self.cfg.dq_red) else sdQ[None, tidx % THREADS_PER_WG, None, wg_idx]
        dq_offset = wg_idx * (THREADS_PER_WG * self.dq_per_thread) + (tidx % THREADS_PER_WG) * DQ_VEC
        step = partial(
            self.step, tSrK=tSrK, tSrQ=tSrQ, tdPrV=tdPrV, tdPrdO=tdPrdO, tdVrdOt=tdVrdOt, tdKrQt=tdKrQt,
            tdVrP=tdVrP, tdKrdS=tdKrdS, tPsP=tPsP,
            tdQrdS=tdQrdS, tdQrKt=tdQrKt, acc_dK=acc_dK, acc_dV=acc_dV, tiled_mma_sdp=tiled_mma_sdp,
            tiled_mma_dkv=tiled_mma_dkv, tiled_mma_dv=tiled_mma_dv, tiled_mma_dq=tiled_mma_dq, thr_sdp=thr_sdp,
            thr0_sdp=thr0_sdp,
            thr_copy_dS=thr_copy_dS, tdSsdS=tdSsdS, col0=col0, t0_cols=t0_cols, tdQsdQ=tdQsdQ, dq_offset=dq_offset,
            sLSE=sLSE,
            sdPsum=sdPsum, pipeline_q=pipeline_q, pipeline_do=pipeline_do, scale_log2=scale_log2,
            softcap_premul=softcap_premul, wg_idx=wg_idx, mask=work.mask,
        )

        mask = work.mask
        m_block_min, m_block_max = mask.m_block_range()
        if m_block_min < m_block_max:
            pipeline_kv.consumer_wait(pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1))
            mask_keys = (work.n_block + 1) * self.tile_n > work.seqlen.seqlen_k
            m_right_end = mask.m_block_right_masked_end(m_block_min, m_block_max)
            m_left_begin = mask.m_block_left_masked_begin(m_right_end, m_block_max)
            q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.q_stages)
            for h in cutlass.range(work.heads, unroll=1):
                # dq_red: this head's dQ accumulator (the dQ warp's otherwise)
                mdQ_h = self.dq_head(mdQacc, work, work.first_head + h) if const_expr(self.cfg.dq_red) else None
                # 1) query blocks with rows before some key's diagonal (or chunk): right (and left) mask
                if const_expr(self.cfg.has_right or self.cfg.chunk):
                    for m_block in cutlass.range(m_block_min, m_right_end, unroll=1):
                        q_state = step(q_state, m_block, mask_keys, mdQ_h, mask_right=True, mask_left=True)
                # 2) no window edge inside
                for m_block in cutlass.range(m_right_end, m_left_begin, unroll=1):
                    q_state = step(q_state, m_block, mask_keys, mdQ_h)
                # 3) rows past some key's left window edge (or chunk)
                if const_expr(self.cfg.has_left or self.cfg.chunk):
                    for m_block in cutlass.range(m_left_begin, m_block_max, unroll=1):
                        q_state = step(q_state, m_block, mask_keys, mdQ_h, mask_left=True)
        for i in cutlass.range_constexpr(cute.size(acc_dK)):
            acc_dK[i] = acc_dK[i] * softmax_scale
        if const_expr(self.cfg.pdl):
            # (a key block without query blocks gets here first; memory the caching allocator gave
            # dK / dV may have been the preprocessing's inputs)
            cute.arch.griddepcontrol_wait()
        if const_expr(self.cfg.dkv_smem):
            self.store_dkv_staged((acc_dK, acc_dV), (mdK, mdV), sdKV, (tiled_mma_dkv, tiled_mma_dv), tidx, work)
        else:
            dk_in, dv_in = self.dkv_cols_in()
            self.store_dkv(acc_dK, mdK, tiled_mma_dkv, tidx, work, self.hdim, dk_in)
            self.store_dkv(acc_dV, mdV, tiled_mma_dv, tidx, work, self.hdimv, dv_in)

    @cute.jit
    def step(self, q_state, m_block, mask_keys, mdQ_h, tSrK, tSrQ, tdPrV, tdPrdO, tdVrdOt, tdKrQt, tdVrP, tdKrdS, tPsP,
             tdQrdS, tdQrKt, acc_dK, acc_dV, tiled_mma_sdp, tiled_mma_dkv, tiled_mma_dv, tiled_mma_dq, thr_sdp,
             thr0_sdp, thr_copy_dS, tdSsdS, col0, t0_cols, tdQsdQ, dq_offset, sLSE, sdPsum, pipeline_q, pipeline_do, scale_log2, softcap_premul, wg_idx,
             mask: KeyBlockMask, mask_right: cutlass.Constexpr[bool] = False,
             mask_left: cutlass.Constexpr[bool] = False):
        """One query block against this CTA's keys (see the module docstring)."""
        stage = q_state.index
        shape_s = tiled_mma_sdp.partition_shape_C(self.s_tile)
        # S^T = K Q^T and dP^T = V dO^T (dkvt: S = Q K^T, dP = dO V^T), issued back to back
        pipeline_q.consumer_wait(q_state)
        acc_S = cute.make_rmem_tensor(shape_s, Float32)
        self.gemm_xy(tiled_mma_sdp, acc_S, tSrK, tSrQ[None, None, None, stage], self.dkvt, zero_init=True, wg_wait=-1)
        # LSE_log2 / dPsum of this thread's query columns: from smem, or (stat_regs) the first
        # stat_regs of each read into registers while the GEMMs run (LSE here, dPsum before dP's wait)
        num_cols = cute.size(self.kq(acc_to_mn(acc_S)).shape[1])
        row_stat = lambda sX, c: sX[col0 + t0_cols[0, c][self.qi], stage]  # noqa: E731
        lse_at = self.hoisted(row_stat, sLSE, num_cols)
        pipeline_do.consumer_wait(q_state)
        acc_dP = cute.make_rmem_tensor(shape_s, Float32)
        self.gemm_xy(tiled_mma_sdp, acc_dP, tdPrV, tdPrdO[None, None, None, stage], self.dkvt, zero_init=True,
                     wg_wait=1)

        if const_expr(self.softcap_two_pass):
            # no registers for d tanh beside S^T and dP^T (tile_m 128: 32 a thread; they spill):
            # tanh here, then P^T and dS^T in one pass once dP^T is in, d tanh = 1 - tanh^2 in
            # fp32 from the tanh still in S^T (masked: tanh -inf, P 0, d tanh clamped to 0)
            s_mn = self.kq(acc_to_mn(acc_S))
            for i in cutlass.range_constexpr(cute.size(acc_S)):
                acc_S[i] = cute.math.tanh(acc_S[i] * softcap_premul)
            mask.apply(acc_S, thr_sdp, thr0_sdp, m_block, mask_keys, mask_right, mask_left, keys_as_columns=self.dkvt)
            dpsum_at = self.hoisted(row_stat, sdPsum, num_cols)
            warpgroup.wait_group(0)
            dp_mn = self.kq(acc_to_mn(acc_dP))
            for c in cutlass.range_constexpr(cute.size(s_mn.shape[1])):
                dpsum = dpsum_at(c)
                for r in cutlass.range_constexpr(cute.size(s_mn.shape[0])):
                    t = s_mn[r, c]
                    dp_mn[r, c] = (dp_mn[r, c] - dpsum) * cute.arch.fmax(1.0 - t * t, Float32(0.0))
            for c in cutlass.range_constexpr(cute.size(s_mn.shape[1])):
                lse = lse_at(c)
                for r in cutlass.range_constexpr(cute.size(s_mn.shape[0])):
                    p = cute.math.exp2(s_mn[r, c] * scale_log2 - lse, fastmath=True)
                    s_mn[r, c] = p
                    dp_mn[r, c] = p * dp_mn[r, c]
            rP = cute.make_rmem_tensor_like(acc_S, self.dtype)
            convert_to(acc_S, rP)
            rdS = cute.make_rmem_tensor_like(acc_dP, self.dtype)
            convert_to(acc_dP, rdS)
        else:
            # P^T = exp2(S^T * scale_log2 - LSE_log2[query])
            s_mn = self.kq(acc_to_mn(acc_S))
            dtanh = None
            if const_expr(self.cfg.softcap):
                # d tanh = 1 - tanh^2 kept until dS in fp16 (10 mantissa bits, finer than dS's bf16;
                # in fp32 its 32 more registers spill at hdim 128)
                dtanh = cute.make_rmem_tensor_like(acc_S, cutlass.Float16)
                for i in cutlass.range_constexpr(cute.size(acc_S)):
                    t = cute.math.tanh(acc_S[i] * softcap_premul)
                    acc_S[i] = t
                    dtanh[i] = (1.0 - t * t).to(cutlass.Float16)
            mask.apply(acc_S, thr_sdp, thr0_sdp, m_block, mask_keys, mask_right, mask_left, keys_as_columns=self.dkvt)
            for c in cutlass.range_constexpr(cute.size(s_mn.shape[1])):
                lse = lse_at(c)
                for r in cutlass.range_constexpr(cute.size(s_mn.shape[0])):
                    s_mn[r, c] = cute.math.exp2(s_mn[r, c] * scale_log2 - lse, fastmath=True)
            rP = cute.make_rmem_tensor_like(acc_S, self.dtype)
            convert_to(acc_S, rP)
            dpsum_at = self.hoisted(row_stat, sdPsum, num_cols)
            if const_expr(self.dv_early):
                # dV += P^T dO now: its wait for dP^T follows every exp2 (it needs P^T), and its GEMM
                # runs under dS^T's math
                gemm(tiled_mma_dv, acc_dV, acc_to_frgA(rP), tdVrdOt[None, None, None, stage], wg_wait=1)
            else:
                warpgroup.wait_group(0)

            # dS^T = P^T * (dP^T - dPsum[query])  (softcap: times d tanh)
            dp_mn = self.kq(acc_to_mn(acc_dP))
            for c in cutlass.range_constexpr(cute.size(dp_mn.shape[1])):
                dpsum = dpsum_at(c)
                for r in cutlass.range_constexpr(cute.size(dp_mn.shape[0])):
                    dp_mn[r, c] = s_mn[r, c] * (dp_mn[r, c] - dpsum)
            if const_expr(self.cfg.softcap):
                for i in cutlass.range_constexpr(cute.size(acc_dP)):
                    acc_dP[i] = acc_dP[i] * dtanh[i].to(Float32)
            rdS = cute.make_rmem_tensor_like(acc_dP, self.dtype)
            convert_to(acc_dP, rdS)

        if const_expr(self.cfg.dk_early):
            # dK += dS^T Q now, from the registers: it runs while the warpgroups meet around sdS
            gemm(tiled_mma_dkv, acc_dK, acc_to_frgA(rdS), tdKrQt[None, None, None, stage], wg_wait=-1)
        # dS^T (split_hdim: and P^T) into smem, once both warpgroups' previous GEMMs have read it.
        # With two sdS buffers (one per Q stage) that needs no barrier: the other warpgroup may
        # still read the other buffer (the last block's dQ GEMM), and it was done with this one
        # (two blocks back, wait_group(0)) before it passed the last block's barrier below.
        ds_idx = stage if const_expr(self.cfg.ds_stages == 2) else 0
        if const_expr(self.cfg.ds_stages == 1):
            cute.arch.barrier(barrier_id=int(NamedBarrierBwd.PdS), number_of_threads=self.num_mma_threads)
        p_in_smem = const_expr(self.split_hdim or self.dkvt)
        if const_expr(p_in_smem):
            cute.copy(thr_copy_dS, thr_copy_dS.retile(rP), tPsP)
        cute.copy(thr_copy_dS, thr_copy_dS.retile(rdS), tdSsdS[None, None, None, ds_idx])
        cute.arch.fence_view_async_shared()  # stmatrix writes -> WGMMA's async-proxy reads
        if const_expr(not p_in_smem and not self.dv_early):
            # dV += P^T dO (P^T from registers: before the other warpgroup's dS^T is in)
            gemm(tiled_mma_dv, acc_dV, acc_to_frgA(rP), tdVrdOt[None, None, None, stage], wg_wait=-1)
        cute.arch.barrier(barrier_id=int(NamedBarrierBwd.PdS), number_of_threads=self.num_mma_threads)
        if const_expr(p_in_smem):
            # dV += P^T dO from sP, every warpgroup's queries (split_hdim: this warpgroup's columns;
            # dkvt: dV^T's head-dim rows)
            self.gemm_xy(tiled_mma_dv, acc_dV, tdVrP, tdVrdOt[None, None, None, stage], self.dkvt, wg_wait=-1)
        # dQ = dS K (this warpgroup's part), then dK += dS^T Q
        acc_dQ = cute.make_rmem_tensor(tiled_mma_dq.partition_shape_C(self.dq_tile), Float32)
        self.gemm_xy(tiled_mma_dq, acc_dQ, tdQrdS[None, None, None, ds_idx], tdQrKt, self.dq_swap_ab, zero_init=True,
                     wg_wait=-1)
        if const_expr(self.cfg.dk_early):
            warpgroup.wait_group(0)  # dQ's group, the last (dK's went first)
        else:
            tdKrdS_cur = tdKrdS[None, None, None, ds_idx] if const_expr(p_in_smem) else acc_to_frgA(rdS)
            self.gemm_xy(tiled_mma_dkv, acc_dK, tdKrdS_cur, tdKrQt[None, None, None, stage], self.dkvt, wg_wait=1)
        pipeline_do.consumer_release(q_state)  # dV's GEMM (and dQ's) done with dO
        if const_expr(self.cfg.dq_red):
            # dQ += this thread's values, 16 bytes a red, where the bulk reduce would add them
            gdQ = cute.local_tile(mdQ_h, (self.tile_m * self.hdim,), (m_block,))
            flat = cute.make_tensor(acc_dQ.iterator, cute.make_layout(self.dq_per_thread))
            for v in cutlass.range_constexpr(self.dq_per_thread // DQ_VEC):
                red_add_v4_f32(gdQ.iterator + dq_offset + v * DQ_VEC * THREADS_PER_WG,
                               *(flat[v * DQ_VEC + e] for e in range(DQ_VEC)))
        else:
            # dQ -> sdQ once the dQ warp's previous reduce has read it, then hand it over
            cute.arch.barrier(barrier_id=int(NamedBarrierBwd.dQEmptyWG0) + wg_idx,
                              number_of_threads=THREADS_PER_WG + 32)
            cute.autovec_copy(cute.make_tensor(acc_dQ.iterator, cute.make_layout(tdQsdQ.shape)), tdQsdQ)
            cute.arch.fence_view_async_shared()  # st.shared -> the bulk reduce's async-proxy reads
            cute.arch.barrier_arrive(barrier_id=int(NamedBarrierBwd.dQFullWG0) + wg_idx,
                                     number_of_threads=THREADS_PER_WG + 32)
        warpgroup.wait_group(0)
        pipeline_q.consumer_release(q_state)  # dK's GEMM done with Q
        q_state.advance()
        return q_state

    def hoisted(self, row_stat, sX, num_cols: int):
        """c -> the row statistic sX of query column c: the first stat_regs read into registers
        here (before a GEMM wait), the rest from smem where used."""
        regs = [row_stat(sX, c) for c in range(min(self.cfg.stat_regs, num_cols))]
        return lambda c: regs[c] if c < len(regs) else row_stat(sX, c)

    @cute.jit
    def store_dkv(self, acc, mX, tiled_mma_dkv, tidx, work, cols: cutlass.Constexpr[int],
                  cols_in: cutlass.Constexpr[int]):
        """dK or dV (`cols` columns in the kernel, `cols_in` in the tensors where fewer, else 0)
        of this CTA's keys (rows before seqlen_k, columns before cols_in) from registers to global
        memory."""
        cfg, seqlen = self.cfg, work.seqlen
        if const_expr(cfg.dkv_partial):
            r16 = acc  # float32 partials of this CTA's query heads, summed by the host
        else:
            r16 = cute.make_rmem_tensor_like(acc, self.dtype)
            convert_to(acc, r16)
        b_k = work.batch if const_expr(not cfg.cu_seqlens_k) else 0
        mX_cur = cute.domain_offset((seqlen.offset_k, 0), mX[None, None, work.out_head, b_k])
        gX = cute.local_tile(mX_cur, (self.tile_n, cols), (work.n_block, 0))
        store_acc_predicated(r16, tiled_mma_dkv.get_slice(tidx), gX, (self.tile_n, cols),
                             seqlen.seqlen_k - work.n_block * self.tile_n, cols_in, transposed=self.dkvt)

    def dkv_cols_in(self) -> tuple[int, int]:
        """dK's and dV's head dims in the tensors where below the kernel's (0: equal): hdim_in is
        Q / K's; with hdimv, V is 128 wide in the tensors too."""
        return self.cfg.hdim_in, 0 if self.cfg.hdimv else self.cfg.hdim_in

    def dkv_slab(self, cols: int):
        """dkv_smem: the (rows, columns) of the slab of a keys x `cols` block of dK / dV that one
        consumer warp's accumulator holds, and the slab's tile coordinate for warp w (0 .. 4 x
        num_wg - 1): 16 keys x all columns (two warpgroups of 64 keys); split_hdim, 16 keys x
        cols / 2 (warpgroup w // 4 holds half w // 4 of the columns); dkvt, all keys x 16 columns
        (the warp's 16 rows of dK^T, warpgroup w // 4 head-dim rows 64 (w // 4) ..)."""
        if self.dkvt:
            return (self.tile_n, DKV_WARP_ROWS), lambda w: (0, w)
        if self.split_hdim:
            return (DKV_WARP_ROWS, cols // NUM_MMA_WG), lambda w: (w % 4, w // 4)
        return (DKV_WARP_ROWS, cols), lambda w: (w, 0)

    @cute.jit
    def store_dkv_staged(self, accs, mXs, sXs, tiled_mmas, tidx, work):
        """dkv_smem: dK and dV (`accs`, into `mXs`) through their smem staging `sXs` (over sQ and
        sdO; keys x head dim): once every consumer warpgroup's last GEMMs have read sQ / sdO (the
        barrier), each warp writes the slab its accumulators hold (stmatrix; dkvt: transposing,
        from dK^T / dV^T) and stores the slab's keys before seqlen_k by 16-byte stores (columns
        before hdim_in)."""
        cfg, seqlen = self.cfg, work.seqlen
        cute.arch.barrier(barrier_id=int(NamedBarrierBwd.PdS), number_of_threads=self.num_mma_threads)
        for acc, sX, tiled_mma in zip(accs, sXs, tiled_mmas):
            r16 = cute.make_rmem_tensor_like(acc, self.dtype)
            convert_to(acc, r16)
            stage_acc(r16, tiled_mma, tidx, sX, transposed=self.dkvt)  # (dkvt: from dK^T / dV^T)
        cute.arch.sync_warp()
        warp = tidx // 32
        b_k = work.batch if const_expr(not cfg.cu_seqlens_k) else 0
        keys_left = seqlen.seqlen_k - work.n_block * self.tile_n
        for mX, sX, cols, c_in in zip(mXs, sXs, (self.hdim, self.hdimv), self.dkv_cols_in()):
            slab, coord = self.dkv_slab(cols)
            rb, cb = coord(warp)
            mX_cur = cute.domain_offset((seqlen.offset_k, 0), mX[None, None, work.out_head, b_k])
            gX_w = cute.local_tile(mX_cur, slab, (work.n_block * (self.tile_n // slab[0]) + rb, cb))
            store_slab_predicated(cute.local_tile(sX, slab, (rb, cb)), gX_w, keys_left - rb * slab[0], c_in,
                                  cb * slab[1])

    # ------------------------------------------------------------------ compile
    @staticmethod
    def fake_args(cfg: BwdConfig, env_stream: bool = False):
        """Fake tensors / scalars matching the launch (symbolic shapes, 16-byte strides)."""
        sym, sym64 = cute.sym_int, cute.sym_int64
        dt = DTYPES[cfg.dtype]
        div = 128 // dt.width

        def t(shape, dtype=dt, d=div):
            stride = tuple(1 if i == len(shape) - 1 else sym64(divisibility=d) for i in range(len(shape)))
            return cute.runtime.make_fake_tensor(dtype, shape, stride=stride, assumed_align=16)

        b, sq, sk, h, hk = sym(), sym(), sym(), sym(), sym()
        q_rows = (sym(),) if cfg.cu_seqlens_q else (b, sq)
        k_rows = (sym(),) if cfg.cu_seqlens_k else (b, sk)
        d = cfg.hdim_in or cfg.hdim
        dv = cfg.hdimv or d
        rows = sym(divisibility=cfg.tile_m)
        row_t = lambda n: t((h, n) if cfg.cu_seqlens_q else (b, h, n), Float32, 4)
        bp1 = sym()
        vec = lambda n: cute.runtime.make_fake_tensor(Int32, (n,), stride=(1,), assumed_align=4)
        dkv = (lambda e: t((*k_rows, sym(), e), Float32, 4)) if cfg.dkv_partial else \
            (lambda e: t((*k_rows, hk, e)))
        return (
            t((*q_rows, h, d)), t((*k_rows, hk, d)), t((*k_rows, hk, dv)), t((*q_rows, h, dv)),
            dkv(d), dkv(dv),
            row_t(rows), row_t(rows), row_t(sym(divisibility=cfg.tile_m * cfg.hdim)),
            cute.runtime.make_fake_tensor(Int32, (sym(), sym()) if cfg.cu_seqlens_q else (sym(), sym(), sym()),
                                          stride=(sym64(), 1) if cfg.cu_seqlens_q else (sym64(), sym64(), 1),
                                          assumed_align=4) if cfg.deterministic else None,
            vec(bp1) if cfg.cu_seqlens_q else None,
            vec(bp1) if cfg.cu_seqlens_k else None,
            vec(b) if cfg.seqused_q else None,
            vec(b) if cfg.seqused_k else None,
            Float32(1.0), Float32(1.0), Float32(1.0), Int32(-1), Int32(-1), Int32(0), Int32(1), Int32(1), Int32(132),
            cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=env_stream),
        )


@dataclass(frozen=True)
class _Work:
    """This CTA's key block and what every role derives from it: its query heads (the KV head's
    group, or a 1 / head_splits share of it), the sequence, the mask and where the sequence's
    padded rows start."""

    n_block: Int32
    head_kv: Int32
    out_head: Int32  # dK / dV's head index: head_kv, or with dkv_partial head_kv * head_splits + split
    batch: Int32
    first_head: Int32  # the query heads this CTA walks: first_head .. first_head + heads - 1
    heads: Int32
    seqlen: SeqlenInfo
    mask: KeyBlockMask
    row_offset: Int32
