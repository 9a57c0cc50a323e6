"""Nothing is left behind: SIGKILL to the trainer (the OOM killer's way) or to make_shards ends their worker
processes too (DALI's readers, the conversion pool) within 10 s, instead of leaving them re-parented and waiting."""

import json
import os
import signal
import subprocess
import sys
import time

from tests.helpers import REPO
from tests.helpers.processes import descendants, running


def kill_and_expect_no_workers(proc: subprocess.Popen) -> None:
    workers = descendants(proc.pid)
    assert workers, "the program had no worker processes to leave behind"
    try:
        proc.kill()  # the program alone, not its process group
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(running(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in workers if running(p)]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left, so that a failure leaks nothing either


def test_killing_the_trainer_ends_its_dali_workers(shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", "experiment=smoke", "method=aag",
                             f"data.root={shards}", f"run_dir={run_dir}", "logger=none", "logger.progress_bar=false",
                             "logger.log_every_steps=1", "monitor.knn_every_epochs=0", "data.loader.read_workers=2"],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None and json.loads(metrics.read_text().splitlines()[0])["step"] >= 1
    kill_and_expect_no_workers(proc)


def test_killing_make_shards_ends_its_pool(tmp_path):
    proc = subprocess.Popen([sys.executable, "tools/make_shards.py", "digits", "--split", "train", "--out",
                             str(tmp_path / "out"), "--samples-per-shard", "10", "--workers", "2", "--verify",
                             "--quiet"], cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(descendants(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None
    kill_and_expect_no_workers(proc)
