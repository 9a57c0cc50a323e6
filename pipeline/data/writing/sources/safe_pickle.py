"""Reads CIFAR's python pickles without letting them run code (docs/architecture.md, safety of inputs).

Pickles can call any importable function; CIFAR's only need numpy's array reconstruction, so only those names load.
"""

from __future__ import annotations

import pickle

from .base import SourceFileError

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
            raise pickle.UnpicklingError(f"it would call {module}.{name}, refused: CIFAR pickles hold only numpy "
                                         "arrays, lists and strings")
        return super().find_class(module, name)


def load_pickle(path: str) -> dict:
    """Loads a CIFAR batch (a dict of arrays, lists, bytes and ints) with string keys, whatever pickle protocol.
    Anything else (truncated, not a pickle, one that would run code, not a dict) is a SourceFileError naming it."""
    with open(path, "rb") as f:
        try:
            data = _ArraysOnlyUnpickler(f, encoding="bytes").load()
        except OSError:
            raise  # the filesystem failed, not the file's contents
        except EOFError as err:
            raise SourceFileError(f"{path}: not a readable CIFAR pickle: empty or truncated") from err
        except Exception as err:  # what the unpickler makes of hostile bytes varies; the file is at fault either way
            raise SourceFileError(f"{path}: not a readable CIFAR pickle: {err or type(err).__name__}") from err
    if not isinstance(data, dict):
        raise SourceFileError(f"{path}: holds a {type(data).__name__}, not the dict of a CIFAR batch")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
