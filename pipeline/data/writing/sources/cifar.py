"""CIFAR-10 (`cifar-10-batches-py/`) and CIFAR-100 (`cifar-100-python/`, fine or coarse labels) python pickles."""

from __future__ import annotations

import os

import numpy as np

from .base import dataset_folder, require
from .raw_pixels import ArraySource
from .safe_pickle import load_pickle

_LAYOUT10 = "ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (the python version of CIFAR-10)"
_LAYOUT100 = "ROOT/cifar-100-python/{train, test, meta} (the python version of CIFAR-100)"


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _images(batch: dict, path: str) -> np.ndarray:
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' should be N x 3072 uint8 (32x32x3 channel-first), got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


class Cifar10(ArraySource):
    dataset = "cifar10"

    def __init__(self, root: str, split: str):
        super().__init__()
        self.split = split
        self.folder = dataset_folder(root, "cifar-10-batches-py", _LAYOUT10)
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        self.paths = [require(os.path.join(self.folder, f), _LAYOUT10) for f in files]
        meta = load_pickle(require(os.path.join(self.folder, "batches.meta"), _LAYOUT10))
        self.classes = _names(meta["label_names"])

    def _load(self):
        images, labels = [], []
        for path in self.paths:
            batch = load_pickle(path)
            images.append(_images(batch, path))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels)


class Cifar100(ArraySource):
    dataset = "cifar100"

    def __init__(self, root: str, split: str, labels: str = "fine"):
        super().__init__()
        if labels not in ("fine", "coarse"):
            raise ValueError(f"CIFAR-100 labels are 'fine' or 'coarse', not {labels!r}")
        self.split, self.label_kind = split, labels
        self.folder = dataset_folder(root, "cifar-100-python", _LAYOUT100)
        self.path = require(os.path.join(self.folder, split), _LAYOUT100)
        meta = load_pickle(require(os.path.join(self.folder, "meta"), _LAYOUT100))
        self.classes = _names(meta[f"{labels}_label_names"])

    def options(self) -> dict:
        return {"labels": self.label_kind}

    def _load(self):
        batch = load_pickle(self.path)
        return _images(batch, self.path), np.asarray(batch[f"{self.label_kind}_labels"], dtype=np.int64)
