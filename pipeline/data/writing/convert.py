"""Converts a dataset source into shards: plan, write in parallel, resume, report.

Crash safety: shards are written under `_partial/{dataset}-{split}/` (one folder per split, so conversions of
different splits can share an output folder at the same time) and moved to their final names only when complete; the
manifest is rewritten (atomically) after every finished shard, so a re-run verifies what is listed by checksum, skips
it, and writes only what is missing. The plan (which samples go in which shard) is a pure function of the source listing
and the options, and its fingerprint guards a folder against being resumed with another dataset or other options.

One conversion per split at a time: in a local (or NFS) folder it holds `{dataset}-{split}.lock` beside the manifest
(flock, which the kernel drops when its holder dies), and a second conversion of that split refuses instead of
deleting the first one's partial shards. Object stores have no such lock: there two conversions of one split are not
detected (each manifest write replaces the whole object; the last writer wins).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import posixpath
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from pipeline.worker_lifetime import die_with_parent

from ..image_bytes import MAX_PIXELS, CorruptImage, encode_pixels, normalise_encoded
from ..shard_format import (
    Manifest,
    ShardEntry,
    index_name,
    manifest_name,
    read_manifest,
    report_name,
    shard_name,
    split_slug,
)
from .shard_writer import Sample, ShardWriter
from .sources import Source

PARTIAL_DIR = "_partial"
_TAR_OVERHEAD = 2048  # two USTAR headers and padding per sample, for byte-based planning


class ConversionError(RuntimeError):
    """The run cannot go on: a strict-mode bad image, an output folder holding other data, a bad option."""


@dataclass
class ConvertOptions:
    samples_per_shard: int = 1000
    max_shard_bytes: int = 0  # 0: no byte limit
    workers: int = 1
    shuffle: bool = True
    seed: int = 0
    image_format: str = "png"  # for raw-pixel sources: png (lossless) or jpg
    jpeg_quality: int = 95
    strict: bool = False
    overwrite: bool = False
    max_pixels: int = MAX_PIXELS  # an image whose header claims more is refused (reported), never decoded

    def __post_init__(self):
        if self.samples_per_shard < 1:
            raise ConversionError("samples per shard must be at least 1")
        if self.max_shard_bytes < 0 or self.workers < 1 or self.max_pixels < 1:
            raise ConversionError("shard bytes must be >= 0, workers and max pixels >= 1")
        if self.image_format not in ("png", "jpg"):
            raise ConversionError(f"image format must be png or jpg, not {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConversionError("JPEG quality must be within 1..100")


@dataclass
class Summary:
    dataset: str
    split: str
    samples: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_resumed: int = 0
    bytes: int = 0
    skipped_samples: int = 0
    converted_samples: int = 0
    seconds: float = 0.0
    manifest: str = ""

    def __str__(self) -> str:
        rate = self.samples / self.seconds if self.seconds else 0.0
        return (f"{self.dataset}/{self.split}: {self.samples} samples in {self.shards} shards "
                f"({self.shards_written} written, {self.shards_resumed} already complete), {self.bytes / 1e6:.1f} MB, "
                f"{self.skipped_samples} skipped, {self.converted_samples} converted, {self.seconds:.1f} s "
                f"({rate:.0f} img/s); manifest {self.manifest}")


def plan_shards(source: Source, opts: ConvertOptions) -> list[list[int]]:
    """Sample indices per shard: a seeded permutation (so shards mix classes) cut by count and by estimated bytes."""
    n = len(source)
    order = np.random.default_rng(opts.seed).permutation(n) if opts.shuffle else np.arange(n)
    shards: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for i in order.tolist():
        size = source.size_hint(i) + _TAR_OVERHEAD
        full = len(current) >= opts.samples_per_shard
        too_big = opts.max_shard_bytes and current_bytes + size > opts.max_shard_bytes
        if current and (full or too_big):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(i)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def plan_fingerprint(source: Source, opts: ConvertOptions, plan: list[list[int]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "dataset": source.dataset, "split": source.split, "source": source.options(),
        "image_format": opts.image_format, "jpeg_quality": opts.jpeg_quality,
    }, sort_keys=True).encode())
    for shard in plan:
        h.update(b"\n" + "\0".join(source.key(i) for i in shard).encode())
    return h.hexdigest()


def file_sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def partial_dir(out_dir: str, source: Source) -> str:
    return posixpath.join(out_dir, PARTIAL_DIR, f"{source.dataset}-{split_slug(source.split)}")


def write_atomic(fs, path: str, text: str, tmp_dir: str) -> None:
    tmp = posixpath.join(tmp_dir, posixpath.basename(path))
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, path)


# -- the worker side: module state set before forking, so sources are shared rather than pickled -----------------
_job_state: dict = {}


def _encode(source: Source, i: int, opts: ConvertOptions):
    record = source.read(i)
    if isinstance(record.payload, np.ndarray):
        return record, opts.image_format, encode_pixels(record.payload, opts.image_format, opts.jpeg_quality), None
    return (record, *normalise_encoded(record.payload, opts.max_pixels))


def write_shard(shard_index: int, samples: list[int], tick=None) -> tuple[ShardEntry, list[dict]]:
    source, opts, fs, out_dir = (_job_state[k] for k in ("source", "opts", "fs", "out_dir"))
    name = shard_name(source.dataset, source.split, shard_index)
    writer = ShardWriter(fs, out_dir, partial_dir(out_dir, source), name)
    problems: list[dict] = []
    try:
        for i in samples:
            try:
                record, ext, data, note = _encode(source, i, opts)
            except (CorruptImage, OSError) as err:
                origin = f"{source.dataset}/{source.split} key {source.key(i)}"
                if opts.strict:
                    raise ConversionError(f"{origin}: {err} (--strict)") from err
                problems.append({"shard": name, "key": source.key(i), "action": "skipped", "reason": str(err)})
                continue
            if note:
                problems.append({"shard": name, "key": record.key, "origin": record.origin, "action": "converted",
                                 "reason": note})
            writer.write(Sample(record.key, record.label, ext, data))
            if tick:
                tick()
        if writer.count == 0:
            raise ConversionError(f"{name}: every one of its {len(samples)} samples failed; see the errors above")
        entry = writer.commit()
    except BaseException:
        writer.abort()
        raise
    entry.skipped = sum(p["action"] == "skipped" for p in problems)
    return entry, problems


def _pool_tick():
    with _job_state["counter"].get_lock():
        _job_state["counter"].value += 1


def _pool_write(job):
    return write_shard(*job, tick=_pool_tick)


# -- the driver --------------------------------------------------------------------------------------------------
def _check_output(fs, out_dir: str, source: Source, fingerprint: str, overwrite: bool) -> Manifest | None:
    """The resumable manifest of this split, if any; refuses a folder holding other data unless overwriting."""
    mine = posixpath.join(out_dir, manifest_name(source.dataset, source.split))
    others = [p for p in fs.glob(posixpath.join(out_dir, "*.manifest.json"))
              if posixpath.basename(p) != posixpath.basename(mine)]
    for path in others:
        other = read_manifest(fs.unstrip_protocol(path))
        if other.dataset != source.dataset and not overwrite:
            raise ConversionError(f"{out_dir} already holds {other.dataset!r} shards ({posixpath.basename(path)}); "
                                  f"choose another output folder or pass --overwrite to write {source.dataset!r} "
                                  f"beside them")
    if not fs.exists(mine):
        return None
    existing = read_manifest(fs.unstrip_protocol(mine))
    if overwrite:
        prefix = f"{source.dataset}-{split_slug(source.split)}-"
        for path in fs.glob(posixpath.join(out_dir, prefix + "*")):
            fs.rm(path)
        fs.rm(mine)
        return None
    if existing.plan != fingerprint:
        raise ConversionError(f"{mine} was made from another source listing or with other options "
                              f"(plan {existing.plan[:12]} != {fingerprint[:12]}); pass --overwrite to replace it")
    return existing


@contextmanager
def split_lock(fs, out_dir: str, source: Source):
    """Holds `{dataset}-{split}.lock` in a local folder while the split is converted (see the module docstring);
    the file names its holder for the refusal, and goes when the holder is done."""
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    path = os.path.join(out_dir, f"{source.dataset}-{split_slug(source.split)}.lock")
    fd = _take_lock(path, f"{source.dataset}/{source.split} into {out_dir}")
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        with suppress(FileNotFoundError):  # removed by hand meanwhile
            os.unlink(path)  # before the lock goes, so that a process that opened this file retries with a new one
        os.close(fd)


def _take_lock(path: str, what: str) -> int | None:
    """The locked file's descriptor; None, with a warning, where the filesystem has no locks (some Lustre and NFS
    mounts), rather than refusing to convert there at all."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise ConversionError(f"another make_shards ({holder}) is converting {what}; wait for it to finish "
                                  f"(its lock {path} goes with it)") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            os.unlink(path)
            print(f"make_shards: warning: {path}: the filesystem cannot lock ({err.strerror}); do not run two "
                  f"conversions of {what} at once", file=sys.stderr)
            return None
        try:  # the file may be a finished holder's, unlinked since it was opened: then lock the current one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def convert(source: Source, out_url: str, opts: ConvertOptions, progress: bool = True) -> Summary:
    """Writes (or finishes writing) the shards of one split to any fsspec URL and returns the summary."""
    start = time.perf_counter()
    fs, out_dir = fsspec.core.url_to_fs(out_url)
    out_dir = out_dir.rstrip("/") or "/"
    if opts.workers > 1 and fs.protocol in ("memory", ("memory",)):
        raise ConversionError("memory:// filesystems live inside one process: use --workers 1")
    plan = plan_shards(source, opts)
    fingerprint = plan_fingerprint(source, opts, plan)
    fs.makedirs(out_dir, exist_ok=True)
    with split_lock(fs, out_dir, source):
        summary = _write_split(source, fs, out_dir, opts, plan, fingerprint, progress)
    summary.seconds = time.perf_counter() - start
    return summary


def _write_split(source: Source, fs, out_dir: str, opts: ConvertOptions, plan: list[list[int]], fingerprint: str,
                 progress: bool) -> Summary:
    """convert() under the split's lock: check the folder, resume what is complete, write the rest."""
    existing = _check_output(fs, out_dir, source, fingerprint, opts.overwrite)
    partial = partial_dir(out_dir, source)
    if fs.exists(partial):
        fs.rm(partial, recursive=True)
    fs.makedirs(partial, exist_ok=True)

    manifest = Manifest(dataset=source.dataset, split=source.split, classes=list(source.classes),
                        synsets=source.synsets, plan=fingerprint,
                        options={"samples_per_shard": opts.samples_per_shard, "max_shard_bytes": opts.max_shard_bytes,
                                 "shuffle": opts.shuffle, "seed": opts.seed, "image_format": opts.image_format,
                                 "jpeg_quality": opts.jpeg_quality, **source.options()})
    done: dict[str, ShardEntry] = {}
    for entry in existing.shards if existing else []:
        path = posixpath.join(out_dir, entry.name)
        if fs.exists(path) and fs.exists(posixpath.join(out_dir, index_name(entry.name))) \
                and file_sha256(fs, path) == entry.sha256:
            done[entry.name] = entry
    manifest_path = posixpath.join(out_dir, manifest_name(source.dataset, source.split))
    report_path = posixpath.join(out_dir, report_name(source.dataset, source.split))
    report = _read_report(fs, report_path, keep=set(done))

    def write_report() -> None:
        write_atomic(fs, report_path, "".join(json.dumps(p) + "\n" for p in report), partial)

    def record(entry: ShardEntry, problems: list[dict]) -> None:
        """A finished shard: its problems reach the report before the shard reaches the manifest."""
        done[entry.name] = entry
        if problems:
            report.extend(problems)
            write_report()
        manifest.shards = sorted(done.values(), key=lambda e: e.name)
        write_atomic(fs, manifest_path, manifest.to_json(), partial)

    write_report()
    manifest.shards = sorted(done.values(), key=lambda e: e.name)
    write_atomic(fs, manifest_path, manifest.to_json(), partial)
    jobs = [(k, s) for k, s in enumerate(plan) if shard_name(source.dataset, source.split, k) not in done]
    summary = Summary(source.dataset, source.split, shards=len(plan), shards_resumed=len(plan) - len(jobs),
                      manifest=fs.unstrip_protocol(manifest_path))
    bar = tqdm(total=sum(len(s) for _, s in jobs), unit="img", disable=not progress,
               desc=f"{source.dataset}/{source.split}", smoothing=0.1)
    _job_state.update(source=source, opts=opts, fs=fs, out_dir=out_dir)
    try:
        if opts.workers == 1:
            for job in jobs:
                record(*write_shard(*job, tick=lambda: bar.update(1)))
        else:
            _run_pool(jobs, opts.workers, bar, record)
    finally:
        bar.close()
        _job_state.clear()
    manifest.complete = True
    write_atomic(fs, manifest_path, manifest.to_json(), partial)
    fs.rm(partial, recursive=True)
    try:  # the shared parent goes too, unless another split's conversion is using it
        fs.rmdir(posixpath.join(out_dir, PARTIAL_DIR))
    except OSError:
        pass
    summary.shards_written = len(jobs)
    summary.samples = manifest.num_samples
    summary.bytes = sum(e.bytes for e in manifest.shards)
    summary.skipped_samples = manifest.skipped_samples
    summary.converted_samples = sum(p["action"] == "converted" for p in report)
    return summary


def _run_pool(jobs, workers: int, bar, record) -> None:
    """Forked workers (they share the parent's source, arrays included); the parent alone writes the manifest."""
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    _job_state["counter"] = counter
    seen = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending = {pool.submit(_pool_write, job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for future in finished:
                    record(*future.result())
                bar.update(counter.value - seen)
                seen = counter.value
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _read_report(fs, path: str, keep: set[str]) -> list[dict]:
    """Report lines of shards that are kept (a shard being rewritten reports its problems again)."""
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [p for p in map(json.loads, filter(str.strip, f)) if p["shard"] in keep]
