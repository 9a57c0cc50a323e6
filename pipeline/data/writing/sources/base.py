"""What every dataset source offers the converter: an indexable list of (key, label, encoded bytes or pixels)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


class SourceLayoutError(FileNotFoundError):
    """A dataset file or folder is missing or misnamed; the message names it and the layout that was expected."""


class SourceFileError(ValueError):
    """A dataset file is there but does not hold what its format promises (truncated, another format, wrong
    contents); the message names the file and what is wrong, so the user knows which one to fetch again."""


def require(path: str, layout: str) -> str:
    if not os.path.exists(path):
        raise SourceLayoutError(f"{path} not found. Expected layout: {layout}")
    return path


def dataset_folder(root: str, name: str, layout: str) -> str:
    """The dataset's own folder `name`, given either it or its parent."""
    if os.path.basename(os.path.normpath(root)) == name:
        return require(root, layout)
    return require(os.path.join(root, name), layout)


@dataclass
class Record:
    """One source sample. `payload` is the file's encoded bytes, or an HxWx3 uint8 array for raw-pixel sources."""

    key: str
    label: int
    payload: bytes | np.ndarray
    origin: str  # where it came from, for reports


class Source(ABC):
    """A dataset split, readable by index from any (forked) worker process; files are opened per read."""

    dataset: str
    split: str
    classes: list[str]
    synsets: list[str] | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def key(self, i: int) -> str:
        """Cheap: used to fingerprint the plan without reading images."""

    @abstractmethod
    def read(self, i: int) -> Record: ...

    def size_hint(self, i: int) -> int:
        """Bytes the sample will roughly take, for planning shards by size without reading them."""
        return 0

    def options(self) -> dict:
        """Source settings that change the output (they enter the plan fingerprint)."""
        return {}
