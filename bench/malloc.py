"""glibc malloc settings for benchmarks on small VMs.

On the 2-core dev VM, first-touching fresh memory is expensive (each page fault goes out to the
hypervisor), and glibc by default hands freed blocks over ~128 KB-32 MB back to the kernel. A
process then page-faults the same scratch memory again and again, and how often depends on what
else happens to be allocated: the same UNet forward measured 1.2 s or 1.9 s depending only on
whether ~490 MB of unrelated tensors were alive (bench_stack.py, 2026-11-25). That noise swamps
the few-percent differences a benchmark wants to see.

`retain_freed_memory()` makes glibc keep freed memory for reuse (no trimming, mmap only above
1 GiB), so repeated work runs in steady state. Benchmarks call it once at start-up, before either
side is measured, so both sides of a comparison run under the same allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def retain_freed_memory(threshold: int = 1 << 30) -> bool:
    """Tell glibc to keep freed memory (returns False where glibc's mallopt is not available)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_TRIM_THRESHOLD, threshold)) and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
