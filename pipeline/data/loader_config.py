"""The loader's settings: a plain dataclass, so the trainer's Hydra structured config can embed it as a node and
tools and tests can build it directly."""

from __future__ import annotations

from dataclasses import dataclass

RECIPE_NAMES = ("aasae", "vae", "aag", "simclr", "eval", "linear")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class LoaderConfig:
    manifest: str = ""  # URL of `{dataset}-{split}.manifest.json`: a path, NFS path or any fsspec URL
    recipe: str = "aag"  # which views a batch holds (pipeline/data/recipes.py)
    batch_size: int = 256  # per rank; the global batch is batch_size * world_size
    seed: int = 0  # the sample order of epoch e is a function of (seed, e); augmentations are seeded from it too
    shuffle: bool = True  # False: manifest order (evaluation passes)
    profile: str = ""  # augmentation parameters (cifar | stl10 | imagenet); "" = from the manifest's dataset
    normalization: str = ""  # mean/std of which dataset; "" = the manifest's dataset
    randaugment_n: int = 2  # AAG auxiliary view: RandAugment ops per image
    randaugment_m: int = 10  # ... and their magnitude bin (of 31)
    channels_last: bool = False  # NCHW-shaped tensors in channels-last memory (what cuDNN convs prefer)
    dtype: str = "float32"  # float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N; a CUDA device decodes with nvJPEG ("mixed") and augments on it
    num_threads: int = 4  # DALI's CPU threads (decoding and augmenting on the CPU backend)
    read_workers: int = 2  # worker processes that read sample bytes (DALI's parallel external source)
    prefetch: int = 2  # batches read and processed ahead of the training step
    io: str = "auto"  # auto | posix | fsspec: how shard bytes are read (auto: pread for local paths)
    strict: bool = False  # a corrupt image or a sample without a label stops the run instead of being skipped

    def validate(self) -> None:
        if not self.manifest:
            raise ValueError("loader: set `manifest` to the URL of a split's .manifest.json")
        if self.recipe not in RECIPE_NAMES:
            raise ValueError(f"loader: unknown recipe {self.recipe!r}; choose from {RECIPE_NAMES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"loader: dtype must be one of {DTYPES}, not {self.dtype!r}")
        if self.io not in ("auto", "posix", "fsspec"):
            raise ValueError(f"loader: io must be auto, posix or fsspec, not {self.io!r}")
        if self.batch_size < 1 or self.num_threads < 1 or self.read_workers < 1 or self.prefetch < 1:
            raise ValueError("loader: batch_size, num_threads, read_workers and prefetch must be >= 1")
        if self.seed < 0:
            raise ValueError("loader: seed must be >= 0")
        if self.randaugment_n < 1 or not 0 <= self.randaugment_m <= 30:
            raise ValueError("loader: RandAugment needs n >= 1 and 0 <= m <= 30")
