"""trainer.malloc: freed big CPU buffers are reused instead of page-faulted in afresh every step."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Eight training steps of a 64-expert Switch layer, whose two expert weight gradients (64 MB each)
# are above glibc's mmap threshold; the child prints the minor page faults (first touches of
# fresh pages) of each step.
CHILD = """
import json, resource, sys, torch
from trainer.config import MoEConfig
from trainer.malloc import keep_freed_memory
from trainer.model.moe import SwitchFFN
kept = keep_freed_memory() if sys.argv[1] == "kept" else None
torch.manual_seed(0)
layer = SwitchFFN(256, 1024, MoEConfig(num_experts=64, capacity_factor=1.25))
x = torch.randn(1024, 256)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    layer.zero_grad(set_to_none=True)
    y, stats = layer(x)
    (y.square().mean() + stats.aux_loss).backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_gradients_are_reused_after_keep_freed_memory():
    gradient_pages = 2 * 64 * 256 * 1024 * 4 // 4096
    default = _faults("default")
    # glibc's default: every step maps the gradients afresh and faults all their pages in.
    assert statistics.median(default["faults"][4:]) > 0.9 * gradient_pages
    kept = _faults("kept")
    assert kept["kept"] is True
    # Kept: after the first steps the heap holds the gradients' memory and steps reuse it.
    assert statistics.median(kept["faults"][4:]) < 0.1 * gradient_pages
