"""The one place that decides which backend runs a request.

Priority: ``cute`` (Hopper CuTe DSL kernels, sm90 only) > ``triton`` (CUDA sm80 and newer)
> ``torch`` (anywhere). Auto-dispatch takes the first backend whose hardware rule and
feature check (`why_not`) both pass. ``backend=`` or the environment variable
``FA3PY_BACKEND`` forces one; a forced backend that cannot serve the request raises
`BackendUnavailable` saying why.

Backward is dispatched on its own: a forward kernel without a backward (the cute forward,
for instance) hands its saved (out, lse) to the next backend that has one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .request import AttentionRequest

BACKENDS = ("cute", "triton", "torch")
_MODULES = {"cute": "cute_kernels", "triton": "triton_fallback", "torch": "fa3py.torch_backend"}
_EXTRAS = {"cute": "hopper", "triton": "triton"}  # the pip extra that installs a backend's packages
ENV_VAR = "FA3PY_BACKEND"


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve the request."""


@dataclass(frozen=True)
class Choice:
    name: str
    module: object
    reasons: tuple  # (backend, why it was passed over) for every backend tried before it


def device_capability(device: torch.device) -> Optional[tuple]:
    """(major, minor) of a CUDA device, None for anything else. Tests patch this."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    # Asked on every call; torch re-reads the device properties each time (~2 us on an H200 host).
    return torch.cuda.get_device_capability(index)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_missing(device: torch.device) -> Optional[str]:
    """Why nothing can run on a CUDA `device` (torch without CUDA, or no GPU), or None. Asked only
    where no tensor shows the device exists (available_backends, explain_device)."""
    if device.type != "cuda" or torch.cuda.is_available():
        return None
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: nothing can run on {device}"
    return f"torch sees no CUDA GPU: nothing can run on {device}"


def hardware_reason(name: str, device: torch.device, forced: bool = False) -> Optional[str]:
    """Why backend `name` cannot run on `device` (whose tensors exist), or None if it can."""
    cap = device_capability(device)
    if name == "torch":
        return None
    if name == "cute":
        if cap is None:
            return f"the cute backend needs an sm90 GPU (H100/H200); tensors are on {device.type}"
        if cap != (9, 0):
            return f"the cute backend needs sm90 (H100/H200); GPU is sm{cap[0]}{cap[1]}"
        return None
    if name == "triton":
        if cap is None:
            if forced and _interpreting():
                return None  # TRITON_INTERPRET=1 runs the kernels on the CPU
            return (f"the triton backend needs a CUDA GPU (sm80+); tensors are on {device.type}"
                    " (force it with TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")
        if cap < (8, 0):
            return f"the triton backend needs sm80 or newer; GPU is sm{cap[0]}{cap[1]}"
        return None
    raise ValueError(f"fa3py: `backend` must be one of {BACKENDS}, got {name!r}")


_loaded: dict = {}


def load(name: str):
    """Imports a backend module once; returns (module, None) or (None, why it failed)."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
        except Exception as e:  # a broken optional backend must not break the others
            hint = (f"; pip install \"fa3py[{_EXTRAS[name]}]\" installs it"
                    if isinstance(e, ImportError) and name in _EXTRAS else "")
            _loaded[name] = (None, f"{_MODULES[name]} could not be imported ({type(e).__name__}: {e}){hint}")
        else:
            missing = [f for f in ("why_not", "forward", "backward") if not hasattr(module, f)]
            if "why_not" in missing or "forward" in missing:
                _loaded[name] = (None, f"{_MODULES[name]} has no kernels yet")
            else:
                _loaded[name] = (module, None)
    return _loaded[name]


def reason(name: str, req: AttentionRequest, backward: bool = False, forced: bool = False) -> Optional[str]:
    why = hardware_reason(name, req.device, forced)
    if why:
        return why
    module, why = load(name)
    if module is None:
        return why
    why = module.why_not(req, backward)
    return f"{name} backend: {why}" if why else None


def forced_backend(backend: Optional[str]) -> Optional[str]:
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if name is not None and name not in BACKENDS:
        source = "`backend`" if backend is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"fa3py: {source} must be one of {BACKENDS}, got {name!r}")
    return name


def is_empty(req: AttentionRequest) -> bool:
    """Nothing to compute (no query rows, no keys, no heads): zeros and -inf, done by torch."""
    return req.q.numel() == 0 or req.k.shape[-3] == 0 or req.batch == 0


def choose(req: AttentionRequest, backward: bool = False, backend: Optional[str] = None) -> Choice:
    forced = forced_backend(backend)
    if is_empty(req):
        return Choice("torch", load("torch")[0], (("*", "empty input: nothing to compute"),))
    if forced is not None and not (backward and _forward_only(forced, req)):
        why = reason(forced, req, backward, forced=True)
        if why:
            phase = "backward" if backward else "forward"
            raise BackendUnavailable(f"fa3py: forced backend {forced!r} cannot serve this {phase}: {why}")
        return Choice(forced, load(forced)[0], ())
    passed = []
    for name in BACKENDS:
        why = reason(name, req, backward, forced=(name == forced))
        if why is None:
            return Choice(name, load(name)[0], tuple(passed))
        passed.append((name, why))
    # Only a request validation does not build (paged K / V, which flash_attn_with_kvcache
    # gathers when no backend reads its pages) gets here: the torch backend serves the rest.
    raise BackendUnavailable("fa3py: no backend serves this request: "
                             + "; ".join(f"{n}: {r}" for n, r in passed))


def _forward_only(name: str, req: AttentionRequest) -> bool:
    """A forced backend whose kernels have no backward hands the backward on."""
    module, _ = load(name)
    return module is not None and module.why_not(req, False) is None and module.why_not(req, True) is not None


def backward_request(req: AttentionRequest) -> AttentionRequest:
    """The request a backward runs for forward request `req` (autograd and the torch.compile op
    alike). fp8=True is straight-through: the 16-bit backward at the original inputs
    (fa3py.fp8's spec). float8 inputs and qv have a forward only, as in FlashAttention-3: their
    backward raises, naming what is missing."""
    if req.qv is not None:
        raise NotImplementedError("fa3py: `qv` (MLA) has no backward pass yet (FA3 has none either); call it "
                                  "under torch.no_grad()")
    if req.is_fp8_input:
        raise NotImplementedError("fa3py: float8_e4m3fn `q`/`k`/`v` have no backward pass (no FP8 backward "
                                  "kernel); pass fp16/bf16 inputs to train, or call it under torch.no_grad()")
    if req.params.fp8:
        return dataclasses.replace(req, params=dataclasses.replace(req.params, fp8=False))
    return req


def explain_choice(req: AttentionRequest, backend: Optional[str] = None) -> str:
    lines = []
    for phase, backward in (("forward", False), ("backward", True)):
        if backward:  # qv and float8 inputs have a forward only: say so, not which backend would run
            try:
                backward_request(req)
            except NotImplementedError as e:
                lines.append(f"backward: none ({e})")
                continue
        try:
            c = choose(req, backward, backend)
        except BackendUnavailable as e:
            lines.append(f"{phase}: unavailable: {e}")
            continue
        why = "; ".join(f"not {n}: {r}" for n, r in c.reasons)
        describe = getattr(c.module, "describe", None)  # the kernel config, where a backend says it
        what = f" [{describe(req, backward)}]" if describe is not None else ""
        lines.append(f"{phase}: {c.name}{what}" + (f" ({why})" if why else ""))
    return "\n".join(lines)


def explain_device(device) -> str:
    """One line per backend: whether it can run on `device`, and why not."""
    device = torch.device(device)
    lines = []
    for name in BACKENDS:
        why = cuda_missing(device) or hardware_reason(name, device) or load(name)[1]
        lines.append(f"{name}: " + (f"unavailable: {why}" if why else "available"))
    return "\n".join(lines)


def available_backends(device="cpu") -> list:
    """Backends whose hardware rule passes on `device` and whose module imports, in priority order
    (empty for "cuda" on a torch without CUDA; `explain_device` says why)."""
    device = torch.device(device)
    if cuda_missing(device):
        return []
    return [n for n in BACKENDS if hardware_reason(n, device) is None and load(n)[0] is not None]
