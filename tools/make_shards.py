#!/usr/bin/env python
"""Converts ImageNet, STL-10, CIFAR-10/100, SVHN, an image folder or the embedded digits set into WebDataset shards
with DALI index files and a manifest per split (docs/shard-format.md), to any fsspec URL.

Examples:
  python tools/make_shards.py digits --out data/digits --verify
  python tools/make_shards.py imagenet --src /data/ILSVRC2012_img_train.tar --split train --out s3://bucket/imagenet \\
      --workers 16
  python tools/make_shards.py imagenet --src /data/imagenet --split val --devkit /data/ILSVRC2012_devkit_t12 \\
      --out /shards/imagenet
  python tools/make_shards.py stl10 --src /data/stl10_binary --split train+unlabeled --out /shards/stl10

Re-running resumes (complete shards are checked and skipped). Exit status: 0 done, 1 verification found problems,
2 bad input or options.
"""

from __future__ import annotations

import argparse
import errno
import os
import posixpath
import sys

from pipeline.data.datasets import DATASETS
from pipeline.data.image_bytes import MAX_PIXELS
from pipeline.data.shard_format import check_name, manifest_name
from pipeline.data.writing.convert import ConversionError, ConvertOptions, convert
from pipeline.data.writing.sources import SOURCES, SourceLayoutError, build_source
from pipeline.data.writing.verify import verify
from pipeline.redact import redact


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(SOURCES), help="source format")
    p.add_argument("--src", help="dataset folder or file (not needed for digits)")
    p.add_argument("--out", required=True, help="output folder: a path or any fsspec URL (file://, s3://, gs://, memory://)")
    p.add_argument("--split", action="append",
                   help="split to convert (repeatable; default: the dataset's own splits, an image folder's train; "
                        "STL-10's train+unlabeled, which its presets train on, only when named)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--shard-bytes", type=float, default=0, help="also cut shards at about this many bytes (0: off)")
    p.add_argument("--workers", type=int, default=1, help="writer processes")
    p.add_argument("--no-shuffle", action="store_true",
                   help="keep source order (default: seeded shuffle across classes)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--format", choices=("png", "jpg"), default="png",
                   help="encoding of raw-pixel sources (png is lossless)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality with --format jpg")
    p.add_argument("--verify", action="store_true", help="re-read every shard afterwards: counts, checksums, decoding")
    p.add_argument("--verify-only", action="store_true",
                   help="verify the existing output without converting anything (a plain re-run instead rewrites "
                        "shards whose checksum no longer matches)")
    p.add_argument("--strict", action="store_true", help="fail on a corrupt image instead of skipping and reporting it")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse (report) an image whose header claims more pixels (default {MAX_PIXELS:,})")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of this dataset/split")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("dataset options")
    g.add_argument("--devkit", help="imagenet val: ILSVRC2012_devkit_t12 folder (ground truth + meta.mat)")
    g.add_argument("--val-csv", help="imagenet val: Kaggle LOC_val_solution.csv")
    g.add_argument("--fold", type=int, help="stl10 train: one of the 10 predefined folds (0-9)")
    g.add_argument("--labels", choices=("fine", "coarse"), help="cifar100 label set (default fine)")
    g.add_argument("--name", help="folder: dataset name used in shard names (default 'folder')")
    args = p.parse_args(argv)
    if args.name is not None:
        try:
            check_name("--name", args.name)
        except ValueError as err:
            p.error(str(err))
    return args


def describe_os_error(err: OSError) -> str:
    """`--out: /x/y: File exists` style: what failed, on which path, and for a full disk what is kept."""
    where = f"{err.filename}: " if err.filename else ""
    if err.errno == errno.ENOSPC:
        return (f"{where}no space left on the device; the shards written so far are kept, and re-running the same "
                "command resumes after them")
    if err.errno == errno.ENOTDIR:
        return f"{where}is not a folder (--src and --out name folders)"
    if err.errno == errno.EEXIST:
        return f"{where}exists and is not a folder (--out names a folder)"
    return f"{where}{err.strerror or err}"


def main(argv=None) -> int:
    args = parse_args(argv)
    dataset = (args.name or "folder") if args.dataset == "folder" else args.dataset
    splits = args.split or list(DATASETS[args.dataset].default_splits)
    manifests = [posixpath.join(args.out, manifest_name(dataset, split)) for split in splits]
    if args.verify_only and "://" not in args.out and not os.path.isdir(args.out):
        print(f"make_shards: error: --out {args.out}: no such folder, so no shards to verify (--verify-only checks a "
              "folder converted before)", file=sys.stderr)
        return 2
    try:
        opts = ConvertOptions(samples_per_shard=args.samples_per_shard, max_shard_bytes=int(args.shard_bytes),
                              workers=args.workers, shuffle=not args.no_shuffle, seed=args.seed,
                              image_format=args.format, jpeg_quality=args.quality, strict=args.strict,
                              overwrite=args.overwrite, max_pixels=args.max_pixels)
        for split in [] if args.verify_only else splits:
            source = build_source(args.dataset, args.src, split, devkit=args.devkit, val_csv=args.val_csv,
                                  fold=args.fold, labels=args.labels, name=args.name)
            print(redact(str(convert(source, args.out, opts, progress=not args.quiet))), flush=True)
    except (ConversionError, SourceLayoutError, ValueError) as err:
        print(f"make_shards: error: {redact(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:  # the filesystem said no: one line, not a traceback
        print(f"make_shards: error: {redact(describe_os_error(err))}", file=sys.stderr)
        return 2
    if not (args.verify or args.verify_only):
        return 0
    problems = []
    for split, manifest in zip(splits, manifests):
        try:
            found = verify(manifest, workers=args.workers, progress=not args.quiet)
        except (FileNotFoundError, ValueError) as err:
            found = [str(err)]
        print(f"verify {dataset}/{split}: {'OK' if not found else f'{len(found)} problem(s)'}")
        problems += found
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
