"""Process-level performance settings for training processes.

glibc's allocator hands large freed blocks back to the kernel and maps them again on the
next allocation; a training step allocates and frees the same large activation buffers
every step, so on CPU it pays page faults for them each time (measured here: about 16% of
a split segmentation step; see ``benchmarks/split_step.py``). :func:`tune_allocator` keeps
freed memory in the process for reuse, at the cost of resident memory staying near its
peak, which a training process reaches anyway. Set ``FEDBONE_MALLOC_TUNING=0`` to opt out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator() -> bool:
    """Keep freed heap memory for reuse (Linux glibc only). Returns whether it was applied."""
    global _done
    if _done:
        return True
    if os.environ.get("FEDBONE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    ok = (
        mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1  # blocks under 32 MiB come from the heap
        and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1  # keep up to 1 GiB of free heap
        and mallopt(_M_TOP_PAD, 256 << 20) == 1  # grow the heap in 256 MiB steps
    )
    _done = ok
    return ok


def machine_info() -> dict[str, object]:
    """Where a run ran, for its results.json: results depend on it. Besides the platform, torch's CPU
    kernels reduce in an order that depends on the thread count, so the same seed gives other metrics
    with 1 and with 2 torch threads; compare runs with the same ``torch_threads``."""
    import platform

    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
