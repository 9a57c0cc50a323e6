#!/usr/bin/env python
"""Training throughput with the real input pipeline vs. synthetic batches already on the device, and memory per
rank, for each ZeRO stage.

    python tools/bench_train.py --shards data/digits                       # CPU: world size 2, ZeRO 0-3
    python tools/bench_train.py --shards /shards/cifar10 --dataset cifar10 --ranks 8 --backbone resnet50 \
        --batch 512 --precision bf16                                         # a GPU node
    python tools/bench_train.py --shards /shards/imagenet --dataset imagenet --ranks 1 --device cuda \
        --backbone resnet50 --batch 256 --precision bf16 --stages 2          # one GPU

From another script (the GPU check): `from tools.bench_train import run; rows = run([...same arguments...])` with
the repository on sys.path; it prints the same table and returns its rows.

The device is `--device` (auto: CUDA when torch sees one), which AUGSSL_DEVICE overrides, as for pipeline.train;
each rank takes the GPU of its local rank. For each stage it starts `torchrun --nproc-per-node RANKS` once (so that
peak memory is that stage's alone) and
times `--steps` optimizer steps after `--warmup` steps, twice: feeding the loader's batches (real), and feeding one
batch, taken from the loader beforehand and kept on the device, over and over (synthetic: the step's own cost).
input efficiency = real / synthetic samples per second (1.0: the loader never holds training back). Memory per rank:
peak RSS (CPU) or peak allocated (CUDA), and the bytes of training state this rank holds (its parameters, fp32
master partitions and optimizer states), which is what ZeRO shards. Prints one table; --json writes the rows.
The workers get these arguments through the environment, not their command line: torchrun parses its own options
from the whole command line by prefix, so `--nproc` there was read as its `--nproc-per-node`.
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

import torch

from pipeline.arg_types import positive_int
from pipeline.config.checks import ConfigError, check_launch, check_shards, data_roles
from pipeline.config.compose import load
from pipeline.device import DeviceError, resolve_device
from pipeline.engine.batchnorm_groups import check_batchnorm_device
from pipeline.exit_codes import BAD_CONFIG

REPO = Path(__file__).resolve().parents[1]
WORKER_ARGS = "AUGSSL_BENCH_TRAIN_ARGS"  # the parsed arguments, as JSON, for the torchrun workers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="folder or URL holding <dataset>-train/test manifests")
    p.add_argument("--dataset", default="digits", help="data config name (configs/data)")
    p.add_argument("--method", default="aasae", choices=("aasae", "vae", "aag", "simclr"))
    p.add_argument("--backbone", default="resnet_small", help="backbone config name (configs/backbone)")
    p.add_argument("--batch", type=positive_int, default=64, help="global batch per optimizer step")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=(0, 1, 2, 3))
    p.add_argument("--ranks", type=positive_int, default=2, help="processes (ranks, one per GPU on CUDA) per stage")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="the train config's device (AUGSSL_DEVICE overrides)")
    p.add_argument("--steps", type=positive_int, default=20, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed steps before each mode")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args(argv)


def overrides(args, stage: int, run_dir: str) -> list[str]:
    small = ["method.hidden_dim=256"] if args.method in ("aasae", "vae") and args.backbone == "resnet_small" else []
    return [f"method={args.method}", f"data={args.dataset}", f"data.root={args.shards}",
            f"backbone={args.backbone}", f"deepspeed=zero{stage}", f"deepspeed.precision={args.precision}",
            f"data.batch_size={args.batch}", f"device={args.device}", f"run_dir={run_dir}", "logger=none",
            "monitor.knn_every_epochs=0", "checkpoint.every_steps=0", "checkpoint.resume=false", "export_encoder=false",
            "epochs=1000", *small, *args.override]


def state_bytes(trainer) -> int:
    """Bytes of parameters, fp32 master partitions and optimizer states held by this rank."""
    total, seen = 0, set()

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in trainer.engine.module.parameters():
        add(getattr(p, "ds_tensor", p))
    wrapper = trainer.engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        for t in getattr(wrapper, name, []):
            add(t)
    for state in trainer.optimizer.state.values():
        for v in state.values():
            add(v)
    return total


def worker(args, stage: int, run_dir: str) -> None:
    import torch.distributed as dist

    from pipeline.device import pick, prepare_deepspeed
    from pipeline.distributed import resolve

    prepare_deepspeed(pick(args.device, resolve().local_rank))  # before DeepSpeed's import picks its accelerator
    from pipeline.engine.trainer import Trainer

    trainer = Trainer(load("train", overrides(args, stage, run_dir)))
    engine, views_needed = trainer.engine, trainer.method.views
    batches = iter(trainer.loader)
    cuda = trainer.device.type == "cuda"

    def on_device(batch):
        """The views and labels where the model computes, as the trainer moves them."""
        views = {k: batch.views[k].to(trainer.device, trainer.dtype, non_blocking=True) for k in views_needed}
        return views, batch.labels.to(trainer.device, non_blocking=True)

    def step(inputs) -> None:
        for _ in range(trainer.ga):
            loss, _ = engine(*inputs)
            engine.backward(loss)
            engine.step()

    def next_batch():
        nonlocal batches
        batch = next(batches, None)
        if batch is None:  # an epoch ended: the next one
            batches = iter(trainer.loader)
            batch = next(batches)
        return batch

    def timed(get_inputs) -> float:
        for _ in range(args.warmup):
            step(get_inputs())
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(get_inputs())
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        return args.steps * trainer.geometry.global_batch / (time.perf_counter() - start)

    fixed = on_device(next_batch())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    synthetic = timed(lambda: fixed)
    real = timed(lambda: on_device(next_batch()))
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = torch.tensor([peak, state_bytes(trainer)], dtype=torch.float64, device=trainer.device)
    rows = [torch.zeros_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    trainer.loader.close()
    if dist.get_rank() == 0:
        print("BENCH " + json.dumps({
            "zero_stage": stage, "world_size": dist.get_world_size(), "device": str(trainer.device),
            "global_batch": trainer.geometry.global_batch, "synthetic_samples_per_s": synthetic,
            "real_samples_per_s": real, "input_efficiency": real / synthetic,
            "peak_memory_mib_per_rank": [r[0].item() / 2**20 for r in rows],
            "state_mib_per_rank": [r[1].item() / 2**20 for r in rows]}), flush=True)


def check_devices(kind: str, ranks: int) -> torch.device:
    """Before torchrun: the ranks' device; on CUDA every rank needs a GPU of its own (ConfigError, in this tool's
    options)."""
    try:
        device = resolve_device(kind)  # AUGSSL_DEVICE first, as for pipeline.train
    except DeviceError as err:
        raise ConfigError(str(err)) from None
    if device.type == "cuda" and ranks > torch.cuda.device_count():
        raise ConfigError(f"--ranks {ranks}: this machine has {torch.cuda.device_count()} CUDA device(s), one per "
                          "rank; use fewer ranks or --device cpu")
    return device


def run(argv: list[str] | None = None) -> list[dict]:
    """Benchmark as the command line says; prints the table and returns its rows (RuntimeError when a stage fails,
    with the tail of its output)."""
    args = parse_args(argv)
    device = check_devices(args.device, args.ranks)
    for stage in args.stages:  # a config that cannot run is one line here, not a torchrun failure per stage
        cfg = load("train", overrides(args, stage, "run"))
        check_launch(cfg, args.ranks)
        check_batchnorm_device(cfg.deepspeed, args.ranks, device)
        check_shards(cfg.data, data_roles(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), WORKER_ARGS: json.dumps(vars(args)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results = []
    for stage in args.stages:
        with tempfile.TemporaryDirectory(prefix=f"bench_zero{stage}_") as run_dir:  # the ranks' shared run dir
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
                   __file__, "--worker-stage", str(stage), run_dir]
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"ZeRO {stage} failed (exit {proc.returncode}):\n"
                               + proc.stdout[-3000:] + proc.stderr[-3000:])
        results.append(json.loads(lines[-1][len("BENCH "):]))
    head = (f"{'ZeRO':>4} {'synthetic/s':>12} {'real/s':>9} {'input eff.':>10} {'peak MiB/rank':>16} "
            f"{'state MiB/rank':>16}")
    print(f"{args.method} on {args.dataset}, {args.backbone}, global batch {args.batch}, {args.precision}, "
          f"{args.ranks} rank(s) on {results[0]['device']}")
    print(head)
    for r in results:
        peak = "/".join(f"{m:.0f}" for m in r["peak_memory_mib_per_rank"])
        state = "/".join(f"{m:.1f}" for m in r["state_mib_per_rank"])
        print(f"{r['zero_stage']:>4} {r['synthetic_samples_per_s']:>12.1f} {r['real_samples_per_s']:>9.1f} "
              f"{r['input_efficiency']:>10.2f} {peak:>16} {state:>16}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker-stage"]:
        worker(argparse.Namespace(**json.loads(os.environ[WORKER_ARGS])), int(argv[1]), argv[2])
        return 0
    try:
        run(argv)
    except ConfigError as err:
        print(f"bench_train: {err}", file=sys.stderr)
        return BAD_CONFIG
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
