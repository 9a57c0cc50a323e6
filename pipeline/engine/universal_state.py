"""Carry any optimizer's per-parameter state through DeepSpeed's universal checkpoints, not only Adam's.

DeepSpeed 0.19.8's converter (`ds_to_universal`) copies a ZeRO checkpoint's optimizer state only under Adam's names,
`exp_avg` and `exp_avg_sq` (KeyError for anything else), and its ZeRO 3 universal loader reads exactly those two and
a `step` count (deepspeed#8608). SGD's and LARS's `momentum_buffer` could therefore not change world size. Until the
pinned DeepSpeed reads the names from the checkpoint, the state travels under Adam's names:

- `stage`: before the conversion, a staging copy of the checkpoint (model files linked, optimizer files rewritten)
  holds each per-parameter state under Adam's two names (an unused one zero-filled) with a `step` count where it has
  none; `state_names.json`, written into the converted folder, records the renaming.
- `restore_names`: after the universal load, each state gets its own names back and loses what was added.

Adam's own checkpoints need neither: `stage` returns None for them and the converter reads the checkpoint itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.engine.safe_load import safe_load, torch_save

SLOTS = ("exp_avg", "exp_avg_sq")  # the per-parameter state names DeepSpeed 0.19.8's converter and loader know
STEP = "step"
NAMES_FILE = "state_names.json"  # in <tag>/universal/: {"names": {own name: slot}, "added": [names to drop]}


def _state_and_sizes(optim_sd: dict) -> tuple[dict, list[int]]:
    """The torch optimizer state dict inside one rank's `*_optim_states.pt`, and the length of a per-parameter state
    tensor of each of its param groups: ZeRO 1/2 keep `base_optimizer_state`, whose tensors hold the group's padding
    (which the converter strips) while `single_partition_of_fp32_groups` does not; ZeRO 3 keeps
    `optimizer_state_dict` and `fp32_flat_groups`, without padding."""
    inner = optim_sd["optimizer_state_dict"]
    if "base_optimizer_state" in inner:
        flats, paddings = inner["single_partition_of_fp32_groups"], inner["group_paddings"]
        return inner["base_optimizer_state"], [f.numel() + pad for f, pad in zip(flats, paddings, strict=True)]
    return inner["optimizer_state_dict"], [f.numel() for f in inner["fp32_flat_groups"]]


def own_names(state: dict) -> list[str]:
    """The tensor-valued per-parameter state names besides the step count, sorted."""
    return sorted(k for k, v in state.items() if k != STEP and torch.is_tensor(v))


def renaming(names: list[str]) -> dict[str, str] | None:
    """Own name -> Adam's slot for a state with these names; None when they are Adam's own."""
    if tuple(names) == SLOTS:
        return None
    if len(names) > len(SLOTS):
        raise ValueError(f"the optimizer keeps {len(names)} tensors per parameter ({', '.join(names)}); DeepSpeed "
                         f"0.19.8's universal checkpoints carry at most {len(SLOTS)}")
    return dict(zip(names, SLOTS))


def stage(folder: Path, staging: Path) -> dict | None:
    """Write into `staging` a copy of checkpoint `folder` whose optimizer state is under Adam's names; returns the
    record for NAMES_FILE, or None (and writes nothing) when the state already is Adam's. A state with no tensors
    (SGD without momentum keeps none) gets both slots zero-filled, as the converter reads them for every group."""
    optim_files = sorted(folder.glob("*_optim_states.pt"))
    if not optim_files:
        return None
    sd = safe_load(str(optim_files[0]), "cpu")
    states = _state_and_sizes(sd)[0]["state"]
    names = own_names(next(iter(states.values()))) if states else []
    mapping = renaming(names)
    if mapping is None:
        return None
    added = [slot for slot in SLOTS if slot not in mapping.values()]
    if not states or not all(STEP in s for s in states.values()):
        added.append(STEP)
    staging.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file() and path not in optim_files:
            os.symlink(path.resolve(), staging / path.name)
    for path in optim_files:
        sd = sd if path == optim_files[0] else safe_load(str(path), "cpu")
        torch_sd, sizes = _state_and_sizes(sd)
        for index, size in enumerate(sizes):  # one state per group (ZeRO 1/2) or sub-group (ZeRO 3)
            state = torch_sd["state"].setdefault(index, {})
            if own_names(state) != names:
                raise ValueError(f"{path.name}: param group {index} keeps {own_names(state)}, group 0 {names}")
            state.update(_moved(state, mapping))
            for name in added:
                state[name] = torch.tensor(0.0) if name == STEP else torch.zeros(size)
        torch_save(sd, staging / path.name)
    return {"names": mapping, "added": added}


def write_names(universal: Path, record: dict) -> None:
    (universal / NAMES_FILE).write_text(json.dumps(record, indent=1))


def restore_names(engine, universal: Path) -> None:
    """After a universal load: give the optimizer's state its own names back (also in the views ZeRO 1/2 keep per
    parameter for DeepSpeed's safe_get_full_optimizer_state) and drop the slots and step count that were added, and
    with them a state left empty (as the optimizer had it: none)."""
    path = universal / NAMES_FILE
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    back = {slot: name for name, slot in record["names"].items()}
    state = engine.optimizer.optimizer.state
    for key in list(state):
        _restore(state[key], back, record["added"])
        if not state[key]:
            del state[key]
    for p in engine.module.parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None and mapping.optim_fragment:
            _restore(mapping.optim_fragment, back, record["added"])


def _moved(state: dict, renamed: dict[str, str]) -> dict:
    """The entries of `state` named in `renamed`, taken out of it under their new names (all taken out first, so that
    a name that is also another's new name is not overwritten)."""
    taken = {name: state.pop(name) for name in renamed if name in state}
    return {renamed[name]: value for name, value in taken.items()}


def _restore(state: dict, back: dict[str, str], added: list[str]) -> None:
    for name in added:
        state.pop(name, None)
    state.update(_moved(state, back))
