"""Host side: turn an `AttentionRequest` into kernel launches."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import triton

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fa3py.request import AttentionRequest

from . import configs, fp8_fwd
from .bwd import attn_bwd, attn_bwd_dq, attn_bwd_dq_epilogue, attn_bwd_preprocess
from .fwd import attn_fwd

# "bwd" (default) and "bwd_dkdv" (deterministic) are the same kernel with and without ATOMIC_DQ,
# tuned apart. Autotuning "bwd" re-runs its atomics: DQ_ACC is restored after each trial.
_PLAIN = {"fwd": attn_fwd, "bwd": attn_bwd, "bwd_dkdv": attn_bwd, "bwd_dq": attn_bwd_dq}
_TUNED = {name: configs.autotuned(name, fn) for name, fn in _PLAIN.items()}
_warned_fp8_dequant = False
POISON = False  # tests: fill fresh outputs with NaN so that any row the kernels skip shows up
# One-kernel backward with atomic dQ only up to this (padded) head dim. H200, bf16, 16k tokens,
# seqlen 8192, non-causal (2026-11-22, commit 5fbba27 tree): hdim 64 atomic 281 TFLOP/s vs 247 for
# the two-kernel path (FA2: 287); hdim 128 atomic 151 vs 267 (not spills: its 32x64 tile compiles
# spill-free as launched, NOTES.md; likelier the small tile and doubled dQ atomics). Re-measure
# after tuning the "bwd" tiles.
ATOMIC_DQ_MAX_HEADDIM = 64
SPLIT_GQA = None  # tests: force (True) or forbid (False) one backward program per query head


def _contiguous_last_dim(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, seq, head) strides; packed tensors have no batch dim."""
    return (0, x.stride(0), x.stride(1)) if packed else (x.stride(0), x.stride(1), x.stride(2))


def _lse_strides(lse: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of an LSE, (b, h, rows) or packed (h, total): taken, not
    assumed, since an LSE from another backend's forward may be any view of its storage."""
    return (0, lse.stride(0), lse.stride(1)) if packed else (lse.stride(0), lse.stride(1), lse.stride(2))


def _new(shape, dtype, device, prefill: float | None) -> torch.Tensor:
    """Output buffer; prefilled where the kernels leave rows unwritten (packed + seqused)."""
    if prefill is None:
        if POISON:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, prefill, dtype=dtype, device=device)


@dataclass(frozen=True)
class _Problem:
    """Launch facts shared by the forward and backward kernels of one request."""

    req: AttentionRequest
    rows_q: int  # grid extent over query rows (per sequence)
    rows_k: int

    @classmethod
    def create(cls, req: AttentionRequest) -> "_Problem":
        return cls(req, req.max_seqlen_q if req.packed_q else req.q.shape[1],
                   req.max_seqlen_k if req.packed_k else req.k.shape[1])

    def scalars(self) -> tuple:
        req, p = self.req, self.req.params
        return (
            0 if req.packed_q else req.q.shape[1], 0 if req.packed_k else req.k.shape[1],
            req.nheads, req.nheads_kv, p.softmax_scale, p.softcap, p.window_left, p.window_right,
            p.attention_chunk,
            configs.seqlen_bucket(self.rows_q), configs.seqlen_bucket(self.rows_k),
        )

    def constexprs(self) -> dict:
        req, p = self.req, self.req.params
        return dict(
            HEADDIM=req.headdim, HEADDIM_V=req.headdim_v,
            BLOCK_D=max(16, triton.next_power_of_2(req.headdim)),
            BLOCK_DV=max(16, triton.next_power_of_2(req.headdim_v)),
            PACKED_Q=req.packed_q, PACKED_K=req.packed_k,
            HAS_SEQUSED_Q=req.seqused_q is not None, HAS_SEQUSED_K=req.seqused_k is not None,
            HAS_WL=p.window_left >= 0, HAS_WR=p.window_right >= 0, HAS_CHUNK=p.attention_chunk > 0,
            SOFTCAP=p.softcap > 0,
        )

    def launch(self, kernel: str, grid_rows: int, grid_heads: int, args: tuple, **extra):
        """Table config (or the interpreter's) if there is one, else the autotuned kernel."""
        req, p = self.req, self.req.params
        const = {**self.constexprs(), **extra}
        block = "BLOCK_N" if kernel in ("bwd", "bwd_dkdv") else "BLOCK_M"

        def grid(meta):
            return (triton.cdiv(grid_rows, meta[block]), grid_heads, req.batch)

        masked = p.window_left >= 0 or p.window_right >= 0 or p.attention_chunk > 0
        tile = configs.pick(kernel, req.device, const["BLOCK_D"], req.dtype, masked, self.rows_q)
        if tile is not None:
            _PLAIN[kernel][grid](*args, *self.scalars(), **const, **tile.launch_kwargs())
        else:
            _TUNED[kernel][grid](*args, *self.scalars(), **const)


def _fp8_mode(req: AttentionRequest) -> bool:
    """True: decode FP8 to float16 in-kernel (no FP8 tensor cores before sm89); False: FP8
    tl.dot (sm89+, and the interpreter unless a test forces the other path)."""
    global _warned_fp8_dequant
    if req.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(req.device) >= (8, 9):
        return False
    if not _warned_fp8_dequant:
        _warned_fp8_dequant = True
        warnings.warn("fa3py triton: this GPU has no FP8 tensor cores (sm < 89); FP8 inputs are "
                      "dequantized to float16 in-kernel and bring no speed-up over bf16.", stacklevel=3)
    return True


def forward(req: AttentionRequest) -> tuple[torch.Tensor, torch.Tensor]:
    if req.params.fp8 or req.fp8_tensors is not None:
        return fp8_fwd.forward(req)
    q, k, v = (_contiguous_last_dim(x) for x in (req.q, req.k, req.v))
    prob = _Problem.create(req)
    prefill = req.packed_q and req.seqused_q is not None
    out = _new(req.out_shape, req.out_dtype, req.device, 0.0 if prefill else None)
    lse = _new(req.lse_shape, torch.float32, req.device, float("-inf") if prefill else None)
    descales = [None, None, None]
    if req.is_fp8_input:  # a missing descale means 1
        ones = torch.ones(req.batch, req.nheads_kv, dtype=torch.float32, device=req.device)
        descales = [ones if d is None else d.float().contiguous()
                    for d in (req.q_descale, req.k_descale, req.v_descale)]
    fp8_dequant = req.is_fp8_input and _fp8_mode(req)
    # before sm89 Triton has no float8 e4m3 type: the kernel decodes the bytes itself
    qkv = [x.view(torch.uint8) for x in (q, k, v)] if fp8_dequant else [q, k, v]
    qv = None if req.qv is None else _contiguous_last_dim(req.qv)
    args = (
        *qkv, out, lse, req.cu_seqlens_q, req.cu_seqlens_k, req.seqused_q, req.seqused_k,
        *descales, qv, *_strides(q, req.packed_q), *_strides(k, req.packed_k),
        *_strides(v, req.packed_k), *_strides(out, req.packed_q), *_lse_strides(lse, req.packed_q),
        *(_strides(qv, req.packed_q) if qv is not None else (0, 0, 0)),
    )
    prob.launch("fwd", prob.rows_q, req.nheads, args, HAS_DESCALE=req.is_fp8_input,
                FP8_DEQUANT=fp8_dequant, HAS_QV=qv is not None)
    return out, lse


def _heads_per_program(req: AttentionRequest, rows_k: int) -> int:
    """Query heads per `attn_bwd` program (default path). Looping over the whole GQA group
    loads K/V once and stores dK/dV once; one head per program multiplies the grid by the
    group size, at the price of float32 dK/dV partials (8 * (d + dv) bytes per key row and
    query head, written and summed once: under 5% of the time at seqlen 2k). So split only
    when the looped grid is under 4 waves of programs (estimated with 128-key blocks)."""
    group = req.nheads // req.nheads_kv
    if group == 1:
        return 1
    if SPLIT_GQA is not None:
        return 1 if SPLIT_GQA else group
    sms = req.usable_sms(without_gpu=1)  # (less the SMs the call leaves free)
    programs = triton.cdiv(rows_k, 128) * req.nheads_kv * req.batch
    return group if programs >= 4 * sms else 1


def backward(req: AttentionRequest, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor):
    q, k, v, out, dout = (_contiguous_last_dim(x) for x in (req.q, req.k, req.v, out, dout))
    prob = _Problem.create(req)
    device, batch, nheads, group = req.device, req.batch, req.nheads, req.nheads // req.nheads_kv
    const = prob.constexprs()
    atomic = not req.params.deterministic and const["BLOCK_D"] <= ATOMIC_DQ_MAX_HEADDIM

    # dQ accumulator (default path): float32, q-shaped, each head's rows contiguous
    dq_acc = None
    if atomic:
        dq_acc = torch.empty((nheads, *q.shape[:-2], req.headdim), dtype=torch.float32,
                             device=device).movedim(0, -2)
    dq = _new(q.shape, q.dtype, device, 0.0 if req.packed_q and req.seqused_q is not None else None)

    # 1. delta = rowsum(dO * O), log2-domain LSE, per (batch, head, local row); zero dq_acc
    rows_pad = triton.cdiv(max(prob.rows_q, 1), 128) * 128
    lse2 = _new((batch, nheads, rows_pad), torch.float32, device, None)
    delta = _new((batch, nheads, rows_pad), torch.float32, device, None)
    acc = dq_acc if atomic else dq
    pre_block = 64
    attn_bwd_preprocess[(triton.cdiv(prob.rows_q, pre_block), nheads, batch)](
        out, dout, lse, lse2, delta, acc, req.cu_seqlens_q, req.seqused_q,
        *_strides(out, req.packed_q), *_strides(dout, req.packed_q), *_lse_strides(lse, req.packed_q),
        lse2.stride(0), lse2.stride(1), *_strides(acc, req.packed_q),
        0 if req.packed_q else q.shape[1],
        HEADDIM=req.headdim, HEADDIM_V=req.headdim_v, BLOCK_D=const["BLOCK_D"],
        BLOCK_DV=const["BLOCK_DV"], PACKED_Q=req.packed_q,
        HAS_SEQUSED_Q=req.seqused_q is not None, ZERO_DQ_ACC=atomic, BLOCK_M=pre_block,
    )

    # 2. dK, dV (and dQ atomically): one program per key block and query head or KV head
    per_program = _heads_per_program(req, prob.rows_k) if atomic else group
    zero_k = 0.0 if req.packed_k and req.seqused_k is not None else None
    if per_program < group:  # float32 partials per query head, summed over the group below
        dk = _new((*k.shape[:-2], nheads, req.headdim), torch.float32, device, zero_k)
        dv = _new((*v.shape[:-2], nheads, req.headdim_v), torch.float32, device, zero_k)
    else:
        dk = _new(k.shape, k.dtype, device, zero_k)
        dv = _new(v.shape, v.dtype, device, zero_k)
    seq_args = (req.cu_seqlens_q, req.cu_seqlens_k, req.seqused_q, req.seqused_k)
    qkv_strides = (*_strides(q, req.packed_q), *_strides(k, req.packed_k),
                   *_strides(v, req.packed_k), *_strides(dout, req.packed_q))
    prob.launch("bwd" if atomic else "bwd_dkdv", prob.rows_k, nheads // per_program, (
        q, k, v, dout, dk, dv, acc, lse2, delta, *seq_args, *qkv_strides,
        *_strides(dk, req.packed_k), *_strides(dv, req.packed_k), *_strides(acc, req.packed_q),
        lse2.stride(0), lse2.stride(1), per_program), ATOMIC_DQ=atomic)
    if per_program < group:
        dk = dk.unflatten(-2, (req.nheads_kv, group)).sum(-2).to(k.dtype)
        dv = dv.unflatten(-2, (req.nheads_kv, group)).sum(-2).to(v.dtype)

    # 3. dQ: scale and cast the accumulator, or (deterministic) one program per query block
    if atomic:
        attn_bwd_dq_epilogue[(triton.cdiv(prob.rows_q, pre_block), nheads, batch)](
            dq_acc, dq, req.cu_seqlens_q, req.seqused_q, *_strides(dq_acc, req.packed_q),
            *_strides(dq, req.packed_q), 0 if req.packed_q else q.shape[1],
            req.params.softmax_scale, HEADDIM=req.headdim, BLOCK_D=const["BLOCK_D"],
            PACKED_Q=req.packed_q, HAS_SEQUSED_Q=req.seqused_q is not None, BLOCK_M=pre_block)
    else:
        prob.launch("bwd_dq", prob.rows_q, nheads, (
            q, k, v, dout, dq, lse2, delta, *seq_args, *qkv_strides,
            *_strides(dq, req.packed_q), lse2.stride(0), lse2.stride(1)))
    return dq, dk, dv
