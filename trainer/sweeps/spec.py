"""The sweep file, validated up front so a typo fails before a single job is started or submitted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from ..config import Section, _format_validation_error, read_yaml
from ..errors import ConfigError
from ..registry import get_recipe


class SlurmSpec(Section):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=0, description="0: CPU tasks (tasks_per_node of them)")
    tasks_per_node: int | None = Field(None, ge=1, description="ranks per node; default one per GPU")
    partition: str | None = None
    time_min: int = Field(4320, ge=1)
    account: str | None = None
    cpus_per_task: int = Field(10, ge=1)
    mem_gb: int | None = Field(None, ge=1)
    constraint: str | None = None
    setup: list[str] = Field(default_factory=list, description="shell lines run before the job (module load ...)")
    extra: dict[str, Any] = Field(default_factory=dict, description="more sbatch options, e.g. {qos: high}")
    max_requeue: int = Field(3, ge=0, description="times a timed-out job is requeued to resume")
    signal_delay_s: int = Field(120, ge=0, description="warning before the time limit, to requeue in time")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


class SweepSpec(Section):
    recipe: str
    sweep_dir: str
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    hostfile: str | None = None
    ranks: int = Field(1, ge=1, description="local backend: processes per point")

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} is an empty list; give it at least one value")
        return grid

    @property
    def root(self) -> Path:
        return Path(self.sweep_dir)


def override_value(value: Any) -> str:
    """Write a value so that ``--set``'s YAML parsing reads back exactly the same value."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={override_value(v)}" for k, v in values.items()]


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; relative paths are taken from the current directory, like ``--run-dir``."""
    data = read_yaml(path)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"sweep file {path}: {_format_validation_error(err)}") from None
    get_recipe(spec.recipe)
    spec.sweep_dir = str(Path(spec.sweep_dir).absolute())
    if spec.hostfile:
        spec.hostfile = str(Path(spec.hostfile).absolute())
    overlap = sorted(set(spec.base) & set(spec.grid))
    if overlap:
        raise ConfigError(f"sweep file {path}: '{overlap[0]}' is in both base and grid; keep it in one")
    return spec


def check_points(spec: SweepSpec, points) -> list[dict]:
    """Build every point's config once: an unknown key or a bad value names the point and the key. Returns the
    resolved configs (as a run's config.yaml holds them), in the points' order."""
    recipe = get_recipe(spec.recipe)
    configs = []
    for point in points:
        try:
            configs.append(recipe.load_config([], point.overrides).model_dump(mode="json"))
        except ConfigError as e:
            raise ConfigError(f"sweep point {point.name}: {e}") from None
    return configs
