"""sm90 (H100/H200) forward attention kernels written in NVIDIA CuTe DSL.

Contract with `fa3py.dispatch`:
    why_not(req, backward) -> None if this backend computes `req` (features only; the dispatcher
                              checks that the GPU is sm90), else a reason string.
    forward(req) -> (out, lse) with req.out_shape / req.lse_shape / req.out_dtype.
    backward(req, out, lse, dout) -> (dq, dk, dv) shaped and typed as req.q, req.k, req.v.

Modules: `config` (the default config table), `launch` (host side: config choice, layouts,
compile caches, launch), `fwd_sm90` (the kernel) with `scheduler`, `mask`, `softmax`,
`epilogue`, `combine` (split-KV's combine) and `utils`; the backward: `bwd_sm90` (the kernel) and
`bwd_launch` (its host side).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from cute_kernels import bwd_launch, launch
from cute_kernels.config import QV_HDIM_PAIRS, SUPPORTED_HDIM_PAIRS, padded_hdim, padded_hdim_v
from cute_kernels.launch import (DTYPES, config_for, fp8_config_for, fp8_why_not, num_splits, pack_lse, pack_rows,
                                 run, run_fp8, unpack_lse, unpack_rows)

if TYPE_CHECKING:
    import torch

    from fa3py.request import AttentionRequest

__all__ = ["why_not", "describe", "forward", "backward", "config_for", "num_splits", "run", "pack_rows", "unpack_rows", "pack_lse",
           "unpack_lse"]


def why_not(req: "AttentionRequest", backward: bool) -> Optional[str]:
    if req.paged and (backward or req.params.fp8 or req.fp8_tensors is not None
                      or (req.is_fp8_input and launch.fp8_direct_enabled is False)):
        return ("cute_kernels: paged K / V are read by the forward only, on 16-bit inputs or on FA3's float8 "
                "ones read directly (not with FA3PY_CUTE_FP8_DIRECT=0)")
    if backward:
        # what the forward serves, within the backward kernel's limits (its own reasons first:
        # the forward's last one is the device's)
        if req.is_fp8_input or req.params.fp8:
            return "cute_kernels: no FP8 backward"
        return bwd_launch.why_not(req) or _forward_why_not(req)
    if req.is_fp8_input or req.params.fp8:
        return fp8_why_not(req)
    return _forward_why_not(req)


def _forward_why_not(req: "AttentionRequest") -> Optional[str]:
    """The 16-bit forward's checks (FP8 requests are fp8_why_not's)."""
    if req.dtype not in DTYPES:
        return f"cute_kernels: dtype {req.dtype} not supported (bf16/fp16 only)"
    if req.k.dtype != req.dtype or req.v.dtype != req.dtype:
        return "cute_kernels: q, k, v must share a dtype"
    if req.qv is not None and not launch.qv_enabled:
        return "cute_kernels: qv (MLA) in the kernel is turned off (FA3PY_CUTE_QV=0)"
    pairs = SUPPORTED_HDIM_PAIRS if req.qv is None else QV_HDIM_PAIRS
    if (padded_hdim(req.headdim), padded_hdim_v(req.headdim_v, req.qv is not None)) not in pairs:
        return (f"cute_kernels: (headdim, headdim_v) = ({req.headdim}, {req.headdim_v}) does not round up "
                f"(multiples of 8) to one of {sorted(pairs)}{' (with qv)' if req.qv is not None else ''}")
    if req.nheads % req.nheads_kv != 0:
        return "cute_kernels: nheads must be a multiple of nheads_kv"
    if any(t is not None for t in (req.q_descale, req.k_descale, req.v_descale)):
        return "cute_kernels: descales are FP8-only"
    if req.params.softmax_scale <= 0 and req.params.softcap == 0:
        # The kernel takes each row's max over unscaled scores (one FMUL per score saved), which
        # is the max of the scaled ones only for a scale > 0. Below 0 the probabilities are
        # 2^((s - max) * scale) >= 1 instead of <= 1: they overflow fp16's P (2^16) or fp32 once
        # a row's scores spread wide enough. At 0 a masked score (-inf) times the scale is NaN.
        # (With softcap the scale goes into tanh's argument and the max is taken over the
        # capped scores.)
        return "cute_kernels: softmax_scale <= 0 needs softcap (the row max is taken before scaling)"
    paged = launch.paged_why_not(req, config_for(req).tile.tile_n) if req.paged else None
    if paged:
        return paged
    if req.device.type != "cuda":
        return "cute_kernels: CUDA tensors only"
    return None


def describe(req: "AttentionRequest", backward: bool) -> str:
    """The kernel config a served request compiles to (FwdConfig / BwdConfig.short(): dtype, head
    dims, tile, schedule switches, features), for fa3py.explain."""
    if backward:
        return "sm90 backward " + bwd_launch.config_for(req).short()
    if req.is_fp8_input or req.params.fp8:
        return "sm90 FP8 forward " + fp8_config_for(req).short()
    return "sm90 forward " + config_for(req).short()


def backward(req: "AttentionRequest", out: "torch.Tensor", lse: "torch.Tensor", dout: "torch.Tensor"):
    """(dq, dk, dv) by the sm90 backward kernel (bwd_sm90.py, host side in bwd_launch.py)."""
    return bwd_launch.run(req, out, lse, dout)


def forward(req: "AttentionRequest") -> tuple["torch.Tensor", "torch.Tensor"]:
    if req.is_fp8_input or req.params.fp8:
        return run_fp8(req, fp8_config_for(req))
    return run(req, config_for(req))
