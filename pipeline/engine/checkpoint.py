"""Checkpoints of one run directory: save, keep the last K, find the newest usable one, refuse foreign ones.

Layout of `run_dir`:
    experiment.json                  what this run dir is for (fingerprint); a run with another fingerprint is refused
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
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from pipeline.config.checks import ConfigError
from pipeline.distributed import barrier, broadcast
from pipeline.engine import rng
from pipeline.engine.safe_load import safe_load, torch_save

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"
_TAG = re.compile(r"^step(\d{9})$")


class RunDirError(ConfigError):
    """The run directory belongs to another experiment: a wrong run_dir, so a configuration error (exit 2)."""


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
    def claim(self) -> None:
        """Refuse a run dir made by another experiment, or that cannot be one; otherwise record this one's
        fingerprint (rank 0)."""
        error = broadcast(self._claim() if self.rank == 0 else None)
        if error:
            raise RunDirError(error)

    def _claim(self) -> str | None:
        """Rank 0's part of claim(): the reason to refuse this run dir, or None once it holds our fingerprint."""
        path = self.run_dir / "experiment.json"
        if self.run_dir.exists() and not self.run_dir.is_dir():
            return f"run_dir={self.run_dir}: is a file, not a folder"
        error = None
        try:
            if path.exists():
                saved = json.loads(path.read_text())
                if saved != self.fingerprint:
                    differ = sorted(k for k in set(saved) | set(self.fingerprint)
                                    if saved.get(k) != self.fingerprint.get(k))
                    error = (f"run dir {self.run_dir} holds checkpoints of another experiment (differs in "
                             f"{', '.join(differ)}: {', '.join(f'{k}={saved.get(k)!r}' for k in differ)}); "
                             f"choose another run_dir")
            elif self.complete_tags():
                error = f"run dir {self.run_dir} holds checkpoints but no experiment.json: refusing to mix runs"
            else:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
                tmp.replace(path)
        except (ValueError, AttributeError) as err:  # not JSON, or not a JSON object
            error = (f"run dir {self.run_dir}: {path.name} is damaged ({err}); repair or remove it, or choose another "
                     "run_dir")
        except OSError as err:
            error = f"run_dir={self.run_dir}: cannot be used ({err.strerror or err})"
        return error

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
        marker = self.choose()
        if marker is None:
            return None
        tag, saved_world = marker["tag"], marker["world_size"]
        world = dist.get_world_size() if dist.is_initialized() else 1
        if saved_world != world and marker["zero_stage"] >= 1:
            raise RuntimeError(
                f"checkpoint {self.dir / tag} was written by {saved_world} ranks under ZeRO {marker['zero_stage']}; "
                f"DeepSpeed 0.19.8 cannot re-partition ZeRO optimizer states for {world} ranks. Resume with "
                f"{saved_world} ranks (checkpoints of zero_stage 0 resume at any world size).")
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        rng_file = self.dir / tag / f"rng_rank{self.rank}.pt"
        same_world = saved_world == world
        if same_world and rng_file.is_file():
            rng.restore(safe_load(str(rng_file)))
        return Restored(tag=tag, step=marker["step"], path=self.dir / tag, client_state=client_state or {},
                        same_world=same_world)

    def last_complete(self) -> Path | None:
        tags = self.complete_tags()
        return self.dir / tags[-1] if tags else None
