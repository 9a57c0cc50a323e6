"""Base for sources whose samples are image files: on disk, or members of (nested) uncompressed tars.

A file is located by (container path, byte offset, size): a plain file has offset 0; a tar member has the offset of
its data in the outer tar, so per-class tars inside ILSVRC2012_img_train.tar are read without extracting anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import Record, Source

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def key_from_name(name: str) -> str:
    """A flat dot-free key from a file name: 'n01440764_10026.JPEG' -> 'n01440764_10026'."""
    stem = name.rsplit("/", 1)[-1].split(".", 1)[0]
    return _UNSAFE.sub("_", stem)[:90] or "_"


@dataclass(frozen=True)
class FileRef:
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
        with open(ref.path, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.size)
        if len(data) != ref.size:
            raise OSError(f"{ref.origin}: expected {ref.size} bytes, read {len(data)} (file changed or truncated)")
        return Record(ref.key, ref.label, data, ref.origin)


def unique_keys(refs: list[FileRef]) -> list[FileRef]:
    """Keys from file names can collide across class folders: suffix the later ones with their position."""
    seen: set[str] = set()
    out = []
    for i, ref in enumerate(refs):
        key = ref.key
        if key in seen:
            key = f"{key[:80]}_{i}"
        seen.add(key)
        out.append(FileRef(ref.path, ref.offset, ref.size, key, ref.label, ref.member))
    return out
