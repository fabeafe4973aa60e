"""The block-scaled FP8 format: constants, the Hadamard rotation and the tensor containers.

See `fa3py.fp8` for the specification these implement.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# P = exp2(s - rowmax + P_OFFSET) lies in [0, 2^8] before its cast to e4m3 (FA3's Max_offset).
P_OFFSET = 8
SIGN_SEED = 0x5EED
MAX_HADAMARD = 128
V_SCALINGS = ("block", "channel")
# Rows of the transposed V are padded to this many tokens: a TMA global stride must be a
# multiple of 16 bytes.
VT_ALIGN = 16
LOG2E = 1.0 / math.log(2.0)
# v_pv_order: within each group of 16 keys of the transposed V, position i holds key
# PV_KEY_ORDER[i], the order in which the Hopper FP8 PV WGMMA's register A operand meets P
# (cute_kernels/fp8.py derives it; tests/test_cute_fp8.py checks the two agree).
PV_KEY_ORDER = tuple(2 * (i // 4) + i % 2 + 8 * ((i % 4) // 2) for i in range(16))


@functools.lru_cache(maxsize=256)  # on every FP8 call; a CPU tensor per value costs ~3 us
def score_constants(softmax_scale: float, softcap: float, n: int) -> tuple[float, float]:
    """(c, cap), float32 values as Python floats, of the score multiplier (`fa3py.fp8`,
    "Attention"): without softcap s2 = S * (sq * sk * c) with c = softmax_scale * log2(e) / n and
    cap = 1; with softcap s2 = tanh(S * (sq * sk * c)) * cap with c = softmax_scale / (n * softcap)
    (the tanh's argument, the block scales inside it) and cap = softcap * log2(e). n is the
    rotation's factor (`rotation_factor`)."""
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))
    if softcap > 0:
        return f32(softmax_scale / n / softcap), f32(softcap * LOG2E)
    return f32(softmax_scale / n * LOG2E), 1.0


def hadamard_block(headdim: int) -> int:
    """Size n of the diagonal blocks of the rotation: the largest power of two that divides
    the head dim, at most 128 (hdim 96 -> 32, 80 -> 16, 72 -> 8)."""
    return min(headdim & -headdim, MAX_HADAMARD)


@functools.lru_cache(maxsize=32)
def hadamard_signs(n: int, seed: int) -> torch.Tensor:
    """The random signs D (n,) of the rotation, +-1 as float32 on the CPU; a pure function
    of (n, seed)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).float()


@functools.lru_cache(maxsize=32)
def rotation_matrix(n: int, seed: int) -> torch.Tensor:
    """R = D H (n, n), float32, entries +-1 (unnormalized: R R^T = n I)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return hadamard_signs(n, seed).unsqueeze(1) * h


def rotate(x: torch.Tensor, seed: int = SIGN_SEED) -> torch.Tensor:
    """x @ blockdiag(R, ..., R) over the last dim, in float32 (unnormalized: inner products
    of rotated rows are n times the original ones)."""
    d = x.shape[-1]
    n = hadamard_block(d)
    r = rotation_matrix(n, seed).to(x.device)
    return (x.float().reshape(*x.shape[:-1], d // n, n) @ r).reshape(x.shape)


@dataclass(frozen=True)
class Fp8Format:
    """What a kernel needs to know about quantized tensors besides their shapes (hashable:
    part of a compiled kernel's key).

    block_m: query rows per Q scale (1: one scale per token). block_n: keys per K scale and,
    with v_scaling="block", per V scale; a kernel's N tile must be a multiple of it.
    v_scaling: "channel" (one scale per output channel over the whole sequence, applied in the
    epilogue; the default) or "block" (one scale per block_n keys, applied to each KV block's
    P V partial sum: a second accumulator, which keeps the Hopper kernel at 128-key tiles).
    v_transposed: V stored (batch, nheads_kv, headdim_v, seqlen_k) for the FP8
    PV GEMM, which reads V k-major. v_pv_order (with v_transposed): the keys of every 16-key group
    of the transposed V stored in PV_KEY_ORDER, the order the Hopper FP8 kernel's PV GEMM takes
    them in (a sum over keys does not care; P stays in its registers). seed: the rotation's random signs.
    rotated=False: Q and K are not rotated (n = 1) and scales may be any positive float32, not only
    powers of two: FA3's float8 inputs with per-(batch, KV head) descales, seen as this format
    (`fa3py.fp8.from_descales`; quantize_fp8 always rotates). qk_int8: the
    higher-accuracy mode: rotated Q and K as int8 with amax / 127 scales (an s8 x s8 -> s32
    GEMM, which Hopper runs at the FP8 rate), V and P still e4m3; best with block_m=1."""

    block_m: int = 128
    block_n: int = 128
    v_scaling: str = "channel"
    v_transposed: bool = True
    seed: int = SIGN_SEED
    qk_int8: bool = False
    v_pv_order: bool = False
    rotated: bool = True

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"fa3py: `{name}` must be a positive int, got {b!r}")
        if self.v_scaling not in V_SCALINGS:
            raise ValueError(f"fa3py: `v_scaling` must be one of {V_SCALINGS}, got {self.v_scaling!r}")
        if self.v_pv_order and not self.v_transposed:
            raise ValueError("fa3py: `v_pv_order` orders the keys of the transposed V: it needs v_transposed=True")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"fa3py: `seed` must be an int, got {self.seed!r}")


def packed_column(start: int, b: int, block: int) -> int:
    """The first column of packed sequence b (starting at token `start`) in a packed operand's
    scales (`block`: its block) or, in units of VT_ALIGN, in its V^T: start // block + b."""
    return start // block + b


def packed_width(total: int, batch: int, block: int) -> int:
    """Columns of a packed operand's scales (units of VT_ALIGN for V^T): total // block + batch
    (sequence b's last block ends by then: start // block + ceil(n / block) <= (start + n) //
    block + 1)."""
    return total // block + batch


def place_block_scales(scales: list, cu: list, total: int, block: int, heads: int, device) -> torch.Tensor:
    """Per-sequence block scales (1, heads, nblocks of sequence b) placed in a packed operand's
    (heads, packed_width) scales, sequence b from column packed_column(cu[b], b, block); unused
    columns hold 1."""
    out = torch.ones(heads, packed_width(total, len(cu) - 1, block), dtype=torch.float32, device=device)
    for b, s in enumerate(scales):
        c0 = packed_column(cu[b], b, block)
        out[:, c0:c0 + s.shape[-1]] = s[0]
    return out


def place_vt(vts: list, cu: list, total: int, heads: int, dim: int, device) -> torch.Tensor:
    """Per-sequence V^T (1, heads, dim, padded keys of sequence b) placed in a packed V^T (heads,
    dim, VT_ALIGN * packed_width), sequence b from column VT_ALIGN * packed_column(cu[b], b,
    VT_ALIGN); the rest zero."""
    data = torch.zeros(heads, dim, VT_ALIGN * packed_width(total, len(cu) - 1, VT_ALIGN), dtype=torch.uint8,
                       device=device)
    for b, t in enumerate(vts):
        c0 = VT_ALIGN * packed_column(cu[b], b, VT_ALIGN)
        data[..., c0:c0 + t.shape[-1]] = t[0].view(torch.uint8)
    return data.view(E4M3)


def rotation_factor(fmt: Fp8Format, headdim: int) -> int:
    """n, the factor the rotation puts on Q K^T (1 without rotation)."""
    return hadamard_block(headdim) if fmt.rotated else 1


@functools.lru_cache(maxsize=64)
def pv_key_order(padded: int, device=None) -> torch.Tensor:
    """The key stored at each position of a v_pv_order transposed V with `padded` (a multiple of
    16) positions: data_pv[..., i] = data[..., pv_key_order(...)[i]]. Cached per (padded, device):
    built on the host, a per-call copy to the GPU would wait for the stream's earlier work; read
    it, do not write it."""
    order = torch.tensor(PV_KEY_ORDER)
    return (torch.arange(0, padded, 16).unsqueeze(1) + order).reshape(-1).to(device)


@functools.lru_cache(maxsize=64)
def pv_key_positions(padded: int, device=None) -> torch.Tensor:
    """The inverse: the position of each key (data[..., k] = data_pv[..., positions[k]]); cached
    as pv_key_order."""
    return torch.argsort(pv_key_order(padded)).to(device)


@dataclass(frozen=True, eq=False)
class Fp8Tensor:
    """One quantized operand (batched layout only).

    data: float8_e4m3fn (int8 for Q and K with fmt.qk_int8). Q and K: (batch, seqlen, nheads, headdim), rotated, so
    data[b, t, h] * scale[b, h, t // block] is row t of x R (x R / sqrt(n) is the orthonormal
    rotation). V: (batch, nheads_kv, headdim_v, seqlen_pad) when fmt.v_transposed (seqlen_pad
    = seqlen rounded up to 16, zero-filled), else (batch, seqlen, nheads_kv, headdim_v); not
    rotated. scale: float32 powers of two (amax / 127 with qk_int8), (batch, nheads, ceil(seqlen / block)) for Q, K and
    block-scaled V, (batch, nheads_kv, headdim_v) for channel-scaled V. source_dtype: the
    16-bit dtype it was quantized from (the output dtype of attention on it).

    Packed (varlen) operands carry `cu_seqlens` (batch + 1,) and seqlen = total tokens; every
    sequence is quantized on its own, its blocks counted from its first token (what the kernel's
    tiles need): Q / K data (total, nheads, dim); their scales (and block V's) (nheads,
    total // block + batch) with sequence b's block j in column cu[b] // block + b + j
    (`packed_column`: never overlapping, no offsets tensor needed; unused columns 1); V^T
    (nheads_kv, dv, 16 * (total // 16 + batch)) with sequence b's key j in column
    16 * (cu[b] // 16 + b) + j (its groups of 16 start there: zero-padded, in PV_KEY_ORDER with
    v_pv_order); channel V scales (batch, nheads_kv, dv), one set per sequence. `sequence(b)` is
    sequence b as a batched operand of one."""

    data: torch.Tensor
    scale: torch.Tensor
    role: str  # "q", "k" or "v"
    fmt: Fp8Format
    seqlen: int
    source_dtype: torch.dtype
    cu_seqlens: Optional[torch.Tensor] = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def batch(self) -> int:
        return self.cu_seqlens.shape[0] - 1 if self.packed else self.data.shape[0]

    def sequence(self, b: int, length: Optional[int] = None) -> "Fp8Tensor":
        """Sequence b (its first `length` tokens: seqused) as a batched operand of batch 1 (views)."""
        if self.packed:
            cu = self.cu_seqlens.tolist()
            start, full = cu[b], cu[b + 1] - cu[b]
        else:
            start, full = 0, self.seqlen
        n = full if length is None else min(length, full)
        if self.transposed:
            c0 = VT_ALIGN * packed_column(start, b, VT_ALIGN) if self.packed else 0
            data = (self.data.unsqueeze(0) if self.packed else self.data[b:b + 1])[..., c0:c0 + -(-n // VT_ALIGN) * VT_ALIGN]
        else:
            data = self.data[start:start + n].unsqueeze(0) if self.packed else self.data[b:b + 1, :n]
        if self.role == "v" and self.fmt.v_scaling == "channel":
            scale = self.scale[b:b + 1]
        else:
            c0 = packed_column(start, b, self.block) if self.packed else 0
            scale = (self.scale.unsqueeze(0) if self.packed else self.scale[b:b + 1])[..., c0:c0 + -(-n // self.block)]
        return dataclasses.replace(self, data=data, scale=scale, seqlen=n, cu_seqlens=None)

    @property
    def block(self) -> int:
        return self.fmt.block_m if self.role == "q" else self.fmt.block_n

    @property
    def transposed(self) -> bool:
        return self.role == "v" and self.fmt.v_transposed

    def tokens(self) -> torch.Tensor:
        """data as a (batch, seqlen, nheads, dim) float8 view (no copy; a copy in key order with
        fmt.v_pv_order); packed: (total, nheads, dim) (V^T: a copy)."""
        if self.packed and self.transposed:
            return torch.cat([self.sequence(b).tokens()[0] for b in range(self.batch)], 0)
        if self.transposed:
            data = self.data
            if self.fmt.v_pv_order:
                data = data.index_select(-1, pv_key_positions(data.shape[-1], data.device))
            return data.permute(0, 3, 1, 2)[:, : self.seqlen]
        return self.data

    def token_view(self) -> torch.Tensor:
        """data as a view with tokens()' shape, dtype and device, never a copy: transposed V's
        keys in storage order (PV key order, packed sequences' padding), so only the shape, dtype
        and device mean anything. What a request carries for shapes (`fa3py.fp8.make_request`)."""
        if not self.transposed:
            return self.data
        if self.packed:  # (nheads, dim, columns) -> (columns, nheads, dim)[:total]
            return self.data.permute(2, 0, 1)[: self.seqlen]
        return self.data.permute(0, 3, 1, 2)[:, : self.seqlen]

    @property
    def shape(self) -> tuple:
        return tuple(self.token_view().shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def scale_per_token(self) -> torch.Tensor:
        """Scales broadcast to (batch, seqlen, nheads, 1), or (batch, 1, nheads_kv, headdim_v)
        for channel-scaled V."""
        if self.role == "v" and self.fmt.v_scaling == "channel":
            return self.scale.unsqueeze(1)
        s = self.scale.repeat_interleave(self.block, dim=2)[:, :, : self.seqlen]
        return s.transpose(1, 2).unsqueeze(-1)

    def dequantize(self) -> torch.Tensor:
        """float32 (batch, seqlen, nheads, dim) (packed: (total, nheads, dim)). Q and K come back
        rotated and normalized, x R / sqrt(n), so that dequantized q k^T approximates the
        original q k^T."""
        if self.packed:
            return torch.cat([self.sequence(b).dequantize()[0] for b in range(self.batch)], 0)
        x = self.tokens().float() * self.scale_per_token()
        if self.role != "v":
            x = x / rotation_factor(self.fmt, x.shape[-1]) ** 0.5
        return x


@dataclass(frozen=True, eq=False)
class Fp8QKV:
    """What `fa3py.quantize_fp8` returns: any of q, k, v may be None (not quantized).
    Unpacks as (q, k, v), so ``fa3py.attention(*fa3py.quantize_fp8(q, k, v))`` works."""

    q: Optional[Fp8Tensor]
    k: Optional[Fp8Tensor]
    v: Optional[Fp8Tensor]

    def __iter__(self):
        return iter((self.q, self.k, self.v))

    @property
    def fmt(self) -> Fp8Format:
        return next(x.fmt for x in self if x is not None)

    def replace(self, **kw) -> "Fp8QKV":
        return dataclasses.replace(self, **kw)


# FA3's float8 inputs seen as this format (`from_descales`): not rotated, V scaled per channel
# (the descale applied to O, where FA3 applies v_descale), V^T in the PV key order.
FA3_FORMAT = dict(v_scaling="channel", v_pv_order=True, rotated=False)


def transpose_v(v: torch.Tensor, pv_order: bool = True) -> torch.Tensor:
    """(batch, seqlen, nheads_kv, dv) float8 -> V^T (batch, nheads_kv, dv, seqlen rounded up to
    VT_ALIGN), zero past seqlen, with pv_order the keys of every 16-key group in PV_KEY_ORDER: one
    strided copy (reads b * s * h * dv bytes, writes b * h * dv * s_pad; the tail group's keys
    through a small index copy)."""
    b, s, h, d = v.shape
    pad = -(-s // VT_ALIGN) * VT_ALIGN
    vt = torch.empty(b, h, d, pad, dtype=torch.uint8, device=v.device)
    src = v.view(torch.uint8).permute(0, 2, 3, 1)  # (b, h, d, s), a view
    full = s // 16 * 16 if pv_order else s
    if full:
        if pv_order:
            # key 8a + 2j + c of a group sits at position 4j + 2a + c (PV_KEY_ORDER): the group's
            # positions seen as (j, a, c), transposed to (a, j, c), are the keys in order
            dst = vt[..., :full].unflatten(-1, (full // 16, 4, 2, 2)).transpose(-3, -2)
            dst.copy_(src[..., :full].unflatten(-1, (full // 16, 2, 4, 2)))
        else:
            vt[..., :full].copy_(src)
    if pad > full:
        vt[..., full:].zero_()
        if s > full:
            pos = full + pv_key_positions(16, v.device)[: s - full]  # the tail keys' places in a group
            vt[..., pos] = src[..., full:]
    return vt.view(v.dtype)


def _transpose_v_on_device(v: torch.Tensor) -> torch.Tensor:
    """`transpose_v` in the PV key order, by the Triton pass on CUDA GPUs (one coalesced
    read and write; the strided PyTorch copy writes one byte per access), where the quantizer
    would use it (quantize._prep_backend)."""
    from .quantize import _prep_backend

    if _prep_backend(v, None) == "triton":
        try:
            from triton_fallback.fp8_prep import transpose_codes
        except ImportError:
            pass
        else:
            return transpose_codes(v)
    return transpose_v(v)


def from_descales(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale=None, k_descale=None,
                  v_descale=None, block_m: int = 128, block_n: int = 128, cu_seqlens_q=None,
                  cu_seqlens_k=None) -> Fp8QKV:
    """FA3's float8_e4m3fn q, k, v with float32 descales of shape (batch, nheads_kv) (None: 1) as
    this format's operands (FA3_FORMAT, no rotation): Q's scale of every block of rows of head h
    is q_descale[b, h // group] (FA3's semantics, fa3py.request), K's of every block
    k_descale[b, kv head], V's channel scales v_descale[b, kv head]; the output is bf16. Costs
    one copy of V (`transpose_v`, by a Triton pass on CUDA) and the small scale tensors; q and k are used as they are.
    (The Hopper kernel can take FA3's inputs without this: cute_kernels.launch's direct path.)
    Packed q or k / v (cu_seqlens): the packed layout (`Fp8Tensor`), one sequence at a time on
    the host (reads cu_seqlens)."""
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        return _from_descales_packed(q, k, v, (q_descale, k_descale, v_descale), block_m, block_n, cu_seqlens_q,
                                     cu_seqlens_k)
    b, sq, h, _ = q.shape
    sk, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    fmt = Fp8Format(block_m=block_m, block_n=block_n, **FA3_FORMAT)

    def scales(descale, group: int, columns: int) -> torch.Tensor:
        """(b, hk * group, columns) float32: descale[b, kv head] at every query head of the group
        and column; one launch (a fill, or a copy from the broadcast view)."""
        if descale is None:
            return torch.ones(b, hk * group, columns, dtype=torch.float32, device=q.device)
        view = descale.float()[:, :, None, None].expand(b, hk, group, columns)
        return view.reshape(b, hk * group, columns)

    make = functools.partial(Fp8Tensor, fmt=fmt, source_dtype=torch.bfloat16)
    return Fp8QKV(
        q=make(data=q, scale=scales(q_descale, h // hk, -(-sq // block_m)), role="q", seqlen=sq),
        k=make(data=k, scale=scales(k_descale, 1, -(-sk // block_n)), role="k", seqlen=sk),
        v=make(data=_transpose_v_on_device(v), scale=scales(v_descale, 1, dv), role="v", seqlen=sk),
    )


def _from_descales_packed(q, k, v, descales, block_m, block_n, cu_seqlens_q, cu_seqlens_k) -> Fp8QKV:
    """`from_descales` with a packed side: each sequence's batched operands (batch of one, its
    row of the descales), placed in the packed layout."""
    cu_q = None if cu_seqlens_q is None else cu_seqlens_q.tolist()
    cu_k = None if cu_seqlens_k is None else cu_seqlens_k.tolist()
    batch = len(cu_q or cu_k) - 1
    seq = lambda x, cu, b: x[cu[b]:cu[b + 1]].unsqueeze(0) if cu is not None else x[b:b + 1]
    parts = [from_descales(seq(q, cu_q, b), seq(k, cu_k, b), seq(v, cu_k, b),
                           *(None if d is None else d[b:b + 1] for d in descales), block_m=block_m, block_n=block_n)
             for b in range(batch)]

    def place(role, x, cu, cu_seqlens):
        ops = [getattr(p, role) for p in parts]
        if cu is None:
            return dataclasses.replace(ops[0], data=x if role != "v" else _transpose_v_on_device(x),
                                       scale=torch.cat([o.scale for o in ops]), seqlen=x.shape[1])
        total, heads, dim = x.shape
        if role == "v":  # channel scales: per sequence
            scale = torch.cat([o.scale for o in ops])
            data = place_vt([o.data for o in ops], cu, total, heads, dim, x.device)
        else:
            blk = block_m if role == "q" else block_n
            scale, data = place_block_scales([o.scale for o in ops], cu, total, blk, heads, x.device), x
        return dataclasses.replace(ops[0], data=data, scale=scale, seqlen=total, cu_seqlens=cu_seqlens)

    return Fp8QKV(q=place("q", q, cu_q, cu_seqlens_q), k=place("k", k, cu_k, cu_seqlens_k),
                  v=place("v", v, cu_k, cu_seqlens_k))
