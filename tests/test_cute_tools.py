"""cute_kernels' measurement tools: the SASS CLI, bench variants, the cycles report."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

from cute_kernels import sass  # noqa: E402
from cute_kernels.config import FwdConfig  # noqa: E402


def test_sass_cli(capsys):
    assert sass.main(["--hdim", "64", "--causal"]) == 0
    out = capsys.readouterr().out
    assert "HGMMA" in out and "required: ok" in out


@pytest.mark.parametrize("module", ["cute_kernels.sass", "benchmarks.cute_sass"])
def test_sass_command_lines(module):
    """The command the docs and issues name, and the older one kept for recorded results."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: python -m cute_kernels.sass"), run.stderr[-2000:]


def test_bench_variants():
    """The variants `bench` and `cycles` time: the table config, tile specs that change it, toggles."""
    from benchmarks.cute_bench import variants

    base = FwdConfig.make("bf16", 128)
    named = variants(base, ["128x128", "128x176s2"], ["tma_store", "k_release_gate=7", "tma_store+pin_desc=0"])
    assert [n for n, _ in named] == ["table 128x128s2", "128x176s2", "tma_store=False", "k_release_gate=7",
                                     "tma_store=False+pin_desc=False"]
    assert not named[4][1].tile.tma_store and not named[4][1].tile.pin_desc
    assert named[1][1].tile.tile_n == 176 and not named[2][1].tile.tma_store and named[0][1] is base
    assert named[3][1].tile.k_release_gate == 7 and named[3][1].tile.tma_store == base.tile.tma_store


def test_cycles_markdown():
    """`cycles --md`: the table config (any tile) as one fa3py column beside the peers, and its
    cycles over the best peer's; a point without peers gets no ratio."""
    from benchmarks.cute_cycles import markdown

    md = markdown([(128, False, 512, "table 128x128s2", 0.2), (128, False, 512, "fa4", 0.25),
                   (128, False, 512, "cudnn", 0.16), (64, False, 512, "table 192x128s2", 0.3),
                   (64, False, 512, "q_stages=1", 0.33), (128, True, 512, "table 128x128s2", 0.1)])
    assert "| hdim | seqlen | fa3py | fa4 | cudnn | q_stages=1 | fa3py / best peer |" in md
    assert "| 128 | 512 | 0.200 | 0.250 | 0.160 |  | 1.250 |" in md
    assert "| 64 | 512 | 0.300 |  |  | 0.330 |  |" in md and "## causal=True" in md


def test_fingerprint_cli(tmp_path, capsys):
    """`benchmarks.cute_fingerprint`: a baseline, then the same tree against it is all SAME (exit
    0); a baseline whose hash differs is reported and exits 1."""
    import json

    from benchmarks import cute_fingerprint

    base, new = tmp_path / "base.json", tmp_path / "new.json"
    only = ["--only", "bf16 d128x128 causal$"]
    assert cute_fingerprint.main([str(base), *only]) == 0
    assert cute_fingerprint.main([str(new), "--against", str(base), *only]) == 0
    assert "all identical" in capsys.readouterr().out
    tampered = json.loads(base.read_text())
    tampered["bf16 d128x128 causal"]["hash"] = "0" * 16
    base.write_text(json.dumps(tampered))
    assert cute_fingerprint.main([str(new), "--against", str(base), *only, "--dump", str(tmp_path)]) == 1
    assert (tmp_path / "bf16_d128x128_causal.sass").exists()


def test_sass_cli_backward(capsys):
    """`--bwd`: the backward kernel's opcode counts and its checks (the dQ reduce, no local
    memory); forward-only options and what the backward does not serve are refused."""
    assert sass.main(["--bwd", "--hdim", "64", "--dtype", "fp16", "--varlen", "--seqused"]) == 0
    out = capsys.readouterr().out
    assert "# bwd fp16 d64 tile128x128" in out and "cu_seqlens_q" in out and "seqused_k" in out
    assert "UBLKRED" in out and "STACK 0 LOCAL 0" in out and "required: ok" in out
    for argv, why in ((["--dtype", "fp8"], "bf16 / fp16 only"), (["--hdim", "264"], "round up to one of [64, 96, 128, 192, 256]"),
                      (["--split-kv"], "--split-kv: forward options"), (["--hdimv", "64"], "--hdimv: forward options")):
        with pytest.raises(SystemExit) as e:
            sass.main(["--bwd", *argv])
        assert e.value.code == 2 and why in capsys.readouterr().err, argv


def test_fingerprint_backward_section(tmp_path, capsys):
    """The backward's configs are labelled "bwd ..." beside the forward's (whose labels a regex
    for the forward's keeps apart); against a baseline without them they are NEW, listed, and not
    a difference (exit 0)."""
    import json
    import re

    from benchmarks import cute_fingerprint

    bwd = cute_fingerprint.bwd_cases()
    assert len(bwd) == 21 and all(label.startswith("bwd ") for label in bwd)
    assert not set(bwd) & set(cute_fingerprint.cases())
    assert not [label for label in bwd if re.search("bf16 d128x128 causal$", label)]  # test_fingerprint_cli's
    assert type(cute_fingerprint.make_config("bwd bf16 d64 nc", bwd["bwd bf16 d64 nc"])).__name__ == "BwdConfig"
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    base.write_text("{}")
    assert cute_fingerprint.main([str(new), "--against", str(base), "--only", "^bwd bf16 d64 nc$"]) == 0
    out = capsys.readouterr().out
    assert " NEW " in out and "1 not in the baseline: bwd bf16 d64 nc" in out
    assert json.loads(new.read_text())["bwd bf16 d64 nc"]["config"].startswith("bwd bf16 d64 tile128x128")
