"""The watchdog ends a process that stopped making progress, after recording why, and leaves a beating or paused
one alone."""

import subprocess
import sys
import time

from pipeline.engine.watchdog import Watchdog

STUCK = """
import sys, time
from pipeline.engine.watchdog import Watchdog
Watchdog(1.0, lambda reason: print("recorded:", reason, flush=True), poll_s=0.1).start()
time.sleep(30)  # a wait that never ends (a spinning all-reduce, a dead loader worker)
"""


def test_a_stuck_process_is_ended_with_status_1_after_recording_why():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - started < 15
    assert "recorded: no training progress for 1 s (dist.timeout_s=1)" in proc.stdout


def test_beats_and_pauses_keep_it_quiet():
    expired = []
    dog = Watchdog(0.5, expired.append, poll_s=0.05).start()
    for _ in range(10):
        time.sleep(0.1)
        dog.beat()
    with dog.paused():
        time.sleep(0.8)
    time.sleep(0.2)
    dog.stop()
    assert expired == []
