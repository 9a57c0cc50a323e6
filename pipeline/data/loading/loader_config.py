"""The loader's settings, in two plain dataclasses: `LoaderTuning` (how the loader runs; the training config embeds
it as the node `data.loader`) and `LoaderConfig` (what one use of the loader reads and makes: a split, its views, a
per-rank batch, a seed, an order), so tools and tests can build either directly.

Fields whose values are a fixed set are StrEnums and numeric fields carry their allowed range (pipeline/config/
fields.py), which the config checks enforce at composition and `validate()` enforces here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from pipeline.config.fields import at_least, greater_than, in_range, matching, problems
from pipeline.data.image_bytes import MAX_PIXELS


class Dtype(StrEnum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class ReadIO(StrEnum):
    auto = "auto"  # pread for local paths, fsspec otherwise
    posix = "posix"
    fsspec = "fsspec"


@dataclass
class LoaderTuning:
    normalization: str = ""  # mean/std of which dataset of the table (pipeline/data/datasets.py); "" = the shards'
    profile: str = ""  # augmentation strengths of which dataset of the table; "" = the shards'
    randaugment_n: int = at_least(1, 2)  # randaugment view: ops per image
    randaugment_m: int = in_range(0, 30, 10)  # ... and their magnitude bin (of 31)
    # NCHW-shaped tensors in channels-last memory (what cuDNN's bf16/fp16 convolutions prefer); null: on for CUDA
    channels_last: Optional[bool] = None
    dtype: Dtype = Dtype.float32
    # a CUDA device decodes with nvJPEG ("mixed") and augments on it
    device: str = matching(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N", "auto")
    num_threads: int = at_least(1, 4)  # DALI's CPU threads per rank (the Slurm scripts give each GPU 4 CPUs)
    # nvJPEG (CUDA device): the share of images sent to the hardware JPEG decoder (A100/H100) rather than the CUDA
    # one, and the size of its preallocated buffers (0 = DALI's default; ImageNet's typical 500 x 375 avoids
    # regrowing them)
    hw_decoder_load: float = in_range(0.0, 1.0, 0.65)  # DALI's default: not tuned on a GPU yet
    preallocate_width_hint: int = at_least(0, 0)
    preallocate_height_hint: int = at_least(0, 0)
    read_workers: int = at_least(1, 2)  # worker processes that read sample bytes (DALI's parallel external source)
    prefetch: int = at_least(1, 2)  # batches read and processed ahead of the training step
    io: ReadIO = ReadIO.auto  # how shard bytes are read
    strict: bool = False  # a corrupt image or a sample without a label stops the run instead of being skipped
    max_pixels: int = at_least(1, MAX_PIXELS)  # an image whose header claims more is unusable, never decoded


@dataclass
class LoaderConfig:
    manifest: str = ""  # URL of `{dataset}-{split}.manifest.json`: a path, NFS path or any fsspec URL
    views: dict[str, str] = field(default_factory=lambda: {"image": "center_crop"})  # view name -> augmentation
    batch_size: int = at_least(1, 256)  # per rank; the global batch is batch_size * world_size
    seed: int = at_least(0, 0)  # the sample order of epoch e is a function of (seed, e); augmentations are seeded too
    shuffle: bool = True  # False: manifest order (evaluation passes)
    image_size: int = at_least(0, 0)  # side of every view; 0 = the dataset's training size (pipeline/data/datasets.py)
    cache_dir: str = ""  # remote shards: a local folder where each is kept after its first read ("" = none)
    cache_max_gib: float = greater_than(0.0, 100.0)  # the cache folder's bound; least recently used copies go first
    tuning: LoaderTuning = field(default_factory=LoaderTuning)

    def validate(self) -> None:
        if not self.manifest:
            raise ValueError("loader: set `manifest` to the URL of a split's .manifest.json")
        if not self.views:
            raise ValueError("loader: no views asked for")
        if self.tuning.dtype not in set(Dtype):
            raise ValueError(f"loader: dtype must be one of {[d.value for d in Dtype]}, not {self.tuning.dtype!r}")
        if self.tuning.io not in set(ReadIO):
            raise ValueError(f"loader: io must be one of {[d.value for d in ReadIO]}, not {self.tuning.io!r}")
        found = problems(self)
        if found:
            raise ValueError(f"loader: {found[0]}")
