"""A trainer blocked in a wait that does not end by itself still ends, promptly and saying why, keeping its last
checkpoint: a DALI reader worker killed mid-run (the OOM killer's way) ends the run with exit 1 naming the worker, not
the data; SIGTERM to a rank blocked in a collective (its peer frozen with SIGSTOP, as test_peer_death does) ends it
with exit 143 within dist.stop_grace_s, although the signal's Python handler cannot run there."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.engine.checkpoint import Checkpoints
from tests.helpers import REPO
from tests.helpers.processes import descendants, free_port, running

RUN = ["experiment=smoke", "method=aasae", "method.hidden_dim=64", "logger=none", "logger.progress_bar=false",
       "logger.log_every_steps=1", "monitor.knn_every_epochs=0", "max_steps=1000"]
GRACE_S = 5


def trainer(shards, run_dir: Path, *extra: str, env: dict | None = None, stderr=subprocess.STDOUT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *RUN, f"data.root={shards}", f"run_dir={run_dir}",
                             *extra], cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=stderr,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen]) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, procs[0].communicate()[0][-3000:]
        time.sleep(0.05)


def newest_checkpoint_is_intact(run_dir: Path) -> int:
    tags = Checkpoints(run_dir, {}).complete_tags()
    assert tags and Checkpoints(run_dir, {}).verify(tags[-1]) is None
    return int(tags[-1][4:])


def expect_no_process_left(pids: set[int]) -> None:
    deadline = time.monotonic() + 10
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if running(p)]


def test_a_killed_reader_worker_ends_the_run_naming_it(shards, tmp_path):
    """Usually the wait for the batch fails at once and the trainer checkpoints the step first. A worker killed
    while it held the pool's shared lock leaves the main loop blocked in Python's condition instead: then the
    watchdog ends the run after dist.stop_grace_s, with the same reason, keeping the last periodic checkpoint."""
    run_dir = tmp_path / "run"
    proc = trainer(shards, run_dir, "data.loader.read_workers=2", "checkpoint.every_steps=5",
                   f"dist.stop_grace_s={GRACE_S}", stderr=subprocess.PIPE)
    try:
        wait_for_step(run_dir, 6, [proc])
        command = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        run = descendants(proc.pid)
        workers = sorted(p for p in run if Path(f"/proc/{p}/cmdline").read_bytes() == command)  # forked by DALI
        assert len(workers) == 2, run
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - killed
        print(f"ended {took:.1f} s after the kill")
        reason = f"DALI reader worker {workers[0]} of rank 0 died (SIGKILL: out of memory?)"
        assert proc.returncode == 1 and took < GRACE_S + 10, out[-3000:] + err[-3000:]
        assert reason in err and "Traceback" not in out + err and "DALI failed" not in out + err, err[-3000:]
        status = json.loads((run_dir / "status.json").read_text())
        assert (status["status"], status["exit_code"], status["reason"][: len(reason)]) == ("failed", 1, reason)
        saved = newest_checkpoint_is_intact(run_dir)
        if "did not stop within dist.stop_grace_s" not in status["reason"]:
            assert saved == status["step"] >= 6  # the main loop stopped: saved at the step the worker died in
        else:
            assert saved >= 5 and status["step"] >= 6  # the watchdog ended it: the last periodic checkpoint kept
        expect_no_process_left(run)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_sigterm_to_a_rank_blocked_in_a_collective_exits_143_within_the_grace(shards, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    ranks = [trainer(shards, run_dir, "checkpoint.every_steps=2", "dist.timeout_s=300", f"dist.stop_grace_s={GRACE_S}",
                     env={"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(2)]
    try:
        wait_for_step(run_dir, 3, ranks)
        ranks[1].send_signal(signal.SIGSTOP)  # rank 0 blocks in its next collective, in C++, for dist.timeout_s
        time.sleep(1)
        run = descendants(ranks[0].pid)
        ranks[0].send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        out, _ = ranks[0].communicate(timeout=60)
        took = time.monotonic() - signalled
        print(f"ended {took:.1f} s after SIGTERM (dist.stop_grace_s={GRACE_S})")
        assert ranks[0].returncode == 143 and took < GRACE_S + 5, out[-3000:]
        status = json.loads((run_dir / "status.json").read_text())
        assert (status["status"], status["exit_code"]) == ("stopped", 143), status
        assert status["reason"].startswith("SIGTERM while blocked in "), status
        assert status["reason"] in out
        newest_checkpoint_is_intact(run_dir)
        expect_no_process_left(run)
    finally:
        for r in ranks:
            if r.poll() is None:
                os.killpg(r.pid, signal.SIGKILL)
            r.communicate()
