"""tools/preview_augmentations.py (its main, as the command line calls it) draws a recipe's views from real shards
with the real loader and writes the grid W&B shows (one labelled row per view); unreadable shards are one line and
exit 2."""

import numpy as np
from PIL import Image

from tools import preview_augmentations


def test_the_aag_recipe_previews_its_three_views_as_labelled_rows(shards, tmp_path, capsys):
    out = tmp_path / "aag.png"
    args = [f"{shards}/digits-train.manifest.json", "--recipe", "aag", "--n", "6", "--out", str(out)]
    assert preview_augmentations.main(args) == 0
    assert "u (crop_jitter), v (crop_jitter), w (randaugment)" in capsys.readouterr().out
    grid = np.asarray(Image.open(out).convert("RGB"))
    margin = grid.shape[1] - 6 * 32
    assert grid.shape[0] == 3 * 32 and 0 < margin < 32  # three rows of six 32-pixel digits behind the labels
    rows = [grid[32 * i : 32 * (i + 1), margin:] for i in range(3)]
    assert not np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[1], rows[2])  # independent draws
    assert (grid[:, :margin] < 128).any()  # the row labels are written in the margin


def test_missing_shards_are_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "none-train.manifest.json"
    assert preview_augmentations.main([str(missing), "--recipe", "simclr"]) == 2
    assert capsys.readouterr().err == f"preview_augmentations: manifest not found: {missing}\n"


def test_an_out_path_in_a_folder_that_is_not_there_is_one_line_and_exit_2_before_loading(shards, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "grid.png"
    args = [f"{shards}/digits-train.manifest.json", "--recipe", "aag", "--out", str(out)]
    assert preview_augmentations.main(args) == 2
    assert capsys.readouterr().err == f"preview_augmentations: --out {out}: no folder {out.parent}\n"
