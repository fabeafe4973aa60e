"""Codegen configuration of the sm90 forward kernel: one frozen dataclass is the cache key."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TileConfig:
    tile_m: int  # rows of Q per CTA: 64 per consumer warpgroup
    tile_n: int  # keys per KV block
    num_stages: int  # K/V smem pipeline depth
    producer_regs: int  # setmaxnreg for the TMA warpgroup
    consumer_regs: int  # setmaxnreg for each MMA warpgroup
    intra_wg_overlap: bool = True  # issue QK^T(n) before softmax(n-1)'s PV
    pingpong: bool = True  # named-barrier scheduling between the two MMA warpgroups
    persistent: bool = False  # persistent CTAs over a static / longest-first tile order
    # Producer order K(n-1) before V(n) (FA3), else K(n), V(n). NOTES.md, H200 2025 session run 2:
    # non-causal hdim128 8k 619 -> 673, hdim256 4k 640 -> 701 TFLOP/s; causal and hdim64 equal.
    v_lags_k: bool = True


# Per head dim (exact: other head dims are refused by why_not, not padded).
# Chosen by smem/register budget (sQ + stages*(sK + sV) <= 227 KB, acc_O + acc_S fit in 240
# regs, no spills in SASS). "measured" = cute_kernels/NOTES.md (H200, 16k tokens, bf16, tile
# sweep of the 2025 session run 1 and v_lags_k run 2); hdim 96/192 not swept.
TILES: dict[int, TileConfig] = {
    # hdim64: 128x176 / 128x192 slower everywhere (8k 426 / 438 vs 450), 3 stages within noise
    # (NOTES.md "tile sweep", H200, commit c1b4459 + tvm-ffi). FA3's 192x128 (3 MMA WGs) untried.
    64: TileConfig(128, 128, 2, 24, 240),  # measured 457 TFLOP/s at 8k (cuDNN 468)
    96: TileConfig(128, 128, 2, 24, 240),  # untuned
    # hdim128: 128x176 slower (8k 591 vs 632; causal 348 vs 571), 128x192 spills (CPU SASS).
    128: TileConfig(128, 128, 2, 24, 240),  # measured 673 TFLOP/s at 8k (cuDNN 664)
    192: TileConfig(128, 112, 2, 24, 240),  # untuned (smem: 48K + 2*(42K+42K) = 216 KB)
    # hdim256: 128x64 faster at 512 (485 vs 442) but slower from 1k non-causal (8k 684 vs 736);
    # 128x96 spills and overflows smem. (smem: 64K + 2*(40K+40K) = 224 KB)
    256: TileConfig(128, 80, 2, 24, 240),  # measured 706 TFLOP/s at 8k (cuDNN 706)
}

SUPPORTED_HDIM = tuple(TILES)
# (hdim, hdim_v) pairs served: hdim_v == hdim, plus FA3's 192x128 (DeepSeek-style).
SUPPORTED_HDIM_PAIRS = {(d, d) for d in SUPPORTED_HDIM} | {(192, 128)}


@dataclass(frozen=True)
class FwdConfig:
    dtype: str  # "bf16" | "fp16"
    hdim: int
    hdimv: int
    tile: TileConfig
    has_left: bool = False  # window_left >= 0
    has_right: bool = False  # window_right >= 0 (causal stores 0)
    softcap: bool = False
    cu_seqlens_q: bool = False
    cu_seqlens_k: bool = False
    seqused_q: bool = False
    seqused_k: bool = False

    @staticmethod
    def make(dtype: str, hdim: int, hdimv: int | None = None, **features) -> "FwdConfig":
        hdimv = hdim if hdimv is None else hdimv
        # Persistent CTAs for non-causal / non-local only (NOTES.md, H200 bf16 hdim128: 506 -> 554
        # TFLOP/s at seqlen 1024 non-causal, equal at 8k; causal 584 -> 534 at 8k with the static
        # longest-first stride, so causal/local keep the single-tile longest-first grid).
        windowed = features.get("has_left", False) or features.get("has_right", False)
        tile = replace(TILES[hdim], persistent=not windowed)
        overrides = {k: features.pop(k) for k in list(features) if k in TileConfig.__dataclass_fields__}
        return FwdConfig(dtype, hdim, hdimv, replace(tile, **overrides), **features)

    @property
    def causal(self) -> bool:
        return self.has_right and not self.has_left

    def short(self) -> str:
        flags = [n for n in ("has_left", "has_right", "softcap", "cu_seqlens_q", "cu_seqlens_k",
                             "seqused_q", "seqused_k") if getattr(self, n)]
        t = self.tile
        return (f"{self.dtype} d{self.hdim}x{self.hdimv} tile{t.tile_m}x{t.tile_n}s{t.num_stages}"
                f"{' ol' if t.intra_wg_overlap else ''}{' pp' if t.pingpong else ''}"
                f"{' persistent' if t.persistent else ''} {' '.join(flags)}")
