"""Attention benchmark: fa3py's backends against PyTorch SDPA and installed peers.

    python -m benchmarks.run                  # FlashAttention-3 paper grid (GPU) / small CPU run
    python -m benchmarks.run --quick --out $OUT/bench --budget-s 420
    python -m benchmarks.run --hdim 128 --seqlen 4096 8192 --mode fwd --providers fa3py fa4
    python -m benchmarks.run --hdim 128 --seqlen 8192 --seqlen-q 1 --kv-heads 4 --nheads 32 --batch 64  # decoding
    python -m benchmarks.run --mode fwd --cuda-graph --hdim 128 --seqlen 4096 65536 --seqlen-q 1 --nheads 32 --kv-heads 8 --batch 1 --paged 16 64 256 --providers fa3py:cute sdpa:cudnn  # paged decoding
    python -m benchmarks.run --from-json bench_out/results.json --save-results

GPU grid (FlashAttention-3 paper): 16k tokens (batch = 16384 // seqlen), hidden 2048
(nheads = 2048 // hdim), hdim 64/128/256, seqlen 512..16k, causal and not, fwd and bwd.
Each provider is spot-checked against a float32 reference at a small shape before it is
timed. Writes results.json, results.txt, results.md and tflops.png to --out.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks import report  # noqa: E402
from benchmarks.clocks import ClockSampler, smi_id  # noqa: E402
from benchmarks.flops import flops  # noqa: E402
from benchmarks.providers import DEFAULT_EXCLUDED, PROVIDERS, Case, kvcache_provider, select, versions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAPER_HDIMS = (64, 128, 256)
PAPER_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_BWD_HDIMS = (128,)  # --quick: fwd on the full grid, bwd at these head dims only
QUICK_EXCLUDED = ("fa3py:torch",)  # --quick on a GPU: the fallback path is not a contender
CPU_DEFAULT = {"batch": 1, "nheads": 4, "hdim": (64,), "seqlen": (256, 512)}
SLOW_CALL_S = 1.0  # a call slower than this is timed with 3 plain calls, not do_bench


# ---- configuration ----------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("fwd", "bwd", "both"), default="both")
    ap.add_argument("--hdim", type=int, nargs="+", help="default 64 128 256 (GPU), 64 (CPU)")
    ap.add_argument("--seqlen", type=int, nargs="+", help="default 512..16384 (GPU), 256 512 (CPU)")
    ap.add_argument("--causal", choices=("both", "true", "false"), default="both")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--fp8", action="store_true",
                    help="fa3py runs fp8=True (forward only); FA3 gets FP8 inputs; other peers stay in --dtype")
    ap.add_argument("--providers", nargs="+", metavar="NAME",
                    help="names or prefixes: fa3py fa3py:cute fa3py:triton fa3py:torch sdpa sdpa:cudnn "
                         "sdpa:flash sdpa:math fa4 fa3 sage, fa3py:cute-bwd (the sm90 backward kernel) and "
                         "fa3py:cute-compiled (fa3py:cute in torch.compile; default: all but sdpa:math, "
                         "fa3py:cute-bwd and fa3py:cute-compiled, which only their names select)")
    ap.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seqlen (GPU)")
    ap.add_argument("--hidden", type=int, default=2048, help="nheads = hidden // hdim (GPU)")
    ap.add_argument("--batch", type=int, help="fixed batch instead of tokens // seqlen")
    ap.add_argument("--nheads", type=int, help="fixed nheads instead of hidden // hdim")
    ap.add_argument("--seqlen-q", type=int, metavar="N",
                    help="queries per sequence (default: --seqlen's value); e.g. 1 for decoding, "
                         "--seqlen then being the keys (KV cache length)")
    ap.add_argument("--kv-heads", type=int, metavar="N",
                    help="KV heads (MQA/GQA): nheads / this query heads share each (default: nheads)")
    ap.add_argument("--quick", action="store_true",
                    help="GPU preset: fwd on the full grid, bwd at hdim 128 only, shorter timing, "
                         "fa3py:torch left out unless --providers names it")
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--rounds", type=int,
                    help="time the whole grid this many times, providers interleaved, and keep each "
                         "point's median: a GPU whose clock drifts (power, heat) then biases no provider "
                         "(default 3 on a GPU, 1 on the CPU)")
    ap.add_argument("--clocks", action="store_true",
                    help="also record the mean SM clock (MHz) and power (W) while each point is timed, "
                         "and how often the driver held the clock down and why (nvidia-smi; CUDA "
                         "only): wall time moves with the clock")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time forward calls replayed from CUDA graphs (each provider's call captured "
                         "once per input set), so host time per call is left out: what a server that "
                         "captures its decoding steps sees (CUDA, --mode fwd only)")
    ap.add_argument("--paged", type=int, nargs="+", metavar="PAGE_SIZE",
                    help="also time fa3py.flash_attn_with_kvcache on the keys as a contiguous cache and as "
                         "paged caches of these page sizes (fa3py-kvcache:contiguous, fa3py-kvcache:pagedN; "
                         "CUDA, --mode fwd), e.g. --paged 16 64 256 with --seqlen-q 1 --cuda-graph; with "
                         "--fp8 they decode FA3's way, q and cache in float8_e4m3fn with descales")
    ap.add_argument("--budget-s", type=float, help="stop starting new measurements after this long")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness spot-checks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_out", help="output dir (default bench_out/ in the working directory)")
    ap.add_argument("--save-results", nargs="?", const=str(REPO / "benchmarks" / "results"), metavar="DIR",
                    help="also copy JSON, PNG and markdown to DIR/<date>_<gpu>_<commit>/ "
                         "(default DIR: benchmarks/results)")
    ap.add_argument("--from-json", metavar="FILE", help="re-render (and --save-results) a results.json")
    ap.add_argument("--commit", help="git commit to record (default: git rev-parse HEAD, if any); "
                                     "with --from-json, replaces the recorded one")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: the CUDA GPU if there is one")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (default: torch's)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup_ms, args.rep_ms = min(args.warmup_ms, 10.0), min(args.rep_ms, 40.0)
    return args


def build_cases(args, device) -> list[Case]:
    cpu = device.type != "cuda"
    hdims = args.hdim or (CPU_DEFAULT["hdim"] if cpu else PAPER_HDIMS)
    seqlens = args.seqlen or (CPU_DEFAULT["seqlen"] if cpu else PAPER_SEQLENS)
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    modes = ("fwd", "bwd") if args.mode == "both" else (args.mode,)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cases = []
    for mode, causal, hdim, seqlen in itertools.product(modes, causals, hdims, seqlens):
        if args.quick and mode == "bwd" and not args.hdim and hdim not in QUICK_BWD_HDIMS:
            continue
        batch = args.batch or (CPU_DEFAULT["batch"] if cpu else max(1, args.tokens // seqlen))
        nheads = args.nheads or (CPU_DEFAULT["nheads"] if cpu else max(1, args.hidden // hdim))
        if args.kv_heads and nheads % args.kv_heads:
            raise SystemExit(f"--kv-heads {args.kv_heads} must divide nheads {nheads} (hdim {hdim})")
        cases.append(Case(batch, nheads, seqlen, hdim, causal, mode, dtype, args.fp8,
                          seqlen_q=args.seqlen_q or 0, nheads_kv=args.kv_heads or 0))
    return cases


# ---- inputs, reference, timing -------------------------------------------------------------

def make_inputs(case: Case, device, n_sets: int, gen: torch.Generator):
    """`n_sets` fresh random (q, k, v, dout) sets; leaves require grad for bwd."""
    q_shape, kv_shape = (case.batch, case.sq, case.nheads, case.hdim), (case.batch, case.seqlen, case.hk, case.hdim)
    sets = []
    for _ in range(n_sets):
        q, k, v, dout = (torch.randn(shape, generator=gen, device=device, dtype=case.dtype)
                         for shape in (q_shape, kv_shape, kv_shape, q_shape))
        if case.mode == "bwd":
            for x in (q, k, v):
                x.requires_grad_(True)
        sets.append((q, k, v, dout))
    return sets


def n_input_sets(case: Case, device) -> int:
    """Enough sets to rotate through twice the L2 when one set is smaller than it."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    set_bytes = (2 * case.batch * case.hdim * (case.sq * case.nheads + case.seqlen * case.hk)
                 * torch.finfo(case.dtype).bits // 8)
    return max(1, min(8, math.ceil(2 * l2 / set_bytes)))


def reference(q, k, v, causal: bool, dtype):
    """Attention in `dtype` with PyTorch ops: the fp32 yardstick, or PyTorch's own error."""
    q, k, v = (x.to(dtype) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]  # query heads per KV head
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5)
    if causal:  # bottom-right aligned
        sq, sk = s.shape[-2:]
        keep = torch.arange(sk, device=s.device)[None] <= torch.arange(sq, device=s.device)[:, None] + sk - sq
        s = s.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def _outputs(provider, forward, q, k, v, dout, case):
    """Provider's output and, for bwd, its gradients."""
    args = provider.prepare(q, k, v, case) if provider.prepare else (q, k, v)
    out = forward(*args, case)
    if case.mode == "fwd":
        return [out]
    return [out, *torch.autograd.grad(out, (q, k, v), dout)]


def spot_check(provider, forward, case: Case, device, gen) -> dict:
    """Compares the provider with the float32 reference at a small shape of `case`'s kind.

    Passes when max|x - ref| <= 2 * max|x_pt - ref| + atol for the output (and dq, dk, dv
    for bwd), x_pt being the same math by PyTorch in the input dtype. Quantized providers
    (fp8, int8) are held to PyTorch run on inputs rounded to float8_e4m3fn. The shape is
    ragged (seqlen 300, 113 on CPU); a provider that raises there is checked at 256, so
    that a peer without ragged support is still measured on the grid's round sizes.
    """
    ragged = 300 if device.type == "cuda" else 113
    try:
        return _check_at(ragged, provider, forward, case, device, gen)
    except Exception as e:
        result = _check_at(256, provider, forward, case, device, gen)
        result["note"] += f"; at seqlen {ragged} it raised {_error_text(e)}"
        return result


def _check_at(seqlen, provider, forward, case, device, gen) -> dict:
    group = case.nheads // case.hk
    small = Case(batch=2, nheads=3 if group == 1 else 2 * group, seqlen=seqlen, hdim=case.hdim,
                 causal=case.causal, mode=case.mode, dtype=case.dtype, fp8=case.fp8,
                 seqlen_q=min(case.seqlen_q, seqlen), nheads_kv=0 if group == 1 else 2)
    (q, k, v, dout), = make_inputs(small, device, 1, gen)
    got = _outputs(provider, forward, q.detach().clone().requires_grad_(q.requires_grad),
                   k.detach().clone().requires_grad_(k.requires_grad),
                   v.detach().clone().requires_grad_(v.requires_grad), dout, small)
    quantized = provider.precision(small) in ("fp8", "int8")

    def math_in(dtype, round_fp8=False):
        leaves = [x.detach().clone() for x in (q, k, v)]
        if round_fp8:
            leaves = [x.to(torch.float8_e4m3fn).to(x.dtype) for x in leaves]
        leaves = [x.to(dtype).requires_grad_(small.mode == "bwd") for x in leaves]
        out = reference(*leaves, small.causal, dtype)
        if small.mode == "fwd":
            return [out]
        return [out, *torch.autograd.grad(out, leaves, dout.to(dtype))]

    ref = math_in(torch.float32)
    pt = math_in(case.dtype, round_fp8=quantized)
    names = ("out", "dq", "dk", "dv")
    worst = {}
    ok = True
    for name, x, r, p in zip(names, got, ref, pt):
        err = (x.float() - r).abs().max().item()
        tol = 2 * (p.float() - r).abs().max().item() + 1e-4 + 1e-3 * r.abs().max().item()
        ok &= bool(err <= tol)  # NaN fails
        worst[name] = (err, tol)
    note = ", ".join(f"{n} err {e:.2e} (tol {t:.2e})" for n, (e, t) in worst.items())
    return {"ok": ok, "note": note}


def time_ms(fn, device, warmup_ms: float, rep_ms: float) -> float:
    """Median ms per call. fn() has already run once, so JIT compilation is not timed."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once = time.perf_counter() - t0
        if once > SLOW_CALL_S:  # do_bench would spend many seconds here
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return sorted(times)[1] * 1e3
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 15):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


MATMUL_N = 8192


def dense_matmul(args, device, n: int = MATMUL_N, gen=None):
    """A call of torch.matmul on two random n x n matrices in the run's dtype, warmed by one call."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    a, b = (torch.randn(n, n, generator=gen, device=device, dtype=dtype) for _ in range(2))
    fn = lambda: torch.matmul(a, b)  # noqa: E731
    fn()
    return fn


def matmul_tflops(args, device) -> float:
    """The dense matmul rate in the run's dtype on this GPU, same run (torch.matmul, N^3 with
    N = MATMUL_N): the ceiling the attention rates are read against."""
    fn = dense_matmul(args, device)
    ms = time_ms(fn, device, args.warmup_ms, args.rep_ms)
    return round(2 * MATMUL_N**3 / ms / 1e9, 1)


def bench_case(provider, forward, case: Case, device, gen, args) -> tuple[float, Optional[dict]]:
    """Times `case` for one provider, rotating input sets; returns ms and, with --clocks on CUDA,
    the SM clock and power while it was timed (clocks.ClockSampler; None otherwise)."""
    sets = make_inputs(case, device, n_input_sets(case, device), gen)
    prepared = [(*(provider.prepare(q, k, v, case) if provider.prepare else (q, k, v)), dout)
                for q, k, v, dout in sets]
    if case.mode == "fwd":
        calls = [lambda a=a: forward(*a[:3], case) for a in prepared]
    else:
        calls = []
        for (q, k, v, _), (qp, kp, vp, dout) in zip(sets, prepared):
            out = forward(qp, kp, vp, case)
            calls.append(lambda out=out, leaves=(q, k, v), dout=dout:
                         torch.autograd.grad(out, leaves, dout, retain_graph=True))
    for call in calls:  # compile and warm every set outside the timing
        call()
    if args.cuda_graph:
        calls = [cuda_graph(call).replay for call in calls]
    rotation = itertools.cycle(calls)

    def fn():
        return next(rotation)()

    if not (args.clocks and device.type == "cuda"):
        return time_ms(fn, device, args.warmup_ms, args.rep_ms), None
    with ClockSampler(smi_id(device)) as sampler:
        ms = time_ms(fn, device, args.warmup_ms, args.rep_ms)
    return ms, sampler.result


def use_capture_stream() -> None:
    """Make one non-default stream current for the rest of the process, so that set-up, forwards
    and captures (`cuda_graph`) all run on it. A backward replayed from a graph needs this: autograd
    runs each backward op on its forward op's stream, so a forward made on the default stream puts
    the captured backward's launches there, outside the capture, which invalidates it ("operation
    failed due to a previous error during capture"). Call it before any input is made."""
    torch.cuda.set_stream(torch.cuda.Stream())


def cuda_graph(call) -> "torch.cuda.CUDAGraph":
    """`call` captured in a CUDA graph (after a warm-up call on a side stream, as PyTorch asks), on
    the current stream where that is not the default one (`use_capture_stream`). A provider that
    cannot be captured raises here, and its row says so; the current stream is restored then
    (torch.cuda.graph leaves its capture stream current when capture_end raises, and every later
    call of the process would run there)."""
    stream = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        call()
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=None if stream == torch.cuda.default_stream() else stream):
            call()
    except Exception as e:
        torch.cuda.set_stream(stream)
        raise RuntimeError(f"CUDA graph capture failed: {_error_text(e)}") from e
    return graph


# ---- metadata and output ----------------------------------------------------------------

def _git(*cmd):
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return None


def metadata(args, device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # --commit / FA3PY_COMMIT first: a copied tree may carry a stale .git.
    given = args.commit or os.environ.get("FA3PY_COMMIT")
    commit = given or _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if not given else None
    cuda = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "no_cuda": not cuda,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "versions": versions(),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "save_results", "from_json")},
        "flops": "2*b*h*pairs*(d+dv) over unmasked pairs; x2.5 bwd",
    }


def write_outputs(doc, out: Path, final: bool):
    out.mkdir(parents=True, exist_ok=True)
    report.add_ratios(doc["rows"])
    report.write_json(doc, out / "results.json")
    if not final:
        return
    (out / "results.txt").write_text(report.format_table(doc["rows"]) + "\n")
    (out / "results.md").write_text(report.format_markdown(doc))
    doc["meta"].pop("plot", None)
    why = report.plot(doc, out / "tflops.png")
    if why:
        doc["meta"]["plot"] = why
        print(f"note: {why}", file=sys.stderr)


def save_results(doc, out: Path, dest_root: Path) -> Path:
    """Copies JSON (compact), PNG and markdown into dest_root/<date>_<gpu>_<commit>/."""
    meta = doc["meta"]
    gpu = re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower().replace("nvidia", "")).strip("-")
    gpu = "cpu" if meta.get("no_cuda") else gpu[:24]
    dest = dest_root / f"{meta['date'][:10]}_{gpu}_{meta['commit'][:8]}"
    dest.mkdir(parents=True, exist_ok=True)
    report.write_json(doc, dest / "results.json", compact=True)
    (dest / "results.md").write_text(report.format_markdown(doc))
    if (out / "tflops.png").exists():
        shutil.copy(out / "tflops.png", dest / "tflops.png")
    size = sum(f.stat().st_size for f in dest.iterdir())
    print(f"saved {dest} ({size / 1024:.0f} KB)", file=sys.stderr)
    if size > 200 * 1024:
        print("warning: over 200 KB; trim before committing", file=sys.stderr)
    return dest


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet = total, 0, quiet
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, label: str):
        self.done += 1
        if self.quiet:
            return
        elapsed = time.monotonic() - self.start
        width = 24
        fill = int(width * self.done / max(self.total, 1))
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s  {label}")
        if self.tty:
            print("\r" + line[:120].ljust(120), end="" if self.done < self.total else "\n",
                  file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


# ---- main -------------------------------------------------------------------------------

def resolve_device(args, tool: str = "benchmarks.run") -> torch.device:
    """--device: auto is the CUDA GPU if there is one; cuda without one ends the run, saying why."""
    from fa3py.dispatch import cuda_missing

    if args.device == "cuda" and cuda_missing(torch.device("cuda")):
        raise SystemExit(f"{tool}: --device cuda: {cuda_missing(torch.device('cuda'))}")
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    return torch.device("cuda" if cuda else "cpu")


def run(args) -> dict:
    device = resolve_device(args)
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type != "cuda":
        why = "no CUDA GPU found" if args.device == "auto" else "--device cpu"
        print(f"NOTE: {why}: these are CPU numbers of the PyTorch path, not kernel performance.", flush=True)
    if args.cuda_graph and (device.type != "cuda" or args.mode != "fwd"):
        raise SystemExit("benchmarks.run: --cuda-graph needs a CUDA GPU and --mode fwd")
    cases = build_cases(args, device)
    selection = args.providers
    if args.quick and selection is None and device.type == "cuda":
        selection = [p.name for p in PROVIDERS if p.name not in (*DEFAULT_EXCLUDED, *QUICK_EXCLUDED)]
    chosen, skipped = select(selection, device)
    if args.paged:
        if device.type != "cuda" or args.mode != "fwd":
            raise SystemExit("benchmarks.run: --paged needs a CUDA GPU and --mode fwd")
        chosen += [(p, p.load()) for p in map(kvcache_provider, (0, *args.paged))]
    if selection is not args.providers:
        skipped.update({name: "left out by --quick (name it in --providers to include)" for name in QUICK_EXCLUDED})
    unknown = [name for name, why in skipped.items() if why.startswith("unknown provider")]
    if unknown:
        raise SystemExit(f"benchmarks.run: --providers: {', '.join(unknown)}: {skipped[unknown[0]]}")
    for name, why in skipped.items():
        print(f"skip {name}: {why}", file=sys.stderr)
    if not chosen:
        raise SystemExit("benchmarks.run: nothing to run: every selected provider was skipped (above)")
    doc = {"meta": metadata(args, device), "skipped": skipped, "checks": [], "explain": {}, "rows": []}
    if device.type == "cuda":
        doc["meta"].update(matmul_n=MATMUL_N, matmul_tflops=matmul_tflops(args, device))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    fa3py_backends = [p.name.split(":", 1)[1] for p, _ in chosen if p.name.startswith("fa3py:")]
    rounds = max(1, args.rounds or (3 if device.type == "cuda" else 1))
    doc["meta"]["rounds"] = rounds
    steps = [(case, provider, forward) for case in cases for provider, forward in chosen]
    progress = Progress(len(steps) * rounds, args.quiet)
    start = time.monotonic()
    not_run, short_rounds = 0, 0
    # Round 1 measures every point (and spot-checks each provider); later rounds time them again,
    # interleaved, so slow drift of the GPU's clock reaches every provider alike.
    schedule = [(r, n) for r in range(rounds) for n in interleaved(len(cases), len(chosen), r)]
    for i, (r, n) in enumerate(schedule):
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            not_run = sum(1 for r_left, _ in schedule[i:] if r_left == 0)
            short_rounds = len(schedule) - i - not_run
            break
        case, provider, forward = steps[n]
        progress.step(f"{provider.name} h{case.hdim} s{case.seqlen}{f' q{case.sq}' if case.seqlen_q else ''} "
                      f"{'causal ' if case.causal else ''}"
                      f"{case.mode}{f' (round {r + 1})' if rounds > 1 else ''}")
        if r == 0:
            if fa3py_backends:
                _explain(doc, case, device, fa3py_backends)
            doc["rows"].append(_measure(provider, forward, case, device, gen, args, doc))
        else:
            _remeasure(doc["rows"][n], provider, forward, case, device, gen, args)
        write_outputs(doc, out, final=False)  # a killed run still leaves its results
        if device.type == "cuda":
            torch.cuda.empty_cache()
    doc["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
    doc["meta"]["not_run_budget"] = not_run
    doc["meta"]["rounds_cut_budget"] = short_rounds
    if not_run or short_rounds:
        print(f"warning: time budget reached; {not_run} measurements not run, {short_rounds} repeats "
              "skipped", file=sys.stderr)
    return doc


def interleaved(n_cases: int, n_providers: int, round_: int) -> list[int]:
    """The order of the steps (case-major: step = case * n_providers + provider) in one round.
    Each round starts a point's providers one further along, so over as many rounds as there are
    providers each one is timed first once: the provider timed first after a heavy point runs
    while the GPU's power average is still high and gets a lower clock (seen on an H200 at the
    512-token points after 16k), which should not fall on one provider every time."""
    return [c * n_providers + (j + round_) % n_providers
            for c in range(n_cases) for j in range(n_providers)]


def _set_time(row, case, times):
    """The row's ms (median of its rounds) and TFLOP/s."""
    ms = statistics.median(times)
    tf = flops(case.batch, case.nheads, case.sq, case.seqlen, case.hdim, causal=case.causal,
               mode=case.mode) / (ms * 1e-3) / 1e12
    row.update(ms=float(f"{ms:.5g}"), tflops=float(f"{tf:.4g}"), times_ms=[float(f"{t:.5g}") for t in times])


def _remeasure(row, provider, forward, case, device, gen, args):
    """A later round: time a point that was timed in round 1 again."""
    if row["ms"] is None:
        return
    try:
        ms, clock = bench_case(provider, forward, case, device, gen, args)
    except Exception as e:  # it ran in round 1: say so rather than drop the row
        row["note"] = (row["note"] + "; " if row["note"] else "") + "a later round raised " + _error_text(e)
        return
    _set_time(row, case, [*row["times_ms"], ms])
    _add_clock(row, clock, args)


def _add_clock(row, clock, args):
    """With --clocks, per round: the mean SM clock and power while timed, and the share of
    samples with each clock-limit reason (None where unknown)."""
    if args.clocks:
        row["sm_mhz"].append(clock and clock["sm_mhz"])
        row["power_w"].append(clock and clock["power_w"])
        row["clock_limits"].append(clock and clock.get("limits"))


def _explain(doc, case, device, backends):
    """Records which fa3py backend would run forward and backward, auto and forced."""
    keys = {b: f"{b or 'auto'} hdim={case.hdim} causal={case.causal}" for b in (None, *backends)}
    keys = {b: key for b, key in keys.items() if key not in doc["explain"]}
    if not keys:
        return
    q = torch.empty(case.batch, case.sq, case.nheads, case.hdim, device=device, dtype=case.dtype)
    k = torch.empty(case.batch, case.seqlen, case.hk, case.hdim, device=device, dtype=case.dtype)
    for backend, key in keys.items():
        try:
            import fa3py

            doc["explain"][key] = str(fa3py.explain(q, k, k, causal=case.causal, backend=backend))
        except Exception as e:
            doc["explain"][key] = _error_text(e)


def _measure(provider, forward, case, device, gen, args, doc) -> dict:
    row = {"provider": provider.name, "peer": provider.peer, "precision": provider.precision(case),
           "mode": case.mode, "hdim": case.hdim, "seqlen": case.seqlen, "causal": case.causal,
           "batch": case.batch, "nheads": case.nheads, "seqlen_q": case.sq, "nheads_kv": case.hk, "ms": None, "tflops": None, "ratio": None,
           "status": "ok", "note": "", "times_ms": [], "sm_mhz": [], "power_w": [], "clock_limits": []}
    group = [provider.name, case.hdim, case.causal, case.mode]
    if case.mode == "bwd" and not provider.backward:
        return {**row, "status": "error", "note": "no backward"}
    if case.mode == "bwd" and row["precision"] == "fp8":
        return {**row, "status": "error", "note": "fp8 is forward-only"}
    check = next((c for c in doc["checks"] if c["group"] == group), None)
    if check is None and not args.no_check:
        try:
            check = {"group": group, **spot_check(provider, forward, case, device, gen)}
        except Exception as e:  # an unsupported config: every seqlen of this group would fail
            check = {"group": group, "ok": False, "error": True, "note": _error_text(e)}
        doc["checks"].append(check)
        if not check["ok"]:
            print(f"\nWARNING: {provider.name} hdim {case.hdim} causal={case.causal} {case.mode}: "
                  f"spot-check {'raised' if check.get('error') else 'failed'}: {check['note']}",
                  file=sys.stderr)
    if check is not None and check.get("error"):
        return {**row, "status": "error", "note": check["note"]}
    try:
        ms, clock = bench_case(provider, forward, case, device, gen, args)
    except Exception as e:
        return {**row, "status": "error", "note": _error_text(e)}
    _set_time(row, case, [ms])
    _add_clock(row, clock, args)
    row["note"] = _handed_on(provider, case, doc)
    if check is not None and not check["ok"]:
        row.update(status="wrong", note="failed spot-check: " + check["note"])
    return row


def _handed_on(provider, case, doc) -> str:
    """For a forced fa3py backend without its own backward: which backend ran the backward."""
    if case.mode != "bwd" or not provider.name.startswith("fa3py:"):
        return ""
    backend = provider.name.split(":", 1)[1]
    text = doc["explain"].get(f"{backend} hdim={case.hdim} causal={case.causal}", "")
    line = next((ln for ln in text.splitlines() if ln.startswith("backward: ")), "")
    used = line.removeprefix("backward: ").split(" ")[0]
    return f"backward ran on {used}" if used and used != backend else ""


def _error_text(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:300].rsplit(" ", 1)[0] + " [...]"  # never mid-word


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        doc = report.load_json(args.from_json)
        if args.commit:
            doc["meta"]["commit"] = args.commit
            doc["meta"]["dirty"] = None  # the caller vouches for the tree that ran
    else:
        threads = torch.get_num_threads()
        try:
            doc = run(args)
        finally:
            torch.set_num_threads(threads)
    write_outputs(doc, out, final=True)
    table = report.format_table(doc["rows"])
    if doc["meta"].get("no_cuda"):
        print("NOTE: no CUDA GPU: CPU / PyTorch-path numbers.")
    print(f"# {doc['meta']['device_name']} | torch {doc['meta']['torch']} | commit {doc['meta']['commit'][:10]}")
    print(table)
    png = "" if doc["meta"].get("plot") else ", tflops.png"
    print(f"wrote {out}/results.json, results.txt, results.md{png}", file=sys.stderr)
    if args.save_results:
        save_results(doc, out, Path(args.save_results))
    return doc


if __name__ == "__main__":
    main()
