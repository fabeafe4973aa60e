"""Decoding from a KV cache on a CUDA GPU: fa3py.flash_attn_with_kvcache from a contiguous cache
and from paged caches, beside cuDNN's (PyTorch SDPA) and FlashAttention-3's (peer wheel fa3-fwd)
decoding from the contiguous cache; issue 24's grid by default.

    python -m benchmarks.decode                       # batch 1/8/64, 1 and 4 queries, 4k-64k keys, pages 16/64/256
    python -m benchmarks.decode --batch 8 --keys 8192 --splits 1 2 4 8 16   # also fixed split counts

Shapes: hdim 128, 32 query heads on 8 KV heads (GQA), bf16, causal (bottom-right: with 4 queries
the last sees every key), every sequence holding --keys keys (cache_seqlens = keys). Rows, each
replayed from a CUDA graph, called in a rotated order each round (as benchmarks.paired times its
providers), a row's time the median over --rounds rounds:
  contiguous     fa3py.flash_attn_with_kvcache on (batch, keys, 8, 128) caches, fa3py's own
                 split-KV choice (`cute_kernels.launch.num_splits`)
  pagedP         the same keys in pages of P rows, pages shuffled through the pool
  splitsN        the contiguous call with num_splits=N (FA3's argument): for tuning the choice
  cudnn          torch SDPA (cuDNN backend, enable_gqa) on the contiguous keys; with several
                 queries an explicit bottom-right mask (benchmarks.providers' sdpa:cudnn)
  fa3-fwd        FlashAttention-3's flash_attn_with_kvcache on the contiguous cache
Each paged cache is timed beside the contiguous call in its own rotation (one pool in memory at a
time: batch 64 with 64k keys holds 17 GB a pool). Columns: "splits" (the contiguous call's split
count), microseconds per call, the contiguous call's K / V bytes per second (GB/s), and the issue's
ratios: the worst contiguous / pagedP time (bar >= 0.95) and cuDNN's time over the slowest paged
call's (bar >= 1). Paged outputs must equal the contiguous one bit for bit (a line says where
not); the split and peer rows' max abs difference from it is printed."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def paged(x: torch.Tensor, page: int, order: torch.Tensor) -> torch.Tensor:
    """The rows of `x` (batch, keys, heads, d) as a pool of pages of `page` rows, sequence i's
    j-th page at pool index order[i, j] (`page_order`)."""
    b, s, h, d = x.shape
    per_seq = order.shape[1]
    rows = x.new_zeros(b, per_seq * page, h, d)
    rows[:, :s] = x
    pool = x.new_zeros(b * per_seq, page, h, d)
    pool[order.long().flatten()] = rows.view(b * per_seq, page, h, d)
    return pool


def page_order(b: int, s: int, page: int, gen: torch.Generator) -> torch.Tensor:
    """A page table (b, pages per sequence) int32: the pool's pages in a random order, as a serving
    stack's allocator leaves them."""
    per_seq = -(-s // page)
    return torch.randperm(b * per_seq, generator=gen, device=gen.device).view(b, per_seq).to(torch.int32)


def graphed(fn):
    """(replay, output): fn captured in a CUDA graph (benchmarks.run.cuda_graph), replayed once;
    the output tensor is the graph's, rewritten by each replay."""
    from benchmarks.run import cuda_graph

    box = {}

    def call():
        box["out"] = fn()

    graph = cuda_graph(call)
    graph.replay()
    return graph.replay, box["out"]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--keys", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--pages", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--splits", type=int, nargs="*", default=[], help="also the contiguous call with these num_splits")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peers", nargs="*", default=["cudnn", "fa3-fwd"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.decode times GPU kernels: no CUDA device here")
    import triton.testing

    import fa3py
    from fa3py.validation import make_request

    try:  # (the split count column: the Hopper kernel's choice; "-" where cute_kernels is not installed)
        from cute_kernels import launch
    except ImportError:
        launch = None

    from benchmarks.providers import Case, sdpa_provider

    cudnn = sdpa_provider("cudnn", "CUDNN_ATTENTION").load()  # (its bottom-right mask with several queries)
    fa3 = None
    if "fa3-fwd" in args.peers:
        try:
            from fa3_fwd_interface import flash_attn_with_kvcache as fa3
        except ImportError:
            print("# fa3-fwd not installed: left out")
    h, hk, d = args.heads, args.kv_heads, args.hdim
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, hdim {d}, {h} / {hk} heads, bf16, causal, CUDA graphs, "
          f"median of {args.rounds} rounds; us per call")
    cols = ["contiguous", *(f"paged{p}" for p in args.pages), *(f"splits{n}" for n in args.splits),
            *(["cudnn"] if "cudnn" in args.peers else []), *(["fa3-fwd"] if fa3 else [])]
    print("| batch | queries | keys | splits | " + " | ".join(cols) + " | GB/s | contig/paged | cudnn/paged |")
    print("|" + "---:|" * (len(cols) + 7))

    def rotated(calls: dict) -> dict:
        """us per call: the median over the rounds, each round calling the rows in a rotated order."""
        times, names = {n: [] for n in calls}, list(calls)
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                times[n].append(triton.testing.do_bench(calls[n], warmup=5, rep=30, return_mode="median"))
        return {n: statistics.median(t) * 1e3 for n, t in times.items()}

    for b in args.batch:
        for sq in args.queries:
            for sk in args.keys:
                q = torch.randn(b, sq, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
                k, v = (torch.randn(b, sk, hk, d, generator=gen, device="cuda", dtype=torch.bfloat16)
                        for _ in range(2))
                seqlens = torch.full((b,), sk, dtype=torch.int32, device="cuda")

                def kv(k, v, **kw):
                    return fa3py.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, causal=True, **kw)

                req = make_request(q, k, v, causal=True)
                splits = launch.num_splits(req, launch.config_for(req)) if launch else "-"
                contiguous, ref = graphed(lambda: kv(k, v))
                err = {}
                # the contiguous call beside the split counts and the peers ...
                calls = {"contiguous": contiguous}
                for n in args.splits:
                    calls[f"splits{n}"], out = graphed(lambda n=n: kv(k, v, num_splits=n))
                    err[f"splits{n}"] = (out.float() - ref.float()).abs().max().item()
                case = Case(b, h, sk, d, causal=True, mode="fwd", dtype=torch.bfloat16, seqlen_q=sq, nheads_kv=hk)
                peers = {"cudnn": lambda: cudnn(q, k, v, case),
                         "fa3-fwd": lambda: fa3(q, k, v, cache_seqlens=seqlens, causal=True)}
                for n in cols:
                    if n in peers:
                        try:
                            calls[n], out = graphed(peers[n])
                        except Exception as e:  # noqa: BLE001 (a peer that refuses the shape is named)
                            print(f"# {n} refused batch {b}, {sq} queries, {sk} keys: {type(e).__name__}: {e}"[:300])
                            continue
                        out = out[0] if isinstance(out, (tuple, list)) else out
                        err[n] = (out.float() - ref.float()).abs().max().item()
                us = rotated(calls)
                del calls
                # ... and beside each paged cache, one pool at a time (64 queries' 64k keys: 17 GB a pool)
                ratio = {}
                for p in args.pages:
                    table = page_order(b, sk, p, gen)
                    kp, vp = paged(k, p, table), paged(v, p, table)
                    call, out = graphed(lambda kp=kp, vp=vp, table=table: kv(kp, vp, page_table=table))
                    if not torch.equal(out, ref):
                        print(f"# paged{p} differs from contiguous: max |diff| "
                              f"{(out.float() - ref.float()).abs().max().item():.3g} (batch {b}, keys {sk})")
                    pair = rotated({"contiguous": contiguous, "paged": call})
                    us[f"paged{p}"], ratio[p] = pair["paged"], pair["contiguous"] / pair["paged"]
                    del call, out, kp, vp
                    torch.cuda.empty_cache()
                gbs = 2 * b * sk * hk * d * 2 / us["contiguous"] / 1e3
                worst = min(ratio.values()) if ratio else float("nan")
                vs_cudnn = (us["cudnn"] / max(us[f"paged{p}"] for p in args.pages)
                            if "cudnn" in us and args.pages else float("nan"))
                print(f"| {b} | {sq} | {sk} | {splits} | " + " | ".join(f"{us[c]:.1f}" if c in us else "-" for c in cols)
                      + f" | {gbs:.0f} | {worst:.3f} | {vs_cudnn:.3f} |", flush=True)
                if err:
                    print("#   max |diff| against contiguous: " + ", ".join(f"{n} {e:.2e}" for n, e in err.items()))
                del contiguous, ref
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
