"""Compile the FP8 kernels (prep pass, FP8 forward) for GPU targets without a GPU.

    python -m benchmarks.triton_fp8_compile_only    # one line per compiled variant

As `triton_fallback.compile_only`: catches what the interpreter lets through. Run with
TRITON_INTERPRET unset.
"""

from __future__ import annotations

import collections
import json
import os
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from triton_fallback.fp8_fwd import attn_fwd_fp8
from triton_fallback.fp8_prep import fp8_prep

_FLOATS = ("c", "softcap_scale", "softcap_log2")
_PTRS = {"X": "*bf16", "R": "*bf16", "OUT": "*u8", "SCALE": "*fp32", "CH": "*i32", "QS": "*fp32",
         "KS": "*fp32", "VS": "*fp32", "O": "*bf16", "LSE": "*fp32", "VT": "*fp8e4nv"}

_PREP = dict(DOT_F32=False, ROTATE=True, MODE=0, TRANSPOSED=False, PV_ORDER=False, STAGES=2, NATIVE_E4M3=False)
_FWD = dict(HAS_WL=False, HAS_WR=False, SOFTCAP=False, V_BLOCK=True, SCALE_M=128, SCALE_N=128)
# (kernel, arch, q/k element type, constexprs, num_warps)
VARIANTS = [
    (fp8_prep, 80, None, dict(_PREP, HEADDIM=128, BLOCK_D=128, N_HAD=128, BLOCK=128, ROWS=128, GROUPS=1), 8),
    (fp8_prep, 90, None, dict(_PREP, HEADDIM=96, BLOCK_D=128, N_HAD=32, BLOCK=1, ROWS=16, GROUPS=16), 4),
    (fp8_prep, 90, None, dict(_PREP, HEADDIM=256, BLOCK_D=256, N_HAD=128, BLOCK=128, ROWS=128, GROUPS=1), 8),
    # sm89+: the hardware's e4m3 conversion (the default there; FA3PY_FP8_PREP_NATIVE=0: integer)
    (fp8_prep, 90, None, dict(_PREP, HEADDIM=256, BLOCK_D=256, N_HAD=128, BLOCK=128, ROWS=128, GROUPS=1,
                              NATIVE_E4M3=True, STAGES=1), 8),
    (fp8_prep, 90, None, dict(_PREP, HEADDIM=128, BLOCK_D=128, N_HAD=128, BLOCK=128, ROWS=128, GROUPS=1,
                              ROTATE=False, MODE=1, STAGES=1), 4),
    (fp8_prep, 90, None, dict(_PREP, HEADDIM=128, BLOCK_D=128, N_HAD=128, BLOCK=128, ROWS=128, GROUPS=1,
                              ROTATE=False, MODE=2, STAGES=1), 4),
    # V^T stored transposed in registers (coalesced), in the PV key order; channel and block scales
    (fp8_prep, 90, None, dict(_PREP, HEADDIM=128, BLOCK_D=128, N_HAD=128, BLOCK=128, ROWS=128, GROUPS=1,
                              ROTATE=False, MODE=2, TRANSPOSED=True, PV_ORDER=True, STAGES=1), 4),
    (fp8_prep, 90, None, dict(_PREP, HEADDIM=64, BLOCK_D=64, N_HAD=64, BLOCK=224, ROWS=256, GROUPS=1,
                              ROTATE=False, MODE=0, TRANSPOSED=True, PV_ORDER=True, STAGES=1), 4),
    # FA3's float8 V transposed (codes copied)
    (fp8_prep, 90, None, dict(_PREP, HEADDIM=256, BLOCK_D=256, N_HAD=1, BLOCK=128, ROWS=128, GROUPS=1,
                              ROTATE=False, MODE=3, TRANSPOSED=True, PV_ORDER=True, STAGES=1), 4),
    (attn_fwd_fp8, 89, "fp8e4nv", dict(_FWD, HEADDIM=128, HEADDIM_V=128, BLOCK_D=128, BLOCK_DV=128,
                                       HAS_WR=True, BLOCK_M=64, BLOCK_N=64), 4),
    (attn_fwd_fp8, 90, "fp8e4nv", dict(_FWD, HEADDIM=64, HEADDIM_V=64, BLOCK_D=64, BLOCK_DV=64,
                                       SOFTCAP=True, V_BLOCK=False, BLOCK_M=64, BLOCK_N=64), 4),
    (attn_fwd_fp8, 90, "i8", dict(_FWD, HEADDIM=128, HEADDIM_V=128, BLOCK_D=128, BLOCK_DV=128, SCALE_M=1,
                                  HAS_WL=True, HAS_WR=True, BLOCK_M=64, BLOCK_N=64), 4),
]


def _as_at_runtime(fn, const):
    """The prep's launch as Triton's launcher specializes it on a GPU: the stride the output
    rows or V^T's keys run along is 1 (a constexpr), every pointer, the other strides and V^T's
    row length (a multiple of VT_ALIGN) divisible by 16. Without this the compiled code cannot
    vectorize and says nothing about the real one's memory accesses."""
    if fn is not fp8_prep:
        return const, set()
    one = "stride_os" if const.get("TRANSPOSED") else "stride_od"
    div16 = {n for n in fn.arg_names if n.startswith("stride_") or n in _PTRS or n == "X"} - {one}
    if const.get("TRANSPOSED"):
        div16.add("s_out")
    return dict(const, **{one: 1}), div16


def compile_variant(fn, arch, elem, const, num_warps):
    const, div16 = _as_at_runtime(fn, const)
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in ("Q", "K"):
            sig[name] = f"*{elem}"
        elif name == "X" and const.get("MODE") == 3:
            sig[name] = "*u8"  # float8 codes
        elif name in _PTRS:
            sig[name] = _PTRS[name]
        else:
            sig[name] = "fp32" if name in _FLOATS else "i32"
    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16 if n not in const}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=2))


def memory_ops(ptx: str) -> dict:
    """Counts of the PTX's global stores and loads by width, async copies to shared memory, and
    e4m3 conversions: `st.global.b8` in a prep pass means a byte per access (uncoalesced)."""
    ops = re.findall(r"(st\.global(?:\.v\d)?\.b\d+|ld\.global(?:\.v\d)?\.b\d+|cp\.async\.c[ag]\.shared\.global|"
                     r"cvt\.rn\.satfinite\.e4m3x2\.f32)", ptx)
    return dict(collections.Counter(ops))


def main():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET to compile"
    for fn, arch, elem, const, warps in VARIANTS:
        kernel = compile_variant(fn, arch, elem, const, warps)
        ops = json.dumps(memory_ops(kernel.asm["ptx"]), sort_keys=True) if fn is fp8_prep else ""
        print(f"sm{arch} {fn.__name__} {elem or ''}: {kernel.metadata.shared} B shared {ops}", flush=True)


if __name__ == "__main__":
    main()
