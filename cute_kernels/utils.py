"""Small CuTe DSL helpers shared by the sm90 attention kernels (and a later FP8 variant).

Layout conventions (WGMMA accumulator, one warpgroup computes 64 rows):
  acc  ((2, 2, V), MMA_M, MMA_N)  -- V = N / 8 column pairs per thread
  mn   ((2, MMA_M), (2, V, MMA_N)) -- rows x cols view used by softmax / masking
  frgA ((2, 2, 2), MMA_M, (V / 2, MMA_N)) -- the same registers as the A operand of O += P V
"""

from __future__ import annotations

import enum
import math
from typing import Optional, Type

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, Int64, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.cute.nvgpu import tcgen05, warpgroup
from cutlass.utils import LayoutEnum


class NamedBarrierFwd(enum.IntEnum):
    """Hardware named-barrier ids (0 is __syncthreads)."""

    Epilogue = 1  # all consumer threads, sO aliasing sQ: stage O only after every QK^T is done
    WarpSchedulerWG1 = 2  # pingpong: WG1 may issue its GEMMs
    WarpSchedulerWG2 = 3  # pingpong: WG2 may issue its GEMMs
    WarpSchedulerWG3 = 4  # 3 consumer WGs (tile_m 192): WG3 may issue its GEMMs


class NamedBarrierBwd(enum.IntEnum):
    """The backward's named-barrier ids (bwd_sm90.py)."""

    PdS = 1  # both consumer WGs: sdS free to write (previous dQ GEMMs done) / written (next dQ GEMM)
    dQFullWG0 = 2  # consumer WG i's dQ is in sdQ[i] (128 consumer threads + the 32 of the dQ warp)
    dQFullWG1 = 3
    dQEmptyWG0 = 4  # the dQ warp's bulk reduce has read sdQ[i]: WG i may write it again
    dQEmptyWG1 = 5


def make_smem_layout(dtype: Type[cutlass.Numeric], shape: tuple, stages: Optional[int] = None,
                     atom_cols: Optional[int] = None):
    """Row-major (last dim contiguous) swizzled smem layout for a TMA tile, optionally staged.
    The swizzle atom is the widest whose row divides `atom_cols` (default: the tile's columns);
    a tile that a GEMM also reads transposed in column slices (the backward's K in dQ = dS K,
    hdim / 2 columns per warpgroup) needs an atom that divides the slice."""
    atom = warpgroup.make_smem_layout_atom(
        sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dtype, atom_cols or shape[1]), dtype
    )
    if stages is None:
        return cute.tile_to_shape(atom, shape, order=(0, 1))
    return cute.tile_to_shape(atom, (*shape, stages), order=(0, 1, 2))


def transpose_view(t: cute.Tensor) -> cute.Tensor:
    """Swap the first two modes of an smem tensor (V (n, d) -> Vt (d, n) for O += P V)."""
    shape = (t.shape[1], t.shape[0], *t.shape[2:])
    order = (1, 0, *range(2, cute.rank(t)))
    return cute.composition(t, cute.make_ordered_layout(shape, order=order))


def acc_layout_to_mn(acc_layout: cute.Layout) -> cute.Layout:
    base = cute.make_layout(acc_layout.shape)  # column-major over the acc's own coordinates
    s, d = base.shape, base.stride
    shape = ((s[0][1], s[1]), (s[0][0], s[0][2], s[2]))
    stride = ((d[0][1], d[1]), (d[0][0], d[0][2], d[2]))
    return cute.composition(acc_layout, cute.make_layout(shape, stride=stride))


def acc_to_mn(acc: cute.Tensor) -> cute.Tensor:
    return cute.make_tensor(acc.iterator, acc_layout_to_mn(acc.layout))


def mn_transposed(t_mn: cute.Tensor) -> cute.Tensor:
    """An (m, n) view (acc_to_mn's) with its two modes swapped: (n, m)."""
    return cute.make_tensor(t_mn.iterator, cute.select(t_mn.layout, mode=[1, 0]))


def acc_to_frgA(acc: cute.Tensor) -> cute.Tensor:
    """Reinterpret an fp32 QK^T accumulator as the register A operand of the PV WGMMA."""
    lay = acc.layout
    assert lay.shape[0][2] % 2 == 0, "tile_n must be a multiple of 16"
    l = cute.logical_divide(lay, ((None, None, 2), None, None))
    shape = ((l.shape[0][0], l.shape[0][1], l.shape[0][2][0]), l.shape[1], (l.shape[0][2][1], l.shape[2]))
    stride = (
        (l.stride[0][0], l.stride[0][1], l.stride[0][2][0]),
        l.stride[1],
        (l.stride[0][2][1], l.stride[2]),
    )
    return cute.make_tensor(acc.iterator, cute.make_layout(shape, stride=stride))


@cute.jit
def gemm(
    tiled_mma: cute.TiledMma,
    acc: cute.Tensor,
    tCrA: cute.Tensor,
    tCrB: cute.Tensor,
    zero_init: cutlass.Constexpr[bool] = False,
    wg_wait: cutlass.Constexpr[int] = 0,
    k_blocks: cutlass.Constexpr[int] = 0,
    more: tuple = (),
):
    """acc (+)= A @ B over all k-blocks (`k_blocks` > 0: the first that many) as one WGMMA group;
    wait until `wg_wait` groups remain in flight (-1: do not wait). `tCrA` may be a tuple of
    per-k-block fragments (`pin_smem_desc` with per_k). `more`: further (A, B) pairs added into
    acc in the same group (MLA's Qv V^T after Q K^T)."""
    warpgroup.fence()
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for a_frag, b_frag, n_k in ((tCrA, tCrB, k_blocks), *((a_, b_, 0) for a_, b_ in more)):
        for k in cutlass.range_constexpr(n_k or cute.size(b_frag.shape[2])):
            a = a_frag[k] if const_expr(isinstance(a_frag, tuple)) else a_frag[None, None, k]
            cute.gemm(atom, acc, a, b_frag[None, None, k], acc)
            atom.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()
    if const_expr(wg_wait >= 0):
        warpgroup.wait_group(wg_wait)


@dsl_user_op
def _cvt_pair(lo: Float32, hi: Float32, ptx_type: str, *, loc=None, ip=None) -> Int32:
    """Two fp32 -> one 32-bit register of two 16-bit floats (`lo` in the low half)."""
    return Int32(llvm.inline_asm(
        T.i32(), [Float32(lo).ir_value(loc=loc, ip=ip), Float32(hi).ir_value(loc=loc, ip=ip)],
        f"cvt.rn.{ptx_type}.f32 $0, $2, $1;", "=r,f,f",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    ))


@dsl_user_op
def _opaque_i64(x: Int64, *, loc=None, ip=None) -> Int64:
    return Int64(llvm.inline_asm(
        T.i64(), [Int64(x).ir_value(loc=loc, ip=ip)], "mov.b64 $0, $1;", "=l,l",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    ))


@dsl_user_op
def opaque_f32(x: Float32, *, loc=None, ip=None) -> Float32:
    """`x` behind an opaque move: a value the compiler cannot treat as a constant. An
    accumulator filled with a literal 0.0 has its zeros materialized where LLVM likes, which
    can be before the warp-role branch (setmaxnreg's lower register budget there)."""
    return Float32(llvm.inline_asm(
        T.f32(), [Float32(x).ir_value(loc=loc, ip=ip)], "mov.b32 $0, $1;", "=f,f",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    ))


def pin_smem_desc(frag: cute.Tensor, per_k: bool = False):
    """The WGMMA operand fragment `frag` (an smem-descriptor tensor) with its base descriptor
    computed here, once. Left alone, the compiler re-derives the descriptor from the smem address
    at every GEMM (add, shift, mask, widen, or: ~5 uniform instructions per operand per KV
    iteration); behind an opaque move, a GEMM only adds its stage / k-block offset.
    per_k: a tuple with one pinned fragment per k-block, for an unstaged operand (Q of one
    stage) whose descriptors then cost nothing inside the loop. (The int <-> descriptor casts
    live in the tcgen05 helpers but are plain casts of the `!cute_nvgpu.smem_desc` type WGMMA
    uses too.)"""
    if per_k:
        return tuple(pin_smem_desc(frag[None, None, k]) for k in range(cute.size(frag.shape[2])))
    base = tcgen05.smem_descriptor_to_int(frag.iterator)
    return cute.make_tensor(tcgen05.int_to_smem_descriptor(_opaque_i64(base)), frag.layout)


@cute.jit
def convert_to(src: cute.Tensor, dst: cute.Tensor):
    """dst[i] = src[i] rounded to dst's bf16/fp16, a pair per instruction for every tile shape.
    (`dst.store(src.load().to(...))` pairs elements only when the fragment's shape lets the
    compiler see it: at tile_n 80 / 112 it emitted one F2FP per element plus a PRMT per pair,
    and ptxas then serialized the PV WGMMAs that read those registers.) `dst` must be a compact
    register tensor, so its flat index is its storage order."""
    ptx = "bf16x2" if const_expr(dst.element_type is cutlass.BFloat16) else "f16x2"
    d32 = cute.recast_tensor(dst, Int32)
    for i in cutlass.range_constexpr(cute.size(d32)):
        d32[i] = _cvt_pair(src[2 * i], src[2 * i + 1], ptx)


def quad_allreduce(x: Float32, op) -> Float32:
    """Reduce over the 4 lanes that share an accumulator row."""
    x = op(x, cute.arch.shuffle_sync_bfly(x, offset=1))
    return op(x, cute.arch.shuffle_sync_bfly(x, offset=2))


def assume_aligned_strides(t: cute.Tensor, divby: int) -> cute.Tensor:
    """Tell the compiler every dynamic stride is a multiple of `divby` elements (TMA needs
    16-byte strides; the host checks this before launch)."""
    strides = tuple(s if isinstance(s, int) else cute.assume(s, divby=divby) for s in t.stride)
    return cute.make_tensor(t.iterator, cute.make_layout(t.shape, stride=strides))


@dsl_user_op
def bulk_load(gmem_ptr: cute.Pointer, smem_ptr: cute.Pointer, mbar_ptr: cute.Pointer, num_bytes: int,
              *, loc=None, ip=None):
    """cp.async.bulk of `num_bytes` contiguous bytes (a multiple of 16, both ends 16-byte aligned)
    from global to shared memory, completing on the mbarrier as transaction bytes. One thread
    issues it (no election inside)."""
    llvm.inline_asm(
        None,
        [gmem_ptr.toint(loc=loc, ip=ip).ir_value(), smem_ptr.toint(loc=loc, ip=ip).ir_value(),
         mbar_ptr.toint(loc=loc, ip=ip).ir_value(), Int32(num_bytes).ir_value(loc=loc, ip=ip)],
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$1], [$0], $3, [$2];",
        "l,r,r,r", has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    )


@dsl_user_op
def bulk_reduce_add_f32(smem_ptr: cute.Pointer, gmem_ptr: cute.Pointer, num_bytes: int, *, loc=None, ip=None):
    """cp.reduce.async.bulk .add.f32: global[i] += shared[i] over `num_bytes` contiguous bytes
    (a multiple of 16), in the issuing thread's bulk group (commit / wait with
    cp_async_bulk_commit_group / wait_group). One thread issues it."""
    llvm.inline_asm(
        None,
        [gmem_ptr.toint(loc=loc, ip=ip).ir_value(), smem_ptr.toint(loc=loc, ip=ip).ir_value(),
         Int32(num_bytes).ir_value(loc=loc, ip=ip)],
        "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [$0], [$1], $2;",
        "l,r,r", has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    )


def sdhb(t: cute.Tensor, packed: bool) -> cute.Tensor:
    """(b, s, h, d) or packed (t, h, d) -> (s, d, h, b), with b of size 1 for packed."""
    if const_expr(packed):
        lay = cute.select(t.layout, mode=[0, 2, 1])
        lay = cute.append(lay, cute.make_layout(1, stride=0))
    else:
        lay = cute.select(t.layout, mode=[1, 3, 2, 0])
    return cute.make_tensor(t.iterator, lay)


def lse_shb(t: cute.Tensor, packed: bool) -> cute.Tensor:
    """(b, h, s) or packed (h, t) -> (s, h, b)."""
    if const_expr(packed):
        lay = cute.append(cute.select(t.layout, mode=[1, 0]), cute.make_layout(1, stride=0))
    else:
        lay = cute.select(t.layout, mode=[2, 1, 0])
    return cute.make_tensor(t.iterator, lay)


@dsl_user_op
def load_acquire_i32(ptr: cute.Pointer, *, loc=None, ip=None) -> Int32:
    """ld.acquire.gpu of one int32 in global memory (a semaphore read)."""
    return Int32(llvm.inline_asm(
        T.i32(), [ptr.toint(loc=loc, ip=ip).ir_value()], "ld.acquire.gpu.global.b32 $0, [$1];", "=r,l",
        has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    ))


@dsl_user_op
def red_add_v4_f32(ptr: cute.Pointer, a, b, c, d, *, loc=None, ip=None):
    """red.global.add.v4.f32 (sm90): four consecutive float32 in global memory (16-byte aligned)
    += (a, b, c, d), relaxed, gpu scope (visible to the next kernel)."""
    llvm.inline_asm(
        None, [ptr.toint(loc=loc, ip=ip).ir_value()] + [Float32(x).ir_value(loc=loc, ip=ip) for x in (a, b, c, d)],
        "red.global.add.v4.f32 [$0], {$1, $2, $3, $4};", "l,f,f,f,f",
        has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    )


@dsl_user_op
def red_release_add_i32(ptr: cute.Pointer, value, *, loc=None, ip=None):
    """red.release.gpu.add of an int32 in global memory (a semaphore increment)."""
    llvm.inline_asm(
        None, [ptr.toint(loc=loc, ip=ip).ir_value(), Int32(value).ir_value(loc=loc, ip=ip)],
        "red.release.gpu.global.add.s32 [$0], $1;", "l,r",
        has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    )


@cute.jit
def store_acc_predicated(acc: cute.Tensor, thr_mma: cute.ThrMma, gX: cute.Tensor, tile: cutlass.Constexpr,
                         rows_left, cols_in: cutlass.Constexpr[int] = 0, transposed: cutlass.Constexpr[bool] = False):
    """A thread's accumulator-layout registers `acc` (its share, by `thr_mma`, of a `tile` =
    (rows, cols) block) into the global block `gX`, element by element: rows before `rows_left`,
    and (cols_in > 0: the tensor's head dim ends inside the tile) columns before cols_in.
    transposed: the MMA computed the block's transpose (cols x rows: the backward's dQ^T)."""
    if const_expr(transposed):
        gX = transpose_view(gX)
        tile = (tile[1], tile[0])
    tXgX = acc_to_mn(thr_mma.partition_C(gX))
    tXcX = acc_to_mn(thr_mma.partition_C(cute.make_identity_tensor(tile)))
    a_mn = acc_to_mn(acc)
    for r in cutlass.range_constexpr(cute.size(a_mn.shape[0])):
        if const_expr(transposed):  # (head-dim column, row) coordinates
            if const_expr(not cols_in) or tXcX[r, 0][0] < cols_in:
                for c in cutlass.range_constexpr(cute.size(a_mn.shape[1])):
                    if tXcX[r, c][1] < rows_left:
                        tXgX[r, c] = a_mn[r, c]
        elif tXcX[r, 0][0] < rows_left:
            for c in cutlass.range_constexpr(cute.size(a_mn.shape[1])):
                if const_expr(not cols_in) or tXcX[r, c][1] < cols_in:
                    tXgX[r, c] = a_mn[r, c]


def stmatrix_op(dtype: Type[cutlass.Numeric], transposed: bool = False):
    """The smem store of a 16-bit accumulator tile: stmatrix, or with `transposed` (the MMA
    computed the tile's transpose) stmatrix.trans into the tile's transposed view."""
    return sm90_utils.sm90_get_smem_store_op(LayoutEnum.COL_MAJOR if transposed else LayoutEnum.ROW_MAJOR, dtype,
                                             Float32)


@cute.jit
def stage_acc(r16: cute.Tensor, tiled_mma: cute.TiledMma, tidx, sX: cute.Tensor,
              transposed: cutlass.Constexpr[bool] = False):
    """A thread's 16-bit accumulator-layout registers `r16` (its share, by `tiled_mma`, of smem
    tile sX, or with `transposed` of sX's transpose) into sX by stmatrix (.trans). The caller
    syncs the threads that read sX back."""
    thr_copy = cute.make_tiled_copy_C(stmatrix_op(r16.element_type, transposed), tiled_mma).get_slice(tidx)
    cute.copy(thr_copy, thr_copy.retile(r16), thr_copy.partition_D(transpose_view(sX) if const_expr(transposed) else sX))


@cute.jit
def store_slab_predicated(sX: cute.Tensor, gX: cute.Tensor, rows, cols_in: cutlass.Constexpr[int] = 0, col0=0):
    """One warp: the first `rows` rows of its smem slab `sX` (rows x width, 16-bit) into the same
    block `gX` of global memory by 16-byte loads and stores, whole rows per group of lanes (each
    128-byte line written once). cols_in > 0: the tensor's head dim ends inside the tile; only the
    16-byte columns whose tile column (col0 + column in the slab) is before it. The caller syncs
    the warp after writing the slab."""
    dtype = sX.element_type
    vec = 128 // dtype.width
    width = cute.size(sX.shape[1])
    threads_per_row = math.gcd(width // vec, 32)
    gmem_copy = cute.make_tiled_copy_tv(
        cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype, num_bits_per_copy=128),
        cute.make_ordered_layout((32 // threads_per_row, threads_per_row), order=(1, 0)),
        cute.make_layout((1, vec)),
    )
    thr_gmem = gmem_copy.get_slice(cute.arch.lane_idx())
    tXsX = thr_gmem.partition_S(sX)
    tXgX = thr_gmem.partition_D(gX)
    tXcX = thr_gmem.partition_S(cute.make_identity_tensor((cute.size(sX.shape[0]), width)))
    tXrX = cute.make_rmem_tensor_like(tXsX, dtype)
    cute.autovec_copy(tXsX, tXrX)
    for m in cutlass.range_constexpr(cute.size(tXrX.shape[1])):
        if tXcX[0, m, 0][0] < rows:
            if const_expr(not cols_in):
                cute.copy(gmem_copy, tXrX[None, m, None], tXgX[None, m, None])
            else:
                for n in cutlass.range_constexpr(cute.size(tXrX.shape[2])):
                    if tXcX[0, m, n][1] + col0 < cols_in:
                        cute.copy(gmem_copy, tXrX[None, m, n], tXgX[None, m, n])
