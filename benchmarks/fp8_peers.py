"""FP8 attention on Hopper beside its FP8 peers, in one run (CUDA only).

    python -m benchmarks.fp8_peers --json out.json --md out.md
    python -m benchmarks.fp8_peers --hdim 128 --seqlen 16384 --causal false
    python -m benchmarks.fp8_peers --cuda-graph ...   # CUDA-graph replays: the kernels alone

The FA3 paper's grid (16k tokens, hidden 2048: batch = 16384 / seqlen, nheads = 2048 / hdim),
forward only. Every row (and the prep and a copy) is called once per round, in an order rotated
each round, back to back as benchmarks.paired times its providers; a row's time is its median
over --pairs rounds (the GPU's clocks and temperature then weigh on all rows alike). Eager calls
count the host's per-call cost where it exceeds the GPU's (short sequences); --cuda-graph replays
each row's captured call instead. Rows per point:
  fa3py bf16       fa3py.attention(q, k, v) on the bf16 inputs (the cute kernel)
  fa3py fp8        fa3py.attention(q, k, v, fp8=True): the prep (Hadamard rotation + block
                   quantization, one Triton pass) and the FP8 kernel, end to end
  fa3py fp8 kernel the FP8 kernel alone, on operands quantized once (fa3py.quantize_fp8 in the
                   kernel's layout): a KV cache or weights quantized ahead
  fa3py fa3-format fa3py.flash_attn_func on FA3's inputs (float8 q/k/v, descales (batch, kv heads)),
                   with V transposed by a host copy (copy-V) or in the kernel's shared memory (V-rows;
                   with --vt-unroll also "V-rows unrolled": FwdConfig.fp8_vt_unroll, up to hdim 128)
  fa3-fwd fp8      FlashAttention-3's own FP8 kernel on the same float8 inputs (peer wheel fa3-fwd)
  cudnn fp8        cuDNN's FP8 SDPA (nvidia-cudnn-frontend; per-tensor scales, e4m3 output)
  prep             the fp8=True prep alone, with its GB/s (bytes read + written) beside a copy; its
                   e4m3 codes by the hardware's conversion (the default on sm89+) and by integer
                   arithmetic (FA3PY_FP8_PREP_NATIVE=0)
Each output's relative RMSE against fa3py's bf16 output is printed beside its time (a sanity
check that the row computes attention; `benchmarks.accuracy` measures accuracy against fp64).
Peers that are not installed are left out and named."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.flops import flops as attention_flops  # noqa: E402

FP8 = torch.float8_e4m3fn


def _per_tensor(x):
    s = x.abs().amax().float().clamp_min(1e-12) / 448
    return (x.float() / s).to(FP8), s


def _cudnn(q8, k8, v8, causal, scales, v_amax):
    """cuDNN's FP8 SDPA graph over BSHD e4m3 tensors (as BHSD views): (call, out, o_scale)."""
    import cudnn

    qh, kh, vh = (x.transpose(1, 2) for x in (q8, k8, v8))
    one = lambda x: torch.full((1, 1, 1, 1), float(x), device="cuda")  # noqa: E731
    o_scale = 448.0 / v_amax
    tdq, tdk, tdv = (one(s) for s in scales)
    tds, tss, tso = one(1 / 256.0), one(256.0), one(o_scale)
    h = cudnn.create_handle()
    cudnn.set_stream(h, torch.cuda.current_stream().cuda_stream)
    g = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=h)
    gq, gk, gv = g.tensor_like(qh), g.tensor_like(kh), g.tensor_like(vh)
    gdq, gdk, gdv, gds, gss, gso = (g.tensor_like(t) for t in (tdq, tdk, tdv, tds, tss, tso))
    o, _, _, amax_o = g.sdpa_fp8(q=gq, k=gk, v=gv, descale_q=gdq, descale_k=gdk, descale_v=gdv, descale_s=gds,
                                 scale_s=gss, scale_o=gso, generate_stats=False,
                                 attn_scale=1 / math.sqrt(q8.shape[-1]), use_causal_mask=causal)
    out = torch.empty_like(qh)
    ao = torch.zeros(1, 1, 1, 1, device="cuda")
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(cudnn.data_type.FP8_E4M3)
    amax_o.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)
    pack = {gq: qh, gk: kh, gv: vh, gdq: tdq, gdk: tdk, gdv: tdv, gds: tds, gss: tss, gso: tso, o: out, amax_o: ao}

    def call():  # on the current stream (a CUDA-graph capture runs on its own)
        cudnn.set_stream(h, torch.cuda.current_stream().cuda_stream)
        g.execute(pack, ws, handle=h)
    return call, out, o_scale


def _with(module, name: str, value, call):
    """`call` with `module.name` set to `value` while it runs (a switch the library reads per call:
    cute_kernels.launch.fp8_direct_enabled, triton_fallback.fp8_prep.NATIVE_E4M3)."""
    def run():
        before = getattr(module, name)
        setattr(module, name, value)
        try:
            return call()
        finally:
            setattr(module, name, before)
    return run


def rows_for(q, k, v, causal, vt_unroll: bool = False):
    """{name: (call, output-to-compare or None)}; {name: why left out}."""
    import fa3py
    import cute_kernels
    from fa3py.validation import make_request

    rows, skipped = {}, {}
    rows["fa3py bf16"] = lambda: fa3py.attention(q, k, v, causal=causal, backend="cute")
    rows["fa3py fp8"] = lambda: fa3py.attention(q, k, v, causal=causal, fp8=True, backend="cute")
    req = make_request(q, k, v, causal=causal, fp8=True)
    why = cute_kernels.launch.fp8_why_not(req)
    if why:
        skipped["fa3py fp8 kernel"] = why
    else:
        tile_n = cute_kernels.launch.fp8_config_for(req).tile.tile_n
        qkv = fa3py.quantize_fp8(q, k, v, block_n=tile_n, v_pv_order=True)
        rows["fa3py fp8 kernel"] = lambda: fa3py.attention(qkv.q, qkv.k, qkv.v, causal=causal, backend="cute")
    (q8, sq), (k8, sk), (v8, sv) = (_per_tensor(x) for x in (q, k, v))
    b, hk = q.shape[0], k.shape[2]
    ds = [s.reshape(1, 1).expand(b, hk).contiguous() for s in (sq, sk, sv)]
    fa3_call = lambda: fa3py.flash_attn_func(q8, k8, v8, causal=causal, q_descale=ds[0], k_descale=ds[1],  # noqa: E731
                                             v_descale=ds[2])
    # FA3's inputs both ways the kernel takes V (cute_kernels.launch.fp8_direct_enabled): a host copy
    # of V transposed into the PV key order, or V's rows transposed in shared memory by the kernel
    rows["fa3py fa3-format copy-V"] = _with(cute_kernels.launch, "fp8_direct_enabled", False, fa3_call)
    rows["fa3py fa3-format V-rows"] = _with(cute_kernels.launch, "fp8_direct_enabled", True, fa3_call)
    if vt_unroll and v.shape[-1] <= cute_kernels.config.FP8_VT_UNROLL_MAX_HDIMV:  # (the opt-in, beside the shipped one)
        rows["fa3py fa3-format V-rows unrolled"] = _with(cute_kernels.launch, "fp8_direct_enabled", True, _with(
            cute_kernels.launch, "fp8_vt_unroll_enabled", True, fa3_call))
    try:
        from fa3_fwd_interface import flash_attn_func as fa3_func

        rows["fa3-fwd fp8"] = lambda: fa3_func(q8, k8, v8, causal=causal, q_descale=ds[0], k_descale=ds[1],
                                                v_descale=ds[2])
    except ImportError as e:
        skipped["fa3-fwd fp8"] = f"not installed ({e})"
    try:
        call, out, o_scale = _cudnn(q8, k8, v8, causal, (sq, sk, sv), float(v.abs().amax()))
        rows["cudnn fp8"] = lambda: (call(), out.transpose(1, 2).float() / o_scale)[1]
    except Exception as e:  # noqa: BLE001 - any cuDNN failure leaves the peer out, named
        skipped["cudnn fp8"] = f"{type(e).__name__}: {e}"[:200]
    return rows, skipped


def _cell(row: dict) -> str:
    """TFLOP/s (relative RMSE against fa3py's bf16 output, "-" where that row did not run)."""
    rel = row["rel_rmse_vs_bf16"]
    return f"{row['tflops']:.0f} ({'-' if rel is None else f'{rel:.1e}'})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hdim", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--seqlen", type=int, nargs="+", default=[512, 2048, 16384])
    ap.add_argument("--causal", nargs="+", default=["false", "true"], choices=["false", "true"])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--pairs", type=int, default=30, help="rounds of one call per row, rows in rotated order")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time CUDA-graph replays of each row (the kernels without the host's per-call "
                         "cost; a row that cannot be captured is named and left out)")
    ap.add_argument("--vt-unroll", action="store_true",
                    help="add a row of FA3's inputs with V's rows transposed by the unrolled transposer "
                         "(FwdConfig.fp8_vt_unroll, opt-in), up to hdim 128")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.fp8_peers: needs a CUDA GPU (Hopper for fa3py's FP8 kernel)")
    import numpy as np

    import fa3py
    from benchmarks import run
    from benchmarks.paired import time_pairs
    from triton_fallback import fp8_prep

    torch.manual_seed(0)
    results = []
    for d in args.hdim:
        for s in args.seqlen:
            for c in args.causal:
                causal = c == "true"
                b, h = max(1, args.tokens // s), args.hidden // d
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = attention_flops(b, h, s, s, d, d, causal=causal)
                rows, skipped = rows_for(q, k, v, causal, args.vt_unroll)
                point = {"hdim": d, "seqlen": s, "causal": causal, "batch": b, "nheads": h, "rows": {},
                         "skipped": skipped}
                calls, outs = {}, {}
                for name, call in rows.items():  # each row once (compiles, and a failing row is named)
                    try:
                        out = call()
                        outs[name] = (out[0] if isinstance(out, tuple) else out).float()
                        torch.cuda.synchronize()
                        calls[name] = run.cuda_graph(call).replay if args.cuda_graph else call
                    except Exception as e:  # noqa: BLE001 - the row is reported failed, the run goes on
                        point["skipped"][name] = f"{type(e).__name__}: {e}"[:300]
                # the prep alone (reads q, k, v in bf16, writes them in e4m3; scales ignored) and a copy
                # of the same bytes, timed in the same rotation
                calls["prep"] = lambda: fa3py.quantize_fp8(q, k, v, v_pv_order=True)
                calls["prep integer"] = _with(fp8_prep, "NATIVE_E4M3", False, calls["prep"])  # integer e4m3 codes
                calls["copy"] = lambda: torch.cat([q, k, v])
                if args.cuda_graph:
                    for n in ("prep", "prep integer", "copy"):
                        calls[n] = run.cuda_graph(calls[n]).replay
                names = list(calls)
                times, _ = time_pairs([calls[n] for n in names], args.pairs, torch.device("cuda"))
                ms = {n: float(np.median(t)) for n, t in zip(names, times)}
                ref = outs.get("fa3py bf16")
                for name in rows:
                    if name in calls:
                        out = outs[name]
                        rel = None if ref is None else float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
                        point["rows"][name] = {"ms": ms[name], "tflops": flops / ms[name] / 1e9, "rel_rmse_vs_bf16": rel}
                nbytes = 3 * q.numel() * (2 + 1)
                point["prep"] = {"ms": ms["prep"], "GB/s": nbytes / ms["prep"] / 1e6,
                                 "integer GB/s": nbytes / ms["prep integer"] / 1e6,
                                 "copy GB/s": 2 * 3 * q.numel() * 2 / ms["copy"] / 1e6}
                results.append(point)
                line = "  ".join(f"{n}: {_cell(r)}" for n, r in point["rows"].items())
                print(f"hdim {d} seqlen {s} causal {causal}: {line}; prep {point['prep']['GB/s']:.0f} GB/s, integer "
                      f"{point['prep']['integer GB/s']:.0f} (copy {point['prep']['copy GB/s']:.0f}); left out: {skipped}",
                      flush=True)
    meta = run.metadata(argparse.Namespace(commit=None), torch.device("cuda"))  # FA3PY_COMMIT overrides git
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": meta["date"],
           "commit": meta["commit"], "dirty": meta.get("dirty"), "pairs": args.pairs,
           "cuda_graph": bool(args.cuda_graph), "points": results}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if args.md:
        names = list(dict.fromkeys(n for p in results for n in p["rows"]))
        lines = [f"FP8 forward, {doc['gpu']}, TFLOP/s (relative RMSE against fa3py bf16); {doc['date']}, commit "
                 f"`{doc['commit']}`{' (tree modified)' if doc['dirty'] else ''}, torch {doc['torch']}, "
                 f"{args.pairs} rounds, rows in rotated order call by call"
                 f"{', CUDA-graph replays' if args.cuda_graph else ', eager calls'}", "",
                 "| hdim | seqlen | causal | " + " | ".join(names) + " | prep GB/s: e4m3 by cvt / by integer ops (copy) |",
                 "|---" * (4 + len(names)) + "|"]
        for p in results:
            cells = [_cell(p["rows"][n]) if n in p["rows"]
                     else "-" for n in names]
            lines.append(f"| {p['hdim']} | {p['seqlen']} | {p['causal']} | " + " | ".join(cells)
                         + f" | {p['prep']['GB/s']:.0f} / {p['prep']['integer GB/s']:.0f} ({p['prep']['copy GB/s']:.0f}) |")
        Path(args.md).write_text("\n".join(lines) + "\n")
    return doc


if __name__ == "__main__":
    os.environ.setdefault("FA3PY_CUTE_FP8", "1")
    main()
