"""Nothing hangs forever: a thread that ends the process when training stops making progress.

The process group's timeout (dist.timeout_s) covers collectives that go through torch.distributed, but not every
wait can time out: a loader whose worker process was killed waits for a batch that never comes, and a rank whose
peer froze was once seen here (on a loaded 2-core machine) still blocked well past the group's timeout. The
trainer beats the watchdog at every micro-step; when no beat comes for `timeout_s`, the watchdog calls `on_expire`
(which records the failure) and ends the process with exit status 1. Long phases that are not steps (a checkpoint, a
kNN pass) pause it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, timeout_s: float, on_expire: Callable[[str], None], poll_s: float = 1.0):
        self.timeout_s, self.on_expire, self.poll_s = timeout_s, on_expire, poll_s
        self.last, self.paused_depth = time.monotonic(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="augssl-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def beat(self) -> None:
        self.last = time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        self.paused_depth += 1
        try:
            yield
        finally:
            self.paused_depth -= 1
            self.beat()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self.last
            if self.paused_depth == 0 and idle > self.timeout_s:
                reason = (f"no training progress for {idle:.0f} s (dist.timeout_s={self.timeout_s:g}): a peer rank "
                          "or a loader worker stopped answering")
                log.error("%s; exiting", reason)
                try:
                    self.on_expire(reason)
                finally:
                    os._exit(1)
