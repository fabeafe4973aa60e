"""A seeded randomized test over the whole API: each case draws an entry point (`attention`,
`flash_attn_func`, `flash_attn_varlen_func`), a layout (batched, packed, packed with seqused,
sequences of 0 and 1 tokens), MHA / GQA / MQA, head dims (any multiple of 8 up to 256, hdim_v
apart), fp16 / bf16, causal, windows, attention_chunk, softcap, softmax_scale, strided input
views and deterministic, then checks out, the LSE (values and contiguity), the gradients, and that no
input changed, against the fp64 reference with the tolerance rule of shared/STYLE.md.

Routes: on a GPU every case goes through auto-dispatch (the cute forward and the backward it
hands to on Hopper; Triton elsewhere), FA3PY_RANDOM_CASES cases (300 by default); the
backward must be the cute one wherever it serves the case (unless FA3PY_CUTE_BWD=0). On the CPU:
the torch backend, then a few small cases with the cute kernel emulated and the Triton
backward interpreted (`tests.cute_emulation`), a few with the cute backward's kernel emulated
too (`tests.cute_bwd_emulation`), and a few on Triton alone (interpreted).
FP8 cases (`draw_fp8`: forward only, `fp8=True` or operands quantized ahead) run on the CPU with
the cute FP8 kernel emulated and on the GPU through auto-dispatch.
A failure's id is its case number: `draw(random.Random(SEED + i))` rebuilds it
(`draw_fp8(random.Random(SEED + 10_000 + i))` for FP8).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import pytest
import torch

import fa3py
from fa3py import dispatch
from fa3py.validation import make_request
from tests._cute_bwd import cute_serves_backward
from tests._util import check_backward, check_forward

SEED = 20261204
GPU = torch.cuda.is_available()
N_GPU = int(os.environ.get("FA3PY_RANDOM_CASES", "300"))
N_CPU = {"torch": 48, "emulated_sm90": 24, "emulated_sm90_bwd": 16, "triton": 8}
N_CPU_FP8 = 40


@dataclass
class Case:
    api: str  # "attention", "func" (flash_attn_func) or "varlen" (flash_attn_varlen_func)
    dtype: torch.dtype
    h: int
    hk: int
    d: int
    dv: int
    lens: list  # (query, key) lengths per sequence; batched layouts use one pair for all
    seqused: bool = False
    strided: bool = False
    grad: bool = True
    kwargs: dict = field(default_factory=dict)  # causal, window_size, softcap, softmax_scale, ...
    fa3_fp8: bool = False  # FP8 cases: FA3's float8_e4m3fn q, k, v with descales (flash_attn_*)
    qv: bool = False  # MLA's qv (shaped like q with hdim_v), forward only

    def __str__(self):
        return (f"{self.api} {str(self.dtype)[6:]} heads {self.h}/{self.hk} d {self.d}/{self.dv} "
                f"lens {self.lens} seqused={self.seqused} strided={self.strided} grad={self.grad} "
                f"{'fa3_fp8 ' if self.fa3_fp8 else ''}{'qv ' if self.qv else ''}{self.kwargs}")


def _side_rng(rng: random.Random, salt: int) -> random.Random:
    """A generator seeded by rng's state without drawing from it, the same in every process: the
    state's 625 ints and an int salt (hashing the whole state hashed its None by address, and a
    str salt by the per-process PYTHONHASHSEED, so a case number drew other qv / hint values in
    each run)."""
    return random.Random(hash((rng.getstate()[1], salt)))


def draw(rng: random.Random, max_len: int, max_d: int = 256, qv: bool = True, qv_max_dv: int = 512) -> Case:
    hk = rng.choice([1, 1, 2, 3, 4])
    h = hk * rng.choice([1, 2, 3, 4, 8])
    d = 8 * rng.randint(1, max_d // 8)
    dv = d if rng.random() < 0.7 else 8 * rng.randint(1, max_d // 8)
    api = rng.choice(["attention", "func", "varlen", "varlen"])
    n = rng.randint(1, 3)

    def length():
        r = rng.random()
        return 0 if r < 0.08 else 1 if r < 0.2 else rng.randint(2, max_len)

    if api == "varlen":
        lens = [(length(), length()) for _ in range(n)]
    else:
        lens = [(max(length(), 1), max(length(), 1))] * n
    kwargs = {}
    if rng.random() < 0.4:
        kwargs["causal"] = True
    if rng.random() < 0.3:
        kwargs["window_size"] = (rng.choice([-1, 0, rng.randint(1, max_len)]),
                                 rng.choice([-1, 0, rng.randint(1, max_len)]))
    if rng.random() < 0.2:
        kwargs["softcap"] = rng.choice([1.0, 5.0, 30.0])
    if rng.random() < 0.2:
        # The default times 0.1-3. Far above that, probability rows turn one-hot and dQ's error
        # from delta = rowsum(dO * O) over the rounded O (every FlashAttention backward has it)
        # outgrows twice PyTorch's, which differentiates its own rounded softmax instead.
        kwargs["softmax_scale"] = rng.uniform(0.1, 3.0) / d ** 0.5
    if api != "attention" and rng.random() < 0.2:
        kwargs["deterministic"] = True
    case = Case(api, rng.choice([torch.bfloat16, torch.float16]), h, hk, d, dv, lens,
                seqused=api == "varlen" and rng.random() < 0.3, strided=rng.random() < 0.3,
                grad=rng.random() < 0.7, kwargs=kwargs)
    if rng.random() < 0.2:  # drawn last: the cases drawn before attention_chunk joined keep their values
        case.kwargs["attention_chunk"] = rng.randint(1, max_len)
    # MLA's qv, from a generator seeded by rng's state without drawing from it (every case drawn
    # before qv joined keeps its values and tensors): forward only, as in FA3; half of them take
    # head dims the Hopper kernel serves with qv (64 x 512 or 256, or equal up to 128)
    side = _side_rng(rng, 0)
    if qv and side.random() < 0.15:
        case.qv, case.grad = True, False
        if side.random() < 0.5:
            pairs = [(64, 512), (64, 256), (56, 256), (64, 64), (96, 96), (128, 128)]
            case.d, case.dv = side.choice([(d, dv) for d, dv in pairs if dv <= qv_max_dv])
    # the drop-ins' scheduling hints (never change results beyond the tolerance: split-KV sums in
    # another order), from their own generator for the same reason as qv's
    hints = _side_rng(rng, 1)
    if case.api != "attention" and hints.random() < 0.3:
        case.kwargs["num_splits"] = hints.choice([0, 1, 2, 5])
    if case.api != "attention" and hints.random() < 0.2:
        case.kwargs["sm_margin"] = hints.choice([1, 8, 100])
    return case


def _tensor(shape, dtype, device, strided, rng):
    """Fresh normal values; `strided`: a non-contiguous view (a slice of a wider last dim, or
    heads and rows swapped in storage), as users pass SDPA-layout or fused-QKV tensors."""
    if not strided:
        return torch.randn(shape, device=device).to(dtype)
    if rng.random() < 0.5:
        wide = torch.randn(*shape[:-1], shape[-1] + 8, device=device).to(dtype)
        return wide[..., 4:4 + shape[-1]]
    return torch.randn(*shape[:-3], shape[-2], shape[-3], shape[-1], device=device).to(dtype).transpose(-3, -2)


def build(case: Case, device, rng: random.Random):
    """(q, k, v, request kwargs of the index tensors) for `case`."""
    b = len(case.lens)
    mk = lambda shape: _tensor(shape, case.dtype, device, case.strided, rng)
    if case.api != "varlen":
        sq, sk = case.lens[0]
        return (mk((b, sq, case.h, case.d)), mk((b, sk, case.hk, case.d)),
                mk((b, sk, case.hk, case.dv)), {})
    lq, lk = [x for x, _ in case.lens], [y for _, y in case.lens]
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32, device=device)
    q = mk((sum(lq), case.h, case.d))
    k = mk((sum(lk), case.hk, case.d))
    v = mk((sum(lk), case.hk, case.dv))
    kw = dict(cu_seqlens_q=cu(lq), cu_seqlens_k=cu(lk), max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    if case.seqused:
        kw["seqused_q"] = torch.tensor([rng.randint(0, x) for x in lq], dtype=torch.int32, device=device)
        kw["seqused_k"] = torch.tensor([rng.randint(0, y) for y in lk], dtype=torch.int32, device=device)
    return q, k, v, kw


def run_case(case: Case, device, rng: random.Random, backend=None):
    """Runs and checks one case; returns the backends that served (forward, backward) and the
    request."""
    q, k, v, index_kw = build(case, device, rng)
    kw = dict(case.kwargs)
    if case.qv:
        kw["qv"] = _tensor((*q.shape[:-1], case.dv), case.dtype, device, case.strided, rng)
    originals = [x.clone() for x in (q, k, v, kw.get("qv")) if x is not None]
    leaves = [x.detach().requires_grad_(case.grad) for x in (q, k, v)]
    if case.api == "attention":
        kw.pop("deterministic", None)
        out, lse = fa3py.attention(*leaves, return_lse=True, backend=backend, **kw)
    elif case.api == "func":
        out, lse = fa3py.flash_attn_func(*leaves, return_attn_probs=True, **kw)
    else:
        out, lse = fa3py.flash_attn_varlen_func(*leaves, **index_kw, return_attn_probs=True, **kw)
    req = make_request(q, k, v, **index_kw, **kw)
    assert lse.is_contiguous(), f"LSE strides {lse.stride()}"
    check_forward(req, out, lse)
    served = (dispatch.choose(req, backend=backend).name,
              dispatch.choose(req, backward=True, backend=backend).name if case.grad else None)
    if case.grad:
        dout = torch.randn_like(out)
        out.backward(dout)
        check_backward(req, dout, [x.grad for x in leaves])
    for name, x, x0 in zip(("q", "k", "v", "qv"), (q, k, v, kw.get("qv")), originals):
        assert torch.equal(x, x0), f"{name} was modified"
    return served, req


# ----------------------------------------------------------------------------- FP8
# Head dims the Hopper FP8 kernel serves (an FP8 case takes one of them four times in five).
FP8_DIMS = [(64, 64), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256)]


def draw_fp8(rng: random.Random, max_len: int) -> Case:
    """A `draw` case made FP8 and forward-only (FP8 has no backward of its own); a third of the
    drop-in calls take FA3's float8 inputs with descales."""
    case = draw(rng, max_len=max_len, qv=False)  # (qv is 16-bit only, as in FA3)
    if rng.random() < 0.8:
        case.d, case.dv = rng.choice(FP8_DIMS)
    case.grad = False
    case.kwargs.pop("deterministic", None)
    case.fa3_fp8 = case.api != "attention" and rng.random() < 0.35
    return case


def run_fp8_case(case: Case, device, rng: random.Random, monkeypatch) -> str:
    """FP8 forward of `case`: `attention(..., fp8=True)` (batched), or operands quantized ahead
    with the Hopper kernel's block_n (config.fp8_block_n, quantize_fp8's default on sm90) through
    flash_attn_func / flash_attn_varlen_func. out and the LSE are within twice the float32
    emulation's distance to the fp64 reference of the 16-bit inputs (the emulation, run by the same
    call on the torch backend, in the role of PyTorch's own FP8 math) plus 2^-7 of the output's
    range; empty rows match; no input changes. Returns the backend that served."""
    from cute_kernels.config import fp8_block_n

    q, k, v, index_kw = build(case, device, rng)
    if case.fa3_fp8:
        return _run_fa3_fp8_case(case, q, k, v, index_kw, rng, monkeypatch)
    originals = [x.clone() for x in (q, k, v)]
    kw = dict(case.kwargs)

    def call():
        if case.api == "attention":
            return fa3py.attention(q, k, v, fp8=True, return_lse=True, **kw)
        qkv = fa3py.quantize_fp8(q, k, v, block_n=fp8_block_n(case.d) or 128,
                                 cu_seqlens_q=index_kw.get("cu_seqlens_q"), cu_seqlens_k=index_kw.get("cu_seqlens_k"))
        if case.api == "func":
            return fa3py.flash_attn_func(*qkv, return_attn_probs=True, **kw)
        return fa3py.flash_attn_varlen_func(*qkv, **index_kw, return_attn_probs=True, **kw)

    out, lse = call()
    req = make_request(q, k, v, **index_kw, fp8=True, **kw)
    served = dispatch.choose(req).name
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    emu_out, emu_lse = call()
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert out.dtype == q.dtype
    _check_fp8_case(out, lse, emu_out, emu_lse, make_request(q, k, v, **index_kw, **kw), (q, k, v), originals)
    return served


def _check_fp8_case(out, lse, emu_out, emu_lse, ref_req, inputs, originals):
    """out and LSE of an FP8 case within twice the emulation's distance to the fp64 reference of
    `ref_req` plus 2^-7 of the output's range (LSE: plus 1e-3), empty rows alike, and the inputs
    unchanged (compared bytewise: float8 has no torch.equal)."""
    from fa3py import reference
    from tests._util import max_err

    ref_out, ref_lse = reference.attention(ref_req, torch.float64)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "empty rows differ"
    atol = 2.0**-7 * float(ref_out.abs().max()) if ref_out.numel() else 0.0
    assert max_err(out, ref_out) <= 2 * max_err(emu_out, ref_out) + atol, (max_err(out, ref_out), max_err(emu_out, ref_out))
    assert max_err(lse[finite], ref_lse[finite]) <= 2 * max_err(emu_lse[finite], ref_lse[finite]) + 1e-3
    for name, x, x0 in zip("qkv", inputs, originals):
        assert torch.equal(x.view(torch.uint8), x0.view(torch.uint8)), f"{name} was modified"


def _run_fa3_fp8_case(case: Case, q, k, v, index_kw, rng: random.Random, monkeypatch) -> str:
    """`run_fp8_case` on FA3's inputs: q, k, v rounded to float8_e4m3fn (times 2) with random
    descales (batch, nheads_kv) (or none, one time in four), through flash_attn_func /
    flash_attn_varlen_func; out and LSE within twice the FP8 format's emulation (fa3py.fp8's
    from_descales + emulate: P rounded to e4m3 as the kernels round it) of the fp64 reference of
    the descaled inputs, plus 2^-7 of the output's range."""
    from fa3py import fp8

    q, k, v = (x.float().mul(2).to(torch.float8_e4m3fn) for x in (q, k, v))
    originals = [x.clone() for x in (q, k, v)]
    cu_q, cu_k = index_kw.get("cu_seqlens_q"), index_kw.get("cu_seqlens_k")
    batch = len(case.lens)
    descales = {} if rng.random() < 0.25 else {
        name: torch.rand(batch, case.hk, device=q.device) + 0.25 for name in ("q_descale", "k_descale", "v_descale")}
    kw = dict(case.kwargs, **descales)
    if case.api == "func":
        out, lse = fa3py.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    else:
        out, lse = fa3py.flash_attn_varlen_func(q, k, v, **index_kw, return_attn_probs=True, **kw)
    req = make_request(q, k, v, **index_kw, **kw)
    qkv = fp8.from_descales(q, k, v, *(descales.get(n) for n in ("q_descale", "k_descale", "v_descale")),
                            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    emu_out, emu_lse = fp8.emulate.attention(qkv, req.params, torch.bfloat16, seqused_q=index_kw.get("seqused_q"),
                                             seqused_k=index_kw.get("seqused_k"))
    assert out.dtype == torch.bfloat16
    _check_fp8_case(out, lse, emu_out, emu_lse, req, (q, k, v), originals)
    return dispatch.choose(req).name


@pytest.mark.skipif(GPU, reason="the CPU route; on a GPU test_gpu_random_fp8_api runs")
@pytest.mark.parametrize("i", range(N_CPU_FP8))
def test_random_fp8_api_emulated_sm90(i, emulated_sm90, monkeypatch):
    """FP8 cases as on an H100 with the FP8 kernel emulated (`emulated_sm90`'s launch hands FP8
    calls to emulated_fp8_launch; run_fp8's host work runs for real: quantization with the
    kernel's tile, GQA packing, split-KV, varlen, strided inputs), FA3's inputs copied into the
    format in even cases and read directly (FA3PY_CUTE_FP8_DIRECT) in odd ones; 32 of the 40 drawn
    here are served by it (the rest, head dims it does not serve: the emulation, or Triton for
    FA3's inputs)."""
    from cute_kernels import launch

    monkeypatch.setattr(launch, "fp8_enabled", True)
    monkeypatch.setattr(launch, "fp8_why_not", _fp8_why_not_on_cpu(launch.fp8_why_not))
    monkeypatch.setattr(launch, "fp8_direct_enabled", i % 2 == 1)  # FA3's inputs copied / read directly
    monkeypatch.setattr(launch, "fp8_chunk_enabled", True)
    rng = random.Random(SEED + 10_000 + i)
    case = draw_fp8(rng, max_len=150)
    try:
        served = run_fp8_case(case, "cpu", rng, monkeypatch)
    except AssertionError as e:
        raise AssertionError(f"fp8 case {i} ({case}): {e}") from e
    assert served in ("cute", "torch", "triton")  # (Triton takes FA3's float8 inputs cute does not)


def _fp8_why_not_on_cpu(why_not):
    def on_cpu(req):
        reason = why_not(req)
        return None if reason == "cute_kernels: CUDA tensors only" else reason
    return on_cpu


def _cute_qv_on(monkeypatch):
    """qv cases take the cute kernel where it serves them (FA3PY_CUTE_QV, the default; set here so
    FA3PY_CUTE_QV=0 in the environment does not change the test; off, Triton serves them)."""
    from cute_kernels import launch

    monkeypatch.setattr(launch, "qv_enabled", True)


def _cpu_cases(route):
    return [pytest.param(route, i, id=f"{route}-{i}") for i in range(N_CPU[route])]


@pytest.mark.skipif(GPU, reason="the CPU routes; on a GPU test_gpu_random_api runs")
@pytest.mark.parametrize("route,i", _cpu_cases("torch") + _cpu_cases("emulated_sm90")
                         + _cpu_cases("emulated_sm90_bwd") + _cpu_cases("triton"))
def test_random_api(route, i, request, monkeypatch):
    rng = random.Random(SEED + i)
    # The interpreted routes draw small problems: the interpreter runs a tile op at numpy speed.
    # The emulated cute backward draws sequences past one 64-row block, head dims up to its 128
    # (the Triton backward, interpreted, takes the rest).
    max_len, max_d = {"torch": (64, 256), "emulated_sm90_bwd": (150, 128)}.get(route, (12, 96))
    # (the forced Triton route: qv head dims it serves, hdim_v up to 256)
    case = draw(rng, max_len=max_len, max_d=max_d, qv_max_dv=256 if route == "triton" else 512)
    backend = None
    if route in ("emulated_sm90", "emulated_sm90_bwd"):
        request.getfixturevalue(route)
        _cute_qv_on(monkeypatch)
    elif route == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if case.api != "attention":  # the drop-ins take no backend: force it for this test
            monkeypatch.setenv(dispatch.ENV_VAR, "triton")
        backend = "triton"
    try:
        served, req = run_case(case, "cpu", rng, backend)
    except AssertionError as e:
        raise AssertionError(f"case {i} ({case}): {e}") from e
    if route == "emulated_sm90":  # cute where it serves the case, else Triton; never the torch path
        assert served[0] in ("cute", "triton") and served[1] in (None, "triton"), served
    elif route == "emulated_sm90_bwd":  # and the backward on cute wherever its kernel serves the case
        assert served[0] in ("cute", "triton"), served
        if case.grad:
            assert served[1] == ("cute" if served[0] == "cute" and cute_serves_backward(req) else "triton"), served
    else:
        assert served[0] == route, served


if not GPU:
    from tests.cute_bwd_emulation import emulated_sm90_bwd  # noqa: E402,F401  (fixture, by name)
    from tests.cute_emulation import emulated_sm90  # noqa: E402,F401  (fixture, by name)


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(N_GPU // 3))
def test_gpu_random_fp8_api(i, monkeypatch):
    """FP8 cases through auto-dispatch on the GPU (the Hopper FP8 kernel where it serves the case,
    the emulation elsewhere), sequences up to 700 tokens."""
    rng = random.Random(SEED + 10_000 + i)
    case = draw_fp8(rng, max_len=700)
    try:
        run_fp8_case(case, "cuda", rng, monkeypatch)
    except AssertionError as e:
        raise AssertionError(f"fp8 case {i} ({case}): {e}") from e


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(N_GPU))
def test_gpu_random_api(i, monkeypatch):
    """FA3PY_RANDOM_CASES cases through auto-dispatch on the GPU (sequences up to 700 tokens);
    the cute backward takes every backward it serves (unless FA3PY_CUTE_BWD=0)."""
    _cute_qv_on(monkeypatch)
    rng = random.Random(SEED + i)
    case = draw(rng, max_len=700)
    try:
        served, req = run_case(case, "cuda", rng)
    except AssertionError as e:
        raise AssertionError(f"case {i} ({case}): {e}") from e
    if case.grad and served[0] == "cute" and cute_serves_backward(req):
        assert served[1] == "cute", f"case {i} ({case}): backward on {served[1]}, not the cute backward"
    print(f"case {i}: {case} -> forward {served[0]}, backward {served[1]}")
