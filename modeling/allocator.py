"""glibc malloc settings for training and scoring on the CPU.

PyTorch's CPU allocator takes every tensor straight from malloc. glibc serves a block above its mmap
threshold (128 KiB at first, raised only by frees of mmapped blocks) with a fresh `mmap` and hands it
back with `munmap` on free, and gives the top of its heap back to the system above the trim threshold.
A forward pass of a batch allocates and frees activations of a few MB per layer, so under the defaults
every batch maps, page-faults and unmaps the same memory again. With the heap kept (mmap threshold
32 MiB, trim threshold 1 GiB) the pages stay mapped between batches: on 2 cores, scoring the embedded
backbone ran 1.35-1.45x faster (760-910 -> 1,110-1,190 rows/s, the same forecasts) and training
1.08-1.15x, for about 1% more peak memory (BENCHMARKS.md, "Scoring throughput").

`tune_malloc` sets both at run time with `mallopt`, in the processes that do the tensor work: the
training process (`modeling.run_job`), the pyfunc when it loads, and the `base_model` step before it
pretrains the embedded backbone. It does nothing on a C library
other than glibc, or when the environment already sets glibc's malloc tunables (the user's choice wins).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
"""glibc's `mallopt` parameter number for the trim threshold (malloc.h)."""
M_MMAP_THRESHOLD = -3
"""glibc's `mallopt` parameter number for the mmap threshold (malloc.h)."""
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
"""Blocks below this come from the heap and are reused; glibc's largest allowed value on 64 bits."""
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
"""Free memory at the top of the heap kept mapped up to this size instead of returned at each free."""
USER_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
"""Environment variables through which a user already set glibc's malloc: then nothing is changed."""


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD_BYTES, trim_threshold: int = TRIM_THRESHOLD_BYTES
) -> bool:
    """Keep tensor-sized blocks on glibc's heap (see the module docstring). True when both settings were
    applied; False on other C libraries, when the environment sets malloc tunables, or when glibc
    refuses a value. Process-wide and idempotent."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_TUNABLES):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )
