"""fa3py: FlashAttention-3-class attention for PyTorch, written in Python.

    import fa3py
    out = fa3py.attention(q, k, v, causal=True)
    print(fa3py.explain(q, k, v, causal=True))   # which backend, and why

Backends: ``cute`` (Hopper CuTe DSL kernels), ``triton`` (other CUDA GPUs), ``torch``
(anywhere). `flash_attn_func`, `flash_attn_varlen_func`, `flash_attn_qkvpacked_func`,
`flash_attn_with_kvcache`, `flash_attn_combine` and `get_scheduler_metadata` are drop-in
replacements for FlashAttention-3's functions of the same names.
"""

from . import reference
from .api import attention, available_backends, explain
from .dispatch import BackendUnavailable
from .fp8 import Fp8Format, Fp8QKV, Fp8Tensor, quantize_fp8
from .interface import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func
from .kvcache import flash_attn_combine, flash_attn_with_kvcache, get_scheduler_metadata

__version__ = "0.1.0"
__all__ = [
    "attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_with_kvcache",
    "flash_attn_combine",
    "get_scheduler_metadata",
    "explain",
    "available_backends",
    "reference",
    "BackendUnavailable",
    "quantize_fp8",
    "Fp8QKV",
    "Fp8Tensor",
    "Fp8Format",
]
