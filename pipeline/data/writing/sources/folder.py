"""Any image folder: `root/<class>/*` (jpg, png, webp, bmp, ...), class index = position of the folder name sorted;
or a flat `root/*` of images with no class sub-folders, for pretraining on one's own unlabelled images (label -1, no
classes in the manifest)."""

from __future__ import annotations

import os

from ...shard_format import UNLABELED
from .base import SourceLayoutError, require
from .files import FileRef, FileSource, key_from_name, unique_keys

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
_LAYOUT = ("ROOT/<class name>/<image files> (one sub-folder per class), or ROOT/<image files> (no sub-folders: "
           "unlabelled)")


def class_folders(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def list_images(folder: str, label: int) -> list[FileRef]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."))
    paths = [os.path.join(folder, name) for name in names]
    return [FileRef(path, 0, os.stat(path).st_size, key_from_name(name), label) for name, path in zip(names, paths)]


class ImageFolder(FileSource):
    dataset = "folder"

    def __init__(self, root: str, split: str = "train", name: str = "folder"):
        self.dataset, self.split = name, split
        require(root, _LAYOUT)
        self.classes = class_folders(root)
        loose = list_images(root, UNLABELED)
        if self.classes and loose:
            raise SourceLayoutError(f"{root} holds both class sub-folders and {len(loose)} images beside them (e.g. "
                                    f"{loose[0].path}): move the images into a class folder, or the folders out, "
                                    f"for an unlabelled set. Expected layout: {_LAYOUT}")
        refs = loose
        for label, cls in enumerate(self.classes):
            refs += list_images(os.path.join(root, cls), label)
        if not refs:
            raise SourceLayoutError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}). Expected layout: {_LAYOUT}")
        self.refs = unique_keys(refs)
