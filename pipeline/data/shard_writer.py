"""Writes one shard: a tar of samples plus its DALI index, under its final name only once complete."""

from __future__ import annotations

import hashlib
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .shard_format import ShardEntry, check_key, dali_index, index_name


class _HashingWriter:
    """A write-only file that checksums what passes through, so the shard is never read back to checksum it.

    Hashing costs about as much as the copy itself, so it runs on a helper thread (hashlib releases the GIL on large
    buffers) fed a few MB at a time, overlapping the file I/O; updates stay in order.
    """

    BATCH = 4 << 20

    def __init__(self, raw):
        self.raw = raw
        self._sha = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1)
        self._hashed = []
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        self.raw.write(data)
        self.size += len(data)
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= self.BATCH:
            self._flush_hash()

    def _flush_hash(self) -> None:
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        self._hashed.append(self._hasher.submit(lambda: [self._sha.update(c) for c in chunks]))

    def close(self) -> str:
        """Closes the file and returns the sha256 of everything written."""
        self.raw.close()
        self._flush_hash()
        self._hasher.shutdown(wait=True)
        for future in self._hashed:
            future.result()  # re-raises anything that went wrong on the hashing thread
        return self._sha.hexdigest()


@dataclass
class Sample:
    key: str
    label: int
    ext: str
    data: bytes


BLOCK = 512


def ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header with fixed metadata (mode 0644, root, mtime 0), so the same samples always give the same
    bytes and checksum. Built by hand: tarfile's general-purpose header code costs more than copying a JPEG."""
    encoded = name.encode("ascii")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    header = bytearray(BLOCK)
    header[0:len(encoded)] = encoded
    header[100:108] = b"0000644\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # checksum placeholder
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


class ShardWriter:
    """Streams samples into `{tmp_dir}/{name}` and on `commit()` moves tar and index to `{out_dir}`.

    The index is moved first and the tar last, so a reader that finds the tar finds a complete shard with its index;
    an interrupted writer leaves only files under tmp_dir, which the converter clears on the next run.
    """

    def __init__(self, fs, out_dir: str, tmp_dir: str, name: str):
        self.fs, self.out_dir, self.tmp_dir, self.name = fs, out_dir, tmp_dir, name
        self._out = _HashingWriter(fs.open(posixpath.join(tmp_dir, name), "wb"))
        self._members: list[tuple[str, int, int]] = []
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        self._members.append((name, self._out.size + BLOCK, len(data)))
        self._out.write(ustar_header(name, len(data)))
        self._out.write(data)  # written as is: joining header, data and padding would copy every image once more
        self._out.write(b"\0" * (-len(data) % BLOCK))

    def write(self, sample: Sample) -> None:
        check_key(sample.key)
        self._add(f"{sample.key}.{sample.ext}", sample.data)
        self._add(f"{sample.key}.cls", str(int(sample.label)).encode("ascii"))
        self.count += 1

    def commit(self) -> ShardEntry:
        self._out.write(b"\0" * (2 * BLOCK))  # end-of-archive marker
        sha256 = self._out.close()
        idx = index_name(self.name)
        with self.fs.open(posixpath.join(self.tmp_dir, idx), "w") as f:
            f.write(dali_index(self._members))
        self.fs.mv(posixpath.join(self.tmp_dir, idx), posixpath.join(self.out_dir, idx))
        self.fs.mv(posixpath.join(self.tmp_dir, self.name), posixpath.join(self.out_dir, self.name))
        return ShardEntry(name=self.name, samples=self.count, bytes=self._out.size, sha256=sha256)

    def abort(self) -> None:
        """Drops the unfinished tar (only ever under tmp_dir)."""
        self._out.close()
        tmp = posixpath.join(self.tmp_dir, self.name)
        if self.fs.exists(tmp):
            self.fs.rm(tmp)
