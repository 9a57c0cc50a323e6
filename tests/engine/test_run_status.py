"""run_dir/status.json, which the launch wrappers read to learn how a run ended: written atomically, and a missing
or damaged file reads as a clear answer (None, or one line naming the file), never a traceback in a shell script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.engine import run_status
from pipeline.engine.run_status import StatusError, read_status, write_status
from tests.helpers import REPO


def cli(run_dir: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pipeline.engine.run_status", str(run_dir), *options], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


def test_write_then_read(tmp_path):
    write_status(tmp_path, "failed", step=7, total_steps=20, attempt_started="2025-01-01T00:00:00+00:00",
                 reason="non-finite loss at step 8", exit_code=3)
    status = read_status(tmp_path)
    assert {k: status[k] for k in ("status", "step", "total_steps", "reason", "exit_code", "attempt_started")} == {
        "status": "failed", "step": 7, "total_steps": 20, "reason": "non-finite loss at step 8", "exit_code": 3,
        "attempt_started": "2025-01-01T00:00:00+00:00"}
    assert status["updated"] >= status["attempt_started"]
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left behind
    assert cli(tmp_path).stdout == "failed 3\n"


def test_a_write_that_fails_leaves_the_previous_status_whole(tmp_path, monkeypatch):
    write_status(tmp_path, "done", step=20, total_steps=20, attempt_started=run_status.now())

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(run_status.os, "replace", crash)
    with pytest.raises(OSError):
        write_status(tmp_path, "running", step=20, total_steps=20, attempt_started=run_status.now())
    assert read_status(tmp_path)["status"] == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_an_unknown_state_is_refused(tmp_path):
    with pytest.raises(ValueError, match="choose from running, done, stopped, failed"):
        write_status(tmp_path, "finished", step=1, total_steps=1, attempt_started=run_status.now())


def test_a_missing_status_reads_as_none(tmp_path):
    assert read_status(tmp_path) is None
    proc = cli(tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "missing\n", "")


@pytest.mark.parametrize("text", ['{"status": "do', '["done"]', '{"status": "finished", "exit_code": 0}',
                                  '{"status": "failed", "exit_code": "3"}', '{"status": "failed", "exit_code": true}',
                                  "\xff\xfe"])
def test_a_damaged_status_is_named_in_one_line(tmp_path, text):
    (tmp_path / "status.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(StatusError, match=str(tmp_path / "status.json")):
        read_status(tmp_path)
    proc = cli(tmp_path)
    assert proc.returncode == 0 and proc.stdout == "unreadable\n"
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_the_status_is_json_for_other_tools(tmp_path):
    write_status(tmp_path, "stopped", step=4, total_steps=20, attempt_started=run_status.now(),
                 reason="stop signal (SIGTERM)")
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "stopped"
    assert cli(tmp_path).stdout == "stopped\n"


def test_a_status_older_than_the_attempt_is_stale(tmp_path):
    """A launcher's start mark newer than status.json: the status is an earlier attempt's, whatever it says."""
    write_status(tmp_path, "done", step=3, total_steps=3, attempt_started=run_status.now())
    mark = tmp_path / ".attempt"
    mark.touch()
    os.utime(tmp_path / "status.json", ns=(mark.stat().st_mtime_ns - 10**9,) * 2)
    assert cli(tmp_path, "--since", str(mark)).stdout == "stale\n"
    os.utime(mark, ns=(mark.stat().st_mtime_ns - 2 * 10**9,) * 2)
    assert cli(tmp_path, "--since", str(mark)).stdout == "done\n"
    mark.unlink()
    proc = cli(tmp_path, "--since", str(mark))
    assert proc.stdout == "stale\n" and "start mark" in proc.stderr
    assert cli(tmp_path / "nowhere", "--since", str(mark)).stdout == "missing\n"
