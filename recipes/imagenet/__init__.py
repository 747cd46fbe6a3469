"""ImageNet ViT / MLP-Mixer recipes of "Dropout Reduces Underfitting" (Liu et al. 2023) on timm models."""

from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"

# (recipe, config file, description): the paper's rows, basic recipe unless named "improved".
RECIPES = [
    ("imagenet", "basic", "the paper's basic recipe for any timm model (model.name), no dropout"),
    ("vit_t", "vit_t", "ViT-T, no dropout (73.9 top-1)"),
    ("vit_t_dropout", "vit_t_dropout", "ViT-T, standard dropout 0.1 (67.9)"),
    ("vit_t_sd", "vit_t_sd", "ViT-T, standard stochastic depth 0.5 (72.6)"),
    ("vit_t_early_dropout", "vit_t_early_dropout", "ViT-T, early dropout 0.1 linear to 0 by epoch 50 (74.3)"),
    ("vit_t_early_sd", "vit_t_early_sd", "ViT-T, early stochastic depth 0.5 linear to 0 by epoch 50 (74.4)"),
    ("vit_t_early_dropout_improved", "vit_t_early_dropout_improved",
     "ViT-T, early dropout, improved recipe: 600 epochs, mixup/cutmix 0.3 (76.7)"),
    ("vit_t_early_sd_improved", "vit_t_early_sd_improved", "ViT-T, early s.d., improved recipe (76.7)"),
    ("mixer_s", "mixer_s", "Mixer-S/32, no dropout (71.0)"),
    ("mixer_s_early_dropout", "mixer_s_early_dropout", "Mixer-S/32, early dropout (71.3)"),
    ("mixer_s_early_sd", "mixer_s_early_sd", "Mixer-S/32, early stochastic depth (71.7)"),
    ("vit_b_sd", "vit_b_sd", "ViT-B/16, standard stochastic depth 0.4 (81.6)"),
    ("vit_b_late_sd", "vit_b_late_sd", "ViT-B/16, late stochastic depth 0.4 from epoch 50 (82.3)"),
    ("mixer_b_sd", "mixer_b_sd", "Mixer-B/16, standard stochastic depth (78.0)"),
    ("mixer_b_late_sd", "mixer_b_late_sd", "Mixer-B/16, late stochastic depth from epoch 50 (78.6)"),
]


def recipe_specs():
    from trainer.registry import RecipeSpec

    from .recipe import ImageNetRecipe

    return [RecipeSpec(name, ImageNetRecipe, CONFIGS / f"{config}.yaml", description)
            for name, config, description in RECIPES]
