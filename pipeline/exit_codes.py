"""The exit statuses of augssl's programs, in one place, because schedulers act on them (docs/exit-codes.md):

    0    FINISHED         the run finished. From the trainer itself also: stopped cleanly after a checkpoint on
                          SIGTERM/SIGUSR1 (run_dir/status.json says which); the launch wrappers turn "stopped"
                          into 143, so that the run is resumed instead of counted as finished
    1    ERROR            any other failure (Python's status for an uncaught exception): a crash or an
                          infrastructure fault (a DALI reader worker that died, no progress for dist.timeout_s);
                          a retry may help
    2    BAD_CONFIG       bad configuration or command line: a user error, do not retry
    3    NON_FINITE_LOSS  a loss was NaN/inf: do not retry blindly, the same step would fail again
    4    BAD_DATA         unusable input data: fix the data, do not retry
    5    STORAGE_FULL     a checkpoint could not be written (no space left, quota or file size limit reached); the
                          previous checkpoint is kept: make room, then resume; a retry without that fails again
    143  STOPPED          stopped, to be resumed (128 + SIGTERM): what docker/entrypoint.sh and slurm/common.sh exit
                          with for a run that stopped before its end; the trainer's own when a stop signal found it
                          blocked (in a collective, a wait) for dist.stop_grace_s

torchrun reports any failed worker as 1, so `exit_with` also writes the code to $AUGSSL_EXIT_FILE when a wrapper
sets it (docker/entrypoint.sh exits with it, so a Kubernetes Job's podFailurePolicy can fail the job at once).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

from pipeline.engine.run_status import replace_atomically

FINISHED = 0
ERROR = 1
BAD_CONFIG = 2
NON_FINITE_LOSS = 3
BAD_DATA = 4
STORAGE_FULL = 5
STOPPED = 143


def exit_with(code: int) -> NoReturn:
    """Exits with a status the launcher must see even through torchrun (see the module docstring)."""
    path = os.environ.get("AUGSSL_EXIT_FILE")
    if path:
        replace_atomically(Path(path), f"{code}\n")  # ranks of a pod may write at the same time
    sys.exit(code)
