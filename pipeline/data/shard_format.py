"""The shard contract between tools/make_shards.py and the loaders (docs/shard-format.md).

Shards are `{dataset}-{split}-{000000}.tar`; each sample is `<key>.jpg|png` + `<key>.cls` (ASCII integer, -1 when
unlabelled). Beside each shard its DALI index (`.idx`, the bytes `wds2idx` writes); per split one manifest JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import fsspec

FORMAT_VERSION = "augssl-shards/1"
UNLABELED = -1
IMAGE_EXTS = ("jpg", "png")
# Flat keys without dots: DALI's index tool and webdataset both split a member name at its first dot.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,90}$")


# Dataset and shard names become file names next to the manifest: nothing that could leave that folder.
NAME_PATTERN = r"[A-Za-z0-9_\-]{1,64}"
_SHARD_RE = re.compile(rf"^{NAME_PATTERN}\.tar$")


def check_name(kind: str, name: str) -> str:
    """`name` if it is a plain file-name part ([A-Za-z0-9_-]); a dataset name like '../x' is refused."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"invalid {kind} {name!r}: use 1-64 characters of [A-Za-z0-9_-] (no dots, no slashes)")
    return name


def check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: use 1-90 characters of [A-Za-z0-9_-] (no dots, no slashes)")
    return key


def parse_label(data: bytes, num_classes: int) -> int:
    """A `.cls` member's label: -1 (unlabelled) or 0..num_classes-1; ValueError otherwise."""
    label = int(data.decode("ascii").strip())
    if label != UNLABELED and not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside -1 or 0..{num_classes - 1}")
    return label


def split_slug(split: str) -> str:
    """File-name form of a split name ('train+unlabeled' -> 'train_unlabeled')."""
    return re.sub(r"[^A-Za-z0-9_]", "_", split)


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split_slug(split)}-{index:06d}.tar"


def index_name(shard: str) -> str:
    return shard[: -len(".tar")] + ".idx"


def manifest_name(dataset: str, split: str) -> str:
    return f"{dataset}-{split_slug(split)}.manifest.json"


def manifest_url(root: str, dataset: str, split: str) -> str:
    """Where a split's manifest is under the folder or fsspec URL `root`."""
    return f"{root.rstrip('/')}/{manifest_name(dataset, split)}"


def report_name(dataset: str, split: str) -> str:
    return f"{dataset}-{split_slug(split)}.report.jsonl"


@dataclass
class ShardEntry:
    name: str
    samples: int
    bytes: int
    sha256: str
    skipped: int = 0  # source samples left out of this shard (listed in the report file)


@dataclass
class Manifest:
    dataset: str
    split: str
    classes: list[str]
    synsets: list[str] | None
    plan: str  # fingerprint of the source listing and options: a re-run may only resume the same plan
    options: dict
    shards: list[ShardEntry] = field(default_factory=list)
    complete: bool = False
    format: str = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def skipped_samples(self) -> int:
        return sum(s.skipped for s in self.shards)

    def to_json(self) -> str:
        body = asdict(self)
        body["num_samples"] = self.num_samples
        body["skipped_samples"] = self.skipped_samples
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            body = json.loads(text)
            if not isinstance(body, dict):
                raise ValueError(f"it holds a JSON {type(body).__name__}, not an object")
            if body.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {body.get('format')!r} is not {FORMAT_VERSION!r}")
            body.pop("num_samples", None)
            body.pop("skipped_samples", None)
            body["shards"] = [ShardEntry(**s) for s in body["shards"]]
            check_name("dataset name", body["dataset"])
            outside = [s.name for s in body["shards"] if not _SHARD_RE.match(s.name)]
            if outside:
                raise ValueError(f"shard name {outside[0]!r} is not a plain NAME.tar in the manifest's folder")
            return cls(**body)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{where} is not a valid augssl shard manifest: {err}") from err


def read_manifest(url: str) -> Manifest:
    """Reads a manifest from any fsspec URL; the error names the URL."""
    try:
        with fsspec.open(url, "r") as f:
            text = f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"manifest not found: {url}") from err
    return Manifest.from_json(text, where=url)


def dali_index(members: list[tuple[str, int, int]]) -> str:
    """DALI's webdataset index (v1.2, as `wds2idx` writes it) from (member name, data offset, size) in tar order."""
    samples: list[list[str]] = []
    last_key = None
    for name, offset, size in members:
        key, ext = name.split(".", 1)
        component = f"{ext} {offset} {size} {name}"
        if key != last_key:
            samples.append([component])
            last_key = key
        else:
            samples[-1].append(component)
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)
