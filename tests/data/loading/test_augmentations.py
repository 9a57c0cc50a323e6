"""Statistics of the augmentations, run by DALI's CPU backend on a few thousand samples of real shards:
crop areas and aspect ratios within the configured ranges, flips and grayscale at their probabilities, the AASAE
target equal to the eval transform, an auxiliary view that differs from the standard ones and is rarely flat; and
the output formats (dtype, channels-last)."""

from __future__ import annotations

import dataclasses
import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter1d

from pipeline.data.datasets import DATASETS
from pipeline.data.loading.augmentations import ViewSpec, contrastive, crop_flip, crop_jitter, randaugment_view
from pipeline.data.loading.loader import ShardLoader
from tests.helpers.loader_data import RAMP_SIDE, colour_samples, make_loader, noise_samples, ramp_samples, write_split

CIFAR_CLASSES = [str(k) for k in range(10)]
N = 2000
MEAN, STD = (np.asarray(v, np.float32)[None, :, None, None]
             for v in (DATASETS["cifar10"].mean, DATASETS["cifar10"].std))


def epoch_views(loader: ShardLoader) -> dict[str, np.ndarray]:
    """name -> (N, 3, H, W) pixels in 0..255 (normalisation undone) over one epoch, padding dropped."""
    views: dict[str, list] = {}
    for batch in loader:
        keep = batch.valid.numpy()
        for name, x in batch.views.items():
            views.setdefault(name, []).append((x.float().numpy()[keep] * STD + MEAN) * 255)
    loader.close()
    return {name: np.concatenate(parts) for name, parts in views.items()}


def is_gray(pixels: np.ndarray) -> np.ndarray:
    spread = np.abs(pixels - pixels.mean(axis=1, keepdims=True)).max(axis=(1, 2, 3))
    return spread < 1.0


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    return write_split(str(tmp_path_factory.mktemp("colour")), "cifar10", "train", colour_samples(N), [700, 650, 650],
                       CIFAR_CLASSES)


@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    return write_split(str(tmp_path_factory.mktemp("ramps")), "cifar10", "train", ramp_samples(N), [1000, 1000],
                       CIFAR_CLASSES)


def geometry_only(spec: ViewSpec) -> ViewSpec:
    """The view's crop and flip, without the colour operations that would change the ramp's values."""
    return dataclasses.replace(spec, jitter_p=0.0, gray_p=0.0, blur_p=0.0, randaugment=None)


@pytest.mark.slow
def test_crop_areas_aspect_ratios_and_flips(ramps):
    cifar = DATASETS["cifar10"]
    specs = {name: make(cifar, 32, (2, 10)) for name, make in
             (("contrastive", contrastive), ("crop_jitter", crop_jitter), ("randaugment", randaugment_view),
              ("crop_flip", crop_flip))}
    loader = make_loader(ramps, method="aag", batch_size=500)
    loader.views = {name: geometry_only(spec) for name, spec in specs.items()}
    views = epoch_views(loader)
    for name, spec in specs.items():
        red, green = views[name][:, 0], views[name][:, 1]  # 4x and 4y of the source pixel
        size = red.shape[-1]
        # the first and last output columns sample the crop 0.5 and size - 0.5 output pixels from its edges
        dx = (red[:, :, -1] - red[:, :, 0]).mean(axis=1) / 4 * size / (size - 1)
        dy = (green[:, -1, :] - green[:, 0, :]).mean(axis=1) / 4 * size / (size - 1)
        area = np.abs(dx * dy) / RAMP_SIDE**2
        aspect = np.abs(dx / dy)
        lo, hi = spec.scale
        assert area.min() >= lo - 0.02 and area.max() <= hi + 0.02, (name, area.min(), area.max())
        assert area.min() < lo + 0.05 and area.max() > 0.9, name  # the whole range is drawn from
        # boxes are whole pixels, as torchvision draws them: half a pixel off on each side of the smallest crop
        slack = 1 + 1 / np.sqrt(lo * RAMP_SIDE**2)
        assert aspect.min() >= spec.ratio[0] / slack - 0.02 and aspect.max() <= spec.ratio[1] * slack + 0.02, name
        assert abs((dx < 0).mean() - spec.flip) < 0.05, name
        assert (dy > 0).all(), name  # never flipped vertically


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "aag"])
def test_grayscale_at_its_probability(colour, method):
    views = epoch_views(make_loader(colour, method=method, batch_size=500))
    for name in ("u", "v"):
        assert abs(is_gray(views[name]).mean() - 0.2) < 0.03, name
    if method == "aag":  # the auxiliary view has no grayscale: only its rare flat views (one level) are grey
        w = views["w"]
        assert not is_gray(w[w.std(axis=(1, 2, 3)) >= 3]).any()


@pytest.mark.slow
def test_blur_is_a_gaussian_of_the_configured_window_applied_half_the_time(tmp_path):
    """STL-10 profile: 96 px views, 9-tap window (10% of the side). Full-image crops of noise images, so that an
    unblurred view is the image itself and a blurred one must match some sigma in 0.1-2."""
    samples = noise_samples(400)
    manifest = write_split(str(tmp_path), "stl10", "train", samples, [400], CIFAR_CLASSES)
    loader = make_loader(manifest, batch_size=100, shuffle=False, views={"image": "crop_flip"})
    loader.views = {"image": ViewSpec(96, (1.0, 1.0), (1.0, 1.0), flip=0.0, blur_p=0.5)}
    stl10 = DATASETS["stl10"]
    mean, std = (np.asarray(v, np.float32)[None, :, None, None] for v in (stl10.mean, stl10.std))
    views = np.round(np.concatenate([b.views["image"].numpy() for b in loader]) * std * 255 + mean * 255)
    loader.close()
    # the conditional pipeline's autograph sources are gone once it is built: a killed rank leaves none in /tmp
    generated = [m.__file__ for n, m in sys.modules.items() if n.startswith("__autograph_generated_file")]
    assert generated and not any(map(os.path.exists, generated))
    originals = np.stack([np.asarray(Image.open(io.BytesIO(parts["png"]))) for _, parts in samples])
    originals = originals.transpose(0, 3, 1, 2).astype(np.float64)
    changed = np.abs(views - originals).max(axis=(1, 2, 3)) > 0
    # P(blur) * P(sigma large enough to change a uint8 value, about > 0.25) = 0.5 * 0.92
    assert abs(changed.mean() - 0.46) < 0.07
    def blur(image, sigma):  # a 9-tap Gaussian, reflecting at the borders, rounded to uint8 after each pass
        for axis in (2, 1):
            image = np.round(gaussian_filter1d(image, sigma, axis=axis, mode="mirror", truncate=4 / sigma))
        return image

    for view, original in zip(views[changed][:20], originals[changed][:20]):
        assert min(np.abs(view - blur(original, s)).mean() for s in np.arange(0.1, 2.005, 0.01)) < 1.0


@pytest.mark.slow
def test_aasae_target_is_the_eval_transform_and_the_view_is_augmented(colour):
    aasae = make_loader(colour, method="aasae", seed=5, batch_size=500)
    evaluation = make_loader(colour, seed=5, batch_size=500)
    for pair, single in zip(aasae, evaluation):
        assert pair.keys == single.keys
        torch.testing.assert_close(pair.views["target"], single.views["image"], rtol=0, atol=0)
        differs = (pair.views["view"] - pair.views["target"]).abs().flatten(1).mean(1) > 0.05
        assert differs.float().mean() > 0.95
    aasae.close()
    evaluation.close()


@pytest.mark.slow
def test_auxiliary_view_differs_from_the_standard_views_and_is_rarely_flat(colour):
    views = epoch_views(make_loader(colour, method="aag", batch_size=500))
    u, v, w = views["u"], views["v"], views["w"]
    for standard in (u, v):
        assert (np.abs(w - standard).mean(axis=(1, 2, 3)) > 5).all()
    # The authors' unbounded translations (33 px at m = 10) would leave 1 - (16/18)^2 = 21% of 32 px views one flat
    # fill; bounded, none. What is flat here comes from their filters on these smooth images (FIND_EDGES leaves
    # almost nothing, and a second op can finish it): 0.4% measured.
    assert (w.std(axis=(1, 2, 3)) < 3).mean() < 0.02


@pytest.mark.parametrize("dtype, channels_last", [("bfloat16", False), ("float16", True), ("float32", True),
                                                  ("float32", None)])  # None: on for CUDA only
def test_output_dtype_and_layout(colour, dtype, channels_last):
    reference = next(iter(make_loader(colour, shuffle=False)))
    batch = next(iter(make_loader(colour, shuffle=False, dtype=dtype, channels_last=channels_last)))
    image = batch.views["image"]
    assert image.shape == (64, 3, 32, 32) and image.dtype == getattr(torch, dtype)
    assert image.is_contiguous(memory_format=torch.channels_last) == bool(channels_last)  # the CPU: off by default
    torch.testing.assert_close(image.float(), reference.views["image"], atol=0.02, rtol=0.01)
    assert batch.labels.dtype == torch.int64 and batch.keys == reference.keys
