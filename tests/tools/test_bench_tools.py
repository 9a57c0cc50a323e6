"""The benchmark tools run and print their tables (tiny CPU runs; the figures themselves are not checked)."""

from __future__ import annotations

import pytest

from tools import bench_loader, bench_train


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
