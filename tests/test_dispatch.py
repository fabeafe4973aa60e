"""Dispatch decisions under simulated devices, and the FA3 signatures."""

import inspect
import types
import warnings

import pytest
import torch

import fa3py
from fa3py import dispatch
from fa3py.validation import make_request


def fake_backend(name, fwd_reason=None, bwd_reason=None):
    def why_not(req, backward):
        return bwd_reason if backward else fwd_reason

    def forward(req):
        raise AssertionError("dispatch tests never run kernels")

    return types.SimpleNamespace(__name__=name, why_not=why_not, forward=forward, backward=forward)


@pytest.fixture
def device(monkeypatch):
    """Pretend the CPU tensors live on a GPU of the given capability; fake cute/triton kernels."""
    state = {"cap": None, "cute": fake_backend("cute", None, "forward only"), "triton": fake_backend("triton")}

    monkeypatch.setattr(dispatch, "device_capability", lambda dev: state["cap"])
    real_load = dispatch.load
    monkeypatch.setattr(dispatch, "load", lambda n: (state[n], None) if n in ("cute", "triton") else real_load(n))
    monkeypatch.delenv("FA3PY_BACKEND", raising=False)
    return state


def req(**kw):
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    return make_request(q, q, q, **kw)


@pytest.mark.parametrize("cap,fwd,bwd", [
    (None, "torch", "torch"),
    ((8, 0), "triton", "triton"),
    ((8, 6), "triton", "triton"),
    ((8, 9), "triton", "triton"),
    ((9, 0), "cute", "triton"),
    ((10, 0), "triton", "triton"),
    ((12, 0), "triton", "triton"),
    ((7, 5), "torch", "torch"),
])
def test_auto_dispatch_by_device(device, cap, fwd, bwd):
    device["cap"] = cap
    assert dispatch.choose(req()).name == fwd
    assert dispatch.choose(req(), backward=True).name == bwd


def test_falls_through_when_a_kernel_cannot_serve(device):
    device["cap"] = (9, 0)
    device["cute"] = fake_backend("cute", "headdim 40 is not compiled")
    c = dispatch.choose(req())
    assert c.name == "triton" and "headdim 40" in c.reasons[0][1]
    device["triton"] = fake_backend("triton", "softcap unsupported")
    assert dispatch.choose(req()).name == "torch"


def test_forced_backend(device, monkeypatch):
    device["cap"] = (9, 0)
    assert dispatch.choose(req(), backend="torch").name == "torch"
    assert dispatch.choose(req(), backend="triton").name == "triton"
    # a forced forward-only backend hands its backward to the next one
    assert dispatch.choose(req(), backward=True, backend="cute").name == "triton"
    monkeypatch.setenv("FA3PY_BACKEND", "triton")
    assert dispatch.choose(req()).name == "triton"
    device["cap"] = (8, 0)
    with pytest.raises(fa3py.BackendUnavailable, match="needs sm90 .*GPU is sm80"):
        dispatch.choose(req(), backend="cute")


def test_forced_triton_on_cpu_only_with_interpreter(device, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fa3py.BackendUnavailable, match="TRITON_INTERPRET=1"):
        dispatch.choose(req(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose(req(), backend="triton").name == "triton"
    assert dispatch.choose(req()).name == "torch"  # auto never picks the interpreter


def test_explain_names_backend_and_reason(device):
    device["cap"] = (8, 0)
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    text = fa3py.explain(q, q, q, causal=True)
    assert text.startswith("forward: triton") and "GPU is sm80" in text and "cute backend needs sm90" in text
    device["cap"] = (9, 0)
    text = fa3py.explain(q, q, q, causal=True)
    assert "forward: cute" in text and "backward: triton" in text and "forward only" in text


def test_explain_on_cpu_without_fakes(monkeypatch):
    monkeypatch.delenv("FA3PY_BACKEND", raising=False)
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    text = fa3py.explain(q, q, q)
    assert "forward: torch" in text and "tensors are on cpu" in text
    assert fa3py.available_backends("cpu") == ["torch"]


def test_empty_requests_go_to_torch(device):
    device["cap"] = (9, 0)
    q = torch.randn(0, 8, 2, 64, dtype=torch.bfloat16)
    assert dispatch.choose(make_request(q, q, q)).name == "torch"


# FlashAttention-3 hopper/flash_attn_interface.py, parameter names and defaults.
REQ = inspect.Parameter.empty
FA3_FUNC = [("q", REQ), ("k", REQ), ("v", REQ), ("softmax_scale", None), ("causal", False), ("qv", None),
            ("q_descale", None), ("k_descale", None), ("v_descale", None), ("window_size", (-1, -1)),
            ("attention_chunk", 0), ("softcap", 0.0), ("num_splits", 1), ("pack_gqa", None),
            ("deterministic", False), ("sm_margin", 0), ("return_attn_probs", False)]
FA3_VARLEN = [("q", REQ), ("k", REQ), ("v", REQ), ("cu_seqlens_q", REQ), ("cu_seqlens_k", REQ),
              ("max_seqlen_q", REQ), ("max_seqlen_k", REQ), ("seqused_q", None), ("seqused_k", None),
              ("softmax_scale", None), ("causal", False), ("qv", None), ("q_descale", None),
              ("k_descale", None), ("v_descale", None), ("window_size", (-1, -1)), ("attention_chunk", 0),
              ("softcap", 0.0), ("num_splits", 1), ("pack_gqa", None), ("deterministic", False),
              ("sm_margin", 0), ("return_attn_probs", False)]


@pytest.mark.parametrize("fn,expected", [(fa3py.flash_attn_func, FA3_FUNC),
                                         (fa3py.flash_attn_varlen_func, FA3_VARLEN)])
def test_fa3_signatures(fn, expected):
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params] == [n for n, _ in expected]
    for p, (name, default) in zip(params, expected):
        assert p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        assert p.default == default, f"{name}: {p.default!r} != {default!r}"


def test_cuda_on_a_torch_without_cuda(monkeypatch):
    """available_backends("cuda") returns nothing (no AssertionError) and explain says why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert fa3py.available_backends("cuda") == []
    text = fa3py.explain("cuda")
    assert text.count("CPU-only build: nothing can run on cuda") == 3, text
    assert fa3py.explain("cpu").splitlines()[-1] == "torch: available"


def test_a_missing_backend_names_its_extra(monkeypatch):
    real_import = dispatch.importlib.import_module

    def no_cutlass(name):
        if name in ("cute_kernels", "triton_fallback"):
            raise ModuleNotFoundError(f"No module named {'cutlass' if name == 'cute_kernels' else 'triton'!r}")
        return real_import(name)

    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch.importlib, "import_module", no_cutlass)
    assert 'pip install "fa3py[hopper]"' in dispatch.load("cute")[1]
    assert 'pip install "fa3py[triton]"' in dispatch.load("triton")[1]


def test_fp8_emulation_warns_once_and_explain_says_so(monkeypatch):
    from fa3py.fp8 import emulate

    monkeypatch.setattr(emulate, "_warned", False)
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="fp8=True on cpu runs the float32 emulation"):
        fa3py.attention(q, q, q, fp8=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa3py.attention(q, q, q, fp8=True)  # once per process
    text = fa3py.explain(q, q, q, fp8=True)
    assert "the float32 emulation of the FP8 kernel" in text and text.count("fp8:") == 1
    assert "fp8" not in fa3py.explain(q, q, q)


def test_sm_margin_is_a_hint_that_never_changes_results():
    """sm_margin (FA3's: SMs left free for overlapped work) is accepted by every drop-in, carried in
    the request (and through the custom ops' arguments, for torch.compile) and gives the same
    outputs as 0 (the torch path here; the Hopper kernel's GPU test checks its persistent grid)."""
    from fa3py import ops

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 37, h, 64, generator=g).bfloat16() for h in (4, 2, 2))
    for margin in (0, 7):
        req = make_request(q, k, v, causal=True, sm_margin=margin)
        assert req.params.sm_margin == margin
        assert ops._request(q, k, v, *ops.request_args(req)).params == req.params
    same = lambda f: torch.equal(f(0), f(7))
    assert same(lambda m: fa3py.flash_attn_func(q, k, v, causal=True, sm_margin=m))
    cu = torch.tensor([0, 30, 74], dtype=torch.int32)
    assert same(lambda m: fa3py.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu,
                                                      44, 44, sm_margin=m))
    qkv = torch.randn(2, 37, 3, 2, 64, generator=g).bfloat16()
    assert same(lambda m: fa3py.flash_attn_qkvpacked_func(qkv, sm_margin=m))
    lens = torch.tensor([30, 5], dtype=torch.int32)
    assert same(lambda m: fa3py.flash_attn_with_kvcache(q[:, :1], k, v, cache_seqlens=lens, sm_margin=m))
