"""Images per second of the DALI shard loader against a plain PIL + torch DataLoader reference that reads the same
shards (webdataset) and applies the same augmentations, in the same run; prints both and their ratio.

    python tools/bench_loader.py --synthetic 96                 # STL-10-like 96 px PNGs, contrastive views with blur
    python tools/bench_loader.py --synthetic 224                # ImageNet-like JPEGs, 224 px contrastive views
    python tools/bench_loader.py --synthetic 224 --method aag --device cuda     # AAG's three views on a GPU
    python tools/bench_loader.py --manifest s3://b/imagenet-train.manifest.json --device cuda   # a GPU run

From another script (the GPU check): `from tools.bench_loader import run; figures = run([...same arguments...])`
with the repository on sys.path; it prints the same lines and returns the figures as a dict.

The reference mirrors torchvision's PIL code paths (RandomResizedCrop, ColorJitter in random order, Grayscale,
horizontal flip, PIL's GaussianBlur, ToTensor + Normalize). Views with RandAugment (aag's w) have no reference here,
so with them the DALI loader is timed alone (as with `--no-reference`).
`--method NAME` times the views that method declares; `--augmentation NAME` one view of that augmentation.
Both sides get the same CPU budget: DALI `--threads` CPU threads and `--readers` byte-reading processes, the
reference `--threads` DataLoader workers. Each side is timed `--rounds` times, alternating, each time over
`--seconds` of batches after `--warmup` untimed ones (so a GPU's fast batches are timed as long as a CPU's), running
on into the next epoch when one ends (DALI's stream goes on; the reference keeps its workers); the best round of each
counts: on a machine shared with other work that is the figure least disturbed by it. The DALI loader's start-up
(building it until its first batch) is printed too.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import statistics
import sys
import tempfile
import time
from typing import NoReturn

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageEnhance, ImageFilter

from pipeline.arg_types import non_negative_int, positive_float, positive_int
from pipeline.data.datasets import dataset_info
from pipeline.data.loading.augmentations import AUGMENTATIONS, ViewSpec, view_specs
from pipeline.data.loading.loader import ShardLoader
from pipeline.data.loading.loader_config import LoaderConfig, LoaderTuning
from pipeline.data.loading.shard_index import ShardError
from pipeline.data.shard_format import manifest_name, read_manifest
from pipeline.data.writing.convert import ConvertOptions, convert
from pipeline.data.writing.sources.base import Record, Source
from pipeline.device import DeviceError, pick
from pipeline.exit_codes import BAD_CONFIG
from pipeline.methods import METHODS


# -- synthetic shards ----------------------------------------------------------------------------------------------
class SyntheticImages(Source):
    """Smooth random colour fields with some texture (compressible like photographs, which noise is not). 96 px:
    pixel arrays, which the converter stores as PNG as it does real STL-10; 224: ImageNet-sized JPEG files."""

    SPLIT = "train"

    def __init__(self, dataset: str, count: int, side: int):
        self.dataset, self.split, self.count, self.side = dataset, self.SPLIT, count, side
        self.classes = [str(k) for k in range(10)]

    def __len__(self) -> int:
        return self.count

    def key(self, i: int) -> str:
        return f"img_{i:07d}"

    def read(self, i: int) -> Record:
        rng = np.random.default_rng(i)
        jpeg = self.side > 96
        w, h = (int(rng.integers(400, 501)), int(rng.integers(300, 401))) if jpeg else (self.side, self.side)
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.clip(np.asarray(coarse, np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        if not jpeg:
            return Record(self.key(i), i % 10, pixels, f"synthetic[{i}]")
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        return Record(self.key(i), i % 10, buf.getvalue(), f"synthetic[{i}]")


def synthetic_shards(side: int, count: int, folder: str) -> str:
    source = SyntheticImages("stl10" if side <= 96 else "imagenet", count, side)
    convert(source, folder, ConvertOptions(samples_per_shard=256, workers=os.cpu_count() or 1), progress=False)
    return os.path.join(folder, manifest_name(source.dataset, SyntheticImages.SPLIT))


# -- the reference: PIL + torch DataLoader -------------------------------------------------------------------------
def _crop_box(width: int, height: int, spec: ViewSpec) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params."""
    area = width * height
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*spec.scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x, y = random.randint(0, width - w), random.randint(0, height - h)
            return x, y, x + w, y + h
    ratio = width / height
    w, h = (width, int(round(width / spec.ratio[0]))) if ratio < spec.ratio[0] else (
        (int(round(height * spec.ratio[1])), height) if ratio > spec.ratio[1] else (width, height))
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def _hue(image: Image.Image, shift: float) -> Image.Image:
    """torchvision's adjust_hue for PIL images."""
    h, s, v = image.convert("HSV").split()
    h = Image.fromarray((np.asarray(h, np.uint8) + np.uint8(int(shift * 255) % 256)).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _jitter(image: Image.Image, spec: ViewSpec) -> Image.Image:
    ops = []
    for strength, enhance in zip(spec.jitter[:3], (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)):
        if strength:
            factor = random.uniform(max(0.0, 1 - strength), 1 + strength)
            ops.append(lambda im, e=enhance, f=factor: e(im).enhance(f))
    if spec.jitter[3]:
        shift = random.uniform(-spec.jitter[3], spec.jitter[3])
        ops.append(lambda im, s=shift: _hue(im, s))
    random.shuffle(ops)
    for op in ops:
        image = op(image)
    return image


class ReferenceView:
    def __init__(self, spec: ViewSpec | None, resize: int, size: int, mean, std):
        self.spec, self.resize, self.size = spec, resize, size
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        spec = self.spec
        if spec is None:
            w, h = image.size
            scale = self.resize / min(w, h)
            image = image.resize((max(self.resize, int(w * scale)), max(self.resize, int(h * scale))), Image.BILINEAR)
            left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        else:
            image = image.resize((spec.size, spec.size), Image.BILINEAR, box=_crop_box(*image.size, spec))
            if random.random() < spec.flip:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if random.random() < spec.jitter_p:
                image = _jitter(image, spec)
            if random.random() < spec.gray_p:
                image = image.convert("L").convert("RGB")
            if random.random() < spec.blur_p:
                image = image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        x = torch.from_numpy(np.asarray(image, np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std


class ReferenceSample:
    def __init__(self, views: dict[str, ReferenceView]):
        self.views = views

    def __call__(self, sample: dict) -> tuple[dict[str, torch.Tensor], int]:
        data = sample.get("jpg") or sample["png"]
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return {name: view(image) for name, view in self.views.items()}, int(sample["cls"])


def reference_loader(manifest_url: str, views: dict[str, str], batch: int, workers: int):
    manifest = read_manifest(manifest_url)
    info = dataset_info(manifest.dataset)
    size = info.image_size
    views = {name: ReferenceView(spec, info.eval_resize(size), size, info.mean, info.std)
             for name, spec in view_specs(views, info, size).items()}
    folder = manifest_url.rsplit("/", 1)[0]
    urls = [f"{folder}/{s.name}" for s in manifest.shards]
    # raw bytes only: no automatic decoders (docs/shard-format.md)
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=None, workersplitter=wds.split_by_worker,
                              empty_check=False)
               .shuffle(1000).map(ReferenceSample(views)))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers else None)


# -- timing --------------------------------------------------------------------------------------------------------
def stream(epoch):
    """Batches of epoch after epoch, so that a timing window may run past an epoch's end."""
    while True:
        yield from epoch()


def images_per_second(batches, warmup: int, seconds: float) -> tuple[float, int]:
    """Throughput over the batches that arrive within at least `seconds` after `warmup` untimed ones (start-up, and
    the queue this side filled while the other was timed), and how many batches were timed."""
    for _ in range(warmup):
        next(batches)
    images, timed, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += len(next(batches))
        timed += 1
    return images / (time.perf_counter() - start), timed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--manifest", help="URL of an existing split's manifest")
    data.add_argument("--synthetic", type=int, choices=(96, 224),
                      help="make STL-10-like (96) or ImageNet-like (224) shards")
    parser.add_argument("--images", type=non_negative_int, default=0,
                        help="synthetic images (default 2048 at 96 px, 1536 at 224)")
    parser.add_argument("--work", default="", help="folder for synthetic shards (default: a temporary one)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--method", choices=sorted(METHODS), help="time the views this method declares (default simclr)")
    which.add_argument("--augmentation", choices=sorted(AUGMENTATIONS), help="time one view of this augmentation")
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before each timed round")
    parser.add_argument("--seconds", type=positive_float, default=3.0,
                        help="at least this long timed per round and side")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--readers", type=positive_int, default=1, help="DALI byte-reading worker processes")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to decode with nvJPEG and augment on the GPU "
                        "(AUGSSL_DEVICE, when set, overrides it, as for the trainer)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="rounds timed per loader, alternating; best counts")
    parser.add_argument("--no-reference", action="store_true", help="time the DALI loader only")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first batch includes the start-up)")
    return args


def _refuse(err: Exception) -> NoReturn:
    print(f"bench_loader: {err}", file=sys.stderr)
    raise SystemExit(BAD_CONFIG) from None


def run(argv: list[str] | None = None) -> dict:
    """Benchmark as the command line says; prints the figures and returns them: images/s of the DALI loader (best
    and median of the rounds), its start-up seconds, and the reference's and the ratio when there is one."""
    args = parse_args(argv)
    try:
        device = pick(args.device)  # as the trainer picks it (AUGSSL_DEVICE first); before any shards are made
    except DeviceError as err:
        _refuse(err)
    with tempfile.TemporaryDirectory(dir=args.work or None) as tmp:
        manifest = args.manifest or synthetic_shards(
            args.synthetic, args.images or (2048 if args.synthetic == 96 else 1536), os.path.join(tmp, "shards"))
        views = {"image": args.augmentation} if args.augmentation else METHODS[args.method or "simclr"].views
        cfg = LoaderConfig(manifest=manifest, views=views, batch_size=args.batch,
                           tuning=LoaderTuning(num_threads=args.threads, read_workers=args.readers, prefetch=2,
                                               device=str(device)))
        start = time.perf_counter()
        try:
            loader = ShardLoader(cfg)
        except (ShardError, ValueError) as err:  # a manifest or shards it cannot read, settings it refuses
            _refuse(err)

        def dali_epoch():
            for batch in loader:
                if loader.device.type == "cuda":
                    torch.cuda.synchronize()
                yield [key for key, real in zip(batch.keys, batch.valid.tolist()) if real]

        dali_batches = stream(dali_epoch)
        next(dali_batches)
        figures = {"dali_startup_s": time.perf_counter() - start}
        print(f"{loader.index.manifest.dataset}: {len(loader.index)} images, views {views} of {loader.image_size} px, "
              f"batch {args.batch}, {args.threads} thread(s), device {loader.device}; DALI loader's first batch "
              f"after {figures['dali_startup_s']:.1f} s", flush=True)
        info = dataset_info(loader.index.manifest.dataset)
        randaugment = [name for name, spec in view_specs(views, info, loader.image_size).items()
                       if spec is not None and spec.randaugment]
        if randaugment and not args.no_reference:
            print(f"no PIL reference for RandAugment views ({', '.join(randaugment)}): DALI loader alone", flush=True)
        reference = None
        if not (args.no_reference or randaugment):
            pil = reference_loader(manifest, views, args.batch, args.threads)
            reference = stream(lambda: (labels for _, labels in pil))
        dali, ref = [], []
        for rounds in range(args.rounds):  # alternating, so that a burst of other load does not favour one side
            dali.append(images_per_second(dali_batches, args.warmup, args.seconds))
            print(f"round {rounds + 1}: DALI loader {dali[-1][0]:8.1f} images/s over {dali[-1][1]} batches", flush=True)
            if reference is not None:
                ref.append(images_per_second(reference, args.warmup, args.seconds))
                print(f"         PIL + DataLoader {ref[-1][0]:8.1f} images/s over {ref[-1][1]} batches", flush=True)
        loader.close()
    figures["dali_best"] = max(rate for rate, _ in dali)
    figures["dali_median"] = statistics.median(r for r, _ in dali)
    print(f"DALI loader:       best {figures['dali_best']:8.1f} images/s, median {figures['dali_median']:8.1f}")
    if ref:
        figures["reference_best"] = max(rate for rate, _ in ref)
        figures["reference_median"] = statistics.median(r for r, _ in ref)
        figures["ratio"] = figures["dali_best"] / figures["reference_best"]
        print(f"PIL + DataLoader:  best {figures['reference_best']:8.1f} images/s, median "
              f"{figures['reference_median']:8.1f}")
        print(f"ratio DALI / reference (best of {args.rounds} each): {figures['ratio']:.2f}x", flush=True)
    return figures


if __name__ == "__main__":
    run()
