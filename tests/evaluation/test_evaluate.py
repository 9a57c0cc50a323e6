"""`python -m pipeline.evaluate` on real digits shards: an exported encoder is found from a file, a checkpoint
folder or a run dir, loaded without DeepSpeed, and scored by kNN and a linear probe (top-1, top-5), printed and
written as JSON."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pipeline.engine.export import load_encoder, read_metadata, save_encoder
from pipeline.evaluate import find_encoder
from pipeline.evaluation.tsne_plot import PALETTE
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
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like every other file of a run (safetensors' own: 0600)
    run_dir = path.parents[2]
    assert find_encoder(str(path)) == find_encoder(str(path.parent)) == find_encoder(str(run_dir)) == path
    with pytest.raises(FileNotFoundError):
        find_encoder(str(run_dir / "nothing"))


@pytest.mark.slow
def test_evaluate_prints_and_writes_top1_and_top5(shards, exported, tmp_path):
    """An encoder of a run dir is evaluated on the run's data (its config.yaml: dataset, root, image size, stem; the
    default would be cifar10 under a cwd-relative data/), a command-line data key still wins, and the results go to
    the run dir and, as summary values, to the run's own W&B run (offline)."""
    import wandb

    _, path = exported
    run_dir = path.parents[2]
    OmegaConf.save({"data": {"dataset": "digits", "root": shards, "bank_split": "train", "test_split": "test",
                             "image_size": 32, "stem": "cifar"},
                    "logger": {"wandb_mode": "offline", "project": "augssl", "entity": None}}, run_dir / "config.yaml")
    wandb.init(project="augssl", id="evalrun1", dir=str(run_dir), mode="offline",
               settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False)).finish()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.evaluate", f"encoder={run_dir}",
                           "data.test_split=train", "linear.epochs=10", "data.loader.device=cpu", "tsne_points=150"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| deepspeed" not in proc.stderr  # -X importtime lists every module imported: DeepSpeed is not one
    assert f"run dir {run_dir}: data digits at {shards} (image size 32, stem cifar)" in proc.stdout
    results = json.loads((run_dir / "eval_digits_step7.json").read_text())
    assert results["encoder"] == str(path) and results["step"] == 7
    assert (results["train_samples"], results["test_samples"]) == (1438, 1438)  # data.test_split=train won
    assert results["knn"]["k"] == 20  # the digits entry's k, which the training monitor uses too
    for name, label in (("knn", "knn k=20"), ("linear", "linear")):
        top1, top5 = results[name]["top1"], results[name]["top5"]
        # even a random convolutional encoder separates the ten digits far above chance (0.1)
        assert 0.5 < top1 <= top5 <= 1.0, (name, results[name])
        assert f"{label:<12}{100 * top1:>8.2f}{100 * top5:>8.2f}" in proc.stdout
    assert "and to W&B run evalrun1 (summary)" in proc.stdout
    # the W&B run's offline records (protobuf) hold the summary keys with their JSON values
    records = b"".join(p.read_bytes() for p in run_dir.glob("wandb/offline-run-*-evalrun1/run-evalrun1.wandb"))
    assert b"eval/knn/top1" in records and json.dumps(results["knn"]["top1"]).encode() in records
    # the t-SNE map: 150 test points, one colour per digit class, beside the JSON and in the W&B summary
    plot = run_dir / "eval_digits_step7_tsne.png"
    assert results["tsne_points"] == 150 and f"written to {run_dir / 'eval_digits_step7.json'}, {plot}" in proc.stdout
    pixels = {tuple(p) for p in np.asarray(Image.open(plot).convert("RGB")).reshape(-1, 3)}
    assert {tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in PALETTE[:10]} <= pixels
    assert list(run_dir.glob("wandb/offline-run-*-evalrun1/files/media/images/eval/tsne_summary_*.png"))


@pytest.mark.slow
def test_the_aasae_protocol_trains_its_probe_on_reflect_padded_crops(shards, exported, tmp_path):
    """protocol=aasae on CIFAR-sized images: Nesterov SGD with a per-step cosine, and the training features recomputed
    every epoch from RandomCrop(32, padding 4, reflect) + flip views; the JSON says so. The features are standardised
    here: this encoder is untrained, and its raw features are too small for two epochs at lr 0.1 to leave chance."""
    _, path = exported
    output = tmp_path / "aasae.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.evaluate", f"encoder={path}", "data=digits",
                           f"data.root={shards}", "protocol=aasae", "protocols=[linear]", "linear.epochs=2",
                           "linear.features=standardized", f"output={output}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["protocol"]["name"] == "aasae" and "knn" not in results
    settings = results["protocol"]["linear"]
    assert (settings["features"], settings["nesterov"], settings["cosine_every"], settings["augment"]) == (
        "standardized", True, "step", "pad_crop_flip")
    assert 0.3 < results["linear"]["top1"] <= results["linear"]["top5"] <= 1.0


def test_without_scikit_learn_the_tsne_plot_is_refused_with_the_install_line(monkeypatch):
    """The line names the version the demo extra pins (pyproject.toml), so that it cannot drift from it."""
    import importlib.util
    import tomllib

    from pipeline.evaluation.tsne_plot import SklearnMissing, require_sklearn
    from tests.helpers import REPO

    (pin,) = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["demo"]
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "sklearn" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SklearnMissing) as refused:
        require_sklearn()
    assert str(refused.value) == (f"the t-SNE plot needs scikit-learn: pip install '{pin}' (the demo and test extras "
                                  "include it), or pass tsne=false")
