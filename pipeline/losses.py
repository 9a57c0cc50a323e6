"""Losses of the four methods, as pure functions of (global) batches.

Contrastive losses take un-normalised embeddings of the whole global batch (see pipeline.distributed for the gather
and for what equality holds across ranks) and L2-normalise them here. The likelihood and KL return one value per
sample, so the caller decides how to reduce (AASAE: mean over the batch). Half-precision inputs (a bf16/fp16 engine)
are computed in float32, with autocast switched off (the bf16 engine's forward runs under it, which would cast the
logits' matmuls back to bf16): bf16/fp16 are too coarse for logits scaled by 1/tau and for sums over every pixel.

`valid` (N,) bool marks the rows that may be trained on: a sample the loader could not use, or a repeat that pads an
epoch's last batch, is neither an anchor nor a negative (its column is left out of every sum and its row out of the
mean), so a contrastive loss with a mask equals the loss of the valid rows alone.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def at_least_fp32(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Upcast half-precision tensors to float32; float32 and float64 pass unchanged."""
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


def _fp32_compute(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`loss` outside any autocast region (its first argument's device type)."""
    @functools.wraps(loss)
    def wrapped(first: Tensor, *args, **kwargs) -> Tensor:
        with torch.autocast(first.device.type, enabled=False):
            return loss(first, *args, **kwargs)
    return wrapped


def _logits(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    return a @ b.T / temperature


def _without_self(*mats: Tensor) -> list[Tensor]:
    """The square matrices with their diagonal at -inf (one mask for all), so a log-sum-exp along a row or a column
    leaves out entry (i, i)."""
    diagonal = torch.eye(mats[0].shape[0], dtype=torch.bool, device=mats[0].device)
    return [m.masked_fill(diagonal, float("-inf")) for m in mats]


def _drop_columns(m: Tensor, invalid: Tensor | None) -> Tensor:
    """`m` with the columns of invalid samples at the lowest finite value (not -inf: a row with no valid negative
    must still give finite gradients, which its zero weight then removes)."""
    return m if invalid is None else m.masked_fill(invalid[None, :], torch.finfo(m.dtype).min)


def _valid_mean(per_sample: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over the valid rows; 0 (with a gradient) when there are none."""
    if valid is None:
        return per_sample.mean()
    return per_sample.masked_fill(~valid, 0).sum() / valid.sum().clamp(min=1)


def _check_batch(n: int) -> None:
    if n < 2:
        raise ValueError("contrastive losses need at least 2 samples in the (global) batch")


@_fp32_compute
def gnt_xent(u: Tensor, v: Tensor, w: Tensor, temperature: float = 0.1, valid: Tensor | None = None) -> Tensor:
    """GNT-Xent of AAG (docs/methods.md), with s(a, b) = exp(a.b / tau), every sum over j != i, every term a
    mean over i:

        L_main  = 2 * -log( s(u_i, v_i) / (sum_j s(u_i, v_j) + sum_j s(u_i, u_j) + sum_j s(v_i, v_j)) )
        D(a, b) = -log( s(a_i, b_i) / sum_j s(a_i, b_j) )
        L       = L_main + D(u, w) + D(v, w) + D(w, u) + D(w, v)

    u, v: the two standard views, w: the auxiliary view, each (N, d) with row i from image i. The positive is not in
    its own denominator, so with all similarities equal L = 2 ln(3(N-1)) + 4 ln(N-1).
    """
    _check_batch(u.shape[0])
    u, v, w = (F.normalize(t, dim=1) for t in at_least_fp32(u, v, w))
    uv, uu, vv, uw, vw = (_logits(a, b, temperature) for a, b in ((u, v), (u, u), (v, v), (u, w), (v, w)))
    invalid = None if valid is None else ~valid
    uv_, uu_, vv_, uw_, vw_ = (_drop_columns(m, invalid) for m in _without_self(uv, uu, vv, uw, vw))
    main = 2 * (torch.cat([uv_, uu_, vv_], dim=1).logsumexp(dim=1) - uv.diagonal())
    # D(u, w) + D(w, u), then D(v, w) + D(w, v): one matrix each, anchored on its rows, then on its columns (whose
    # negatives are the rows: the transposed matrix with its invalid columns dropped)
    aux = sum(m_.logsumexp(dim=1) + _drop_columns(m_.T, invalid).logsumexp(dim=1) - 2 * m.diagonal()
              for m, m_ in ((uw, uw_), (vw, vw_)))
    return _valid_mean(main + aux, valid)


@_fp32_compute
def nt_xent(u: Tensor, v: Tensor, temperature: float = 0.5, valid: Tensor | None = None) -> Tensor:
    """NT-Xent of SimCLR: 2N anchors, each with its other view as the positive and the remaining 2N - 2 as negatives;
    the positive is in the denominator, the anchor itself is not. Mean over the 2N anchors."""
    n = u.shape[0]
    _check_batch(n)
    z = F.normalize(torch.cat(at_least_fp32(u, v)), dim=1)
    logits = _logits(z, z, temperature)
    positives = torch.cat([logits.diagonal(n), logits.diagonal(-n)])
    both = None if valid is None else torch.cat([valid, valid])
    negatives = _drop_columns(_without_self(logits)[0], None if both is None else ~both)
    return _valid_mean(negatives.logsumexp(dim=1) - positives, both)


@_fp32_compute
def gaussian_nll(mean: Tensor, target: Tensor, sigma: float = 1.0) -> Tensor:
    """-log N(target; mean, sigma^2 I) per sample, summed over all non-batch dimensions, constant included:
    sum_p (target - mean)^2 / (2 sigma^2) + D (log sigma + log(2 pi) / 2)."""
    if mean.shape != target.shape:  # refuse to broadcast a wrongly sized reconstruction
        raise ValueError(f"reconstruction shape {tuple(mean.shape)} != target shape {tuple(target.shape)}")
    mean, target = at_least_fp32(mean, target)
    dims = target[0].numel()
    sq = (target - mean).pow(2).flatten(1).sum(1)
    return sq / (2 * sigma**2) + dims * (math.log(sigma) + 0.5 * math.log(2 * math.pi))


@_fp32_compute
def kl_to_standard_normal(mu: Tensor, std: Tensor) -> Tensor:
    """KL( N(mu, diag(std^2)) || N(0, I) ) per sample, in closed form: sum_k (std^2 + mu^2 - 1) / 2 - log std."""
    mu, std = at_least_fp32(mu, std)
    return (0.5 * (std.pow(2) + mu.pow(2) - 1) - torch.log(std)).flatten(1).sum(1)


# Contrastive objectives selectable by name: one argument per view, in the order the method lists its views.
LOSSES: dict[str, Callable[..., Tensor]] = {
    "gnt_xent": gnt_xent,
    "nt_xent": nt_xent,
}
