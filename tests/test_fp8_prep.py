"""The fused Triton FP8 prep pass writes the bytes of the PyTorch quantizer (fa3py.fp8's spec).
On the CPU it runs in Triton's interpreter, at tiny sizes."""

from __future__ import annotations

import os

import pytest
import torch

from fa3py.fp8 import Fp8Format, quantize_operand

from _util import DEVICE

fp8_prep = pytest.importorskip("triton_fallback.fp8_prep")

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="needs a GPU or TRITON_INTERPRET=1")


def _same_bytes(x, role, fmt):
    got = fp8_prep.quantize_operand(x, role, fmt)
    want = quantize_operand(x, role, fmt)
    assert got.data.shape == want.data.shape and got.scale.shape == want.scale.shape
    assert torch.equal(got.scale, want.scale)
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))


FORMATS = {
    "default": Fp8Format(block_m=32, block_n=16),
    "tokens_channel": Fp8Format(block_m=1, block_n=24, v_scaling="channel", v_transposed=False),
    "pv_order": Fp8Format(block_m=32, block_n=16, v_pv_order=True),
    "pv_order_channel": Fp8Format(block_m=16, block_n=32, v_scaling="channel", v_pv_order=True),
}


@pytest.mark.parametrize("role", ["q", "k", "v"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape,dtype", [((1, 37, 2, 64), torch.bfloat16), ((2, 17, 1, 96), torch.float16)],
                         ids=["d64_bf16", "d96_fp16"])
def test_prep_matches_the_spec_bytes(role, fmt, shape, dtype):
    x = (torch.randn(shape, device=DEVICE) * torch.rand(shape[0], 1, shape[2], 1, device=DEVICE) * 20).to(dtype)
    x[0, 3, 0, 5] = 300.0
    _same_bytes(x, role, FORMATS[fmt])


@pytest.mark.parametrize("role", ["q", "v"])
def test_prep_nan_and_inf(role):
    x = torch.randn(1, 40, 1, 32, device=DEVICE).bfloat16()
    x[0, 2, 0, 1] = float("nan")
    x[0, 21, 0, 7] = float("inf")
    x[0, 30, 0, 0] = float("-inf")
    _same_bytes(x, role, Fp8Format(block_m=16, block_n=16))


def test_prep_declines_what_it_cannot_do():
    x = torch.randn(1, 20, 1, 72, device=DEVICE).bfloat16()  # Hadamard blocks of 8
    assert "16" in fp8_prep.why_not(x, "q", Fp8Format())
    assert fp8_prep.why_not(x, "v", Fp8Format()) is None or DEVICE != "cpu"
    _same_bytes(x, "q", Fp8Format())  # falls back to the spec


@pytest.mark.parametrize("seqlen", [1, 15, 16, 17, 130, 257])
@pytest.mark.parametrize("pv_order", [True, False])
def test_transpose_codes_matches_transpose_v(seqlen, pv_order):
    """FA3's float8 V transposed by the Triton pass: the bytes of `transpose_v` (padding keys
    zero, the PV key order within each 16), from a strided V too."""
    from fa3py.fp8.format import transpose_v

    codes = torch.randint(0, 256, (2, seqlen, 3, 48), dtype=torch.uint8, device=DEVICE)
    codes[codes == 0x7F] = 0  # (NaN codes compare unequal)
    v = codes.view(torch.float8_e4m3fn)
    strided = torch.cat([codes, codes], dim=2)[:, :, ::2].view(torch.float8_e4m3fn)
    for x in (v, strided):
        got = fp8_prep.transpose_codes(x, pv_order)
        assert torch.equal(got.view(torch.uint8), transpose_v(x, pv_order).view(torch.uint8))


@pytest.mark.parametrize("block_n", [16, 48, 224])
def test_prep_block_v_tiles(block_n):
    """Block-scaled V^T with key tiles of 16 to 224 (ROWS padded to 256), a tail group and the
    PV key order: the spec's bytes; 24 (a tile splitting a 16-key group) goes to the spec."""
    x = (torch.randn(1, 250, 2, 32, device=DEVICE) * 3).bfloat16()
    _same_bytes(x, "v", Fp8Format(block_n=block_n, v_scaling="block", v_pv_order=True))
    assert "16-key" in fp8_prep.why_not(x, "v", Fp8Format(block_n=24, v_scaling="block"))


@pytest.mark.parametrize("pv_order", [True, False])
@pytest.mark.parametrize("block_n", [1, 8])
def test_prep_small_v_blocks(block_n, pv_order):
    """V^T scaled per 1 / 8 keys: the pass serves the natural key order; the PV order (whose
    16-key groups would mix scale blocks) goes to the spec. The bytes are the spec's either way."""
    x = (torch.randn(1, 41, 2, 32, device=DEVICE) * 3).bfloat16()
    fmt = Fp8Format(block_n=block_n, v_scaling="block", v_pv_order=pv_order)
    assert (fp8_prep.why_not(x, "v", fmt) is not None) == pv_order
    _same_bytes(x, "v", fmt)


@pytest.mark.gpu
@pytest.mark.parametrize("role", ["q", "k", "v"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("native", [False, True], ids=["int_e4m3", "native_e4m3"])
def test_gpu_prep_matches_the_spec_bytes(role, d, native, monkeypatch):
    """V: the same bytes. Q, K: the rotation's float32 sums are exact unless a row mixes values
    more than ~2^9 apart; then the tensor cores and the CPU round them in different orders, and
    a sum landing within an ulp of an e4m3 rounding boundary (~1e-6 of elements) may round to
    the neighbouring code. Nothing else may differ."""
    x = torch.randn(2, 4099, 4, d, device="cuda").bfloat16()
    if native and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no e4m3 conversion before sm89")
    monkeypatch.setattr(fp8_prep, "NATIVE_E4M3", native)  # the hardware's e4m3 conversion (opt-in) or the integer one
    for fmt in (Fp8Format(), Fp8Format(block_m=1, v_scaling="channel"),
                Fp8Format(block_n=224, v_scaling="block", v_pv_order=True)):
        if role == "v":
            _same_bytes(x, role, fmt)
            continue
        got, want = fp8_prep.quantize_operand(x, role, fmt), quantize_operand(x, role, fmt)
        assert (got.scale != want.scale).float().mean() <= 1e-3
        same_scale = (got.scale == want.scale).transpose(1, 2).repeat_interleave(got.block, 1)[:, : x.shape[1]]
        a, b = (t.data.view(torch.uint8).int() for t in (got, want))
        diff = (a - b).abs()[same_scale.unsqueeze(-1).expand_as(a)]
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-5


def test_e4m3_codes_round_to_nearest_even():
    """_e4m3_bits against torch's cast: every bfloat16 value in range, each tie between
    neighbouring e4m3 values and a float32 step either side of it."""
    _e4m3_codes_against_torch(native=False)


@pytest.mark.gpu
def test_gpu_native_e4m3_codes_are_the_integer_ones():
    """sm89+: the hardware conversion the prep uses there writes `_e4m3_bits`' bytes (the same
    values, NaN -> 0x7F)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no e4m3 conversion before sm89: the prep uses the integer one there")
    _e4m3_codes_against_torch(native=True)


def _e4m3_codes_against_torch(native: bool):
    import triton
    import triton.language as tl

    @triton.jit
    def codes(X, OUT, n, BLOCK: tl.constexpr, NATIVE: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(OUT + i, fp8_prep._e4m3(tl.load(X + i, mask=i < n), NATIVE), mask=i < n)

    values = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    values = values[values.abs() <= 448]
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[~grid.isnan()].unique()
    ties = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([values, ties, ties.nextafter(torch.tensor(-1e9)), ties.nextafter(torch.tensor(1e9)),
                   torch.tensor([float("nan"), -0.0])]).to(DEVICE)
    out = torch.empty(x.shape, dtype=torch.uint8, device=DEVICE)
    codes[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024, NATIVE=native)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    want[x.isnan()] = 0x7F
    assert torch.equal(out, want)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="a GPU run compiles them for real")
def test_fp8_kernels_compile_for_gpu_targets():
    """The prep pass (sm80/90) and the FP8 forward (sm89/90, e4m3 and int8) compile for real
    targets without a GPU: what the interpreter lets through (types, layouts) fails here."""
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks import triton_fp8_compile_only as fp8_compile_only

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.triton_fp8_compile_only"], env=env,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("B shared") == len(fp8_compile_only.VARIANTS)
    # the prep as launched on a GPU (unit stride and 16-byte divisibility specialized): its global
    # stores and loads are vectors, never a byte or half a word per access (V^T's PV-order store
    # once was: st.global.b8), and the opt-in native variant converts with the hardware's cvt
    import json

    preps = [json.loads(line.split("B shared ", 1)[1]) for line in run.stdout.splitlines() if " fp8_prep " in line]
    natives = [v[3].get("NATIVE_E4M3") for v in fp8_compile_only.VARIANTS if v[0].__name__ == "fp8_prep"]
    assert len(preps) == len(natives)
    for ops, native in zip(preps, natives):
        scalar = {op for op in ops if op.startswith(("st.global.b8", "st.global.b16", "ld.global.b8", "ld.global.b16"))}
        assert not scalar, ops
        assert ("cvt.rn.satfinite.e4m3x2.f32" in ops) == bool(native), ops


@pytest.mark.parametrize("role", ["q", "k", "v"])
@pytest.mark.parametrize("fmt", ["default", "pv_order_channel"])
def test_prep_packed_matches_the_spec_bytes(role, fmt):
    """Packed (varlen) operands: the Triton pass per sequence writes the PyTorch layout's bytes."""
    from fa3py.fp8.quantize import quantize_packed

    cu = torch.tensor([0, 5, 5, 38, 39], dtype=torch.int32, device=DEVICE)
    x = (torch.randn(39, 2, 64, device=DEVICE) * 7).to(torch.bfloat16)
    got = quantize_packed(x, cu, role, FORMATS[fmt], fp8_prep.quantize_operand)
    want = quantize_packed(x, cu, role, FORMATS[fmt])
    assert torch.equal(got.scale, want.scale)
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
