"""Shards on a web server (http://, fsspec's http filesystem with aiohttp), served by a real HTTP server in a
thread: the loader reads them in place, and with `cache_dir` it copies each shard once to local disk, checked
against the manifest's sha256, so that the second epoch downloads nothing; the cache stays under its bound, and a
shard whose bytes differ from the manifest is refused by name instead of being cached."""

from __future__ import annotations

import os

import pytest

from tests.helpers.http_server import serve
from tests.helpers.loader_data import digits_samples, make_loader, write_split

SIZES = [40, 30, 30]  # three shards of 100 real digits


@pytest.fixture
def www(tmp_path):
    folder = tmp_path / "www"
    write_split(str(folder), "digits", "train", digits_samples()[:100], SIZES, [str(d) for d in range(10)])
    with serve(str(folder)) as (url, log):
        yield folder, f"{url}/digits-train.manifest.json", log


def shard_gets(log) -> dict[str, int]:
    counts: dict[str, int] = {}
    for method, path, _ in log:
        if method == "GET" and path.endswith(".tar"):
            counts[path] = counts.get(path, 0) + 1
    return counts


def one_epoch(loader) -> set[str]:
    return {key for batch in loader for key in batch.keys}


def test_http_shards_are_read_in_place_by_range_requests(www):
    folder, manifest, log = www
    loader = make_loader(manifest, batch_size=25)
    keys = one_epoch(loader)
    loader.close()
    assert len(keys) == 100
    ranges = [r for method, path, r in log if method == "GET" and path.endswith(".tar")]
    assert ranges and all(r.startswith("bytes=") for r in ranges)  # never a whole shard


def test_http_shards_are_cached_once_and_the_second_epoch_downloads_nothing(www, tmp_path):
    folder, manifest, log = www
    cache = tmp_path / "cache"
    loader = make_loader(manifest, batch_size=25, cache_dir=str(cache), cache_max_gib=1.0)
    assert not loader.index.local
    first = one_epoch(loader)
    after_first = shard_gets(log)
    second = one_epoch(loader)
    loader.close()
    assert len(first) == len(second) == 100
    assert sorted(after_first.values()) == [1, 1, 1]  # each shard fetched whole, once
    assert shard_gets(log) == after_first  # the second epoch read the local copies
    copies = {p.name.split("-", 1)[1]: p.read_bytes() for p in cache.glob("*.tar")}  # <sha256[:16]>-<shard name>
    assert copies == {p.name: p.read_bytes() for p in folder.glob("*.tar")}
    assert sorted(p.name for p in cache.iterdir()) == sorted([".locks", *(p.name for p in cache.glob("*.tar"))])


def test_the_cache_stays_under_its_bound(www, tmp_path):
    folder, manifest, log = www
    cache = tmp_path / "cache"
    sizes = sorted(os.path.getsize(p) for p in folder.glob("*.tar"))
    bound = 2 * sizes[0] - 1  # room for any one shard, never for two
    assert bound >= sizes[-1]
    loader = make_loader(manifest, batch_size=25, cache_dir=str(cache), cache_max_gib=bound / 2**30)
    keys = one_epoch(loader)
    loader.close()
    assert len(keys) == 100
    kept = list(cache.glob("*.tar"))
    assert len(kept) == 1  # the epoch read all three shards: each new copy evicted the one before
    assert sum(p.stat().st_size for p in kept) <= bound


def test_a_shard_unlike_its_manifest_is_refused_and_not_cached(www, tmp_path):
    folder, manifest, log = www
    shard = folder / "digits-train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600:610] = b"0123456789"  # same size, other bytes: only the checksum tells
    shard.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    loader = make_loader(manifest, batch_size=25, cache_dir=str(cache), cache_max_gib=1.0)
    with pytest.raises(Exception, match="digits-train-000001.tar.*sha256.*manifest"):
        one_epoch(loader)
    loader.close()
    assert "digits-train-000001.tar" not in {p.name for p in cache.iterdir()}
