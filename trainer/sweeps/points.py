"""The grid's cross product as named points, each with its own run directory under the sweep directory."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import SweepSpec, overrides


@dataclass(frozen=True)
class Point:
    name: str
    values: dict[str, Any]  # the grid values of this point
    overrides: list[str]  # base then grid, as --set KEY=VALUE
    run_dir: Path


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest trailing part of each dotted key that tells it apart from the others (drop.mode -> mode)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != key and (o == tail or o.endswith("." + tail)) for o in keys):
                break
        out[key] = tail
    return out


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (int, float, str)):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", text).strip("-") or "x"


def expand(spec: SweepSpec) -> list[Point]:
    """The cross product in the file's key order, the last key varying fastest; names are unique dir names."""
    keys = list(spec.grid)
    short = _short_keys(keys)
    base = overrides(spec.base)
    points, seen = [], set()
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        name = "_".join(f"{short[k]}-{_value_text(v)}" for k, v in values.items()) or "base"
        if name in seen:  # values that differ only in characters a file name cannot hold
            name = f"{name}_{len(points):03d}"
        seen.add(name)
        points.append(Point(name, values, base + overrides(values), Path(spec.sweep_dir) / name))
    return points
