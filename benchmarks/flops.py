"""FLOP counts of attention, counting only the (query, key) pairs the mask keeps.

Mask semantics are fa3py's (see `fa3py/request.py`): bottom-right aligned, so query row i
(0 <= i < seqlen_q) keeps key j (0 <= j < seqlen_k) iff
``(wl < 0 or j >= i + seqlen_k - seqlen_q - wl)`` and ``(wr < 0 or j <= i + seqlen_k - seqlen_q + wr)``.
``causal`` is ``wr = 0`` (with ``wl`` kept from ``window``).
"""

from __future__ import annotations

MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def _sum_clamped_linear(lo: int, hi: int, a: int, b: int) -> int:
    """sum over integer i in [lo, hi) of max(0, a + b*i), for b in {-1, 0, 1}."""
    if hi <= lo:
        return 0
    if b == 0:
        return max(0, a) * (hi - lo)
    # Restrict to the i where a + b*i > 0; there the sum is an arithmetic series.
    if b > 0:
        lo = max(lo, -a + 1)
    else:
        hi = min(hi, a)
    if hi <= lo:
        return 0
    first, last = a + b * lo, a + b * (hi - 1)
    return (first + last) * (hi - lo) // 2


def unmasked_pairs(seqlen_q: int, seqlen_k: int, causal: bool = False, window=(-1, -1)) -> int:
    """Number of (query, key) pairs the mask keeps, computed exactly in O(1).

    Row i keeps keys ``[max(0, i + off - wl), min(seqlen_k - 1, i + off + wr)]`` with
    ``off = seqlen_k - seqlen_q`` and an unbounded side clamped to the sequence. The row
    length is piecewise linear in i with slope -1, 0 or +1 between two breakpoints (where
    each clamp starts to bind), so the total is a handful of arithmetic series.
    """
    wl, wr = window
    if causal:
        wr = 0
    off = seqlen_k - seqlen_q
    # Unbounded sides are clamped to the sequence, which any bound past the ends also does.
    wl = seqlen_q + seqlen_k if wl < 0 else wl
    wr = seqlen_q + seqlen_k if wr < 0 else wr
    # Row length len(i) = min(seqlen_k - 1, i + off + wr) - max(0, i + off - wl) + 1.
    # The upper clamp binds for i >= i_hi, the lower clamp for i < i_lo.
    i_hi = seqlen_k - 1 - off - wr
    i_lo = wl - off
    cuts = sorted({0, seqlen_q, *(min(max(c, 0), seqlen_q) for c in (i_hi, i_lo))})
    total = 0
    for start, stop in zip(cuts, cuts[1:]):
        upper_const = start >= i_hi  # constant seqlen_k - 1, else i + off + wr
        lower_const = start < i_lo  # constant 0, else i + off - wl
        a = ((seqlen_k - 1) if upper_const else (off + wr)) - (0 if lower_const else (off - wl)) + 1
        b = (0 if upper_const else 1) - (0 if lower_const else 1)
        total += _sum_clamped_linear(start, stop, a, b)
    return total


def flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int,
          headdim_v: int | None = None, causal: bool = False, window=(-1, -1),
          mode: str = "fwd") -> float:
    """Matmul FLOPs of attention: 2 * b * h * pairs * (d + dv), x2.5 for bwd, x3.5 for fwd_bwd.

    ``pairs`` = seqlen_q * seqlen_k without a mask (so 4*b*h*s^2*d when dv = d), and the
    exact count of kept pairs with causal or a sliding window.
    """
    headdim_v = headdim if headdim_v is None else headdim_v
    pairs = unmasked_pairs(seqlen_q, seqlen_k, causal, window)
    return 2.0 * batch * nheads * pairs * (headdim + headdim_v) * MODE_FACTOR[mode]
