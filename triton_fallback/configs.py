"""Tile configurations: a committed table first, then autotuning with pruning.

`pick(...)` answers, for one launch, either a fixed `Tile` (interpreter, or a hit in `TUNED`)
or None, meaning "use the autotuned kernel". The autotuner's key is (head dims, window /
softcap flags, rounded seqlens, dtypes), so a new sequence length within the same power-of-two
bucket does not re-tune.

Regenerate `TUNED` on a GPU with ``python -m benchmarks.triton_tune`` (prints the entries).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

KERNELS = ("fwd", "bwd", "bwd_dkdv", "bwd_dq")  # bwd_dkdv, bwd_dq: the deterministic backward


@dataclass(frozen=True)
class Tile:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)

    def to_triton(self) -> triton.Config:
        return triton.Config(dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n),
                             num_warps=self.num_warps, num_stages=self.num_stages)


# The interpreter runs each program in numpy: few, mid-sized tiles are fastest, and 32 still
# puts several blocks (and every masked/unmasked boundary) in the small test shapes.
INTERPRET_TILE = Tile(32, 32, 4, 1)

# (gpu family, kernel, padded head dim, dtype, causal-or-window) -> Tile. Seed entries follow
# the FlashAttention-2 Triton defaults for Ampere/Ada (64..128 x 64 tiles, 4-8 warps); they are
# not yet re-measured on this code: run `python -m benchmarks.triton_tune` on the target GPU and
# paste its output here.
_F16 = ("float16", "bfloat16")
TUNED: dict[tuple, Tile] = {
    **{("sm80", "fwd", d, dt, c): t for dt in _F16 for c in (False, True) for d, t in (
        (64, Tile(128, 64, 4, 3)), (128, Tile(128, 64, 8, 3)), (256, Tile(64, 64, 8, 2)))},
    # "bwd" (dK, dV and atomic dQ): unmeasured seeds, as sm90 below.
    **{("sm80", "bwd", d, dt, c): t for dt in _F16 for c in (False, True) for d, t in (
        (64, Tile(64, 128, 8, 2)), (128, Tile(32, 64, 8, 2)), (256, Tile(16, 64, 8, 1)))},
    **{("sm80", "bwd_dkdv", d, dt, c): t for dt in _F16 for c in (False, True) for d, t in (
        (64, Tile(32, 128, 8, 2)), (128, Tile(32, 128, 8, 2)), (256, Tile(32, 64, 8, 1)))},
    **{("sm80", "bwd_dq", d, dt, c): t for dt in _F16 for c in (False, True) for d, t in (
        (64, Tile(128, 32, 8, 2)), (128, Tile(128, 32, 8, 2)), (256, Tile(64, 32, 8, 1)))},
    **{("sm89", "fwd", d, dt, c): t for dt in _F16 for c in (False, True) for d, t in (
        (64, Tile(128, 64, 4, 2)), (128, Tile(128, 32, 8, 2)), (256, Tile(64, 32, 8, 1)))},
    # sm90 (H100/H200: when the cute backend cannot serve, for every backward, or with
    # backend="triton"). hdim 64/128: `python -m benchmarks.triton_tune --dims 128 64 --dtypes bf16
    # --causal false` on an H200, 2026-11-22 (commit after c4995eb); the same tile is used for
    # fp16 and causal, which were not tuned. hdim 16/32/256: unmeasured seeds. bwd_dkdv and
    # bwd_dq were tuned as the default backward; they now serve only deterministic=True.
    # "bwd" (the default backward since it went atomic): unmeasured seeds, picked offline by
    # `ptxas -v` on the sm_90a PTX, first without the launcher's alignment specialization
    # (which made every tile spill: an artifact). Specialized as a real launch
    # (`python -m benchmarks.triton_spills`, NOTES.md): hdim 64 (64, 128, 8 warps) 238
    # registers, no spills, 128 keys halve the dQ atomics per FLOP against 64; hdim 128
    # (32, 64, 8 warps) 210 registers, no spills (32x128 w8: 252, no spills).
    **{("sm90", "fwd", d, dt, c): t for dt in _F16 for c in (False, True) for d, t in (
        (16, Tile(128, 64, 4, 3)), (32, Tile(128, 64, 4, 3)), (64, Tile(128, 64, 8, 3)),
        (128, Tile(128, 128, 8, 3)), (256, Tile(64, 64, 8, 2)))},
    **{("sm90", "bwd", d, dt, c): t for dt in _F16 for c in (False, True) for d, t in (
        (16, Tile(64, 128, 8, 2)), (32, Tile(64, 128, 8, 2)), (64, Tile(64, 128, 8, 2)),
        (128, Tile(32, 64, 8, 2)), (256, Tile(16, 64, 8, 1)))},
    # hdim64 "bwd" unmasked: autotuned on the H200 (`benchmarks.triton_tune --dims 64 --dtypes bf16
    # --causal false`): 64x64 w4 s3, 328 TFLOP/s at batch 4 x 16 heads x 4k (ptxas: 244 registers,
    # no spills; with the causal mask it spills 80 B, so masked keeps 64x128). Checked in CI through
    # the interpreter (test_sm90_table_tiles_in_interpreter) and in the GPU tests.
    **{("sm90", "bwd", 64, dt, False): Tile(64, 64, 4, 3) for dt in _F16},
    # hdim64 "bwd" masked (causal): 64x128 w8 with 3 stages instead of 2 (autotuned at 2k, then
    # H200, bf16, 32 heads x 16k tokens, same run as FA2 221 / 263 / 279 TFLOP/s at 2k / 8k / 16k:
    # s2 216 / 268 / 284, s3 237 / 299 / 317, 64x64 w4 s3 220 / 262 / 274).
    **{("sm90", "bwd", 64, dt, True): Tile(64, 128, 8, 3) for dt in _F16},
    **{("sm90", "bwd_dkdv", d, dt, c): t for dt in _F16 for c in (False, True) for d, t in (
        (16, Tile(32, 128, 8, 2)), (32, Tile(32, 128, 8, 2)), (64, Tile(64, 64, 4, 2)),
        (128, Tile(32, 64, 4, 2)), (256, Tile(32, 64, 8, 1)))},
    **{("sm90", "bwd_dq", d, dt, c): t for dt in _F16 for c in (False, True) for d, t in (
        (16, Tile(128, 32, 8, 2)), (32, Tile(128, 32, 8, 2)), (64, Tile(128, 64, 8, 2)),
        (128, Tile(64, 64, 4, 2)), (256, Tile(64, 32, 8, 1)))},
}


# Launches with at most SHORT_SEQLEN query rows per sequence, where smaller tiles fill the GPU
# better. H200, bf16, causal forward, hdim 128, 16 heads x 16k tokens (FA2 = SDPA flash in the
# same run: 287 / 318 / 317 TFLOP/s at 2k / 8k / 16k): 128x128 w8 s3 333 / 431 / 475,
# 64x64 w4 s3 357 / 420 / 422, 128x64 w8 s3 345 / 426 / 459 (64x64 w4 s3 also the autotuner's
# pick at 2k).
SHORT_SEQLEN = 2048
TUNED_SHORT: dict[tuple, Tile] = {
    **{("sm90", "fwd", 128, dt, True): Tile(64, 64, 4, 3) for dt in _F16},
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def gpu_family(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=None)
def smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return optin
    major, minor = props.major, props.minor
    return {(8, 0): 163 * 1024, (9, 0): 227 * 1024}.get((major, minor), 99 * 1024)


def pick(kernel: str, device: torch.device, headdim_padded: int, dtype: torch.dtype,
         masked: bool, rows_q: int | None = None) -> Tile | None:
    """`rows_q`: the launch's query rows per sequence (max_seqlen_q); up to SHORT_SEQLEN a
    `TUNED_SHORT` entry wins over `TUNED`."""
    if interpreting():
        return INTERPRET_TILE
    key = (gpu_family(device.index or 0), kernel, headdim_padded, str(dtype).split(".")[-1], masked)
    if rows_q is not None and rows_q <= SHORT_SEQLEN and key in TUNED_SHORT:
        return TUNED_SHORT[key]
    return TUNED.get(key)


def candidates(kernel: str) -> list[Tile]:
    if kernel == "fwd":
        return [Tile(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)
                for s in (1, 2, 3)]
    if kernel == "bwd":  # as bwd_dkdv; bigger key tiles amortize the dQ atomics
        return [Tile(bm, bn, w, s) for bm in (16, 32, 64, 128) for bn in (64, 128)
                for w in (4, 8) for s in (1, 2, 3)]
    if kernel == "bwd_dkdv":  # BLOCK_N is the resident key tile, BLOCK_M streams queries
        return [Tile(bm, bn, w, s) for bm in (16, 32, 64) for bn in (64, 128) for w in (4, 8)
                for s in (1, 2)]
    return [Tile(bm, bn, w, s) for bm in (64, 128) for bn in (16, 32, 64) for w in (4, 8)
            for s in (1, 2)]


def fits(kernel: str, t: Tile, d: int, dv: int, elem: int, smem: int) -> bool:
    """Shared memory of the resident tile plus (num_stages - 1) pipelined copies of the
    streamed tiles (an upper bound: `python -m benchmarks.triton_compile_only` shows what triton
    really allocates), and fp32 accumulators per thread. Over-estimates only cost tuning
    time: the autotuner also skips configs that fail to compile for lack of resources."""
    copies = max(t.num_stages - 1, 1)
    if kernel == "fwd":
        tiles = t.block_m * d + copies * t.block_n * (d + dv)
        acc = t.block_m * (dv + t.block_n)
    elif kernel in ("bwd", "bwd_dkdv"):
        tiles = t.block_n * (d + dv) + copies * t.block_m * (d + dv)
        acc = t.block_n * (d + dv + 2 * t.block_m)
        if kernel == "bwd":  # the dQ tile before its atomic add
            acc += t.block_m * d
    else:
        tiles = t.block_m * (d + dv) + copies * t.block_n * (d + dv)
        acc = t.block_m * (d + 2 * t.block_n)
    return tiles * elem <= smem and acc <= 160 * 32 * t.num_warps


def prune(kernel: str):
    """early_config_prune hook: drop tiles that overflow shared memory or registers."""

    def hook(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        d, dv = args["BLOCK_D"], args["BLOCK_DV"]
        q = args["Q"]
        elem = q.element_size()
        smem = smem_limit(q.device.index or 0)
        kept = [c for c in configs if fits(kernel, _tile(c), d, dv, elem, smem)]
        if q.dtype in (torch.float8_e4m3fn,):  # fp8 MMA needs K >= 32 for P @ V
            kept = [c for c in kept if c.kwargs["BLOCK_N"] >= 32]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return hook


def _tile(c: triton.Config) -> Tile:
    return Tile(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


AUTOTUNE_KEY = ["HEADDIM", "HEADDIM_V", "HAS_WL", "HAS_WR", "HAS_CHUNK", "SOFTCAP", "bucket_q", "bucket_k"]


def autotuned(kernel: str, fn):
    return triton.autotune(
        configs=[t.to_triton() for t in candidates(kernel)], key=AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": prune(kernel)},
        restore_value=["DQ_ACC"] if kernel == "bwd" else None,  # each trial adds into it
    )(fn)


def seqlen_bucket(n: int) -> int:
    return max(64, triton.next_power_of_2(max(n, 1)))
