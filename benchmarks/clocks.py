"""The GPU's SM clock and board power while a measurement runs, from `nvidia-smi`.

Wall-time rates on a power-limited GPU move with the clock: two kernels that take the same
number of SM cycles can differ by 5-10% in wall time when one runs at a lower clock (it draws
more power, or the GPU was hotter). `benchmarks.run --clocks` records the mean SM clock (MHz)
and power (W) sampled while each provider's point is timed, next to its time, and the share of
samples in which the driver reported a reason that holds the clock down (`LIMITS`: power cap,
hardware slowdown, thermal, power brake; `clocks_throttle_reasons.active`), where nvidia-smi
knows that field.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
from typing import Optional

import torch

QUERY = "clocks.sm,power.draw"
REASONS = "clocks_throttle_reasons.active"  # a hex bit mask (NVML's clocks event reasons)
# The reasons that lower the clock under load, by their NVML bit (idle, application clocks,
# sync boost and display clock settings left out).
LIMITS = {0x4: "power", 0x8: "hw-slowdown", 0x20: "thermal", 0x40: "hw-thermal", 0x80: "power-brake"}


def smi_id(device: torch.device) -> str:
    """The `nvidia-smi -i` id of a torch CUDA device: its PCI bus id where torch reports one,
    else its index among CUDA_VISIBLE_DEVICES (nvidia-smi ignores that variable)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    bus = getattr(torch.cuda.get_device_properties(index), "pci_bus_id", None)
    if bus:
        return str(bus)
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index] if index < len(visible) else str(index)


# The query each nvidia-smi answered (with the reasons field or without), so a driver that
# refuses the field is not asked again at every measured point.
_working_query: dict[str, str] = {}


class ClockSampler:
    """`with ClockSampler(id) as s: ...` samples SM clock and power every `period_ms` while the
    block runs (sampling has begun when the block starts); then `s.result` is {"sm_mhz": mean,
    "power_w": mean, "samples": n} plus "limits" (see `summarize`) where nvidia-smi reports the
    reasons, or None when nvidia-smi is missing or gave no sample."""

    def __init__(self, smi_device: str, period_ms: int = 20, smi: str = "nvidia-smi"):
        self.smi, self.args = smi, ["--format=csv,noheader,nounits", "-i", smi_device, "-lms", str(period_ms)]
        self.proc: Optional[subprocess.Popen] = None
        self.lines: list[str] = []
        self.result: Optional[dict] = None

    def __enter__(self):
        if shutil.which(self.smi) is None:
            return self
        # With the clock-limit reasons where this nvidia-smi knows the field, else without.
        known = _working_query.get(self.smi)
        for query in [known] if known else [f"{QUERY},{REASONS}", QUERY]:
            self.proc = subprocess.Popen([self.smi, f"--query-gpu={query}", *self.args],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            first = self.proc.stdout.readline()  # blocks until sampling has begun (or nvidia-smi exits)
            if _parse(first) is not None:
                self.lines.append(first)
                _working_query[self.smi] = query
                break
            self._stop()
        return self

    def _stop(self) -> str:
        self.proc.terminate()
        try:
            rest, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        return rest

    def __exit__(self, *exc):
        if self.proc is None or not self.lines:
            return False
        self.lines += self._stop().splitlines()
        self.result = summarize(self.lines)
        return False


def _parse(line: str) -> Optional[tuple]:
    """"clock, power[, reasons]" -> (clock, power, reasons bit mask or None); None if no sample."""
    parts = [p.strip() for p in line.split(",")]
    try:
        clock, power = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        return None
    try:
        reasons = int(parts[2], 16) if len(parts) > 2 else None
    except ValueError:  # "[N/A]"
        reasons = None
    return clock, power, reasons


def summarize(lines: list[str]) -> Optional[dict]:
    """Mean clock and power over the sample lines (lines that do not parse are left out: the
    first may predate the measurement's start only by one period) and, where the lines carry
    reasons, "limits": the share of samples in which each of LIMITS was active (those seen)."""
    samples = [s for s in map(_parse, lines) if s is not None]
    if not samples:
        return None
    result = {"sm_mhz": round(statistics.fmean(s[0] for s in samples)),
              "power_w": round(statistics.fmean(s[1] for s in samples)), "samples": len(samples)}
    masks = [s[2] for s in samples if s[2] is not None]
    if masks:
        shares = {name: sum(bool(m & bit) for m in masks) / len(masks) for bit, name in LIMITS.items()}
        result["limits"] = {name: round(share, 2) for name, share in shares.items() if share > 0}
    return result
