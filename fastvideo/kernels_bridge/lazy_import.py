"""Importing a package without running its ``__init__`` (its submodules import as
usual): for third-party packages whose ``__init__`` imports far more than the part we use.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Any


def lazy_package_init(name: str, eager: tuple[str, ...] = ()) -> bool:
    """Register package ``name`` without running its ``__init__``: its submodules import
    as usual, ``eager`` ones now, and ``__init__`` runs on the first access to a name it
    binds or that is not a submodule. False (nothing changed) when the package is already
    imported, not found, or its ``__init__`` cannot be read.

    For FA4: ``flash_attn.cute`` imports quack's utility modules, and quack's ``__init__``
    also imports its RMSNorm/softmax/cross-entropy kernels, whose autotuner imports
    torch._dynamo: 5.9 s of FA4's 9.2 s import in a fresh process on the H200 machine.
    """
    if name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    # The names __init__ binds (``from .rmsnorm import rmsnorm`` makes ``rmsnorm`` a
    # function, not the submodule) always come from running it.
    own = _names_bound_by(spec.origin) if spec.origin else None
    if own is None:
        return False
    package = importlib.util.module_from_spec(spec)
    lock = threading.Lock()

    def __getattr__(attr: str) -> Any:  # noqa: N807 - the module-level hook
        if attr not in own and importlib.util.find_spec(f"{name}.{attr}") is not None:
            return importlib.import_module(f"{name}.{attr}")
        with lock:
            if package.__dict__.pop("__getattr__", None) is not None:
                spec.loader.exec_module(package)  # type: ignore[union-attr]
        if attr in package.__dict__:
            return package.__dict__[attr]
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules[name] = package
    try:
        for sub in eager:
            importlib.import_module(f"{name}.{sub}")
    except Exception:
        for key in [k for k in sys.modules if k == name or k.startswith(f"{name}.")]:
            del sys.modules[key]
        raise
    return True


def _names_bound_by(path: str) -> set[str] | None:
    """Every name a module's source binds anywhere (imports, assignments, definitions,
    dunders included; more than its globals, never fewer), or None when it cannot be read."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    names = {"__version__", "__all__", "__getattr__", "__dir__"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    return names
