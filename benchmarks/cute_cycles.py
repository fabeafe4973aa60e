"""A/B of forward kernel variants in SM cycles (Nsight Compute), not wall time.

On a GPU near its power limit the clock moves by 5-15% between repetitions of the same kernel, more
than most A/B differences; the cycles a kernel takes do not move with the clock. This runs every
variant of every point twice (compile + warm-up, then the measured call) under `ncu` with clock
control off (the GPU's clocks are left alone) and prints the kernel's elapsed SM cycles (max over
SMs) and duration per variant. Throughput claims still come from `benchmarks.run` / `bench`.

    python -m benchmarks.cute_cycles [--hdims 128] [--seqlens 8192] [--causal both] [--ab tma_store]
                                  [--tiles "128:128x176"] [--fa4] [--cudnn] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys

from benchmarks import need
from benchmarks.cute_bench import CAUSALS, _parse_tiles, _sdpa, points, variants

MARK = "#variant "
METRICS = ("sm__cycles_elapsed.max", "gpu__time_duration.sum")


def child(a) -> None:
    """Under ncu: every variant twice, its label printed before its launches."""
    import torch

    import cute_kernels

    fa4 = None
    if a.fa4:
        from flash_attn.cute import flash_attn_func as fa4
    cudnn = _sdpa("CUDNN_ATTENTION") if a.cudnn else None
    tiles = _parse_tiles(a.tiles)
    for d, s, _, _, q, k, v, causal, req in points(a.hdims, a.seqlens, a.causal, a.tokens):
        calls = [(name, lambda cfg=cfg: cute_kernels.run(req, cfg)) for name, cfg in
                 variants(cute_kernels.config_for(req), tiles.get(d, []), filter(None, a.ab.split(",")))]
        if fa4 is not None:
            calls.append(("fa4", lambda: fa4(q, k, v, causal=causal)))
        if cudnn is not None:
            calls.append(("cudnn", lambda: cudnn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  causal)))
        for name, fn in calls:
            print(f"{MARK}{d} {int(causal)} {s} {name}", flush=True)
            for _ in range(2):
                fn()
                torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hdims", default="128")
    p.add_argument("--seqlens", default="8192")
    p.add_argument("--causal", default="both", choices=list(CAUSALS))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--tiles", default="", help="as in benchmarks.cute_bench")
    p.add_argument("--ab", default="", help="as in benchmarks.cute_bench")
    p.add_argument("--fa4", action="store_true", help="flash-attn-4's forward too (a peer)")
    p.add_argument("--cudnn", action="store_true", help="PyTorch SDPA's cuDNN forward too (a peer)")
    p.add_argument("--metrics", default="", help="comma list of extra ncu metrics to print per variant")
    p.add_argument("--md", metavar="FILE", help="also write the cycles as a markdown table per causal "
                                                "(variants and peers as columns, fa3py / best peer)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return 0
    need.program("benchmarks.cute_cycles", "ncu", "Nsight Compute")
    need.module("benchmarks.cute_cycles", "cutlass", "hopper")
    need.cuda_gpu("benchmarks.cute_cycles", sm90=True)
    args = list(argv if argv is not None else sys.argv[1:])  # the child ignores --metrics
    extra = [m for m in a.metrics.split(",") if m]
    # CuTe DSL kernels (ours, flash-attn-4) are named kernel_cutlass_*; cuDNN's fused attention
    # kernels carry sdpa / fprop in their names.
    kernels = "regex:kernel_cutlass" + ("|sdpa|fprop" if a.cudnn else "")
    cmd = ["ncu", "--clock-control", "none", "--metrics", ",".join([*METRICS, *extra]), "--kernel-name",
           kernels, "--csv", "--page", "raw", "--print-units", "base",
           sys.executable, "-m", "benchmarks.cute_cycles", "--child", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
        return run.returncode
    # ncu's stdout: the child's lines (labels) interleaved with "==PROF==" lines, then the CSV.
    lines = run.stdout.splitlines()
    labels = [l[len(MARK):] for l in lines if l.startswith(MARK)]
    start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    rows = [r for r in rows if r.get(METRICS[0], "").replace(".", "").replace(",", "").isdigit()]
    assert len(rows) == 2 * len(labels), f"{len(rows)} profiled launches for {len(labels)} variants"
    print(f"{'hdim':>4} {'causal':>6} {'seqlen':>6} {'variant':>24} {'Mcycles':>9} {'us':>9}  (2nd call)")
    results = []
    for label, row in zip(labels, rows[1::2]):
        d, c, s, name = label.split(" ", 3)
        cyc = float(row[METRICS[0]].replace(",", "")) / 1e6
        us = float(row[METRICS[1]].replace(",", "")) / 1e3
        results.append((int(d), c == "1", int(s), name, cyc))
        print(f"{d:>4} {c:>6} {s:>6} {name:>24} {cyc:9.3f} {us:9.1f}")
        for m in extra:
            print(f"{'':>44} {m} = {row.get(m)}")
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(results))
        print(f"wrote {a.md}")
    return 0


PEERS = ("fa4", "cudnn")


def markdown(results: list[tuple]) -> str:
    """(hdim, causal, seqlen, variant, Mcycles) -> one table per causal: a row per (hdim, seqlen),
    a column per variant and peer, and the table config's cycles over the best peer's (< 1:
    fewer cycles than every peer)."""
    column = lambda name: "fa3py" if name.startswith("table") else name  # the table config, any tile
    names = list(dict.fromkeys(column(r[3]) for r in results))
    out = []
    for causal in sorted({r[1] for r in results}):
        cells = {(d, s, column(n)): cyc for d, c, s, n, cyc in results if c == causal}
        points = sorted({(d, s) for d, s, _ in cells})
        out += [f"## causal={causal} (SM Mcycles, ncu, second call)", "",
                "| hdim | seqlen | " + " | ".join(names) + " | fa3py / best peer |",
                "|---:|---:|" + "---:|" * (len(names) + 1)]
        for d, s in points:
            row = [cells.get((d, s, n)) for n in names]
            ours = cells.get((d, s, "fa3py"))
            peers = [cells[d, s, n] for n in PEERS if (d, s, n) in cells]
            ratio = f"{ours / min(peers):.3f}" if ours is not None and peers else ""
            out.append(f"| {d} | {s} | " + " | ".join("" if x is None else f"{x:.3f}" for x in row) + f" | {ratio} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
