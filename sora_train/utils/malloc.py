"""Return freed tensor memory to the OS, so a long CPU job's RSS follows its live tensors.

glibc's malloc serves a request above its mmap threshold (128 KiB at start) with a mapping of
its own, unmapped on free; but each such free *raises* the threshold to that size (up to 32 MiB),
so later tensors of that size come from the heap, where small long-lived blocks between them
(a chunk's output, a conv's carried frames) keep freed space from ever being returned. A
chunked VAE decode of an 8x longer clip then read +476 MiB of RSS instead of +192 MiB with
the same live tensors (bench/bench_long_sample.py, docs/benchmarks.md). Fixing the
threshold (what MALLOC_MMAP_THRESHOLD_ does) stops the drift.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
# Tensors above this get their own mapping: one mmap/munmap per tensor of >= 1 MiB costs
# microseconds against the milliseconds a kernel spends on it.
DEFAULT_THRESHOLD = 1 << 20


def fix_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold (disabling its dynamic growth); False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
