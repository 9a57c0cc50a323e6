#!/usr/bin/env python
"""Check a recipe's augmentations before a long run: the views a method trains on, drawn by the real loader (DALI)
from a split's shards, written as the grid W&B shows at step 0 (one labelled row per view).

    python tools/preview_augmentations.py data/cifar10/cifar10-train.manifest.json --recipe aag   # u, v, w rows
    python tools/preview_augmentations.py MANIFEST --recipe simclr --n 16 --out simclr.png --seed 3

The strengths are those of the manifest's dataset (pipeline/data/datasets.py), at its training image size unless
--image-size says otherwise. Exit 0 with the PNG written; 2 with one line when the shards cannot be read or the
--out folder is not there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from pipeline.exit_codes import BAD_CONFIG
from pipeline.methods import METHODS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="a split's {dataset}-{split}.manifest.json: a path or any fsspec URL")
    p.add_argument("--recipe", required=True, choices=sorted(METHODS), help="the method whose views to draw")
    p.add_argument("--out", help="the PNG to write (default: <recipe>-views.png)")
    p.add_argument("--n", type=int, default=8, help="images per row (8)")
    p.add_argument("--seed", type=int, default=0, help="which samples and which random draws (0)")
    p.add_argument("--image-size", type=int, default=0, help="side of every view (0: the dataset's training size)")
    args = p.parse_args(argv)
    if args.n < 1 or args.image_size < 0:
        p.error("--n must be at least 1 and --image-size at least 0")
    out = Path(args.out or f"{args.recipe}-views.png")
    if not out.parent.is_dir():
        print(f"preview_augmentations: --out {out}: no folder {out.parent}", file=sys.stderr)
        return BAD_CONFIG

    from pipeline.data.loading.loader import ShardLoader
    from pipeline.data.loading.loader_config import LoaderConfig, LoaderTuning
    from pipeline.data.loading.shard_index import ShardError
    from pipeline.engine.run_logger import image_grid

    views = METHODS[args.recipe].views
    cfg = LoaderConfig(manifest=args.manifest, views=dict(views), batch_size=args.n, seed=args.seed,
                       image_size=args.image_size, tuning=LoaderTuning(device="cpu", num_threads=1, read_workers=1))
    try:
        loader = ShardLoader(cfg, rank=0, world_size=1)
    except (ShardError, ValueError) as err:
        print(f"preview_augmentations: {err}", file=sys.stderr)
        return BAD_CONFIG
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    grid = image_grid({name: batch.views[name][: args.n] for name in views}, loader.mean, loader.std)
    Image.fromarray(grid).save(out)
    print(f"{out}: {args.recipe} views {', '.join(f'{n} ({a})' for n, a in views.items())} of {args.n} images from "
          f"{args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
