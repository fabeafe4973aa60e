"""The FP8 prep pass: rotate, take block amax, quantize and (for V) transpose in one read of the
16-bit tensor and one write of the float8 one. Produces the bytes of `fa3py.fp8.quantize`'s
PyTorch specification (tests/test_fp8_prep.py compares them under TRITON_INTERPRET=1). The one
exception is the rotation's float32 sums when they are inexact (a row mixing values more than
~2^9 apart): tensor cores and the CPU sum in different orders, and a sum within an ulp of an
e4m3 rounding boundary (~1e-6 of the elements) may then take the neighbouring code.

A tile is `ROWS` (>= 16) consecutive tokens of one (batch, head); the programs are persistent
(a few per SM, each walking tiles with the next tile's load in flight). A tile holds a single scale
block of `block` rows (block >= 16), or 16 // block whole blocks (block = 1, 2, 4, 8). The
rotation is a tensor-core matmul of the (ROWS * BLOCK_D / n, n) view of the tile by R = D H
(entries +-1: exact products, float32 sums). Channel-scaled V takes two launches over tiles
of 128 keys: the column maxima (an atomic max of their float bits per (batch, head)), then the
quantization, whose programs read the maxima and derive the scales themselves. V^T is stored
transposed in registers, so each head-dim row receives a tile's keys as one contiguous run
(for the PV key order the tile's rows are loaded permuted within each 16); the padding keys up to VT_ALIGN are written
as zeros by the same pass. `transpose_codes` is the same store for FA3's float8 V.

The e4m3 codes come from integer arithmetic (`_e4m3_bits`: sm80, and the interpreter, whose
float8 cast loses a rounding's carry) or, by default on sm89+ (FA3PY_FP8_PREP_NATIVE=0: the
integer one), from the hardware's conversion (`cvt.rn.satfinite.e4m3x2.f32`, two values an
instruction); both write the same bytes (tests/test_fp8_prep.py, on an H100 too). The integer
encoding is ~20 instructions a value: with it the sm90 code had twice the instructions (PTX of
the hdim 256 Q pass: 3544 against 1752). Served: Hadamard block n >= 16 (head dims that are multiples of 16),
blocks >= 16 or a power of two below (block-scaled V^T: multiples of 16). Everything else goes to the
PyTorch quantizer, which writes the same format.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fa3py.fp8.format import VT_ALIGN, Fp8Format, Fp8Tensor, hadamard_block, rotation_matrix


def why_not(x: torch.Tensor, role: str, fmt: Fp8Format):
    """None if this pass serves the operand, else why not."""
    block = fmt.block_m if role == "q" else fmt.block_n
    if role != "v" and fmt.qk_int8:
        return "int8 Q / K (qk_int8) are quantized by PyTorch for now"
    if role != "v" and hadamard_block(x.shape[-1]) < 16:
        return f"head dim {x.shape[-1]}: Hadamard blocks of {hadamard_block(x.shape[-1])} (tl.dot needs 16)"
    if block < 16 and block & (block - 1):
        return f"block {block}: below 16 only powers of two"
    if role == "v" and fmt.v_transposed and fmt.v_scaling == "block" and block > 16 and block % 16:
        return f"block-scaled V^T: block {block} splits 16-key groups (multiples of 16 only)"
    if role == "v" and fmt.v_transposed and fmt.v_pv_order and fmt.v_scaling == "block" and block < 16:
        # (the pass loads a tile's keys in the PV order, and its scale groups are of loaded rows)
        return f"block-scaled V^T in the PV key order: block {block} mixes scale blocks in a 16-key group"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "CPU tensors need TRITON_INTERPRET=1"
    return None


@triton.jit
def _pow2_inv_scale(amax):
    """(2^e, 2^-e): the smallest 2^e with amax / 2^e <= 448, from amax's bits (fa3py.fp8.pow2_scale)."""
    bits = amax.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    e = tl.minimum(tl.maximum(e, -126), 126)
    return ((e + 127) << 23).to(tl.float32, bitcast=True), ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_bits(q):
    """float8_e4m3fn codes (as uint8) of float32 q with |q| <= 448 or NaN, rounded to nearest
    even; NaN -> 0x7F. Integer arithmetic, so the interpreter (whose float8 cast loses the carry
    of a rounding into the exponent) and GPUs without an e4m3 type write the same bytes."""
    bits = q.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - 960  # keep 3 mantissa bits; rebias 127 -> 7
    # below 2^-6: subnormal m * 2^-9, m = rint(|q| * 2^9) read off the bits of |q| * 2^9 + 2^23
    sub = (a.to(tl.float32, bitcast=True) * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(a < 0x3C800000, sub, normal) | sign
    return tl.where(q != q, 0x7F, code).to(tl.uint8)


@triton.jit
def _e4m3(q, NATIVE: tl.constexpr):
    """e4m3 codes (uint8) of q (|q| <= 448 or NaN): the hardware conversion (round to nearest
    even, NaN -> 0x7F; the same bytes as `_e4m3_bits`) or the integer arithmetic, which is ~20
    instructions a value: it bounded the pass's speed on an H200."""
    if NATIVE:
        return q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return _e4m3_bits(q)


@triton.jit
def fp8_prep(
    X, OUT, SCALE, R, CH,
    seqlen, s_out, nblocks, nheads, ntiles, total,
    stride_xb, stride_xs, stride_xh,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_sb, stride_sh,
    HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, N_HAD: tl.constexpr, ROTATE: tl.constexpr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, GROUPS: tl.constexpr,
    # 0: block scales; 1: channel maxima (atomic max of the float bits into CH); 2: channel
    # quantize (scales from CH); 3: copy float8 codes (X holds them: FA3's V, transposed only)
    MODE: tl.constexpr,
    DOT_F32: tl.constexpr,  # the interpreter's tl.dot mishandles bfloat16: multiply in float32 there
    TRANSPOSED: tl.constexpr = False,  # OUT is V^T: rows of keys (stride_os == 1), s_out positions
    PV_ORDER: tl.constexpr = False,  # with TRANSPOSED: keys of each 16 in Fp8Format.v_pv_order
    STAGES: tl.constexpr = 2,
    NATIVE_E4M3: tl.constexpr = False,  # sm89+: the hardware's e4m3 conversion (one cvt per two values)
):
    # persistent: program i takes tiles i, i + grid, ... of the (batch, head, row tile) order, so R
    # is loaded once per program and the next tile's load overlaps this one's work (STAGES)
    r = tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_D)
    if ROTATE:
        k = tl.arange(0, N_HAD)
        rot = tl.load(R + k[:, None] * N_HAD + k[None, :])
    for t in tl.range(tl.program_id(0), total, tl.num_programs(0), num_stages=STAGES):
        pid = t % ntiles
        h = (t // ntiles) % nheads
        b = t // (ntiles * nheads)
        _prep_tile(X, OUT, SCALE, CH, rot if ROTATE else R, pid, h, b, r, c, seqlen, s_out, nblocks, nheads,
                   stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh, stride_od, stride_sb, stride_sh,
                   HEADDIM, BLOCK_D, N_HAD, ROTATE, BLOCK, ROWS, GROUPS, MODE, DOT_F32, TRANSPOSED, PV_ORDER,
                   NATIVE_E4M3)


@triton.jit
def _prep_tile(X, OUT, SCALE, CH, rot, pid, h, b, r, c, seqlen, s_out, nblocks, nheads,
               stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh, stride_od, stride_sb, stride_sh,
               HEADDIM: tl.constexpr, BLOCK_D: tl.constexpr, N_HAD: tl.constexpr, ROTATE: tl.constexpr,
               BLOCK: tl.constexpr, ROWS: tl.constexpr, GROUPS: tl.constexpr, MODE: tl.constexpr,
               DOT_F32: tl.constexpr, TRANSPOSED: tl.constexpr, PV_ORDER: tl.constexpr, NATIVE_E4M3: tl.constexpr):
    """One tile: rows pid * GROUPS * BLOCK + r of (batch b, head h)."""
    rows = pid * (GROUPS * BLOCK) + r  # the tile's rows as stored
    if PV_ORDER:  # V^T's position 4j + 2a + c of each 16 holds key 8a + 2j + c (Fp8Format.v_pv_order):
        # the tile's rows are loaded in that order (whole rows: the loads stay coalesced, and the
        # store below is the natural order's; permuting the codes in registers instead cost
        # benchmarks.fp8_prep 162 against 80 us, hdim 128, 16k tokens, H100)
        src = rows - (r & 15) + 8 * ((r >> 1) & 1) + 2 * ((r >> 2) & 3) + (r & 1)
    else:
        src = rows
    valid = (r < GROUPS * BLOCK) & (src < seqlen)
    mask = valid[:, None] & (c < HEADDIM)[None, :]
    x = tl.load(X + b * stride_xb + h * stride_xh + src[:, None] * stride_xs + c[None, :], mask=mask, other=0.0)
    if MODE == 3:
        codes = x
    else:
        if ROTATE:  # y = x blockdiag(R, ..., R): the (ROWS * BLOCK_D / n, n) view times R
            xs = tl.reshape(x, (ROWS * BLOCK_D // N_HAD, N_HAD))
            if DOT_F32:
                y = tl.dot(xs.to(tl.float32), rot.to(tl.float32), input_precision="ieee")
            else:
                y = tl.dot(xs, rot.to(x.dtype))
            y = tl.reshape(y, (ROWS, BLOCK_D))
        else:
            y = x.to(tl.float32)
        a = tl.abs(y)
        a = tl.where(a < float("inf"), a, 0.0)  # scales from finite values only
        if MODE == 1:  # non-negative float32 order as their int32 bits; nothing stored
            ch = CH + (b * nheads + h) * BLOCK_D + c
            tl.atomic_max(ch, tl.max(a, axis=0).to(tl.int32, bitcast=True), mask=c < HEADDIM)
        elif MODE == 2:
            amax = tl.load(CH + (b * nheads + h) * BLOCK_D + c).to(tl.float32, bitcast=True)
            scale, inv = _pow2_inv_scale(amax)
            if pid == 0:
                tl.store(SCALE + b * stride_sb + h * stride_sh + c, scale, mask=c < HEADDIM)
            q = y * inv[None, :]
        else:
            amax = tl.max(tl.reshape(a, (GROUPS, ROWS // GROUPS * BLOCK_D)), axis=1)  # (GROUPS,)
            scale, inv = _pow2_inv_scale(amax)
            g = pid * GROUPS + tl.arange(0, GROUPS)
            tl.store(SCALE + b * stride_sb + h * stride_sh + g, scale, mask=g < nblocks)
            q = tl.reshape(tl.reshape(y, (GROUPS, ROWS // GROUPS * BLOCK_D)) * inv[:, None], (ROWS, BLOCK_D))
        if MODE != 1:
            q = tl.where(tl.abs(q) < float("inf"), q, float("nan"))  # NaN, Inf -> NaN (a cast saturates Inf)
            codes = _e4m3(q, NATIVE_E4M3)
    if MODE != 1:
        base = OUT + b * stride_ob + h * stride_oh
        if TRANSPOSED:
            # V^T: each head-dim row gets the tile's keys as one contiguous run (a coalesced
            # store); keys past seqlen (zeros) fill the row up to s_out
            keep = (r < GROUPS * BLOCK) & (rows < s_out)
            tl.store(base + c[:, None] * stride_od + rows[None, :], tl.trans(codes),
                     mask=(c < HEADDIM)[:, None] & keep[None, :])
        else:
            tl.store(base + rows[:, None] * stride_os + c[None, :] * stride_od, codes, mask=mask)


@functools.lru_cache(maxsize=64)
def _rotation_on(n: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The rotation matrix on `device`, copied there once: a copy from pageable host memory on
    every call waits for the stream's earlier work (a host sync per quantized operand)."""
    return rotation_matrix(n, seed).to(device, dtype)


def quantize_operand(x: torch.Tensor, role: str, fmt: Fp8Format) -> Fp8Tensor:
    """`fa3py.fp8.quantize_operand` in one fused pass (two for channel-scaled V); falls back to
    it for what `why_not` declines."""
    why = why_not(x, role, fmt)
    if why is not None or x.shape[1] == 0:
        from fa3py.fp8.quantize import quantize_operand as spec

        return spec(x, role, fmt)
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, s, h, d = x.shape
    rotate = role in ("q", "k")
    channel = role == "v" and fmt.v_scaling == "channel"
    # channel scales do not depend on the tiling: 128 keys per program
    block = CHANNEL_ROWS if channel else fmt.block_m if role == "q" else fmt.block_n
    n = hadamard_block(d)
    rot = _rotation_on(n, fmt.seed, x.device, x.dtype) if rotate else x.new_empty(1)
    transposed = role == "v" and fmt.v_transposed
    data, out_strides, s_out = _output(x, transposed)
    scale = torch.empty(b, h, d if channel else triton.cdiv(s, block), dtype=torch.float32, device=x.device)
    launch = functools.partial(_launch, x, data, scale, rot, out_strides=out_strides, s_out=s_out, block=block,
                               rotate=rotate, n_had=n, transposed=transposed,
                               pv_order=transposed and fmt.v_pv_order)
    if channel:
        amax_bits = torch.zeros(b, h, triton.next_power_of_2(d), dtype=torch.int32, device=x.device)
        launch(amax_bits, mode=1)
        launch(amax_bits, mode=2)
    else:
        launch(scale, mode=0)
    return Fp8Tensor(data=data, scale=scale, role=role, fmt=fmt, seqlen=s, source_dtype=x.dtype)


def transpose_codes(v: torch.Tensor, pv_order: bool = True) -> torch.Tensor:
    """`fa3py.fp8.format.transpose_v` (float8 V -> V^T padded to VT_ALIGN keys, zeros past
    seqlen, optionally in the PV key order) as one coalesced pass on CUDA."""
    if v.stride(-1) != 1:
        v = v.contiguous()
    data, out_strides, s_out = _output(v, transposed=True)
    if v.shape[1]:
        _launch(v.view(torch.uint8), data, data, data, data, out_strides=out_strides, s_out=s_out,
                block=CHANNEL_ROWS, rotate=False, n_had=1, transposed=True, pv_order=pv_order, mode=3)
    else:
        data.zero_()
    return data


CHANNEL_ROWS = 128  # keys per program where no block scale ties the tiling (channel V, codes)


def _output(x: torch.Tensor, transposed: bool):
    """(float8 output, its strides as (b, s, h, d), positions per row written): V^T padded to
    VT_ALIGN keys (every position written by the pass: padding keys are zeros) or x's shape."""
    b, s, h, d = x.shape
    if transposed:
        s_out = -(-s // VT_ALIGN) * VT_ALIGN
        data = torch.empty(b, h, d, s_out, dtype=torch.float8_e4m3fn, device=x.device)
        return data, (data.stride(0), 1, data.stride(1), data.stride(2)), s_out
    data = torch.empty(b, s, h, d, dtype=torch.float8_e4m3fn, device=x.device)
    return data, (data.stride(0), data.stride(1), data.stride(2), 1), s


# The hardware e4m3 conversion in the prep (sm89+; FA3PY_FP8_PREP_NATIVE=0: the integer one): its
# GPU tests pass (H100: test_gpu_native_e4m3_codes_are_the_integer_ones and the prep's byte tests
# in both encodings) and the prep is 1.2-1.4x faster (H100, CUDA graphs, 16k tokens: 1353-1445
# GB/s against 988-1063 at hdim 128, 1099-1213 against 899-998 at hdim 256; a copy: 2900).
NATIVE_E4M3 = os.environ.get("FA3PY_FP8_PREP_NATIVE", "1") != "0"


@functools.lru_cache(maxsize=16)
def _device_info(device: torch.device) -> tuple[int, bool]:
    """(SM count, whether it converts to e4m3 in hardware: sm89+), once per device (every pass asks)."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, (props.major, props.minor) >= (8, 9)


def launch_params(rotate: bool, tile_elems: int) -> tuple[int, int, int]:
    """(num_warps, STAGES, programs per SM) of a pass. H100, 16k tokens, 2048 channels, every
    combination of warps 4 / 8, stages 1 / 2 / 3 and 1-8 programs an SM (or one tile each) timed:
    - rotated Q / K tiles up to 16k elements (hdim <= 128): 8 warps, 2 stages, 4 (<= 8k
      elements: 8) an SM, within 3% of the best (1987 GB/s against 2047; a copy 2689);
    - rotated tiles of 32k elements (hdim 256): one stage (the second took the shared memory of
      a second program an SM), 8 warps, 2 an SM: 1659 GB/s against 1329 with two stages;
    - unrotated tiles (V: channel maxima, quantization, V^T stores): 4 warps, one stage, 8 an
      SM: 1256-1325 GB/s against 931-977 with 8 warps and two stages.
    The sweep's V^T was in natural key order; the PV key order (fp8=True's) costs the same since
    its tiles are loaded in that order (`benchmarks.fp8_prep --both-orders`, H100, channel V,
    16k tokens: hdim 128 80.2 against 78.1 us, hdim 256 150.3 against 143.5; permuting the codes
    in registers had taken 162 us at hdim 128)."""
    if not rotate:
        return 4, 1, 8
    if tile_elems > 16384:
        return 8, 1, 2
    return (4 if tile_elems <= 8192 else 8), 2, (8 if tile_elems <= 8192 else 4)


def _launch(x, data, scale, rot, ch, *, out_strides, s_out, block, rotate, n_had, transposed, pv_order, mode):
    b, s, h, d = x.shape
    groups = 16 // block if block < 16 else 1
    rows = 16 if block < 16 else triton.next_power_of_2(block)
    block_d = triton.next_power_of_2(d)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    sms, has_e4m3 = _device_info(x.device) if x.is_cuda else (0, False)
    native = NATIVE_E4M3 and not interpreting and has_e4m3
    ntiles = triton.cdiv(s_out if transposed else s, groups * block)
    total = ntiles * h * b
    warps, stages, per_sm = launch_params(rotate, rows * block_d)
    # (the interpreter: a few programs, so that each takes several tiles as on a GPU)
    grid = (min(total, 3 if interpreting else per_sm * sms),)
    fp8_prep[grid](x, data.view(torch.uint8), scale, rot, ch, s, s_out, triton.cdiv(s, block), h, ntiles, total,
                   x.stride(0), x.stride(1), x.stride(2), *out_strides, scale.stride(0), scale.stride(1),
                   HEADDIM=d, BLOCK_D=block_d, N_HAD=n_had, ROTATE=rotate, BLOCK=block, ROWS=rows, GROUPS=groups,
                   MODE=mode, DOT_F32=interpreting, TRANSPOSED=transposed, PV_ORDER=pv_order, NATIVE_E4M3=native,
                   STAGES=stages, num_warps=warps)
