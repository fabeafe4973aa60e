"""The quantizer in PyTorch: the specification that the fused Triton pass reproduces byte for byte."""

from __future__ import annotations

import torch

from .format import (E4M3, SIGN_SEED, VT_ALIGN, Fp8Format, Fp8QKV, Fp8Tensor, place_block_scales, place_vt,
                     pv_key_order, rotate)

_16BIT = (torch.float16, torch.bfloat16)


def pow2_scale(amax: torch.Tensor):
    """(scale, 1 / scale) for float32 amax >= 0: the smallest power of two 2^e with
    amax / 2^e <= 448, e clamped to [-126, 126] (finite amax never exceeds e = 120). Read from amax's bits, so every device and
    the kernels get the same e: amax = 1.f * 2^(E - 127) fits as-is below 1.75 * 2^(8 + e),
    i.e. e = E - 135, plus one when the mantissa f exceeds 0.75 (0x600000). Zero and subnormal
    amax give 2^-126."""
    bits = amax.float().contiguous().view(torch.int32)
    e = (bits >> 23) - 135 + ((bits & 0x7FFFFF) > 0x600000).int()
    e = e.clamp(-126, 126)
    scale = ((e + 127) << 23).view(torch.float32)
    inv = ((127 - e) << 23).view(torch.float32)
    return scale, inv


def finite_abs(y: torch.Tensor) -> torch.Tensor:
    """|y| with NaN and +-Inf counted as 0: scales come from finite values only."""
    a = y.abs()
    return torch.where(a < float("inf"), a, torch.zeros_like(a))


def to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round to nearest even; NaN and +-Inf become NaN (e4m3fn has no infinity, and a plain
    cast would saturate Inf to 448: a silently finite value)."""
    return torch.where(y.abs() < float("inf"), y, torch.full_like(y, float("nan"))).to(E4M3)


def _blocks_amax(a: torch.Tensor, blk: int) -> torch.Tensor:
    """(b, s, h, d) -> (b, h, ceil(s / blk)) maxima over each block of rows and the head dim."""
    b, s, h, d = a.shape
    nblk = -(-s // blk)
    a = torch.nn.functional.pad(a, (0, 0, 0, 0, 0, nblk * blk - s))
    return a.reshape(b, nblk, blk, h, d).amax(dim=(2, 4)).transpose(1, 2)


def _per_token(t: torch.Tensor, blk: int, s: int) -> torch.Tensor:
    """(b, h, nblk) -> (b, s, h, 1)."""
    return t.repeat_interleave(blk, dim=2)[:, :, :s].transpose(1, 2).unsqueeze(-1)


def _quantize_int8(y: torch.Tensor, blk: int):
    """Rotated y -> (int8 data, float32 scales amax / 127). A row with a NaN or Inf is stored as
    zeros and its block's scale is NaN (int8 has no NaN): its block's outputs (Q) or every row
    that processes its key tile (K) come out NaN."""
    b, s, h, d = y.shape
    finite = torch.isfinite(y)
    y = torch.where(finite, y, torch.zeros_like(y))
    amax = _blocks_amax(y.abs(), blk)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    inv = torch.where(amax > 0, 127 / amax, torch.ones_like(amax))
    data = torch.round(y * _per_token(inv, blk, s)).clamp(-127, 127).to(torch.int8)  # half to even
    bad = _blocks_amax((~finite).float(), blk) > 0
    data = data.masked_fill(~finite.all(dim=-1, keepdim=True), 0)
    return data, scale.masked_fill(bad, float("nan"))


def quantize_operand(x: torch.Tensor, role: str, fmt: Fp8Format) -> Fp8Tensor:
    """x (batch, seqlen, nheads, dim) fp16/bf16 -> Fp8Tensor (see `fa3py.fp8`, "Prep")."""
    b, s, h, d = x.shape
    y = rotate(x, fmt.seed) if role in ("q", "k") else x.float()
    if role != "v" and fmt.qk_int8:
        data, scale = _quantize_int8(y, fmt.block_m if role == "q" else fmt.block_n)
    elif role == "v" and fmt.v_scaling == "channel":
        scale, inv = pow2_scale(finite_abs(y).amax(dim=1) if s else torch.zeros(b, h, d, device=x.device))
        data = to_e4m3(y * inv.unsqueeze(1))
    else:
        blk = fmt.block_m if role == "q" else fmt.block_n
        scale, inv = pow2_scale(_blocks_amax(finite_abs(y), blk))
        data = to_e4m3(y * _per_token(inv, blk, s))
    if role == "v" and fmt.v_transposed:
        vt = torch.zeros(b, h, d, -(-s // VT_ALIGN) * VT_ALIGN, dtype=E4M3, device=x.device)
        vt[..., :s] = data.permute(0, 2, 3, 1)
        data = vt.index_select(-1, pv_key_order(vt.shape[-1], x.device)) if fmt.v_pv_order else vt
    return Fp8Tensor(data=data, scale=scale.contiguous(), role=role, fmt=fmt, seqlen=s, source_dtype=x.dtype)


def quantize_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, role: str, fmt: Fp8Format,
                    quantize_one=quantize_operand) -> Fp8Tensor:
    """x (total, nheads, dim) holding the sequences cu_seqlens delimits -> a packed Fp8Tensor
    (the layout in `Fp8Tensor`'s docstring): each sequence quantized by `quantize_one` as a batch
    of one (its blocks from its first token), then placed (reads cu_seqlens on the host)."""
    cu = cu_seqlens.tolist()
    batch, (total, h, d) = len(cu) - 1, x.shape
    parts = [quantize_one(x[cu[b]:cu[b + 1]].unsqueeze(0), role, fmt) for b in range(batch)]
    if role == "v" and fmt.v_scaling == "channel":
        scale = torch.cat([t.scale for t in parts], 0) if parts else torch.ones(0, h, d, device=x.device)
    else:
        blk = fmt.block_m if role == "q" else fmt.block_n
        scale = place_block_scales([t.scale for t in parts], cu, total, blk, h, x.device)
    if role == "v" and fmt.v_transposed:
        data = place_vt([t.data for t in parts], cu, total, h, d, x.device)
    else:
        dtype = torch.int8 if role != "v" and fmt.qk_int8 else E4M3
        data = torch.cat([t.data[0] for t in parts], 0) if parts else torch.empty(0, h, d, dtype=dtype, device=x.device)
    return Fp8Tensor(data=data, scale=scale.contiguous(), role=role, fmt=fmt, seqlen=total, source_dtype=x.dtype,
                     cu_seqlens=cu_seqlens)


def check_operand(name: str, x, packed: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fa3py: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _16BIT:
        raise TypeError(f"fa3py: `{name}` must be float16 or bfloat16 to be quantized, got {x.dtype}")
    if packed and x.dim() != 3:
        raise ValueError(f"fa3py: packed `{name}` must be 3-D (total, nheads, headdim), got shape {tuple(x.shape)}")
    if not packed and x.dim() != 4:
        raise ValueError(f"fa3py: `{name}` must be 4-D (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    if x.shape[-1] % 8 or not 0 < x.shape[-1] <= 256:
        raise ValueError(f"fa3py: `{name}` head dimension must be a positive multiple of 8 and at most 256, "
                         f"got {x.shape[-1]}")


def _prep_backend(x: torch.Tensor, backend):
    if backend is not None:
        if backend not in ("torch", "triton"):
            raise ValueError(f"fa3py: `backend` must be 'torch' or 'triton', got {backend!r}")
        return backend
    return "triton" if x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 0) else "torch"


def quantize_checked(x: torch.Tensor, role: str, fmt: Fp8Format, backend=None, cu_seqlens=None) -> Fp8Tensor:
    """One operand, its arguments checked, by the Triton pass on CUDA (else PyTorch); packed
    (cu_seqlens): one pass per sequence (`quantize_packed`)."""
    check_operand(role, x, packed=cu_seqlens is not None)
    one = quantize_operand
    if _prep_backend(x, backend) == "triton":
        try:
            from triton_fallback import fp8_prep
        except ImportError:
            if backend == "triton":
                raise
        else:
            one = fp8_prep.quantize_operand
    return one(x, role, fmt) if cu_seqlens is None else quantize_packed(x, cu_seqlens, role, fmt, one)


def default_block_n(x: torch.Tensor, v_scaling: str) -> int:
    """quantize_fp8's block_n when the caller names none: on an sm90 GPU, the KV tile of the Hopper
    FP8 kernel for x's head dim (a format serves that kernel only when its block_n is the tile's:
    `cute_kernels.config.fp8_tile`); elsewhere 128."""
    from fa3py import dispatch

    if x.is_cuda and dispatch.device_capability(x.device)[0] == 9:
        try:
            from cute_kernels.config import fp8_block_n
        except ImportError:  # the Hopper kernels are not installed: the Triton kernel takes any block
            return 128
        return fp8_block_n(x.shape[-1], v_scaling) or 128
    return 128


def quantize_fp8(q=None, k=None, v=None, *, block_m: int = 128, block_n: int | None = None,
                 v_scaling: str = "channel", v_transposed: bool = True, seed: int | None = None,
                 qk_int8: bool = False, v_pv_order: bool = False, backend=None, cu_seqlens_q=None,
                 cu_seqlens_k=None) -> Fp8QKV:
    """Quantizes any of q, k, v (fp16/bf16, (batch, seqlen, nheads, headdim)) to the block-scaled
    FP8 format of `fa3py.fp8`; returns an `Fp8QKV` that `fa3py.attention` takes in place of
    the tensors (``attention(*quantize_fp8(q, k, v))``, or a KV cache quantized once:
    ``kv = quantize_fp8(k=k, v=v)`` then ``attention(q, kv.k, kv.v)`` per step, q being
    quantized on the fly with kv's format). qk_int8=True: the higher-accuracy mode (int8 Q
    and K, see `Fp8Format`; use block_m=1). backend: "triton" (one fused pass, CUDA) or "torch";
    by default triton on CUDA GPUs, torch elsewhere. Both produce the same bytes. v_pv_order=True:
    V^T's keys in the Hopper FP8 kernel's order (`Fp8Format`). cu_seqlens_q / cu_seqlens_k: q (or
    k and v) packed, (total, nheads, headdim), each sequence quantized on its own (`Fp8Tensor`);
    pass the same cu_seqlens to `fa3py.attention`. block_n (keys per K scale, and per V scale
    with v_scaling="block"): by default the KV tile of the kernel that will read the operands on
    their device (`default_block_n`). v_scaling: "channel" (default; as accurate as "block" on
    the FA3 paper's inputs, measured on an H200, and it lets the Hopper kernel take FA3's larger
    FP8 tiles) or "block"."""
    if q is None and k is None and v is None:
        raise ValueError("fa3py: quantize_fp8 needs at least one of q, k, v")
    if block_n is None:
        block_n = default_block_n(next(x for x in (k, q, v) if x is not None), v_scaling)
    fmt = Fp8Format(block_m=block_m, block_n=block_n, v_scaling=v_scaling, v_transposed=v_transposed,
                    seed=SIGN_SEED if seed is None else seed, qk_int8=qk_int8, v_pv_order=v_pv_order)
    with torch.no_grad():
        out = {name: None if x is None else quantize_checked(x, name, fmt, backend, cu)
               for name, x, cu in (("q", q, cu_seqlens_q), ("k", k, cu_seqlens_k), ("v", v, cu_seqlens_k))}
    return Fp8QKV(**out)
