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


# Per head dim (exact: other head dims are refused by why_not, not padded).
# Chosen by smem/register budget (sQ + stages*(sK + sV) <= 227 KB, acc_O + acc_S fit in 240
# regs, no spills in SASS). "measured" = cute_kernels/NOTES.md (H200, 16k tokens, bf16): at or
# above SDPA there, but no alternative tile was swept yet, so none of these is tuned.
TILES: dict[int, TileConfig] = {
    64: TileConfig(128, 128, 2, 24, 240),  # measured 463 TFLOP/s (SDPA 463); FA3 uses 192x128
    96: TileConfig(128, 128, 2, 24, 240),  # untuned
    128: TileConfig(128, 128, 2, 24, 240),  # measured 621 TFLOP/s (SDPA 612)
    192: TileConfig(128, 112, 2, 24, 240),  # untuned (smem: 48K + 2*(42K+42K) = 216 KB)
    256: TileConfig(128, 80, 2, 24, 240),  # measured 746 TFLOP/s (SDPA 675) (smem: 64K + 2*(40K+40K) = 224 KB)
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
