"""The benchmark harness on the CPU: exact FLOP counts, and a tiny end-to-end run."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from benchmarks import report, run
from benchmarks.flops import MODE_FACTOR, flops, unmasked_pairs
from benchmarks.providers import Provider


def brute_force_pairs(seqlen_q, seqlen_k, causal, window):
    """Counts the kept (query, key) pairs of fa3py's bottom-right aligned mask directly."""
    wl, wr = window
    if causal:
        wr = 0
    i = torch.arange(seqlen_q)[:, None]
    j = torch.arange(seqlen_k)[None]
    diag = i + seqlen_k - seqlen_q
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if wl >= 0:
        keep &= j >= diag - wl
    if wr >= 0:
        keep &= j <= diag + wr
    return int(keep.sum())


SIZES = (1, 2, 3, 16, 113, 203)
WINDOWS = (-1, 0, 1, 7, 64, 300)


@pytest.mark.parametrize("seqlen_q,seqlen_k", list(itertools.product(SIZES, SIZES)))
def test_unmasked_pairs_match_brute_force(seqlen_q, seqlen_k):
    for causal, wl, wr in itertools.product((False, True), WINDOWS, WINDOWS):
        expected = brute_force_pairs(seqlen_q, seqlen_k, causal, (wl, wr))
        assert unmasked_pairs(seqlen_q, seqlen_k, causal, (wl, wr)) == expected, (causal, wl, wr)


def test_flops_formula_and_mode_factors():
    b, h, s, d = 3, 5, 1024, 128
    assert flops(b, h, s, s, d) == 4 * b * h * s * s * d
    assert flops(b, h, s, s, d, causal=True) == 4 * b * h * (s * (s + 1) // 2) * d
    assert flops(b, h, 239, 1023, 64, headdim_v=32) == 2 * b * h * 239 * 1023 * (64 + 32)
    pairs = brute_force_pairs(799, 1024, True, (100, -1))
    fwd = flops(2, 4, 799, 1024, 64, causal=True, window=(100, -1))
    assert fwd == 2 * 2 * 4 * pairs * 128
    for mode, factor in (("bwd", 2.5), ("fwd_bwd", 3.5)):
        assert MODE_FACTOR[mode] == factor
        assert flops(2, 4, 799, 1024, 64, causal=True, window=(100, -1), mode=mode) == factor * fwd
    # Causal with seqlen_q > seqlen_k: the first rows see no key at all.
    assert flops(1, 1, 10, 4, 8, causal=True) == 2 * 10 * 8 * 2


def test_ratios_compare_with_the_best_valid_peer():
    def row(provider, tflops, peer, status="ok", precision="bf16"):
        return {"provider": provider, "peer": peer, "mode": "fwd", "causal": False, "hdim": 64,
                "seqlen": 512, "tflops": tflops, "status": status, "precision": precision}

    rows = [row("fa3py:cute", 300.0, False), row("sdpa:flash", 200.0, True),
            row("fa4", 250.0, True), row("fa3", 900.0, True, status="wrong"),
            row("sage", 500.0, True, precision="int8")]
    report.add_ratios(rows)
    assert [r["ratio"] for r in rows] == [1.2, 0.8, 1.0, None, 2.0]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    doc = run.main(["--device", "cpu", "--seqlen", "128", "--threads", "1", "--quiet",
                    "--rep-ms", "20", "--out", str(out)])
    return doc, out


def test_cpu_run_writes_results(cpu_run, capsys):
    doc, out = cpu_run
    assert doc["meta"]["no_cuda"] is True
    for key in ("date", "device_name", "torch", "triton", "commit", "args", "versions"):
        assert key in doc["meta"]
    assert {"meta", "rows", "checks", "skipped", "explain"} <= set(doc)
    rows = doc["rows"]
    assert {(r["mode"], r["causal"]) for r in rows} == {("fwd", False), ("fwd", True), ("bwd", False), ("bwd", True)}
    for r in rows:
        assert set(report.ROW_KEYS) == set(r)
        assert r["provider"] == "fa3py:torch" and r["status"] == "ok", r
        assert r["seqlen"] == 128 and r["ms"] > 0 and r["tflops"] > 0
    assert all(c["ok"] for c in doc["checks"]), doc["checks"]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == rows
    table = (out / "results.txt").read_text()
    for column in ("provider", "hdim", "seqlen", "causal", "mode", "ms", "TFLOP/s", "ratio"):
        assert column in table.splitlines()[0]
    assert "No CUDA GPU" in (out / "results.md").read_text()


def test_rounds_keep_the_median_of_interleaved_repeats(tmp_path):
    doc = run.main(["--device", "cpu", "--seqlen", "64", "--mode", "fwd", "--causal", "false",
                    "--threads", "1", "--quiet", "--rep-ms", "5", "--rounds", "3", "--out", str(tmp_path)])
    row, = doc["rows"]
    assert doc["meta"]["rounds"] == 3 and len(row["times_ms"]) == 3
    assert row["ms"] == pytest.approx(sorted(row["times_ms"])[1], rel=1e-4)
    assert "median of 3 rounds" in (tmp_path / "results.md").read_text()
    assert report.load_json(tmp_path / "results.json")["rows"][0]["times_ms"] == row["times_ms"]
    cut = run.main(["--device", "cpu", "--seqlen", "64", "--mode", "fwd", "--causal", "false",
                    "--threads", "1", "--quiet", "--rep-ms", "5", "--rounds", "3", "--budget-s", "0",
                    "--out", str(tmp_path / "cut")])
    assert cut["meta"]["not_run_budget"] == 1 and cut["rows"] == []


def test_each_round_starts_a_point_with_the_next_provider():
    for cases, providers in ((1, 1), (2, 3), (3, 2)):
        firsts = set()
        for r in range(providers):
            order = run.interleaved(cases, providers, r)
            assert sorted(order) == list(range(cases * providers))  # every step once a round
            for c in range(cases):  # a point's providers stay together
                block = order[c * providers:(c + 1) * providers]
                assert {n // providers for n in block} == {c}
                firsts.add((c, block[0] % providers))
        assert firsts == {(c, j) for c in range(cases) for j in range(providers)}
    assert run.interleaved(2, 3, 0) == [0, 1, 2, 3, 4, 5]  # round 1 in table order (rows append)


def test_markdown_reads_rates_against_the_same_run_matmul(cpu_run):
    doc, _ = cpu_run
    assert "matmul_tflops" not in doc["meta"]  # measured on CUDA only
    fwd = next(r for r in doc["rows"] if r["mode"] == "fwd" and not r["causal"])
    md = report.format_markdown({**doc, "meta": {**doc["meta"], "matmul_n": 8192,
                                                 "matmul_tflops": 2 * fwd["tflops"]}})
    line = next(l for l in md.splitlines() if l.startswith(f"| {fwd['hdim']} | {fwd['seqlen']} |"))
    assert "/ matmul |" in md and line.endswith(" 0.50 |"), line


def test_from_json_saves_small_results(cpu_run, tmp_path):
    _, out = cpu_run
    doc = run.main(["--from-json", str(out / "results.json"), "--out", str(tmp_path / "again"),
                    "--save-results", str(tmp_path / "results"), "--commit", "0123456789abcdef"])
    saved, = (tmp_path / "results").iterdir()
    assert saved.name.endswith("_cpu_01234567")
    assert {"results.json", "results.md"} <= {f.name for f in saved.iterdir()}
    assert sum(f.stat().st_size for f in saved.iterdir()) < 200 * 1024
    assert report.load_json(saved / "results.json")["rows"] == doc["rows"]


def test_spot_check_catches_a_wrong_provider():
    def forward(q, k, v, case):  # ignores the causal mask
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    wrong = Provider("wrong", peer=True, load=lambda: forward, cuda_only=False)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    for causal, expect_ok in ((False, True), (True, False)):
        case = run.Case(1, 2, 64, 64, causal, "bwd", torch.bfloat16)
        assert run.spot_check(wrong, forward, case, device, gen)["ok"] is expect_ok


def test_decoding_shapes_run_and_count_query_rows(tmp_path):
    """--seqlen-q / --kv-heads: few queries against a longer KV, query heads sharing KV heads;
    rows record both, FLOPs count the queries, the spot-check runs at a GQA shape too."""
    doc = run.main(["--device", "cpu", "--hdim", "64", "--seqlen", "96", "--seqlen-q", "5", "--kv-heads", "2",
                    "--nheads", "6", "--mode", "fwd", "--threads", "1", "--quiet", "--rep-ms", "5",
                    "--out", str(tmp_path)])
    assert {(r["seqlen_q"], r["seqlen"], r["nheads"], r["nheads_kv"], r["status"]) for r in doc["rows"]} == \
        {(5, 96, 6, 2, "ok")}
    for r in doc["rows"]:
        expect = flops(r["batch"], 6, 5, 96, 64, causal=r["causal"], mode="fwd") / (r["ms"] * 1e-3) / 1e12
        assert r["tflops"] == pytest.approx(expect, rel=1e-3)
    assert all(c["ok"] for c in doc["checks"])
    assert "queries per sequence: 5" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_provider_decoding_shapes(causal):
    """The SDPA peer with fewer queries than keys (causal bottom-right aligned, as fa3py and
    FlashAttention count it, not SDPA's top-left is_causal) and GQA, against the reference."""
    from benchmarks.providers import sdpa_provider

    forward = sdpa_provider("math", "MATH", cuda_only=False).load()
    case = run.Case(2, 6, 40, 32, causal, "fwd", torch.float32, seqlen_q=7, nheads_kv=2)
    (q, k, v, _), = run.make_inputs(case, torch.device("cpu"), 1, torch.Generator().manual_seed(0))
    assert q.shape == (2, 7, 6, 32) and k.shape == v.shape == (2, 40, 2, 32)
    want = run.reference(q.double(), k.double(), v.double(), causal, torch.float64)
    assert (forward(q, k, v, case).double() - want).abs().max() < 1e-5


def test_clock_sampler_averages_nvidia_smi_samples(tmp_path):
    """`--clocks`: mean SM clock and power over the samples taken while the block ran; None
    (not an error) without nvidia-smi."""
    import time

    from benchmarks.clocks import ClockSampler

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/usr/bin/env bash\n[ \"$1\" = --query-gpu=clocks.sm,power.draw ] || exit 3\n"
                    "i=0\nwhile true; do echo \"$((1900 + 20 * (i % 2))), $((600 + 10 * (i % 2)))\"; "
                    "i=$((i + 1)); sleep 0.01; done\n")
    fake.chmod(0o755)
    with ClockSampler("0", period_ms=10, smi=str(fake)) as s:
        time.sleep(0.3)
    assert s.result["samples"] >= 5
    assert 1900 <= s.result["sm_mhz"] <= 1920 and 600 <= s.result["power_w"] <= 610
    assert "limits" not in s.result  # this nvidia-smi refused the reasons field: sampled without
    fake.write_text(fake.read_text().replace("|| exit 3", "|| { echo asked >> " + str(tmp_path / "asked")
                                             + "; exit 3; }"))
    with ClockSampler("0", period_ms=10, smi=str(fake)) as s:
        time.sleep(0.05)
    assert s.result["samples"] >= 1 and not (tmp_path / "asked").exists()  # not asked again
    with ClockSampler("0", smi=str(tmp_path / "missing")) as s:
        pass
    assert s.result is None


def test_clock_sampler_reports_clock_limit_reasons(tmp_path):
    """Where nvidia-smi knows `clocks_throttle_reasons.active`: the share of samples with each
    limiting reason (power cap in every other sample here, idle and sync boost not counted)."""
    import time

    from benchmarks.clocks import ClockSampler

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/usr/bin/env bash\n"
                    "[ \"$1\" = --query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active ] || exit 3\n"
                    "i=0\nwhile true; do [ $((i % 2)) = 0 ] && r=0x0000000000000004 || r=0x0000000000000011\n"
                    "echo \"1800, 690, $r\"; i=$((i + 1)); sleep 0.01; done\n")
    fake.chmod(0o755)
    with ClockSampler("0", period_ms=10, smi=str(fake)) as s:
        time.sleep(0.3)
    assert s.result["samples"] >= 5 and s.result["sm_mhz"] == 1800
    assert set(s.result["limits"]) == {"power"} and 0.3 <= s.result["limits"]["power"] <= 0.7


def test_markdown_shows_clocks_per_provider(cpu_run, tmp_path):
    doc, _ = cpu_run
    rows = [dict(r, sm_mhz=[1700 + i, 1710 + i, 1690 + i], power_w=[650, 640, 660]) for i, r in enumerate(doc["rows"])]
    md = report.format_markdown({**doc, "rows": rows})
    r = rows[0]
    assert "## SM clock (MHz) / power (W) while timed" in md
    line = next(l for l in md.split("## SM clock")[1].splitlines() if l.startswith(f"| {r['hdim']} | {r['seqlen']} |"))
    assert f"{r['sm_mhz'][0]} / 650 |" in line  # medians over the rounds: 1700 and 650
    limited = [dict(rows[0], clock_limits=[{"power": 0.5, "thermal": 0.1}, None, {"power": 0.3}])] + rows[1:]
    line = next(l for l in report.format_markdown({**doc, "rows": limited}).split("## SM clock")[1].splitlines()
                if l.startswith(f"| {r['hdim']} | {r['seqlen']} |"))
    assert f"{r['sm_mhz'][0]} / 650 power 40% thermal 5%" in line  # means over the rounds with reasons
    report.write_json({**doc, "rows": rows}, tmp_path / "r.json", compact=True)
    assert report.load_json(tmp_path / "r.json")["rows"][0]["sm_mhz"] == r["sm_mhz"]
    assert "SM clock" not in report.format_markdown(doc)  # no --clocks: no table


def test_cuda_graph_needs_a_gpu_and_fwd(cpu_run):
    """--cuda-graph refuses what it cannot do (no CUDA, a backward) with a message that names it;
    the markdown says when times are graph replays."""
    for argv in (["--device", "cpu", "--mode", "fwd"], ["--mode", "both"]):
        with pytest.raises(SystemExit, match="--cuda-graph needs a CUDA GPU and --mode fwd"):
            run.main([*argv, "--cuda-graph", "--seqlen", "64", "--quiet"])
    doc, _ = cpu_run
    graphed = {**doc, "meta": {**doc["meta"], "args": {**doc["meta"]["args"], "cuda_graph": True}}}
    assert "CUDA-graph replays" in report.format_markdown(graphed)
    assert "CUDA-graph replays" not in report.format_markdown(doc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_decode(tmp_path):
    """Decoding shapes timed from CUDA-graph replays: every provider that captures gives a
    checked, timed row (a provider that cannot be captured says so in its row)."""
    doc = run.main(["--mode", "fwd", "--hdim", "128", "--seqlen", "2048", "--seqlen-q", "1",
                    "--kv-heads", "2", "--nheads", "8", "--batch", "2", "--causal", "false",
                    "--cuda-graph", "--rounds", "1", "--quiet", "--out", str(tmp_path)])
    rows = {r["provider"]: r for r in doc["rows"]}
    assert rows and all(r["status"] == "ok" or "capture" in r["note"] for r in rows.values())
    assert any(r["status"] == "ok" and r["ms"] > 0 for name, r in rows.items() if name.startswith("fa3py"))


# ---- benchmarks.paired ----------------------------------------------------------------------

def test_median_ratio_of_pairs():
    """Per-pair ratios: a 3% lead under 10% common-mode noise (the clock moving both providers
    alike) is found with an interval that excludes 1; swapping the two gives the inverse."""
    from benchmarks.paired import median_ratio

    rng = np.random.default_rng(1)
    clock = 1.0 + 0.1 * rng.random(400)  # moves both calls of a pair
    theirs = 2.0 * clock * (1 + 0.002 * rng.standard_normal(400))
    ours = 0.97 * 2.0 * clock * (1 + 0.002 * rng.standard_normal(400))
    s = median_ratio(ours, theirs)
    assert abs(s["median"] - 0.97) < 0.002 and s["ci95"][0] <= 0.97 <= s["ci95"][1] < 1.0
    assert s["won"] > 0.99 and s["pairs"] == 400
    t = median_ratio(theirs, ours)
    assert abs(t["median"] - 1 / 0.97) < 0.003 and t["won"] < 0.01


def test_pair_ratios_best_peer():
    """Against the faster peer of each pair: here peer a wins the even pairs and b the odd ones,
    so ours (1.0) / best peer is 1 / 0.9 although ours beats each peer's median (1.05)."""
    from benchmarks.paired import pair_ratios

    a = [0.9, 1.2] * 50
    b = [1.2, 0.9] * 50
    r = pair_ratios(["fa3py:cute", "a", "b"], [[1.0] * 100, a, b])
    assert set(r) == {"fa3py:cute / a", "fa3py:cute / b", "fa3py:cute / best peer"}
    assert abs(r["fa3py:cute / best peer"]["median"] - 1 / 0.9) < 1e-9 and r["fa3py:cute / best peer"]["won"] == 0
    assert r["fa3py:cute / a"]["won"] == 0.5
    assert set(pair_ratios(["fa3py:cute", "a"], [[1.0], [2.0]])) == {"fa3py:cute / a"}


def test_time_pairs_rotates_the_order():
    """Every pair calls each provider once; the first one rotates from pair to pair; the first
    pair (the warm-up from an idle GPU) is dropped."""
    from benchmarks.paired import time_pairs

    log = []
    calls = [lambda i=i: log.append(i) for i in range(3)]
    times, _ = time_pairs(calls, 4, torch.device("cpu"))
    assert [len(t) for t in times] == [4, 4, 4]
    pairs = [log[i:i + 3] for i in range(0, len(log), 3)]
    assert len(pairs) == 5 and all(sorted(p) == [0, 1, 2] for p in pairs)
    assert [p[0] for p in pairs] == [0, 1, 2, 0, 1]


def test_paired_cpu_run(tmp_path, monkeypatch):
    """End to end on the CPU: two providers, a ratio per fa3py provider and peer, JSON written."""
    from benchmarks import paired

    doc = paired.main(["--device", "cpu", "--hdim", "64", "--seqlen", "64", "--causal", "true", "--batch", "1",
                       "--nheads", "2", "--providers", "fa3py:torch", "sdpa:math", "--pairs", "6",
                       "--json", str(tmp_path / "p.json")])
    (row,) = doc["rows"]
    assert set(row["ms"]) == {"fa3py:torch", "sdpa:math"} and all(ms > 0 for ms in row["ms"].values())
    (label, s), = row["ratios"].items()  # one peer: no "best peer" row
    assert label == "fa3py:torch / sdpa:math" and s["pairs"] == 6 and s["ci95"][0] <= s["median"] <= s["ci95"][1]
    assert json.loads((tmp_path / "p.json").read_text())["meta"]["pairs"] == 6
    paired.main(["--from-json", str(tmp_path / "p.json"), "--md", str(tmp_path / "p.md")])
    md = (tmp_path / "p.md").read_text()  # one table per causal; the ratio cell with its interval
    assert "## causal=True" in md and f"| 64 | 64 | {row['ms']['fa3py:torch']:.4f} |" in md
    assert f"{s['median']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" in md
    with pytest.raises(SystemExit, match="two providers"):
        paired.main(["--device", "cpu", "--hdim", "64", "--seqlen", "64", "--providers", "sdpa:math"])
    # The matmul share is a per-pair quantity: with known timings (CPU wall times are too noisy to
    # check a formula against) each provider's share is the median over pairs of its rate / the
    # matmul's rate in the same pair, which differs from the quotient of the medians here.
    timed = {"fa3py:torch": [2.0, 4.0, 3.0], "sdpa:math": [1.0, 2.0, 1.5], "matmul": [0.5, 2.0, 3.0]}
    real_time_pairs = paired.time_pairs

    def fixed_time_pairs(calls, pairs, device):
        real_time_pairs(calls, 1, device)  # every call still runs
        return [list(t) for t in timed.values()], 1.0

    monkeypatch.setattr(paired, "time_pairs", fixed_time_pairs)
    doc = paired.main(["--device", "cpu", "--hdim", "64", "--seqlen", "64", "--batch", "1", "--nheads", "2",
                       "--causal", "true", "--providers", "fa3py:torch", "sdpa:math", "--pairs", "3", "--matmul",
                       "--matmul-n", "256", "--md", str(tmp_path / "m.md")])
    monkeypatch.setattr(paired, "time_pairs", real_time_pairs)
    (row,) = doc["rows"]  # the matmul is in every pair but is neither ours nor a peer
    assert set(row["ms"]) == set(row["matmul_share"]) == {"fa3py:torch", "sdpa:math"} and len(row["ratios"]) == 1
    work, mm_work = flops(1, 2, 64, 64, 64, causal=True), 2 * 256**3
    mm = np.asarray(timed["matmul"])
    for n, s in row["matmul_share"].items():
        want = np.median(work * mm / (mm_work * np.asarray(timed[n])))
        assert s["pairs"] == 3 and s["median"] == pytest.approx(want) and s["ci95"][0] <= want <= s["ci95"][1]
        assert s["median"] != pytest.approx(row["tflops"][n] / row["matmul_tflops"])  # not the medians' quotient
    assert "fa3py:torch / matmul" in (tmp_path / "m.md").read_text()
    with pytest.raises(SystemExit, match="--cuda-graph needs a CUDA GPU"):
        paired.main(["--device", "cpu", "--hdim", "64", "--seqlen", "64", "--cuda-graph"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
def test_gpu_paired(graph):
    """On the GPU: CUDA events between back-to-back calls (eager, or graph replays); the host
    time per call is recorded, and a graph replay costs the host under 50 us."""
    from benchmarks import paired

    doc = paired.main(["--hdim", "128", "--seqlen", "4096", "--causal", "true", "--providers", "fa3py:cute",
                       "sdpa:cudnn", "--pairs", "20"] + (["--cuda-graph"] if graph else []))
    (row,) = doc["rows"]
    assert doc["meta"]["cuda_graph"] is graph
    assert row["host_ms_per_call"] > 0 and any(k.startswith("fa3py") for k in row["ms"])
    assert all(0.1 < s["median"] < 10 for s in row["ratios"].values())
    if graph:
        assert row["host_ms_per_call"] < 0.05


# ---- what a user without a GPU (or with a typo) sees: one line, a non-zero exit -----------------


@pytest.fixture
def no_cuda(monkeypatch):
    """torch as a CPU-only build sees it, on any machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)


def test_run_unknown_provider_ends_the_run(tmp_path):
    with pytest.raises(SystemExit, match=r"--providers: nosuch: unknown provider \(known: fa3py:cute") as e:
        run.main(["--device", "cpu", "--providers", "nosuch", "--out", str(tmp_path)])
    assert isinstance(e.value.code, str)  # exit status 1, the message on stderr
    from benchmarks import paired

    with pytest.raises(SystemExit, match="nosuch: unknown provider"):
        paired.main(["--device", "cpu", "--providers", "nosuch", "sdpa:math"])


def test_run_with_nothing_to_run_ends_the_run(tmp_path):
    with pytest.raises(SystemExit, match="nothing to run: every selected provider was skipped"):
        run.main(["--device", "cpu", "--providers", "fa4", "--out", str(tmp_path)])


def test_output_goes_to_the_working_directory():
    assert run.parse_args([]).out == "bench_out"  # relative: not inside an installed package


@pytest.mark.parametrize("tool", ["run", "paired", "cute_bench", "cute_errmap", "triton_tune"])
def test_gpu_tools_without_cuda_say_so(no_cuda, tool):
    import importlib

    if tool.startswith("cute_"):
        pytest.importorskip("cutlass")
    main = importlib.import_module(f"benchmarks.{tool}").main
    with pytest.raises(SystemExit, match="CPU-only build: nothing can run on cuda") as e:
        main(["--device", "cuda"] if tool in ("run", "paired") else [])
    assert str(e.value.code).startswith(f"benchmarks.{tool}: ")


def test_cycles_without_ncu_says_so(monkeypatch):
    import shutil

    from benchmarks import cute_cycles

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match=r"benchmarks.cute_cycles: needs Nsight Compute \(`ncu`\) on PATH"):
        cute_cycles.main([])


def test_sass_rejects_a_head_dim_the_kernel_does_not_serve(capsys):
    pytest.importorskip("cutlass")
    from cute_kernels import sass as cute_sass

    with pytest.raises(SystemExit) as e:
        cute_sass.main(["--hdim", "33"])
    assert e.value.code == 2 and "--hdim 33 --hdimv 33: the sm90 kernel serves multiples of 8" in capsys.readouterr().err


def test_run_gpu_sh_without_a_gpu_fails_saying_so(tmp_path):
    import os
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path))
    done = subprocess.run(["bash", "tests/run_gpu.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "run_gpu.sh: no GPU tests ran: " in done.stderr and "nothing can run on cuda" in done.stderr


def test_paired_on_the_cpu_reports_host_time_and_small_rates():
    from benchmarks import paired

    times, host_ms = paired.time_pairs([lambda: sum(range(1000))] * 2, 3, torch.device("cpu"))
    assert len(times[0]) == 3 and np.isfinite(host_ms) and host_ms > 0
    assert f"{0.0123:7.3g}".strip() == "0.0123"  # the TFLOP/s column's format keeps CPU rates


def test_error_notes_are_never_cut_mid_number():
    row = dict(provider="fa3py:cute", precision="bf16", hdim=64, seqlen=128, causal=False, mode="fwd", ms=None,
               tflops=None, ratio=None, status="error", note="ValueError: " + "x" * 95 + " got 33")
    assert report.format_table([row]).endswith("got 33")
    text = run._error_text(ValueError("y" * 290 + " got 33333"))
    assert text.endswith(" [...]") and "got 3" not in text


# ---- benchmarks.paired --pass bwd / fwdbwd ----------------------------------------------------

def test_paired_make_call_times_only_the_pass():
    """`--pass bwd`: the provider's forward runs once, when the call is made, and each call is
    only the gradient of that output (the same every call); `fwdbwd`: forward and gradient in
    every call; `fwd`: the forward. The gradients are autograd's."""
    from benchmarks.paired import make_call
    from benchmarks.providers import sdpa_provider

    math = sdpa_provider("math", "MATH", cuda_only=False)
    inner = math.load()
    forwards = []

    def forward(q, k, v, case):
        forwards.append(1)
        return inner(q, k, v, case)

    case = run.Case(1, 2, 40, 32, True, "bwd", torch.float32)
    q, k, v, dout = run.make_inputs(case, torch.device("cpu"), 1, torch.Generator().manual_seed(0))[0]
    want = torch.autograd.grad(run.reference(q, k, v, True, torch.float32), (q, k, v), dout)
    bwd = make_call(math, forward, q, k, v, dout, case, "bwd")
    assert len(forwards) == 1
    for _ in range(2):
        got = bwd()
        assert all((g - w).abs().max() < 1e-5 for g, w in zip(got, want))
    assert len(forwards) == 1
    step = make_call(math, forward, q, k, v, dout, case, "fwdbwd")
    assert len(forwards) == 1
    got = step()
    assert len(forwards) == 2 and all((g - w).abs().max() < 1e-5 for g, w in zip(got, want))
    out = make_call(math, forward, q, k, v, dout, case, "fwd")()
    assert len(forwards) == 3 and out.shape == q.shape


@pytest.mark.parametrize("pass_,factor", [("bwd", 2.5), ("fwdbwd", 3.5)])
def test_paired_backward_passes_on_the_cpu(tmp_path, pass_, factor):
    """End to end on the CPU: TFLOP/s count 2.5x (bwd) / 3.5x (fwdbwd) the forward's FLOPs; the
    pass is in the JSON, the markdown's title and tables, and the plot rows' mode; the backend
    that ran fa3py's backward is recorded."""
    from benchmarks import paired

    doc = paired.main(["--device", "cpu", "--hdim", "64", "--seqlen", "48", "--causal", "false", "--batch", "1",
                       "--nheads", "2", "--providers", "fa3py:torch", "sdpa:math", "--pairs", "2",
                       "--pass", pass_, "--json", str(tmp_path / "p.json"), "--md", str(tmp_path / "p.md")])
    (row,) = doc["rows"]
    assert doc["meta"]["pass"] == pass_ and row["backward_ran_on"] == {"fa3py:torch": "torch"}
    for n, ms in row["ms"].items():
        assert row["tflops"][n] == pytest.approx(factor * flops(1, 2, 48, 48, 64) / (ms * 1e-3) / 1e12)
    md = (tmp_path / "p.md").read_text()
    assert paired.PASS_TITLES[pass_] in md.splitlines()[0] and f"## {pass_}, causal=False (ms)" in md
    assert "backward ran on: fa3py:torch: torch" in md
    assert {r["mode"] for r in paired.report_rows(doc)} == {paired.PASSES[pass_]}


def test_paired_pass_arguments(capsys):
    from benchmarks import paired

    with pytest.raises(SystemExit) as e:
        paired.main(["--device", "cpu", "--pass", "backward"])
    assert e.value.code == 2 and "--pass: invalid choice: 'backward'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        paired.main(["--device", "cpu", "--pass", "bwd", "--fp8"])
    assert e.value.code == 2 and "--fp8 is forward-only" in capsys.readouterr().err
    assert paired.PASSES == {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd_bwd"}
    assert {m: MODE_FACTOR[paired.PASSES[m]] for m in paired.PASSES} == {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def test_cute_bwd_provider_is_opt_in_by_its_name():
    """fa3py:cute-bwd (the sm90 backward kernel, not yet run on a GPU) is in no default or prefix
    selection; named, it needs CUDA like the cute backend it sits on."""
    from benchmarks.providers import select

    cpu = torch.device("cpu")
    opt_in = ("fa3py:cute-bwd", "fa3py:cute-bwd-ds1", "fa3py:cute-bwd-ds2", "fa3py:cute-bwd-dqred",
              "fa3py:cute-bwd-ds2-dqred")
    for selection in (None, ["fa3py"], ["fa3py:cute"], ["fa3py:cute-bwd"]):
        chosen, skipped = select(selection, cpu)
        names = [p.name for p, _ in chosen] + list(skipped)
        assert [n for n in opt_in if n in names] == [n for n in opt_in if n in (selection or ())]
    _, skipped = select([*opt_in, "sdpa:math"], cpu)
    assert skipped == {n: "needs a CUDA GPU" for n in opt_in}
    chosen, _ = select(["sdpa"], cpu)  # sdpa:math too is only selected by its name
    assert [p.name for p, _ in chosen] == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pass_", ["bwd", "fwdbwd"])
def test_gpu_paired_backward(pass_):
    """On the GPU: fa3py's path (cute forward, the backward fa3py dispatches) against cuDNN's
    backward, eager and in CUDA graphs; with the sm90 backward on (unless FA3PY_CUTE_BWD=0) also
    fa3py:cute-bwd, the kernel called directly."""
    from benchmarks import paired
    from cute_kernels import bwd_launch

    kernel = ["fa3py:cute-bwd"] if bwd_launch.enabled else []
    for graph in ([], ["--cuda-graph"]):
        doc = paired.main(["--hdim", "128", "256", "--seqlen", "2048", "--causal", "true", "--providers", "fa3py:cute",
                           *kernel, "sdpa:cudnn", "--pairs", "10", "--pass", pass_, *graph])
        rows = {r["hdim"]: r for r in doc["rows"]}
        assert set(rows[128]["ms"]) == {"fa3py:cute", *kernel, "sdpa:cudnn"}
        assert rows[128]["backward_ran_on"]["fa3py:cute"] == ("cute" if kernel else "triton")
        assert all(0.05 < s["median"] < 20 for s in rows[128]["ratios"].values())
        if kernel:
            assert rows[128]["backward_ran_on"]["fa3py:cute-bwd"] == "cute"
            assert rows[256]["backward_ran_on"]["fa3py:cute-bwd"] == "cute"  # the 64-key variant


@pytest.mark.parametrize("page_size", [0, 16, 48])
def test_kvcache_providers_hold_the_case_keys(page_size):
    """--paged's providers: the contiguous and paged caches `prepare` builds hold the case's keys
    (pages shuffled through the pool), so flash_attn_with_kvcache gives attention's result (on the
    CPU, the torch path after the gather)."""
    import fa3py
    from benchmarks.providers import Case, kvcache_provider

    case = Case(batch=2, nheads=4, seqlen=70, hdim=32, causal=True, mode="fwd", dtype=torch.bfloat16, seqlen_q=3,
                nheads_kv=2)
    q, k, v = (torch.randn(2, n, h, 32).to(torch.bfloat16) for n, h in ((3, 4), (70, 2), (70, 2)))
    provider = kvcache_provider(page_size)
    assert provider.name == ("fa3py-kvcache:" + (f"paged{page_size}" if page_size else "contiguous"))
    out = provider.load()(*provider.prepare(q, k, v, case), case)
    assert torch.equal(out, fa3py.attention(q, k, v, causal=True))
    # --fp8: FA3's FP8 decoding, float8 q and cache with descales; the result of the same float8
    # inputs through flash_attn_func
    case8 = dataclasses.replace(case, fp8=True)
    assert provider.precision(case8) == "fp8"
    out8 = provider.load()(*provider.prepare(q, k, v, case8), case8)
    ones = torch.ones(2, 2)
    q8, k8, v8 = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
    assert out8.dtype == torch.bfloat16
    assert torch.equal(out8, fa3py.flash_attn_func(q8, k8, v8, causal=True, q_descale=ones, k_descale=ones,
                                                   v_descale=ones))


def test_paged_needs_a_gpu_and_fwd(tmp_path):
    with pytest.raises(SystemExit, match="--paged"):
        run.run(run.parse_args(["--device", "cpu", "--mode", "fwd", "--paged", "16", "--out", str(tmp_path)]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_fp8_peers_says_it_needs_a_gpu():
    from benchmarks import fp8_peers

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        fp8_peers.main(["--hdim", "128"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_mla_says_it_needs_a_gpu():
    from benchmarks import mla

    with pytest.raises(SystemExit, match="no CUDA device"):
        mla.main(["--dv", "512"])


@pytest.mark.parametrize("sq,sk", [(1, 700), (4, 9), (9, 4), (16, 16)])
def test_mla_counts_the_pairs_the_causal_mask_keeps(sq, sk):
    """benchmarks.mla's FLOPs count the (query, key) pairs the reference's causal mask keeps."""
    from benchmarks import mla
    from fa3py import reference
    from fa3py.validation import make_request

    q, k, v = (torch.randn(1, n, 1, 8).bfloat16() for n in (sq, sk, sk))
    _, lse = reference.attention(make_request(q, k, v, causal=True, softmax_scale=0.0, softcap=1.0))
    # scores all 0 (softcap * tanh(0)): each row's LSE is log(keys it keeps)
    assert mla.visible_pairs(sq, sk, True) == round(float(lse.exp().nan_to_num(0.0).sum()))
    assert mla.visible_pairs(sq, sk, False) == sq * sk


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_chunk_says_it_needs_a_gpu():
    from benchmarks import chunk

    with pytest.raises(SystemExit, match="no CUDA device"):
        chunk.main(["--chunk", "64"])


@pytest.mark.parametrize("sq,sk", [(1, 300), (37, 37), (200, 90), (90, 200), (256, 256)])
@pytest.mark.parametrize("window,chunk,causal", [((-1, -1), 0, False), ((-1, -1), 0, True), ((20, 7), 0, False),
                                                 ((-1, -1), 32, True), ((-1, -1), 50, False), ((10, -1), 16, True),
                                                 ((5, 3), 64, False), ((-1, 0), 1, False)])
def test_chunk_counts_the_pairs_the_reference_keeps(sq, sk, window, chunk, causal):
    """benchmarks.chunk's pair count is the reference mask's (bottom-right aligned, chunks of the
    query's diagonal position), and its matching window keeps the closest count of any window."""
    from benchmarks import chunk as bench
    from fa3py import reference

    wl, wr = window
    keep = reference.keep_mask(sq, sk, wl, 0 if causal else wr, attention_chunk=chunk)
    assert bench.kept_pairs(sq, sk, window, chunk, causal) == int(keep.sum())
    if chunk:
        want = int(keep.sum()) if (wl, wr) == (-1, -1) else bench.kept_pairs(sq, sk, chunk=chunk, causal=causal)
        w = bench.matching_window(sq, sk, chunk, causal)
        assert w[1] == (0 if causal else w[0])
        best = min(abs(bench.kept_pairs(sq, sk, (x, 0 if causal else x)) - want) for x in range(sk + 1))
        assert abs(bench.kept_pairs(sq, sk, w) - want) == best


def test_decode_pages_hold_each_sequence_in_table_order():
    """benchmarks.decode's paged pools: sequence i's page j at pool index table[i, j], the last
    page zero-padded, and fa3py's decoding from them equal to the contiguous cache's (CPU path)."""
    import fa3py
    from benchmarks.decode import page_order, paged

    gen = torch.Generator().manual_seed(3)
    b, s, hk, d, page = 3, 37, 2, 8, 16
    x = torch.randn(b, s, hk, d, generator=gen).bfloat16()
    table = page_order(b, s, page, gen)
    assert table.shape == (b, 3) and table.dtype == torch.int32
    assert sorted(table.flatten().tolist()) == list(range(b * 3))  # each pool page used once
    pool = paged(x, page, table)
    for i in range(b):
        rows = torch.cat([pool[j] for j in table[i].tolist()])
        assert torch.equal(rows[:s], x[i]) and not rows[s:].any()
    q = torch.randn(b, 1, 4, d, generator=gen).bfloat16()
    v = torch.randn_like(x)
    seqlens = torch.full((b,), s, dtype=torch.int32)
    want = fa3py.flash_attn_with_kvcache(q, x, v, cache_seqlens=seqlens, causal=True)
    got = fa3py.flash_attn_with_kvcache(q, pool, paged(v, page, table), cache_seqlens=seqlens,
                                        page_table=table, causal=True)
    assert torch.equal(got, want)
