"""Codegen configuration of the sm90 forward kernel: one frozen dataclass is the cache key."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Optional


REGS_PER_SM = 64 * 1024
THREADS_PER_WG = 128


def launch_regs(num_threads: int, ctas_per_sm: int = 1) -> int:
    """Registers per thread a CTA of `num_threads` starts with when `ctas_per_sm` of them share
    the SM (the launch's min blocks per SM): ptxas caps the kernel at the SM's 64K over their
    threads, in the 8-register steps of allocation, and a thread at 255 (counted here as 248, the
    step below; 384 threads: 168, 512: 128, two CTAs of 256: 128; the REG of `cuobjdump
    -res-usage` on the compiled kernels)."""
    return min(REGS_PER_SM // (num_threads * ctas_per_sm) // 8 * 8, 248)


def check_reg_split(producer: int, consumer: int, num_mma_wg: int, who: object, ctas_per_sm: int = 1) -> None:
    """setmaxnreg only moves registers inside the CTA's pool, which is what it launched with
    (launch_regs per thread), not the SM's 64K: a `setmaxnreg.inc` asking for more than the
    producer freed waits forever. 24 + 2 x 240 = 3 x 168 at 384 threads, 32 + 3 x 160 =
    4 x 128 at 512 (FA3's splits), 24 + 232 = 2 x 128 for one consumer warpgroup two CTAs an SM;
    32 + 2 x 240 = 512 > 504 hangs every consumer warpgroup."""
    assert producer % 8 == 0 and consumer % 8 == 0, f"{who}: setmaxnreg takes multiples of 8"
    per_thread = launch_regs(THREADS_PER_WG * (num_mma_wg + 1), ctas_per_sm)
    pool = (num_mma_wg + 1) * per_thread
    need = producer + num_mma_wg * consumer
    assert need <= pool, (f"{who}: setmaxnreg {producer} + {num_mma_wg} x {consumer} = {need} registers a thread "
                          f"of a warpgroup > the CTA's {pool} ({num_mma_wg + 1} x {per_thread} at launch): "
                          f"the consumers would wait forever")


@dataclass(frozen=True)
class TileConfig:
    """What the forward kernel's code depends on besides the problem's features. Every switch is
    one the default table (`FwdConfig.make`) sets both ways; the kernel's docstring says what
    each does, and cute_kernels/NOTES.md holds the measurements."""

    tile_m: int  # rows of Q per CTA: 64 per consumer warpgroup (128: 2 MMA WGs, 192: 3)
    tile_n: int  # keys per KV block
    num_stages: int  # K/V smem pipeline depth
    producer_regs: int  # setmaxnreg for the TMA warpgroup
    consumer_regs: int  # setmaxnreg for each MMA warpgroup
    intra_wg_overlap: bool = True  # issue QK^T(n) before softmax(n-1)'s PV; off: the plain schedule
    persistent: bool = False  # persistent CTAs over a static / longest-first tile order
    rescale_o_before_pv: bool = False  # overlapped schedule: rescale O under QK^T(n), before PV(n-1)
    tma_store: bool = True  # epilogue: each consumer warp stores its 16 rows of O by TMA
    dynamic: bool = False  # persistent CTAs take tiles from an atomic counter (scheduler.py)
    pin_desc: bool = True  # WGMMA smem descriptors built once before the KV loop (utils.pin_smem_desc)
    # Overlapped schedule: > 0 = the K release waits for P[0, k_release_gate - 1], which keeps
    # ptxas's PV wait after that many exp2s instead of right after the row max; 0 = no gate.
    k_release_gate: int = 0
    q_stages: int = 1  # Q buffers: 2 = the next tile's Q loads while this one runs (if it fits)
    o_chunks: int = 1  # O staged in smem in this many column chunks (2: sO fits beside Q at hdim 256)
    lazy_rescale: float = 0.0  # > 0: rescale O only when a row's max grew by more (log2 units)
    # Plain schedule: on the causal diagonal a warpgroup that keeps no key of the first block's
    # second half computes that block over its first tile_n / 2 keys only.
    diag_half: bool = False
    # Plain schedule: a block's PV is waited for after the next block's QK^T is issued.
    chain_pv_qk: bool = False
    # Consumer warpgroups that share each 64-row slab of Q, each holding 1 / o_split of O's
    # columns (and computing the slab's S and softmax alike): qv with hdim_v 512, whose O of 64
    # rows x 512 columns would be 256 registers a thread in one warpgroup. 2: tile_m 64.
    o_split: int = 1
    # CTAs an SM holds (the launch's min blocks per SM): 2 for DECODE_TILE, whose CTAs of one
    # consumer warpgroup take half the SM's shared memory and registers each, so that two tiles'
    # loads are in flight an SM (decoding: a few KV blocks a CTA, latency-bound).
    ctas_per_sm: int = 1
    # Overlapped schedule: > 0 = where the tile's first block (the last KV block) holds at most
    # this many keys of the sequence (a multiple of the PV GEMM's k), its QK^T and softmax run
    # over that many keys only, and P's other columns are zero: seqlen 2048 with 224-key blocks
    # ends in a block of 32 keys that otherwise costs a whole block's GEMM and exp2s.
    short_first: int = 0

    def __post_init__(self):
        assert self.tile_m in (64, 128, 192), "tile_m = 64 rows per consumer warpgroup (1, 2 or 3 of them)"
        assert self.ctas_per_sm in (1, 2) and (self.ctas_per_sm == 1 or self.num_mma_wg == 1), \
            "two CTAs an SM: one consumer warpgroup"
        check_reg_split(self.producer_regs, self.consumer_regs, self.num_mma_wg, self, self.ctas_per_sm)
        assert self.q_stages in (1, 2), f"q_stages {self.q_stages}: 1 or 2"
        assert not self.diag_half or (halves_into_k_blocks(self.tile_n) and not self.intra_wg_overlap), \
            f"{self}: diag_half needs the plain schedule and tile_n / 2 in whole 16-key k-blocks"
        assert not (self.chain_pv_qk and self.intra_wg_overlap), f"{self}: chain_pv_qk needs the plain schedule"
        assert not self.short_first or (self.intra_wg_overlap and 0 < self.short_first < self.tile_n
                                        and self.short_first % 16 == 0), \
            f"{self}: short_first needs the overlapped schedule and a multiple of 16 keys below tile_n"

    @property
    def num_mma_wg(self) -> int:
        return self.tile_m // 64 * self.o_split

    @property
    def num_threads(self) -> int:
        return THREADS_PER_WG * (self.num_mma_wg + 1)


def halves_into_k_blocks(tile_n: int) -> bool:
    """Whether a KV block's first tile_n / 2 keys are whole 16-key WGMMA k-blocks (diag_half)."""
    return tile_n % 32 == 0


# TileConfig.short_first of FP8's 224-key tile in the default table (FA3PY_CUTE_SHORT_FIRST=0:
# off, for A/B runs)
SHORT_FIRST_FP8 = int(os.environ.get("FA3PY_CUTE_SHORT_FIRST", "64"))
# The wider short_first where every sequence's last block holds 65-128 keys (224-key blocks: 1k /
# 8k keys); 64's kernel stays the default, faster where the last block holds at most 64 keys.
SHORT_FIRST_WIDE = 128


def short_first_width(tile: TileConfig, seqlen_k: int) -> int:
    """tile.short_first for a call whose sequences all hold seqlen_k keys (0: lengths vary, or
    unknown): SHORT_FIRST_WIDE where the last block's keys lie past tile.short_first and within
    it, else tile.short_first (a kernel with short_first on and no short block runs as without)."""
    tail = seqlen_k % tile.tile_n
    wide = tile.short_first and tile.short_first < tail <= SHORT_FIRST_WIDE < tile.tile_n
    return SHORT_FIRST_WIDE if wide else tile.short_first

# FwdConfig.fp8_vt_unroll up to this hdim_v: above it (hdim 256) a part's 16 address terms spill the
# producer's 24 registers, with or without the ldmatrix look-ahead (CPU SASS).
FP8_VT_UNROLL_MAX_HDIMV = 128

# setmaxnreg split per consumer warpgroup count (producer, consumer): FA3 uses 24/240 for two
# and 32/160 for three; 24/160 leaves 8 registers a thread of the pool unused (check_reg_split).
REG_SPLIT = {1: (24, 232), 2: (24, 240), 3: (24, 160)}
# The paged producer (page table row, last page, one page per lane) spills at 24 registers
# (3 STL, hdim 128 page 16 split pack_gqa=8, CPU SASS). With two consumer warpgroups they take
# 8 fewer (232: the paged consumers' highest register is R202, no spills); 240 beside 32 overdraws
# the pool and hangs (check_reg_split).
PAGED_REG_SPLIT = {1: (32, 224), 2: (32, 232), 3: (32, 160)}


def tile_variant(base: TileConfig, tile_m: int, tile_n: int, num_stages: int | None = None,
                 **fields) -> TileConfig:
    """`base` with another tile shape; the register split follows the consumer WG count, and
    diag_half is kept only where tile_n / 2 is a whole number of 16-key k-blocks."""
    if tile_m % 64 or tile_m // 64 * base.o_split not in REG_SPLIT:
        raise ValueError(f"tile_m must be one of {[64 * w for w in REG_SPLIT]} (64 rows per consumer "
                         f"warpgroup), got {tile_m}")
    producer_regs, consumer_regs = REG_SPLIT[tile_m // 64 * base.o_split]
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


# The tile per kernel head dim (others run the next one up: padded_hdim); each fits the smem and
# register budget without spills (CPU SASS) and won its measurement ("log §N": section N of the
# measurement log, `git show ff8d2aa:cute_kernels/NOTES.md`).
TILES: dict[int, TileConfig] = {
    64: TileConfig(192, 128, 2, 24, 160),  # FA3's 3 WGs: 8k 447 -> 550 TFLOP/s vs 128x128 (log §2)
    96: TileConfig(192, 112, 2, 24, 160),  # 8k 3.265 -> 2.723 Mcycles vs 128x128 (log §12)
    128: TileConfig(128, 128, 2, 24, 240),  # 8k 673 TFLOP/s; 128x176 591, 128x192 spills (log §Host overhead, tile sweep)
    192: TileConfig(128, 96, 2, 24, 240),  # with lazy rescale: -1..-3% vs 128x112 (log §9)
    256: TileConfig(128, 64, 2, 24, 240, o_chunks=2),  # sO beside Q: -16% at 512, -2% at 8k vs 128x80 (log §9)
}

# Not in the table: spill-free 3-WG tiles not yet measured against it.
CANDIDATES: dict[int, list[TileConfig]] = {
    96: [TileConfig(192, 96, 2, *REG_SPLIT[3])],  # 3% ahead of 192x112 at causal 2k only; 192x128 spills
}

# Decoding (`FwdConfig.make(decode=True)`: GQA-packed query rows of a tile <= 64, hdim and
# hdim_v <= 128, 16-bit, not qv): one consumer warpgroup of 64 rows on 64-key blocks, two CTAs an
# SM (80 KB of smem, 128 registers a thread at launch moved 24 / 232 by setmaxnreg). The 2-WG
# 128 x 128 tile computed 128 rows of which decoding fills 4-64 and held one CTA an SM: at batch 1
# (hdim 128, 32 / 8 heads, 4k keys) its kernel took 8.8 us against cuDNN's 6.4 (256 CTAs of 16-row
# tiles, two an SM; H100 profile, results/2026-12-06_h100_795064c).
DECODE_TILE = TileConfig(64, 64, 2, *REG_SPLIT[1], q_stages=1, ctas_per_sm=2)

# Short problems (`is_short`): few KV blocks per tile, where the 192-row tile's padding and fewer,
# longer tiles cost more than 3 WGs gain. Keyed by (hdim, has_right).
SHORT_CAUSAL_SEQLEN = 1024
SHORT_SEQLEN_K = 512
MEDIUM_SEQLEN_K = 2048  # `is_medium`: not right-windowed with at most this many keys
LONG_CAUSAL_SEQLEN = 4096  # `is_long_causal`: right-windowed with at least this many query rows
_TWO_WG_128 = TileConfig(128, 128, 2, *REG_SPLIT[2])
SHORT_TILES: dict[tuple[int, bool], TileConfig] = {
    (64, True): _TWO_WG_128,  # causal 512 170 -> 180, 1k 239 -> 258 TFLOP/s (log §2)
    (96, True): _TWO_WG_128,  # causal 512 0.243 -> 0.197 Mcycles (log §12)
    (96, False): _TWO_WG_128,  # 512 0.260 -> 0.248 Mcycles (log §12)
}


# FP8 (e4m3) KV tiles with channel V scaling (the default format), FA3's FP8 tiles where measured
# on an H200 (the kernel alone, 16k tokens; results/2026-12-05_h200_48bbfc7): hdim 128 128x224
# 972 / 898 TFLOP/s non-causal / causal (128x128: 841 / 880; 128x192: 961 / 871), hdim 256
# 128x128 1233 / 1120 (128x64: 1026 / 913). hdim 64 keeps TILES' 192x128: 700 / 643 (192x160:
# 682 / 604). All other head dims: TILES' tile_n in whole 32-key k-blocks (FP8 WGMMA's k).
FP8_TILE_N = {128: 224, 256: 128}


def fp8_tile(hdim: int, v_scaling: str, masked_softcap: bool = False) -> TileConfig:
    """The FP8 kernel's tile: a function of the head dim and the V scaling alone (not of the
    sequence lengths), because a format's block_n (keys per K scale) must be the tile's tile_n,
    and operands quantized ahead (fa3py.quantize_fp8's default_block_n) must fit every call.
    masked_softcap (softcap with a causal / local mask): the larger tiles spill there (hdim 128
    128x224 232 bytes of stack causal, 208 local; 128x192 208; hdim 256 128x128 104; hdim 64
    192x128 64; CPU SASS), so 2-WG 128-key tiles (hdim 256: TILES' 128x64). Block V (a second
    accumulator) spills in 3-WG kernels (hdim 64: 8 / 22 STL non-causal / causal, hdim 96: 22 /
    43) and above 128x128 (128x160: 48 bytes): 128x128 there."""
    base = TILES[hdim]
    m, n = base.tile_m, base.tile_n // 32 * 32  # hdim 96's 192x112 -> 192x96 (spill-free: CANDIDATES)
    if v_scaling == "block" and base.num_mma_wg == 3:
        m, n = 128, 128
    elif v_scaling == "channel" and not masked_softcap:
        n = FP8_TILE_N.get(hdim, n)
    elif v_scaling == "channel" and base.num_mma_wg == 3 and hdim == 64:
        m, n = 128, 128  # (hdim 96's 192x96 does not spill with a masked softcap)
    return tile_variant(base, m, n)


def fp8_block_n(headdim: int, v_scaling: str = "channel") -> int | None:
    """The FP8 kernel's tile_n (keys per K scale its format must have) for tensors of `headdim`
    (padded as the kernel pads it; None: no FP8 kernel for it); the unmasked-softcap tile."""
    d = padded_hdim(headdim)
    return None if d is None else fp8_tile(d, v_scaling).tile_n


def decode_tile_ok(dtype: str, hdim: int, hdimv: int, qv: bool = False) -> bool:
    """Whether DECODE_TILE serves these head dims: 16-bit, hdim and hdim_v <= 128 (its 80 KB of smem
    and 232 registers: hdim 128 CPU SASS), no qv."""
    return dtype in ("bf16", "fp16") and hdim <= 128 and hdimv <= 128 and not qv


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


def is_long_causal(has_right: bool, max_seqlen_q: int) -> bool:
    """Right-windowed with at least LONG_CAUSAL_SEQLEN query rows (GQA-packed rows counted)."""
    return has_right and max_seqlen_q >= LONG_CAUSAL_SEQLEN


SUPPORTED_HDIM = tuple(TILES)
# (hdim, hdim_v) pairs served: hdim_v == hdim, plus FA3's 192x128 (DeepSeek-style).
SUPPORTED_HDIM_PAIRS = {(d, d) for d in SUPPORTED_HDIM} | {(192, 128)}
# (hdim, hdim_v) pairs served with qv (MLA): FA3's 64 x 256, and the equal pairs whose Q, Qv, two
# K / V stages and sO fit 227 KB (hdim 128: 225 KB; 192 / 256: 288 KB do not).
# 64 x 512 (DeepSeek's MLA): two warpgroups share 64 rows, each with half of O's columns
# (TileConfig.o_split), Q 8 KB, Qv 64 KB (sO overlays it), two K / V stages of 64 keys 144 KB.
QV_HDIM_PAIRS = {(64, 64), (96, 96), (128, 128), (64, 256), (64, 512)}
QV_WIDE_TILE = TileConfig(64, 64, 2, *REG_SPLIT[2], o_split=2)
_SUPPORTED_HDIM_ASCENDING = tuple(sorted(SUPPORTED_HDIM))  # padded_hdim runs on every call


def padded_hdim_v(dv: int, qv: bool) -> int | None:
    """The kernel head dim for V's `dv`: padded_hdim's, or 512 itself with qv (QV_WIDE_TILE)."""
    return 512 if qv and dv == 512 else padded_hdim(dv)


def padded_hdim(d: int) -> int | None:
    """The kernel head dim that serves tensors of head dim `d` (a multiple of 8 up to 256): the
    smallest in SUPPORTED_HDIM >= d, as FA3 rounds up. Its TMA loads read zeros past `d` (a zero
    column adds nothing to QK^T and gives O a zero column), its stores stop at `d`. None: none."""
    if d % 8 or d <= 0:
        return None
    return next((h for h in _SUPPORTED_HDIM_ASCENDING if h >= d), None)


PAGE_ROWS_MULTIPLE = 8  # a page's rows fill whole 8-row swizzle atoms of the K / V smem tiles


def page_size_ok(page_size: int, tile_n: int) -> bool:
    """Whether the paged kernel loads KV blocks of tile_n keys from pages of page_size rows: one
    TMA per block (page_size a multiple of tile_n) or tile_n / page_size TMAs of a page each
    (page_size dividing tile_n, a multiple of 8, at most 32 pages a block: one per producer lane)."""
    if page_size <= 0:
        return False
    if page_size >= tile_n:
        return page_size % tile_n == 0
    return (tile_n % page_size == 0 and page_size % PAGE_ROWS_MULTIPLE == 0
            and tile_n // page_size <= 32)


@dataclass(frozen=True)
class FwdConfig:
    dtype: str  # "bf16" | "fp16" | "e4m3" (FP8: fa3py.fp8's block-scaled format, out in bf16)
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
    # attention_chunk (chunked local attention): the kernel takes C > 0 (a launch argument) and
    # bounds each row's keys by its chunk, one more edge of the KV-block range and the masks.
    chunk: bool = False
    # The tensors' head dims where they are below the tile's (hdim / hdimv, see padded_hdim);
    # 0: equal. The kernel is compiled for them (static shapes in the last mode).
    hdim_in: int = 0
    hdimv_in: int = 0
    # e4m3 only (0 / "" otherwise): the FP8 format (fa3py.fp8.Fp8Format) the kernel reads: query
    # rows per Q scale, and V scaled per KV block ("block": each block's PV into a fresh
    # accumulator, added into O times the block's scale) or per channel ("channel": in the
    # epilogue). The format's block_n (keys per K / V scale) is the tile's tile_n.
    fp8_block_m: int = 0
    fp8_v_scaling: str = ""
    # > 0: paged K / V (FA3's page_table). K and V are page pools (num_pages, page_size, h_kv, d)
    # and the kernel takes a page table (batch, max_pages) int32: key j of sequence b is row
    # j % page_size of page page_table[b, j // page_size]. The producer loads a KV block from its
    # page (page_size a multiple of tile_n) or as tile_n / page_size page-row boxes (page_size a
    # divisor of tile_n, a multiple of 8: whole rows of the smem swizzle atom). `page_size_ok`.
    page_size: int = 0
    # e4m3 only: V arrives in rows, (keys, hdim_v) as FA3's float8 v is, instead of transposed by
    # a pass over memory before the call. The producer warpgroup's warps 1-3 transpose each V block
    # in shared memory into the K-major V^T tile (keys in PV_KEY_ORDER) the consumers read
    # (fwd_sm90's docstring, fp8.transpose_v_block).
    fp8_v_rows: bool = False
    # fp8_v_rows where two whole blocks of V's rows do not fit beside the rest (hdim 256's 128 x
    # 128): two staging stages of half a block (the same bytes as one whole block), so that one
    # half's TMA runs under the other's transpose (fwd_sm90's v_rows_keys; other tiles ignore it).
    # False (FA3PY_CUTE_FP8_V_HALF=0): one whole-block stage there.
    fp8_v_rows_half: bool = True
    # fp8_v_rows: the transposing warps take their jobs two at a time, both ldmatrix before either's
    # permutes and stmatrix, so one job's load latency runs under the other's (one at a time each
    # job waits out its ldmatrix: ptxas does not move a shared load above an earlier shared store).
    # CPU SASS: both loads first but at hdim 192 / 256 causal. `make` sets it above hdim_v 128.
    fp8_vt_pairs: bool = False
    # fp8_v_rows: each transposing warp's jobs unrolled, their address terms immediates (fp8.
    # transpose_v_block): ~6 instructions a job where the loop takes ~30 (the transposing warps
    # share issue slots with the consumers' softmax). Opt-in (launch.fp8_vt_unroll_enabled) until
    # timed on a GPU.
    fp8_vt_unroll: bool = False
    # e4m3 with channel V only: the scale tensors are FA3's descales, (batch, heads, 1) float32
    # (Q's per query head, K's and V's per KV head), read once per tile, instead of the format's
    # per-block scale tensors the host would fill from them (fp8.Fp8Scales.create).
    fp8_descales: bool = False
    # e4m3 only: Q and K int8 (fa3py.fp8's qk_int8, the higher-accuracy mode): S = Q8 K8^T on the
    # s8 x s8 -> s32 WGMMA (IGMMA, the FP8 rate), exact in int32, converted to float32 before the
    # multiplier; P and V stay e4m3.
    fp8_qk_int8: bool = False
    # MLA (FA3's qv): scores gain Qv V^T, Qv (rows, hdim_v) loaded with Q. The kernel issues the
    # second GEMM into S's accumulator from sQv and the block's V tile read K-major (the same
    # smem tile PV reads MN-major), so V(n) is waited for before S(n). QV_HDIM_PAIRS.
    qv: bool = False

    @staticmethod
    def make(dtype: str, hdim: int, hdimv: int | None = None, short: bool = False,
             medium: bool = False, long_causal: bool = False, decode: bool = False, **features) -> "FwdConfig":
        """The default config: one line per choice, its reason and where it was measured
        ("log §N": section N of the measurement log, `git show ff8d2aa:cute_kernels/NOTES.md`; H100/H200 SM cycles or TFLOP/s). `short` / `medium`:
        `is_short` / `is_medium`; `long_causal`: `is_long_causal`; `decode`: DECODE_TILE (`decode_tile_ok`), one tile per CTA.
        TileConfig fields in `features` override the table."""
        hdimv = hdim if hdimv is None else hdimv
        if dtype == "e4m3":
            features.setdefault("fp8_block_m", 128)  # fa3py.fp8.Fp8Format's defaults
            features.setdefault("fp8_v_scaling", "channel")
            # V's rows: the transposer two jobs at a time above hdim_v 128: hdim 256 +18.8 / +13.5%
            # (2k / 16k), hdim 128 -1.6..+2.6% (H100, FA3's inputs, results/2026-12-06_h100_vt_pairs §1)
            features.setdefault("fp8_vt_pairs", features.get("fp8_v_rows", False) and hdimv > 128)
        has_left, has_right = features.get("has_left", False), features.get("has_right", False)
        # A chunk bounds each row's keys on both sides, like a local window.
        windowed = has_left or has_right or features.get("chunk", False)
        fp8 = dtype == "e4m3"
        qv = features.get("qv", False)
        if decode:
            assert decode_tile_ok(dtype, hdim, hdimv, qv), "DECODE_TILE: 16-bit, hdim / hdim_v <= 128, no qv"
            base = DECODE_TILE
        elif fp8:
            base = fp8_tile(hdim, features["fp8_v_scaling"], features.get("softcap", False) and windowed)
        elif qv and hdimv == 512:
            base = QV_WIDE_TILE
        elif qv:  # Qv and V as wide as hdim_v: the wider head dim's tile (64 x 256: hdim 256's 128x64)
            base = TILES[max(hdim, hdimv)]
            if base.num_mma_wg == 3 and hdim > 64:  # hdim 96's 192x112 spills 8 bytes at 160 registers
                base = tile_variant(base, 128, base.tile_n)
        else:
            base = SHORT_TILES.get((hdim, has_right), TILES[hdim]) if short else TILES[hdim]
        if fp8 and features.get("page_size", 0):
            # FP8 pages (FA3's inputs read directly, so tile_n is free of a format's block_n) under
            # the paged split's 232 consumer registers: hdim 128's 224 keys take no 64 / 256-row
            # pages and reach R237 (128 keys: R186); hdim 256's 128 keys spill 32 bytes (64: none;
            # CPU SASS).
            base = tile_variant(base, base.tile_m, min(base.tile_n, 128 if hdimv <= 192 else 64))
        if features.get("chunk") and features.get("split_kv") and has_right and base.num_mma_wg == 3:
            # causal + chunk + split-KV spills at 160 registers (hdim 64: 8 bytes, CPU SASS); 2 WGs
            # at 240 do not. (launch.run counts the splits for this tile.)
            base = tile_variant(base, 128, 128)
        # Short causal hdim 64 / 96: the plain schedule, halved diagonal block, PV chained to the
        # next QK^T: hdim64 512 0.249 -> 0.217 Mcycles (log §7, 13, 14). (Not FP8: its block V
        # scaling adds each PV right after its wait.)
        plain = short and has_right and hdim in (64, 96) and not fp8 and not qv and not decode
        # FP8 hdim 256, causal from 4k rows: one tile a CTA (no persistent CTAs, no tile counter),
        # with TMA stores: 4k / 8k / 16k +3.4 / +6.4 / +7.7% over the counter (H100, CUDA graphs,
        # results/2026-12-06_h100_vt_pairs §6); at 1k / 2k the counter with TMA stores is as fast
        # or faster (663 / 859 TFLOP/s against 622 / 859); hdim 128 / 192: -1..-11% (kept).
        # (timed unsplit, causal only: split-KV, windows and chunks keep the counter)
        fp8_grid = (fp8 and hdimv > 192 and long_causal and not has_left
                    and not features.get("chunk", False) and not features.get("split_kv", False))
        tile = replace(
            base,
            # Non-causal: persistent CTAs, 1k 506 -> 554 TFLOP/s (log §Persistent scheduler).
            persistent=not windowed,
            # Causal/local: atomic tile counter, hdim128 512 274 -> 352 TFLOP/s (log §3);
            # not 3 WGs with a left edge (spills 80 bytes; a chunk has one too), nor FP8's
            # 224-key tile with a chunk (32 bytes of stack, 8 STL; without the counter none,
            # CPU SASS).
            dynamic=windowed and not (base.num_mma_wg == 3 and (has_left or features.get("chunk", False)))
            and not (fp8 and features.get("chunk", False) and base.tile_n > 192) and not fp8_grid,
            # hdim_v > 128: hdim256 8k 706 -> 763 TFLOP/s (log §2); hdim128 -1%.
            rescale_o_before_pv=hdimv > 128,
            # Up to hdim 192 (Q's descriptors fit in registers): hdim64 causal 8k 449 -> 480;
            # hdim256 8k 719 -> 712 (log §3). Not FP8's 224-key tile with softcap, split-KV and GQA
            # packing together: 72 bytes of stack pinned, none unpinned (CPU SASS).
            pin_desc=hdim <= 192 and not (fp8 and base.tile_n > 192 and features.get("softcap", False)
                                          and features.get("split_kv", False) and features.get("pack_gqa", 1) > 1),
            # Non-causal and short causal hdim64: -0.4..-1.3%; causal hdim128 +3..+7%; split-KV
            # stores float32 from registers (log §4, 7). FP8 causal hdim 256: 1k-16k -1.6..-3.6%,
            # hdim 192 2k -2.3%, 16k level; FP8 hdim 128 level (results/2026-12-06_h100_vt_pairs §6).
            tma_store=(not windowed or plain and hdim == 64 or fp8 and hdimv > 128)
            and not features.get("split_kv", False),
            # hdim128 2k / 8k -4.0 / -4.6%, hdim64 non-causal -1.8 / -2.4% (log §5).
            k_release_gate=2 if hdim == 128 else 4 if hdim == 64 and not windowed else 0,
            # Short (not windowed hdim > 64): 512 -2.7%; medium hdim64: 1k -5.9%; long +1..+4%
            # (log §7, 8).
            # (qv: one stage, sQv takes the room)
            q_stages=2 if hdim <= 128 and not qv and (short and (hdim <= 64 or not windowed)
                                                      or medium and hdim == 64) else 1,
            intra_wg_overlap=not plain,
            # hdim_v > 128 (with TILES' 128x96 / 128x64) and windowed hdim64: causal 8k -1.4%;
            # hdim64 non-causal +2%, hdim128 +1%: off there (log §9).
            # (FP8: off, its row max is in per-block scaled units.)
            lazy_rescale=8.0 if (hdimv > 128 or hdim == 64 and windowed) and not fp8 else 0.0,
            diag_half=plain,  # hdim64 512 0.231 -> 0.227 (log §13, results/2026-12-02_h200_751a43e)
            chain_pv_qk=plain,  # hdim64 512 0.228 -> 0.217 (log §14, results/2026-12-02_h200_11e42f8)
            # FP8's 224-key blocks (hdim 128): sequences of 512 / 2k / 4k / 16k keys end in a block
            # of 64 / 32 / 64 / 32 keys (16-bit tiles of 128 or 64 keys divide them). H100, CUDA
            # graphs, one process: non-causal 512 / 2k / 4k / 16k 478 -> 567 / 786 -> 836 / 866 ->
            # 896 / 913 -> 922 TFLOP/s, causal 512 +2%, 2k level; 128 keys: 1k 697 -> 742, the
            # rest below 64's (results/2026-12-06_h100_short_first): launch.config_for takes 128
            # where every sequence ends in 65-128 keys (short_first_width). Not with V in rows (FA3's
            # inputs, fp8_v_rows): 2k / 4k / 16k 732 -> 719 / 792 -> 765 / 813 -> 773 (its
            # transposing warps' code beside it), nor a chunk (causal + chunk in rows spills 56
            # bytes, CPU SASS).
            short_first=SHORT_FIRST_FP8 if (fp8 and base.tile_n == 224 and not features.get("chunk", False)
                                            and not features.get("fp8_v_rows", False)) else 0,
        )
        if decode:  # one tile a CTA (no persistent grid, no tile counter), DECODE_TILE's Q buffers
            tile = replace(tile, persistent=False, dynamic=False, q_stages=DECODE_TILE.q_stages)
        if features.get("page_size", 0):
            producer_regs, consumer_regs = PAGED_REG_SPLIT[tile.num_mma_wg]
            tile = replace(tile, producer_regs=producer_regs, consumer_regs=consumer_regs)
        overrides = {k: features.pop(k) for k in list(features) if k in TileConfig.__dataclass_fields__}
        return FwdConfig(dtype, hdim, hdimv, replace(tile, **overrides), **features)

    @property
    def causal(self) -> bool:
        return self.has_right and not self.has_left

    def short(self) -> str:
        flags = [n for n in ("has_left", "has_right", "chunk", "softcap", "cu_seqlens_q", "cu_seqlens_k",
                             "seqused_q", "seqused_k", "split_kv") if getattr(self, n)]
        flags += [f"pack_gqa={self.pack_gqa}"] if self.pack_gqa > 1 else []
        flags += [f"fp8_block_m={self.fp8_block_m} v_{self.fp8_v_scaling}"] if self.dtype == "e4m3" else []
        flags += [f"tensors_d{self.hdim_in or self.hdim}x{self.hdimv_in or self.hdimv}"] if self.hdim_in or self.hdimv_in else []
        flags += [f"page_size={self.page_size}"] if self.page_size else []
        flags += ["fp8_v_rows"] if self.fp8_v_rows else []
        flags += ["fp8_v_rows_whole"] if self.fp8_v_rows and not self.fp8_v_rows_half else []
        flags += ["fp8_vt_pairs"] if self.fp8_vt_pairs else []
        flags += ["fp8_vt_unroll"] if self.fp8_vt_unroll else []
        flags += ["fp8_descales"] if self.fp8_descales else []
        flags += ["fp8_qk_int8"] if self.fp8_qk_int8 else []
        flags += ["qv"] if self.qv else []
        t = self.tile
        switches = [n for n in ("intra_wg_overlap", "persistent", "rescale_o_before_pv", "dynamic", "tma_store",
                                "diag_half", "chain_pv_qk") if getattr(t, n)]
        switches += [f"{n}={getattr(t, n)}" for n in ("k_release_gate", "q_stages", "o_chunks", "lazy_rescale", "o_split",
                                                      "short_first")
                     if getattr(t, n) != getattr(TileConfig, n)]
        return (f"{self.dtype} d{self.hdim}x{self.hdimv} tile{t.tile_m}x{t.tile_n}s{t.num_stages} "
                f"{' '.join(switches)} {' '.join(flags)}")


# ----------------------------------------------------------------------------- backward
# The backward's tile per kernel head dim: (tile_m query rows per step, tile_n keys per CTA,
# Q / dO pipeline stages, dkv_split_hdim).
# hdim <= 128: two consumer warpgroups own 64 keys each (S^T = K Q^T and dP^T = V dO^T with the
# keys as WGMMA's M), so P^T and dS^T stay in registers as the A operand of dV += P^T dO and
# dK += dS^T Q; FA3's sm90 shapes for these head dims.
# hdim 192 / 256 (dkv_split_hdim): dK and dV of 128 keys do not fit two warpgroups' registers.
# 64 keys per CTA; the warpgroups split S^T / dP^T by queries (32 each) and dK / dV by head-dim
# columns (hdim / 2 each, all 64 keys), so P^T and dS^T go through smem as the SS A operand;
# FA3 takes 64 x 64 with one Q / dO stage at hdim 256 too. hdim 256 has one Q / dO stage to
# fit 227 KB beside the 64 KB fp32 sdQ; hdim 192 keeps two (208 KB; 184 KB with hdim_v 128,
# BwdConfig.hdimv, which shares hdim 192's entry).
# hdim 64 takes FA3's 128 x 128: S^T and dP^T of 64 keys x 128 queries per warpgroup, the
# warpgroups splitting dQ = dS K by rows, not columns. Measured on an H200 (backward alone, 16k
# tokens, bf16, `benchmarks.paired`): 10.58 / 5.46 ms non-causal / causal against 13.19 / 6.49 ms
# at 64 x 128, i.e. 1.05x / 1.07x of flash-attn-4's time instead of 1.33x.
BWD_TILES: dict[int, tuple[int, int, int, bool]] = {
    64: (128, 128, 2, False), 96: (64, 128, 2, False), 128: (64, 128, 2, False),
    192: (64, 64, 2, True), 256: (64, 64, 1, True),
}
# tile_m values a head dim's backward may take besides its BWD_TILES entry (same tile_n, q_stages):
# hdim 64's former 64-row tile; hdim 128's 80-row tile (FA3's non-causal one: S^T / dP^T 40
# registers a thread each beside dK / dV's 64 each, dQ^T = K^T dS^T with the head dim as M, since
# WGMMA's M cannot be 80). (128 query rows fit hdim 64 only: S^T, dP^T 64 regs each a thread,
# dK / dV 32 each; wider head dims' dK / dV do not fit 240 registers beside them.)
BWD_TILE_M_VARIANTS: dict[int, tuple[int, ...]] = {64: (64,), 128: (80,)}
# Q / dO stages where the tile has no sdQ (BwdConfig.dq_red) and BWD_TILES' count was what fit
# beside it: hdim 256's 64 KB of fp32 sdQ take a second stage (208 KB).
BWD_Q_STAGES_WITHOUT_SDQ: dict[int, int] = {256: 2}
BWD_REG_SPLIT = (24, 240)  # producer, consumer setmaxnreg (2 consumer warpgroups)
# hdim 192's FA3 tile (BwdConfig.dkv_transposed; bwd_launch's default there): 96 keys a CTA over
# three consumer warpgroups, S = Q K^T unswapped (32 keys each), dK^T / dV^T with the head dim as
# M (64 rows each), dQ added from registers (no room for sdQ). 24 + 3 x 160 = 4 x 126 at 512
# threads.
BWD_DKVT_TILE = (64, 96)
BWD_DKVT_REG_SPLIT = (24, 160)


@dataclass(frozen=True)
class BwdConfig:
    """Codegen configuration of the sm90 backward kernel (bwd_sm90.py): the compile cache key."""

    dtype: str  # "bf16" | "fp16"
    hdim: int  # the kernel's head dim (padded_hdim of the tensors')
    tile_m: int
    tile_n: int
    q_stages: int = 2  # Q / dO (+ LSE / dPsum) pipeline depth
    has_left: bool = False
    has_right: bool = False
    softcap: bool = False
    cu_seqlens_q: bool = False
    cu_seqlens_k: bool = False
    seqused_q: bool = False
    seqused_k: bool = False
    hdim_in: int = 0  # the tensors' head dim where below `hdim` (0: equal)
    # dQ's adds in a fixed order (key blocks ascending, one semaphore per query block): the
    # same bits on every run
    deterministic: bool = False
    # dK / dV as float32 partials per split of the query heads of a KV head (a launch argument,
    # head_splits): more CTAs where one per (key block, KV head) is under two waves (MQA / GQA)
    dkv_partial: bool = False
    producer_regs: int = BWD_REG_SPLIT[0]
    consumer_regs: int = BWD_REG_SPLIT[1]
    # hdim 192 / 256: 64 keys per CTA, S^T / dP^T split by queries and dK / dV by head-dim
    # columns over the two consumer warpgroups, P^T and dS^T through smem (bwd_sm90.py)
    dkv_split_hdim: bool = False
    hdimv: int = 0  # V / dO / dV's head dim where below hdim (192 x 128, dkv_split_hdim); 0: hdim
    # attention_chunk (chunked local attention): the kernel takes C > 0 (a launch argument) and
    # bounds each key's query rows by its chunk, one more edge of the query-block range and the
    # masks (mask.KeyBlockMask), as FwdConfig.chunk in the forward.
    chunk: bool = False
    # sdS buffers. 2 (hdim <= 128 with two Q stages; indexed by the Q stage) lets a warpgroup
    # write the next block's dS^T while the other may still read the last one in its dQ GEMM:
    # one PdS barrier a block instead of two (FA3 / flash-attn-4 take 2 at these head dims).
    # bwd_launch picks it where an H100 timed it faster (hdim 64).
    ds_stages: int = 1
    # dQ added to the float32 accumulator straight from each consumer thread's registers
    # (red.global.add.v4.f32, the bulk reduce's layout) instead of through sdQ and the dQ warp:
    # no sdQ (64 KB at hdim 256, where that makes room for two Q / dO stages) and no handoff
    # barriers. Not deterministic (its ordered adds are the dQ warp's). bwd_launch picks it where
    # an H100 timed it faster (hdim 256).
    dq_red: bool = False
    # hdim 192, FA3's layout (bwd_sm90's docstring): three consumer warpgroups, BWD_DKVT_TILE
    # (64 queries x 96 keys), S and dP unswapped, dK^T and dV^T with the head dim as M; dq_red.
    dkv_transposed: bool = False
    # > 0: a block's LSE_log2 values are read from smem into registers right after S^T's GEMM is
    # issued, and its dPsum values before dP^T's wait, up to this many each (the thread's query
    # columns in order; the rest as before). Without it the reads follow the waits (ptxas does
    # not move shared loads across a wgmma wait): ~50 instructions from the S^T wait to the first
    # exp2 at 80 rows, flash-attn-4 ~36 (its LSE comes into registers under S's GEMM).
    stat_regs: int = 0
    # dV += P^T dO issued as soon as P^T is in registers, before dP^T's wait and dS^T's math (not
    # after dS^T is stored): the exp2s are then all placed before that wait and dV's GEMM runs
    # under the dS^T math. P^T in registers only (not dkv_split_hdim / dkv_transposed).
    dv_early: bool = False
    # dK += dS^T Q (dS^T from registers) issued as soon as dS^T is converted, before dS^T's
    # stmatrix, fence and the PdS barrier (not after dQ's GEMM): the tensor core gets dK's GEMM
    # while the warpgroups meet at the barrier (ncu at hdim 128, 2k: that barrier and the fence
    # before it ~5% of the kernel's samples), and dQ's result then waits for dK's. P^T / dS^T in
    # registers only (not dkv_split_hdim / dkv_transposed).
    dk_early: bool = False
    # dK / dV written through smem: after the last query block each consumer warp stages the
    # slab of dK and of dV its accumulators hold (stmatrix; dkv_transposed: stmatrix.trans of
    # dK^T / dV^T) over sQ (dK) and sdO (dV), free once every consumer warpgroup's last GEMMs are
    # done (one barrier), and stores it by 16-byte row-contiguous stores (each sector once).
    # Without it, element-wise stores straight from the accumulator registers: 4-byte, each
    # sector written twice (ncu: ~60% of the gap to flash-attn-4 at hdim 128, 2k), or with
    # dkv_transposed 2-byte (96 a thread). In the tensors' dtype: not dkv_partial.
    dkv_smem: bool = False
    # Causal / right windows: key blocks get shorter with n_block (fewer query rows see them), and
    # the plain grid (key blocks fastest, pair by pair) launches the last pairs' longest blocks
    # near the end, where they run on while other SMs idle (a list-scheduling model of the 2k
    # causal grid: 7% over the ideal). lpt takes the forward's longest-first order instead
    # (bwd_sm90's __call__; the model: 1-2%). Deterministic's waits stay on earlier-launched CTAs.
    lpt: bool = False
    # Programmatic dependent launch with the pre- and post-processing kernels (all three launched
    # with it): the producer issues K / V by TMA before griddepcontrol.wait (the preprocessing's
    # LSE_log2 / dPsum / zeroed dQ accumulator), so a CTA's start and first loads overlap the
    # preprocessing's tail; the dQ warp and the consumers' dK / dV stores wait too (nothing of this
    # kernel writes before the preprocessing is done). flash-attn-4's sm90 backward does the same;
    # here it timed level (bwd_launch.pdl).
    pdl: bool = False

    @property
    def num_mma_wg(self) -> int:
        return 3 if self.dkv_transposed else 2

    def __post_init__(self):
        assert not (self.dq_red and self.deterministic), "dq_red: unordered adds (deterministic: the dQ warp's)"
        assert self.ds_stages == 1 or (self.ds_stages == 2 and self.q_stages == 2 and not self.dkv_split_hdim
                                       and not self.dkv_transposed), \
            "ds_stages 2: two Q stages, dS^T alone in smem (not dkv_split_hdim)"
        assert not (self.dv_early and (self.dkv_split_hdim or self.dkv_transposed)), \
            "dv_early: P^T in registers (not dkv_split_hdim / dkv_transposed)"
        assert not (self.dk_early and (self.dkv_split_hdim or self.dkv_transposed)), \
            "dk_early: dS^T in registers (not dkv_split_hdim / dkv_transposed)"
        assert not (self.dkv_smem and self.dkv_partial), "dkv_smem: 16-bit dK / dV (not the float32 partials)"
        assert not self.lpt or self.has_right, "lpt: key blocks longest first where a right edge shortens them"
        if self.dkv_transposed:
            assert (self.tile_m, self.tile_n) == BWD_DKVT_TILE and self.hdim == 192 and not self.hdimv, \
                f"dkv_transposed: hdim 192 (three 64-row warpgroups of dK^T), tile {BWD_DKVT_TILE}"
            assert self.dq_red and not self.dkv_split_hdim, "dkv_transposed: dQ from registers (no room for sdQ)"
            check_reg_split(self.producer_regs, self.consumer_regs, 3, self)
            return
        if self.dkv_split_hdim:
            assert self.tile_n == 64 and self.hdim % 64 == 0, "64 keys; dK / dV in two head-dim halves"
            assert self.hdimv in (0, 128) and (not self.hdimv or self.hdim == 192), "hdimv: 192 x 128 only"
        else:
            assert not self.hdimv, "hdim_v = hdim"
            assert self.tile_n == 128, "two consumer warpgroups of 64 keys"
        if self.tile_m == 128:
            # dQ = dS K split by rows (64 per warpgroup, every column): bwd_sm90's dq_split_rows
            assert not self.dkv_split_hdim and self.hdim == 64, "tile_m 128: hdim 64, 128 keys (registers)"
        elif self.tile_m == 80:
            # dQ^T = K^T dS^T, the head dim as M (64 rows per warpgroup): bwd_sm90's dq_swap_ab
            assert not self.dkv_split_hdim and self.hdim == 128, "tile_m 80: hdim 128, 128 keys (registers)"
        else:
            assert self.tile_m == 64 and self.hdim % 32 == 0, "dQ's columns split in two 16-column multiples"
        check_reg_split(self.producer_regs, self.consumer_regs, 2, self)

    @staticmethod
    def make(dtype: str, hdim: int, tile_m: Optional[int] = None, **features) -> "BwdConfig":
        """BWD_TILES' tile of this head dim, or with `tile_m` one of its BWD_TILE_M_VARIANTS, or
        with dkv_transposed=True (hdim 192) FA3's three-warpgroup tile (dQ from registers)."""
        if features.get("dkv_transposed"):
            assert tile_m in (None, BWD_DKVT_TILE[0]), f"dkv_transposed: tile_m {BWD_DKVT_TILE[0]}"
            features = dict(features, dq_red=True)
            return BwdConfig(dtype, hdim, *BWD_DKVT_TILE, q_stages=2, producer_regs=BWD_DKVT_REG_SPLIT[0],
                             consumer_regs=BWD_DKVT_REG_SPLIT[1], **features)
        default_m, tile_n, q_stages, dkv_split_hdim = BWD_TILES[hdim]
        assert tile_m in (None, default_m, *BWD_TILE_M_VARIANTS.get(hdim, ())), f"hdim {hdim}: tile_m {tile_m}"
        tile_m = tile_m or default_m
        if features.get("dq_red"):
            q_stages = BWD_Q_STAGES_WITHOUT_SDQ.get(hdim, q_stages)
        return BwdConfig(dtype, hdim, tile_m, tile_n, q_stages=q_stages, dkv_split_hdim=dkv_split_hdim, **features)

    def short(self) -> str:
        flags = [n for n in ("has_left", "has_right", "chunk", "softcap", "cu_seqlens_q", "cu_seqlens_k",
                             "seqused_q", "seqused_k", "deterministic", "dkv_partial") if getattr(self, n)]
        flags += [f"tensors_d{self.hdim_in}"] if self.hdim_in else []
        flags += ["dkv_split_hdim"] if self.dkv_split_hdim else []
        flags += [f"hdimv{self.hdimv}"] if self.hdimv else []
        flags += [f"ds{self.ds_stages}"] if self.ds_stages != 1 else []
        flags += ["dq_red"] if self.dq_red else []
        flags += ["dkv_transposed"] if self.dkv_transposed else []
        flags += [f"stat_regs{self.stat_regs}"] if self.stat_regs else []
        flags += ["dv_early"] if self.dv_early else []
        flags += ["dk_early"] if self.dk_early else []
        flags += ["dkv_smem"] if self.dkv_smem else []
        flags += ["lpt"] if self.lpt else []
        flags += ["pdl"] if self.pdl else []
        return f"bwd {self.dtype} d{self.hdim} tile{self.tile_m}x{self.tile_n} qs{self.q_stages} {' '.join(flags)}"
