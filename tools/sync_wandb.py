#!/usr/bin/env python
"""One W&B history for a run that was preempted and resumed offline: merge its attempts, then sync once.

    python tools/sync_wandb.py runs/imagenet_aasae            # writes RUN_DIR/wandb-merged/wandb/offline-run-*-<id>
    python tools/sync_wandb.py runs/imagenet_aasae --upload   # ... and runs `wandb sync` on it

Offline, every attempt of a run (each requeue or pod restart) writes its own `RUN_DIR/wandb/offline-run-<time>-<id>`
with the same run id, and `wandb sync` of several such folders replaces rather than appends. An attempt resumed from
the checkpoint of step S re-does the steps after S, which the attempt before it may have logged already. So the
attempts are read in order (their `.wandb` record logs), and from each only the steps before the next attempt's first
step are kept: every step once, as its last attempt computed it, with its images (media files re-logged). Summary
values that are not history (what `pipeline.evaluate` adds: `eval/...` figures, the t-SNE map `eval/tsne`) are
carried over too, the last one written of each. The merged run keeps the id, project and config, so syncing it
gives the online run one history. Online runs need none of this: they resume the same id (`resume="allow"`).

Exit status: 0 merged (with --upload: `wandb sync`'s own), 1 W&B did not finish writing the merged run in 120 s, 2 the
folder is not one run's directory with offline runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from pipeline.exit_codes import BAD_CONFIG

BLOCK, HEADER = 32768, 7  # the record log's block size and per-chunk header (crc32, length, type)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    """The serialised records of a W&B `.wandb` file (a leveldb-style log: a 7-byte file header, then 32 KiB blocks
    of chunks, a record split over chunks where it crosses a block)."""
    data, pos, out, partial = path.read_bytes(), 7, [], b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if pos + HEADER + length > len(data):  # a chunk still being written, or cut off by a kill
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            partial = chunk
        elif kind == MIDDLE:
            partial += chunk
        elif kind == LAST:
            out.append(partial + chunk)
    return out


def parsed(folder: Path):
    """The records of one offline run folder, parsed, in the order written."""
    from wandb.proto import wandb_internal_pb2 as pb

    for log in folder.glob("run-*.wandb"):
        for raw in records(log):
            record = pb.Record()
            record.ParseFromString(raw)
            yield record


def _items(items) -> dict:
    """{key: value} of history or summary items, W&B's own keys (`_step`, `_runtime`, `_wandb/...`) left out."""
    out = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
    return {k: v for k, v in out.items() if not k.startswith("_")}


def history(folder: Path) -> list[tuple[int, dict]]:
    """(step, {key: value}) of each history record of one offline run folder, in the order logged."""
    return [(record.history.step.num, _items(record.history.item)) for record in parsed(folder)
            if record.WhichOneof("record_type") == "history"]


def summary(folder: Path) -> dict:
    """The summary values one offline run folder set ({key: value}, the last one written of each): what
    `pipeline.evaluate` adds to a run (`eval/...` figures, the t-SNE map), besides the history's own last values."""
    out = {}
    for record in parsed(folder):
        if record.WhichOneof("record_type") == "summary":
            out.update(_items(record.summary.update))
    return out


def merged(attempts: list[Path]) -> list[tuple[int, dict, Path]]:
    """(step, values, the attempt folder) of each step once, from the last attempt that logged it before the next
    attempt started over."""
    rows = [(folder, history(folder)) for folder in attempts]
    out = []
    for i, (folder, steps) in enumerate(rows):
        starts = [s[0][0] for _, s in rows[i + 1 :] if s]
        stop = min(starts, default=None)
        out += [(step, values, folder) for step, values in steps if stop is None or step < stop]
    return sorted(out, key=lambda row: row[0])


class NotOneRun(ValueError):
    """The folder given is not one training run's directory with its offline W&B runs."""


def merge(run_dir: Path) -> tuple[Path, list[int], list[str]]:
    """Writes the merged offline run; returns its folder, the steps it holds and the summary keys it carried over."""
    import wandb
    from omegaconf import OmegaConf

    from pipeline.run_config import read_run_config

    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))  # named offline-run-<YYYYmmdd_HHMMSS>-<id>
    if not attempts:
        raise NotOneRun(f"no offline W&B runs in {run_dir / 'wandb'} (is it the run directory?)")
    if not (run_dir / "config.yaml").is_file():
        raise NotOneRun(f"{run_dir} has W&B runs but no config.yaml: not a run directory of pipeline.train")
    ids = {folder.name.rsplit("-", 1)[1] for folder in attempts}
    if len(ids) != 1:
        raise NotOneRun(f"{run_dir / 'wandb'} holds runs of several ids {sorted(ids)}: one run dir is one W&B run")
    try:
        cfg = read_run_config(run_dir, ("logger",))
    except ValueError as err:
        raise NotOneRun(str(err)) from None
    project, entity = cfg.logger.get("project"), cfg.logger.get("entity")
    rows = merged(attempts)
    out = run_dir / "wandb-merged"
    shutil.rmtree(out, ignore_errors=True)  # a merge replaces the previous one: it holds every attempt so far
    run = wandb.init(project=project, entity=entity, id=ids.pop(), dir=str(out),
                     mode="offline", name=cfg.experiment_name, config=OmegaConf.to_container(cfg, resolve=True),
                     settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False))
    for step, values, folder in rows:
        run.log({k: _media(v, folder) for k, v in values.items()}, step=step)
    logged = {k for _, values, _ in rows for k in values}  # their summary is the merged history's own
    kept = {k: (v, folder) for folder in attempts for k, v in summary(folder).items() if k not in logged}
    run.summary.update({k: _media(v, folder) for k, (v, folder) in kept.items()})
    run.finish()
    merged_folder = Path(run.dir).parent
    _wait_until_written(merged_folder, [step for step, _, _ in rows])
    return merged_folder, [step for step, _, _ in rows], sorted(kept)


def _wait_until_written(folder: Path, steps: list[int], timeout: float = 120) -> None:
    """W&B's writer may still be flushing the run's .wandb file when finish() returns (seen under load): wait until
    the file ends with the run's exit record and holds every step, so that `wandb sync` never uploads a part."""
    deadline = time.monotonic() + timeout
    while True:
        kinds = [record.WhichOneof("record_type") for record in parsed(folder)]
        if kinds[-1:] == ["exit"] and [step for step, _ in history(folder)] == steps:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{folder}: W&B did not finish writing the merged run within {timeout:.0f} s")
        time.sleep(0.1)


def _media(value, folder: Path):
    """An image logged by an attempt, re-logged from that attempt's files; any other value as it is."""
    import wandb

    if isinstance(value, dict) and value.get("_type") == "image-file":
        return wandb.Image(str(folder / "files" / value["path"]), caption=value.get("caption"))
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--upload", action="store_true", help="run `wandb sync` on the merged run (needs an account)")
    args = p.parse_args(argv)
    try:
        folder, steps, summary_keys = merge(args.run_dir)
    except NotOneRun as err:
        print(f"sync_wandb: {err}", file=sys.stderr)
        return BAD_CONFIG
    except RuntimeError as err:  # the merged run was not written in time: nothing to upload
        print(f"sync_wandb: {err}", file=sys.stderr)
        return 1
    attempts = len(list((args.run_dir / "wandb").glob("offline-run-*")))
    print(f"sync_wandb: {attempts} attempt(s) merged into {folder}: {len(steps)} steps "
          f"({steps[0] if steps else '-'}..{steps[-1] if steps else '-'}), each once"
          + (f"; summary values {', '.join(summary_keys)}" if summary_keys else ""))
    if args.upload:
        return subprocess.run([sys.executable, "-m", "wandb", "sync", str(folder)]).returncode
    print(f"upload with: wandb sync {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
