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

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

# Key k of a 16-key group sits at position i of the k index where PV_KEY_ORDER[i] == k.
PV_KEY_ORDER = tuple(2 * (i // 4) + i % 2 + 8 * ((i % 4) // 2) for i in range(16))
# A register 2r / 2r + 1 of a group of 8 accumulator values: these four, lowest byte first.
REGISTER_ORDER = (0, 1, 4, 5, 2, 3, 6, 7)
# FP8 WGMMA's k per instruction: the KV tile and hdim must be multiples of it.
K_PER_MMA = 32


def key_order(seqlen: int):
    """The position of every key in V's transposed FP8 layout: for each 16-key group, its keys
    in PV_KEY_ORDER (a list of length seqlen rounded up to 16; entries >= seqlen are padding)."""
    padded = -(-seqlen // 16) * 16
    return [g + PV_KEY_ORDER[i] for g in range(0, padded, 16) for i in range(16)]


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
