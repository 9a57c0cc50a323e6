"""`compile=true`: the method's forward goes through torch.compile (DeepSpeed's engine.compile) and trains with the
losses of the eager run. The `aot_eager` backend traces forward and backward as inductor would but generates no
code, so the test takes seconds rather than the minutes inductor needs on a CPU."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.helpers.torchrun import environment


def losses(shards, run_dir, *extra: str) -> tuple[list[float], str]:
    args = ["experiment=smoke", "method=aag", f"data.root={shards}", f"run_dir={run_dir}", "logger=none",
            "logger.log_every_steps=1", "logger.progress_bar=false", "monitor.knn_every_epochs=0", "max_steps=3",
            "checkpoint.every_steps=0", *extra]
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=environment(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["ssl_loss"] for r in rows if "ssl_loss" in r], proc.stdout


@pytest.mark.slow
def test_a_compiled_run_trains_with_the_eager_losses(shards, tmp_path):
    eager, _ = losses(shards, tmp_path / "eager")
    compiled, log = losses(shards, tmp_path / "compiled", "compile=true", "compile_backend=aot_eager")
    assert "compiled the method's forward with torch.compile (backend aot_eager)" in log
    assert len(compiled) == len(eager) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)
