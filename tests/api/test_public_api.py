"""The public door: ``creditmeter.__all__`` is sorted, complete, and holds only real names."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import types
from pathlib import Path

import creditmeter


def _public_names_in_namespace() -> set[str]:
    """Names bound in the package namespace that are neither private nor submodules."""
    return {
        name
        for name, value in vars(creditmeter).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_all_is_sorted_without_duplicates() -> None:
    assert creditmeter.__all__ == sorted(creditmeter.__all__)
    assert len(creditmeter.__all__) == len(set(creditmeter.__all__))


def test_every_name_in_all_exists() -> None:
    missing = [name for name in creditmeter.__all__ if not hasattr(creditmeter, name)]
    assert missing == []


def test_all_equals_the_public_names_of_the_package() -> None:
    exported = set(creditmeter.__all__)
    # Names served lazily by a module-level __getattr__ (DESIGN.md: the Redis and
    # PostgreSQL stores) need not be bound yet; every other export must be.
    lazy = {name for name in exported - set(vars(creditmeter)) if name != "__version__"}
    if lazy:
        assert callable(getattr(creditmeter, "__getattr__", None)), sorted(lazy)
    assert exported - lazy == _public_names_in_namespace() | {"__version__"}


def test_all_equals_the_names_imported_by_init_py() -> None:
    """Read ``__init__.py`` itself: every public name it binds is exported, and only those."""
    source = Path(inspect.getfile(creditmeter)).read_text(encoding="utf-8")
    bound: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom):
            bound.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            bound.update((alias.asname or alias.name).partition(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Assign):
            bound.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            bound.add(node.target.id)
    public = {
        name
        for name in bound
        if not name.startswith("_") and not isinstance(getattr(creditmeter, name), types.ModuleType)
    }
    lazy = set(creditmeter.__all__) - bound
    lazy.discard("__version__")
    assert set(creditmeter.__all__) - lazy == public | {"__version__"}
    assert "__version__" in bound


def test_exports_come_from_creditmeter() -> None:
    for name in creditmeter.__all__:
        value = getattr(creditmeter, name)
        module = getattr(value, "__module__", None)
        if module is not None and not isinstance(value, str) and module != "typing":
            # (typing aliases such as the Event union report typing as their module)
            assert module.startswith("creditmeter"), (name, module)


def test_no_private_module_leaks_as_a_public_name() -> None:
    leaked = [
        name
        for name, value in vars(creditmeter).items()
        if isinstance(value, types.ModuleType) and name in creditmeter.__all__
    ]
    assert leaked == []


def test_version_is_a_str() -> None:
    assert isinstance(creditmeter.__version__, str)
    assert creditmeter.__version__
    parts = creditmeter.__version__.split(".")
    assert len(parts) >= 2
    assert parts[0].isdigit()
    assert parts[1].isdigit()


def test_version_matches_the_installed_distribution() -> None:
    assert importlib.metadata.version("creditmeter") == creditmeter.__version__


def test_package_is_typed() -> None:
    assert (Path(inspect.getfile(creditmeter)).parent / "py.typed").is_file()
