"""Forward benchmark of the sm90 CuTe DSL kernel vs PyTorch SDPA (same run, same GPU).

FA3-paper grid: `--tokens` in total (batch = tokens // seqlen), nheads = 2048 // hdim, bf16.

    python -m benchmarks.cute_bench [--seqlens 512,8192] [--hdims 64,128,256] [--causal both]
                                 [--tiles "128:128x128,128x176;256:128x80s2"] [--candidates]
                                 [--ab diag_half] [--json out.json]
    python -m benchmarks.cute_bench --host     # host microseconds per call (tiny problem)
    python -m benchmarks.cute_bench --check ...  # GPU tests first, in this process (compiled
                                              # kernels are shared); no timing if they fail

`--tiles` lists tile variants per head dim (MxN, optional sS stages, optional +field to switch
boolean TileConfig fields on, e.g. 192x128+diag_half); tile_m 192 = 3 consumer warpgroups with
the 24/160 register split (config.tile_from_spec). `--candidates` adds config.CANDIDATES. Times are
`triton.testing.do_bench` medians of whole calls (host overhead included).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import torch

from benchmarks import need
from benchmarks.flops import flops
from benchmarks.run import _error_text


def _parse_tiles(spec: str) -> dict:
    """"128:128x128,128x176s2+diag_half;256:128x80" -> {128: ["128x128", "128x176s2+diag_half"],
    256: ["128x80"]} (each entry for config.tile_from_spec)."""
    return {int(hd): tiles.split(",") for hd, tiles in (part.split(":") for part in filter(None, spec.split(";")))}


def _tile_name(t) -> str:
    return f"{t.tile_m}x{t.tile_n}s{t.num_stages}"


CAUSALS = {"both": (False, True), "no": (False,), "yes": (True,)}


def points(hdims: str, seqlens: str, causal: str, tokens: int):
    """The grid: per head dim and seqlen, bf16 q, k, v (batch = tokens // seqlen, nheads =
    2048 // hdim), then one request per causal setting. Yields (d, s, b, h, q, k, v, causal, req)."""
    from fa3py.request import AttentionParams, AttentionRequest

    for d in map(int, hdims.split(",")):
        h = 2048 // d
        for s in map(int, seqlens.split(",")):
            b = max(tokens // s, 1)
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for c in CAUSALS[causal]:
                yield d, s, b, h, q, k, v, c, AttentionRequest(
                    q, k, v, AttentionParams(d**-0.5, window_right=0 if c else -1))
            del q, k, v


def variants(base, specs=(), ab=()) -> list:
    """[(name, FwdConfig)]: the table's `base`, one per tile spec (config.tile_from_spec) that
    changes it, one per entry of `ab`: a boolean TileConfig field toggled, or "field=value" set, or several
    of those joined by "+"."""
    from cute_kernels.config import tile_from_spec

    out = [("table " + _tile_name(base.tile), base)]
    for spec in specs:
        t = tile_from_spec(base.tile, spec)
        if t != base.tile:
            out.append((spec, dataclasses.replace(base, tile=t)))
    for entry in ab:
        t, names = base.tile, []
        for field in entry.split("+"):  # "a=1+b=0": one variant with both set
            if "=" in field:
                t = tile_from_spec(t, sets=[field])
                field = field.partition("=")[0]
            else:
                t = dataclasses.replace(t, **{field: not getattr(t, field)})
            names.append(f"{field}={getattr(t, field)}")
        out.append(("+".join(names), dataclasses.replace(base, tile=t)))
    return out


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(q, k, v, causal):
        if backend is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def host_overhead(n: int = 300) -> list:
    """Host microseconds per call on a tiny problem (GPU time << host time, so the enqueue rate
    is the host cost): cute_kernels.forward on each calling path, fa3py.attention, SDPA."""
    import cute_kernels
    import fa3py
    from fa3py.request import AttentionParams, AttentionRequest

    q, k, v = (torch.randn(1, 128, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    req = AttentionRequest(q, k, v, AttentionParams(128**-0.5))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def timed(fn):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        return dt

    rows = []
    saved = cute_kernels.launch.use_tvm_ffi
    for path in ([True, False] if saved else [False]):
        cute_kernels.launch.use_tvm_ffi = path
        rows.append((f"cute_kernels.forward ({'tvm-ffi' if path else 'from_dlpack'})",
                     timed(lambda: cute_kernels.forward(req))))
        rows.append((f"fa3py.attention(backend='cute') ({'tvm-ffi' if path else 'from_dlpack'})",
                     timed(lambda: fa3py.attention(q, k, v, backend="cute"))))
    cute_kernels.launch.use_tvm_ffi = saved
    rows.append(("AttentionRequest(...) + config_for", timed(
        lambda: cute_kernels.config_for(AttentionRequest(q, k, v, AttentionParams(128**-0.5))))))
    rows.append(("torch SDPA (default backend)", timed(
        lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))))
    from fa3py import dispatch
    from fa3py.validation import make_request

    creq = make_request(q, k, v, causal=True)
    cfg = cute_kernels.config_for(creq)
    rows += [
        ("  make_request", timed(lambda: make_request(q, k, v, causal=True))),
        ("  dispatch.choose (forced cute)", timed(lambda: dispatch.choose(creq, backend="cute"))),
        ("  dispatch.choose (auto)", timed(lambda: dispatch.choose(creq))),
        ("  config_for", timed(lambda: cute_kernels.config_for(creq))),
        ("  out + lse torch.empty", timed(lambda: (torch.empty(creq.out_shape, dtype=q.dtype, device=q.device),
                                                   torch.empty(creq.lse_shape, dtype=torch.float32,
                                                               device=q.device)))),
        ("  tile_counters", timed(lambda: cute_kernels.launch.tile_counters(q.device))),
        ("  cute_kernels.run (causal)", timed(lambda: cute_kernels.run(creq, cfg))),
    ]
    for name, us in rows:
        print(f"host {us:8.1f} us  {name}")
    return [dict(name=n, us=u) for n, u in rows] + launch_gap()


def launch_gap(hdim: int = 128, seqlen: int = 512, tokens: int = 16384) -> list:
    """Whole-call time (do_bench, L2 flushed between calls, so the GPU waits for the host when a
    call's host cost exceeds the flush) against CUDA-graph replay of the same call (no host cost):
    their difference is what host overhead adds to a short kernel's wall time."""
    import triton.testing

    import fa3py
    from benchmarks.run import cuda_graph

    b, h = max(tokens // seqlen, 1), 2048 // hdim
    q, k, v = (torch.randn(b, seqlen, h, hdim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    cudnn = _sdpa("CUDNN_ATTENTION")
    calls = {"fa3py.attention(backend='cute')": lambda: fa3py.attention(q, k, v, causal=True, backend="cute"),
             "sdpa cuDNN": lambda: cudnn(qt, kt, vt, True)}
    rows = []
    for name, fn in calls.items():
        fn()
        graph = cuda_graph(fn)
        for label, f in ((name, fn), (name + " graph replay", graph.replay)):
            us = 1e3 * triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")
            rows.append(dict(name=f"gap d{hdim} s{seqlen} causal: {label}", us=us))
            print(f"wall {us:8.1f} us  {label} (hdim {hdim}, seqlen {seqlen}, causal)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="8192")
    p.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seqlen")
    p.add_argument("--hdims", default="64,128,256")
    p.add_argument("--causal", default="both", choices=list(CAUSALS))
    p.add_argument("--tiles", default="", help="tile variants per head dim, see module doc")
    p.add_argument("--candidates", action="store_true", help="also run config.CANDIDATES")
    p.add_argument("--ab", default="", help="comma list of variants (see `variants`): a boolean TileConfig "
                                            "field toggled, field=value, or a=1+b=0")
    p.add_argument("--sdpa", default="CUDNN_ATTENTION", help="comma list of SDPBackend names, '' for none")
    p.add_argument("--rep", type=int, default=60, help="do_bench rep in ms")
    p.add_argument("--rounds", type=int, default=1,
                   help="time all variants of a point this many times, interleaved; report the median "
                        "(evens out clock/thermal drift between variants)")
    p.add_argument("--fa4", action="store_true", help="add flash-attn-4's forward when importable (a peer)")
    p.add_argument("--host", action="store_true", help="also measure host overhead per call")
    p.add_argument("--check", action="store_true", help="run `pytest -m gpu tests/test_cute_gpu.py` first")
    p.add_argument("--check-k", default=None, help="with --check: only gpu tests matching this -k expression")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    need.module("benchmarks.cute_bench", "cutlass", "hopper")
    need.module("benchmarks.cute_bench", "triton", "triton")
    need.cuda_gpu("benchmarks.cute_bench", sm90=True)
    import triton.testing

    import cute_kernels
    from cute_kernels.config import CANDIDATES

    if a.check:
        import pytest

        t0 = time.perf_counter()
        sel = ["-k", a.check_k] if a.check_k else []
        rc = pytest.main(["-q", "-x", "-m", "gpu", "tests/test_cute_gpu.py", "-p", "no:cacheprovider", *sel])
        print(f"# gpu tests: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc != 0:
            raise SystemExit(int(rc))
    result = dict(gpu=torch.cuda.get_device_name(), tvm_ffi=cute_kernels.launch.use_tvm_ffi, rows=[])
    if a.host:
        result["host"] = host_overhead()
    tiles = _parse_tiles(a.tiles)
    cands = CANDIDATES if a.candidates else {}
    sdpas = [s for s in a.sdpa.split(",") if s]
    fa4 = None
    if a.fa4:
        try:
            from flash_attn.cute import flash_attn_func as fa4
        except ImportError as e:
            print(f"# fa4 not importable: {e}")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=a.rep, return_mode="median")
    print(f"# {result['gpu']} tvm_ffi={cute_kernels.launch.use_tvm_ffi} tokens={a.tokens}")
    print(f"{'hdim':>4} {'causal':>6} {'seqlen':>6} {'variant':>28} {'ms':>8} {'TFLOP/s':>8}")
    for d, s, b, h, q, k, v, causal, req in points(a.hdims, a.seqlens, a.causal, a.tokens):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        f = flops(b, h, s, s, d, d, causal=causal)
        base = cute_kernels.config_for(req)
        named = variants(base, tiles.get(d, []), filter(None, a.ab.split(",")))
        for c in cands.get(d, []):
            t = dataclasses.replace(c, persistent=base.tile.persistent)
            named.append(("cand " + _tile_name(t), dataclasses.replace(base, tile=t)))
        named = [(name, lambda cfg=cfg: cute_kernels.run(req, cfg)) for name, cfg in named]
        named += [(f"sdpa {sb or 'default'}", functools.partial(_sdpa(sb), qt, kt, vt, causal))
                  for sb in sdpas]  # the backend wrapper built once, outside the timed call
        if fa4 is not None:
            named.append(("fa4", functools.partial(fa4, q, k, v, causal=causal)))
        times = {name: [] for name, _ in named}
        for _ in range(a.rounds):
            for name, fn in named:
                try:
                    fn()
                    times[name].append(bench(fn))
                except Exception as e:  # noqa: BLE001  (a variant may not fit / be supported)
                    print(f"# {name}: {_error_text(e)}")
                    times[name].append(float("nan"))
        for name, _ in named:
            ms = statistics.median(times[name])
            row = dict(hdim=d, causal=causal, seqlen=s, batch=b, nheads=h, variant=name, ms=ms,
                       tflops=f / ms / 1e9, rounds_ms=times[name])
            result["rows"].append(row)
            print(f"{d:4d} {causal!s:>6} {s:6d} {name:>28} {ms:8.3f} {row['tflops']:8.1f}", flush=True)
            _dump(result, a.json)  # after every row: a run cut off at its time limit keeps its rows
    _dump(result, a.json)


def _dump(result: dict, path):
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
