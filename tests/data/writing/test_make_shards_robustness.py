"""make_shards as users run it: the CLI, DALI reading the result, crashes and resume, verification, bad input."""

import errno
import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import fsspec
import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

from pipeline.data.shard_format import index_name, read_manifest
from pipeline.data.writing.convert import ConversionError, ConvertOptions, convert
from pipeline.data.writing.sources import build_source
from pipeline.data.writing.verify import verify
from tests.helpers import REPO
from tests.helpers.fixtures import (
    bomb_image,
    make_cifar10,
    make_cifar100,
    make_image_folder,
    make_imagenet_train,
    make_stl10,
)
from tests.helpers.shard_reading import pixels, read_samples

TOOL = str(REPO / "tools" / "make_shards.py")
WDS2IDX = os.path.join(os.path.dirname(sys.executable), "wds2idx")


def run_tool(*args, **kwargs):
    return subprocess.run([sys.executable, TOOL, *args, "--quiet"], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    result = run_tool("digits", "--out", str(out), "--samples-per-shard", "200", "--verify")
    assert result.returncode == 0, result.stderr
    assert "verify digits/train: OK" in result.stdout
    return out


def test_index_files_are_byte_identical_to_dali_wds2idx(digits_shards, tmp_path):
    manifest = read_manifest(str(digits_shards / "digits-train.manifest.json"))
    assert len(manifest.shards) == 8
    for shard in manifest.shards:
        theirs = tmp_path / "theirs.idx"
        subprocess.run([WDS2IDX, str(digits_shards / shard.name), str(theirs)], check=True, capture_output=True)
        assert theirs.read_bytes() == (digits_shards / index_name(shard.name)).read_bytes()


def test_dali_webdataset_reader_decodes_every_sample(digits_shards):
    manifest = read_manifest(str(digits_shards / "digits-test.manifest.json"))
    tars = [str(digits_shards / s.name) for s in manifest.shards]

    @pipeline_def(batch_size=manifest.num_samples, num_threads=2, device_id=None)
    def read_all():
        image, label = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                             ext=["jpg;png", "cls"], missing_component_behavior="error", name="r")
        return fn.decoders.image(image, device="cpu", output_type=types.RGB), label

    pipe = read_all()
    pipe.build()
    assert pipe.epoch_size("r") == manifest.num_samples
    images, labels = pipe.run()
    expected = read_samples(str(digits_shards), "digits", "test")
    by_pixels = {pixels(data).tobytes(): label for _, data, label in expected.values()}
    for i in range(manifest.num_samples):
        image = np.array(images[i])
        assert image.shape == (32, 32, 3)
        assert by_pixels[image.tobytes()] == int(bytes(np.array(labels[i])).decode())


def test_killed_run_resumes_to_the_same_manifest(tmp_path):
    reference = tmp_path / "reference"
    assert run_tool("digits", "--split", "train", "--out", str(reference), "--samples-per-shard", "40").returncode == 0

    out = tmp_path / "killed"
    manifest = out / "digits-train.manifest.json"
    proc = subprocess.Popen([sys.executable, TOOL, "digits", "--split", "train", "--out", str(out),
                             "--samples-per-shard", "40", "--workers", "2", "--quiet"], start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = json.loads(manifest.read_text())
    assert not interrupted["complete"] and 3 <= len(interrupted["shards"]) < 36
    listed = {s["name"] for s in interrupted["shards"]}
    for name in (n for n in os.listdir(out) if n.endswith(".tar")):  # whatever has a final name is complete
        with tarfile.open(out / name) as tar:
            count = len(tar.getmembers()) // 2
        assert (out / index_name(name)).read_text().startswith(f"v1.2 {count}\n") and count == 40

    result = run_tool("digits", "--split", "train", "--out", str(out), "--samples-per-shard", "40", "--verify")
    assert result.returncode == 0, result.stderr
    assert f"{len(listed)} already complete" in result.stdout
    assert manifest.read_text() == (reference / "digits-train.manifest.json").read_text()
    assert not (out / "_partial").exists()


def test_verify_catches_one_flipped_byte(tmp_path):
    assert run_tool("digits", "--split", "test", "--out", str(tmp_path), "--samples-per-shard", "100").returncode == 0
    shard = tmp_path / "digits-test-000002.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run_tool("digits", "--split", "test", "--out", str(tmp_path), "--verify-only")
    assert result.returncode == 1
    assert "digits-test-000002.tar: sha256 differs" in result.stderr
    repaired = run_tool("digits", "--split", "test", "--out", str(tmp_path), "--samples-per-shard", "100", "--verify")
    assert repaired.returncode == 0 and "3 already complete" in repaired.stdout  # the bad shard was rewritten


def test_verify_only_on_a_folder_that_does_not_exist_is_a_bad_command(tmp_path):
    """A mistyped --out is not "problems found" (exit 1, which reads as damaged shards): one line and exit 2."""
    result = run_tool("digits", "--out", str(tmp_path / "mistyped"), "--verify-only")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"make_shards: error: --out {tmp_path / 'mistyped'}: no such folder, so no shards to "
                             "verify (--verify-only checks a folder converted before)\n")


def test_partial_shards_never_appear_under_final_names(tmp_path):
    """A write that fails mid-shard leaves nothing under a final name; the next run finishes the job."""
    make_imagenet_train(str(tmp_path / "src"))
    source = build_source("imagenet", str(tmp_path / "src"), "train")
    victim = tmp_path / "src" / "train" / "n01443537" / "n01443537_1002.JPEG"
    data = victim.read_bytes()
    victim.unlink()  # vanishes after listing, as on a flaky network filesystem
    opts = ConvertOptions(samples_per_shard=4, strict=True)
    with pytest.raises((ConversionError, OSError)):
        convert(source, str(tmp_path / "out"), opts, progress=False)
    listed = {s.name for s in read_manifest(str(tmp_path / "out" / "imagenet-train.manifest.json")).shards}
    assert {n for n in os.listdir(tmp_path / "out") if n.endswith(".tar")} == listed
    victim.write_bytes(data)
    summary = convert(source, str(tmp_path / "out"), opts, progress=False)
    assert summary.samples == 12 and summary.shards_resumed == len(listed)


def test_corrupt_images_are_reported_and_skipped_or_fatal_with_strict(tmp_path):
    make_imagenet_train(str(tmp_path / "src"))
    truncated = tmp_path / "src" / "train" / "n01440764" / "n01440764_1001.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (tmp_path / "src" / "train" / "n01440764" / "n01440764_1002.JPEG").write_bytes(b"not an image at all")
    result = run_tool("imagenet", "--src", str(tmp_path / "src"), "--split", "train", "--out", str(tmp_path / "out"),
                      "--verify")
    assert result.returncode == 0, result.stderr
    assert "2 skipped" in result.stdout
    report = [json.loads(line) for line in (tmp_path / "out" / "imagenet-train.report.jsonl").read_text().splitlines()]
    skipped = {r["key"]: r["reason"] for r in report if r["action"] == "skipped"}
    assert set(skipped) == {"n01440764_1001", "n01440764_1002"}
    assert "truncated" in skipped["n01440764_1001"]
    assert read_manifest(str(tmp_path / "out" / "imagenet-train.manifest.json")).num_samples == 10

    strict = run_tool("imagenet", "--src", str(tmp_path / "src"), "--split", "train", "--out",
                      str(tmp_path / "strict"), "--strict")
    assert strict.returncode == 2 and "n01440764_100" in strict.stderr and "--strict" in strict.stderr


def test_folder_holding_another_dataset_is_refused_without_overwrite(tmp_path):
    make_stl10(str(tmp_path / "src"))
    assert run_tool("digits", "--split", "test", "--out", str(tmp_path / "out")).returncode == 0
    refused = run_tool("stl10", "--src", str(tmp_path / "src"), "--split", "test", "--out", str(tmp_path / "out"))
    assert refused.returncode == 2 and "already holds 'digits' shards" in refused.stderr
    changed = run_tool("digits", "--split", "test", "--out", str(tmp_path / "out"), "--seed", "1")
    assert changed.returncode == 2 and "--overwrite" in changed.stderr
    replaced = run_tool("digits", "--split", "test", "--out", str(tmp_path / "out"), "--seed", "1", "--overwrite")
    assert replaced.returncode == 0 and "0 already complete" in replaced.stdout


def test_memory_filesystem_output_and_verify():
    summary = convert(build_source("digits", None, "test"), "memory://shards/digits",
                      ConvertOptions(samples_per_shard=100), progress=False)
    fs = fsspec.filesystem("memory")
    names = sorted(os.path.basename(p) for p in fs.ls("/shards/digits", detail=False))
    assert names == ["digits-test-00000%d.%s" % (i, ext) for i in range(4) for ext in ("idx", "tar")] + \
        ["digits-test.manifest.json", "digits-test.report.jsonl"]
    assert summary.manifest.startswith("memory://") and \
        summary.manifest.endswith("/shards/digits/digits-test.manifest.json")
    assert verify(summary.manifest, progress=False) == []
    fs.pipe_file("/shards/digits/digits-test-000001.idx", b"v1.2 0\n")
    assert verify(summary.manifest, progress=False) == ["digits-test-000001.idx: does not match the tar's members"]


def test_parallel_workers_write_the_same_shards_as_one(tmp_path):
    one = convert(build_source("digits", None, "train"), str(tmp_path / "one"),
                  ConvertOptions(samples_per_shard=150), progress=False)
    two = convert(build_source("digits", None, "train"), str(tmp_path / "two"),
                  ConvertOptions(samples_per_shard=150, workers=2), progress=False)
    assert read_manifest(one.manifest).shards == read_manifest(two.manifest).shards


def test_byte_limit_and_jpeg_option(tmp_path):
    summary = convert(build_source("digits", None, "test"), str(tmp_path),
                      ConvertOptions(samples_per_shard=1000, max_shard_bytes=200_000, image_format="jpg",
                                     jpeg_quality=80), progress=False)
    manifest = read_manifest(summary.manifest)
    assert len(manifest.shards) > 1 and all(s.bytes <= 200_000 + 10240 for s in manifest.shards)
    samples = read_samples(str(tmp_path), "digits", "test")
    assert {ext for ext, _, _ in samples.values()} == {"jpg"}


def test_named_image_folder_without_split_converts_its_train_split(tmp_path):
    make_image_folder(str(tmp_path / "src"))
    result = run_tool("folder", "--src", str(tmp_path / "src"), "--name", "pets", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert read_manifest(str(tmp_path / "out" / "pets-train.manifest.json")).classes == ["cats", "dogs"]


def test_bad_options_and_unknown_dataset_exit_2(tmp_path):
    assert run_tool("digits", "--out", str(tmp_path), "--samples-per-shard", "0").returncode == 2
    bad_split = run_tool("cifar10", "--src", str(tmp_path), "--split", "valid", "--out", str(tmp_path))
    assert bad_split.returncode == 2 and "splits" in bad_split.stderr


def test_splits_converted_concurrently_into_one_folder(tmp_path):
    """One job per split (a Slurm array, a Kubernetes Job per split) may share the output folder."""
    procs = [subprocess.Popen([sys.executable, TOOL, "digits", "--split", split, "--out", str(tmp_path),
                               "--samples-per-shard", "20", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for split in ("train", "test")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    result = run_tool("digits", "--out", str(tmp_path), "--verify-only")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "_partial").exists()


def test_a_dataset_name_that_leaves_the_output_folder_is_refused(tmp_path):
    make_image_folder(str(tmp_path / "src"))
    proc = run_tool("folder", "--name", "../escaped", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "invalid --name '../escaped'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_decompression_bombs_are_refused_without_decoding(tmp_path):
    truth = make_image_folder(str(tmp_path / "src"))
    (tmp_path / "src" / "cats" / "bomb.jpg").write_bytes(bomb_image("jpg"))
    (tmp_path / "src" / "dogs" / "bomb2.png").write_bytes(bomb_image("png"))
    assert len(bomb_image("jpg")) < 1000
    result = run_tool("folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--verify")
    assert result.returncode == 0, result.stderr
    report = [json.loads(line) for line in (tmp_path / "out" / "folder-train.report.jsonl").read_text().splitlines()]
    skipped = {r["key"]: r["reason"] for r in report if r["action"] == "skipped"}
    assert set(skipped) == {"bomb", "bomb2"}
    assert all("20000x20000 pixels, over the limit" in reason for reason in skipped.values())
    assert read_manifest(str(tmp_path / "out" / "folder-train.manifest.json")).num_samples == len(truth)
    lower = run_tool("folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "small"), "--max-pixels", "479")
    assert lower.returncode == 2 and "every one of its 8 samples failed" in lower.stderr  # 20x24 = 480 is over too


def test_filesystem_refusals_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "dangling" / "cats").mkdir(parents=True)
    (tmp_path / "dangling" / "cats" / "x.jpg").symlink_to(tmp_path / "nowhere.jpg")
    cases = [(("folder", "--src", str(tmp_path / "a_file"), "--out", str(tmp_path / "o1")), "is not a folder"),
             (("digits", "--out", str(tmp_path / "a_file")), "exists and is not a folder"),
             (("folder", "--src", str(tmp_path / "dangling"), "--out", str(tmp_path / "o2")),
              "x.jpg: No such file or directory")]
    for args, says in cases:
        proc = run_tool(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr


class _RunsCode:
    """Unpickling it calls os.system: what a malicious pickle does."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _edit(change):
    """Re-pickles the batch after `change(batch)`, as a damaged or hand-edited copy of the real file would be."""
    def damage(path, _):
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        change(batch)
        with open(path, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return damage


def _replace(data):
    def damage(path, tmp_path):
        with open(path, "wb") as f:
            f.write(data(tmp_path) if callable(data) else data)
    return damage


def _truncate(path, _):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


# case: (dataset, file, damage(path, tmp_path), what the one line says besides the file's name)
_BAD_PICKLES = {
    "truncated": ("cifar10", "test_batch", _truncate, "pickle data was truncated"),
    "empty": ("cifar10", "test_batch", _replace(b""), "empty or truncated"),
    "not a pickle": ("cifar10", "test_batch", _replace(b"<html>403 Forbidden</html>\n"), "not a readable CIFAR pickle"),
    "runs code": ("cifar10", "test_batch", _replace(lambda t: pickle.dumps({b"data": _RunsCode(t / "pwned")})),
                  "would call posix.system"),
    "not a dict": ("cifar10", "test_batch", _replace(pickle.dumps([1, 2, 3])), "holds a list"),
    "no data": ("cifar10", "test_batch", _edit(lambda b: b.pop(b"data")), "no 'data'"),
    "no labels": ("cifar10", "test_batch", _edit(lambda b: b.pop(b"labels")), "no 'labels'"),
    "wrong shape": ("cifar10", "test_batch", _edit(lambda b: b.update({b"data": b[b"data"][:, :1024]})),
                    "N x 3072 uint8 array"),
    "wrong dtype": ("cifar10", "test_batch", _edit(lambda b: b.update({b"data": b[b"data"] * 1.5})), "float64"),
    "label out of range": ("cifar10", "data_batch_3", _edit(lambda b: b[b"labels"].__setitem__(2, 10)), "label 10"),
    "labels not ints": ("cifar10", "test_batch", _edit(lambda b: b.update({b"labels": "abcdef"})),
                        "a list of integers"),
    "a label short": ("cifar10", "test_batch", _edit(lambda b: b[b"labels"].pop()), "5 labels for 6 images"),
    "meta truncated": ("cifar10", "batches.meta", _truncate, "pickle data was truncated"),
    "meta without names": ("cifar10", "batches.meta", _edit(lambda b: b.pop(b"label_names")), "no 'label_names'"),
    "coarse label out of range": ("cifar100", "test", _edit(lambda b: b[b"coarse_labels"].__setitem__(0, 20)),
                                  "label 20"),
}


@pytest.mark.parametrize("case", sorted(_BAD_PICKLES))
def test_damaged_or_malicious_cifar_pickles_are_one_line_and_exit_2(tmp_path, case):
    """Whatever is wrong with a CIFAR file, the user reads which file and what, and nothing is left that looks like
    a converted split (no manifest, no shard); a pickle that would run code never runs it."""
    dataset, name, damage, says = _BAD_PICKLES[case]
    (make_cifar10 if dataset == "cifar10" else make_cifar100)(str(tmp_path / "src"))
    folder = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    path = tmp_path / "src" / folder / name
    damage(path, tmp_path)
    split = "train" if name.startswith("data_batch") else "test"
    labels = ("--labels", "coarse") if dataset == "cifar100" else ()
    proc = run_tool(dataset, "--src", str(tmp_path / "src"), "--split", split, *labels, "--out", str(tmp_path / "out"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"make_shards: error: {path}: ") and says in lines[0], lines[0]
    assert not (tmp_path / "pwned").exists()
    written = [p.name for p in (tmp_path / "out").rglob("*")] if (tmp_path / "out").exists() else []
    assert not [n for n in written if n.endswith((".manifest.json", ".tar"))], written


def _wait_for(predicate, proc, what):
    deadline = time.time() + 60
    while not predicate():
        assert proc.poll() is None and time.time() < deadline, f"no {what}: {proc.communicate()}"
        time.sleep(0.005)


def test_a_second_conversion_of_a_split_in_progress_refuses_and_a_killed_ones_lock_does_not_block(tmp_path):
    """One conversion is paused mid-split: a second of the same split into the same folder refuses in one line naming
    the first one's pid, touching nothing, and the first finishes intact. Killed instead, it leaves its lock file,
    which blocks nothing: the next run resumes."""
    for ending in (signal.SIGCONT, signal.SIGKILL):
        out = tmp_path / ending.name
        args = ["digits", "--split", "train", "--out", str(out), "--samples-per-shard", "20"]
        lock, manifest = out / "digits-train.lock", out / "digits-train.manifest.json"
        first = subprocess.Popen([sys.executable, TOOL, *args, "--quiet"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: manifest.exists() and json.loads(manifest.read_text())["shards"], first, "shard")
        first.send_signal(signal.SIGSTOP)
        before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
        second = run_tool(*args, "--overwrite")
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert lines[0].startswith(f"make_shards: error: another make_shards (pid {first.pid} on ") \
            and f"is converting digits/train into {out}" in lines[0], lines[0]
        assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
        first.send_signal(ending)
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=60)
        assert first.returncode == (0 if ending == signal.SIGCONT else -signal.SIGKILL), first.stderr.read()
        assert lock.exists() == (ending == signal.SIGKILL)  # a killed holder leaves the file, but not its lock
        if ending == signal.SIGKILL:
            resumed = run_tool(*args)
            assert resumed.returncode == 0 and "already complete" in resumed.stdout, resumed.stderr
        assert verify(str(manifest), progress=False) == []
        assert not lock.exists() and not (out / "_partial").exists()


def test_conversions_of_one_split_started_together_never_spoil_each_other(tmp_path):
    """Two identical conversions started at once (two terminals, a job submitted twice): each either finishes or
    refuses in one line, and the output verifies."""
    args = [sys.executable, TOOL, "digits", "--split", "test", "--samples-per-shard", "20", "--quiet"]
    for attempt in range(2):
        out = tmp_path / str(attempt)
        procs = [subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        results = [(proc.wait(timeout=120), proc.stderr.read()) for proc in procs]
        assert sorted(code for code, _ in results) in ([0, 0], [0, 2]), results
        for code, err in results:
            assert code == 0 or (len(err.strip().splitlines()) == 1 and "another make_shards (pid" in err), err
        assert verify(str(out / "digits-test.manifest.json"), progress=False) == []


def test_a_filesystem_without_locks_converts_with_a_warning(tmp_path, monkeypatch, capsys):
    """Some Lustre and NFS mounts refuse flock: the conversion goes on unlocked and says so, rather than not at all."""
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    summary = convert(build_source("digits", None, "test"), str(tmp_path), ConvertOptions(samples_per_shard=100),
                      progress=False)
    assert summary.samples == 359 and read_manifest(summary.manifest).complete
    assert "the filesystem cannot lock (No locks available); do not run two conversions of digits/test" \
        in capsys.readouterr().err
    assert not (tmp_path / "digits-test.lock").exists()
