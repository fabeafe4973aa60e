"""Where is a kernel config wrong? Error map per (batch, head, m_block) against an fp32 reference.

    python -m benchmarks.cute_errmap --hdim 64 --tile 192x128 --set persistent=1 --set q_stages=2 \
        --batch 3 --sq 1000 --sk 777 --heads 8 --kv-heads 2 --causal

Prints the tiles whose max |out - ref| (ref: `fa3py.reference` in float32) exceeds 20x the
bf16/fp16 rounding of the reference (a rough screen for locating a bug, not the test tolerance
of tests/_util.check_forward), with the rows inside the tile that are wrong.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmarks import need


def main(argv=None):
    need.module("benchmarks.cute_errmap", "cutlass", "hopper")
    import cute_kernels
    from cute_kernels.config import tile_from_spec
    from fa3py import reference
    from fa3py.request import AttentionParams, AttentionRequest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hdim", type=int, default=128)
    p.add_argument("--tile", default="", help="MxN[sS][+field]")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=0|1")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--sq", type=int, default=1000)
    p.add_argument("--sk", type=int, default=777)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    a = p.parse_args(argv)
    need.cuda_gpu("benchmarks.cute_errmap", sm90=True)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    torch.manual_seed(0)
    mk = lambda s, h: torch.randn(a.batch, s, h, a.hdim, device="cuda", dtype=dt)
    q, k, v = mk(a.sq, a.heads), mk(a.sk, a.kv_heads), mk(a.sk, a.kv_heads)
    req = AttentionRequest(q, k, v, AttentionParams(a.hdim ** -0.5, window_right=0 if a.causal else -1))
    cfg = cute_kernels.config_for(req)
    cfg = dataclasses.replace(cfg, tile=tile_from_spec(cfg.tile, a.tile, a.set))
    out, _ = cute_kernels.run(req, cfg)
    torch.cuda.synchronize()

    ref, _ = reference.attention(req, torch.float32)
    err = (out.float() - ref).abs().amax(-1)  # (b, sq, h)
    tol = 20 * (ref.to(dt).float() - ref).abs().amax().item() + 1e-3
    tm = cfg.tile.tile_m
    nm = -(-a.sq // tm)
    print(f"# {cfg.short()} max err {err.max().item():.3g} tol {tol:.3g}; tiles {a.batch}x{a.heads}x{nm}")
    bad = 0
    for b in range(a.batch):
        for h in range(a.heads):
            for mb in range(nm):
                e = err[b, mb * tm:(mb + 1) * tm, h]
                if e.max().item() > tol:
                    bad += 1
                    rows = (e > tol).nonzero().flatten().tolist()
                    if bad <= 40:
                        print(f"b{b} h{h} m{mb}: max {e.max().item():.3g}, {len(rows)} bad rows "
                              f"{rows[:8]}{'...' if len(rows) > 8 else ''} (rows {rows[0]}..{rows[-1]})")
    print(f"# {bad} bad tiles")


if __name__ == "__main__":
    main()
