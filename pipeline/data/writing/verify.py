"""Re-reads every shard of a split against its manifest: size, checksum, index, sample count, labels, and that
every image decodes. Used by `make_shards.py --verify`; any finding makes the tool exit non-zero."""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import posixpath
import tarfile

import fsspec
from tqdm import tqdm

from pipeline.worker_lifetime import die_with_parent

from ..image_bytes import CorruptImage, decode_rgb
from ..shard_format import IMAGE_EXTS, Manifest, ShardEntry, dali_index, index_name, parse_label, read_manifest


def check_shard(fs, out_dir: str, entry: ShardEntry, num_classes: int) -> list[str]:
    """Findings for one shard (empty when it is sound)."""
    path = posixpath.join(out_dir, entry.name)
    if not fs.exists(path):
        return [f"{entry.name}: missing"]
    data = fs.cat_file(path)
    problems = []
    if len(data) != entry.bytes:
        problems.append(f"{entry.name}: {len(data)} bytes, manifest says {entry.bytes}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        problems.append(f"{entry.name}: sha256 differs from the manifest")
    try:
        members, samples = _read_members(data)
    except (tarfile.TarError, ValueError) as err:
        return problems + [f"{entry.name}: unreadable tar: {err}"]
    if len(samples) != entry.samples:
        problems.append(f"{entry.name}: {len(samples)} samples, manifest says {entry.samples}")
    for key, parts in samples.items():
        images = [ext for ext in parts if ext in IMAGE_EXTS]
        if len(images) != 1 or "cls" not in parts or len(parts) != 2:
            problems.append(f"{entry.name}: sample {key} has members {sorted(parts)}, expected one image and .cls")
            continue
        try:
            parse_label(parts["cls"], num_classes)
        except ValueError as err:
            problems.append(f"{entry.name}: sample {key}: bad .cls: {err}")
        try:
            decode_rgb(parts[images[0]])
        except CorruptImage as err:
            problems.append(f"{entry.name}: sample {key}: {err}")
    idx_path = posixpath.join(out_dir, index_name(entry.name))
    if not fs.exists(idx_path):
        problems.append(f"{index_name(entry.name)}: missing")
    elif fs.cat_file(idx_path).decode() != dali_index(members):
        problems.append(f"{index_name(entry.name)}: does not match the tar's members")
    return problems


def _read_members(data: bytes) -> tuple[list[tuple[str, int, int]], dict[str, dict[str, bytes]]]:
    members, samples = [], {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            if "." not in m.name or "/" in m.name:
                raise ValueError(f"member {m.name!r} is not <key>.<ext>")
            key, ext = m.name.split(".", 1)
            members.append((m.name, m.offset_data, m.size))
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return members, samples


_state: dict = {}


def _check(entry: ShardEntry) -> list[str]:
    return check_shard(_state["fs"], _state["out_dir"], entry, _state["num_classes"])


def verify(manifest_url: str, workers: int = 1, progress: bool = True) -> list[str]:
    """All findings for the split whose manifest is at `manifest_url` (an empty list means verified)."""
    manifest: Manifest = read_manifest(manifest_url)
    fs, path = fsspec.core.url_to_fs(manifest_url)
    out_dir = posixpath.dirname(path)
    problems = [] if manifest.complete else [f"{manifest_url}: conversion not complete (re-run make_shards to finish)"]
    _state.update(fs=fs, out_dir=out_dir, num_classes=len(manifest.classes))
    bar = tqdm(total=manifest.num_samples, unit="img", desc=f"verify {manifest.dataset}/{manifest.split}",
               disable=not progress)

    def collect(results) -> None:
        for entry, found in zip(manifest.shards, results):
            problems.extend(found)
            bar.update(entry.samples)

    try:
        if workers == 1 or fs.protocol in ("memory", ("memory",)):
            collect(map(_check, manifest.shards))
        else:
            with mp.get_context("fork").Pool(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                collect(pool.imap(_check, manifest.shards))
    finally:
        bar.close()
        _state.clear()
    return problems
