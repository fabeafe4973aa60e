"""Every check on user input lives here. Each error names the argument and what is expected.

`make_request` turns user arguments into an `AttentionRequest` or raises TypeError /
ValueError / NotImplementedError. It never modifies its inputs.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Optional

import torch

from .request import FP8_DTYPES, AttentionParams, AttentionRequest, device_sms

MAX_HEADDIM = 256
# headdim_v may reach this when headdim <= MAX_HEADDIM_QK_FOR_WIDE_V (FA3's rule, for MLA)
MAX_HEADDIM_V_WIDE = 512
MAX_HEADDIM_QK_FOR_WIDE_V = 64
FLOAT_DTYPES = (torch.float16, torch.bfloat16)
_DTYPE_NAMES = "torch.float16, torch.bfloat16 or torch.float8_e4m3fn"


def _fail(cls, arg: str, msg: str):
    raise cls(f"fa3py: `{arg}` {msg}")


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, name, f"must be a torch.Tensor, got {type(x).__name__}")


def _check_int_tensor(name, x, device, length):
    _check_tensor(name, x)
    if x.dtype != torch.int32:
        _fail(TypeError, name, f"must have dtype torch.int32, got {x.dtype}")
    if x.dim() != 1 or x.shape[0] != length:
        _fail(ValueError, name, f"must be 1-D of length {length}, got shape {tuple(x.shape)}")
    if x.device != device:
        _fail(ValueError, name, f"must be on {device} like q, got {x.device}")


def _host_values(x):
    """Values of a small index tensor on the host, or None while a CUDA graph is being captured
    or `torch.compile` traces (a device->host copy is not allowed then, and the values are not
    known; the value checks are skipped)."""
    if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    return x.to("cpu", torch.int64)


def _check_headdim(name, d, limit=MAX_HEADDIM):
    if d % 8 != 0 or d <= 0 or d > limit:
        _fail(
            ValueError, name, f"head dimension must be a positive multiple of 8 and at most {limit}, got {d}"
        )


def _check_sm_margin(sm_margin, device):
    """An int >= 0 that leaves a CUDA device at least one SM."""
    if isinstance(sm_margin, bool) or not isinstance(sm_margin, int):
        _fail(TypeError, "sm_margin", f"must be an int >= 0 (SMs left free), got {sm_margin!r}")
    if sm_margin < 0:
        _fail(ValueError, "sm_margin", f"must be >= 0 (SMs left free), got {sm_margin}")
    if sm_margin and device.type == "cuda" and not torch.compiler.is_compiling():
        sms = device_sms(device)
        if sm_margin >= sms:
            _fail(ValueError, "sm_margin", f"must leave at least one of {device}'s {sms} SMs, got {sm_margin}")


def _check_window(window_size):
    try:
        left, right = window_size
        if isinstance(left, bool) or isinstance(right, bool):
            raise TypeError
        left, right = operator.index(left), operator.index(right)  # ints only: 1.7 is an error, not 1
    except (TypeError, ValueError):
        _fail(TypeError, "window_size", f"must be a pair of ints (left, right), got {window_size!r}")
    if left < -1 or right < -1:
        _fail(ValueError, "window_size", f"entries must be >= -1 (-1 means unbounded), got {(left, right)}")
    return left, right


def _finite(x) -> bool:
    """math.isfinite as arithmetic: torch.compile traces it as a guard on a symbolic float
    (dynamic=True), where math.isfinite would break the graph."""
    return x - x == 0


def _check_real(name, x, what):
    """A Python or NumPy real number (not a bool, not a string) as a float."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        _fail(TypeError, name, f"must be {what}, got {type(x).__name__}")
    return float(x)


def _check_chunk(attention_chunk):
    if isinstance(attention_chunk, bool) or not isinstance(attention_chunk, int):
        _fail(TypeError, "attention_chunk", f"must be an int >= 0 (0: off), got {attention_chunk!r}")
    if attention_chunk < 0:
        _fail(ValueError, "attention_chunk", f"must be >= 0 (0: off), got {attention_chunk}")
    return attention_chunk


def _check_descale(name, x, dtype, batch, nheads_kv, device):
    if x is None:
        return None
    if dtype not in FP8_DTYPES:
        _fail(ValueError, name, f"is only meaningful for float8_e4m3fn inputs; q, k, v are {dtype}")
    _check_tensor(name, x)
    if x.dtype != torch.float32:
        _fail(TypeError, name, f"must have dtype torch.float32, got {x.dtype}")
    if tuple(x.shape) != (batch, nheads_kv):
        _fail(ValueError, name, f"must have shape (batch, nheads_kv) = {(batch, nheads_kv)}, got {tuple(x.shape)}")
    if x.device != device:
        _fail(ValueError, name, f"must be on {device} like q, got {x.device}")
    return x


def _max_seqlen(side, x, cu, used, max_len, batch):
    """Checks one side's cu_seqlens / seqused / max_seqlen; returns the longest sequence bound."""
    cu_name, used_name, max_name = f"cu_seqlens_{side}", f"seqused_{side}", f"max_seqlen_{side}"
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)):
        _fail(TypeError, max_name, f"must be an int, got {type(max_len).__name__}")
    if cu is None and used is None:  # batched, every sequence full: no index tensor to read
        longest = x.shape[1]
    else:
        if cu is not None:
            _check_int_tensor(cu_name, cu, x.device, batch + 1)
            vals = _host_values(cu)
            cap = None
            if vals is not None:
                if vals.numel() and int(vals[0]) != 0:
                    _fail(ValueError, cu_name, f"must start at 0, got {int(vals[0])}")
                if (vals[1:] < vals[:-1]).any():
                    _fail(ValueError, cu_name, f"must be non-decreasing, got {vals.tolist()}")
                if int(vals[-1]) != x.shape[0]:
                    _fail(ValueError, cu_name,
                          f"last value ({int(vals[-1])}) must equal the total tokens of {side} ({x.shape[0]})")
                cap = vals[1:] - vals[:-1]
        else:
            cap = torch.full((batch,), x.shape[1], dtype=torch.int64)
        lengths = cap
        if used is not None:
            _check_int_tensor(used_name, used, x.device, batch)
            lengths = _host_values(used)
            if lengths is not None:
                if (lengths < 0).any():
                    _fail(ValueError, used_name, f"must be >= 0, got {lengths.tolist()}")
                if cap is not None and (lengths > cap).any():
                    _fail(ValueError, used_name,
                          f"must not exceed each sequence's stored length {cap.tolist()}, got {lengths.tolist()}")
        if lengths is None:  # values unreadable during CUDA graph capture
            return max_len if max_len is not None else x.shape[0 if cu is not None else 1]
        longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is None:
        return longest
    if max_len < longest:
        _fail(ValueError, max_name, f"({max_len}) is smaller than the longest sequence ({longest})")
    return max_len


def make_request(
    q,
    k,
    v,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    attention_chunk: int = 0,
    fp8: bool = False,
    deterministic: bool = False,
    num_splits: int = 0,
    sm_margin: int = 0,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    seqused_q=None,
    seqused_k=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    qv=None,
) -> AttentionRequest:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)

    # dtypes and devices (each tensor attribute read once: this runs on every call)
    dtype, device = q.dtype, q.device
    if dtype not in FLOAT_DTYPES + FP8_DTYPES:
        _fail(TypeError, "q", f"must have dtype {_DTYPE_NAMES}, got {dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != dtype:
            _fail(TypeError, name, f"must have the same dtype as q ({dtype}), got {x.dtype}")
        if x.device != device:
            _fail(ValueError, name, f"must be on the same device as q ({device}), got {x.device}")

    # layouts
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    packed_q, packed_k = cu_seqlens_q is not None, cu_seqlens_k is not None
    for name, shape, packed, cu in (("q", q_shape, packed_q, "cu_seqlens_q"), ("k", k_shape, packed_k, "cu_seqlens_k"),
                                    ("v", v_shape, packed_k, "cu_seqlens_k")):
        want = 3 if packed else 4
        if len(shape) != want:
            layout = (f"(total_tokens, nheads, headdim) because {cu} is given" if packed
                      else "(batch, seqlen, nheads, headdim)")
            _fail(ValueError, name, f"must be {want}-D {layout}, got shape {tuple(shape)}")
    if k_shape[:-1] != v_shape[:-1]:
        _fail(ValueError, "v", f"must match k in every dim but the last: k {tuple(k_shape)}, v {tuple(v_shape)}")
    # Any strides are accepted; a backend that needs a unit last stride copies by itself.
    nheads, nheads_kv, headdim = q_shape[-2], k_shape[-2], q_shape[-1]
    if headdim != k_shape[-1]:
        _fail(ValueError, "k", f"head dimension {k_shape[-1]} must equal q's head dimension {headdim}")
    _check_headdim("q", headdim)
    wide_v = headdim <= MAX_HEADDIM_QK_FOR_WIDE_V
    if v_shape[-1] > MAX_HEADDIM and not wide_v:
        _fail(ValueError, "v", f"head dimension {v_shape[-1]} > {MAX_HEADDIM} needs q/k's head dimension <= "
                               f"{MAX_HEADDIM_QK_FOR_WIDE_V} (as in FlashAttention-3), got {headdim}")
    _check_headdim("v", v_shape[-1], MAX_HEADDIM_V_WIDE if wide_v else MAX_HEADDIM)
    if nheads == 0:
        _fail(ValueError, "q", f"must have at least one head, got shape {tuple(q_shape)}")
    if nheads_kv == 0:
        _fail(ValueError, "k", f"must have at least one head, got shape {tuple(k_shape)}")
    if nheads % nheads_kv != 0:
        _fail(ValueError, "k", f"nheads_kv ({nheads_kv}) must divide q's nheads ({nheads}) (MQA/GQA)")

    # batch size and sequence lengths
    if packed_q:
        _check_tensor("cu_seqlens_q", cu_seqlens_q)
        batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q.dim() == 1 else -1
    elif packed_k:
        batch = q_shape[0]
    else:
        batch = q_shape[0]
        if k_shape[0] != batch:
            _fail(ValueError, "k", f"batch size {k_shape[0]} must equal q's batch size {batch}")
    if batch < 0:
        _fail(ValueError, "cu_seqlens_q", f"must be 1-D of length batch + 1, got shape {tuple(cu_seqlens_q.shape)}")
    if packed_q and packed_k and cu_seqlens_k.dim() == 1 and cu_seqlens_k.shape[0] != batch + 1:
        _fail(ValueError, "cu_seqlens_q", f"and `cu_seqlens_k` must both have length batch + 1, got "
              f"{batch + 1} and {cu_seqlens_k.shape[0]}")
    if not packed_k and packed_q and k_shape[0] != batch:
        _fail(ValueError, "k", f"batch size {k_shape[0]} must equal len(cu_seqlens_q) - 1 = {batch}")

    max_q = _max_seqlen("q", q, cu_seqlens_q, seqused_q, max_seqlen_q, batch)
    max_k = _max_seqlen("k", k, cu_seqlens_k, seqused_k, max_seqlen_k, batch)

    if qv is not None:
        _check_tensor("qv", qv)
        if qv.dtype != dtype or qv.device != device:
            _fail(TypeError, "qv", f"must have q's dtype and device ({dtype}, {device}), got {qv.dtype}, {qv.device}")
        if dtype not in FLOAT_DTYPES:
            _fail(NotImplementedError, "qv", f"needs fp16/bf16 inputs (as in FlashAttention-3), got {dtype}")
        if tuple(qv.shape) != (*q_shape[:-1], v_shape[-1]):
            _fail(ValueError, "qv", f"must have shape {(*q_shape[:-1], v_shape[-1])} (q's, with v's head dimension), "
                                    f"got {tuple(qv.shape)}")
        if fp8:
            _fail(NotImplementedError, "qv", "is not supported with fp8=True")

    # scalar parameters
    if softmax_scale is None:  # FA3: 1 / sqrt(headdim + headdim_v) with qv; finite (head dims > 0),
        # and left as computed: under torch.compile(dynamic=True) the head dim is symbolic
        softmax_scale = (headdim + (v_shape[-1] if qv is not None else 0)) ** -0.5
    else:
        softmax_scale = _check_real("softmax_scale", softmax_scale, "a float or None")
        if not _finite(softmax_scale):
            _fail(ValueError, "softmax_scale", f"must be finite, got {softmax_scale}")
    softcap = _check_real("softcap", softcap, "a float")
    if not _finite(softcap) or softcap < 0:
        _fail(ValueError, "softcap", f"must be finite and >= 0 (0 disables it), got {softcap}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        _fail(TypeError, "num_splits", f"must be an int >= 0 (0: automatic, 1: no split), got {num_splits!r}")
    if num_splits < 0:
        _fail(ValueError, "num_splits", f"must be an int >= 0 (0: automatic, 1: no split), got {num_splits!r}")
    _check_sm_margin(sm_margin, device)
    left, right = _check_window(window_size)
    if causal:  # as FlashAttention-3: causal sets the right window to 0, whatever was passed
        right = 0
    chunk = _check_chunk(attention_chunk)
    if fp8 and dtype not in FLOAT_DTYPES:
        _fail(ValueError, "fp8", f"quantizes fp16/bf16 inputs; q is already {dtype} (pass descales instead)")

    descales = [_check_descale(n, x, dtype, batch, nheads_kv, device)
                for n, x in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale))]

    params = AttentionParams(softmax_scale=softmax_scale, window_left=left, window_right=right,
                             softcap=softcap, attention_chunk=chunk, deterministic=bool(deterministic), fp8=bool(fp8),
                             num_splits=num_splits, sm_margin=sm_margin)
    return AttentionRequest(
        q=q, k=k, v=v, params=params,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        seqused_q=seqused_q, seqused_k=seqused_k,
        max_seqlen_q=max_q, max_seqlen_k=max_k,
        q_descale=descales[0], k_descale=descales[1], v_descale=descales[2], qv=qv,
    )


@dataclass(frozen=True)
class KvCacheArgs:
    """What `check_kvcache` derives from flash_attn_with_kvcache's arguments."""

    batch: int
    capacity: int  # key positions a sequence's cache holds (pages per row * page_size when paged)
    rows_available: int  # cache rows (or page table rows) cache_batch_idx may pick
    cache_seqlens: Optional[torch.Tensor]  # (batch,) int32 (an int argument made a tensor), or None
    new_lens: Optional[torch.Tensor]  # (batch,) tokens of the new k / v per sequence, or None


def check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                  page_table, cu_seqlens_q, cu_seqlens_k_new, max_seqlen_q, rotary_seqlens, causal, window_size,
                  attention_chunk, scheduler_metadata) -> KvCacheArgs:
    """flash_attn_with_kvcache's own arguments (the cache, the new k / v, rotary, the index
    tensors); the attention arguments are `make_request`'s. Value checks read the index tensors
    on the host, skipped while a CUDA graph is captured or torch.compile traces."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, x)
    if scheduler_metadata is not None:
        _check_tensor("scheduler_metadata", scheduler_metadata)
    device, dtype = q.device, q.dtype
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dim() != 4:
            _fail(ValueError, name, f"must be 4-D (batch_cache or num_pages, seqlen_cache or page_size, nheads_kv, "
                                    f"headdim), got shape {tuple(x.shape)}")
        if x.dtype != dtype:
            _fail(TypeError, name, f"must have the same dtype as q ({dtype}), got {x.dtype}")
        if x.device != device:
            _fail(ValueError, name, f"must be on the same device as q ({device}), got {x.device}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        _fail(ValueError, "v_cache", f"must match k_cache in every dim but the last: {tuple(k_cache.shape)} vs "
                                     f"{tuple(v_cache.shape)}")
    packed_q = cu_seqlens_q is not None
    if packed_q:
        _check_tensor("cu_seqlens_q", cu_seqlens_q)
        batch = cu_seqlens_q.shape[0] - 1
    else:
        if q.dim() != 4:
            _fail(ValueError, "q", f"must be 4-D (batch, seqlen, nheads, headdim), got shape {tuple(q.shape)}")
        batch = q.shape[0]
    hk, d, dv = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]

    # cache layout: capacity per sequence, rows
    paged = page_table is not None
    if paged:
        _check_tensor("page_table", page_table)
        if page_table.dtype != torch.int32 or page_table.dim() != 2 or page_table.device != device:
            _fail(TypeError, "page_table", f"must be a 2-D (batch, max_pages) torch.int32 tensor on {device}, got "
                                           f"{page_table.dtype} {tuple(page_table.shape)} on {page_table.device}")
        capacity = page_table.shape[1] * k_cache.shape[1]
        rows_available = page_table.shape[0]
    else:
        capacity = k_cache.shape[1]
        rows_available = k_cache.shape[0]
    _check_optional_int_tensor("cache_batch_idx", cache_batch_idx, device, batch)
    _check_optional_int_tensor("cache_leftpad", cache_leftpad, device, batch)
    _check_optional_int_tensor("rotary_seqlens", rotary_seqlens, device, batch)
    if cache_batch_idx is None and rows_available != batch:
        what = "page_table" if paged else "k_cache"
        _fail(ValueError, what, f"has {rows_available} rows; without cache_batch_idx it needs one per sequence "
                                f"({batch})")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    elif cache_seqlens is not None:
        _check_int_tensor("cache_seqlens", cache_seqlens, device, batch)

    # new keys / values
    new_lens = None
    if (k is None) != (v is None):
        _fail(ValueError, "v" if k is not None else "k", "k and v must be given together")
    if k is not None:
        if cache_seqlens is None:
            _fail(ValueError, "cache_seqlens", "is needed with k / v: it says where they are appended")
        _check_tensor("k", k)
        _check_tensor("v", v)
        want = 3 if cu_seqlens_k_new is not None else 4
        for name, x, dim in (("k", k, d), ("v", v, dv)):
            if x.dim() != want or x.shape[-2:] != (hk, dim) or x.dtype != dtype or x.device != device:
                layout = "(total_new, nheads_kv, headdim)" if want == 3 else "(batch, seqlen_new, nheads_kv, headdim)"
                _fail(ValueError, name, f"must be {layout} matching the cache's heads / head dim, dtype {dtype} on "
                                        f"{device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
        if k.shape[:-1] != v.shape[:-1]:
            _fail(ValueError, "v", f"must match k in every dim but the last: k {tuple(k.shape)}, v {tuple(v.shape)}")
        if cu_seqlens_k_new is not None:
            _check_int_tensor("cu_seqlens_k_new", cu_seqlens_k_new, device, batch + 1)
            new_lens = (cu_seqlens_k_new[1:] - cu_seqlens_k_new[:-1])
        else:
            if k.shape[0] != batch:
                _fail(ValueError, "k", f"batch size {k.shape[0]} must equal q's batch size {batch}")
            new_lens = torch.full((batch,), k.shape[1], dtype=torch.int32, device=device)
    elif cu_seqlens_k_new is not None:
        _fail(ValueError, "cu_seqlens_k_new", "is only meaningful with k / v")

    # rotary
    if rotary_cos is not None or rotary_sin is not None:
        if rotary_cos is None or rotary_sin is None:
            _fail(ValueError, "rotary_sin" if rotary_cos is not None else "rotary_cos",
                  "rotary_cos and rotary_sin must be given together")
        if k is None:
            _fail(ValueError, "rotary_cos", "needs the new k / v to rotate (as in FlashAttention-3)")
        for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _check_tensor(name, x)
            if x.dim() != 2 or x.shape != rotary_cos.shape or x.dtype != dtype or x.device != device:
                _fail(ValueError, name, f"must be 2-D (seqlen_ro, rotary_dim / 2) like rotary_cos, dtype {dtype} on "
                                        f"{device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
        rotary_dim = 2 * rotary_cos.shape[1]
        if rotary_dim % 16 or rotary_dim > d:
            _fail(ValueError, "rotary_cos", f"rotary_dim = 2 * rotary_cos.shape[1] = {rotary_dim} must be a multiple "
                                            f"of 16 and at most headdim {d}")
        if dtype not in (torch.float16, torch.bfloat16):
            _fail(NotImplementedError, "rotary_cos", f"rotary embedding needs fp16/bf16 inputs, got {dtype}")

    # value checks on the host (skipped while a CUDA graph is captured or torch.compile traces)
    seqlens_host = _host_values(cache_seqlens) if cache_seqlens is not None else None
    if seqlens_host is not None:
        end = seqlens_host + (_host_values(new_lens) if new_lens is not None else 0)
        if (seqlens_host < 0).any() or (end > capacity).any():
            _fail(ValueError, "cache_seqlens", f"plus the new tokens must lie in [0, {capacity}] (the cache's "
                                               f"length), got {seqlens_host.tolist()} + new")
        if cache_leftpad is not None:
            pad = _host_values(cache_leftpad)
            if (pad < 0).any() or (pad > end).any():
                _fail(ValueError, "cache_leftpad", f"must lie in [0, cache_seqlens + new], got {pad.tolist()}")
    if rotary_cos is not None and seqlens_host is not None:
        base = _host_values(rotary_seqlens) if rotary_seqlens is not None else seqlens_host
        new_max = int(_host_values(new_lens).max()) if batch else 0
        q_len = max_seqlen_q if packed_q and max_seqlen_q is not None else q.shape[0 if packed_q else 1]
        if not rotates_q_sequentially(causal, window_size, attention_chunk, q_len, capacity):
            q_len = 1  # every q token at rotary_seqlens
        last = base + max(new_max, q_len) - 1
        if batch and int(last.max()) >= rotary_cos.shape[0]:
            _fail(ValueError, "rotary_cos", f"has {rotary_cos.shape[0]} positions; rotating at rotary_seqlens "
                                            f"{base.tolist()} plus the new tokens needs {int(last.max()) + 1}")
    if cache_batch_idx is not None:
        idx = _host_values(cache_batch_idx)
        if idx is not None and ((idx < 0) | (idx >= rows_available)).any():
            _fail(ValueError, "cache_batch_idx", f"must index the {rows_available} cache rows, got {idx.tolist()}")

    return KvCacheArgs(batch, capacity, rows_available, cache_seqlens, new_lens)


def _check_optional_int_tensor(name, x, device, batch):
    if x is not None:
        _check_int_tensor(name, x, device, batch)


def rotates_q_sequentially(causal, window_size, attention_chunk, max_seqlen_q, max_seqlen_k) -> bool:
    """FA3 rotates q token t at rotary_seqlens + t when causal or local, else every token at
    rotary_seqlens. It drops a window side that covers the whole cache / query first."""
    left, right = (int(w) for w in window_size)
    local = (0 <= left < max_seqlen_k - 1) or (0 <= right < max_seqlen_q - 1) or attention_chunk > 0
    return bool(causal) or local


