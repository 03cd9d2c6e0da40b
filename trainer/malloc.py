"""How glibc hands memory back on CPU: kept for speed, or returned for size.

`keep_freed_memory`: freed heap memory stays in the process, so a training step does not page-fault its
buffers in again.

glibc serves every allocation over 32 MiB (a 128-expert layer's weight gradient) with a fresh mmap
and unmaps it on free, so the next step pays a page fault per 4 KiB it writes. Turning mmap off and
raising the trim threshold makes glibc reuse freed memory from its heap, as jemalloc/tcmalloc setups
do, without a preloaded library (figures and the alternatives tried: docs/benchmarks.md). CPU only:
CUDA memory has its own caching allocator.

`return_freed_memory`: the opposite, for runs laid out to fit (ZeRO-3). Every buffer over 1 MiB gets its
own mapping, returned when freed; with glibc's adaptive threshold, ZeRO-3's gathered layers and
gradient buckets came back from a fragmented heap and held 2.4 GB per rank above the live tensors
(docs/benchmarks.md, the 760M run).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4  # from glibc's malloc.h
TRIM_THRESHOLD = 1 << 30  # free heap kept before glibc gives it back to the OS
# Address space (not memory) added per heap extension: room above a freed big buffer for the small
# allocations made meanwhile, so they do not split it and push the next big one to new pages.
TOP_PAD = 1 << 29


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply settings process-wide (for allocations made from now on). False where not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no glibc mallopt here; CPU buffers keep the default allocator behaviour")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) for option, value in settings)


def keep_freed_memory() -> bool:
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))


def return_freed_memory() -> bool:
    return _mallopt((M_MMAP_THRESHOLD, 1 << 20), (M_TRIM_THRESHOLD, 16 << 20))
