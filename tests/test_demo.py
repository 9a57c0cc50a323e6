"""`python -m pipeline.demo --quick` end to end: converts the digits set into an empty folder, trains AASAE and AAG
for two steps each through the real trainer entry point, evaluates each exported encoder, a random-init encoder and the
raw pixels, and prints and writes the table with every row; run again into the same folder, it reuses every finished
row instead of training or evaluating again. Two steps prove nothing about accuracy: whether the
self-supervised encoders beat random init is the full demo's claim (its printed table), not asserted here."""

import json
import os
import subprocess
import sys

import pytest

from pipeline.config.compose import load
from pipeline.demo import METHODS, NAMES, PAPER_METHODS, format_table, orderings, summarise, warnings_for
from tests.helpers import REPO

ROWS = [*PAPER_METHODS, "random_init", "raw_pixels"]


def test_quick_demo_converts_trains_evaluates_and_writes_the_table(tmp_path):
    data, out = tmp_path / "digits", tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pipeline.demo", "--quick", "--data-root", str(data), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert (data / "digits-train.manifest.json").is_file() and (data / "digits-test.manifest.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ROWS
    for name, row in rows.items():
        figures = row["results"]["default"]
        assert 0 < figures["linear_top1"] <= 100 and 0 < figures["knn_top1"] <= 100, row
        if name in PAPER_METHODS:
            assert row["pretrain_seconds"] > 0
            assert (out / name / "encoder.safetensors").is_file()
            assert (out / name / "config.yaml").is_file()
        else:
            assert row["pretrain_seconds"] is None
    # chance is 10%: the raw pixels of digits are far above it even with a 5-epoch probe
    assert rows["raw_pixels"]["results"]["default"]["linear_top1"] > 50
    assert (out / "random_init" / "encoder.safetensors").is_file()
    for name in ROWS:
        assert json.loads((out / f"eval_{name}.json").read_text())["test_samples"] == 359

    table = (out / "results.md").read_text()
    for name in ROWS:
        assert f"| {NAMES[name]} |" in table and f"| {NAMES[name]} |" in proc.stdout
    assert "written to" in proc.stdout

    again = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "pipeline.train" not in again.stdout
    assert [line.split(":")[0] for line in again.stdout.splitlines() if "reusing the finished row" in line] == [
        f"[demo] {name}" for name in ROWS]
    assert [r["results"] for r in json.loads((out / "results.json").read_text())["rows"]] == [
        r["results"] for r in results["rows"]]


@pytest.mark.parametrize("method", METHODS)
def test_every_demo_preset_composes_on_the_same_small_encoder(method):
    """The baselines (--baselines) train only in the full demo; their presets must at least compose, and every
    preset must build the architecture the random-init row is compared against."""
    cfg = load("train", [f"experiment=demo_{method}"])
    assert cfg.method.name == method and cfg.data.dataset == "digits"
    assert (cfg.backbone.arch, cfg.data.stem, cfg.backbone.width) == ("resnet_small", "cifar", 1)
    assert cfg.data.loader.device == "cpu" and cfg.logger.wandb_mode == "disabled"


def row(method: str, seed: int | None, linear: dict[str, float], knn: float = 90.0, seconds: float | None = 60.0):
    return {"method": method, "seed": seed, "pretrain_seconds": seconds,
            "results": {p: {"linear_top1": v, "knn_top1": knn, "knn_k": 200} for p, v in linear.items()}}


def test_one_seed_table_and_warning_lines():
    rows = [row("aasae", None, {"default": 95.0}, 96.0, 80.4), row("aag", None, {"default": 90.0}, 91.0, 70.0),
            row("random_init", None, {"default": 93.0}, 92.0, None)]
    summary = summarise(rows, ["default"])
    table = format_table(summary, ["default"], {"default": 20}).splitlines()
    assert table[0] == "| method | linear top-1 (default) | kNN top-1 k=20 (default) | pretrain s |"
    assert table[2] == "| AASAE | 95.00 | 96.00 | 80 |"
    assert table[4] == "| random-init encoder | 93.00 | 92.00 | - |"
    assert warnings_for(summary, ["default"]) == [
        "WARNING: AAG linear top-1 90.00 (default protocol) does not beat the random-init encoder (93.00)"]


def test_seeds_give_mean_and_spread_and_each_ordering_is_judged_per_protocol():
    """Three seeds: AASAE beats the VAE under aasae's protocol and not under aag's; AAG ties SimCLR (>= holds)."""
    linear = {"aasae": [(97.0, 95.0), (98.0, 95.0), (99.0, 95.0)], "vae": [(96.0, 96.0)] * 3,
              "aag": [(94.0, 94.0)] * 3, "simclr": [(94.0, 94.0)] * 3}
    rows = [row(m, s, {"aasae": a, "aag": b}) for m, seeds in linear.items() for s, (a, b) in enumerate(seeds)]
    rows.append(row("random_init", None, {"aasae": 90.0, "aag": 90.0}, seconds=None))
    summary = summarise(rows, ["aasae", "aag"])
    assert summary["aasae"]["seeds"] == 3 and summary["random_init"]["seeds"] == 1
    assert summary["aasae"]["aasae"]["linear_top1"] == (98.0, 1.0)  # mean, sample sd
    table = format_table(summary, ["aasae", "aag"], {"aasae": 20, "aag": 200}).splitlines()
    assert table[2] == "| AASAE | 98.00 ± 1.00 | 90.00 ± 0.00 | 95.00 ± 0.00 | 90.00 ± 0.00 | 60 |"
    assert orderings(summary, ["aasae", "aag"]) == [
        "AASAE > VAE (baseline) on the linear probe (aasae protocol): 98.00 ± 1.00 vs 96.00 ± 0.00 over 3 seed(s): "
        "holds",
        "AASAE > VAE (baseline) on the linear probe (aag protocol): 95.00 ± 0.00 vs 96.00 ± 0.00 over 3 seed(s): "
        "DOES NOT HOLD",
        "AAG >= SimCLR (baseline) on the linear probe (aasae protocol): 94.00 ± 0.00 vs 94.00 ± 0.00 over 3 seed(s): "
        "holds",
        "AAG >= SimCLR (baseline) on the linear probe (aag protocol): 94.00 ± 0.00 vs 94.00 ± 0.00 over 3 seed(s): "
        "holds"]
