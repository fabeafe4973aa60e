"""Attention implementations the benchmark times: fa3py's backends and its peers.

Every provider is imported lazily; one that is not installed, or that raises for a
configuration (an unsupported head dim, say), is skipped with the error recorded.
All providers take and return fa3py's layout, (batch, seqlen, nheads, headdim).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: seqlen keys (and queries, as in the FlashAttention-3 paper,
    unless seqlen_q is set: decoding), nheads query heads (and KV heads unless nheads_kv is set)."""

    batch: int
    nheads: int
    seqlen: int
    hdim: int
    causal: bool
    mode: str  # "fwd" or "bwd"
    dtype: torch.dtype
    fp8: bool = False
    seqlen_q: int = 0  # 0: seqlen
    nheads_kv: int = 0  # 0: nheads

    @property
    def sq(self) -> int:
        return self.seqlen_q or self.seqlen

    @property
    def hk(self) -> int:
        return self.nheads_kv or self.nheads


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Case], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    name: str
    peer: bool  # counts toward "best peer" (everything that is not fa3py)
    load: Callable[[], Forward]  # imports lazily; raises if unusable
    backward: bool = True
    fp8: bool = False  # takes FP8 when --fp8 is given (else runs in --dtype)
    fixed_precision: Optional[str] = None  # e.g. sageattention is always INT8 QK^T
    prepare: Optional[Callable] = None  # (q, k, v, case) -> (q, k, v), outside the timing
    cuda_only: bool = True
    fa3py_backend: Optional[str] = None  # fa3py's: the backend it needs in fa3py.available_backends

    def precision(self, case: Case) -> str:
        if self.fixed_precision:
            return self.fixed_precision
        return "fp8" if case.fp8 and self.fp8 else DTYPE_NAMES[case.dtype]


def _first(out):
    """Some peers return (out, lse)."""
    return out[0] if isinstance(out, (tuple, list)) else out


# ---- fa3py ----------------------------------------------------------------------------

def _fa3py(backend: str) -> Provider:
    def load() -> Forward:
        import fa3py

        def forward(q, k, v, case):
            return fa3py.attention(q, k, v, causal=case.causal, fp8=case.fp8, backend=backend)

        return forward

    return Provider(f"fa3py:{backend}", peer=False, load=load, fp8=True, cuda_only=False, fa3py_backend=backend)


def _compiled_load() -> Forward:
    """fa3py.attention on the cute backend inside torch.compile(fullgraph=True): the custom ops
    (torch.ops.fa3py.fwd / bwd) in a compiled graph, against eager fa3py:cute for the cost
    torch.compile adds per call."""
    import fa3py

    def attend(q, k, v, causal: bool):
        return fa3py.attention(q, k, v, causal=causal, backend="cute")

    compiled = torch.compile(attend, fullgraph=True)
    return lambda q, k, v, case: compiled(q, k, v, case.causal)


def _cute_bwd_load(**variant) -> Forward:
    """fa3py's sm90 forward with the sm90 backward kernel (cute_kernels/bwd_sm90.py) as its
    gradient, called directly (`cute_kernels.bwd_launch.run` after `cute_kernels.forward`): what
    fa3py:cute dispatches too, unless FA3PY_CUTE_BWD=0 (then fa3py:cute's backward is Triton's
    and this provider still times the kernel). A point the backward kernel does not serve raises with
    its reason (no silent Triton stand-in). `variant`: bwd_launch settings for these calls
    (ds_stages 1 / 2: sdS buffers; dq_red: dQ added from registers; m80: hdim 128's 80-row tile;
    dkvt: hdim 192's three-warpgroup tile; stat_regs, dv_early, dk_early, dkv_smem, lpt, pdl: BwdConfig's
    fields of those names; post_dq_smem: the postprocessing's BwdRowsConfig.dq_smem), for A/B
    runs; without it, bwd_launch's per-head-dim defaults."""
    import cute_kernels
    from cute_kernels import bwd_launch
    from fa3py.validation import make_request

    class CuteForwardBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, causal):
            req = make_request(q, k, v, causal=causal)
            saved, bwd_launch.enabled = bwd_launch.enabled, True  # on even with FA3PY_CUTE_BWD=0 (its checks)
            try:
                why = cute_kernels.why_not(req, backward=False) or cute_kernels.why_not(req, backward=True)
            finally:
                bwd_launch.enabled = saved
            if why:
                raise ValueError(why)
            out, lse = cute_kernels.forward(req)
            ctx.req, ctx.out, ctx.lse = req, out, lse
            return out

        @staticmethod
        def backward(ctx, dout):
            saved = {n: getattr(bwd_launch, n) for n in variant}
            for n, x in variant.items():
                setattr(bwd_launch, n, x)
            try:
                dq, dk, dv = bwd_launch.run(ctx.req, ctx.out, ctx.lse, dout)
            finally:
                for n, x in saved.items():
                    setattr(bwd_launch, n, x)
            return dq, dk, dv, None

    return lambda q, k, v, case: CuteForwardBackward.apply(q, k, v, case.causal)


# ---- PyTorch SDPA ---------------------------------------------------------------------

def sdpa_provider(label: str, backend_name: str, cuda_only: bool = True) -> Provider:
    def load() -> Forward:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def forward(q, k, v, case):
            # SDPA wants (b, h, s, d): transposed views, and the output transposed back. Its
            # is_causal is top-left aligned: with fewer queries than keys, bottom-right (fa3py's,
            # FlashAttention's) needs an explicit mask.
            gqa = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
            causal, mask = case.causal, None
            sq, sk = q.shape[1], k.shape[1]
            if causal and sq != sk:  # (one query sees every key: no mask)
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq) if sq > 1 else None
                causal = False
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal,
                    **gqa,
                )
            return out.transpose(1, 2)

        return forward

    return Provider(f"sdpa:{label}", peer=True, load=load, cuda_only=cuda_only)


# ---- FlashAttention peers -------------------------------------------------------------

def _fa4_load() -> Forward:
    from flash_attn.cute import flash_attn_func

    return lambda q, k, v, case: _first(flash_attn_func(q, k, v, causal=case.causal))


def _fa3_load() -> Forward:
    try:  # FlashAttention-3 built from source
        from flash_attn_interface import flash_attn_func
    except ImportError:  # its prebuilt forward-only wheel (fa3-fwd, FP8 included)
        from fa3_fwd_interface import flash_attn_func

    def forward(q, k, v, case):
        out = _first(flash_attn_func(q, k, v, causal=case.causal))
        return out.to(case.dtype) if case.fp8 else out

    return forward


def _to_fp8(q, k, v, case):
    if not case.fp8:
        return q, k, v
    return tuple(x.detach().to(torch.float8_e4m3fn) for x in (q, k, v))


def _sage_load() -> Forward:
    from sageattention import sageattn

    # sageattn subtracts the key mean from k in place (smooth_k); the benchmark gives each
    # provider its own inputs, and the shift leaves the softmax unchanged.
    return lambda q, k, v, case: sageattn(q, k, v, tensor_layout="NHD", is_causal=case.causal)


# ---- fa3py.flash_attn_with_kvcache (decoding from a KV cache) --------------------------

def kvcache_provider(page_size: int = 0) -> Provider:
    """fa3py.flash_attn_with_kvcache over a cache holding the case's keys (cache_seqlens = seqlen):
    contiguous (page_size 0), or in pages of page_size rows shuffled through a pool, one page table
    row per sequence (as a paged serving stack holds them). With --fp8, FA3's FP8 decoding: q and
    the cache in float8_e4m3fn with float32 descales (batch, nheads_kv). The cache is built
    outside the timing."""

    def prepare(q, k, v, case):
        b, s, hk, _ = k.shape
        seqlens = torch.full((b,), s, dtype=torch.int32, device=k.device)
        descales = {}
        if case.fp8:
            q, k, v = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
            ones = torch.ones(b, hk, dtype=torch.float32, device=k.device)
            descales = dict(q_descale=ones, k_descale=ones, v_descale=ones)
        if not page_size:
            return q, (k, None, seqlens, descales), (v,)
        per_seq = -(-s // page_size)
        order = torch.randperm(b * per_seq, device=k.device)
        table = order.view(b, per_seq).to(torch.int32)

        def pool(x):
            rows = x.new_zeros(b, per_seq * page_size, hk, x.shape[-1])
            rows[:, :s] = x
            pages = torch.empty_like(rows).view(b * per_seq, page_size, hk, x.shape[-1])
            pages[order] = rows.view(b * per_seq, page_size, hk, x.shape[-1])
            return pages

        return q, (pool(k), table, seqlens, descales), (pool(v),)

    def load() -> Forward:
        import fa3py

        def forward(q, k, v, case):
            (k_cache, table, seqlens, descales), (v_cache,) = k, v
            return fa3py.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, page_table=table,
                                                 causal=case.causal, **descales)

        return forward

    name = f"paged{page_size}" if page_size else "contiguous"
    return Provider(f"fa3py-kvcache:{name}", peer=False, load=load, backward=False, prepare=prepare, fp8=True)


FA3PY_BACKENDS = ("cute", "triton", "torch")

PROVIDERS: tuple[Provider, ...] = (
    *(_fa3py(b) for b in FA3PY_BACKENDS),
    # fa3py:cute inside torch.compile(fullgraph=True) (named exactly)
    Provider("fa3py:cute-compiled", peer=False, load=_compiled_load, fa3py_backend="cute"),
    # the sm90 backward kernel called directly (named exactly: fa3py:cute dispatches to it too)
    Provider("fa3py:cute-bwd", peer=False, load=_cute_bwd_load, fa3py_backend="cute"),
    # the same with both of its variants set at every head dim (the defaults pick them per head
    # dim): one sdS buffer and sdQ (the kernel before them), two sdS buffers
    # (BwdConfig.ds_stages), dQ added from registers (BwdConfig.dq_red), both
    *(Provider(f"fa3py:cute-bwd-{name}", peer=False, fa3py_backend="cute",
               load=lambda ds=ds, red=red: _cute_bwd_load(ds_stages=ds, dq_red=red))
      for name, ds, red in (("ds1", 1, False), ("ds2", 2, False), ("dqred", 1, True), ("ds2-dqred", 2, True))),
    # hdim 128's 80-row query blocks (bwd_launch.m80) for every config (with two sdS buffers too),
    # or never; hdim 192's three-warpgroup tile (bwd_launch.dkvt, the default) or its 64 x 64 one
    *(Provider(f"fa3py:cute-bwd-{name}", peer=False, fa3py_backend="cute", load=lambda v=v: _cute_bwd_load(**v))
      for name, v in (("m80", dict(m80=True)), ("m80-ds2", dict(m80=True, ds_stages=2)), ("m64", dict(m80=False)),
                      ("dkvt", dict(dkvt=True)), ("no-dkvt", dict(dkvt=False)),
                      # LSE / dPsum in registers under the GEMMs; dV before dP's wait (64-row tiles)
                      ("lse16", dict(stat_regs=16)), ("dvearly", dict(dv_early=True)),
                      ("lse16-dvearly", dict(stat_regs=16, dv_early=True)),
                      # dK / dV through smem and 16-byte stores, or element-wise from the registers
                      ("dkvsmem", dict(dkv_smem=True)), ("no-dkvsmem", dict(dkv_smem=False)),
                      # key blocks longest first (causal / right windows; the default), or the plain grid
                      ("lpt", dict(lpt=True)), ("no-lpt", dict(lpt=False)),
                      # the postprocessing's dQ through smem and 16-byte stores (the default), or element-wise
                      ("postsmem", dict(post_dq_smem=True)), ("no-postsmem", dict(post_dq_smem=False)),
                      # programmatic dependent launch of the pre / main / post kernels
                      ("pdl", dict(pdl=True)),
                      # dK's GEMM before dS^T's stmatrix and the PdS barrier (with / without two sdS buffers)
                      ("dkearly", dict(dk_early=True)), ("dkearly-ds2", dict(dk_early=True, ds_stages=2)))),
    sdpa_provider("cudnn", "CUDNN_ATTENTION"),
    sdpa_provider("flash", "FLASH_ATTENTION"),
    Provider("fa4", peer=True, load=_fa4_load),
    Provider("fa3", peer=True, load=_fa3_load, fp8=True, prepare=_to_fp8),
    Provider("sage", peer=True, load=_sage_load, backward=False, fixed_precision="int8"),
    sdpa_provider("math", "MATH", cuda_only=False),  # only on request: slow, but runs on CPU
)
# Only when named exactly (a prefix such as "fa3py" or "sdpa" leaves them out too).
DEFAULT_EXCLUDED = ("sdpa:math", "fa3py:cute-compiled",
                    *(p.name for p in PROVIDERS if p.name.startswith("fa3py:cute-bwd")))

PEER_PACKAGES = {  # provider -> distribution name, for the versions in the metadata
    "fa4": "flash-attn-4",
    "fa3": "flash-attn-3",
    "sage": "sageattention",
}


def select(selection: Optional[list[str]], device: torch.device):
    """Returns (usable providers with their forward fns, {name: why skipped}).

    `selection` holds names or prefixes ("fa3py", "sdpa", "fa4"); None means all but the
    opt-in ones (DEFAULT_EXCLUDED), which only their exact name selects. A fa3py provider is used
    when `fa3py.available_backends(device)` lists its backend.
    """
    def wanted(p: Provider) -> bool:
        if selection is None:
            return p.name not in DEFAULT_EXCLUDED
        if p.name in DEFAULT_EXCLUDED:
            return p.name in selection
        return any(p.name == s or p.name.startswith(s + ":") for s in selection)

    chosen, skipped = [], {}
    unknown = [s for s in selection or () if not any(
        p.name == s or p.name.startswith(s + ":") for p in PROVIDERS)]
    for s in unknown:
        skipped[s] = "unknown provider (known: " + ", ".join(p.name for p in PROVIDERS) + ")"
    fa3py_backends = _fa3py_backends(device)
    for p in PROVIDERS:
        if not wanted(p):
            continue
        if p.cuda_only and device.type != "cuda":
            skipped[p.name] = "needs a CUDA GPU"
            continue
        if p.fa3py_backend:
            if isinstance(fa3py_backends, str):
                skipped[p.name] = fa3py_backends
                continue
            if p.fa3py_backend not in fa3py_backends:
                skipped[p.name] = f"not in fa3py.available_backends({device.type!r}) = {fa3py_backends}"
                continue
        try:
            chosen.append((p, p.load()))
        except Exception as e:  # ImportError, or a broken install
            skipped[p.name] = f"{type(e).__name__}: {e}"
    return chosen, skipped


def _fa3py_backends(device: torch.device):
    """fa3py's backends for `device` in priority order, or a string saying why none."""
    try:
        import fa3py

        return list(fa3py.available_backends(device))
    except Exception as e:
        return f"fa3py unusable: {type(e).__name__}: {e}"


def versions() -> dict:
    """Installed versions of fa3py's peers (absent ones omitted)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, dist in PEER_PACKAGES.items():
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            pass
    try:
        out["fa3py"] = getattr(importlib.import_module("fa3py"), "__version__", "?")
    except Exception:
        pass
    return out
