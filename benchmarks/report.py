"""Turns benchmark rows into a text table, a markdown summary, JSON and a TFLOP/s plot."""

from __future__ import annotations

import io
import json
import statistics
from collections import defaultdict
from pathlib import Path

ROW_KEYS = ("provider", "peer", "precision", "mode", "hdim", "seqlen", "causal", "batch",
            "nheads", "ms", "tflops", "ratio", "status", "note", "times_ms",  # ms: median of times_ms
            "sm_mhz", "power_w", "clock_limits",  # per round, with --clocks (clocks.py)
            "seqlen_q", "nheads_kv")  # queries and KV heads (older results: seqlen, nheads)


def _config(row):
    return (row["mode"], row["causal"], row["hdim"], row["seqlen"])


QUANTIZED = ("fp8", "int8")


def add_ratios(rows):
    """ratio = TFLOP/s / best peer's TFLOP/s at the same configuration.

    Peers are the providers that are not fa3py, running in bf16/fp16 and passing the spot
    check. Quantized peers (sageattention's INT8, FA3 with --fp8) are timed and shown but
    are not the baseline: their speed comes partly from lower precision.
    """
    best = defaultdict(float)
    for r in rows:
        if r["peer"] and r["status"] == "ok" and r.get("precision") not in QUANTIZED:
            best[_config(r)] = max(best[_config(r)], r["tflops"])
    for r in rows:
        b = best.get(_config(r))
        r["ratio"] = round(r["tflops"] / b, 3) if b and r["status"] == "ok" else None


def _sort_key(row):
    return (row["mode"] != "fwd", row["causal"], row["hdim"], row["seqlen"], row["provider"])


def format_table(rows) -> str:
    """One line per (provider, configuration): provider, hdim, seqlen, causal, mode, ms, TFLOP/s, ratio, status."""
    head = f"{'provider':<12} {'prec':>4} {'hdim':>4} {'seqlen':>6} {'causal':>6} {'mode':>4} " \
           f"{'ms':>9} {'TFLOP/s':>8} {'ratio':>6}  status"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=_sort_key):
        ms = f"{r['ms']:9.3f}" if r["ms"] is not None else f"{'-':>9}"
        tf = f"{r['tflops']:8.4g}" if r["tflops"] is not None else f"{'-':>8}"
        ratio = f"{r['ratio']:6.2f}" if r["ratio"] is not None else f"{'-':>6}"
        status = r["status"] + (f" ({r['note']})" if r["note"] else "")
        if r["status"] != "ok":
            status = f"{r['status'].upper()}: {r['note']}"  # whole: a cut "got 33" would read "got 3"
        lines.append(f"{r['provider']:<12} {r['precision']:>4} {r['hdim']:>4} {r['seqlen']:>6} {str(r['causal']):>6} "
                     f"{r['mode']:>4} {ms} {tf} {ratio}  {status}")
    return "\n".join(lines)


def format_markdown(doc) -> str:
    """TFLOP/s pivot tables (rows: hdim x seqlen, columns: providers), one per mode/causal."""
    meta, rows = doc["meta"], doc["rows"]
    out = [f"# fa3py attention benchmark: {meta['device_name']}", "",
           f"- date {meta['date']}, commit `{meta['commit']}`, torch {meta['torch']}, "
           f"triton {meta.get('triton')}, dtype {meta['args']['dtype']}"
           f"{' (fp8 on)' if meta['args'].get('fp8') else ''}",
           f"- peers: {json.dumps(meta.get('versions', {}))}",
           "- TFLOP/s counts only unmasked (query, key) pairs; `*` marks a failed spot-check, "
           "`x` an error; ratio = fa3py / best non-fa3py provider in bf16/fp16 "
           "(quantized peers such as sage's INT8 are shown but are not the baseline).", ""]
    args = meta["args"]
    if args.get("seqlen_q") or args.get("kv_heads"):
        out.insert(-1, f"- queries per sequence: {args.get('seqlen_q') or 'seqlen'} (`seqlen` counts the keys); "
                       f"KV heads: {args.get('kv_heads') or 'nheads'} (query heads: see results.json)")
    mm = meta.get("matmul_tflops")
    if mm:
        out.insert(-1, f"- dense matmul in the same run (torch.matmul, {meta['args']['dtype']}, "
                       f"{meta['matmul_n']}^3): {mm:.4g} TFLOP/s; `/ matmul` = best fa3py / that")
    if meta.get("rounds", 1) > 1:
        cut = meta.get("rounds_cut_budget")
        out.insert(-1, f"- each time: the median of {meta['rounds']} rounds over the whole grid, providers "
                       f"interleaved (the GPU clock's drift reaches every provider alike)"
                       f"{f'; {cut} repeats cut by the time budget' if cut else ''}")
    if args.get("cuda_graph"):
        out.insert(-1, "- times are CUDA-graph replays (host time per call left out)")
    if meta.get("not_run_budget"):
        out.insert(-1, f"- **time budget reached: {meta['not_run_budget']} measurements not run**")
    if meta.get("no_cuda"):
        out.insert(2, "**No CUDA GPU: CPU / PyTorch-path numbers.**\n")
    for name, why in sorted(doc.get("skipped", {}).items()):
        out.append(f"- skipped `{name}`: {why}")
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("fa3py"), p))
    for (mode, causal), cells, points in _pivots(rows):
        out += ["", f"## {mode}, causal={causal} (TFLOP/s)", "",
                "| hdim | seqlen | " + " | ".join(providers) + " | best fa3py / best peer |"
                + (" / matmul |" if mm else ""),
                "|---:|---:|" + "---:|" * (len(providers) + 1 + bool(mm))]
        for hdim, seqlen in points:
            line, ratios, ours = [], [], []
            for p in providers:
                r = cells.get((hdim, seqlen, p))
                if r is None:
                    line.append("")
                elif r["status"] == "ok":
                    line.append(f"{r['tflops']:.4g}")
                    if r["ratio"] is not None and not r["peer"]:
                        ratios.append(r["ratio"])
                    if p.startswith("fa3py"):
                        ours.append(r["tflops"])
                elif r["status"] == "wrong" and r["tflops"] is not None:
                    line.append(f"{r['tflops']:.4g}*")
                else:
                    line.append("x")
            ratio = f"{max(ratios):.2f}" if ratios else ""
            of_mm = (f" {max(ours) / mm:.2f} |" if ours else " |") if mm else ""
            out.append(f"| {hdim} | {seqlen} | " + " | ".join(line) + f" | {ratio} |" + of_mm)
    out += _clock_tables(rows, providers)
    notes = sorted({(r["provider"], r["mode"], r["note"]) for r in rows if r["status"] == "ok" and r["note"]})
    if notes:
        out += ["", "## Notes", ""] + [f"- `{p}` {m}: {n}" for p, m, n in notes]
    problems = [r for r in rows if r["status"] != "ok"]
    if problems:
        out += ["", "## Errors and failed checks", ""]
        seen = set()
        for r in sorted(problems, key=_sort_key):
            key = (r["provider"], r["status"], r["note"])
            if key not in seen:
                seen.add(key)
                out.append(f"- `{r['provider']}` hdim {r['hdim']} {r['mode']} causal={r['causal']}: "
                           f"{r['status']}: {r['note']}")
    return "\n".join(out) + "\n"


def _pivots(rows):
    """One pivot table per (mode, causal), forward first: ((mode, causal), {(hdim, seqlen,
    provider): row}, sorted (hdim, seqlen) points)."""
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["mode"], r["causal"])][(r["hdim"], r["seqlen"], r["provider"])] = r
    for key, cells in sorted(groups.items(), key=lambda kv: (kv[0][0] != "fwd", kv[0][1])):
        yield key, cells, sorted({(h, s) for h, s, _ in cells})


def _clock_tables(rows, providers) -> list[str]:
    """With --clocks: per point and provider, the SM clock (MHz) and power (W) while timed, the
    median over rounds."""
    timed = [r for r in rows if any(x is not None for x in r.get("sm_mhz") or [])]
    if not timed:
        return []
    med = lambda xs: statistics.median(x for x in xs if x is not None)
    out = ["", "## SM clock (MHz) / power (W) while timed", "",
           "Wall time moves with the clock: at equal SM cycles a provider timed at a lower clock "
           "shows a lower rate. After them, where the driver reported it: the share of samples in "
           "which it held the clock down, and why (power cap, hw-slowdown, thermal, power-brake).", ""]
    for (mode, causal), cells, points in _pivots(timed):
        out += [f"{mode}, causal={causal}:", "", "| hdim | seqlen | " + " | ".join(providers) + " |",
                "|---:|---:|" + "---:|" * len(providers)]
        for hdim, seqlen in points:
            line = []
            for p in providers:
                r = cells.get((hdim, seqlen, p))
                ok = r is not None and any(x is not None for x in r["sm_mhz"])
                line.append(f"{med(r['sm_mhz']):.0f} / {med(r['power_w']):.0f}{_limits(r)}" if ok else "")
            out.append(f"| {hdim} | {seqlen} | " + " | ".join(line) + " |")
        out.append("")
    return out


def _limits(row) -> str:
    """" power 45%, thermal 3%": each clock-limit reason's share of samples, the mean over the
    rounds that recorded reasons ("" where none did or none was seen)."""
    rounds = [x for x in row.get("clock_limits") or [] if x is not None]
    if not rounds:
        return ""
    names = sorted({n for x in rounds for n in x}, key=lambda n: -sum(x.get(n, 0) for x in rounds))
    return "".join(f" {n} {100 * statistics.fmean(x.get(n, 0) for x in rounds):.0f}%" for n in names)


def write_json(doc, path: Path, compact: bool = False):
    """Full JSON; compact (for committed results) stores rows as lists under "row_keys"."""
    if not compact:
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return
    head = {k: v for k, v in doc.items() if k != "rows"}
    keys = list(ROW_KEYS)
    rows = ",\n".join(json.dumps([r.get(k) for k in keys], separators=(",", ":")) for r in doc["rows"])
    path.write_text(json.dumps({**head, "row_keys": keys}, indent=1)[:-2]
                    + ',\n "rows": [\n' + rows + "\n ]\n}\n")


def load_json(path: Path) -> dict:
    """Reads either form that `write_json` writes."""
    doc = json.loads(Path(path).read_text())
    keys = doc.pop("row_keys", None)
    if keys:
        doc["rows"] = [dict(zip(keys, r)) for r in doc["rows"]]
    return doc


def plot(doc, path: Path):
    """TFLOP/s vs seqlen, one panel per (hdim, causal, mode). Returns None or why skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed ({e}): no plot"
    rows = [r for r in doc["rows"] if r["status"] == "ok"]
    if not rows:
        return "no valid timings to plot"
    panels = sorted({(r["mode"] != "fwd", r["mode"], r["causal"], r["hdim"]) for r in rows})
    hdims = sorted({p[3] for p in panels})
    lines = sorted({(p[1], p[2]) for p in panels}, key=lambda mc: (mc[0] != "fwd", mc[1]))
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (not p.startswith("fa3py"), p))
    seqlens = sorted({r["seqlen"] for r in rows})
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    fig, axes = plt.subplots(len(lines), len(hdims), squeeze=False,
                             figsize=(3.6 * len(hdims), 2.8 * len(lines)))
    for i, (mode, causal) in enumerate(lines):
        for j, hdim in enumerate(hdims):
            ax = axes[i][j]
            for p in providers:
                pts = sorted((r["seqlen"], r["tflops"]) for r in rows
                             if (r["provider"], r["mode"], r["causal"], r["hdim"]) == (p, mode, causal, hdim))
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, color=colors[p], label=p,
                            ls="-" if p.startswith("fa3py") else "--")
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
            ax.set_ylim(bottom=0)
            ax.set_title(f"hdim {hdim}, {'causal' if causal else 'non-causal'}, {mode}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("TFLOP/s", fontsize=8)
            if i == len(lines) - 1:
                ax.set_xlabel("seqlen", fontsize=8)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    meta = doc["meta"]
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(f"{meta['device_name']} | {meta['args']['dtype']} | {meta['commit'][:10]} | {meta['date'][:10]}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.07 if len(lines) > 1 else 0.12, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    try:  # a 64-colour palette keeps the committed PNG small
        from PIL import Image

        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)
    except ImportError:
        Path(path).write_bytes(buf.getvalue())
    return None
