"""Points whose run directory was trained with another config than the sweep file now gives them.

A sweep run again after its ``base`` or ``grid`` was edited must not skip such a point as finished, resume it,
or summarize its old run as its result: the sweep stops with one line naming each changed point and its keys
(old -> new), unless ``--restart-changed`` moves the old run directory aside (``<point>.replaced-<UTC time>``,
never deleted) and starts the point afresh. The comparison is of the flattened dotted keys of the two resolved
configs: the run's ``config.yaml`` (read as a resume reads it: a key added to the recipe since takes its default)
and the point's config built from the sweep file now. Nothing is written here but the move.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import config_diff, diffs_text, read_yaml
from ..errors import ConfigError
from ..registry import all_recipes
from ..rundir import RunDir
from .spec import override_value

FLAG = "--restart-changed"
SHOWN_KEYS = 3  # a point's differing keys named in full; the rest are counted


@dataclass(frozen=True)
class Change:
    point: str
    diffs: list[tuple[str, Any, Any]]  # (dotted key, old value, new value), by key


def saved_config(run_dir: Path) -> dict | None:
    """The resolved config a point's run was trained with, None when its directory holds no config.yaml."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return None
    data = read_yaml(path)
    spec = all_recipes().get(data.get("recipe"))
    if spec is not None:
        try:  # as --resume reads it: keys the recipe gained since the run take their defaults
            return spec.load_config([path]).model_dump(mode="json")
        except ConfigError:  # a key the recipe no longer has: compared as written
            pass
    return data


def find_changes(points, configs: list[dict]) -> dict[str, Change]:
    """The points whose run directory holds a config.yaml that differs from ``configs`` (the points' resolved
    configs, in order), by point name."""
    changes = {}
    for point, new in zip(points, configs):
        try:
            old = saved_config(point.run_dir)
        except ConfigError:
            changes[point.name] = Change(point.name, [("config.yaml", "unreadable", "the sweep file's config")])
            continue
        if old is not None and (diffs := config_diff(old, new)):
            changes[point.name] = Change(point.name, diffs)
    return changes


def keys_text(change: Change) -> str:
    """``key old -> new`` for the first keys (as ``--set`` would write the values), then how many more."""
    return diffs_text(change.diffs, override_value, SHOWN_KEYS)


def describe(changes: list[Change], sweep_file: str) -> str:
    """The one-line error of a sweep whose points changed since they ran."""
    groups: dict[str, list[str]] = {}  # points changed alike (an edited base) are named together
    for c in changes:
        groups.setdefault(keys_text(c), []).append(c.point)
    named = "; ".join(f"{', '.join(names)} ({keys})" for keys, names in groups.items())
    return (f"{len(changes)} point(s) of {sweep_file} changed since they ran, so their old runs are neither skipped "
            f"as finished nor resumed: {named}; run the sweep again with {FLAG} to move their run directories "
            f"aside (<point>.replaced-<time>) and start them afresh, or restore the sweep file's base and grid")


def aside_path(run_dir: Path, when: datetime | None = None) -> Path:
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    target, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}"), 1
    while target.exists():  # two restarts in one second
        target, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}"), n + 1
    return target


def move_aside(run_dir: Path) -> Path:
    """Rename the old run directory beside itself (the same file system: nothing is copied or deleted)."""
    target = aside_path(run_dir)
    os.rename(run_dir, target)
    return target
