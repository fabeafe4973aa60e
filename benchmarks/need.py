"""What a GPU tool needs before it starts: each check ends the tool with one line saying what is
missing (a non-zero exit status) instead of a traceback from deep inside torch, ncu or CuTe DSL."""

from __future__ import annotations

import importlib.util
import shutil

import torch


def _end(tool: str, why: str):
    raise SystemExit(f"{tool}: {why}")


def cuda_gpu(tool: str, sm90: bool = False) -> None:
    """A CUDA GPU (sm90 with `sm90`) that torch can use."""
    from fa3py.dispatch import cuda_missing

    why = cuda_missing(torch.device("cuda"))
    if why:
        _end(tool, f"needs a CUDA GPU{' (sm90: H100/H200)' if sm90 else ''}; {why}")
    if sm90 and torch.cuda.get_device_capability() != (9, 0):
        major, minor = torch.cuda.get_device_capability()
        _end(tool, f"needs an sm90 GPU (H100/H200); {torch.cuda.get_device_name()} is sm{major}{minor}")


def module(tool: str, name: str, extra: str) -> None:
    """An importable Python module, brought by the pip extra `extra`."""
    if importlib.util.find_spec(name) is None:
        _end(tool, f"needs the Python module {name!r}: pip install -e \".[{extra}]\"")


def program(tool: str, name: str, what: str) -> None:
    """An executable on PATH."""
    if shutil.which(name) is None:
        _end(tool, f"needs {what} (`{name}`) on PATH; it was not found")
