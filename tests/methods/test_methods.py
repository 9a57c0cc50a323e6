"""The four methods behind the trainer contract: AASAE's loss terms and sampling, the registry, the online probe,
and that a few optimiser steps on a fixed batch lower each method's loss."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from pipeline.config.fields import problems
from pipeline.data.loading.augmentations import AUGMENTATIONS
from pipeline.methods import METHODS, build_method
from pipeline.methods.aag import AAG, SimCLR
from pipeline.methods.aasae import AASAE, VAE, AASAEConfig

SMALL = {"backbone": "resnet_small", "stem": "cifar"}
SMALL_AE = {**SMALL, "image_size": 32, "latent_dim": 16, "hidden_dim": 64}


def images(n=8, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def views_for(method, n=8, size=32):
    if isinstance(method, AASAE):
        return {"view": images(n, size, 1), "target": images(n, size, 2)}
    return {k: images(n, size, i) for i, k in enumerate(method.views)}


def mean_reconstruction(model, view):
    mu, logvar = model.projection(model.encoder(view))
    return mu, logvar, model.decoder(mu)


def test_registry_builds_each_method_by_name():
    assert set(METHODS) == {"aasae", "vae", "aag", "simclr"}
    for name, cls in [("aasae", AASAE), ("vae", VAE), ("aag", AAG), ("simclr", SimCLR)]:
        kwargs = SMALL_AE if name in ("aasae", "vae") else SMALL
        method = build_method(name, **kwargs)
        assert type(method) is cls and method.encoder.out_dim == 128
    with pytest.raises(KeyError):
        build_method("byol")


def test_baseline_defaults():
    assert build_method("aasae", **SMALL_AE).kl_weight == 0.0
    assert build_method("vae", **SMALL_AE).kl_weight == 0.1  # the official code's kl_coeff
    with pytest.raises(ValueError):
        build_method("vae", kl_weight=0.0, **SMALL_AE)
    aag, simclr = build_method("aag", **SMALL), build_method("simclr", **SMALL)
    assert (tuple(aag.views), aag.temperature, aag.loss_name) == (("u", "v", "w"), 0.1, "gnt_xent")
    assert (tuple(simclr.views), simclr.temperature, simclr.loss_name) == (("u", "v"), 0.5, "nt_xent")


def test_aasae_heads_are_as_wide_as_the_encoder_unless_configured():
    model = build_method("aasae", **{**SMALL_AE, "hidden_dim": 0})
    assert model.projection.mu.in_features == model.decoder.mlp[0].out_features == model.encoder.out_dim == 128
    assert build_method("aasae", **SMALL_AE).projection.mu.in_features == 64
    assert [problem.split(":")[0] for problem in problems(AASAEConfig(hidden_dim=100))] == ["hidden_dim=100"]
    assert problems(AASAEConfig()) == []


@pytest.mark.parametrize("name", ["aasae", "vae"])
def test_bn_on_original_changes_only_the_running_statistics(name):
    """The encoder's extra pass on the target moves BatchNorm's running statistics; loss and gradients stay."""
    results = []
    for bn_on_original in (False, True):
        torch.manual_seed(0)
        model = build_method(name, bn_on_original=bn_on_original, **SMALL_AE).train()
        views = views_for(model)
        torch.manual_seed(1)
        loss, _ = model(views)
        loss.backward()
        grads = [p.grad.clone() for p in model.encoder.parameters()]
        bn = model.encoder.bn1
        results.append((loss.detach(), grads, bn.running_mean.clone(), bn.num_batches_tracked))
    (loss_off, grads_off, mean_off, batches_off), (loss_on, grads_on, mean_on, batches_on) = results
    assert_close(loss_on, loss_off)
    for on, off in zip(grads_on, grads_off):
        assert_close(on, off)
    assert (batches_off, batches_on) == (1, 2)  # one more BatchNorm update: the target's
    assert not torch.allclose(mean_on, mean_off)


def test_missing_views_raise():
    with pytest.raises(KeyError):
        build_method("aag", **SMALL)({"u": images(), "v": images()})


def test_aag_loss_at_random_initialisation_is_near_the_all_equal_value():
    # A random network maps different images to nearly parallel embeddings, so all similarities are close to equal.
    torch.manual_seed(0)
    model = build_method("aag", **SMALL)
    n = 32
    with torch.no_grad():
        loss, _ = model(views_for(model, n=n))
    assert abs(loss.item() - (2 * math.log(3 * (n - 1)) + 4 * math.log(n - 1))) < 0.5


def test_aag_gathers_float32_projections_under_bf16_autocast(monkeypatch):
    """The bf16 engine's projections come out of autocast in bf16; the negatives are gathered in fp32 (N x 129)."""
    gathered = []

    def gather(x):
        gathered.append(x.dtype)
        return x

    monkeypatch.setattr("pipeline.methods.aag.gather_with_grad", gather)
    model = build_method("aag", **SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(views_for(model))
    assert gathered == [torch.float32] and loss.dtype == torch.float32


def test_aasae_loss_is_half_the_summed_squared_error_plus_the_constant():
    torch.manual_seed(0)
    model = build_method("aasae", **SMALL_AE).eval()
    views = views_for(model)
    loss, metrics = model(views)
    with torch.no_grad():
        _, _, recon = mean_reconstruction(model, views["view"])
    sse = (recon - views["target"]).pow(2).flatten(1).sum(1)
    expected = (0.5 * sse).mean() + 3 * 32 * 32 * 0.5 * math.log(2 * math.pi)
    assert_close(loss.detach(), expected)
    assert_close(metrics["nll"], expected)


def test_aasae_reconstructs_the_target_not_the_view():
    torch.manual_seed(0)
    model = build_method("aasae", **SMALL_AE).eval()
    views = views_for(model)
    loss, _ = model(views)
    loss_on_view, _ = model({"view": views["view"], "target": views["view"]})
    assert not torch.allclose(loss, loss_on_view)


def test_vae_kl_term_equals_its_closed_form():
    torch.manual_seed(0)
    beta = 0.5
    model = build_method("vae", kl_weight=beta, **SMALL_AE).eval()
    x = images()
    loss, metrics = model({"view": x, "target": x})
    with torch.no_grad():
        mu, logvar, _ = mean_reconstruction(model, x)
    std = torch.exp(logvar / 2) + 1e-6
    kl = (0.5 * (std**2 + mu**2 - 1) - torch.log(std)).sum(1).mean()
    assert_close(metrics["kl"], kl)
    assert_close(loss.detach(), metrics["nll"] + beta * kl)


def test_training_samples_z_with_the_documented_reparameterisation():
    torch.manual_seed(0)
    model = build_method("aasae", **SMALL_AE).train()
    views = views_for(model)
    torch.manual_seed(7)
    loss, _ = model(views)
    with torch.no_grad():
        mu, logvar = model.projection(model.encoder(views["view"]))
        torch.manual_seed(7)  # the forward draws nothing before eps
        z = mu + (torch.exp(logvar / 2) + 1e-6) * torch.randn_like(mu)
        sse = (model.decoder(z) - views["target"]).pow(2).flatten(1).sum(1)
    assert_close(loss.detach(), (0.5 * sse).mean() + 3 * 32 * 32 * 0.5 * math.log(2 * math.pi))


def test_sampling_is_deterministic_under_a_seed_and_the_mean_is_used_in_eval():
    torch.manual_seed(0)
    model = build_method("aasae", **SMALL_AE)
    views = views_for(model)

    def loss_with_seed(seed):
        torch.manual_seed(seed)
        return model(views)[0].detach()

    model.train()
    assert_close(loss_with_seed(1), loss_with_seed(1))
    assert not torch.equal(loss_with_seed(1), loss_with_seed(2))
    model.eval()
    assert torch.equal(loss_with_seed(1), loss_with_seed(2))


@pytest.mark.parametrize("name", ["aasae", "vae", "aag", "simclr"])
def test_a_few_optimiser_steps_lower_the_loss(name):
    torch.manual_seed(0)
    model = build_method(name, **(SMALL_AE if name in ("aasae", "vae") else SMALL))
    views = views_for(model, n=16)
    if name in ("aasae", "vae"):  # smooth targets that a few steps can start to fit; the VAE's view is its target
        target = F.interpolate(images(16, 4), size=32)
        views = {"view": target if name == "vae" else target + 0.3 * images(16), "target": target}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, metrics = model(views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert all(v.requires_grad is False for v in metrics.values())
    assert losses[-1] < losses[0], losses


def test_online_probe_trains_on_detached_features_only():
    torch.manual_seed(0)
    model = build_method("aag", num_classes=10, **SMALL)
    views, labels = views_for(model), torch.randint(0, 10, (8,))
    total, metrics = model(views, labels)
    ssl, _ = model(views)
    assert_close(total - ssl, metrics["online_loss"])
    encoder_params = list(model.encoder.parameters())
    for g_total, g_ssl in zip(torch.autograd.grad(total, encoder_params, retain_graph=True),
                              torch.autograd.grad(ssl, encoder_params)):
        assert_close(g_total, g_ssl)
    total.backward()
    assert model.online_probe.fc.weight.grad.abs().sum() > 0
    assert 0.0 <= metrics["online_acc1"].item() <= 1.0


def test_online_probe_ignores_unlabelled_samples():
    torch.manual_seed(0)
    model = build_method("aasae", num_classes=10, **SMALL_AE)
    loss, metrics = model(views_for(model), torch.full((8,), -1))
    assert torch.isfinite(loss) and metrics["online_loss"] == 0


def test_every_method_declares_views_the_loader_can_make_and_its_own_schema():
    for name, cls in METHODS.items():
        assert cls.views and set(cls.views.values()) <= set(AUGMENTATIONS), name
        assert dataclasses.is_dataclass(cls.config) and cls.config().name == name


@pytest.mark.parametrize("name, grid, rows", [
    ("aasae", "reconstructions", ["original", "encoder input", "reconstruction"]),
    ("vae", "reconstructions", ["original", "encoder input", "reconstruction"]),
    ("aag", "views", ["u", "v", "w"]),
    ("simclr", "views", ["u", "v"]),
])
def test_visualize_draws_the_named_rows_of_eight_images(name, grid, rows):
    torch.manual_seed(0)
    model = build_method(name, **(SMALL_AE if name in ("aasae", "vae") else SMALL)).train()
    views = views_for(model, n=12)
    grids = model.visualize(views)
    assert list(grids) == [grid] and list(grids[grid]) == rows
    for images_ in grids[grid].values():
        assert images_.shape == (8, 3, 32, 32)
    assert model.training  # drawing leaves the training mode as it was
    if name in ("aasae", "vae"):  # the reconstruction is the decoder's mean, D(mu)
        with torch.no_grad():
            _, _, expected = mean_reconstruction(model.eval(), grids[grid]["encoder input"])
        assert_close(grids[grid]["reconstruction"], expected)


@pytest.mark.parametrize("name", ["aasae", "aag"])
def test_invalid_rows_are_left_out_of_the_loss_and_the_probe(name):
    """The loader's mask: the method's loss and the online probe's equal those of the valid rows alone."""
    torch.manual_seed(0)
    model = build_method(name, num_classes=10, **(SMALL_AE if name == "aasae" else SMALL)).eval()
    views, labels = views_for(model), torch.randint(0, 10, (8,))
    valid = torch.tensor([True, True, False, True, True, False, True, True])
    with torch.no_grad():
        _, masked = model(views, labels, valid)
        _, subset = model({k: v[valid] for k, v in views.items()}, labels[valid])
    for key in ("ssl_loss", "online_loss", "online_acc1"):
        assert_close(masked[key], subset[key], rtol=1e-4, atol=1e-5)
