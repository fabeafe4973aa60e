"""MLA (FlashAttention-3's `qv`: scores q k^T + qv v^T, head dim 64 for q / k, hdim_v 256 or 512
for qv / v) on a CUDA GPU, fa3py's kernels beside FlashAttention-3's own (peer wheel fa3-fwd).

    python -m benchmarks.mla                                   # decoding and prefill, hdim_v 256 / 512
    python -m benchmarks.mla --dv 512 --seqlen-k 8192 --seqlen-q 1 --batch 32 --heads 128

Rows (providers), each called once per round in a rotated order (as benchmarks.paired times its
providers), a row's time its median over --rounds rounds, optionally replayed from a CUDA graph:
  fa3py cute     fa3py.attention(q, k, v, qv=qv) on the Hopper kernel (FwdConfig.qv; the
                 default, this row turns it on for its calls whatever FA3PY_CUTE_QV says)
  fa3py triton   the same call on the Triton forward (what Hopper runs with FA3PY_CUTE_QV=0)
  fa3-fwd        FlashAttention-3's flash_attn_func(q, k, v, qv=qv)
The shapes are DeepSeek's MLA: one KV head (MQA) shared by --heads query heads, causal. TFLOP/s
count 2 * (hdim + 2 * hdim_v) multiply-adds per visible (query, key) pair; each row's max error
against the fp64 reference on its first case is printed (a sanity check, not the accuracy test:
tests/test_mla.py). A provider that is missing or refuses a case is named and skipped."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def visible_pairs(sq: int, sk: int, causal: bool) -> int:
    """(query, key) pairs a causal (bottom-right aligned) or full call keeps per head."""
    if not causal:
        return sq * sk
    return sum(max(0, min(sk, sk - sq + i + 1)) for i in range(sq))


def providers(names):
    """name -> call(q, k, v, qv, causal) for the providers that load here."""
    import fa3py
    from cute_kernels import launch

    def fa3py_cute(q, k, v, qv, causal):
        before, launch.qv_enabled = launch.qv_enabled, True
        try:
            return fa3py.attention(q, k, v, qv=qv, causal=causal, backend="cute")
        finally:
            launch.qv_enabled = before

    def fa3py_triton(q, k, v, qv, causal):
        return fa3py.attention(q, k, v, qv=qv, causal=causal, backend="triton")

    out = {"fa3py cute": fa3py_cute, "fa3py triton": fa3py_triton}
    try:
        from fa3_fwd_interface import flash_attn_func as fa3

        out["fa3-fwd"] = lambda q, k, v, qv, causal: fa3(q, k, v, qv=qv, causal=causal)
    except ImportError:
        print("# fa3-fwd not installed: left out")
    return {n: f for n, f in out.items() if not names or n in names}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mla", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dv", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--seqlen-k", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--seqlen-q", type=int, nargs="+", default=[1, 4],
                    help="queries per sequence (decoding; prefill: --seqlen-q equal to --seqlen-k)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--cuda-graph", action="store_true", help="replay each call from a CUDA graph")
    ap.add_argument("--providers", nargs="+", help="subset of: fa3py cute, fa3py triton, fa3-fwd")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.mla times GPU kernels: no CUDA device here")
    import triton.testing

    from fa3py import reference
    from fa3py.validation import make_request

    calls = providers(args.providers)
    print(f"# {torch.cuda.get_device_name()}, batch {args.batch}, {args.heads} query heads on 1 KV head, "
          f"hdim 64, causal, bf16{', CUDA graphs' if args.cuda_graph else ''}")
    print(f"{'dv':>4} {'sq':>5} {'sk':>6} {'provider':<13} {'us':>9} {'TFLOP/s':>8} {'max err':>9}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for dv in args.dv:
        for sk in args.seqlen_k:
            for sq in args.seqlen_q:
                rand = lambda *s: torch.randn(*s, generator=g, device="cuda").bfloat16()  # noqa: E731
                b, h = args.batch, args.heads
                q, qv = rand(b, sq, h, 64), rand(b, sq, h, dv)
                k, v = rand(b, sk, 1, 64), rand(b, sk, 1, dv)
                flops = 2 * b * h * visible_pairs(sq, sk, True) * (64 + 2 * dv)
                small = (slice(0, 1), slice(None), slice(0, 4))  # one sequence, 4 heads: the fp64 check
                ref, _ = reference.attention(make_request(q[small], k[:1], v[:1], qv=qv[small], causal=True))
                fns, errs = {}, {}
                for name, call in calls.items():
                    try:
                        errs[name] = float((call(q[:1], k[:1], v[:1], qv[:1], True)[:, :, :4].double()
                                            - ref.double()).abs().max())
                        fn = (lambda c=call: c(q, k, v, qv, True))
                        fn()
                        if args.cuda_graph:
                            graph = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(graph):
                                fn()
                            fn = graph.replay
                        fns[name] = fn
                    except Exception as e:  # a provider that refuses the case is named, not fatal
                        print(f"{dv:>4} {sq:>5} {sk:>6} {name:<13} refused: {type(e).__name__}: {str(e)[:90]}")
                times = {n: [] for n in fns}
                names = list(fns)
                for r in range(args.rounds):
                    for n in names[r % len(names):] + names[:r % len(names)]:
                        times[n].append(triton.testing.do_bench(fns[n], warmup=2, rep=10, return_mode="median"))
                for n in names:
                    ms = statistics.median(times[n])
                    print(f"{dv:>4} {sq:>5} {sk:>6} {n:<13} {ms * 1e3:>9.1f} {flops / ms / 1e9:>8.1f} "
                          f"{errs[n]:>9.2e}", flush=True)


if __name__ == "__main__":
    main()
