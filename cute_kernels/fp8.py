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
    even, saturating to +-448 (NaN stays NaN)."""
    args = [Float32(x).ir_value(loc=loc, ip=ip) for x in (a, b, c, d)]
    return Int32(llvm.inline_asm(
        T.i32(), args,
        "{ .reg .b16 lo, hi;\n"
        "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
        "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
        "mov.b32 $0, {lo, hi}; }",
        "=r,f,f,f,f", has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
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

    The score multiplier of a row in KV block n is sq[row] * sk[n] * c. Scales are powers of two,
    so (sq * c) * sk is the emulation's (sq * sk) * c exactly."""

    q_row_c: cute.Tensor  # (rows of this thread,) sq[row] * c
    mK_scale: cute.Tensor  # (KV blocks,) of this (batch, KV head); descales: (1,)
    mV_scale: cute.Tensor  # (KV blocks,) block V scaling; (hdim_v,) channel; descales: (1,)
    v_pending: cute.Tensor  # (1,) the V scale of the block whose P is in the PV operand
    # FA3's descales in place of the format's scale tensors (FwdConfig.fp8_descales): one value
    # per (sequence, head) for every block of rows, every KV block and every V channel
    descales: bool = False

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
        return Fp8Scales(q_row_c, mK_scale, mV_scale, v_pending, descales)

    @cute.jit
    def row_mult(self, n_block) -> cute.Tensor:
        """The score multiplier of each of this thread's rows in KV block n_block."""
        sk = self.mK_scale[0 if const_expr(self.descales) else n_block]
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
    def set_pending_v(self, n_block):
        """P of KV block n_block now fills the PV operand: its V scale goes with it."""
        self.v_pending[0] = self.mV_scale[0 if const_expr(self.descales) else n_block]

    @cute.jit
    def scale_channels(self, acc_O: cute.Tensor, tiled_mma_pv: cute.TiledMma, tidx, tile_m: cutlass.Constexpr[int],
                       hdimv: cutlass.Constexpr[int]):
        """O's columns times their V channel scales (channel V scaling, in the epilogue)."""
        from cute_kernels.utils import acc_to_mn

        tOcO = acc_to_mn(tiled_mma_pv.get_slice(tidx).partition_C(cute.make_identity_tensor((tile_m, hdimv))))
        o_mn = acc_to_mn(acc_O)
        for j in cutlass.range_constexpr(cute.size(o_mn.shape[1])):
            sv = self.mV_scale[0 if const_expr(self.descales) else tOcO[0, j][1]]
            for r in cutlass.range_constexpr(cute.size(o_mn.shape[0])):
                o_mn[r, j] = o_mn[r, j] * sv


# ----------------------------------------------------------------------------- V in rows (fp8_v_rows)
# FA3's float8 v is (keys, hdim_v) in rows, but FP8 WGMMA reads V^T K-major. With fp8_v_rows the
# producer warp TMAs V's rows into a staging tile and the producer warpgroup's other warps write
# each block transposed into the V^T tile the consumers read, with the keys of every 16-key group
# in PV_KEY_ORDER, as the FP8 prep writes V^T in memory. The unit of work is 4 keys x 4 channels:
# four 32-bit loads (one a key: 4 consecutive channels), eight byte permutes, four 32-bit stores
# (one a channel: the 4 keys PV_KEY_ORDER puts in one word). A job is one such unit per lane;
# jobs are numbered (channel slab D of 32, quad kq of 16-key groups, pass p of 4):
#   lane bits 0-1: t, the word of the group (keys 2t, 2t+1, 2t+8, 2t+9 of it: PV_KEY_ORDER)
#   lane bits 2-4: the channel word d4 = 8 D + lane bits 2-4 (channels 4 d4 .. 4 d4 + 3)
#   group g = 4 kq + (lane bits 3-4 XOR p)
# so that where both tiles have the 128-byte swizzle (hdim_v and tile_n multiples of 128) the 32
# lanes of one load (rows 16 g + 2 t + {0, 1, 8, 9}, one word of channels) and of one store (row
# 4 d4 + c of V^T, one word of keys) each hit 32 different banks; the narrower swizzles of other
# tiles share a bank between up to 4 lanes (hdim 128's 224-key V^T rows, hdim 96; 2 at hdim 64 and
# 256 x 64). tests/test_cute_fp8.py runs the jobs lane by lane with the tiles' own layouts.
VT_JOB_CHANNELS = 32
VT_JOB_GROUPS = 4
VT_PASSES = 4
VT_ROW_OFFSETS = (0, 1, 8, 9)  # keys of a word relative to 2t: PV_KEY_ORDER[4t:4t+4] - 2t
assert VT_ROW_OFFSETS[2:] == tuple(o + 8 for o in VT_ROW_OFFSETS[:2])  # (transpose_v_block's two offsets)


def vt_jobs(hdimv: int, tile_n: int) -> int:
    """Jobs of 32 lanes that transpose one (tile_n, hdim_v) V block."""
    assert hdimv % VT_JOB_CHANNELS == 0 and tile_n % 16 == 0, (hdimv, tile_n)
    return hdimv // VT_JOB_CHANNELS * vt_quads(tile_n) * VT_PASSES


def vt_quads(tile_n: int) -> int:
    return -(-(tile_n // 16) // VT_JOB_GROUPS)


def _lane_coords(lane):
    """(t, l, gl) of a lane: its key word of a 16-key group, its channel word in a 32-channel slab,
    its group in a quad of groups (the lane bits above)."""
    return lane & 3, (lane >> 2) & 7, (lane >> 3) & 3


def vt_job_coords(job, lane, tile_n: int):
    """(g, t, d4) of `lane` in `job` (Python ints or DSL Int32 alike): the 16-key group, the
    key word of the group and the channel word; the lane works only where g < tile_n / 16."""
    p = job % VT_PASSES
    rest = job // VT_PASSES
    quads = vt_quads(tile_n)
    kq, slab = rest % quads, rest // quads
    t, l, gl = _lane_coords(lane)
    return kq * VT_JOB_GROUPS + (gl ^ p), t, slab * (VT_JOB_CHANNELS // 4) + l


def byte_transpose4(w0, w1, w2, w3, prmt):
    """Four 32-bit words (byte c of word i: element (i, c)) -> four words (byte i of word c:
    element (i, c)), by eight byte permutes `prmt(a, b, selector)` (PTX prmt.b32)."""
    lo01, lo23 = prmt(w0, w1, 0x5140), prmt(w2, w3, 0x5140)  # bytes 0, 1 of each, interleaved
    hi01, hi23 = prmt(w0, w1, 0x7362), prmt(w2, w3, 0x7362)  # bytes 2, 3
    return (prmt(lo01, lo23, 0x5410), prmt(lo01, lo23, 0x7632),
            prmt(hi01, hi23, 0x5410), prmt(hi01, hi23, 0x7632))


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
def prmt(a, b, selector: int, *, loc=None, ip=None) -> Int32:
    """prmt.b32 with a constant selector (no side effects: the compiler may schedule it)."""
    return Int32(llvm.inline_asm(
        T.i32(), [Int32(a).ir_value(loc=loc, ip=ip), Int32(b).ir_value(loc=loc, ip=ip)],
        f"prmt.b32 $0, $1, $2, {selector:#x};", "=r,r,r",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
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


# The jobs' addresses as the transposing warps compute them: per lane, a load base and one or two
# store bases (computed per block); per job, a few warp-uniform values (the uniform datapath);
# per access a compile-time XOR and immediate. The swizzle (offset ^ ((offset >> 7) & mask) << 4)
# is linear over GF(2): an offset whose low bits are the OR of a lane part and a job part
# swizzles to the XOR of their swizzles, and parts that are multiples of 8 row widths (16-key
# groups, column atoms, stages) are above the swizzle's source bits and add. So a job's access
# is (lane base ^ uniform x ^ constant) + uniform y + immediate: one LOP3 per XOR group (2
# for the loads, 1 for the stores where the channels differ by immediates) besides the job's
# 4 LDS, 8 PRMT and 4 STS, where the closed-form ByteTile.offset spent ~60 integer
# instructions a job and the transpose could not keep up with the FP8 GEMMs (H100, hdim 128,
# 16k tokens: 496 TFLOP/s against 865 with V transposed ahead). `vt_plan` derives the
# constants and checks every address of every job, lane and stage at trace time.
def vt_lane_bases(lane, rows_tile: "ByteTile", vt_tile: "ByteTile") -> tuple:
    """The lane's (load base, store base, store base XOR the second one) in bytes, stage 0
    (Python ints or DSL Int32); the second store base (a lane's group moved across V^T's column
    atoms by the pass's bit 1, where an atom holds 2 groups) is the first where it has none."""
    t, l, gl = _lane_coords(lane)
    store0 = vt_tile.offset(4 * l, 16 * gl + 4 * t, 0)
    store1 = vt_tile.offset(4 * l, 16 * (gl ^ 2) + 4 * t, 0) if vt_tile.width == 32 else store0
    return rows_tile.offset(16 * gl + 2 * t, 4 * l, 0), store0, store0 ^ store1


def vt_job_terms(unit, p: int, rows_tile: "ByteTile", vt_tile: "ByteTile", tile_n: int) -> tuple:
    """The terms of job 4 unit + p (unit: its channel slab and quad of 16-key groups; p: its
    pass): (groups_left, load x, load y, store base select mask, store x, store y), y without the
    stage; `unit` and `p` Python ints or warp-uniform DSL Int32."""
    W, Wt = rows_tile.width, vt_tile.width
    gW = Wt // 16  # 16-key groups per V^T column atom
    quads = vt_quads(tile_n)
    if quads & (quads - 1) == 0:  # (shifts: the unit index is a signed Int32 in the kernel)
        kq, slab = unit & (quads - 1), unit >> (quads.bit_length() - 1)
    else:
        kq, slab = unit % quads, unit // quads
    load_x = ((slab * 32) & (W - 1)) ^ (16 * W * p)
    load_y = 64 * W * kq + ((slab * 32) >> (W.bit_length() - 1)) * (rows_tile.rows * W)
    select = -((p >> 1) & 1) if gW == 2 else 0
    store_x = 16 * (((kq * 4) & (gW - 1)) | (p & (gW - 1)))
    store_y = 32 * Wt * slab + ((kq * 4) >> (gW.bit_length() - 1)) * (vt_tile.rows * Wt)
    return tile_n // 16 - 4 * kq, load_x, load_y, select, store_x, store_y


def _groups(accesses, values) -> tuple:
    """accesses: [(xor constant, immediate)]; values(xor) -> the list of (base ^ x ^ xor) over
    every lane and job. Accesses whose values differ from an earlier group's by one constant
    share its XOR: ((xor constants of the groups), ((group, immediate) per access))."""
    groups, out = [], []
    for xor, imm in accesses:
        mine = values(xor)
        for i, g in enumerate(groups):
            deltas = {a - b for a, b in zip(mine, values(g))}
            if len(deltas) == 1:
                out.append((i, imm + deltas.pop()))
                break
        else:
            groups.append(xor)
            out.append((len(groups) - 1, imm))
    return tuple(groups), tuple(out)


@functools.lru_cache(maxsize=64)
def vt_plan(rows_tile: "ByteTile", vt_tile: "ByteTile", hdimv: int, tile_n: int) -> tuple:
    """(load groups, loads, store groups, stores): the XOR constants of the loads' and the stores'
    groups, and per access (its group, its immediate): access = (base ^ job x ^ group constant)
    + job y + stage + immediate. Checked against vt_job_coords and the tiles' offsets for every
    lane, job, access and both stages."""
    W, Wt = rows_tile.width, vt_tile.width
    assert W >= 32 and Wt >= 32 and W & (W - 1) == 0 and Wt & (Wt - 1) == 0, (rows_tile, vt_tile)
    lanes = [vt_lane_bases(lane, rows_tile, vt_tile) for lane in range(32)]
    terms = [vt_job_terms(j // VT_PASSES, j % VT_PASSES, rows_tile, vt_tile, tile_n)
             for j in range(vt_jobs(hdimv, tile_n))]
    active = [(lane, j) for lane in range(32) for j, tm in enumerate(terms)
              if (_lane_coords(lane)[2] ^ (j % VT_PASSES)) < tm[0]]
    # (the kernel's idle-lane test: exactly the lanes whose 16-key group lies in the tile)
    assert active == [(lane, j) for lane in range(32) for j in range(len(terms))
                      if vt_job_coords(j, lane, tile_n)[0] < tile_n // 16]
    store_base = lambda lane, tm: lanes[lane][1] ^ (lanes[lane][2] & tm[3])
    load_groups, loads = _groups(
        [(rows_tile.offset(o & 7, 0, 0), 8 * W * (o >> 3)) for o in VT_ROW_OFFSETS],
        lambda xor: [lanes[lane][0] ^ terms[j][1] ^ xor for lane, j in active])
    store_groups, stores = _groups(
        [(vt_tile.offset(c, 0, 0), 0) for c in range(4)],
        lambda xor: [store_base(lane, terms[j]) ^ terms[j][4] ^ xor for lane, j in active])
    for lane, j in active:
        g, t, d4 = vt_job_coords(j, lane, tile_n)
        tm = terms[j]
        for stage in (0, 1):
            for (group, imm), o in zip(loads, VT_ROW_OFFSETS):
                got = (lanes[lane][0] ^ tm[1] ^ load_groups[group]) + tm[2] + stage * rows_tile.stage_bytes + imm
                assert got == rows_tile.offset(16 * g + 2 * t + o, 4 * d4, stage), (j, lane, o)
            for c, (group, imm) in enumerate(stores):
                got = (store_base(lane, tm) ^ tm[4] ^ store_groups[group]) + tm[5] + stage * vt_tile.stage_bytes + imm
                assert got == vt_tile.offset(4 * d4 + c, 16 * g + 4 * t, stage), (j, lane, c)
    return load_groups, loads, store_groups, stores


@dsl_user_op
def ld_shared_b32(addr, imm: int, *, loc=None, ip=None) -> Int32:
    """ld.shared.b32 at shared address `addr` + `imm` (ordered with the other volatile asm: the
    barrier waits)."""
    return Int32(llvm.inline_asm(
        T.i32(), [Int32(addr).ir_value(loc=loc, ip=ip)], f"ld.shared.b32 $0, [$1+{imm}];", "=r,r",
        has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    ))


@dsl_user_op
def st_shared_b32(addr, imm: int, value, *, loc=None, ip=None):
    """st.shared.b32 of `value` at shared address `addr` + `imm`."""
    llvm.inline_asm(
        None, [Int32(addr).ir_value(loc=loc, ip=ip), Int32(value).ir_value(loc=loc, ip=ip)],
        f"st.shared.b32 [$0+{imm}], $1;", "r,r",
        has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT,
    )


@cute.jit
def transpose_v_block(rows_addr, rows_tile: cutlass.Constexpr, rows_stage, vt_addr, vt_tile: cutlass.Constexpr,
                      vt_stage, warp, num_warps: cutlass.Constexpr[int], hdimv: cutlass.Constexpr[int],
                      tile_n: cutlass.Constexpr[int]):
    """One V block: the (tile_n, hdim_v) e4m3 rows in stage `rows_stage` of the staging tile
    (`rows_tile`: its ByteTile, (keys, channels, stage), at shared address `rows_addr`) into stage
    `vt_stage` of V^T (`vt_tile`, (channels, keys, stage), at `vt_addr`), keys in PV_KEY_ORDER.
    Warp `warp` of `num_warps` takes every num_warps-th job, its addresses by `vt_plan`."""
    load_groups, loads, store_groups, stores = vt_plan(rows_tile, vt_tile, hdimv, tile_n)
    lane = cute.arch.lane_idx()
    gl = _lane_coords(lane)[2]
    load_base, store_base, store_swap = vt_lane_bases(lane, rows_tile, vt_tile)
    rows_at = rows_addr + rows_stage * rows_tile.stage_bytes
    vt_at = vt_addr + vt_stage * vt_tile.stage_bytes
    # (one job an iteration: with 2 or 4 passes unrolled, ptxas moved the consumers' tile
    # arithmetic from the uniform datapath to vector registers and they spilled, causal hdim 128)
    for job in cutlass.range(warp, vt_jobs(hdimv, tile_n), num_warps, unroll=1):
        p = job & (VT_PASSES - 1)
        groups_left, load_x, load_y, select, store_x, store_y = vt_job_terms(job >> 2, p, rows_tile, vt_tile, tile_n)
        load_y = rows_at + load_y  # (warp-uniform)
        store_y = vt_at + store_y
        if (gl ^ p) < groups_left:
            load_at = [load_base ^ load_x ^ xor for xor in load_groups]
            words = [ld_shared_b32(load_at[g] + load_y, imm) for g, imm in loads]
            out = byte_transpose4(*words, prmt)
            base = store_base ^ (store_swap & select) if const_expr(vt_tile.width == 32) else store_base
            store_at = [base ^ store_x ^ xor for xor in store_groups]
            for c in cutlass.range_constexpr(4):
                g, imm = stores[c]
                st_shared_b32(store_at[g] + store_y, imm, out[c])
