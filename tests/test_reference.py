"""fa3py.reference against a naive float64 attention written row by row from the spec."""

import math

import pytest
import torch

from fa3py import reference
from fa3py.validation import make_request

from _util import packed


def naive(q, k, v, scale, left, right, softcap, group, qd=None, kd=None, vd=None):
    """One sequence: q (Lq, H, D), k (Lk, Hk, D), v (Lk, Hk, Dv); loops over heads and rows."""
    lq, lk = q.shape[0], k.shape[0]
    out = torch.zeros(lq, q.shape[1], v.shape[2], dtype=torch.float64)
    lse = torch.full((q.shape[1], lq), -math.inf, dtype=torch.float64)
    for h in range(q.shape[1]):
        hk = h // group
        for i in range(lq):
            keys = [j for j in range(lk)
                    if (left < 0 or j >= i + lk - lq - left) and (right < 0 or j <= i + lk - lq + right)]
            if not keys:
                continue
            qi = q[i, h].double() * (1.0 if qd is None else float(qd[hk]))
            s = []
            for j in keys:
                kj = k[j, hk].double() * (1.0 if kd is None else float(kd[hk]))
                x = float(qi @ kj) * scale
                s.append(softcap * math.tanh(x / softcap) if softcap > 0 else x)
            m = max(s)
            w = [math.exp(x - m) for x in s]
            total = sum(w)
            lse[h, i] = m + math.log(total)
            for wj, j in zip(w, keys):
                vj = v[j, hk].double() * (1.0 if vd is None else float(vd[hk]))
                out[i, h] += wj / total * vj
    return out, lse


SIZES = [(1, 1), (113, 203), (239, 1), (17, 3), (64, 64), (30, 77)]


@pytest.mark.parametrize("lq,lk", SIZES)
@pytest.mark.parametrize("causal,window,softcap", [
    (False, (-1, -1), 0.0), (True, (-1, -1), 0.0), (False, (5, 3), 0.0),
    (True, (9, -1), 0.0), (False, (-1, 0), 2.5), (False, (0, 0), 0.0),
])
def test_reference_matches_naive(lq, lk, causal, window, softcap):
    h, hk, d, dv = 4, 2, 16, 8
    q = torch.randn(2, lq, h, d)
    k = torch.randn(2, lk, hk, d)
    v = torch.randn(2, lk, hk, dv)
    req = make_request(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal, window_size=window,
                       softcap=softcap, softmax_scale=0.3)
    out, lse = reference.attention(req)
    p = req.params
    for b in range(2):
        o_n, l_n = naive(req.q[b], req.k[b], req.v[b], 0.3, p.window_left, p.window_right, softcap, h // hk)
        torch.testing.assert_close(out[b], o_n, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[b], l_n, rtol=1e-10, atol=1e-10)


def test_reference_varlen_seqused_descale():
    h, hk, d = 2, 1, 16
    lens_q, lens_k = [5, 0, 13], [7, 4, 2]
    q, cu_q = packed(lens_q, h, d, torch.float32, device="cpu")
    k, cu_k = packed(lens_k, hk, d, torch.float32, device="cpu")
    v, _ = packed(lens_k, hk, d, torch.float32, device="cpu")
    q8, k8, v8 = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
    qd, kd, vd = (torch.rand(3, hk) + 0.5 for _ in range(3))
    used_q = torch.tensor([4, 0, 13], dtype=torch.int32)
    used_k = torch.tensor([7, 3, 1], dtype=torch.int32)
    req = make_request(q8, k8, v8, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_q=used_q,
                       seqused_k=used_k, q_descale=qd, k_descale=kd, v_descale=vd)
    out, lse = reference.attention(req)
    assert out.shape == (18, h, d) and lse.shape == (h, 18)
    for b in range(3):
        sq, sk = int(cu_q[b]), int(cu_k[b])
        uq, uk = int(used_q[b]), int(used_k[b])
        o_n, l_n = naive(q8[sq:sq + uq].float(), k8[sk:sk + uk].float(), v8[sk:sk + uk].float(),
                         d ** -0.5, -1, 0, 0.0, h // hk, qd[b], kd[b], vd[b])
        torch.testing.assert_close(out[sq:sq + uq], o_n, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[:, sq:sq + uq], l_n, rtol=1e-10, atol=1e-10)
        # rows beyond seqused_q: zero output, -inf lse
        pad = slice(sq + uq, int(cu_q[b + 1]))
        assert (out[pad] == 0).all() and (lse[:, pad] == -math.inf).all()


def test_reference_fully_masked_rows():
    # seqlen_q > seqlen_k with causal: the first rows see no key (bottom-right alignment).
    q, k, v = torch.randn(1, 6, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    req = make_request(q.half(), k.half(), v.half(), causal=True)
    out, lse = reference.attention(req)
    assert (out[0, :4] == 0).all() and torch.isinf(lse[0, 0, :4]).all()
    assert torch.isfinite(lse[0, 0, 4:]).all()


def test_reference_gradients_are_finite_with_empty_rows():
    q = torch.randn(1, 6, 1, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 1, 8, dtype=torch.float64, requires_grad=True)
    req = make_request(q.detach().half(), k.detach().half(), v.detach().half(), causal=True)
    out, _ = reference.attention(req, torch.float64, q, k, v)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert (q.grad[0, :4] == 0).all()
    assert torch.autograd.gradcheck(lambda a, b, c: reference.attention(req, torch.float64, a, b, c)[0],
                                    (q, k, v))
