"""Tiny datasets written in each source's real on-disk format, with the pixels and labels they hold, so tests can
check conversion round trips against ground truth."""

from __future__ import annotations

import csv
import io
import os
import pickle
import tarfile

import numpy as np
import scipy.io
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]
WORDS = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _jpeg(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_stl10(root: str, n_train: int = 20, n_test: int = 10, n_unlabeled: int = 15) -> dict:
    """stl10_binary/ with images stored channel-first, column-major, labels 1..10; returns HWC pixels and 0-based
    labels."""
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder)
    rng, truth = _rng(1), {}
    for part, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        hwc = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
        hwc.transpose(0, 3, 2, 1).tofile(os.path.join(folder, f"{part}_X.bin"))  # N, C, W, H on disk
        labels = rng.integers(0, 10, size=n) if part != "unlabeled" else np.full(n, -1)
        if part != "unlabeled":
            (labels + 1).astype(np.uint8).tofile(os.path.join(folder, f"{part}_y.bin"))
        truth[part] = (hwc, labels)
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    with open(os.path.join(folder, "fold_indices.txt"), "w") as f:
        for k in range(10):
            f.write(" ".join(str(i) for i in range(k, n_train, 10)) + " \n")
    return truth


def make_cifar10(root: str, per_batch: int = 6) -> dict:
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng, truth = _rng(2), {"train": ([], []), "test": ([], [])}
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for name in names:
        hwc = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels,
                 b"data": hwc.transpose(0, 3, 1, 2).reshape(per_batch, -1),
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
        split = "test" if name == "test_batch" else "train"
        truth[split][0].append(hwc)
        truth[split][1].extend(labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                                      b"horse", b"ship", b"truck"], b"num_cases_per_batch": per_batch}, f, protocol=2)
    return {k: (np.concatenate(v[0]), np.asarray(v[1])) for k, v in truth.items()}


def make_cifar100(root: str, n: int = 8) -> dict:
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    rng, truth = _rng(3), {}
    for split in ("train", "test"):
        hwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, size=n).tolist(), rng.integers(0, 20, size=n).tolist()
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                         b"coarse_labels": coarse, b"data": hwc.transpose(0, 3, 1, 2).reshape(n, -1)}, f)
        truth[split] = (hwc, np.asarray(fine), np.asarray(coarse))
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, f)
    return truth


def make_svhn(root: str, n: int = 12) -> dict:
    os.makedirs(root, exist_ok=True)
    rng, truth = _rng(4), {}
    for split in ("train", "test", "extra"):
        hwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        digits = rng.integers(0, 10, size=n)
        digits[0] = 0  # make sure the "10 means 0" rule is exercised
        y = np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)
        scipy.io.savemat(os.path.join(root, f"{split}_32x32.mat"), {"X": hwc.transpose(1, 2, 3, 0), "y": y})
        truth[split] = (hwc, digits)
    return truth


def _imagenet_pixels(rng, n: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, size=(int(rng.integers(40, 70)), int(rng.integers(40, 70)), 3), dtype=np.uint8)
            for _ in range(n)]


def make_imagenet_train(root: str, per_class: int = 4) -> dict[str, tuple[bytes, int]]:
    """train/<wnid>/<wnid>_<n>.JPEG, including one CMYK JPEG and one PNG named .JPEG (as in the real set);
    returns key -> (file bytes, label)."""
    rng, truth = _rng(5), {}
    for label, wnid in enumerate(WNIDS):
        folder = os.path.join(root, "train", wnid)
        os.makedirs(folder)
        for j, pixels in enumerate(_imagenet_pixels(rng, per_class)):
            key = f"{wnid}_{1000 + j}"
            data = _jpeg(pixels)
            if label == 1 and j == 0:
                data = _jpeg(pixels, mode="CMYK")
            if label == 2 and j == 1:
                data = _png(pixels)
            with open(os.path.join(folder, key + ".JPEG"), "wb") as f:
                f.write(data)
            truth[key] = (data, label)
    return truth


def make_imagenet_train_tar(train_dir: str, out_path: str) -> None:
    """ILSVRC2012_img_train.tar: a tar of per-class <wnid>.tar files, made from a train/<wnid>/ tree."""
    with tarfile.open(out_path, "w") as outer:
        for wnid in sorted(os.listdir(train_dir)):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for name in sorted(os.listdir(os.path.join(train_dir, wnid))):
                    inner.add(os.path.join(train_dir, wnid, name), arcname=name)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(buf.getvalue())
            outer.addfile(info, io.BytesIO(buf.getvalue()))


def make_imagenet_val(root: str, n: int = 9) -> dict[str, tuple[bytes, int]]:
    """Flat val/ILSVRC2012_val_*.JPEG, the devkit (ground truth as ILSVRC2012_IDs + meta.mat whose ID order is
    not the sorted wnid order) and Kaggle's LOC_val_solution.csv + LOC_synset_mapping.txt."""
    rng, truth = _rng(6), {}
    os.makedirs(os.path.join(root, "val"))
    # meta.mat: ILSVRC2012_IDs deliberately in reverse wnid order, plus one non-leaf synset.
    ids = {wnid: len(WNIDS) - i for i, wnid in enumerate(WNIDS)}
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
             ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(ids[w], w, words, "a fish", 0, np.zeros((1, 0)), 0, 1300) for w, words in zip(WNIDS, WORDS)]
    rows.append((len(WNIDS) + 1, "n00000001", "fish", "a group", 3, np.array([1, 2, 3]), 1, 0))
    synsets = np.array(rows, dtype=dtype).reshape(-1, 1)
    data = os.path.join(root, "ILSVRC2012_devkit_t12", "data")
    os.makedirs(data)
    scipy.io.savemat(os.path.join(data, "meta.mat"), {"synsets": synsets})
    labels = [int(v) for v in rng.permutation(np.arange(n) % len(WNIDS))]  # every class present, as in the real set
    with open(os.path.join(data, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
        f.write("".join(f"{ids[WNIDS[y]]}\n" for y in labels))
    with open(os.path.join(root, "LOC_val_solution.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for i, y in enumerate(labels, start=1):
            writer.writerow([f"ILSVRC2012_val_{i:08d}", f"{WNIDS[y]} 10 12 40 44 {WNIDS[y]} 1 2 3 4 "])
    with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
        f.write("".join(f"{w} {words}\n" for w, words in zip(WNIDS, WORDS)))
    for i, (pixels, y) in enumerate(zip(_imagenet_pixels(rng, n), labels), start=1):
        key = f"ILSVRC2012_val_{i:08d}"
        data = _jpeg(pixels, mode="L") if i == 2 else _jpeg(pixels)  # one greyscale JPEG, as in the real set
        with open(os.path.join(root, "val", key + ".JPEG"), "wb") as f:
            f.write(data)
        truth[key] = (data, y)
    return truth


def make_image_folder(root: str) -> dict[str, tuple[np.ndarray, int]]:
    """root/<class>/ with png, webp and bmp files (lossless formats, so pixels must round-trip exactly)."""
    rng, truth = _rng(7), {}
    for label, cls in enumerate(["cats", "dogs"]):
        os.makedirs(os.path.join(root, cls))
        for j, ext in enumerate(["png", "webp", "bmp"]):
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            options = {"lossless": True} if ext == "webp" else {}
            Image.fromarray(pixels).save(os.path.join(root, cls, f"{cls}{j}.{ext}"), **options)
            truth[f"{cls}{j}"] = (pixels, label)
    return truth


def bomb_image(kind: str, width: int = 20000, height: int = 20000) -> bytes:
    """A small, structurally whole JPEG or PNG whose header claims `width` x `height` pixels: a decompression bomb."""
    data = bytearray(_jpeg(np.zeros((8, 8, 3), np.uint8)) if kind == "jpg" else _png(np.zeros((8, 8, 3), np.uint8)))
    if kind == "png":  # IHDR: width and height at bytes 16-24
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        return bytes(data)
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)
