"""`python -m pipeline.evaluate`: kNN and linear-probe accuracy (top-1, top-5) of a trained encoder, frozen.

    python -m pipeline.evaluate data=cifar10 data.root=/shards/cifar10 encoder=runs/cifar10_aasae
    python -m pipeline.evaluate data=stl10 encoder=runs/stl10_aasae/checkpoints/step000040000 protocols=[knn]
    python -m pipeline.evaluate data=digits encoder=runs/smoke_aag/encoder.safetensors linear.epochs=20
    python -m pipeline.evaluate encoder=runs/cifar10_aasae protocol=aasae     # the AASAE paper's linear evaluation

`encoder` is an exported encoder.safetensors, a checkpoint folder (each holds its exported encoder), or a run dir
(its final export, else its newest complete checkpoint). No DeepSpeed is involved: the safetensors file carries the
architecture. An encoder of a run dir takes the run's data settings from its config.yaml (dataset, and with it the
normalisation; root, bank and test splits, image size, stem) unless the command line sets them (`data=...` or
`data.KEY=...`). The encoder runs on `device` (auto: CUDA when there is one). Training split: data.bank_split; test
split: data.test_split; both read in order with the centre-crop transform (the linear probe's training split
augmented as linear.augment says: configs/protocol holds the papers' protocols, docs/methods.md). Results are printed
and written as JSON to `output` (default: RUN_DIR/eval_<dataset>_step<step>.json, or eval_<dataset>.json beside an
encoder of no run), and to the run's W&B run (its id, mode and project from the run dir) as summary values
`eval/<protocol>/top1`, `.../top5`. Beside the JSON, `<its name>_tsne.png`: a t-SNE map of the test features coloured
by class (also `eval/tsne` in the W&B summary; `tsne=false` skips it, and without scikit-learn it is skipped with a
line saying how to install it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.config import schema
from pipeline.config.compose import VERSION_BASE, exit_if_bad_cli
from pipeline.exit_codes import BAD_CONFIG, BAD_DATA, exit_with
from pipeline.redact import redact, redact_logs, redacted_config
from pipeline.run_config import read_run_config

schema.register()
PROTOCOLS = tuple(p.value for p in schema.Protocol)
LINEAR_TRAIN_VIEWS = {"image": "crop_flip"}  # linear.augment=crop_flip: random resized crops and flips
RUN_DATA_KEYS = ("dataset", "root", "bank_split", "test_split", "image_size", "stem")  # taken from the run's config


def find_encoder(path: str) -> Path:
    from pipeline.engine.checkpoint import complete_tags

    p = Path(path)
    if p.is_file():
        return p
    if (p / "encoder.safetensors").is_file():
        return p / "encoder.safetensors"
    tags = complete_tags(p / "checkpoints")
    if tags and (p / "checkpoints" / tags[-1] / "encoder.safetensors").is_file():
        return p / "checkpoints" / tags[-1] / "encoder.safetensors"
    raise FileNotFoundError(f"no encoder.safetensors at {path} (nor in a complete checkpoint under it)")


def run_dir_of(encoder: Path) -> Path | None:
    """The run dir an encoder file belongs to (its final export, or a checkpoint's), found by its config.yaml."""
    for folder in (encoder.parent, encoder.parent.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def data_given(overrides: list[str]) -> bool:
    """Whether the command line chose another data group (`data=X`): then none of the run's data settings apply."""
    return any(o.lstrip("+~").split("=")[0] == "data" for o in overrides)


def take_run_data(cfg: DictConfig, run_data: DictConfig, overrides: list[str]) -> None:
    """cfg.data takes the run's dataset, root, splits, image size and stem, except what the command line sets."""
    given = {o.lstrip("+~").split("=")[0] for o in overrides}
    for key in RUN_DATA_KEYS:
        if f"data.{key}" not in given and key in run_data:
            cfg.data[key] = run_data[key]


def wandb_summary(run_dir: Path, logger: DictConfig | None, results: dict, images: dict[str, Path]) -> str | None:
    """The results as summary values of the run's own W&B run (id from run_dir/wandb/latest-run), in the mode and
    project the run used (`logger`: its logger settings), with `images` (eval/<name>: a PNG); returns the run id, or
    None when the run had no W&B."""
    latest = run_dir / "wandb" / "latest-run"
    if logger is None or logger.get("wandb_mode", "disabled") == "disabled" or not latest.exists():
        return None
    import wandb

    run = wandb.init(project=logger.get("project"), entity=logger.get("entity"),
                     id=latest.resolve().name.rsplit("-", 1)[1], resume="allow", dir=str(run_dir),
                     mode=logger.wandb_mode,
                     settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False))
    run.summary.update({f"eval/{name}/{k}": results[name][k] for name in PROTOCOLS if name in results
                        for k in ("top1", "top5")} | {"eval/step": results["step"], "eval/dataset": results["dataset"]}
                       | {f"eval/{name}": wandb.Image(str(png)) for name, png in images.items()})
    run.finish()
    return run.id


def evaluate(cfg: DictConfig, encoder: torch.nn.Module | None = None, plots: dict | None = None) -> dict:
    """kNN and linear probe of the encoder file `cfg.encoder`, or of `encoder` (any module with `.out_dim`, e.g.
    flattened raw pixels as a baseline; `cfg.encoder` then only names it in the results). With `plots` (a dict) and
    cfg.tsne, the t-SNE map of the test features goes into plots["tsne"] (a PIL image)."""
    from pipeline.data.loading.loader import EVAL_VIEWS, loader_for
    from pipeline.device import pick
    from pipeline.engine.export import load_encoder, read_metadata
    from pipeline.evaluation.features import features
    from pipeline.evaluation.knn import knn
    from pipeline.evaluation.linear import linear_probe, pad_crop_flip

    torch.manual_seed(cfg.seed)
    device = pick(cfg.device)
    path = None
    if encoder is None:
        path = find_encoder(cfg.encoder)
        encoder = load_encoder(path, device)
    batch = cfg.linear.batch_size

    def labelled(feats, labels):
        keep = labels >= 0
        return feats[keep], labels[keep]

    def split(role: str, views: dict[str, str] = EVAL_VIEWS, seed: int = 0, transform=None):
        loader = loader_for(cfg.data, role, views, batch, 0, 1, seed=seed, shuffle=views is not EVAL_VIEWS,
                            device=device)
        out = labelled(*features(encoder, loader, device, transform=transform))
        loader.close()
        return out, loader.index.manifest.classes

    (train, classes), (test, _) = split("bank"), split("test")
    num_classes = len(classes)
    step = read_metadata(path).get("step") if path else None
    results = {"encoder": str(path or cfg.encoder), "step": None if step is None else int(step),
               "dataset": cfg.data.dataset,
               "train_samples": len(train[1]), "test_samples": len(test[1])}
    if "knn" in cfg.protocols:
        results["knn"] = {**knn(train, test, num_classes, cfg.knn_k, cfg.knn_temperature), "k": cfg.knn_k}
    if "linear" in cfg.protocols:
        lin = cfg.linear
        stats = (train[0].mean(0), train[0].std(0).clamp_min(1e-6))

        bank_images = []  # pad_crop_flip: the bank's eval-view batches, decoded once (CIFAR-10: 0.6 GB in float32)

        def batches(epoch: int):
            """One pass over the training split: its features as computed once, or of freshly augmented images."""
            if lin.augment == "crop_flip":
                feats, labels = split("bank", LINEAR_TRAIN_VIEWS, cfg.seed + epoch)[0]
            elif lin.augment == "pad_crop_flip":
                # the crops are cut in torch from the same eval view every epoch: keeping its batches spares a
                # loader per epoch, which costs more than the probe's pass on small images
                if not bank_images:
                    loader = loader_for(cfg.data, "bank", EVAL_VIEWS, batch, 0, 1, shuffle=False, device=device)
                    bank_images.extend(loader)
                    loader.close()
                generator = torch.Generator().manual_seed(cfg.seed + epoch)
                feats, labels = labelled(*features(encoder, bank_images, device,
                                                   transform=lambda x: pad_crop_flip(x, generator)))
            else:
                feats, labels = train
            order = torch.randperm(len(labels), device=labels.device)
            return [(feats[i], labels[i]) for i in order.split(batch)]

        results["linear"] = linear_probe(batches, test, num_classes, encoder.out_dim, lin, stats, cfg.seed)
    results["protocol"] = {"name": cfg.protocol, "linear": OmegaConf.to_container(cfg.linear, resolve=True),
                           "knn_k": cfg.knn_k, "knn_temperature": cfg.knn_temperature}
    if plots is not None and cfg.tsne:
        from pipeline.evaluation.tsne_plot import embed, scatter

        xy, labels = embed(*test, cfg.tsne_points, cfg.seed)
        name = Path(results["encoder"]).parent.name if path else results["encoder"]
        plots["tsne"] = scatter(xy, labels, classes, f"t-SNE of {len(labels)} {cfg.data.dataset} "
                                f"{cfg.data.test_split} features, step {results['step']} ({name})")
        results["tsne_points"] = len(labels)
    return results


def write_results(cfg: DictConfig, results: dict, run_dir: Path | None = None) -> Path:
    """The results with the resolved config, as JSON at `output` (default: in the run dir, else beside the encoder);
    returns the path."""
    if cfg.output:
        out = Path(cfg.output)
    elif run_dir is not None:
        out = run_dir / f"eval_{cfg.data.dataset}_step{results['step']}.json"
    else:
        out = Path(results["encoder"]).parent / f"eval_{cfg.data.dataset}.json"
    out.write_text(json.dumps({**results, "config": redacted_config(cfg)}, indent=1))
    return out


@hydra.main(config_path="../configs", config_name="evaluate", version_base=VERSION_BASE)
def _app(cfg: DictConfig) -> None:
    from pipeline.config.checks import ConfigError, check_shards
    from pipeline.data.loading.loader import BadSampleError
    from pipeline.data.loading.shard_index import ShardError
    from pipeline.device import DeviceError
    from pipeline.engine.export import read_metadata

    redact_logs()
    try:
        try:
            encoder = find_encoder(cfg.encoder)
            run_dir, missing = run_dir_of(encoder), None
        except FileNotFoundError as err:
            encoder, run_dir, missing = None, None, err
        run_logger = None
        if run_dir is not None:
            overrides = list(HydraConfig.get().overrides.task)
            own_data = data_given(overrides)
            run_cfg = read_run_config(run_dir, () if own_data else ("data",))
            run_logger = run_cfg.get("logger")
            if not own_data:
                take_run_data(cfg, run_cfg.data, overrides)
            print(f"run dir {run_dir}: data {cfg.data.dataset} at {cfg.data.root} (image size {cfg.data.image_size}, "
                  f"stem {cfg.data.stem})")
        bank = check_shards(cfg.data, ("bank", "test"), need_labels=("bank", "test"))["bank"].num_samples
        if missing is not None:
            raise missing
        read_metadata(encoder)
        if schema.Protocol.knn in cfg.protocols and cfg.knn_k > bank:
            raise ConfigError(f"knn_k={cfg.knn_k}: the bank (data.bank_split={cfg.data.bank_split}) holds only {bank} "
                              f"samples; set knn_k to at most {bank}, or protocols=[linear]")
    except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError, as read_metadata's is
        print(f"pipeline.evaluate: {redact(str(err))}", file=sys.stderr)
        exit_with(BAD_CONFIG)
    from pipeline.evaluation.tsne_plot import SklearnMissing, require_sklearn

    plots: dict | None = {}
    if cfg.tsne:
        try:
            require_sklearn()
        except SklearnMissing as err:
            print(f"pipeline.evaluate: no t-SNE plot: {err}", file=sys.stderr)
            plots = None
    try:
        results = evaluate(cfg, plots=plots)
    except DeviceError as err:
        print(f"pipeline.evaluate: {err}", file=sys.stderr)
        exit_with(BAD_CONFIG)
    except (ShardError, BadSampleError) as err:  # shards that differ from their manifest, an undecodable image
        print(f"pipeline.evaluate: {redact(str(err))}", file=sys.stderr)
        exit_with(BAD_DATA)
    out = write_results(cfg, results, run_dir)
    images = {}
    for name, image in (plots or {}).items():
        images[name] = out.with_name(f"{out.stem}_{name}.png")
        image.save(images[name])
    wandb_id = None if run_dir is None else wandb_summary(run_dir, run_logger, results, images)
    print(f"{'protocol':<12}{'top-1':>8}{'top-5':>8}   ({results['encoder']}, {cfg.data.dataset}: "
          f"{results['train_samples']} train / {results['test_samples']} test)")
    labels = {"knn": f"knn k={cfg.knn_k}", "linear": "linear"}  # k decides the figure: say which
    for name in PROTOCOLS:
        if name in results:
            print(f"{labels[name]:<12}{100 * results[name]['top1']:>8.2f}{100 * results[name]['top5']:>8.2f}")
    written = ", ".join(map(str, [out, *images.values()]))
    print(f"written to {written}" + (f" and to W&B run {wandb_id} (summary)" if wandb_id else ""))


def main() -> None:
    exit_if_bad_cli("evaluate", "pipeline.evaluate")
    _app()


if __name__ == "__main__":
    main()
