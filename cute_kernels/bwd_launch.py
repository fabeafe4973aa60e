"""Host side of the sm90 backward: what it serves, its config, the pre- and post-processing
around the kernel (bwd_sm90.py), and the launch.

    preprocess   LSE_log2 = LSE * log2(e) (+inf where LSE = -inf: P = 0 for a row without keys,
                 and for the padding rows of each sequence's last block), dPsum = rowsum(dO * O)
                 in float32, both per head in rows padded per sequence to whole tile_m blocks
                 (bwd_sm90.padded_offset); the dQ accumulator zeroed.
    kernel       dK, dV (in the tensors' dtype) and dQ accumulated in float32.
    postprocess  dQ: the accumulator's chunks permuted from the consumer threads' register order
                 (`dq_fragment_order`) to rows x head dim, times softmax_scale, converted.

The pre / post steps are torch ops for now (one fused pass each is the faster form).
The kernel has not yet run on a GPU: the dispatcher sends backwards here only with
FA3PY_CUTE_BWD=1 (`enabled`).
"""

from __future__ import annotations

import functools
import math
import os
from typing import TYPE_CHECKING, Optional

import torch

from cute_kernels.config import BWD_TILES, BwdConfig, padded_hdim

if TYPE_CHECKING:
    from fa3py.request import AttentionRequest

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
LOG2E = math.log2(math.e)
enabled: bool = os.environ.get("FA3PY_CUTE_BWD", "0") == "1"


def why_not(req: "AttentionRequest") -> Optional[str]:
    """None if the backward kernel serves `req` (given the forward's checks passed), else why not."""
    if not enabled:
        return ("cute_kernels: the sm90 backward kernel is compile-checked only, not yet run on a GPU; "
                "opt in with FA3PY_CUTE_BWD=1")
    d = padded_hdim(req.headdim)
    if d not in BWD_TILES or padded_hdim(req.headdim_v) != d:
        return (f"cute_kernels: the backward kernel serves head dims up to 128 with hdim_v = hdim "
                f"(padded to {sorted(BWD_TILES)}), got ({req.headdim}, {req.headdim_v})")
    if req.headdim_v != req.headdim:
        return "cute_kernels: the backward kernel needs hdim_v = hdim"
    if req.params.deterministic:
        return "cute_kernels: deterministic backward (a fixed dQ accumulation order) is not built yet"
    if req.params.attention_chunk:
        return "cute_kernels: attention_chunk is not in the backward kernel yet"
    from cute_kernels import launch

    if not launch.use_tvm_ffi:
        return "cute_kernels: the backward kernel is called through TVM-FFI (pip install apache-tvm-ffi)"
    return None


def config_for(req: "AttentionRequest") -> BwdConfig:
    p = req.params
    d = padded_hdim(req.headdim)
    return _cached_config(DTYPES[req.dtype], d, has_left=p.window_left >= 0, has_right=p.window_right >= 0,
                          softcap=p.softcap > 0, cu_seqlens_q=req.cu_seqlens_q is not None,
                          cu_seqlens_k=req.cu_seqlens_k is not None, seqused_q=req.seqused_q is not None,
                          seqused_k=req.seqused_k is not None, hdim_in=0 if d == req.headdim else req.headdim)


@functools.lru_cache(maxsize=1024)
def _cached_config(dtype: str, hdim: int, **features) -> BwdConfig:
    return BwdConfig.make(dtype, hdim, **features)


# ----------------------------------------------------------------------------- dQ's order
def dq_value_coords(tile_m: int, hdim: int, thread: int, r: int) -> tuple[int, int]:
    """(row, column) in a tile_m x hdim dQ block of value `r` of consumer thread `thread`
    (0..255): the WGMMA accumulator layout (per warpgroup a 64 x N atom; warp w holds rows
    16w .. 16w + 15, lane l rows l / 4 and l / 4 + 8, columns 2 (l % 4) + {0, 1} of every 8;
    registers ordered (column pair element, row half, 8-column group)), with the two warpgroups
    on hdim / 2-column halves."""
    assert tile_m == 64
    wg, t = divmod(thread, 128)
    warp, lane = divmod(t, 32)
    e, rest = r % 2, r // 2
    half, group = rest % 2, rest // 2
    row = 16 * warp + 8 * half + lane // 4
    col = 8 * group + 2 * (lane % 4) + e
    return row, col + wg * (hdim // 2)


@functools.lru_cache(maxsize=None)
def _dq_source_cpu(tile_m: int, hdim: int) -> torch.Tensor:
    per_thread = tile_m * hdim // 256
    src = torch.empty(tile_m * hdim, dtype=torch.long)
    for thread in range(256):
        wg, t = divmod(thread, 128)
        for r in range(per_thread):
            row, col = dq_value_coords(tile_m, hdim, thread, r)
            # bwd_sm90's sdQ: per warpgroup, 16-byte vectors of 4 values, threads fastest
            src[row * hdim + col] = wg * 128 * per_thread + (r // 4) * 512 + t * 4 + r % 4
    return src


def dq_fragment_order(tile_m: int, hdim: int, device) -> torch.Tensor:
    """For each (row * hdim + column) of a dQ block, its index in the accumulator's chunk."""
    return _dq_source_on(tile_m, hdim, torch.device(device))


@functools.lru_cache(maxsize=64)
def _dq_source_on(tile_m: int, hdim: int, device: torch.device) -> torch.Tensor:
    return _dq_source_cpu(tile_m, hdim).to(device)


# ----------------------------------------------------------------------------- rows
def packed_row_index(req: "AttentionRequest", tile_m: int) -> torch.Tensor:
    """Packed queries: the padded row of each of the total_q rows (bwd_sm90.padded_offset)."""
    cu = req.cu_seqlens_q.to(torch.long)
    total = req.q.shape[0]
    rows = torch.arange(total, device=cu.device)
    batch = torch.searchsorted(cu[1:], rows, right=True)
    pad = (cu[:-1] + torch.arange(cu.shape[0] - 1, device=cu.device) * tile_m) // tile_m * tile_m
    return rows + (pad - cu[:-1])[batch]


def padded_rows(req: "AttentionRequest", tile_m: int) -> int:
    """Rows per head of LSE_log2 / dPsum / the dQ accumulator."""
    if req.packed_q:
        return -(-(req.q.shape[0] + req.batch * tile_m) // tile_m) * tile_m
    return -(-req.q.shape[1] // tile_m) * tile_m


def preprocess(req: "AttentionRequest", cfg: BwdConfig, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
               row_index: Optional[torch.Tensor]):
    """(LSE_log2, dPsum, zeroed dQ accumulator) in the kernel's padded row layout."""
    dev, h, rows = req.device, req.nheads, padded_rows(req, cfg.tile_m)
    lead = (h,) if req.packed_q else (req.q.shape[0], h)
    lse2 = torch.full((*lead, rows), math.inf, dtype=torch.float32, device=dev)
    dpsum = torch.zeros((*lead, rows), dtype=torch.float32, device=dev)
    lse_log2 = torch.where(lse == -math.inf, math.inf, lse.float() * LOG2E)
    rowsum = (dout.float() * out.float()).sum(-1)  # (b, s, h) or (total, h)
    if req.packed_q:
        lse2[:, row_index] = lse_log2
        dpsum[:, row_index] = rowsum.t()
    else:
        sq = req.q.shape[1]
        lse2[..., :sq] = lse_log2
        dpsum[..., :sq] = rowsum.transpose(1, 2)
    dq_acc = torch.zeros((*lead, rows * cfg.hdim), dtype=torch.float32, device=dev)
    return lse2, dpsum, dq_acc


def postprocess(req: "AttentionRequest", cfg: BwdConfig, dq_acc: torch.Tensor, row_index: Optional[torch.Tensor]):
    """dQ (req.q's shape and dtype) from the accumulator."""
    d, tm = req.headdim, cfg.tile_m
    src = dq_fragment_order(tm, cfg.hdim, dq_acc.device)
    *lead, flat = dq_acc.shape
    blocks = dq_acc.view(*lead, flat // (tm * cfg.hdim), tm * cfg.hdim).index_select(-1, src)
    rows = blocks.view(*lead, -1, cfg.hdim)[..., :d] * req.params.softmax_scale
    if req.packed_q:
        dq = rows[:, row_index].transpose(0, 1)  # (total, h, d)
    else:
        dq = rows[:, :, :req.q.shape[1]].transpose(1, 2)  # (b, s, h, d)
    return dq.to(req.dtype).contiguous()


# ----------------------------------------------------------------------------- run
def run(req: "AttentionRequest", out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
        cfg: Optional[BwdConfig] = None):
    """(dq, dk, dv) of `req` given the forward's out / lse and the gradient dout."""
    from cute_kernels.launch import _tma_ready, q_empty_or_no_keys

    cfg = cfg or config_for(req)
    if q_empty_or_no_keys(req):
        return torch.zeros_like(req.q), torch.zeros_like(req.k), torch.zeros_like(req.v)
    row_index = packed_row_index(req, cfg.tile_m) if req.packed_q else None
    lse2, dpsum, dq_acc = preprocess(req, cfg, out, lse, dout, row_index)
    q, k, v, do = (_tma_ready(t.detach()) for t in (req.q, req.k, req.v, dout))
    # keys no CTA writes (past seqused_k) must read as zero
    new = torch.zeros if req.seqused_k is not None else torch.empty
    dk = new(k.shape, dtype=k.dtype, device=k.device)
    dv = new(v.shape, dtype=v.dtype, device=v.device)
    launch_kernel(req, cfg, q, k, v, do, dk, dv, lse2, dpsum, dq_acc)
    return postprocess(req, cfg, dq_acc, row_index), dk, dv


def kernel_scalars(req: "AttentionRequest") -> tuple:
    """The kernel's scalar arguments: (scale_log2, softcap_premul, softmax_scale, window_left,
    window_right, max_seqlen_k). With softcap the scores are softcap * tanh(qk * premul) and
    scale_log2 = softcap * log2(e), else scale_log2 = softmax_scale * log2(e)."""
    p = req.params
    if p.softcap > 0:
        scale_log2, premul = p.softcap * LOG2E, p.softmax_scale / p.softcap
    else:
        scale_log2, premul = p.softmax_scale * LOG2E, 1.0
    max_seqlen_k = req.max_seqlen_k if req.packed_k else req.k.shape[1]
    return scale_log2, premul, p.softmax_scale, p.window_left, p.window_right, max_seqlen_k


def sequence_tensors(req: "AttentionRequest") -> list:
    """The kernel's int32 (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k), None where absent."""
    from cute_kernels import launch

    return [launch._int32(t) for t in (req.cu_seqlens_q, req.cu_seqlens_k, req.seqused_q, req.seqused_k)]


def launch_kernel(req: "AttentionRequest", cfg: BwdConfig, q, k, v, do, dk, dv, lse2, dpsum, dq_acc):
    """Run the compiled backward kernel (the test hook: a CPU emulation may replace it)."""
    from cute_kernels import launch

    fn = launch.kernels.get((cfg, True)) or launch.compile_kernel(cfg)
    dev = q.device
    with torch.cuda.device(dev) if dev.index != torch.cuda.current_device() else launch._SAME_DEVICE:
        fn(q, k, v, do, dk, dv, lse2, dpsum, dq_acc, *sequence_tensors(req), *kernel_scalars(req))
