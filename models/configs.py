"""Where the configuration files live: `configs/` of a source checkout (the source of truth), or,
in an installed wheel, the same files shipped as the data package `videodit_configs` (the wheel
maps `configs/` to it at build time: pyproject.toml)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """The folder holding `topology/`, `calibration/` and `sweeps/`."""
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "configs").is_dir():
        return CHECKOUT / "configs"
    spec = importlib.util.find_spec("videodit_configs")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no configs/: neither a source checkout nor an installed videodit_configs package")
    return Path(next(iter(spec.submodule_search_locations)))


def config_file(*parts: str) -> Path:
    """`config_file("topology", "wan.yaml")` -> its path."""
    return config_dir().joinpath(*parts)
