"""Exact sharding and resume of the DALI shard loader, on real digits shards of deliberately uneven sizes: simulated
ranks see disjoint samples that together make the epoch, run equal step counts, and a restored loader continues with
exactly the samples not yet seen, for the same or another world size."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import DATASETS
from pipeline.data.loading.loader import ShardLoader
from pipeline.data.loading.sample_order import SampleOrder
from tests.helpers.loader_data import digits_samples, digits_split, make_loader

N_DIGITS = 1438


def take(loader: ShardLoader, steps: int | None = None) -> list:
    """(keys, valid) of the next `steps` batches of the current epoch (all of them by default)."""
    out = []
    for batch in loader:
        out.append((batch.keys, batch.valid.numpy()))
        if steps is not None and len(out) == steps:
            break
    return out


def real_keys(batches) -> list[str]:
    return [k for keys, valid in batches for k, v in zip(keys, valid) if v]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Six shards from 1 to 600 samples."""
    return digits_split(str(tmp_path_factory.mktemp("uneven")), [1, 600, 2, 300, 35, 500])


@pytest.mark.parametrize("sizes, world, batch", [
    ([1, 600, 2, 300, 35, 500], 3, 50),  # uneven shards
    ([1200, 238], 3, 64),  # fewer shards (2) than ranks x reader workers (3 x 2)
    ([N_DIGITS], 2, 1000),  # one shard; the global batch exceeds the split
])
def test_ranks_are_disjoint_cover_the_epoch_and_run_equal_steps(tmp_path, sizes, world, batch):
    manifest = digits_split(str(tmp_path), sizes)
    steps = -(-N_DIGITS // (world * batch))
    per_rank = []
    for rank in range(world):
        loader = make_loader(manifest, rank, world, batch_size=batch, read_workers=2)
        assert len(loader) == loader.steps_per_epoch == steps
        batches = take(loader)
        assert len(batches) == steps and all(len(keys) == batch for keys, _ in batches)
        assert loader.epoch == 1 and loader.position == 0
        per_rank.append(real_keys(batches))
        loader.close()
    union = [k for keys in per_rank for k in keys]
    assert len(union) == len(set(union)) == N_DIGITS  # disjoint, and every sample once
    assert set(union) == {key for key, _ in digits_samples()}
    assert sum(steps * batch - len(keys) for keys in per_rank) == steps * world * batch - N_DIGITS  # only padding


def test_batches_hold_the_right_pixels_and_labels(uneven):
    truth = {key: parts for key, parts in digits_samples()}
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (DATASETS["digits"].mean, DATASETS["digits"].std))
    loader = make_loader(uneven, batch_size=100)
    batch = next(iter(loader))
    pixels = (batch.views["image"].numpy() * std + mean) * 255
    for i, key in enumerate(batch.keys):
        expected = np.asarray(Image.open(io.BytesIO(truth[key]["png"])).convert("RGB"), np.float32).transpose(2, 0, 1)
        np.testing.assert_allclose(pixels[i], expected, atol=0.01)
        assert batch.labels[i].item() == int(truth[key]["cls"])
    loader.close()


def test_order_is_reshuffled_per_epoch_from_seed_and_epoch(uneven):
    loader = make_loader(uneven, batch_size=256, seed=3)
    epoch0, epoch1 = real_keys(take(loader)), real_keys(take(loader))
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    loader.close()
    again = make_loader(uneven, batch_size=256, seed=3)
    assert real_keys(take(again)) == epoch0
    again.close()
    other = make_loader(uneven, batch_size=256, seed=4)
    assert real_keys(take(other)) != epoch0
    other.close()
    unshuffled = make_loader(uneven, batch_size=256, shuffle=False)
    assert real_keys(take(unshuffled)) == [key for key, _ in digits_samples()]  # manifest order
    unshuffled.close()


@pytest.mark.parametrize("new_world", [2, 3])
def test_resume_continues_with_exactly_the_unseen_samples(uneven, new_world):
    world, k = 2, 4
    seen, states = [], []
    for rank in range(world):
        loader = make_loader(uneven, rank, world, batch_size=64, seed=7)
        take(loader)  # epoch 0 entirely
        seen += real_keys(take(loader, k))  # then k batches of epoch 1
        states.append(loader.state_dict())
        loader.close()
    assert all(s == states[0] for s in states) and states[0]["epoch"] == 1 and states[0]["step"] == k
    rest = []
    for rank in range(new_world):
        loader = make_loader(uneven, rank, new_world, batch_size=64, seed=0)  # the seed comes back from the state
        loader.load_state_dict(states[0])
        steps = len(loader)
        batches = take(loader)
        assert len(batches) == steps and loader.epoch == 2
        rest.append(real_keys(batches))
        loader.close()
    assert len({len(b) for b in rest}) <= 2  # ranks differ at most by padding in the last batch
    remaining = [key for keys in rest for key in keys]
    assert len(remaining) == len(set(remaining)) and not set(remaining) & set(seen)
    assert sorted(seen + remaining) == sorted(key for key, _ in digits_samples())
    # the same positions as an uninterrupted run of the same world size
    if new_world == world:
        straight = make_loader(uneven, 0, world, batch_size=64, seed=7)
        take(straight)
        assert real_keys(take(straight))[k * 64:] == rest[0]
        straight.close()


def test_state_saved_at_the_end_of_an_epoch_resumes_at_the_next(uneven):
    loader = make_loader(uneven, batch_size=512)
    take(loader)
    state = loader.state_dict()
    assert (state["epoch"], state["step"], state["position"]) == (1, 0, 0)
    loader.close()
    mid = make_loader(uneven, batch_size=512)
    mid.load_state_dict({**state, "epoch": 0, "step": 3, "position": 3 * 512})  # past the last sample
    assert (mid.epoch, mid.position, len(mid)) == (1, 0, 3)
    mid.close()


def test_a_state_from_another_split_is_refused(uneven):
    loader = make_loader(uneven)
    with pytest.raises(ValueError, match="1000 samples"):
        loader.load_state_dict({**loader.state_dict(), "num_samples": 1000})


def test_stream_positions_run_through_epochs_without_a_break():
    order = SampleOrder(num_samples=10, local_batch=2, rank=1, world_size=2, seed=0)  # 3 steps per epoch
    assert order.steps_per_epoch == 3 and order.steps_from(8) == 1
    # a stream resumed at epoch 4, position 8 (after 2 steps): one step left, then epochs 5, 6... from position 0
    located = [order.locate(4, 8, i) for i in range(5)]
    assert located == [(4, 8), (5, 0), (5, 4), (5, 8), (6, 0)]
    rows, valid = order.batch(5, 8)  # positions 10, 11: padding that wraps to the start of the order
    assert not valid.any() and list(rows) == list(order.permutation(5)[:2])


EVERY_AUGMENTATION = {"c": "contrastive", "j": "crop_jitter", "j2": "crop_jitter", "r": "randaugment",
                      "f": "crop_flip", "t": "center_crop"}


def views_by_key(loader: ShardLoader, steps: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """key -> view name -> pixels, for the real samples of the next `steps` batches (all of the epoch by default)."""
    out = {}
    for n, batch in enumerate(loader, 1):
        for i in np.flatnonzero(batch.valid.numpy()):
            out[batch.keys[i]] = {name: x[i].numpy() for name, x in batch.views.items()}
        if n == steps:
            break
    return out


def test_a_samples_views_depend_only_on_seed_epoch_and_sample(tmp_path):
    """Every random parameter is a function of (seed, epoch, sample): a run resumed mid-epoch at another world size
    and per-rank batch sees, bit for bit, the views of an uninterrupted single-rank run (the STL-10 profile adds the
    blur to the contrastive view)."""
    manifest = digits_split(str(tmp_path), [700, 738])
    options = {"views": EVERY_AUGMENTATION, "seed": 3, "profile": "stl10"}
    straight = make_loader(manifest, batch_size=96, **options)
    reference = views_by_key(straight)
    next_epoch = views_by_key(straight, 1)
    straight.close()
    resumed, states = {}, []
    for rank in range(2):
        loader = make_loader(manifest, rank, 2, batch_size=40, **options)
        resumed.update(views_by_key(loader, 5))
        states.append(loader.state_dict())
        loader.close()
    for rank in range(3):
        loader = make_loader(manifest, rank, 3, batch_size=24, read_workers=2, **options)
        loader.load_state_dict(states[0])
        resumed.update(views_by_key(loader))
        loader.close()
    assert resumed.keys() == reference.keys()
    for key, views in reference.items():
        for name, pixels in views.items():
            assert np.array_equal(resumed[key][name], pixels), f"{key} view {name} differs after the resume"
    # ... and the views change from one epoch to the next and between two views of one augmentation
    key = next(iter(next_epoch))
    assert not np.array_equal(next_epoch[key]["c"], reference[key]["c"])
    assert np.array_equal(next_epoch[key]["t"], reference[key]["t"])
    assert sum(not np.array_equal(v["j"], v["j2"]) for v in reference.values()) == len(reference)
