"""The random parameters drawn on the host: uniforms that depend on their coordinates only, and crop boxes drawn as
torchvision's RandomResizedCrop draws them, including its fallback for images no try fits."""

from __future__ import annotations

import numpy as np

from pipeline.data.loading.augmentations import crop_boxes
from pipeline.data.loading.counter_random import uniforms


def test_uniforms_depend_only_on_key_and_row():
    rows = np.arange(50_000)
    u = uniforms((7, 2, 1), rows, 6)
    assert u.shape == (50_000, 6) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.std() - np.sqrt(1 / 12)) < 0.005
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 0.09 * u.size
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.02  # neighbouring samples
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.02  # one sample's successive numbers
    picked = np.array([49_999, 3, 3, 12])  # any subset, in any order, with repeats: the same numbers per row
    assert np.array_equal(uniforms((7, 2, 1), picked, 6), u[picked])
    assert np.array_equal(uniforms((7, 2, 1), picked, 2), u[picked, :2])
    for other in ((7, 2, 2), (7, 3, 1), (8, 2, 1)):
        assert not np.isclose(uniforms(other, picked, 6), u[picked]).any()


def torchvision_box(u, height, width, scale, ratio):
    """RandomResizedCrop.get_params, written as torchvision writes it (a loop of ten tries), reading its random
    numbers from `u` in the order the vectorised draw uses them."""
    area, log_ratio = height * width, np.log(ratio)
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[4 * t])
        aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[4 * t + 1])
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[4 * t + 2] * (height - h + 1)), int(u[4 * t + 3] * (width - w + 1)), h, w
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_boxes_are_torchvisions_and_stay_inside_the_image():
    n = 5000
    u = uniforms((0,), np.arange(n), 40)
    height = np.where(np.arange(n) % 3 == 0, 375, 24)  # photographs, and thumbnails where tries miss more often
    width = np.where(np.arange(n) % 3 == 0, 500, np.arange(n) % 97 + 4)
    boxes = crop_boxes(u, height, width, (0.08, 1.0), (3 / 4, 4 / 3))
    assert (boxes >= 0).all() and (boxes <= 1).all()
    for i in range(n):
        top, left, h, w = torchvision_box(u[i], height[i], width[i], (0.08, 1.0), (3 / 4, 4 / 3))
        expected = [top / height[i], left / width[i], (top + h) / height[i], (left + w) / width[i]]
        assert np.allclose(boxes[i], expected), (i, height[i], width[i])


def test_crop_boxes_of_images_no_try_fits_are_the_clamped_centre_crop():
    """A 1000 x 10 strip: no box of aspect 3/4-4/3 and area 8-100% fits, so the centre crop at aspect 4/3 is taken."""
    u = uniforms((1,), np.arange(100), 40)
    boxes = crop_boxes(u, np.full(100, 10), np.full(100, 1000), (0.08, 1.0), (3 / 4, 4 / 3))
    assert np.allclose(boxes, [0, (1000 - 13) // 2 / 1000, 1, ((1000 - 13) // 2 + 13) / 1000])
