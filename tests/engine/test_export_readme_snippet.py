"""The README's snippet that loads `encoder.safetensors` with torch + safetensors alone, run exactly as written.

torchvision is not a dependency of augssl, so where it is not installed the snippet's `torchvision.models.resnet50`
is this project's ResNet-50 with the ImageNet stem; the first test shows the export's keys are torchvision's
resnet50 keys less `fc` (its layout written out from torchvision's source), so the stand-in loads what torchvision
would.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import torch

from pipeline.engine.export import save_encoder
from pipeline.models.resnet import ResNet

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_snippet() -> str:
    """The python block of the README section "The encoder outside augssl"."""
    section = README.read_text().split("### The encoder outside augssl", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def torchvision_resnet50_keys() -> set[str]:
    """torchvision.models.resnet50().state_dict() keys: stem conv1/bn1, Bottlenecks [3, 4, 6, 3] with conv1-3 and
    bn1-3, a conv+BN `downsample` in each stage's first block, and the classifier `fc`."""
    def bn(prefix: str) -> list[str]:
        return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    keys = ["conv1.weight", *bn("bn1"), "fc.weight", "fc.bias"]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            for i in (1, 2, 3):
                keys += [f"{p}.conv{i}.weight", *bn(f"{p}.bn{i}")]
            if b == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return set(keys)


def test_the_export_of_an_imagenet_resnet50_has_torchvisions_keys_less_fc():
    exported = set(ResNet("resnet50", stem="imagenet").state_dict())
    assert exported == torchvision_resnet50_keys() - {"fc.weight", "fc.bias"}


def test_the_readme_snippet_loads_the_exported_encoder_and_gives_its_features(tmp_path, monkeypatch):
    torch.manual_seed(0)
    trained = ResNet("resnet50", stem="imagenet")
    with torch.no_grad():  # BatchNorm statistics unlike a fresh model's, so a load that skipped them would show
        for m in trained.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    run = tmp_path / "runs" / "imagenet_aasae"
    run.mkdir(parents=True)
    save_encoder(trained.state_dict(), trained, run / "encoder.safetensors")
    monkeypatch.chdir(tmp_path)
    if importlib.util.find_spec("torchvision") is None:
        torchvision = types.ModuleType("torchvision")
        torchvision.models = types.SimpleNamespace(resnet50=lambda: ResNet("resnet50", stem="imagenet"))
        monkeypatch.setitem(sys.modules, "torchvision", torchvision)

    namespace: dict = {}
    exec(readme_snippet(), namespace)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = namespace["model"].eval()(images)
        expected = trained.eval()(images)
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, expected)
    assert "augssl" not in readme_snippet() and "pipeline" not in readme_snippet()
