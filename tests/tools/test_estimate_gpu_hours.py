"""tools/estimate_gpu_hours.py counts a whole training step per image: for AAG (three views through one ResNet-18)
that is three views x (forward + backward) of the encoder, the backward about twice the forward (the first
convolution has no input gradient to compute), plus its small linear head; and the hours follow from it."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.resnet import ResNet
from tests.helpers import REPO
from tools import estimate_gpu_hours


def test_aag_step_is_three_views_forward_and_backward_and_hours_follow():
    row = estimate_gpu_hours.estimate("cifar10_aag", [], tflops=100.0)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ResNet("resnet18", stem="cifar").eval()(torch.randn(1, 3, 32, 32))
    forward = counter.get_total_flops()
    assert 3 * 2.9 * forward < row["gflops_per_image"] * 1e9 < 3 * 3.0 * forward * 1.01
    expected = 1000 * 50_000 * row["gflops_per_image"] * 1e9 / 100e12 / 3600
    assert (row["epochs"], row["images"], row["batch"]) == (1000, 50_000, 64)
    assert abs(row["gpu_hours"] - expected) < 1e-9


def test_the_digits_presets_are_estimated(capsys):
    """smoke and demo_* train on the digits' 1,438 training images."""
    presets = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")
                     if p.stem == "smoke" or p.stem.startswith("demo_"))
    assert estimate_gpu_hours.main(presets) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2 + len(presets)


def test_what_it_cannot_estimate_is_one_line_and_exit_2(capsys):
    assert estimate_gpu_hours.main(["nope"]) == 2
    assert capsys.readouterr().err.startswith("estimate_gpu_hours: nope: In 'train': Could not find 'experiment/nope'")
    assert estimate_gpu_hours.main(["cifar10_aag", "--override", "optimzer.lr=1"]) == 2
    assert "optimzer" in capsys.readouterr().err
    assert estimate_gpu_hours.main(["cifar10_aag", "--override", "data=folder"]) == 2
    assert capsys.readouterr().err == ("estimate_gpu_hours: cifar10_aag data=folder: no image count for the folder "
                                       "dataset's train split here; give it with --images N\n")
    assert estimate_gpu_hours.main(["cifar10_aag", "--override", "data=folder", "--images", "5000"]) == 0
    with pytest.raises(SystemExit) as exit:
        estimate_gpu_hours.main(["cifar10_aag", "--tflops", "0"])
    assert exit.value.code == 2 and "--tflops: invalid positive number value: '0'" in capsys.readouterr().err
