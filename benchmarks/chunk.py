"""attention_chunk (chunked local attention, Llama 4) against a sliding window that keeps as many
(query, key) pairs, on a CUDA GPU: whether the kernels skip whole blocks outside a chunk, so that a
chunked call's time follows the pairs it keeps (issue bar: within 10% of the windowed call's time
per kept pair).

    python -m benchmarks.chunk                                   # 16k tokens, chunks 1k-8k, causal and not
    python -m benchmarks.chunk --chunk 8192 --seqlen 32768 --hdim 128 --cuda-graph

Each row: the chunked call (`fa3py.attention(..., attention_chunk=C)`) and the windowed one, whose
window (left, right) is chosen so that it keeps the closest number of pairs (causal: (W, 0);
non-causal: (W, W)), called alternately, each time the median of --rounds rounds of do_bench
(optionally CUDA-graph replays). TFLOP/s count 4 * hdim FLOPs per kept pair; "per-pair ratio" is
(chunk time / chunk pairs) / (window time / window pairs): at most 1.10 meets the bar.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kept_pairs(sq: int, sk: int, window=(-1, -1), chunk: int = 0, causal: bool = False) -> int:
    """(query, key) pairs a head keeps: fa3py's masks (bottom-right aligned; causal is a right
    window of 0; a chunk keeps the keys in the chunk of the query's diagonal position), row by row
    in closed form."""
    wl, wr = window
    if causal:
        wr = 0
    diag = torch.arange(sq, dtype=torch.int64) + (sk - sq)
    lo = torch.zeros_like(diag)
    hi = torch.full_like(diag, sk - 1)
    if wl >= 0:
        lo = torch.maximum(lo, diag - wl)
    if wr >= 0:
        hi = torch.minimum(hi, diag + wr)
    if chunk > 0:
        start = torch.div(diag, chunk, rounding_mode="floor") * chunk
        lo = torch.maximum(lo, start)
        hi = torch.minimum(hi, start + chunk - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def matching_window(sq: int, sk: int, chunk: int, causal: bool) -> tuple[int, int]:
    """The window ((W, 0) causal, (W, W) otherwise) whose kept pairs are closest to the chunk's."""
    want = kept_pairs(sq, sk, chunk=chunk, causal=causal)
    pairs = lambda w: kept_pairs(sq, sk, (w, 0 if causal else w))  # noqa: E731
    lo, hi = 0, sk  # pairs(w) grows with w: the first w with pairs >= want, or the one before
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if pairs(mid) < want else (lo, mid)
    w = min((max(lo - 1, 0), lo), key=lambda x: abs(pairs(x) - want))
    return (w, 0) if causal else (w, w)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.chunk", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seqlen")
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048, help="nheads = hidden // hdim")
    ap.add_argument("--causal", choices=("both", "true", "false"), default="both")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cuda-graph", action="store_true", help="replay each call from a CUDA graph")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.chunk times GPU kernels: no CUDA device here")
    import triton.testing

    import fa3py

    b, h, s, d = max(1, args.tokens // args.seqlen), args.hidden // args.hdim, args.seqlen, args.hdim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g, device="cuda").bfloat16() for _ in range(3))
    runs_on = str(fa3py.explain(q, k, v, causal=True, attention_chunk=args.chunk[0])).splitlines()[0]
    print(f"# {torch.cuda.get_device_name()}, batch {b}, {h} heads, seqlen {s}, hdim {d}, bf16"
          f"{', CUDA graphs' if args.cuda_graph else ''}; {runs_on}")
    print(f"{'chunk':>6} {'causal':>6} {'window':>12} {'chunk us':>9} {'window us':>9} {'chunk TF/s':>10} "
          f"{'window TF/s':>11} {'pairs ratio':>11} {'per-pair ratio':>14}")
    for causal in {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]:
        for c in args.chunk:
            window = matching_window(s, s, c, causal)
            pairs = {"chunk": kept_pairs(s, s, chunk=c, causal=causal),
                     "window": kept_pairs(s, s, window, causal=causal)}
            calls = {"chunk": lambda c=c: fa3py.attention(q, k, v, causal=causal, attention_chunk=c),
                     "window": lambda w=window: fa3py.attention(q, k, v, causal=causal, window_size=w)}
            for n, fn in list(calls.items()):
                fn()
                if args.cuda_graph:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fn()
                    calls[n] = graph.replay
            times = {n: [] for n in calls}
            for r in range(args.rounds):
                for n in (("chunk", "window") if r % 2 == 0 else ("window", "chunk")):
                    times[n].append(triton.testing.do_bench(calls[n], warmup=2, rep=20, return_mode="median"))
            ms = {n: statistics.median(t) for n, t in times.items()}
            tf = {n: 4 * b * h * pairs[n] * d / ms[n] / 1e9 for n in ms}
            per_pair = (ms["chunk"] / pairs["chunk"]) / (ms["window"] / pairs["window"])
            print(f"{c:>6} {str(causal):>6} {str(window):>12} {ms['chunk'] * 1e3:>9.1f} {ms['window'] * 1e3:>9.1f} "
                  f"{tf['chunk']:>10.0f} {tf['window']:>11.0f} {pairs['chunk'] / pairs['window']:>11.4f} "
                  f"{per_pair:>14.3f}", flush=True)


if __name__ == "__main__":
    main()
