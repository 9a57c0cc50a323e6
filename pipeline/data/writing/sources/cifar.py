"""CIFAR-10 (`cifar-10-batches-py/`) and CIFAR-100 (`cifar-100-python/`, fine or coarse labels) python pickles.

Every file is checked against what the real one holds (a dict with an N x 3072 uint8 `data` array, a list of N
labels within the class count, the class names), so a damaged or foreign file is named instead of converted into
wrong shards or failing deep inside the conversion."""

from __future__ import annotations

import os

import numpy as np

from ...datasets import DATASETS
from .base import SourceFileError, dataset_folder, require
from .raw_pixels import ArraySource
from .safe_pickle import load_pickle

_LAYOUT10 = "ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (the python version of CIFAR-10)"
_LAYOUT100 = "ROOT/cifar-100-python/{train, test, meta} (the python version of CIFAR-100)"
_LABEL_SETS = ("fine", "coarse")  # CIFAR-100's, in the order of DATASETS["cifar100"].num_classes


def _entry(batch: dict, key: str, path: str):
    if key not in batch:
        raise SourceFileError(f"{path}: has no {key!r} entry (it has {', '.join(map(repr, batch)) or 'none'})")
    return batch[key]


def _kind(value) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if isinstance(value, (list, tuple)):
        odd = next((v for v in value if not isinstance(v, (int, np.integer))), None)
        return f"a {type(value).__name__} holding {type(odd).__name__}" if odd is not None else type(value).__name__
    return f"a {type(value).__name__}"


def _names(path: str, key: str, count: int) -> list[str]:
    """The class names of a meta file: `count` of them, bytes or str."""
    values = _entry(load_pickle(path), key, path)
    if not isinstance(values, (list, tuple)) or len(values) != count \
            or not all(isinstance(v, (bytes, str)) for v in values):
        raise SourceFileError(f"{path}: {key!r} should list {count} class names, got {_kind(values)}"
                              f"{f' of {len(values)}' if isinstance(values, (list, tuple)) else ''}")
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def _images(batch: dict, path: str) -> np.ndarray:
    data = _entry(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise SourceFileError(f"{path}: 'data' should be an N x 3072 uint8 array (32x32x3 channel-first), got "
                              f"{_kind(data)}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _labels(batch: dict, key: str, path: str, images: int, classes: int) -> np.ndarray:
    """One label per image, each a class index (the real files hold a list of ints)."""
    values = _entry(batch, key, path)
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iu":
        values = values.tolist()
    if not isinstance(values, list) or not all(isinstance(v, (int, np.integer)) for v in values):
        raise SourceFileError(f"{path}: {key!r} should be a list of integers, got {_kind(values)}")
    if len(values) != images:
        raise SourceFileError(f"{path}: {len(values)} labels for {images} images")
    bad = next((v for v in values if not 0 <= v < classes), None)
    if bad is not None:
        raise SourceFileError(f"{path}: label {bad} in {key!r} is outside 0..{classes - 1}")
    return np.asarray(values, dtype=np.int64)


class Cifar10(ArraySource):
    dataset = "cifar10"

    def __init__(self, root: str, split: str):
        super().__init__()
        self.split = split
        self.folder = dataset_folder(root, "cifar-10-batches-py", _LAYOUT10)
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        self.paths = [require(os.path.join(self.folder, f), _LAYOUT10) for f in files]
        self.classes = _names(require(os.path.join(self.folder, "batches.meta"), _LAYOUT10), "label_names",
                              DATASETS[self.dataset].num_classes[0])

    def _load(self):
        images, labels = [], []
        for path in self.paths:
            batch = load_pickle(path)
            images.append(_images(batch, path))
            labels.append(_labels(batch, "labels", path, len(images[-1]), len(self.classes)))
        return np.concatenate(images), np.concatenate(labels)


class Cifar100(ArraySource):
    dataset = "cifar100"

    def __init__(self, root: str, split: str, labels: str = "fine"):
        super().__init__()
        if labels not in _LABEL_SETS:
            raise ValueError(f"CIFAR-100 labels are 'fine' or 'coarse', not {labels!r}")
        self.split, self.label_kind = split, labels
        self.folder = dataset_folder(root, "cifar-100-python", _LAYOUT100)
        self.path = require(os.path.join(self.folder, split), _LAYOUT100)
        self.classes = _names(require(os.path.join(self.folder, "meta"), _LAYOUT100), f"{labels}_label_names",
                              DATASETS[self.dataset].num_classes[_LABEL_SETS.index(labels)])

    def options(self) -> dict:
        return {"labels": self.label_kind}

    def _load(self):
        batch = load_pickle(self.path)
        images = _images(batch, self.path)
        return images, _labels(batch, f"{self.label_kind}_labels", self.path, len(images), len(self.classes))
