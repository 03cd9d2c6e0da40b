"""Keep freed heap memory in the process on CPU, so a training step does not page-fault its buffers in again.

glibc serves every allocation over 32 MiB (for instance a 128-expert layer's 134 MB weight
gradient) with a fresh mmap and unmaps it on free. The next step then takes a page fault per
4 KiB while it writes the buffer; measured here, a fresh 268 MB buffer costs ~110 ms to fill
against ~20 ms for a reused one, more than the matmuls that write it. Turning mmap off and
raising the trim threshold makes glibc reuse freed memory from its heap instead. This is the
same effect the jemalloc/tcmalloc setups recommended for PyTorch on CPU give, without a
preloaded library. Only for CPU training: CUDA memory has its own caching allocator.

The cost: the process keeps up to TRIM_THRESHOLD of freed heap resident, and the heap needs a
step or two to settle (tests/trainer/test_malloc.py: a 64-expert layer's steps go from ~35,000
page faults each to ~0 from the second step). PyTorch's THP_MEM_ALLOC_ENABLE (huge pages for big
buffers) was measured as the alternative: 184 ms against 155 ms per 128-expert layer step, with
occasional 0.7 s stalls.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # from glibc's malloc.h
TRIM_THRESHOLD = 1 << 30  # free heap kept before glibc gives it back to the OS
# Address space (not memory) added per heap extension: room above a freed big buffer for the small
# allocations made meanwhile, so they do not split it and push the next big one to new pages.
TOP_PAD = 1 << 29


def keep_freed_memory() -> bool:
    """Apply the setting process-wide (for allocations made from now on). False where not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no glibc mallopt here; CPU buffers keep the default allocator behaviour")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) for option, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
