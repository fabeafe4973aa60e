"""Device helpers shared by the forward and backward kernels.

Conventions. A program works on one (batch, head) pair and one tile of rows. Tensors are
addressed as ``base + b * stride_b + (start + row) * stride_s + head * stride_h + col``, with
``stride_b = 0`` and ``start = cu_seqlens[b]`` for a packed side, ``start = 0`` for a batched
one. Scores live in the log2 domain (``softmax_scale * log2(e)`` folded in), so the softmax
uses ``exp2``; LSE is converted to natural log only when it is stored.
"""

import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Work-arounds for the interpreter (triton <= 3.9), chosen when the kernels are decorated,
    # as triton itself chooses: it multiplies bfloat16 bit patterns as integers in tl.dot, and
    # rounds float32 -> bfloat16 toward zero, which biases every sum of rounded P or dS.

    @triton.jit
    def dot(a, b):
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        return tl.dot(a, b)

    @triton.jit
    def cast(x, dtype: tl.constexpr):
        # Round to the target precision by hand so that the interpreter's own conversion is
        # exact: it truncates bfloat16, and drops the carry when rounding up float8e4nv.
        bits = x.to(tl.uint32, bitcast=True)
        if dtype == tl.bfloat16:
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
        if dtype == tl.float8e4nv:  # 3 mantissa bits; below 2**-6, multiples of 2**-9
            bits = bits + (((bits >> 20) & 1) + 0x7FFFF)
            normal = (bits & 0xFFF00000).to(tl.float32, bitcast=True)
            x = tl.where(tl.abs(x) < 0.015625, tl.floor(x * 512.0 + 0.5) / 512.0, normal)
        return x.to(dtype)

else:

    @triton.jit
    def dot(a, b):
        return tl.dot(a, b)

    @triton.jit
    def cast(x, dtype: tl.constexpr):
        """float32 -> the 16/8-bit dtype of an operand or output (round to nearest even)."""
        return x.to(dtype)


@triton.jit
def e4m3_to_f16(bits):
    """float8 e4m3 bit patterns (uint8) -> float16, exact, with integer ops only: Triton has
    no e4m3 type before sm89. Moving s.eeee.mmm into float16's fields gives 2**(e-15)(1+m/8)
    (or m * 2**-17 for e = 0); * 2**8 restores e4m3's bias of 7."""
    b = bits.to(tl.uint16)
    h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    return h.to(tl.float16, bitcast=True) * 256.0


@triton.jit
def query_block(LONGEST_FIRST: tl.constexpr):
    """This program's query block. LONGEST_FIRST (causal / right window, where the last query
    blocks see the most keys): each head's blocks from the last, so the grid ends on short
    programs instead of a tail of long ones."""
    if LONGEST_FIRST:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    return tl.program_id(0)


@triton.jit
def seq_info(b, CU_SEQLENS, SEQUSED, seqlen, PACKED: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(start row, length L, rows owned in the tensor) of sequence b on one side.

    Rows in [L, owned) are padding: outputs there are written as zero (lse -inf)."""
    if PACKED:
        start = tl.load(CU_SEQLENS + b)
        owned = tl.load(CU_SEQLENS + b + 1) - start
    else:
        start = 0
        owned = seqlen
    if HAS_SEQUSED:
        length = tl.load(SEQUSED + b)
    else:
        length = owned
    return start, length, owned


@triton.jit
def tile_ptrs(BASE, b, stride_b, head, stride_h, rows, stride_s, cols):
    """Pointers to BASE[b, rows, head, cols] (int64 row offsets: packed tensors can be long)."""
    offset = b.to(tl.int64) * stride_b + head * stride_h
    return BASE + offset + rows.to(tl.int64)[:, None] * stride_s + cols[None, :]


@triton.jit
def score_scales(softmax_scale, softcap, SOFTCAP: tl.constexpr):
    """(qk_scale, softcap_log2) for `scores_log2`."""
    if SOFTCAP:
        return softmax_scale / softcap, softcap * LOG2E
    else:
        return softmax_scale * LOG2E, softcap * LOG2E


@triton.jit
def _round_range(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Block-aligned [lo, u_lo) masked, [u_lo, u_hi) unmasked, [u_hi, hi) masked."""
    lo = tl.maximum(lo, 0) // BLOCK * BLOCK
    hi = tl.maximum((tl.maximum(hi, 0) + BLOCK - 1) // BLOCK * BLOCK, lo)
    u_lo = tl.minimum(tl.maximum((tl.maximum(full_lo, 0) + BLOCK - 1) // BLOCK * BLOCK, lo), hi)
    u_hi = tl.minimum(tl.maximum(tl.maximum(full_hi, 0) // BLOCK * BLOCK, u_lo), hi)
    return lo, u_lo, u_hi, hi


@triton.jit
def chunk_start(pos, chunk):
    """First position of the attention chunk holding `pos` (floor division, pos may be < 0)."""
    r = pos % chunk
    return pos - tl.where(r < 0, r + chunk, r)


@triton.jit
def key_block_range(
    m0, q_len, k_len, window_left, window_right, chunk,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Key blocks seen by the query rows [m0, m0 + BLOCK_M), split masked / unmasked.

    Row i keeps key j iff i + diag - window_left <= j <= i + diag + window_right, j < k_len,
    with diag = k_len - q_len (bottom-right alignment), and (HAS_CHUNK) j lies in the chunk of
    i + diag. Blocks outside [lo, hi) are skipped.
    """
    diag = k_len - q_len
    last = tl.minimum(m0 + BLOCK_M, q_len) - 1
    lo = 0
    full_lo = 0  # first key kept by every row of the block
    hi = k_len
    full_hi = k_len  # one past the last key kept by every row of the block
    if HAS_WL:
        lo = m0 + diag - window_left
        full_lo = last + diag - window_left
    if HAS_WR:
        hi = tl.minimum(last + diag + window_right + 1, k_len)
        full_hi = tl.minimum(m0 + diag + window_right + 1, k_len)
    if HAS_CHUNK:  # the first row's chunk starts the range, the last row's ends it
        first_chunk, last_chunk = chunk_start(m0 + diag, chunk), chunk_start(last + diag, chunk)
        lo = tl.maximum(lo, first_chunk)
        full_lo = tl.maximum(full_lo, last_chunk)
        hi = tl.minimum(hi, last_chunk + chunk)
        full_hi = tl.minimum(full_hi, first_chunk + chunk)
    hi = tl.where(m0 < q_len, hi, 0)
    return _round_range(lo, hi, full_lo, full_hi, BLOCK_N)


@triton.jit
def query_block_range(
    n0, q_len, k_len, window_left, window_right, chunk,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Query blocks that see the keys [n0, n0 + BLOCK_N), split masked / unmasked (the
    transpose of `key_block_range`). Unmasked blocks hold only rows < q_len, and a key block
    that crosses k_len has none: there the padding keys must be masked."""
    diag = k_len - q_len
    last = tl.minimum(n0 + BLOCK_N, k_len) - 1
    lo = 0
    full_lo = 0
    hi = q_len
    full_hi = q_len
    if HAS_WR:
        lo = n0 - diag - window_right
        full_lo = last - diag - window_right
    if HAS_WL:
        hi = tl.minimum(last - diag + window_left + 1, q_len)
        full_hi = tl.minimum(n0 - diag + window_left + 1, q_len)
    if HAS_CHUNK:  # rows whose diagonal lies in the chunk of the first key ... of the last key
        first_chunk, last_chunk = chunk_start(n0, chunk), chunk_start(last, chunk)
        lo = tl.maximum(lo, first_chunk - diag)
        full_lo = tl.maximum(full_lo, last_chunk - diag)
        hi = tl.minimum(hi, last_chunk + chunk - diag)
        full_hi = tl.minimum(full_hi, first_chunk + chunk - diag)
    hi = tl.where(n0 < k_len, hi, 0)
    full_hi = tl.where(n0 + BLOCK_N <= k_len, full_hi, 0)
    return _round_range(lo, hi, full_lo, full_hi, BLOCK_M)


@triton.jit
def keep_mask(
    rows, cols, q_len, k_len, window_left, window_right, chunk, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, HAS_CHUNK: tl.constexpr,
):
    """Mask of kept scores for broadcastable query `rows` and key `cols` (either orientation):
    key in range, inside the window and (HAS_CHUNK) in the query's chunk."""
    diag = k_len - q_len
    keep = cols < k_len
    if HAS_WL:
        keep = keep & (cols >= rows + diag - window_left)
    if HAS_WR:
        keep = keep & (cols <= rows + diag + window_right)
    if HAS_CHUNK:
        start = chunk_start(rows + diag, chunk)
        keep = keep & (cols >= start) & (cols < start + chunk)
    return keep


@triton.jit
def tanh(x):
    """tanh through exp2 of a non-positive argument (no overflow, any triton version)."""
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def scores_log2(qk, qk_scale, softcap_log2, SOFTCAP: tl.constexpr):
    """Scores in the log2 domain from raw dot products, and tanh(.) for the softcap
    derivative (meaningless without softcap).

    Without softcap qk_scale = scale * log2(e); with it qk_scale = scale / softcap and
    softcap_log2 = softcap * log2(e)."""
    if SOFTCAP:
        t = tanh(qk * qk_scale)
        return t * softcap_log2, t
    else:
        return qk * qk_scale, qk  # second value unused without softcap (triton 3.6 has no None in tuples)


@triton.jit
def load_tile(ptrs, offs_rows, offs_cols, n_rows, n_cols, EVEN_ROWS: tl.constexpr,
              EVEN_COLS: tl.constexpr):
    """Load a tile, masking only the dims that need it (padded head dim, ragged rows)."""
    if EVEN_ROWS:
        if EVEN_COLS:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_cols[None, :] < n_cols, other=0.0)
    else:
        if EVEN_COLS:
            return tl.load(ptrs, mask=offs_rows[:, None] < n_rows, other=0.0)
        else:
            mask = (offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols)
            return tl.load(ptrs, mask=mask, other=0.0)
