"""The sample table of a split: every sample of every shard its manifest lists, located by the shards' DALI index
files and checked against the manifest before training starts.

A missing shard or index, a size or sample count that differs from the manifest, or an index pointing past the end
of its tar is an error here (ShardError), never a hang or a short epoch later. A sample without its `.cls` label (or
without an image) is left out of the table, counted and logged with its shard and key, or is an error when strict.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

import fsspec
import numpy as np

from ..shard_format import IMAGE_EXTS, Manifest, index_name, read_manifest

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """The shards cannot be read as the manifest describes them; the message names the URL."""


@dataclass
class ShardIndex:
    manifest: Manifest
    fs: fsspec.AbstractFileSystem
    shard_paths: list[str]  # paths inside `fs`, in manifest order
    local: bool  # the shards are plain files (local disk or NFS) that POSIX reads reach
    shard: np.ndarray  # per sample: index into shard_paths (int32)
    span_start: np.ndarray  # per sample: bytes [span_start, span_end) of the tar hold its image and label (int64)
    span_end: np.ndarray
    image_offset: np.ndarray  # the image's bytes, relative to span_start (int32)
    image_size: np.ndarray
    label_offset: np.ndarray  # the .cls bytes, relative to span_start (int32)
    label_size: np.ndarray
    keys: np.ndarray  # sample keys (bytes)
    left_out: list[str] = field(default_factory=list)  # "shard/key: reason" of samples not in the table

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, row: int) -> str:
        return self.keys[row].decode()

    def where(self, row: int) -> str:
        return f"{posixpath.basename(self.shard_paths[self.shard[row]])}/{self.key(row)}"


def _sizes(fs, folder: str, paths: list[str]) -> dict[str, int]:
    """Sizes of the files that exist among `paths`: one listing of the folder, or one query per file where the
    filesystem cannot list, or lists without sizes (HTTP: a server's folder page, or none)."""
    try:
        listing = {posixpath.basename(e["name"].rstrip("/")): e["size"] for e in fs.ls(folder, detail=True)}
        sizes = {p: listing[posixpath.basename(p)] for p in paths if posixpath.basename(p) in listing}
        if None in sizes.values():
            raise ValueError("a listing without sizes")
        return sizes
    except (NotImplementedError, OSError, ValueError):
        sizes = {}
        for p in paths:
            try:
                sizes[p] = fs.size(p)
            except FileNotFoundError:
                pass
        return sizes


def _parse_index(text: str, where: str) -> list[dict[str, tuple[int, int, str]]]:
    """DALI's v1.2 index (`wds2idx`): one line per sample of `ext offset size name` groups.
    Returns per sample: ext -> (offset, size, key)."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2":
        raise ShardError(f"{where}: not a DALI v1.2 index (first line {lines[0] if lines else ''!r})")
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ShardError(f"{where}: line {number} is not groups of `ext offset size name`")
        sample = {}
        for k in range(0, len(fields), 4):
            ext, offset, size, name = fields[k : k + 4]
            sample[ext] = (int(offset), int(size), name.split(".", 1)[0])
        samples.append(sample)
    if len(samples) != int(head[1]):
        raise ShardError(f"{where}: header announces {head[1]} samples, {len(samples)} lines follow")
    return samples


def shard_files(manifest_url: str, manifest: Manifest) -> tuple[fsspec.AbstractFileSystem, str, list[str], list[str],
                                                                  dict[str, int]]:
    """(filesystem, folder, shard paths, index paths, sizes of those that exist) of a manifest's split."""
    fs, manifest_path = fsspec.core.url_to_fs(manifest_url)
    folder = posixpath.dirname(manifest_path)
    paths = [posixpath.join(folder, e.name) for e in manifest.shards]
    index_paths = [posixpath.join(folder, index_name(e.name)) for e in manifest.shards]
    return fs, folder, paths, index_paths, _sizes(fs, folder, paths + index_paths)


def missing_files(manifest_url: str, manifest: Manifest) -> str:
    """Why the shard and index files the manifest lists are not all there ("" when they are): the check a run makes
    before it claims its run dir."""
    _, _, paths, index_paths, sizes = shard_files(manifest_url, manifest)
    return _missing(manifest_url, paths + index_paths, sizes)


def _missing(manifest_url: str, paths: list[str], sizes: dict[str, int]) -> str:
    missing = [posixpath.basename(p) for p in paths if p not in sizes]
    if not missing:
        return ""
    return (f"{manifest_url}: {len(missing)} shard or index file(s) missing beside the manifest, "
            f"e.g. {', '.join(missing[:5])}")


def open_index(manifest_url: str, strict: bool = False) -> ShardIndex:
    """Reads the manifest and every shard's index; raises ShardError unless the shards are what the manifest says."""
    try:
        manifest = read_manifest(manifest_url)
        if not manifest.complete:
            raise ShardError(f"{manifest_url}: the conversion did not finish; re-run tools/make_shards.py to "
                             "complete it")
        if not manifest.shards:
            raise ShardError(f"{manifest_url}: lists no shards")
        fs, folder, paths, index_paths, sizes = shard_files(manifest_url, manifest)
    except FileNotFoundError as err:
        raise ShardError(str(err)) from err
    except (ValueError, ImportError, OSError) as err:
        raise ShardError(f"cannot read the manifest {manifest_url}: {err}") from err
    missing = _missing(manifest_url, paths + index_paths, sizes)
    if missing:
        raise ShardError(missing)
    wrong = [f"{e.name} ({sizes[p]} bytes, manifest says {e.bytes})"
             for e, p in zip(manifest.shards, paths) if sizes[p] != e.bytes]
    if wrong:
        raise ShardError(f"{manifest_url}: shards differ from the manifest: {', '.join(wrong[:5])}")

    texts = {posixpath.basename(k): v for k, v in fs.cat(index_paths).items()}
    columns: dict[str, list] = {k: [] for k in ("shard", "start", "end", "img", "img_size", "cls", "cls_size", "key")}
    left_out: list[str] = []
    for s, (entry, index_path) in enumerate(zip(manifest.shards, index_paths)):
        samples = _parse_index(texts[posixpath.basename(index_path)].decode(), fs.unstrip_protocol(index_path))
        if len(samples) != entry.samples:
            raise ShardError(f"{manifest_url}: {entry.name} holds {len(samples)} samples by its index, "
                             f"the manifest says {entry.samples}")
        for sample in samples:
            images = [ext for ext in sample if ext in IMAGE_EXTS]
            key = next(iter(sample.values()))[2]
            if len(images) != 1 or "cls" not in sample:
                reason = "no label (.cls)" if len(images) == 1 else f"{len(images)} images"
                if strict:
                    raise ShardError(f"{entry.name}/{key}: {reason} (strict)")
                left_out.append(f"{entry.name}/{key}: {reason}")
                continue
            (img, img_size, _), (cls, cls_size, _) = sample[images[0]], sample["cls"]
            start, end = min(img, cls), max(img + img_size, cls + cls_size)
            if end > entry.bytes:
                raise ShardError(f"{entry.name}/{key}: its index points past the end of the tar "
                                 f"({end} > {entry.bytes})")
            values = (s, start, end, img - start, img_size, cls - start, cls_size, key.encode())
            for name, value in zip(columns, values):
                columns[name].append(value)
    if not columns["key"]:
        raise ShardError(f"{manifest_url}: no usable sample in {len(paths)} shards")
    for line in left_out[:20]:
        log.warning("left out %s", line)
    if left_out:
        log.warning("%s: %d sample(s) left out of %d", manifest_url, len(left_out), manifest.num_samples)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return ShardIndex(
        manifest=manifest, fs=fs, shard_paths=paths, local=local,
        shard=np.asarray(columns["shard"], np.int32), span_start=np.asarray(columns["start"], np.int64),
        span_end=np.asarray(columns["end"], np.int64), image_offset=np.asarray(columns["img"], np.int32),
        image_size=np.asarray(columns["img_size"], np.int32), label_offset=np.asarray(columns["cls"], np.int32),
        label_size=np.asarray(columns["cls_size"], np.int32), keys=np.asarray(columns["key"]), left_out=left_out,
    )
