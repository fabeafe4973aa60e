"""cute_kernels.fp8: the FP8 P V GEMM's key order, checked against the tiled MMAs' own layouts
(CuTe DSL's host JIT: every thread's fragment coordinates), and the P conversion compiled for
sm_90a."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

cutlass = pytest.importorskip("cutlass")
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cutlass.cute as cute  # noqa: E402  (kernels' annotations resolve in this module)

from cute_kernels import fp8  # noqa: E402


def _fragment_coords(tile_m: int, tile_n: int):
    """Per consumer thread: the (row, col) of every QK^T accumulator value and of every e4m3
    A-operand value of the P V GEMM, from the tiled MMAs the FP8 kernel builds."""
    import cutlass.utils.hopper_helpers as sm90_utils
    from cutlass import Float32
    from cutlass.cute.nvgpu import OperandMajorMode, warpgroup
    from cutlass.cute.runtime import from_dlpack

    e4m3, wgs = cutlass.Float8E4M3FN, tile_m // 64
    threads, per_thread = 128 * wgs, tile_m * tile_n // (128 * wgs)

    @cute.jit
    def coords(out_c: cute.Tensor, out_a: cute.Tensor):
        mma_qk = sm90_utils.make_trivial_tiled_mma(e4m3, e4m3, OperandMajorMode.K, OperandMajorMode.K, Float32,
                                                   atom_layout_mnk=(wgs, 1, 1), tiler_mn=(64, tile_n))
        mma_pv = sm90_utils.make_trivial_tiled_mma(e4m3, e4m3, OperandMajorMode.K, OperandMajorMode.K, Float32,
                                                   atom_layout_mnk=(wgs, 1, 1), tiler_mn=(64, 128),
                                                   a_source=warpgroup.OperandSource.RMEM)
        identity = cute.make_identity_tensor((tile_m, tile_n))
        for t in cutlass.range(threads):
            c = mma_qk.get_slice(t).partition_C(identity)
            a = mma_pv.get_slice(t).partition_A(identity)
            for i in cutlass.range_constexpr(cute.size(c)):
                out_c[t, i, 0], out_c[t, i, 1] = c[i]
            for i in cutlass.range_constexpr(cute.size(a)):
                out_a[t, i, 0], out_a[t, i, 1] = a[i]

    out_c, out_a = (torch.full((threads, per_thread, 2), -1, dtype=torch.int32) for _ in range(2))
    coords(from_dlpack(out_c), from_dlpack(out_a))
    return out_c, out_a


@pytest.mark.parametrize("tile_m,tile_n", [(128, 128), (192, 128), (128, 64), (128, 96)])
def test_pv_key_order_matches_the_mma_layouts(tile_m, tile_n):
    """A-operand value i of every thread must be the thread's own accumulator value
    REGISTER_ORDER-permuted, at the key PV_KEY_ORDER puts at A's column: then P never leaves
    its thread. Fails if either order (or the DSL's fragment layouts) changes."""
    out_c, out_a = _fragment_coords(tile_m, tile_n)
    order = fp8.REGISTER_ORDER
    j = torch.tensor([(i // 8) * 8 + order[i % 8] for i in range(out_a.shape[1])])
    row, col = out_a[..., 0], out_a[..., 1]
    key = (col // 16) * 16 + torch.tensor(fp8.PV_KEY_ORDER)[col % 16]
    assert torch.equal(out_c[:, j, 0], row) and torch.equal(out_c[:, j, 1], key)
    # every (row, key) of the tile is covered once
    assert len({(r, c) for r, c in out_a.reshape(-1, 2).tolist()}) == tile_m * tile_n


def test_key_order():
    """fa3py.fp8's V^T layout (v_pv_order) stores the keys in this module's order."""
    from fa3py.fp8.format import pv_key_order

    order = pv_key_order(32).tolist()
    assert sorted(order) == list(range(32)) and order[:16] == list(fp8.PV_KEY_ORDER)
    assert order[:4] == [0, 1, 8, 9] and order[16:20] == [16, 17, 24, 25]


def test_convert_p_e4m3_compiles_to_paired_conversions():
    """The conversion for a 2-WG 128 x 128 tile's P compiles for sm_90a to e4m3x2 conversions
    (F2FP) and byte packing, with no shuffles between lanes."""
    import cutlass.utils.hopper_helpers as sm90_utils
    from cutlass import Float32
    from cutlass.cute.nvgpu import OperandMajorMode, warpgroup

    from cute_kernels.sass import opcode_counts, sass_text

    e4m3 = cutlass.Float8E4M3FN

    @cute.kernel
    def kernel(out: cute.Tensor):
        mma_qk = sm90_utils.make_trivial_tiled_mma(e4m3, e4m3, OperandMajorMode.K, OperandMajorMode.K, Float32,
                                                   atom_layout_mnk=(2, 1, 1), tiler_mn=(64, 128))
        mma_pv = sm90_utils.make_trivial_tiled_mma(e4m3, e4m3, OperandMajorMode.K, OperandMajorMode.K, Float32,
                                                   atom_layout_mnk=(2, 1, 1), tiler_mn=(64, 128),
                                                   a_source=warpgroup.OperandSource.RMEM)
        tidx = cute.arch.thread_idx()[0]
        acc = cute.make_rmem_tensor(mma_qk.partition_shape_C((128, 128)), Float32)
        for i in cutlass.range_constexpr(cute.size(acc)):
            acc[i] = Float32(i) * Float32(tidx)
        frag = cute.make_rmem_tensor(mma_pv.get_slice(tidx).partition_shape_A((128, 128)), e4m3)
        fp8.convert_p_e4m3(acc, frag)
        words = cute.recast_tensor(frag, cutlass.Int32)
        for i in cutlass.range_constexpr(cute.size(words)):
            out[tidx, i] = words[i]

    @cute.jit
    def launch(out: cute.Tensor):
        kernel(out).launch(grid=[1, 1, 1], block=[256, 1, 1])

    from cutlass.cute.runtime import from_dlpack

    out = torch.zeros(256, 16, dtype=torch.int32)
    with tempfile.TemporaryDirectory() as d:
        os.environ["CUTE_DSL_DUMP_DIR"] = d
        cute.compile(launch, from_dlpack(out), options=f"--gpu-arch=sm_90a --keep-cubin --dump-dir={d}")
        cubins = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".cubin")]
        assert cubins, "no cubin kept"
        ops = opcode_counts(sass_text(cubins[0]))
    assert ops["F2FP"] >= 32, ops  # 64 values -> 32 e4m3x2 conversions
    assert ops["SHFL"] == 0, "P must not move between lanes"


def _byte_maps(tile_n: int, hdimv: int, rows_keys: int) -> tuple:
    """Byte offsets of the fp8_v_rows kernel's smem tiles, from the layouts the kernel builds
    (stage 1 of 2): V's rows (key, channel) -> offset (a staging stage of rows_keys keys) and V^T
    (channel, key position) -> offset
    by crd2idx, and the two tiles' fp8.ByteTile (the closed form the kernel computes them by),
    checked equal to crd2idx at every coordinate of both stages."""
    from cute_kernels.utils import make_smem_layout

    out = {}

    @cute.jit
    def maps():
        rows = make_smem_layout(cutlass.Float8E4M3FN, (rows_keys, hdimv), 2)
        vt = make_smem_layout(cutlass.Float8E4M3FN, (hdimv, tile_n), 2)
        out["rows_tile"], out["vt_tile"] = fp8.byte_tile(rows, rows_keys, hdimv, 2), fp8.byte_tile(vt, hdimv, tile_n, 2)
        for name, layout, extent in (("rows", rows, (rows_keys, hdimv)), ("vt", vt, (hdimv, tile_n))):
            out[name] = [[[cute.crd2idx((r, c, s), layout) for c in range(extent[1])] for r in range(extent[0])]
                         for s in range(2)]

    maps()
    for name in ("rows", "vt"):
        tile = out[name + "_tile"]
        assert all(tile.offset(r, c, s) == off for s, grid in enumerate(out[name]) for r, row in enumerate(grid)
                   for c, off in enumerate(row)), f"{name}: {tile} differs from the layout"
    return out["rows"][1], out["vt"][1], out["rows_tile"], out["vt_tile"]


# (hdim_v, tile_n, parts) of the FP8 kernel's channel-V tiles (config.fp8_tile) and a masked-softcap
# one; parts: the staging stages a block takes (the kernel's v_rows_keys = tile_n / parts)
VT_TILES = [(64, 128, 1), (96, 96, 1), (128, 224, 1), (128, 128, 1), (256, 128, 2), (256, 128, 1), (256, 64, 1)]


def ldmatrix_trans_reference(buf: bytearray, rows: list) -> list:
    """PTX ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 on a byte buffer: `rows[lane]` is the
    offset of row lane % 8 of matrix lane / 8 (16 bytes: eight 16-bit elements); lane T receives
    in register i element (2 (T % 4), T / 4) of matrix i in its low half and (2 (T % 4) + 1, T / 4)
    in its high half (the matrix transposed into the untransposed fragment's places)."""
    elem = lambda i, r, c: int.from_bytes(buf[rows[8 * i + r] + 2 * c:rows[8 * i + r] + 2 * c + 2], "little")
    return [[elem(i, 2 * (t % 4), t // 4) | elem(i, 2 * (t % 4) + 1, t // 4) << 16 for i in range(4)]
            for t in range(32)]


def stmatrix_reference(buf: bytearray, rows: list, regs: list, written: list):
    """PTX stmatrix.sync.aligned.m8n8.x4.shared.b16: lane T's register m is bytes 4 (T % 4) ..
    4 (T % 4) + 3 of row T / 4 of matrix m, whose 16 bytes start at `rows[8 m + T / 4]`."""
    for t in range(32):
        for m in range(4):
            off = rows[8 * m + t // 4] + 4 * (t % 4)
            buf[off:off + 4] = regs[t][m].to_bytes(4, "little")
            for b in range(4):
                written[off + b] += 1


@pytest.mark.parametrize("hdimv,tile_n,parts", VT_TILES)
def test_transpose_v_block_writes_vt_in_pv_key_order(hdimv, tile_n, parts):
    """fp8.transpose_v_block's jobs, run warp by warp on the CPU with the kernel's own address
    arithmetic (fp8.vt_lane_bases and vt_job_terms, which vt_plan checks; fp8.ByteTile checked
    against the swizzled smem layouts' crd2idx everywhere) and the semantics of ldmatrix.trans,
    prmt and stmatrix: every byte of V^T is written once, with key PV_KEY_ORDER[i] of each 16-key
    group at position i, from fresh random bytes, the block in one staging stage or in parts (each
    part's jobs from its first group on); and each 8-row phase of either instruction touches 8
    different 16-byte bank groups (no bank conflict) in every tile."""
    from cute_kernels.fwd_sm90 import VT_WARPS

    keys = tile_n // parts
    rows_map, vt_map, rows_tile, vt_tile = _byte_maps(tile_n, hdimv, keys)
    gen = torch.Generator().manual_seed(hdimv * 1000 + tile_n)
    v = torch.randint(0, 256, (tile_n, hdimv), generator=gen, dtype=torch.uint8)
    vt = bytearray(max(max(r) for r in vt_map) + 1)
    written = [0] * len(vt)
    stage = 1
    for part, warp in ((part, warp) for part in range(parts) for warp in range(VT_WARPS)):
        first = part * keys // 16
        assert fp8.vt_plan(rows_tile, vt_tile, hdimv, keys, first)
        rows = bytearray(max(max(r) for r in rows_map) + 1)
        for n in range(keys):
            for d in range(hdimv):
                rows[rows_map[n][d]] = int(v[part * keys + n, d])
        jobs = fp8.vt_warp_jobs(warp, VT_WARPS, hdimv, keys, rows_tile, vt_tile, first)
        assert [fp8.vt_job_coords(j, keys) for j in range(warp, fp8.vt_jobs(hdimv, keys), VT_WARPS)] == \
            [job[:2] for job in jobs]
        for g, s, load_x, load_y, store_x, store_y in jobs:
            bases = [fp8.vt_lane_bases(lane, rows_tile, vt_tile) for lane in range(32)]
            loads = [(lb ^ load_x) + load_y + stage * rows_tile.stage_bytes for lb, _ in bases]
            stores = [(sb ^ store_x) + store_y + stage * vt_tile.stage_bytes for _, sb in bases]
            # the unrolled form (fp8_vt_unroll): the stage's 1024-aligned address added before the XOR
            at = 3 * 1024  # (any multiple of 1024: a tile's smem address)
            assert loads == [fp8.vt_address(lb + at + stage * rows_tile.stage_bytes, load_x, load_y) - at
                             for lb, _ in bases]
            assert stores == [fp8.vt_address(sb + at + stage * vt_tile.stage_bytes, store_x, store_y) - at
                              for _, sb in bases]
            for lane in range(32):  # the rows the lanes name: what the section's comment says
                key, chunk = fp8.vt_load_lane(lane)
                assert loads[lane] == rows_map[16 * g + key][32 * s + chunk]
                assert stores[lane] == vt_map[32 * s + fp8.vt_store_lane(lane)][16 * (g + first)]
            for phase in range(4):  # one matrix per phase: 8 rows of 16 bytes
                for offs in (loads, stores):
                    assert len({off // 16 % 8 for off in offs[8 * phase:8 * phase + 8]}) == 8, ((g, s), phase)
            regs = ldmatrix_trans_reference(rows, loads)
            out = []
            for lane in range(32):
                sel_a, sel_b = fp8.vt_selectors(lane)
                r = regs[lane]
                out.append([fp8.prmt_reference(r[0], r[1], sel_a), fp8.prmt_reference(r[0], r[1], sel_b),
                            fp8.prmt_reference(r[2], r[3], sel_a), fp8.prmt_reference(r[2], r[3], sel_b)])
            stmatrix_reference(vt, stores, out, written)
    expected = v.T[:, [16 * (n // 16) + fp8.PV_KEY_ORDER[n % 16] for n in range(tile_n)]]
    got = torch.tensor([[vt[vt_map[d][n]] for n in range(tile_n)] for d in range(hdimv)], dtype=torch.uint8)
    assert torch.equal(got, expected)
    assert sorted({written[vt_map[d][n]] for d in range(hdimv) for n in range(tile_n)}) == [1]


def test_prmt_reference():
    """prmt's selector semantics on Python ints (the transposer's permutes run through it on the
    CPU), and the two selectors' words: keys 2t, 2t + 1 from the first register, 2t + 8, 2t + 9
    from the second, of the even and the odd channel."""
    assert fp8.prmt_reference(0x03020100, 0x07060504, 0x5140) == 0x05010400
    assert fp8.prmt_reference(0x000000F0, 0, 0x8888) == 0xFFFFFFFF  # sign replication
    # register bytes: (key 2t, ch even), (2t, odd), (2t+1, even), (2t+1, odd)
    a, b = 0x13120302, 0x33322322  # keys 2t / 2t+1: 0x0c (c: channel); 2t+8 / 2t+9: 0x2c / 0x3c
    assert fp8.prmt_reference(a, b, fp8.VT_EVEN) == 0x32221202
    assert fp8.prmt_reference(a, b, fp8.VT_ODD) == 0x33231303


