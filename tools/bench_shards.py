#!/usr/bin/env python
"""Conversion speed of tools/make_shards.py on a JPEG folder against plain `tar cf` of the same files, in one run.

Prints seconds per GB for tar, for make_shards with 1 worker and with N workers, and the ratios to tar
(the goal: at most 1.5x tar's time with one worker, faster with more), from the best and the median of several
rounds; each round runs every contender once, so a drift in the machine's speed hits all of them alike. All read
warm files (one untimed tar pass first) and write to the same disk, which is synced before each timed command.
Whole commands are timed, so make_shards pays its interpreter start-up and file listing (about 0.3 s) too; enough
images make that small beside the copy.
The JPEGs are synthetic, of ImageNet's typical size (500x375, ~75 KB).

  python tools/bench_shards.py --images 16000 --workers 2
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_jpeg_folder(root: str, images: int, distinct: int = 500, classes: int = 10, seed: int = 0) -> int:
    """ImageNet-like JPEGs (500x375, quality 90, smooth content plus noise: ~75 KB each); `distinct` are encoded and
    the rest are copies of them (the tools copy bytes, so content variety beyond that changes nothing).
    Returns the total bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    encoded = []
    for _ in range(min(images, distinct)):
        phase = rng.uniform(0, 6.28, size=3)
        base = np.stack([127 + 100 * np.sin(xx / (20 + 7 * c) + yy / (31 + 5 * c) + phase[c]) for c in range(3)], -1)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    total = 0
    for i in range(images):
        folder = os.path.join(root, f"class{i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        data = encoded[i % len(encoded)]
        with open(os.path.join(folder, f"img{i:06d}.JPEG"), "wb") as f:
            f.write(data)
        total += len(data)
    return total


def timed(cmd: list[str], output: str) -> float:
    """Wall time of one command writing `output`, starting with no dirty pages pending; the output is removed after."""
    os.sync()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    shutil.rmtree(output) if os.path.isdir(output) else os.remove(output)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=5, help="rounds; each runs every contender once")
    p.add_argument("--workdir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="bench_shards_", dir=args.workdir)
    try:
        src = os.path.join(work, "src")
        nbytes = make_jpeg_folder(src, args.images)
        gb = nbytes / 1e9
        tar_out = os.path.join(work, "all.tar")
        tar_cmd = ["tar", "cf", tar_out, "-C", src, "."]
        timed(tar_cmd, tar_out)  # warm the page cache for everyone

        def shards(workers: int) -> tuple[list[str], str]:
            out = os.path.join(work, f"shards{workers}")
            return [sys.executable, os.path.join(ROOT, "tools", "make_shards.py"), "folder", "--src", src,
                    "--out", out, "--workers", str(workers), "--quiet"], out

        contenders = {"tar cf": (tar_cmd, tar_out)}
        for workers in sorted({1, args.workers}):
            contenders[f"make_shards {workers} worker(s)"] = shards(workers)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):  # round robin, so a drift in the machine's speed hits every contender alike
            for name, (cmd, out) in contenders.items():
                times[name].append(timed(cmd, out))
        best = {name: min(t) for name, t in times.items()}
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"{args.images} JPEGs, {nbytes / 1e6:.1f} MB, {args.repeats} rounds")
        for name in contenders:
            print(f"{name:26s} best {best[name]:6.3f} s  {best[name] / gb:5.2f} s/GB  ratio to tar "
                  f"{best[name] / best['tar cf']:.2f}x   (median {median[name]:6.3f} s, "
                  f"ratio {median[name] / median['tar cf']:.2f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
