"""ZeRO 1-3 checkpoints resume at another world size through DeepSpeed's universal checkpoints (real DeepSpeed on its
CPU accelerator, torchrun + gloo, the real loader on digits shards).

A run trains 2 steps and checkpoints; the same checkpoint is then resumed (a) at the world size that wrote it, the
ordinary path and the reference, and (b) at another one, through the conversion. Right after resuming, every fp32
master weight, Adam moment and BatchNorm buffer, gathered whole, must be equal in (a) and (b); (b) must then train on
to step 4 with the data position continuing. This file is also the worker: `torchrun ... test_reshard.py PHASE SHARDS
OUT`, one process group per phase, several Trainers in it.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tests.engine.test_train_distributed import finish, losses, torchrun

SAVED, RESUMED = 2, 4  # the checkpoint's step; the step the resumed runs train to
BF16 = "deepspeed.precision=bf16"


def cfg_for(shards: str, run_dir: Path, stage: int, steps: int, optimizer: str = "adamw", *extra: str):
    from pipeline.config.compose import load

    return load("train", ["experiment=smoke", "method=aag", "method.proj_hidden_dim=64", f"deepspeed=zero{stage}",
                          f"data.root={shards}", f"run_dir={run_dir}", f"max_steps={steps}", "data.batch_size=16",
                          f"optimizer={optimizer}", "optimizer.lr=2e-3", "schedule=warmup_constant",
                          "schedule.warmup_epochs=0", "logger=none", "logger.log_every_steps=1",
                          "logger.progress_bar=false", "logger.image_every_steps=0", "monitor.knn_every_epochs=0",
                          "checkpoint.every_steps=0", *extra])


def full_state(trainer) -> dict:
    """Every parameter's fp32 master copy and Adam moments, gathered whole (collective under ZeRO 3), the buffers,
    and the schedule's learning rate."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    link = getattr(trainer.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO 1/2 link the moments to the parameters at the first step; ask for it now
        link()
    out = {"lr": torch.tensor(trainer.schedule.get_last_lr())}
    for name, p in trainer.engine.module.named_parameters():
        out[name] = safe_get_full_fp32_param(p)
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key)
    out.update({f"buffer/{n}": b.clone() for n, b in trainer.engine.module.named_buffers()})
    return out


def train(shards, run_dir, stage, optimizer="adamw", *extra):
    from pipeline.engine.trainer import Trainer

    assert Trainer(cfg_for(shards, run_dir, stage, SAVED, optimizer, *extra)).run() == "done"


def resume(shards, run_dir, stage, name, *extra, force=False, go_on=True):
    """Resume run_dir's step-2 checkpoint at this world size; rank 0 saves the state it resumed with to `name`."""
    import torch.distributed as dist

    from pipeline.engine.trainer import Trainer

    trainer = Trainer(cfg_for(shards, run_dir, stage, RESUMED, "adamw", *extra, *["checkpoint.resume=force"] * force))
    assert trainer.step == SAVED
    state = full_state(trainer)
    if dist.get_rank() == 0:
        torch.save(state, run_dir / name)
    if go_on:
        assert trainer.run() == "done"
    else:
        trainer.loader.close()


def worker(phase: str, shards: str, out: str) -> None:
    import torch.distributed as dist

    from pipeline.config.checks import ConfigError

    out = Path(out)
    if phase == "two":  # ZeRO 1-3 at world size 2, their same-world references; and LARS
        for stage in (1, 2, 3):
            train(shards, out / f"zero{stage}", stage)
            resume(shards, out / f"zero{stage}", stage, "reference.pt", force=True, go_on=False)
        train(shards, out / "bf16", 2, "adamw", BF16)
        resume(shards, out / "bf16", 2, "reference.pt", BF16, force=True, go_on=False)
        train(shards, out / "lars", 2, "lars")
    elif phase == "one":  # those at world size 1; a ZeRO 2 run at world size 1 and its reference
        # what a conversion killed half-way leaves: the resume must redo it
        (out / "zero1/checkpoints/step000000002/.universal-tmp/universal").mkdir(parents=True)
        for stage in (1, 2, 3):
            resume(shards, out / f"zero{stage}", stage, "resumed.pt")
        resume(shards, out / "bf16", 2, "resumed.pt", BF16)
        try:
            train(shards, out / "lars", 2, "lars")  # max_steps=2 again: nothing to train, but it resumes
        except ConfigError as err:
            (out / "lars" / "refused.txt").write_text(str(err))
        train(shards, out / "one", 2)
        resume(shards, out / "one", 2, "reference.pt", force=True, go_on=False)
    elif phase == "again":  # the world-size-1 ZeRO 2 run at world size 2
        resume(shards, out / "one", 2, "resumed.pt")
    dist.barrier()


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    for phase, nproc in (("two", 2), ("one", 1), ("again", 2)):
        finish(torchrun([__file__, phase, shards, str(out)], nproc=nproc))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero1", "zero2", "zero3", "bf16", "one"])
def test_a_zero_checkpoint_resumes_at_another_world_size_with_the_same_state(runs, case):
    """2 ranks -> 1 for ZeRO 1, 2 and 3, and ZeRO 2 with bf16; 1 rank -> 2 for ZeRO 2 ("one")."""
    run_dir = runs / case
    reference = torch.load(run_dir / "reference.pt", weights_only=True)
    resumed = torch.load(run_dir / "resumed.pt", weights_only=True)
    assert sorted(resumed) == sorted(reference)
    assert any(k.endswith("exp_avg_sq") for k in reference)
    for key, value in reference.items():
        assert value is not None, key
        assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    tag = run_dir / "checkpoints" / f"step{SAVED:09d}"
    assert (tag / "universal" / "zero").is_dir() and not (tag / ".universal-tmp").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples"]) for r in records] == [(s, 16 * s) for s in range(1, RESUMED + 1)]
    assert sorted(losses(run_dir)) == list(range(1, RESUMED + 1))
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_lars_state_at_another_world_size_is_refused_in_one_line(runs):
    refused = (runs / "lars" / "refused.txt").read_text()
    assert "under ZeRO 2 with LARS" in refused and "resume with 2 ranks" in refused and "\n" not in refused
    assert not (runs / "lars" / "checkpoints" / f"step{SAVED:09d}" / "universal").exists()


def test_a_failed_conversion_leaves_the_checkpoint_as_it_was(tmp_path, monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    from pipeline.engine.checkpoint import UNIVERSAL, Checkpoints

    folder = tmp_path / "checkpoints" / "step000000002"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"saved")

    def crash(args):
        Path(args.output_folder, "zero").mkdir(parents=True)
        raise OSError("killed half-way")

    monkeypatch.setattr(ds_to_universal, "main", crash)
    error = Checkpoints(tmp_path, {})._convert(folder)
    assert "killed half-way" in error
    assert sorted(p.name for p in folder.iterdir()) == ["mp_rank_00_model_states.pt"]
    assert not (folder / UNIVERSAL).exists()


if __name__ == "__main__":
    worker(*sys.argv[1:4])
