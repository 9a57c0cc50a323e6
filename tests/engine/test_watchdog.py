"""The watchdog ends a process whose main thread cannot end it, after recording why: no progress (exit 1), a stop
signal the main loop does not act on (exit 143), a dead reader worker (it names the worker and kills the others, so
that the main loop's wait ends). It leaves a beating, paused, or stopping one alone."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time

from pipeline.engine.stop_signals import StopSignals
from pipeline.engine.watchdog import Watchdog

RECORD = "lambda *end: print('recorded:', *end, flush=True)"
STUCK = f"""
import time
from pipeline.engine.watchdog import Watchdog
Watchdog(1.0, {RECORD}, poll_s=0.1).start()
time.sleep(30)  # a wait that never ends (a spinning all-reduce)
"""
# SIGTERM blocked in the main thread goes to another one, whose C-level handler writes the wake-up pipe; the main
# thread never runs the Python handler, as when it is blocked in C++ (a collective)
BLOCKED = f"""
import signal, time
from pipeline.engine.stop_signals import StopSignals
from pipeline.engine.watchdog import Watchdog
signals = StopSignals().install()
Watchdog(60, {RECORD}, grace_s=1.0, signals=signals, poll_s=0.1).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})
print("ready", flush=True)
time.sleep(30)
"""
STOPPING = f"""
import os, signal, time
from pipeline.engine.stop_signals import StopSignals
from pipeline.engine.watchdog import Watchdog
signals = StopSignals().install()
dog = Watchdog(60, {RECORD}, grace_s=0.5, signals=signals, poll_s=0.1).start()
with dog.paused():  # a checkpoint running Python: its handler runs, the watchdog waits for the end of the phase
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.5)
signals.agreed = True  # the ranks agreed to stop: the main loop checkpoints
time.sleep(1.5)
print("stopped by the main loop", signals.received, flush=True)
"""


def python(script: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - started


def test_a_stuck_process_is_ended_with_status_1_after_recording_why():
    proc, took = python(STUCK)
    assert proc.returncode == 1 and took < 15
    assert "recorded: failed no training progress for 1 s (dist.timeout_s=1), blocked in <module> (<string>:5) 1" \
        in proc.stdout


def test_a_stop_signal_the_main_thread_cannot_handle_ends_it_with_143():
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.monotonic() - signalled < 5
    assert "recorded: stopped SIGTERM while blocked in <module> (<string>:9) 143" in out


def test_a_stop_the_main_loop_acts_on_is_left_to_it():
    proc, _ = python(STOPPING)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "stopped by the main loop SIGTERM\n"


def test_a_forked_worker_does_not_signal_for_the_trainer():
    signals = StopSignals().install()
    try:
        pid = os.fork()
        if pid == 0:  # as DALI's reader workers are started, and stopped with SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)
        os.waitpid(pid, 0)
        assert signals.arrived() is None and signals.received is None
    finally:
        signals.uninstall()


def test_a_dead_worker_is_named_and_the_others_killed():
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=time.sleep, args=(30,)) for _ in range(3)]
    for w in workers:
        w.start()
    dog = Watchdog(60, None, workers=lambda: workers, rank=2, poll_s=0.05).start()
    try:
        workers[2].terminate()  # SIGTERM: a stop, as DALI closes a stream; not a death to report
        workers[2].join()
        assert not dog.worker_died.wait(0.5)
        os.kill(workers[1].pid, signal.SIGKILL)
        assert dog.worker_died.wait(5)
        assert dog.dead_worker == f"DALI reader worker {workers[1].pid} of rank 2 died (SIGKILL: out of memory?)"
        workers[0].join(5)
        assert workers[0].exitcode == -signal.SIGKILL
    finally:
        dog.stop()
        for w in workers:
            w.kill()


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
