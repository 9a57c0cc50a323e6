"""Reads byte spans of shards, one span per sample (its image and label members, adjacent in the tar).

- PosixReader: local disk or NFS, `os.pread` on file descriptors kept open (a bounded number, per process).
- FsspecReader: any other fsspec URL (s3://, gs://, http(s)://, memory://...), one `cat_ranges` call per batch, which
  object-store filesystems (async fsspec implementations) serve with concurrent range requests.
Both are picklable without their open handles, so DALI's worker processes (forked or spawned) can carry them.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import fsspec

MAX_OPEN_FILES = 128  # per worker process: ImageNet has ~1,300 shards, more than a default descriptor limit


class PosixReader:
    def __init__(self, paths: list[str]):
        self.paths = paths
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])

    def _fd(self, shard: int) -> int:
        fd = self._fds.pop(shard, None)
        if fd is None:
            fd = os.open(self.paths[shard], os.O_RDONLY)
            if len(self._fds) >= MAX_OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = fd
        return fd

    def read(self, shards, starts, ends) -> list[bytes]:
        spans = []
        for shard, start, end in zip(shards, starts, ends):
            data = os.pread(self._fd(int(shard)), int(end - start), int(start))
            if len(data) != end - start:
                raise OSError(f"{self.paths[shard]}: short read at byte {start} (file truncated since it was indexed?)")
            spans.append(data)
        return spans


class FsspecReader:
    def __init__(self, fs: fsspec.AbstractFileSystem, paths: list[str]):
        self._fs, self._pid, self.paths = fs, os.getpid(), paths

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, made anew in a forked reader worker: an async one (http, s3, gcs) refuses to run its
        event loop in a child of the process that made it."""
        if self._pid != os.getpid():
            self._fs = type(self._fs)(skip_instance_cache=True, **self._fs.storage_options)
            self._pid = os.getpid()
        return self._fs

    def read(self, shards, starts, ends) -> list[bytes]:
        spans = self.fs.cat_ranges([self.paths[s] for s in shards], [int(s) for s in starts], [int(e) for e in ends])
        for shard, start, end, data in zip(shards, starts, ends, spans):
            if isinstance(data, BaseException) or len(data) != end - start:
                raise OSError(f"{self.fs.unstrip_protocol(self.paths[shard])}: cannot read bytes {start}..{end}: "
                              f"{data if isinstance(data, BaseException) else 'short read'}")
        return spans
