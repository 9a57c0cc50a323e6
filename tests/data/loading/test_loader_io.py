"""Where the loader's bytes come from and what it does with bad ones: remote shards (through fsspec's memory://
filesystem) give the same samples, in the same order, as local ones; corrupt images and missing or bad labels are
counted, logged and skipped, or fatal when strict; and a missing shard, a bad URL or a manifest that does not match
its shards is an error when the loader is built, before any training step."""

from __future__ import annotations

import json
import logging
import os
import uuid

import fsspec
import pytest
import torch

from pipeline.data.loading.loader import BadSampleError, ShardLoader
from pipeline.data.loading.loader_config import LoaderConfig
from pipeline.data.loading.shard_index import ShardError
from tests.helpers.fixtures import bomb_image
from tests.helpers.loader_data import DIGIT_CLASSES, digits_samples, digits_split, labelled, make_loader, write_split

SIZES = [5, 400, 3, 300, 730]


@pytest.fixture
def memory_folder():
    url = f"memory://loader-tests/{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    fs.rm(url.removeprefix("memory://"), recursive=True)


def first_batches(loader: ShardLoader, steps: int) -> list:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps:
            break
    loader.close()
    return batches


@pytest.mark.parametrize("io", ["posix", "fsspec"])
def test_remote_shards_give_the_same_samples_in_the_same_order(tmp_path, memory_folder, io):
    local = write_split(str(tmp_path), "digits", "train", digits_samples(), SIZES, DIGIT_CLASSES)
    remote = write_split(memory_folder, "digits", "train", digits_samples(), SIZES, DIGIT_CLASSES)
    assert remote.startswith("memory://")
    options = {"method": "aag", "seed": 11, "batch_size": 100}
    here = first_batches(make_loader(local, 1, 2, io=io, **options), 3)  # fsspec: the remote code path on local files
    there = make_loader(remote, 1, 2, **options)
    assert not there.index.local
    for a, b in zip(here, first_batches(there, 3)):
        assert a.keys == b.keys
        assert torch.equal(a.labels, b.labels)
        for name in ("u", "v", "w"):  # the same bytes and the same augmentation seed: identical views
            assert torch.equal(a.views[name], b.views[name])


def _bad_split(folder: str, with_unlabelled: bool = True) -> tuple[str, dict[str, str]]:
    """200 digits and, spread over two shards, samples with a truncated PNG, non-image bytes, a non-integer label, an
    out-of-range label and (optionally) no label at all."""
    good = digits_samples()[:200]
    png = good[0][1]["png"]
    bad = {
        "truncated": labelled("truncated", png[: len(png) // 2], 1),
        "wordlabel": ("wordlabel", {"png": png, "cls": b"three"}),
        "garbage": labelled("garbage", b"certainly not an image", 2),
        "biglabel": labelled("biglabel", png, 42),
    }
    if with_unlabelled:
        bad["unlabelled"] = ("unlabelled", {"png": png})
    samples = good[:50] + [bad["truncated"], bad["wordlabel"]] + good[50:150] + list(bad.values())[2:] + good[150:]
    manifest = write_split(folder, "digits", "train", samples, [120, len(samples) - 120], DIGIT_CLASSES)
    return manifest, {name: sample[0] for name, sample in bad.items()}


def test_bad_samples_are_counted_logged_and_skipped(tmp_path, caplog):
    manifest, bad = _bad_split(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        loader = make_loader(manifest, shuffle=False)
        assert loader.stats["left_out"] == 1 and len(loader.index) == 204  # the unlabelled sample never enters
        seen, labels = [], {}
        for batch in loader:
            seen += zip(batch.keys, batch.valid.tolist())
            labels.update(zip(batch.keys, batch.labels.tolist()))
    assert len(seen) == 256 and not any(ok for _, ok in seen[204:])  # 4 steps of 64, the last one padded
    assert bad["unlabelled"] not in dict(seen)
    invalid = {key for key, ok in seen[:204] if not ok}
    assert invalid == {bad["truncated"], bad["garbage"], bad["wordlabel"], bad["biglabel"]}
    assert labels[bad["wordlabel"]] == labels[bad["biglabel"]] == -1
    assert loader.stats["corrupt image"] == 2 and loader.stats["bad label"] == 2
    log = caplog.text
    assert "digits-train-000001.tar/unlabelled: no label" in log
    assert "digits-train-000000.tar/truncated: corrupt image" in log
    assert f"{bad['biglabel']}: bad label" in log
    loader.close()


def test_strict_mode_stops_at_the_first_bad_sample(tmp_path):
    manifest, _ = _bad_split(str(tmp_path / "with"))
    with pytest.raises(ShardError, match="digits-train-000001.tar/unlabelled: no label"):
        make_loader(manifest, strict=True)
    manifest, _ = _bad_split(str(tmp_path / "without"), with_unlabelled=False)
    loader = make_loader(manifest, strict=True, shuffle=False)
    with pytest.raises(BadSampleError, match="digits-train-000000.tar/truncated: corrupt image"):
        for _ in loader:
            pass
    loader.close()


def test_an_image_that_only_the_decoder_finds_corrupt_is_skipped_too(tmp_path):
    good = digits_samples()[:130]
    png = bytearray(good[0][1]["png"])
    png[60:200] = bytes(140)  # inside the compressed pixel data: the file still looks whole
    samples = good[1:70] + [labelled("scrambled", bytes(png), 0)] + good[70:]
    manifest = write_split(str(tmp_path), "digits", "train", samples, [130], DIGIT_CLASSES)
    loader = make_loader(manifest, shuffle=False)
    batches = list(loader)
    assert [k for b in batches for k in b.keys] == [key for key, _ in samples] + [key for key, _ in samples[:62]]
    assert batches[1].valid.tolist() == [k != "scrambled" for k in batches[1].keys]
    assert loader.stats["corrupt image"] == 1
    loader.close()
    strict = make_loader(manifest, shuffle=False, strict=True)
    with pytest.raises(BadSampleError, match="digits-train-000000.tar/scrambled: image does not decode"):
        list(strict)
    strict.close()


def test_a_decompression_bomb_is_an_unusable_sample_never_decoded(tmp_path):
    good = digits_samples()[:64]
    bombs = [labelled("bomb_jpg", bomb_image("jpg"), 1, "jpg"), labelled("bomb_png", bomb_image("png"), 2)]
    manifest = write_split(str(tmp_path), "digits", "train", good[:10] + bombs + good[10:], [66], DIGIT_CLASSES)
    loader = make_loader(manifest, shuffle=False, batch_size=66)
    (batch,) = list(loader)
    assert [k for k, ok in zip(batch.keys, batch.valid.tolist()) if not ok] == ["bomb_jpg", "bomb_png"]
    assert batch.bad == 2 and loader.stats["corrupt image"] == 2
    loader.close()


@pytest.fixture
def good_split(tmp_path):
    url = write_split(str(tmp_path), "digits", "train", digits_samples()[:300], [100, 120, 80], DIGIT_CLASSES)
    return url.removeprefix("file://")


def _edit_manifest(manifest: str, edit) -> None:
    with open(manifest) as f:
        body = json.load(f)
    edit(body)
    with open(manifest, "w") as f:
        json.dump(body, f)


@pytest.mark.parametrize("damage, message", [
    (lambda d, m: os.remove(os.path.join(d, "digits-train-000001.tar")), "missing beside the manifest.*000001.tar"),
    (lambda d, m: os.remove(os.path.join(d, "digits-train-000002.idx")), "missing beside the manifest.*000002.idx"),
    (lambda d, m: open(os.path.join(d, "digits-train-000000.tar"), "ab").write(b"\0" * 512),
     "differ from the manifest: digits-train-000000.tar"),
    (lambda d, m: _edit_manifest(m, lambda b: b["shards"][1].update(samples=121)), "000001.tar holds 120 samples"),
    (lambda d, m: _edit_manifest(m, lambda b: b.update(complete=False)), "did not finish"),
    (lambda d, m: open(os.path.join(d, "digits-train-000000.idx"), "w").write("not an index\n"), "not a DALI v1.2"),
    (lambda d, m: _edit_manifest(m, lambda b: b["shards"][0].update(name="../base/x.tar")), "not a plain NAME.tar"),
    (lambda d, m: _edit_manifest(m, lambda b: b.update(dataset="../digits")), "invalid dataset name"),
])
def test_shards_that_do_not_match_the_manifest_fail_before_training(good_split, damage, message):
    damage(os.path.dirname(good_split), good_split)
    with pytest.raises(ShardError, match=message):
        make_loader(good_split)


def test_bad_urls_and_settings_fail_clearly(tmp_path):
    with pytest.raises(ShardError, match="manifest not found"):
        make_loader(str(tmp_path / "nothing.manifest.json"))
    with pytest.raises(ShardError, match="nosuchprotocol"):
        make_loader("nosuchprotocol://bucket/imagenet-train.manifest.json")
    with pytest.raises(ValueError, match="unknown augmentation"):
        make_loader(write_split(str(tmp_path), "digits", "train", digits_samples()[:10], [10], DIGIT_CLASSES),
                    views={"image": "mocov3"})
    with pytest.raises(ValueError, match="io=posix needs local shards"):
        make_loader(write_split("memory://loader-tests/posix", "digits", "train", digits_samples()[:10], [10],
                                DIGIT_CLASSES), io="posix")
    with pytest.raises(ValueError, match="set `manifest`"):
        LoaderConfig().validate()


def test_a_batch_reaches_its_device_without_a_blocking_copy(tmp_path, monkeypatch):
    """Every host-to-device move of a batch (views, labels, valid) is non-blocking (from pinned memory on CUDA), so
    the loader never makes the host wait for the GPU; counted on a patched Tensor.to."""
    manifest = digits_split(str(tmp_path), [1000, 438])
    loader = make_loader(manifest, method="aag", batch_size=32)
    moves, original = [], torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (torch.device, str)):
            moves.append(kwargs.get("non_blocking", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    batch = next(iter(loader))
    loader.close()
    assert len(batch.views) == 3 and moves.count(True) >= 5  # three views, labels, valid
    assert all(moves), f"{moves.count(False)} blocking copies"


def test_nvjpeg_settings_reach_the_gpu_decoder_under_names_dali_knows():
    """Checked against DALI's own operator schema, so a renamed argument fails here rather than on the first GPU."""
    from nvidia.dali.backend import GetSchema

    from pipeline.data.loading.loader import decoder_args
    from pipeline.data.loading.loader_config import LoaderTuning

    tuning = LoaderTuning(hw_decoder_load=0.95, preallocate_width_hint=500, preallocate_height_hint=375)
    gpu = decoder_args(tuning, gpu=True)
    assert gpu == {"device": "mixed", "hw_decoder_load": 0.95, "preallocate_width_hint": 500,
                   "preallocate_height_hint": 375}
    schema = GetSchema("decoders__Image")
    assert all(schema.HasArgument(name) for name in gpu if name != "device")
    assert decoder_args(tuning, gpu=False) == {"device": "cpu"}
    assert "preallocate_width_hint" not in decoder_args(LoaderTuning(), gpu=True)  # 0: DALI's default
