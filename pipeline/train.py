"""`python -m pipeline.train [overrides]`: self-supervised training, one process or many.

    python -m pipeline.train experiment=cifar10_aasae data.root=/shards/cifar10
    torchrun --nproc_per_node 8 -m pipeline.train experiment=imagenet_aag deepspeed=zero2_bf16
    srun python -m pipeline.train experiment=stl10_aasae            # Slurm: one task per GPU
    python -m pipeline.train experiment=smoke method=aag            # minutes on a CPU (digits shards)
    python -m pipeline.train --cfg job experiment=cifar10_aag       # print the composed config
    python -m pipeline.train -m experiment=smoke optimizer.lr=0.01,0.02  # a sweep: one run dir per point

Configs live in configs/ (schemas: pipeline/config/schema.py). A mistyped key stops here, before anything
starts, with the key and the valid ones. Re-running the same command resumes from the newest checkpoint in run_dir;
a command whose weight-shaping settings differ from the run's is refused unless checkpoint.resume=force.
Exit status (pipeline/exit_codes.py; a failure is one line on stderr): 0 finished, or stopped by SIGTERM/SIGUSR1
after checkpointing (run_dir/status.json says which), 1 a failure (such as a loader worker that died), 2 bad config,
3 non-finite loss, 4 unusable data (more bad samples than data.max_bad_fraction allows), 5 a checkpoint could not be
written for lack of room (the previous one is kept), 143 stopped by a signal while blocked (in a collective, a wait)
for dist.stop_grace_s.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config import schema
from pipeline.config.compose import VERSION_BASE, cli_overrides, exit_if_bad_cli
from pipeline.exit_codes import BAD_CONFIG, BAD_DATA, ERROR, NON_FINITE_LOSS, STORAGE_FULL, exit_with
from pipeline.redact import redact, redact_logs

schema.register()
DEFAULT_RUN_DIR = next(f.default for f in dataclasses.fields(schema.TrainConfig) if f.name == "run_dir")


def sweep_run_dir(cfg: DictConfig) -> None:
    """Under -m, a job left with the default run_dir trains in <hydra.sweep.dir>/<experiment_name>/<the values it
    sweeps> (its job number when no argument sweeps), so that sweep points never resume each other, and running the
    sweep again resumes each point. A run_dir the user set (shared by the jobs on purpose, or with interpolations
    of their own) is kept."""
    job = HydraConfig.get()
    if job.mode != RunMode.MULTIRUN or OmegaConf.to_container(cfg)["run_dir"] != DEFAULT_RUN_DIR:
        return
    parser = OverridesParser.create()
    swept = {o.key_or_group for o in parser.parse_overrides(cli_overrides("train", sys.argv[1:])[1])
             if o.is_sweep_override()}
    values = [o.input_line.lstrip("+").replace("/", "_") for o in parser.parse_overrides(list(job.overrides.task))
              if o.key_or_group in swept]
    cfg.run_dir = str(Path(job.sweep.dir) / cfg.experiment_name / (",".join(values) or str(job.job.num)))
    logging.getLogger(__name__).info("sweep job %d: run_dir=%s", job.job.num, cfg.run_dir)


def fail(err: Exception, code: int) -> NoReturn:
    """The one line a failure the user can act on gets, on stderr (the log's progress goes to stdout), then exit."""
    print(f"pipeline.train: {redact(str(err))}", file=sys.stderr, flush=True)
    exit_with(code)


@hydra.main(config_path="../configs", config_name="train", version_base=VERSION_BASE)
def _app(cfg: DictConfig) -> None:
    from pipeline.config.checks import ConfigError
    from pipeline.device import DeviceError, pick, prepare_deepspeed
    from pipeline.distributed import resolve

    try:  # before DeepSpeed is imported: it picks its accelerator then
        prepare_deepspeed(pick(cfg.device, resolve().local_rank))
    except (DeviceError, ValueError) as err:
        fail(err, BAD_CONFIG)

    from pipeline.data.loading.loader import BadSampleError
    from pipeline.data.loading.shard_index import ShardError
    from pipeline.engine.checkpoint import StorageFull
    from pipeline.engine.trainer import BadData, NonFiniteLoss, ReaderWorkerDied, Trainer

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    redact_logs()
    sweep_run_dir(cfg)
    try:
        status = Trainer(cfg).run()
    except ConfigError as err:
        fail(err, BAD_CONFIG)
    except NonFiniteLoss as err:
        fail(err, NON_FINITE_LOSS)
    except (BadData, BadSampleError, ShardError) as err:
        fail(err, BAD_DATA)
    except StorageFull as err:
        fail(err, STORAGE_FULL)
    except ReaderWorkerDied as err:
        fail(err, ERROR)
    # "done" and "stopped" both exit 0 (FINISHED): a non-zero worker would make torchrun and srun stop the other
    # ranks while they checkpoint; the launch wrappers read status.json and turn "stopped" into 143
    logging.getLogger(__name__).info("training %s", status)


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends --local_rank=N, which Hydra would read as a bad override; LOCAL_RANK (which
    it also sets) says the same."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            out.append(arg)
    return out


def main() -> None:
    sys.argv[1:] = _drop_local_rank(sys.argv[1:])
    exit_if_bad_cli("train", "pipeline.train")
    _app()


if __name__ == "__main__":
    main()
