"""`python -m pipeline.evaluate` on real digits shards: an exported encoder is found from a file, a checkpoint
folder or a run dir, loaded without DeepSpeed, and scored by kNN and a linear probe (top-1, top-5), printed and
written as JSON."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.engine.export import load_encoder, read_metadata, save_encoder
from pipeline.evaluate import find_encoder
from pipeline.models.resnet import ResNet
from tests.helpers import REPO


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    encoder = ResNet("resnet_small", stem="cifar")
    folder = tmp_path / "run" / "checkpoints" / "step000000007"
    folder.mkdir(parents=True)
    (folder / "COMPLETE.json").write_text("{}")
    path = save_encoder({k: v.clone() for k, v in encoder.state_dict().items()}, encoder,
                        folder / "encoder.safetensors", step=7)
    return encoder.eval(), path


def test_export_round_trip_and_encoder_lookup(exported):
    encoder, path = exported
    loaded = load_encoder(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))
    assert read_metadata(path)["step"] == "7" and loaded.out_dim == encoder.out_dim
    run_dir = path.parents[2]
    assert find_encoder(str(path)) == find_encoder(str(path.parent)) == find_encoder(str(run_dir)) == path
    with pytest.raises(FileNotFoundError):
        find_encoder(str(run_dir / "nothing"))


@pytest.mark.slow
def test_evaluate_prints_and_writes_top1_and_top5(shards, exported, tmp_path):
    _, path = exported
    output = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "data=digits", f"data.root={shards}",
                           f"encoder={path.parents[2]}", "linear.epochs=10", "data.loader.device=cpu",
                           f"output={output}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["encoder"] == str(path) and results["step"] == "7"
    assert (results["train_samples"], results["test_samples"]) == (1438, 359)
    assert results["knn"]["k"] == 20  # the digits entry's k, which the training monitor uses too
    for name, label in (("knn", "knn k=20"), ("linear", "linear")):
        top1, top5 = results[name]["top1"], results[name]["top5"]
        # even a random convolutional encoder separates the ten digits far above chance (0.1)
        assert 0.5 < top1 <= top5 <= 1.0, (name, results[name])
        assert f"{label:<12}{100 * top1:>8.2f}{100 * top5:>8.2f}" in proc.stdout
