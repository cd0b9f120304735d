"""Package modules that are also the API's functions: ``vlexport.export(...)`` where ``vlexport.export`` is
the exporters' package (likewise ``quantize`` and ``bench``).

Once a subpackage is imported, Python sets it as the parent's attribute, so a function of the same name in
``vlexport/__init__.py`` would be replaced by the module on first import. Instead the package module itself is
callable and forwards to the function, resolved by name at call time (the packages do not import the API,
which imports the orchestrator, which imports them).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def make_callable(package: str, target: str) -> None:
    """Make ``sys.modules[package]`` callable as ``target`` ("module:function")."""
    module_name, _, function = target.partition(":")

    class CallablePackage(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(module_name), function)(*args, **kwargs)

    CallablePackage.__call__.__doc__ = f"Calls {module_name}.{function} (see its documentation)."
    sys.modules[package].__class__ = CallablePackage
