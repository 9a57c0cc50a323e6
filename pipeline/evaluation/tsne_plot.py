"""A t-SNE map of an encoder's test features, one dot per image coloured by its class, as a PNG: where people would
rather look than read (are the classes separate clusters, which ones mix).

scikit-learn's TSNE (Barnes-Hut) embeds at most `max_points` features (a seeded sample of the split: t-SNE's cost
grows with the count, and a few thousand points show the clusters); PIL draws the scatter, so no plotting library is
needed. scikit-learn comes with the `demo` and `test` extras; without it `require_sklearn` says how to get it.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from PIL import Image, ImageDraw

# 20 distinguishable colours (Tableau's 10, then their light variants); more classes reuse them in turn
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5"]
LEGEND_MAX = 20  # classes named in the legend; beyond that the colours repeat and names would not help


class SklearnMissing(RuntimeError):
    pass


def require_sklearn() -> None:
    if importlib.util.find_spec("sklearn") is None:
        raise SklearnMissing("the t-SNE plot needs scikit-learn: pip install 'scikit-learn==1.9.1' (the demo and test "
                             "extras include it), or pass tsne=false")


def embed(features: torch.Tensor, labels: torch.Tensor, max_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2-d t-SNE coordinates of at most `max_points` features (a seeded sample), with their labels."""
    from sklearn.manifold import TSNE

    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(labels), generator=generator)[:max_points].sort().values
    x = features.detach().float().cpu()[keep].numpy()
    perplexity = min(30.0, (len(x) - 1) / 3)  # t-SNE needs fewer neighbours than points
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return xy, labels.cpu()[keep].numpy()


def scatter(xy: np.ndarray, labels: np.ndarray, class_names: list[str], title: str, size: int = 800) -> Image.Image:
    """The points as dots coloured by class on a white square, the title above and a legend of class colours on the
    right."""
    legend = list(range(min(len(class_names), LEGEND_MAX)))
    legend_w = 14 + 6 * max((len(class_names[c]) for c in legend), default=0) + 16 if legend else 0
    top, pad = 24, 12
    canvas = Image.new("RGB", (size + legend_w, size + top), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), title, fill="black")
    lo, hi = xy.min(0), xy.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    pixels = pad + (xy - lo) / span * (size - 2 * pad)
    for (px, py), label in zip(pixels, labels):
        colour = PALETTE[int(label) % len(PALETTE)]
        draw.ellipse((px - 2.5, top + py - 2.5, px + 2.5, top + py + 2.5), fill=colour)
    for row, c in enumerate(legend):
        y = top + pad + 16 * row
        draw.rectangle((size + 4, y, size + 14, y + 10), fill=PALETTE[c % len(PALETTE)])
        draw.text((size + 18, y - 1), class_names[c], fill="black")
    return canvas
