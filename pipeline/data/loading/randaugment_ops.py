"""RandAugment as the auxiliary-augmentation paper's code has it (Tu, Feng and Yang, 2020), as DALI augmentations for
auto_aug's `select`: the `randaugment` augmentation's operations.

Their code (AVA_cifar: mindspore-ai/models, research/cv/AVA_cifar/src/RandAugment/augmentations.py, `augment_list`)
draws n = 2 operations uniformly from 18, each at val = m / 30 * (max - min) + min with m = 10, and a random sign for
the shears, the rotation and the translations. The list (their order), its ranges and what m = 10 gives:

    AutoContrast, Equalize, Invert         no magnitude
    Rotate (0, 30) degrees, signed         10 degrees
    Posterize (0, 4) -> int(val) bits      1 bit (keeps the top bit of each channel)
    Solarize (0, 256) threshold            85.3: values >= 85.3 are inverted (m = 30: no change)
    SolarizeAdd (0, 110)                   +36 to every value, clipped at 255, then values >= 128 inverted
    Contrast, Sharpness (0.1, 1.9) factor  0.7, unsigned (their Color and Brightness are commented out)
    ShearX, ShearY (0, 0.3), signed        0.1
    CutoutAbs (0, 40) px                   a 13.3 px square (14 px drawn) of (125, 123, 114) at a random place
    TranslateXabs, TranslateYabs (0, 100) px, signed     33.3 px: BOUNDED here, see below
    BLUR, CONTOUR, EMBOSS, FIND_EDGES      PIL's fixed 5x5 / 3x3 kernels; the outer 2 / 1 px keep their input

Two departures, on purpose:
- Translations are bounded to RANDAUGMENT_MAX_TRANSLATE of the side at m = 30 (10% at m = 10: 3.2 px on CIFAR)
  instead of their 100 px at m = 30. Their 33.3 px at m = 10 moves a 32 px image entirely out of the frame, so every
  view that draws a translation (1 - (16/18)^2 = 21% of auxiliary views) is uniformly black.
- Cutout's side scales with the image (their pixel values are for 32 px: 40/32 of the side at m = 30), so the op
  keeps its strength at STL-10's and ImageNet's sizes; at 32 px it is theirs.
Everything else follows PIL as they call it: nearest-neighbour sampling and black fill for the rotation, shears and
translations; Cutout's centre drawn as their `np.random.uniform(w)` draws it (low = w, high = 1: uniform in (1, w]).
DALI's Equalize follows OpenCV's formula, Contrast and Sharpness round differently (within a few grey levels).

The operations hold no `if`: they are marked do_not_convert, so that DALI's AutoGraph (which the conditional pipeline
runs over every function it calls) does not transform each while the graph is defined, seconds on a loaded CPU.
The random parts (which op, its sign, Cutout's box) are drawn on the host (augmentations.draw_params); the box
reaches the graph as `cutout_box` (anchor y, x, then height, width in pixels), an argument input `select` splits.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as a
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from nvidia.dali.pipeline import do_not_convert

RANDAUGMENT_MAX_TRANSLATE = 0.3  # of the side, at magnitude bin 30 of 31
GEOMETRY_FILL = 0  # PIL's transform and rotate fill
CUTOUT_FILL = (125, 123, 114)
CUTOUT_MAX = 40 / 32  # of the side, at magnitude bin 30 (their 40 px on 32 px images)
BINS = 31  # magnitude bins 0..30, as their m in [0, 30]


@do_not_convert
def _posterize_mask(magnitude) -> np.ndarray:
    """Their Posterize keeps int(val) bits, 0 included (a black image)."""
    bits = int(np.floor(float(magnitude) + 1e-9))
    return np.array(255 ^ (2 ** (8 - bits) - 1), dtype=np.uint8)


@do_not_convert
def _whole_shift(magnitude) -> np.ndarray:
    """floor(x + val) = x + floor(val) for their integer pixel x: the float addition before the uint8 cast."""
    return np.array(int(np.floor(float(magnitude) + 1e-9)), dtype=np.int32)


@augmentation(mag_range=(0, 110), mag_to_param=_whole_shift, param_device="auto")
@do_not_convert
def solarize_add(data, shift):
    """Their SolarizeAdd: add to every value, clip at 255, then invert the values >= 128."""
    x = dmath.min(fn.cast(data, dtype=types.INT32) + shift, 255)
    return fn.cast(x + (x >= 128) * (255 - 2 * x), dtype=types.UINT8)


@augmentation
@do_not_convert
def cutout(data, _, cutout_box):
    """A square of CUTOUT_FILL at the box draw_params drew (anchor y, x; height, width)."""
    return fn.erase(data, anchor=cutout_box[0:2], shape=cutout_box[2:4], axis_names="HW",
                    fill_value=list(CUTOUT_FILL))


@do_not_convert
def _pil_filter(data, shape, kernel: list[list[float]], scale: float, offset: float):
    """PIL's ImageFilter.Kernel as their ToBLUR/ToCONTOUR/ToEMBOSS/ToEDGES apply it: the kernel's rows reversed
    (PIL applies its first row to the row below), sum / scale + offset rounded half up and clipped, and the outer
    border of kernel radius left as it was."""
    weights = np.asarray(kernel, np.float32)[::-1] / scale
    radius = len(kernel) // 2
    inner = np.zeros((shape[0], shape[1], 1), np.float32)
    inner[radius:-radius, radius:-radius] = 1.0
    filtered = fn.filter(data, types.Constant(np.ascontiguousarray(weights), device=data.device), dtype=types.FLOAT)
    filtered = dmath.clamp(dmath.floor(filtered + (offset + 0.5)), 0.0, 255.0)
    keep = types.Constant(np.broadcast_to(inner, (*shape, 3)).copy(), device=data.device)
    return fn.cast(keep * filtered + (1.0 - keep) * data, dtype=types.UINT8)


EDGES = [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]]


@augmentation
@do_not_convert
def blur(data, _, shape):
    ring = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    return _pil_filter(data, shape, ring, 16, 0)


@augmentation
@do_not_convert
def contour(data, _, shape):
    return _pil_filter(data, shape, EDGES, 1, 255)


@augmentation
@do_not_convert
def emboss(data, _, shape):
    return _pil_filter(data, shape, [[-1, 0, 0], [0, 1, 0], [0, 0, 0]], 1, 128)


@augmentation
@do_not_convert
def find_edges(data, _, shape):
    return _pil_filter(data, shape, EDGES, 1, 0)


OPS = [
    a.auto_contrast,
    a.equalize,
    a.invert,
    a.rotate.augmentation((0, 30), True),
    a.posterize.augmentation((0, 4), False, _posterize_mask),
    a.solarize.augmentation((0, 256), False),
    solarize_add,
    a.contrast.augmentation((0.1, 1.9), False, None),
    a.sharpness.augmentation((0.1, 1.9), False, a.sharpness_kernel_shifted),
    a.shear_x.augmentation((0, 0.3), True),
    a.shear_y.augmentation((0, 0.3), True),
    cutout,
    a.translate_x.augmentation((0, RANDAUGMENT_MAX_TRANSLATE), True),
    a.translate_y.augmentation((0, RANDAUGMENT_MAX_TRANSLATE), True),
    blur,
    contour,
    emboss,
    find_edges,
]
NAMES = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "contrast",
         "sharpness", "shear_x", "shear_y", "cutout", "translate_x", "translate_y", "blur", "contour", "emboss",
         "find_edges")


def cutout_boxes(u: np.ndarray, size: int, magnitude_bin: int) -> np.ndarray:
    """(B, 4) Cutout boxes (anchor y, x; height, width) in pixels from (B, 2) uniforms (y, x), as their CutoutAbs
    draws on a `size` side: centre c in (1, size], corner int(max(0, c - v/2)), PIL's rectangle to floor(corner + v)
    inclusive, clipped to the image."""
    v = magnitude_bin / (BINS - 1) * CUTOUT_MAX * size
    centre = size - (size - 1) * u
    corner = np.floor(np.maximum(0.0, centre - v / 2))
    end = np.minimum(np.floor(corner + v), size - 1)
    return np.concatenate([corner, end - corner + 1], axis=1)


def apply(images, ops, signs, boxes, magnitude_bin: int, size: int):
    """One RandAugment level: sample i gets OPS[ops[i]] at `magnitude_bin`, negated where signs[i] is 1."""
    return select(OPS, ops, data=images, magnitude_bin=signed_bin(magnitude_bin, random_sign=signs),
                  num_magnitude_bins=BINS, shape=(size, size), fill_value=GEOMETRY_FILL,
                  interp_type=types.INTERP_NN, cutout_box=boxes)
