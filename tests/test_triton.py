"""The Triton kernels (`triton_fallback`) called directly, against the float64 reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors. The kernels choose
interpreter vs. compiled code when they are decorated, so TRITON_INTERPRET must be set before
`triton_fallback` is imported: tests/conftest.py does it for the whole run, and the guard below
does it when this file runs alone. With CUDA the same grid runs on the GPU, and the tests
marked `gpu` add long sequences.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import triton_fallback  # noqa: E402
from fa3py.request import AttentionParams, AttentionRequest  # noqa: E402
from fa3py.validation import make_request  # noqa: E402
from benchmarks import triton_compile_only as compile_only  # noqa: E402
from triton_fallback import configs, ops  # noqa: E402

from _util import (FEATURES, check_backward, check_forward, check_nan_rows, max_err, nan_inputs,  # noqa: E402
                   packed, ragged_varlen)
from _util import inputs as _inputs  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
SIZES = [(1, 1), (113, 203), (239, 1), (77, 3), (64, 128)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ops, "POISON", True)


inputs = functools.partial(_inputs, device=DEVICE)


def run_and_check(req, backward=True):
    """Forward (and backward) through the kernels, each checked against the reference."""
    assert triton_fallback.why_not(req, backward) is None
    out, lse = triton_fallback.forward(req)
    assert out.shape == req.out_shape and lse.shape == req.lse_shape
    check_forward(req, out, lse)
    if backward:
        dout = torch.randn_like(out)
        grads = triton_fallback.backward(req, out, lse, dout)
        assert [g.shape for g in grads] == [req.q.shape, req.k.shape, req.v.shape]
        check_backward(req, dout, grads)
    return out, lse


@pytest.mark.parametrize("lq,lk", SIZES)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(lq, lk, feature):
    q, k, v = inputs(1, lq, lk, 2, 1, 64, 64)
    run_and_check(make_request(q, k, v, **FEATURES[feature]))


@pytest.mark.parametrize("dtype,d,dv", [
    (torch.float16, 32, 32), (torch.bfloat16, 40, 40), (torch.float16, 80, 80),
    (torch.bfloat16, 96, 64), (torch.float16, 136, 136), (torch.bfloat16, 192, 128),
    (torch.float16, 256, 256), (torch.bfloat16, 64, 128), (torch.float16, 8, 24),
])
def test_dtypes_headdims_gqa(dtype, d, dv):
    q, k, v = inputs(2, 77, 130, 4, 2, d, dv, dtype)
    run_and_check(make_request(q, k, v, causal=True))


@pytest.mark.parametrize("window", [(30, -1), (-1, 7), (0, 0)])
@pytest.mark.parametrize("lq,lk", [(113, 203), (203, 113)])
def test_one_sided_windows(window, lq, lk):
    q, k, v = inputs(1, lq, lk, 2, 1, 32, 32, torch.float16)
    run_and_check(make_request(q, k, v, window_size=window))


def test_mqa_window_softcap():
    q, k, v = inputs(1, 113, 90, 4, 1, 64, 32)
    run_and_check(make_request(q, k, v, window_size=(20, 5), softcap=10.0))


def test_fully_masked_rows():
    # bottom-right causal with lq > lk: the first 40 rows keep no key -> out 0, lse -inf
    q, k, v = inputs(1, 50, 10, 2, 2, 32, 32)
    out, lse = run_and_check(make_request(q, k, v, causal=True))
    assert (out[:, :40] == 0).all() and torch.isneginf(lse[:, :, :40]).all()
    assert torch.isfinite(lse[:, :, 40:]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_nan_inputs_give_nan_rows(causal):
    req = nan_inputs(*inputs(2, 77, 130, 4, 2, 32, 32), causal)
    check_nan_rows(req, *triton_fallback.forward(req))


def test_varlen_packed_seqused_k(monkeypatch):
    monkeypatch.setattr(ops, "SPLIT_GQA", True)  # float32 dK/dV partials, zero-prefilled
    q, k, v, kw = ragged_varlen(torch.float16, DEVICE)
    run_and_check(make_request(q, k, v, causal=True, **kw))


def test_varlen_packed_seqused_q_window():
    # rows past seqused_q inside a packed sequence are padding: out 0, lse -inf, dq 0
    lens = [70, 33, 5]
    q, cu = packed(lens, 2, 48, torch.bfloat16, DEVICE)
    k, _ = packed(lens, 2, 48, torch.bfloat16, DEVICE)
    v, _ = packed(lens, 2, 48, torch.bfloat16, DEVICE)
    used_q = torch.tensor([50, 33, 1], dtype=torch.int32, device=DEVICE)
    req = make_request(q, k, v, window_size=(16, 0), cu_seqlens_q=cu, cu_seqlens_k=cu,
                       max_seqlen_q=70, max_seqlen_k=70, seqused_q=used_q)
    out, lse = run_and_check(req)
    assert (out[50:70] == 0).all() and torch.isneginf(lse[:, 50:70]).all()


def test_batched_seqused_and_mixed_layout():
    q, k, v = inputs(3, 40, 60, 2, 1, 32, 32)
    used_q = torch.tensor([40, 7, 0], dtype=torch.int32, device=DEVICE)
    used_k = torch.tensor([1, 60, 33], dtype=torch.int32, device=DEVICE)
    out, lse = run_and_check(make_request(q, k, v, causal=True, seqused_q=used_q, seqused_k=used_k))
    assert (out[1, 7:] == 0).all() and torch.isneginf(lse[2]).all()
    # packed q against batched k/v
    qp, cu_q = packed([5, 40, 17], 2, 32, torch.bfloat16, DEVICE)
    run_and_check(make_request(qp, k, v, cu_seqlens_q=cu_q, max_seqlen_q=40, softcap=5.0))


def test_strided_inputs():
    base_q = torch.randn(2, 2, 113, 64, device=DEVICE).to(torch.float16)  # (b, h, s, d)
    q = base_q.transpose(1, 2)
    k = torch.randn(2, 203, 2, 96, device=DEVICE).to(torch.float16)[..., 16:80]  # sliced head dim
    v = torch.randn(2, 203, 2, 64, 2, device=DEVICE).to(torch.float16)[..., 0]  # last-dim stride 2
    assert q.stride(-1) == 1 and not q.is_contiguous() and v.stride(-1) == 2
    req = make_request(q, k, v, causal=True)
    out, lse = triton_fallback.forward(req)
    check_forward(req, out, lse)
    dout = torch.randn(2, 2, 113, 64, device=DEVICE).to(torch.float16).transpose(1, 2)
    grads = triton_fallback.backward(req, out.transpose(1, 2).contiguous().transpose(1, 2), lse, dout)
    check_backward(req, dout, grads)


@pytest.mark.parametrize("causal", [False, True])
def test_negative_softmax_scale(causal):
    """The row max is taken over scaled scores, so a negative scale (flipped scores) is right."""
    q, k, v = inputs(1, 77, 130, 2, 1, 64, 64)
    run_and_check(make_request(q, k, v, causal=causal, softmax_scale=-0.3))


@pytest.mark.parametrize("split_gqa", [True, False], ids=["split", "loop"])
@pytest.mark.parametrize("feature", ["causal", "window"])
def test_atomic_and_deterministic_backward(feature, split_gqa, monkeypatch):
    """The default backward (dQ by atomic adds; GQA one program per query head or per group)
    and the deterministic one (no atomics, bitwise reproducible), both against the reference."""
    monkeypatch.setattr(ops, "SPLIT_GQA", split_gqa)
    q, k, v = inputs(2, 77, 130, 4, 2, 64, 64)
    req = make_request(q, k, v, **FEATURES[feature])
    out, lse = triton_fallback.forward(req)
    dout = torch.randn_like(out)
    check_backward(req, dout, triton_fallback.backward(req, out, lse, dout))
    if not split_gqa:  # the deterministic path ignores SPLIT_GQA
        return
    det = make_request(q, k, v, deterministic=True, **FEATURES[feature])
    first = triton_fallback.backward(det, out, lse, dout)
    second = triton_fallback.backward(det, out, lse, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    check_backward(det, dout, first)


def _fp8_inputs(lq, lk, h, hk, d):
    q, k, v = (x.float().mul(2).to(torch.float8_e4m3fn) for x in inputs(2, lq, lk, h, hk, d, d))
    descales = [torch.rand(2, hk, device=DEVICE) + 0.5 for _ in range(3)]
    return q, k, v, descales


def _fp8_baseline(req):
    """What PyTorch gets for the same fp8 math: dequantized scores in float32, P rounded to
    float8 before P @ V (the FP8 MMA path rounds P the same way)."""
    from fa3py import reference

    p, group = req.params, req.nheads // req.nheads_kv
    k, v = (x.float().repeat_interleave(group, 2) for x in (req.k, req.v))
    s = torch.einsum("bqhd,bkhd->bhqk", req.q.float(), k) * p.softmax_scale
    s = s * (req.q_descale * req.k_descale).repeat_interleave(group, 1)[:, :, None, None]
    keep = reference.keep_mask(s.shape[2], s.shape[3], p.window_left, p.window_right, s.device)
    s = s.masked_fill(~keep, float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    pv = torch.einsum("bhqk,bkhd->bqhd", e.to(torch.float8_e4m3fn).float(), v)
    vd = req.v_descale.repeat_interleave(group, 1)[:, None, :, None]
    return (pv / e.sum(-1).transpose(1, 2)[..., None] * vd).to(torch.bfloat16)


@pytest.mark.parametrize("dequant", [False, True], ids=["fp8_mma", "dequant"])
@pytest.mark.parametrize("feature", ["plain", "causal"])
def test_fp8_forward(dequant, feature, monkeypatch):
    if dequant:  # the sm80/86 path, forced
        monkeypatch.setattr(ops, "_fp8_mode", lambda req: True)
    q, k, v, (qd, kd, vd) = _fp8_inputs(113, 203, 4, 2, 64)
    req = make_request(q, k, v, q_descale=qd, k_descale=kd, v_descale=vd, **FEATURES[feature])
    assert triton_fallback.why_not(req, backward=True) is not None
    out, lse = triton_fallback.forward(req)
    assert out.dtype == torch.bfloat16
    if dequant:
        check_forward(req, out, lse)
    else:  # rounding P to fp8 is part of the math: compare with PyTorch doing the same
        from fa3py import reference

        ref_out, ref_lse = reference.attention(req, torch.float64)
        assert not torch.isnan(out).any()
        assert max_err(out, ref_out) <= 2 * max_err(_fp8_baseline(req), ref_out) + 2e-3
        assert max_err(lse, ref_lse) <= 1e-3 * float(ref_lse.abs().max())


def test_public_api_backend_triton():
    """fa3py.attention(..., backend="triton") reaches these kernels, autograd included."""
    import fa3py

    q, k, v = inputs(2, 65, 100, 4, 2, 64, 64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fa3py.attention(*leaves, causal=True, return_lse=True, backend="triton")
    req = make_request(q, k, v, causal=True)
    check_forward(req, out.detach(), lse)
    dout = torch.randn_like(out)
    out.backward(dout)
    check_backward(req, dout, [x.grad for x in leaves])


def test_tune_prints_only_the_kernels_a_shape_launches(monkeypatch, capsys):
    """tune() lists a kernel's pick only where that head dim launched it: the atomic-dQ `bwd`
    kernel, above ops.ATOMIC_DQ_MAX_HEADDIM, must not repeat the previous head dim's pick."""
    from types import SimpleNamespace

    from benchmarks import triton_tune as tune

    fake = {k: SimpleNamespace(best_config=None) for k in configs.KERNELS}
    pick = SimpleNamespace(kwargs={"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)

    def launch(*kernels):
        for k in kernels:
            fake[k].best_config = pick

    def backward(req, *_):
        atomic = not req.params.deterministic and req.headdim <= ops.ATOMIC_DQ_MAX_HEADDIM
        launch(*(("bwd",) if atomic else ("bwd_dkdv", "bwd_dq")))

    def forward(req):
        launch("fwd")
        return req.q, None

    monkeypatch.setattr(ops, "_TUNED", fake)
    monkeypatch.setattr(ops, "forward", forward)
    monkeypatch.setattr(ops, "backward", backward)
    monkeypatch.setattr(configs, "gpu_family", lambda device: "test")
    monkeypatch.setattr(configs, "TUNED", {})
    monkeypatch.setattr(configs, "TUNED_SHORT", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tune, "make", lambda d, dtype, causal, deterministic=False, seqlen=0: make_request(
        *inputs(1, 4, 4, 1, 1, d, d), causal=causal, deterministic=deterministic))
    small, big = ops.ATOMIC_DQ_MAX_HEADDIM, 2 * ops.ATOMIC_DQ_MAX_HEADDIM
    tune.tune([small, big], [torch.bfloat16], [False], kernels=("fwd", "bwd"))
    lines = capsys.readouterr().out.splitlines()
    assert sum(f'"bwd", {small},' in l for l in lines) == 1 and not any(f'"bwd", {big},' in l for l in lines)
    assert sum('"fwd",' in l for l in lines) == 2


def test_autotune_pruning(monkeypatch):
    monkeypatch.setattr(configs, "smem_limit", lambda index: 99 * 1024)
    q = torch.empty(1, 1, 1, 256, dtype=torch.bfloat16)
    for kernel in configs.KERNELS:
        candidates = [t.to_triton() for t in configs.candidates(kernel)]
        small = configs.prune(kernel)(candidates, {"Q": q}, BLOCK_D=64, BLOCK_DV=64)
        large = configs.prune(kernel)(candidates, {"Q": q}, BLOCK_D=256, BLOCK_DV=256)
        assert 0 < len(large) < len(small) <= len(candidates)


def test_why_not_refuses_int32_row_offset_overflow():
    # meta tensors: shapes and strides only, nothing allocated
    big = torch.empty(1, 2**20, 16, 128, device="meta", dtype=torch.bfloat16)  # 2^20 rows x 2048
    small = torch.empty(1, 2**20 - 2, 16, 128, device="meta", dtype=torch.bfloat16)
    params = AttentionParams(softmax_scale=0.1)
    req = AttentionRequest(big, big, big, params, max_seqlen_q=2**20, max_seqlen_k=2**20)
    assert "32-bit offsets" in triton_fallback.why_not(req, False)
    req = AttentionRequest(small, small, small, params, max_seqlen_q=2**20 - 2, max_seqlen_k=2**20 - 2)
    assert triton_fallback.why_not(req, False) is None


def test_why_not():
    q, k, v = inputs(1, 8, 8, 2, 1, 64, 64)
    assert triton_fallback.why_not(make_request(q, k, v), backward=True) is None

    def why(q, k, v, backward=False, **params):
        req = AttentionRequest(q, k, v, AttentionParams(0.125, **params))
        return triton_fallback.why_not(req, backward)

    assert "fp8" in why(q, k, v, fp8=True)
    assert "dtype" in why(q.float(), k.float(), v.float())
    q8, k8, v8 = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
    assert why(q8, k8, v8) is None
    assert "backward" in why(q8, k8, v8, backward=True)
    odd = torch.randn(1, 8, 2, 36, device=DEVICE).bfloat16()
    assert "headdim" in why(odd, odd, odd)


@pytest.mark.skipif(not INTERPRET, reason="a GPU run compiles the kernels for real")
def test_compiles_for_gpu_targets():
    """Compile-only (sm80/86/89/90 targets, no GPU): catches what the interpreter lets through."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "benchmarks.triton_compile_only"], env=env,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("B shared") == len(compile_only.VARIANTS)


def test_tuned_table_fits_its_gpu():
    smem = {"sm80": 163 * 1024, "sm89": 99 * 1024, "sm90": 227 * 1024}
    for (family, kernel, d, dtype, _), tile in [*configs.TUNED.items(), *configs.TUNED_SHORT.items()]:
        assert kernel in configs.KERNELS
        assert configs.fits(kernel, tile, d, d, 2, smem[family]), (family, kernel, d, tile)


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the table tiles run in every test")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("short", [True, False])
def test_sm90_table_tiles_in_interpreter(d, deterministic, causal, short, monkeypatch):
    """The H100/H200 table's tiles (not the interpreter's small one), forward and every backward
    kernel, on ragged sizes that leave partial blocks: the blocking logic the GPU runs, in CI.
    short: the launch counts as short (configs.TUNED_SHORT) or not."""
    used = set()
    pick = configs.pick

    def spy(kernel, *args):
        used.add(kernel)
        tile = pick(kernel, *args)
        assert tile is not None and tile != configs.INTERPRET_TILE
        return tile

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "gpu_family", lambda index: "sm90")
    monkeypatch.setattr(configs, "SHORT_SEQLEN", 2048 if short else 0)
    monkeypatch.setattr(configs, "pick", spy)
    monkeypatch.setattr(ops, "ATOMIC_DQ_MAX_HEADDIM", 256)  # the one-kernel path at both dims
    q, k, v = inputs(1, 150, 201, 2, 1, d, d)
    run_and_check(make_request(q, k, v, causal=causal, deterministic=deterministic))
    assert used == ({"fwd", "bwd_dkdv", "bwd_dq"} if deterministic else {"fwd", "bwd"})


# ---- GPU only: long sequences, the autotuned and table paths ---------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("lq,lk", [(1023, 1024), (2048, 2048), (799, 3000)])
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_long(lq, lk, feature, d):
    q, k, v = inputs(2, lq, lk, 8, 2, d, d)
    run_and_check(make_request(q, k, v, **FEATURES[feature]))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [80, 256])
def test_gpu_autotuned(d, monkeypatch):
    monkeypatch.setattr(configs, "TUNED", {})
    q, k, v = inputs(2, 1000, 1500, 4, 4, d, d, torch.float16)
    run_and_check(make_request(q, k, v, causal=True))


@pytest.mark.gpu
def test_gpu_fp8_long():
    q, k, v, (qd, kd, vd) = _fp8_inputs(1024, 2048, 8, 2, 128)
    req = make_request(q, k, v, q_descale=qd, k_descale=kd, v_descale=vd, causal=True)
    out, lse = triton_fallback.forward(req)
    assert not torch.isnan(out).any() and torch.isfinite(lse).all()
