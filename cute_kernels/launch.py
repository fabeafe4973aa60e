"""Host side of the sm90 forward: config choice, tensor layout, compile and kernel caches, launch.

Compiled kernels are cached in memory per `FwdConfig` (`kernels`) and, on the TVM-FFI path, on
disk across processes (`disk_cache`: FA3PY_CACHE_DIR); `last_compile_seconds` holds the time of
the most recent compile (also logged at DEBUG level).

Calling path: when the optional `apache-tvm-ffi` package is importable (and CUTE_KERNELS_TVM_FFI
is not "0"), kernels are compiled once against symbolic-shape fake tensors with
`--enable-tvm-ffi` and called with the torch tensors and Python scalars directly, on torch's
current stream (a few microseconds of host time). Otherwise every call converts its tensors with
`from_dlpack(...).mark_layout_dynamic()` (~25 us per tensor on a slow host CPU).

Switches (module attributes; tests and benchmarks may set them): `use_tvm_ffi`,
`pack_gqa_enabled` (FA3PY_CUTE_PACK_GQA), `split_kv_setting` (FA3PY_CUTE_NUM_SPLITS).
Test hook: `run` calls the kernel through `launch_kernel`, which a test may replace (e.g. by a
CPU emulation of the kernel) to check the host-side layout work without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Callable, Optional

import torch

from cute_kernels import disk_cache
from cute_kernels.config import (DECODE_TILE, FP8_VT_UNROLL_MAX_HDIMV, PAGE_ROWS_MULTIPLE, SUPPORTED_HDIM_PAIRS,
                                 BwdConfig, FwdConfig, decode_tile_ok, is_long_causal, is_medium, is_short,
                                 num_splits_for, pack_gqa_factor, padded_hdim, padded_hdim_v, page_size_ok,
                                 short_first_width)

if TYPE_CHECKING:
    from fa3py.request import AttentionRequest

log = logging.getLogger(__name__)

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _tvm_ffi_available() -> bool:
    """tvm_ffi importable, and torch exposes the DLPack C exchange API (natively, or through
    torch_c_dlpack_ext) that gives tvm_ffi fast tensor conversion and torch's current stream."""
    if os.environ.get("CUTE_KERNELS_TVM_FFI", "1") == "0" or importlib.util.find_spec("tvm_ffi") is None:
        return False
    native = any(hasattr(torch.Tensor, a) for a in ("__dlpack_c_exchange_api__", "__c_dlpack_exchange_api__"))
    return native or importlib.util.find_spec("torch_c_dlpack_ext") is not None


use_tvm_ffi: bool = _tvm_ffi_available()  # compiled kernels are cached per path
# Rows of the M tile that GQA packing aims to fill (config.pack_gqa_factor); the tables' tiles
# have 128 or 192. FA3PY_CUTE_PACK_GQA=0 turns packing off (for A/B measurements).
PACK_TILE_M = 128
pack_gqa_enabled: bool = os.environ.get("FA3PY_CUTE_PACK_GQA", "1") != "0"
# Decoding (one query tile per (batch, head)) without the dynamic scheduler (config_for); H200,
# CUDA-graph replays of flash_attn_with_kvcache (hdim 128, 32 / 8 heads): batch 1 with 4k keys
# 13.9 against 15.3 us, 16k 27.1 / 29.3, batch 8 with 4k 42.0 / 43.8 (results/2026-12-06_h100_dkvt).
# FA3PY_CUTE_DECODE_STATIC=0 keeps the dynamic scheduler (A/B measurements).
decode_static: bool = os.environ.get("FA3PY_CUTE_DECODE_STATIC", "1") != "0"
# Decoding on config.DECODE_TILE (one 64-row consumer warpgroup, 64-key blocks, two CTAs an SM)
# where a tile's GQA-packed query rows fit 64 rows and its keys are split (config_for). H100, CUDA
# graphs, hdim 128, 32 / 8 heads (benchmarks/results/2026-12-06_h100_795064c): batch 1, 4k keys 19.2 -> 18.1 us
# (the kernel 8.8 -> 6.8 us; cuDNN's 6.2), 16k 40.6 -> 39.4, batch 8 4k 64.1 -> 63.0; GPU tests
# with it: 163 passed. FA3PY_CUTE_DECODE_TILE=0: the head dim's table tile.
decode_tile_enabled: bool = os.environ.get("FA3PY_CUTE_DECODE_TILE", "1") != "0"
# Split-KV: "auto" or "0" (config.num_splits_for), or a count used for every call (1: never split;
# more than a tile has KV blocks leaves splits empty): for tests and A/B measurements.
split_kv_setting: str = os.environ.get("FA3PY_CUTE_NUM_SPLITS", "auto").strip().lower()
if split_kv_setting not in ("auto", "0") and not split_kv_setting.isdigit():
    raise ValueError(f"FA3PY_CUTE_NUM_SPLITS must be 'auto' or an int >= 0, got {split_kv_setting!r}")


# ----------------------------------------------------------------------------- config
def _seqlens(req: "AttentionRequest") -> tuple[int, int]:
    """(max query rows, max keys) of a sequence."""
    return (req.max_seqlen_q if req.packed_q else req.q.shape[1],
            req.max_seqlen_k if req.packed_k or req.paged else req.k.shape[1])


def config_for(req: "AttentionRequest", dtype: Optional[str] = None, **format_fields) -> FwdConfig:
    """The default config (FwdConfig.make) for `req`, split-KV where `num_splits` splits; `dtype`
    (default: the tensors') and `format_fields` for FP8 (`fp8_config_for`)."""
    p = req.params
    seqlen_q, seqlen_k = _seqlens(req)
    pack = pack_gqa_factor(req.nheads // req.nheads_kv, seqlen_q, PACK_TILE_M) if pack_gqa_enabled else 1
    has_right = p.window_right >= 0
    d, dv = padded_hdim(req.headdim), padded_hdim_v(req.headdim_v, req.qv is not None)
    decode = (decode_tile_enabled and seqlen_q * pack <= DECODE_TILE.tile_m
              and decode_tile_ok(dtype or DTYPES[req.dtype], d, dv, req.qv is not None)
              and (not req.paged or page_size_ok(req.page_size, DECODE_TILE.tile_n)))
    make = functools.partial(
        _cached_config, dtype or DTYPES[req.dtype], d, dv,
        has_left=p.window_left >= 0, has_right=has_right, chunk=p.attention_chunk > 0, softcap=p.softcap > 0,
        cu_seqlens_q=req.cu_seqlens_q is not None, cu_seqlens_k=req.cu_seqlens_k is not None,
        seqused_q=req.seqused_q is not None, seqused_k=req.seqused_k is not None,
        short=is_short(has_right, seqlen_q * pack, seqlen_k), medium=is_medium(has_right, seqlen_k),
        long_causal=is_long_causal(has_right, seqlen_q * pack),
        pack_gqa=pack, hdim_in=0 if d == req.headdim else req.headdim,
        hdimv_in=0 if dv == req.headdim_v else req.headdim_v, page_size=req.page_size,
        **({"qv": True} if req.qv is not None else {}), **format_fields,
    )
    if decode and num_splits(req, make(split_kv=False, decode=True)) > 1:
        # (where decoding splits its keys, as timed: batch 1-8; at batch 64 the grid fills the GPU
        # without splits, and the table tile keeps it)
        return make(split_kv=True, decode=True)
    cfg = make(split_kv=False)
    width = short_first_width(cfg.tile, 0 if req.packed_k or req.paged or req.seqused_k is not None else seqlen_k)
    if width != cfg.tile.short_first:  # (every sequence ends in a block of 65-128 keys: config.py)
        make = functools.partial(make, short_first=width)
        cfg = make(split_kv=False)
    if cfg.tile.dynamic and decode_static and seqlen_q * pack <= cfg.tile.tile_m:
        # One query tile per (batch, head), as in decoding: every CTA takes one tile and every
        # tile is the same length, so the dynamic scheduler's counter (a memset node in a CUDA
        # graph, an atomic per CTA) buys no balance.
        make = functools.partial(make, dynamic=False)
        cfg = make(split_kv=False)
    return make(split_kv=True) if num_splits(req, cfg) > 1 else cfg  # same tile


@functools.lru_cache(maxsize=4096)  # config_for runs on every call
def _cached_config(dtype: str, hdim: int, hdimv: int, **features) -> FwdConfig:
    return FwdConfig.make(dtype, hdim, hdimv, **features)


def num_splits(req: "AttentionRequest", cfg: FwdConfig) -> int:
    """KV splits for `req` with `cfg`'s tile: split_kv_setting when not "auto", else the call's
    num_splits when not 0 (FA3's argument; at most the KV blocks a tile has, beyond which splits
    would be empty partials to allocate and combine), else config.num_splits_for."""
    if split_kv_setting not in ("auto", "0"):
        return int(split_kv_setting)
    seqlen_q, seqlen_k = _seqlens(req)
    n_blocks = -(-seqlen_k // cfg.tile.tile_n)
    if cfg.chunk:
        n_blocks = min(n_blocks, chunk_blocks(req.params.attention_chunk, cfg.tile.tile_m, cfg.pack_gqa,
                                              cfg.tile.tile_n))
    if req.params.num_splits > 0:
        return max(1, min(req.params.num_splits, n_blocks))
    g = cfg.pack_gqa
    batch = req.cu_seqlens_q.shape[0] - 1 if req.packed_q else req.q.shape[0]
    tiles = -(-seqlen_q * g // cfg.tile.tile_m) * (req.nheads // g) * batch
    # (SMs once, also for DECODE_TILE's two CTAs an SM: H100, batch 1 / 8 with 1-4 queries, 4k-64k
    # keys, the count for one CTA an SM (16 / 2) was 0.4-3% faster than for two (32 / 4);
    # benchmarks/results/2026-12-06_h100_795064c/decode_tile_splits.md)
    return num_splits_for(tiles, n_blocks, usable_sms(req))


def chunk_blocks(chunk: int, tile_m: int, g: int, tile_n: int) -> int:
    """At most the KV blocks a tile visits under attention_chunk `chunk` (a tile's length for
    split-KV's choice): its rows' positions lie at most (tile_m - 1) // g + 1 apart, and its keys
    run from the first one's chunk start (at most chunk - 1 before it) to the last one's chunk
    end (at most chunk after it); a run of keys touches one block more than its length in blocks
    where it starts inside one."""
    keys = (tile_m - 1) // g + 1 + 2 * chunk
    return -(-keys // tile_n) + 1


# ----------------------------------------------------------------------------- GQA packing
def pack_rows(t: torch.Tensor, g: int) -> torch.Tensor:
    """(..., rows, heads, d) -> (..., rows * g, heads / g, d): query head kh * g + i of row r
    becomes head kh of row r * g + i (a view for MQA, heads == g, or one row; else a copy)."""
    *lead, rows, heads, d = t.shape
    if rows == 1:  # decoding: the same view in one op (this runs on every call)
        *lead_strides, _, s_h, s_d = t.stride()
        return t.as_strided((*lead, g, heads // g, d), (*lead_strides, s_h, g * s_h, s_d))
    return t.view(*lead, rows, heads // g, g, d).transpose(-3, -2).reshape(*lead, rows * g, heads // g, d)


def unpack_rows(t: torch.Tensor, g: int) -> torch.Tensor:
    """`pack_rows`'s inverse, contiguous (a reshape can return a view with other strides)."""
    *lead, rows_g, kv_heads, d = t.shape
    t = t.view(*lead, rows_g // g, g, kv_heads, d).transpose(-3, -2)
    return t.reshape(*lead, rows_g // g, kv_heads * g, d).contiguous()


def unpack_lse(t: torch.Tensor, g: int) -> torch.Tensor:
    """The packed kernel's LSE (..., kv_heads, rows * g) -> (..., kv_heads * g, rows), contiguous
    as FA3 returns it. With one KV head the reshape alone is a view whose rows have stride g:
    a consumer that assumed unit row stride (the Triton backward did) read other rows' LSE."""
    *lead, kv_heads, rows_g = t.shape
    t = t.view(*lead, kv_heads, rows_g // g, g).transpose(-1, -2)
    return t.reshape(*lead, kv_heads * g, rows_g // g).contiguous()


def pack_lse(t: torch.Tensor, g: int) -> torch.Tensor:
    """`unpack_lse`'s inverse: (..., heads, rows) -> (..., heads / g, rows * g)."""
    *lead, heads, rows = t.shape
    if rows == 1:  # decoding: the same view in one op
        *lead_strides, s_h, _ = t.stride()
        return t.as_strided((*lead, heads // g, g), (*lead_strides, g * s_h, s_h))
    return t.view(*lead, heads // g, g, rows).transpose(-1, -2).reshape(*lead, heads // g, rows * g)


def _packed_lse_shape(req: "AttentionRequest", g: int) -> tuple:
    """req.lse_shape with heads / g and rows * g."""
    *lead, heads, rows = req.lse_shape
    return (*lead, heads // g, rows * g)


# ----------------------------------------------------------------------------- run
def run(req: "AttentionRequest", cfg: FwdConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward` with an explicit config (tests and benchmarks override tiles/schedules)."""
    if q_empty_or_no_keys(req):
        return _empty_result(req)
    return _run_kernel(req, cfg, req.q, req.k, req.v, req.out_dtype)


def _empty_result(req: "AttentionRequest") -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(req.out_shape, dtype=req.out_dtype, device=req.device),
            torch.full(req.lse_shape, -math.inf, dtype=torch.float32, device=req.device))


def _run_kernel(req: "AttentionRequest", cfg: FwdConfig, q, k, v, out_dtype: torch.dtype,
                **kernel_args) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on q, k, v (req's shapes; FP8: e4m3, V^T) with GQA packing (cfg.pack_gqa) and
    split-KV (cfg.split_kv: float32 partials, then `combine_splits`); `kernel_args` (FP8's scales
    and constants) go to `launch_kernel`, with req.qv laid out as q where cfg.qv. Returns (out in
    out_dtype, lse) in req's layouts."""
    g = cfg.pack_gqa
    q = pack_rows(q, g) if g > 1 else q
    q, k, v = (_tma_ready(t) for t in (q, k, v))
    if cfg.qv:  # MLA's qv: packed and laid out as q
        kernel_args["qv"] = _tma_ready(pack_rows(req.qv, g) if g > 1 else req.qv)
    padded_rows = req.packed_q or req.seqused_q is not None
    dev = q.device
    # With one query row (decoding) the packed layout is a view of the caller's: the kernel
    # writes out and LSE in place (no copies, no extra launches). Else it gets packed buffers,
    # unpacked after it, or with split-KV the combine writes the caller's layout itself.
    in_place = g == 1 or req.q.shape[-3] == 1
    packed_out, packed_lse = (*q.shape[:-1], req.headdim_v), _packed_lse_shape(req, g)
    unpacked = in_place or cfg.split_kv

    def outputs(out_shape, lse_shape, dtype):
        out = (torch.zeros if padded_rows else torch.empty)(out_shape, dtype=dtype, device=dev)
        # Without padded rows every LSE entry is written by the kernel (-inf for an empty row).
        lse = (torch.full(lse_shape, -math.inf, dtype=torch.float32, device=dev) if padded_rows
               else torch.empty(lse_shape, dtype=torch.float32, device=dev))
        return out, lse

    out, lse = outputs(*((req.out_shape, req.lse_shape) if unpacked else (packed_out, packed_lse)),
                       out_dtype)
    k_out, k_lse = (pack_rows(out, g), pack_lse(lse, g)) if g > 1 and in_place else (out, lse)
    if cfg.split_kv:
        from cute_kernels.combine import combine_splits  # (imports Triton: only where split)

        # float32 partials, the splits folded into the first dim of out / the last of LSE.
        splits = num_splits(req, cfg)
        o_part, lse_part = outputs((splits * packed_out[0], *packed_out[1:]),
                                   (*packed_lse[:-1], splits * packed_lse[-1]) if req.packed_q
                                   else (splits * packed_lse[0], *packed_lse[1:]), torch.float32)
        launch_kernel(req, cfg, q, k, v, o_part, lse_part, splits, **kernel_args)
        combine_splits(o_part, lse_part, splits, req.packed_q, k_out, k_lse, 1 if in_place else g)
    else:
        launch_kernel(req, cfg, q, k, v, k_out, k_lse, **kernel_args)
    return (out, lse) if unpacked else (unpack_rows(out, g), unpack_lse(lse, g))


def q_empty_or_no_keys(req: "AttentionRequest") -> bool:
    k = req.k
    if req.paged:
        return req.q.numel() == 0 or req.max_seqlen_k == 0 or k.shape[0] == 0
    return req.q.numel() == 0 or k.shape[-3] == 0 or (not req.packed_k and k.shape[0] == 0)


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """TMA needs a unit last stride, 16-byte strides and a 16-byte aligned base."""
    per_16b = 16 // t.element_size()  # elements in 16 bytes: 8 for bf16 / fp16, 16 for e4m3
    ok = (t.stride(-1) == 1 and all(s % per_16b == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0)
    return t if ok else t.contiguous()


def _int32(t: Optional[torch.Tensor], times: int = 1) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.to(torch.int32).contiguous()
    return t * times if times > 1 else t


def sequence_args(req: "AttentionRequest", q: torch.Tensor, g: int) -> tuple:
    """The kernel's max_seqlen_q and its int32 (cu_seqlens_q, cu_seqlens_k, seqused_q,
    seqused_k): on the query side in rows of `q` (positions times g with GQA packing)."""
    max_seqlen_q = req.max_seqlen_q * g if req.packed_q else q.shape[1]
    return max_seqlen_q, [_int32(req.cu_seqlens_q, g), _int32(req.cu_seqlens_k), _int32(req.seqused_q, g),
                          _int32(req.seqused_k)]


def usable_sms(req: "AttentionRequest") -> int:
    """The SMs the kernels' persistent grid and heuristics count (`AttentionRequest.usable_sms`:
    the device's less sm_margin), an H100's 132 where there is no GPU (CPU tests of the host code)."""
    return req.usable_sms(without_gpu=132)


# ----------------------------------------------------------------------------- dynamic scheduler
def _current_stream_handle(dev: torch.device) -> int:
    """torch's current stream on `dev` as a raw handle, read as inductor's generated code reads
    it: torch.cuda.current_stream(dev) builds a Stream object per call (a few us of host time)."""
    return torch._C._cuda_getCurrentRawStream(dev.index)


class TileCounters:
    """The dynamic scheduler's counters (tiles taken, CTAs done), one int32 pair per (device,
    stream): zero at launch, and the kernel's last CTA zeroes them again, so one buffer per stream
    serves every call without a memset (calls on one stream run in order; another stream gets its
    own). Under CUDA graph capture a fresh zeroed buffer per call, so the memset is part of the
    graph. At most `max_streams` buffers are kept, the least recently used forgotten."""

    def __init__(self, max_streams: int = 64,
                 stream_handle: Callable[[torch.device], int] = _current_stream_handle):
        self.max_streams = max_streams
        self.stream_handle = stream_handle
        self.buffers: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()

    def __call__(self, dev: torch.device) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(2, dtype=torch.int32, device=dev)
        key = (dev.index, self.stream_handle(dev))
        counter = self.buffers.get(key)
        if counter is None:
            counter = self.buffers[key] = torch.zeros(2, dtype=torch.int32, device=dev)
            if len(self.buffers) > self.max_streams:
                # The least recently used stream's buffer: its memory returns to that stream's
                # pool (stream-ordered), so a kernel still running on it is not disturbed.
                self.buffers.popitem(last=False)
        else:
            self.buffers.move_to_end(key)
        return counter


tile_counters = TileCounters()


# ----------------------------------------------------------------------------- compile, launch
last_compile_seconds: Optional[float] = None
kernels: dict = {}  # (FwdConfig, tvm_ffi) -> compiled kernel; clear it to act as a new process


def kernel_class(cfg):
    """The kernel class a config compiles: the forward's, the backward's, or (BwdRowsConfig, in
    bwd_prepost: imported only for those) the backward's pre- / post-processing."""
    if isinstance(cfg, FwdConfig):
        from cute_kernels.fwd_sm90 import FlashAttentionForwardSm90

        return FlashAttentionForwardSm90
    if isinstance(cfg, BwdConfig):
        from cute_kernels.bwd_sm90 import FlashAttentionBackwardSm90

        return FlashAttentionBackwardSm90
    from cute_kernels.bwd_prepost import BwdPostprocessSm90, BwdPreprocessSm90, BwdRowsConfig

    if isinstance(cfg, BwdRowsConfig):
        return BwdPreprocessSm90 if cfg.kind == "pre" else BwdPostprocessSm90
    raise TypeError(f"cute_kernels: no kernel compiles a {type(cfg).__name__}")


def compile_kernel(cfg, args: Optional[tuple] = None):
    """Compile `cfg` for the TVM-FFI path (args None: symbolic fake tensors; loaded from the disk
    cache when there) or for the from_dlpack path (args: a call's converted arguments, marked
    dynamic), and keep it in `kernels`."""
    global last_compile_seconds
    import cutlass.cute as cute

    tvm_ffi = args is None
    fn = disk_cache.load(cfg) if tvm_ffi else None
    if fn is None:
        t0 = time.perf_counter()
        kernel = kernel_class(cfg)(cfg)
        if tvm_ffi:
            fn = cute.compile(kernel, *kernel.fake_args(cfg, env_stream=True), options="--enable-tvm-ffi")
            disk_cache.store(cfg, fn)
        else:
            fn = cute.compile(kernel, *args)
        last_compile_seconds = time.perf_counter() - t0
        log.debug("cute_kernels: compiled %s (tvm-ffi %s) in %.1fs", cfg.short(), tvm_ffi, last_compile_seconds)
    kernels[cfg, tvm_ffi] = fn
    return fn


def _cute(t: Optional[torch.Tensor], align: int = 16):
    from cutlass.cute.runtime import from_dlpack

    if t is None:
        return None
    return from_dlpack(t.detach(), assumed_align=align).mark_layout_dynamic(leading_dim=t.ndim - 1)


_SAME_DEVICE = contextlib.nullcontext()


def score_scalars(p) -> tuple[float, float]:
    """(scale_log2, softcap_premul) of 16-bit scores, as the forward and backward kernels take
    them: with softcap the scores are softcap * tanh(qk * premul) and scale_log2 = softcap *
    log2(e), else scale_log2 = softmax_scale * log2(e) and premul = 1."""
    if p.softcap > 0:
        return p.softcap * math.log2(math.e), p.softmax_scale / p.softcap
    return p.softmax_scale * math.log2(math.e), 1.0


def launch_kernel(req: "AttentionRequest", cfg: FwdConfig, q, k, v, out, lse, num_splits: int = 1,
                  fp8_scales: tuple = (None, None, None), fp8_constants: Optional[tuple] = None,
                  qv: Optional[torch.Tensor] = None):
    """Run the compiled kernel on tensors laid out for it (rows packed by cfg.pack_gqa); `run`'s
    (and `run_fp8`'s) only call into the kernel (the module docstring's test hook). FP8:
    `fp8_scales` = the Q, K, V scale tensors (unpacked: the kernel finds a packed row's query
    head and position), `fp8_constants` = (c, cap) (fa3py.fp8.format.score_constants: the
    multiplier's constant, and softcap * log2(e) after the tanh). `qv`: MLA's qv laid out as q
    (cfg.qv)."""
    p, dev, g = req.params, q.device, cfg.pack_gqa

    scale_log2, premul = fp8_constants if fp8_constants is not None else score_scalars(p)
    max_seqlen_q, ints = sequence_args(req, q, g)
    if max_seqlen_q == 0:
        return out, lse
    ints.append(_int32(req.page_table))  # paged: the pages of each sequence (k, v: the page pools)
    ints.append(tile_counters(dev) if cfg.tile.dynamic else None)
    ints.extend(fp8_scales)
    qv = qv.detach() if qv is not None and qv.requires_grad else qv
    scalars = (scale_log2, premul, p.window_left, p.window_right, p.attention_chunk, max_seqlen_q, usable_sms(req), 1,
               num_splits)
    tvm_ffi = use_tvm_ffi
    fn = kernels.get((cfg, tvm_ffi))
    if tvm_ffi:
        tensors = [t.detach() if t.requires_grad else t for t in (q, k, v)]
        if fn is None:
            fn = compile_kernel(cfg)
        with torch.cuda.device(dev) if dev.index != torch.cuda.current_device() else _SAME_DEVICE:
            fn(*tensors, out, lse, *ints, qv, *scalars)
        return out, lse

    import cuda.bindings.driver as cuda
    import cutlass

    args = (
        _cute(q), _cute(k), _cute(v), _cute(out), _cute(lse, 4), *(_cute(t, 4) for t in ints), _cute(qv),
        *map(cutlass.Float32, scalars[:2]), *map(cutlass.Int32, scalars[2:]),
        cuda.CUstream(torch.cuda.current_stream(dev).cuda_stream),
    )
    if fn is None:
        fn = compile_kernel(cfg, args)
    fn(*args)
    return out, lse


# ----------------------------------------------------------------------------- FP8
# The FP8 kernel serves FP8 requests on sm90 by default: with its current tiles and format
# (config.fp8_tile, channel V) its GPU tests passed on an H100 and an H200 (2026-12-05).
# FA3PY_CUTE_FP8=0 turns it off (fp8=True then runs the PyTorch emulation on Hopper).
fp8_enabled = os.environ.get("FA3PY_CUTE_FP8", "1") != "0"
# Paged K / V read by the kernel (FwdConfig.page_size), on by default: tests/test_kvcache.py's GPU
# tests pass on an H100 (19, 2026-12-05, after the setmaxnreg split of the paged configs became
# 32 + 2 x 232: 32 + 2 x 240 asked for more than the CTA launched with and stalled), and decoding
# from pages (hdim 128, batch 8, 32 / 8 heads, CUDA graphs) takes 0.114 / 0.374 ms at 8k / 32k
# keys against 0.90 / 3.43 ms when the pages are gathered first (cuDNN on contiguous K / V: 0.107 /
# 0.366). FA3PY_CUTE_PAGED=0: flash_attn_with_kvcache gathers the pages into a contiguous prefix.
paged_enabled = os.environ.get("FA3PY_CUTE_PAGED", "1") != "0"
# FA3's float8 inputs read by the kernel as they are: V in its rows, transposed by the producer
# warpgroup in shared memory (FwdConfig.fp8_v_rows), and the descales read once per tile
# (FwdConfig.fp8_descales), instead of a transposing copy of V and three scale tensors filled
# before each call (4 launches besides the kernel's). Quantized operands whose V is in rows and
# paged float8 caches take fp8_v_rows always (their only kernel path). For FA3's contiguous
# inputs the copy costs V's bytes twice once per call and the transpose in the kernel a share of
# every block's time (the producer warps' issue slots beside the consumers'), so V's rows win
# where few queries read each V element: up to FP8_V_ROWS_MAX_QUERIES query rows per KV head
# (seqlen_q x the GQA group, halved when causal: a key is read by half the rows). H100, CUDA
# graphs, 16k tokens, copy-V / V's rows alternated in one process (2026-12-06_h100_vt_pairs, the
# transposer's pairs at hdim 256): hdim 256 2k 999 / 1008 TFLOP/s, causal 716 / 803, 4k causal
# (2048 rows counted) 906 / 887, 4k 1087 / 1000, 8k causal 1009 / 932; hdim 128 4k causal 718 /
# 727, 4k 810 / 778, 8k causal 795 / 766; at 512 tokens V's rows win at every head dim
# (2026-12-05_h100_ldsm). fp8_direct_enabled: None (that rule), True (always V's rows:
# FA3PY_CUTE_FP8_DIRECT=1), False (never: 0; quantized V rows then go to the emulation and
# float8 pages are gathered).
fp8_direct_enabled = {"1": True, "0": False}.get(os.environ.get("FA3PY_CUTE_FP8_DIRECT", ""))
FP8_V_ROWS_MAX_QUERIES = 2048
# FwdConfig.fp8_v_rows_half: half-block staging of V's rows where two whole blocks do not fit
# (hdim 256): its GPU tests pass (H100, 15 hdim-256 cases) and it is faster (16k: 826 / 864
# TFLOP/s against 769 / 862 with one whole-block stage; 2k: 891 / 741 against 806 / 735).
fp8_v_half_enabled = os.environ.get("FA3PY_CUTE_FP8_V_HALF", "1") != "0"
# FwdConfig.fp8_vt_pairs: the V transposer's jobs two at a time (both loads first; FwdConfig.make
# sets it above hdim_v 128, where it was timed faster; its 84 FP8 GPU tests pass with it on at
# every head dim). fp8_vt_pairs_enabled: None (make's rule), True / False (FA3PY_CUTE_FP8_VT_PAIRS
# =1 / 0: on every V-rows config / never).
fp8_vt_pairs_enabled = {"1": True, "0": False}.get(os.environ.get("FA3PY_CUTE_FP8_VT_PAIRS", ""))
# FwdConfig.fp8_vt_unroll: the V transposer's jobs unrolled per warp (FA3PY_CUTE_FP8_VT_UNROLL=1),
# up to FP8_VT_UNROLL_MAX_HDIMV: opt-in, not yet run on a GPU.
fp8_vt_unroll_enabled = os.environ.get("FA3PY_CUTE_FP8_VT_UNROLL", "0") == "1"
# qk_int8 operands (fa3py.fp8's higher-accuracy mode) on the FP8 kernel with int8 Q K^T
# (FwdConfig.fp8_qk_int8), and attention_chunk on the FP8 kernel (the 16-bit kernel's chunk bounds
# and masks): on by default since tests/test_cute_fp8_kernel.py's feature cases (int8 rows / GQA
# split / softcap hdim 256, chunk causal / windowed / packed-split / varlen) pass on an H100
# (2026-12-05). FA3PY_CUTE_FP8_INT8=0 / FA3PY_CUTE_FP8_CHUNK=0: the emulation serves them.
fp8_qk_int8_enabled = os.environ.get("FA3PY_CUTE_FP8_INT8", "1") != "0"
fp8_chunk_enabled = os.environ.get("FA3PY_CUTE_FP8_CHUNK", "1") != "0"
# MLA's qv in the 16-bit kernel (FwdConfig.qv), on by default: tests/test_mla.py's GPU tests pass
# on an H100 (13), and benchmarks.mla (H100, batch 32, 128 heads on 1 KV head, CUDA graphs) times
# it at 205-541 TFLOP/s where the Triton forward takes 5-22 (and refuses hdim_v 512).
# FA3PY_CUTE_QV=0: qv runs on Triton.
qv_enabled = os.environ.get("FA3PY_CUTE_QV", "1") != "0"
FP8_HDIMS = (64, 96, 128, 192, 256)


def paged_why_not(req: "AttentionRequest", tile_n: int) -> Optional[str]:
    """Paged K / V: pages whose rows tile the kernel's KV blocks of tile_n keys
    (config.page_size_ok). FA3 takes any page size (TMA when it is a multiple of its KV tile,
    else row by row); others are gathered by flash_attn_with_kvcache."""
    if not paged_enabled:
        return "cute_kernels: paged K / V in the kernel are turned off (FA3PY_CUTE_PAGED=0); the pages are gathered"
    if req.packed_k:
        return "cute_kernels: paged K / V take one page table row per sequence (no cu_seqlens_k)"
    if not page_size_ok(req.page_size, tile_n):
        return (f"cute_kernels: page_size {req.page_size} with KV blocks of {tile_n} keys (hdim {req.headdim}): "
                f"the kernel loads pages of a multiple of {tile_n} rows, or of a divisor of {tile_n} that is a "
                f"multiple of {PAGE_ROWS_MULTIPLE}")
    return None


def fp8_config_for(req: "AttentionRequest") -> FwdConfig:
    """The e4m3 config for an FP8 request: the format of its quantized operands, fa3py.fp8's
    default format for fp8=True, FA3's (fa3py.fp8.FA3_FORMAT) for float8 inputs with descales."""
    from fa3py.fp8 import FA3_FORMAT, Fp8Format

    v_rows = _fp8_v_rows(req)
    fmt = (req.fp8_tensors.fmt if req.fp8_tensors is not None else Fp8Format() if req.params.fp8
           else Fp8Format(**FA3_FORMAT))
    return config_for(req, "e4m3", fp8_block_m=fmt.block_m, fp8_v_scaling=fmt.v_scaling, fp8_v_rows=v_rows,
                      fp8_v_rows_half=fp8_v_half_enabled or not v_rows, fp8_descales=v_rows and _fa3_inputs(req),
                      fp8_qk_int8=fmt.qk_int8,
                      fp8_vt_unroll=v_rows and fp8_vt_unroll_enabled and req.headdim_v <= FP8_VT_UNROLL_MAX_HDIMV,
                      **({} if fp8_vt_pairs_enabled is None else {"fp8_vt_pairs": v_rows and fp8_vt_pairs_enabled}))


def _fa3_inputs(req: "AttentionRequest") -> bool:
    """FA3's float8 q, k, v with descales (not fp8=True, not quantized operands)."""
    return req.fp8_tensors is None and not req.params.fp8


def _fp8_v_rows(req: "AttentionRequest") -> bool:
    """Whether the kernel reads V in its rows (FwdConfig.fp8_v_rows): quantized operands whose V
    is not transposed and paged float8 caches, and FA3's float8 inputs by fp8_direct_enabled's
    rule; never where it is False."""
    if fp8_direct_enabled is False:
        return False
    if req.fp8_tensors is not None:
        return not req.fp8_tensors.fmt.v_transposed
    if not _fa3_inputs(req):
        return False
    queries = req.max_seqlen_q * (req.nheads // req.nheads_kv) // (2 if req.params.causal else 1)
    return fp8_direct_enabled or req.paged or queries <= FP8_V_ROWS_MAX_QUERIES


def fp8_why_not(req: "AttentionRequest") -> Optional[str]:
    """None if the FP8 kernel serves `req` (unless FA3PY_CUTE_FP8=0), else why not: fa3py.fp8's
    block format (fp8=True, quantized operands) or FA3's float8 inputs with per-(batch, KV head)
    descales (served as that format unrotated: `fa3py.fp8.from_descales`)."""
    if not fp8_enabled:
        return "cute_kernels: the FP8 kernel is turned off (FA3PY_CUTE_FP8=0)"
    fmt = req.fp8_tensors.fmt if req.fp8_tensors is not None else None
    if fmt is not None and fmt.qk_int8 and not fp8_qk_int8_enabled:
        return "cute_kernels: qk_int8 operands (int8 Q K^T) on the kernel are turned off (FA3PY_CUTE_FP8_INT8=0)"
    if fmt is not None and not fmt.v_transposed and fp8_direct_enabled is False:
        return "cute_kernels: V in rows is turned off (FA3PY_CUTE_FP8_DIRECT=0): FP8 takes transposed V"
    fa3 = req.fp8_tensors is None and not req.params.fp8
    if fa3 and (req.k.dtype != req.q.dtype or req.v.dtype != req.q.dtype):
        return "cute_kernels: FP8 takes q, k, v all float8_e4m3fn"
    if fa3 and req.qv is not None:
        return "cute_kernels: qv (MLA) is not in the cute kernel yet"
    p = req.params
    if p.attention_chunk and not fp8_chunk_enabled:
        return "cute_kernels: FP8 with attention_chunk on the kernel is turned off (FA3PY_CUTE_FP8_CHUNK=0)"
    if p.softmax_scale <= 0 and p.softcap == 0:
        return "cute_kernels: FP8 needs softmax_scale > 0 or softcap (the row max is taken before the multiplier)"
    if req.headdim not in FP8_HDIMS or (req.headdim, req.headdim_v) not in SUPPORTED_HDIM_PAIRS:
        return f"cute_kernels: FP8 head dims {FP8_HDIMS} (hdim_v = hdim, or 192 x 128), got ({req.headdim}, {req.headdim_v})"
    if req.nheads % req.nheads_kv:
        return "cute_kernels: nheads must be a multiple of nheads_kv"
    cfg = fp8_config_for(req)
    if cfg.fp8_v_scaling == "block" and cfg.hdimv > 128:
        return "cute_kernels: FP8 block V scaling up to hdim_v 128 (above, its second accumulator spills): channel V"
    if fmt is not None and fmt.block_n != cfg.tile.tile_n:
        return f"cute_kernels: FP8 block_n {fmt.block_n} must be the kernel's KV tile ({cfg.tile.tile_n}) here"
    paged = paged_why_not(req, cfg.tile.tile_n) if req.paged else None
    if paged:
        return paged
    if req.device.type != "cuda":
        return "cute_kernels: CUDA tensors only"
    return None


def run_fp8(req: "AttentionRequest", cfg: FwdConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of an FP8 request: fp8=True quantizes q, k, v first (quantize_fp8: the Triton
    prep on CUDA, with block_n = the kernel's tile_n and V^T in the PV key order); quantized
    operands in natural key order get V^T permuted here (one copy of V); FA3's float8 inputs
    become the unrotated format (fa3py.fp8.from_descales: scales filled from the descales, V
    transposed into the PV key order by one copy of V). GQA packing and split-KV as `run`. The
    kernel writes bf16 (another dtype: converted after)."""
    from fa3py.fp8 import from_descales, quantize_fp8
    from fa3py.fp8.format import pv_key_order, rotation_factor, score_constants

    if cfg.fp8_descales:
        return _run_fa3_direct(req, cfg)
    qkv = req.fp8_tensors
    cu = dict(cu_seqlens_q=req.cu_seqlens_q, cu_seqlens_k=req.cu_seqlens_k)
    if qkv is None and req.params.fp8:
        qkv = quantize_fp8(req.q, req.k, req.v, block_m=cfg.fp8_block_m, block_n=cfg.tile.tile_n,
                           v_scaling=cfg.fp8_v_scaling, v_pv_order=True, **cu)
    elif qkv is None:
        qkv = from_descales(req.q, req.k, req.v, req.q_descale, req.k_descale, req.v_descale,
                            block_m=cfg.fp8_block_m, block_n=cfg.tile.tile_n, **cu)
    q, k, v = qkv
    if q.data.numel() == 0 or k.seqlen == 0:
        return _empty_result(req)
    assert v.transposed != cfg.fp8_v_rows, "the kernel reads V as the operands hold it"
    if v.transposed:
        vt = v.data if v.fmt.v_pv_order else v.data.index_select(-1, pv_key_order(v.data.shape[-1], v.device))
        # packed operands' V^T and block scales are (heads, columns): the kernel takes a batch of 1
        vt = vt.unsqueeze(0) if v.packed else vt
    else:  # V's rows, as K's (fp8_v_rows: the kernel transposes each block into the PV key order)
        vt = v.data
    p = req.params
    scales = tuple((t.scale.unsqueeze(0) if t.packed and t.scale.dim() == 2 else t.scale).float().contiguous()
                   for t in (q, k, v))
    constants = score_constants(p.softmax_scale, p.softcap, rotation_factor(qkv.fmt, req.headdim))
    out, lse = _run_kernel(req, cfg, q.data, k.data, vt, torch.bfloat16, fp8_scales=scales, fp8_constants=constants)
    return (out if req.out_dtype == torch.bfloat16 else out.to(req.out_dtype)), lse


def _run_fa3_direct(req: "AttentionRequest", cfg: FwdConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """FA3's float8 inputs with cfg.fp8_descales (and fp8_v_rows): q, k, v go to the kernel as
    they are and the descales as (batch, heads, 1) float32 views (Q's repeated per query head
    where GQA groups them: the one launch left; None: ones, made per call, so that a call
    captured in a CUDA graph owns them); the format's constants unrotated (FA3_FORMAT)."""
    from fa3py.fp8.format import score_constants

    if q_empty_or_no_keys(req):
        return _empty_result(req)
    p, dev = req.params, req.device
    batch = req.cu_seqlens_q.shape[0] - 1 if req.packed_q else req.q.shape[0]
    group = req.nheads // req.nheads_kv

    def descale(x, repeat: int) -> torch.Tensor:
        if x is None:
            return torch.ones(batch, req.nheads_kv * repeat, 1, dtype=torch.float32, device=dev)
        x = x.float()
        return (x.repeat_interleave(repeat, dim=1) if repeat > 1 else x.contiguous()).unsqueeze(-1)

    scales = (descale(req.q_descale, group), descale(req.k_descale, 1), descale(req.v_descale, 1))
    constants = score_constants(p.softmax_scale, p.softcap, 1)
    out, lse = _run_kernel(req, cfg, req.q, req.k, req.v, torch.bfloat16, fp8_scales=scales, fp8_constants=constants)
    return (out if req.out_dtype == torch.bfloat16 else out.to(req.out_dtype)), lse
