"""Any image folder `root/<class>/*` (jpg, png, webp, bmp, ...): class index = position of the folder name sorted."""

from __future__ import annotations

import os

from .base import SourceLayoutError, require
from .files import FileRef, FileSource, key_from_name, unique_keys

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
_LAYOUT = "ROOT/<class name>/<image files> (one sub-folder per class)"


def list_class_folders(root: str, layout: str = _LAYOUT) -> list[str]:
    require(root, layout)
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise SourceLayoutError(f"{root} has no class sub-folders. Expected layout: {layout}")
    return classes


def list_images(folder: str, label: int) -> list[FileRef]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."))
    paths = [os.path.join(folder, name) for name in names]
    return [FileRef(path, 0, os.stat(path).st_size, key_from_name(name), label) for name, path in zip(names, paths)]


class ImageFolder(FileSource):
    dataset = "folder"

    def __init__(self, root: str, split: str = "train", name: str = "folder"):
        self.dataset, self.split = name, split
        self.classes = list_class_folders(root)
        refs = []
        for label, cls in enumerate(self.classes):
            refs += list_images(os.path.join(root, cls), label)
        if not refs:
            raise SourceLayoutError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}). Expected layout: {_LAYOUT}")
        self.refs = unique_keys(refs)
