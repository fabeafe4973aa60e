"""The GPU's SM clock and board power while a measurement runs, from `nvidia-smi`.

Wall-time rates on a power-limited GPU move with the clock: two kernels that take the same
number of SM cycles can differ by 5-10% in wall time when one runs at a lower clock (it draws
more power, or the GPU was hotter). `benchmarks.run --clocks` records the mean SM clock (MHz)
and power (W) sampled while each provider's point is timed, next to its time.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
from typing import Optional

import torch

QUERY = "clocks.sm,power.draw"


def smi_id(device: torch.device) -> str:
    """The `nvidia-smi -i` id of a torch CUDA device: its PCI bus id where torch reports one,
    else its index among CUDA_VISIBLE_DEVICES (nvidia-smi ignores that variable)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    bus = getattr(torch.cuda.get_device_properties(index), "pci_bus_id", None)
    if bus:
        return str(bus)
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index] if index < len(visible) else str(index)


class ClockSampler:
    """`with ClockSampler(id) as s: ...` samples SM clock and power every `period_ms` while the
    block runs (sampling has begun when the block starts); then `s.result` is {"sm_mhz": mean,
    "power_w": mean, "samples": n}, or None when nvidia-smi is missing or gave no sample."""

    def __init__(self, smi_device: str, period_ms: int = 20, smi: str = "nvidia-smi"):
        self.cmd = [smi, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-i", smi_device,
                    "-lms", str(period_ms)]
        self.proc: Optional[subprocess.Popen] = None
        self.lines: list[str] = []
        self.result: Optional[dict] = None

    def __enter__(self):
        if shutil.which(self.cmd[0]) is None:
            return self
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        first = self.proc.stdout.readline()  # blocks until sampling has begun (or nvidia-smi exits)
        if first:
            self.lines.append(first)
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            return False
        self.proc.terminate()
        try:
            rest, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        self.lines += rest.splitlines()
        self.result = summarize(self.lines)
        return False


def summarize(lines: list[str]) -> Optional[dict]:
    """Mean clock and power over "clock, power" lines (lines that do not parse are left out:
    the first may predate the measurement's start only by one period)."""
    clocks, powers = [], []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        try:
            clock, power = float(parts[0]), float(parts[1])
        except (IndexError, ValueError):
            continue
        clocks.append(clock)
        powers.append(power)
    if not clocks:
        return None
    return {"sm_mhz": round(statistics.fmean(clocks)), "power_w": round(statistics.fmean(powers)),
            "samples": len(clocks)}
