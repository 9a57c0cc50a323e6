"""The trained encoder as one safetensors file that loads without DeepSpeed (and without running any code).

Export works from every ZeRO stage: under ZeRO 3 each rank holds a slice of every parameter, so the encoder's
parameters are gathered (collectively, on all ranks) before rank 0 writes them; buffers (BatchNorm statistics) are
never partitioned. Tensors are stored in float32 whatever the training precision. The architecture travels in the
file's metadata, so `load_encoder(path)` rebuilds the right ResNet:

    encoder = load_encoder("runs/cifar10_aasae/encoder.safetensors")    # a pipeline.models.ResNet, eval mode
    features = encoder(images)                                          # (N, encoder.out_dim)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from pipeline.models.resnet import ResNet

FORMAT = "augssl-encoder/1"


def encoder_state(encoder: ResNet, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full float32 copies of the encoder's parameters and buffers. Collective under ZeRO 3: call on every rank."""
    import deepspeed

    params = list(encoder.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage == 3):
        state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                 for k, v in encoder.state_dict().items()}
    return state


def save_encoder(state: dict[str, torch.Tensor], encoder: ResNet, path: str | os.PathLike, **metadata) -> Path:
    """Write `state` atomically (temporary file, then rename) with the architecture in the metadata. Python writes the
    bytes, so that a failed write (a full disk) raises OSError with its errno, not safetensors' own error."""
    path = Path(path)
    meta = {"format": FORMAT, "arch": encoder.arch, "stem": encoder.stem, "width": str(encoder.width),
            "out_dim": str(encoder.out_dim), **{k: str(v) for k, v in metadata.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(save({k: v.contiguous() for k, v in state.items()}, metadata=meta))
    tmp.replace(path)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's metadata; ValueError when it is not an encoder export (damaged, or another safetensors file)."""
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path} is not an exported augssl encoder (unreadable: {err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an exported augssl encoder (format {meta.get('format')!r})")
    return meta


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> ResNet:
    """Rebuild the ResNet described in the file's metadata and load its weights (strict); returns it in eval mode."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    encoder = ResNet(meta["arch"], stem=meta["stem"], width=int(meta["width"]))
    encoder.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return encoder.to(device).eval()
