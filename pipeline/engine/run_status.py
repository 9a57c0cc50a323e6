"""run_dir/status.json: how the latest attempt of a run ended, written by the trainer (rank 0) so that the launch
wrappers (docker/entrypoint.sh, slurm/common.sh) read the outcome instead of guessing it from other files.

    {"status": "running" | "done" | "stopped" | "failed", "step": 120, "total_steps": 400, "reason": "",
     "exit_code": 0, "attempt_started": "2025-01-31T12:00:00+00:00", "updated": "2025-01-31T12:40:00+00:00"}

"running" is written when training starts, so that a "done" left by an earlier attempt is never taken for the
outcome of a later one that crashed; the wrappers also ignore a file older than their own start. `exit_code` is what
the trainer exits with (pipeline/exit_codes.py). The file is replaced atomically: a reader on another node sees the
old status or the new one, never half of one.

    python -m pipeline.engine.run_status RUN_DIR [--since MARK]

prints the status word for shell scripts ("failed" followed by its exit code, e.g. "failed 3"), or "missing" when
there is no status.json, "unreadable" (with the reason on stderr) when it is not a status, and "stale" when it is
not newer than the file MARK, which a launcher touches when it starts an attempt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

FILE = "status.json"
STATES = ("running", "done", "stopped", "failed")


class StatusError(ValueError):
    """status.json exists but is not a status written by write_status."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def replace_atomically(path: Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path` and renames it over `path`: readers, and other processes
    writing the same file, never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_status(run_dir: Path | str, status: str, *, step: int, total_steps: int, attempt_started: str,
                 reason: str = "", exit_code: int = 0) -> None:
    if status not in STATES:
        raise ValueError(f"run status {status!r}: choose from {', '.join(STATES)}")
    record = {"status": status, "step": int(step), "total_steps": int(total_steps), "reason": reason,
              "exit_code": int(exit_code), "attempt_started": attempt_started, "updated": now()}
    replace_atomically(Path(run_dir) / FILE, json.dumps(record) + "\n")


def read_status(run_dir: Path | str) -> dict | None:
    """The run's status, or None when it has none (never started, or trained before status.json existed); raises
    StatusError naming the file when it is not a status."""
    path = Path(run_dir) / FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StatusError(f"{path} is unreadable: {err}") from err
    code = record.get("exit_code") if isinstance(record, dict) else None
    if (not isinstance(record, dict) or record.get("status") not in STATES or not isinstance(code, int)
            or isinstance(code, bool)):  # JSON's true is a Python int too
        raise StatusError(f"{path} is not a run status (expected a JSON object with a status of "
                          f"{', '.join(STATES)} and an integer exit_code)")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.engine.run_status",
                                     description="Print the status word of RUN_DIR/status.json for shell scripts.")
    parser.add_argument("run_dir")
    parser.add_argument("--since", metavar="FILE", help='print "stale" unless status.json is newer than FILE (the '
                        "launcher's start mark, compared by the run directory's clock like `test -nt`)")
    args = parser.parse_args(argv)
    path = Path(args.run_dir) / FILE
    if args.since and path.exists():
        try:
            stale = path.stat().st_mtime_ns <= Path(args.since).stat().st_mtime_ns
        except FileNotFoundError:
            print(f"run_status: the start mark {args.since} is missing: {path} counts as stale", file=sys.stderr)
            stale = True
        if stale:
            print("stale")
            return
    try:
        record = read_status(args.run_dir)
    except StatusError as err:
        print(f"run_status: {err}", file=sys.stderr)
        print("unreadable")
        return
    if record is None:
        print("missing")
    elif record["status"] == "failed":
        print(f"failed {record['exit_code']}")
    else:
        print(record["status"])


if __name__ == "__main__":
    main()
