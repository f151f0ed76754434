"""Names a package exports lazily: imported from their module on first use.

So ``import t2v_lightning`` (and ``t2v_lightning.data``) stays cheap and the command line starts
fast. Imports nothing of the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any], names: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for names imported on first use.

    Args:
        package: the package's name (for the error of an unknown attribute).
        exports: exported name → the module that defines it.
        namespace: the package's ``globals()``; a name is cached there once imported.
        names: what ``dir(package)`` lists.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return list(names)

    return __getattr__, __dir__
