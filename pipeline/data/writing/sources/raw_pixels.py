"""Base for sources whose files hold raw pixel arrays (CIFAR, STL-10, SVHN, digits) loaded once per process."""

from __future__ import annotations

import numpy as np

from ...shard_format import split_slug
from .base import Record, Source


class ArraySource(Source):
    """Subclasses implement `_load() -> (images NxHxWx3 uint8, labels N int)`, called once on first use; forked
    conversion workers share the loaded arrays with the parent instead of reloading them."""

    def __init__(self):
        self._arrays = None

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = self._load()
        return self._arrays

    def __len__(self) -> int:
        return len(self.arrays[1])

    def key(self, i: int) -> str:
        return f"{self.split_key}_{i:07d}"

    @property
    def split_key(self) -> str:
        return split_slug(self.split)

    def size_hint(self, i: int) -> int:
        images = self.arrays[0]
        return int(np.prod(images.shape[1:]))

    def read(self, i: int) -> Record:
        images, labels = self.arrays
        return Record(self.key(i), int(labels[i]), np.ascontiguousarray(images[i]), f"{self.dataset}/{self.split}[{i}]")
