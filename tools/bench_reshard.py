#!/usr/bin/env python
"""Time and peak memory of converting a ZeRO checkpoint to DeepSpeed's universal layout, the step a resume at another
world size pays once (pipeline/engine/checkpoint.py).

    python tools/bench_reshard.py --shards data/digits                  # ResNet-50 AAG, ZeRO 2, LARS, 2 CPU ranks
    python tools/bench_reshard.py --shards data/digits --optimizer adamw

First `torchrun --nproc-per-node RANKS -m pipeline.train` trains one step (the smoke preset on the given digits
shards with --backbone, --method and --optimizer; LARS is AAG's own, whose momentum is converted through a renamed
staging copy, pipeline/engine/universal_state.py) and checkpoints: the real state of RANKS ranks. Then a fresh
process converts that checkpoint exactly as a resume does (rank 0's Checkpoints._convert, one process) and reports
the wall time of the conversion and the process's peak RSS, before it (torch and DeepSpeed imported) and after it
(the difference is what the conversion itself adds), with the sizes on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.arg_types import positive_int
from pipeline.config.checks import ConfigError, check_launch, check_shards, data_roles
from pipeline.config.compose import load
from pipeline.exit_codes import BAD_CONFIG

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="folder holding the digits-train/test manifests")
    p.add_argument("--backbone", default="resnet50", help="backbone config name (configs/backbone)")
    p.add_argument("--method", default="aag", choices=("aasae", "vae", "aag", "simclr"))
    p.add_argument("--stage", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage")
    p.add_argument("--optimizer", default="lars", choices=("lars", "adamw", "sgd", "adam"))
    p.add_argument("--ranks", type=positive_int, default=2, help="CPU ranks that write the checkpoint")
    p.add_argument("--keep", help="write the run here and keep it (default: a temporary folder)")
    p.add_argument("--convert", help=argparse.SUPPRESS)  # internal: convert this checkpoint folder, print JSON
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def convert(folder: Path) -> dict:
    """In this process: import what a trainer has imported, then convert `folder` as a resume does."""
    import deepspeed.checkpoint.ds_to_universal  # noqa: F401  (imported by a trainer already: not the conversion's)

    from pipeline.engine.checkpoint import Checkpoints

    before = peak_rss_mib()
    started = time.perf_counter()
    failed = Checkpoints(folder.parent.parent, {})._convert(folder)  # None, or (the reason, whether room ran out)
    seconds = time.perf_counter() - started
    if failed:
        raise SystemExit(f"bench_reshard: {failed[0]}")
    return {"seconds": seconds, "peak_rss_before_mib": before, "peak_rss_after_mib": peak_rss_mib()}


def size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def train_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    return ["experiment=smoke", f"method={args.method}", f"backbone={args.backbone}", f"deepspeed=zero{args.stage}",
            f"optimizer={args.optimizer}", f"data.root={args.shards}", f"run_dir={run_dir}", "max_steps=1",
            f"data.batch_size={2 * args.ranks}", "logger=none", "logger.progress_bar=false",
            "monitor.knn_every_epochs=0", "logger.image_every_steps=0", "export_encoder=false"]


def run(args: argparse.Namespace, root: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run_dir = root / "run"
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
             "-m", "pipeline.train", *train_overrides(args, run_dir)]
    started = time.perf_counter()
    subprocess.run(train, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"trained 1 step and checkpointed at {args.ranks} ranks in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    folder = next((run_dir / "checkpoints").glob("step*"))
    out = subprocess.run([sys.executable, __file__, "--shards", args.shards, "--convert", str(folder)], cwd=REPO,
                         env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result.update(checkpoint_mib=size_mib(folder) - size_mib(folder / "universal"),
                  universal_mib=size_mib(folder / "universal"))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.convert:
        print(json.dumps(convert(Path(args.convert))))
        return 0
    try:  # a config that cannot run is one line here, not a CalledProcessError from torchrun
        cfg = load("train", train_overrides(args, Path("run")))
        check_launch(cfg, args.ranks)
        check_shards(cfg.data, data_roles(cfg))
    except ConfigError as err:
        print(f"bench_reshard: {err}", file=sys.stderr)
        return BAD_CONFIG
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        r = run(args, root)
    print(f"{args.method} {args.backbone}, ZeRO {args.stage}, {args.optimizer}, {args.ranks} CPU ranks: checkpoint "
          f"{r['checkpoint_mib']:.0f} MiB -> universal {r['universal_mib']:.0f} MiB")
    before, after = r["peak_rss_before_mib"], r["peak_rss_after_mib"]
    print(f"conversion: {r['seconds']:.1f} s; peak RSS of the converting process {after:.0f} MiB (torch and "
          f"DeepSpeed imported, before converting: {before:.0f} MiB; added by the conversion: "
          f"{after - before:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
