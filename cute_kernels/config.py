"""Codegen configuration of the sm90 forward kernel: one frozen dataclass is the cache key."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace


REGS_PER_SM = 64 * 1024
THREADS_PER_WG = 128


@dataclass(frozen=True)
class TileConfig:
    tile_m: int  # rows of Q per CTA: 64 per consumer warpgroup (128: 2 MMA WGs, 192: 3)
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
    # Masking compares compile-time column offsets (thread 0's) against per-row limits shifted
    # by the thread's own offset (AttentionMask.apply). H200, causal 16k tokens, 2 rounds:
    # hdim256 8k 662 -> 666, 2k 479 -> 490; hdim128 8k 585 -> 587, 2k 432 -> 444 TFLOP/s.
    mask_thr0: bool = True
    # Overlapped schedule only: rescale O by the previous block's row factors while QK^T(n) is in
    # flight, before issuing PV(n-1), instead of after the softmax (flash-attn-4 does this for
    # hdim_v > 128, where the 2 x hdim_v/2 FMULs no longer hide behind the conversion of P).
    # FwdConfig.make: on for hdim_v > 128 (measured).
    rescale_o_before_pv: bool = False
    # Stage O in its own smem buffer when it fits next to Q, K and V (227 KB; not at hdim 256),
    # instead of reusing Q's: the consumers then release Q after their last QK^T, so the producer
    # loads the next persistent tile's Q under the last PV and the epilogue.
    separate_o: bool = True
    # Epilogue: each consumer warp stores its 16 rows of O from its smem slab by TMA (predicated
    # 16-byte stores only where a slab crosses the end of a packed / seqused sequence); off = the
    # predicated stores everywhere. Either way no barrier across warpgroups when O has its own
    # smem buffer. FwdConfig.make: on for non-causal / non-local (measured there).
    tma_store: bool = True
    # Causal/local single-tile grid: longest-first within L2 sections of (batch, head) pairs
    # (scheduler.py); off = sections of one pair (head-major, each head's m_blocks descending).
    # H200, causal, bf16, 64k tokens: on = hdim128 seqlen 512 250 / 1k 342 TFLOP/s, off 281 / 376
    # (hdim 64: +2-4% off); at 8k within noise (hdim128 583 -> 585, hdim256 651 -> 662 on). H100
    # SM cycles (NOTES.md, session 5): 32k tokens, hdim256 16k +5%, 512 / 1k +15..+38% on.
    lpt_l2_sections: bool = False
    # The longest-first order's final section: the last (batch, head) pairs whose tiles make about
    # this many waves on the SMs, longest first among them all (scheduler.py; 0 = none). H100 SM
    # cycles, causal, against 0: 16k tokens, 512 / 2k / 8k: hdim64 -1.5 / -2.4 / -3.6%, hdim128
    # -0.5 / -4.9 / -4.0%, hdim256 -3.5 / -7.8 / -7.7%; 32k tokens 1k-16k -0.1..-5.4%. 4 waves:
    # similar, but hdim256 512 +13%.
    lpt_tail_waves: int = 2
    # Persistent CTAs that take tiles from an atomic counter in the single-tile grid's order
    # (scheduler.py), so causal/local tiles are scheduled greedily longest-first and a tile's
    # prologue overlaps the previous tile's epilogue. Implies a persistent grid. FwdConfig.make
    # turns it on for causal/local (measured there).
    dynamic: bool = False
    # WGMMA smem descriptors built once before the KV loop (utils.pin_smem_desc) instead of
    # re-derived from the smem address at every GEMM: hdim128 interior loop 489 -> 463 SASS
    # instructions (flash-attn-4: 457). FwdConfig.make: on up to hdim 192, where Q's per-k-block
    # descriptors fit in registers; at hdim 256 it saves 3 instructions and measured -1..-5%
    # (H200, 64k tokens: 8k 719 -> 712, causal 642 -> 607). H200 at hdim 64/128: +1..+7%
    # (hdim64 causal 8k 449 -> 480, non-causal 2k 488 -> 502), the rest within noise.
    pin_desc: bool = True
    # Overlapped schedule: > 0 = the K release waits for P[0, k_release_gate - 1] (row 0 of the
    # thread's probabilities), 0 = it follows the QK^T wait. ptxas keeps the PV wait after the
    # K-release arrive and otherwise hoists it to right after the row max, where it stalls the
    # softmax (NOTES.md, session 5): the gate is the handle on where that wait lands.
    k_release_gate: int = 0
    # Q buffers (1 or 2; 2 where a second Q fits beside a separate sO, else 1). With two, the
    # producer loads the next tile's Q (and, for the dynamic scheduler, announces that tile)
    # while the consumers still run the current tile instead of after its last QK^T. ncu at 512
    # tokens, hdim128 (1 buffer): the consumers' wait for the next Q was 6% of stall samples
    # non-causal, 10% causal (8k: none). The Q stage index in a register costs a few
    # instructions per KV block: FwdConfig.make uses 2 for short problems only.
    q_stages: int = 1
    # O staged in smem this many column chunks at a time (1 or 2): each consumer warp stores its
    # 16-row slab chunk by chunk through a buffer hdim_v / o_chunks wide. With 2, a separate sO
    # fits beside Q and two K/V stages at hdim 256 with tile_n 64 (224 KB), so Q is released
    # after the last QK^T there too (instead of after the epilogue that stages O in sQ).
    o_chunks: int = 1
    # > 0: lazy O rescaling (softmax.OnlineSoftmax.lazy): a row keeps its reference max until the
    # running max exceeds it by more than this (log2 units), and a warp skips O's rescale (64
    # FMULs per KV block at hdim 128, 128 at hdim 256) when none of its rows moved.
    lazy_rescale: float = 0.0
    # Plain schedule (no intra-WG overlap): on a tile's first KV block, a consumer warpgroup none
    # of whose rows keeps a key in the block's second half (causal diagonal: the first 64 rows of
    # a 128x128 tile see keys 0-63 of it; or the block ends past seqlen_k) computes QK^T over the
    # first tile_n / 2 keys only: an N = tile_n / 2 WGMMA into its own accumulator, masks and
    # softmax over those columns, the first half of P and of PV's k-blocks.
    diag_half: bool = False
    # Plain schedule: a block's PV is left in flight and waited for after the next block's QK^T is
    # issued (one wait for both; the V stage is released then), so the tensor core gets that QK^T
    # right behind the PV and the other warpgroup's turn comes as soon as both are issued, instead
    # of waiting for PV, then issuing QK^T.
    chain_pv_qk: bool = False

    def __post_init__(self):
        assert self.tile_m in (128, 192), "tile_m = 64 x (2 or 3 consumer warpgroups)"
        # setmaxnreg moves registers between warpgroups; the total must fit the SM's 64K
        # (one CTA per SM): 24 + 2 x 240 at 384 threads, 24 + 3 x 160 at 512 threads.
        total = THREADS_PER_WG * (self.producer_regs + self.num_mma_wg * self.consumer_regs)
        assert total <= REGS_PER_SM, f"{self}: {total} registers > {REGS_PER_SM}"
        assert self.producer_regs % 8 == 0 and self.consumer_regs % 8 == 0, "setmaxnreg: multiples of 8"
        assert self.q_stages in (1, 2), f"q_stages {self.q_stages}: 1 or 2"
        assert not self.diag_half or (halves_into_k_blocks(self.tile_n) and not self.intra_wg_overlap), \
            f"{self}: diag_half needs the plain schedule and tile_n / 2 in whole 16-key k-blocks"
        assert not (self.chain_pv_qk and self.intra_wg_overlap), f"{self}: chain_pv_qk needs the plain schedule"

    @property
    def num_mma_wg(self) -> int:
        return self.tile_m // 64

    @property
    def num_threads(self) -> int:
        return THREADS_PER_WG * (self.num_mma_wg + 1)


def halves_into_k_blocks(tile_n: int) -> bool:
    """Whether a KV block's first tile_n / 2 keys are whole 16-key WGMMA k-blocks (diag_half)."""
    return tile_n % 32 == 0


# setmaxnreg split per consumer warpgroup count (producer, consumer): FA3 uses 24/240 for two
# and 32/160 for three; 24/160 leaves 1K registers of the 64K unused.
REG_SPLIT = {2: (24, 240), 3: (24, 160)}


def tile_variant(base: TileConfig, tile_m: int, tile_n: int, num_stages: int | None = None,
                 **fields) -> TileConfig:
    """`base` with another tile shape; the register split follows the consumer WG count, and
    diag_half is kept only where tile_n / 2 is a whole number of 16-key k-blocks."""
    if tile_m % 64 or tile_m // 64 not in REG_SPLIT:
        raise ValueError(f"tile_m must be one of {[64 * w for w in REG_SPLIT]} (64 rows per consumer "
                         f"warpgroup), got {tile_m}")
    producer_regs, consumer_regs = REG_SPLIT[tile_m // 64]
    fields.setdefault("diag_half", base.diag_half and halves_into_k_blocks(tile_n))
    return replace(base, tile_m=tile_m, tile_n=tile_n, num_stages=num_stages or base.num_stages,
                   producer_regs=producer_regs, consumer_regs=consumer_regs, **fields)


def tile_from_spec(base: TileConfig, spec: str = "", sets=()) -> TileConfig:
    """`base` changed as the command-line tools spell it: `spec` "MxN[sS][+field|+field=value...]"
    (tile shape, pipeline stages, boolean fields switched on or fields set) and `sets`
    "field=value" strings (0|1 for booleans)."""
    tile, sets = base, list(sets)
    if spec:
        shape, *flags = spec.split("+")
        mn, _, stages = shape.partition("s")
        m, n = map(int, mn.split("x"))
        sets += [f for f in flags if "=" in f]
        tile = tile_variant(tile, m, n, int(stages) if stages else None,
                            **{f: True for f in flags if "=" not in f})
    return replace(tile, **dict(_field_value(tile, kv) for kv in sets))


def _field_value(tile: TileConfig, setting: str) -> tuple:
    """"field=value" -> (field, value typed as the field's current value: bool from 0/1)."""
    field, _, value = setting.partition("=")
    current = getattr(tile, field)
    return field, bool(int(value)) if isinstance(current, bool) else type(current)(value)


# Per kernel head dim (other multiples of 8 run the next one up: padded_hdim).
# Chosen by smem/register budget (sQ + stages*(sK + sV) <= 227 KB, acc_O + acc_S fit in 240
# regs, no spills in SASS) and measured as each entry says (cute_kernels/NOTES.md, results/).
TILES: dict[int, TileConfig] = {
    # hdim64: FA3's 192x128 with 3 consumer WGs (24/160 registers) + mask_thr0 (spill-free causal):
    # H200, 16k tokens, same run as flash-attn-4 (NOTES.md, 2026-11-22 session 2): 8k 447 -> 550
    # (FA4 536), causal 419 -> 493 (FA4 496); 2k 398 -> 465, causal 330 -> 362. 128x176 / 128x192
    # were slower than 128x128 (8k 426 / 438 vs 450), 3 stages within noise.
    64: TileConfig(192, 128, 2, 24, 160),
    # hdim96 (and 65-88, padded to it): FA3's 3-consumer-WG tile at tile_n 112. H200 SM cycles
    # (`cute_kernels.cycles`, 16k tokens, session 12), 2k / 8k non-causal, causal: 128x128 (the
    # untuned entry before) 0.864 / 3.265, 0.483 / 1.649; 192x112 0.741 / 2.723, 0.480 / 1.438;
    # 192x96 0.752 / 2.782, 0.466 / 1.440; 128x{144,160,176}s2 0.867-0.888 / 3.176-3.253,
    # 0.506-0.519 / 1.647-1.715; flash-attn-4 0.800 / 2.700, 0.506 / 1.462; cuDNN 0.942 / 3.594,
    # 0.597 / 2.072.
    96: TileConfig(192, 112, 2, 24, 160),
    # hdim128: 128x176 slower (8k 591 vs 632; causal 348 vs 571), 128x192 spills (CPU SASS).
    128: TileConfig(128, 128, 2, 24, 240),  # measured 673 TFLOP/s at 8k (cuDNN 664)
    # hdim192 (smem: 48K + 2*(36K+36K) = 192 KB; sO in sQ): 128x96 with make's lazy_rescale. H200
    # SM cycles, 16k tokens, hdim_v 192, against 128x112 (no lazy): 2k 0.607 -> 0.602, causal
    # 0.373 -> 0.360; 8k 2.131 -> 2.109, causal 1.107 -> 1.092 (128x96 without lazy rescaling
    # +0.3..+2%; 128x112 with it -0.2..-0.7%). hdim_v 128 (192x128) takes it too, unmeasured.
    192: TileConfig(128, 96, 2, 24, 240),
    # hdim256: 128x64 with O staged in two column chunks (o_chunks=2), so sO has its own 32 KB
    # beside Q and two K/V stages (64K + 2*(32K+32K) + 32K = 224 KB) and Q is freed after the
    # last QK^T; with FwdConfig.make's lazy_rescale. H200 SM cycles (`cute_kernels.cycles`, 16k
    # tokens, session 9), against 128x80 (one O chunk in sQ; 128x96 spills and overflows smem):
    # non-causal 512 / 1k / 4k / 8k / 16k 0.218 -> 0.183 / 0.352 -> 0.316 / 1.163 -> 1.116 /
    # 2.226 -> 2.189 / 4.351 -> 4.339 Mcycles; causal 512 / 1k / 2k / 4k / 8k / 16k 0.174 -> 0.144
    # / 0.238 -> 0.205 / 0.372 -> 0.334 / 0.626 -> 0.598 / 1.158 -> 1.124 / 2.179 -> 2.153
    # (cuDNN 512: 0.217 / 0.164; flash-attn-4 8k causal 1.152, 16k 4.361 / 2.188). Without lazy
    # rescaling 128x64 + o_chunks=2 wins to 2k (causal 2k 0.347) but loses from 8k (16k 4.432).
    256: TileConfig(128, 64, 2, 24, 240, o_chunks=2),
}

# Candidates (CPU SASS: no spills, 24/160 registers; GPU tests pass): FA3's 3-consumer-WG tiles
# not yet measured against the table. mask_thr0 is what keeps the causal 3-WG kernel spill-free
# (3 STL/LDL without it). hdim 128 at 192 x {128, 112, 96, 80} spills at 160 registers (71/45/17/3
# STL): acc_O alone is 64 of them, so it needs P in smem (SS PV), not implemented.
CANDIDATES: dict[int, list[TileConfig]] = {
    96: [TileConfig(192, 96, 2, *REG_SPLIT[3])],  # 3% ahead of 192x112 at causal 2k only; 192x128 spills (30 STL)
}

# Short problems: few KV blocks per tile, where a tile's prologue and epilogue weigh more and the
# 192-row tile's padding (3 tiles cover 512 rows with 576) and fewer, longer tiles cost more than
# 3 WGs gain. Short = causal / right-windowed with max_seqlen_q <= SHORT_CAUSAL_SEQLEN, or not
# right-windowed with max_seqlen_k <= SHORT_SEQLEN_K (see `is_short`).
# Causal: H200, bf16, 64k tokens: hdim64 512 170 -> 180, 1k 239 -> 258 TFLOP/s with 128x128 (2k:
# 192x128 wins, 362 vs 330; hdim 64 / 128 at tile_n 64 or 96 were 7-20% slower, H100 SM cycles).
# Non-causal: hdim64 keeps 192x128 with two Q buffers (H200, SM cycles, 16k tokens, 512: 0.323 with
# 128x128 -> 0.292 / 0.295 (two runs; cuDNN 0.307); one Q buffer 0.328). hdim256's table tile is
# its short tile too (until session 9 128x64 was, beside 128x80 in the table).
# Keyed by (hdim, has_right).
SHORT_CAUSAL_SEQLEN = 1024
SHORT_SEQLEN_K = 512
# hdim96 (and 65-88): 128x128 for short problems, causal or not. H200 SM cycles, 16k tokens, session
# 12, 192x112 (table) -> 128x128: causal 512 0.243 -> 0.197, 1k 0.352 -> 0.291 (cuDNN 0.218 / 0.345);
# non-causal 512 0.260 -> 0.248 (cuDNN 0.280); 192x96 in between.
_TWO_WG_128 = TileConfig(128, 128, 2, *REG_SPLIT[2])
SHORT_TILES: dict[tuple[int, bool], TileConfig] = {(64, True): _TWO_WG_128, (96, True): _TWO_WG_128,
                                                   (96, False): _TWO_WG_128}
# Not right-windowed with at most this many keys: `medium` (two Q buffers at hdim 64, see make).
MEDIUM_SEQLEN_K = 2048


def pack_gqa_factor(group: int, max_seqlen_q: int, tile_m: int) -> int:
    """Query heads per KV head to pack into the M tile (1: none): the group when that fills the
    tiles' rows better by more than 10%: few query positions (decoding, short chunks), where an
    unpacked tile of tile_m rows holds max_seqlen_q of them and each query head reads all of its
    KV head's keys again."""
    fill = lambda rows: rows / (-(-rows // tile_m) * tile_m)
    return group if group > 1 and max_seqlen_q > 0 and fill(max_seqlen_q * group) > 1.1 * fill(max_seqlen_q) else 1


# Split-KV's cost of a tile beyond its KV blocks (Q load, pipeline fill, epilogue), in KV blocks,
# and the fewest KV blocks a tile must have to be split (below, the combine's launches outweigh
# the gain): guesses until measured.
SPLIT_TILE_OVERHEAD_BLOCKS = 2
SPLIT_MIN_BLOCKS = 32


@functools.lru_cache(maxsize=4096)  # runs on every call (twice): a pure function of four ints
def num_splits_for(tiles: int, n_blocks: int, num_sms: int, max_splits: int = 64) -> int:
    """KV splits (split-KV) for a grid of `tiles` tiles of up to `n_blocks` KV blocks each on
    `num_sms` SMs: 1 while the tiles fill 80% of one wave or have fewer than SPLIT_MIN_BLOCKS
    blocks; else the count that
    minimizes waves * (blocks per split + SPLIT_TILE_OVERHEAD_BLOCKS), with at least 2 blocks a
    split: the smallest count within 5% of the best, since each split adds to the combine
    (decoding, 4 (batch, KV head) tiles of 64 blocks on 132 SMs: 32 splits)."""
    if tiles <= 0 or tiles * 5 >= num_sms * 4 or n_blocks < SPLIT_MIN_BLOCKS:
        return 1
    counts = range(1, min(max_splits, n_blocks // 2) + 1)
    cost = {s: -(-tiles * s // num_sms) * (-(-n_blocks // s) + SPLIT_TILE_OVERHEAD_BLOCKS) for s in counts}
    best = min(cost.values())
    return next(s for s in counts if cost[s] <= best * 1.05)


def is_short(has_right: bool, max_seqlen_q: int, max_seqlen_k: int) -> bool:
    """Whether a problem takes SHORT_TILES: few KV blocks per query tile."""
    return max_seqlen_q <= SHORT_CAUSAL_SEQLEN if has_right else max_seqlen_k <= SHORT_SEQLEN_K


def is_medium(has_right: bool, max_seqlen_k: int) -> bool:
    """Not right-windowed with at most MEDIUM_SEQLEN_K keys (short ones included)."""
    return not has_right and max_seqlen_k <= MEDIUM_SEQLEN_K


SUPPORTED_HDIM = tuple(TILES)
# (hdim, hdim_v) pairs served: hdim_v == hdim, plus FA3's 192x128 (DeepSeek-style).
SUPPORTED_HDIM_PAIRS = {(d, d) for d in SUPPORTED_HDIM} | {(192, 128)}
_SUPPORTED_HDIM_ASCENDING = tuple(sorted(SUPPORTED_HDIM))  # padded_hdim runs on every call


def padded_hdim(d: int) -> int | None:
    """The kernel head dim that serves tensors of head dim `d` (a multiple of 8 up to 256): the
    smallest in SUPPORTED_HDIM >= d, as FA3 rounds up. Its TMA loads read zeros past `d` (a zero
    column adds nothing to QK^T and gives O a zero column), its stores stop at `d`. None: none."""
    if d % 8 or d <= 0:
        return None
    return next((h for h in _SUPPORTED_HDIM_ASCENDING if h >= d), None)


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
    # > 1: GQA packing. The caller lays the query heads of one KV head out as rows of one
    # sequence (row = position * pack_gqa + head within the group: `pack_rows`), so a tile of
    # tile_m rows holds tile_m / pack_gqa positions of every head of the group and K/V are read
    # once per KV head; the masks map a row to its position (mask.AttentionMask).
    pack_gqa: int = 1
    # Split-KV (flash-decoding): a tile's KV blocks are split into `num_splits` (a launch argument)
    # runs, each a tile of its own; each writes its O (normalized by its own row sums) in float32
    # and its LSE to partial tensors with the splits folded into the batch (or packed-rows) index,
    # which the host combines (cute_kernels.combine). For grids under one wave.
    split_kv: bool = False
    # The tensors' head dims where they are below the tile's (hdim / hdimv, see padded_hdim);
    # 0: equal. The kernel is compiled for them (static shapes in the last mode).
    hdim_in: int = 0
    hdimv_in: int = 0

    @staticmethod
    def make(dtype: str, hdim: int, hdimv: int | None = None, short: bool = False,
             medium: bool = False, **features) -> "FwdConfig":
        """`short`: few KV blocks per tile (`is_short`), which picks SHORT_TILES where there is one.
        `medium`: `is_medium`."""
        hdimv = hdim if hdimv is None else hdimv
        # Persistent CTAs for non-causal / non-local only (NOTES.md, H200 bf16 hdim128: 506 -> 554
        # TFLOP/s at seqlen 1024 non-causal, equal at 8k; causal 584 -> 534 at 8k with the static
        # longest-first stride, so causal/local keep the single-tile longest-first grid).
        windowed = features.get("has_left", False) or features.get("has_right", False)
        has_right = features.get("has_right", False)
        base = SHORT_TILES.get((hdim, has_right), TILES[hdim]) if short else TILES[hdim]
        # Causal/local: the dynamic scheduler (atomic tile counter, longest first). H200, bf16, 64k
        # tokens, 2 rounds, against the single-tile grid: hdim128 512 274 -> 352, 1k 381 -> 456,
        # 2k 465 -> 524, 8k 506 -> 583; hdim64 512 187 -> 244, 2k 369 -> 400, 8k 484 -> 480;
        # hdim256 512 314 -> 323, 8k 575 -> 627 TFLOP/s.
        # Not for the 3-WG tile (160 registers) with a left window edge: that spills 80 bytes.
        dynamic = windowed and not (base.num_mma_wg == 3 and features.get("has_left", False))
        # Rescale O under QK^T, before PV: hdim_v > 128 (H200, 16k tokens, bf16, same run as
        # flash-attn-4: hdim256 8k 706 -> 763 non-causal, 643 -> 661 causal; 2k 622 -> 664).
        # At hdim 128 it was -0.7..-1.3% non-causal with the PV wait hoisted, but off with the
        # gate below is better (H100 SM cycles, 16k tokens; causal +3%, hdim64 +1..+2%: off).
        rescale = hdimv > 128
        # The K release gated on one probability (TileConfig.k_release_gate), which keeps ptxas's PV
        # wait after ~10-14 exp2s instead of right after the row max. H100 SM cycles, 16k tokens,
        # non-causal: hdim64 (3 WGs, P[0, 3]) 2k / 8k -1.8 / -2.4%; hdim128 (P[0, 1], with the O
        # rescale after the softmax) 2k / 8k / 16k -4.0 / -4.6 / -4.7% against the rescale before PV
        # without the gate (either change alone: +0..+3%). Causal: hdim128 2k / 8k -0.3 / -0.9%,
        # hdim64 within 0.3%. hdim256 (rescale before PV kept: +5..+7% without it): within 0.3%.
        # (hdim64's short 2-WG tile was measured with gate 4 too.)
        gate = 2 if hdim == 128 else 4 if hdim == 64 and not windowed else 0
        # Two Q buffers (TileConfig.q_stages) for short problems, where the next tile's Q wait is
        # a fair share of each tile; hdim <= 128 (a second Q and a separate sO fit in smem). H200,
        # SM cycles, 16k tokens, two runs, 512 tokens: hdim64 non-causal -2.7 / -1.2%, causal
        # -2.3 / -2.3% (1k equal); hdim128 non-causal -2.4 / 0%, causal 0 / +0.6%, 1k +2%: not for
        # windowed hdim > 64. Not for long problems: 8k hdim128 +2.4 / +3.6% (causal), hdim64 +1 / 0%.
        # hdim64 non-causal (192x128, Q descriptors pinned per tile, H200 SM cycles, 16k tokens):
        # 1k -5.9 / -5.9% (two runs), 2k -2.5%, 4k -0.6%, 8k +0.8%: on up to MEDIUM_SEQLEN_K keys.
        q_stages = 2 if hdim <= 128 and (short and (hdim <= 64 or not windowed)
                                          or medium and hdim == 64) else 1
        # Short causal hdim64 (1-4 KV blocks of 128 per tile): no intra-WG overlap, O by TMA store.
        # H200 SM cycles, 16k tokens, 512 / 1k: 0.249 -> 0.231 / 0.381 -> 0.358 Mcycles (cuDNN 0.229
        # / 0.359); overlap off alone -3 / -2%, TMA store alone -1.6 / -1.5%. With diag_half (session
        # 13): 0.231 -> 0.227 / 0.361 -> 0.358 (cuDNN 0.229 / 0.359; results/2026-12-02_h200_751a43e).
        # (At hdim 96 / 128 its first version, the GEMMs halved but not the softmax, took 3-4% off
        # the plain schedule; the overlapped schedule was faster still there.)
        # chain_pv_qk (session 14, H200 SM cycles, 16k tokens, results/2026-12-02_h200_11e42f8): hdim64
        # 512 / 1k 0.228 -> 0.217 / 0.359 -> 0.332 (cuDNN 0.229 / 0.361); hdim96 (with diag_half, O
        # by predicated stores as before) 0.195 -> 0.189 / 0.290 -> 0.279, where the plain schedule
        # now beats the overlapped one. Not hdim 128 (512: 0.163 -> 0.184 without diag_half), nor
        # hdim64 at 2k+ (128x128 plain 0.598 vs 192x128 0.596 at 2k, 1.072 vs 1.015 at 4k), nor
        # elsewhere (the plain schedule with it against the table's overlapped one, 512-8k, causal
        # or not: hdim64 +1..+5%, hdim128 +2..+13%, hdim256 +0.4..+9%).
        plain = short and has_right and hdim in (64, 96)
        # O by TMA store for non-causal / non-local (and hdim64's `plain`); causal / local keep the
        # predicated stores (H100 SM cycles, 32k tokens, 1k / 4k / 16k: hdim128 causal TMA +2.6 /
        # +4.9 / +6.6%; non-causal TMA -1.3 / -0.5 / -0.8%; hdim64 -0.4..-1.3%; hdim256 within 0.3%).
        # (Split-KV writes its float32 partial O from registers: no TMA store.)
        tma_store = (not windowed or plain and hdim == 64) and not features.get("split_kv", False)
        # Lazy O rescaling (TileConfig.lazy_rescale, threshold 2^8) at hdim_v 192 / 256 (with their
        # 128x96 / 128x64 tiles: see TILES) and hdim64 windowed. H200 SM cycles, 16k tokens: hdim64
        # causal 2k / 8k / 16k -1.7 / -1.4 / -1.7% (wall, 3 rounds: 8k / 16k +2.4 / +2.0% TFLOP/s;
        # 512 / 1k equal); hdim64 non-causal +2..+3%, hdim128 +0.3..+1.6%: off there.
        lazy = 8.0 if hdimv > 128 or hdim == 64 and windowed else 0.0
        tile = replace(base, persistent=not windowed, dynamic=dynamic, rescale_o_before_pv=rescale,
                       pin_desc=hdim <= 192, tma_store=tma_store, k_release_gate=gate,
                       q_stages=q_stages, intra_wg_overlap=not plain, lazy_rescale=lazy, diag_half=plain,
                       chain_pv_qk=plain)
        overrides = {k: features.pop(k) for k in list(features) if k in TileConfig.__dataclass_fields__}
        return FwdConfig(dtype, hdim, hdimv, replace(tile, **overrides), **features)

    @property
    def causal(self) -> bool:
        return self.has_right and not self.has_left

    def short(self) -> str:
        flags = [n for n in ("has_left", "has_right", "softcap", "cu_seqlens_q", "cu_seqlens_k",
                             "seqused_q", "seqused_k") if getattr(self, n)]
        flags += [f"pack_gqa={self.pack_gqa}"] if self.pack_gqa > 1 else []
        flags += ["split_kv"] if self.split_kv else []
        flags += [f"tensors_d{self.hdim_in or self.hdim}x{self.hdimv_in or self.hdimv}"] if self.hdim_in or self.hdimv_in else []
        t = self.tile
        return (f"{self.dtype} d{self.hdim}x{self.hdimv} tile{t.tile_m}x{t.tile_n}s{t.num_stages}"
                f"{' ol' if t.intra_wg_overlap else ''}{' pp' if t.pingpong else ''}"
                f"{' persistent' if t.persistent else ''}{' mask_thr0' if t.mask_thr0 else ''}"
                f"{' rescale_o_before_pv' if t.rescale_o_before_pv else ''}{' dynamic' if t.dynamic else ''}"
                f"{' lpt_l2_sections' if t.lpt_l2_sections else ''}{' tma_store' if t.tma_store else ''}"
                f"{f' k_release_gate={t.k_release_gate}' if t.k_release_gate else ''}"
                f"{f' q_stages={t.q_stages}' if t.q_stages > 1 else ''}{' diag_half' if t.diag_half else ''}{' chain_pv_qk' if t.chain_pv_qk else ''}"
                f"{f' lpt_tail_waves={t.lpt_tail_waves}' if self.has_right and t.lpt_tail_waves else ''}"
                f" {' '.join(flags)}")
