"""Nothing hangs when a peer stops answering: two trainers started by hand (RANK, WORLD_SIZE, MASTER_*; no torchrun
to tear them down), one frozen mid-run with SIGSTOP (as a hung node or a network partition looks: its sockets stay
open, so no connection reset tells the other). The other fails within dist.timeout_s, recording why, instead of
waiting in its next collective for torch's default 30 minutes. (A peer killed outright on the same host is noticed
at once through the reset connection.)"""

import json
import os
import signal
import subprocess
import sys
import time

from tests.helpers import REPO
from tests.helpers.processes import free_port

TIMEOUT_S = 12


def test_a_rank_whose_peer_hangs_fails_within_the_timeout(shards, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    args = [sys.executable, "-m", "pipeline.train", "experiment=smoke", "method=aag", f"data.root={shards}",
            f"run_dir={run_dir}", "logger=none", "logger.progress_bar=false", "logger.log_every_steps=1",
            "monitor.knn_every_epochs=0", "checkpoint.every_steps=0", f"dist.timeout_s={TIMEOUT_S}"]
    ranks = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
            assert all(r.poll() is None for r in ranks), ranks[0].communicate()[0][-3000:]
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        ranks[0].wait(timeout=TIMEOUT_S + 60)
        assert ranks[0].returncode != 0
        assert time.monotonic() - frozen < TIMEOUT_S + 40
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "failed" and status["exit_code"] == 1, status
    finally:
        for r in ranks:
            if r.poll() is None:
                os.killpg(r.pid, signal.SIGKILL)
            r.communicate()
