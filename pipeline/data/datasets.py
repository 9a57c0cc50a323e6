"""The one table of per-dataset facts: splits, class counts, channel statistics, image sizes, encoder stem and the
augmentation strengths of each dataset.

Everything else asks this table: the converter (which splits a source has, which it writes by default), the loader
(mean/std, view size, eval resize, colour jitter and blur), the configs (a data YAML names its dataset and the roles
of its splits; the sizes and stem default to the entry here), and the config checks (class counts of the shards).
A dataset name that is not in the table is an image folder converted with `make_shards folder --name NAME`: it gets
the "folder" entry, whose facts are ImageNet's.

Mean/std are those of pixels scaled to [0, 1], as the methods' reference code uses (CIFAR-10 and STL-10 as in
pl_bolts, ImageNet's usual statistics); digits' were measured on its 32x32 RGB training split.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    splits: tuple[str, ...]  # every split the converter can write
    default_splits: tuple[str, ...]  # what `make_shards DATASET` writes without --split
    num_classes: tuple[int, ...]  # class counts its shards may carry (CIFAR-100: fine or coarse labels); () = any
    mean: RGB
    std: RGB
    native_size: int  # side of the images on disk; 0 = varies from image to image
    image_size: int  # side of the training views and the eval crop, unless data.image_size says otherwise
    stem: str  # encoder stem (pipeline.models.resnet.STEM_DOWNSAMPLE): what suits images of this size
    eval_crop_fraction: float  # eval transform: resize the shorter side to image_size / this, centre crop image_size
    jitter_strength: float  # s of the strong colour jitter (0.8s, 0.8s, 0.8s, 0.2s)
    blur: bool  # whether the strong augmentation blurs
    # kNN neighbours, for the training monitor and pipeline.evaluate alike; a small bank needs fewer than 200
    knn_k: int = 200

    def eval_resize(self, image_size: int) -> int:
        return round(image_size / self.eval_crop_fraction)


_IMAGENET_STATS = ((0.4850, 0.4560, 0.4060), (0.2290, 0.2240, 0.2250))
_SMALL = dict(native_size=32, image_size=32, stem="cifar", eval_crop_fraction=1.0, jitter_strength=0.5, blur=False)
_LARGE = dict(native_size=0, image_size=224, stem="imagenet", eval_crop_fraction=224 / 256, jitter_strength=1.0,
              blur=True)

DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("cifar10", ("train", "test"), ("train", "test"), (10,),
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), **_SMALL),
    DatasetInfo("cifar100", ("train", "test"), ("train", "test"), (100, 20),
                (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), **_SMALL),
    DatasetInfo("svhn", ("train", "test", "extra"), ("train", "test", "extra"), (10,),
                (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), **_SMALL),
    # ~144 training images per class: k = 200 would vote across classes
    DatasetInfo("digits", ("train", "test"), ("train", "test"), (10,),
                (0.3089, 0.3089, 0.3089), (0.3486, 0.3486, 0.3486), **_SMALL, knn_k=20),
    # STL-10's combined pretraining split (train+unlabeled, 105k images) is written only when asked for by name.
    DatasetInfo("stl10", ("train", "test", "unlabeled", "train+unlabeled"), ("train", "test", "unlabeled"), (10,),
                (0.4300, 0.4200, 0.3900), (0.2700, 0.2600, 0.2700), native_size=96, image_size=96, stem="stl10",
                eval_crop_fraction=96 / 105, jitter_strength=1.0, blur=True),
    DatasetInfo("imagenet", ("train", "val"), ("train", "val"), (1000,), *_IMAGENET_STATS, **_LARGE),
    # An image folder: one split per conversion (train by default), any class count, ImageNet's facts.
    DatasetInfo("folder", ("train", "val", "test"), ("train",), (), *_IMAGENET_STATS, **_LARGE),
)}


def dataset_info(name: str) -> DatasetInfo:
    """The table's entry for `name`; an image folder converted under another name gets the "folder" entry."""
    return DATASETS.get(name, DATASETS["folder"])
