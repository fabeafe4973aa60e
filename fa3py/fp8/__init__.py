"""FP8 attention (`attention(..., fp8=True)`, `quantize_fp8`): the block-scaled format and the
kernel's arithmetic. This docstring is the specification; `quantize.py` (prep) and
`emulate.py` (attention) are its executable form, and every kernel must reproduce them: the
Triton prep pass byte for byte, an attention kernel up to float32 accumulation order and
exp2 approximation.

Prep (one pass over q, k, v; `quantize_fp8`, `triton_fallback/fp8_prep.py`)
---------------------------------------------------------------------------
1. Rotation (Q and K only; the FA3 paper's incoherent processing). Each row x (headdim d) is
   multiplied, in float32, by blockdiag(R, ..., R), R = D H: H the n x n Sylvester Hadamard
   matrix, D = diag(+-1) random signs drawn from `seed` (`hadamard_signs`), n the largest power
   of two dividing d, at most 128 (128 for d = 128 / 256, 32 for 96, 16 for 80, 8 for 72).
   R R^T = n I, so (q R)(k R)^T = n q k^T: the rotation keeps Q K^T up to the factor n, which is
   folded into the softmax scale (a power of two: exact), and spreads an outlier feature over
   its block. R's entries are +-1, so the float32 sums are exact unless a row's block mixes
   values more than ~2^9 apart in magnitude (common: a Gaussian row holds some tiny values);
   then they are rounded, in whatever order the device sums, and a sum within an ulp of an
   e4m3 rounding boundary (~1e-6 of the elements) may take the neighbouring code.
2. Scales. One per (batch, head, block of `block_m` query rows) for Q, per `block_n` keys for
   K, and for V either per output channel over the whole sequence ("channel", the default) or
   per `block_n` keys ("block"). block_n defaults to the Hopper FP8 kernel's KV tile for the
   head dim on sm90 (224 at hdim 128, 128 at 64 and 256), else 128 (`default_block_n`).
   A scale is the power of two 2^e with e the smallest integer such that
   amax / 2^e <= 448 (`pow2_scale`: from amax's bits, clamped to [-126, 126]); amax is the
   largest |value| of the rotated block over its finite elements (NaN and Inf do not count).
   Powers of two make quantization and dequantization exact multiplications, and the
   score multiplier sq * sk * c one rounding; e4m3's relative precision does not depend on
   the scale, so they cost no accuracy over amax / 448 (benchmarks/accuracy.py).
3. Quantize: e4m3fn(x * 2^-e), round to nearest even; |x * 2^-e| <= 448 never saturates.
   NaN and +-Inf become NaN (e4m3fn has no infinity).
4. Layout. Q and K keep (batch, seqlen, nheads, headdim). V is written transposed,
   (batch, nheads_kv, headdim_v, seqlen rounded up to 16, zero-filled), the K-major operand
   of the FP8 P V GEMM (`v_transposed=False` keeps V's layout). Scales are float32 (batch,
   nheads, nblocks), channel scales (batch, nheads_kv, headdim_v).
5. Packed sequences (varlen: `quantize_fp8(..., cu_seqlens_q=, cu_seqlens_k=)`): each sequence
   is quantized on its own, its blocks counted from its first token. Q / K stay (total,
   nheads, headdim); scales are (nheads, total // block + batch) with sequence b's block j in
   column cu[b] // block + b + j (columns never overlap; unused ones hold 1); V^T is (nheads_kv,
   headdim_v, 16 * (total // 16 + batch)) with sequence b's key j in column
   16 * (cu[b] // 16 + b) + j (its 16-key groups aligned, zero-padded); channel scales stay
   (batch, nheads_kv, headdim_v), per sequence. A kernel finds a sequence's columns from
   cu_seqlens and its index alone.
6. FA3's float8 inputs (`from_descales`): float8_e4m3fn q, k, v with float32 descales of shape
   (batch, nheads_kv) are this format with `rotated=False` (no rotation: n = 1; scales any
   positive float32): Q scales q_descale[b, h // group] in every block, K's k_descale[b, h_kv],
   channel V scales v_descale[b, h_kv]; V transposed by one copy.

Attention (`emulate.attention`)
--------------------------------
Per (batch, head) (per sequence, for packed operands and seqused), keys in tiles of block_n (the
kernel's N tile is a multiple of block_n, so sk is one scalar per tile; the Hopper kernel visits
the tiles last to first), with c = float32(softmax_scale * log2(e) / n) and a running row max m
(log2 units):

    S  = Q8 K8_j^T                     float32 accumulation of exact e4m3 products
    s2 = S * (sq[row] * sk[j] * c)
    softcap: s2 = tanh(S * (sq[row] * sk[j] * c)) * cap, with c = float32(softmax_scale / (n *
             softcap)) and cap = float32(softcap * log2(e)) (`format.score_constants`): the
             block scales go inside the tanh, which then sees the score / softcap
    m' = max(m, rowmax(s2));  P = exp2(s2 - m' + 8)   in [0, 256], FA3's offset
    l  = l * exp2(m - m') + rowsum(P)  (P before its rounding)
    O_j = e4m3(P) V8_j                 float32 accumulation
    block V:   O = O * exp2(m - m') + O_j * sv[j]   (the Hopper kernel: O_j in a fresh
                                                    accumulator, added by FFMA)
    channel V: O = O * exp2(m - m') + O_j, and O *= sv[channel] at the end (the Hopper kernel:
               O rescaled, then P V accumulated into it by the tensor cores, whose FP8
               accumulation keeps ~13 bits; on an H200 as accurate as the fresh accumulator on
               the FA3 paper's inputs at 8k and 16k keys, results/2026-12-05_h200_48bbfc7)
    out = O / l;  lse = (m + log2(l) - 8) * ln(2)

The q scale is per row in the softmax multiplier, so block_m = 1 (per-token Q scales) costs a
kernel nothing either; packed GQA tiles mix heads and need exactly that per-row form (the Hopper
kernel reads row r of a packed tile's scale at query head kh * g + r % g, position r // g).

NaN and Inf
-----------
Scales see finite values only, so one bad element never changes how the other rows of its
block are quantized. Results follow 16-bit attention as far as e4m3 allows: a NaN or Inf in
q row i makes output row i NaN (the rotation spreads it over the row); one in key j makes
every row that sees key j NaN; a NaN or Inf in v[j, c] makes column c NaN for the rows whose
tiles include key j (16-bit attention gives +-Inf where P > 0 and NaN where P = 0; e4m3 has
no Inf, so here it is NaN). Every other row and column keeps full accuracy.

Higher-accuracy mode (`qk_int8=True`, best with block_m=1)
-----------------------------------------------------------
Rotated Q and K are stored as int8: scale = amax / 127 per block (float32, not a power of two:
int8's step is absolute, so a tight scale matters), x8 = rint(x * float32(127 / amax)) (ties to
even) clamped to [-127, 127]; S = Q8 K8^T is exact in int32 (Hopper's s8 x s8 -> s32 WGMMA runs
at the FP8 rate). V and P stay e4m3 as above. int8 has no NaN: a row with a NaN or Inf is
stored as zeros and its block's scale is NaN, so with block_m=1 a bad q row poisons only its
own output row, and a bad key poisons every row that processes its key tile (a superset of the
rows that see it). RMSE on the FA3 experiment: 4.9e-3 at 2k vs 7.7e-3 for e4m3
(benchmarks/accuracy.py); V's e4m3 rounding is then most of what is left. On Hopper the FP8
kernel runs it with `FA3PY_CUTE_FP8_INT8=1` (int8 WGMMA for S, its int32 sums converted to
float32 exactly; opt-in until its GPU tests run), elsewhere the emulation.

Gradients
---------
`fp8=True` with inputs that require grad: the forward is FP8, the backward is the 16-bit
backward of exact attention at the original q, k, v, fed the FP8 forward's out and LSE
(straight-through: the quantizer counts as the identity). Pre-quantized `Fp8Tensor`s have no
gradient.

Where it runs
-------------
The Triton prep pass writes the format on CUDA GPUs (`triton_fallback/fp8_prep.py`). The
attention runs as this float32 emulation in PyTorch (correct, slower than 16-bit; a one-time
warning says so) on the CPU, on sm80/86 (no FP8 tensor cores) and, until it has been timed on
a GPU, on sm89 and Blackwell too: `triton_fallback/fp8_fwd.py` (sm89+, keys first to last) computes
the same arithmetic and is opt-in (FA3PY_TRITON_FP8=1, batched operands only). The Hopper
WGMMA kernel (`cute_kernels`, on by default, FA3PY_CUTE_FP8=0 turns it off; its GPU tests pass on
an H100 and an H200, and at 16k keys it is level with FA3's FP8 kernel) consumes this
format with V^T in its PV key order, packed and seqused sequences included, and FA3's float8
inputs through `from_descales`. Packed operands are quantized one sequence at a time (the
Triton pass once per sequence). `fa3py.explain(..., fp8=True)` says which runs.
"""

from __future__ import annotations

import dataclasses

import torch

from .emulate import attention as emulated_attention
from .emulate import warn_emulated
from .format import (E4M3_MAX, FA3_FORMAT, MAX_HADAMARD, P_OFFSET, SIGN_SEED, Fp8Format, Fp8QKV, Fp8Tensor,
                     from_descales, hadamard_block, hadamard_signs, rotate, rotation_matrix, transpose_v)
from .quantize import pow2_scale, quantize_checked, quantize_fp8, quantize_operand

__all__ = [
    "Fp8Format", "Fp8QKV", "Fp8Tensor", "quantize_fp8", "quantize_operand", "pow2_scale", "rotate",
    "rotation_matrix", "hadamard_block", "hadamard_signs", "forward", "is_quantized", "make_request",
    "E4M3_MAX", "P_OFFSET", "SIGN_SEED", "MAX_HADAMARD", "FA3_FORMAT", "from_descales", "transpose_v",
]


def is_quantized(*xs) -> bool:
    return any(isinstance(x, Fp8Tensor) for x in xs)


def complete(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None) -> Fp8QKV:
    """Quantizes whichever of q, k, v are still 16-bit tensors with the format of those that are
    not (packed where the call's cu_seqlens say so); checks that the three agree."""
    given = [x for x in (q, k, v) if isinstance(x, Fp8Tensor)]
    fmt = given[0].fmt
    for x in given:
        if x.fmt != fmt:
            raise ValueError(f"fa3py: quantized q, k, v must share one format, got {given[0].fmt} and {x.fmt}")
    out = {}
    for role, x in (("q", q), ("k", k), ("v", v)):
        cu = cu_seqlens_q if role == "q" else cu_seqlens_k
        if isinstance(x, Fp8Tensor):
            if x.role != role:
                raise ValueError(f"fa3py: `{role}` was given the quantized {x.role!r} operand")
            if x.packed != (cu is not None) or (cu is not None and not torch.equal(x.cu_seqlens.cpu(), cu.cpu())):
                raise ValueError(f"fa3py: quantized `{role}` must be quantized with the cu_seqlens of the call "
                                 "(quantize_fp8(..., cu_seqlens_q=..., cu_seqlens_k=...))")
        else:
            if getattr(x, "requires_grad", False):
                raise NotImplementedError(f"fa3py: `{role}` requires grad, but with pre-quantized operands there is "
                                          "no backward; use fp8=True on 16-bit tensors for straight-through gradients")
            with torch.no_grad():
                x = quantize_checked(x, role, fmt, cu_seqlens=cu)
        out[role] = x
    return Fp8QKV(**out)


def make_request(q, k, v, **kwargs):
    """The AttentionRequest of a call on (partly) quantized operands: q, k, v are the float8
    token views, `fp8_tensors` carries the scales and the format."""
    from ..validation import make_request as make

    kwargs.pop("fp8", None)  # implied by quantized operands
    qkv = complete(q, k, v, kwargs.get("cu_seqlens_q"), kwargs.get("cu_seqlens_k"))
    if qkv.k.seqlen != qkv.v.seqlen:
        raise ValueError(f"fa3py: quantized k and v have different seqlens ({qkv.k.seqlen}, {qkv.v.seqlen})")
    # the request's q, k, v carry shapes only: views, never copies (int8 Q / K as float8 views of the
    # same bytes; V^T seen with V's shape: tokens() would copy it to undo the PV key order per call)
    req = make(*(x.token_view().view(torch.float8_e4m3fn) for x in qkv), **kwargs)
    return dataclasses.replace(req, fp8_tensors=qkv)


def explain(req, backend=None) -> str:
    """The FP8 lines of `fa3py.explain`: who quantizes, what computes, and whether it is faster."""
    from .. import dispatch

    try:
        runs = dispatch.choose(req, backward=False, backend=backend).name
    except dispatch.BackendUnavailable:
        return ""
    if req.fp8_tensors is not None:
        prep = "operands already quantized (fa3py.quantize_fp8)"
    elif req.device.type == "cuda":
        prep = "q, k, v quantized by the fused Triton prep pass (triton_fallback/fp8_prep.py)"
    else:
        prep = "q, k, v quantized by the PyTorch quantizer (fa3py/fp8/quantize.py)"
    if runs == "torch":
        what = ("attention: the float32 emulation of the FP8 kernel in PyTorch (FP8 numerics; slower than "
                "16-bit attention here: no FP8 kernel serves the block format on this device yet)")
    else:
        if runs == "cute":
            what = ("attention: the cute FP8 kernel (FP8 tensor cores; on an H200 faster than the 16-bit kernel "
                    "from ~16k keys per sequence, slower on short sequences, where the per-call prep and V "
                    "transpose weigh: benchmarks/results/2026-12-05_h200_826d91a)")
        else:
            what = f"attention: the {runs} FP8 kernel (FP8 tensor cores; not yet timed against 16-bit attention)"
    backward = ("backward: straight-through, the 16-bit backward at the original inputs"
                if req.params.fp8 else "backward: none (quantized operands)")
    return f"\nfp8: {prep}; {what}; {backward}"


def forward(req):
    """(out, lse) of an fp8=True request or one on quantized operands, emulated in PyTorch."""
    warn_emulated(req.device)
    qkv = req.fp8_tensors
    if qkv is None:
        qkv = quantize_fp8(req.q, req.k, req.v, cu_seqlens_q=req.cu_seqlens_q, cu_seqlens_k=req.cu_seqlens_k)
    return emulated_attention(qkv, req.params, req.out_dtype, seqused_q=req.seqused_q, seqused_k=req.seqused_k)
