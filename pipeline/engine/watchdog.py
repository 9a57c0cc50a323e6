"""Nothing hangs forever: a thread that ends the process when the main thread cannot.

The process group's timeout (dist.timeout_s) covers collectives that go through torch.distributed, but not every
wait can time out. The watchdog ends the process, after `on_expire` has recorded why (status.json), in three cases:

- no progress: the trainer beats the watchdog at every micro-step; no beat for `timeout_s` (a rank whose peer froze
  was once seen here, on a loaded 2-core machine, still blocked well past the group's timeout): exit 1;
- a dead reader worker: DALI waits forever for the batch of a loader worker process that died (the OOM killer's
  SIGKILL), or for its other workers, which ignore DALI's SIGTERM (forked, they have the trainer's stop handler).
  Polling the workers notices at once; the watchdog then kills the survivors, so that DALI's wait ends in an error
  and the main loop can checkpoint and stop naming the worker (`dead_worker`), and ends the process itself (exit 1)
  when the main loop has not done so `grace_s` later;
- a stop signal the main loop does not act on: SIGTERM/SIGUSR1 make the ranks agree to stop at the next step; when
  they have not `grace_s` after the signal (or after the last progress since), the main thread is blocked in a
  collective or a wait: exit 143, keeping the last checkpoint (stop_signals.py).

Long phases that are not steps (a checkpoint, a kNN pass) pause the watch: no beats are expected, a dead worker
waits for their end, and so does a stop signal whose handler ran (the main thread runs Python; only a thread blocked
in C++ cannot run it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from pipeline import exit_codes
from pipeline.engine.stop_signals import StopSignals


def main_thread_at() -> str:
    """Where the main thread is: its innermost call, and the innermost one in this package (the trainer's)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    calls = [(f.f_code.co_name, f.f_code.co_filename, line) for f, line in traceback.walk_stack(frame)] if frame else []
    if not calls:
        return "an unknown call"
    ours = next((call for call in calls if f"{os.sep}pipeline{os.sep}" in call[1]), None)
    return _call(*calls[0]) + (f" from {_call(*ours)}" if ours and ours != calls[0] else "")


def _call(name: str, path: str, line: int) -> str:
    return f"{name} ({Path(path).name}:{line})"


def death(exitcode: int) -> str:
    """How a worker process ended, from its multiprocessing exitcode (-N: killed by signal N)."""
    if exitcode >= 0:
        return f"exit status {exitcode}"
    name = signal.Signals(-exitcode).name
    return f"{name}: out of memory?" if name == "SIGKILL" else name


class Watchdog:
    def __init__(self, timeout_s: float, on_expire: Callable[[str, str, int], None], grace_s: float = 20.0,
                 signals: StopSignals | None = None, workers: Callable[[], list] = list, rank: int = 0,
                 poll_s: float = 0.5):
        """on_expire(status, reason, exit_code) records the end; `workers()` lists the running reader worker
        processes (multiprocessing.Process)."""
        self.timeout_s, self.on_expire, self.grace_s, self.poll_s = timeout_s, on_expire, grace_s, poll_s
        self.signals, self.workers, self.rank = signals, workers, rank
        self.last, self.paused_depth = time.monotonic(), 0
        self.dead_worker: str | None = None  # why, once a reader worker died
        self.worker_died = threading.Event()
        self._watched, self._died_at = [], 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="augssl-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

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
            now, paused = time.monotonic(), self.paused_depth > 0
            if self.dead_worker is None:
                self._check_workers(now)
            stop = self.signals.arrived() if self.signals else None
            if not paused and now - self.last > self.timeout_s:
                self._end("failed", f"no training progress for {now - self.last:.0f} s (dist.timeout_s="
                          f"{self.timeout_s:g}), blocked in {main_thread_at()}", exit_codes.ERROR)
            elif self.dead_worker and not paused and now - max(self._died_at, self.last) > self.grace_s:
                self._end("failed", f"{self.dead_worker}; the main loop, blocked in {main_thread_at()}, did not stop "
                          f"within dist.stop_grace_s={self.grace_s:g}", exit_codes.ERROR)
            elif (stop and not self.signals.agreed and not (paused and self.signals.received)
                  and now - max(stop[1], self.last) > self.grace_s):
                self._end("stopped", f"{stop[0]} while blocked in {main_thread_at()}", exit_codes.STOPPED)

    def _check_workers(self, now: float) -> None:
        """Remembers the newest stream's workers (a stream being closed may still die) and acts on a dead one. SIGTERM
        does not count: DALI ends a closed stream's slow workers with it, and a scheduler may send it to every process
        of a job (a stop, which the trainer handles)."""
        self._watched = self.workers() or self._watched
        dead = [p for p in self._watched if p.exitcode not in (None, 0, -signal.SIGTERM)]
        if not dead:
            return
        self.dead_worker = f"DALI reader worker {dead[0].pid} of rank {self.rank} died ({death(dead[0].exitcode)})"
        self._died_at = now
        for p in self._watched:
            p.kill()
        self.worker_died.set()

    def _end(self, status: str, reason: str, exit_code: int) -> None:
        print(f"{reason}; exiting", file=sys.stderr, flush=True)  # where a failure's line goes (docs/exit-codes.md)
        try:
            self.on_expire(status, reason, exit_code)
        finally:
            os._exit(exit_code)
