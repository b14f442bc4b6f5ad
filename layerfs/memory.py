"""Process-wide memory policy: large buffers go back to the kernel when they are freed.

glibc's malloc gives an allocation above its mmap threshold (128 KiB at first) a
mapping of its own, unmapped when freed, but raises the threshold to the size of
each such block freed, up to 32 MiB. Once the first pack ranges and packs (4-32
MiB) have been freed, the later ones come from the heaps of the threads that
allocate them, and those heaps keep the memory. A restore of 2 GiB from S3 with 8
fetch threads peaked at 243-278 MiB resident, and at 190 MiB with the threshold
fixed at 1 MiB (4 threads: 199-206 against 166 MiB), at the same speed. Setting
the threshold with mallopt(3) also ends its raising.

Every entry point of the project's processes calls ``return_large_buffers`` first.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
LARGE = 1 << 20  # allocations of this many bytes or more get a mapping of their own


def return_large_buffers() -> bool:
    """Have malloc map every allocation of LARGE bytes or more on its own, so that freeing
    it returns it to the kernel; False where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE))
