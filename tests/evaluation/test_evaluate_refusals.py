"""What a user can get wrong when evaluating stops `python -m pipeline.evaluate` with one line and its exit code
(docs/exit-codes.md), before the features are extracted where it can be known then: a damaged encoder file, a run
dir whose config.yaml is not one (also when the command line gives the data), no protocol, an output folder that is
not there, a k larger than the bank; and shards that differ from their manifest exit 4 (BAD_DATA), as in training."""

import json
import re
import shutil

import pytest
import torch

from pipeline.engine.export import save_encoder
from pipeline.models.resnet import ResNet
from tests.config.test_config_checks import run_entries


@pytest.fixture(scope="module")
def reports(shards, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("evaluate-refusals")
    encoder = ResNet("resnet_small", stem="cifar")
    (tmp / "good").mkdir()
    good = save_encoder(encoder.state_dict(), encoder, tmp / "good" / "encoder.safetensors", step=1)
    (tmp / "damaged").mkdir()
    (tmp / "damaged" / "encoder.safetensors").write_bytes(torch.randint(0, 256, (999,), dtype=torch.uint8).numpy())
    run = tmp / "run"
    shutil.copytree(tmp / "good", run)
    (run / "config.yaml").write_text("data: [unclosed\n")
    null_data = tmp / "null-data"
    shutil.copytree(tmp / "good", null_data)
    (null_data / "config.yaml").write_text("data: null\n")
    mismatch = tmp / "mismatch"
    shutil.copytree(shards, mismatch)
    manifest = json.loads((mismatch / "digits-train.manifest.json").read_text())
    manifest["shards"][0]["samples"] -= 1
    (mismatch / "digits-train.manifest.json").write_text(json.dumps(manifest))
    data = ["data=digits", f"data.root={shards}", "linear.epochs=1"]
    cases = {"damaged encoder": [f"encoder={tmp}/damaged", *data],
             "run config": [f"encoder={run}"],
             "run config, data given": [f"encoder={run}", *data],  # its W&B settings are still read from it
             "run data null": [f"encoder={null_data}"],
             "output is a folder": [f"encoder={good}", *data, f"output={tmp}"],
             "no protocol": [f"encoder={good}", *data, "protocols=[]"],
             "output folder": [f"encoder={good}", *data, f"output={tmp}/no/such/out.json"],
             "k above bank": [f"encoder={good}", *data, "knn_k=100000"],
             "shard mismatch": [f"encoder={good}", "data=digits", f"data.root={mismatch}", "linear.epochs=1"]}
    return run_entries([{"name": name, "module": "pipeline.evaluate", "args": args} for name, args in cases.items()],
                       tmp)


@pytest.mark.parametrize(("case", "code", "says"), [
    ("damaged encoder", 2, r"damaged/encoder.safetensors is not an exported augssl encoder \(unreadable: .*\)"),
    ("run config", 2, r"run dir .*/run: config.yaml cannot be read: "),
    ("run config, data given", 2, r"run dir .*/run: config.yaml cannot be read: "),
    ("run data null", 2, r"run dir .*/null-data: config.yaml cannot be read: it has no data settings"),
    ("output is a folder", 2, r"output=.*: is a folder; name the JSON file to write"),
    ("no protocol", 2, r"protocols=\[\]: name at least one of knn, linear"),
    ("output folder", 2, r"output=.*/no/such/out.json: no folder .*/no/such"),
    ("k above bank", 2, r"knn_k=100000: the bank \(data.bank_split=train\) holds only 1438 samples; set knn_k to "
                        r"at most 1438, or protocols=\[linear\]"),
    ("shard mismatch", 4, r"digits-train-000000.tar holds \d+ samples by its index, the manifest says \d+"),
])
def test_a_bad_evaluation_is_one_line_and_its_exit_code(reports, case, code, says):
    report = reports[case]
    lines = report["stderr"].splitlines()
    assert (report["code"], report["exit_file"]) == (code, str(code)), report
    assert len(lines) == 1 and lines[0].startswith("pipeline.evaluate: "), report["stderr"]
    assert re.search(says, lines[0]), lines[0]
