"""Writes one shard: a tar of samples plus its DALI index, under its final name only once complete."""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from dataclasses import dataclass

from .shard_format import ShardEntry, check_key, dali_index, index_name


class _HashingWriter:
    """A write-only file that hashes and counts what passes through, so the shard is never read back to checksum."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


@dataclass
class Sample:
    key: str
    label: int
    ext: str
    data: bytes


def _member(name: str, size: int) -> tarfile.TarInfo:
    """Fixed metadata (mtime 0, root, 0644) so the same samples always give the same bytes and checksum."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info


class ShardWriter:
    """Streams samples into `{tmp_dir}/{name}` and on `commit()` moves tar and index to `{out_dir}`.

    The index is moved first and the tar last, so a reader that finds the tar finds a complete shard with its index;
    an interrupted writer leaves only files under tmp_dir, which the converter clears on the next run.
    """

    def __init__(self, fs, out_dir: str, tmp_dir: str, name: str):
        self.fs, self.out_dir, self.tmp_dir, self.name = fs, out_dir, tmp_dir, name
        self._raw = fs.open(posixpath.join(tmp_dir, name), "wb")
        self._out = _HashingWriter(self._raw)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.USTAR_FORMAT)
        self._members: list[tuple[str, int, int]] = []
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        offset = self._tar.offset + tarfile.BLOCKSIZE  # one USTAR header block precedes the data
        self._tar.addfile(_member(name, len(data)), io.BytesIO(data))
        self._members.append((name, offset, len(data)))

    def write(self, sample: Sample) -> None:
        check_key(sample.key)
        self._add(f"{sample.key}.{sample.ext}", sample.data)
        self._add(f"{sample.key}.cls", str(int(sample.label)).encode("ascii"))
        self.count += 1

    def commit(self) -> ShardEntry:
        self._tar.close()
        self._raw.close()
        idx = index_name(self.name)
        with self.fs.open(posixpath.join(self.tmp_dir, idx), "w") as f:
            f.write(dali_index(self._members))
        self.fs.mv(posixpath.join(self.tmp_dir, idx), posixpath.join(self.out_dir, idx))
        self.fs.mv(posixpath.join(self.tmp_dir, self.name), posixpath.join(self.out_dir, self.name))
        return ShardEntry(name=self.name, samples=self.count, bytes=self._out.size, sha256=self._out.sha.hexdigest())

    def abort(self) -> None:
        """Drops the unfinished tar (only ever under tmp_dir)."""
        self._raw.close()
        tmp = posixpath.join(self.tmp_dir, self.name)
        if self.fs.exists(tmp):
            self.fs.rm(tmp)
