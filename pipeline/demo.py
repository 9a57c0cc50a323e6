"""`python -m pipeline.demo`: the README's first command. Converts the embedded digits set (if its shards are missing),
pretrains AASAE and AAG briefly on the CPU (and, with --baselines, the VAE and SimCLR baselines), evaluates every
exported encoder with the real evaluator, evaluates a randomly initialised encoder of the same architecture and the
raw pixels with the same protocol, and prints a table:

    python -m pipeline.demo                       # AASAE and AAG: minutes on 2 CPU cores
    python -m pipeline.demo --baselines           # also the VAE and SimCLR baselines (a few minutes more)
    python -m pipeline.demo --methods aag         # any subset of aasae,aag,vae,simclr
    python -m pipeline.demo --quick               # seconds of training: checks the plumbing, not the claim

Each method is trained by its real entry point (`python -m pipeline.train experiment=demo_<method> ...`, one
subprocess each, so that every run gets a fresh process group and DeepSpeed engine); evaluation calls
pipeline.evaluate.evaluate in this process with the same overrides the command line would take
(`python -m pipeline.evaluate data=digits encoder=<run dir> knn_k=20 linear.epochs=...`; k = 20 is the digits
entry's k in pipeline/data/datasets.py, which the training monitor uses too).

Everything lands in one demo folder (default runs/demo-<time>): a run dir per method, random_init/encoder.safetensors,
eval JSON per row, and results.json + results.md with the table. The self-supervised encoders are expected to beat
the random-init encoder on the linear probe; if one does not, a WARNING line says so (the exit status stays 0: the
table is the result). Exit status: 0 table written, 1 a training run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config.compose import load
from pipeline.data.datasets import dataset_info

DATASET = "digits"
METHODS = ("aasae", "aag", "vae", "simclr")
PAPER_METHODS = ("aasae", "aag")
NAMES = {"aasae": "AASAE", "aag": "AAG", "vae": "VAE (baseline)", "simclr": "SimCLR (baseline)",
         "random_init": "random-init encoder", "raw_pixels": "raw pixels"}
KNN_K = dataset_info(DATASET).knn_k  # the monitor's and the evaluator's k for digits
LINEAR_EPOCHS = 100
QUICK = {"train": ["max_steps=2", "data.batch_size=16", "monitor.knn_every_epochs=0"], "linear_epochs": 5}


# ---------------------------------------------------------------------------------------------------- data


def ensure_shards(root: str) -> bool:
    """Convert the embedded digits set into `root` unless its manifests are there; True when it converted."""
    from pipeline.data.datasets import DATASETS
    from pipeline.data.shard_format import manifest_name
    from pipeline.data.writing.convert import ConvertOptions, convert
    from pipeline.data.writing.sources import build_source

    splits = DATASETS[DATASET].splits
    if all((Path(root) / manifest_name(DATASET, s)).is_file() for s in splits):
        return False
    for split in splits:
        print(convert(build_source(DATASET, None, split), root, ConvertOptions(), progress=False), flush=True)
    return True


# ---------------------------------------------------------------------------------------------------- training


def train(method: str, run_dir: Path, data_root: str, extra: list[str], log_path: Path) -> float:
    """Run `python -m pipeline.train experiment=demo_<method>` into run_dir; returns its wall-clock seconds."""
    cmd = [sys.executable, "-m", "pipeline.train", f"experiment=demo_{method}", f"run_dir={run_dir}",
           f"data.root={data_root}", *extra]
    print(f"[demo] {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise RuntimeError(f"training {method} failed (exit {proc.returncode}); last lines of {log_path}:\n"
                           + "\n".join(tail))
    return seconds


def export_random_init(path: Path, arch: str, stem: str, width: int, seed: int = 0) -> Path:
    """The encoder of the same architecture as the trained ones, freshly initialised (what step 0 of training
    starts from), exported in the same format."""
    from pipeline.engine.export import save_encoder
    from pipeline.models.resnet import ResNet

    torch.manual_seed(seed)
    encoder = ResNet(arch, stem=stem, width=width)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_encoder(encoder.state_dict(), encoder, path, step=0, experiment="random_init")


# ---------------------------------------------------------------------------------------------------- evaluation


def eval_overrides(data_root: str, linear_epochs: int) -> list[str]:
    return [f"data={DATASET}", f"data.root={data_root}", f"knn_k={KNN_K}", f"linear.epochs={linear_epochs}",
            "data.loader.device=cpu"]


def evaluate_encoder(encoder: Path | str, out: Path, data_root: str, linear_epochs: int,
                     module: torch.nn.Module | None = None) -> dict:
    """The real evaluator (pipeline.evaluate.evaluate) on an exported encoder, or on `module` named `encoder`;
    writes its JSON to `out`."""
    from pipeline.evaluate import evaluate, write_results

    cfg = load("evaluate", [*eval_overrides(data_root, linear_epochs), f"encoder={encoder}", f"output={out}"])
    results = evaluate(cfg, module)
    write_results(cfg, results)
    return results


class RawPixels(torch.nn.Flatten):
    """The raw-pixel baseline as an 'encoder': the normalised eval-transform pixels, flattened."""

    out_dim = 3 * 32 * 32


# ---------------------------------------------------------------------------------------------------- table


def format_table(rows: list[dict]) -> str:
    lines = ["| method | linear top-1 | kNN top-1 | pretrain s |", "|---|---:|---:|---:|"]
    for r in rows:
        secs = f"{r['pretrain_seconds']:.0f}" if r["pretrain_seconds"] is not None else "-"
        lines.append(f"| {NAMES.get(r['method'], r['method'])} | {r['linear_top1']:.2f} | {r['knn_top1']:.2f} "
                     f"| {secs} |")
    return "\n".join(lines)


def warnings_for(rows: list[dict]) -> list[str]:
    by = {r["method"]: r for r in rows}
    base = by["random_init"]["linear_top1"]
    return [f"WARNING: {NAMES[m]} linear top-1 {by[m]['linear_top1']:.2f} does not beat the random-init encoder "
            f"({base:.2f})" for m in METHODS if m in by and by[m]["linear_top1"] <= base]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="demo folder (default runs/demo-<date>-<time>)")
    p.add_argument("--data-root", default=f"data/{DATASET}", help="digits shards (converted here when missing)")
    p.add_argument("--methods", default=",".join(PAPER_METHODS),
                   help=f"comma-separated methods to pretrain, from {','.join(METHODS)} (default aasae,aag)")
    p.add_argument("--baselines", action="store_true", help="also pretrain the VAE and SimCLR baselines")
    p.add_argument("--quick", action="store_true",
                   help="2 training steps per method and a 5-epoch probe: checks the plumbing in about a minute")
    p.add_argument("--linear-epochs", type=int, help=f"linear-probe epochs (default {LINEAR_EPOCHS}, --quick 5)")
    p.add_argument("overrides", nargs="*", help="extra trainer overrides for every method, e.g. epochs=2")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    methods += [m for m in ("vae", "simclr") if args.baselines and m not in methods]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"pipeline.demo: unknown methods {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = str(Path(args.data_root).resolve())
    linear_epochs = args.linear_epochs or (QUICK["linear_epochs"] if args.quick else LINEAR_EPOCHS)
    extra = [*(QUICK["train"] if args.quick else []), *args.overrides]
    started = time.perf_counter()

    tick = time.perf_counter()
    if ensure_shards(data_root):
        print(f"[demo] converted digits into {data_root} in {time.perf_counter() - tick:.0f} s", flush=True)

    rows = []
    for method in methods:
        run_dir = out / method
        try:
            seconds = train(method, run_dir, data_root, extra, out / f"train_{method}.log")
        except RuntimeError as err:
            print(f"pipeline.demo: {err}", file=sys.stderr)
            return 1
        res = evaluate_encoder(run_dir / "encoder.safetensors", out / f"eval_{method}.json", data_root, linear_epochs)
        rows.append({"method": method, "linear_top1": 100 * res["linear"]["top1"], "knn_top1": 100 * res["knn"]["top1"],
                     "pretrain_seconds": seconds, "run_dir": str(run_dir)})
        print(f"[demo] {NAMES[method]}: linear {rows[-1]['linear_top1']:.2f}, kNN {rows[-1]['knn_top1']:.2f}, "
              f"pretrained in {seconds:.0f} s", flush=True)

    # the architecture (and seed) of the trained encoders: the presets share it, and the overrides apply to all
    ref = load("train", [f"experiment=demo_{methods[0] if methods else 'aasae'}", f"data.root={data_root}", *extra])
    random_path = export_random_init(out / "random_init" / "encoder.safetensors", ref.backbone.arch, ref.data.stem,
                                     ref.backbone.width, seed=ref.seed)
    res = evaluate_encoder(random_path, out / "eval_random_init.json", data_root, linear_epochs)
    rows.append({"method": "random_init", "linear_top1": 100 * res["linear"]["top1"],
                 "knn_top1": 100 * res["knn"]["top1"], "pretrain_seconds": None, "run_dir": str(random_path.parent)})
    res = evaluate_encoder("raw_pixels", out / "eval_raw_pixels.json", data_root, linear_epochs, RawPixels())
    rows.append({"method": "raw_pixels", "linear_top1": 100 * res["linear"]["top1"],
                 "knn_top1": 100 * res["knn"]["top1"], "pretrain_seconds": None, "run_dir": None})

    total = time.perf_counter() - started
    table = format_table(rows)
    warnings = warnings_for(rows)
    header = (f"augssl demo: {DATASET} ({res['train_samples']} train / {res['test_samples']} test), "
              f"{ref.backbone.arch}, linear probe {linear_epochs} epochs, kNN k={KNN_K}"
              f"{', QUICK (not a result)' if args.quick else ''}; total {total:.0f} s")
    (out / "results.json").write_text(json.dumps(
        {"dataset": DATASET, "quick": args.quick, "linear_epochs": linear_epochs, "knn_k": KNN_K,
         "train_overrides": extra, "total_seconds": total, "rows": rows, "warnings": warnings}, indent=1))
    (out / "results.md").write_text(f"{header}\n\n{table}\n" + "".join(f"\n{w}\n" for w in warnings))
    print(f"\n{header}\n{table}")
    for w in warnings:
        print(w)
    print(f"written to {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
