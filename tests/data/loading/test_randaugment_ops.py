"""Each operation of the auxiliary view's RandAugment, run by DALI's CPU backend through draw_params and random_view,
against the AAG authors' operation as their code calls PIL (AVA_cifar's augment_list at m = 10, re-stated here from
their ranges), on smooth colour images: the same op at the same list position, the same magnitude, Cutout at the
same place; translations at the bounded magnitude (10% of the side at m = 10), not their 33 px."""

from __future__ import annotations

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from pipeline.data.loading import randaugment_ops
from pipeline.data.loading.augmentations import U_RANDAUGMENT, Output, ViewSpec, draw_params, random_view, uniform_count

SIZE, M, IMAGES = 32, 10, 3
SPEC = ViewSpec(SIZE, (1.0, 1.0), (1.0, 1.0), flip=0.0, randaugment=(1, M))


def val(lo: float, hi: float) -> float:
    """Their magnitude: m / 30 * (max - min) + min."""
    return M / 30 * (hi - lo) + lo


def affine(im: Image.Image, *coefficients) -> Image.Image:
    return im.transform(im.size, Image.AFFINE, coefficients)


def cutout(im: Image.Image, centre_uniforms: np.ndarray) -> Image.Image:
    """Their CutoutAbs at v = val(0, 40) px, its centre as np.random.uniform(w) draws it (uniform in (1, w])."""
    v = val(0, 40)
    y, x = (SIZE - (SIZE - 1) * u for u in centre_uniforms)
    x0, y0 = int(max(0, x - v / 2)), int(max(0, y - v / 2))
    im = im.copy()
    ImageDraw.Draw(im).rectangle((x0, y0, min(SIZE, x0 + v), min(SIZE, y0 + v)), (125, 123, 114))
    return im


def solarize_add(im: Image.Image) -> Image.Image:
    x = np.clip(np.asarray(im).astype(np.int64) + val(0, 110), 0, 255).astype(np.uint8)
    return ImageOps.solarize(Image.fromarray(x), 128)


SHIFT = 0.1 * SIZE  # the bounded translation at m = 10
# their op at m = 10 for each sign (the signed ops: the DALI sign convention need not be PIL's), by list position
REFERENCE = {
    "auto_contrast": lambda im, s, c: ImageOps.autocontrast(im),
    "equalize": lambda im, s, c: ImageOps.equalize(im),
    "invert": lambda im, s, c: ImageOps.invert(im),
    "rotate": lambda im, s, c: im.rotate(s * val(0, 30)),
    "posterize": lambda im, s, c: ImageOps.posterize(im, int(val(0, 4))),
    "solarize": lambda im, s, c: ImageOps.solarize(im, val(0, 256)),
    "solarize_add": lambda im, s, c: solarize_add(im),
    "contrast": lambda im, s, c: ImageEnhance.Contrast(im).enhance(val(0.1, 1.9)),
    "sharpness": lambda im, s, c: ImageEnhance.Sharpness(im).enhance(val(0.1, 1.9)),
    "shear_x": lambda im, s, c: affine(im, 1, s * val(0, 0.3), 0, 0, 1, 0),
    "shear_y": lambda im, s, c: affine(im, 1, 0, 0, s * val(0, 0.3), 1, 0),
    "cutout": lambda im, s, c: cutout(im, c),
    "translate_x": lambda im, s, c: affine(im, 1, 0, s * SHIFT, 0, 1, 0),
    "translate_y": lambda im, s, c: affine(im, 1, 0, 0, 0, 1, s * SHIFT),
    "blur": lambda im, s, c: im.filter(ImageFilter.BLUR),
    "contour": lambda im, s, c: im.filter(ImageFilter.CONTOUR),
    "emboss": lambda im, s, c: im.filter(ImageFilter.EMBOSS),
    "find_edges": lambda im, s, c: im.filter(ImageFilter.FIND_EDGES),
}
# mean |DALI - PIL| in grey levels: the same arithmetic, except DALI's Equalize (OpenCV's formula for the lookup
# table), Contrast (the centre is the mean of the channel means, not of PIL's rounded luma) and Sharpness (DALI
# sharpens the 1 px border PIL leaves), and AutoContrast's rounding.
EXACT = 0.0
TOLERANCE = {"auto_contrast": 0.6, "equalize": 2.0, "contrast": 0.75, "sharpness": 0.5}


def smooth_images(rng: np.random.Generator) -> np.ndarray:
    """(IMAGES, SIZE, SIZE, 3) uint8: random 8x8 colour fields upsampled (edges for Sharpness and the filters to
    act on), values spread over 20..235."""
    small = rng.integers(20, 236, (IMAGES, 8, 8, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((SIZE, SIZE), Image.BILINEAR)) for s in small])


def run_dali(images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """random_view on the CPU: uint8 HWC images and their drawn parameters -> uint8 HWC views."""
    out = Output(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255), channels_last=True)

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, enable_conditionals=True)
    def graph():
        x = fn.external_source(source=[list(images)], layout="HWC", dtype=types.UINT8)
        p = fn.external_source(source=[list(params)], dtype=types.FLOAT)
        return random_view(x, SPEC, out, p)

    pipe = graph()
    pipe.build()
    (views,) = pipe.run()
    return np.round(np.stack([np.asarray(v) for v in views])).astype(np.int64)


def test_every_operation_is_the_authors_at_its_place_and_magnitude():
    rng = np.random.default_rng(0)
    names, count = randaugment_ops.NAMES, len(randaugment_ops.OPS)
    assert list(REFERENCE) == list(names) and count == len(names) == 18
    images = np.tile(smooth_images(rng), (2 * count, 1, 1, 1))
    rows = len(images)
    op = np.repeat(np.arange(count), 2 * IMAGES)
    sign = np.tile(np.repeat([0, 1], IMAGES), count)
    u = rng.random((rows, uniform_count(SPEC)))
    u[:, U_RANDAUGMENT] = (op + 0.5) / count
    u[:, U_RANDAUGMENT + 1] = np.where(sign == 1, 0.25, 0.75)  # uniform < 0.5 negates
    centres = u[:, U_RANDAUGMENT + 2 : U_RANDAUGMENT + 4]
    views = run_dali(images, draw_params(SPEC, u, np.full(rows, SIZE), np.full(rows, SIZE)))

    worst, least_change = {}, {}
    for i in range(rows):
        name, pil = names[op[i]], Image.fromarray(images[i])
        refs = [np.asarray(REFERENCE[name](pil, s, centres[i])).astype(np.int64) for s in (1, -1)]
        worst[name] = max(worst.get(name, 0.0), min(np.abs(views[i] - r).mean() for r in refs))
        least_change[name] = min(least_change.get(name, np.inf), *(np.abs(r - images[i]).mean() for r in refs))
        assert views[i].std() > 3.0, name  # never blank: translations keep the content inside
    failed = {name: round(d, 3) for name, d in worst.items() if d > TOLERANCE.get(name, EXACT)}
    assert not failed, failed
    # and each op changes these images by more than its tolerance, so an op left out would not pass
    assert all(least_change[name] > TOLERANCE.get(name, EXACT) for name in names), least_change


@pytest.mark.parametrize("magnitude_bin", [0, 10, 30])
def test_cutout_box_is_their_rectangle_clipped_to_the_image(magnitude_bin):
    u = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.25]])  # centres at the far corner (nothing left at m = 0), near
    boxes = randaugment_ops.cutout_boxes(u, SIZE, magnitude_bin)  # the origin, inside
    v = magnitude_bin / 30 * 40
    for (y, x), (top, left, height, width) in zip(SIZE - (SIZE - 1) * u, boxes.astype(int)):
        theirs = Image.new("L", (SIZE, SIZE))
        x0, y0 = int(max(0, x - v / 2)), int(max(0, y - v / 2))
        ImageDraw.Draw(theirs).rectangle((x0, y0, min(SIZE, x0 + v), min(SIZE, y0 + v)), 1)
        ours = np.zeros((SIZE, SIZE), np.uint8)
        ours[top : top + height, left : left + width] = 1
        np.testing.assert_array_equal(ours, np.asarray(theirs))
