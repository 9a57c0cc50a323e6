"""Remote shards (http(s)://, s3://, gs://, ...) copied whole to a local folder on their first read (`data.cache_dir`),
so that every later epoch reads local disk instead of downloading them again.

- A shard is downloaded once per cache folder: the reader process that needs it first takes its lock (flock on
  `.locks/<copy>.lock`, kept apart so that the folder itself holds only copies; DALI's reader workers and the ranks
  of a node share the folder), downloads it beside its final
  name, checks its size and sha256 against the manifest, and renames it into place. The others wait on the lock and
  then find the copy. A copy in place has therefore been checked; its name starts with the first 16 hex digits of
  its checksum (`<sha256[:16]>-<shard name>`), so that datasets, splits and re-conversions never mix in one folder.
- The folder stays under `max_bytes` (`data.cache_max_gib`): before a copy goes in, the least recently used copies
  go out (every batch that reads a copy marks it used). A shard larger than the bound is read remotely, range by
  range, as without a cache. A reader opens the copies a batch needs, reads and closes them, so an evicted copy
  frees its space at once.
- A shard whose bytes differ from the manifest is refused by name (OSError) and not kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager

import fsspec

from ..shard_format import ShardEntry
from .shard_reader import FsspecReader

CHUNK = 8 << 20
LOCKS = ".locks"  # a lock file is never removed (a waiter would lock a deleted file): one per shard, empty


@contextmanager
def _locked(path: str):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class CachedReader:
    def __init__(self, fs: fsspec.AbstractFileSystem, paths: list[str], entries: list[ShardEntry], cache_dir: str,
                 max_bytes: int):
        self.paths, self.entries = paths, entries
        self.cache_dir, self.max_bytes = os.path.abspath(cache_dir), max_bytes
        self.remote = FsspecReader(fs, paths)  # its filesystem is made anew in a forked worker

    def copy_path(self, shard: int) -> str:
        entry = self.entries[shard]
        return os.path.join(self.cache_dir, f"{entry.sha256[:16]}-{entry.name}")

    def read(self, shards, starts, ends) -> list[bytes]:
        fds: dict[int, int] = {}
        try:
            for shard in dict.fromkeys(int(s) for s in shards):
                if self.entries[shard].bytes <= self.max_bytes:
                    fds[shard] = self._open(shard)
            far = [i for i, s in enumerate(shards) if int(s) not in fds]
            spans: list[bytes] = [b""] * len(shards)
            if far:
                remote = self.remote.read([shards[i] for i in far], [starts[i] for i in far], [ends[i] for i in far])
                for i, data in zip(far, remote):
                    spans[i] = data
            for i, (shard, start, end) in enumerate(zip(shards, starts, ends)):
                if int(shard) in fds:
                    spans[i] = os.pread(fds[int(shard)], int(end - start), int(start))
                    if len(spans[i]) != end - start:
                        raise OSError(f"{self.copy_path(int(shard))}: short read at byte {start} (cache copy "
                                      "truncated?)")
            return spans
        finally:
            for fd in fds.values():
                os.close(fd)

    def _open(self, shard: int) -> int:
        """A descriptor of the local copy, opened now so that a later eviction cannot take it from this batch; marks
        the copy used. Another process may evict it between the check and the open: then it is fetched again."""
        for _ in range(3):
            path = self._ensure(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            os.utime(fd)
            return fd
        raise OSError(f"{self.copy_path(shard)}: evicted as soon as it was fetched, three times: data.cache_max_gib "
                      "is too small for the readers sharing the cache")

    def _ensure(self, shard: int) -> str:
        """The local copy of `shard`, downloaded and checked first if it is not in the cache."""
        path = self.copy_path(shard)
        if os.path.exists(path):
            return path
        locks = os.path.join(self.cache_dir, LOCKS)
        os.makedirs(locks, exist_ok=True)
        with _locked(os.path.join(locks, os.path.basename(path) + ".lock")):
            if os.path.exists(path):  # another reader fetched it while this one waited
                return path
            fs, entry = self.remote.fs, self.entries[shard]
            url = fs.unstrip_protocol(self.paths[shard])
            partial = f"{path}.partial.{os.getpid()}"
            try:
                fs.get_file(self.paths[shard], partial)
                size, digest = os.path.getsize(partial), _sha256(partial)
                if (size, digest) != (entry.bytes, entry.sha256):
                    raise OSError(f"{url}: the downloaded shard ({size} bytes, sha256 {digest[:16]}...) is not the "
                                  f"one its manifest lists ({entry.bytes} bytes, sha256 {entry.sha256[:16]}...): it "
                                  "changed since it was converted; not cached")
                with _locked(os.path.join(locks, "evict.lock")):
                    self._make_room(entry.bytes)
                    os.replace(partial, path)
            finally:
                if os.path.exists(partial):
                    os.remove(partial)
        return path

    def _make_room(self, needed: int) -> None:
        """Remove the least recently used copies until `needed` more bytes fit under the bound."""
        copies = []
        for name in os.listdir(self.cache_dir):
            if name.endswith(".tar"):
                try:
                    st = os.stat(os.path.join(self.cache_dir, name))
                except FileNotFoundError:
                    continue
                copies.append((st.st_mtime, st.st_size, name))
        used = sum(size for _, size, _ in copies)
        for _, size, name in sorted(copies):
            if used + needed <= self.max_bytes:
                break
            os.remove(os.path.join(self.cache_dir, name))
            used -= size
