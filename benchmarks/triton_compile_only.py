"""Compile the kernels for a GPU target without a GPU (no tensors; ptxas only).

    python -m benchmarks.triton_compile_only        # prints one line per compiled variant

Catches what the interpreter lets through (non-constexpr globals, type mismatches between
branches, unsupported ops on a target, shared-memory overflow). Must run with
TRITON_INTERPRET unset: the kernels pick compiled vs. interpreted code when decorated.
"""

from __future__ import annotations

import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cute_kernels.combine import combine_kernel
from triton_fallback.bwd import attn_bwd, attn_bwd_dq, attn_bwd_dq_epilogue, attn_bwd_preprocess
from triton_fallback.fwd import attn_fwd

_FLOAT_ARGS = ("softmax_scale", "softcap")
_INT_PTRS = ("CU_SEQLENS_Q", "CU_SEQLENS_K", "SEQUSED_Q", "SEQUSED_K")
_F32_PTRS = ("LSE", "LSE2", "DELTA", "DQ_ACC", "Q_DESCALE", "K_DESCALE", "V_DESCALE", "OP", "LP", "LO")

_FEATURES = dict(PACKED_Q=False, PACKED_K=False, HAS_SEQUSED_Q=False, HAS_SEQUSED_K=False,
                 HAS_WL=False, HAS_WR=False, HAS_CHUNK=False, SOFTCAP=False)
# (kernel, arch, element type, constexprs, num_warps, num_stages)
_D64, _D96, _D128 = (dict(HEADDIM=d, HEADDIM_V=d) for d in (64, 96, 128))
_ALL_VARLEN = dict(HAS_WL=True, HAS_WR=True, HAS_CHUNK=True, SOFTCAP=True, PACKED_Q=True, PACKED_K=True,
                   HAS_SEQUSED_Q=True, HAS_SEQUSED_K=True)
VARIANTS = [
    (attn_fwd, 80, "fp16", dict(**_D128, HAS_WR=True, BLOCK_M=128, BLOCK_N=64), 8, 3),
    (attn_fwd, 80, "bf16", dict(HEADDIM=80, HEADDIM_V=80, **_ALL_VARLEN, BLOCK_M=64, BLOCK_N=64),
     4, 2),
    (attn_fwd, 86, "bf16", dict(HEADDIM=256, HEADDIM_V=256, BLOCK_M=64, BLOCK_N=32), 8, 1),
    (attn_fwd, 89, "fp8e4nv", dict(**_D128, HAS_WR=True, HAS_DESCALE=True, BLOCK_M=128, BLOCK_N=64),
     8, 2),
    (attn_fwd, 80, "u8", dict(**_D64, HAS_DESCALE=True, FP8_DEQUANT=True, BLOCK_M=128, BLOCK_N=64),
     4, 2),
    (attn_fwd, 90, "fp8e4nv", dict(**_D128, HAS_DESCALE=True, BLOCK_M=128, BLOCK_N=64), 8, 2),
    (attn_fwd, 90, "bf16", dict(**_D128, HAS_WR=True, BLOCK_M=128, BLOCK_N=64), 8, 2),
    (attn_fwd, 90, "bf16", dict(HEADDIM=64, HEADDIM_V=256, HAS_QV=True, HAS_CHUNK=True, BLOCK_M=64,
     BLOCK_N=64), 4, 2),  # MLA's qv
    (attn_bwd_preprocess, 80, "bf16", dict(HEADDIM=80, HEADDIM_V=96, PACKED_Q=True,
     HAS_SEQUSED_Q=True, ZERO_DQ_ACC=True, BLOCK_M=64), 4, 1),
    # attn_bwd: the default (ATOMIC_DQ) at the sm80/sm90 table tiles, then deterministic ones
    (attn_bwd, 80, "bf16", dict(**_D64, ATOMIC_DQ=True, BLOCK_M=64, BLOCK_N=128), 8, 2),
    (attn_bwd, 80, "fp16", dict(**_D128, HAS_WR=True, ATOMIC_DQ=True, BLOCK_M=32, BLOCK_N=64),
     8, 2),
    (attn_bwd, 86, "bf16", dict(HEADDIM=80, HEADDIM_V=48, **_ALL_VARLEN, ATOMIC_DQ=True,
     BLOCK_M=32, BLOCK_N=64), 4, 1),
    (attn_bwd, 90, "bf16", dict(**_D64, ATOMIC_DQ=True, BLOCK_M=64, BLOCK_N=64), 4, 3),
    (attn_bwd, 90, "bf16", dict(**_D128, ATOMIC_DQ=True, BLOCK_M=32, BLOCK_N=64), 8, 2),
    (attn_bwd, 90, "bf16", dict(**_D128, HAS_WR=True, SOFTCAP=True, ATOMIC_DQ=True, BLOCK_M=32,
     BLOCK_N=64), 8, 2),
    (attn_bwd, 90, "bf16", dict(HEADDIM=256, HEADDIM_V=256, ATOMIC_DQ=True, BLOCK_M=16,
     BLOCK_N=64), 8, 1),
    (attn_bwd, 80, "bf16", dict(HEADDIM=64, HEADDIM_V=128, HAS_WR=True, BLOCK_M=32, BLOCK_N=128),
     8, 2),
    (attn_bwd, 86, "fp16", dict(**_D96, **_ALL_VARLEN, BLOCK_M=32, BLOCK_N=64), 4, 1),
    (attn_bwd, 90, "bf16", dict(**_D128, HAS_WR=True, BLOCK_M=64, BLOCK_N=128), 8, 2),
    (attn_bwd_dq_epilogue, 90, "bf16", dict(HEADDIM=96, PACKED_Q=True, HAS_SEQUSED_Q=True,
     BLOCK_M=64), 4, 1),
    (attn_bwd_dq, 80, "bf16", dict(HEADDIM=64, HEADDIM_V=128, HAS_WR=True, BLOCK_M=128, BLOCK_N=32),
     8, 2),
    (attn_bwd_dq, 86, "fp16", dict(**_D96, **_ALL_VARLEN, BLOCK_M=64, BLOCK_N=32), 4, 1),
    # split-KV's combine (cute_kernels.combine, sm90)
    (combine_kernel, 90, "bf16", dict(DV=128, BLOCK_D=64, BLOCK_S=32), 4, 1),
    (combine_kernel, 90, "fp16", dict(DV=96, BLOCK_D=64, BLOCK_S=8), 4, 1),
]


def _signature(fn, elem: str, const: dict) -> dict:
    out_elem = "bf16" if elem in ("fp8e4nv", "u8") else elem
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in _INT_PTRS:
            sig[name] = "*i32"
        elif name in _F32_PTRS:
            sig[name] = "*fp32"
        elif name in ("O", "DO", "DQ", "DK", "DV", "Out"):
            sig[name] = f"*{out_elem}"
        elif name.isupper():
            sig[name] = f"*{elem}"
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


# Integer arguments that are not multiples of 16 in a typical launch (-1: no window; any chunk).
_UNALIGNED_INTS = ("window_left", "window_right", "chunk")


def compile_variant(fn, arch: int, elem: str, const: dict, num_warps: int, num_stages: int,
                    aligned: bool = False):
    """aligned=False: no specialization (every pointer and integer may be odd). aligned=True:
    what a typical launch compiles (16-byte aligned pointers, integers multiples of 16 except
    the window bounds, heads_per_program == 1), as triton's launcher specializes them: the
    spill numbers of `benchmarks.triton_spills` need it, since unaligned pointers turn every
    tile load into per-element loads, each with its own 64-bit address."""
    const = dict(const)
    if aligned and "heads_per_program" in fn.arg_names:
        const.setdefault("heads_per_program", 1)
    names = fn.arg_names
    for name, value in _FEATURES.items():
        if name in names:
            const.setdefault(name, value)
    for name in ("HAS_DESCALE", "FP8_DEQUANT", "HAS_QV", "ATOMIC_DQ", "ZERO_DQ_ACC"):
        if name in names:
            const.setdefault(name, False)
    for dim, block in (("HEADDIM", "BLOCK_D"), ("HEADDIM_V", "BLOCK_DV")):
        if dim in const and block in names:
            const[block] = max(16, triton.next_power_of_2(const[dim]))
    sig = _signature(fn, elem, const)
    attrs = {}
    if aligned:
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items()
                 if t != "constexpr" and not t.startswith("fp") and k not in _UNALIGNED_INTS}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def main():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET to compile"
    for fn, arch, elem, const, warps, stages in VARIANTS:
        kernel = compile_variant(fn, arch, elem, const, warps, stages)
        flags = " ".join(f"{k}={v}" for k, v in const.items() if v is not False)
        print(f"sm{arch} {fn.__name__} {elem} {flags}: {kernel.metadata.shared} B shared")


if __name__ == "__main__":
    main()
