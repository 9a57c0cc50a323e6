"""Multi-process tests run a worker script under torchrun (gloo on the CPU), with this checkout importable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def environment() -> dict[str, str]:
    """The test's environment, one thread per process (2 cores), with the repository on PYTHONPATH."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_ranks(script: str | Path, world: int, *args: str, timeout: float = 400) -> None:
    """`torchrun --standalone --nproc_per_node WORLD SCRIPT ARGS...`, which must succeed (its output shown if not)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=environment())
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
