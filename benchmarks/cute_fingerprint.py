"""SASS fingerprints of the sm90 forward's and backward's default configs: proof, without a GPU,
that a refactor left the kernels the dispatcher runs unchanged (or a list of the ones it changed).

    python -m benchmarks.cute_fingerprint base.json                    # before the change
    python -m benchmarks.cute_fingerprint new.json --against base.json # after: SAME / DIFF per config
    python -m benchmarks.cute_fingerprint new.json --only "d128.*causal" --dump DIR

Each config (every head-dim pair x non-causal / short / causal / local, plus dtypes, softcap,
varlen, seqused, GQA packing, split-KV, padded head dims and the FP8 path: 61 configs; then the
backward's, labelled "bwd ...": every head dim x non-causal / causal / local, plus fp16, softcap,
varlen, seqused and padded head dims: 18 configs) is compiled for sm_90a (`cute_kernels.sass`),
its SASS reduced to the instruction lines (the kernel's symbol name changes with module and class
names) and hashed. Exit status 1 when a config differs from the baseline; a label the baseline
lacks (a baseline from before the backward's section) is NEW, listed, and not a difference.
--dump writes the differing SASS there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile

PAIRS = [(64, 64), (96, 96), (128, 128), (192, 192), (256, 256), (192, 128)]
MODES = {
    "nc": dict(), "nc_short": dict(short=True, medium=True), "nc_medium": dict(medium=True),
    "causal": dict(has_right=True), "causal_short": dict(has_right=True, short=True),
    "local": dict(has_left=True, has_right=True), "local_short": dict(has_left=True, has_right=True, short=True),
}
_VARLEN = dict(cu_seqlens_q=True, cu_seqlens_k=True)
EXTRA = {
    "bf16 d64 nc_medium": dict(hdim=64, medium=True),
    "bf16 d64 local_short": dict(hdim=64, **MODES["local_short"]),
    "bf16 d64 left_only": dict(hdim=64, has_left=True),
    "bf16 d128 left_only": dict(hdim=128, has_left=True),
    "fp16 d128 causal": dict(dtype="fp16", hdim=128, has_right=True),
    "fp16 d64 nc": dict(dtype="fp16", hdim=64),
    "fp16 d256 nc_short": dict(dtype="fp16", hdim=256, short=True, medium=True),
    "bf16 d128 softcap nc": dict(hdim=128, softcap=True),
    "bf16 d128 softcap causal": dict(hdim=128, softcap=True, has_right=True),
    "bf16 d64 softcap causal_short": dict(hdim=64, softcap=True, has_right=True, short=True),
    "bf16 d128 varlen causal": dict(hdim=128, has_right=True, **_VARLEN),
    "bf16 d64 varlen nc_short": dict(hdim=64, short=True, medium=True, **_VARLEN),
    "bf16 d256 varlen nc": dict(hdim=256, **_VARLEN),
    "bf16 d128 seqused_k nc": dict(hdim=128, seqused_k=True),
    "bf16 d256 seqused causal": dict(hdim=256, has_right=True, seqused_q=True, seqused_k=True),
    "bf16 d96 varlen_seqused causal_short": dict(hdim=96, has_right=True, short=True, seqused_q=True,
                                                 seqused_k=True, **_VARLEN),
    "bf16 d128 pack4 causal_short": dict(hdim=128, has_right=True, short=True, pack_gqa=4),
    "bf16 d64 pack8 nc_short": dict(hdim=64, short=True, medium=True, pack_gqa=8),
    "bf16 d128 split nc": dict(hdim=128, split_kv=True),
    "bf16 d128 split pack8 nc": dict(hdim=128, split_kv=True, pack_gqa=8),
    "bf16 d256 split varlen nc": dict(hdim=256, split_kv=True, **_VARLEN),
    "bf16 d64 split causal": dict(hdim=64, split_kv=True, has_right=True),
    "bf16 d192x128 split causal_short": dict(hdim=192, hdimv=128, split_kv=True, has_right=True, short=True),
    "bf16 d96in80 nc": dict(hdim=96, hdim_in=80, hdimv_in=80),
    "bf16 d96in80 causal_short": dict(hdim=96, hdim_in=80, hdimv_in=80, has_right=True, short=True),
    "bf16 d256in200 split nc": dict(hdim=256, hdim_in=200, hdimv_in=200, split_kv=True),
    "bf16 d128in120 varlen nc": dict(hdim=128, hdim_in=120, hdimv_in=120, **_VARLEN),
    # the FP8 path (opt-in until it has run on a GPU): block and channel V scales
    "e4m3 d128 nc": dict(dtype="e4m3", hdim=128),
    "e4m3 d128 causal": dict(dtype="e4m3", hdim=128, has_right=True),
    "e4m3 d64 causal_short": dict(dtype="e4m3", hdim=64, has_right=True, short=True),
    "e4m3 d256 channel nc": dict(dtype="e4m3", hdim=256, fp8_v_scaling="channel"),
}


# The backward (bwd_sm90.py, BwdConfig.make's defaults): a section of its own, so the forward's
# labels and hashes stay as they were.
BWD_HDIMS = (64, 96, 128)
BWD_MODES = {"nc": dict(), "causal": dict(has_right=True), "local": dict(has_left=True, has_right=True)}
_SEQUSED = dict(seqused_q=True, seqused_k=True)
BWD_EXTRA = {
    "bwd bf16 d192 causal": dict(hdim=192, has_right=True),  # the wide tile (dK / dV split by columns)
    "bwd bf16 d256 nc": dict(hdim=256),
    "bwd bf16 d192x128 local": dict(hdim=192, hdimv=128, has_left=True, has_right=True),
    "bwd fp16 d128 causal": dict(dtype="fp16", hdim=128, has_right=True),
    "bwd fp16 d64 nc": dict(dtype="fp16", hdim=64),
    "bwd bf16 d128 softcap nc": dict(hdim=128, softcap=True),
    "bwd bf16 d64 softcap causal": dict(hdim=64, softcap=True, has_right=True),
    "bwd bf16 d128 varlen causal": dict(hdim=128, has_right=True, **_VARLEN),
    "bwd bf16 d128 seqused nc": dict(hdim=128, **_SEQUSED),
    "bwd bf16 d96 varlen_seqused local": dict(hdim=96, has_left=True, has_right=True, **_VARLEN, **_SEQUSED),
    "bwd bf16 d96in80 causal": dict(hdim=96, hdim_in=80, has_right=True),
    "bwd bf16 d128in112 varlen nc": dict(hdim=128, hdim_in=112, **_VARLEN),
}


def cases() -> dict:
    """label -> FwdConfig.make keyword arguments (dtype and head dims included)."""
    out = {f"bf16 d{d}x{dv} {m}": dict(dtype="bf16", hdim=d, hdimv=dv, **MODES[m])
           for d, dv in PAIRS for m in ("nc", "nc_short", "causal", "causal_short", "local")}
    out.update({k: {"dtype": "bf16", **v} for k, v in EXTRA.items()})  # (an entry's dtype wins)
    return out


def bwd_cases() -> dict:
    """label ("bwd ...") -> BwdConfig.make keyword arguments (dtype and head dim included)."""
    out = {f"bwd bf16 d{d} {m}": dict(dtype="bf16", hdim=d, **BWD_MODES[m]) for d in BWD_HDIMS for m in BWD_MODES}
    out.update({k: {"dtype": "bf16", **v} for k, v in BWD_EXTRA.items()})
    return out


def make_config(label: str, kw: dict):
    """The config of case `label`: a BwdConfig for the backward's ("bwd ..."), else a FwdConfig."""
    from cute_kernels.config import BwdConfig, FwdConfig

    kw = dict(kw)
    if label.startswith("bwd "):
        return BwdConfig.make(kw.pop("dtype"), kw.pop("hdim"), **kw)
    return FwdConfig.make(kw.pop("dtype"), kw.pop("hdim"), kw.pop("hdimv", None), **kw)


def instructions(sass: str) -> str:
    return "\n".join(line.strip() for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", line))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="JSON file to write: label -> hash, instruction count, config")
    p.add_argument("--against", metavar="BASE.json", help="compare with a baseline written by this tool")
    p.add_argument("--only", metavar="REGEX", help="configs whose label matches")
    p.add_argument("--dump", metavar="DIR", help="write the SASS of configs that differ from the baseline")
    a = p.parse_args(argv)
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    from cute_kernels.sass import compile_cubin, sass_text

    base = json.load(open(a.against)) if a.against else None
    result, differ, new = {}, [], []
    for label, kw in {**cases(), **bwd_cases()}.items():
        if a.only and not re.search(a.only, label):
            continue
        cfg = make_config(label, kw)
        with tempfile.TemporaryDirectory() as d:
            text = instructions(sass_text(compile_cubin(cfg, d)[0]))
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        result[label] = dict(hash=digest, n=text.count("\n") + 1, config=cfg.short())
        mark = ""
        if base is not None:
            b = base.get(label)
            mark = "NEW" if b is None else "SAME" if b["hash"] == digest else f"DIFF (base {b['hash']}, {b['n']} lines)"
            if mark == "NEW":
                new.append(label)
            elif mark != "SAME":
                differ.append(label)
                if a.dump:
                    os.makedirs(a.dump, exist_ok=True)
                    with open(os.path.join(a.dump, re.sub(r"[^a-z0-9]+", "_", label) + ".sass"), "w") as f:
                        f.write(text)
        print(f"{label:45s} {digest} {result[label]['n']:6d} {mark}  [{cfg.short()}]", flush=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    summary = (f"differ: {', '.join(differ)}" if differ else "all identical") if base is not None else "baseline"
    if new:
        summary += f"; {len(new)} not in the baseline: {', '.join(new)}"
    print(f"# {len(result)} configs, {len({r['hash'] for r in result.values()})} distinct SASS; {summary}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
