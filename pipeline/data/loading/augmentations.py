"""The augmentations as DALI graphs: each view of a batch is made by one named augmentation.

A method declares its views as {view name: augmentation name} (pipeline/methods); the loader builds one DALI graph
that makes every view from the same decoded image. Everything after the decoder runs in DALI, on the GPU when the
images were decoded there ("mixed"); the random parameters are drawn per sample by DALI's random operators. The
colour jitter's probability is folded into its factors (1 where not drawn); the blur runs on the drawn samples only
(DALI's conditional execution). Strengths that differ per dataset come from the dataset table (datasets.py); every
view has the side `size` (data.image_size).

Augmentations (torchvision semantics for the parameters; docs/methods.md says which method uses which):
- contrastive: random resized crop (area 0.08-1, ratio 3/4-4/3), flip 0.5, colour jitter (0.8s, 0.8s, 0.8s, 0.2s)
  with p = 0.8, grayscale p = 0.2, Gaussian blur p = 0.5 (sigma 0.1-2, window 10% of the side) where the dataset
  blurs. Small images: s = 0.5, no blur; STL-10 and ImageNet: s = 1, blur.
- crop_jitter: random resized crop (0.2-1), colour jitter (0.4, 0.4, 0.4, 0.4) always, grayscale 0.2, flip; no blur.
- randaugment: random resized crop (0.2-1), flip, RandAugment(n, m) with translations bounded to 30% of the side at
  the top magnitude (10% at m = 10) and grey (128) fill, so content stays inside the image and no view turns black.
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
from nvidia.dali.auto_aug import rand_augment

from ..datasets import DatasetInfo

RANDAUGMENT_MAX_TRANSLATE = 0.3  # of the side, at magnitude bin 30 of 31
RANDAUGMENT_FILL = 128
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


def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[lo, hi])


def _coin(p: float):
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _factor(strength: float, applied):
    """A torchvision jitter factor drawn from [max(0, 1 - strength), 1 + strength], or 1 where not applied."""
    drawn = _uniform(max(0.0, 1.0 - strength), 1.0 + strength)
    return drawn if applied is None else 1.0 + applied * (drawn - 1.0)


def _jitters(spec: ViewSpec) -> bool:
    return spec.jitter_p > 0 and any(spec.jitter)


def _colour(images, spec: ViewSpec):
    """Colour jitter with probability jitter_p, then grayscale with probability gray_p, in one colour twist: the
    grayscale is a saturation factor of 0 (luma weights 0.299, 0.587, 0.114, as torchvision's; DALI's YIQ matrices
    leave the channels within one grey level of each other). Unlike torchvision, the four jitter operations are
    applied in a fixed order, and contrast pivots on mid-grey (128) rather than on the image's mean grey. The twist
    writes float (DALI's uint8 output path is several times slower on the CPU), clamped to the pixel range as
    torchvision clamps."""
    b, c, s, h = spec.jitter
    applied = None if spec.jitter_p >= 1 else _coin(spec.jitter_p)
    args = {}
    if _jitters(spec):
        args = {"brightness": _factor(b, applied), "contrast": _factor(c, applied),
                "saturation": _factor(s, applied)}
        if h:
            hue = _uniform(-h * 360.0, h * 360.0)
            args["hue"] = hue if applied is None else applied * hue
    if spec.gray_p > 0:
        keep_colour = 1.0 - _coin(spec.gray_p)
        args["saturation"] = args["saturation"] * keep_colour if "saturation" in args else keep_colour
    return dmath.clamp(fn.color_twist(images, dtype=types.FLOAT, **args), 0.0, 255.0)


def _blur(images, spec: ViewSpec):
    """Gaussian blur of the samples drawn with probability blur_p (the others skip it: conditional execution), sigma
    drawn from 0.1-2, over a window of 10% of the side (odd) as torchvision's, capped at 13 taps (3 sigma of the
    largest sigma: the weights beyond hold under 0.3% of the kernel's mass). Two 1-D passes of fn.filter on the
    uint8 view, with each sample's kernel computed in the graph: about five times faster on the CPU than
    fn.gaussian_blur, and equal to it within rounding."""
    if fn.random.coin_flip(probability=spec.blur_p):
        radius = min(int(0.1 * spec.size) | 1, BLUR_MAX_TAPS) // 2
        sigma = _uniform(*BLUR_SIGMA)
        offsets = types.Constant(np.arange(-radius, radius + 1, dtype=np.float32))
        weights = dmath.exp(offsets * offsets * (-0.5 / (sigma * sigma)))
        weights = weights / fn.reductions.sum(weights)
        taps = 2 * radius + 1
        rows, columns = fn.reshape(weights, shape=[1, taps]), fn.reshape(weights, shape=[taps, 1])
        if images.device == "gpu":  # the kernels are computed on the CPU; the GPU filter takes them on the GPU
            rows, columns = rows.gpu(), columns.gpu()
        images = fn.filter(fn.filter(images, rows), columns)
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


def random_view(images, spec: ViewSpec, out: Output):
    """uint8 HWC images -> the augmented, normalised view."""
    x = fn.random_resized_crop(images, size=[spec.size, spec.size], random_area=list(spec.scale),
                               random_aspect_ratio=list(spec.ratio), antialias=True)
    if spec.randaugment:
        n, m = spec.randaugment
        x = rand_augment.rand_augment(x, n=n, m=m, shape=(spec.size, spec.size), fill_value=RANDAUGMENT_FILL,
                                      max_translate_rel=RANDAUGMENT_MAX_TRANSLATE)
    if spec.blur_p > 0:
        # Blurring before the colour operations rather than after (torchvision's order) gives the same view up to
        # clamping: both are linear, the blur's weights sum to one. It keeps the blur on uint8, where it is fast.
        x = _blur(x, spec)
    if _jitters(spec) or spec.gray_p > 0:
        x = _colour(x, spec)
    # The flip comes last, in the normalising crop: the colour operations are per pixel, the blur kernel symmetric.
    return _normalize(x, out, mirror=fn.random.coin_flip(probability=spec.flip) if spec.flip > 0 else 0)


def eval_view(images, info: DatasetInfo, size: int, out: Output):
    """Resize the shorter side to info.eval_resize(size), centre crop `size`, normalise: deterministic."""
    return _normalize(fn.resize(images, resize_shorter=info.eval_resize(size), antialias=True), out, crop=size)


def uses_conditionals(views: dict[str, ViewSpec | None]) -> bool:
    """RandAugment (DALI's auto_aug) and the blur select samples with conditional execution, which the pipeline must
    enable."""
    return any(spec is not None and (spec.randaugment or spec.blur_p) for spec in views.values())
