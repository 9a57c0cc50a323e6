"""Round trips from every source format: pixels (raw sources) or bytes (JPEG sources) and labels read back equal
the source, with the webdataset library reading the shards."""

import os

import numpy as np
import pytest

from pipeline.data.shard_format import read_manifest
from pipeline.data.writing.convert import ConvertOptions, convert
from pipeline.data.writing.sources import SourceLayoutError, build_source
from tests.helpers.fixtures import (
    WNIDS,
    WORDS,
    make_cifar10,
    make_cifar100,
    make_image_folder,
    make_imagenet_train,
    make_imagenet_train_tar,
    make_imagenet_val,
    make_stl10,
    make_svhn,
)
from tests.helpers.shard_reading import pixels, read_samples

OPTS = ConvertOptions(samples_per_shard=7)


def _convert(dataset, src, split, out, **options):
    summary = convert(build_source(dataset, src, split, **options), str(out), OPTS, progress=False)
    return summary, read_samples(str(out), dataset, split)


def _assert_pixels(samples, images, labels, split_key):
    assert len(samples) == len(labels)
    for i, (image, label) in enumerate(zip(images, labels)):
        ext, data, got_label = samples[f"{split_key}_{i:07d}"]
        assert ext == "png" and got_label == label
        np.testing.assert_array_equal(pixels(data), image)


def test_stl10_all_splits_and_folds(tmp_path):
    truth = make_stl10(str(tmp_path / "src"))
    for split in ("train", "test", "unlabeled"):
        _, samples = _convert("stl10", str(tmp_path / "src"), split, tmp_path / "out")
        _assert_pixels(samples, *truth[split], split)
    assert {s[2] for s in samples.values()} == {-1}
    _, both = _convert("stl10", str(tmp_path / "src" / "stl10_binary"), "train+unlabeled", tmp_path / "out")
    assert len(both) == 35 and sum(s[2] == -1 for s in both.values()) == 15
    _, fold = _convert("stl10", str(tmp_path / "src"), "train", tmp_path / "fold3", fold=3)
    chosen = [3, 13]
    assert sorted(fold) == ["train_fold3_0000000", "train_fold3_0000001"]
    for j, i in enumerate(chosen):
        np.testing.assert_array_equal(pixels(fold[f"train_fold3_{j:07d}"][1]), truth["train"][0][i])
    manifest = read_manifest(str(tmp_path / "out" / "stl10-train.manifest.json"))
    assert manifest.classes[0] == "airplane" and manifest.complete


def test_cifar10_and_cifar100(tmp_path):
    truth = make_cifar10(str(tmp_path / "src"))
    for split in ("train", "test"):
        _, samples = _convert("cifar10", str(tmp_path / "src"), split, tmp_path / "c10")
        _assert_pixels(samples, *truth[split], split)
    truth = make_cifar100(str(tmp_path / "src"))
    _, fine = _convert("cifar100", str(tmp_path / "src"), "train", tmp_path / "fine")
    _assert_pixels(fine, truth["train"][0], truth["train"][1], "train")
    summary, coarse = _convert("cifar100", str(tmp_path / "src"), "test", tmp_path / "coarse", labels="coarse")
    _assert_pixels(coarse, truth["test"][0], truth["test"][2], "test")
    assert len(read_manifest(summary.manifest).classes) == 20


def test_svhn_label_10_is_digit_0(tmp_path):
    truth = make_svhn(str(tmp_path / "src"))
    for split in ("train", "test", "extra"):
        _, samples = _convert("svhn", str(tmp_path / "src"), split, tmp_path / "out")
        _assert_pixels(samples, *truth[split], split)


def test_imagenet_train_tree_and_tar_of_tars_give_identical_shards(tmp_path):
    truth = make_imagenet_train(str(tmp_path / "src"))
    tree, samples = _convert("imagenet", str(tmp_path / "src"), "train", tmp_path / "tree")
    assert len(samples) == len(truth)
    converted = 0
    for key, (data, label) in truth.items():
        ext, got, got_label = samples[key]
        assert got_label == label
        if data.startswith(b"\x89PNG"):
            assert ext == "png" and got == data  # a PNG in disguise keeps its bytes under its real extension
        elif key == f"{WNIDS[1]}_1000":  # the CMYK JPEG becomes an RGB PNG DALI can decode
            assert ext == "png" and pixels(got).shape[2] == 3
            converted += 1
        else:
            assert ext == "jpg" and got == data  # JPEG bytes copied, never re-encoded
    assert tree.converted_samples == converted == 1

    tar_path = tmp_path / "ILSVRC2012_img_train.tar"
    make_imagenet_train_tar(str(tmp_path / "src" / "train"), str(tar_path))
    from_tar, _ = _convert("imagenet", str(tar_path), "train", tmp_path / "tar")
    a, b = read_manifest(tree.manifest), read_manifest(from_tar.manifest)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert a.synsets == WNIDS


def test_imagenet_val_from_devkit_csv_and_sorted_folders(tmp_path):
    truth = make_imagenet_val(str(tmp_path / "src"))
    devkit, by_devkit = _convert("imagenet", str(tmp_path / "src"), "val", tmp_path / "devkit",
                                 devkit=str(tmp_path / "src" / "ILSVRC2012_devkit_t12"))
    csv, by_csv = _convert("imagenet", str(tmp_path / "src"), "val", tmp_path / "csv",
                           val_csv=str(tmp_path / "src" / "LOC_val_solution.csv"))
    for key, (data, label) in truth.items():
        assert by_devkit[key] == ("jpg", data, label)
        assert by_csv[key] == ("jpg", data, label)
    manifest = read_manifest(devkit.manifest)
    assert manifest.synsets == WNIDS and manifest.classes == WORDS
    assert read_manifest(csv.manifest).classes == WORDS

    sorted_root = tmp_path / "sorted" / "val"
    for key, (data, label) in truth.items():
        (sorted_root / WNIDS[label]).mkdir(parents=True, exist_ok=True)
        (sorted_root / WNIDS[label] / f"{key}.JPEG").write_bytes(data)
    _, by_folder = _convert("imagenet", str(tmp_path / "sorted"), "val", tmp_path / "sorted_out")
    assert by_folder == by_devkit


def test_image_folder_lossless_formats_round_trip(tmp_path):
    truth = make_image_folder(str(tmp_path / "src"))
    summary, samples = _convert("folder", str(tmp_path / "src"), "train", tmp_path / "out")
    for key, (image, label) in truth.items():
        ext, data, got_label = samples[key]
        assert got_label == label
        np.testing.assert_array_equal(pixels(data), image)
    assert read_manifest(summary.manifest).classes == ["cats", "dogs"]


def test_digits_is_embedded_and_deterministic(tmp_path):
    a, samples = _convert("digits", None, "train", tmp_path / "a")
    b, test = _convert("digits", None, "test", tmp_path / "a")
    assert len(samples) + len(test) == 1797 and not set(samples) & set(test)
    assert {s[2] for s in samples.values()} == set(range(10))
    assert pixels(next(iter(samples.values()))[1]).shape == (32, 32, 3)
    again, _ = _convert("digits", None, "train", tmp_path / "b")
    assert read_manifest(a.manifest).shards == read_manifest(again.manifest).shards


@pytest.mark.parametrize("dataset, make, expected", [
    ("stl10", lambda root: None, "stl10_binary"),
    ("cifar10", lambda root: None, "cifar-10-batches-py"),
    ("cifar100", lambda root: None, "cifar-100-python"),
    ("svhn", lambda root: None, "train_32x32.mat"),
    ("imagenet", lambda root: os.makedirs(os.path.join(root, "train")), "wnid"),
    ("folder", lambda root: None, "one sub-folder per class"),
])
def test_missing_files_are_named_with_the_expected_layout(tmp_path, dataset, make, expected):
    make(str(tmp_path))
    with pytest.raises(SourceLayoutError, match=expected):
        build_source(dataset, str(tmp_path), "train")


def test_missing_stl10_labels_file_is_named(tmp_path):
    make_stl10(str(tmp_path))
    os.remove(tmp_path / "stl10_binary" / "test_y.bin")
    with pytest.raises(SourceLayoutError, match="test_y.bin not found"):
        build_source("stl10", str(tmp_path), "test")


def test_an_image_folder_with_class_folders_and_loose_images_is_refused(tmp_path):
    make_image_folder(str(tmp_path / "src"))
    (tmp_path / "src" / "stray.png").write_bytes((tmp_path / "src" / "cats" / "cats0.png").read_bytes())
    with pytest.raises(SourceLayoutError, match="both class sub-folders and 1 images beside them"):
        build_source("folder", str(tmp_path / "src"), "train")
