"""Tune and benchmark the Triton kernels on the local GPU.

    python -m benchmarks.triton_tune            # autotune, print `configs.TUNED` entries to paste
    python -m benchmarks.triton_tune --bench    # ms and TFLOP/s, table/autotuned configs vs. SDPA
    python -m benchmarks.triton_tune --tune --bench --dims 128 --atomic-max 128
                                              # tune, then time the tuned picks (one process)
    python -m benchmarks.triton_tune --dims 64 --causal true --kernels bwd --seqlen 2048
                                              # one kernel at one shape (minutes, not tens)

Shapes: 16 heads, 16k tokens (batch 4 x seqlen 4096 by default: 2 * batch * heads * seqlen * d
elements of K/V exceed L2 on every target GPU, so the timings are not cache-resident).
"""

from __future__ import annotations

import argparse

import torch
import triton

from benchmarks import need
from benchmarks.flops import flops
from fa3py.request import AttentionParams, AttentionRequest

from triton_fallback import configs, ops

HEADS, TOKENS, SEQLEN = 16, 16384, 4096


def request_flops(req: AttentionRequest, backward: bool = False) -> float:
    """benchmarks.flops for a request (x2.5 for the backward)."""
    p = req.params
    return flops(req.batch, req.nheads, req.q.shape[1], req.k.shape[1], req.headdim, req.headdim_v,
                 window=(p.window_left, p.window_right), mode="bwd" if backward else "fwd")


def make(d: int, dtype: torch.dtype, causal: bool, deterministic: bool = False,
         seqlen: int = SEQLEN) -> AttentionRequest:
    batch = max(TOKENS // seqlen, 1)
    q, k, v = (torch.randn(batch, seqlen, HEADS, d, device="cuda", dtype=dtype) for _ in range(3))
    return AttentionRequest(q, k, v, AttentionParams(d ** -0.5, window_right=0 if causal else -1,
                                                     deterministic=deterministic))


def report(name: str, req: AttentionRequest, fn, backward: bool = False):
    ms = triton.testing.do_bench(fn)
    print(f"{name:<44} {ms:8.3f} ms {request_flops(req, backward) / ms * 1e-9:8.1f} TFLOP/s")


def bench(dims, dtypes, causals, seqlen=SEQLEN):
    for d in dims:
        for dtype in dtypes:
            for causal in causals:
                req = make(d, dtype, causal, seqlen=seqlen)
                tag = f"d={d} {str(dtype)[6:]} causal={causal}"
                out, lse = ops.forward(req)
                dout = torch.randn_like(out)
                report(f"triton fwd {tag}", req, lambda: ops.forward(req))
                report(f"triton bwd {tag}", req, lambda: ops.backward(req, out, lse, dout), True)
                det = make(d, dtype, causal, deterministic=True, seqlen=seqlen)
                report(f"triton bwd deterministic {tag}", det,
                       lambda: ops.backward(det, out, lse, dout), True)
                qt, kt, vt = (x.transpose(1, 2) for x in (req.q, req.k, req.v))
                sdpa = torch.nn.functional.scaled_dot_product_attention
                report(f"sdpa   fwd {tag}", req, lambda: sdpa(qt, kt, vt, is_causal=causal))


def tune(dims, dtypes, causals, kernels=configs.KERNELS, seqlen=SEQLEN):
    family = configs.gpu_family(torch.cuda.current_device())
    # The kernels being tuned lose their entries in both tables (and --bench then times the
    # autotuned picks); the others run as listed.
    for table in (configs.TUNED, configs.TUNED_SHORT):
        for key in [key for key in table if key[1] in kernels]:
            del table[key]
    for d in dims:
        for dtype in dtypes:
            for causal in causals:
                for kernel in kernels:  # run() sets it again for the kernels this shape launches
                    ops._TUNED[kernel].best_config = None
                req = make(d, dtype, causal, seqlen=seqlen)
                out, lse = ops.forward(req)
                dout = torch.randn_like(out)
                if "bwd" in kernels:
                    ops.backward(req, out, lse, dout)  # atomic dQ up to ops.ATOMIC_DQ_MAX_HEADDIM
                if {"bwd_dkdv", "bwd_dq"} & set(kernels):
                    ops.backward(make(d, dtype, causal, True, seqlen), out, lse, dout)
                for kernel in kernels:
                    best = ops._TUNED[kernel].best_config
                    if best is None:  # not launched at this head dim (e.g. atomic dQ above its limit)
                        continue
                    tile = configs.Tile(best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"],
                                        best.num_warps, best.num_stages)
                    print(f'    ("{family}", "{kernel}", {d}, "{str(dtype)[6:]}", {causal}): {tile},')


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", action="store_true", help="benchmark (after tuning with --tune)")
    parser.add_argument("--tune", action="store_true", help="autotune (the default without --bench)")
    parser.add_argument("--atomic-max", type=int, default=None, metavar="D",
                        help="use the one-kernel atomic-dQ backward up to head dim D (ops.ATOMIC_DQ_MAX_HEADDIM"
                             f", now {ops.ATOMIC_DQ_MAX_HEADDIM}), so its 'bwd' tiles get tuned/benchmarked there")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dtypes", nargs="+", choices=("fp16", "bf16"), default=["fp16", "bf16"])
    parser.add_argument("--causal", nargs="+", choices=("false", "true"), default=["false", "true"])
    parser.add_argument("--kernels", nargs="+", choices=configs.KERNELS, default=list(configs.KERNELS),
                        help="tune only these kernels (the rest keep their table tiles)")
    parser.add_argument("--seqlen", type=int, default=SEQLEN, help=f"tuning shape's seqlen (default {SEQLEN}; "
                        f"batch = {TOKENS} // seqlen)")
    args = parser.parse_args(argv)
    need.cuda_gpu("benchmarks.triton_tune")
    dtypes = [{"fp16": torch.float16, "bf16": torch.bfloat16}[d] for d in args.dtypes]
    causals = [c == "true" for c in args.causal]
    if args.atomic_max is not None:
        ops.ATOMIC_DQ_MAX_HEADDIM = args.atomic_max
    if args.tune or not args.bench:
        tune(args.dims, dtypes, causals, args.kernels, args.seqlen)  # autotuned picks stay cached for --bench
    if args.bench:
        bench(args.dims, dtypes, causals, args.seqlen)


if __name__ == "__main__":
    main()
