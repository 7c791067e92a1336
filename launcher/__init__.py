"""The launcher's entry (``python -m launcher``, ``videodit``).

``models`` and ``parallel`` are generic names, and ``python -m`` puts the current folder first on
``sys.path``: run from a project with its own ``models/`` package, ``import models`` would find that
one. Importing ``launcher`` therefore binds those two names to the packages installed beside it,
by file location, before anything imports them. A process that already imported a different
``models`` (a user's script importing theirs, then ours) gets an ImportError that says so rather
than a confusing failure later.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SIBLINGS = ("models", "parallel")  # import order: parallel imports models


def _bind_sibling(name: str, root: Path) -> None:
    folder = (root / name).resolve()
    module = sys.modules.get(name)
    if module is not None:
        where = Path(getattr(module, "__file__", None) or "?").resolve().parent
        if where != folder:
            raise ImportError(
                f"a different '{name}' package is already imported ({where}); the launcher needs its own "
                f"({folder}). Import the launcher first, or run it as its own process (videodit, python -m launcher)"
            )
        return
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise ImportError(f"the launcher's '{name}' package is missing at {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


for _name in _SIBLINGS:
    _bind_sibling(_name, Path(__file__).resolve().parent.parent)
