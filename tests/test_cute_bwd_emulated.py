"""The cute backward's host side on the CPU: bwd_launch's pieces (dQ's fragment order, the padded
per-sequence rows, preprocess, postprocess) one by one, and gradients through the public API and
autograd with the cute forward and the cute backward both emulated (`tests.cute_emulation`,
`tests.cute_bwd_emulation`), against the fp64 reference with the tolerance rule of
shared/STYLE.md. The real kernel's GPU tests are tests/test_cute_bwd_gpu.py."""

from __future__ import annotations

import functools
import itertools
import math
import os
import random

import pytest
import torch

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import fa3py  # noqa: E402
from cute_kernels import bwd_launch  # noqa: E402
from cute_kernels.bwd_sm90 import DQ_VEC, NUM_MMA_WG, THREADS_PER_WG, padded_offset  # noqa: E402
from cute_kernels.config import BWD_TILES, padded_hdim  # noqa: E402
from fa3py.validation import make_request  # noqa: E402
from tests._cute_bwd import FEATURES, HEADS, force_tile_m, make_inputs, train_step  # noqa: E402
from tests._util import check_backward  # noqa: E402
from tests.cute_bwd_emulation import emulated_sm90_bwd  # noqa: E402,F401  (fixture, by name)
from tests.cute_emulation import emulated_sm90  # noqa: E402,F401  (fixture, by name)

TILE_M = 64


# ----------------------------------------------------------------------------- dQ's order
@pytest.mark.parametrize("hdim", sorted(BWD_TILES))
def test_dq_value_coords_cover_the_tile_once(hdim):
    """The 256 consumer threads' dQ values land on every (row, column) of the block exactly once."""
    per_thread = TILE_M * hdim // (NUM_MMA_WG * THREADS_PER_WG)
    coords = [bwd_launch.dq_value_coords(TILE_M, hdim, t, r)
              for t in range(NUM_MMA_WG * THREADS_PER_WG) for r in range(per_thread)]
    assert sorted(coords) == [(r, c) for r in range(TILE_M) for c in range(hdim)]


@functools.lru_cache(maxsize=None)
def kernel_chunk_positions(hdim: int, tile_m: int = TILE_M) -> torch.Tensor:
    """Where in a dQ chunk the kernel puts each (row * hdim + column): thread t's value r goes to
    bwd_sm90's sdQ layout (DQ_VEC, THREADS_PER_WG, vectors, NUM_MMA_WG) : (1, DQ_VEC,
    DQ_VEC * THREADS_PER_WG, THREADS_PER_WG * values per thread), which the dQ warp's bulk
    reduce adds into the chunk as it is."""
    per_thread = tile_m * hdim // (NUM_MMA_WG * THREADS_PER_WG)
    pos = torch.full((tile_m * hdim,), -1, dtype=torch.long)
    for thread in range(NUM_MMA_WG * THREADS_PER_WG):
        wg, t = divmod(thread, THREADS_PER_WG)
        for r in range(per_thread):
            row, col = bwd_launch.dq_value_coords(tile_m, hdim, thread, r)
            pos[row * hdim + col] = (r % DQ_VEC + DQ_VEC * t + DQ_VEC * THREADS_PER_WG * (r // DQ_VEC)
                                     + THREADS_PER_WG * per_thread * wg)
    return pos


@pytest.mark.parametrize("hdim", sorted(BWD_TILES))
def test_dq_fragment_order_is_the_kernels(hdim):
    order = bwd_launch.dq_fragment_order(TILE_M, hdim, "cpu")
    assert torch.equal(order.sort().values, torch.arange(TILE_M * hdim)), "not a permutation"
    assert torch.equal(order, kernel_chunk_positions(hdim))


@pytest.mark.parametrize("hdim", sorted(BWD_TILES))
def test_dq_value_coords_match_the_mma_layout(hdim):
    """Tracing the kernel asserts dq_value_coords against the dQ MMA's partition of a few threads
    (FlashAttentionBackwardSm90.check_dq_fragment_order); compile-only, sm_90a."""
    import cutlass.cute as cute

    from cute_kernels.bwd_sm90 import FlashAttentionBackwardSm90
    from cute_kernels.config import BwdConfig

    cfg = BwdConfig.make("bf16", hdim)
    kernel = FlashAttentionBackwardSm90(cfg)
    cute.compile(kernel, *kernel.fake_args(cfg))


# ----------------------------------------------------------------------------- KeyBlockMask on the host
# (window_left, window_right, attention_chunk): windows alone (chunk 0), and chunks alone, with
# causal, with a window, smaller than / equal to / not dividing the 64-row and 64 / 128-key tiles.
MASK_CASES = [(-1, 0, 0), (37, 11, 0), (-1, -1, 16), (-1, -1, 64), (-1, 0, 40), (-1, 0, 128), (20, 5, 24),
              (-1, -1, 1), (-1, 0, 7), (200, -1, 100), (-1, 300, 300)]
MASK_SIZES = [(1, 1), (10, 700), (77, 300), (300, 77), (129, 129), (64, 165), (500, 500), (203, 113)]


def _key_block_bounds_fn(tile_n, wl, wr, chunk):
    """KeyBlockMask's (m_block_min, m_block_max, right_masked_end, left_masked_begin) for every
    key block, the kernel's own code run by CuTe DSL's host JIT."""
    from cutlass import Int32
    from cutlass.cute.runtime import from_dlpack

    from cute_kernels.mask import KeyBlockMask, SeqlenInfo

    @cutlass.cute.jit
    def bounds(out: cutlass.cute.Tensor, sq: cutlass.Int32, sk: cutlass.Int32, wl: cutlass.Int32,
               wr: cutlass.Int32, c: cutlass.Int32):
        seqlen = SeqlenInfo(Int32(0), Int32(0), sq, sk)
        for n in cutlass.range(out.shape[0]):
            mask = KeyBlockMask(TILE_M, tile_n, has_left, has_right, wl, wr, seqlen, n, chunk=c if chunk else None)
            lo, hi = mask.m_block_range()
            right_end = mask.m_block_right_masked_end(lo, hi)
            out[n, 0] = lo
            out[n, 1] = hi
            out[n, 2] = right_end
            out[n, 3] = mask.m_block_left_masked_begin(right_end, hi)

    has_left, has_right = wl >= 0, wr >= 0

    def call(sq, sk):
        out = torch.zeros(-(-sk // tile_n), 4, dtype=torch.int32)
        bounds(from_dlpack(out), Int32(sq), Int32(sk), Int32(wl), Int32(wr), Int32(chunk))
        return out.tolist()

    return call


@pytest.mark.parametrize("tile_n", [128, 64])
@pytest.mark.parametrize("wl,wr,chunk", MASK_CASES)
def test_key_block_bounds_on_the_host(tile_n, wl, wr, chunk):
    """The query blocks a key block visits and the ones it masks, the kernel's code against brute
    force (fa3py.reference's mask): every query block with a kept (row, key) pair is visited;
    the blocks in [right_masked_end, left_masked_begin) keep every key of the block (below
    seqlen_k) on every row (below seqlen_q); both ends of the range never decrease with the key
    block (deterministic mode's semaphores count on it). And the emulation's transcription
    (tests.cute_bwd_emulation) gives the same numbers."""
    from fa3py import reference
    from tests import cute_bwd_emulation as emu

    call = _key_block_bounds_fn(tile_n, wl, wr, chunk)
    for sq, sk in MASK_SIZES:
        keep = reference.keep_mask(sq, sk, wl, wr, attention_chunk=chunk)
        got = call(sq, sk)
        for n, (lo, hi, right_end, left_begin) in enumerate(got):
            args = (TILE_M, tile_n, n, sq, sk, wl, wr, wl >= 0, wr >= 0, chunk)
            want = emu.m_block_range(*args)
            assert (lo, hi) == want and (right_end, left_begin) == emu.masked_block_bounds(*args, *want), (sq, sk, n)
            block = keep[:, n * tile_n:(n + 1) * tile_n]
            rows = block.any(1).nonzero().flatten()
            if len(rows):
                assert lo <= rows.min() // TILE_M and hi >= rows.max() // TILE_M + 1, (sq, sk, n, lo, hi)
            for m in range(right_end, left_begin):
                assert block[m * TILE_M:(m + 1) * TILE_M].all(), (sq, sk, n, m, "unmasked block drops a key")
            if n:
                assert lo >= got[n - 1][0] and hi >= got[n - 1][1], (sq, sk, n, "range moved back")


@pytest.mark.parametrize("hdim", [128, 256])
@pytest.mark.parametrize("wl,wr,chunk", [(-1, -1, 16), (-1, 0, 40), (20, 5, 24), (-1, -1, 1), (37, 11, 0)])
def test_key_block_mask_apply_on_the_host(hdim, wl, wr, chunk):
    """KeyBlockMask.apply (both edges and the key mask on), the kernel's code run by CuTe DSL's
    host JIT for every consumer thread of the S^T MMA (128 keys as M; hdim 256: 64 keys, the
    queries split over the warpgroups), scattered back to (key, query): it keeps exactly the
    reference's (row, key) pairs for rows below seqlen_q and no key past seqlen_k."""
    from cutlass import Float32, Int32
    from cutlass.cute.runtime import from_dlpack

    from cute_kernels.bwd_sm90 import FlashAttentionBackwardSm90
    from cute_kernels.config import BwdConfig
    from cute_kernels.mask import KeyBlockMask, SeqlenInfo
    from fa3py import reference

    cute = cutlass.cute
    cfg = BwdConfig.make("bf16", hdim, has_left=wl >= 0, has_right=wr >= 0, chunk=chunk > 0)
    kernel = FlashAttentionBackwardSm90(cfg)
    tile_m, tile_n = cfg.tile_m, cfg.tile_n
    has_left, has_right = cfg.has_left, cfg.has_right

    @cute.jit  # (annotations are strings here: resolved in this module's globals)
    def masked(out: cutlass.cute.Tensor, sq: cutlass.Int32, sk: cutlass.Int32, wl: cutlass.Int32, wr: cutlass.Int32,
               c: cutlass.Int32, m_block: cutlass.Int32, n_block: cutlass.Int32):
        tiled_mma = kernel.make_tiled_mmas()[0]
        mask = KeyBlockMask(tile_m, tile_n, has_left, has_right, wl, wr, SeqlenInfo(Int32(0), Int32(0), sq, sk),
                            n_block, chunk=c if chunk else None)
        coords = cute.make_identity_tensor((tile_n, tile_m))
        for t in cutlass.range(NUM_MMA_WG * THREADS_PER_WG):
            thr = tiled_mma.get_slice(t)
            acc = cute.make_rmem_tensor(tiled_mma.partition_shape_C((tile_n, tile_m)), Float32)
            acc.fill(1.0)
            mask.apply(acc, thr, tiled_mma.get_slice(0), m_block, True, True, True)
            rc = thr.partition_C(coords)
            for i in cutlass.range_constexpr(cute.size(acc)):
                out[rc[i]] = acc[i]

    rng = random.Random(hdim * 1000 + chunk)
    for sq, sk in [(77, 300), (300, 77), (129, 129), (10, 700)]:
        keep = reference.keep_mask(sq, sk, wl, wr, attention_chunk=chunk)
        for _ in range(3):
            m_block, n_block = rng.randrange(-(-sq // tile_m)), rng.randrange(-(-sk // tile_n))
            pairs = keep[m_block * tile_m:(m_block + 1) * tile_m, n_block * tile_n:(n_block + 1) * tile_n]
            if _ == 0 and keep.any():  # one block pair that holds kept keys
                row, key = [int(x) for x in keep.nonzero()[rng.randrange(int(keep.sum()))]]
                m_block, n_block = row // tile_m, key // tile_n
                pairs = keep[m_block * tile_m:(m_block + 1) * tile_m, n_block * tile_n:(n_block + 1) * tile_n]
            out = torch.zeros(tile_n, tile_m)
            masked(from_dlpack(out), Int32(sq), Int32(sk), Int32(wl), Int32(wr), Int32(chunk), Int32(m_block),
                   Int32(n_block))
            want = torch.zeros(tile_n, tile_m, dtype=torch.bool)
            want[:pairs.shape[1], :pairs.shape[0]] = pairs.t()
            real_rows = min(tile_m, sq - m_block * tile_m)
            got = out[:, :real_rows]
            assert torch.equal(got == 1.0, want[:, :real_rows]), (sq, sk, m_block, n_block)
            assert (got[~want[:, :real_rows]] == -math.inf).all()
            assert (out[max(0, sk - n_block * tile_n):] == -math.inf).all(), "a key past seqlen_k kept"


# ----------------------------------------------------------------------------- padded rows
def _packed_request(lengths, h=2, d=64, dtype=torch.bfloat16):
    q = torch.randn(sum(lengths), h, d).to(dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return make_request(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
                        max_seqlen_k=max(lengths))


@pytest.mark.parametrize("seed", range(40))
def test_padded_rows_keep_sequences_apart(seed):
    """Packed rows move to padded_offset(cu_seqlens[b], b, tile_m) + i (the kernel's), and every
    sequence's whole tile_m blocks lie apart from the others' and inside padded_rows."""
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 2, 63, 64, 65, 127, 128, 129, rng.randint(0, 300)])
               for _ in range(rng.randint(1, 7))]
    if sum(lengths) == 0:
        lengths[0] = 1
    req = _packed_request(lengths, h=1, d=8)
    index = bwd_launch.packed_row_index(req, TILE_M)
    rows = bwd_launch.padded_rows(req, TILE_M)
    cu = req.cu_seqlens_q.tolist()
    taken = torch.zeros(rows, dtype=torch.bool)
    for b, n in enumerate(lengths):
        start = padded_offset(cu[b], b, TILE_M)
        assert start % TILE_M == 0
        assert torch.equal(index[cu[b]:cu[b + 1]], start + torch.arange(n)), f"sequence {b} of {lengths}"
        end = start + -(-n // TILE_M) * TILE_M
        assert end <= rows, f"sequence {b} of {lengths}: blocks end at {end} > {rows} rows"
        assert not taken[start:end].any(), f"sequence {b} of {lengths} shares a block"
        taken[start:end] = True


@pytest.mark.parametrize("packed_q", [False, True], ids=["batched", "packed"])
def test_preprocess(packed_q):
    """LSE_log2 = LSE log2(e) on the sequences' rows, +inf where LSE is -inf and on every padding
    row; dPsum = rowsum(dO O) there and 0 elsewhere; the dQ accumulator zeroed, tile_m x hdim per
    block. Against float64."""
    if packed_q:
        req = _packed_request([5, 0, 64, 130, 1], h=3, d=72)
        lse = torch.randn(3, 200)
    else:
        q = torch.randn(2, 130, 3, 72).to(torch.bfloat16)
        req = make_request(q, q, q)
        lse = torch.randn(2, 3, 130)
    out, dout = torch.randn_like(req.q), torch.randn_like(req.q)
    lse.view(-1)[::7] = -math.inf
    cfg = bwd_launch.config_for(req)
    index = bwd_launch.packed_row_index(req, cfg.tile_m) if packed_q else None
    lse2, dpsum, dq_acc = bwd_launch.preprocess(req, cfg, out, lse, dout, index)
    rows = bwd_launch.padded_rows(req, cfg.tile_m)
    lead = (3,) if packed_q else (2, 3)
    assert lse2.shape == dpsum.shape == (*lead, rows) and dq_acc.shape == (*lead, rows * cfg.hdim)
    assert lse2.dtype == dpsum.dtype == dq_acc.dtype == torch.float32
    assert not dq_acc.any()
    want_lse2 = torch.where(lse == -math.inf, math.inf, lse.double() * math.log2(math.e))
    want_dpsum = (dout.double() * out.double()).sum(-1)  # (b, s, h) or (total, h)
    if packed_q:
        got_lse2, got_dpsum, want_dpsum = lse2[:, index], dpsum[:, index], want_dpsum.t()
        used = torch.zeros(rows, dtype=torch.bool)
        used[index] = True
        pad_lse2, pad_dpsum = lse2[:, ~used], dpsum[:, ~used]
    else:
        got_lse2, got_dpsum, want_dpsum = lse2[..., :130], dpsum[..., :130], want_dpsum.transpose(1, 2)
        pad_lse2, pad_dpsum = lse2[..., 130:], dpsum[..., 130:]
    assert torch.equal(got_lse2.isinf(), want_lse2.isinf()) and (got_lse2[got_lse2.isinf()] > 0).all()
    fin = want_lse2.isfinite()
    torch.testing.assert_close(got_lse2[fin].double(), want_lse2[fin], rtol=2e-7, atol=0)
    torch.testing.assert_close(got_dpsum.double(), want_dpsum, rtol=1e-5, atol=1e-5)
    assert pad_lse2.numel() > 0 and (pad_lse2 == math.inf).all(), "a padding row's LSE_log2 is not +inf"
    assert not pad_dpsum.any()


@pytest.mark.parametrize("packed_q", [False, True], ids=["batched", "packed"])
def test_preprocess_rows_past_seqused_are_padding(packed_q):
    """With seqused_q, rows past a sequence's used rows are padding as the kernel writes them:
    LSE_log2 +inf and dPsum 0 whatever LSE, O and dO hold there (the GPU test compares the
    preprocessing kernel with this on random LSE)."""
    h, d = 2, 64
    if packed_q:
        lengths, used = [40, 7, 100], [13, 7, 0]
        q = torch.randn(sum(lengths), h, d).to(torch.bfloat16)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        req = make_request(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
                           max_seqlen_k=max(lengths), seqused_q=torch.tensor(used, dtype=torch.int32))
        lse = torch.randn(h, sum(lengths))
    else:
        q = torch.randn(2, 90, h, d).to(torch.bfloat16)
        req = make_request(q, q, q, seqused_q=torch.tensor([50, 3], dtype=torch.int32),
                           seqused_k=torch.tensor([90, 90], dtype=torch.int32))
        lse = torch.randn(2, h, 90)
    out, dout = torch.randn_like(req.q), torch.randn_like(req.q)
    cfg = bwd_launch.config_for(req)
    index = bwd_launch.packed_row_index(req, cfg.tile_m) if packed_q else None
    lse2, dpsum, _ = bwd_launch.preprocess(req, cfg, out, lse, dout, index)
    keep = bwd_launch._used_rows(req)  # (total,) or (b, s)
    if packed_q:
        got_lse2, got_dpsum = lse2[:, index], dpsum[:, index].t()  # (h, total), (total, h)
        assert (got_lse2[:, ~keep] == math.inf).all() and got_lse2[:, keep].isfinite().all()
    else:
        got_lse2, got_dpsum = lse2[..., :90], dpsum[..., :90].transpose(1, 2)  # (b, h, s), (b, s, h)
        assert (got_lse2.transpose(1, 2)[~keep] == math.inf).all() and got_lse2.transpose(1, 2)[keep].isfinite().all()
    assert not got_dpsum[~keep].any() and got_dpsum[keep].ne(0).all()


@pytest.mark.parametrize("d", [64, 72, 96, 120])
@pytest.mark.parametrize("packed_q", [False, True], ids=["batched", "packed"])
def test_postprocess_inverts_the_fragment_order(packed_q, d):
    """dQ laid out in the kernel's chunks (kernel_chunk_positions, independent of
    dq_fragment_order), with garbage on the padding rows and columns, comes back as dQ * scale
    in the tensors' layout and dtype."""
    dtype = torch.float16
    if packed_q:
        req = _packed_request([5, 0, 64, 130, 1], h=3, d=d, dtype=dtype)
    else:
        q = torch.randn(2, 130, 3, d).to(dtype)
        req = make_request(q, q, q)
    cfg = bwd_launch.config_for(req)
    tm, hd = cfg.tile_m, cfg.hdim
    index = bwd_launch.packed_row_index(req, tm) if packed_q else None
    rows = bwd_launch.padded_rows(req, tm)
    lead = (3,) if packed_q else (2, 3)
    dq = torch.randn(*lead, rows, hd)  # per head: padded rows x the kernel's head dim
    acc = torch.empty(*lead, rows // tm, tm * hd)
    acc[..., kernel_chunk_positions(hd, tm)] = dq.view(*lead, rows // tm, tm * hd)
    got = bwd_launch.postprocess(req, cfg, acc.view(*lead, rows * hd), index)
    scale = req.params.softmax_scale
    want = dq[..., index, :d].transpose(0, 1) if packed_q else dq[:, :, :130, :d].transpose(1, 2)
    assert got.shape == req.q.shape and got.dtype == dtype
    assert torch.equal(got, (want * scale).to(dtype))


# ----------------------------------------------------------------------------- gradients
# (query, key) lengths per sequence: batched use the first pair for all sequences
LAYOUTS = {
    "batched": [(113, 203)] * 2,  # seqlen_q < seqlen_k, neither a multiple of 64 / 128
    "batched_tall": [(203, 77)] * 2,  # seqlen_q > seqlen_k
    "ragged": [(0, 5), (1, 1), (65, 130), (7, 0), (130, 64), (64, 129)],  # 0- and 1-token sequences
    "seqused": [(70, 150), (5, 9), (129, 60), (3, 3)],
}
SEQUSED = [(63, 130), (5, 0), (100, 60), (0, 2)]  # (seqused_q, seqused_k) of "seqused"
HDIMS = [64, 96, 128, 72, 80, 120]
DTYPES = [torch.bfloat16, torch.float16]


def _grid():
    """Every feature on every layout; head dims, heads and dtypes spread over the cases by a
    seeded draw (each of them appears on batched and packed layouts)."""
    rng = random.Random(7)
    cases = []
    for feature in FEATURES:
        for layout in LAYOUTS:
            d, heads, dtype = rng.choice(HDIMS), rng.choice(list(HEADS)), rng.choice(DTYPES)
            api = "varlen" if layout in ("ragged", "seqused") else rng.choice(["attention", "func", "grad"])
            cases.append(pytest.param(api, layout, feature, heads, d, dtype,
                                      id=f"{api}-{layout}-{feature}-{heads}-d{d}-{str(dtype)[6:]}"))
    return cases


GRID = _grid()


def test_grid_covers_every_head_dim_heads_and_dtype():
    values = [p.values for p in GRID]
    assert {v[4] for v in values} == set(HDIMS) and {v[3] for v in values} == set(HEADS)
    assert {v[5] for v in values} == set(DTYPES) and {v[0] for v in values} == {"attention", "func", "grad", "varlen"}


@pytest.mark.parametrize("api,layout,feature,heads,d,dtype", GRID)
def test_grads_cute_forward_cute_backward_emulated(emulated_sm90_bwd, api, layout, feature, heads, d, dtype):
    h, hk = HEADS[heads]
    seqused = SEQUSED if layout == "seqused" else None
    q, k, v, kw = make_inputs(LAYOUTS[layout], h, hk, d, dtype, "cpu", api == "varlen", seqused)
    req, fwd, bwd = train_step(api, q, k, v, kw, **FEATURES[feature])
    assert (fwd, bwd) == ("cute", "cute") and len(emulated_sm90_bwd) == 1
    text = fa3py.explain(q, k, v, **kw, **FEATURES[feature])
    assert "forward: cute" in text and "backward: cute" in text, text


@pytest.mark.parametrize("sq,sk,window", [(1, 1, (-1, -1)), (239, 1, (-1, 0)), (1, 190, (0, 0)),
                                          (129, 300, (5, 130)), (300, 129, (130, 5)), (64, 128, (0, -1))])
def test_grads_emulated_ragged_sizes(emulated_sm90_bwd, sq, sk, window):
    """Single rows and keys, blocks exactly full, windows narrower and wider than the tiles."""
    q, k, v, _ = make_inputs([(sq, sk)] * 2, 4, 2, 64, torch.bfloat16, "cpu", False)
    assert train_step("func", q, k, v, {}, window_size=window)[1:] == ("cute", "cute")
    assert emulated_sm90_bwd


@pytest.mark.parametrize("d,dv,feature,heads,layout", [
    (192, 192, "causal", "gqa", "varlen"), (256, 256, "plain", "mha", "batched"),
    (256, 256, "softcap_causal", "mqa", "varlen"), (160, 160, "both", "mha", "batched"),
    (192, 128, "plain", "mha", "varlen"), (176, 128, "causal", "gqa", "batched"),
])
def test_grads_emulated_wide_head_dims(emulated_sm90_bwd, d, dv, feature, heads, layout):
    """Head dims 192 / 256 (and 192 x 128) through the same host code (their tile, the V / dO
    width, dQ's order), against the fp64 reference: the 64-key tile with dK / dV split by columns,
    but hdim 192 (160 padded) with hdim_v = hdim takes the three-warpgroup 96-key tile."""
    h, hk = HEADS[heads]
    lens = [(70, 130), (0, 5), (65, 64)] if layout == "varlen" else [(70, 130)] * 2
    q, k, v, kw = make_inputs(lens, h, hk, d, torch.float16, "cpu", layout == "varlen")
    v = v[..., :dv].contiguous()
    req, fwd, bwd = train_step("varlen" if layout == "varlen" else "attention", q, k, v, kw, **FEATURES[feature])
    assert (fwd, bwd) == ("cute", "cute")
    cfg = emulated_sm90_bwd[-1] and bwd_launch.config_for(req)
    dkvt = padded_hdim(d) == 192 and dv == d
    assert (cfg.tile_n, cfg.dkv_split_hdim, cfg.dkv_transposed) == ((96, False, True) if dkvt else (64, True, False))


@pytest.mark.parametrize("heads", ["mha", "mqa"])
def test_deterministic_backward_on_cute(emulated_sm90_bwd, heads):
    """deterministic=True runs the cute backward with its semaphores (the emulation checks they
    come zeroed, one per (head, query block)), and gives the reference's gradients."""
    h, hk = HEADS[heads]
    q, k, v, kw = make_inputs([(70, 70), (130, 45)], h, hk, 64, torch.bfloat16, "cpu", True)
    req, fwd, bwd = train_step("varlen", q, k, v, kw, deterministic=True, window_size=(40, 5))
    assert (fwd, bwd) == ("cute", "cute") and emulated_sm90_bwd[-1].params.deterministic


@pytest.mark.parametrize("heads", ["gqa", "mqa"])
def test_group_summed_in_registers(emulated_sm90_bwd, monkeypatch, heads):
    """Without head splits (a grid the group need not be split for) one CTA walks every query head
    of its KV head: dK / dV summed over the group in registers, in the tensors' dtype. (The small
    shapes of the other CPU tests make splits the default.)"""
    from cute_kernels import bwd_launch

    monkeypatch.setattr(bwd_launch, "SPLIT_WAVES", 0)
    h, hk = HEADS[heads]
    q, k, v, kw = make_inputs([(90, 200), (0, 7), (64, 1)], h, hk, 96, torch.bfloat16, "cpu", True)
    req = make_request(q, k, v, **kw, causal=True)
    assert bwd_launch.head_splits(req) == 1 and not bwd_launch.config_for(req).dkv_partial
    req, fwd, bwd = train_step("varlen", q, k, v, kw, causal=True)
    assert bwd == "cute" and emulated_sm90_bwd


def test_mqa_head_splits_partials(emulated_sm90_bwd, monkeypatch):
    """A small MQA grid splits the group over CTAs (float32 dK / dV partials summed by the host)."""
    from cute_kernels import bwd_launch

    monkeypatch.setattr(bwd_launch, "SPLIT_WAVES", 64)  # the CPU's 132 "SMs": force splitting
    q, k, v, kw = make_inputs([(100, 150)], 8, 1, 64, torch.float16, "cpu", False)
    req = make_request(q, k, v, causal=True)
    assert bwd_launch.head_splits(req) == 8 and bwd_launch.config_for(req).dkv_partial
    req, fwd, bwd = train_step("attention", q, k, v, kw, causal=True)
    assert bwd == "cute" and emulated_sm90_bwd


# (layout, feature, attention_chunk, heads, head dim): chunks alone, with causal, with windows;
# smaller than the 64-row / 64- or 128-key tiles, equal to them, not dividing them, above them.
CHUNK_GRID = [
    ("batched", "plain", 100, "mha", 64, torch.bfloat16),
    ("batched", "causal", 64, "gqa", 128, torch.float16),
    ("batched_tall", "both", 40, "mqa", 64, torch.bfloat16),
    ("batched_tall", "plain", 7, "gqa", 96, torch.float16),
    ("ragged", "causal", 24, "gqa", 96, torch.bfloat16),
    ("ragged", "plain", 128, "mqa", 128, torch.float16),
    ("ragged", "left", 1, "mha", 64, torch.bfloat16),
    ("seqused", "right", 48, "gqa", 64, torch.float16),
    ("batched", "softcap_causal", 32, "mha", 64, torch.bfloat16),
    ("batched", "causal", 300, "mha", 256, torch.bfloat16),
    ("ragged", "both", 64, "gqa", 256, torch.float16),
    ("batched_tall", "plain", 50, "mqa", 256, torch.bfloat16),
]


@pytest.mark.parametrize("layout,feature,chunk,heads,d,dtype", [
    pytest.param(*c, id=f"{c[0]}-{c[1]}-chunk{c[2]}-{c[3]}-d{c[4]}-{str(c[5])[6:]}") for c in CHUNK_GRID])
def test_grads_emulated_chunk(emulated_sm90_bwd, layout, feature, chunk, heads, d, dtype):
    """attention_chunk through the cute forward and backward (both emulated): the chunked backward
    config (cfg.chunk, C passed at launch), the query blocks each key block visits and the chunk
    edges where it masks, against the fp64 reference."""
    h, hk = HEADS[heads]
    varlen = layout in ("ragged", "seqused")
    seqused = SEQUSED if layout == "seqused" else None
    q, k, v, kw = make_inputs(LAYOUTS[layout], h, hk, d, dtype, "cpu", varlen, seqused)
    features = dict(FEATURES[feature], attention_chunk=chunk)
    req, fwd, bwd = train_step("varlen" if varlen else "attention", q, k, v, kw, **features)
    assert (fwd, bwd) == ("cute", "cute") and len(emulated_sm90_bwd) == 1
    assert bwd_launch.config_for(req).chunk


@pytest.mark.parametrize("heads,chunk,window", [("mha", 24, (-1, -1)), ("mqa", 40, (-1, 0)), ("gqa", 64, (30, 2))])
def test_deterministic_backward_chunk(emulated_sm90_bwd, heads, chunk, window):
    """deterministic=True with attention_chunk: every query block's key blocks add in increasing
    order (the emulation asserts the semaphore protocol: a key block past a query block's chunk
    counts without adding), head splits too (MQA), and the reference's gradients."""
    h, hk = HEADS[heads]
    q, k, v, kw = make_inputs([(70, 200), (130, 45), (1, 1), (0, 3)], h, hk, 64, torch.bfloat16, "cpu", True)
    req, fwd, bwd = train_step("varlen", q, k, v, kw, deterministic=True, window_size=window, attention_chunk=chunk)
    assert (fwd, bwd) == ("cute", "cute")
    cfg = bwd_launch.config_for(req)
    assert cfg.deterministic and cfg.chunk and cfg.dkv_partial == (heads != "mha")


# ----------------------------------------------------------------------------- the tests can fail
def _unpadded_rows(req, tile_m):
    return torch.arange(req.q.shape[0])


def _padding_lse_zero(preprocess):
    def wrapped(*args):
        lse2, dpsum, dq_acc = preprocess(*args)
        return lse2.nan_to_num(posinf=0.0), dpsum, dq_acc
    return wrapped


def _dq_rows_shifted(postprocess):
    def wrapped(req, cfg, dq_acc, row_index):
        return postprocess(req, cfg, dq_acc, None if row_index is None else row_index.roll(1))
    return wrapped


@pytest.mark.parametrize("bug", ["unpadded_rows", "padding_lse_zero", "dq_rows_shifted"])
def test_emulation_catches_host_bugs(emulated_sm90_bwd, monkeypatch, bug):
    """The emulated kernel reads the host's layouts as the kernel would: a host that packs rows
    without padding, gives padding rows a finite LSE, or unpacks dQ to the wrong rows fails."""
    if bug == "unpadded_rows":
        monkeypatch.setattr(bwd_launch, "packed_row_index", _unpadded_rows)
    elif bug == "padding_lse_zero":
        monkeypatch.setattr(bwd_launch, "preprocess", _padding_lse_zero(bwd_launch.preprocess))
    else:
        monkeypatch.setattr(bwd_launch, "postprocess", _dq_rows_shifted(bwd_launch.postprocess))
    q, k, v, kw = make_inputs([(5, 9), (70, 70), (1, 3)], 2, 2, 64, torch.bfloat16, "cpu", True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fa3py.flash_attn_varlen_func(*leaves, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert emulated_sm90_bwd
    with pytest.raises(AssertionError):
        check_backward(make_request(q, k, v, **kw), dout, [x.grad for x in leaves])


@pytest.mark.parametrize("bug", ["config_without_chunk", "chunk_scalar_off", "range_short_by_one"])
def test_emulation_catches_chunk_bugs(emulated_sm90_bwd, monkeypatch, bug):
    """With attention_chunk, a host that compiles the backward without the chunk flag or passes
    the wrong C, or a query-block range that stops one block short (the kernel's range logic,
    which the emulation transcribes), gives gradients the reference rejects."""
    import dataclasses

    from tests import cute_bwd_emulation as emu

    if bug == "config_without_chunk":
        config_for = bwd_launch.config_for
        monkeypatch.setattr(bwd_launch, "config_for", lambda req: dataclasses.replace(config_for(req), chunk=False))
    elif bug == "chunk_scalar_off":
        scalars = bwd_launch.kernel_scalars

        def chunk_off_by_one(req):
            *head, chunk, max_seqlen_k = scalars(req)
            return (*head, chunk + 1, max_seqlen_k)

        monkeypatch.setattr(bwd_launch, "kernel_scalars", chunk_off_by_one)
    else:
        m_block_range = emu.m_block_range

        def one_block_short(*args):
            lo, hi = m_block_range(*args)
            return lo, max(lo, hi - 1)

        monkeypatch.setattr(emu, "m_block_range", one_block_short)
    q, k, v, kw = make_inputs([(70, 150), (130, 64)], 2, 2, 64, torch.bfloat16, "cpu", True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fa3py.flash_attn_varlen_func(*leaves, **kw, causal=True, attention_chunk=40)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert emulated_sm90_bwd
    with pytest.raises(AssertionError):
        check_backward(make_request(q, k, v, **kw, causal=True, attention_chunk=40), dout, [x.grad for x in leaves])


# ----------------------------------------------------------------------------- tile_m 128 (hdim 64), 80 (hdim 128)
# Tiles other than 64 rows (config.BWD_TILE_M_VARIANTS / BWD_TILES): hdim 64's default 128 rows
# (dQ split by rows over the warpgroups) and hdim 128's 80 rows (dQ^T, the head dim as M). Forced
# per test through bwd_launch.config_for, so these tests keep covering them whatever the defaults.
WIDE_TILES = [(64, 128), (128, 80)]


def record_configs(monkeypatch) -> list:
    """The configs bwd_launch.launch_kernel (the emulated kernel) runs with, in a list it fills."""
    configs = []
    launch = bwd_launch.launch_kernel

    def recording(req, cfg, *args):
        configs.append(cfg)
        return launch(req, cfg, *args)

    monkeypatch.setattr(bwd_launch, "launch_kernel", recording)
    return configs


def grid_params(grid):
    """pytest params of a (layout, feature, heads, padding below the head dim, dtype) grid."""
    return [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}-pad{c[3]}-{str(c[4])[6:]}") for c in grid]


def grid_case(layout, feature, heads, d, dtype):
    """One case of a (layout, feature, heads, head dim, dtype) grid through train_step (the cute
    forward and backward against the fp64 reference); returns the backends that ran."""
    h, hk = HEADS[heads]
    varlen = layout in ("ragged", "seqused")
    q, k, v, kw = make_inputs(LAYOUTS[layout], h, hk, d, dtype, "cpu", varlen,
                              SEQUSED if layout == "seqused" else None)
    return train_step("varlen" if varlen else "attention", q, k, v, kw, **FEATURES[feature])[1:]


@pytest.fixture(params=WIDE_TILES, ids=[f"d{d}_m{m}" for d, m in WIDE_TILES])
def bwd_wide_tile(emulated_sm90_bwd, monkeypatch, request):
    """`emulated_sm90_bwd` with config_for giving the head dim its tile_m; returns (head dim,
    tile_m, the configs the emulated kernel ran with)."""
    hdim, tile_m = request.param
    force_tile_m(monkeypatch, hdim, tile_m)
    return hdim, tile_m, record_configs(monkeypatch)


def test_wide_tiles_are_their_head_dims_only():
    """hdim 64 defaults to tile_m 128 (64 its variant), hdim 128 takes 80 as a variant; the other
    head dims take 64 and refuse both."""
    from cute_kernels.config import BwdConfig

    assert all(BwdConfig.make("bf16", d).tile_m == (128 if d == 64 else 64) for d in BWD_TILES)
    cfg = BwdConfig.make("bf16", 64, has_right=True)
    assert (cfg.tile_m, cfg.tile_n, cfg.q_stages, cfg.dkv_split_hdim) == (128, 128, 2, False)
    assert BwdConfig.make("bf16", 64, tile_m=64).tile_m == 64
    cfg = BwdConfig.make("bf16", 128, tile_m=80, ds_stages=2)
    assert (cfg.tile_m, cfg.tile_n, cfg.q_stages, cfg.dkv_split_hdim) == (80, 128, 2, False)
    for d, tile_m in itertools.product((64, 96, 128, 192, 256), (80, 128)):
        if (d, tile_m) not in WIDE_TILES:
            with pytest.raises(AssertionError):
                BwdConfig.make("bf16", d, tile_m=tile_m)


def test_m80_where_long_and_unwindowed(monkeypatch):
    """bwd_launch.variants: tile_m 80 only at hdim 128: with M80_BY_DEFAULT from M80_MIN_SEQLEN_Q
    query rows without a window, chunk or softcap (causal included), with two sdS buffers; with
    FA3PY_CUTE_BWD_M80=1 (m80) for every config, with 0 never. config_for passes the request's."""
    monkeypatch.setattr(bwd_launch, "m80", None)
    monkeypatch.setattr(bwd_launch, "ds_stages", None)
    monkeypatch.setattr(bwd_launch, "stat_regs", None)
    monkeypatch.setattr(bwd_launch, "dv_early", None)
    monkeypatch.setattr(bwd_launch, "dkv_smem", None)
    long, short = bwd_launch.M80_MIN_SEQLEN_Q, bwd_launch.M80_MIN_SEQLEN_Q - 1
    assert bwd_launch.M80_BY_DEFAULT
    assert bwd_launch.variants(128, False, False, max_seqlen_q=long) == dict(ds_stages=2, dq_red=False, tile_m=80)
    assert bwd_launch.variants(128, False, False, max_seqlen_q=short) == dict(ds_stages=1, dq_red=False, dkv_smem=True,
                                                                              stat_regs=16, dv_early=True)
    monkeypatch.setattr(bwd_launch, "ds_stages", 1)
    assert bwd_launch.variants(128, False, False, max_seqlen_q=long) == dict(ds_stages=1, dq_red=False, tile_m=80)
    monkeypatch.setattr(bwd_launch, "ds_stages", None)
    assert "tile_m" not in bwd_launch.variants(128, False, False, max_seqlen_q=short)
    assert all("tile_m" not in bwd_launch.variants(128, softcap, False, local, max_seqlen_q=long)
               for softcap, local in ((True, False), (False, True)))
    assert all("tile_m" not in bwd_launch.variants(d, False, False, max_seqlen_q=long) for d in (64, 96, 192, 256))
    monkeypatch.setattr(bwd_launch, "m80", True)
    assert bwd_launch.variants(128, True, True, True).get("tile_m") == 80
    monkeypatch.setattr(bwd_launch, "m80", False)
    assert "tile_m" not in bwd_launch.variants(128, False, False, max_seqlen_q=long)
    monkeypatch.setattr(bwd_launch, "m80", None)

    def cfg(sq, **kw):
        q = torch.randn(1, sq, 1, 128, dtype=torch.bfloat16)
        k = torch.randn(1, 64, 1, 128, dtype=torch.bfloat16)
        return bwd_launch.config_for(make_request(q, k, k, **kw))

    assert cfg(long).tile_m == 80 and cfg(long, causal=True).tile_m == 80
    assert cfg(short).tile_m == 64 and cfg(long, window_size=(100, 0)).tile_m == 64
    assert cfg(long, softcap=5.0).tile_m == 64 and cfg(long, causal=True, attention_chunk=512).tile_m == 64


@pytest.mark.parametrize("hdim,tile_m", WIDE_TILES)
def test_dq_value_coords_wide_tiles(hdim, tile_m):
    """Each thread's values cover every (row, column) once; warpgroup w holds rows 64w .. 64w + 63
    (tile_m 128: all columns) or head-dim columns 64w .. 64w + 63 (tile_m 80, dQ^T: all rows);
    the fragment order is where the kernel's sdQ chunks put them."""
    per_thread = tile_m * hdim // (NUM_MMA_WG * THREADS_PER_WG)
    coords = {}
    for thread in range(NUM_MMA_WG * THREADS_PER_WG):
        wg = thread // THREADS_PER_WG
        for r in range(per_thread):
            row, col = bwd_launch.dq_value_coords(tile_m, hdim, thread, r)
            assert 64 * wg <= (row if tile_m == 128 else col) < 64 * (wg + 1)
            coords[row, col] = (thread, r)
    assert sorted(coords) == [(r, c) for r in range(tile_m) for c in range(hdim)]
    assert torch.equal(bwd_launch.dq_fragment_order(tile_m, hdim, "cpu"), kernel_chunk_positions(hdim, tile_m))


@pytest.mark.parametrize("hdim,tile_m", WIDE_TILES)
def test_dq_value_coords_match_the_mma_layout_wide_tiles(hdim, tile_m):
    """Tracing the kernel asserts dq_value_coords against its dQ MMA (tile_m 128: split by rows;
    80: dQ^T); compile-only, sm_90a."""
    import cutlass.cute as cute

    from cute_kernels.bwd_sm90 import FlashAttentionBackwardSm90
    from cute_kernels.config import BwdConfig

    cfg = BwdConfig.make("bf16", hdim, tile_m=tile_m, softcap=True, has_right=True)
    kernel = FlashAttentionBackwardSm90(cfg)
    assert (kernel.dq_split_rows, kernel.dq_swap_ab) == (tile_m == 128, tile_m == 80)
    assert kernel.dq_per_thread == tile_m * hdim // 256
    cute.compile(kernel, *kernel.fake_args(cfg))


@pytest.mark.parametrize("tm", [128, 80])
@pytest.mark.parametrize("seed", range(10))
def test_padded_rows_keep_sequences_apart_wide_tiles(seed, tm):
    """padded_offset / packed_row_index / padded_rows at 128- and 80-row blocks."""
    rng = random.Random(1000 + seed)
    lengths = [rng.choice([0, 1, tm - 1, tm, tm + 1, 2 * tm - 1, 2 * tm, 2 * tm + 1, rng.randint(0, 500)])
               for _ in range(rng.randint(1, 7))]
    lengths[0] = max(lengths[0], 1)
    req = _packed_request(lengths, h=1, d=8)
    index, rows = bwd_launch.packed_row_index(req, tm), bwd_launch.padded_rows(req, tm)
    cu = req.cu_seqlens_q.tolist()
    taken = torch.zeros(rows, dtype=torch.bool)
    for b, n in enumerate(lengths):
        start = padded_offset(cu[b], b, tm)
        assert start % tm == 0 and torch.equal(index[cu[b]:cu[b + 1]], start + torch.arange(n))
        end = start + -(-n // tm) * tm
        assert end <= rows and not taken[start:end].any(), (b, lengths)
        taken[start:end] = True


# (layout, feature, heads, padding below the tile's head dim, dtype)
WIDE_GRID = [
    ("batched", "plain", "mha", 0, torch.bfloat16),
    ("batched", "causal", "gqa", 0, torch.float16),
    ("batched_tall", "both", "mqa", 0, torch.bfloat16),
    ("batched_tall", "right", "mha", 8, torch.bfloat16),
    ("ragged", "causal", "gqa", 0, torch.bfloat16),
    ("ragged", "left", "mha", 0, torch.float16),
    ("ragged", "both", "mqa", 24, torch.bfloat16),
    ("ragged", "softcap_causal", "gqa", 0, torch.bfloat16),
    ("seqused", "plain", "gqa", 0, torch.float16),
    ("seqused", "both", "mha", 0, torch.bfloat16),
    ("batched", "softcap", "mha", 0, torch.float16),
]


@pytest.mark.parametrize("layout,feature,heads,pad,dtype", grid_params(WIDE_GRID))
def test_grads_emulated_wide_tiles(bwd_wide_tile, layout, feature, heads, pad, dtype):
    """The wide tiles through the host code (padded rows, dQ's fragment order, masks in 128- or
    80-row query blocks), the kernel emulated, against the fp64 reference."""
    hdim, tile_m, configs = bwd_wide_tile
    assert grid_case(layout, feature, heads, hdim - pad, dtype) == ("cute", "cute")
    assert [c.tile_m for c in configs] == [tile_m]


@pytest.mark.parametrize("sq,sk,window", [(1, 1, (-1, -1)), (239, 1, (-1, 0)), (1, 190, (0, 0)),
                                          (129, 300, (5, 130)), (300, 129, (130, 5)), (128, 256, (0, -1)),
                                          (257, 257, (-1, 0)), (81, 161, (-1, -1))])
def test_grads_emulated_ragged_sizes_wide_tiles(bwd_wide_tile, sq, sk, window):
    hdim, tile_m, configs = bwd_wide_tile
    q, k, v, _ = make_inputs([(sq, sk)] * 2, 4, 2, hdim, torch.bfloat16, "cpu", False)
    assert train_step("func", q, k, v, {}, window_size=window)[1:] == ("cute", "cute")
    assert [c.tile_m for c in configs] == [tile_m]


@pytest.mark.parametrize("heads,window,chunk", [("mha", (40, 5), 0), ("mqa", (-1, 0), 0), ("gqa", (-1, -1), 48)])
def test_deterministic_backward_wide_tiles(bwd_wide_tile, heads, window, chunk):
    """deterministic=True on the wide tiles: one semaphore per query block (the emulation
    asserts the protocol), head splits too (MQA), attention_chunk too."""
    hdim, tile_m, configs = bwd_wide_tile
    h, hk = HEADS[heads]
    q, k, v, kw = make_inputs([(70, 200), (300, 45), (1, 1), (0, 3), (129, 130)], h, hk, hdim, torch.bfloat16,
                              "cpu", True)
    req, fwd, bwd = train_step("varlen", q, k, v, kw, deterministic=True, window_size=window,
                               attention_chunk=chunk)
    assert (fwd, bwd) == ("cute", "cute")
    cfg, = configs
    assert cfg.tile_m == tile_m and cfg.deterministic and cfg.chunk == (chunk > 0)


def test_emulation_catches_64_row_padding_at_wide_tiles(bwd_wide_tile, monkeypatch):
    """A host that pads the packed rows to 64-row blocks for a 128- or 80-row launch gives
    gradients the reference rejects (the kernel reads each sequence's rows from tile_m blocks)."""
    hdim, tile_m, configs = bwd_wide_tile
    row_index = bwd_launch.packed_row_index
    monkeypatch.setattr(bwd_launch, "packed_row_index", lambda req, tile_m: row_index(req, 64))
    q, k, v, kw = make_inputs([(5, 9), (70, 170), (1, 3), (200, 64)], 2, 2, hdim, torch.bfloat16, "cpu", True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fa3py.flash_attn_varlen_func(*leaves, **kw)
    dout = torch.randn_like(out)
    with pytest.raises(AssertionError):
        out.backward(dout)
        check_backward(make_request(q, k, v, **kw), dout, [x.grad for x in leaves])
    assert [c.tile_m for c in configs] == [tile_m]


# ----------------------------------------------------------------------------- dkv_transposed (hdim 192)
# FA3's hdim 192 layout (BwdConfig.dkv_transposed, the default: bwd_launch.dkvt): 96 keys a CTA, three
# consumer warpgroups, S unswapped, dK^T / dV^T, dQ from registers in thirds of the head dim.
@pytest.fixture
def bwd_dkvt(emulated_sm90_bwd, monkeypatch):
    """`emulated_sm90_bwd` with bwd_launch.dkvt on; returns the configs the emulated kernel ran with."""
    monkeypatch.setattr(bwd_launch, "dkvt", True)
    return record_configs(monkeypatch)


def test_dkvt_config():
    """dkv_transposed: hdim 192 only, 64 x 96, three warpgroups at 24 / 160 registers, dQ from
    registers; not with deterministic (ordered adds) or hdim_v 128."""
    from cute_kernels.config import BwdConfig

    cfg = BwdConfig.make("bf16", 192, dkv_transposed=True, has_right=True)
    assert (cfg.tile_m, cfg.tile_n, cfg.num_mma_wg, cfg.dq_red, cfg.dkv_split_hdim) == (64, 96, 3, True, False)
    assert (cfg.producer_regs, cfg.consumer_regs) == (24, 160) and "dkv_transposed" in cfg.short()
    for bad in (dict(hdim=128), dict(hdim=256), dict(hdim=192, deterministic=True), dict(hdim=192, hdimv=128)):
        with pytest.raises(AssertionError):
            BwdConfig.make("bf16", bad.pop("hdim"), dkv_transposed=True, **bad)


def test_dq_value_coords_three_warpgroups():
    """Three warpgroups: each thread's 32 values cover every (row, column) once, warpgroup w on
    head-dim columns 64w .. 64w + 63 (all 64 rows), and the fragment order is where the kernel's
    per-warpgroup chunks put them."""
    tm, hd, nw = 64, 192, 3
    per_thread = tm * hd // (nw * THREADS_PER_WG)
    pos = torch.full((tm * hd,), -1, dtype=torch.long)
    seen = set()
    for thread in range(nw * THREADS_PER_WG):
        wg, t = divmod(thread, THREADS_PER_WG)
        for r in range(per_thread):
            row, col = bwd_launch.dq_value_coords(tm, hd, thread, r, nw)
            assert 64 * wg <= col < 64 * (wg + 1)
            seen.add((row, col))
            pos[row * hd + col] = (r % DQ_VEC + DQ_VEC * t + DQ_VEC * THREADS_PER_WG * (r // DQ_VEC)
                                   + THREADS_PER_WG * per_thread * wg)
    assert len(seen) == tm * hd
    assert torch.equal(bwd_launch.dq_fragment_order(tm, hd, "cpu", nw), pos)


def test_dq_value_coords_match_the_mma_layout_dkvt():
    """Tracing the dkv_transposed kernel asserts dq_value_coords against its dQ MMA (thirds of
    the head dim over three warpgroups); compile-only, sm_90a."""
    import cutlass.cute as cute

    from cute_kernels.bwd_sm90 import FlashAttentionBackwardSm90
    from cute_kernels.config import BwdConfig

    cfg = BwdConfig.make("bf16", 192, dkv_transposed=True, has_right=True)
    kernel = FlashAttentionBackwardSm90(cfg)
    assert (kernel.num_wg, kernel.dq_per_thread, kernel.num_threads) == (3, 32, 512)
    cute.compile(kernel, *kernel.fake_args(cfg))


# (layout, feature, heads, padding below 192, dtype)
DKVT_GRID = [
    ("batched", "plain", "mha", 0, torch.bfloat16),
    ("batched", "causal", "gqa", 0, torch.float16),
    ("batched_tall", "both", "mqa", 0, torch.bfloat16),
    ("ragged", "left", "gqa", 32, torch.bfloat16),
    ("ragged", "softcap_causal", "mha", 0, torch.bfloat16),
    ("seqused", "right", "gqa", 0, torch.bfloat16),
]


@pytest.mark.parametrize("layout,feature,heads,pad,dtype", grid_params(DKVT_GRID))
def test_grads_emulated_dkvt(bwd_dkvt, layout, feature, heads, pad, dtype):
    """dkv_transposed through the host code (96-key blocks, three warpgroups' dQ order, masks),
    the kernel emulated, against the fp64 reference."""
    assert grid_case(layout, feature, heads, 192 - pad, dtype) == ("cute", "cute")
    assert [c.dkv_transposed for c in bwd_dkvt] == [True]


def test_dkvt_not_with_deterministic_or_hdimv128(bwd_dkvt):
    """deterministic=True and hdim_v 128 keep the 64-key split_hdim tile with dkvt on."""
    q, k, v, _ = make_inputs([(70, 200)] * 2, 2, 2, 192, torch.bfloat16, "cpu", False)
    train_step("func", q, k, v, {}, deterministic=True)
    v128 = v[..., :128].contiguous()
    train_step("func", q, k, v128, {})
    assert [c.dkv_transposed for c in bwd_dkvt] == [False, False]


def test_dkvt_is_the_default_and_can_be_turned_off(emulated_sm90_bwd, monkeypatch):
    """hdim 192 runs dkv_transposed unless FA3PY_CUTE_BWD_DKVT=0 (bwd_launch.dkvt False), which
    brings back the 64 x 64 split_hdim tile; gradients against the fp64 reference either way."""
    configs = record_configs(monkeypatch)
    q, k, v, _ = make_inputs([(70, 200)] * 2, 2, 1, 192, torch.bfloat16, "cpu", False)
    assert bwd_launch.dkvt
    train_step("func", q, k, v, {}, causal=True)
    monkeypatch.setattr(bwd_launch, "dkvt", False)
    train_step("func", q, k, v, {}, causal=True)
    assert [(c.dkv_transposed, c.tile_n, c.dkv_split_hdim) for c in configs] == [(True, 96, False), (False, 64, True)]
