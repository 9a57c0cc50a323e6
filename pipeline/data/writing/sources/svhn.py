"""SVHN cropped digits: `{train,test,extra}_32x32.mat` (X: 32x32x3xN uint8, y: Nx1 with 10 meaning digit 0)."""

from __future__ import annotations

import os

import numpy as np

from .base import require
from .raw_pixels import ArraySource

_LAYOUT = "ROOT/{train,test,extra}_32x32.mat (SVHN format 2, cropped digits)"


class Svhn(ArraySource):
    dataset = "svhn"
    classes = [str(d) for d in range(10)]

    def __init__(self, root: str, split: str):
        super().__init__()
        self.split = split
        self.path = require(os.path.join(root, f"{split}_32x32.mat"), _LAYOUT)

    def _load(self):
        import scipy.io  # imported here: it is slow to import and only this format needs it

        mat = scipy.io.loadmat(self.path)
        if "X" not in mat or "y" not in mat:
            raise ValueError(f"{self.path}: expected variables X and y; found {sorted(k for k in mat if k[0] != '_')}")
        images = np.ascontiguousarray(np.transpose(mat["X"], (3, 0, 1, 2)), dtype=np.uint8)
        labels = mat["y"].reshape(-1).astype(np.int64) % 10  # label 10 is the digit 0
        return images, labels
