"""Pipeline and warpgroup-ordering helpers of the sm90 kernels: the consumer warpgroups' GEMM
ring on named barriers, trace-time checks of PipelineTmaAsync arrive counts, and consumer
releases that a schedule places by hand."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Int32, const_expr

from cute_kernels.config import THREADS_PER_WG
from cute_kernels.utils import NamedBarrierFwd


@dataclass(frozen=True)
class WarpgroupRing:
    """A ring over the consumer warpgroups: WG i waits on barrier WarpSchedulerWG1 + i (its own
    128 threads + 128 arrivals of WG i-1) before issuing GEMMs and then arrives on WG i+1's, so
    one WG's softmax overlaps the others' GEMMs. With 2 WGs the ring is FA3's pingpong; with 3,
    FA3's 3-WG round robin; with 1 (config.DECODE_TILE) there is no one to take turns with and
    every method is empty."""

    num_mma_wg: int

    def __post_init__(self):
        last = len(NamedBarrierFwd) - int(NamedBarrierFwd.WarpSchedulerWG1)
        assert 1 <= self.num_mma_wg <= last + 1, "one named barrier per consumer warpgroup"

    def barrier_id(self, wg_idx) -> Int32:
        return int(NamedBarrierFwd.WarpSchedulerWG1) + wg_idx

    @cute.jit
    def init(self, wg_idx):
        """WG1 goes first: it pre-arrives on its own barrier."""
        if const_expr(self.num_mma_wg > 1) and wg_idx == 0:
            cute.arch.barrier_arrive(barrier_id=int(NamedBarrierFwd.WarpSchedulerWG1),
                                     number_of_threads=2 * THREADS_PER_WG)

    @cute.jit
    def sync(self, wg_idx):
        """Wait for this warpgroup's turn to issue GEMMs."""
        if const_expr(self.num_mma_wg > 1):
            cute.arch.barrier(barrier_id=self.barrier_id(wg_idx), number_of_threads=2 * THREADS_PER_WG)

    @cute.jit
    def arrive(self, wg_idx):
        """Pass the turn to the next warpgroup."""
        if const_expr(self.num_mma_wg > 1):
            next_wg = 1 - wg_idx if const_expr(self.num_mma_wg == 2) else (wg_idx + 1) % self.num_mma_wg
            cute.arch.barrier_arrive(barrier_id=self.barrier_id(next_wg), number_of_threads=2 * THREADS_PER_WG)


def check_arrive_counts(pipe, consumer_warps: int):
    """Trace-time check of a PipelineTmaAsync's mbarrier arrive counts: full = the one TMA
    thread (+ tx bytes), empty = lane 0 of every consumer warp (PipelineTmaAsync's
    consumer_release signals from lane 0 only, without cluster multicast)."""
    full, empty = pipe.sync_object_full.arrive_count, pipe.sync_object_empty.arrive_count
    assert full == 1, f"full barrier arrive count {full} != 1 producer thread"
    assert empty == consumer_warps, f"empty barrier arrive count {empty} != {consumer_warps} warps"


@cute.jit
def release_previous(pipe, state):
    """pipe.consumer_release of the stage before `state`'s (chain_pv_qk: the last block's V,
    whose PV has just been waited for)."""
    prev = state.index - 1 if state.index > 0 else Int32(pipe.num_stages - 1)
    if pipe.is_signaling_thread:
        pipe.sync_object_empty.arrive(prev, pipe.consumer_mask)


@cute.jit
def release_after(pipe, state, p_mn: cute.Tensor, col: cutlass.Constexpr[int]):
    """pipe.consumer_release(state), made to depend on the probability p_mn[0, col]: it is
    >= 0 or NaN, so the test always passes, but ptxas cannot know that and must compute that
    exp2 (and, in its order, about 2 * col others) before the arrive."""
    assert col < cute.size(p_mn.shape[1]), f"k_release_gate {col + 1} > {cute.size(p_mn.shape[1])} columns"
    if pipe.is_signaling_thread & (not (p_mn[0, col] < 0.0)):
        pipe.sync_object_empty.arrive(state.index, pipe.consumer_mask)


def tma_pipeline_maker(num_consumer_threads: int):
    """PipelineTmaAsync.create with the kernels' groups bound: one producer thread (the TMA
    warp's elected lane) and every consumer warp (release from lane 0); the caller gives the
    barrier storage, stage count and tx bytes. Barrier init is deferred to the kernel's one sync."""
    return partial(pipeline.PipelineTmaAsync.create,
                   producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 1),
                   consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, num_consumer_threads // 32),
                   defer_sync=True)
