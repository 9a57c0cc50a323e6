"""The augmentations as DALI graphs: each view of a batch is made by one named augmentation.

A method declares its views as {view name: augmentation name} (pipeline/methods); the loader builds one DALI graph
that makes every view from the same decoded image. Everything after the decoder runs in DALI, on the GPU when the
images were decoded there ("mixed"). Every random parameter of a view (crop box, flip, jitter factors, grayscale,
blur and its sigma, RandAugment's operations, signs and Cutout boxes) is drawn here, in numpy, by `draw_params`
from uniforms that are a function of (seed, epoch, sample index, view) alone (counter_random.py), and reaches DALI's
operators as argument inputs. A sample's views therefore depend on nothing else: not the rank, the world size, its
place in a batch, nor when the stream was (re)started, so a resumed run sees exactly the augmentations an
uninterrupted one sees. Strengths that differ per
dataset come from the dataset table (datasets.py); every view has the side `size` (data.image_size).

Augmentations (torchvision semantics for the parameters; docs/methods.md says which method uses which):
- contrastive: random resized crop (area 0.08-1, ratio 3/4-4/3), flip 0.5, colour jitter (0.8s, 0.8s, 0.8s, 0.2s)
  with p = 0.8, grayscale p = 0.2, Gaussian blur p = 0.5 (sigma 0.1-2, window 10% of the side) where the dataset
  blurs. Small images: s = 0.5, no blur; STL-10 and ImageNet: s = 1, blur.
- crop_jitter: random resized crop (0.2-1), colour jitter (0.4, 0.4, 0.4, 0.4) always, grayscale 0.2, flip; no blur.
- randaugment: random resized crop (0.2-1), flip, RandAugment(n, m) over the 18 operations and magnitudes of the
  auxiliary-augmentation paper's code (randaugment_ops.py), with translations bounded to 30% of the side at the top
  magnitude (10% at m = 10), so content stays inside the image: their 33 px shift at m = 10 blanks a 32 px view.
- center_crop: resize the shorter side to size / eval_crop_fraction, centre crop `size` (CIFAR 32/32, STL-10 105/96,
  ImageNet 256/224): deterministic, the evaluation transform and a reconstruction target.
- crop_flip: random resized crop (0.08-1) and flip (linear-probe training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from ..datasets import DatasetInfo
from . import randaugment_ops

BLUR_SIGMA = (0.1, 2.0)
BLUR_MAX_TAPS = 13


@dataclass(frozen=True)
class ViewSpec:
    """A random view. `None` in place of a spec stands for the deterministic center_crop transform instead."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    randaugment: tuple[int, int] | None = None  # (n ops, magnitude bin of 31)


def contrastive(info: DatasetInfo, size: int, randaugment: tuple[int, int]) -> ViewSpec:
    s = info.jitter_strength
    return ViewSpec(size, (0.08, 1.0), jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8, gray_p=0.2,
                    blur_p=0.5 if info.blur else 0.0)


def crop_jitter(info: DatasetInfo, size: int, randaugment: tuple[int, int]) -> ViewSpec:
    return ViewSpec(size, (0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2)


def randaugment_view(info: DatasetInfo, size: int, randaugment: tuple[int, int]) -> ViewSpec:
    return ViewSpec(size, (0.2, 1.0), randaugment=randaugment)


def crop_flip(info: DatasetInfo, size: int, randaugment: tuple[int, int]) -> ViewSpec:
    return ViewSpec(size, (0.08, 1.0))


def center_crop(info: DatasetInfo, size: int, randaugment: tuple[int, int]) -> None:
    return None


AUGMENTATIONS: dict[str, Callable[[DatasetInfo, int, tuple[int, int]], ViewSpec | None]] = {
    "contrastive": contrastive,
    "crop_jitter": crop_jitter,
    "randaugment": randaugment_view,
    "crop_flip": crop_flip,
    "center_crop": center_crop,
}


def view_specs(views: dict[str, str], info: DatasetInfo, size: int,
               randaugment: tuple[int, int] = (2, 10)) -> dict[str, ViewSpec | None]:
    """View name -> how it is made, for a {view name: augmentation name} declaration."""
    unknown = sorted(set(views.values()) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; choose from {sorted(AUGMENTATIONS)}")
    return {name: AUGMENTATIONS[aug](info, size, randaugment) for name, aug in views.items()}


# -- the random parameters, drawn on the host ---------------------------------------------------------------------
# One float32 vector per sample and random view: crop box (relative y0, x0, y1, x1), flip, brightness, contrast,
# saturation, hue (degrees), blur (0/1), sigma, then RandAugment's n operation indices, n signs and n Cutout boxes
# (anchor y, x; height, width: used by the levels that draw Cutout).
CROP, FLIP, BRIGHTNESS, CONTRAST, SATURATION, HUE, BLUR, SIGMA, RANDAUGMENT = 0, 4, 5, 6, 7, 8, 9, 10, 11
# The uniforms they are drawn from: four per try of the crop (area, log aspect ratio, top, left), then one each, then
# RandAugment's n operations, n signs and n Cutout centres (y, x).
CROP_TRIES = 10
U_FLIP, U_JITTER, U_FACTORS, U_GRAY, U_BLUR, U_SIGMA, U_RANDAUGMENT = (4 * CROP_TRIES + k
                                                                       for k in (0, 1, 2, 6, 7, 8, 9))


def param_count(spec: ViewSpec) -> int:
    return RANDAUGMENT + 6 * (spec.randaugment[0] if spec.randaugment else 0)


def uniform_count(spec: ViewSpec) -> int:
    return U_RANDAUGMENT + 4 * (spec.randaugment[0] if spec.randaugment else 0)


def _scaled(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


def crop_boxes(u: np.ndarray, height: np.ndarray, width: np.ndarray, scale: tuple[float, float],
               ratio: tuple[float, float]) -> np.ndarray:
    """(B, 4) relative boxes (y0, x0, y1, x1) of random resized crops drawn as torchvision's RandomResizedCrop draws
    them: the first of ten tries at an area fraction in `scale` and a log-uniform aspect ratio in `ratio` that fits,
    else the centre crop clamped to `ratio`. `u` holds each sample's 4 * CROP_TRIES uniforms."""
    tries = u[:, : 4 * CROP_TRIES].reshape(len(u), CROP_TRIES, 4)
    height, width = height[:, None].astype(np.float64), width[:, None].astype(np.float64)
    target = height * width * _scaled(tries[..., 0], *scale)
    aspect = np.exp(_scaled(tries[..., 1], *np.log(ratio)))
    w, h = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)[:, None]
    w, h = (np.take_along_axis(x, first, 1) for x in (w, h))
    top = np.floor(np.take_along_axis(tries[..., 2], first, 1) * (height - h + 1))
    left = np.floor(np.take_along_axis(tries[..., 3], first, 1) * (width - w + 1))
    # no try fits: the centre crop of the whole image, its aspect ratio clamped to `ratio`
    clamped_w = np.where(width / height > max(ratio), np.rint(height * max(ratio)), width)
    clamped_h = np.where(width / height < min(ratio), np.rint(width / min(ratio)), height)
    missed = ~fits.any(axis=1, keepdims=True)
    w, h = np.where(missed, clamped_w, w), np.where(missed, clamped_h, h)
    top = np.where(missed, (height - h) // 2, top)
    left = np.where(missed, (width - w) // 2, left)
    return np.concatenate([top / height, left / width, (top + h) / height, (left + w) / width], axis=1)


def draw_params(spec: ViewSpec, u: np.ndarray, height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """(B, param_count) parameters of one view for B images of the given header sizes (a JPEG whose EXIF orientation
    turns it gets its box at the same relative place), from each sample's `uniform_count(spec)` uniforms `u`."""
    p = np.zeros((len(u), param_count(spec)), np.float32)
    p[:, CROP : CROP + 4] = crop_boxes(u, height, width, spec.scale, spec.ratio)
    p[:, FLIP] = u[:, U_FLIP] < spec.flip
    p[:, BRIGHTNESS : SATURATION + 1] = 1.0
    if _jitters(spec):
        applied = u[:, U_JITTER] < spec.jitter_p
        for k, strength in enumerate(spec.jitter[:3]):  # torchvision's factor range [max(0, 1 - s), 1 + s]
            factor = _scaled(u[:, U_FACTORS + k], max(0.0, 1.0 - strength), 1.0 + strength)
            p[:, BRIGHTNESS + k] = np.where(applied, factor, 1.0)
        hue = spec.jitter[3] * 360.0
        p[:, HUE] = np.where(applied, _scaled(u[:, U_FACTORS + 3], -hue, hue), 0.0)
    p[:, SATURATION] *= u[:, U_GRAY] >= spec.gray_p
    p[:, BLUR] = u[:, U_BLUR] < spec.blur_p
    p[:, SIGMA] = _scaled(u[:, U_SIGMA], *BLUR_SIGMA)
    if spec.randaugment:
        n, m = spec.randaugment
        ops = len(randaugment_ops.OPS)
        p[:, RANDAUGMENT : RANDAUGMENT + n] = np.floor(u[:, U_RANDAUGMENT : U_RANDAUGMENT + n] * ops)
        p[:, RANDAUGMENT + n : RANDAUGMENT + 2 * n] = u[:, U_RANDAUGMENT + n : U_RANDAUGMENT + 2 * n] < 0.5
        for level in range(n):
            centre = u[:, U_RANDAUGMENT + 2 * n + 2 * level : U_RANDAUGMENT + 2 * n + 2 * level + 2]
            box = RANDAUGMENT + 2 * n + 4 * level
            p[:, box : box + 4] = randaugment_ops.cutout_boxes(centre, spec.size, m)
    return p


def _jitters(spec: ViewSpec) -> bool:
    return spec.jitter_p > 0 and any(spec.jitter)


# -- the graph ----------------------------------------------------------------------------------------------------
def _colour(images, params):
    """Colour jitter and grayscale in one colour twist: the grayscale is a saturation factor of 0 (luma weights 0.299,
    0.587, 0.114, as torchvision's; DALI's YIQ matrices leave the channels within one grey level of each other).
    Unlike torchvision, the four jitter operations are applied in a fixed order, and contrast pivots on mid-grey
    (128) rather than on the image's mean grey. The twist writes float (DALI's uint8 output path is several times
    slower on the CPU), clamped to the pixel range as torchvision clamps."""
    return dmath.clamp(fn.color_twist(images, dtype=types.FLOAT, brightness=params[BRIGHTNESS],
                                      contrast=params[CONTRAST], saturation=params[SATURATION], hue=params[HUE]),
                       0.0, 255.0)


def _blur(images, spec: ViewSpec, params):
    """Gaussian blur of the samples drawn for it (the others skip it: conditional execution), over a window of 10%
    of the side (odd) as torchvision's, capped at 13 taps (3 sigma of the largest sigma: the weights beyond hold
    under 0.3% of the kernel's mass). Two 1-D passes of fn.filter on the uint8 view, with each sample's kernel
    computed in the graph: about five times faster on the CPU than fn.gaussian_blur, and equal to it within
    rounding."""
    if fn.cast(params[BLUR], dtype=types.BOOL):
        radius = min(int(0.1 * spec.size) | 1, BLUR_MAX_TAPS) // 2
        sigma = params[SIGMA]
        offsets = types.Constant(np.arange(-radius, radius + 1, dtype=np.float32))
        weights = dmath.exp(offsets * offsets * (-0.5 / (sigma * sigma)))
        weights = weights / fn.reductions.sum(weights)
        taps = 2 * radius + 1
        rows, columns = fn.reshape(weights, shape=[1, taps]), fn.reshape(weights, shape=[taps, 1])
        if images.device == "gpu":  # the kernels are computed on the CPU; the GPU filter takes them on the GPU
            rows, columns = rows.gpu(), columns.gpu()
        images = fn.filter(fn.filter(images, rows), columns)
    return images


def _randaugment(images, spec: ViewSpec, params):
    """RandAugment(n, m) over the operations of randaugment_ops.py, with the operations, magnitude signs and Cutout
    boxes drawn in draw_params (DALI's apply_rand_augment, with its random draws replaced by those)."""
    n, m = spec.randaugment
    for level in range(n):
        op = fn.cast(params[RANDAUGMENT + level], dtype=types.INT32)
        sign = fn.cast(params[RANDAUGMENT + n + level], dtype=types.INT32)
        box = RANDAUGMENT + 2 * n + 4 * level
        images = randaugment_ops.apply(images, op, sign, params[box : box + 4], m, spec.size)
    return images


@dataclass(frozen=True)
class Output:
    """How views leave the graph: normalised by the dataset's mean/std, CHW (or HWC for channels-last), float32 or
    float16 (bfloat16 is converted from float32 by torch: DALI has no such type)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels_last: bool = False
    half: bool = False


def _normalize(images, out: Output, *, mirror=0, crop: int | None = None):
    """(Centre crop,) mirror, scale to [0, 1] and normalise per channel, lay out, convert: one pass."""
    crop_args = {"crop": [crop, crop], "crop_pos_x": 0.5, "crop_pos_y": 0.5} if crop else {}
    return fn.crop_mirror_normalize(images, mirror=mirror, mean=[255.0 * m for m in out.mean],
                                    std=[255.0 * s for s in out.std],
                                    output_layout="HWC" if out.channels_last else "CHW",
                                    dtype=types.FLOAT16 if out.half else types.FLOAT, **crop_args)


def random_view(images, spec: ViewSpec, out: Output, params):
    """uint8 HWC images and their drawn parameters (draw_params) -> the augmented, normalised view."""
    x = fn.resize(images, size=[spec.size, spec.size], roi_start=params[CROP : CROP + 2],
                  roi_end=params[CROP + 2 : CROP + 4], roi_relative=True, antialias=True)
    if spec.randaugment:
        x = _randaugment(x, spec, params)
    if spec.blur_p > 0:
        # Blurring before the colour operations rather than after (torchvision's order) gives the same view up to
        # clamping: both are linear, the blur's weights sum to one. It keeps the blur on uint8, where it is fast.
        x = _blur(x, spec, params)
    if _jitters(spec) or spec.gray_p > 0:
        x = _colour(x, params)
    # The flip comes last, in the normalising crop: the colour operations are per pixel, the blur kernel symmetric.
    return _normalize(x, out, mirror=fn.cast(params[FLIP], dtype=types.INT32) if spec.flip > 0 else 0)


def eval_view(images, info: DatasetInfo, size: int, out: Output):
    """Resize the shorter side to info.eval_resize(size), centre crop `size`, normalise: deterministic."""
    return _normalize(fn.resize(images, resize_shorter=info.eval_resize(size), antialias=True), out, crop=size)


def uses_conditionals(views: dict[str, ViewSpec | None]) -> bool:
    """RandAugment (DALI's auto_aug) and the blur select samples with conditional execution, which the pipeline must
    enable."""
    return any(spec is not None and (spec.randaugment or spec.blur_p) for spec in views.values())
