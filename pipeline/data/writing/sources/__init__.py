"""Dataset sources for conversion into shards, one file per on-disk format, looked up by name."""

from __future__ import annotations

from ...datasets import DATASETS
from .base import Record, Source, SourceLayoutError
from .cifar import Cifar10, Cifar100
from .digits import Digits
from .folder import ImageFolder
from .imagenet import ImageNet
from .stl10 import Stl10
from .svhn import Svhn

SOURCES = ("imagenet", "stl10", "cifar10", "cifar100", "svhn", "digits", "folder")  # the formats make_shards reads


def build_source(dataset: str, root: str | None, split: str, **options) -> Source:
    """The source for one split. Options: imagenet devkit/val_csv, stl10 fold, cifar100 labels, folder name."""
    if dataset not in SOURCES:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(SOURCES)}")
    splits = DATASETS[dataset].splits
    if split not in splits:
        raise ValueError(f"{dataset} has splits {splits}, not {split!r}")
    if dataset != "digits" and not root:
        raise ValueError(f"{dataset} needs --src: the folder (or file) holding the dataset")
    if dataset == "imagenet":
        return ImageNet(root, split, devkit=options.get("devkit"), val_csv=options.get("val_csv"))
    if dataset == "stl10":
        return Stl10(root, split, fold=options.get("fold"))
    if dataset == "cifar10":
        return Cifar10(root, split)
    if dataset == "cifar100":
        return Cifar100(root, split, labels=options.get("labels") or "fine")
    if dataset == "svhn":
        return Svhn(root, split)
    if dataset == "digits":
        return Digits(root, split)
    return ImageFolder(root, split, name=options.get("name") or "folder")


__all__ = ["Record", "SOURCES", "Source", "SourceLayoutError", "build_source"]
