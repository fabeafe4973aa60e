"""Host side of the sm90 backward: what it serves, its config, the pre- and post-processing
around the kernel (bwd_sm90.py), and the launch.

    preprocess   LSE_log2 = LSE * log2(e) (+inf where LSE = -inf: P = 0 for a row without keys,
                 and for the padding rows of each sequence's last block), dPsum = rowsum(dO * O)
                 in float32, both per head in rows padded per sequence to whole tile_m blocks
                 (bwd_sm90.padded_offset); the dQ accumulator zeroed.
    kernel       dK, dV (in the tensors' dtype) and dQ accumulated in float32.
    postprocess  dQ: the accumulator's chunks permuted from the consumer threads' register order
                 (`dq_fragment_order`) to rows x head dim, times softmax_scale, converted.

On CUDA the pre / post steps are CuTe DSL kernels (bwd_prepost.py); `preprocess` /
`postprocess` here are the same in torch ops (the CPU path of the emulation tests, and the
reference of the GPU tests). The dispatcher sends every backward these kernels serve here
(`enabled`); FA3PY_CUTE_BWD=0 turns them off (the Triton backward then runs). First run on an
H200 (benchmarks/results/gpu_tests.md, 2026-12-05): every GPU test passed, 1.3-3.2x faster than
the Triton backward.
"""

from __future__ import annotations

import functools
import math
import os
from typing import TYPE_CHECKING, Optional

import torch

from cute_kernels.config import BWD_DKVT_TILE, BWD_TILES, BwdConfig, padded_hdim

if TYPE_CHECKING:
    from fa3py.request import AttentionRequest

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
LOG2E = math.log2(math.e)
enabled: bool = os.environ.get("FA3PY_CUTE_BWD", "1") != "0"
# attention_chunk in the kernel: on by default since its ~110 GPU tests passed on an H100
# (2026-12-05, benchmarks/results/gpu_tests.md); FA3PY_CUTE_BWD_CHUNK=0 sends chunked
# requests to the Triton backward.
chunk_enabled: bool = os.environ.get("FA3PY_CUTE_BWD_CHUNK", "1") != "0"
# sdS buffers where the tile can take two (BwdConfig.ds_stages), and dQ added from registers by
# red.global.add.v4.f32 (BwdConfig.dq_red; never with deterministic). None: per head dim as timed
# on an H100 (backward alone, 16k tokens, benchmarks/results/2026-12-05_h100_f5999ad and
# 2026-12-05_h100_943cb41): two sdS buffers at hdim 64 (537 / 520 TFLOP/s against 525 / 503
# non-causal / causal; level at 96 / 128 / 192), dQ from registers at hdim 96 (9.81 / 5.09 ms
# against 10.32 / 5.30) and 256 (438 against 290 TFLOP/s: its second Q / dO stage); 2-5% slower
# at 64 / 128, level at 192. FA3PY_CUTE_BWD_DS_STAGES=1|2 and FA3PY_CUTE_BWD_DQ_RED=0|1 force one
# choice for every head dim.
ds_stages = int(os.environ["FA3PY_CUTE_BWD_DS_STAGES"]) if os.environ.get("FA3PY_CUTE_BWD_DS_STAGES") else None
dq_red = os.environ["FA3PY_CUTE_BWD_DQ_RED"] == "1" if os.environ.get("FA3PY_CUTE_BWD_DQ_RED") else None
DS_STAGES_2_HDIMS = (64,)
DQ_RED_HDIMS = (96, 256)
# hdim 128's 80-row query blocks (BWD_TILE_M_VARIANTS; FA3's non-causal tile: dQ^T with the head
# dim as M), with two sdS buffers. FA3PY_CUTE_BWD_M80=1 (m80 True) takes it for every hdim 128
# config, 0 never; unset, the rule (M80_BY_DEFAULT): from M80_MIN_SEQLEN_Q query rows without a
# window, chunk or softcap (causal included). H100, CUDA graphs (benchmarks/results/2026-12-06_h100_m80),
# backward alone, non-causal, 16k tokens: 16k rows 9.22 ms (80 rows) / 8.97 (80 rows, two sdS
# buffers) / 9.43 (64 rows); 4k 2.49 / 2.44 / 2.44; forward + backward (80 rows, two sdS buffers
# against 64 rows): causal 16k 6.15 / 6.32 ms, but 2k 1.17 / 1.11 causal and 1.80 / 1.76
# non-causal. GPU tests (H100): every feature on the tile with one sdS buffer (165) and with two
# (165, and the rule's 4), benchmarks/results/gpu_tests.md.
m80 = os.environ["FA3PY_CUTE_BWD_M80"] == "1" if os.environ.get("FA3PY_CUTE_BWD_M80") else None
M80_BY_DEFAULT = True
M80_MIN_SEQLEN_Q = 8192
# hdim 192's FA3 tile (BwdConfig.dkv_transposed: 96 keys a CTA over three consumer warpgroups, dK^T
# / dV^T with the head dim as M, dQ from registers), for hdim 192 with hdim_v 192, not
# deterministic; FA3PY_CUTE_BWD_DKVT=0: the 64 x 64 split_hdim tile. 64 keys a CTA add a 64 x 192
# fp32 dQ block per query block into L2 for every 64 keys, 1.5x the reduce traffic of 96. H100,
# CUDA graphs, backward alone (benchmarks/results/2026-12-06_h100_dkvt): 2k 1.59 / 0.96 ms
# against 1.87 / 1.11 (non-causal / causal), causal 16k 5.43 against 6.38; GPU tests: 165 passed.
dkvt = os.environ.get("FA3PY_CUTE_BWD_DKVT", "1") != "0"
# Row statistics in registers under the GEMMs (BwdConfig.stat_regs: LSE and dPsum values a thread)
# and dV's GEMM before dP's wait (BwdConfig.dv_early): by default both on hdim 128's 64-row tile
# (below the 80-row rule; not with softcap), where together they take 1.0-2.1% off (H100, CUDA graphs, backward
# alone, 2k / 4k, causal and not, two runs; apart, neither helps: 1.3356 / 1.3387 against 1.3323
# ms at 2k), and nowhere else: at hdim 64 / 96 (2k) they cost 3-4%, and stat_regs at 80 rows
# causal makes ptxas serialize the WGMMAs (+25% at 16k). benchmarks/results/2026-12-06_h100_795064c.
# FA3PY_CUTE_BWD_STAT_REGS=N (0: off) and FA3PY_CUTE_BWD_DV_EARLY=0 / 1 set them for every tile
# that takes them (dv_early: the 64-row tiles of hdim 96 / 128, without softcap).
stat_regs = int(os.environ["FA3PY_CUTE_BWD_STAT_REGS"]) if os.environ.get("FA3PY_CUTE_BWD_STAT_REGS") else None
dv_early = os.environ["FA3PY_CUTE_BWD_DV_EARLY"] == "1" if os.environ.get("FA3PY_CUTE_BWD_DV_EARLY") else None
# dK's GEMM before dS^T's stmatrix and the PdS barrier (BwdConfig.dk_early): FA3PY_CUTE_BWD_DK_EARLY=1 on
# the 64 / 128-row tiles of hdim 64-128 (dS^T in registers); not yet timed, so off by default.
dk_early = os.environ.get("FA3PY_CUTE_BWD_DK_EARLY", "0") == "1"
STAT_REGS_BY_DEFAULT = 16  # hdim 128's 64-row tile (`variants`)
# dK / dV through smem and 16-byte stores (BwdConfig.dkv_smem; 16-bit dK / dV: not with head
# splits): by default on every tile but the 80-row one without a right edge. Backward alone, CUDA
# graphs, against element-wise stores from the registers (benchmarks/results/2026-12-06_h200_dkv_smem,
# 2026-12-06_h100_defaults): H200, 2k tokens x 8: hdim 64 -3.4% / -4.9% (non-causal / causal),
# 96 -1.8% / -4.0%, 128 -3.0% / -4.4%; H100 hdim 128 2k -3.6% / -4.6%, hdim 192 (three-warpgroup
# tile) -3.1% / -4.1%, hdim 256 -5.4% / -6.7%. On the 80-row tile (16k rows) +1.4% (H200) / +1.9%
# (H100) non-causal (off there), -1.0% / -0.8% causal. FA3PY_CUTE_BWD_DKV_SMEM=0 / 1 sets it for
# every tile.
dkv_smem = os.environ["FA3PY_CUTE_BWD_DKV_SMEM"] == "1" if os.environ.get("FA3PY_CUTE_BWD_DKV_SMEM") else None
# Key blocks in the forward's longest-first order where a right edge (causal, right windows)
# shortens them (BwdConfig.lpt), on by default: H100, CUDA graphs, backward alone, causal, against
# the plain grid: hdim 128 2k -3.3%, 4k -4.0%; hdim 64 2k -2.1%, 4k -2.7% (the main kernel alone at
# hdim 128 2k: 636 -> 609 us, flash-attn-4's 610). FA3PY_CUTE_BWD_LPT=0 turns it off.
lpt = os.environ.get("FA3PY_CUTE_BWD_LPT", "1") != "0"
# The postprocessing's dQ through smem and 16-byte stores (BwdRowsConfig.dq_smem; element-wise from
# registers otherwise: 4-byte, or on the 80-row tile's dQ^T 2-byte stores), on by default: H100,
# hdim 128, 2k x 8, the postprocessing kernel 78.7 -> 67.0 us (flash-attn-4's 67.7).
# FA3PY_CUTE_BWD_POST_SMEM=0 turns it off.
post_dq_smem = os.environ.get("FA3PY_CUTE_BWD_POST_SMEM", "1") != "0"
# Programmatic dependent launch of the three kernels (BwdConfig.pdl, BwdRowsConfig.pdl): the main
# kernel's CTAs start and load K / V / Q / dO under the preprocessing's tail, the postprocessing
# launches under the main kernel's. FA3PY_CUTE_BWD_PDL=1; off by default: level within noise (H100, CUDA
# graphs, paired, 2k x 8 non-causal: hdim 128 1.2710 against 1.2792 ms, hdim 64 1.4313 against
# 1.4262; the main kernel alone no faster under the profiler). GPU tests passed with it (~640).
pdl = os.environ.get("FA3PY_CUTE_BWD_PDL", "0") == "1"


def why_not(req: "AttentionRequest") -> Optional[str]:
    """None if the backward kernel serves `req` (given the forward's checks passed), else why not."""
    if not enabled:
        return "cute_kernels: the sm90 backward kernel is turned off (FA3PY_CUTE_BWD=0)"
    d = padded_hdim(req.headdim)
    if d not in BWD_TILES or (padded_hdim(req.headdim_v) != d and not _is_192x128(req)):
        return (f"cute_kernels: the backward kernel serves head dims up to 256 with hdim_v = hdim "
                f"(padded to {sorted(BWD_TILES)}), or hdim 192 with hdim_v 128, "
                f"got ({req.headdim}, {req.headdim_v})")
    if req.headdim_v != req.headdim and not _is_192x128(req):
        return "cute_kernels: the backward kernel needs hdim_v = hdim (or hdim 192 with hdim_v 128)"
    if req.params.attention_chunk and not chunk_enabled:
        return "cute_kernels: attention_chunk in the backward kernel is turned off (FA3PY_CUTE_BWD_CHUNK=0)"
    from cute_kernels import launch

    if not launch.use_tvm_ffi:
        return "cute_kernels: the backward kernel is called through TVM-FFI (pip install apache-tvm-ffi)"
    return None


def _takes_dkvt(hdim: int, hdimv: int, deterministic: bool) -> bool:
    """Whether a kernel head dim runs hdim 192's three-warpgroup tile (`dkvt`; not deterministic,
    not 192 x 128: hdimv 128)."""
    return dkvt and hdim == 192 and not hdimv and not deterministic


def _is_192x128(req: "AttentionRequest") -> bool:
    """hdim_v 128 beside a head dim padded to 192: the kernel's hdimv (V, dO, dV 128 wide)."""
    return padded_hdim(req.headdim) == 192 and req.headdim_v == 128


# Head splits: enough CTAs for this many waves of the SMs before splitting a GQA group further.
SPLIT_WAVES = 2


def head_splits(req: "AttentionRequest") -> int:
    """CTAs per KV head: 1 (the group's dK / dV summed in registers), or, where one CTA per
    (key block, KV head) fills under SPLIT_WAVES waves of the SMs, the largest divisor of the
    group up to the count that does (each split writes float32 dK / dV partials; the host sums
    them)."""
    group = req.nheads // req.nheads_kv
    if group == 1:
        return 1
    from cute_kernels.launch import _seqlens, usable_sms

    seqlen_k = _seqlens(req)[1]
    d = padded_hdim(req.headdim)
    hdimv = 128 if _is_192x128(req) else 0
    tile_n = BWD_DKVT_TILE[1] if _takes_dkvt(d, hdimv, req.params.deterministic) else BWD_TILES[d][1]
    ctas = -(-seqlen_k // tile_n) * req.nheads_kv * req.batch
    sms = usable_sms(req)  # (the device's count is cached: this runs on every call)
    want = max(1, -(-SPLIT_WAVES * sms // max(ctas, 1)))
    return max(s for s in range(1, group + 1) if group % s == 0 and s <= want)


def config_for(req: "AttentionRequest") -> BwdConfig:
    p = req.params
    d, hdimv = padded_hdim(req.headdim), 128 if _is_192x128(req) else 0
    partial, has_right = head_splits(req) > 1, p.window_right >= 0
    return _cached_config(DTYPES[req.dtype], d, dkv_partial=partial, has_left=p.window_left >= 0,
                          has_right=has_right, chunk=p.attention_chunk > 0, softcap=p.softcap > 0,
                          cu_seqlens_q=req.cu_seqlens_q is not None, cu_seqlens_k=req.cu_seqlens_k is not None,
                          seqused_q=req.seqused_q is not None, seqused_k=req.seqused_k is not None,
                          hdim_in=0 if d == req.headdim else req.headdim, deterministic=p.deterministic,
                          hdimv=hdimv,
                          **variants(d, p.softcap > 0, p.deterministic,
                                     local=p.window_left >= 0 or p.window_right > 0 or p.attention_chunk > 0,
                                     max_seqlen_q=_max_seqlen_q(req), hdimv=hdimv, partial=partial,
                                     has_right=has_right))


def variants(hdim: int, softcap: bool, deterministic: bool, local: bool = False, max_seqlen_q: int = 0,
             hdimv: int = 0, partial: bool = False, has_right: bool = False) -> dict:
    """The kernel variants of a head dim (BwdConfig fields): the per-head-dim defaults or the
    environment's choice. ds_stages 2 where the tile takes two sdS buffers (two Q stages, not
    split_hdim; not at hdim 64 with softcap: its 128-row tile then keeps 8-24 bytes of stack, CPU
    SASS), and with the 80-row tile; dq_red never with deterministic; tile_m 80 at hdim 128
    (`m80`, or with M80_BY_DEFAULT from M80_MIN_SEQLEN_Q rows without a window, chunk or softcap);
    dkv_transposed at hdim 192 (`dkvt`, `_takes_dkvt`); stat_regs 16 and dv_early on hdim 128's
    64-row tile, or where the environment sets them (`stat_regs`, `dv_early`: the latter on the
    64-row tiles only); dkv_smem (not with `partial`: dkv_partial's float32 partials) by default
    on every tile but the 80-row one without a right edge (`has_right`), or as the environment
    sets it (`dkv_smem`); lpt (`lpt`, by default) where there is a right edge; pdl where the
    environment sets it (`pdl`); dk_early where it sets it (`dk_early`) and dS^T is in registers."""
    if _takes_dkvt(hdim, hdimv, deterministic):
        out = dict(ds_stages=1, dq_red=True, dkv_transposed=True) | _row_stats(hdim, False, softcap, False)
        smem_default, regs_ds = True, False
    else:
        _, _, q_stages, split_hdim = BWD_TILES[hdim]
        rule = M80_BY_DEFAULT and max_seqlen_q >= M80_MIN_SEQLEN_Q and not (local or softcap)
        tile_80 = hdim == 128 and (m80 or (m80 is None and rule))
        want = (2 if hdim in DS_STAGES_2_HDIMS or tile_80 else 1) if ds_stages is None else ds_stages
        two_ok = q_stages == 2 and not split_hdim and not (hdim == 64 and softcap)
        red = hdim in DQ_RED_HDIMS if dq_red is None else dq_red
        takes_dv_early = BWD_TILES[hdim][0] == 64 and not (tile_80 or split_hdim or softcap)
        out = dict(ds_stages=want if two_ok else 1, dq_red=red and not deterministic) | \
            _row_stats(hdim, tile_80, softcap, takes_dv_early) | (dict(tile_m=80) if tile_80 else {})
        smem_default = not (tile_80 and not has_right)
        # dk_early's tiles: dS^T in registers, not the 80-row one (there: 64 bytes of stack,
        # serialized WGMMAs)
        regs_ds = not (split_hdim or tile_80)
    smem = (smem_default if dkv_smem is None else dkv_smem) and not partial
    return out | ({"dkv_smem": True} if smem else {}) | ({"lpt": True} if lpt and has_right else {}) | \
        ({"pdl": True} if pdl else {}) | ({"dk_early": True} if dk_early and regs_ds else {})


def _row_stats(hdim: int, tile_80: bool, softcap: bool, takes_dv_early: bool) -> dict:
    """stat_regs / dv_early of a config: the environment's (`stat_regs`, `dv_early`) or by default
    16 / True on hdim 128's 64-row tile without softcap (with it the unmasked one-pass step spills
    200 bytes: d tanh beside dV's early operand, CPU SASS); dv_early only where `takes_dv_early`
    (P^T in registers, 64 query rows). Fields at their defaults are left out, so other configs'
    keys stay as they were."""
    default = hdim == 128 and not tile_80 and not softcap
    regs = (STAT_REGS_BY_DEFAULT if default else 0) if stat_regs is None else stat_regs
    early = (default if dv_early is None else dv_early) and takes_dv_early
    return ({"stat_regs": regs} if regs else {}) | ({"dv_early": True} if early else {})


@functools.lru_cache(maxsize=1024)
def _cached_config(dtype: str, hdim: int, **features) -> BwdConfig:
    return BwdConfig.make(dtype, hdim, **features)


# ----------------------------------------------------------------------------- dQ's order
def dq_value_coords(tile_m: int, hdim: int, thread: int, r: int, num_wg: int = 2) -> tuple[int, int]:
    """(row, column) in a tile_m x hdim dQ block of value `r` of consumer thread `thread`
    (0 .. 128 num_wg - 1): the WGMMA accumulator layout (per warpgroup a 64 x N atom; warp w holds rows
    16w .. 16w + 15, lane l rows l / 4 and l / 4 + 8, columns 2 (l % 4) + {0, 1} of every 8;
    registers ordered (column pair element, row half, 8-column group)), with the two warpgroups
    on hdim / 2-column halves, or at tile_m 128 on 64-row halves (all hdim columns each). At
    tile_m 80 the accumulator is dQ^T (hdim x 80, bwd_sm90's dq_swap_ab): the same layout with
    head-dim rows (64 per warpgroup) and query columns. Three warpgroups (dkv_transposed): hdim /
    3-column thirds."""
    assert tile_m in (64, 80, 128) and (num_wg == 2 or tile_m == 64)
    wg, t = divmod(thread, 128)
    warp, lane = divmod(t, 32)
    e, rest = r % 2, r // 2
    half, group = rest % 2, rest // 2
    row = 16 * warp + 8 * half + lane // 4
    col = 8 * group + 2 * (lane % 4) + e
    if tile_m == 128:
        return row + wg * 64, col
    if tile_m == 80:
        return col, row + wg * 64
    return row, col + wg * (hdim // num_wg)


@functools.lru_cache(maxsize=None)
def _dq_source_cpu(tile_m: int, hdim: int, num_wg: int = 2) -> torch.Tensor:
    per_thread = tile_m * hdim // (128 * num_wg)
    src = torch.empty(tile_m * hdim, dtype=torch.long)
    for thread in range(128 * num_wg):
        wg, t = divmod(thread, 128)
        for r in range(per_thread):
            row, col = dq_value_coords(tile_m, hdim, thread, r, num_wg)
            # bwd_sm90's sdQ: per warpgroup, 16-byte vectors of 4 values, threads fastest
            src[row * hdim + col] = wg * 128 * per_thread + (r // 4) * 512 + t * 4 + r % 4
    return src


def dq_fragment_order(tile_m: int, hdim: int, device, num_wg: int = 2) -> torch.Tensor:
    """For each (row * hdim + column) of a dQ block, its index in the accumulator's chunk (the
    kernel's num_wg consumer warpgroups' order)."""
    return _dq_source_on(tile_m, hdim, torch.device(device), num_wg)


@functools.lru_cache(maxsize=64)
def _dq_source_on(tile_m: int, hdim: int, device: torch.device, num_wg: int) -> torch.Tensor:
    return _dq_source_cpu(tile_m, hdim, num_wg).to(device)


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
    if req.seqused_q is not None:  # rows past seqused_q are padding, as the kernel writes them
        used = _used_rows(req)  # (total,) or (b, s)
        lse_log2 = torch.where(used[None] if req.packed_q else used[:, None], lse_log2, math.inf)
        rowsum = rowsum * used[..., None]
    if req.packed_q:
        lse2[:, row_index] = lse_log2
        dpsum[:, row_index] = rowsum.t()
    else:
        sq = req.q.shape[1]
        lse2[..., :sq] = lse_log2
        dpsum[..., :sq] = rowsum.transpose(1, 2)
    dq_acc = torch.zeros((*lead, rows * cfg.hdim), dtype=torch.float32, device=dev)
    return lse2, dpsum, dq_acc


def semaphores(req: "AttentionRequest", cfg: BwdConfig) -> Optional[torch.Tensor]:
    """deterministic: one zeroed int32 counter per (head, query block) of the padded rows."""
    if not cfg.deterministic:
        return None
    lead = (req.nheads,) if req.packed_q else (req.q.shape[0], req.nheads)
    return torch.zeros((*lead, padded_rows(req, cfg.tile_m) // cfg.tile_m), dtype=torch.int32, device=req.device)


def postprocess(req: "AttentionRequest", cfg: BwdConfig, dq_acc: torch.Tensor, row_index: Optional[torch.Tensor]):
    """dQ (req.q's shape and dtype) from the accumulator."""
    d, tm = req.headdim, cfg.tile_m
    src = dq_fragment_order(tm, cfg.hdim, dq_acc.device, cfg.num_mma_wg)
    *lead, flat = dq_acc.shape
    blocks = dq_acc.view(*lead, flat // (tm * cfg.hdim), tm * cfg.hdim).index_select(-1, src)
    rows = blocks.view(*lead, -1, cfg.hdim)[..., :d] * req.params.softmax_scale
    if req.packed_q:
        dq = rows[:, row_index].transpose(0, 1)  # (total, h, d)
    else:
        dq = rows[:, :, :req.q.shape[1]].transpose(1, 2)  # (b, s, h, d)
    if req.seqused_q is not None:  # rows past seqused_q are no sequence's: zero
        dq = dq * _used_rows(req)[..., None, None]
    return dq.to(req.dtype).contiguous()


def _used_rows(req: "AttentionRequest") -> torch.Tensor:
    """With seqused_q: which query rows (packed (total,) or batched (b, s)) are in their sequence."""
    used = req.seqused_q.to(torch.long)
    if req.packed_q:
        cu = req.cu_seqlens_q.to(torch.long)
        rows = torch.arange(req.q.shape[0], device=cu.device)
        batch = torch.searchsorted(cu[1:], rows, right=True)
        return rows - cu[batch] < used[batch]
    return torch.arange(req.q.shape[1], device=used.device)[None] < used[:, None]


# ----------------------------------------------------------------------------- run
def run(req: "AttentionRequest", out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
        cfg: Optional[BwdConfig] = None):
    """(dq, dk, dv) of `req` given the forward's out / lse and the gradient dout. On CUDA the
    pre / post steps are bwd_prepost's kernels; elsewhere (CPU emulation tests) their torch
    form here."""
    from cute_kernels.launch import _tma_ready, q_empty_or_no_keys

    cfg = cfg or config_for(req)
    if q_empty_or_no_keys(req):
        return torch.zeros_like(req.q), torch.zeros_like(req.k), torch.zeros_like(req.v)
    q, k, v, do = (_tma_ready(t.detach()) for t in (req.q, req.k, req.v, dout))
    on_gpu = req.device.type == "cuda"
    row_index = None if on_gpu or not req.packed_q else packed_row_index(req, cfg.tile_m)
    if on_gpu:
        lse2, dpsum, dq_acc = launch_preprocess(req, cfg, _tma_ready(out.detach()), do, lse)
    else:
        lse2, dpsum, dq_acc = preprocess(req, cfg, out, lse, dout, row_index)
    # keys no CTA writes (past seqused_k) must read as zero
    new = torch.zeros if req.seqused_k is not None else torch.empty
    splits = head_splits(req) if cfg.dkv_partial else 1
    if cfg.dkv_partial:  # float32 partials, split s of KV head h at head h * splits + s
        dk = new((*k.shape[:-2], k.shape[-2] * splits, k.shape[-1]), dtype=torch.float32, device=k.device)
        dv = new((*v.shape[:-2], v.shape[-2] * splits, v.shape[-1]), dtype=torch.float32, device=v.device)
    else:
        dk = new(k.shape, dtype=k.dtype, device=k.device)
        dv = new(v.shape, dtype=v.dtype, device=v.device)
    launch_kernel(req, cfg, q, k, v, do, dk, dv, lse2, dpsum, dq_acc, semaphores(req, cfg), splits)
    if cfg.dkv_partial:
        dk = dk.unflatten(-2, (k.shape[-2], splits)).sum(-2).to(k.dtype)
        dv = dv.unflatten(-2, (v.shape[-2], splits)).sum(-2).to(v.dtype)
    dq = launch_postprocess(req, cfg, dq_acc) if on_gpu else postprocess(req, cfg, dq_acc, row_index)
    return dq, dk, dv


def _call(cfg, dev: torch.device, *args):
    from cute_kernels import launch

    fn = launch.kernels.get((cfg, True)) or launch.compile_kernel(cfg)
    with torch.cuda.device(dev) if dev.index != torch.cuda.current_device() else launch._SAME_DEVICE:
        fn(*args)


def _max_seqlen_q(req: "AttentionRequest") -> int:
    from cute_kernels.launch import _seqlens

    return _seqlens(req)[0]


def launch_preprocess(req: "AttentionRequest", cfg: BwdConfig, out, dout, lse):
    """bwd_prepost's preprocessing kernel: (LSE_log2, dPsum, zeroed dQ accumulator). Rows of
    blocks past a sequence's last are left unwritten: no kernel reads them."""
    from cute_kernels.bwd_prepost import BwdRowsConfig

    dev, h, rows = req.device, req.nheads, padded_rows(req, cfg.tile_m)
    lead = (h,) if req.packed_q else (req.q.shape[0], h)
    lse2 = torch.empty((*lead, rows), dtype=torch.float32, device=dev)
    dpsum = torch.empty_like(lse2)
    dq_acc = torch.empty((*lead, rows * cfg.hdim), dtype=torch.float32, device=dev)
    cu_q, _, su_q, _ = sequence_tensors(req)
    _call(BwdRowsConfig.of("pre", cfg), dev, out, dout, lse if lse.stride(-1) == 1 else lse.contiguous(), lse2,
          dpsum, dq_acc, cu_q, su_q, _max_seqlen_q(req))
    return lse2, dpsum, dq_acc


def launch_postprocess(req: "AttentionRequest", cfg: BwdConfig, dq_acc):
    """bwd_prepost's postprocessing kernel: dQ in req.q's shape and dtype."""
    from cute_kernels.bwd_prepost import BwdRowsConfig

    # rows past seqused_q are no sequence's: zero
    dq = (torch.zeros if req.seqused_q is not None else torch.empty)(req.q.shape, dtype=req.dtype, device=req.device)
    cu_q, _, su_q, _ = sequence_tensors(req)
    _call(BwdRowsConfig.of("post", cfg, dq_smem=post_dq_smem), req.device, dq_acc, dq, cu_q, su_q,
          req.params.softmax_scale,
          _max_seqlen_q(req))
    return dq


def kernel_scalars(req: "AttentionRequest") -> tuple:
    """The kernel's scalar arguments: (scale_log2, softcap_premul, softmax_scale, window_left,
    window_right, attention_chunk, max_seqlen_k) (attention_chunk 0: none; the kernel reads it
    where cfg.chunk); the score scalars are the forward's (launch.score_scalars)."""
    from cute_kernels import launch

    p = req.params
    return (*launch.score_scalars(p), p.softmax_scale, p.window_left, p.window_right, p.attention_chunk,
            launch._seqlens(req)[1])


def sequence_tensors(req: "AttentionRequest") -> list:
    """The kernel's int32 (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k), None where absent."""
    from cute_kernels import launch

    return [launch._int32(t) for t in (req.cu_seqlens_q, req.cu_seqlens_k, req.seqused_q, req.seqused_k)]


def launch_kernel(req: "AttentionRequest", cfg: BwdConfig, q, k, v, do, dk, dv, lse2, dpsum, dq_acc, sem=None,
                  splits: int = 1):
    """Run the compiled backward kernel (the test hook: a CPU emulation may replace it). dk / dv:
    the tensors' shape and dtype, or (cfg.dkv_partial) float32 with `splits` heads per KV head;
    `sem`: deterministic's zeroed semaphores."""
    from cute_kernels import launch

    _call(cfg, q.device, q, k, v, do, dk, dv, lse2, dpsum, dq_acc, sem, *sequence_tensors(req),
          *kernel_scalars(req), splits, launch.usable_sms(req))
