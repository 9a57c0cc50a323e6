"""The training/evaluation input stream: shards -> sample order -> bytes -> DALI decode and views -> torch batches.

One graph for every storage: DALI's parallel external source runs BatchSource in worker processes, which reads each
sample's bytes by (shard, offset, size) from the shards' DALI index (pread locally, fsspec range requests remotely),
so local and remote shards give the same samples in the same order by construction. The decoder is nvJPEG ("mixed")
on a CUDA device and DALI's CPU decoder otherwise; every view is made by DALI on the same device (augmentations.py).

The stream runs through epochs without a break (no pipeline drain at epoch ends); the loader cuts it into epochs of
exactly `steps_per_epoch` batches and records the position of the next batch, which state_dict() saves.

    loader = ShardLoader(cfg, rank, world_size)
    for epoch in range(loader.epoch, epochs):
        for batch in loader:           # the remaining steps of loader.epoch, identical on every rank
            loss, metrics = method(batch.views, batch.labels)
        ...checkpoint {"loader": loader.state_dict(), ...}
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.device import pick

from ..datasets import DATASETS, dataset_info
from ..image_bytes import CorruptImage, decode_rgb
from ..shard_format import manifest_url
from .augmentations import Output, eval_view, random_view, uses_conditionals, view_specs
from .batch_source import OK, STATUS_TEXT, BatchSource
from .loader_config import LoaderConfig, LoaderTuning
from .sample_order import SampleOrder
from .shard_cache import CachedReader
from .shard_index import ShardIndex, open_index
from .shard_reader import FsspecReader, PosixReader

log = logging.getLogger(__name__)
_COLUMNS = ("shard", "span_start", "span_end", "image_offset", "image_size", "label_offset", "label_size")


class BadSampleError(RuntimeError):
    """strict: a sample's image or label is unusable."""


@dataclass
class Batch:
    views: dict[str, torch.Tensor]  # name -> (B, 3, H, W) normalised, on the loader's device
    labels: torch.Tensor  # (B,) int64, -1 = unlabelled (and for a sample whose label was unusable)
    keys: list[str]  # sample keys, as in the shards
    valid: torch.Tensor  # (B,) bool: False for the padding of the epoch's last global batch and for skipped samples
    bad: int  # how many of this batch's samples (padding excluded) were unusable: undecodable, unlabelled, ...
    epoch: int
    step: int  # index of this batch in its epoch


@dataclass
class _Stream:
    """A running DALI pipeline and the (epoch, position) its next batch is at."""

    pipe: object
    iterator: object
    names: list[str]
    epoch: int
    position: int


def resolve_device(name: str, run_device: torch.device | None = None) -> torch.device:
    """The loader's device: `auto` follows the run's (pipeline/device.py picks one when there is no run)."""
    if name == "auto":
        return run_device if run_device is not None else pick("auto")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"loader: device must be cpu or cuda, not {name!r}")
    return device


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy that does not make the host wait: from pinned memory, non-blocking (a pageable source would make
    CUDA finish all queued work first). On the CPU, `x` itself."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


class ShardLoader:
    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1, run_device: torch.device | None = None):
        cfg.validate()
        self.cfg, self.tuning = cfg, cfg.tuning
        self.index: ShardIndex = open_index(cfg.manifest, strict=self.tuning.strict)
        dataset = self.index.manifest.dataset
        for key in ("normalization", "profile"):
            named = getattr(self.tuning, key)
            if named and named not in DATASETS:
                raise ValueError(f"loader: {key}={named!r} is not a dataset of the table; "
                                 f"choose from {sorted(DATASETS)}")
        stats = dataset_info(self.tuning.normalization or dataset)
        self.mean, self.std = stats.mean, stats.std
        self.info = dataset_info(self.tuning.profile or dataset)
        self.image_size = cfg.image_size or dataset_info(dataset).image_size
        self.views = view_specs(cfg.views, self.info, self.image_size,
                                (self.tuning.randaugment_n, self.tuning.randaugment_m))
        self.order = SampleOrder(len(self.index), cfg.batch_size, rank, world_size, cfg.seed, cfg.shuffle)
        self.device = resolve_device(self.tuning.device, run_device)
        layout = self.tuning.channels_last
        self.channels_last = self.device.type == "cuda" if layout is None else layout
        self.io = self.tuning.io if self.tuning.io != "auto" else ("posix" if self.index.local else "fsspec")
        if self.io == "posix" and not self.index.local:
            raise ValueError(f"loader: io=posix needs local shards, {cfg.manifest} is not")
        self.rank, self.world_size = rank, world_size
        self.epoch = self.step = self.position = 0
        self.stats: Counter[str] = Counter(left_out=len(self.index.left_out))
        self._reported: set[int] = set()
        self._undecodable: set[int] = set()  # rows whose image passed the structural check but failed to decode
        self._stream: _Stream | None = None

    # -- position ---------------------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    def __len__(self) -> int:
        """Steps left in the current epoch (all of them unless resumed mid-epoch)."""
        return self.order.steps_from(self.position)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "position": self.position, "seed": self.order.seed,
                "num_samples": len(self.index), "global_batch": self.order.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the first batch not trained on; the world size (so the global batch) may differ."""
        if state["num_samples"] != len(self.index):
            raise ValueError(f"loader state is for a split of {state['num_samples']} samples, "
                             f"{self.cfg.manifest} has {len(self.index)}")
        if int(state["seed"]) != self.order.seed:
            self.order = SampleOrder(len(self.index), self.cfg.batch_size, self.rank, self.world_size,
                                     int(state["seed"]), self.cfg.shuffle)
        self.epoch, self.step, self.position = int(state["epoch"]), int(state["step"]), int(state["position"])
        if self.position >= len(self.index):  # saved after the last batch of an epoch
            self.epoch, self.step, self.position = self.epoch + 1, 0, 0
        self.close()

    # -- iteration ----------------------------------------------------------------------------------------------
    def __iter__(self):
        """The remaining batches of the current epoch; afterwards the loader is at the start of the next one."""
        while self.position < len(self.index):
            batch = self._next_batch()
            self.step += 1
            self.position += self.order.global_batch
            yield batch
        self.epoch, self.step, self.position = self.epoch + 1, 0, 0

    def _next_batch(self) -> Batch:
        rows, valid = self.order.batch(self.epoch, self.position)
        while True:
            try:
                stream = self._stream
                if stream is None or (stream.epoch, stream.position) != (self.epoch, self.position):
                    self.close()
                    stream = self._stream = self._start()
                (out,) = next(stream.iterator)
                break
            except Exception as err:
                self.close()  # a failed DALI pipeline cannot go on; a new one restarts at this batch
                if not self._find_undecodable():
                    where = ", ".join(self.index.where(r) for r in rows[:8])
                    raise RuntimeError(f"DALI failed on epoch {self.epoch} step {self.step} of rank {self.rank} "
                                       f"(samples {where}{', ...' if len(rows) > 8 else ''}): {err}") from err
        stream.epoch, stream.position = self.order.locate(self.epoch, self.position, 1)
        if not np.array_equal(out["rows"].numpy(), rows):
            raise RuntimeError("loader: DALI returned batches out of order")
        status = out["status"].numpy()
        bad = np.flatnonzero(valid & (status != OK))  # padding repeats samples already counted
        for i in bad:
            self._bad_sample(int(rows[i]), int(status[i]))
        valid = valid & (status == OK)
        views = {name: self._to_torch(out[name]) for name in stream.names}
        return Batch(views=views, labels=to_device(out["labels"].to(torch.int64), self.device),
                     keys=[self.index.key(r) for r in rows], valid=to_device(torch.from_numpy(valid), self.device),
                     bad=len(bad), epoch=self.epoch, step=self.step)

    def _find_undecodable(self) -> bool:
        """After a DALI failure: whether the batches the pipeline had in flight hold images that pass the cheap
        structural check but do not decode (PIL tries each). Such samples are recorded, so that the restarted
        stream replaces them as corrupt; strict mode stops instead."""
        reader, c, found = self._reader(), self.index, set()
        for ahead in range(self.tuning.prefetch + 2):
            rows, _ = self.order.batch(*self.order.locate(self.epoch, self.position, ahead))
            spans = reader.read(c.shard[rows], c.span_start[rows], c.span_end[rows])
            for row, span in zip(rows, spans):
                start = c.image_offset[row]
                try:
                    decode_rgb(span[start : start + c.image_size[row]], self.tuning.max_pixels)
                except CorruptImage:
                    found.add(int(row))
        found -= self._undecodable
        if found and self.tuning.strict:
            raise BadSampleError(f"{self.index.where(min(found))}: image does not decode (strict)")
        self._undecodable |= found
        return bool(found)

    def _bad_sample(self, row: int, status: int) -> None:
        """Counted every time it comes up, logged the first time."""
        what = f"{self.index.where(row)}: {STATUS_TEXT[status]}"
        if self.tuning.strict:
            raise BadSampleError(f"{what} (strict)")
        self.stats[STATUS_TEXT[status]] += 1
        if row not in self._reported:
            self._reported.add(row)
            log.warning("skipped %s (valid=False in its batch)", what)

    def _to_torch(self, x: torch.Tensor) -> torch.Tensor:
        x = to_device(x, self.device)  # DALI's outputs are on self.device already, unless a CPU graph feeds CUDA
        if self.tuning.dtype == "bfloat16":
            x = x.to(torch.bfloat16)
        return x.permute(0, 3, 1, 2) if self.channels_last else x

    # -- the DALI pipeline ----------------------------------------------------------------------------------------
    def _reader(self):
        if self.io == "posix":
            return PosixReader(self.index.shard_paths)
        if self.cfg.cache_dir and not self.index.local:
            return CachedReader(self.index.fs, self.index.shard_paths, self.index.manifest.shards, self.cfg.cache_dir,
                                int(self.cfg.cache_max_gib * 2**30))
        return FsspecReader(self.index.fs, self.index.shard_paths)

    def _start(self) -> _Stream:
        from nvidia.dali import backend, fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        cfg, gpu = self.tuning, self.device.type == "cuda"
        views, info, size = self.views, self.info, self.image_size
        random_views = [spec for spec in views.values() if spec is not None]
        source = BatchSource(self.order, self.epoch, self.position, self._reader(),
                             {k: getattr(self.index, k) for k in _COLUMNS}, len(self.index.manifest.classes),
                             random_views, frozenset(self._undecodable), self.tuning.max_pixels)
        out = Output(self.mean, self.std, self.channels_last, half=cfg.dtype == "float16")

        @pipeline_def(enable_conditionals=uses_conditionals(views))
        def graph():
            extra = len(random_views)
            encoded, labels, rows, status, *params = fn.external_source(
                source=source, num_outputs=4 + extra, batch=True, batch_info=True, parallel=True,
                prefetch_queue_depth=cfg.prefetch,
                dtype=[types.UINT8, types.INT32, types.INT64, types.INT32, *[types.FLOAT] * extra],
                ndim=[1, 0, 0, 0, *[1] * extra], bytes_per_sample_hint=int(self.index.image_size.max()) + 4096)
            images = fn.decoders.image(encoded, output_type=types.RGB, **decoder_args(cfg, gpu))
            drawn = iter(params)
            outputs = [eval_view(images, info, size, out) if spec is None
                       else random_view(images, spec, out, next(drawn)) for spec in views.values()]
            return (*outputs, labels, rows, status)

        # Fork is cheap but unsafe once this process holds a CUDA context, whoever made it (torch, or the GPU pipeline
        # of another loader: a CPU loader built after one failed on the H100); spawn re-imports this package instead.
        start_method = "spawn" if gpu or backend.IsDriverInitialized() else "fork"
        # DALI's auto_aug calls operators DALI has deprecated, and DALI forces their warnings on: record and drop them
        with warnings.catch_warnings(record=True):
            # nothing in the graph draws at random (augmentations.py), so DALI's seed changes nothing
            pipe = graph(batch_size=self.cfg.batch_size, num_threads=cfg.num_threads,
                         device_id=self.device.index if gpu else None, seed=self.order.seed,
                         py_num_workers=cfg.read_workers, py_start_method=start_method,
                         prefetch_queue_depth=cfg.prefetch)
            pipe.build()
        remove_autograph_sources()
        names = list(views)
        iterator = DALIGenericIterator([pipe], [*names, "labels", "rows", "status"])
        return _Stream(pipe, iterator, names, self.epoch, self.position)

    def close(self) -> None:
        """Stops the DALI pipeline and its worker processes (a later iteration starts a new one where it left off)."""
        self._stream = None  # dropping the pipeline shuts it and its workers down

    def reader_workers(self) -> list:
        """The running stream's reader worker processes (multiprocessing.Process; none between streams), for the
        trainer's watchdog: DALI waits forever for the batch of one that died. DALI 2.4 keeps them in its pool."""
        pool = self._stream and self._stream.pipe._py_pool
        return list(pool.pool._processes) if pool else []


def remove_autograph_sources() -> None:
    """DALI's conditionals (autograph) write each converted function to `<tmp>/__autograph_generated_file*.py` and
    remove those files only at a normal interpreter exit, so every rank that is killed (preemption, a torchrun
    teardown, the watchdog's os._exit) leaves them behind: thousands over many runs. Once the pipeline is built their
    modules are loaded and the files are not read again (only a traceback through them would show no source line)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("__autograph_generated_file") and getattr(module, "__file__", None):
            with contextlib.suppress(FileNotFoundError):
                os.remove(module.__file__)


def decoder_args(tuning: LoaderTuning, gpu: bool) -> dict:
    """nvJPEG's settings on a CUDA device (hardware decoder share, buffer preallocation); DALI's CPU decoder
    otherwise."""
    if not gpu:
        return {"device": "cpu"}
    hints = {k: getattr(tuning, k) for k in ("preallocate_width_hint", "preallocate_height_hint") if getattr(tuning, k)}
    return {"device": "mixed", "hw_decoder_load": tuning.hw_decoder_load, **hints}


EVAL_VIEWS = {"image": "center_crop"}  # one deterministic view: evaluation passes and feature banks


def loader_for(data, role: str, views: dict[str, str], batch_size: int, rank: int, world_size: int, seed: int = 0,
               shuffle: bool = True, device: torch.device | None = None) -> ShardLoader:
    """The loader of the split that `data.<role>_split` names, from a composed config's `data` node (its `loader`
    node holds the tuning); what it makes, its per-rank batch, seed and order are the caller's, and so is the run's
    `device`, which data.loader.device=auto follows."""
    cfg = LoaderConfig(manifest=manifest_url(data.root, data.dataset, data[f"{role}_split"]), views=dict(views),
                       batch_size=batch_size, seed=seed, shuffle=shuffle, image_size=data.image_size,
                       cache_dir=data.cache_dir, cache_max_gib=data.cache_max_gib, tuning=LoaderTuning(**data.loader))
    return ShardLoader(cfg, rank, world_size, device)
