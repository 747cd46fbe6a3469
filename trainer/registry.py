"""Recipes by name: the built-in families under ``recipes/`` and any installed package's entry points.

A family exposes ``recipe_specs()``; another package adds recipes by declaring an entry point in the
``dsrecipes.recipes`` group that points at such a function. Neither touches the engine.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Iterable

from .config import RecipeConfig, build_config, read_config_file
from .errors import ConfigError

ENTRY_POINT_GROUP = "dsrecipes.recipes"


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    factory: Callable  # a trainer.recipe.Recipe subclass
    config_file: Path
    description: str = ""
    requires_init: bool = False  # continues a trained run: train.init_from must name one

    @property
    def config_model(self) -> type[RecipeConfig]:
        return self.factory.config_model

    def load_config(self, user_files: Iterable[str | Path] = (), overrides: Iterable[str] = ()) -> RecipeConfig:
        files = [self.config_file, *user_files]
        layers = [read_config_file(f) for f in files] + [{"recipe": self.name}]
        return build_config(self.config_model, layers, list(overrides))


def _builtin_specs() -> Iterable[RecipeSpec]:
    import recipes

    for mod in pkgutil.iter_modules(recipes.__path__):
        family = importlib.import_module(f"recipes.{mod.name}")
        specs = getattr(family, "recipe_specs", None)
        if specs is not None:
            yield from specs()


def _entry_point_specs() -> Iterable[RecipeSpec]:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        yield from ep.load()()


@lru_cache(maxsize=1)
def all_recipes() -> dict[str, RecipeSpec]:
    found: dict[str, RecipeSpec] = {}
    for spec in [*_builtin_specs(), *_entry_point_specs()]:
        prior = found.get(spec.name)
        if prior is not None and prior != spec:
            raise ConfigError(f"two recipes are named '{spec.name}' ({prior.factory} and {spec.factory}); rename one")
        found[spec.name] = spec
    return dict(sorted(found.items()))


def get_recipe(name: str) -> RecipeSpec:
    recipes = all_recipes()
    if name not in recipes:
        import difflib

        close = difflib.get_close_matches(name, recipes, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown recipe '{name}'; {hint}see `python launch/train.py --list-recipes`")
    return recipes[name]
