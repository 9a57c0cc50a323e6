"""Reads converted shards back with the webdataset library (no decoders: raw bytes only, docs/shard-format.md)."""

from __future__ import annotations

import io
import os

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.data.shard_format import manifest_name, read_manifest


def read_samples(out_dir: str, dataset: str, split: str) -> dict[str, tuple[str, bytes, int]]:
    """key -> (image extension, image bytes, label) over every shard the manifest lists."""
    manifest = read_manifest(os.path.join(out_dir, manifest_name(dataset, split)))
    urls = [os.path.join(out_dir, s.name) for s in manifest.shards]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        ext = "jpg" if "jpg" in sample else "png"
        samples[sample["__key__"]] = (ext, sample[ext], int(sample["cls"]))
    assert len(samples) == manifest.num_samples
    return samples


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
