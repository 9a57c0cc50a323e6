"""Where training metrics go: Weights & Biases (offline unless configured), run_dir/metrics.jsonl, and the console.

The console: on a terminal a tqdm bar (steps, images/s, epoch, loss, lr, ETA); otherwise (a Slurm or Kubernetes log
file, where a bar writes one carriage-return update per step) one plain line every `logger.print_every_s`.

Only rank 0 writes anything; the trainer averages metrics over ranks before handing them here. W&B offline needs no
account or network; its run id is kept in every checkpoint so that a resumed run continues the same W&B run (online:
resume="allow"). Offline, each attempt writes its own folder: `tools/sync_wandb.py RUN_DIR` merges them into one
history, every step once, before `wandb sync`. The first row after a resume carries `resumed_from_step`. Credentials
come from the environment (WANDB_API_KEY), never from a config.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from pipeline.redact import redacted_config


def image_grid(rows: dict[str, torch.Tensor], mean, std) -> np.ndarray:
    """Rows of normalised (n, 3, H, W) images, un-normalised with the loader's mean/std, as one HWC uint8 image:
    row i holds the n images of the i-th entry side by side, its label written in a white margin on the left (a grid
    seen in W&B says which row is the input and which the reconstruction)."""
    from PIL import Image, ImageDraw

    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    pixels = [((r.detach().float().cpu() * s + m).clamp(0, 1) * 255).round().to(torch.uint8) for r in rows.values()]
    images = torch.cat([torch.cat(list(p), dim=2) for p in pixels], dim=1).permute(1, 2, 0).numpy()
    height = pixels[0].shape[2]
    margin = 6 * max(map(len, rows)) + 8  # PIL's default font: about 6 pixels per character
    canvas = Image.new("RGB", (margin + images.shape[1], images.shape[0]), "white")
    canvas.paste(Image.fromarray(images), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(rows):
        draw.text((4, i * height + height // 2), label, fill="black", anchor="lm")
    return np.asarray(canvas)


def duration(seconds: float) -> str:
    """H:MM:SS."""
    return str(datetime.timedelta(seconds=round(seconds)))


def _drop_rows_after(path: Path, step: int) -> None:
    """A resumed run re-does the steps after its checkpoint: their rows from the interrupted attempt go, so that
    metrics.jsonl holds each step once (rewritten atomically)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


class RunLogger:
    def __init__(self, cfg: DictConfig, run_dir: Path, is_main: bool, run_id: str | None, total_steps: int,
                 start_step: int):
        self.is_main, self.run_dir = is_main, Path(run_dir)
        self.run_id, self.wandb, self.bar = run_id, None, None
        # marks the first row an attempt logs after a resume (in its own step: no step is ever logged twice)
        self.resumed = {"resumed_from_step": start_step} if start_step else {}
        self.total_steps, self.start_step, self.print_every_s = total_steps, start_step, cfg.logger.print_every_s
        self.started = self.printed = time.monotonic()
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "metrics.jsonl"
        _drop_rows_after(metrics, start_step)
        self.jsonl = open(metrics, "a")
        if cfg.logger.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                tags=list(cfg.logger.tags), name=cfg.experiment_name, id=run_id, resume="allow",
                dir=str(self.run_dir), mode=cfg.logger.wandb_mode,
                config=redacted_config(cfg),
                settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False))
            self.run_id = self.wandb.id
        if cfg.logger.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=cfg.experiment_name, dynamic_ncols=True,
                            unit="step", file=sys.stdout)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        metrics, self.resumed = {**metrics, **self.resumed}, {}
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            shown = {"img/s": "perf/images_per_s", "epoch": "epoch", "loss": "loss", "lr": "lr"}
            self.bar.set_postfix({k: f"{metrics[m]:.4g}" for k, m in shown.items() if m in metrics}, refresh=False)
        elif "perf/images_per_s" in metrics and self.print_every_s and (
                time.monotonic() - self.printed >= self.print_every_s):  # a training step's metrics, not kNN's
            self.printed = time.monotonic()
            print(self.progress_line(step, metrics), flush=True)

    def progress_line(self, step: int, metrics: dict[str, float]) -> str:
        """One line for a log file: step/total, epoch, the loss terms, lr, images/s, data-wait fraction, ETA."""
        losses = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if "/" not in k and k not in
                          ("lr", "epoch", "samples"))
        parts = [f"step {step}/{self.total_steps}", f"epoch {metrics.get('epoch', 0):.2f}", losses,
                 f"lr {metrics.get('lr', 0):.3g}", f"{metrics.get('perf/images_per_s', 0):.0f} img/s",
                 f"data wait {100 * metrics.get('perf/data_wait_fraction', 0):.0f}%"]
        done = step - self.start_step
        if done > 0:
            left = (self.total_steps - step) * (time.monotonic() - self.started) / done
            parts.append(f"ETA {duration(left)}")
        return " | ".join(p for p in parts if p)

    def log_images(self, step: int, name: str, grid: np.ndarray, caption: str) -> None:
        """grid: HWC uint8."""
        if self.is_main and self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(grid, caption=caption)}, step=step)

    def add_config(self, values: dict) -> None:
        """Entries for the W&B run's config beyond the composed config (what a forced resume changed)."""
        if self.wandb is not None:
            self.wandb.config.update(values, allow_val_change=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def finish(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()
