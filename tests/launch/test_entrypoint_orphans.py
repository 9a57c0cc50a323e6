"""docker/entrypoint.sh killed outright (SIGKILL, as a test or a user running it outside a container does; in a pod
the whole container would go): the stop-file watcher it forked ends within a poll instead of polling forever."""

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import REPO
from tests.helpers.processes import running


def test_the_stop_file_watcher_ends_when_the_entrypoint_is_killed(tmp_path):
    env = {"PATH": os.environ["PATH"], "RUN_DIR": str(tmp_path), "AUGSSL_STOP_POLL_SECONDS": "0.2"}
    entry = subprocess.Popen([str(REPO / "docker" / "entrypoint.sh"), "sleep", "30"], env=env, cwd=REPO)
    children_file = Path(f"/proc/{entry.pid}/task/{entry.pid}/children")
    deadline = time.monotonic() + 10
    while len(children_file.read_text().split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    children = [int(pid) for pid in children_file.read_text().split()]
    watcher = [pid for pid in children if b"entrypoint.sh" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(children) == 2 and len(watcher) == 1, children
    try:
        entry.kill()
        entry.wait()
        deadline = time.monotonic() + 5
        while running(watcher[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(watcher[0]), f"the watcher {watcher[0]} still runs"
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
