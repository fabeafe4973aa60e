"""Compile-only harness: build an sm90 kernel (the forward, or with --bwd the backward) for sm_90a
against fake tensors (no GPU needed), keep the cubin and count SASS opcodes.

    python -m cute_kernels.sass [--dtype bf16] [--hdim 128] [--hdimv 128] [--causal] [--local]
                                [--chunk] [--softcap] [--varlen] [--seqused] [--no-overlap]
                                [--split-kv] [--page-size N] [--pack-gqa G] [--tile 192x128s2]
                                [--decode] [--set FIELD=0|1] [--dump] [--loops] [--keep DIR]
    python -m cute_kernels.sass --bwd [--dtype bf16|fp16] [--hdim 128] [--causal] [--local]
                                [--chunk] [--softcap] [--varlen] [--seqused] [--set FIELD=VALUE] [--dump]
                                [--loops]

Prints opcode counts, then registers: `REG` is ptxas's launch allocation (capped at 65536 /
threads and the CTAs an SM holds: 168 at 384 threads, 128 at 512 or at two CTAs of 256 with
--decode), `max R` the highest register the code names (what
setmaxnreg must cover), `STACK`/`LOCAL` bytes of local memory (spills). Exit status 1 when a
required instruction is missing (`check`); for the backward also when it uses local memory.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

REQUIRED = ("HGMMA", "UTMALDG", "USETMAXREG")
# FP8 (e4m3): the GEMMs are QGMMA (FP8 WGMMA) and none is HGMMA (16-bit).
REQUIRED_FP8 = ("QGMMA", "UTMALDG", "USETMAXREG")
# The backward (bwd_sm90.py): the same, and dQ added into global memory by a reduction: the bulk
# reduce (cp.reduce.async.bulk: UBLKRED) or per-element atomics (RED / REDG).
REQUIRED_BWD = REQUIRED
DQ_REDUCE = ("UBLKRED", "RED", "REDG")


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def compile_cubin(cfg, out_dir: str, keep_ptx: bool = False) -> tuple[str, float]:
    """Compile `cfg` for sm_90a into out_dir; return (cubin path, compile seconds)."""
    import cutlass.cute as cute

    from cute_kernels.launch import kernel_class

    kernel = kernel_class(cfg)  # FwdConfig: the forward; BwdConfig: the backward
    os.makedirs(out_dir, exist_ok=True)
    os.environ["CUTE_DSL_DUMP_DIR"] = out_dir
    t0 = time.perf_counter()
    cute.compile(kernel(cfg), *kernel.fake_args(cfg),
                 options=f"--gpu-arch=sm_90a --keep-cubin {'--keep-ptx ' if keep_ptx else ''}--dump-dir={out_dir}")
    dt = time.perf_counter() - t0
    cubins = sorted(glob.glob(os.path.join(out_dir, "**", "*.cubin"), recursive=True), key=os.path.getmtime)
    if not cubins:
        raise RuntimeError(f"no cubin written under {out_dir}")
    return cubins[-1], dt


def sass_text(cubin: str) -> str:
    return subprocess.run([_tool("cuobjdump"), "-sass", cubin], check=True, capture_output=True,
                          text=True).stdout


_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")


def resource_usage(cubin: str) -> dict:
    """ptxas resources of the (single) kernel: REG, STACK, SHARED, LOCAL, ..."""
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], check=True, capture_output=True,
                         text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b([A-Z]+):(\d+)", out.split("Function", 1)[-1])}


def max_register(sass: str) -> int:
    """Highest general register named in the code (R0..R254; RZ excluded)."""
    return max((int(r) for r in re.findall(r"\bR(\d+)\b", sass)), default=-1)


def opcode_counts(sass: str, full: bool = False) -> collections.Counter:
    """Count opcodes (`full`: with modifiers, e.g. BAR.SYNC.DEFER_BLOCKING)."""
    c = collections.Counter()
    for m in _INSTR.finditer(sass):
        c[m.group(1) + (m.group(2) if full else "")] += 1
    return c


def named_barrier_ids(sass: str) -> collections.Counter:
    """BAR.SYNC / BAR.ARV instructions by barrier id (immediate or register)."""
    c = collections.Counter()
    for m in re.finditer(r"\b(BAR\.(?:SYNC|ARV|RED)[.A-Z_]*)\s+([^,;]+)", sass):
        c[f"{m.group(1).split('.')[1]} {m.group(2).strip()}"] += 1
    return c


def is_backward(cfg) -> bool:
    from cute_kernels.config import BwdConfig

    return isinstance(cfg, BwdConfig)


def check(sass: str, cfg, res: dict | None = None, allow_local: bool = False) -> list[str]:
    """Missing required features of the kernel compiled from `cfg` (empty list = ok). A named
    barrier (the forward's pingpong, the backward's dS / dQ hand-offs) is required, but in a
    forward of one consumer warpgroup. The
    backward's dQ needs a reduction into global memory (DQ_REDUCE). No global load may sit
    between a wait and the work it guards (loads_after_waits: its latency adds to the wait's). With `res`
    (`resource_usage`): a setmaxnreg split within the launch's registers (with its REG), and
    unless `allow_local`, no local memory (STACK / LOCAL bytes, spills)."""
    ops = opcode_counts(sass)
    fp8 = getattr(cfg, "dtype", None) == "e4m3"
    bwd = is_backward(cfg)
    missing = [op for op in (REQUIRED_BWD if bwd else REQUIRED_FP8 if fp8 else REQUIRED) if ops[op] == 0]
    if fp8 and ops["HGMMA"]:
        missing.append(f"no HGMMA in an FP8 kernel ({ops['HGMMA']} found)")
    if bwd and not any(ops[op] for op in DQ_REDUCE):
        missing.append(f"dQ reduction ({' or '.join(DQ_REDUCE)})")
    if res is not None and not allow_local and (res.get("STACK") or res.get("LOCAL") or ops["STL"] or ops["LDL"]):
        missing.append(f"no local memory (STACK {res.get('STACK')} LOCAL {res.get('LOCAL')} bytes, "
                       f"{ops['STL']} STL {ops['LDL']} LDL)")
    overdrawn = register_pool_overdrawn(sass, res, cfg) if res and "REG" in res else None
    if overdrawn:
        missing.append(overdrawn)
    bars = named_barrier_ids(sass)
    one_consumer = not bwd and cfg.tile.num_mma_wg == 1  # (DECODE_TILE: no ring, nothing to hand off)
    if not one_consumer and not any(not k.endswith(" 0x0") and not k.endswith(" 0") for k in bars):
        missing.append("named BAR with id != 0")
    if serialized_wgmma(sass):
        missing.append("pipelined HGMMA (ptxas serialized them: C7511)")
    late = loads_after_waits(sass)
    if late:
        missing.append(f"no global load between a wait and the work it guards ({len(late)}: {', '.join(late[:4])})")
    return missing


_SETMAXNREG = re.compile(r"USETMAXREG\.(DEALLOC|TRY_ALLOC)\.CTAPOOL\s+(?:U?P\w+,\s*)?(0x[0-9a-f]+)")


def register_pool_overdrawn(sass: str, res: dict, cfg) -> str | None:
    """Whether the setmaxnreg split in the SASS asks for more registers than the CTA launched
    with (ptxas's REG per thread times the threads): the producer's DEALLOC frees what the
    consumers' TRY_ALLOC loops wait for, so an overdrawn split hangs the kernel on the GPU
    (config.check_reg_split). None where it fits or the kernel has no setmaxnreg."""
    found = {kind: {int(v, 16) for k, v in _SETMAXNREG.findall(sass) if k == kind} for kind in ("DEALLOC", "TRY_ALLOC")}
    if not found["DEALLOC"] or not found["TRY_ALLOC"]:
        return None
    if is_backward(cfg):
        from cute_kernels.bwd_sm90 import NUM_MMA_WG

        warpgroups = NUM_MMA_WG + 1
    else:
        warpgroups = cfg.tile.num_threads // 128
    need = max(found["DEALLOC"]) + (warpgroups - 1) * max(found["TRY_ALLOC"])
    pool = warpgroups * res["REG"]
    if need <= pool:
        return None
    return (f"setmaxnreg within the CTA's registers (DEALLOC {sorted(found['DEALLOC'])} + {warpgroups - 1} x "
            f"TRY_ALLOC {sorted(found['TRY_ALLOC'])} = {need} > {warpgroups} x REG {res['REG']} = {pool}: hangs)")


def serialized_wgmma(sass: str) -> bool:
    """Whether ptxas serialized the WGMMAs (its C7511 "Potential Performance Loss" note): it then
    fences every HGMMA with its own WARPGROUP.ARRIVE / DEPBAR, so no GEMM overlaps anything."""
    ops = opcode_counts(sass, full=True)
    hgmma = sum(n for op, n in ops.items() if op.startswith(("HGMMA", "QGMMA")))
    return hgmma > 0 and ops["WARPGROUP.ARRIVE"] >= hgmma


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text up to the ';') of every instruction, in code order."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def opcode(text: str) -> str:
    """An instruction's opcode with its modifiers (e.g. WARPGROUP.DEPBAR.LE), its predicate dropped."""
    return re.match(r"(?:@!?U?P\w+\s+)?(\S+)", text).group(1)


def hgmma_loops(sass: str) -> list[tuple[int, int, collections.Counter]]:
    """Innermost loops (backward branches) whose body holds an HGMMA: (start, end, opcode counts).
    These are the KV loops (interior, causal-diagonal, window edge); the instruction count of the
    interior one is what to compare between variants."""
    return innermost_loops(sass, lambda ops: ops["HGMMA"] or ops["QGMMA"] or ops["IGMMA"])


def innermost_loops(sass: str, keep) -> list[tuple[int, int, collections.Counter]]:
    """Innermost loops (backward branches) whose body's opcode counts pass `keep`: (start, end,
    opcode counts)."""
    ins = instructions(sass)
    out = []
    for addr, text in ins:
        m = re.search(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            ops = collections.Counter(opcode(t).split(".")[0] for t in body)
            if keep(ops):
                out.append((int(m.group(1), 16), addr, ops))
    # innermost only: an outer loop (the tile loop) contains the KV loops
    return [l for l in out if not any(o is not l and l[0] <= o[0] and o[1] <= l[1] for o in out)]


def loads_after_waits(sass: str) -> list[str]:
    """Global loads (LDG) issued after a wait and before the work that wait guards, so that their
    latency adds to it: between a WARPGROUP.DEPBAR (a GEMM's result) and the next MUFU.EX2 (the
    softmax) or STSM (the epilogue's stores), unless a WARPGROUP.ARRIVE (the next GEMMs) comes
    first; between a stage wait (SYNCS.PHASECHK) and the TMA load it guards (UTMALDG), unless
    another wait comes first. Linear SASS order. Each as "WAIT@addr: LDG@addr"."""
    ins = instructions(sass)
    ops = [opcode(t) for _, t in ins]  # once per instruction (every compile test's check runs this)
    found = []
    for i, (addr, o) in enumerate(zip((a for a, _ in ins), ops)):
        if o.startswith("WARPGROUP.DEPBAR"):
            ends, stops = ("MUFU.EX2", "STSM"), ("WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR", "EXIT")
        elif o.startswith("SYNCS.PHASECHK"):
            ends, stops = ("UTMALDG",), ("SYNCS.PHASECHK", "EXIT")
        else:
            continue
        loads = []
        for j in range(i + 1, len(ins)):
            if ops[j].startswith(ends):
                found += [f"{o}@{addr:#x}: LDG@{la:#x}" for la in loads]
                break
            if ops[j].startswith(stops):
                break
            if ops[j].startswith("LDG"):
                loads.append(ins[j][0])
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cute_kernels.sass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bwd", action="store_true",
                   help="the backward kernel (bwd_sm90.py; bf16/fp16, head dims up to 128, hdim_v = hdim)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "e4m3", "fp8"],
                   help="fp8 = e4m3: the FP8 kernel (fa3py.fp8's format, block V scaling)")
    p.add_argument("--hdim", type=int, default=128)
    p.add_argument("--hdimv", type=int, default=None)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--local", action="store_true", help="sliding window (left and right)")
    p.add_argument("--chunk", action="store_true", help="attention_chunk (chunked local attention)")
    p.add_argument("--softcap", action="store_true")
    p.add_argument("--varlen", action="store_true", help="cu_seqlens for q and k")
    p.add_argument("--seqused", action="store_true", help="seqused for q and k")
    p.add_argument("--split-kv", action="store_true", help="split-KV (float32 partial O and LSE)")
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--page-size", type=int, default=0, help="paged K / V with pages of this many rows "
                   "(with seqused_k, as flash_attn_with_kvcache calls it)")
    p.add_argument("--pack-gqa", type=int, default=1, help="query heads per KV head packed into a tile's rows")
    p.add_argument("--qv", action="store_true", help="MLA's qv (scores + qv v^T; head dims in QV_HDIM_PAIRS)")
    p.add_argument("--decode", action="store_true",
                   help="config.DECODE_TILE (one consumer warpgroup, two CTAs an SM; with --split-kv --pack-gqa G "
                        "--seqused: the kernel decoding runs)")
    p.add_argument("--tile", default=None, help="MxN[sS][+field], e.g. 192x128 (3 consumer WGs, 24/160 regs)")
    p.add_argument("--fp8-v", choices=["block", "channel"], default="block",
                   help="with --dtype fp8: V scaled per KV block (a second accumulator) or per channel")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set a TileConfig field, e.g. --set rescale_o_before_pv=1 (repeatable); with --bwd "
                        "a BwdConfig field, e.g. --set q_stages=1")
    p.add_argument("--full", action="store_true", help="count opcodes with modifiers")
    p.add_argument("--dump", action="store_true", help="print the whole SASS")
    p.add_argument("--loops", action="store_true",
                   help="print the size and opcode mix of the innermost loops that issue HGMMA (the KV loops)")
    p.add_argument("--keep", metavar="DIR", default=None, help="keep the cubin and PTX in DIR")
    a = p.parse_args(argv)
    cfg = backward_config(p, a) if a.bwd else forward_config(p, a)
    with tempfile.TemporaryDirectory() as d:
        cubin, dt = compile_cubin(cfg, a.keep or d, keep_ptx=a.keep is not None)
        sass = sass_text(cubin)
        res = resource_usage(cubin)
    if a.dump:
        print(sass)
    if a.loops:
        for start, end, ops in hgmma_loops(sass):
            top = " ".join(f"{op}:{n}" for op, n in ops.most_common(16))
            print(f"# loop {start:#x}-{end:#x}: {sum(ops.values())} instructions, {top}")
    print(f"# {cfg.short()}  compile {dt:.1f}s")
    for op, n in sorted(opcode_counts(sass, a.full).items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{op:32s} {n}")
    print(f"# registers: REG {res.get('REG')} (launch), max R{max_register(sass)}; "
          f"STACK {res.get('STACK')} LOCAL {res.get('LOCAL')} bytes")
    print("# named barriers:", dict(named_barrier_ids(sass)))
    # (the forward's tile experiments may spill and still be worth reading: only the backward,
    # whose config table has no such variants, fails on local memory)
    missing = check(sass, cfg, res, allow_local=not a.bwd)
    print("# required:", "ok" if not missing else "MISSING " + ", ".join(missing))
    return 1 if missing else 0


def forward_config(p: argparse.ArgumentParser, a: argparse.Namespace):
    import dataclasses

    from cute_kernels.config import (QV_HDIM_PAIRS, SUPPORTED_HDIM_PAIRS, FwdConfig, _field_value, padded_hdim,
                                     padded_hdim_v, tile_from_spec)

    hdimv = a.hdim if a.hdimv is None else a.hdimv
    d, dv = padded_hdim(a.hdim), padded_hdim_v(hdimv, a.qv)  # as the dispatcher rounds (hdim 80: the 96 tile)
    pairs = QV_HDIM_PAIRS if a.qv else SUPPORTED_HDIM_PAIRS
    if a.hdim % 8 or hdimv % 8 or (d, dv) not in pairs:
        p.exit(2, f"cute_kernels.sass: --hdim {a.hdim} --hdimv {hdimv}{' --qv' if a.qv else ''}: the sm90 kernel "
                  f"serves multiples of 8 that round up to one of {sorted(pairs)}\n")
    dtype = "e4m3" if a.dtype == "fp8" else a.dtype
    features = dict(
        hdim_in=0 if d == a.hdim else a.hdim, hdimv_in=0 if dv == hdimv else hdimv,
        has_right=a.causal or a.local, has_left=a.local, chunk=a.chunk, softcap=a.softcap,
        cu_seqlens_q=a.varlen, cu_seqlens_k=a.varlen, seqused_q=a.seqused, seqused_k=a.seqused or a.page_size > 0,
        intra_wg_overlap=not a.no_overlap, split_kv=a.split_kv, page_size=a.page_size, pack_gqa=a.pack_gqa,
        decode=a.decode, **({"qv": True} if a.qv else {}),
        **({"fp8_v_scaling": a.fp8_v} if a.dtype in ("e4m3", "fp8") else {}),
    )
    cfg = FwdConfig.make(dtype, d, dv, **features)
    # --set names a TileConfig field (set on the table's tile) or, where the tile has none of that
    # name, a FwdConfig one (fp8_v_rows=1, fp8_descales=1, ...), which goes through make so that
    # the choices that follow from it are made too (fp8_v_rows: the transposer's pairs)
    tile_fields = {f.name for f in dataclasses.fields(cfg.tile)}
    tile_sets = [kv for kv in a.set if kv.split("=")[0] in tile_fields]
    cfg_sets = dict(_field_value(cfg, kv) for kv in a.set if kv not in tile_sets)
    if cfg_sets:
        cfg = FwdConfig.make(dtype, d, dv, **{**features, **cfg_sets})
    return dataclasses.replace(cfg, tile=tile_from_spec(cfg.tile, a.tile or "", tile_sets))


def backward_config(p: argparse.ArgumentParser, a: argparse.Namespace):
    """The BwdConfig the host side (bwd_launch.config_for) picks for these options: the head dim's
    variants (bwd_launch.variants: ds_stages, dq_red, hdim 192's dkv_transposed) included; --set fields go through
    BwdConfig.make (so dq_red=0 / 1 takes its Q / dO stages with it), tile fields after it."""
    import dataclasses

    from cute_kernels import bwd_launch
    from cute_kernels.config import BWD_TILES, BwdConfig, _field_value, padded_hdim

    def refuse(why: str):
        p.exit(2, f"cute_kernels.sass: --bwd: {why}\n")

    if a.dtype not in ("bf16", "fp16"):
        refuse(f"--dtype {a.dtype}: the backward is bf16 / fp16 only")
    d = padded_hdim(a.hdim)
    wide_v = d == 192 and a.hdimv == 128  # the one hdim_v != hdim the backward serves
    unused = [flag for flag, on in (("--split-kv", a.split_kv), ("--no-overlap", a.no_overlap), ("--tile", a.tile),
                                    ("--hdimv", a.hdimv not in (None, a.hdim) and not wide_v)) if on]
    if unused:
        refuse(f"{', '.join(unused)}: forward options (the backward has one tile per head dim, hdim_v = hdim "
               f"or 192 x 128)")
    if a.hdim % 8 or d not in BWD_TILES:
        refuse(f"--hdim {a.hdim}: the backward kernel serves multiples of 8 that round up to one of "
               f"{sorted(BWD_TILES)}")
    sets = dict(_field_value(BwdConfig.make(a.dtype, d), kv) for kv in a.set)
    after_make = {f: sets.pop(f) for f in ("tile_n", "q_stages", "dkv_split_hdim") if f in sets}
    has_right, hdimv = a.causal or a.local, 128 if wide_v else 0
    features = dict(has_right=has_right, has_left=a.local, chunk=a.chunk, softcap=a.softcap,
                    cu_seqlens_q=a.varlen, cu_seqlens_k=a.varlen, seqused_q=a.seqused, seqused_k=a.seqused,
                    hdim_in=0 if d == a.hdim else a.hdim, hdimv=hdimv,
                    **bwd_launch.variants(d, a.softcap, sets.get("deterministic", False), local=a.local or a.chunk,
                                          hdimv=hdimv, has_right=has_right))
    cfg = BwdConfig.make(a.dtype, d, **{**features, **sets})
    return dataclasses.replace(cfg, **after_make)


if __name__ == "__main__":
    sys.exit(main())
