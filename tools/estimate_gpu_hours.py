#!/usr/bin/env python
"""GPU-hours of a preset's full run, ESTIMATED from the FLOPs of its training step: no GPU step has been timed yet,
so these are placeholders until tools/gpu_check.sh measures one (then use its samples per second).

    python tools/estimate_gpu_hours.py cifar10_aasae stl10_aasae cifar10_aag cifar10_simclr
    python tools/estimate_gpu_hours.py cifar10_simclr --override backbone=resnet50 --override data.batch_size=1024
    python tools/estimate_gpu_hours.py imagenet_aasae --override data=folder --images 250000   # your own folder

FLOPs per image: torch.utils.flop_counter over the preset's method (the model the trainer builds: encoder, heads,
decoder, the extra no-grad pass of bn_on_original) running forward and backward on a batch of BATCH images of the
preset's size, divided by BATCH. It counts convolutions, linear layers and matmuls (2 per multiply-accumulate), not
BatchNorm, activations, the optimizer or the input pipeline. Estimated GPU-hours = epochs x training images x FLOPs
per image / sustained FLOP/s / 3600, where the sustained rate is an ASSUMPTION (--tflops, default 150 TFLOP/s on one
H100: about 15% of its 989 dense bf16 TFLOP/s, for ResNets on small images, which keep the tensor cores far from
full). Prints one table. Exit status: 0 printed, 2 a preset or override that does not compose, a dataset split whose
image count is not known here (give it with --images), or a --tflops or --images that is not positive.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.arg_types import positive_float, positive_int  # noqa: E402
from pipeline.config.checks import ConfigError  # noqa: E402
from pipeline.config.compose import load  # noqa: E402
from pipeline.exit_codes import BAD_CONFIG  # noqa: E402
from pipeline.methods import method_for  # noqa: E402

BATCH = 4
ASSUMED_TFLOPS = 150.0
TRAIN_IMAGES = {("cifar10", "train"): 50_000, ("cifar100", "train"): 50_000, ("svhn", "train"): 73_257,
                ("stl10", "train+unlabeled"): 105_000, ("stl10", "unlabeled"): 100_000,
                ("imagenet", "train"): 1_281_167, ("digits", "train"): 1_438}


def step_flops_per_image(overrides: list[str]) -> tuple[float, object]:
    """FLOPs of one training step per image (forward and backward) of the composed preset, and its config."""
    cfg = load("train", overrides)
    torch.manual_seed(0)
    method = method_for(cfg).train()
    size = cfg.data.image_size
    views = {name: torch.randn(BATCH, 3, size, size) for name in method.views}
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = method(views)
        loss.backward()
    return counter.get_total_flops() / BATCH, cfg


def estimate(experiment: str, extra: list[str], tflops: float, images: int = 0) -> dict:
    """One preset's row; `images`: the training split's size when the table does not know it (an image folder)."""
    flops, cfg = step_flops_per_image([f"experiment={experiment}", *extra])
    images = images or TRAIN_IMAGES.get((cfg.data.dataset, cfg.data.train_split), 0)
    if not images:
        raise ConfigError(f"no image count for the {cfg.data.dataset} dataset's {cfg.data.train_split} split here; "
                          "give it with --images N")
    hours = cfg.epochs * images * flops / (tflops * 1e12) / 3600
    return {"preset": experiment + "".join(f" {o}" for o in extra), "backbone": cfg.backbone.arch,
            "size": cfg.data.image_size, "batch": cfg.data.batch_size, "epochs": cfg.epochs, "images": images,
            "gflops_per_image": flops / 1e9, "gpu_hours": hours}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="+", help="preset names (configs/experiment)")
    p.add_argument("--override", action="append", default=[], help="Hydra override for every preset (repeatable)")
    p.add_argument("--tflops", type=positive_float, default=ASSUMED_TFLOPS,
                   help=f"ASSUMED sustained TFLOP/s of one GPU (default {ASSUMED_TFLOPS:g}, an H100 guess)")
    p.add_argument("--images", type=positive_int, default=0,
                   help="images in the training split (default: the dataset's known count; needed for an image folder)")
    args = p.parse_args(argv)
    print(f"ESTIMATE at an assumed {args.tflops:g} TFLOP/s sustained; replace with tools/gpu_check.sh's step time")
    print(f"{'preset':<48}{'backbone':>10}{'px':>5}{'batch':>7}{'epochs':>8}{'images':>9}{'GFLOP/img':>11}"
          f"{'GPU-h':>9}")
    for experiment in args.experiments:
        try:
            r = estimate(experiment, args.override, args.tflops, args.images)
        except ConfigError as err:
            print(f"estimate_gpu_hours: {' '.join([experiment, *args.override])}: {err}", file=sys.stderr)
            return BAD_CONFIG
        print(f"{r['preset']:<48}{r['backbone']:>10}{r['size']:>5}{r['batch']:>7}{r['epochs']:>8}{r['images']:>9}"
              f"{r['gflops_per_image']:>11.2f}{r['gpu_hours']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
