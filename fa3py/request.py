"""The one normalized description of an attention call that every backend receives.

`fa3py.validation` builds an `AttentionRequest` from the user's arguments (after checking
them); `fa3py.dispatch` picks a backend for it; the backend computes it. Backends never
re-validate and never see raw user arguments.

Semantics (shared by every backend and by `fa3py.reference`):

* Layout. Batched: q (batch, seqlen_q, nheads, headdim), k (batch, seqlen_k, nheads_kv,
  headdim), v (batch, seqlen_k, nheads_kv, headdim_v). Packed (varlen): q (total_q, nheads,
  headdim) with ``cu_seqlens_q`` (batch + 1,) int32 offsets; likewise k/v with
  ``cu_seqlens_k``. Either side may be packed or batched independently. Tensors may be
  arbitrary strided views; a backend that needs a unit last stride copies by itself.
* Paged K / V (``page_table``, built by `fa3py.flash_attn_with_kvcache` for a backend that reads
  pages itself; `validation.make_request` never sets it): k / v are page pools (num_pages,
  page_size, nheads_kv, headdim[_v]) and ``page_table`` (batch, max_pages) int32 says where each
  sequence's keys are: key j of sequence b is row ``j % page_size`` of page
  ``page_table[b, j // page_size]``. The keys are then batched, ``seqlen_k`` = max_pages *
  page_size (``max_seqlen_k``). Backends that do not read pages refuse such a request.
* Lengths. Sequence b has ``Lq = seqused_q[b]`` if given, else ``cu_seqlens_q[b+1] -
  cu_seqlens_q[b]`` (packed) or ``seqlen_q`` (batched); ``Lk`` likewise.
* Heads. Query head h reads KV head ``h // (nheads // nheads_kv)`` (MQA/GQA).
* Scores. ``s = softmax_scale * (q * q_descale) . (k * k_descale)``, plus
  ``softmax_scale * qv . v`` when ``qv`` (MLA's extra query part, (..., nheads, headdim_v) like
  the output; fp16/bf16 only) is given; with ``softcap > 0``,
  ``s = softcap * tanh(s / softcap)``. Descales (float32, shape (batch, nheads_kv)) exist
  only for float8_e4m3fn inputs.
* Mask (bottom-right aligned, as FlashAttention). Query row i (0 <= i < Lq) keeps key
  j (0 <= j < Lk) iff ``(window_left < 0 or j >= i + Lk - Lq - window_left)`` and
  ``(window_right < 0 or j <= i + Lk - Lq + window_right)`` and, with ``attention_chunk = C >
  0`` (chunked local attention, Llama 4), j lies in the chunk of i's diagonal:
  ``c <= j < c + C`` for ``c = C * floor((i + Lk - Lq) / C)``. ``causal`` is stored as
  ``window_right = 0``; the three bounds intersect, as in FlashAttention-3.
* Output. ``out = softmax(s over kept keys) @ (v * v_descale)`` in `out_dtype`; ``lse`` is the
  natural-log ``logsumexp`` of the kept scores, float32, shape (batch, nheads, seqlen_q)
  when q is batched and (nheads, total_q) when packed. A row with no kept key (and a
  padded row beyond ``Lq``) has ``out = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

FP8_DTYPES = (torch.float8_e4m3fn,)


@functools.lru_cache(maxsize=None)
def device_sms(device: torch.device) -> int:
    """A CUDA device's SM count (cached: scheduling heuristics read it on every call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class AttentionParams:
    """Scalar parameters of a call: hashable, so they can key compiled-kernel caches."""

    softmax_scale: float
    window_left: int = -1  # -1: unbounded
    window_right: int = -1  # -1: unbounded; causal stores 0 here
    softcap: float = 0.0  # 0: off
    attention_chunk: int = 0  # 0: off; C > 0: keys only from the query's chunk of C positions
    deterministic: bool = False  # backward: bitwise-reproducible gradients
    fp8: bool = False  # quantize bf16/fp16 inputs to FP8 internally (forward only)
    # KV splits, a scheduling hint that never changes results: 0 lets the kernel choose, 1 never
    # splits, N > 1 asks for N (cute_kernels' split-KV honors it; other backends ignore it).
    num_splits: int = 0
    # SMs a persistent kernel leaves free (FA3's sm_margin: for work overlapped on the same GPU,
    # e.g. communication kernels): the cute forward's persistent grid and the split / packing
    # heuristics count num_SMs - sm_margin; grids of one CTA per tile (and the other backends'
    # kernels) are placed by the hardware on any SM, as in FA3. Never changes results.
    sm_margin: int = 0

    @property
    def causal(self) -> bool:
        return self.window_left < 0 and self.window_right == 0 and self.attention_chunk == 0


@dataclass(frozen=True, eq=False)
class AttentionRequest:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    params: AttentionParams
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    seqused_q: Optional[torch.Tensor] = None
    seqused_k: Optional[torch.Tensor] = None
    # Upper bounds of Lq / Lk over the batch, always set by validation (read from the index
    # tensors, or the stored length while a CUDA graph is captured): backends size their grids
    # from them and never read cu_seqlens / seqused on the host.
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    q_descale: Optional[torch.Tensor] = None
    k_descale: Optional[torch.Tensor] = None
    v_descale: Optional[torch.Tensor] = None
    qv: Optional[torch.Tensor] = None  # MLA: scores gain qv . v (torch path and Triton forward)
    # Block-scaled FP8 operands (`fa3py.fp8.Fp8QKV`): q, k, v are then their float8 views.
    fp8_tensors: Optional[object] = None
    # Paged K / V (see the module docstring): (batch, max_pages) int32; k / v are page pools.
    page_table: Optional[torch.Tensor] = None

    # ---- shape facts -------------------------------------------------------------
    @property
    def is_varlen(self) -> bool:
        """Packed (cu_seqlens) or seqused on either side: sequences of their own lengths."""
        return (self.cu_seqlens_q is not None or self.cu_seqlens_k is not None
                or self.seqused_q is not None or self.seqused_k is not None)

    @property
    def packed_q(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def packed_k(self) -> bool:
        return self.cu_seqlens_k is not None

    @property
    def paged(self) -> bool:
        return self.page_table is not None

    @property
    def page_size(self) -> int:
        """Rows of a K / V page (0 when not paged)."""
        return self.k.shape[1] if self.page_table is not None else 0

    @property
    def batch(self) -> int:
        if self.packed_q:
            return self.cu_seqlens_q.shape[0] - 1
        return self.q.shape[0]

    @property
    def nheads(self) -> int:
        return self.q.shape[-2]

    @property
    def nheads_kv(self) -> int:
        return self.k.shape[-2]

    @property
    def headdim(self) -> int:
        return self.q.shape[-1]

    @property
    def headdim_v(self) -> int:
        return self.v.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def is_fp8_input(self) -> bool:
        return self.q.dtype in FP8_DTYPES

    @property
    def out_dtype(self) -> torch.dtype:
        if self.fp8_tensors is not None:
            return self.fp8_tensors.q.source_dtype
        return torch.bfloat16 if self.is_fp8_input else self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    def usable_sms(self, without_gpu: int) -> int:
        """The SMs this call's persistent grids and scheduling heuristics count: its CUDA device's
        less params.sm_margin (validated to leave at least one), or `without_gpu` for tensors
        elsewhere (tests of the host code)."""
        sms = device_sms(self.device) if self.device.type == "cuda" else without_gpu
        return max(1, sms - self.params.sm_margin)

    @property
    def out_shape(self) -> tuple:
        return (*self.q.shape[:-1], self.headdim_v)

    @property
    def lse_shape(self) -> tuple:
        if self.packed_q:
            return (self.nheads, self.q.shape[0])
        return (self.q.shape[0], self.nheads, self.q.shape[1])

    def seqlens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence (Lq, Lk) as int64 CPU tensors of shape (batch,)."""
        if self.page_table is not None and self.seqused_k is None:
            return (_lengths(self.q, self.cu_seqlens_q, self.seqused_q, self.batch),
                    torch.full((self.batch,), self.page_table.shape[1] * self.page_size, dtype=torch.int64))
        return _lengths(self.q, self.cu_seqlens_q, self.seqused_q, self.batch), _lengths(
            self.k, self.cu_seqlens_k, self.seqused_k, self.batch
        )

    def offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence start row of q and k in the packed layout (0 when batched)."""

        def start(cu):
            if cu is None:
                return torch.zeros(self.batch, dtype=torch.int64)
            return cu[:-1].to("cpu", torch.int64)

        return start(self.cu_seqlens_q), start(self.cu_seqlens_k)


def _lengths(x, cu, used, batch):
    if used is not None:
        return used.to("cpu", torch.int64)
    if cu is not None:
        cu = cu.to("cpu", torch.int64)
        return cu[1:] - cu[:-1]
    return torch.full((batch,), x.shape[1], dtype=torch.int64)
