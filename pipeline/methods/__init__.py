"""Self-supervised methods behind one contract (see base.py); `build_method(name, **config)` picks one by name.

Every module in this package is imported here so that its `@register_method` classes land in METHODS: adding a
method is one new file (plus its config), with no edit to this one.
"""

import importlib
import pkgutil

from pipeline.methods.base import METHODS, Method, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_method(name: str, **kwargs) -> Method:
    """Instantiate the method registered as `name` with plain-Python constructor arguments (e.g. from Hydra)."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name](**kwargs)


__all__ = ["METHODS", "Method", "build_method", "register_method"]
