"""The shard writer's own I/O: writes that survive short writes, and the same bytes and checksum on a local disk
(buffers written and hashed on helper threads) as through an fsspec file (memory://), whatever the buffer size."""

import hashlib
import os
import random
import tarfile

import fsspec
import pytest

from pipeline.data.writing import shard_writer
from pipeline.data.writing.shard_writer import Sample, ShardWriter


def test_write_all_survives_short_writes(tmp_path, monkeypatch):
    data = bytes(range(256)) * 40
    real_write = os.write
    calls = []

    def write_at_most_1000_bytes(fd, buffer):
        """A kernel that writes only part of what it is given, as write may."""
        calls.append(len(buffer))
        return real_write(fd, memoryview(buffer)[:1000])

    monkeypatch.setattr(shard_writer, "WRITE_SIZE", 4096)

    monkeypatch.setattr(shard_writer.os, "write", write_at_most_1000_bytes)
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        shard_writer._write_all(fd, data)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert calls == [min(4096, len(data) - 1000 * i) for i in range(11)]


def _write_shard(url: str, tmp: str, images: list[bytes]):
    fs, out_dir = fsspec.core.url_to_fs(url)
    fs.makedirs(tmp, exist_ok=True)
    fs.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(fs, out_dir, tmp, "t-train-000000.tar")
    for i, data in enumerate(images):
        writer.write(Sample(f"k{i:04d}", i % 10, "jpg", data))
    entry = writer.commit()
    with fs.open(f"{out_dir}/t-train-000000.tar", "rb") as f:
        return entry, f.read()


def test_local_and_fsspec_writers_give_the_same_tar_and_its_true_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_writer._ShardFile, "BATCH", 10_000)  # many buffers, so the helper threads interleave
    rng = random.Random(0)
    # every 20th image is larger than a buffer, so it is handed over as it is between buffers
    images = [rng.randbytes(25_000 if i % 20 == 7 else rng.randrange(1, 5000)) for i in range(200)]
    local_entry, local_bytes = _write_shard(str(tmp_path / "out"), str(tmp_path / "tmp"), images)
    memory_entry, memory_bytes = _write_shard("memory://writer-test/out", "/writer-test/tmp", images)
    assert local_bytes == memory_bytes
    assert local_entry.sha256 == memory_entry.sha256 == hashlib.sha256(local_bytes).hexdigest()
    assert local_entry.bytes == len(local_bytes)
    with tarfile.open(tmp_path / "out" / "t-train-000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:2]] == ["k0000.jpg", "k0000.cls"]
        assert [tar.extractfile(m).read() for m in members[0::2]] == images
        assert [int(tar.extractfile(m).read()) for m in members[1::2]] == [i % 10 for i in range(200)]


def test_a_failed_write_is_raised_and_the_next_shard_is_still_right(tmp_path, monkeypatch):
    """A full disk on the writing thread must stop the shard with the error, not pass silently, and must not leave
    a buffer twice among the spares (two queued buffers sharing memory would corrupt the next shard)."""
    monkeypatch.setattr(shard_writer._ShardFile, "BATCH", 10_000)
    monkeypatch.setattr(shard_writer._ShardFile, "_spare", [])
    real_write_all = shard_writer._write_all
    calls = []

    def disk_full_on_third_buffer(fd, data):
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(shard_writer, "_write_all", disk_full_on_third_buffer)
    fs = fsspec.filesystem("file")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "out").mkdir()
    writer = ShardWriter(fs, str(tmp_path / "out"), str(tmp_path / "tmp"), "t-train-000000.tar")
    with pytest.raises(OSError, match="No space left"):
        for i in range(100):
            writer.write(Sample(f"k{i:04d}", 0, "jpg", bytes([i]) * 3000))
        writer.commit()
    writer.abort()
    assert not list((tmp_path / "out").iterdir()) and not list((tmp_path / "tmp").iterdir())
    spare = shard_writer._ShardFile._spare
    assert len({id(b) for b in spare}) == len(spare)

    monkeypatch.setattr(shard_writer, "_write_all", real_write_all)
    images = [bytes([i]) * 3000 for i in range(100)]
    entry, data = _write_shard(str(tmp_path / "out"), str(tmp_path / "tmp"), images)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    with tarfile.open(tmp_path / "out" / "t-train-000000.tar") as tar:
        assert [tar.extractfile(m).read() for m in tar.getmembers()[0::2]] == images
