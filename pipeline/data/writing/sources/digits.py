"""The embedded default data set: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes),
upscaled to 32x32 RGB and split deterministically, so the demo and tests need no download."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .raw_pixels import ArraySource

TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def _upscale(image8: np.ndarray) -> np.ndarray:
    grey = np.round(image8 * (255.0 / 16.0)).astype(np.uint8)
    big = np.asarray(Image.fromarray(grey).resize((32, 32), Image.BICUBIC))
    return np.repeat(big[:, :, None], 3, axis=2)


class Digits(ArraySource):
    dataset = "digits"
    classes = [str(d) for d in range(10)]

    def __init__(self, root: str | None = None, split: str = "train"):
        super().__init__()
        self.split = split

    def _load(self):
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError("the digits set needs scikit-learn: pip install -e '.[demo]'") from err
        bunch = load_digits()
        order = np.random.default_rng(_SPLIT_SEED).permutation(len(bunch.target))
        n_test = int(round(len(order) * TEST_FRACTION))
        chosen = np.sort(order[:n_test] if self.split == "test" else order[n_test:])
        images = np.stack([_upscale(bunch.images[i]) for i in chosen])
        return images, bunch.target[chosen].astype(np.int64)
