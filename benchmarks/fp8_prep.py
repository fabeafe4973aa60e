"""GB/s of the fused FP8 prep pass (rotate + block amax + quantize + V transpose) against a plain
copy of the same tensor, on a CUDA GPU.

    python -m benchmarks.fp8_prep                                    # hdim 64/128/256, 16k tokens
    python -m benchmarks.fp8_prep --hdim 128 --seqlen 8192 --batch 2 --nheads 16
    python -m benchmarks.fp8_prep --roles v --both-orders    # V^T in the PV and the natural key order

Bytes counted per pass: the 16-bit input read once and the float8 output (plus scales)
written once; the copy reads and writes 2 bytes per element (`torch.Tensor.copy_`). The
ratio (prep GB/s) / (copy GB/s) says how close the pass is to the memory rate. Also times
the PyTorch quantizer (several passes) for scale, and (row `vt8`) the transposing copy of FA3's
float8 V (`transpose_codes` against the strided PyTorch copy `transpose_v`).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fp8_prep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hdim", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--nheads", type=int, default=16)
    ap.add_argument("--roles", nargs="+", default=["q", "k", "v"])
    ap.add_argument("--v-scaling", default="channel", choices=("block", "channel"))
    ap.add_argument("--block-n", type=int, default=128, help="keys per K (and block V) scale")
    ap.add_argument("--both-orders", action="store_true",
                    help="time V in both key orders, one after the other (row v: PV order, vn: natural)")
    ap.add_argument("--natural-order", action="store_true",
                    help="V^T keys in order (default: the Hopper FP8 kernel's PV key order, as fp8=True writes)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.fp8_prep times GPU kernels: no CUDA device here")
    import triton.testing

    from fa3py.fp8 import Fp8Format, quantize_operand, transpose_v
    from triton_fallback import fp8_prep

    fmt = Fp8Format(v_scaling=args.v_scaling, block_n=args.block_n, v_pv_order=not args.natural_order)
    print(f"# {torch.cuda.get_device_name()}, batch {args.batch}, {args.nheads} heads, seqlen {args.seqlen}, "
          f"V scaling {args.v_scaling}")
    print(f"{'hdim':>4} {'op':<3} {'prep us':>9} {'prep GB/s':>10} {'copy GB/s':>10} {'ratio':>6} {'torch us':>9}")
    for d in args.hdim:
        x = torch.randn(args.batch, args.seqlen, args.nheads, d, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(x)
        copy_ms = triton.testing.do_bench(lambda: dst.copy_(x), return_mode="median")
        copy_gbs = 2 * x.numel() * 2 / copy_ms / 1e6
        runs = [(role, fmt) for role in args.roles]
        if args.both_orders and "v" in args.roles:
            runs.append(("v", dataclasses.replace(fmt, v_pv_order=not fmt.v_pv_order)))
        for role, f in runs:
            assert fp8_prep.why_not(x, role, f) is None
            t = fp8_prep.quantize_operand(x, role, f)
            ms = triton.testing.do_bench(lambda: fp8_prep.quantize_operand(x, role, f), return_mode="median")
            torch_ms = triton.testing.do_bench(lambda: quantize_operand(x, role, f), return_mode="median")
            moved = x.numel() * 2 + t.data.numel() + t.scale.numel() * 4
            gbs = moved / ms / 1e6
            label = role if role != "v" or f.v_pv_order else "vn"
            print(f"{d:>4} {label:<3} {ms * 1e3:>9.1f} {gbs:>10.0f} {copy_gbs:>10.0f} {gbs / copy_gbs:>6.2f} "
                  f"{torch_ms * 1e3:>9.1f}", flush=True)
        # FA3's float8 V -> V^T in the PV key order (fa3py.fp8.from_descales): 1 byte read, 1 written
        v8 = x.to(torch.float8_e4m3fn)
        ms = triton.testing.do_bench(lambda: fp8_prep.transpose_codes(v8), return_mode="median")
        torch_ms = triton.testing.do_bench(lambda: transpose_v(v8), return_mode="median")
        gbs = 2 * v8.numel() / ms / 1e6
        print(f"{d:>4} {'vt8':<3} {ms * 1e3:>9.1f} {gbs:>10.0f} {copy_gbs:>10.0f} {gbs / copy_gbs:>6.2f} "
              f"{torch_ms * 1e3:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
