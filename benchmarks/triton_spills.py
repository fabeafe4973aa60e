"""Registers and spills of the backward kernels at the sm90 table tiles, without a GPU.

    python -m benchmarks.triton_spills              # one line per kernel x head dim x causal
    python -m benchmarks.triton_spills --unaligned  # without the launcher's specialization

Compiles to sm_90a PTX (as `compile_only`) and runs `ptxas -v` on it with triton's bundled
ptxas that accepts the PTX version (triton 3.9: `ptxas-blackwell`; the plain `ptxas` rejects
PTX 9.4). Registers and spill bytes are ptxas's own report: what the GPU will run.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton

from triton_fallback.bwd import attn_bwd, attn_bwd_dq
from benchmarks.triton_compile_only import compile_variant
from triton_fallback.configs import TUNED

_KERNELS = (("bwd", attn_bwd, dict(ATOMIC_DQ=True)), ("bwd_dkdv", attn_bwd, {}),
            ("bwd_dq", attn_bwd_dq, {}))


def _ptxas() -> str:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bin_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(bin_dir)


def ptxas_report(ptx: str, arch: str = "sm_90a") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True,
                             check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                       out).groups())
    return dict(regs=regs, spill_stores=stores, spill_loads=loads)


def measure(kernel: str, d: int, causal: bool, tile=None, aligned: bool = True) -> dict:
    fn, extra = next((f, e) for k, f, e in _KERNELS if k == kernel)
    t = tile or TUNED[("sm90", kernel, d, "bfloat16", causal)]
    const = dict(HEADDIM=d, HEADDIM_V=d, HAS_WR=causal, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                 **extra)
    compiled = compile_variant(fn, 90, "bf16", const, t.num_warps, t.num_stages, aligned)
    return dict(tile=t, **ptxas_report(compiled.asm["ptx"]))


def main():
    import sys
    aligned = "--unaligned" not in sys.argv
    for kernel, _, _ in _KERNELS:
        for d in (64, 128):
            for causal in (False, True):
                r = measure(kernel, d, causal, aligned=aligned)
                t = r["tile"]
                print(f"{kernel:8s} d{d:<3d} causal={causal!s:5s} {t.block_m}x{t.block_n} "
                      f"w{t.num_warps} s{t.num_stages}: {r['regs']} regs, "
                      f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads",
                      flush=True)


if __name__ == "__main__":
    main()
