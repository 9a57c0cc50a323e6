"""Shards for the loader tests: real digits, colour and coordinate-ramp images, split into shards of chosen (uneven)
sizes, and deliberately broken samples. Written in the shard format of docs/shard-format.md (tar + DALI index +
manifest)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import posixpath
import tarfile
from functools import lru_cache

import fsspec
import numpy as np
from PIL import Image

from pipeline.data.image_bytes import encode_pixels
from pipeline.data.loading.loader import ShardLoader
from pipeline.data.loading.loader_config import LoaderConfig, LoaderTuning
from pipeline.data.shard_format import Manifest, ShardEntry, dali_index, index_name, manifest_name, shard_name
from pipeline.data.writing.sources import build_source
from pipeline.methods import METHODS

Sample = tuple[str, dict[str, bytes]]  # key, ext -> member bytes (tar order)


TUNING = {f.name for f in dataclasses.fields(LoaderTuning)}


def make_loader(manifest: str, rank: int = 0, world: int = 1, method: str | None = None, **options) -> ShardLoader:
    """A CPU loader for tests: the center_crop view (or the views `method` declares), batches of 64, two DALI threads
    and one reader unless `options` (LoaderConfig's or LoaderTuning's fields) say otherwise."""
    tuning = {"num_threads": 2, "read_workers": 1, "device": "cpu", **{k: v for k, v in options.items() if k in TUNING}}
    use = {"batch_size": 64, **{k: v for k, v in options.items() if k not in TUNING}}
    if method:
        use["views"] = METHODS[method].views
    return ShardLoader(LoaderConfig(manifest=manifest, tuning=LoaderTuning(**tuning), **use), rank, world)


def labelled(key: str, image: bytes, label: int, ext: str = "png") -> Sample:
    return key, {ext: image, "cls": str(label).encode()}


def write_split(url: str, dataset: str, split: str, samples: list[Sample], sizes: list[int],
                classes: list[str]) -> str:
    """Writes `samples` as shards of the given sizes to any fsspec folder URL; returns the manifest URL."""
    assert sum(sizes) == len(samples)
    fs, folder = fsspec.core.url_to_fs(url)
    fs.makedirs(folder, exist_ok=True)
    entries, start = [], 0
    for number, size in enumerate(sizes):
        name, buf, members = shard_name(dataset, split, number), io.BytesIO(), []
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, parts in samples[start : start + size]:
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    members.append((info.name, tar.offset + tarfile.BLOCKSIZE, len(data)))
                    tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        fs.pipe_file(posixpath.join(folder, name), data)
        fs.pipe_file(posixpath.join(folder, index_name(name)), dali_index(members).encode())
        entries.append(ShardEntry(name, size, len(data), hashlib.sha256(data).hexdigest()))
        start += size
    manifest = Manifest(dataset=dataset, split=split, classes=classes, synsets=None, plan="loader-tests", options={},
                        shards=entries, complete=True)
    path = posixpath.join(folder, manifest_name(dataset, split))
    fs.pipe_file(path, manifest.to_json().encode())
    return fs.unstrip_protocol(path)


@lru_cache(maxsize=None)
def digits_samples() -> list[Sample]:
    """The 1,438 real digits training images (32x32 RGB PNG), labels 0..9."""
    source = build_source("digits", None, "train")
    return [labelled(r.key, encode_pixels(r.payload, "png"), r.label) for r in map(source.read, range(len(source)))]


DIGIT_CLASSES = [str(d) for d in range(10)]


def digits_split(url: str, sizes: list[int]) -> str:
    return write_split(url, "digits", "train", digits_samples(), sizes, DIGIT_CLASSES)


@lru_cache(maxsize=None)
def colour_samples(count: int, side: int = 32, seed: int = 0) -> list[Sample]:
    """Smooth random colour images: in every pixel two channels differ by 88 or more, so a grayscale view is
    unmistakable."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        strong, weak = rng.permutation(3)[:2]
        coarse = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
        coarse[..., strong] = rng.integers(128, 256, (3, 3))  # a strong and a weak channel: saturated colours
        coarse[..., weak] = rng.integers(0, 40, (3, 3))
        pixels = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR))
        samples.append(labelled(f"colour_{i:05d}", encode_pixels(pixels, "png"), i % 10))
    return samples


@lru_cache(maxsize=None)
def noise_samples(count: int, side: int = 96) -> list[Sample]:
    rng = np.random.default_rng(1)
    return [labelled(f"noise_{i:05d}", encode_pixels(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "png"), 0)
            for i in range(count)]


RAMP_SIDE = 64


@lru_cache(maxsize=None)
def ramp_samples(count: int) -> list[Sample]:
    """64x64 images whose red channel is 4x and green channel 4y: a view's pixels tell where it was cropped from and
    whether it was flipped."""
    y, x = np.mgrid[0:RAMP_SIDE, 0:RAMP_SIDE]
    samples = []
    for i in range(count):
        pixels = np.stack([4 * x, 4 * y, np.full_like(x, 37 + i % 150)], axis=-1).astype(np.uint8)
        samples.append(labelled(f"ramp_{i:05d}", encode_pixels(pixels, "png"), i % 10))
    return samples
