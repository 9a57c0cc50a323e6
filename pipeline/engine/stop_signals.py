"""SIGTERM and SIGUSR1 as requests to checkpoint and exit cleanly, rather than deaths.

Schedulers announce the end of a job with a signal: Slurm sends SIGTERM at the time limit or preemption (and the
signal chosen with `--signal`, conventionally SIGUSR1, ahead of it), Kubernetes SIGTERM before deleting a pod,
torchrun forwards the SIGTERM it gets to its workers. The handler only records the request; the trainer agrees on it
across ranks at the next optimizer step (a checkpoint is collective, so every rank must stop at the same step),
saves, and exits with status 0.

A Python handler runs only when the main thread returns to the interpreter, never while it is blocked in C++ (a
collective whose peer froze). The C-level handler also writes the signal's number to a wake-up pipe, whatever the
main thread does: `arrived()` reads it there, so that the watchdog (watchdog.py) can end a run whose main loop does
not act on the request in time.
"""

from __future__ import annotations

import os
import signal
import time

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_installed = False


def _forget_in_forked_child() -> None:
    """A forked worker (DALI's readers) shares the wake-up pipe: its signals (DALI stops its workers with SIGTERM)
    must not read as the trainer's."""
    if _installed:
        signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_in_forked_child)


class StopSignals:
    def __init__(self):
        self.received: str | None = None  # set by the Python handler, in the main thread
        self.agreed = False  # the ranks agreed to stop: the main loop is acting on it
        self.first: tuple[str, float] | None = None  # the first stop signal and its time.monotonic(), from the pipe
        self._previous, self._pipe, self._previous_fd = {}, (-1, -1), -1

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> "StopSignals":
        global _installed
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._pipe = os.pipe()
        for fd in self._pipe:
            os.set_blocking(fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        _installed = True
        return self

    def arrived(self) -> tuple[str, float] | None:
        """The first stop signal this process got and when, even if the main thread has not run its handler yet."""
        try:
            numbers = os.read(self._pipe[0], 512)
        except BlockingIOError:
            numbers = b""
        for number in numbers:
            if self.first is None and number in SIGNALS:
                self.first = (signal.Signals(number).name, time.monotonic())
        return self.first

    def uninstall(self) -> None:
        global _installed
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        signal.set_wakeup_fd(self._previous_fd)
        for fd in self._pipe:
            os.close(fd)
        _installed = False
