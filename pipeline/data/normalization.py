"""Per-dataset channel mean and std (of pixels scaled to [0, 1]) that the loader normalises views with.

The values are the ones the methods' reference code uses (CIFAR-10 and STL-10 as in pl_bolts, ImageNet's usual
statistics); digits' were measured on its 32x32 RGB training split. Datasets without their own entry
(an image folder) use ImageNet's.
"""

from __future__ import annotations

MEAN_STD: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4300, 0.4200, 0.3900), (0.2700, 0.2600, 0.2700)),
    "imagenet": ((0.4850, 0.4560, 0.4060), (0.2290, 0.2240, 0.2250)),
    "digits": ((0.3089, 0.3089, 0.3089), (0.3486, 0.3486, 0.3486)),
}


def mean_std(dataset: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    return MEAN_STD.get(dataset, MEAN_STD["imagenet"])
