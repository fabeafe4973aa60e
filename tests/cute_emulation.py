"""The sm90 forward kernel emulated by torch ops on the CPU, for tests of the host code around it
(`cute_kernels.launch.run`'s packing, split-KV combine, and what it hands the backward) on a machine
with no GPU. `emulated_sm90` dispatches CPU tensors as on an H100: the cute forward with this
emulation in place of the kernel, the Triton backward in Triton's interpreter."""

from __future__ import annotations

import math

import pytest
import torch

import cute_kernels
from cute_kernels import launch
from fa3py import dispatch

CUDA_ONLY = "cute_kernels: CUDA tensors only"


def emulated_launch(req, cfg, q, k, v, out, lse, num_splits=1):
    """What `cute_kernels.launch.launch_kernel` asks of the kernel, in float32 torch ops on the CPU, from the
    arguments it gives the kernel (`sequence_args`): q's rows (per KV head) are query positions
    row // pack_gqa, masks are bottom-right aligned over positions; out and lse are written
    where the kernel writes them (padded rows left as initialized). Split-KV: split s attends to
    its run of the sequence's KV blocks (the kernel splits each m_block's own range:
    test_split_block_range_on_the_host) and writes its normalized O and LSE at batch
    s * batch + b, or rows from s * total_q + offset. Paged (req.page_table): k and v are the page
    pools and sequence b's key j is read as the kernel's producer reads it, row j % page_size of
    page page_table[b, j // page_size], its length seqused_k[b] or the table row's pages."""
    g, p = cfg.pack_gqa, req.params
    max_rows, (cu_q, cu_k, used_q, used_k) = launch.sequence_args(req, q, g)  # the kernel's view
    n = len(cu_q) - 1 if cu_q is not None else q.shape[0]
    for b in range(n):
        q0 = int(cu_q[b]) if cu_q is not None else 0
        k0 = int(cu_k[b]) if cu_k is not None else 0
        sq = (int(cu_q[b + 1]) - q0) if cu_q is not None else q.shape[1]
        sk = (int(cu_k[b + 1]) - k0) if cu_k is not None else k.shape[1]
        if req.paged:
            sk = req.page_table.shape[1] * req.page_size
        sq = int(used_q[b]) if used_q is not None else sq
        sk = int(used_k[b]) if used_k is not None else sk
        assert sq <= max_rows
        qb = (q[q0:q0 + sq] if req.packed_q else q[b, :sq]).float()
        if req.paged:
            assert cfg.page_size == req.page_size and cu_k is None
            j = torch.arange(sk)
            page = req.page_table[b].long()[j // req.page_size]
            kb, vb = (x[page, j % req.page_size].float() for x in (k, v))
        else:
            kb, vb = ((x[k0:k0 + sk] if req.packed_k else x[b, :sk]).float() for x in (k, v))
        s = torch.einsum("rhd,khd->hrk", qb, kb) * p.softmax_scale
        if p.softcap > 0:
            s = p.softcap * torch.tanh(s / p.softcap)
        pos = torch.arange(sq)[:, None] // g
        col = torch.arange(sk)[None, :]
        keep = torch.ones(sq, sk, dtype=torch.bool)
        if p.window_right >= 0:
            keep &= col <= pos + sk - sq // g + p.window_right
        if p.window_left >= 0:
            keep &= col >= pos + sk - sq // g - p.window_left
        s = s.masked_fill(~keep, -math.inf)
        tile_n = cfg.tile.tile_n
        per_split = -(-(-(-sk // tile_n)) // num_splits) * tile_n  # keys per split
        for split in range(num_splits):
            in_split = (col >= split * per_split) & (col < (split + 1) * per_split)
            s_split = s.masked_fill(~in_split, -math.inf) if cfg.split_kv else s
            row_lse = torch.logsumexp(s_split, -1)  # (heads, rows)
            o = torch.einsum("hrk,khd->rhd", torch.exp(s_split - row_lse[..., None]).nan_to_num(0.0), vb)
            if cu_q is not None:
                r0 = q0 + split * (out.shape[0] // num_splits)
                out[r0:r0 + sq], lse[:, r0:r0 + sq] = o.to(out.dtype), row_lse
            else:
                bo = b + split * (out.shape[0] // num_splits)
                out[bo, :sq], lse[bo, :, :sq] = o.to(out.dtype), row_lse
    return out, lse


@pytest.fixture
def emulated_sm90(monkeypatch):
    """CPU tensors dispatched as on an sm90 GPU: the cute backend's host code runs for real and
    its kernel is `emulated_launch`; the backward goes to Triton (interpreted on the CPU)."""
    if torch.cuda.is_available():
        pytest.skip("emulates sm90 on CPU tensors; on a GPU the gpu tests run the real kernels")
    why_not = cute_kernels.why_not

    def why_not_on_cpu(req, backward):
        reason = why_not(req, backward)
        return None if reason == CUDA_ONLY else reason

    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(cute_kernels, "why_not", why_not_on_cpu)
    monkeypatch.setattr(launch, "launch_kernel", emulated_launch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
