"""STL-10 binary: `stl10_binary/{train,test,unlabeled}_X.bin` (uint8 3x96x96, column-major), `{train,test}_y.bin`
(labels 1..10), `class_names.txt`, `fold_indices.txt`. Read through a memory map: unlabeled is 2.7 GB."""

from __future__ import annotations

import os

import numpy as np

from ...shard_format import UNLABELED
from .base import dataset_folder, require
from .raw_pixels import ArraySource

_LAYOUT = (
    "ROOT/stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, class_names.txt, "
    "fold_indices.txt} (the STL-10 binary version)"
)
_SIDE = 96
_PIXELS = 3 * _SIDE * _SIDE


class Stl10(ArraySource):
    dataset = "stl10"

    def __init__(self, root: str, split: str, fold: int | None = None):
        super().__init__()
        if fold is not None and (split != "train" or not 0 <= fold <= 9):
            raise ValueError("a fold (0-9) selects one of the 10 predefined subsets of the 'train' split only")
        self.split, self.fold = split, fold
        self.folder = dataset_folder(root, "stl10_binary", _LAYOUT)
        with open(require(os.path.join(self.folder, "class_names.txt"), _LAYOUT)) as f:
            self.classes = [line.strip() for line in f if line.strip()]
        self.parts = ["train", "unlabeled"] if split == "train+unlabeled" else [split]
        for part in self.parts:
            require(os.path.join(self.folder, f"{part}_X.bin"), _LAYOUT)
            if part != "unlabeled":
                require(os.path.join(self.folder, f"{part}_y.bin"), _LAYOUT)
        if fold is not None:
            require(os.path.join(self.folder, "fold_indices.txt"), _LAYOUT)

    @property
    def split_key(self) -> str:
        return "train_fold%d" % self.fold if self.fold is not None else super().split_key

    def options(self) -> dict:
        return {"fold": self.fold}

    def _part(self, part: str):
        path = os.path.join(self.folder, f"{part}_X.bin")
        size = os.path.getsize(path)
        if size % _PIXELS:
            raise ValueError(f"{path}: size {size} is not a multiple of one 3x96x96 image ({_PIXELS} bytes)")
        # Stored channel-first and column-major: (N, C, W, H); transpose to N x H x W x C lazily (a view).
        images = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, _SIDE, _SIDE).transpose(0, 3, 2, 1)
        if part == "unlabeled":
            labels = np.full(len(images), UNLABELED, dtype=np.int64)
        else:
            labels = np.fromfile(os.path.join(self.folder, f"{part}_y.bin"), dtype=np.uint8).astype(np.int64) - 1
            if len(labels) != len(images):
                raise ValueError(f"{part}: {len(images)} images but {len(labels)} labels")
        return images, labels

    def _load(self):
        parts = [self._part(p) for p in self.parts]
        if len(parts) == 1:
            images, labels = parts[0]
        else:  # train+unlabeled: index into either memmap without copying 2.7 GB
            images = _Concat([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
        if self.fold is not None:
            with open(os.path.join(self.folder, "fold_indices.txt")) as f:
                folds = [line.split() for line in f if line.strip()]
            chosen = np.asarray(folds[self.fold], dtype=np.int64)
            images, labels = _Subset(images, chosen), labels[chosen]
        return images, labels


class _Concat:
    """Indexing over several arrays as one, without concatenating them in memory."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.starts[-1]),) + arrays[0].shape[1:]

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        part = int(np.searchsorted(self.starts, i, side="right") - 1)
        return self.arrays[part][i - self.starts[part]]


class _Subset:
    def __init__(self, array, indices):
        self.array, self.indices = array, indices
        self.shape = (len(indices),) + array.shape[1:]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.array[int(self.indices[i])]
