"""GNT-Xent / NT-Xent against loop-based references, their known values, and the Gaussian likelihood and KL."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from torch.testing import assert_close

from pipeline.losses import LOSSES, gaussian_nll, gnt_xent, kl_to_standard_normal, nt_xent


def ref_gnt_xent(u, v, w, tau):
    """docs/methods.md (AAG), term by term, with explicit loops over anchors and negatives."""
    u, v, w = (F.normalize(t, dim=1) for t in (u, v, w))
    n = u.shape[0]

    def s(a, b):
        return torch.exp(torch.dot(a, b) / tau)

    def neg(a_i, b, i):
        return sum(s(a_i, b[j]) for j in range(n) if j != i)

    def d(a, b):
        return sum(-torch.log(s(a[i], b[i]) / neg(a[i], b, i)) for i in range(n)) / n

    main = sum(-2 * torch.log(s(u[i], v[i]) / (neg(u[i], v, i) + neg(u[i], u, i) + neg(v[i], v, i))) for i in range(n))
    return main / n + d(u, w) + d(v, w) + d(w, u) + d(w, v)


def ref_nt_xent(u, v, tau):
    z = F.normalize(torch.cat([u, v]), dim=1)
    n2 = z.shape[0]
    total = 0
    for k in range(n2):
        pos = (k + n2 // 2) % n2
        den = sum(torch.exp(torch.dot(z[k], z[j]) / tau) for j in range(n2) if j != k)
        total = total - torch.log(torch.exp(torch.dot(z[k], z[pos]) / tau) / den)
    return total / n2


def random_views(count, n=6, d=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(count)]


@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("loss_fn, reference, n_views", [(gnt_xent, ref_gnt_xent, 3), (nt_xent, ref_nt_xent, 2)],
                         ids=["gnt_xent", "nt_xent"])
def test_contrastive_loss_matches_loop_reference_value_and_gradients(loss_fn, reference, n_views, tau):
    views = random_views(n_views)
    loss = loss_fn(*views, temperature=tau)
    ref = reference(*views, tau)
    assert_close(loss, ref, rtol=0, atol=1e-5)
    for g, r in zip(torch.autograd.grad(loss, views), torch.autograd.grad(ref, views)):
        assert_close(g, r, rtol=0, atol=1e-5)


def test_gnt_xent_float32_matches_float64_reference():
    views = random_views(3, n=16, d=32, dtype=torch.float32, seed=1)
    ref = ref_gnt_xent(*[v.detach().double() for v in views], 0.1)
    assert_close(gnt_xent(*views, temperature=0.1).double(), ref, rtol=0, atol=1e-5)


def test_half_precision_inputs_are_computed_in_float32():
    views = [v.detach().bfloat16() for v in random_views(3, n=16, d=32, dtype=torch.float32, seed=2)]
    loss = gnt_xent(*views)
    assert loss.dtype == torch.float32
    assert_close(loss, gnt_xent(*[v.float() for v in views]))
    mean, target = views[0][:, None], views[1][:, None]
    assert gaussian_nll(mean, target).dtype == torch.float32


def test_losses_stay_in_float32_inside_a_bf16_autocast_region():
    """The bf16 engine runs the method's forward under autocast, which would compute the logits' matmuls in bf16."""
    views = random_views(3, n=16, d=32, dtype=torch.float32, seed=3)
    mean, target = views[0][:, None], views[1][:, None]
    expected = gnt_xent(*views), nt_xent(*views[:2]), gaussian_nll(mean, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gnt_xent(*views), nt_xent(*views[:2]), gaussian_nll(mean, target)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("n", [2, 7, 128])
def test_gnt_xent_with_all_similarities_equal_is_exactly_the_closed_form(n):
    same = torch.ones(n, 16, dtype=torch.float64)
    expected = 2 * math.log(3 * (n - 1)) + 4 * math.log(n - 1)
    assert_close(gnt_xent(same, same, same, temperature=0.1).item(), expected, rtol=0, atol=1e-10)


def test_gnt_xent_of_independent_random_projections_is_near_the_closed_form():
    # Larger than the all-equal value by about 3 / (d tau^2): 33.6 instead of 31.3 at N = d = 128.
    n, d, tau = 128, 128, 0.1
    u, v, w = (t.detach() for t in random_views(3, n=n, d=d, dtype=torch.float32, seed=3))
    expected = 2 * math.log(3 * (n - 1)) + 4 * math.log(n - 1) + 3 / (d * tau**2)
    assert abs(gnt_xent(u, v, w, temperature=tau).item() - expected) < 0.5


def test_nt_xent_with_all_similarities_equal():
    n = 8
    same = torch.ones(n, 4)
    assert_close(nt_xent(same, same).item(), math.log(2 * n - 1), rtol=0, atol=1e-5)


def test_contrastive_losses_reject_a_single_sample_batch():
    with pytest.raises(ValueError):
        gnt_xent(*[torch.randn(1, 4)] * 3)


def test_loss_registry_names_the_contrastive_objectives():
    assert LOSSES["gnt_xent"] is gnt_xent and LOSSES["nt_xent"] is nt_xent


@pytest.mark.parametrize("sigma", [1.0, 0.3])
def test_gaussian_nll_is_the_summed_negative_log_density(sigma):
    g = torch.Generator().manual_seed(0)
    mean, target = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    expected = -Normal(mean, sigma).log_prob(target).flatten(1).sum(1)
    assert_close(gaussian_nll(mean, target, sigma), expected)
    if sigma == 1.0:  # half the summed squared error plus the constant D/2 log(2 pi)
        half_sse = 0.5 * (mean - target).pow(2).flatten(1).sum(1)
        assert_close(gaussian_nll(mean, target), half_sse + 3 * 8 * 8 * 0.5 * math.log(2 * math.pi))


def test_gaussian_nll_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        gaussian_nll(torch.zeros(2, 3, 1, 1), torch.zeros(2, 3, 8, 8))


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, std = torch.randn(5, 16, generator=g), torch.rand(5, 16, generator=g) + 0.1
    expected = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(1)
    assert_close(kl_to_standard_normal(mu, std), expected)
    assert_close(kl_to_standard_normal(torch.zeros(3, 8), torch.ones(3, 8)), torch.zeros(3))


@pytest.mark.parametrize("name", ["gnt_xent", "nt_xent"])
def test_a_masked_row_is_neither_anchor_nor_negative(name):
    """With a mask, the loss (and its gradient) is the loss of the valid rows alone: an unusable sample or a repeat
    padding the last batch cannot become a false negative."""
    g = torch.Generator().manual_seed(3)
    n_views = 3 if name == "gnt_xent" else 2
    views = [torch.randn(10, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(n_views)]
    valid = torch.tensor([True, False, True, True, False, True, True, True, False, True])
    masked = LOSSES[name](*views, valid=valid)
    subset = LOSSES[name](*(v[valid] for v in views))
    assert_close(masked, subset)
    grads = torch.autograd.grad(masked, views)
    expected = torch.autograd.grad(subset, views)
    for got, want in zip(grads, expected):
        assert_close(got, want)
        assert not got[~valid].any()  # nothing flows into the masked rows
    assert torch.equal(LOSSES[name](*views, valid=torch.ones(10, dtype=torch.bool)), LOSSES[name](*views))


@pytest.mark.parametrize("name", ["gnt_xent", "nt_xent"])
def test_a_batch_without_valid_rows_gives_zero_not_nan(name):
    views = [torch.randn(6, 8, requires_grad=True) for _ in range(3 if name == "gnt_xent" else 2)]
    loss = LOSSES[name](*views, valid=torch.zeros(6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and all(torch.isfinite(v.grad).all() for v in views)
