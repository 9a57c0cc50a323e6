"""ZeRO 1-3 checkpoints resume at another world size through DeepSpeed's universal checkpoints (real DeepSpeed on its
CPU accelerator, torchrun + gloo, the real loader on digits shards).

Runs train 2 steps at world size 2 and checkpoint: ZeRO 0 (unsharded: any world size loads its checkpoint as it is,
the reference), ZeRO 1, 2 and 3, each with AdamW and with LARS, ZeRO 2 in bf16 and ZeRO 3 with SGD without momentum
(no optimizer state) and ZeRO 2 with SGD with momentum. Each checkpoint is then resumed at world size 1 and, in a
copy, at world size 3 (both at once; the last three at world size 1 only), through the conversion.
Right after resuming, every fp32 master weight, optimizer state (Adam's moments, LARS's and SGD's momentum) and
BatchNorm buffer,
gathered whole, and each param group's settings must equal what the world-2 run held when it saved; the runs then
train 2 more steps, whose losses must equal the ZeRO 0 reference's (same optimizer) at that world size, with the data
position continuing. This file is also the worker: `torchrun ... test_reshard.py PHASE
SHARDS OUT`, one process group per phase, several Trainers in it.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tests.engine.test_train_distributed import finish, losses, torchrun

SAVED, RESUMED = 2, 4  # the checkpoint's step; the step the resumed runs train to
BATCH = 12  # global: divides into world sizes 1, 2 and 3
CASES = {"zero0": (0, "adamw"), "zero1": (1, "adamw"), "zero2": (2, "adamw"), "zero3": (3, "adamw"),
         "bf16": (2, "adamw", "deepspeed.precision=bf16"),
         "zero0_lars": (0, "lars"), "zero1_lars": (1, "lars"), "zero2_lars": (2, "lars"), "zero3_lars": (3, "lars"),
         "sgd0": (3, "sgd", "optimizer.momentum=0"),  # SGD without momentum keeps no state at all
         "zero2_sgd": (2, "sgd")}
STATE = {"adamw": ("exp_avg", "exp_avg_sq"), "lars": ("momentum_buffer",), "sgd": ("momentum_buffer",)}
GROUP = {"adamw": ("weight_decay", "eps", "betas"), "lars": ("weight_decay", "momentum", "trust_coefficient", "lars"),
         "sgd": ("weight_decay", "momentum", "dampening")}
# resumed at world size 1 only: not worth 3 more ranks building an engine on 2 cores
ONE_ONLY = ("bf16", "sgd0", "zero2_sgd")
SHARDED = [case for case, (stage, *_) in CASES.items() if stage and case not in ONE_ONLY]
WORLDS = {"one": 1, "three": 3}  # the phases that resume, and their world sizes


def cfg_for(shards: str, run_dir: Path, steps: int, stage: int, optimizer: str, *extra: str):
    from pipeline.config.compose import load

    return load("train", ["experiment=smoke", "method=aag", "method.proj_hidden_dim=64", f"deepspeed=zero{stage}",
                          f"data.root={shards}", f"run_dir={run_dir}", f"max_steps={steps}",
                          f"data.batch_size={BATCH}", f"optimizer={optimizer}", "optimizer.lr=2e-3",
                          "schedule=warmup_constant", "schedule.warmup_epochs=0", "logger=none",
                          "logger.log_every_steps=1", "logger.progress_bar=false", "logger.image_every_steps=0",
                          "monitor.knn_every_epochs=0", "checkpoint.every_steps=0", *extra])


def state_keys(case: str) -> tuple[str, ...]:
    """The optimizer's tensors per parameter in `case`."""
    return () if case == "sgd0" else STATE[CASES[case][1]]


def full_state(trainer, case: str) -> dict:
    """Every parameter's fp32 master copy and optimizer state, gathered whole (collective under ZeRO 3), the buffers,
    the schedule's learning rate, each param group's settings and Adam's step count. Under ZeRO 0 the parameters are
    the fp32 masters and the optimizer is torch's."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer_name, optimizer = CASES[case][1], trainer.engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):  # ZeRO 1/2 link the moments to the parameters at the
        # first step, right after the first param group's update: before the later groups have any. Link them now.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    unsharded = trainer.engine.zero_optimization_stage() == 0
    inner = optimizer if unsharded else optimizer.optimizer  # torch's: each param group's settings, the step count
    out = {"lr": torch.tensor(trainer.schedule.get_last_lr()),
           "groups": torch.tensor([[float(x) for k in GROUP[optimizer_name] for x in torch.tensor(g[k]).view(-1)]
                                   for g in inner.param_groups])}
    for names in {",".join(sorted(state)) for state in inner.state.values()}:  # compared as keys: the same names
        out[f"state names: {names}"] = torch.tensor(1)
    if optimizer_name == "adamw":
        out["steps"] = torch.tensor(sorted({float(s["step"]) for s in inner.state.values()}))
    for name, p in trainer.engine.module.named_parameters():
        out[name] = p.detach().clone() if unsharded else safe_get_full_fp32_param(p)
        for key in state_keys(case):
            out[f"{name}/{key}"] = (optimizer.state[p][key].clone() if unsharded
                                    else safe_get_full_optimizer_state(p, key))
    out.update({f"buffer/{n}": b.clone() for n, b in trainer.engine.module.named_buffers()})
    return out


def keep(state: dict, path: Path) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(state, path)


def worker(phase: str, shards: str, out: str) -> None:
    import torch.distributed as dist

    from pipeline.engine.trainer import Trainer

    out = Path(out)
    for case, (stage, optimizer, *extra) in CASES.items():
        run_dir = out / phase / case
        if phase == "two":  # train and checkpoint; keep the state it saved
            trainer = Trainer(cfg_for(shards, run_dir, SAVED, stage, optimizer, *extra))
            assert trainer.run() == "done"
            keep(full_state(trainer, case), run_dir / "saved.pt")
        elif phase == "three" and case in ONE_ONLY:
            continue
        else:  # resume at this world size (max_steps raised: forced); keep the state it resumed with, then train on
            trainer = Trainer(cfg_for(shards, run_dir, RESUMED, stage, optimizer, *extra, "checkpoint.resume=force"))
            assert trainer.step == SAVED
            if stage:
                keep(full_state(trainer, case), run_dir / "resumed.pt")
            assert trainer.run() == "done"
    dist.barrier()


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    finish(torchrun([__file__, "two", shards, str(out)], nproc=2))
    for phase in WORLDS:
        shutil.copytree(out / "two", out / phase)
    # what a conversion killed half-way leaves: the resume must redo it
    (out / "one/zero1/checkpoints/step000000002/.universal-tmp/universal").mkdir(parents=True)
    resumes = [torchrun([__file__, phase, shards, str(out)], nproc=world) for phase, world in WORLDS.items()]
    for proc in resumes:
        finish(proc)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("case", "phase"), [(case, phase) for case in SHARDED for phase in WORLDS]
                         + [(case, "one") for case in ONE_ONLY])
def test_a_zero_checkpoint_resumes_at_another_world_size_with_the_same_state(runs, case, phase):
    """2 ranks -> 1 and 2 ranks -> 3 for ZeRO 1, 2 and 3 with AdamW and with LARS; 2 -> 1 for ZeRO 2 in bf16, for
    ZeRO 3 with SGD without momentum (no optimizer state: only the weights travel) and for ZeRO 2 with SGD with
    momentum (torch's SGD keeps LARS's state name, `momentum_buffer`)."""
    run_dir = runs / phase / case
    saved = torch.load(runs / "two" / case / "saved.pt", weights_only=True)
    resumed = torch.load(run_dir / "resumed.pt", weights_only=True)
    assert sorted(resumed) == sorted(saved)
    optimizer = CASES[case][1]
    names = sorted(state_keys(case) + ("step",) * (optimizer == "adamw"))
    assert [k for k in saved if k.startswith("state names")] == ([f"state names: {','.join(names)}"] if names else [])
    for key, value in saved.items():
        assert value is not None, key
        assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    tag = run_dir / "checkpoints" / f"step{SAVED:09d}"
    assert (tag / "universal" / "zero").is_dir() and not (tag / ".universal-tmp").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples"]) for r in records] == [(s, BATCH * s) for s in range(1, RESUMED + 1)]
    assert sorted(losses(run_dir)) == list(range(1, RESUMED + 1))
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"


@pytest.mark.slow
@pytest.mark.parametrize("phase", WORLDS)
@pytest.mark.parametrize("case", SHARDED)
def test_the_resumed_run_computes_the_losses_of_an_unsharded_one(runs, case, phase):
    """The ZeRO 0 run with the same optimizer holds the same weights at the checkpoint and resumes without a
    conversion: after the conversion, the sharded run's next losses at this world size are its losses."""
    unsharded = "zero0" if CASES[case][1] == "adamw" else "zero0_lars"
    reference = torch.load(runs / "two" / unsharded / "saved.pt", weights_only=True)
    saved = torch.load(runs / "two" / case / "saved.pt", weights_only=True)
    for key, value in reference.items():  # the same weights, optimizer state and buffers at the checkpoint. LARS's
        # momentum is the undamped sum of the gradients (Adam's first moment carries a tenth of each), so the order in
        # which ZeRO reduces them shows 10x larger there: measured up to 2.4e-6 on values near 0.03, and 1.8e-6 on
        # the rounding noise that is the gradient of a bias followed by BatchNorm
        momentum = key.endswith("momentum_buffer")
        assert_close(saved[key], value, rtol=1e-4 if momentum else 0, atol=5e-6 if momentum else 1e-6,
                     msg=lambda m, key=key: f"{key}: {m}")
    expected, got = losses(runs / phase / unsharded), losses(runs / phase / case)
    assert sorted(got) == sorted(expected) == list(range(1, RESUMED + 1))
    for step in range(SAVED + 1, RESUMED + 1):
        assert abs(got[step] - expected[step]) <= 1e-5, (step, got[step], expected[step])


@pytest.mark.slow
@pytest.mark.parametrize("phase", WORLDS)
@pytest.mark.parametrize("case", ["zero0", "zero0_lars"])
def test_an_unsharded_checkpoint_resumes_at_another_world_size_as_it_is(runs, case, phase):
    """ZeRO 0 holds whole parameters: no conversion, and the data position continues over the new ranks."""
    run_dir = runs / phase / case
    assert not (run_dir / "checkpoints" / f"step{SAVED:09d}" / "universal").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples"]) for r in records] == [(s, BATCH * s) for s in range(1, RESUMED + 1)]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_deepspeed_alone_still_cannot_convert_lars_state(runs, tmp_path):
    """The reason for pipeline/engine/universal_state.py (deepspeed#8608). When a DeepSpeed upgrade makes this fail,
    its converter reads the state names itself: the renaming can go."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(input_folder=str(runs / "two" / "zero2_lars" / "checkpoints" / f"step{SAVED:09d}"),
                     output_folder=str(tmp_path / "universal"), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    with pytest.raises(KeyError, match="exp_avg"):
        ds_to_universal.main(args)


def test_only_an_optimizer_with_more_than_two_tensors_per_parameter_is_refused():
    from pipeline.engine.universal_state import renaming

    assert renaming(["exp_avg", "exp_avg_sq"]) is None  # Adam's: converted as they are
    assert renaming(["momentum_buffer"]) == {"momentum_buffer": "exp_avg"}
    assert renaming([]) == {}
    with pytest.raises(ValueError, match="keeps 3 tensors per parameter .a, b, c.; DeepSpeed 0.19.8's universal"):
        renaming(["a", "b", "c"])


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
    error, room = Checkpoints(tmp_path, {})._convert(folder)
    assert "killed half-way" in error and not room
    assert sorted(p.name for p in folder.iterdir()) == ["mp_rank_00_model_states.pt"]
    assert not (folder / UNIVERSAL).exists()


def test_a_conversion_that_runs_out_of_room_is_storage_full_keeping_the_checkpoint(tmp_path, monkeypatch):
    """No room for the universal copy: the resume ends with exit 5's one line (make room, re-run), not a traceback."""
    import errno

    from deepspeed.checkpoint import ds_to_universal

    from pipeline.engine.checkpoint import Checkpoints, StorageFull

    folder = tmp_path / "checkpoints" / "step000000002"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"saved")

    def full(args):
        raise RuntimeError("write failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ds_to_universal, "main", full)
    with pytest.raises(StorageFull, match=r"step000000002 for another world size needs about its size again on .*: "
                                          r"no space left on device; the checkpoint is kept; free space and re-run"):
        Checkpoints(tmp_path, {}).universal("step000000002")
    assert sorted(p.name for p in folder.iterdir()) == ["mp_rank_00_model_states.pt"]


if __name__ == "__main__":
    worker(*sys.argv[1:4])
