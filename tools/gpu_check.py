#!/usr/bin/env python
"""The device check's measurements (tools/gpu_check.sh runs them after the CUDA tests): one table of figures.

    python tools/gpu_check.py --device cuda --out OUT     # one GPU: 224 px, ResNet-50 bf16, about 4-5 minutes
    python tools/gpu_check.py --device cpu --out OUT      # the dry run CI makes: tiny sizes, the same code

1. Synthetic ImageNet-like shards: JPEGs of ImageNet's typical 500 x 375 pixels and about 110 KB (noise over
   smooth colour, so the decoder does real work), converted by the real tools/make_shards.py (folder source).
2. Loader throughput for the AAG views (3) and the AASAE views (2): time to the first batch (DALI's start-up) and
   images/s over whole epochs after it.
3. The eval view decoded on the device against the CPU decoder: mean absolute difference in normalised units (a
   layout or colour-order bug shows as > 0.05).
4. Training steps of the ImageNet presets (ResNet-50, ZeRO 2, bf16) for AAG and AASAE through the real Trainer.
   Input efficiency is real loader / synthetic (one batch kept on the device) images/s, timed in alternating rounds
   (3 of 25 steps each on cuda) so that the GPU's drift over the check hits both alike: each real round starts with
   prefetch + 2 untimed steps (the batches the loader prefetched while idle would come for free), each synthetic one
   with 3. The figure is the median of the rounds' ratios, which are listed too; the rates are the rounds' medians
   and the data-wait share is the time in next() over all real rounds. Then NCHW inputs against channels-last, and
   milliseconds per step in forward, backward (with ZeRO's gradient reduction) and the optimizer step, each
   synchronised; peak memory. Against the single 20-step rounds before, this adds 138 steps per preset, about 27 s
   for AAG and 25 s for AASAE on the H100 (0.198 and 0.178 s per batch-256 step, 2026-11-26).
5. AAG's rounds again with every JPEG sent to the GPU's hardware decoder (data.loader.hw_decoder_load 0.99 against
   DALI's 0.65): whether the decode's share of the GPU's cores is what the step loses. About 50 s.
Each section that fails is a row saying how, so one bad section costs no figure of the others. The table is printed
and written to OUT/summary.md (and OUT/summary.json).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # device -> (images, JPEG width x height, view side, train batch, steps per timed round, rounds, overrides)
    "cuda": dict(images=2048, jpeg=(500, 375), side=224, batch=256, steps=25, rounds=3, overrides=[]),
    "cpu": dict(images=96, jpeg=(80, 60), side=32, batch=16, steps=3, rounds=2,
                overrides=["backbone=resnet_small", "deepspeed=zero0", "data.stem=cifar", "data.loader.num_threads=1",
                           "data.loader.read_workers=1"]),
}
CLASSES = 8
HARDWARE_DECODE = 0.99  # data.loader.hw_decoder_load of the loader variant (DALI's default: 0.65)


def synthetic_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0, distinct: int = 64) -> float:
    """`count` JPEGs in CLASSES class folders (`distinct` different ones, repeated: encoding is the slow part here,
    decoding each costs the same); returns their mean size in KB."""
    rng = np.random.default_rng(seed)
    width, height = size
    encoded = []
    for _ in range(min(count, distinct)):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 24, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    total = 0
    for i in range(count):
        path = folder / f"c{i % CLASSES}" / f"img{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        total += path.write_bytes(encoded[i % len(encoded)])
    return total / count / 1024


def make_shards(src: Path, out: Path) -> None:
    for split in ("train", "val"):
        subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), "folder", "--src", str(src),
                        "--out", str(out), "--name", "synth", "--split", split, "--quiet"], check=True)


def loader_rate(manifest: str, views: dict, device: str, side: int, batch: int, epochs: int = 2) -> dict:
    """Start-up (to the first batch) and images/s over `epochs` epochs after it."""
    import torch

    from pipeline.data.loading.loader import ShardLoader
    from pipeline.data.loading.loader_config import LoaderConfig, LoaderTuning

    tuning = LoaderTuning(device=device, dtype="bfloat16" if device == "cuda" else "float32",
                          num_threads=4 if device == "cuda" else 1, read_workers=4 if device == "cuda" else 1)
    loader = ShardLoader(LoaderConfig(manifest=manifest, views=views, batch_size=batch, image_size=side,
                                      tuning=tuning))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    sync()
    startup = time.perf_counter() - start
    for _ in batches:  # the rest of epoch 0
        pass
    tick, images = time.perf_counter(), 0
    for _ in range(epochs):
        for b in loader:
            images += len(b.keys)
    sync()
    rate = images / (time.perf_counter() - tick)
    loader.close()
    return {"startup_s": round(startup, 2), "images_per_s": round(rate, 1)}


def eval_view_difference(manifest: str, device: str, side: int) -> float:
    from pipeline.data.loading.loader import EVAL_VIEWS, ShardLoader
    from pipeline.data.loading.loader_config import LoaderConfig, LoaderTuning

    def first(on: str):
        loader = ShardLoader(LoaderConfig(manifest=manifest, views=EVAL_VIEWS, batch_size=64, shuffle=False,
                                          image_size=side, tuning=LoaderTuning(device=on, read_workers=1)))
        batch = next(iter(loader))
        loader.close()
        return batch.views["image"].float().cpu()

    return round((first(device) - first("cpu")).abs().mean().item(), 4)


def train_rates(root: Path, method: str, size: dict, device: str, work: Path, profile: bool = True) -> dict:
    """Optimizer steps per second of the preset, as images/s through the encoder (views x batch). The channels-last
    synthetic and real-loader rounds alternate, so that a drift of the GPU's clock or a one-off stall moves one
    round's ratio, not the median that input_efficiency reports. `profile`: also NCHW inputs and the step's split
    into forward, backward and optimizer (a loader variant's run measures its input efficiency only)."""
    import torch

    from pipeline.config.compose import load
    from pipeline.engine.trainer import Trainer

    cfg = load("train", [f"experiment=imagenet_{method}", "data=folder", "data.dataset=synth", f"data.root={root}",
                         f"data.image_size={size['side']}", f"data.batch_size={size['batch']}", "logger=none",
                         f"run_dir={work / method}", "monitor.knn_every_epochs=0", "monitor.online_probe=false",
                         "checkpoint.every_steps=0", f"device={device}", *size["overrides"]])
    trainer = Trainer(cfg)
    engine, views_used, steps = trainer.engine, list(trainer.method.views), size["steps"]
    images = steps * size["batch"] * len(views_used)  # through the encoder in one timed round
    drain = trainer.cfg.data.loader.prefetch + 2  # the batches the loader prefetched while a synthetic round ran
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(views, batch) -> None:
        loss, _ = engine(views, batch.labels, batch.valid)
        engine.backward(loss)
        engine.step()

    def on_device(batch, layout):
        return {k: batch.views[k].to(trainer.device, trainer.dtype).contiguous(memory_format=layout)
                for k in views_used}

    def endless():
        while True:
            yield from trainer.loader  # one epoch, then the next

    batches = endless()
    fixed = next(batches)

    def real_step() -> float:
        """One step on the loader's next batch; returns the seconds spent waiting for that batch."""
        fetch = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - fetch
        step({k: batch.views[k].to(trainer.dtype) for k in views_used}, batch)
        return waited

    def synthetic_round(layout) -> float:
        """Seconds of `steps` steps on one batch kept on the device, after 3 untimed ones (cuDNN's autotuning in the
        first round, the loader refilling its queue after a real round)."""
        views = on_device(fixed, layout)
        for _ in range(3):
            step(views, fixed)
        sync()
        tick = time.perf_counter()
        for _ in range(steps):
            step(views, fixed)
        sync()
        return time.perf_counter() - tick

    def real_round() -> tuple[float, float]:
        """Seconds of `steps` real-loader steps and their time in next(batches), after `drain` untimed steps: the
        batches prefetched while the loader sat idle would come for free."""
        for _ in range(drain):
            real_step()
        sync()
        waited, tick = 0.0, time.perf_counter()
        for _ in range(steps):
            waited += real_step()
        sync()
        return time.perf_counter() - tick, waited

    synthetic, real, waited, elapsed = [], [], 0.0, 0.0
    for _ in range(size["rounds"]):
        synthetic.append(images / synthetic_round(torch.channels_last))
        seconds, wait = real_round()
        real.append(images / seconds)
        waited, elapsed = waited + wait, elapsed + seconds
    ratios = [r / s for r, s in zip(real, synthetic)]
    out = {"views": len(views_used), "synthetic_channels_last": round(statistics.median(synthetic), 1),
           "real_loader": round(statistics.median(real), 1), "input_efficiency": round(statistics.median(ratios), 3),
           "input_efficiency_rounds": [round(r, 3) for r in ratios], "data_wait_fraction": round(waited / elapsed, 3)}
    if profile:
        out["synthetic_nchw"] = round(images / synthetic_round(torch.contiguous_format), 1)
        phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}  # where a step's time goes (synced per phase)
        views = on_device(fixed, torch.channels_last)
        for _ in range(steps):
            tick = time.perf_counter()
            loss, _ = engine(views, fixed.labels, fixed.valid)
            sync()
            mark = time.perf_counter()
            engine.backward(loss)
            sync()
            phases["forward"] += mark - tick
            phases["backward"] += time.perf_counter() - mark
            mark = time.perf_counter()
            engine.step()
            sync()
            phases["optimizer"] += time.perf_counter() - mark
        out["ms_per_step"] = {name: round(1000 * t / steps, 1) for name, t in phases.items()}
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    trainer.loader.close()
    return out


def write_summary(out: Path, rows: list[tuple[str, object]]) -> str:
    lines = ["| check | result |", "|---|---|", *(f"| {name} | {json.dumps(value)} |" for name, value in rows)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(dict(rows), indent=1))
    return "\n".join(lines)


def versions() -> dict:
    import deepspeed
    import hydra
    import nvidia.dali
    import torch
    import webdataset

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "dali": nvidia.dali.__version__, "deepspeed": deepspeed.__version__, "hydra": hydra.__version__,
           "webdataset": webdataset.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=sorted(SIZES), default="cuda")
    p.add_argument("--out", required=True, help="folder for summary.md and summary.json")
    p.add_argument("--images", type=int, help="synthetic images (default per device)")
    args = p.parse_args(argv)
    size = dict(SIZES[args.device], **({"images": args.images} if args.images else {}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, object]] = []

    def section(name: str, work):
        started = time.perf_counter()
        try:
            value = work()
        except Exception as err:  # a failure there is a finding: record it, go on with the next section
            traceback.print_exc()
            value = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        rows.append((name, value))
        print(f"[{time.perf_counter() - started:6.1f} s] {name}: {value}", flush=True)
        write_summary(out, rows)  # after every section: a step cut off by its time limit keeps what it measured
        return value

    from pipeline.methods import METHODS

    section("versions", versions)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        kb = section("synthetic JPEGs: mean KB",
                     lambda: round(synthetic_jpegs(work / "jpegs", size["images"], size["jpeg"]), 1))
        section("make_shards", lambda: make_shards(work / "jpegs", work / "shards") or "ok")
        manifest = str(work / "shards" / "synth-train.manifest.json")
        for method in ("aag", "aasae"):
            section(f"loader {method} ({len(METHODS[method].views)} views, {size['side']} px, {kb} KB JPEGs)",
                    lambda m=method: loader_rate(manifest, dict(METHODS[m].views), args.device, size["side"],
                                                 size["batch"]))
        section(f"eval view {args.device} vs cpu: mean abs diff",
                lambda: eval_view_difference(manifest, args.device, size["side"]))
        for method in ("aag", "aasae"):
            section(f"train {method}: encoder images/s", lambda m=method: train_rates(work / "shards", m, size,
                                                                                        args.device, work / "runs"))
        # whether decoding on the hardware JPEG decoder alone leaves the step more of the GPU's cores (DALI's default
        # sends 35% of the images to nvJPEG's CUDA path)
        hardware = dict(size, overrides=[*size["overrides"], f"data.loader.hw_decoder_load={HARDWARE_DECODE}"])
        section(f"train aag, hw_decoder_load {HARDWARE_DECODE}: input efficiency",
                lambda: train_rates(work / "shards", "aag", hardware, args.device, work / "runs_hw", profile=False))
    print(write_summary(out, rows))
    return 1 if any(isinstance(v, str) and v.startswith("FAILED") for _, v in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
