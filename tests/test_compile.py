"""torch.compile and the custom ops (`fa3py.ops`): opcheck on forward and backward, and
models that call fa3py compiled with fullgraph=True (no graph break), against eager."""

import shutil

import pytest
import torch

import fa3py
from fa3py import ops
from fa3py.validation import make_request

from _util import DEVICE, inputs, packed

OPCHECK_CASES = {
    "causal_gqa": lambda: (inputs(2, 9, 13, 4, 2, 32, 48, torch.bfloat16), dict(causal=True)),
    "chunk_window_softcap": lambda: (inputs(1, 17, 17, 2, 1, 64, 64, torch.float16),
                                     dict(attention_chunk=4, window_size=(3, 2), softcap=2.0)),
}


def _varlen_case():
    q, cu_q = packed([5, 0, 9], 4, 32, torch.float16)
    k, cu_k = packed([7, 3, 9], 2, 32, torch.float16)
    v, _ = packed([7, 3, 9], 2, 32, torch.float16)
    used = torch.tensor([4, 3, 9], dtype=torch.int32, device=DEVICE)
    return (q, k, v), dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used, causal=True)


OPCHECK_CASES["varlen_seqused"] = _varlen_case


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    (q, k, v), kw = OPCHECK_CASES[case]()
    req = make_request(q, k, v, **kw)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    args = (*leaves, *ops.request_args(req), None)
    torch.library.opcheck(torch.ops.fa3py.fwd.default, args)
    out, lse = torch.ops.fa3py.fwd(*args)
    want_out, want_lse = fa3py.autograd.run(req)  # the eager path
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fa3py.bwd.default,
                          (dout, q, k, v, out.detach(), lse, *ops.request_args(req), None))


class _Block(torch.nn.Module):
    """QKV projection, then fa3py.attention (chunked causal) and flash_attn_func (window)."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads, self.proj = heads, torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = self.proj(x).view(b, s, 3, self.heads, dim // self.heads).unbind(2)
        o = fa3py.attention(q, k, v, causal=True, attention_chunk=8)
        o = o + fa3py.flash_attn_func(q, k, v, window_size=(4, 0), softcap=5.0)
        return o.flatten(2)


class _VarlenBlock(torch.nn.Module):
    def forward(self, q, k, v, cu_q, cu_k):
        out, lse = fa3py.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 16, 16, causal=True, return_attn_probs=True)
        return out * 2, lse


def _graph_ops(seen):
    """A torch.compile backend that records the call targets of the traced graph, then runs it."""
    def backend(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    return backend


_NO_CXX = DEVICE == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


@pytest.mark.parametrize("compile_backend", [
    "aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(_NO_CXX, reason="inductor on CPU needs a C++ compiler"))])
def test_compile_fullgraph_model(compile_backend):
    torch._dynamo.reset()
    model = _Block().to(device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(2, 19, 64, device=DEVICE, dtype=torch.bfloat16)
    want = model(x)
    want.float().square().sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    got = compiled(x)
    got.float().square().sum().backward()
    assert torch.equal(got, want)
    for g, w in zip((p.grad for p in model.parameters()), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)  # same kernels; sums ordered by inductor


def test_compile_traces_the_custom_op_and_varlen():
    torch._dynamo.reset()
    seen = set()
    q, cu_q = packed([5, 0, 16], 4, 32, torch.float16)
    k, cu_k = packed([7, 3, 16], 2, 32, torch.float16)
    v, _ = packed([7, 3, 16], 2, 32, torch.float16)
    model = _VarlenBlock()
    compiled = torch.compile(model, fullgraph=True, backend=_graph_ops(seen))
    for got, want in zip(compiled(q, k, v, cu_q, cu_k), model(q, k, v, cu_q, cu_k)):
        assert torch.equal(got, want)
    assert "fa3py.fwd" in seen, seen


def test_fp8_backward_is_straight_through_in_the_op():
    """fp8=True through the custom ops: the same straight-through 16-bit gradients as eager."""
    q, k, v = inputs(1, 8, 8, 1, 1, 16, 16, torch.bfloat16)
    req = make_request(q, k, v, fp8=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = torch.ops.fa3py.fwd(*leaves, *ops.request_args(req), None)
    dout = torch.randn_like(out)
    out.backward(dout)
    eager = [x.clone().requires_grad_() for x in (q, k, v)]
    fa3py.attention(*eager, fp8=True).backward(dout)
    for a, b in zip(leaves, eager):
        assert torch.equal(a.grad, b.grad)


def test_compile_new_sequence_lengths():
    """torch.compile's default (automatic dynamic shapes): a second sequence length recompiles with
    dynamic lengths, still one graph, forward and backward as in eager."""
    torch._dynamo.reset()

    def fn(q, k, v):
        return fa3py.flash_attn_func(q, k, v, causal=True, attention_chunk=8) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for s in (17, 29, 40):
        q, k, v = (x.requires_grad_() for x in inputs(2, s, s + 3, 4, 2, 32, 32, torch.bfloat16))
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        want = fn(q, k, v)
        assert torch.equal(out, want)
        for g, w in zip(grads, torch.autograd.grad(want.sum(), (q, k, v))):
            assert torch.equal(g, w)


def test_compile_dynamic_true():
    """torch.compile(dynamic=True): head dims and float arguments symbolic too; one graph, the
    eager result."""
    torch._dynamo.reset()

    def fn(q, k, v):
        return fa3py.flash_attn_func(q, k, v, causal=True, softcap=5.0) * 2

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for s, d in ((17, 32), (23, 64)):
        q, k, v = inputs(2, s, s + 3, 4, 2, d, d, torch.bfloat16)
        assert torch.equal(compiled(q, k, v), fn(q, k, v))
