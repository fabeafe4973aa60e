"""Every bad input gets the right exception, naming the argument and what is expected."""

import re

import pytest
import torch

import fa3py


def qkv(b=2, sq=10, sk=12, h=4, hk=2, d=32, dv=32, dtype=torch.bfloat16):
    return (torch.randn(b, sq, h, d).to(dtype), torch.randn(b, sk, hk, d).to(dtype),
            torch.randn(b, sk, hk, dv).to(dtype))


def call(q=None, k=None, v=None, **kw):
    dq, dk, dv = qkv()
    return fa3py.attention(dq if q is None else q, dk if k is None else k, dv if v is None else v, **kw)


BAD_BATCHED = [
    (lambda: call(q=[1, 2]), TypeError, "`q` must be a torch.Tensor"),
    (lambda: call(q=torch.randn(2, 10, 4, 32)), TypeError, "`q` must have dtype"),
    (lambda: call(k=torch.randn(2, 12, 2, 32, dtype=torch.float16)), TypeError, "`k` must have the same dtype as q"),
    (lambda: call(q=torch.randn(2, 10, 32, dtype=torch.bfloat16)), ValueError, "`q` must be 4-D"),
    (lambda: call(v=torch.randn(2, 11, 2, 32, dtype=torch.bfloat16)), ValueError, "`v` must match k"),
    (lambda: call(k=torch.randn(2, 12, 2, 64, dtype=torch.bfloat16)), ValueError, "`k` head dimension 64"),
    (lambda: call(q=torch.randn(2, 10, 4, 20, dtype=torch.bfloat16),
                  k=torch.randn(2, 12, 2, 20, dtype=torch.bfloat16)), ValueError, "multiple of 8"),
    (lambda: call(q=torch.randn(2, 10, 4, 264, dtype=torch.bfloat16),
                  k=torch.randn(2, 12, 2, 264, dtype=torch.bfloat16)), ValueError, "at most 256"),
    (lambda: call(v=torch.randn(2, 12, 2, 12, dtype=torch.bfloat16)), ValueError, "`v` head dimension"),
    (lambda: call(k=torch.randn(2, 12, 3, 32, dtype=torch.bfloat16),
                  v=torch.randn(2, 12, 3, 32, dtype=torch.bfloat16)), ValueError, "nheads_kv (3) must divide"),
    (lambda: call(k=torch.randn(3, 12, 2, 32, dtype=torch.bfloat16),
                  v=torch.randn(3, 12, 2, 32, dtype=torch.bfloat16)), ValueError, "`k` batch size 3"),
    (lambda: call(softmax_scale=float("nan")), ValueError, "`softmax_scale` must be finite"),
    (lambda: call(softmax_scale="big"), TypeError, "`softmax_scale` must be a float"),
    (lambda: call(softcap=-1.0), ValueError, "`softcap` must be finite and >= 0"),
    (lambda: call(window_size=(-2, 0)), ValueError, "`window_size` entries must be >= -1"),
    (lambda: call(window_size=5), TypeError, "`window_size` must be a pair"),
    (lambda: call(backend="cuda"), ValueError, "`backend` must be one of"),
    (lambda: call(fp8=True, q=torch.randn(2, 10, 4, 32).to(torch.float8_e4m3fn),
                  k=torch.randn(2, 12, 2, 32).to(torch.float8_e4m3fn),
                  v=torch.randn(2, 12, 2, 32).to(torch.float8_e4m3fn)), ValueError, "`fp8` quantizes"),
    (lambda: fa3py.flash_attn_func(*qkv(), q_descale=torch.ones(2, 2)), ValueError, "`q_descale` is only meaningful"),
    (lambda: fa3py.flash_attn_func(*qkv(dtype=torch.float8_e4m3fn), k_descale=torch.ones(2, 4)), ValueError,
     "`k_descale` must have shape (batch, nheads_kv)"),
    (lambda: fa3py.flash_attn_func(*qkv(dtype=torch.float8_e4m3fn), v_descale=torch.ones(2, 2, dtype=torch.float64)),
     TypeError, "`v_descale` must have dtype torch.float32"),
    (lambda: fa3py.flash_attn_func(*qkv(), qv=torch.randn(1)), TypeError, "`qv`"),
    (lambda: fa3py.flash_attn_func(*qkv(), attention_chunk=-128), ValueError, "`attention_chunk`"),
    (lambda: fa3py.flash_attn_func(*qkv(), num_splits=-1), ValueError, "`num_splits` must be an int >= 0"),
    (lambda: fa3py.flash_attn_func(*qkv(), num_splits=2.0), TypeError, "`num_splits` must be an int >= 0"),
    (lambda: fa3py.flash_attn_func(*qkv(), num_splits=True), TypeError, "`num_splits` must be an int >= 0"),
    (lambda: fa3py.flash_attn_func(*qkv(), sm_margin=-1), ValueError, "`sm_margin` must be >= 0"),
    (lambda: fa3py.flash_attn_func(*qkv(), sm_margin=2.0), TypeError, "`sm_margin` must be an int >= 0"),
    (lambda: fa3py.flash_attn_varlen_func(*qkv(), None, None, None, None, sm_margin=True), TypeError, "`sm_margin`"),
]


i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)


def varlen(cu_q=None, cu_k=None, used_q=None, used_k=None, max_q=None, max_k=None, total_q=12, total_k=15):
    q, k, v = torch.randn(total_q, 4, 32), torch.randn(total_k, 2, 32), torch.randn(total_k, 2, 32)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    cu_q = i32([0, 5, 12]) if cu_q is None else cu_q
    cu_k = i32([0, 7, 15]) if cu_k is None else cu_k
    return fa3py.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, seqused_q=used_q, seqused_k=used_k)


BAD_VARLEN = [
    (lambda: varlen(cu_q=torch.tensor([0, 5, 12])), TypeError, "`cu_seqlens_q` must have dtype torch.int32"),
    (lambda: varlen(cu_q=i32([0, 5, 7, 12])), ValueError,
     "`cu_seqlens_q` and `cu_seqlens_k` must both have length batch + 1, got 4 and 3"),
    (lambda: varlen(cu_q=i32([0, 7, 5])), ValueError, "`cu_seqlens_q` must be non-decreasing"),
    (lambda: varlen(cu_q=i32([0, 5, 11])), ValueError, "`cu_seqlens_q` last value (11) must equal"),
    (lambda: varlen(cu_k=i32([1, 7, 15])), ValueError, "`cu_seqlens_k` must start at 0"),
    (lambda: varlen(cu_q=i32([[0, 5, 12]])), ValueError, "`cu_seqlens_q` must be 1-D"),
    (lambda: varlen(used_k=i32([7, 9])), ValueError, "`seqused_k` must not exceed"),
    (lambda: varlen(used_q=i32([1, -1])), ValueError, "`seqused_q` must be >= 0"),
    (lambda: varlen(used_q=i32([1, 2, 3])), ValueError, "`seqused_q` must be 1-D of length 2"),
    (lambda: varlen(max_q=3), ValueError, "`max_seqlen_q` (3) is smaller than the longest sequence (7)"),
    (lambda: varlen(max_k=2.5), TypeError, "`max_seqlen_k` must be an int"),
]


@pytest.mark.parametrize("case", range(len(BAD_BATCHED) + len(BAD_VARLEN)))
def test_bad_input(case):
    fn, exc, msg = (BAD_BATCHED + BAD_VARLEN)[case]
    with pytest.raises(exc) as e:
        fn()
    assert msg in str(e.value), str(e.value)


def test_forced_backend_that_cannot_serve_raises():
    with pytest.raises(fa3py.BackendUnavailable, match="forced backend 'cute' cannot serve"):
        call(backend="cute")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FA3PY_BACKEND", "cute")
    with pytest.raises(fa3py.BackendUnavailable, match="sm90"):
        call()
    monkeypatch.setenv("FA3PY_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FA3PY_BACKEND must be one of"):
        call()


def test_good_varlen_accepts_max_seqlen():
    out = varlen(max_q=7, max_k=8)
    assert out.shape == (12, 4, 32)


def test_errors_leave_inputs_unchanged():
    q, k, v = qkv()
    before = [x.clone() for x in (q, k, v)]
    with pytest.raises(ValueError):
        fa3py.attention(q, k, v, window_size=(-5, 0))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))


MISTYPED_SCALARS = [
    (dict(window_size=(1.7, 0.2)), "`window_size` must be a pair of ints"),  # not truncated to (1, 0)
    (dict(window_size=("4", 0)), "`window_size` must be a pair of ints"),
    (dict(window_size=(True, 0)), "`window_size` must be a pair of ints"),
    (dict(softmax_scale="0.1"), "`softmax_scale` must be a float or None, got str"),
    (dict(softmax_scale=torch.tensor(0.1)), "`softmax_scale` must be a float or None, got Tensor"),
    (dict(softmax_scale=True), "`softmax_scale` must be a float or None, got bool"),
    (dict(softcap="30"), "`softcap` must be a float, got str"),
]


@pytest.mark.parametrize("kwargs,msg", MISTYPED_SCALARS)
def test_mistyped_scalars_are_errors(kwargs, msg):
    with pytest.raises(TypeError, match=re.escape(msg)):
        call(**kwargs)


def test_numeric_scalars_of_any_kind_are_accepted():
    import numpy as np

    q, k, v = qkv()
    ref = fa3py.attention(q, k, v, softmax_scale=0.5, window_size=(3, 1))
    out = fa3py.attention(q, k, v, softmax_scale=np.float32(0.5), window_size=(np.int64(3), 1))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    fa3py.attention(q, k, v, softmax_scale=1, softcap=30)  # ints are numbers too


def test_causal_sets_the_right_window_to_zero():
    """As FlashAttention-3: causal=True replaces any right window by 0 (documented, not an error)."""
    q, k, v = qkv()
    ref = fa3py.attention(q, k, v, causal=True, window_size=(4, 0))
    for right in (-1, 3):
        out = fa3py.attention(q, k, v, causal=True, window_size=(4, right))
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert "whatever window_size says" in fa3py.attention.__doc__


@pytest.mark.parametrize("arg,q_heads,kv_heads", [("q", 0, 2), ("k", 4, 0), ("q", 0, 0)])
def test_zero_heads_name_the_tensor(arg, q_heads, kv_heads):
    q, k, v = qkv(h=q_heads, hk=kv_heads)
    with pytest.raises(ValueError, match=re.escape(f"`{arg}` must have at least one head")):
        fa3py.attention(q, k, v)


def test_cu_seqlens_of_different_lengths_name_cu_seqlens_q():
    with pytest.raises(ValueError, match="`cu_seqlens_q` and `cu_seqlens_k` must both have length"):
        varlen(cu_k=i32([0, 3, 7, 15]))
