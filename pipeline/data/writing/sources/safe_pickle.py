"""Reads CIFAR's python pickles without letting them run code (docs/architecture.md, safety of inputs).

Pickles can call any importable function; CIFAR's only need numpy's array reconstruction, so only those names load.
"""

from __future__ import annotations

import pickle

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR pickles hold only numpy arrays")
        return super().find_class(module, name)


def load_pickle(path: str) -> dict:
    """Loads a CIFAR batch (a dict of arrays, lists, bytes and ints) with string keys, whatever pickle protocol."""
    with open(path, "rb") as f:
        data = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    if not isinstance(data, dict):
        raise pickle.UnpicklingError(f"{path}: expected a dict, got {type(data).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
