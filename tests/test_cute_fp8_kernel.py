"""cute_kernels' FP8 forward, compile-only: the e4m3 configs of the sm90 kernel built for sm_90a
against fake tensors (no GPU), with their SASS checked: FP8 WGMMAs (QGMMA) and no 16-bit ones
(HGMMA), TMA loads, setmaxnreg, a named barrier, pipelined WGMMAs, no local-memory spills, and
P converted without shuffles in the KV loop."""

from __future__ import annotations

import os
import tempfile

import pytest

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

from benchmarks import cute_sass as sass  # noqa: E402
from cute_kernels.config import FwdConfig  # noqa: E402


def _compile(cfg: FwdConfig):
    with tempfile.TemporaryDirectory() as d:
        cubin, _ = sass.compile_cubin(cfg, d)
        text = sass.sass_text(cubin)
        res = sass.resource_usage(cubin)
    return text, res


# (hdim, v_scaling, features): block V scaling (a second accumulator) up to hdim 128, channel V
# at every head dim (FwdConfig.make's FP8 lines pick the tiles).
FP8_GRID = [
    (128, "block", dict()),
    (128, "block", dict(has_right=True)),
    (128, "channel", dict()),
    (128, "block", dict(has_left=True, has_right=True)),
    (64, "block", dict()),
    (64, "block", dict(has_right=True)),
    (96, "block", dict()),
    (96, "channel", dict(has_right=True)),
    (192, "channel", dict()),
    (256, "channel", dict(has_right=True)),
]


@pytest.mark.parametrize("hdim", [192, 256])
def test_fp8_block_v_above_128_is_refused(hdim):
    from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

    with pytest.raises(AssertionError, match="block V scaling spills"):
        FlashAttentionForwardSm90(FwdConfig.make("e4m3", hdim, fp8_v_scaling="block"))


@pytest.mark.parametrize("hdim,v_scaling,features", FP8_GRID)
def test_fp8_compiles_to_qgmma_without_spills(hdim, v_scaling, features):
    cfg = FwdConfig.make("e4m3", hdim, hdim, fp8_v_scaling=v_scaling, **features)
    text, res = _compile(cfg)
    assert sass.check(text, cfg) == [], cfg.short()
    ops = sass.opcode_counts(text)
    assert ops["QGMMA"] > 0 and ops["HGMMA"] == 0, ops
    assert ops["STL"] == 0 and ops["LDL"] == 0 and not res.get("LOCAL"), f"{cfg.short()}: spills {res}"
    assert sass.max_register(text) < cfg.tile.consumer_regs
    # the interior KV loop: QK^T's hdim / 32 and PV's tile_n / 32 QGMMAs; P stays in its lanes
    loops = sass.hgmma_loops(text)
    assert loops, "no KV loop with a WGMMA"
    # the smallest of the loops that run both GEMMs (the tile loop's last-PV loop runs one)
    interior = min((l[2] for l in loops if l[2]["QGMMA"] > cfg.tile.tile_n // 32), key=lambda c: sum(c.values()))
    assert interior["QGMMA"] == hdim // 32 + cfg.tile.tile_n // 32, interior
    assert interior["SHFL"] <= 4, f"P moved between lanes: {interior['SHFL']} SHFL (the row max takes 4)"


def test_fp8_check_rejects_hgmma():
    """check() for an e4m3 config asks for QGMMA and refuses HGMMA."""
    cfg = FwdConfig.make("e4m3", 128)
    fake = "/*0010*/ HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;\n/*0020*/ UTMALDG.2D [UR8], [UR4] ;"
    missing = sass.check(fake, cfg)
    assert any("QGMMA" in m for m in missing) and any("HGMMA" in m for m in missing), missing


def test_fp8_config_fields():
    cfg = FwdConfig.make("e4m3", 128, has_right=True)
    assert (cfg.fp8_block_m, cfg.fp8_v_scaling) == (128, "block")
    assert cfg.tile.tile_n % 32 == 0 and cfg.tile.lazy_rescale == 0 and not cfg.tile.chain_pv_qk
    assert FwdConfig.make("e4m3", 96).tile.tile_n % 32 == 0
    bf16 = FwdConfig.make("bf16", 128)
    assert (bf16.fp8_block_m, bf16.fp8_v_scaling) == (0, "")


def test_p_offset_matches_the_format():
    from cute_kernels import fp8
    from fa3py.fp8 import P_OFFSET

    assert fp8.P_OFFSET == P_OFFSET


def test_cute_sass_accepts_fp8(capsys):
    assert sass.main(["--dtype", "fp8", "--hdim", "128"]) == 0
    out = capsys.readouterr().out
    assert "QGMMA" in out and "e4m3" in out
