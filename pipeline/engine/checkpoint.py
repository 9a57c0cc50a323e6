"""Checkpoints of one run directory: save, keep the last K, find the newest usable one, refuse foreign ones.

Layout of `run_dir`:
    experiment.json                  what this run dir is for: the fingerprint of the settings that shaped its weights,
                                     and the changes `checkpoint.resume=force` accepted since; a run with another
                                     fingerprint is refused
    checkpoints/step000001000/       one DeepSpeed checkpoint (every rank writes its files: save_checkpoint is
        *.pt                         collective), plus per-rank RNG states, the exported encoder, and
        rng_rank{r}.pt               COMPLETE.json: written by rank 0 last, listing every file with its size.
        encoder.safetensors
        COMPLETE.json

A tag without COMPLETE.json was interrupted while saving and is ignored; a save that fails removes its folder, and
keep_last prunes older tags only once a newer one is complete. A full disk (or quota, or file size limit) while
saving is StorageFull, which names the checkpoint that is kept. Before loading, rank 0 checks the newest
complete tag (sizes, and the CRC of every member of every file: torch.save writes zip archives) and falls back to
older ones with a warning until one passes; the verdict is broadcast, so all ranks load the same tag or none.
(Without that, a corrupt file that only one rank reads would fail that rank alone and leave the others waiting.)

A ZeRO 1-3 checkpoint resumed at another world size is first converted, once, by rank 0, with DeepSpeed's own
converter (deepspeed.checkpoint.ds_to_universal) into `<tag>/universal/`, a layout of whole parameters that any world
size loads (`checkpoint.load_universal`). It is written under `<tag>/.universal-tmp/` and renamed into place, so an
interrupted conversion leaves the tag as it was and the next resume redoes it. The converter knows only Adam's state
names; SGD's and LARS's momentum travel under them (pipeline/engine/universal_state.py).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import zipfile
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pipeline.config.checks import ConfigError
from pipeline.distributed import barrier, broadcast
from pipeline.engine import rng
from pipeline.engine.run_status import now, replace_atomically

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"
UNIVERSAL = "universal"  # inside a tag's folder: that checkpoint converted for any world size
_TAG = re.compile(r"^step(\d{9})$")
FORMAT = 2  # of experiment.json; format 1 (no "format" key) held experiment_name, method, backbone, dataset, stem
_FORMAT_1_NAMES = {"dataset": "data.dataset", "stem": "data.stem", "image_size": "data.image_size"}


class RunDirError(ConfigError):
    """The run directory holds a run made with other settings, or cannot be one: a configuration error (exit 2)."""


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested dict's leaves under dotted keys: {"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(there: dict, here: dict) -> dict:
    """{key: [value there, value here]} for every key whose values differ (None where a side lacks the key)."""
    return {k: [there.get(k), here.get(k)] for k in sorted(set(there) | set(here)) if there.get(k) != here.get(k)}


def _comparable(fingerprint: dict) -> dict:
    """A fingerprint as it is compared. The BatchNorm group counts only with sync_batchnorm (without it no rank
    shares statistics, whatever the group); a run made before the key existed synchronised all ranks: group 0."""
    out = dict(fingerprint)
    if out.get("deepspeed.sync_batchnorm") is False:
        out.pop("deepspeed.sync_batchnorm_group", None)
    elif out.get("deepspeed.sync_batchnorm") is True:
        out.setdefault("deepspeed.sync_batchnorm_group", 0)
    return out


def _compare(saved: dict, fingerprint: dict) -> tuple[dict, bool]:
    """How a saved experiment.json differs from `fingerprint`, and whether it is of format 1 (then compared on the
    keys it has, under today's names). Raises ValueError (or AttributeError, TypeError) for anything else."""
    if "format" not in saved:
        there = {_FORMAT_1_NAMES.get(k, k): v for k, v in flat(saved).items()}
        return _differences(there, {k: fingerprint.get(k) for k in there}), True
    if not isinstance(saved.get("fingerprint"), dict) or not isinstance(saved.get("forced"), list):
        raise ValueError("not an experiment record")
    return _differences(_comparable(saved["fingerprint"]), _comparable(fingerprint)), False


def _describe(changed: dict) -> str:
    return "; ".join(f"{k}={json.dumps(a)} there, {json.dumps(b)} now" for k, (a, b) in changed.items())


class StorageFull(RuntimeError):
    """A checkpoint could not be written for lack of room; the previous one is kept (exit 5: make room, resume)."""


_NO_ROOM = {errno.ENOSPC: ("no space left on device", "free space"),
            errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
            errno.EFBIG: ("a file would exceed the file size limit (ulimit -f)", "raise the limit")}


def _no_room(err: BaseException | None) -> tuple[str, str] | None:
    """Why there was no room and what to do, if an OSError saying so is in `err`'s chain (torch wraps it)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _NO_ROOM:
            return _NO_ROOM[err.errno]
        err = err.__cause__ or err.__context__
    return None


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def _restore_buffers(module, folder: Path) -> None:
    """DeepSpeed 0.19.8's universal load restores parameters only, leaving buffers (BatchNorm's running statistics)
    as initialised: copy them from rank 0's model states, which is what a load at the same world size reads."""
    from pipeline.engine.safe_load import safe_load  # imports DeepSpeed: not for pipeline.evaluate's lookups

    name = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO 3; ZeRO 1/2 write one file, rank 0's
    saved = safe_load(str(folder / name if (folder / name).is_file() else folder / "mp_rank_00_model_states.pt"))
    with torch.no_grad():
        for key, buffer in module.named_buffers():
            buffer.copy_(saved["module"][key])


def _repair_zero3_universal_load(optimizer, universal: Path) -> None:
    """DeepSpeed 0.19.8's ZeRO 3 universal load gives every param group the first group's settings (the weight decay
    of the decayed group to the parameters excluded from it), and one step-count tensor to all of them, which Adam
    then advances once per group at each step (a wrong bias correction from the second step on). Set each group's
    own settings again, from the checkpoint, and give each its own count."""
    from pipeline.engine.safe_load import safe_load

    saved = safe_load(str(universal / "zero" / "optimizer_state.pt"))["optimizer_state_dict"]["param_groups"]
    for group, settings in zip(optimizer.param_groups, saved, strict=True):
        group.update({k: v for k, v in settings.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


@dataclass
class Restored:
    tag: str
    step: int
    path: Path
    client_state: dict
    same_world: bool  # False: the RNG states were not restored (the trainer reseeds)


def complete_tags(checkpoints_dir: Path) -> list[str]:
    """The tags under `run_dir/checkpoints` whose save finished (COMPLETE.json written), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p.name for p in checkpoints_dir.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file())


class Checkpoints:
    def __init__(self, run_dir: str | os.PathLike, fingerprint: dict, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.fingerprint, self.keep_last = fingerprint, keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    # -- ownership ------------------------------------------------------------------------------------------------
    def claim(self, force: bool = False) -> dict:
        """Refuse a run dir whose checkpoints were made with other weight-shaping settings (unless `force`), or that
        cannot be one; otherwise record this run's fingerprint (rank 0). Returns what `force` accepted:
        {key: [value there, value now]}."""
        error, changed = broadcast(self._claim(force) if self.rank == 0 else None)
        if error:
            raise RunDirError(error)
        return changed

    def _claim(self, force: bool) -> tuple[str | None, dict]:
        """Rank 0's part of claim(): the reason to refuse this run dir (or None once it holds our fingerprint), and
        the changes `force` accepted."""
        path = self.run_dir / "experiment.json"
        if self.run_dir.exists() and not self.run_dir.is_dir():
            return f"run_dir={self.run_dir}: is a file, not a folder", {}
        fingerprint = json.loads(json.dumps(self.fingerprint))  # as it reads back: lists, not tuples
        forced, changed = [], {}
        try:
            if path.exists():
                saved = json.loads(path.read_text())
                changed, older = _compare(saved, fingerprint)
                if not changed and not older:
                    return None, {}
                if not force:
                    return self._refusal(changed, older), {}
                forced = [*saved.get("forced", []), {"time": now(), "changed": changed, "older_format": older}]
                log.warning("run_dir=%s: checkpoint.resume=force: continuing its checkpoints with changed settings: %s",
                            self.run_dir, _describe(changed) if changed else "none of those its older experiment.json "
                            "recorded; the others are taken to be this command's")
            elif self.complete_tags():
                return f"run dir {self.run_dir} holds checkpoints but no experiment.json: refusing to mix runs", {}
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record = {"format": FORMAT, "fingerprint": fingerprint, "forced": forced}
            replace_atomically(path, json.dumps(record, indent=1, sort_keys=True))
        except (ValueError, AttributeError, TypeError) as err:  # not JSON, or not an experiment record
            return (f"run dir {self.run_dir}: {path.name} is damaged ({err}); repair or remove it, or choose another "
                    "run_dir"), {}
        except OSError as err:
            return f"run_dir={self.run_dir}: cannot be used ({err.strerror or err})", {}
        return None, changed

    def _refusal(self, changed: dict, older: bool) -> str:
        if changed:
            why = f"holds a run made with other settings that shape the weights: {_describe(changed)}"
        else:
            why = ("has an experiment.json of an older augssl, which recorded only the experiment name, method, "
                   "backbone, dataset, stem and image size (all match); the other settings cannot be checked")
        return (f"run_dir={self.run_dir} {why}. Choose another run_dir, set the values it was made with, or pass "
                "checkpoint.resume=force to continue its checkpoints with this command's settings on purpose (e.g. "
                "more epochs, a lower lr after a divergence)")

    # -- listing and verification ---------------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        return complete_tags(self.dir)

    def verify(self, tag: str) -> str | None:
        """None if every file of `tag` is as COMPLETE.json lists it and every zip member passes its CRC; else why."""
        folder = self.dir / tag
        try:
            listed = json.loads((folder / MARKER).read_text())["files"]
        except (OSError, ValueError, KeyError) as err:
            return f"unreadable {MARKER}: {err}"
        for name, size in listed.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
            if name.endswith(".pt"):
                try:
                    with zipfile.ZipFile(path) as archive:
                        bad = archive.testzip()
                except (zipfile.BadZipFile, OSError) as err:
                    return f"{name} is not a valid torch archive: {err}"
                if bad is not None:
                    return f"{name}: member {bad} fails its CRC check"
        return None

    # -- saving ---------------------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, extras: Callable[[Path], None] | None = None) -> Path:
        """Collective: every rank must call it at the same step. A rank whose write fails removes the step's folder
        and raises (StorageFull when there was no room); the others then fail at their next collective."""
        from pipeline.engine.safe_load import torch_save  # imports DeepSpeed: not for pipeline.evaluate's lookups

        tag = tag_for(step)
        folder = self.dir / tag
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=True)
            torch_save(rng.capture(), folder / f"rng_rank{self.rank}.pt")
            if extras is not None:
                extras(folder)
            barrier()
            if self.rank == 0:
                files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
                         if p.is_file() and p.name != MARKER}
                tmp = folder / (MARKER + ".tmp")
                marker = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                          "zero_stage": int(engine.zero_optimization_stage()), "files": files}
                tmp.write_text(json.dumps(marker, indent=1))
                tmp.replace(folder / MARKER)
        except Exception as err:
            shutil.rmtree(folder, ignore_errors=True)  # also frees the room for status.json
            no_room = _no_room(err)
            if no_room is None:
                raise
            reason, remedy = no_room
            kept = self.complete_tags()
            then = (f"the previous checkpoint (step {int(kept[-1][4:])}) is kept; {remedy} and re-run to resume from "
                    "it" if kept else f"there is no earlier checkpoint; {remedy} and re-run")
            raise StorageFull(f"checkpoint at step {step} could not be written to {self.dir}: {reason}; {then}") \
                from err
        if self.rank == 0:
            self._prune(tag)
        barrier()
        return folder

    def _prune(self, newest: str) -> None:
        keep = set(self.complete_tags()[-self.keep_last:])
        for p in self.dir.iterdir():
            if _TAG.match(p.name) and p.name not in keep and p.name <= newest:
                shutil.rmtree(p, ignore_errors=True)

    # -- loading --------------------------------------------------------------------------------------------------
    def choose(self) -> dict | None:
        """Rank 0 picks the newest tag that verifies; each one skipped is moved aside (to `unusable-<tag>`, kept for
        a look, no longer counted by keep_last nor overwritten when the run reaches its step again), with a warning.
        Every rank gets the chosen COMPLETE.json (with the tag added), or None."""
        chosen = None
        if self.rank == 0:
            for tag in reversed(self.complete_tags()):
                problem = self.verify(tag)
                if problem is None:
                    chosen = {**json.loads((self.dir / tag / MARKER).read_text()), "tag": tag}
                    break
                aside = self.dir / f"unusable-{tag}"
                shutil.rmtree(aside, ignore_errors=True)
                (self.dir / tag).rename(aside)
                log.warning("checkpoint %s is unusable (%s); moved aside to %s, falling back to the previous one",
                            self.dir / tag, problem, aside)
        return broadcast(chosen)

    def load_latest(self, engine) -> Restored | None:
        """Restore weights, optimizer, schedule and this rank's RNG from the newest usable checkpoint, if any."""
        from pipeline.engine import universal_state  # imports DeepSpeed, as safe_load does
        from pipeline.engine.safe_load import safe_load, weights_only_everywhere

        marker = self.choose()
        if marker is None:
            return None
        tag, saved_world = marker["tag"], marker["world_size"]
        world = dist.get_world_size() if dist.is_initialized() else 1
        load_dir, load_tag = self.dir, tag
        if saved_world != world and marker["zero_stage"] >= 1:
            load_dir, load_tag = self.universal(tag), UNIVERSAL
        engine._config.load_universal_checkpoint = load_tag == UNIVERSAL  # read at load time only
        try:
            with weights_only_everywhere():
                path, client_state = engine.load_checkpoint(str(load_dir), tag=load_tag, load_optimizer_states=True,
                                                            load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = False
        if path is not None and load_tag == UNIVERSAL:
            _restore_buffers(engine.module, self.dir / tag)
            if engine.zero_optimization_stage() == 3:
                _repair_zero3_universal_load(engine.optimizer.optimizer, self.dir / tag / UNIVERSAL)
            universal_state.restore_names(engine, self.dir / tag / UNIVERSAL)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        rng_file = self.dir / tag / f"rng_rank{self.rank}.pt"
        same_world = saved_world == world
        if same_world and rng_file.is_file():
            rng.restore(safe_load(str(rng_file)))
        return Restored(tag=tag, step=marker["step"], path=self.dir / tag, client_state=client_state or {},
                        same_world=same_world)

    def universal(self, tag: str) -> Path:
        """The folder holding `tag` in DeepSpeed's universal form (its `universal` subfolder), converted by rank 0
        unless an earlier resume did. Collective."""
        folder = self.dir / tag
        failed = None
        if self.rank == 0 and not (folder / UNIVERSAL).is_dir():
            failed = self._convert(folder)
        failed = broadcast(failed)
        if failed:
            message, room = failed
            raise StorageFull(message) if room else RuntimeError(message)
        return folder

    def _convert(self, folder: Path) -> tuple[str, bool] | None:
        """Rank 0: convert `folder` with DeepSpeed's converter into folder/universal, atomically; None, or why not
        and whether it was for lack of room (the conversion writes about the checkpoint's size again)."""
        from deepspeed.checkpoint import ds_to_universal

        from pipeline.engine import universal_state
        from pipeline.engine.safe_load import weights_only_everywhere

        scratch = folder / ".universal-tmp"  # left by an interrupted conversion: redo it
        shutil.rmtree(scratch, ignore_errors=True)
        started = time.perf_counter()
        log.warning("converting %s to a universal checkpoint for another world size", folder)
        try:
            with weights_only_everywhere():
                renamed = universal_state.stage(folder, scratch / "staged")
                args = Namespace(input_folder=str(scratch / "staged" if renamed else folder),
                                 output_folder=str(scratch / UNIVERSAL), num_extract_workers=1, num_merge_workers=1,
                                 keep_temp_folder=False, strict=True, inject_missing_state=True)
                ds_to_universal.main(args)  # one process: a pool would fork this rank with its threads
            if renamed:
                universal_state.write_names(scratch / UNIVERSAL, renamed)
            (scratch / UNIVERSAL).rename(folder / UNIVERSAL)
        except Exception as err:
            no_room = _no_room(err)
            if no_room:
                reason, remedy = no_room
                return (f"converting checkpoint {folder} for another world size needs about its size again on "
                        f"{self.dir}: {reason}; the checkpoint is kept; {remedy} and re-run to resume from it"), True
            return (f"converting checkpoint {folder} to a universal checkpoint failed: {type(err).__name__}: "
                    f"{err}"), False
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.warning("converted %s in %.1f s", folder, time.perf_counter() - started)
        return None

    def last_complete(self) -> Path | None:
        tags = self.complete_tags()
        return self.dir / tags[-1] if tags else None
