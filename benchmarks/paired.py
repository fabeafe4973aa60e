"""Paired timing: providers called in turn, call by call, for close races on a power-limited GPU.

    python -m benchmarks.paired --hdim 64 --seqlen 16384 --causal true --providers fa3py:cute fa4 sdpa:cudnn
    python -m benchmarks.paired --hdim 128 256 --seqlen 16384 --pairs 300 --json bench_out/paired.json
    python -m benchmarks.paired --providers fa3py:cute fa4 sdpa:cudnn --cuda-graph --md grid.md --plot grid.png
    python -m benchmarks.paired --from-json bench_out/paired.json --md paired.md   # re-render only
    python -m benchmarks.paired --pass bwd --hdim 64 128 256 --providers fa3py:cute fa3py:cute-bwd fa4 sdpa:cudnn
    python -m benchmarks.paired --pass fwdbwd --cuda-graph --providers fa3py:cute fa3py:cute-bwd fa4 sdpa:cudnn

`benchmarks.run` times each provider for a stretch of calls in turn. On a GPU held at its power
cap the clock drifts by several percent between those stretches, more than a 1-2% race between
two kernels. Here every "pair" runs each provider once, in an order rotated from pair to pair,
back to back on one stream with CUDA events between the calls, so neighbouring calls see the
same clock and temperature. For each fa3py provider and each peer the per-pair time ratios give
a median with a bootstrap 95% interval, and the share of pairs fa3py won; with two peers or
more, also against the faster peer of each pair ("best peer").

The queue stays full as long as a call takes longer on the GPU than its host time (about
0.1 ms for fa3py's eager calls), so eager pairs suit long kernels such as the 16k-token grid
points; the host time per call is printed for that check. With `--cuda-graph` each provider's
call is captured once and the pairs replay the graphs (a few microseconds of host time each), so
short points such as 512 tokens keep the queue full too. `--matmul` adds the dense matmul of
`benchmarks.run` (N = MATMUL_N unless --matmul-n, the run's dtype) to every pair and reports each
provider's TFLOP/s as a share of the matmul's in the same pair: the "share of the matmul rate"
bar, read under the same clock. Takes benchmarks.run's options for the point
(--hdim, --seqlen, --causal, --tokens, --hidden, --batch, --nheads, --seqlen-q, --kv-heads,
--dtype, --providers, --device, --seed, --cuda-graph). No correctness check: run
benchmarks.run for that.

`--pass` picks what a call is (PASSES): the forward (default); `bwd`, the backward alone: each
provider's forward runs once outside the timing and every call is
`torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)` on its graph, so a call runs
only that provider's backward (the gradient of SDPA's transposed output included); `fwdbwd`, the
training step: the forward and that gradient in one call. TFLOP/s count 2.5x the forward's FLOPs
for `bwd`, 3.5x for `fwdbwd` (benchmarks.flops.MODE_FACTOR). The backward a fa3py provider runs is
fa3py's dispatch's: fa3py:cute's is the sm90 kernel's unless FA3PY_CUTE_BWD=0; fa3py:cute-bwd calls
the sm90 backward kernel (cute_kernels/bwd_sm90.py) itself. Providers without a backward are
skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import report, run
from benchmarks.flops import flops
from benchmarks.providers import select

# --pass: what one timed call is -> benchmarks.flops' mode (its FLOP factor)
PASSES = {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd_bwd"}
PASS_TITLES = {"fwd": "forward", "bwd": "backward alone", "fwdbwd": "forward + backward"}


def median_ratio(ours: list[float], theirs: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Per-pair ratios ours / theirs: their median, a bootstrap 95% interval of it, and the share
    of pairs where ours took less time."""
    r = np.asarray(ours, dtype=float) / np.asarray(theirs, dtype=float)
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, len(r), size=(resamples, len(r)))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": float(np.median(r)), "ci95": [float(lo), float(hi)], "won": float(np.mean(r < 1.0)),
            "pairs": int(len(r))}


def pair_ratios(names: list[str], times: list[list[float]], seed: int = 0) -> dict:
    """`median_ratio` of each fa3py provider against each peer and, with two peers or more,
    against the faster peer of each pair ("best peer": the bar the grid is held to)."""
    ours = [i for i, n in enumerate(names) if n.startswith("fa3py")]
    peers = [j for j in range(len(names)) if j not in ours]
    out = {}
    for i in ours:
        for j in peers:
            out[f"{names[i]} / {names[j]}"] = median_ratio(times[i], times[j], seed=seed)
        if len(peers) > 1:
            best = np.min([times[j] for j in peers], axis=0)
            out[f"{names[i]} / best peer"] = median_ratio(times[i], best, seed=seed)
    return out


def time_pairs(calls: list, pairs: int, device: torch.device) -> tuple[list[list[float]], float]:
    """Each call once per pair, in an order rotated by one each pair, back to back; the ms of
    every call (per call index, pair order) and the host ms per call. The first pair is a warm-up
    (it starts on an idle GPU) and is not returned."""
    n = len(calls)
    order = [(i + j) % n for i in range(pairs + 1) for j in range(n)]
    times: list[list[float]] = [[] for _ in range(n)]
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(order) + 1)]
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        events[0].record()
        for c, j in enumerate(order):
            calls[j]()
            events[c + 1].record()
        host_ms = (time.perf_counter() - t0) * 1e3 / len(order)
        torch.cuda.synchronize(device)
        for c, j in enumerate(order):
            if c >= n:
                times[j].append(events[c].elapsed_time(events[c + 1]))
        return times, host_ms
    for c, j in enumerate(order):
        t = time.perf_counter()
        calls[j]()
        if c >= n:
            times[j].append((time.perf_counter() - t) * 1e3)
    return times, float(np.mean([t for ts in times for t in ts]))  # on the CPU the host runs the call


def make_call(provider, forward, q, k, v, dout, case, pass_: str):
    """One timed call of `provider` for --pass `pass_` on leaves q, k, v (requiring grad for a
    backward): its forward; its backward alone (the forward run here, once, and its graph kept
    for every call); or forward and backward."""
    qp, kp, vp = provider.prepare(q, k, v, case) if provider.prepare else (q, k, v)
    if pass_ == "fwd":
        return lambda: forward(qp, kp, vp, case)
    leaves = (q, k, v)
    if pass_ == "fwdbwd":
        return lambda: torch.autograd.grad(forward(qp, kp, vp, case), leaves, dout)
    out = forward(qp, kp, vp, case)
    return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)


def backward_backend(provider, q, case) -> str:
    """The backend that runs a fa3py provider's backward at this point: fa3py.explain's choice
    (fa3py:cute's is the sm90 kernel's unless FA3PY_CUTE_BWD=0); fa3py:cute-bwd calls bwd_sm90 itself."""
    if provider.name.startswith("fa3py:cute-bwd"):
        return "cute"
    try:
        import fa3py

        k = q.new_empty(case.batch, case.seqlen, case.hk, case.hdim)
        text = str(fa3py.explain(q, k, k, causal=case.causal, backend=provider.fa3py_backend))
    except Exception as e:
        return run._error_text(e)
    line = next((ln for ln in text.splitlines() if ln.startswith("backward: ")), "backward: ?")
    return line.removeprefix("backward: ").split(" ")[0]


def format_markdown(doc) -> str:
    """A paired run as markdown: per causal, one line per point with each provider's ms, fa3py's
    time ratio against the best peer (median, 95% interval, pairs won) and, with --matmul,
    fa3py's share of the matmul rate."""
    meta = doc["meta"]
    pass_ = meta.get("pass", "fwd")
    out = [f"# benchmarks.paired: {meta['device_name']}, {PASS_TITLES[pass_]}", "",
           f"- date {meta['date']}, commit `{meta['commit']}`{' (tree modified)' if meta.get('dirty') else ''}, "
           f"torch {meta['torch']}, dtype {meta['args']['dtype']}, peers {json.dumps(meta.get('versions', {}))}",
           f"- {meta['pairs']} pairs per point, providers in rotated order call by call"
           f"{', CUDA-graph replays' if meta.get('cuda_graph') else ', eager calls'}; ratio = fa3py time / "
           "the faster peer's time in the same pair (median [bootstrap 95% interval], share of pairs won); "
           "below 1 is faster"]
    ran_on = sorted({f"{n}: {b}" for r in doc["rows"] for n, b in r.get("backward_ran_on", {}).items()})
    if ran_on:
        out.append(f"- fa3py's backward ran on: {', '.join(ran_on)}")
    rows = doc["rows"]
    for causal in sorted({r["causal"] for r in rows}):
        sub = [r for r in rows if r["causal"] == causal]
        names = list(dict.fromkeys(n for r in sub for n in r["ms"]))
        ours = [n for n in names if n.startswith("fa3py")]
        mm = any(r.get("matmul_share") for r in sub)
        out += ["", f"## {'' if pass_ == 'fwd' else pass_ + ', '}causal={causal} (ms)", "",
                "| hdim | seqlen | " + " | ".join(names) + " | "
                + " | ".join(f"{n} / best peer" for n in ours) + (" | " + " | ".join(f"{n} / matmul" for n in ours)
                                                                  if mm else "") + " |",
                "|---:|---:|" + "---:|" * len(names) + "---:|" * len(ours) * (1 + mm)]
        for r in sorted(sub, key=lambda r: (r["hdim"], r["seqlen"])):
            cells = [f"{r['ms'][n]:.4f}" if n in r["ms"] else "" for n in names]
            for n in ours:
                b = r["ratios"].get(f"{n} / best peer") or next(
                    (v for k, v in r["ratios"].items() if k.startswith(f"{n} / ")), None)
                cells.append(f"{b['median']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] {100 * b['won']:.0f}%"
                             if b else "")
            if mm:
                cells += [f"{100 * r['matmul_share'][n]['median']:.1f}% of {r['matmul_tflops']:.0f}"
                          if n in r.get("matmul_share", {}) else "" for n in ours]
            out.append(f"| {r['hdim']} | {r['seqlen']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def report_rows(doc) -> list[dict]:
    """The rows of a paired run in benchmarks.report's form (one per provider and point), for its plot."""
    mode = PASSES[doc["meta"].get("pass", "fwd")]
    return [{"provider": n, "peer": not n.startswith("fa3py"), "precision": doc["meta"]["args"]["dtype"],
             "mode": mode, "hdim": r["hdim"], "seqlen": r["seqlen"], "causal": r["causal"], "batch": r["batch"],
             "nheads": r["nheads"], "ms": ms, "tflops": r["tflops"][n], "ratio": None, "status": "ok", "note": ""}
            for r in doc["rows"] for n, ms in r["ms"].items()]


def write_outputs(doc, json_path=None, md_path=None, plot_path=None) -> None:
    """Writes the JSON, the markdown (format_markdown) and the TFLOP/s plot (benchmarks.report's)."""
    for path in (json_path, md_path, plot_path):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=1) + "\n")
    if md_path:
        Path(md_path).write_text(format_markdown(doc))
    if plot_path:
        why = report.plot({"meta": doc["meta"], "rows": report_rows(doc)}, Path(plot_path))
        if why:
            print(f"no plot: {why}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200, help="rounds of one call per provider (default 200)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--md", metavar="FILE", help="also write them as markdown tables")
    ap.add_argument("--plot", metavar="FILE", help="also plot TFLOP/s per provider (PNG; needs matplotlib)")
    ap.add_argument("--from-json", metavar="FILE", help="run nothing: write --md / --plot from a paired JSON")
    ap.add_argument("--matmul", action="store_true",
                    help="add the dense matmul to every pair; report each provider's share of its rate")
    ap.add_argument("--matmul-n", type=int, default=run.MATMUL_N, help="its size N (N x N x N; default %(default)s)")
    ap.add_argument("--pass", dest="pass_", choices=tuple(PASSES), default="fwd",
                    help="what a call is: fwd (default), bwd (the backward alone) or fwdbwd (forward + backward)")
    own, rest = ap.parse_known_args(argv)
    if own.from_json:
        doc = json.loads(Path(own.from_json).read_text())
        write_outputs(doc, None, own.md, own.plot)
        return doc
    if own.pairs < 1:
        ap.error("--pairs must be >= 1")
    if own.matmul_n < 1:
        ap.error("--matmul-n must be >= 1")
    if own.pass_ != "fwd" and "--fp8" in rest:
        ap.error("--fp8 is forward-only (--pass fwd)")
    # (a backward's inputs require grad: benchmarks.run's "bwd" cases)
    args = run.parse_args(["--mode", "fwd" if own.pass_ == "fwd" else "bwd", *rest])
    device = run.resolve_device(args, "benchmarks.paired")
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("benchmarks.paired: --cuda-graph needs a CUDA GPU")
    if args.cuda_graph:
        run.use_capture_stream()  # (a backward's forward on the stream its graph is captured on)
    chosen, skipped = select(args.providers, device)
    unknown = [name for name, why in skipped.items() if why.startswith("unknown provider")]
    if unknown:
        raise SystemExit(f"benchmarks.paired: --providers: {', '.join(unknown)}: {skipped[unknown[0]]}")
    if own.pass_ != "fwd":
        skipped.update({p.name: "no backward" for p, _ in chosen if not p.backward})
        chosen = [(p, f) for p, f in chosen if p.backward]
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    if len(chosen) < 2:
        raise SystemExit("benchmarks.paired needs two providers or more (--providers)")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    matmul = None
    if own.matmul:
        matmul = run.dense_matmul(args, device, own.matmul_n, gen)
        if args.cuda_graph:
            matmul = run.cuda_graph(matmul).replay
    results, started, cases = [], time.monotonic(), run.build_cases(args, device)
    for i, case in enumerate(cases):
        if args.budget_s and time.monotonic() - started > args.budget_s:  # (--budget-s: run.py's flag)
            print(f"--budget-s {args.budget_s:g} spent: {len(cases) - i} of {len(cases)} points not timed")
            break
        q, k, v, dout = run.make_inputs(case, device, 1, gen)[0]
        calls, names = [], []
        for p, forward in chosen:
            try:
                call = make_call(p, forward, q, k, v, dout, case, own.pass_)
                for _ in range(3):  # compile and warm up outside the timing
                    call()
                if args.cuda_graph:
                    call = run.cuda_graph(call).replay
            except Exception as e:
                print(f"skipped {p.name} at hdim {case.hdim} seqlen {case.seqlen}: {run._error_text(e)}")
                continue
            calls.append(call)
            names.append(p.name)
        if len(calls) < 2:
            continue
        times, host_ms = time_pairs(calls + ([matmul] if matmul else []), own.pairs, device)
        mm_times = times.pop() if matmul else None
        work = flops(case.batch, case.nheads, case.sq, case.seqlen, case.hdim, causal=case.causal,
                     mode=PASSES[own.pass_])
        row = {"hdim": case.hdim, "seqlen": case.seqlen, "causal": case.causal, "batch": case.batch,
               "nheads": case.nheads, "host_ms_per_call": host_ms,
               "ms": {n: float(np.median(t)) for n, t in zip(names, times)},
               "tflops": {n: work / (float(np.median(t)) * 1e-3) / 1e12 for n, t in zip(names, times)},
               "ratios": pair_ratios(names, times, seed=args.seed)}
        if own.pass_ != "fwd":
            row["backward_ran_on"] = {p.name: backward_backend(p, q, case) for p, _ in chosen
                                      if p.fa3py_backend and p.name in names}
        if matmul:  # rate / matmul rate = (matmul time / call time) * (call flops / matmul flops)
            mm_work = 2 * own.matmul_n**3
            row["matmul_tflops"] = mm_work / (float(np.median(mm_times)) * 1e-3) / 1e12
            row["matmul_share"] = {}
            for n, t in zip(names, times):
                s = median_ratio(work * np.asarray(mm_times), mm_work * np.asarray(t), seed=args.seed)
                row["matmul_share"][n] = {k: s[k] for k in ("median", "ci95", "pairs")}
        results.append(row)
        print(f"\n{PASS_TITLES[own.pass_]}: hdim {case.hdim} seqlen {case.seqlen} causal {case.causal} (batch {case.batch}, "
              f"{case.nheads} heads), {own.pairs} pairs{', CUDA graphs' if args.cuda_graph else ''}, "
              f"host {host_ms:.3f} ms per call")
        for n in names:
            ran_on = row.get("backward_ran_on", {}).get(n)
            print(f"  {n:<14} {row['ms'][n]:8.4f} ms  {row['tflops'][n]:7.3g} TFLOP/s"
                  + (f"  (backward: {ran_on})" if ran_on else ""))
        for n, s in (row.get("matmul_share") or {}).items():
            print(f"  {n:<14} {100 * s['median']:.1f}% of the matmul rate [{100 * s['ci95'][0]:.1f}, "
                  f"{100 * s['ci95'][1]:.1f}] (matmul {row['matmul_tflops']:.0f} TFLOP/s)")
        for label, s in row["ratios"].items():
            print(f"  {label:<28} time ratio {s['median']:.4f} [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}], "
                  f"faster in {100 * s['won']:.0f}% of pairs")
    if not results:
        raise SystemExit("benchmarks.paired: nothing was timed: fewer than two providers ran at every point (above)")
    doc = {"meta": run.metadata(args, device) | {"pairs": own.pairs, "tool": "benchmarks.paired", "pass": own.pass_,
                                                  "cuda_graph": bool(args.cuda_graph),
                                                  "matmul_n": own.matmul_n if own.matmul else None}, "rows": results}
    write_outputs(doc, own.json, own.md, own.plot)
    return doc


if __name__ == "__main__":
    main()
