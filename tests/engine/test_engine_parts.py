"""The engine's pure parts in one process: schedules, the DeepSpeed config, batch geometry, parameter groups,
run-dir ownership, checkpoint verification and the weights-only loader."""

import json
import math
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pipeline.config.compose import ConfigError, load
from pipeline.config.schema import DeepSpeedConfig
from pipeline.engine.checkpoint import MARKER, Checkpoints, RunDirError
from pipeline.engine.deepspeed_engine import BatchGeometry
from pipeline.engine.ds_config import build_ds_config
from pipeline.engine.optimizers import build_optimizer, param_groups
from pipeline.engine.safe_load import safe_load
from pipeline.engine.schedule import WarmupSchedule


def optimizer(lr=1.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_then_cosine_and_constant():
    opt = optimizer(2.0)
    s = WarmupSchedule(opt, "cosine", total_steps=10, warmup_steps=4, warmup_start_factor=0.0, final_factor=0.1)
    lrs = [s.get_last_lr()[0]]
    for _ in range(10):
        s.step()
        lrs.append(s.get_last_lr()[0])
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[4] == pytest.approx(2.0) and lrs[10] == pytest.approx(0.2)
    assert lrs[7] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6))))
    constant = WarmupSchedule(optimizer(3.0), "constant", total_steps=5, warmup_steps=2)
    for _ in range(4):
        constant.step()
    assert constant.get_last_lr() == [3.0]


def test_schedule_state_round_trips():
    a = WarmupSchedule(optimizer(), "cosine", 100, 10)
    for _ in range(37):
        a.step()
    b = WarmupSchedule(optimizer(), "cosine", 100, 10)
    b.load_state_dict(a.state_dict())
    assert b.get_last_lr() == a.get_last_lr() and b.last_step == 37
    with pytest.raises(ValueError, match="choose from"):
        WarmupSchedule(optimizer(), "linear", 10, 1)


def ds(**kwargs):
    return OmegaConf.structured(DeepSpeedConfig(**kwargs))


def test_deepspeed_config():
    conf = build_ds_config(ds(zero_stage=2, precision="bf16", grad_accum_steps=4), micro_batch=8, world_size=16)
    assert conf["train_batch_size"] == 8 * 4 * 16 and conf["gradient_accumulation_steps"] == 4
    assert conf["zero_optimization"]["stage"] == 2 and conf["zero_allow_untested_optimizer"] is True
    # bf16 is autocast over an fp32 module (fp32 BatchNorm statistics), not DeepSpeed's bf16 cast of the module
    assert conf["torch_autocast"] == {"enabled": True, "dtype": "bf16"} and "bf16" not in conf
    assert "data_types" not in conf and "communication_data_type" not in conf
    lars = build_ds_config(ds(zero_stage=2, precision="bf16"), 8, 2, fp32_gradients=True)
    assert lars["torch_autocast"]["lower_precision_safe_modules"] == [] and lars["communication_data_type"] == "fp32"
    fp16 = build_ds_config(ds(zero_stage=1, precision="fp16"), 8, 2, fp32_gradients=True)
    assert fp16["fp16"]["enabled"] and fp16["data_types"] == {"buffer_dtype": "fp16"} and "torch_autocast" not in fp16
    assert "communication_data_type" not in fp16  # untestable on the CPU: DeepSpeed's default stands
    assert not {"data_types", "torch_autocast", "bf16", "fp16"} & build_ds_config(ds(), 8, 1).keys()
    offload = build_ds_config(ds(zero_stage=3, offload_optimizer=True, offload_params=True), 8, 2)
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert offload["zero_force_ds_cpu_optimizer"] is False
    extra = build_ds_config(ds(zero_stage=1, extra={"zero_optimization": {"round_robin_gradients": True}}), 8, 2)
    assert extra["zero_optimization"] == {**extra["zero_optimization"], "stage": 1, "round_robin_gradients": True}
    load("train", ["optimizer=lars", "optimizer.lr=1", "deepspeed.precision=bf16"])  # autocast: no stage-0 wrapper
    for bad, message in [(["deepspeed.zero_stage=4"], "zero_stage=4: must be between 0 and 3"),
                         (["deepspeed.precision=fp8"], "'deepspeed.precision'"),
                         (["deepspeed.offload_optimizer=true"], "needs deepspeed.zero_stage >= 1"),
                         (["deepspeed.zero_stage=2", "deepspeed.offload_params=true"], "needs deepspeed.zero_stage 3"),
                         (["optimizer=lars", "optimizer.lr=1", "deepspeed.precision=fp16"], "LARS with fp16")]:
        with pytest.raises(ConfigError, match=message):
            load("train", bad)


def test_batch_geometry():
    assert BatchGeometry(256, 8, 2).check().micro_batch == 16
    with pytest.raises(ValueError, match="not a multiple of world size 3"):
        BatchGeometry(256, 3, 1).check()


def test_bias_and_norm_parameters_are_excluded_from_decay_and_adaptation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = param_groups(model, 0.1, exclude_bias_and_norm=True)
    assert [len(g["params"]) for g in groups] == [2, 4]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars"] is False
    lars = build_optimizer(load("train", ["optimizer=lars"]).optimizer, model)
    assert [g["lars"] for g in lars.param_groups] == [True, False]
    sgd = build_optimizer(load("train", ["optimizer=sgd"]).optimizer, model)
    assert [g["weight_decay"] for g in sgd.param_groups] == [5e-4, 0.0]


def test_a_run_dir_of_another_experiment_is_refused(tmp_path):
    Checkpoints(tmp_path, {"experiment_name": "a", "method.name": "aasae"}).claim()
    Checkpoints(tmp_path, {"experiment_name": "a", "method.name": "aasae"}).claim()  # the same: accepted
    with pytest.raises(RunDirError, match='other settings.*experiment_name="a" there, "b" now; method.name="aasae" '
                                          'there, "aag" now'):
        Checkpoints(tmp_path, {"experiment_name": "b", "method.name": "aag"}).claim()
    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "step000000010").mkdir(parents=True)
    (foreign / "checkpoints" / "step000000010" / MARKER).write_text("{}")
    with pytest.raises(RunDirError, match="no experiment.json"):
        Checkpoints(foreign, {"experiment_name": "a"}).claim()


def test_a_run_dir_that_cannot_be_one_is_refused_naming_why(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="run_dir=.*file: is a file, not a folder"):
        Checkpoints(tmp_path / "file", {"experiment_name": "a"}).claim()
    with pytest.raises(RunDirError, match="cannot be used"):
        Checkpoints(tmp_path / "file" / "below", {"experiment_name": "a"}).claim()
    for damage in ("{not json", "[1, 2]"):
        (tmp_path / "damaged").mkdir(exist_ok=True)
        (tmp_path / "damaged" / "experiment.json").write_text(damage)
        with pytest.raises(RunDirError, match="experiment.json is damaged.*repair or remove it"):
            Checkpoints(tmp_path / "damaged", {"experiment_name": "a"}).claim()


def test_verification_catches_truncated_corrupt_and_missing_files(tmp_path):
    ckpt = Checkpoints(tmp_path, {})
    folder = ckpt.dir / "step000000004"
    folder.mkdir(parents=True)
    torch.save({"w": torch.arange(10000.0)}, folder / "model.pt")
    size = (folder / "model.pt").stat().st_size
    (folder / MARKER).write_text(json.dumps({"step": 4, "world_size": 1, "zero_stage": 0,
                                             "files": {"model.pt": size}}))
    assert ckpt.verify("step000000004") is None and ckpt.complete_tags() == ["step000000004"]
    data = bytearray((folder / "model.pt").read_bytes())
    data[size // 2] ^= 0xFF
    (folder / "model.pt").write_bytes(bytes(data))
    assert "fails its CRC check" in ckpt.verify("step000000004")
    (folder / "model.pt").write_bytes(bytes(data[: size - 100]))
    assert "bytes, " in ckpt.verify("step000000004")
    (folder / "model.pt").unlink()
    assert "missing" in ckpt.verify("step000000004")
    (tmp_path / "checkpoints" / "step000000008").mkdir()  # no marker: an interrupted save, not listed
    assert ckpt.complete_tags() == ["step000000004"]


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoints_load_weights_only(tmp_path):
    torch.save({"w": torch.ones(2), "step": 3, "rng": (3, (1, 2), None)}, tmp_path / "ok.pt")
    assert safe_load(str(tmp_path / "ok.pt"))["step"] == 3
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        safe_load(str(tmp_path / "evil.pt"))


def test_the_gpu_preset_overlaps_gradient_reduction_with_backward_in_resnet50_sized_buckets():
    from pipeline.config.compose import load

    cfg = load("train", ["experiment=imagenet_aag"])
    zero = build_ds_config(cfg.deepspeed, micro_batch=64, world_size=8)["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True
    assert 2 <= 25_557_032 / zero["reduce_bucket_size"] <= 8  # ResNet-50's parameters: a few buckets


def test_image_grid_labels_each_row_beside_its_images():
    """What W&B shows: each row's images un-normalised, exactly, right of a margin holding the row's label."""
    from pipeline.engine.run_logger import image_grid

    torch.manual_seed(0)
    rows = {"original": torch.rand(3, 3, 8, 8) * 2 - 1, "reconstruction": torch.rand(3, 3, 8, 8) * 2 - 1}
    grid = image_grid(rows, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    margin = grid.shape[1] - 3 * 8
    assert grid.shape == (16, margin + 24, 3) and grid.dtype == np.uint8
    for i, images in enumerate(rows.values()):
        expected = ((images * 0.5 + 0.5) * 255).round().to(torch.uint8)
        assert np.array_equal(grid[8 * i:8 * (i + 1), margin:margin + 8], expected[0].permute(1, 2, 0).numpy())
        assert grid[8 * i:8 * (i + 1), :margin].min() < 128  # dark text on the white margin
