"""ImageNet ILSVRC2012 in its real layouts.

train: the extracted `train/<wnid>/*.JPEG` tree, or `ILSVRC2012_img_train.tar` (a tar of per-class tars) read in
place. val: flat `ILSVRC2012_val_000xxxxx.JPEG` files labelled from the devkit
(`data/ILSVRC2012_validation_ground_truth.txt` + `data/meta.mat`) or from Kaggle's `LOC_val_solution.csv`, or val
already sorted into `<wnid>/` folders.
Class index = position of the wnid in sorted order (the standard 0..999).
"""

from __future__ import annotations

import csv
import os
import re
import tarfile

import numpy as np

from .base import SourceLayoutError, require
from .files import FileRef, FileSource, key_from_name
from .folder import list_images

_WNID = re.compile(r"^n\d{8}$")
_VAL_FILE = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
_TRAIN_LAYOUT = "ROOT/train/<wnid>/*.JPEG, ROOT/<wnid>/*.JPEG, or ILSVRC2012_img_train.tar (a tar of <wnid>.tar files)"
_VAL_LAYOUT = (
    "ROOT/val/ILSVRC2012_val_00000001.JPEG ... with --devkit ILSVRC2012_devkit_t12 "
    "(data/ILSVRC2012_validation_ground_truth.txt, data/meta.mat) or --val-csv LOC_val_solution.csv; "
    "or val sorted into ROOT/val/<wnid>/ folders"
)


def read_devkit(devkit: str) -> tuple[dict[int, str], dict[str, str], str]:
    """(ILSVRC2012_ID -> wnid, wnid -> words, data folder) from the devkit's meta.mat."""
    data = devkit if os.path.exists(os.path.join(devkit, "meta.mat")) else os.path.join(devkit, "data")
    meta = require(os.path.join(data, "meta.mat"), "ILSVRC2012_devkit_t12/data/meta.mat")
    import scipy.io  # imported here: it is slow to import and only this layout needs it

    synsets = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
    ids, words = {}, {}
    for s in np.atleast_1d(synsets):
        if int(s["num_children"]) == 0:
            ids[int(s["ILSVRC2012_ID"])] = str(s["WNID"])
            words[str(s["WNID"])] = str(s["words"])
    return ids, words, data


def read_synset_mapping(path: str) -> dict[str, str]:
    """Kaggle's LOC_synset_mapping.txt: 'n01440764 tench, Tinca tinca' per line."""
    with open(path) as f:
        return dict(line.rstrip("\n").split(" ", 1) for line in f if line.strip())


def _wnid_folders(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if _WNID.match(d) and os.path.isdir(os.path.join(root, d)))


class ImageNet(FileSource):
    dataset = "imagenet"

    def __init__(self, root: str, split: str, devkit: str | None = None, val_csv: str | None = None):
        self.split = split
        self.words: dict[str, str] = {}
        if devkit:
            self._ids, self.words, self._devkit_data = read_devkit(devkit)
        mapping = os.path.join(os.path.dirname(val_csv), "LOC_synset_mapping.txt") if val_csv else None
        if mapping and os.path.exists(mapping):
            self.words = read_synset_mapping(mapping)
        refs = self._train(root) if split == "train" else self._val(root, devkit, val_csv)
        if not refs:
            layout = _TRAIN_LAYOUT if split == "train" else _VAL_LAYOUT
            raise SourceLayoutError(f"{root}: no {split} images found. Expected layout: {layout}")
        self.refs = refs
        self.classes = [self.words.get(w, w) for w in self.synsets]

    def _set_synsets(self, wnids: list[str]) -> dict[str, int]:
        self.synsets = sorted(self.words) if len(self.words) >= len(wnids) else sorted(wnids)
        missing = set(wnids) - set(self.synsets)
        if missing:
            raise ValueError(f"wnids {sorted(missing)[:5]} are not in the class list of the devkit/mapping")
        return {w: i for i, w in enumerate(self.synsets)}

    # -- train ------------------------------------------------------------------------------------------------
    def _train(self, root: str) -> list[FileRef]:
        if os.path.isfile(root) and root.endswith(".tar"):
            return self._train_tar(root)
        require(root, _TRAIN_LAYOUT)
        for candidate in (os.path.join(root, "train"), root):
            if _wnid_folders(candidate):
                return self._tree(candidate)
        tar = os.path.join(root, "ILSVRC2012_img_train.tar")
        if os.path.isfile(tar):
            return self._train_tar(tar)
        raise SourceLayoutError(f"{root}: no <wnid> class folders and no ILSVRC2012_img_train.tar. "
                                f"Expected: {_TRAIN_LAYOUT}")

    def _tree(self, root: str) -> list[FileRef]:
        wnids = _wnid_folders(root)
        index = self._set_synsets(wnids)
        refs = []
        for wnid in wnids:
            refs += list_images(os.path.join(root, wnid), index[wnid])
        return refs

    def _train_tar(self, path: str) -> list[FileRef]:
        """Lists every JPEG inside the per-class tars with its byte offset in the outer file: nothing is extracted."""
        refs = []
        with tarfile.open(path, mode="r:") as outer:
            members = [m for m in outer.getmembers() if m.isfile() and m.name.endswith(".tar")]
            wnids = [os.path.basename(m.name)[: -len(".tar")] for m in members]
            bad = [w for w in wnids if not _WNID.match(w)]
            if not members or bad:
                raise SourceLayoutError(f"{path}: expected only <wnid>.tar members, found {bad[:3] or 'none'}. "
                                        f"Expected: {_TRAIN_LAYOUT}")
            index = self._set_synsets(wnids)
            for member, wnid in sorted(zip(members, wnids), key=lambda mw: mw[1]):
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    for m in sorted((m for m in inner.getmembers() if m.isfile()), key=lambda m: m.name):
                        refs.append(FileRef(path, member.offset_data + m.offset_data, m.size, key_from_name(m.name),
                                            index[wnid], f"{member.name}/{m.name}"))
        return refs

    # -- val --------------------------------------------------------------------------------------------------
    def _val(self, root: str, devkit: str | None, val_csv: str | None) -> list[FileRef]:
        require(root, _VAL_LAYOUT)
        folder = os.path.join(root, "val") if os.path.isdir(os.path.join(root, "val")) else root
        if _wnid_folders(folder):
            return self._tree(folder)
        files = sorted(n for n in os.listdir(folder) if _VAL_FILE.match(n))
        if not files:
            raise SourceLayoutError(f"{folder}: no ILSVRC2012_val_*.JPEG files or <wnid> folders. "
                                    f"Expected: {_VAL_LAYOUT}")
        if devkit:
            labels = self._devkit_labels()
        elif val_csv:
            labels = self._csv_labels(require(val_csv, "LOC_val_solution.csv (ImageId,PredictionString)"))
        else:
            raise SourceLayoutError(f"{folder} holds flat val images: give --devkit or --val-csv for their labels. "
                                    f"Expected: {_VAL_LAYOUT}")
        index = self._set_synsets(sorted(set(labels.values())))
        refs = []
        for name in files:
            key = name.split(".", 1)[0]
            if key not in labels:
                raise ValueError(f"no label for {name} in {'the devkit ground truth' if devkit else val_csv}")
            path = os.path.join(folder, name)
            refs.append(FileRef(path, 0, os.path.getsize(path), key, index[labels[key]]))
        return refs

    def _devkit_labels(self) -> dict[str, str]:
        truth = require(os.path.join(self._devkit_data, "ILSVRC2012_validation_ground_truth.txt"),
                        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
        with open(truth) as f:
            ids = [int(line) for line in f if line.strip()]
        return {f"ILSVRC2012_val_{n:08d}": self._ids[i] for n, i in enumerate(ids, start=1)}

    @staticmethod
    def _csv_labels(path: str) -> dict[str, str]:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "ImageId" not in rows[0] or "PredictionString" not in rows[0]:
            raise ValueError(f"{path}: expected the columns ImageId,PredictionString (Kaggle LOC_val_solution.csv)")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
