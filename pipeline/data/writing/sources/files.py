"""Base for sources whose samples are image files: on disk, or members of (nested) uncompressed tars.

A file is located by (container path, byte offset, size): a plain file has offset 0; a tar member has the offset of
its data in the outer tar, so per-class tars inside ILSVRC2012_img_train.tar are read without extracting anything.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from .base import Record, Source

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def key_from_name(name: str) -> str:
    """A flat dot-free key from a file name: 'n01440764_10026.JPEG' -> 'n01440764_10026'."""
    stem = name.rsplit("/", 1)[-1].split(".", 1)[0]
    return _UNSAFE.sub("_", stem)[:90] or "_"


class FileRef(NamedTuple):
    """Where one image is; a tuple because a listing makes one per file (1.28 M for ImageNet train)."""

    path: str
    offset: int
    size: int
    key: str
    label: int
    member: str = ""  # the name inside a tar, for reports

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


class FileSource(Source):
    """Subclasses fill `self.refs` (and classes) in their constructor."""

    refs: list[FileRef]

    def __len__(self) -> int:
        return len(self.refs)

    def key(self, i: int) -> str:
        return self.refs[i].key

    def size_hint(self, i: int) -> int:
        return self.refs[i].size

    def read(self, i: int) -> Record:
        ref = self.refs[i]
        fd = os.open(ref.path, os.O_RDONLY)  # a bare descriptor: an io.open file object costs as much as a read
        try:
            data = os.pread(fd, ref.size, ref.offset)
        finally:
            os.close(fd)
        if len(data) != ref.size:
            raise OSError(f"{ref.origin}: expected {ref.size} bytes, read {len(data)} (file changed or truncated)")
        return Record(ref.key, ref.label, data, ref.origin)


def unique_keys(refs: list[FileRef]) -> list[FileRef]:
    """Keys from file names can collide across class folders: suffix the later ones with their position."""
    seen: set[str] = set()
    out = []
    for i, ref in enumerate(refs):
        if ref.key in seen:
            ref = ref._replace(key=f"{ref.key[:80]}_{i}")
        seen.add(ref.key)
        out.append(ref)
    return out
