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


def emulated_launch(req, cfg, q, k, v, out, lse, num_splits=1, qv=None, **fp8_args):
    """What `cute_kernels.launch.launch_kernel` asks of the kernel, in float32 torch ops on the CPU, from the
    arguments it gives the kernel (`sequence_args`): q's rows (per KV head) are query positions
    row // pack_gqa, masks (window, and attention_chunk where cfg.chunk) are bottom-right aligned
    over positions; out and lse are written where the kernel writes them (padded rows left as
    initialized). Split-KV: split s attends to its run of the sequence's KV blocks (the kernel
    splits each m_block's own range: test_split_block_range_on_the_host) and writes its
    normalized O and LSE at batch s * batch + b, or rows from s * total_q + offset. Paged
    (req.page_table): k and v are the page pools and sequence b's key j is read as the kernel's
    producer reads it, row j % page_size of page page_table[b, j // page_size], its length
    seqused_k[b] or the table row's pages. qv (cfg.qv: laid out as q, packed rows included): the
    scores gain qv . v. FP8 (`fp8_args`): `emulated_fp8_launch`."""
    assert (qv is not None) == cfg.qv, "launch_kernel gets qv exactly where the config has it"
    if fp8_args.get("fp8_constants") is not None:
        return emulated_fp8_launch(req, cfg, q, k, v, out, lse, num_splits, **fp8_args)
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
        # GQA left unpacked: query head h reads KV head h // (heads / KV heads)
        kb, vb = (x.repeat_interleave(qb.shape[1] // x.shape[1], dim=1) for x in (kb, vb))
        s = torch.einsum("rhd,khd->hrk", qb, kb)
        if qv is not None:
            s = s + torch.einsum("rhd,khd->hrk", (qv[q0:q0 + sq] if req.packed_q else qv[b, :sq]).float(), vb)
        s = s * p.softmax_scale
        if p.softcap > 0:
            s = p.softcap * torch.tanh(s / p.softcap)
        pos = torch.arange(sq)[:, None] // g
        col = torch.arange(sk)[None, :]
        diag = pos + sk - sq // g  # the row's diagonal key
        keep = torch.ones(sq, sk, dtype=torch.bool)
        if p.window_right >= 0:
            keep &= col <= diag + p.window_right
        if p.window_left >= 0:
            keep &= col >= diag - p.window_left
        if cfg.chunk:  # the key lies in the chunk of the row's diagonal
            start = torch.div(diag, p.attention_chunk, rounding_mode="floor") * p.attention_chunk
            keep &= (col >= start) & (col < start + p.attention_chunk)
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
    its kernel is `emulated_launch`; the backward goes to Triton (interpreted on the CPU), as with
    FA3PY_CUTE_BWD=0 (`emulated_sm90_bwd` in tests/cute_bwd_emulation.py emulates the cute one)."""
    from cute_kernels import bwd_launch

    if torch.cuda.is_available():
        pytest.skip("emulates sm90 on CPU tensors; on a GPU the gpu tests run the real kernels")
    why_not = cute_kernels.why_not

    def why_not_on_cpu(req, backward):
        reason = why_not(req, backward)
        return None if reason == CUDA_ONLY else reason

    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(cute_kernels, "why_not", why_not_on_cpu)
    monkeypatch.setattr(launch, "launch_kernel", emulated_launch)
    monkeypatch.setattr(bwd_launch, "enabled", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def emulated_fp8_launch(req, cfg, q, k, v, out, lse, num_splits=1, fp8_scales=(None, None, None),
                        fp8_constants=None):
    """What `launch_kernel` asks of the FP8 kernel (fa3py.fp8's arithmetic), computed on the CPU
    from the kernel's own arguments, indexed as the kernel indexes them: q e4m3 (b, rows, heads / g,
    d) or packed (total rows, heads / g, d) with rows packed by g = cfg.pack_gqa (row r: position
    r // g, query head kh * g + r % g, whose Q scale is q_scale[b, kh * g + r % g, (r // g) //
    block_m]); k (b, s_k, h_kv, d) or packed; v the transposed V (b, h_kv, dv, s_pad) in the PV
    key order (packed: (1, h_kv, dv, columns), sequence b from column 16 * (start // 16 + b)), or
    with cfg.fp8_v_rows V's rows as k's (paged: page pools read through the page table, as in
    `emulated_launch`); with cfg.fp8_descales the scales are FA3's descales,
    (batch, heads, 1) per sequence (Q's per query head);
    packed scales (1, heads, columns), sequence b's blocks from column start // block + b; K (and
    block V) scales per KV block of tile_n; (c, cap) the multiplier's constants (softcap: tanh
    inside, cap after). Sequence lengths from `sequence_args` (cu_seqlens, seqused). KV blocks last
    to first, P rounded to e4m3 at the running max, block V's PV in a fresh accumulator. Split-KV:
    split s runs its run of the sequence's KV blocks and writes its normalized O and LSE at batch
    s * batch + b (packed: rows from s * total_q + offset)."""
    from fa3py.fp8.format import E4M3, P_OFFSET, pv_key_positions

    g, p, tile_n, block_m = cfg.pack_gqa, req.params, cfg.tile.tile_n, cfg.fp8_block_m
    q_scale, k_scale, v_scale = fp8_scales
    c, cap = fp8_constants
    max_rows, (cu_q, cu_k, used_q, used_k) = launch.sequence_args(req, q, g)  # the kernel's view
    hp, hk = q.shape[-2], k.shape[-2]
    group = q_scale.shape[1] // hk
    head_kv = torch.arange(hp) * g // group
    batch = len(cu_q) - 1 if cu_q is not None else q.shape[0]
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)
    for b in range(batch):
        q0 = int(cu_q[b]) if cu_q is not None else 0
        k0 = int(cu_k[b]) if cu_k is not None else 0
        rows = (int(cu_q[b + 1]) - q0) if cu_q is not None else q.shape[1]
        sk = (int(cu_k[b + 1]) - k0) if cu_k is not None else k.shape[1]
        if req.paged:  # k, v: page pools; the sequence's pages from its page table row
            sk = req.page_table.shape[1] * req.page_size
        rows = int(used_q[b]) if used_q is not None else rows
        sk = int(used_k[b]) if used_k is not None else sk
        assert rows <= max_rows
        r = torch.arange(rows)
        pos, head = r // g, torch.arange(hp)[:, None] * g + r % g  # (hp, rows)
        q8 = (q[q0:q0 + rows] if cu_q is not None else q[b, :rows]).float().transpose(0, 1)  # (hp, rows, d)
        if req.paged:
            assert cfg.page_size == req.page_size and cfg.fp8_v_rows
            j = torch.arange(sk)
            page = req.page_table[b].long()[j // req.page_size]
            k_rows, v_rows = k[page, j % req.page_size], v[page, j % req.page_size]
        else:
            k_rows = k[k0:k0 + sk] if cu_k is not None else k[b, :sk]
            v_rows = v[k0:k0 + sk] if cu_k is not None else v[b, :sk]
        k8 = k_rows.float().transpose(0, 1)[head_kv]  # (hp, sk, d)
        if cfg.fp8_descales:  # FA3's descales (batch, heads, 1): every block and channel alike
            vt, ks, vs = None, k_scale[b].expand(hk, -(-sk // tile_n)), v_scale[b]
        elif cu_k is not None:
            col0 = 16 * (k0 // 16 + b)
            vt = v[0, ..., col0:col0 + -(-sk // 16) * 16]
            ks, vs = k_scale[0, :, k0 // tile_n + b:], v_scale[0, :, k0 // tile_n + b:]
        else:
            vt, ks, vs = v[b, ..., :-(-sk // 16) * 16], k_scale[b], v_scale[b]
        if cfg.fp8_v_scaling == "channel":
            vs = v_scale[b]  # (h_kv, dv) per sequence; descales: (h_kv, 1)
        if cfg.fp8_v_rows:  # V's rows as K's (the kernel transposes them into the PV key order itself)
            v8 = v_rows.float().transpose(0, 1)[head_kv]
        else:
            v8 = vt.float()[..., pv_key_positions(vt.shape[-1])[:sk]].transpose(-1, -2)[head_kv]  # (hp, sk, dv)
        if cfg.fp8_descales:
            q_row_c = q_scale[b][head, 0] * f32(c)
        elif cu_q is not None:
            q_row_c = q_scale[0][head, (q0 // g) // block_m + b + pos // block_m] * f32(c)
        else:
            q_row_c = q_scale[b][head, pos // block_m] * f32(c)  # (hp, rows)
        col = torch.arange(sk)[None, :]
        keep = torch.ones(rows, sk, dtype=torch.bool)
        sq = rows // g
        if p.window_right >= 0:
            keep &= col <= pos[:, None] + sk - sq + p.window_right
        if p.window_left >= 0:
            keep &= col >= pos[:, None] + sk - sq - p.window_left
        if cfg.chunk:  # the key lies in the chunk of the row's diagonal position
            start = torch.div(pos[:, None] + sk - sq, p.attention_chunk, rounding_mode="floor") * p.attention_chunk
            keep &= (col >= start) & (col < start + p.attention_chunk)
        nblk = -(-sk // tile_n)
        per_split = -(-nblk // num_splits)
        for split in range(num_splits):
            lo, hi = split * per_split, min(nblk, (split + 1) * per_split)
            m = torch.full((hp, rows), -math.inf)
            row_sum = torch.zeros(hp, rows)
            acc = torch.zeros(hp, rows, v8.shape[-1])
            for j in reversed(range(lo, hi)):
                j0, j1 = j * tile_n, min(sk, (j + 1) * tile_n)
                if not keep[:, j0:j1].any():
                    continue
                s = q8 @ k8[:, j0:j1].transpose(-1, -2)
                mult = q_row_c * ks[head_kv, j][:, None]
                s2 = torch.tanh(s * mult[..., None]) * f32(cap) if p.softcap > 0 else s * mult[..., None]
                s2 = s2.masked_fill(~keep[:, j0:j1], -math.inf)
                m_new = torch.maximum(m, s2.amax(-1))
                m_safe = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
                prob = torch.exp2(s2 - m_safe[..., None] + P_OFFSET)
                corr = torch.exp2(m - m_safe)
                row_sum = row_sum * corr + prob.sum(-1)
                pv = prob.to(E4M3).float() @ v8[:, j0:j1]
                if cfg.fp8_v_scaling == "block":
                    pv = pv * vs[head_kv, j][:, None, None]
                acc = acc * corr[..., None] + pv
                m = m_new
            empty = row_sum == 0
            o = acc / torch.where(empty, torch.ones_like(row_sum), row_sum)[..., None]
            if cfg.fp8_v_scaling == "channel":
                o = o * vs[head_kv][:, None, :]
            m_safe = torch.where(m == -math.inf, torch.zeros_like(m), m)
            row_lse = torch.where(empty, torch.full_like(m, -math.inf),
                                  (m_safe + torch.log2(row_sum) - P_OFFSET) * math.log(2.0))
            if cu_q is not None:
                r0 = q0 + (split * (out.shape[0] // num_splits) if cfg.split_kv else 0)
                out[r0:r0 + rows], lse[:, r0:r0 + rows] = o.transpose(0, 1).to(out.dtype), row_lse
            else:
                bo = b + split * batch if cfg.split_kv else b
                out[bo, :rows], lse[bo, :, :rows] = o.transpose(0, 1).to(out.dtype), row_lse
    return out, lse


def tvm_ffi_signature_check(monkeypatch) -> list:
    """launch_kernel's TVM-FFI call on CPU tensors, against the signature the kernel is compiled
    with (`fake_args(cfg, env_stream=True)`): every symbolic dim the fake arguments share must
    get one size from the real call, as the TVM-FFI call checks on the GPU ("Mismatched
    mQScale.shape[1] ... expected to match mQ.shape[2]" was such a tie). No kernel runs; the
    outputs stay as allocated. Returns the list of checked configs."""
    checked = []

    def compile_checker(cfg, args=None):
        fake = launch.kernel_class(cfg).fake_args(cfg, env_stream=True)[:-1]  # the stream last

        def call(*real):
            assert len(real) == len(fake), f"{len(real)} arguments, the kernel takes {len(fake)}"
            bound = {}
            for i, (f, r) in enumerate(zip(fake, real)):
                if not isinstance(r, torch.Tensor) and not hasattr(f, "shape"):
                    continue  # scalars
                assert (f is None) == (r is None), f"argument {i}: compiled {f}, called with {r}"
                if r is None:
                    continue
                assert r.dim() == len(f.shape), f"argument {i}: rank {r.dim()}, compiled {len(f.shape)}"
                for j, (fd, rd) in enumerate(zip(f.shape, r.shape)):
                    if isinstance(fd, int):
                        assert fd == rd, f"argument {i} dim {j}: {rd}, compiled {fd}"
                    else:
                        first = bound.setdefault(id(fd), (rd, i, j))
                        assert first[0] == rd, (f"argument {i} dim {j} is {rd}, but its symbol is tied to "
                                                f"argument {first[1]} dim {first[2]} = {first[0]}")
                assert r.stride(-1) == 1 or r.shape[-1] == 1, f"argument {i}: last dim not contiguous"
            checked.append(cfg)

        launch.kernels[cfg, True] = call
        return call

    monkeypatch.setattr(launch, "use_tvm_ffi", True)
    monkeypatch.setattr(launch, "compile_kernel", compile_checker)
    monkeypatch.setattr(launch, "tile_counters", lambda device: torch.zeros(2, dtype=torch.int32, device=device))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
    monkeypatch.setattr(launch, "kernels", {})
    return checked
