"""What FP8 WGMMA asks of the sm90 attention kernel's registers, and the key order that meets it.

The P V GEMM takes P from registers (RS WGMMA). In 16 bits its A-operand layout matches the
QK^T accumulator's: a thread's S values become its P operand in place (utils.acc_to_frgA). In
e4m3 (k = 32 per instruction) they differ. Within every 16 key columns, for the rows it holds,
  thread t of a quad holds S columns  2t, 2t+1, 8+2t, 9+2t   (the fp32 accumulator)
  and must supply P columns          4t, 4t+1, 4t+2, 4t+3   (the e4m3 A operand).
Rather than move values between threads (shuffles in the softmax's critical path), the kernel
relabels the PV GEMM's k index: A-operand column 4t + j holds S column PV_KEY_ORDER[4t + j],
which is this thread's own, so V's rows must arrive in the same order: the FP8 prep writes V
transposed with the keys of every 16-key group in PV_KEY_ORDER (a sum over keys does not care
about their order). Each 32-bit A register then packs the thread's accumulator values
REGISTER_ORDER[0:4] or [4:8] of each group of 8 (`convert_p_e4m3`), with no data movement
across lanes. `tests/test_cute_fp8.py` derives both orders from the tiled MMAs' own layouts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

# The format's constants (fa3py.fp8): PV_KEY_ORDER, where key k of a 16-key group of V^T sits
# (position i with PV_KEY_ORDER[i] == k; Fp8Format.v_pv_order), checked against the MMAs'
# layouts in tests/test_cute_fp8.py; P_OFFSET, P = exp2(s2 - rowmax + P_OFFSET) in [0, 256]
# before its e4m3 rounding.
from fa3py.fp8.format import P_OFFSET, PV_KEY_ORDER  # noqa: F401

# A register 2r / 2r + 1 of a group of 8 accumulator values: these four, lowest byte first.
REGISTER_ORDER = (0, 1, 4, 5, 2, 3, 6, 7)
# FP8 WGMMA's k per instruction: the KV tile and hdim must be multiples of it.
K_PER_MMA = 32


@dsl_user_op
def _cvt_e4m3x4(a: Float32, b: Float32, c: Float32, d: Float32, *, loc=None, ip=None) -> Int32:
    """Four fp32 -> one 32-bit register of four e4m3 (`a` in the lowest byte), round to nearest
    even, saturating to +-448 (NaN stays NaN): two cvt.rn.satfinite.e4m3x2.f32 joined by a mov
    inside the asm (ptxas: F2FP x2 + PRMT). Joined outside it as a <2 x i16> bitcast instead,
    ptxas merges the halves (F2FP.MERGE_C, no PRMT: hdim 128's KV loop 557 -> 533 instructions),
    but the kernel ran slower: H100, hdim 128, block-V scales, CUDA graphs, two alternating runs
    each, 895-907 against 873-878 TFLOP/s at 16k tokens x 1, 760-762 against 731 at 2k x 8."""
    return Int32(llvm.inline_asm(
        T.i32(), [Float32(x).ir_value(loc=loc, ip=ip) for x in (a, b, c, d)],
        "{ .reg .b16 lo, hi;\n"
        "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
        "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
        "mov.b32 $0, {lo, hi}; }",
        "=r,f,f,f,f", has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
        loc=loc, ip=ip,
    ))


@cute.jit
def convert_p_e4m3(acc: cute.Tensor, dst: cute.Tensor):
    """dst (the e4m3 A operand of the PV WGMMA, a compact register tensor) from `acc`, the fp32
    probabilities in the QK^T accumulator's register order: each A register packs the four
    values of REGISTER_ORDER's half of a group of 8, the order PV_KEY_ORDER's V rows expect."""
    d32 = cute.recast_tensor(dst, Int32)
    for r in cutlass.range_constexpr(cute.size(d32)):
        base, o = (r // 2) * 8, REGISTER_ORDER[4 * (r % 2):4 * (r % 2) + 4]
        d32[r] = _cvt_e4m3x4(acc[base + o[0]], acc[base + o[1]], acc[base + o[2]], acc[base + o[3]])


def vt_column(offset_k, batch):
    """The first column of packed sequence `batch` (starting at key offset_k) in a packed V^T:
    16 * (offset_k // 16 + batch) (fa3py.fp8.format.packed_column in units of VT_ALIGN = 16)."""
    return (offset_k // 16 + batch) * 16


@dataclass(frozen=True)
class Fp8Scales:
    """A tile's FP8 scales (fa3py.fp8's format) as the consumer needs them: its rows' Q scales
    times c (the softmax scale in log2 units over the Hadamard factor n), this (batch, KV head)'s
    K and V scales per KV block (the kernel's tile_n is the format's block_n), and the V scale of
    the block whose P is in the PV operand (block V scaling: `add_pv` multiplies that block's
    fresh PV accumulator by it; two-level accumulation).

    A block's scales are read from global memory by `fetch(n_block)` before the consumer waits
    for the block's K, so that the load's latency hides under the wait and the QK^T GEMM: read
    where they are used (between the row max and the exp2s) an L2 latency sat on the softmax's
    critical path every block (sass.loads_after_waits finds such loads). Channel V's scales
    likewise (`channel_scales`) are read while the tile's last PV GEMM runs.

    The score multiplier of a row in KV block n is sq[row] * sk[n] * c. Scales are powers of two,
    so (sq * c) * sk is the emulation's (sq * sk) * c exactly."""

    q_row_c: cute.Tensor  # (rows of this thread,) sq[row] * c
    mK_scale: cute.Tensor  # (KV blocks,) of this (batch, KV head); descales: (1,)
    mV_scale: cute.Tensor  # (KV blocks,) block V scaling; (hdim_v,) channel; descales: (1,)
    v_pending: cute.Tensor  # (1,) the V scale of the block whose P is in the PV operand
    fetched: cute.Tensor  # (2,) the K scale and (block V) the V scale of the block `fetch` read
    # FA3's descales in place of the format's scale tensors (FwdConfig.fp8_descales): one value
    # per (sequence, head) for every block of rows, every KV block and every V channel
    descales: bool = False
    v_channel: bool = False  # V's scales per channel (scale_channels), else per KV block (add_pv)

    @staticmethod
    def create(mQScale: cute.Tensor, mKScale: cute.Tensor, mVScale: cute.Tensor, c: Float32,
               block_m: cutlass.Constexpr[int], tile_m: cutlass.Constexpr[int], tile_n: cutlass.Constexpr[int],
               thr_mma_qk: cute.ThrMma, m_block, head, batch, seqlen, pack_gqa: cutlass.Constexpr[int] = 1,
               packed_q: cutlass.Constexpr[bool] = False, packed_k: cutlass.Constexpr[bool] = False,
               ragged_q: cutlass.Constexpr[bool] = False, v_channel: cutlass.Constexpr[bool] = False,
               descales: cutlass.Constexpr[bool] = False) -> "Fp8Scales":
        """`head`, `seqlen` (a mask.SeqlenInfo): the kernel's (with GQA packing, head is a KV
        head's group of pack_gqa query heads and rows are positions times pack_gqa); the scale
        tensors are unpacked, (b, h, blocks of positions): packed row r reads query head
        head * pack_gqa + r % pack_gqa at position r // pack_gqa, so any block_m works with
        packing. packed_q / packed_k (cu_seqlens): the scales are (1, heads, columns), sequence
        b's blocks from column start // block + b (fa3py.fp8.format.packed_column); channel V
        scales stay (batch, h_kv, dv). ragged_q (packed or seqused q): a sequence may have no
        rows, so the row read is clamped at 0 too. descales (channel V): the scale tensors are
        FA3's descales as (batch, heads, 1), Q's per query head, K's and V's per KV head, indexed
        by the sequence packed or not."""
        from cute_kernels.utils import acc_to_mn

        g = pack_gqa
        head_kv = head * g // (mQScale.shape[1] // mKScale.shape[1])
        b_q, q_col0 = (0, seqlen.offset_q // g // block_m + batch) if packed_q else (batch, 0)
        tScS = acc_to_mn(thr_mma_qk.partition_C(cute.make_identity_tensor((tile_m, tile_n))))
        rows = cute.size(tScS.shape[0])
        q_row_c = cute.make_rmem_tensor(rows, Float32)
        for r in range(rows):  # (create is not preprocessed: a Python loop, unrolled)
            # rows past the sequence read the last row's scale (their results are not stored)
            row = cutlass.min(m_block * tile_m + tScS[r, 0][0], seqlen.seqlen_q - 1)
            if ragged_q:
                row = cutlass.max(row, 0)
            if descales:
                q_row_c[r] = mQScale[batch, head if g == 1 else head * g + row % g, 0] * c
            elif g == 1 and not packed_q:
                q_row_c[r] = mQScale[batch, head, row // block_m] * c
            else:
                q_row_c[r] = mQScale[b_q, head * g + row % g, q_col0 + row // g // block_m] * c
        v_pending = cute.make_rmem_tensor(1, Float32)
        v_pending[0] = Float32(1.0)
        fetched = cute.make_rmem_tensor(2, Float32)
        fetched.fill(1.0)
        if descales:
            assert v_channel, "FA3's v_descale is a channel scale (the same for every channel)"
            mK_scale, mV_scale = mKScale[batch, head_kv, None], mVScale[batch, head_kv, None]
        elif packed_k:
            k_col0 = seqlen.offset_k // tile_n + batch
            mK_scale = cute.domain_offset((k_col0,), mKScale[0, head_kv, None])
            mV_scale = (mVScale[batch, head_kv, None] if v_channel
                        else cute.domain_offset((k_col0,), mVScale[0, head_kv, None]))
        else:
            mK_scale, mV_scale = mKScale[batch, head_kv, None], mVScale[batch, head_kv, None]
        return Fp8Scales(q_row_c, mK_scale, mV_scale, v_pending, fetched, descales, v_channel)

    @cute.jit
    def fetch(self, n_block):
        """Read KV block n_block's K scale (and, block V scaling, its V scale) into registers:
        called before the block's K wait, for row_mult / set_pending_v after it."""
        i = 0 if const_expr(self.descales) else n_block
        self.fetched[0] = self.mK_scale[i]
        if const_expr(not self.v_channel):
            self.fetched[1] = self.mV_scale[i]

    @cute.jit
    def row_mult(self) -> cute.Tensor:
        """The score multiplier of each of this thread's rows in the fetched KV block. (Descales:
        K's one scale folded into q_row_c once per tile instead took 20 instructions out of hdim
        128's KV loop, but with this P conversion it spilled 12 registers in the causal chunked
        V-rows kernel: not kept, untimed.)"""
        sk = self.fetched[0]
        mult = cute.make_rmem_tensor_like(self.q_row_c, Float32)
        for r in cutlass.range_constexpr(cute.size(mult)):
            mult[r] = self.q_row_c[r] * sk
        return mult

    @cute.jit
    def uniform_mult(self, mult: Float32) -> cute.Tensor:
        """`mult` for each of this thread's rows (softcap: softcap*log2(e) after the tanh)."""
        out = cute.make_rmem_tensor_like(self.q_row_c, Float32)
        out.fill(mult)
        return out

    @cute.jit
    def add_pv(self, acc_O: cute.Tensor, acc_PV: cute.Tensor):
        """O += PV * sv of the block PV was computed for (block V scaling)."""
        sv = self.v_pending[0]
        for i in cutlass.range_constexpr(cute.size(acc_O)):
            acc_O[i] = acc_O[i] + acc_PV[i] * sv

    @cute.jit
    def set_pending_v(self):
        """P of the fetched KV block now fills the PV operand: its V scale goes with it."""
        self.v_pending[0] = self.fetched[1]

    @cute.jit
    def channel_scales(self, tiled_mma_pv: cute.TiledMma, tidx, tile_m: cutlass.Constexpr[int],
                       hdimv: cutlass.Constexpr[int]) -> cute.Tensor:
        """The V channel scales of this thread's O columns (channel V scaling), read while the
        tile's last PV GEMM runs: read after its wait, their loads were on the epilogue's path."""
        from cute_kernels.utils import acc_to_mn

        tOcO = acc_to_mn(tiled_mma_pv.get_slice(tidx).partition_C(cute.make_identity_tensor((tile_m, hdimv))))
        cols = cute.size(tOcO.shape[1])
        sv = cute.make_rmem_tensor(cols, Float32)
        for j in cutlass.range_constexpr(cols):
            sv[j] = self.mV_scale[0 if const_expr(self.descales) else tOcO[0, j][1]]
        return sv

    @cute.jit
    def scale_channels(self, acc_O: cute.Tensor, sv: cute.Tensor):
        """O's columns times their V channel scales `sv` (channel_scales), in the epilogue."""
        from cute_kernels.utils import acc_to_mn

        o_mn = acc_to_mn(acc_O)
        for j in cutlass.range_constexpr(cute.size(o_mn.shape[1])):
            for r in cutlass.range_constexpr(cute.size(o_mn.shape[0])):
                o_mn[r, j] = o_mn[r, j] * sv[j]


# ----------------------------------------------------------------------------- V in rows (fp8_v_rows)
# FA3's float8 v is (keys, hdim_v) in rows, but FP8 WGMMA reads V^T K-major. With fp8_v_rows the
# producer warp TMAs V's rows into a staging tile and the producer warpgroup's other warps write
# each block transposed into the V^T tile the consumers read, with the keys of every 16-key group
# in PV_KEY_ORDER, as the FP8 prep writes V^T in memory. A job is one 16-key group g times one
# 32-channel slab s, 512 bytes, one instruction each way:
#   ldmatrix.x4.trans (b16): matrix i is the 8 keys 16 g + 8 (i & 1) + 0..7 of the 16-channel chunk
#     32 s + 16 (i >> 1), each key a 16-byte row; transposed as 16-bit elements, lane T (t = T % 4,
#     j = T / 4) receives in register i the bytes (key 2t, channels 2j, 2j + 1), (key 2t + 1, same):
#     registers 0 / 1 hold keys 2t, 2t + 1 / 2t + 8, 2t + 9 of channels 2j, 2j + 1 of chunk 0
#     (2 / 3 the same of chunk 1);
#   two byte permutes a chunk (VT_EVEN / VT_ODD) make channel 2j's and 2j + 1's word of keys
#     2t, 2t + 1, 2t + 8, 2t + 9: positions 4t .. 4t + 3 of the group in PV_KEY_ORDER;
#   stmatrix.x4 (b16): lane T's register m is word t of row j of matrix m, a row being 16 bytes of
#     one V^T row (a channel) at the group's columns. Lanes with j >= 4 put the odd channel in
#     registers 0 / 2 (vt_selectors), so that each matrix's 8 rows are channels whose residues
#     mod 8 differ and, under each V^T swizzle (32, 64 or 128-byte rows), land in 8 different
#     16-byte bank groups; ldmatrix's 8 consecutive keys do under every rows swizzle.
# So a job is 1 LDSM, 4 PRMT, 1 STSM and two addresses, each (lane base ^ uniform x) + uniform y
# (vt_plan): 29-31 SASS instructions, where 4-byte loads and stores with a 4 x 4 byte transpose a
# lane took 52-62 per 512 bytes and had 4-way bank conflicts on hdim 128's stores (16k tokens,
# FA3's inputs: 0.67-0.73 of the copy of V^T ahead on an H200 then, 0.92-0.93 at hdim 128 on an
# H100 now). tests/test_cute_fp8.py runs the jobs lane by lane with both instructions' semantics
# and the tiles' own layouts.
VT_JOB_KEYS = 16
VT_JOB_CHANNELS = 32
# prmt selectors over (registers 2h, 2h + 1): channel 2j's bytes (keys 2t, 2t+1, 2t+8, 2t+9) and 2j + 1's
VT_EVEN, VT_ODD = 0x6420, 0x7531
assert PV_KEY_ORDER[:4] == (0, 1, 8, 9)  # (t = 0's word: the order the permutes produce)


def vt_jobs(hdimv: int, tile_n: int) -> int:
    """Jobs of 32 lanes that transpose one (tile_n, hdim_v) V block."""
    assert hdimv % VT_JOB_CHANNELS == 0 and tile_n % VT_JOB_KEYS == 0, (hdimv, tile_n)
    return tile_n // VT_JOB_KEYS * (hdimv // VT_JOB_CHANNELS)


def vt_job_coords(job, tile_n: int) -> tuple:
    """(g, s) of a job: its 16-key group and 32-channel slab (Python ints or warp-uniform Int32)."""
    groups = tile_n // VT_JOB_KEYS
    return job % groups, job // groups


def vt_load_lane(lane) -> tuple:
    """(key, channel) in a job's group and slab of the row `lane` gives ldmatrix: matrix lane / 8's
    row lane % 8, i.e. key 8 (matrix & 1) + row of chunk matrix >> 1."""
    return lane & 15, 16 * (lane >> 4)


def vt_store_lane(lane):
    """The channel in a job's slab of the V^T row `lane` gives stmatrix: matrix m = lane / 8's row
    r = lane % 8, which holds register m of the lanes with j = r: channel 16 (m >> 1) + 2 r, plus 1
    for m odd, the other way round where r >= 4 (vt_selectors)."""
    return 16 * (lane >> 4) + 2 * (lane & 7) + (((lane >> 3) ^ (lane >> 2)) & 1)


def vt_selectors(lane) -> tuple:
    """The prmt selectors of a lane's registers 0 and 1 (2 and 3 likewise): the even channel's word
    first, the odd one's first where j = lane / 4 >= 4 (lane bit 4)."""
    swap = (lane >> 4) & 1
    return VT_EVEN + swap * (VT_ODD - VT_EVEN), VT_ODD - swap * (VT_ODD - VT_EVEN)


def prmt_reference(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode) on Python ints: byte i of the result is byte selector[i] of
    the 8 bytes b:a (a the low four); a selector nibble's bit 3 replicates the byte's sign."""
    src = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)
    out = 0
    for i in range(4):
        nib = (selector >> (4 * i)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


@dsl_user_op
def prmt(a, b, selector, *, loc=None, ip=None) -> Int32:
    """prmt.b32 (no side effects: the compiler may schedule it); `selector` a Python int (an
    immediate) or an Int32 register."""
    args = [Int32(a).ir_value(loc=loc, ip=ip), Int32(b).ir_value(loc=loc, ip=ip)]
    if isinstance(selector, int):
        asm, cons = f"prmt.b32 $0, $1, $2, {selector:#x};", "=r,r,r"
    else:
        asm, cons = "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r"
        args.append(Int32(selector).ir_value(loc=loc, ip=ip))
    return Int32(llvm.inline_asm(
        T.i32(), args, asm, cons, has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    ))


@dataclass(frozen=True)
class ByteTile:
    """An 8-bit smem tile as utils.make_smem_layout builds it, (rows, cols, stage), in closed
    form: atoms of 8 rows x `width` bytes (width a power of two), tiled rows first, then column
    atoms, then stages, under the swizzle that XORs byte-offset bits [7, 7 + bits) into bits
    [4, 4 + bits) (CuTe's Swizzle<bits, 4, 3>). `offset` is then a few integer ops (the rows'
    offset is row * width whatever the atom; a row 8 further is `8 * width` further with the same
    swizzle) where crd2idx on the layout spends ~20 (div / mod by the tile's extents).
    `byte_tile` derives it from the layout and checks it there."""

    width: int
    rows: int
    stage_bytes: int
    bits: int

    def offset(self, row, col, stage):
        """The swizzled byte offset of (row, col, stage) (Python ints or DSL Int32 alike)."""
        shift = self.width.bit_length() - 1
        off = row * self.width + (col & (self.width - 1)) + (col >> shift) * (self.rows * self.width) \
            + stage * self.stage_bytes
        return off ^ ((off >> 7) & ((1 << self.bits) - 1)) << 4


def byte_tile(layout, rows: int, cols: int, stages: int) -> ByteTile:
    """The ByteTile of `layout` (static: call at trace time): its row and stage strides and its
    swizzle's bits, checked against crd2idx on every row of the first atom column and every
    column of the first 16 rows of each stage (the CPU test checks every coordinate)."""
    swizzle = layout.inner
    assert (swizzle.num_base, swizzle.num_shift) == (4, 3), f"{layout}: not a Swizzle<b, 4, 3>"
    stage_bytes = cute.crd2idx((0, 0, 1), layout.outer) if stages > 1 else rows * cols
    tile = ByteTile(cute.crd2idx((1, 0, 0), layout.outer), rows, stage_bytes, swizzle.num_bits)
    coords = [(r, c, s) for s in range(stages) for r in range(rows) for c in (0, min(cols, tile.width) - 1)]
    coords += [(r, c, s) for s in range(stages) for r in range(16) for c in range(cols)]
    assert all(tile.offset(*x) == cute.crd2idx(x, layout) for x in coords), f"{layout}: not the byte tile {tile}"
    return tile


# The jobs' addresses as the transposing warps compute them: per lane a load and a store base
# (once per block); per job a warp-uniform XOR and addend (the uniform datapath). The swizzle
# (offset ^ ((offset >> 7) & mask) << 4) is linear over GF(2): an offset whose low bits are the OR
# of a lane part and a job part swizzles to the XOR of their swizzles, and parts that are
# multiples of 8 row widths (16-key groups, 32-channel slabs, column atoms, stages) lie above the
# swizzle's source bits and add. `vt_plan` checks it for every lane, job and stage at trace time.
def vt_lane_bases(lane, rows_tile: "ByteTile", vt_tile: "ByteTile") -> tuple:
    """The lane's (ldmatrix row, stmatrix row) byte offsets in job (0, 0), stage 0 (Python ints
    or DSL Int32)."""
    key, chunk = vt_load_lane(lane)
    return rows_tile.offset(key, chunk, 0), vt_tile.offset(vt_store_lane(lane), 0, 0)


def vt_job_terms(g, s, rows_tile: "ByteTile", vt_tile: "ByteTile", first_group: int = 0) -> tuple:
    """(load x, load y, store x, store y) of job (g, s): a lane's row is at (base ^ x) + y + the
    stage's offset (g, s Python ints or warp-uniform non-negative Int32); the staging tile holds
    the keys from group `first_group` of the block on (a part of it)."""
    W, Wt = rows_tile.width, vt_tile.width
    chan, key = s * VT_JOB_CHANNELS, g * VT_JOB_KEYS
    load_x = chan & (W - 1)
    load_y = key * W + (chan >> (W.bit_length() - 1)) * (rows_tile.rows * W)
    key = (g + first_group) * VT_JOB_KEYS
    store_x = key & (Wt - 1)
    store_y = chan * Wt + (key >> (Wt.bit_length() - 1)) * (vt_tile.rows * Wt)
    return load_x, load_y, store_x, store_y


@functools.lru_cache(maxsize=64)
def vt_plan(rows_tile: "ByteTile", vt_tile: "ByteTile", hdimv: int, tile_n: int, first_group: int = 0) -> bool:
    """Checks that vt_lane_bases and vt_job_terms give every lane's ldmatrix / stmatrix row of
    every job and stage: (key 16 g + vt_load_lane's, channel 32 s + its chunk) of the rows tile
    (`tile_n` keys) and (channel 32 s + vt_store_lane's, column 16 (g + first_group)) of V^T,
    16-byte aligned."""
    W, Wt = rows_tile.width, vt_tile.width
    assert W >= 32 and Wt >= 32 and W & (W - 1) == 0 and Wt & (Wt - 1) == 0, (rows_tile, vt_tile)
    # every stage starts 1024-aligned (the tiles are, SharedStorage): the XOR of a job's bits 4-6
    # commutes with adding the stage's address (transpose_v_block's unrolled form)
    assert rows_tile.stage_bytes % 1024 == 0 and vt_tile.stage_bytes % 1024 == 0, (rows_tile, vt_tile)
    for job in range(vt_jobs(hdimv, tile_n)):
        g, s = vt_job_coords(job, tile_n)
        load_x, load_y, store_x, store_y = vt_job_terms(g, s, rows_tile, vt_tile, first_group)
        for lane in range(32):
            load_base, store_base = vt_lane_bases(lane, rows_tile, vt_tile)
            key, chunk = vt_load_lane(lane)
            for stage in (0, 1):
                got = (load_base ^ load_x) + load_y + stage * rows_tile.stage_bytes
                assert got == rows_tile.offset(16 * g + key, 32 * s + chunk, stage) and got % 16 == 0, (job, lane)
                got = (store_base ^ store_x) + store_y + stage * vt_tile.stage_bytes
                assert got == vt_tile.offset(32 * s + vt_store_lane(lane), 16 * (g + first_group), stage) \
                    and got % 16 == 0, (job, lane)
    return True


def vt_warp_jobs(warp: int, num_warps: int, hdimv: int, tile_n: int, rows_tile: "ByteTile", vt_tile: "ByteTile",
                 first_group: int = 0) -> tuple:
    """Warp `warp`'s jobs (every num_warps-th from `warp`) as (g, s, load x, load y, store x, store
    y) (vt_job_terms), Python ints: the unrolled transposer's immediates."""
    coords = (vt_job_coords(job, tile_n) for job in range(warp, vt_jobs(hdimv, tile_n), num_warps))
    return tuple((g, s, *vt_job_terms(g, s, rows_tile, vt_tile, first_group)) for g, s in coords)


def vt_address(base, x: int, y: int):
    """A lane's row of a job, (base ^ x) + y, base the lane's base plus the stage's 1024-aligned
    address (so that the XOR of x's bits 4-6 may follow the add: vt_plan); x, y immediates."""
    addr = base ^ x if x else base
    return addr + y if y else addr


@dsl_user_op
def ldsm_x4_trans(addr, *, loc=None, ip=None) -> tuple:
    """ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 from the row at shared address `addr`
    (this lane's row of matrix lane / 8): the four 32-bit registers."""
    regs = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32()] * 4), [Int32(addr).ir_value(loc=loc, ip=ip)],
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,r",
        has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    )
    return tuple(Int32(llvm.extractvalue(T.i32(), regs, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def stsm_x4(addr, r0, r1, r2, r3, *, loc=None, ip=None):
    """stmatrix.sync.aligned.m8n8.x4.shared.b16 to the row at shared address `addr` (this lane's
    row of matrix lane / 8) of the four registers."""
    llvm.inline_asm(
        None, [Int32(x).ir_value(loc=loc, ip=ip) for x in (addr, r0, r1, r2, r3)],
        "stmatrix.sync.aligned.m8n8.x4.shared.b16 [$0], {$1, $2, $3, $4};", "r,r,r,r,r",
        has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    )


def _vt_load(g, s, load_base, store_base, rows_at, vt_at, rows_tile, vt_tile, first_group) -> tuple:
    """Job (g, s)'s ldmatrix (its four registers) and its stmatrix row address."""
    load_x, load_y, store_x, store_y = vt_job_terms(g, s, rows_tile, vt_tile, first_group)
    return ldsm_x4_trans((load_base ^ load_x) + (rows_at + load_y)), (store_base ^ store_x) + (vt_at + store_y)


@cute.jit
def _vt_next(g, s, num_warps: cutlass.Constexpr[int], groups: cutlass.Constexpr[int]):
    """The (g, s) of a warp's next job, num_warps jobs on (vt_job_coords, stepped: no division;
    groups >= num_warps, so one wrap at most)."""
    g += num_warps
    if g >= groups:
        g -= groups
        s += 1
    return g, s


def _vt_store(r, addr, sel_a, sel_b):
    """A job's permutes (keys into PV_KEY_ORDER) and stmatrix."""
    stsm_x4(addr, prmt(r[0], r[1], sel_a), prmt(r[0], r[1], sel_b), prmt(r[2], r[3], sel_a), prmt(r[2], r[3], sel_b))


def _vt_unrolled(load_at, store_at, sel_a, sel_b, jobs: tuple):
    """A warp's jobs (vt_warp_jobs) one after another, each job's ldmatrix issued before the
    previous one's permutes and stmatrix (plain Python: every job is traced)."""
    regs = ldsm_x4_trans(vt_address(load_at, *jobs[0][2:4]))
    for i, job in enumerate(jobs):
        cur = regs
        if i + 1 < len(jobs):
            regs = ldsm_x4_trans(vt_address(load_at, *jobs[i + 1][2:4]))
        _vt_store(cur, vt_address(store_at, *job[4:6]), sel_a, sel_b)


@cute.jit
def transpose_v_block(rows_addr, rows_tile: cutlass.Constexpr, rows_stage, vt_addr, vt_tile: cutlass.Constexpr,
                      vt_stage, warp, num_warps: cutlass.Constexpr[int], hdimv: cutlass.Constexpr[int],
                      tile_n: cutlass.Constexpr[int], first_group: cutlass.Constexpr[int] = 0,
                      pairs: cutlass.Constexpr[bool] = False, unroll: cutlass.Constexpr[bool] = False):
    """One V block or part of one: the (tile_n, hdim_v) e4m3 rows in stage `rows_stage` of the
    staging tile (`rows_tile`: its ByteTile, (keys, channels, stage), at shared address
    `rows_addr`) into stage `vt_stage` of V^T (`vt_tile`, (channels, keys, stage), at `vt_addr`)
    from 16-key group `first_group` on, keys in PV_KEY_ORDER. Warp `warp` of `num_warps` takes
    every num_warps-th job (the section's comment above); with `pairs` two at a time, both loads
    first (FwdConfig.fp8_vt_pairs). With `unroll` (FwdConfig.fp8_vt_unroll) each warp's jobs are
    unrolled with their address terms as immediates (vt_warp_jobs, one copy per warp), each job's
    ldmatrix issued before the previous job's permutes and stmatrix: a job is ldmatrix, stmatrix,
    four permutes and at most two XORs, where the loop spends ~30 instructions."""
    vt_plan(rows_tile, vt_tile, hdimv, tile_n, first_group)
    lane = cute.arch.lane_idx()
    load_base, store_base = vt_lane_bases(lane, rows_tile, vt_tile)
    sel_a, sel_b = vt_selectors(lane)
    rows_at = rows_addr + rows_stage * rows_tile.stage_bytes
    vt_at = vt_addr + vt_stage * vt_tile.stage_bytes
    groups = tile_n // VT_JOB_KEYS
    assert groups >= num_warps, (tile_n, num_warps)  # (one wrap a step below)
    if const_expr(unroll):
        load_at, store_at = load_base + rows_at, store_base + vt_at
        for w in cutlass.range_constexpr(num_warps):
            if warp == w:
                _vt_unrolled(load_at, store_at, sel_a, sel_b,
                             vt_warp_jobs(w, num_warps, hdimv, tile_n, rows_tile, vt_tile, first_group))
        return
    job = (load_base, store_base, rows_at, vt_at, rows_tile, vt_tile, first_group)
    g, s = warp, Int32(0)  # vt_job_coords of the warp's jobs, stepped (no division)
    if const_expr(pairs):
        n = (vt_jobs(hdimv, tile_n) - 1 - warp) // num_warps + 1  # this warp's jobs
        for _ in cutlass.range(n // 2, unroll=1):
            gb, sb = _vt_next(g, s, num_warps, groups)
            ra, at_a = _vt_load(g, s, *job)
            rb, at_b = _vt_load(gb, sb, *job)
            _vt_store(ra, at_a, sel_a, sel_b)
            _vt_store(rb, at_b, sel_a, sel_b)
            g, s = _vt_next(gb, sb, num_warps, groups)
        if n % 2 == 1:
            _vt_store(*_vt_load(g, s, *job), sel_a, sel_b)
    else:
        for _ in cutlass.range(warp, vt_jobs(hdimv, tile_n), num_warps, unroll=1):
            _vt_store(*_vt_load(g, s, *job), sel_a, sel_b)
            g, s = _vt_next(g, s, num_warps, groups)
