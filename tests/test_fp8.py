"""The block-scaled FP8 format (`fa3py.fp8`): scales, rotation, quantizer, emulated attention,
NaN / Inf semantics, straight-through gradients. CPU-fast shapes."""

from __future__ import annotations

import pytest
import torch

import fa3py
from fa3py import fp8, reference, torch_backend
from fa3py.fp8 import E4M3_MAX, Fp8Format, hadamard_block, pow2_scale, quantize_operand
from fa3py.validation import make_request

from _util import FEATURES, inputs, max_err

pytestmark = pytest.mark.filterwarnings("ignore:fa3py. fp8=True")


def _e4m3(x):
    return x.to(torch.float8_e4m3fn).float()


# ---- scales and rotation ------------------------------------------------------------------------


def test_pow2_scale_is_the_smallest_power_of_two_that_fits():
    amax = torch.cat([torch.tensor([0.0, 1e-45, 1e-40, 2.0**-126, 1.0, 448.0, 448.00003, 449.0, 896.0, 3e38]),
                      torch.rand(2000) * 10.0 ** torch.randint(-30, 30, (2000,)).float()])
    scale, inv = pow2_scale(amax)
    m, e = torch.frexp(scale)
    assert torch.all(m == 0.5), "scales must be powers of two"
    assert torch.equal(scale * inv, torch.ones_like(scale))
    assert torch.all(amax / scale <= E4M3_MAX)
    tight = (scale > 2.0**-126)  # at the clamp a smaller power would fit too
    assert torch.all(amax[tight] / (scale[tight] / 2) > E4M3_MAX)
    assert scale[5] == 1.0 and scale[6] == 2.0 and scale[0] == 2.0**-126


@pytest.mark.parametrize("d", [8, 24, 64, 72, 96, 128, 256])
def test_rotation_is_orthogonal_and_keeps_qk(d):
    n = hadamard_block(d)
    assert n == min(d & -d, 128)
    r = fp8.rotation_matrix(n, fp8.SIGN_SEED).double()
    assert torch.equal(r @ r.T, n * torch.eye(n, dtype=torch.float64))
    q, k = torch.randn(5, d), torch.randn(7, d)
    qr, kr = fp8.rotate(q).double(), fp8.rotate(k).double()
    torch.testing.assert_close(qr @ kr.T / n, q.double() @ k.double().T, rtol=1e-5, atol=1e-5)
    assert torch.equal(fp8.rotate(q), fp8.rotate(q)), "seeded: reproducible"
    if n > 8:
        assert not torch.equal(fp8.rotate(q, seed=1), fp8.rotate(q)), "the seed picks the signs"


# ---- the quantizer ---------------------------------------------------------------------------


def _check_roundtrip(x, t):
    """Dequantized = the rotated x within e4m3's rounding: half an ulp (2^-4 relative) for
    normal values, half the subnormal step (2^-10 of the scale) below; each block's scale tight."""
    y = fp8.rotate(x) if t.role != "v" else x.float()
    n = hadamard_block(x.shape[-1]) if t.role != "v" else 1
    scaled = t.tokens().float()
    s = t.scale_per_token()
    deq = scaled * s
    bound = torch.maximum(y.abs() * 2.0**-4, s * 2.0**-10)
    assert torch.all((deq - y).abs() <= bound)
    torch.testing.assert_close(t.dequantize(), deq / n**0.5)
    assert scaled.abs().max() <= E4M3_MAX
    # tight: every nonzero block's largest element rounds into [224, 448]
    if t.role == "v" and t.fmt.v_scaling == "channel":
        big = scaled.abs().amax(dim=1)
    else:
        a = scaled.abs().amax(dim=-1).transpose(1, 2)  # (b, h, s)
        pad = (-a.shape[-1]) % t.block
        big = torch.nn.functional.pad(a, (0, pad)).reshape(*a.shape[:2], -1, t.block).amax(-1)
    assert torch.all((big >= E4M3_MAX / 2) | (big == 0))


@pytest.mark.parametrize("role", ["q", "k", "v"])
@pytest.mark.parametrize("shape", [(2, 239, 3, 64), (1, 1, 2, 96), (1, 130, 1, 72)])
@pytest.mark.parametrize("fmt", [Fp8Format(), Fp8Format(block_m=1, block_n=64, v_scaling="channel",
                                                        v_transposed=False)], ids=["default", "alt"])
def test_quantizer_roundtrip(role, shape, fmt):
    x = (torch.randn(shape) * torch.rand(shape[0], 1, shape[2], 1) * 50).bfloat16()
    x[0, 0, 0, 0] = 900.0  # an outlier
    t = quantize_operand(x, role, fmt)
    assert t.data.dtype == torch.float8_e4m3fn and t.scale.dtype == torch.float32
    if role == "v" and fmt.v_transposed:
        assert t.data.shape == (shape[0], shape[2], shape[3], -(-shape[1] // 16) * 16)
        assert torch.all(t.data[..., shape[1]:].float() == 0)
    assert t.shape == shape
    _check_roundtrip(x, t)


def test_quantizer_fp16_and_zeros():
    x = torch.randn(1, 40, 2, 32).half()
    x[:, :, 1] = 0
    t = quantize_operand(x, "k", Fp8Format(block_n=16))
    _check_roundtrip(x, t)
    assert torch.all(t.scale[:, 1] == 2.0**-126) and torch.all(t.data[:, :, 1].float() == 0)


# ---- NaN and Inf ---------------------------------------------------------------------------------


@pytest.mark.parametrize("role,bad", [("q", float("nan")), ("k", float("inf")), ("v", float("nan")),
                                      ("v", float("-inf"))])
def test_a_bad_element_leaves_its_block_alone(role, bad):
    """The other elements of its block quantize exactly as if the bad row (Q, K: rotation spreads
    it over its head-dim block) or element (V) held 0; the bad ones become NaN."""
    x = torch.randn(1, 100, 2, 64).bfloat16()
    x[0, 37, 1, 5] = 30.0  # the block's largest element lives next to the bad one
    bad_x, clean = x.clone(), x.clone()
    bad_x[0, 37, 1, 9] = bad
    if role == "v":
        clean[0, 37, 1, 9] = 0
    else:
        clean[0, 37, 1] = 0
    fmt = Fp8Format(v_transposed=False)
    got, want = quantize_operand(bad_x, role, fmt), quantize_operand(clean, role, fmt)
    assert torch.equal(got.scale, want.scale) if role == "v" else not torch.isnan(got.scale).any()
    nan = got.data.float().isnan()
    if role == "v":
        assert nan.sum() == 1 and nan[0, 37, 1, 9]
    else:
        assert torch.equal(nan.any(-1), torch.zeros_like(nan.any(-1)).index_put_((torch.tensor(0), torch.tensor(37),
                                                                                  torch.tensor(1)), torch.tensor(True)))
    keep = ~nan
    assert torch.equal(got.data.float()[keep], want.data.float()[keep])


def test_nan_in_q_row_poisons_that_row_only():
    q, k, v = inputs(1, 200, 150, 2, 1, 64, 64, torch.bfloat16, "cpu")
    q[0, 103, 1, :] *= 20  # row 103 holds its block's largest values
    bad = q.clone()
    bad[0, 103, 1, 7] = float("nan")
    clean = q.clone()
    clean[0, 103, 1] = 0
    out = fa3py.attention(bad, k, v, fp8=True, causal=True)
    want = fa3py.attention(clean, k, v, fp8=True, causal=True)
    rows = out.float().isnan().any(-1)
    assert rows[0, 103, 1] and rows.sum() == 1 and out[0, 103, 1].float().isnan().all()
    rows[0, 103, 1] = True
    assert torch.equal(out[~rows], want[~rows]), "the rest of the block keeps its accuracy, bit for bit"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_key_poisons_the_rows_that_see_it(bad):
    """Every row that sees the key is NaN: as 16-bit attention for a NaN; for an Inf, 16-bit
    attention gives NaN only where q's matching feature is positive (+Inf score), but the
    rotation spreads the Inf over the key's features, so every row that sees it is NaN."""
    q, k, v = inputs(1, 64, 300, 2, 2, 64, 64, torch.bfloat16, "cpu")
    k[0, 270, 0, 11] = bad
    out = fa3py.attention(q, k, v, fp8=True, causal=True)
    ref, _ = reference.attention(make_request(q, k, v, causal=True))
    sees = torch.zeros(1, 64, 2, dtype=torch.bool)
    sees[0, 270 - (300 - 64):, 0] = True  # bottom-right causal
    assert torch.equal(out.isnan().any(-1), sees) and torch.equal(out.isnan().all(-1), sees)
    if bad != bad:
        assert torch.equal(ref.isnan().any(-1), sees)
    else:
        assert (ref.isnan().any(-1) <= sees).all()
    clean = k.clone()
    clean[0, 270, 0] = 0
    assert torch.equal(out[~sees], fa3py.attention(q, clean, v, fp8=True, causal=True)[~sees])


@pytest.mark.parametrize("v_scaling", ["block", "channel"])
def test_inf_in_v_poisons_one_column(v_scaling):
    q, k, v = inputs(1, 90, 260, 2, 1, 64, 32, torch.bfloat16, "cpu")
    bad, clean = v.clone(), v.clone()
    bad[0, 100, 0, 5] = float("inf")
    clean[0, 100, 0, 5] = 0
    out = fa3py.attention(*fa3py.quantize_fp8(q, k, bad, v_scaling=v_scaling))
    want = fa3py.attention(*fa3py.quantize_fp8(q, k, clean, v_scaling=v_scaling))
    assert out[..., 5].isnan().all()
    others = torch.ones(32, dtype=torch.bool)
    others[5] = False
    assert torch.equal(out[..., others], want[..., others])


# ---- emulated attention -----------------------------------------------------------------------


def fp8_math_in_pytorch(qkv, req):
    """The same FP8 math done plainly by PyTorch: dequantized q, k, v, the whole score row at
    once, P rounded to e4m3 against the final row max (times 2^8), normalized by its unrounded sum."""
    q, k, v = (x.dequantize() for x in qkv)
    g = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(g, dim=2) for x in (k, v))
    p = req.params
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * p.softmax_scale
    if p.softcap > 0:
        s = p.softcap * torch.tanh(s / p.softcap)
    keep = reference.keep_mask(s.shape[2], s.shape[3], p.window_left, p.window_right,
                               attention_chunk=p.attention_chunk)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(m == float("-inf"), 0, m))  # a row with no key: 0
    pv = torch.einsum("bhqk,bkhd->bqhd", _e4m3(e * 256) / 256, v)
    total = e.sum(-1).transpose(1, 2).unsqueeze(-1)
    return (pv / torch.where(total > 0, total, 1)).to(req.out_dtype), torch.logsumexp(s, -1)


# FEATURES and attention_chunk (Llama 4's chunked attention: causal within chunks; with a window)
FP8_FEATURES = dict(FEATURES, chunk=dict(causal=True, attention_chunk=40),
                    chunk_window=dict(attention_chunk=48, window_size=(30, 5)))

CASES = {  # (b, lq, lk, h, hk, d, dv)
    "ragged": (2, 113, 203, 4, 2, 64, 64),
    "hdim96_gqa": (1, 130, 90, 6, 2, 96, 96),
    "hdim72_dv40": (1, 65, 257, 2, 1, 72, 40),
    "one": (1, 1, 1, 1, 1, 32, 32),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap", "chunk", "chunk_window"])
@pytest.mark.parametrize("v_scaling", ["block", "channel"])
def test_emulation_against_reference(case, feature, v_scaling):
    q, k, v = inputs(*CASES[case], torch.bfloat16, "cpu")
    qkv = fa3py.quantize_fp8(q, k, v, block_m=64, block_n=32, v_scaling=v_scaling)
    out, lse = fa3py.attention(*qkv, return_lse=True, **FP8_FEATURES[feature])
    req = make_request(q, k, v, **FP8_FEATURES[feature])
    ref_out, ref_lse = reference.attention(req)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    baseline, baseline_lse = fp8_math_in_pytorch(qkv, req)
    assert max_err(out, ref_out) <= 2 * max_err(baseline, ref_out) + 2e-3
    assert max_err(lse, ref_lse) <= 2 * max_err(baseline_lse, ref_lse) + 1e-3


@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap", "chunk"])
def test_fa3_descales_as_the_format_against_reference(feature):
    """FA3's float8 inputs with (batch, nheads_kv) descales, seen as the unrotated format
    (fp8.from_descales: what the Hopper FP8 kernel is given), through the emulation: no worse than
    twice the plain PyTorch FP8 math against the fp64 reference of the descaled inputs."""
    q, k, v = (x.float().mul(3).to(torch.float8_e4m3fn) for x in inputs(2, 113, 203, 4, 2, 64, 64, torch.bfloat16,
                                                                         "cpu"))
    gen = torch.Generator().manual_seed(0)
    ds = [torch.rand(2, 2, generator=gen) + 0.25 for _ in range(3)]
    req = make_request(q, k, v, q_descale=ds[0], k_descale=ds[1], v_descale=ds[2], **FP8_FEATURES[feature])
    qkv = fp8.from_descales(q, k, v, *ds, block_m=64, block_n=32)
    assert not qkv.fmt.rotated and qkv.fmt.v_scaling == "channel"
    out, lse = fp8.emulate.attention(qkv, req.params, torch.bfloat16)
    ref_out, ref_lse = reference.attention(req)
    baseline, baseline_lse = fp8_math_in_pytorch(qkv, req)
    assert out.dtype == torch.bfloat16
    assert max_err(out, ref_out) <= 2 * max_err(baseline, ref_out) + 2e-3
    assert max_err(lse, ref_lse) <= 2 * max_err(baseline_lse, ref_lse) + 1e-3


VARLEN_Q, VARLEN_K = [5, 70, 1, 0, 33], [40, 100, 3, 9, 1]


@pytest.mark.parametrize("v_scaling", ["block", "channel"])
def test_packed_operands_are_their_sequences_quantized_alone(v_scaling):
    """quantize_fp8 with cu_seqlens: sequence b of the packed layout (Fp8Tensor.sequence) holds the
    bytes and scales of that sequence quantized as a batch of one (its blocks from its start)."""
    cu_q, cu_k = (torch.tensor([0] + lens).cumsum(0).to(torch.int32) for lens in (VARLEN_Q, VARLEN_K))
    q, k, v = (torch.randn(int(cu[-1]), h, 64, dtype=torch.bfloat16) * (1 + torch.arange(h))[:, None]
               for cu, h in ((cu_q, 4), (cu_k, 2), (cu_k, 2)))
    kw = dict(block_m=16, block_n=32, v_scaling=v_scaling, v_pv_order=True)
    qkv = fa3py.quantize_fp8(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    for b in range(len(VARLEN_Q)):
        one = fa3py.quantize_fp8(*(x[cu[b]:cu[b + 1]][None] for x, cu in ((q, cu_q), (k, cu_k), (v, cu_k))), **kw)
        for packed, alone in zip(qkv, one):
            seq = packed.sequence(b)
            assert torch.equal(seq.data.view(torch.uint8), alone.data.view(torch.uint8)), (b, packed.role)
            assert torch.equal(seq.scale, alone.scale), (b, packed.role)
    assert qkv.v.tokens().shape == v.shape and qkv.k.dequantize().shape == k.shape
    _token_views_are_views(qkv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(VARLEN_Q),
                           max_seqlen_k=max(b - a for a, b in zip(cu_k.tolist(), cu_k.tolist()[1:])))


def _token_views_are_views(qkv, **kw):
    """token_view has tokens()' shape, dtype and device without a copy, and a request on quantized
    operands carries those views (tokens() copies V^T in the PV key order: once per call)."""
    req = fp8.make_request(*qkv, **kw)
    for t, x in zip(qkv, (req.q, req.k, req.v)):
        view = t.token_view()
        assert view.shape == t.tokens().shape == x.shape and view.dtype == t.data.dtype
        assert view.untyped_storage().data_ptr() == t.data.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


@pytest.mark.parametrize("pv_order", [False, True])
def test_request_carries_token_views(pv_order):
    q, k, v = (torch.randn(2, 37, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    _token_views_are_views(fa3py.quantize_fp8(q, k, v, block_n=32, v_pv_order=pv_order), causal=True)


@pytest.mark.parametrize("feature", ["plain", "causal", "softcap", "chunk"])
@pytest.mark.parametrize("seqused", [False, True])
def test_varlen_emulation_against_reference(feature, seqused):
    """Packed operands (and seqused) through flash_attn_varlen_func: each sequence as its own
    batch of one, against the fp64 reference of the dequantized operands; fp8=True on packed 16-bit
    inputs quantizes each sequence alone too."""
    cu_q, cu_k = (torch.tensor([0] + lens).cumsum(0).to(torch.int32) for lens in (VARLEN_Q, VARLEN_K))
    q, k, v = (torch.randn(int(cu[-1]), h, 64, dtype=torch.bfloat16) for cu, h in ((cu_q, 4), (cu_k, 2), (cu_k, 2)))
    used = dict(seqused_q=torch.tensor([4, 50, 1, 0, 33], dtype=torch.int32),
                seqused_k=torch.tensor([40, 64, 2, 9, 1], dtype=torch.int32)) if seqused else {}
    qkv = fa3py.quantize_fp8(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_m=32, block_n=32)
    kw = dict(max_seqlen_q=max(VARLEN_Q), max_seqlen_k=max(VARLEN_K), **used, **FP8_FEATURES[feature])
    out, lse = fa3py.flash_attn_varlen_func(*qkv, cu_q, cu_k, return_attn_probs=True, **kw)
    qf, kf, vf = (t.dequantize() for t in qkv)
    req = make_request(*(x.to(torch.bfloat16) for x in (qf, kf, vf)), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    ref_out, ref_lse = reference.attention(req, q=qf, k=kf, v=vf)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and out.dtype == torch.bfloat16
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and torch.equal(out[~finite.T.any(-1)].abs().sum(), torch.tensor(0.0,
                                                                                                                 dtype=out.dtype))
    assert max_err(out, ref_out) <= 0.05 * float(ref_out.abs().max())  # P in e4m3: a few percent
    assert max_err(lse[finite], ref_lse[finite]) <= 1e-4
    # fp8=True on packed 16-bit inputs: the same quantization inside
    req16 = make_request(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, fp8=True, **kw)
    default = fa3py.quantize_fp8(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert torch.equal(fp8.forward(req16)[0], fp8.emulate.attention(default, req.params, torch.bfloat16, **used)[0])


@pytest.mark.parametrize("v_scaling", ["block", "channel"])
def test_one_key_tile_is_the_plain_fp8_math(v_scaling):
    """With every key in one tile the running max is the final max: the emulation is the plain
    PyTorch FP8 math up to float32 summation order."""
    q, k, v = inputs(2, 77, 100, 4, 2, 64, 64, torch.bfloat16, "cpu")
    qkv = fa3py.quantize_fp8(q, k, v, block_n=128, v_scaling=v_scaling)
    req = make_request(q, k, v, causal=True)
    out = fa3py.attention(*qkv, causal=True)
    want, _ = fp8_math_in_pytorch(qkv, req)
    assert max_err(out, want) <= 2 * 2.0**-8 * float(want.abs().max())  # one bf16 rounding apart


def test_fp8_true_is_quantize_then_attention():
    q, k, v = inputs(1, 150, 140, 4, 2, 64, 64, torch.float16, "cpu")
    out = fa3py.attention(q, k, v, fp8=True, causal=True)
    assert out.dtype == torch.float16
    assert torch.equal(out, fa3py.attention(*fa3py.quantize_fp8(q, k, v), causal=True))
    kv = fa3py.quantize_fp8(k=k, v=v)  # a KV cache, quantized once
    assert torch.equal(out, fa3py.attention(q, kv.k, kv.v, causal=True))


def test_fp8_beats_per_tensor_fp8_on_outliers():
    """The FA3 paper's experiment, short (benchmarks/accuracy.py runs it at full size, where the
    gap is 2.4x at seqlen 8k; at 512 keys it is 1.3-1.7x over seeds)."""
    from benchmarks import accuracy

    q, k, v = accuracy.paper_inputs(1, 512, 2, 128, "cpu", seed=0)
    ref = accuracy.reference(q, k, v, 128**-0.5)
    rmse = {name: accuracy.metrics(accuracy.variant(name, q, k, v), ref)["rmse"]
            for name in ("bf16", "fp8_tensor", "fp8_block", "fp8_hadamard", "fp8")}
    assert rmse["bf16"] < 1e-3 < rmse["fp8"]
    assert 1.2 * rmse["fp8"] < rmse["fp8_tensor"]
    # every FP8 variant is attention with e4m3 operands: the same order of error (block scales
    # alone read Q / K as channel-scaled V once, RMSE 0.75, cosine 0.06)
    assert all(rmse[n] < 2 * rmse["fp8_tensor"] for n in ("fp8_block", "fp8_hadamard"))
    assert rmse["fp8"] == accuracy.metrics(fa3py.attention(q, k, v, fp8=True), ref)["rmse"]


# ---- API, formats, gradients -------------------------------------------------------------------


def test_quantized_operands_must_agree():
    q, k, v = inputs(1, 20, 30, 2, 1, 32, 32, torch.bfloat16, "cpu")
    a, b = fa3py.quantize_fp8(q, k, v), fa3py.quantize_fp8(q, k, v, seed=3)
    with pytest.raises(ValueError, match="share one format"):
        fa3py.attention(a.q, b.k, a.v)
    with pytest.raises(ValueError, match="given the quantized 'v'"):
        fa3py.attention(a.q, a.v, a.k)
    with pytest.raises(NotImplementedError, match="requires grad"):
        fa3py.attention(q.clone().requires_grad_(), a.k, a.v)
    with pytest.raises(ValueError, match="v_scaling"):
        fa3py.quantize_fp8(q, v_scaling="tensor")
    with pytest.raises(ValueError, match="at least one"):
        fa3py.quantize_fp8()
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        fa3py.quantize_fp8(q.float())


def test_explain_quantized():
    q, k, v = inputs(1, 20, 30, 2, 1, 32, 32, torch.bfloat16, "cpu")
    text = fa3py.explain(*fa3py.quantize_fp8(q, k, v))
    assert "forward: torch" in text and "emulation" in text and "already quantized" in text
    text = fa3py.explain(q, k, v, fp8=True)
    assert "slower than 16-bit" in text and "straight-through" in text
    assert "fp8" not in fa3py.explain(q, k, v)


def test_fp8_gradients_are_straight_through():
    """Forward FP8; backward the 16-bit backward at the original inputs, fed the FP8 out / LSE."""
    q, k, v = inputs(1, 70, 90, 4, 2, 64, 64, torch.bfloat16, "cpu")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fa3py.attention(*leaves, fp8=True, causal=True, return_lse=True)
    assert torch.equal(out.detach(), fa3py.attention(q, k, v, fp8=True, causal=True))
    dout = torch.randn_like(out)
    out.backward(dout)
    req = make_request(q, k, v, causal=True)
    want = torch_backend.backward(req, out.detach(), lse, dout)
    for leaf, w in zip(leaves, want):
        assert torch.equal(leaf.grad, w)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    ref, _ = reference.attention(req, torch.float64, *exact)
    ref.backward(dout.double())
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())
    err_out = rel(out.detach(), ref.detach())
    errs = [rel(leaf.grad, x.grad) for leaf, x in zip(leaves, exact)]
    assert all(e <= err_out for e in errs), (err_out, errs)  # FP8's forward error, carried over


def test_fa3_format_inputs_still_work():
    q, k, v = (x.float().to(torch.float8_e4m3fn) for x in inputs(1, 30, 40, 2, 1, 32, 32, torch.bfloat16, "cpu"))
    d = torch.rand(1, 1) + 0.5
    out = fa3py.flash_attn_func(q, k, v, q_descale=d, k_descale=d, v_descale=d)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()


# ---- the int8 Q K^T mode ---------------------------------------------------------------------


def test_int8_qk_roundtrip_and_bad_rows():
    x = torch.randn(1, 50, 2, 64).bfloat16()
    x[0, 7, 1, 3] = float("nan")
    fmt = Fp8Format(block_m=1, qk_int8=True)
    t = quantize_operand(x, "q", fmt)
    assert t.data.dtype == torch.int8 and t.scale.shape == (1, 2, 50)
    y = fp8.rotate(x)
    s = t.scale_per_token()
    good = torch.isfinite(s)
    assert torch.all(((t.data.float() * s - y).abs() <= s / 2)[good.expand_as(y)])
    assert torch.equal(~good[..., 0], torch.zeros(1, 50, 2, dtype=torch.bool).index_fill_(1, torch.tensor(7), True)
                       & torch.tensor([False, True]))


def test_int8_qk_mode_against_reference_and_more_accurate():
    from benchmarks import accuracy

    q, k, v = inputs(1, 113, 203, 4, 2, 64, 64, torch.bfloat16, "cpu")
    qkv = fa3py.quantize_fp8(q, k, v, block_m=1, block_n=64, qk_int8=True)
    req = make_request(q, k, v, causal=True)
    out = fa3py.attention(*qkv, causal=True)
    ref_out, _ = reference.attention(req)
    baseline, _ = fp8_math_in_pytorch(qkv, req)
    assert max_err(out, ref_out) <= 2 * max_err(baseline, ref_out) + 2e-3
    q, k, v = accuracy.paper_inputs(1, 512, 2, 128, "cpu", seed=0)
    ref = accuracy.reference(q, k, v, 128**-0.5)
    rmse = {name: accuracy.metrics(accuracy.variant(name, q, k, v), ref)["rmse"] for name in ("fp8", "int8_qk")}
    assert rmse["int8_qk"] < 0.8 * rmse["fp8"]
    bad = q.clone()
    bad[0, 9, 1, 0] = float("inf")
    out = fa3py.attention(*fa3py.quantize_fp8(bad, k, v, block_m=1, qk_int8=True))
    rows = out.isnan().any(-1)
    assert rows.sum() == 1 and rows[0, 9, 1] and out[0, 9, 1].isnan().all()


def test_fp8_attention_chunk_masks_like_16_bit():
    """attention_chunk with fp8=True and on quantized operands: a query sees only the keys of its
    chunk, as 16-bit attention does; where every kept key's value is 0 except outside the chunk
    the output is exactly 0 (a dropped chunk mask would show)."""
    import fa3py

    q, k, v = inputs(1, 100, 100, 2, 1, 64, 64, torch.bfloat16, "cpu")
    chunk = 32
    v_out = v.clone()
    pos = torch.arange(100)
    v_out[:, pos // chunk == 3] = 0  # keys of the last chunk (96..99) are zero
    out = fa3py.attention(q, k, v_out, fp8=True, causal=True, attention_chunk=chunk)
    assert out[:, 96:].abs().max() == 0 and out[:, :96].abs().max() > 0
    qkv = fa3py.quantize_fp8(q, k, v_out)
    assert torch.equal(fa3py.attention(*qkv, causal=True, attention_chunk=chunk), out)


def test_v_pv_order_stores_the_same_values_in_the_kernel_key_order():
    """v_pv_order permutes the keys of each 16-key group of the transposed V (PV_KEY_ORDER); the
    token view, dequantization and the emulated attention are those of the natural order."""
    from fa3py.fp8.format import PV_KEY_ORDER, pv_key_order

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    plain = fa3py.quantize_fp8(q, k, v, block_n=32)
    pv = fa3py.quantize_fp8(q, k, v, block_n=32, v_pv_order=True)
    assert pv.v.data.shape == plain.v.data.shape == (2, 2, 64, 48)
    assert torch.equal(pv.v.data.view(torch.uint8), plain.v.data[..., pv_key_order(48)].view(torch.uint8))
    assert torch.equal(pv.v.data[..., 16 + 2].view(torch.uint8), plain.v.data[..., 16 + PV_KEY_ORDER[2]].view(torch.uint8))
    assert torch.equal(pv.v.tokens().view(torch.uint8), plain.v.tokens().view(torch.uint8))
    params = make_request(q, k, v, causal=True).params
    out_plain, lse_plain = fp8.emulated_attention(plain, params, torch.bfloat16)
    out_pv, lse_pv = fp8.emulated_attention(pv, params, torch.bfloat16)
    assert torch.equal(out_plain, out_pv) and torch.equal(lse_plain, lse_pv)
    with pytest.raises(ValueError, match="v_transposed"):
        fa3py.fp8.Fp8Format(v_transposed=False, v_pv_order=True)


def test_cute_key_order_is_the_format_s():
    cute_fp8 = pytest.importorskip("cute_kernels.fp8")
    from fa3py.fp8.format import PV_KEY_ORDER

    assert cute_fp8.PV_KEY_ORDER == PV_KEY_ORDER
