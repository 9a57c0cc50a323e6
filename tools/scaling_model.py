#!/usr/bin/env python
"""Predicted step time and weak-scaling efficiency from 1 to 256 GPUs for the ImageNet presets (AASAE, AAG:
ResNet-50, ZeRO 2, bf16; AAG's BatchNorm synchronised per node, AASAE's per GPU), and a check of its communication
term against gloo on this machine.

    python tools/scaling_model.py                                    # both presets, assumed 1-GPU step times
    python tools/scaling_model.py --step-time aag=0.105 --step-time aasae=0.048   # measured by the GPU check
    python tools/scaling_model.py --validate                         # + gloo all-reduce at 1, 2, 4 CPU ranks
    python tools/scaling_model.py --zero-stage 0 --syncbn-group 0    # what-ifs: another ZeRO stage, BatchNorm groups

Weak scaling: every GPU keeps the micro batch the preset has on one 8-GPU node (global batch / 8), so a step's
compute stays the measured 1-GPU step time and only communication is added. Per step, per GPU:
- gradients (ZeRO stage aware; the parameter count comes from building the preset's real method, decoder and online
  probe included): stage 0 all-reduces them, stages 1-2 reduce-scatter them and all-gather the updated parameters,
  stage 3 all-gathers parameters in forward and backward as well. Gradient reduction runs in `reduce_bucket_size`
  buckets; with `overlap_comm` a bucket's reduction starts once backward has produced it (buckets are taken as
  ready evenly over the backward pass, `--backward-fraction` of the step) and only what outlasts backward is exposed.
  The parameter all-gather after the optimizer step is always exposed.
- SyncBatchNorm, over the preset's groups of GPUs (`deepspeed.sync_batchnorm_group`; `--syncbn-group` overrides it
  for every preset): per BatchNorm layer an all-gather of (mean, invstd, count) in forward and an all-reduce of two
  C-vectors in backward, on the critical path: latency-bound, so it grows with the ring's length.
- AAG's contrastive loss: an all-gather of every rank's projections with their valid flag (views x N x 129 fp32)
  and, in backward, an all-reduce of the gathered gradient (the whole gathered tensor, so it grows with n). A
  reduce-scatter would send half the bytes, but as a ring its 255 latency steps at 256 GPUs cost more than a tree
  all-reduce of these 50 MB (2.5 against 2.1 ms in this model).
Collective cost (alpha-beta): ring all-reduce 2(n-1) alpha + 2 (n-1)/n B / bw, reduce-scatter and all-gather half
of that each; tree all-reduce 2 log2(n) alpha + 2 B / bw; `--algorithm auto` takes the cheaper. Within one node of
`--gpus-per-node` the links are NVLink; beyond it every ring also crosses InfiniBand, whose share per GPU (node's
NICs x rate / GPUs per node) and latency then bound each step. efficiency = 1-GPU step time / n-GPU step time.

The default 1-GPU step times are ASSUMED (the goal's 3,500 encoder images/s on one H100 for the encoder's images,
AASAE's decoder costing as much again) until the GPU check measures them; the table says which were assumed.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.arg_types import fraction, non_negative_float, non_negative_int, positive_float, positive_int

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"aasae": "imagenet_aasae", "aag": "imagenet_aag"}
GPUS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ASSUMED_IMAGES_PER_S = 3500.0  # the goal on one H100 (BENCHMARKS.md), not a measurement
VALIDATE_ENV = "AUGSSL_SCALING_VALIDATE"  # set in the torchrun workers of --validate: the sizes to time


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int = 8
    nvlink_gbs: float = 450.0  # GB/s per direction per GPU (H100 NVLink 4)
    ib_gbs_per_node: float = 8 * 400 / 8  # 8 NICs x 400 Gb/s = 400 GB/s per node
    nvlink_latency_us: float = 3.0
    ib_latency_us: float = 6.0
    algorithm: str = "auto"  # all-reduce: ring, tree or auto (the cheaper)

    def link(self, n: int) -> tuple[float, float]:
        """(seconds of latency per step, bytes/s per GPU) of the slowest link a collective over n GPUs uses."""
        if n <= self.gpus_per_node:
            return self.nvlink_latency_us * 1e-6, self.nvlink_gbs * 1e9
        return self.ib_latency_us * 1e-6, min(self.nvlink_gbs, self.ib_gbs_per_node / self.gpus_per_node) * 1e9


def ring_bytes(kind: str, n: int, size: float) -> float:
    """Bytes each rank sends in a ring collective over n ranks on `size` bytes (the full, gathered size)."""
    share = (n - 1) / n * size
    return 2 * share if kind == "all_reduce" else share


def collective_s(kind: str, n: int, size: float, cluster: Cluster) -> float:
    """Seconds of one all_reduce, reduce_scatter or all_gather over n GPUs of `size` bytes (full size)."""
    if n == 1 or size == 0:
        return 0.0
    alpha, bw = cluster.link(n)
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    ring = steps * alpha + ring_bytes(kind, n, size) / bw
    if kind != "all_reduce" or cluster.algorithm == "ring":
        return ring
    tree = 2 * math.log2(n) * alpha + 2 * size / bw
    return tree if cluster.algorithm == "tree" else min(ring, tree)


@dataclass(frozen=True)
class Workload:
    """What one GPU computes and communicates per step for a preset."""

    name: str
    params: int
    grad_bytes_per_param: int
    zero_stage: int
    overlap_comm: bool
    bucket_params: int
    batchnorm_channels: tuple[int, ...]
    syncbn_group: int  # GPUs that share BatchNorm statistics (0: all; 1: none, BatchNorm per GPU)
    micro_batch: int
    contrastive_floats_per_rank: int  # 0: no contrastive all-gather
    step_s: float
    step_assumed: bool


def workload(name: str, step_s: float | None) -> Workload:
    """The preset's real model (built from its composed config) and its communication per step."""
    import torch.nn as nn

    from pipeline.config.compose import load
    from pipeline.data.datasets import dataset_info
    from pipeline.methods import METHODS, method_for

    cfg = load("train", [f"experiment={PRESETS[name]}"])
    classes = max(dataset_info(cfg.data.dataset).num_classes) if cfg.monitor.online_probe else 0
    model = method_for(cfg, classes)
    micro = cfg.data.batch_size // 8  # the preset's batch on one 8-GPU node, per GPU
    views = METHODS[cfg.method.name].views
    encoded = sum(1 for aug in views.values() if aug != "center_crop")  # AASAE's target is not encoded
    contrastive = len(views) * micro * (cfg.method.proj_dim + 1) if name == "aag" else 0
    assumed = step_s is None
    if assumed:  # ASSUMED: the encoder at the goal's rate; AASAE's decoder about as costly again
        step_s = micro * encoded / ASSUMED_IMAGES_PER_S * (2 if name == "aasae" else 1)
    ds = cfg.deepspeed
    return Workload(name, sum(p.numel() for p in model.parameters() if p.requires_grad),
                    2 if ds.precision in ("bf16", "fp16") else 4, ds.zero_stage, ds.overlap_comm,
                    ds.reduce_bucket_size,
                    tuple(m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)),
                    ds.sync_batchnorm_group if ds.sync_batchnorm else 1, micro, contrastive, step_s, assumed)


def exposed_gradient_s(w: Workload, reduce_s: float, backward_s: float) -> float:
    """How long gradient reduction outlasts backward: buckets ready evenly over backward, reduced one at a time."""
    if not w.overlap_comm:
        return reduce_s
    buckets = max(1, math.ceil(w.params / w.bucket_params))
    done = 0.0
    for i in range(1, buckets + 1):
        done = max(done, backward_s * i / buckets) + reduce_s / buckets
    return done - backward_s


def predict(w: Workload, n: int, cluster: Cluster, backward_fraction: float) -> dict:
    """Step time and its communication at n GPUs (seconds)."""
    grads = w.params * w.grad_bytes_per_param
    if w.zero_stage == 0:
        reduce_s, gather_s = collective_s("all_reduce", n, grads, cluster), 0.0
    else:
        reduce_s, gather_s = collective_s("reduce_scatter", n, grads, cluster), collective_s("all_gather", n, grads,
                                                                                              cluster)
    if w.zero_stage == 3:
        gather_s *= 3  # parameters gathered in forward and backward too, before use
    g = min(n, w.syncbn_group or n)
    bn_s = sum(collective_s("all_gather", g, g * (2 * c + 1) * 4, cluster)
               + collective_s("all_reduce", g, 2 * c * 4, cluster) for c in w.batchnorm_channels)
    gathered = n * w.contrastive_floats_per_rank * 4
    contrastive_s = collective_s("all_gather", n, gathered, cluster) + collective_s("all_reduce", n, gathered, cluster)
    grads_exposed = exposed_gradient_s(w, reduce_s, backward_fraction * w.step_s) + gather_s
    exposed = grads_exposed + bn_s + contrastive_s
    step = w.step_s + exposed
    return {"gpus": n, "step_s": step, "comm_s": reduce_s + gather_s + bn_s + contrastive_s, "exposed_s": exposed,
            "grads_exposed_s": grads_exposed, "syncbn_s": bn_s, "contrastive_s": contrastive_s,
            "efficiency": w.step_s / step, "grad_bytes": grads, "grad_wire_bytes": ring_bytes("all_reduce", n, grads)}


def table(w: Workload, cluster: Cluster, backward_fraction: float, gpus=GPUS) -> list[dict]:
    """Prints the preset's predictions at each GPU count (saying whether its 1-GPU step was assumed); returns them."""
    rows = [predict(w, n, cluster, backward_fraction) for n in gpus]
    batchnorm = {0: "SyncBatchNorm over all GPUs", 1: "BatchNorm per GPU"}.get(
        w.syncbn_group, f"SyncBatchNorm per {w.syncbn_group} GPUs")
    label = "ASSUMED (goal rate), not measured" if w.step_assumed else "measured"
    print(f"\n{w.name}: {w.params / 1e6:.2f}M parameters, {w.params * w.grad_bytes_per_param / 2**20:.1f} MiB of "
          f"gradients, ZeRO {w.zero_stage}, overlap_comm {w.overlap_comm}, {len(w.batchnorm_channels)} BatchNorm "
          f"layers, {batchnorm}, micro batch {w.micro_batch}/GPU; 1-GPU step {w.step_s * 1e3:.1f} ms {label}")
    print(f"{'GPUs':>5} {'step ms':>9} {'comm ms':>9} {'exposed ms':>11} {'efficiency':>11}   exposed: "
          f"{'grads':>7} {'SyncBN':>7} {'contr.':>7}")
    for r in rows:
        print(f"{r['gpus']:>5} {r['step_s'] * 1e3:>9.1f} {r['comm_s'] * 1e3:>9.2f} {r['exposed_s'] * 1e3:>11.2f} "
              f"{r['efficiency']:>11.3f}            {r['grads_exposed_s'] * 1e3:>7.2f} {r['syncbn_s'] * 1e3:>7.2f} "
              f"{r['contrastive_s'] * 1e3:>7.2f}")
    return rows


# -- validation against gloo on this machine -----------------------------------------------------------------------
def _validate_worker() -> None:
    """In each torchrun rank: the best of several gloo all-reduces of fp32 tensors of the given byte sizes (on a
    shared machine the figure least disturbed by other work), the slowest rank's."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    sizes, repeats = (int(s) for s in os.environ[VALIDATE_ENV].split(",")), 7
    for size in sizes:
        x = torch.ones(size // 4)
        times = []
        for _ in range(repeats + 1):  # the first one sets up the connections' buffers: not counted
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - start)
        spent = torch.tensor(min(times[1:]))
        dist.all_reduce(spent, op=dist.ReduceOp.MAX)  # the slowest rank's
        if dist.get_rank() == 0:
            print(f"MEASURED {dist.get_world_size()} {size} {spent.item()}", flush=True)
    dist.destroy_process_group()


def measure(ranks: int, sizes: list[int]) -> dict[int, float]:
    env = {**os.environ, VALIDATE_ENV: ",".join(map(str, sizes)), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), __file__]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"gloo measurement at {ranks} ranks failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return {int(line.split()[2]): float(line.split()[3]) for line in out.stdout.splitlines()
            if line.startswith("MEASURED ")}


def validate(ranks=(1, 2, 4), sizes=(4096, 4_000_000, 51_200_000), fit_ranks: int = 2) -> dict:
    """Times gloo all-reduces at each rank count (51.2 MB: about AAG's 49 MiB of bf16 gradients), fits the ring
    model's latency and bandwidth to the `fit_ranks` points (least squares, relative error), and prints model
    against measurement for all: the other rank counts test the model's (n-1)/n and latency terms out of sample.
    Returns the fit and the points."""
    points = [(n, size, t) for n in ranks for size, t in measure(n, list(sizes)).items()]
    # t = a * 2(n-1) + b * 2(n-1)/n * size: linear in (latency a, seconds per byte b); weighted by 1/t
    rows = [(2 * (n - 1) / t, ring_bytes("all_reduce", n, size) / t) for n, size, t in points if n == fit_ranks]
    s11, s12 = sum(r[0] ** 2 for r in rows), sum(r[0] * r[1] for r in rows)
    s22, y1, y2 = sum(r[1] ** 2 for r in rows), sum(r[0] for r in rows), sum(r[1] for r in rows)
    det = s11 * s22 - s12 ** 2
    alpha, per_byte = max(0.0, (y1 * s22 - y2 * s12) / det), (s11 * y2 - s12 * y1) / det
    print(f"\ngloo all-reduce on this machine ({os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}); ring model fitted at {fit_ranks} ranks: latency "
          f"{alpha * 1e6:.0f} us per step, bandwidth {1 / per_byte / 1e9:.2f} GB/s")
    if max(ranks) > (os.cpu_count() or 1):
        print("(more ranks than CPUs: they time-share the cores, which the model's one link per rank does not have)")
    print(f"{'ranks':>5} {'bytes':>12} {'wire bytes':>12} {'measured ms':>12} {'model ms':>9} {'model/meas.':>11}")
    for n, size, t in points:
        model = 2 * (n - 1) * alpha + ring_bytes("all_reduce", n, size) * per_byte
        ratio = f"{model / t:>11.2f}" if n > 1 else f"{'-':>11}"
        print(f"{n:>5} {size:>12,} {ring_bytes('all_reduce', n, size):>12,.0f} {t * 1e3:>12.3f} {model * 1e3:>9.3f} "
              f"{ratio}")
    return {"latency_s": alpha, "bandwidth_bytes_s": 1 / per_byte, "points": points}


def step_time(text: str) -> tuple[str, float]:
    """--step-time PRESET=SECONDS, a preset of PRESETS and a time above 0."""
    name, _, seconds = text.partition("=")
    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"{text!r}: PRESET is one of {', '.join(PRESETS)}" if seconds else
                                         f"{text!r}: expected PRESET=SECONDS")
    try:
        return name, positive_float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: SECONDS must be a number above 0" if _looks_numeric(seconds)
                                         else f"{text!r}: expected PRESET=SECONDS") from None


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_args(argv=None) -> argparse.Namespace:
    c = Cluster()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--step-time", action="append", default=[], metavar="PRESET=SECONDS", type=step_time,
                   help="measured 1-GPU step time of a preset (default: assumed from the goal rate)")
    p.add_argument("--backward-fraction", type=fraction, default=2 / 3, help="share of the step spent in backward")
    p.add_argument("--gpus-per-node", type=positive_int, default=c.gpus_per_node)
    p.add_argument("--nvlink-gbs", type=positive_float, default=c.nvlink_gbs, help="GB/s per direction per GPU")
    p.add_argument("--ib-gbs-per-node", type=positive_float, default=c.ib_gbs_per_node,
                   help="GB/s of a node's NICs together")
    p.add_argument("--nvlink-latency-us", type=non_negative_float, default=c.nvlink_latency_us)
    p.add_argument("--ib-latency-us", type=non_negative_float, default=c.ib_latency_us)
    p.add_argument("--algorithm", default=c.algorithm, choices=("auto", "ring", "tree"))
    p.add_argument("--syncbn-group", type=non_negative_int,
                   help="GPUs that share BatchNorm statistics, for every preset (0: all; 1: none; 8: one node's); "
                        "default: each preset's deepspeed.sync_batchnorm and sync_batchnorm_group")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3),
                   help="ZeRO stage for every preset (default: each preset's deepspeed.zero_stage)")
    p.add_argument("--validate", action="store_true", help="also time gloo all-reduces at 1, 2 and 4 CPU ranks")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    """Prints the tables (and the validation); returns {preset: rows} (and "validation")."""
    args = parse_args(argv)
    cluster = Cluster(args.gpus_per_node, args.nvlink_gbs, args.ib_gbs_per_node, args.nvlink_latency_us,
                      args.ib_latency_us, args.algorithm)
    steps = dict(args.step_time)
    print(f"cluster: {cluster.gpus_per_node} GPUs per node, NVLink {cluster.nvlink_gbs:.0f} GB/s "
          f"({cluster.nvlink_latency_us} us), InfiniBand {cluster.ib_gbs_per_node:.0f} GB/s per node "
          f"({cluster.ib_latency_us} us), all-reduce {cluster.algorithm}; backward {args.backward_fraction:.2f} of "
          f"the step")
    out = {}
    for name in args.presets:
        w = workload(name, steps.get(name))
        if args.syncbn_group is not None:
            w = replace(w, syncbn_group=args.syncbn_group)
        if args.zero_stage is not None:
            w = replace(w, zero_stage=args.zero_stage)
        out[name] = table(w, cluster, args.backward_fraction)
    if args.validate:
        out["validation"] = validate()
    return out


if __name__ == "__main__":
    if os.environ.get(VALIDATE_ENV):
        _validate_worker()
    else:
        run()
