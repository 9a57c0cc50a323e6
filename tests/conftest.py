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
# Subprocesses (torchrun workers, Slurm jobs, the simulated pods) find this environment's tools first, as the pods
# always did: DeepSpeed JIT-builds its CPU op with the first `ninja` on PATH, and the venv's (1.13) and a system one
# (1.11) hash the same build command differently, so the op was rebuilt (a minute or two on 2 cores) whenever jobs
# that found different ones took turns.
_bin = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _bin:
    os.environ["PATH"] = os.pathsep.join(filter(None, [_bin, os.environ.get("PATH")]))
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


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory):
    """The programs the tests start keep their temporary files in this session's temporary folder, which pytest
    prunes, not in /tmp: torchrun leaves a /tmp/torchelastic_* folder behind each time it is killed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        yield
