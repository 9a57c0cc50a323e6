"""The benchmark tools run and print their tables (tiny CPU runs; the figures themselves are not checked)."""

from __future__ import annotations

import pytest
import torch

from tools import bench_loader, bench_reshard, bench_train


def test_bench_loader_times_aag_views_without_a_reference(tmp_path, capsys):
    figures = bench_loader.run(["--synthetic", "96", "--images", "128", "--batch", "32", "--method", "aag",
                                "--rounds", "1", "--seconds", "0.2", "--warmup", "1", "--threads", "1",
                                "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert "no PIL reference for RandAugment views (w)" in out
    assert "DALI loader:       best" in out
    assert figures["dali_best"] > 0 and figures["dali_startup_s"] > 0 and "ratio" not in figures


@pytest.mark.slow
def test_bench_train_one_rank(shards, tmp_path, capsys):
    rows = bench_train.run(["--shards", shards, "--ranks", "1", "--stages", "0", "--batch", "8", "--steps", "1",
                            "--warmup", "1", "--device", "cpu", "--json", str(tmp_path / "rows.json")])
    out = capsys.readouterr().out
    assert "1 rank(s) on cpu" in out and "input eff." in out
    assert rows[0]["world_size"] == 1 and rows[0]["real_samples_per_s"] > 0
    assert (tmp_path / "rows.json").exists()


@pytest.mark.parametrize(("argv", "says"), [
    (["--manifest", "/nowhere/x-train.manifest.json"], "bench_loader: manifest not found: /nowhere/x-train.manifest."),
    (["--synthetic", "96", "--device", "cuda"], "bench_loader: device=cuda, but torch sees no CUDA device"),
    (["--synthetic", "96", "--device", "banana"], "bench_loader: device='banana': choose one of auto, cpu, cuda"),
])
def test_bench_loader_input_it_cannot_use_is_one_line_and_exit_2(argv, says, capsys, monkeypatch):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("AUGSSL_DEVICE")  # the suite's own setting would override --device
    with pytest.raises(SystemExit) as exit:
        bench_loader.run([*argv, "--images", "64", "--batch", "16", "--rounds", "1", "--seconds", "0.1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(says), err


@pytest.mark.parametrize("option", ["--batch", "--threads", "--readers", "--rounds", "--seconds", "--images"])
def test_bench_loader_refuses_counts_below_1(option, capsys):
    with pytest.raises(SystemExit) as exit:
        bench_loader.parse_args(["--synthetic", "96", option, "0" if option != "--images" else "-5"])
    assert exit.value.code == 2 and f"argument {option}: invalid" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "says"), [
    (["--dataset", "nope"], "bench_train: In 'train': Could not find 'data/nope'"),
    (["--backbone", "nope"], "bench_train: In 'train': Could not find 'backbone/nope'"),
    (["--batch", "7"], "bench_train: data.batch_size=7"),
    (["--override", "optimzer.lr=1"], "bench_train: unknown config key 'optimzer'"),
])
def test_bench_train_refuses_a_config_that_cannot_run_before_starting_torchrun(shards, extra, says, capsys):
    assert bench_train.main(["--shards", shards, "--ranks", "2", "--stages", "0", *extra]) == 2
    assert capsys.readouterr().err.startswith(says)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a GPU that is not there")
def test_bench_train_refuses_a_missing_gpu_before_starting_torchrun(shards, capsys, monkeypatch):
    monkeypatch.delenv("AUGSSL_DEVICE", raising=False)  # the suite's own override to the CPU
    assert bench_train.main(["--shards", shards, "--device", "cuda", "--stages", "0"]) == 2
    assert capsys.readouterr().err.startswith("bench_train: device=cuda, but torch sees no CUDA device")


def test_bench_train_refuses_more_ranks_than_gpus_and_cpu_ranks_sharing_batchnorm(shards, capsys, monkeypatch):
    monkeypatch.delenv("AUGSSL_DEVICE", raising=False)
    with monkeypatch.context() as one_gpu:  # what torch says on a machine with one GPU, without touching CUDA
        one_gpu.setattr(torch.cuda, "is_available", lambda: True)
        one_gpu.setattr(torch.cuda, "device_count", lambda: 1)
        assert bench_train.main(["--shards", shards, "--device", "cuda", "--ranks", "2", "--stages", "0"]) == 2
    assert capsys.readouterr().err == ("bench_train: --ranks 2: this machine has 1 CUDA device(s), one per rank; use "
                                       "fewer ranks or --device cpu\n")
    assert bench_train.main(["--shards", shards, "--device", "cpu", "--ranks", "2", "--stages", "0", "--override",
                             "deepspeed.sync_batchnorm=true"]) == 2
    assert capsys.readouterr().err.startswith("bench_train: deepspeed.sync_batchnorm=true: 2 ranks on cpu would share")


def test_bench_train_refuses_missing_shards_and_nonsense_counts(tmp_path, capsys):
    assert bench_train.main(["--shards", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("bench_train: data.train_split=train: no manifest")
    for option, value in (("--ranks", "0"), ("--stages", "7"), ("--steps", "0"), ("--batch", "0")):
        with pytest.raises(SystemExit) as exit:
            bench_train.parse_args(["--shards", str(tmp_path), option, value])
        assert exit.value.code == 2 and f"argument {option}: invalid" in capsys.readouterr().err


def test_bench_reshard_refuses_a_config_that_cannot_run_before_starting_torchrun(shards, tmp_path, capsys):
    assert bench_reshard.main(["--shards", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("bench_reshard: data.train_split=train: no manifest")
    assert bench_reshard.main(["--shards", shards, "--backbone", "nope"]) == 2
    assert capsys.readouterr().err.startswith("bench_reshard: In 'train': Could not find 'backbone/nope'")
