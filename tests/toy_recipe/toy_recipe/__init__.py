"""The recipes this package adds, found by the engine through the ``dsrecipes.recipes`` entry point."""

from pathlib import Path

from trainer.registry import RecipeSpec

from .recipe import ToyRegression


def recipe_specs() -> list[RecipeSpec]:
    return [RecipeSpec("toy_regression", ToyRegression, Path(__file__).parent / "toy_regression.yaml",
                       "linear regression on generated data (a plug-in recipe from another package)")]
