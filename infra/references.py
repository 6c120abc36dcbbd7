"""`module:attribute` references, loaded as `uvicorn module:app` loads its app.

One mechanism for everything the CLI loads by name (`--app`, `--variant`); each caller
words its own errors, since what went wrong means something different to each.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any


def split_reference(reference: str) -> tuple[str, str] | None:
    """(module, attribute) of `module:attribute`, or None when it is not one."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        return None
    return module_name, attribute


def import_from(module_name: str, search_path: str | None = None) -> Any:
    """Import `module_name` with `search_path` (default: the working directory) first on `sys.path`.

    Whatever the import raises propagates: ModuleNotFoundError, or the module's own error.
    """
    directory = search_path if search_path is not None else str(Path.cwd())
    if directory not in sys.path:
        sys.path.insert(0, directory)
    return importlib.import_module(module_name)


def attribute_of(target: Any, dotted: str) -> Any:
    """`target.a.b` for `dotted` "a.b"; AttributeError when a part is missing."""
    for part in dotted.split("."):
        target = getattr(target, part)
    return target
