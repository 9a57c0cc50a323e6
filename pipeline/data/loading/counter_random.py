"""Random numbers that are a pure function of integer coordinates, drawn for a whole batch at once.

A resumed run must see the augmentations an uninterrupted one sees, so a sample's random parameters may depend on
nothing but (seed, epoch, sample index, view): not on the rank, the batch, or how many numbers were drawn before.
Seeding a numpy Generator per sample gives that at about 80 us a sample; this is SplitMix64 (Steele et al., 2014)
started from a hash of the coordinates, vectorised over the batch: one sample's stream is
mix(state + k * GOLDEN) for k = 1, 2, ..., where state mixes the key and the sample index.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = (np.uint64(s) for s in (30, 27, 31, 11))


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose output bits each depend on every input bit."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def uniforms(key: Sequence[int], rows: np.ndarray, count: int) -> np.ndarray:
    """(len(rows), count) float64 uniforms in [0, 1): row i's numbers depend only on `key` and rows[i]."""
    state = np.zeros(1, np.uint64)
    for part in key:
        state = _mix(state ^ np.uint64(part))
    state = _mix(state ^ np.asarray(rows, np.uint64))[:, None]
    draws = _mix(state + GOLDEN * np.arange(1, count + 1, dtype=np.uint64))
    return (draws >> _S11).astype(np.float64) * 2.0**-53
