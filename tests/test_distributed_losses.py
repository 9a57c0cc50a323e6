"""World size 2 (torchrun, gloo) against one process on the concatenated batch.

What must hold (pipeline/distributed.py explains why):
- contrastive losses: every rank's loss equals the single-process loss; the gradient reaching rank r's own
  embeddings is world_size times the single-process gradient of that slice (every rank back-propagates the full
  global loss), so that
- after DDP's averaging, every rank's parameter gradients equal the single-process ones, for every method;
- AASAE (no gather): each rank's loss is its local mean, and the mean over ranks equals the single-process loss;
- a gather of unequal shares (a feature bank's) is their concatenation in rank order.
The kNN monitor's sharded bank has its own test: tests/evaluation/test_knn_sharded.py.
"""


import pytest
import torch
from torch.testing import assert_close

from pipeline.losses import LOSSES
from tests.helpers import dist_worker as w
from tests.helpers.torchrun import run_ranks

pytestmark = pytest.mark.slow
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_ranks(w.__file__, WORLD, str(out), timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("loss_name", sorted(w.CONTRASTIVE))
def test_contrastive_loss_and_embedding_gradients(ranks, loss_name):
    parts = [e.clone().requires_grad_() for e in w.embeddings()[: w.CONTRASTIVE[loss_name]]]
    loss = LOSSES[loss_name](*parts, temperature=0.1)
    loss.backward()
    grad = torch.stack([p.grad for p in parts])
    n = w.GLOBAL_BATCH // WORLD
    for r, result in enumerate(ranks):
        assert_close(result[loss_name]["loss"], loss.detach())
        assert_close(result[loss_name]["grad"], WORLD * grad[:, r * n : (r + 1) * n])


@pytest.mark.parametrize("name", w.METHOD_NAMES)
def test_method_loss_and_ddp_averaged_gradients(ranks, name):
    model = w.method(name)
    loss, _ = model(w.views(name))
    loss.backward()
    if name == "aasae":
        assert_close(sum(r[name]["loss"] for r in ranks) / WORLD, loss.detach())
    else:
        for result in ranks:
            assert_close(result[name]["loss"], loss.detach())
    expected = {k: p.grad for k, p in model.named_parameters()}
    for result in ranks:
        assert result[name]["grads"].keys() == expected.keys()
        for k, g in expected.items():
            assert_close(result[name]["grads"][k], g, msg=lambda m: f"{name} {k}: {m}")


def test_uneven_gather(ranks):
    for result in ranks:
        assert_close(result["bank"], w.bank())
