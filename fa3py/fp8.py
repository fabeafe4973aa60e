"""FP8 numerics of `attention(..., fp8=True)`: incoherent processing + block quantization.

Q and K are rotated by the same random-sign Hadamard matrix M = D H / sqrt(n) (applied
blockwise over the head dimension, n the largest power of two dividing it, at most 128).
M is orthonormal, so (Q M)(K M)^T = Q K^T exactly, but the rotation spreads outlier
features over the block, which shrinks the FP8 quantization error. Q, K and V are then
quantized to float8_e4m3fn with one scale per (block of BLOCK_TOKENS tokens, head).

`fake_quantize` returns the dequantized float32 tensors, so any exact attention computed
on them reproduces what an FP8 kernel with the same quantization computes (up to its
float32 accumulation order).
"""

from __future__ import annotations

import functools

import torch

from .request import AttentionRequest

BLOCK_TOKENS = 128
E4M3_MAX = 448.0
SIGN_SEED = 0x5EED


def hadamard_block(headdim: int) -> int:
    n = headdim & -headdim  # largest power of two dividing headdim
    return min(n, 128)


@functools.lru_cache(maxsize=16)
def _rotation_cpu(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(SIGN_SEED + n)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1
    return (signs.to(torch.float64).unsqueeze(1) * h / n**0.5).float()  # D @ H / sqrt(n)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ M blockwise over the last dim, in float32."""
    d = x.shape[-1]
    n = hadamard_block(d)
    m = _rotation_cpu(n).to(x.device)
    return (x.float().reshape(*x.shape[:-1], d // n, n) @ m).reshape(x.shape)


def quantize_blockwise(x: torch.Tensor, token_dim: int):
    """Quantizes x (..., tokens, heads, dim) to e4m3 with one scale per (token block, head).
    Returns (x_fp8, scale) with x ~= x_fp8 * scale broadcast over each block."""
    x = x.float().movedim(token_dim, 0)
    t = x.shape[0]
    pad = (-t) % BLOCK_TOKENS
    xp = torch.nn.functional.pad(x, [0] * 2 * (x.dim() - 1) + [0, pad])
    blocks = xp.reshape(-1, BLOCK_TOKENS, *xp.shape[1:])  # (nblk, BLOCK, ..., heads, dim)
    amax = blocks.abs().amax(dim=(1, -1), keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale).to(torch.float8_e4m3fn)
    return q, scale, t


def fake_quantize(req: AttentionRequest):
    """Dequantized float32 (q, k, v) as an FP8 kernel with incoherent processing sees them."""
    def roundtrip(x, packed, rotated):
        if rotated:
            x = rotate(x)
        token_dim = 0 if packed else 1
        qx, scale, t = quantize_blockwise(x, token_dim)
        deq = (qx.float() * scale).reshape(-1, *qx.shape[2:])[:t]
        return deq.movedim(0, token_dim)

    return (
        roundtrip(req.q, req.packed_q, True),
        roundtrip(req.k, req.packed_k, True),
        roundtrip(req.v, req.packed_k, False),
    )
