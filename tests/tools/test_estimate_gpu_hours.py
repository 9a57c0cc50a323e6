"""tools/estimate_gpu_hours.py counts a whole training step per image: for AAG (three views through one ResNet-18)
that is three views x (forward + backward) of the encoder, the backward about twice the forward (the first
convolution has no input gradient to compute), plus its small linear head; and the hours follow from it."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.resnet import ResNet
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
