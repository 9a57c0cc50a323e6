import os
import subprocess
import sys
from pathlib import Path

import pytest

# One thread per process: the suite runs on 2 cores, often beside torchrun workers, and oversubscribed torch
# threads make it several times slower. Set before any test imports torch; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite runs on the CPU (gloo) also on a GPU machine, so that it passes there unchanged; tests marked for a GPU
# ask for CUDA themselves. DeepSpeed picks its accelerator when first imported, so it is told here too.
os.environ.setdefault("AUGSSL_DEVICE", "cpu")
if os.environ["AUGSSL_DEVICE"] == "cpu":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _digits_shards(out: Path, *options: str) -> None:
    """The embedded digits set converted by tools/make_shards.py."""
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "tools" / "make_shards.py"), "digits", "--out", str(out), "--quiet",
                    *options], check=True, cwd=repo, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """Digits shards with make_shards' default options, converted once for the session."""
    out = tmp_path_factory.mktemp("shards")
    _digits_shards(out)
    return str(out)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """Digits shards of 500 samples (train: 3 shards), for the launch tests' multi-process jobs; once per session."""
    out = tmp_path_factory.mktemp("digits")
    _digits_shards(out, "--samples-per-shard", "500")
    return out
