"""A rank's peak memory over a run, to set beside `pretrain plan`'s estimate: on a GPU torch's
max_memory_allocated, on a CPU the peak resident set above the level just before the model was built
(the kernel's high-water mark, reset at that point)."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM from /proc; elsewhere (macOS) the process's peak from getrusage for both."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    def __init__(self, device_type: str):
        self.cuda = device_type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = _status_bytes("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
            except OSError:
                pass  # no /proc: the peak then counts from the process start

    def peak(self) -> int:
        """Bytes above the baseline at the peak so far."""
        top = torch.cuda.max_memory_allocated() if self.cuda else _status_bytes("VmHWM")
        return top - self.baseline

    def write(self, path: Path) -> dict:
        record = {"device": "cuda" if self.cuda else "cpu", "baseline_bytes": self.baseline,
                  "peak_bytes": self.peak()}
        path.write_text(json.dumps(record))
        return record
