"""`python -m pipeline.demo`: the README's first command. Converts the embedded digits set (if its shards are missing),
pretrains AASAE and AAG briefly on the CPU (and, with --baselines, the VAE and SimCLR baselines), evaluates every
exported encoder with the real evaluator, evaluates a randomly initialised encoder of the same architecture and the
raw pixels with the same protocol, and prints a table:

    python -m pipeline.demo                       # AASAE and AAG: minutes on 2 CPU cores
    python -m pipeline.demo --baselines           # also the VAE and SimCLR baselines, under both papers' protocols
    python -m pipeline.demo --methods aag         # any subset of aasae,aag,vae,simclr
    python -m pipeline.demo --quick               # seconds of training: checks the plumbing, not the claim
    python -m pipeline.demo --baselines --seeds 3 # the papers' orderings: both papers' protocols, 3 seeds each

Each method is trained by its real entry point (`python -m pipeline.train experiment=demo_<method> ...`, one
subprocess each, so that every run gets a fresh process group and DeepSpeed engine); evaluation calls
pipeline.evaluate.evaluate in this process with the same overrides the command line would take, once per protocol
(`--protocols`): `default` is `python -m pipeline.evaluate data=digits encoder=<run dir> knn_k=20 linear.epochs=...`
(k = 20 is the digits entry's k in pipeline/data/datasets.py, which the training monitor uses too); `aasae` and `aag`
are the papers' protocols (`protocol=aasae`, `protocol=aag`) with their own epochs and k. With --baselines the
protocols default to `aasae,aag`, so that each paper's ordering (AASAE > VAE, AAG >= SimCLR) is read under both.
`--seeds N` trains every method with seeds 0..N-1 and prints each cell as mean +- standard deviation over the seeds,
and a line per ordering saying whether it holds on the means; the reference rows (random init, raw pixels) are
evaluated once.

Everything lands in one demo folder (default runs/demo-<time>): a run dir per method (per method and seed with
--seeds), random_init/encoder.safetensors, an eval JSON per row and protocol, and results.json + results.md with the
table. The self-supervised encoders are expected to beat
the random-init encoder on the linear probe; if one does not, a WARNING line says so (the exit status stays 0: the
table is the result). Exit status: 0 table written, 1 a training run failed, 2 an unknown method or
protocol, or --seeds below 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config.compose import load
from pipeline.data.datasets import dataset_info

DATASET = "digits"
METHODS = ("aasae", "aag", "vae", "simclr")
PAPER_METHODS = ("aasae", "aag")
PROTOCOLS = ("default", "aasae", "aag")
NAMES = {"aasae": "AASAE", "aag": "AAG", "vae": "VAE (baseline)", "simclr": "SimCLR (baseline)",
         "random_init": "random-init encoder", "raw_pixels": "raw pixels"}
KNN_K = dataset_info(DATASET).knn_k  # the monitor's and the evaluator's k for digits
LINEAR_EPOCHS = 100  # the default protocol's, here
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


def eval_overrides(data_root: str, protocol: str, linear_epochs: int | None) -> list[str]:
    """The default protocol with the demo's k and probe epochs; a paper's protocol with its own (unless
    --linear-epochs is given)."""
    base = [f"data={DATASET}", f"data.root={data_root}", "data.loader.device=cpu", f"protocol={protocol}"]
    if protocol == "default":
        return [*base, f"knn_k={KNN_K}", f"linear.epochs={linear_epochs or LINEAR_EPOCHS}"]
    return [*base, *([f"linear.epochs={linear_epochs}"] if linear_epochs else [])]


def evaluate_encoder(encoder: Path | str, out: Path, data_root: str, protocol: str, linear_epochs: int | None,
                     module: torch.nn.Module | None = None) -> dict:
    """The real evaluator (pipeline.evaluate.evaluate) on an exported encoder, or on `module` named `encoder`, under
    `protocol`; writes its JSON to `out`."""
    from pipeline.evaluate import evaluate, write_results

    cfg = load("evaluate", [*eval_overrides(data_root, protocol, linear_epochs), f"encoder={encoder}",
                            f"output={out}"])
    results = evaluate(cfg, module)
    write_results(cfg, results)
    return results


def scores(results: dict) -> dict:
    """The table's figures of one evaluation, in percent."""
    return {"linear_top1": 100 * results["linear"]["top1"], "knn_top1": 100 * results["knn"]["top1"],
            "knn_k": results["knn"]["k"], "samples": (results["train_samples"], results["test_samples"])}


class RawPixels(torch.nn.Flatten):
    """The raw-pixel baseline as an 'encoder': the normalised eval-transform pixels, flattened."""

    out_dim = 3 * 32 * 32


# ---------------------------------------------------------------------------------------------------- resume


def finished_row(out: Path, name: str, settings: dict) -> dict | None:
    """The row `name` kept by an earlier run into `out` with the same settings, or None (then it is redone)."""
    path = out / f"row_{name}.json"
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    if kept.get("settings") != settings:
        return None
    print(f"[demo] {name}: reusing the finished row in {path}", flush=True)
    return kept["row"]


def keep_row(out: Path, name: str, settings: dict, row: dict) -> None:
    """Write the finished row atomically, so that a stop mid-write leaves no half row to reuse."""
    tmp = out / f".row_{name}.json.tmp"
    tmp.write_text(json.dumps({"settings": settings, "row": row}, indent=1))
    os.replace(tmp, out / f"row_{name}.json")


# ---------------------------------------------------------------------------------------------------- table


def summarise(rows: list[dict], protocols: list[str]) -> dict:
    """method -> {"seeds": n, "pretrain_seconds": mean or None, protocol: {figure: (mean, sd)}} over its rows (the
    seeds); sd is the sample standard deviation (0 for one seed)."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        secs = [r["pretrain_seconds"] for r in mine if r["pretrain_seconds"] is not None]
        entry = {"seeds": len(mine), "pretrain_seconds": float(np.mean(secs)) if secs else None}
        for protocol in protocols:
            for figure in ("linear_top1", "knn_top1"):
                values = np.array([r["results"][protocol][figure] for r in mine])
                sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                entry.setdefault(protocol, {})[figure] = (float(values.mean()), sd)
        summary[method] = entry
    return summary


def _cell(mean_sd: tuple[float, float], seeds: int) -> str:
    return f"{mean_sd[0]:.2f}" if seeds == 1 else f"{mean_sd[0]:.2f} ± {mean_sd[1]:.2f}"


def format_table(summary: dict, protocols: list[str], knn_k: dict[str, int]) -> str:
    """One row per method; per protocol a linear-probe and a kNN column (its k named)."""
    head = "".join(f" linear top-1 ({p}) | kNN top-1 k={knn_k[p]} ({p}) |" for p in protocols)
    lines = [f"| method |{head} pretrain s |", "|---|" + "---:|" * (2 * len(protocols) + 1)]
    for method, entry in summary.items():
        cells = "".join(f" {_cell(entry[p][f], entry['seeds'])} |" for p in protocols for f in ("linear_top1",
                                                                                               "knn_top1"))
        secs = f"{entry['pretrain_seconds']:.0f}" if entry["pretrain_seconds"] is not None else "-"
        lines.append(f"| {NAMES.get(method, method)} |{cells} {secs} |")
    return "\n".join(lines)


ORDERINGS = (("aasae", "vae", ">"), ("aag", "simclr", ">="))  # the papers' claims, on the linear probe


def orderings(summary: dict, protocols: list[str]) -> list[str]:
    """Whether each paper's ordering holds on the mean linear top-1, per protocol, for the pairs that were run."""
    lines = []
    for method, baseline, relation in ORDERINGS:
        if method not in summary or baseline not in summary:
            continue
        for p in protocols:
            (a, a_sd), (b, b_sd) = summary[method][p]["linear_top1"], summary[baseline][p]["linear_top1"]
            holds = a > b if relation == ">" else a >= b
            lines.append(f"{NAMES[method]} {relation} {NAMES[baseline]} on the linear probe ({p} protocol): "
                         f"{a:.2f} ± {a_sd:.2f} vs {b:.2f} ± {b_sd:.2f} over {summary[method]['seeds']} seed(s): "
                         f"{'holds' if holds else 'DOES NOT HOLD'}")
    return lines


def warnings_for(summary: dict, protocols: list[str]) -> list[str]:
    base = summary["random_init"]
    return [f"WARNING: {NAMES[m]} linear top-1 {summary[m][p]['linear_top1'][0]:.2f} ({p} protocol) does not beat "
            f"the random-init encoder ({base[p]['linear_top1'][0]:.2f})"
            for m in METHODS if m in summary for p in protocols
            if summary[m][p]["linear_top1"][0] <= base[p]["linear_top1"][0]]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="demo folder (default runs/demo-<date>-<time>)")
    p.add_argument("--data-root", default=f"data/{DATASET}", help="digits shards (converted here when missing)")
    p.add_argument("--methods", default=",".join(PAPER_METHODS),
                   help=f"comma-separated methods to pretrain, from {','.join(METHODS)} (default aasae,aag)")
    p.add_argument("--baselines", action="store_true", help="also pretrain the VAE and SimCLR baselines")
    p.add_argument("--quick", action="store_true",
                   help="2 training steps per method and a 5-epoch probe: checks the plumbing in about a minute")
    p.add_argument("--linear-epochs", type=int,
                   help=f"linear-probe epochs (default: {LINEAR_EPOCHS} for the default protocol, the papers' own "
                        "for theirs; --quick 5)")
    p.add_argument("--protocols", help="comma-separated evaluation protocols from default,aasae,aag (default: "
                                       "default; with --baselines aasae,aag)")
    p.add_argument("--seeds", type=int, default=1, help="train every method with seeds 0..N-1 (default 1)")
    p.add_argument("overrides", nargs="*", help="extra trainer overrides for every method, e.g. epochs=2")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    methods += [m for m in ("vae", "simclr") if args.baselines and m not in methods]
    protocols = [p for p in (args.protocols or ("aasae,aag" if args.baselines else "default")).split(",") if p]
    unknown = sorted(set(methods) - set(METHODS))
    bad_protocols = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or bad_protocols or args.seeds < 1:
        print(f"pipeline.demo: unknown methods {unknown} (choose from {list(METHODS)}), unknown protocols "
              f"{bad_protocols} (choose from {list(PROTOCOLS)}), or --seeds {args.seeds} < 1", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = str(Path(args.data_root).resolve())
    linear_epochs = args.linear_epochs or (QUICK["linear_epochs"] if args.quick else None)
    extra = [*(QUICK["train"] if args.quick else []), *args.overrides]
    started = time.perf_counter()

    tick = time.perf_counter()
    if ensure_shards(data_root):
        print(f"[demo] converted digits into {data_root} in {time.perf_counter() - tick:.0f} s", flush=True)

    settings = {"protocols": protocols, "linear_epochs": linear_epochs, "train_overrides": extra}

    def evaluate_all(name: str, encoder: Path | str, module: torch.nn.Module | None = None) -> dict:
        """name's figures under every protocol; eval_<name>[_<protocol>].json each."""
        figures = {}
        for p in protocols:
            tag = name if protocols == ["default"] else f"{name}_{p}"
            figures[p] = scores(evaluate_encoder(encoder, out / f"eval_{tag}.json", data_root, p, linear_epochs,
                                                 module))
        return figures

    rows = []
    for seed in range(args.seeds):
        for method in methods:
            name = method if args.seeds == 1 else f"{method}_seed{seed}"
            run_dir = out / name
            seeded = [] if args.seeds == 1 else [f"seed={seed}"]
            row = finished_row(out, name, settings)
            if row is not None:
                rows.append(row)
                continue
            try:
                seconds = train(method, run_dir, data_root, [*extra, *seeded], out / f"train_{name}.log")
            except RuntimeError as err:
                print(f"pipeline.demo: {err}", file=sys.stderr)
                return 1
            figures = evaluate_all(name, run_dir / "encoder.safetensors")
            row = {"method": method, "seed": seed if seeded else None, "pretrain_seconds": seconds,
                   "run_dir": str(run_dir), "results": figures}
            keep_row(out, name, settings, row)
            rows.append(row)
            print(f"[demo] {NAMES[method]}{f' seed {seed}' if seeded else ''}: "
                  + ", ".join(f"{p}: linear {f['linear_top1']:.2f}, kNN {f['knn_top1']:.2f}"
                              for p, f in figures.items()) + f"; pretrained in {seconds:.0f} s", flush=True)

    # the architecture (and seed) of the trained encoders: the presets share it, and the overrides apply to all
    ref = load("train", [f"experiment=demo_{methods[0] if methods else 'aasae'}", f"data.root={data_root}", *extra])
    for name, encoder, module in (("random_init", out / "random_init" / "encoder.safetensors", None),
                                  ("raw_pixels", "raw_pixels", RawPixels())):
        row = finished_row(out, name, settings)
        if row is None:
            if module is None:
                export_random_init(encoder, ref.backbone.arch, ref.data.stem, ref.backbone.width, seed=ref.seed)
            row = {"method": name, "seed": None, "pretrain_seconds": None,
                   "run_dir": str(encoder.parent) if module is None else None,
                   "results": evaluate_all(name, encoder, module)}
            keep_row(out, name, settings, row)
        rows.append(row)

    total = time.perf_counter() - started
    summary = summarise(rows, protocols)
    table = format_table(summary, protocols, {p: rows[-1]["results"][p]["knn_k"] for p in protocols})
    notes = [*orderings(summary, protocols), *warnings_for(summary, protocols)]
    epochs = ", ".join(f"{p} {linear_epochs or (LINEAR_EPOCHS if p == 'default' else 'its own')}" for p in protocols)
    train_samples, test_samples = rows[-1]["results"][protocols[0]]["samples"]
    header = (f"augssl demo: {DATASET} ({train_samples} train / {test_samples} test), "
              f"{ref.backbone.arch}, {args.seeds} seed(s){' (mean ± sd)' if args.seeds > 1 else ''}, "
              f"linear-probe epochs: {epochs}{', QUICK (not a result)' if args.quick else ''}; total {total:.0f} s")
    (out / "results.json").write_text(json.dumps(
        {"dataset": DATASET, "quick": args.quick, "seeds": args.seeds, "protocols": protocols,
         "linear_epochs": linear_epochs, "train_overrides": extra, "total_seconds": total, "rows": rows,
         "summary": summary, "notes": notes}, indent=1))
    (out / "results.md").write_text(f"{header}\n\n{table}\n" + "".join(f"\n{n}\n" for n in notes))
    print(f"\n{header}\n{table}")
    for n in notes:
        print(n)
    print(f"written to {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
