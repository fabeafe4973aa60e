"""A/B of forward kernel variants in SM cycles (Nsight Compute), not wall time.

On a GPU near its power limit the clock moves by 5-15% between repetitions of the same kernel, more
than most A/B differences; the cycles a kernel takes do not move with the clock. This runs every
variant of every point twice (compile + warm-up, then the measured call) under `ncu` with clock
control off (the GPU's clocks are left alone) and prints the kernel's elapsed SM cycles (max over
SMs) and duration per variant. Throughput claims still come from `benchmarks.run` / `bench`.

    python -m cute_kernels.cycles [--hdims 128] [--seqlens 8192] [--causal both] [--ab tma_store]
                                  [--tiles "128:128x176"] [--fa4] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import subprocess
import sys

MARK = "#variant "
METRICS = ("sm__cycles_elapsed.max", "gpu__time_duration.sum")


def _variants(req, tiles, ab):
    import cute_kernels
    from cute_kernels.config import tile_from_spec

    base = cute_kernels.config_for(req)
    out = [("table", base)]
    out += [(spec, dataclasses.replace(base, tile=tile_from_spec(base.tile, spec))) for spec in tiles]
    for field in ab:
        t = dataclasses.replace(base.tile, **{field: not getattr(base.tile, field)})
        out.append((f"{field}={getattr(t, field)}", dataclasses.replace(base, tile=t)))
    return out


def child(a) -> None:
    """Under ncu: every variant twice, its label printed before its launches."""
    import torch

    import cute_kernels
    from cute_kernels.bench import _parse_tiles
    from fa3py.request import AttentionParams, AttentionRequest

    fa4 = None
    if a.fa4:
        from flash_attn.cute import flash_attn_func as fa4
    tiles = _parse_tiles(a.tiles)
    causals = {"both": (False, True), "no": (False,), "yes": (True,)}[a.causal]
    for d in map(int, a.hdims.split(",")):
        for s in map(int, a.seqlens.split(",")):
            b, h = max(a.tokens // s, 1), 2048 // d
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for causal in causals:
                req = AttentionRequest(q, k, v, AttentionParams(d**-0.5, window_right=0 if causal else -1))
                calls = [(n, lambda cfg=cfg: cute_kernels.run(req, cfg))
                         for n, cfg in _variants(req, tiles.get(d, []), filter(None, a.ab.split(",")))]
                if fa4 is not None:
                    calls.append(("fa4", lambda: fa4(q, k, v, causal=causal)))
                for name, fn in calls:
                    print(f"{MARK}{d} {int(causal)} {s} {name}", flush=True)
                    for _ in range(2):
                        fn()
                        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hdims", default="128")
    p.add_argument("--seqlens", default="8192")
    p.add_argument("--causal", default="both", choices=["both", "no", "yes"])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--tiles", default="", help="as in cute_kernels.bench")
    p.add_argument("--ab", default="", help="boolean TileConfig fields to also run toggled")
    p.add_argument("--fa4", action="store_true", help="flash-attn-4's forward too (a peer)")
    p.add_argument("--metrics", default="", help="comma list of extra ncu metrics to print per variant")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return 0
    args = [x for x in (argv if argv is not None else sys.argv[1:])]
    if "--metrics" in args:  # the child does not need them
        i = args.index("--metrics")
        del args[i:i + 2]
    extra = [m for m in a.metrics.split(",") if m]
    cmd = ["ncu", "--clock-control", "none", "--metrics", ",".join([*METRICS, *extra]), "--kernel-name",
           "regex:kernel_cutlass", "--csv", "--page", "raw", "--print-units", "base",
           sys.executable, "-m", "cute_kernels.cycles", "--child", *args]
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
    for label, row in zip(labels, rows[1::2]):
        d, c, s, name = label.split(" ", 3)
        cyc = float(row[METRICS[0]].replace(",", "")) / 1e6
        us = float(row[METRICS[1]].replace(",", "")) / 1e3
        print(f"{d:>4} {c:>6} {s:>6} {name:>24} {cyc:9.3f} {us:9.1f}")
        for m in extra:
            print(f"{'':>44} {m} = {row.get(m)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
