"""Quick forward benchmark of the sm90 CuTe DSL kernel vs PyTorch SDPA (same run, same GPU).

    python -m cute_kernels.bench [--seqlen 8192] [--hdims 64,128,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch


def flops(b, h, sq, sk, d, dv, causal):
    f = 2 * b * h * sq * sk * (d + dv)
    return f / 2 if causal else f


def main(argv=None):
    import triton.testing

    import cute_kernels
    from fa3py.request import AttentionParams, AttentionRequest

    p = argparse.ArgumentParser()
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seqlen")
    p.add_argument("--hdims", default="64,128,256")
    p.add_argument("--json", default=None)
    p.add_argument("--persistent", action="store_true")
    a = p.parse_args(argv)
    rows = []
    print(f"# {torch.cuda.get_device_name()} persistent={a.persistent} seqlen={a.seqlen}")
    print(f"{'hdim':>5} {'causal':>6} {'seqlen':>6} {'cute ms':>8} {'TFLOP/s':>8} {'sdpa ms':>8} {'TFLOP/s':>8}")
    for d in map(int, a.hdims.split(",")):
        h = 2048 // d
        s = a.seqlen
        b = max(a.tokens // s, 1)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            req = AttentionRequest(q, k, v, AttentionParams(d**-0.5, window_right=0 if causal else -1))
            cfg = cute_kernels.config_for(req)
            if a.persistent:
                cfg = dataclasses.replace(cfg, tile=dataclasses.replace(cfg.tile, persistent=True))
            cute_kernels.run(req, cfg)
            t = triton.testing.do_bench(lambda: cute_kernels.run(req, cfg), return_mode="median")
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            try:
                t_pt = triton.testing.do_bench(sdpa, return_mode="median")
            except Exception:  # noqa: BLE001
                t_pt = float("nan")
            f = flops(b, h, s, s, d, d, causal)
            rows.append(dict(hdim=d, causal=causal, seqlen=s, batch=b, nheads=h, cute_ms=t,
                             cute_tflops=f / t / 1e9, sdpa_ms=t_pt, sdpa_tflops=f / t_pt / 1e9))
            r = rows[-1]
            print(f"{d:5d} {causal!s:>6} {s:6d} {t:8.3f} {r['cute_tflops']:8.1f} {t_pt:8.3f} {r['sdpa_tflops']:8.1f}")
    if a.json:
        json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
