"""The training loop: one composed config in, a trained (and exported) encoder and a run directory out.

Per micro-batch: the method's views from the loader -> method forward -> its flags recorded on the device (every
`dist.check_every_steps` steps, and at checkpoint steps, one small all_reduce makes the ranks agree whether any saw a
non-finite loss, too many unusable samples or a stop signal: step_checks.py) -> backward -> engine.step (DeepSpeed
applies the optimizer and the schedule at accumulation boundaries). Per optimizer step: metrics (averaged over ranks)
every `log_every_steps`, the method's image grids (`visualize`) at step 0 and every `image_every_steps`, a checkpoint
every `every_steps`. The trainer never names a method: the method says which views it needs and what it draws. Per
epoch: the kNN monitor every `knn_every_epochs`. At the end: a last checkpoint, kNN, and the exported encoder.

Resume: the newest usable checkpoint in run_dir restores weights, optimizer, schedule, RNG, the loader position and
the W&B run id. Every augmentation is a function of (seed, epoch, sample) (pipeline/data/loading/augmentations.py),
so a run resumed from any checkpoint, at any world size, sees the views an uninterrupted run sees, and at the same
world size computes the same losses (bit for bit on the CPU); the input stream runs on through checkpoints.

Exit: returns "done" or "stopped" (a SIGTERM/SIGUSR1 made it checkpoint and stop); raises NonFiniteLoss naming the
step and the last good checkpoint when a loss is NaN/inf (nothing is saved then), ReaderWorkerDied naming a loader
worker process that died (after a checkpoint, when training on one rank). Rank 0 records which in run_dir/status.json
(pipeline/engine/run_status.py), "running" from the start of training. Where the main thread is blocked and cannot
act, the watchdog (pipeline/engine/watchdog.py) records the end and exits.
"""

from __future__ import annotations

import logging
import math
import resource
import time
import zlib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import exit_codes
from pipeline.config.checks import (
    ConfigError,
    check_launch,
    check_shards,
    check_values,
    data_roles,
    monitors_with_labels,
    split_manifests,
    splits_without_labels,
)
from pipeline.data.loading.loader import EVAL_VIEWS, BadSampleError, loader_for
from pipeline.data.shard_format import read_manifest
from pipeline.device import resolve_device
from pipeline.distributed import all_reduce_sum, resolve
from pipeline.engine import rng, run_status
from pipeline.engine.batchnorm_groups import MIN_BATCHNORM_SAMPLES, batchnorm_scope, check_batchnorm_device
from pipeline.engine.checkpoint import Checkpoints, StorageFull, flat
from pipeline.engine.deepspeed_engine import BatchGeometry, build_engine, init_distributed
from pipeline.engine.ds_config import MODULE_DTYPES, autocast
from pipeline.engine.export import encoder_state, save_encoder
from pipeline.engine.run_logger import RunLogger, duration, image_grid
from pipeline.engine.step_checks import BadData, NonFiniteLoss, StepChecks
from pipeline.engine.stop_signals import StopSignals
from pipeline.engine.watchdog import Watchdog
from pipeline.evaluation.features import feature_batches
from pipeline.evaluation.knn import KNNMonitor
from pipeline.methods import METHODS, method_for
from pipeline.redact import redacted_config

log = logging.getLogger(__name__)


class ReaderWorkerDied(RuntimeError):
    """A DALI reader worker process died (killed, crashed): the input stream cannot go on."""


# Keys that do not shape the trained weights, so a run dir resumes across changes to them: where a run lives, what it
# reports, how fast it runs. They change at most the random draws (as the world size does), never the recipe. Every
# other key, a new one included, is in the fingerprint; docs/distributed.md (Checkpoints) says which and why.
FREE_KEYS = ("run_dir", "logger", "checkpoint", "monitor.knn_every_epochs", "monitor.knn_k", "monitor.knn_temperature",
             "dist", "export_encoder", "data.root", "data.cache_dir", "data.cache_max_gib", "data.bank_split",
             "data.test_split", "data.max_bad_fraction",
             "data.loader.device", "data.loader.num_threads", "data.loader.read_workers", "data.loader.prefetch",
             "data.loader.io", "data.loader.channels_last", "data.loader.strict", "data.loader.max_pixels",
             "deepspeed.overlap_comm", "deepspeed.reduce_bucket_size", "device", "compile", "compile_backend",
             "data.loader.hw_decoder_load", "data.loader.preallocate_width_hint", "data.loader.preallocate_height_hint")


def fingerprint(cfg: DictConfig) -> dict:
    """What must match for a run dir's checkpoints to be continued by this config: every resolved key that shapes
    the weights, flat ("optimizer.lr"), so that a refusal names each key that differs."""
    return {key: value for key, value in flat(redacted_config(cfg)).items()
            if not any(key == free or key.startswith(f"{free}.") for free in FREE_KEYS)}


def _mean_over_ranks(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    return dict(zip(keys, (all_reduce_sum(stacked) / world).tolist()))


def next_command(run_dir: Path, unlabelled: list[str]) -> str:
    """The end summary's evaluation hint; where the run's kNN splits have no labels (`splits_without_labels`), the
    evaluator would refuse them: name what it needs instead."""
    command = f"next: python -m pipeline.evaluate encoder={run_dir}"
    if not unlabelled:
        return command
    return (f"{command} data=<a labelled dataset> data.root=<its shards> ({' and '.join(unlabelled)} "
            f"{'have' if len(unlabelled) > 1 else 'has'} no labels to evaluate with)")


def _memory() -> dict[str, float]:
    out = {"memory/cpu_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["memory/gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.env = resolve()
        check_values(cfg)  # the entry point checked already; a config built in code is checked here
        check_launch(cfg, self.env.world_size)
        check_shards(cfg.data, data_roles(cfg))
        self.batchnorm_groups = check_batchnorm_device(cfg.deepspeed, self.env.world_size,
                                                       resolve_device(cfg.device, self.env.local_rank))
        self.device = init_distributed(self.env, cfg.dist.timeout_s, cfg.device)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.dtype = MODULE_DTYPES[cfg.deepspeed.precision]  # of the views: bf16 computes under autocast
        self.run_dir = Path(cfg.run_dir)
        self.checkpoints = Checkpoints(self.run_dir, fingerprint(cfg), cfg.checkpoint.keep_last)
        # before anything slow: a wrong run_dir fails at once
        self.forced = self.checkpoints.claim(force=cfg.checkpoint.resume == "force")
        self.geometry = BatchGeometry(cfg.data.batch_size, self.world, cfg.deepspeed.grad_accum_steps).check()
        self.ga = cfg.deepspeed.grad_accum_steps

        self.loader = loader_for(cfg.data, "train", METHODS[cfg.method.name].views, self.geometry.micro_batch,
                                 self.rank, self.world, seed=cfg.seed, shuffle=True, device=self.device)
        self.num_classes, self.knn_every, self.unlabelled = monitors_with_labels(cfg)
        micro_per_epoch = self.loader.steps_per_epoch
        self.total_steps = cfg.max_steps or max(1, math.floor(cfg.epochs * micro_per_epoch / self.ga))
        warmup = min(self.total_steps, round(cfg.schedule.warmup_epochs * micro_per_epoch / self.ga))

        rng.seed_all(cfg.seed)  # identical initial weights on every rank
        self.method = method_for(cfg, self.num_classes)
        self.engine, self.optimizer, self.schedule = build_engine(cfg, self.method, self.geometry,
                                                                  self.total_steps, warmup, self.device)
        self.method = self.engine.module
        if cfg.compile:
            self.engine.compile(backend=cfg.compile_backend)
            log.warning("compiled the method's forward with torch.compile (backend %s)", cfg.compile_backend)
        rng.seed_all(cfg.seed + 1_000_003 * self.rank)  # independent noise per rank from here on

        self.step, self.micro, self.wandb_id, self.last_saved = 0, 0, None, -1
        self.resumed, self.last_knn = "fresh start", None
        self.checks = StepChecks(cfg.dist.check_every_steps, self.device, len(self.loader.index),
                                 cfg.data.max_bad_fraction, self.checkpoints.last_complete)
        if cfg.checkpoint.resume:
            self._resume()
        elif self.checkpoints.complete_tags():  # a fresh start would interleave its checkpoints with old ones
            raise ConfigError(f"checkpoint.resume=false: {self.run_dir} holds checkpoints; choose another run_dir "
                              "(or resume)")
        self.logger = RunLogger(cfg, self.run_dir, self.rank == 0, self.wandb_id, self.total_steps, self.step)
        if self.forced:
            self.logger.add_config({"resume_forced": {"step": self.step, "changed": self.forced}})
        if self.rank == 0:
            OmegaConf.save(OmegaConf.create(redacted_config(cfg)), self.run_dir / "config.yaml")
        self.logger.message(self._banner())
        fewest = min(map(len, self.batchnorm_groups)) * self.geometry.micro_batch
        if fewest < MIN_BATCHNORM_SAMPLES and self.rank == 0:
            log.warning("BatchNorm statistics come from %d samples per forward pass: few enough to hurt training; "
                        "raise data.batch_size, or share them over more ranks (deepspeed.sync_batchnorm=true, "
                        "deepspeed.sync_batchnorm_group)", fewest)
        if self.unlabelled:
            self.logger.message(self.unlabelled)

    def _banner(self) -> str:
        """What this run is, printed once on rank 0 before the first step, for whoever reads its log."""
        cfg, g = self.cfg, self.geometry
        splits = f"{cfg.data.train_split} split {len(self.loader.index)} samples"
        if self.knn_every > 0:
            sizes = {role: read_manifest(url).num_samples for role, url in split_manifests(cfg.data, ("bank", "test"))
                     .items()}
            splits += f"; kNN bank {cfg.data.bank_split} {sizes['bank']}, test {cfg.data.test_split} {sizes['test']}"
        wandb = f"W&B {cfg.logger.wandb_mode}, run {self.logger.run_id}" if self.logger.wandb else "W&B disabled"
        batchnorm = batchnorm_scope(self.batchnorm_groups, self.env.local_world_size, g.micro_batch)
        return "\n".join([
            f"augssl {cfg.experiment_name}: {cfg.method.name}, {cfg.backbone.arch} on {cfg.data.dataset} "
            f"({splits})",
            f"  world size {self.world} on {self.device.type}; batch {g.global_batch} = {g.micro_batch} per rank x "
            f"{self.world} ranks x {self.ga} accumulation; {self.loader.steps_per_epoch // self.ga} steps per epoch, "
            f"{self.total_steps} steps; {batchnorm}",
            f"  {self.resumed}; run dir {self.run_dir.resolve()}; {wandb}"])

    def _summary(self, status: str, wall_s: float) -> str:
        """The end of a run on rank 0: how it ended, and what to run next."""
        lines = [f"training {status} at step {self.step}/{self.total_steps} after {duration(wall_s)} (this attempt)"
                 + ("" if self.last_knn is None else f"; kNN top-1 {self.last_knn:.4f}")]
        encoder = self.run_dir.resolve() / "encoder.safetensors"
        if status == "done" and encoder.is_file():
            lines += [f"encoder: {encoder}", next_command(self.run_dir.resolve(), splits_without_labels(self.cfg))]
        elif status == "stopped":
            lines.append(f"resume: run the same command again (checkpoint {self.run_dir.resolve() / 'checkpoints'})")
        return "\n".join(lines)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        restored = self.checkpoints.load_latest(self.engine)
        if restored is None:
            return
        state = restored.client_state
        self.step = self.last_saved = int(state["step"])
        self.micro = self.step * self.ga  # checkpoints are only taken at accumulation boundaries
        self.wandb_id = state.get("wandb_run_id")
        self.loader.load_state_dict(state["loader"])
        if not restored.same_world:  # the saved per-rank RNG streams do not map onto this world: reseed
            rng.seed_all(zlib.crc32(f"{self.cfg.seed}/{self.rank}/{self.step}".encode()))
        log.warning("resumed from %s (step %d, epoch %d, world size %d -> %d)", restored.path, self.step,
                    self.loader.epoch, state.get("world_size", 0), self.world)
        self.resumed = f"resumed at step {self.step} (saved at world size {state.get('world_size', 0)})"

    def save(self) -> Path:
        client_state = {"step": self.step, "loader": self.loader.state_dict(), "world_size": self.world,
                        "wandb_run_id": self.logger.run_id if self.rank == 0 else None}

        def export(folder: Path) -> None:
            self._export(folder / "encoder.safetensors")

        with self.watchdog.paused():
            folder = self.checkpoints.save(self.engine, self.step, client_state, extras=export)
        self.last_saved = self.step
        return folder

    def _export(self, path: Path) -> None:
        state = encoder_state(self.method.encoder, self.cfg.deepspeed.zero_stage)
        if self.rank == 0:
            save_encoder(state, self.method.encoder, path, step=self.step, experiment=self.cfg.experiment_name)

    # -- monitors -------------------------------------------------------------------------------------------------
    def knn(self) -> float | None:
        data, mon = self.cfg.data, self.cfg.monitor
        bank, test = (loader_for(data, role, EVAL_VIEWS, self.geometry.micro_batch, self.rank, self.world,
                                 shuffle=False, device=self.device) for role in ("bank", "test"))
        monitor = KNNMonitor(len(bank.index.manifest.classes), k=mon.knn_k, temperature=mon.knn_temperature)
        with self.watchdog.paused():  # its collectives run under the process group's timeout
            for loader, add in ((bank, monitor.add_bank), (test, monitor.add_queries)):
                with autocast(self.cfg.deepspeed.precision, self.device):  # as the engine's forward computes
                    for batch_features, labels in feature_batches(self.method.encoder, loader, self.device,
                                                                  self.dtype):
                        add(batch_features, labels)  # one batch at a time: the monitor keeps them in fp16
                loader.close()
            return monitor.compute()

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> str:
        signals = StopSignals().install()
        status = "done"
        self.window = {"data": 0.0, "steps": 0, "since": time.perf_counter()}
        started, wall = run_status.now(), time.monotonic()

        def record(state: str, reason: str = "", exit_code: int = exit_codes.FINISHED) -> None:
            """run_dir/status.json, which the launch wrappers read to learn how this attempt ended."""
            if self.rank == 0:
                run_status.write_status(self.run_dir, state, step=self.step, total_steps=self.total_steps,
                                        attempt_started=started, reason=reason, exit_code=exit_code)

        record("running")
        self.watchdog = Watchdog(self.cfg.dist.timeout_s, record, self.cfg.dist.stop_grace_s, signals,
                                 self.loader.reader_workers, self.rank).start()
        try:
            while self.step < self.total_steps and status == "done":
                status = self._epoch(signals)
                if status == "done" and self.loader.position == 0 and self._knn_due(self.loader.epoch):
                    self._log_knn()
            if status == "done":
                if self.last_saved != self.step:
                    self.save()
                if self.knn_every > 0:
                    self._log_knn()
                if self.cfg.export_encoder:
                    with self.watchdog.paused():
                        self._export(self.run_dir / "encoder.safetensors")
        except NonFiniteLoss as err:
            record("failed", str(err), exit_codes.NON_FINITE_LOSS)
            raise
        except (BadData, BadSampleError) as err:
            record("failed", str(err), exit_codes.BAD_DATA)
            raise
        except StorageFull as err:
            record("failed", str(err), exit_codes.STORAGE_FULL)
            raise
        except ReaderWorkerDied as err:
            if self.world == 1 and self.micro % self.ga == 0 and 0 < self.step != self.last_saved:
                self.save()  # not with several ranks: a checkpoint is collective, and they wait in the all-reduce
            record("failed", str(err), exit_codes.ERROR)
            raise
        except Exception as err:
            record("failed", f"{type(err).__name__}: {err}", exit_codes.ERROR)
            raise
        finally:
            self.watchdog.stop()
            signals.uninstall()
            self.loader.close()
            self.logger.finish()
        record(status, "" if status == "done" else f"stop signal ({signals.received or 'on another rank'})")
        self.logger.message(self._summary(status, time.monotonic() - wall))
        return status

    def _epoch(self, signals: StopSignals) -> str:
        """Train until the end of the loader's epoch, the last step, or a stop signal."""
        engine, accumulated = self.engine, {}
        batches = iter(self.loader)
        while self.step < self.total_steps:
            tick = time.perf_counter()
            batch = self._next(batches)
            if batch is None:
                return "done"
            self.window["data"] += time.perf_counter() - tick
            views = {k: batch.views[k].to(self.device, self.dtype, non_blocking=True) for k in self.method.views}
            labels, valid = (t.to(self.device, non_blocking=True) for t in (batch.labels, batch.valid))
            if self.step == self.micro == 0 and self.cfg.logger.image_every_steps:
                self._log_images(views)  # step 0: the untrained model's grids (the views as the recipe makes them)
            loss, metrics = engine(views, labels, valid)
            self.checks.record(self.step + 1, loss, batch)
            stop = False
            if (self.micro + 1) % self.ga == 0 and self._check_due(self.step + 1):
                stop = signals.agreed = self.checks.agree(signals.received is not None)  # the watchdog lets the
                # main loop stop at the end of this step
            engine.backward(loss)
            engine.step()
            self.watchdog.beat()
            for k, v in metrics.items():
                accumulated[k] = accumulated.get(k, 0) + v.detach().float() / self.ga
            self.micro += 1
            if self.micro % self.ga:
                continue
            self.step += 1
            self._after_step(accumulated, batch, views)
            accumulated = {}
            if stop:
                self.logger.message(f"stop signal: checkpointing at step {self.step} and exiting")
                self.save()
                return "stopped"
        return "done"

    def _log_images(self, views: dict) -> None:
        """The method's image grids of this batch (on every rank: a forward pass is a collective under ZeRO 3)."""
        for name, rows in self.method.visualize(views).items():
            grid = image_grid(rows, self.loader.mean, self.loader.std)
            self.logger.log_images(self.step, name, grid, f"rows: {', '.join(rows)}")

    def _check_due(self, step: int) -> bool:
        """Whether the ranks agree on their flags before this step's update: every `check_every` steps, at the
        last step, and at checkpoint steps (a checkpoint must never hold weights a non-finite loss went into)."""
        every = self.cfg.checkpoint.every_steps
        return step % self.checks.every == 0 or step == self.total_steps or bool(every and step % every == 0)

    def _next(self, batches):
        """The next batch (None at the end of the epoch), unless a reader worker died. DALI's failure on the batch
        that worker held reads like bad data: the error names the worker instead of the samples."""
        try:
            batch = next(batches, None)
        except Exception as err:
            if self.watchdog.worker_died.wait(2 * self.watchdog.poll_s):
                raise ReaderWorkerDied(self.watchdog.dead_worker) from err
            raise
        if self.watchdog.dead_worker:
            raise ReaderWorkerDied(self.watchdog.dead_worker)
        return batch

    def _knn_due(self, epochs_done: int) -> bool:
        every = self.knn_every
        return every > 0 and epochs_done % every == 0 and self.step < self.total_steps

    def _log_knn(self) -> None:
        """The kNN monitor, logged with the epochs trained so far (the last one may end part-way, at max_steps)."""
        epoch = self.loader.epoch + min(1.0, self.loader.position / len(self.loader.index))
        self.logger.message(f"step {self.step}: kNN monitor (features of the bank and test splits) ...")
        tick = time.monotonic()
        self.last_knn = accuracy = self.knn()
        self.logger.log(self.step, {"knn/top1": accuracy, "epoch": epoch})
        self.logger.message(f"step {self.step}: kNN top-1 {accuracy:.4f} (epoch {epoch:.2f}, "
                            f"{time.monotonic() - tick:.0f} s)")

    def _after_step(self, accumulated: dict, batch, views: dict) -> None:
        cfg, window = self.cfg, self.window
        self.logger.advance()
        window["steps"] += 1
        if self.step % cfg.logger.log_every_steps == 0 or self.step == self.total_steps:
            now = time.perf_counter()
            elapsed = max(now - window["since"], 1e-9)
            metrics = _mean_over_ranks(accumulated, self.world)
            metrics.update({
                "lr": self.schedule.get_last_lr()[0],
                "epoch": batch.epoch + (batch.step + 1) / self.loader.steps_per_epoch,
                "samples": self.loader.position,
                "perf/images_per_s": window["steps"] * self.geometry.global_batch / elapsed,
                "perf/data_wait_fraction": window["data"] / elapsed,
                **_memory(),
            })
            self.logger.log(self.step, metrics)
            window.update(data=0.0, steps=0, since=now)
        if cfg.logger.image_every_steps and self.step % cfg.logger.image_every_steps == 0:
            self._log_images(views)
        every = cfg.checkpoint.every_steps
        if every and self.step % every == 0 and self.step < self.total_steps:
            self.save()
