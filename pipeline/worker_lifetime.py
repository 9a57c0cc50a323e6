"""Worker processes end with the process that started them.

A trainer killed with SIGKILL (the OOM killer's way) cannot stop its DALI reader workers, and make_shards killed the
same way cannot stop its pool: re-parented to PID 1, they would wait forever for work, holding their memory. Each
worker asks the kernel to SIGKILL it when its parent dies (Linux's parent-death signal), and exits at once if the
parent died before it asked.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Call in a worker: SIGKILL this process when its parent (`parent_pid`, the process that started it) dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: such workers are left to their own ends
        return
    if os.getppid() != parent_pid:
        os._exit(1)
