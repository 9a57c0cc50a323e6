"""A checkpoint that cannot be written, for real: the run dir on a small tmpfs filled up while training runs (root
only: mounting needs CAP_SYS_ADMIN), or a file size limit (RLIMIT_FSIZE) set on the running trainer. Either way the
run stops with exit 5 and one line naming the step, the folder, the reason and the checkpoint that is kept;
status.json records it; nothing of the failed checkpoint is left; keep_last=1 never pruned the kept one, which
still verifies."""

import os
import resource
import shutil
import subprocess
import sys
import time

import pytest

from pipeline.engine.checkpoint import Checkpoints
from pipeline.engine.run_status import read_status
from tests.helpers import REPO

RUN = ["experiment=smoke", "method=aasae", "method.hidden_dim=64", "logger=none", "logger.progress_bar=false",
       "monitor.knn_every_epochs=0", "checkpoint.every_steps=3", "checkpoint.keep_last=1", "max_steps=9",
       "export_encoder=false"]
ROOM = 2 << 20  # bytes a write may still take once limited: enough for status.json, far less than a checkpoint


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(folder):
    """Takes all but ROOM bytes of the filesystem of `folder`."""
    with open(folder / "filler", "wb") as f:
        for _ in range((shutil.disk_usage(folder).free - ROOM) >> 20):
            f.write(bytes(1 << 20))


@pytest.mark.slow
@pytest.mark.parametrize("fault, reason", [("disk full", "no space left on device"),
                                           ("file size limit", "a file would exceed the file size limit (ulimit -f)")])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_previous_one(shards, tmp_path, request,
                                                                                      fault, reason):
    if fault == "disk full":
        mount = request.getfixturevalue("tmpfs")
        run_dir, limit = mount / "run", lambda proc: fill(mount)
    else:
        run_dir, limit = tmp_path / "run", lambda proc: resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (ROOM, ROOM))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *RUN, f"data.root={shards}", f"run_dir={run_dir}"],
                            cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints" / "step000000003" / "COMPLETE.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.005)
        limit(proc)  # the next checkpoint, step 6, is 3 steps and a loader restart away
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()  # no-op once it has exited; else the tmpfs could not be unmounted

    line = (f"checkpoint at step 6 could not be written to {run_dir / 'checkpoints'}: {reason}; the previous "
            f"checkpoint (step 3) is kept")
    assert proc.returncode == 5, out[-4000:]
    assert line in out and "Traceback" not in out, out[-4000:]
    status = read_status(run_dir)
    assert (status["status"], status["exit_code"], status["step"]) == ("failed", 5, 6), status
    assert status["reason"].startswith(line), status
    assert not (run_dir / "checkpoints" / "step000000006").exists()
    kept = Checkpoints(run_dir, {})
    assert kept.complete_tags() == ["step000000003"] and kept.verify("step000000003") is None
